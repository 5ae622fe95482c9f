"""How far from its limits does a device's pre-flight decide? Margins per candidate, per sample.

The pre-flight (agent/update/service.py) answers a dozen golden items with the
serving variant and the candidate and judges the pair with the device policy
(``DEVICE_PREFLIGHT_POLICY``): McNemar's one-sided test on the items'
pass/fail and the token-level KLD over every answer token. This runs exactly
that comparison over several seeded samples and prints, for every candidate,
the evidence and how far each figure sits from its limit (a ratio: limit /
observed for a pass, observed / limit for a fail — the larger, the safer the
decision). Run it on every instruction set the fleet has; docs/updates.md
quotes one run.

    python bench/bench_preflight.py --models-dir var/models --baseline Q8_0 \\
        --candidates Q6_K,Q4_K_M,Q3_K_M,Q2_K --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantfleet.agent.backends import LoadOptions, load_backend
from quantfleet.agent.hardware import fingerprint
from quantfleet.agent.quality.golden import load_golden, starter_golden_path
from quantfleet.agent.quality.results import LogitSummary
from quantfleet.agent.quality.runner import evaluate_backends
from quantfleet.agent.quality.verdict import Verdict, VerdictPolicy, judge
from quantfleet.agent.update.service import DEVICE_PREFLIGHT_POLICY
from quantfleet.models.catalog import Catalog


def margin(v: Verdict) -> float:
    """How far the decision is from flipping, as a ratio of a figure to its limit.

    A pass flips when any check fails: its margin is the smallest limit/observed. A
    fail flips only when every failing check passes: its margin is the largest
    observed/limit of the failing checks. McNemar's p is shown, not folded in.
    """
    judged = [c for c in v.checks if c.observed is not None and c.limit is not None
              and c.name not in ("items", "mcnemar")]
    if v.decision == "fail":
        failing = [c.observed / c.limit for c in judged if c.status == "fail"
                   and c.observed is not None and c.limit]
        return max(failing) if failing else float("inf")
    ratios = [c.limit / max(c.observed, 1e-9) for c in judged
              if c.observed is not None and c.limit is not None]
    return min(ratios) if ratios else float("inf")


def f(s: LogitSummary | None) -> str:
    return "-" if s is None else f"{s.kl_p99:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--baseline", default="Q8_0")
    ap.add_argument("--candidates", default="Q6_K,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sample", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    console = Console(width=200)
    hw = fingerprint()
    console.print(f"{hw.cpu_model} ({hw.cpu_class}); llama.cpp: {hw.llama_cpp_system_info}; "
                  f"onnxruntime {hw.onnxruntime}")
    catalog = Catalog(args.models_dir)
    golden = load_golden(starter_golden_path())
    base_entry = catalog.resolve(args.baseline)
    cands = [catalog.resolve(c) for c in args.candidates.split(",")]
    opts = LoadOptions(n_ctx=2048, n_threads=args.threads)
    policy = VerdictPolicy.model_validate({**DEVICE_PREFLIGHT_POLICY, "min_items": args.sample})
    table = Table(title=f"pre-flight against {base_entry.name}, {args.sample} items, "
                  "device policy", show_lines=False)
    for col in ("candidate", "seed", "worse/better", "McNemar p", "KLD mean", "p99 all",
                "p99 struct", "p99 prose", "tokens", "decision", "margin"):
        table.add_column(col, justify="right" if col not in ("candidate", "decision") else "left")
    worst: dict[str, tuple[str, float]] = {}
    started = time.perf_counter()
    base = load_backend(base_entry.backend, base_entry.path(catalog.dir), opts)
    try:
        for seed in (int(s) for s in args.seeds.split(",")):
            items = golden.sample(args.sample, seed=seed).items
            loaded = {e.name: load_backend(e.backend, e.path(catalog.dir), opts) for e in cands}
            try:
                comparisons = evaluate_backends(items, (base_entry.name, base), loaded,
                                                seed=seed)
            finally:
                for b in loaded.values():
                    b.close()
            for c in comparisons:
                v = judge(c, policy)
                lg = c.logits
                m = margin(v)
                name = c.candidate.rsplit("-", 1)[-1]
                table.add_row(name, str(seed), f"{c.worse}/{c.better}",
                              f"{c.mcnemar_p_worse:.3g}",
                              f"{lg.all.kl_mean:.3f}" if lg and lg.all else "-",
                              f(lg.all if lg else None), f(lg.structured if lg else None),
                              f(lg.prose if lg else None),
                              str(lg.all.tokens if lg and lg.all else 0), v.decision,
                              f"{m:.1f}x")
                prev = worst.get(name)
                if prev is None or m < prev[1] or prev[0] != v.decision:
                    worst[name] = (v.decision if prev is None or prev[0] == v.decision
                                   else "mixed", min(m, prev[1]) if prev else m)
                console.print(f"  seed {seed} {name}: {v.evidence()}", soft_wrap=True)
    finally:
        base.close()
    console.print(table)
    for name, (decision, m) in worst.items():
        console.print(f"{name}: {decision} on every sample, smallest margin {m:.1f}x"
                      if decision != "mixed" else f"{name}: decisions differ between samples")
    console.print(f"took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
