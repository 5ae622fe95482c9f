"""Which int8 recipe for the ONNX rung: quality natively and on the AVX2 path, and speed.

Builds each candidate int8 recipe from the ladder's fp32 export, then measures,
teacher-forced on the agreement test's fixed text (tests/onnx/test_onnx_agreement.py):

- natively: same-top-token rate, mean and p99 KLD against the fp32 export and
  against llama.cpp's F16 reference, on the whole text;
- under ``qemu-x86_64 -cpu Haswell`` (AVX2 + FMA, no AVX-512, no VNNI: the
  kernels of an AVX2-only CPU) on the text's first ``--qemu-tokens`` tokens,
  against the same references computed natively (emulation is ~1000x slower);
- natively, prompt-processing and generation speed through the real backend
  (as bench/bench_backends.py: greedy, prompt cache off, median of repeats).

    python bench/bench_int8_recipes.py --models-dir /work/ladder-onnx --work-dir /tmp/int8
    python bench/bench_int8_recipes.py ... --stages qemu --qemu-tokens 64 --candidates u8u8-pc

Results accumulate in WORK_DIR/results.json (a stage re-run replaces its own
figures), and the table is printed from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantfleet.agent.backends import GenerationRequest, LoadOptions, load_backend  # noqa: E402
from quantfleet.models.catalog import Catalog  # noqa: E402
from quantfleet.models.onnx_export import Int8Settings, quantize_int8  # noqa: E402
from tests.onnx import haswell_check  # noqa: E402
from tests.onnx.test_onnx_agreement import TEXT  # noqa: E402

KEEP = ("ffn_down",)
CANDIDATES: dict[str, Int8Settings] = {
    "u8s8-pc": Int8Settings("QInt8", per_channel=True, reduce_range=False),
    "u8s8-pc-rr": Int8Settings("QInt8", per_channel=True, reduce_range=True),
    "u8u8-pc": Int8Settings("QUInt8", per_channel=True, reduce_range=False),
    "u8s8-pt": Int8Settings("QInt8", per_channel=False, reduce_range=False),
    "u8s8-pt-rr": Int8Settings("QInt8", per_channel=False, reduce_range=True),
    "u8u8-pt": Int8Settings("QUInt8", per_channel=False, reduce_range=False),
    "s8s8-qdq-pc": Int8Settings("QInt8", per_channel=True, quant_format="qdq_static"),
}
#: the ladder's own rungs measured beside the candidates, for scale
LADDER_ROWS = ("onnx-int4", "onnx-fp32")
PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the "
           "steps out of habit. From the lamp room he could see the fishing boats returning. ")


def cpu_line() -> str:
    """The lscpu model name and the int8-relevant flags of this machine."""
    model, flags = platform.processor(), set[str]()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
    shown = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                         "avx_vnni", "amx_int8") if f in flags]
    return f"{model}; flags {' '.join(shown)}"


def build(work: Path, names: list[str], fp32: Path) -> None:
    logging.disable(logging.WARNING)  # ORT's quantizers log every node
    for name in names:
        dst = work / f"{name}.onnx"
        if dst.exists():
            continue
        started = time.perf_counter()
        quantize_int8(fp32, dst, replace(CANDIDATES[name], keep_float=KEEP), variant=name)
        print(f"built {name} in {time.perf_counter() - started:.0f} s", flush=True)
    logging.disable(logging.NOTSET)


def references(work: Path, catalog: Catalog, qemu_tokens: int) -> None:
    if (work / "ref_fp32.npy").exists():
        return
    f16 = load_backend("llama.cpp", catalog.resolve("F16").path(catalog.dir),
                       LoadOptions(n_ctx=1024, warmup=False))
    try:
        tokens = np.asarray(f16.tokenize(TEXT), dtype=np.int64)
        ref_f16 = f16.logits(list(tokens))
    finally:
        f16.close()
    sess = haswell_check.session(catalog.resolve("onnx-fp32").path(catalog.dir), 2)
    ref_fp32 = haswell_check.teacher_forced(sess, tokens)
    np.save(work / "tokens.npy", tokens)
    np.save(work / "ref_f16.npy", ref_f16)
    np.save(work / "ref_fp32.npy", ref_fp32)
    _prefix(work, qemu_tokens)


def _prefix(work: Path, n: int) -> None:
    np.save(work / f"tokens_{n}.npy", np.load(work / "tokens.npy")[:n])
    for ref in ("f16", "fp32"):
        np.save(work / f"ref_{ref}_{n}.npy", np.load(work / f"ref_{ref}.npy")[:n])


def model_paths(work: Path, catalog: Catalog, names: list[str]) -> dict[str, Path]:
    paths = {n: work / f"{n}.onnx" for n in names if n in CANDIDATES}
    paths.update({n: catalog.resolve(n).path(catalog.dir) for n in names if n in LADDER_ROWS})
    return paths


def quality(work: Path, paths: dict[str, Path], n: int | None, threads: int,
            qemu: str | None) -> dict[str, dict[str, Any]]:
    """haswell_check.py over ``paths`` (natively, or under ``qemu``), first ``n`` tokens."""
    suffix = f"_{n}" if n else ""
    if n and not (work / f"tokens_{n}.npy").exists():
        _prefix(work, n)
    cmd = [sys.executable, str(ROOT / "tests" / "onnx" / "haswell_check.py"),
           "--tokens", str(work / f"tokens{suffix}.npy"),
           "--reference", f"fp32={work / f'ref_fp32{suffix}.npy'}",
           "--reference", f"f16={work / f'ref_f16{suffix}.npy'}",
           "--threads", str(threads), *map(str, paths.values())]
    if qemu:
        cmd = [qemu, "-cpu", "Haswell", *cmd]
    by_path = {str(p): name for name, p in paths.items()}
    out: dict[str, dict[str, Any]] = {}
    print("$ " + " ".join(cmd), flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                row = json.loads(line)
                out[by_path[row["model"]]] = row
                print(f"  {by_path[row['model']]}: {json.dumps(row)}", flush=True)
        finally:
            if proc.poll() is None:
                proc.kill()
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} exited {proc.returncode}")
    return out


def speed(paths: dict[str, Path], repeats: int, threads: int | None) -> dict[str, Any]:
    prompt = " ".join((PASSAGE * 8).split()[:150]) + "\n\nChapter two.\n\n"
    out = {}
    for name, path in paths.items():
        backend = load_backend("onnxruntime", path,
                               LoadOptions(n_ctx=2048, n_threads=threads, prefix_cache=False))
        pp, tg = [], []
        try:
            for _ in range(repeats):
                r = backend.generate(GenerationRequest(prompt=prompt, max_tokens=32))
                if r.time_to_first_token_s:
                    pp.append(r.prompt_tokens / r.time_to_first_token_s)
                tg.append(r.tokens_per_second)
        finally:
            backend.close()
        out[name] = {"pp_tok_s": statistics.median(pp), "gen_tok_s": statistics.median(tg),
                     "size_mb": path.stat().st_size / 1e6, "load_avg": os.getloadavg()[0]}
        print(f"  {name}: {json.dumps(out[name])}", flush=True)
    return out


def table(results: dict[str, Any]) -> str:
    native, haswell = results.get("native", {}), results.get("qemu", {})
    fast = results.get("speed", {})
    n = results.get("qemu_tokens", "?")
    lines = [
        f"| recipe | kernel | native, {results.get('tokens', '?')} tokens: same top / mean KLD "
        f"/ p99 (vs fp32) | native vs F16 | native, first {n}: mean KLD | Haswell, first {n}: "
        "same top / mean KLD / p99 (vs fp32) | Haswell vs F16 | pp tok/s | gen tok/s | MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    native_n = results.get("native_n", {})
    for name in [*CANDIDATES, *LADDER_ROWS]:
        if name not in native and name not in haswell:
            continue
        kernel = CANDIDATES[name].kernel + (" RR" if CANDIDATES[name].reduce_range else "") \
            if name in CANDIDATES else name
        cells = [name, kernel]
        for row in (native.get(name), ):
            cells.append(_fig(row, "fp32"))
            cells.append(_fig(row, "f16", short=True))
        cells.append(_fig(native_n.get(name), "fp32", short=True))
        cells.append(_fig(haswell.get(name), "fp32"))
        cells.append(_fig(haswell.get(name), "f16", short=True))
        s = fast.get(name)
        cells += ([f"{s['pp_tok_s']:.0f}", f"{s['gen_tok_s']:.1f}", f"{s['size_mb']:.0f}"]
                  if s else ["", "", ""])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fig(row: dict[str, Any] | None, ref: str, short: bool = False) -> str:
    if not row or ref not in row:
        return ""
    f = row[ref]
    if short:
        return f"{f['mean_kld']:.3f}"
    return f"{f['same_top']:.1%} / {f['mean_kld']:.3f} / {f['p99_kld']:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, required=True,
                    help="a built ladder (F16, onnx-fp32, onnx-int4)")
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--candidates", default=",".join([*CANDIDATES, *LADDER_ROWS]))
    ap.add_argument("--stages", default="build,native,speed,qemu")
    ap.add_argument("--qemu-tokens", type=int, default=64)
    ap.add_argument("--qemu-threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="native threads (default: all)")
    args = ap.parse_args()
    names = [n for n in args.candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES and n not in LADDER_ROWS]
    if unknown:
        ap.error(f"unknown candidates {unknown}; known: {[*CANDIDATES, *LADDER_ROWS]}")
    stages = set(args.stages.split(","))
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(args.models_dir)
    results_file = work / "results.json"

    def save(stage: str, figures: dict[str, Any], **facts: Any) -> dict[str, Any]:
        """Merge one stage's figures into the file as it is now (another run of this
        bench may have saved its own stage meanwhile), with the facts they depend on."""
        latest = json.loads(results_file.read_text()) if results_file.exists() else {}
        latest.setdefault(stage, {}).update(figures)
        latest.update(facts)
        results_file.write_text(json.dumps(latest, indent=1))
        return latest

    if "build" in stages:
        build(work, [n for n in names if n in CANDIDATES], catalog.resolve("onnx-fp32").path(
            catalog.dir))
    references(work, catalog, args.qemu_tokens)
    paths = model_paths(work, catalog, names)
    results = save("native", {}, tokens=len(np.load(work / "tokens.npy")))
    if "native" in stages:
        threads = args.threads or os.cpu_count() or 1
        save("native", quality(work, paths, None, threads, None), native_cpu=cpu_line())
        results = save("native_n", quality(work, paths, args.qemu_tokens, threads, None))
    if "speed" in stages:
        results = save("speed", speed(paths, args.repeats, args.threads), speed_cpu=cpu_line(),
                       speed_threads=args.threads)
    if "qemu" in stages:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            raise SystemExit("qemu-x86_64 is not installed (apt-get install qemu-user)")
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True
                                 ).stdout.splitlines()[0]
        results = save("qemu", quality(work, paths, args.qemu_tokens, args.qemu_threads, qemu),
                       qemu_cpu=f"{version} -cpu Haswell on {cpu_line()}",
                       qemu_tokens=args.qemu_tokens)
    for key in ("native_cpu", "speed_cpu", "qemu_cpu"):
        if key in results:
            print(f"{key}: {results[key]}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
