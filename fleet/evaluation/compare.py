"""Pairing runs of the same items: rates, flips, McNemar.

A candidate's run against the baseline's (``compare_runs``: the operator's
report, the agent's pre-flight, the fleet's gates), and one report against
another of the same golden set from another machine (``compare_reports``:
``quantfleet eval compare``). Pure functions over :mod:`.results` data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .results import (
    Comparison,
    EvalReport,
    Flip,
    ItemRun,
    KldAcross,
    LogitSplit,
    MachineComparison,
    MachineInfo,
    PropertyDelta,
    Rate,
    VariantAcross,
)
from .stats import mcnemar_exact, wilson_interval


def rate(passed: int, n: int) -> Rate:
    ci = wilson_interval(passed, n)
    return Rate(passed=passed, n=n, rate=passed / n if n else 0.0, low=ci.low, high=ci.high)


def rates_by(items: Sequence[ItemRun], key: Callable[[ItemRun], list[tuple[str, bool]]]
             ) -> dict[str, Rate]:
    """Pass rates grouped by the (group, passed) pairs ``key`` yields per item."""
    counts: dict[str, list[int]] = {}
    for run in items:
        for group, ok in key(run):
            c = counts.setdefault(group, [0, 0])
            c[0] += ok
            c[1] += 1
    return {g: rate(p, n) for g, (p, n) in sorted(counts.items())}


def property_rates(items: Sequence[ItemRun]) -> dict[str, Rate]:
    return rates_by(items, lambda r: list(r.properties.items()))


def category_rates(items: Sequence[ItemRun]) -> dict[str, Rate]:
    return rates_by(items, lambda r: [(r.category, r.passed)])


def _delta(pairs: list[tuple[bool, bool]]) -> PropertyDelta:
    n = len(pairs)
    b = sum(x for x, _ in pairs)
    c = sum(y for _, y in pairs)
    base, cand = rate(b, n), rate(c, n)
    return PropertyDelta(baseline=base, candidate=cand, drop=base.rate - cand.rate,
                         worse=sum(x and not y for x, y in pairs),
                         better=sum(y and not x for x, y in pairs))


def compare_runs(baseline: str, candidate: str, base_items: Sequence[ItemRun],
                 cand_items: Sequence[ItemRun], *, logits: LogitSplit | None = None,
                 noise_floor: LogitSplit | None = None) -> Comparison:
    """Pair two runs of the same items by id (items only one side answered are ignored)."""
    cand_by_id = {r.item_id: r for r in cand_items}
    pairs = [(b, cand_by_id[b.item_id]) for b in base_items if b.item_id in cand_by_id]
    overall = _delta([(b.passed, c.passed) for b, c in pairs])
    by_prop: dict[str, list[tuple[bool, bool]]] = {}
    by_cat: dict[str, list[tuple[bool, bool]]] = {}
    flips: list[Flip] = []
    for b, c in pairs:
        for prop, ok in b.properties.items():
            by_prop.setdefault(prop, []).append((ok, c.properties.get(prop, False)))
        by_cat.setdefault(b.category, []).append((b.passed, c.passed))
        if b.passed != c.passed:
            changed = [p for p, ok in b.properties.items() if c.properties.get(p) != ok]
            flips.append(Flip(item_id=b.item_id, category=b.category,
                              direction="pass->fail" if b.passed else "fail->pass",
                              properties=changed))
    test = mcnemar_exact(overall.worse, overall.better)
    return Comparison(
        baseline=baseline, candidate=candidate, n_items=len(pairs),
        worse=overall.worse, better=overall.better,
        mcnemar_p=test.p_two_sided, mcnemar_p_worse=test.p_worse,
        overall=overall,
        properties={p: _delta(v) for p, v in sorted(by_prop.items())},
        categories={k: _delta(v) for k, v in sorted(by_cat.items())},
        flips=flips, logits=logits, noise_floor=noise_floor,
    )


# -- the same golden set on two machines -------------------------------------------------

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
