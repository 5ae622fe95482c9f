"""Benchmark of `quantfleet eval`: time per golden item per variant, teacher forcing, total.

Runs the evaluator on the starter golden set (or --sample N of it) over the
ladder and prints the figures the issue's target is stated in: a full
four-variant run of the starter set within 15 minutes on two cores.

    python bench/bench_eval.py --models-dir /tmp/qm                # full set
    python bench/bench_eval.py --models-dir /tmp/qm --sample 12    # quick
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from quantfleet.agent.quality.golden import load_golden, starter_golden_path
from quantfleet.agent.quality.runner import EvalOptions, evaluate
from quantfleet.models.catalog import Catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--golden", type=Path, default=None)
    ap.add_argument("--variants", default="F16,Q8_0,Q4_K_M,Q2_K")
    ap.add_argument("--sample", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    golden = load_golden(args.golden or starter_golden_path())
    names = args.variants.split(",")
    load_before = os.getloadavg()
    start = time.perf_counter()
    report = evaluate(Catalog(args.models_dir), golden, names, names[0],
                      options=EvalOptions(threads=args.threads), sample=args.sample)
    total = time.perf_counter() - start
    print(f"golden items: {report.golden.items}   cpus: {os.cpu_count()}   "
          f"threads: {args.threads}   load average before/after: "
          f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"{'variant':<22}{'s/item':>8}{'tokens/s':>10}{'passed':>9}")
    for v in report.variants:
        print(f"{v.name:<22}{v.seconds_per_item:>8.2f}{v.tokens_per_second:>10.1f}"
              f"{v.overall.passed:>5}/{v.overall.n}")
    tf = report.teacher_forcing_seconds or 0.0
    print(f"teacher forcing: {tf:.0f} s ({tf / max(1, report.golden.items):.2f} s per item, "
          f"{len(report.comparisons)} candidates + noise floor)")
    print(f"total: {total:.0f} s ({total / 60:.1f} min; target for the full 4-variant "
          f"starter set: 15 min)")


if __name__ == "__main__":
    main()
