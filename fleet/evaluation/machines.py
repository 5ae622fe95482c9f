"""One golden set measured on two machines: ``quantfleet eval compare A.json B.json``.

The same variant files answer the same items on two machines with different
kernels; this pairs the two reports item by item (which items' pass/fail
differ, with McNemar; which answers changed) and puts their KLD figures side
by side. The operator's tool: nothing on a device needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from quantfleet.agent.quality.compare import compare_runs
from quantfleet.agent.quality.results import (
    Comparison,
    EvalReport,
    Flip,
    GoldenInfo,
    KernelPath,
    Rate,
)
from quantfleet.agent.wire import HardwareFingerprint
from quantfleet.strict import Strict


class MachineInfo(Strict):
    """One side of a cross-machine comparison: which report, measured where."""

    label: str = Field(description="How the comparison names this side (the file's name).")
    created_at: str = Field(description="When its evaluation finished.")
    command: str = Field(description="The command line that produced it.")
    hardware: HardwareFingerprint | None = Field(description="Its fingerprint (None: a "
                                                 "report from before version 2).")
    kernels: KernelPath | None = Field(description="Its kernel path (None: before version 2).")


class KldAcross(Strict):
    """One KLD split of one candidate (against the same baseline) on both machines."""

    split: Literal["all", "structured", "prose"] = Field(description="Which tokens.")
    a_tokens: int | None = Field(description="Tokens scored on A (None: none).")
    b_tokens: int | None = Field(description="Tokens scored on B (None: none).")
    a_mean: float | None = Field(description="Mean KLD on A.")
    b_mean: float | None = Field(description="Mean KLD on B.")
    mean_diff: float | None = Field(description="b_mean - a_mean (positive: worse on B).")
    a_p99: float | None = Field(description="p99 KLD on A.")
    b_p99: float | None = Field(description="p99 KLD on B.")
    p99_diff: float | None = Field(description="b_p99 - a_p99 (positive: worse on B).")


class VariantAcross(Strict):
    """One variant's answers to the same items on two machines, paired by item."""

    name: str = Field(description="Catalog name of the variant (the same file on both).")
    precision: str = Field(description="Precision label.")
    role: Literal["baseline", "candidate"] = Field(description="Its role in both reports.")
    backend: str = Field(description="Its runtime (empty when neither report says).")
    n_items: int = Field(description="Items both machines answered.")
    a: Rate = Field(description="Items passed on A.")
    b: Rate = Field(description="Items passed on B.")
    worse: int = Field(description="Items passing on A and failing on B.")
    better: int = Field(description="Items failing on A and passing on B.")
    mcnemar_p: float = Field(description="Exact McNemar p-value of A against B, two-sided.")
    flips: list[Flip] = Field(description="Every item whose pass/fail differs; pass->fail "
                              "means it passes on A and fails on B.")
    answers_differ: list[str] = Field(
        description="Items whose answer text differs between the machines (pass/fail "
        "the same or not): the greedy path moved.")
    tokens_per_second: tuple[float, float] = Field(description="(A, B) generation rate.")
    kld: list[KldAcross] = Field(description="Against the baseline, per split (empty for "
                                 "the baseline itself).")


class MachineComparison(Strict):
    """Two reports of the same golden set, variants and baseline from two machines."""

    schema_version: int = Field(1, description="Shape version.")
    golden: GoldenInfo = Field(description="The golden set both evaluated (A's record).")
    baseline: str = Field(description="The baseline of both reports.")
    a: MachineInfo = Field(description="The first report.")
    b: MachineInfo = Field(description="The second report.")
    same_class: bool | None = Field(description="Whether both fingerprints have the same "
                                    "hardware class (None: a side has no fingerprint).")
    variants: list[VariantAcross] = Field(description="Every variant, baseline first.")



class ReportMismatch(ValueError):
    """Two reports that do not measure the same thing; the message names what differs."""


def _names(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def check_comparable(a: EvalReport, b: EvalReport, a_label: str = "A",
                     b_label: str = "B") -> None:
    """Raise ReportMismatch unless both reports ran the same golden items on the same
    variant files against the same baseline."""
    ga, gb = a.golden, b.golden
    if ga.sha256 != gb.sha256:
        raise ReportMismatch(
            f"{a_label} and {b_label} are of different golden sets: {ga.path} (sha256 "
            f"{ga.sha256[:12]}) against {gb.path} (sha256 {gb.sha256[:12]})")
    if a.baseline != b.baseline:
        raise ReportMismatch(f"{a_label} and {b_label} have different baselines: "
                             f"{a.baseline} against {b.baseline}")
    va, vb = {v.name: v for v in a.variants}, {v.name: v for v in b.variants}
    if va.keys() != vb.keys():
        only_a = sorted(va.keys() - vb.keys())
        only_b = sorted(vb.keys() - va.keys())
        parts = [f"only in {a_label}: {', '.join(only_a)}" if only_a else "",
                 f"only in {b_label}: {', '.join(only_b)}" if only_b else ""]
        raise ReportMismatch(f"{a_label} and {b_label} evaluated different variants ("
                             + "; ".join(p for p in parts if p) + ")")
    for name, v in va.items():
        w = vb[name]
        if v.sha256 and w.sha256 and v.sha256 != w.sha256:
            raise ReportMismatch(f"{name} is a different file in {a_label} and {b_label} "
                                 f"(sha256 {v.sha256[:12]} against {w.sha256[:12]})")
        ia, ib = [i.item_id for i in v.items], [i.item_id for i in w.items]
        if ia != ib:
            only_a = [i for i in ia if i not in set(ib)]
            only_b = [i for i in ib if i not in set(ia)]
            detail = "; ".join(p for p in (
                f"only in {a_label}: {_names(only_a)}" if only_a else "",
                f"only in {b_label}: {_names(only_b)}" if only_b else "") if p) or \
                "the same items in another order"
            raise ReportMismatch(
                f"{a_label} and {b_label} evaluated different items of {ga.path} for {name}: "
                f"{len(ia)} (sample {ga.sample}, seed {ga.seed}) against {len(ib)} (sample "
                f"{gb.sample}, seed {gb.seed}); {detail}")


def _kld_across(a: Comparison | None, b: Comparison | None) -> list[KldAcross]:
    out = []
    for split in ("all", "structured", "prose"):
        sa = getattr(a.logits, split) if a and a.logits else None
        sb = getattr(b.logits, split) if b and b.logits else None
        if sa is None and sb is None:
            continue

        def diff(x: float | None, y: float | None) -> float | None:
            return None if x is None or y is None else y - x

        am, bm = (sa.kl_mean if sa else None), (sb.kl_mean if sb else None)
        ap, bp = (sa.kl_p99 if sa else None), (sb.kl_p99 if sb else None)
        out.append(KldAcross(split=split,
                             a_tokens=sa.tokens if sa else None,
                             b_tokens=sb.tokens if sb else None,
                             a_mean=am, b_mean=bm, mean_diff=diff(am, bm),
                             a_p99=ap, b_p99=bp, p99_diff=diff(ap, bp)))
    return out


def compare_reports(a: EvalReport, b: EvalReport, a_label: str = "A",
                    b_label: str = "B") -> MachineComparison:
    """The same golden set on two machines: per variant, which items' pass/fail differ
    (paired, with McNemar), which answers changed, and the KLD figures side by side.

    Raises ReportMismatch (naming what differs) when the reports are not comparable.
    """
    check_comparable(a, b, a_label, b_label)
    comps_a = {c.candidate: c for c in a.comparisons}
    comps_b = {c.candidate: c for c in b.comparisons}
    vb = {v.name: v for v in b.variants}
    variants = []
    for v in a.variants:
        w = vb[v.name]
        paired = compare_runs(a_label, b_label, v.items, w.items)
        text_b = {i.item_id: i.text for i in w.items}
        variants.append(VariantAcross(
            name=v.name, precision=v.precision, role=v.role, backend=v.backend or w.backend,
            n_items=paired.n_items, a=v.overall, b=w.overall, worse=paired.worse,
            better=paired.better, mcnemar_p=paired.mcnemar_p, flips=paired.flips,
            answers_differ=[i.item_id for i in v.items if text_b.get(i.item_id) != i.text],
            tokens_per_second=(v.tokens_per_second, w.tokens_per_second),
            kld=[] if v.role == "baseline" else _kld_across(comps_a.get(v.name),
                                                            comps_b.get(v.name)),
        ))

    def side(r: EvalReport, label: str) -> MachineInfo:
        return MachineInfo(label=label, created_at=r.created_at, command=r.command,
                           hardware=r.hardware, kernels=r.kernels)

    same = (a.hardware.cpu_class == b.hardware.cpu_class
            if a.hardware is not None and b.hardware is not None else None)
    return MachineComparison(golden=a.golden, baseline=a.baseline, a=side(a, a_label),
                             b=side(b, b_label), same_class=same, variants=variants)
