"""Pairing runs of the same items: rates, flips, McNemar.

A candidate's run against the baseline's (``compare_runs``: the operator's
report, the agent's pre-flight, the fleet's gates). Pure functions over
:mod:`.results` data. Comparing whole reports from two machines is the
operator's tool (fleet/evaluation/machines.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .results import (
    Comparison,
    Flip,
    ItemRun,
    LogitSplit,
    PropertyDelta,
    Rate,
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
