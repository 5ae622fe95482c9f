"""The fleet dashboard's signals: per variant or per cohort, over a time window.

``by_variant`` can split each variant's row by device labels (``by=["cpu.class"]``:
a row per variant × hardware class). A device's events count under the labels
it has now (the registry keeps no label history), which for the derived cpu.*
labels is what it ran on.

For each group: requests, output-validation failure rate, tool-call success
rate, refusal rate, fallback rate, error rate, p50/p95/p99 latency, and cost
per successful request (tokens of every attempt — retries and fallbacks
included — over the requests that succeeded). Rates carry Wilson intervals so
a reader sees how much a figure from 12 requests is worth. Drift compares a
window with a reference window: the prompt-size distribution (two-sample
Kolmogorov–Smirnov), tool usage and context truncations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import and_, select

from quantfleet.agent.quality.stats import wilson_interval

from .store import Store, schema


@dataclass
class Rate:
    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @classmethod
    def of(cls, k: int, n: int) -> Rate:
        ci = wilson_interval(k, n)
        return cls(k, n, ci.low, ci.high)

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "k": self.k, "n": self.n, "low": self.low,
                "high": self.high}


@dataclass
class Signals:
    group: str
    requests: int
    validation_failure: Rate
    tool_call_success: Rate
    refusal: Rate
    fallback: Rate
    error: Rate
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    cost_per_success_tokens: float | None
    #: The label values this row is split by (``by_variant(by=...)``); "-": absent.
    by: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in vars(self).items():
            if isinstance(v, Rate):
                out[k] = v.to_json()
        return out


@dataclass
class Drift:
    group: str
    prompt_tokens_ks: float | None  # KS statistic, 0 = same distribution
    prompt_tokens_p_value: float | None
    prompt_tokens_median: tuple[float | None, float | None]  # (reference, window)
    tool_usage: tuple[float | None, float | None]
    truncation: tuple[float | None, float | None]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = ("variant", "device_id", "status", "latency_s", "prompt_tokens", "attempt_tokens",
            "validation_failed", "tool_call_ok", "refused", "fallback", "truncated")


def _rows(store: Store, start: float, end: float, variant: str | None = None,
          device_ids: Iterable[str] | None = None) -> list[Any]:
    e = schema.events
    cond = [e.c.kind == "request", e.c.ts >= start, e.c.ts < end]
    if variant is not None:
        cond.append(e.c.variant == variant)
    if device_ids is not None:
        cond.append(e.c.device_id.in_(list(device_ids)))
    q = select(*(e.c[c] for c in _COLUMNS)).where(and_(*cond))
    with store.engine.connect() as conn:
        return list(conn.execute(q))


def summarize(group: str, rows: list[Any], by: dict[str, str] | None = None) -> Signals:
    n = len(rows)
    lat = np.array([r.latency_s for r in rows if r.latency_s is not None], dtype=float)
    tools = [r.tool_call_ok for r in rows if r.tool_call_ok is not None]
    errors = sum(1 for r in rows if (r.status or 0) >= 400)
    successes = sum(1 for r in rows if (r.status or 0) < 400 and not r.validation_failed)
    cost = sum(r.attempt_tokens or 0 for r in rows)

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if lat.size else None

    return Signals(
        group=group, requests=n,
        validation_failure=Rate.of(sum(1 for r in rows if r.validation_failed), n),
        tool_call_success=Rate.of(sum(1 for t in tools if t), len(tools)),
        refusal=Rate.of(sum(1 for r in rows if r.refused), n),
        fallback=Rate.of(sum(1 for r in rows if r.fallback), n),
        error=Rate.of(errors, n),
        latency_p50_s=pct(50), latency_p95_s=pct(95), latency_p99_s=pct(99),
        cost_per_success_tokens=cost / successes if successes else None,
        by=dict(by or {}),
    )


def by_variant(store: Store, start: float, end: float,
               device_ids: Iterable[str] | None = None, by: Sequence[str] = (),
               labels: Mapping[str, Mapping[str, str]] | None = None) -> list[Signals]:
    """A row per variant, or per variant × the values of the ``by`` labels.

    ``labels`` maps device ids to their labels (read from the registry when
    ``by`` is given and it is not).
    """
    rows = _rows(store, start, end, device_ids=device_ids)
    keys = list(dict.fromkeys(by))
    if keys and labels is None:
        labels = {str(d["device_id"]): d["labels"] or {}
                  for d in store.devices(["device_id", "labels"])}
    groups: dict[tuple[str, ...], list[Any]] = {}
    for r in rows:
        own = (labels or {}).get(r.device_id) or {}
        groups.setdefault((r.variant or "?", *(own.get(k, "-") for k in keys)), []).append(r)
    return [summarize(g[0], rs, dict(zip(keys, g[1:], strict=True)))
            for g, rs in sorted(groups.items())]


def drift(store: Store, group: str, window: tuple[float, float],
          reference: tuple[float, float], device_ids: Iterable[str] | None = None) -> Drift:
    ids = list(device_ids) if device_ids is not None else None
    now = _rows(store, *window, device_ids=ids)
    ref = _rows(store, *reference, device_ids=ids)

    def share(rows: list[Any], pred: Any) -> float | None:
        return sum(1 for r in rows if pred(r)) / len(rows) if rows else None

    a = [r.prompt_tokens for r in ref if r.prompt_tokens is not None]
    b = [r.prompt_tokens for r in now if r.prompt_tokens is not None]
    ks = p_value = None
    if a and b:
        from scipy.stats import ks_2samp

        res = ks_2samp(a, b)
        ks, p_value = float(res.statistic), float(res.pvalue)
    return Drift(
        group=group, prompt_tokens_ks=ks, prompt_tokens_p_value=p_value,
        prompt_tokens_median=(float(np.median(a)) if a else None,
                              float(np.median(b)) if b else None),
        tool_usage=(share(ref, lambda r: r.tool_call_ok is not None),
                    share(now, lambda r: r.tool_call_ok is not None)),
        truncation=(share(ref, lambda r: (r.truncated or 0) > 0),
                    share(now, lambda r: (r.truncated or 0) > 0)),
    )
