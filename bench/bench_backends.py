"""Prompt-processing and generation speed of every variant, both runtimes, one run.

Each variant is loaded once (warm-up included), then answers the same prompts:
prompt processing is the prompt's tokens over the time to the first generated
token; generation is tokens per second after the first. Medians over
``--repeats`` runs. A prompt cache would flatter prompt processing, so it is off.

    python bench/bench_backends.py --models-dir /tmp/qm
    python bench/bench_backends.py --models-dir /tmp/qm --variants F16,onnx-fp32 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from quantfleet.agent.backends import GenerationRequest, LoadOptions, load_backend
from quantfleet.models.catalog import Catalog, default_models_dir

# Plain continuation text: the model keeps writing, so every run generates the
# same number of tokens (an end-of-text token would cut a run short; the table
# reports what really ran).
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the "
    "steps out of habit. From the lamp room he could see the fishing boats returning, the "
    "gulls circling the harbour and the long grey line of the coast. He wrote the weather "
    "in a leather log: wind from the west, a falling barometer, rain before midnight. "
)


def prompt_text(n_words: int) -> str:
    words = (PASSAGE * (n_words // len(PASSAGE.split()) + 1)).split()[:n_words]
    return " ".join(words) + "\n\nChapter two.\n\n"


def bench_variant(catalog: Catalog, label: str, prompt: str, gen_tokens: int, repeats: int,
                  threads: int | None) -> dict[str, object]:
    entry = catalog.resolve(label)
    started = time.perf_counter()
    backend = load_backend(entry.backend, entry.path(catalog.dir),
                           LoadOptions(n_ctx=2048, n_threads=threads, prefix_cache=False))
    load_s = time.perf_counter() - started
    pp, tg, n_prompt, n_gen = [], [], 0, []
    try:
        for _ in range(repeats):
            r = backend.generate(GenerationRequest(prompt=prompt, max_tokens=gen_tokens,
                                                   temperature=0.0))
            n_prompt = r.prompt_tokens
            if r.time_to_first_token_s:
                pp.append(r.prompt_tokens / r.time_to_first_token_s)
            tg.append(r.tokens_per_second)
            n_gen.append(r.completion_tokens)
    finally:
        backend.close()
    return {
        "variant": entry.name,
        "backend": entry.backend,
        "precision": entry.precision.label,
        "size_mb": round(entry.size_bytes / 1e6, 1),
        "load_s": round(load_s, 2),
        "prompt_tokens": n_prompt,
        "generated_tokens": min(n_gen) if n_gen else 0,
        "pp_tok_s": round(statistics.median(pp), 1) if pp else 0.0,
        "gen_tok_s": round(statistics.median(tg), 1) if tg else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, default=default_models_dir())
    ap.add_argument("--variants", default="",
                    help="comma-separated labels or names (default: every variant)")
    ap.add_argument("--prompt-words", type=int, default=200, help="prompt length in words")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    args = ap.parse_args(argv)

    catalog = Catalog(args.models_dir)
    labels = [v.strip() for v in args.variants.split(",") if v.strip()] or [
        v.precision.label for v in sorted(catalog.variants,
                                          key=lambda v: (v.backend, -v.size_bytes))]
    if not labels:
        print(f"no variants in {args.models_dir}; run `quantfleet models build`", file=sys.stderr)
        return 1
    prompt = prompt_text(args.prompt_words)
    rows = []
    for label in labels:
        rows.append(bench_variant(catalog, label, prompt, args.gen_tokens, args.repeats,
                                  args.threads))
        r = rows[-1]
        # one line per variant as soon as it is measured, so a long run shows progress
        print(f"  {r['variant']}: pp {r['pp_tok_s']} tok/s, gen {r['gen_tok_s']} tok/s",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{rows[0]['prompt_tokens']}-token prompt, {args.gen_tokens} generated "
                        f"tokens, median of {args.repeats}")
    for col in ("variant", "backend", "size MB", "load s", "pp tok/s", "gen tok/s", "gen n"):
        table.add_column(col, justify="left" if col in ("variant", "backend") else "right")
    for r in rows:
        table.add_row(str(r["variant"]), str(r["backend"]), str(r["size_mb"]), str(r["load_s"]),
                      str(r["pp_tok_s"]), str(r["gen_tok_s"]), str(r["generated_tokens"]))
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
