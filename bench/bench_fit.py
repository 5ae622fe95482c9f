"""Fitting a long conversation into the prompt budget: one dropped turn at a time vs now.

    python bench/bench_fit.py --models-dir /tmp/qm [--variant Q4_K_M]
                              [--turns 100,500,1000,2000] [--old-up-to 2000]

For each conversation of N turns of "hi" (user and assistant alternating, the
shape of issue 14's #8), ``pipeline.prepare`` runs on a real loaded variant
with the agent's default budgets (n_ctx 2048, a prompt budget of 1536 tokens):
once with ``fit_messages`` as it was (drop the oldest turn, re-render and
re-tokenize the whole conversation, repeat — kept below verbatim) and once with
the current one (a guided binary search). Printed per N: the request's size,
the turns dropped, the render+tokenize calls and seconds of each, and whether
both kept exactly the same messages (they must). Before, ``prepare`` ran on the
event loop, so its seconds were how long ``/healthz`` and every other request
stalled; now it runs in a worker thread. ``--old-up-to`` skips the old
algorithm above that many turns (2,000 of them take minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

from quantfleet.agent.backends import LoadOptions, load_backend
from quantfleet.agent.config import AgentConfig
from quantfleet.agent.serving import pipeline
from quantfleet.agent.serving.budgets import BudgetExceeded, Fit, fit_messages, is_pinned
from quantfleet.models.catalog import Catalog

M = TypeVar("M")


def fit_one_at_a_time(
    messages: Sequence[M],
    count: Callable[[list[M]], int],
    budget: int,
    role_of: Callable[[M], str],
    size_of: Callable[[M], int] | None = None,
) -> Fit:
    """fit_messages before issue 14 (size_of is ignored)."""
    kept = list(messages)
    tokens = count(kept)
    dropped = 0
    while tokens > budget:
        victim = next((i for i, m in enumerate(kept[:-1]) if not is_pinned(role_of(m))), None)
        if victim is None:
            raise BudgetExceeded(tokens, budget)
        del kept[victim]
        dropped += 1
        tokens = count(kept)
    return Fit(kept, dropped, tokens)


def timed(fit: Any, request: dict[str, Any], backend: Any, config: AgentConfig
          ) -> tuple[float, int, pipeline.Prepared]:
    calls = 0

    def counting(messages: Any, count: Any, *args: Any) -> Fit:
        def counted(kept: Any) -> int:
            nonlocal calls
            calls += 1
            return int(count(kept))

        return fit(messages, counted, *args)  # type: ignore[no-any-return]

    with mock.patch.object(pipeline, "fit_messages", counting):
        start = time.perf_counter()
        prepared = pipeline.prepare(request, backend, config)
        return time.perf_counter() - start, calls, prepared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--variant", default="Q4_K_M")
    ap.add_argument("--turns", default="100,500,1000,2000")
    ap.add_argument("--old-up-to", type=int, default=2000)
    args = ap.parse_args()
    catalog = Catalog(args.models_dir)
    entry = catalog.resolve(args.variant)
    config = AgentConfig()
    backend = load_backend(entry.backend, entry.path(catalog.dir),
                           LoadOptions(n_ctx=config.models.n_ctx))
    print(f"{args.variant}, n_ctx {backend.n_ctx}, prompt budget "
          f"{min(config.budgets.max_prompt_tokens, backend.n_ctx - 256)} tokens")
    print(f"{'turns':>6} {'body KB':>8} {'dropped':>8} | {'before s':>9} {'counts':>7} | "
          f"{'after s':>8} {'counts':>7} | same")
    for n in (int(t) for t in args.turns.split(",")):
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"}
                 for i in range(n - 1)] + [{"role": "user", "content": "hi"}]
        request = {"messages": turns}
        size_kb = len(json.dumps(request)) / 1000
        after_s, after_calls, new = timed(fit_messages, request, backend, config)
        before = "skipped"
        same = "-"
        if n <= args.old_up_to:
            before_s, before_calls, old = timed(fit_one_at_a_time, request, backend, config)
            before = f"{before_s:9.2f} {before_calls:7d}"
            same = "yes" if (old.prompt, old.dropped_messages, old.prompt_tokens) == (
                new.prompt, new.dropped_messages, new.prompt_tokens) else "NO"
        print(f"{n:6d} {size_kb:8.1f} {new.dropped_messages:8d} | {before:>17} | "
              f"{after_s:8.3f} {after_calls:7d} | {same}", flush=True)
    backend.close()


if __name__ == "__main__":
    main()
