"""What the console reads, aggregated by the store's database rather than the browser.

``signal_series`` is one GROUP BY over the request-signal index (the one the
rollout gates read, ``ix_events_request_signals``): per variant, time bucket and
latency bin it counts requests and the outcomes behind every rate; this module
only folds the bins into each bucket's rates (Wilson 95 % intervals) and
latency percentiles (with the order-statistic 95 % interval of the quantile,
read off the binned distribution). Latency bins here grow by 5 % (the gates'
by 1 %): a chart point's percentile is exact to half a bin, 2.5 %.

``fleet_summary`` counts devices by variant, update state, hardware class and
liveness; ``device_detail`` and ``rollout_detail`` gather one device's or one
rollout's page.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, func, or_, select, true

from quantfleet.agent.quality.stats import wilson_interval

from ..cohorts import Selector
from ..store import Store, schema

#: Latency bins of the charts: bin 0 is under FLOOR_S, bin i >= 1 is
#: [FLOOR_S * GROWTH**(i-1), FLOOR_S * GROWTH**i).
FLOOR_S = 1e-3
GROWTH = 1.05
_LN_GROWTH = math.log(GROWTH)
Z95 = 1.959963984540054

RATES = ("validation_failure", "tool_call_success", "refusal", "fallback", "error")
PERCENTILES = {"latency_p50_s": 0.50, "latency_p95_s": 0.95, "latency_p99_s": 0.99}


def bin_value(i: int) -> float:
    """The latency a bin stands for: its geometric middle (half the floor for bin 0)."""
    if i <= 0:
        return FLOOR_S / 2
    return float(FLOOR_S * GROWTH ** (i - 0.5))


@dataclass
class _Bucket:
    n: int = 0
    k: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        (*RATES, "tool_calls", "successes", "tokens"), 0))
    bins: dict[int, int] = field(default_factory=dict)


def quantile_with_interval(bins: dict[int, int], q: float
                           ) -> tuple[float | None, float | None, float | None]:
    """The q-quantile of binned latencies and its distribution-free 95 % interval: the
    order statistics at ranks n·q ∓ 1.96·√(n·q·(1−q)) (normal approximation to the
    binomial count of observations below the quantile)."""
    n = sum(bins.values())
    if n == 0:
        return None, None, None
    half = Z95 * math.sqrt(n * q * (1 - q))
    ranks = (max(1, math.ceil(n * q)), max(1, math.floor(n * q - half)),
             min(n, math.ceil(n * q + half)))
    order = sorted(bins.items())
    out: list[float] = []
    for rank in ranks:
        seen = 0
        for i, count in order:
            seen += count
            if seen >= rank:
                out.append(bin_value(i))
                break
    return out[0], out[1], out[2]


#: Up to this many devices, a selected window reads the devices' own rows.
FEW_DEVICES = 2000


def _aggregate(conn: Any, cond: list[Any], bucket_s: float,
               by_device: bool = False) -> dict[tuple[str, int], _Bucket]:
    """Requests matching ``cond`` per (variant, floor(ts / bucket_s)), with their latency
    bins: one GROUP BY in the database."""
    e = schema.events
    bucket = func.floor(e.c.ts / bucket_s)
    lat = e.c.latency_s
    lbin = case((lat >= FLOOR_S, 1 + func.floor(func.ln(lat / FLOOR_S) / _LN_GROWTH)), else_=0)

    def total(c: Any) -> Any:
        return func.sum(case((c, 1), else_=0))

    failed = e.c.validation_failed.is_(True)
    erred = e.c.status >= 400
    q = (select(e.c.variant, bucket.label("b"), lbin.label("lb"), func.count().label("n"),
                total(failed), total(e.c.tool_call_ok.is_not(None)),
                total(e.c.tool_call_ok.is_(True)), total(e.c.refused.is_(True)),
                total(e.c.fallback.is_(True)), total(erred), total(and_(~erred, ~failed)),
                func.sum(func.coalesce(e.c.attempt_tokens, 0)))
         # ``kind || ''`` is the same test, but no index can serve it: the planner
         # then takes the device index the IN list can use.
         .where(and_((e.c.kind + "" if by_device else e.c.kind) == "request", *cond))
         .group_by(e.c.variant, bucket, lbin))
    keys = ("validation_failure", "tool_calls", "tool_call_success", "refusal", "fallback",
            "error", "successes", "tokens")
    out: dict[tuple[str, int], _Bucket] = {}
    for variant, b_no, lb, n, *counts in conn.execute(q).all():
        b = out.setdefault((variant or "?", int(b_no)), _Bucket())
        b.n += int(n)
        for key, c in zip(keys, counts, strict=True):
            b.k[key] += int(c or 0)
        if lb is not None:  # requests without a latency (refused before serving)
            b.bins[int(lb)] = b.bins.get(int(lb), 0) + int(n)
    return out


def _merge_into(into: dict[tuple[str, int], _Bucket], key: tuple[str, int], b: _Bucket) -> None:
    mine = into.get(key)
    if mine is None:
        into[key] = mine = _Bucket()
    mine.n += b.n
    for k, v in b.k.items():
        mine.k[k] += v
    for i, c in b.bins.items():
        mine.bins[i] = mine.bins.get(i, 0) + c


def _points(buckets: dict[tuple[str, int], _Bucket], step_s: float) -> list[dict[str, Any]]:
    variants = []
    per_variant: dict[str, list[tuple[int, _Bucket]]] = {}
    for (variant, i), b in buckets.items():
        per_variant.setdefault(variant, []).append((i, b))
    for name, rows in sorted(per_variant.items()):
        points = []
        for i, b in sorted(rows, key=lambda r: r[0]):
            point: dict[str, Any] = {"t": i * step_s, "requests": b.n}
            for rate in RATES:
                n = b.k["tool_calls"] if rate == "tool_call_success" else b.n
                ci = wilson_interval(b.k[rate], n)
                point[rate] = {"value": b.k[rate] / n if n else None, "k": b.k[rate], "n": n,
                               "low": ci.low if n else None, "high": ci.high if n else None}
            for key, pq in PERCENTILES.items():
                value, low, high = quantile_with_interval(b.bins, pq)
                point[key] = {"value": value, "low": low, "high": high}
            point["cost_per_success_tokens"] = (b.k["tokens"] / b.k["successes"]
                                                if b.k["successes"] else None)
            point["tool_usage"] = b.k["tool_calls"] / b.n if b.n else None
            points.append(point)
        variants.append({"variant": name, "requests": sum(p["requests"] for p in points),
                         "points": points})
    return variants


def signal_series(store: Store, start: float, end: float, step_s: float,
                  device_ids: Sequence[str] | None = None,
                  variant: str | None = None) -> dict[str, Any]:
    """Per variant, a point per ``step_s`` bucket of the window that had requests: ``t``
    (bucket start), ``requests``, each rate with its interval, the latency percentiles
    with theirs, cost per successful request and tool usage (drift). Buckets are whole:
    the window starts at the start of the bucket ``start`` falls in."""
    e = schema.events
    first = math.floor(start / step_s)
    cond = [e.c.ts >= first * step_s, e.c.ts < end]
    if variant is not None:
        cond.append(e.c.variant == variant)
    by_device = False
    if device_ids is not None:
        cond.append(e.c.device_id.in_(list(device_ids)))
        # A few devices: their own rows by the (device_id, seq) index, rather than every
        # request of the window through the signals index, which SQLite picks otherwise.
        by_device = len(device_ids) <= FEW_DEVICES
    with store.engine.connect() as conn:
        buckets = _aggregate(conn, cond, step_s, by_device)
    return {"start": first * step_s, "end": end, "step_s": step_s,
            "variants": _points(buckets, step_s)}


def window_totals(store: Store, start: float, end: float) -> list[dict[str, Any]]:
    """Per variant, one point over exactly [start, end) (``/metrics``)."""
    e = schema.events
    with store.engine.connect() as conn:
        # A bucket wider than any clock: every request of the window in one.
        buckets = _aggregate(conn, [e.c.ts >= start, e.c.ts < end], 1e12)
    return [{"variant": v["variant"], **v["points"][0]} for v in _points(buckets, 1e12)]


class SignalRollup:
    """The whole fleet's requests per variant and ``BASE_S`` bucket, kept in memory and
    brought up to date incrementally, so that a week's chart does not aggregate a
    week of requests at every refresh.

    It holds the events up to a high-water mark of event ids: every refresh folds
    in the events with a higher id received more than ``settle_s`` ago (by then
    their ingest transaction has committed; ids are assigned at insert), and
    aggregates the newer ones afresh without keeping them. Events of any
    timestamp are folded, so a device's late history lands in its own buckets.
    Buckets older than ``horizon_s`` are dropped. Only windows without a device
    selector and with a step that is a multiple of ``BASE_S`` are answered from
    here; ``signal_series`` answers the others from the store directly.
    """

    BASE_S = 600.0

    def __init__(self, store: Store, *, settle_s: float = 60.0, horizon_s: float = 31 * 86400,
                 clock: Any = time.time) -> None:
        self.store = store
        self.settle_s = settle_s
        self.horizon_s = horizon_s
        self.clock = clock
        self.high_water = 0
        self._buckets: dict[tuple[str, int], _Bucket] = {}
        self._lock = threading.Lock()

    def covers(self, step_s: float, device_ids: Sequence[str] | None) -> bool:
        return device_ids is None and step_s % self.BASE_S == 0

    def refresh(self) -> dict[tuple[str, int], _Bucket]:
        """Fold what settled; return the fresh (unsettled) buckets."""
        e = schema.events
        now = self.clock()
        oldest = math.floor((now - self.horizon_s) / self.BASE_S)
        with self._lock, self.store.engine.connect() as conn:
            settled = conn.execute(select(func.max(e.c.id)).where(
                e.c.id > self.high_water, e.c.received_at < now - self.settle_s)).scalar()
            if settled is not None:
                folded = _aggregate(conn, [e.c.id > self.high_water, e.c.id <= settled,
                                           e.c.ts >= oldest * self.BASE_S], self.BASE_S)
                for key, b in folded.items():
                    _merge_into(self._buckets, key, b)
                self.high_water = int(settled)
            fresh = _aggregate(conn, [e.c.id > self.high_water], self.BASE_S)
            for key in [k for k in self._buckets if k[1] < oldest]:
                del self._buckets[key]
            kept = dict(self._buckets)
        return {**{k: v for k, v in fresh.items() if k not in kept},
                **{k: _merged(v, fresh.get(k)) for k, v in kept.items()}}

    def series(self, start: float, end: float, step_s: float,
               variant: str | None = None) -> dict[str, Any]:
        """What ``signal_series`` answers for the whole fleet, from the rollup."""
        first = math.floor(start / step_s)
        ratio = round(step_s / self.BASE_S)
        lo, hi = first * ratio, math.floor(end / self.BASE_S)
        out: dict[tuple[str, int], _Bucket] = {}
        for (v, base), b in self.refresh().items():
            if lo <= base <= hi and (variant is None or v == variant) \
                    and base * self.BASE_S < end:
                _merge_into(out, (v, base // ratio), b)
        return {"start": first * step_s, "end": end, "step_s": step_s,
                "variants": _points(out, step_s)}


def _merged(a: _Bucket, b: _Bucket | None) -> _Bucket:
    """``a`` and ``b`` summed, in a new bucket (the rollup's own stay as they are)."""
    if b is None:
        return a
    out: dict[tuple[str, int], _Bucket] = {}
    _merge_into(out, ("", 0), a)
    _merge_into(out, ("", 0), b)
    return out[("", 0)]


# -- the fleet ---------------------------------------------------------------

FLEET_COLUMNS = ("device_id", "labels", "online", "variant", "update_state", "last_seen",
                 "agent_version")
UNKNOWN_CLASS = "(unknown)"


def selector_clause(selector: Selector) -> Any:
    """``selector`` as a WHERE clause on the devices' JSON labels, meaning what
    ``Selector.matches`` means (a test holds the two equal on both engines): the
    database picks the devices, not Python over every device's labels."""
    d = schema.devices
    clauses: list[Any] = []
    for t in selector.terms:
        value = d.c.labels[t.key].as_string()
        if t.op == "exists":
            clauses.append(value.is_not(None))
        elif t.op == "absent":
            clauses.append(value.is_(None))
        elif t.op == "=":
            clauses.append(value.in_(list(t.values)))
        else:  # "!=": absent, or none of the values
            clauses.append(or_(value.is_(None), value.not_in(list(t.values))))
    return and_(true(), *clauses)


def fleet_summary(store: Store, selector: Selector | None, *, limit: int = 100,
                  offset: int = 0) -> dict[str, Any]:
    """Counts by variant, update state, hardware class (``cpu.class``) and liveness,
    of the devices ``selector`` picks, and one page of them (by id): counted and
    selected by the database."""
    counts: dict[str, dict[str, int]] = {"variant": {}, "update_state": {}, "class": {},
                                         "online": {}}
    d = schema.devices
    where = selector_clause(selector) if selector is not None else true()
    cls = d.c.labels["cpu.class"].as_string()
    with store.engine.connect() as conn:
        for variant, state, c, online, n in conn.execute(
                select(d.c.variant, d.c.update_state, cls, d.c.online, func.count())
                .where(where).group_by(d.c.variant, d.c.update_state, cls, d.c.online)):
            for key, value in (("variant", variant or "(none)"),
                               ("update_state", state or "(none)"),
                               ("class", c or UNKNOWN_CLASS),
                               ("online", "online" if online else "offline")):
                counts[key][value] = counts[key].get(value, 0) + int(n)
        result = conn.execute(select(*(d.c[c] for c in FLEET_COLUMNS)).where(where)
                              .order_by(d.c.device_id).limit(limit).offset(offset))
        page = [dict(zip(FLEET_COLUMNS, r, strict=True)) for r in result.all()]
    page = [{**r, "cpu_class": (r["labels"] or {}).get("cpu.class", UNKNOWN_CLASS)}
            for r in page]
    return {"total": sum(counts["online"].values()),
            "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
            "devices": page, "offset": offset, "limit": limit, "now": time.time()}


def device_ids(store: Store, selector: Selector | None) -> list[str] | None:
    """The ids ``selector`` picks (None: no selector, every device)."""
    if selector is None:
        return None
    d = schema.devices
    with store.engine.connect() as conn:
        return [str(i) for i in conn.execute(select(d.c.device_id)
                                             .where(selector_clause(selector))
                                             .order_by(d.c.device_id)).scalars()]


# -- one device ----------------------------------------------------------------

def device_detail(store: Store, device_id: str, *, window_s: float = 3600,
                  now: float | None = None) -> dict[str, Any] | None:
    """A device's registry row, its update walk (the state events it recorded and the
    fleet's desired-state and rollout decisions about it), its telemetry gaps (those its
    outbox reported, and holes in its sequence nothing accounts for) and its recent
    request signals."""
    d = schema.devices
    with store.engine.connect() as conn:
        row = conn.execute(select(d).where(d.c.device_id == device_id)).first()
        if row is None:
            return None
        e = schema.events
        states = conn.execute(
            select(e.c.ts, e.c.body).where(and_(e.c.device_id == device_id,
                                                e.c.kind == "state"))
            .order_by(e.c.ts.desc()).limit(50)).all()
        reported = conn.execute(
            select(e.c.ts, e.c.body).where(and_(e.c.device_id == device_id,
                                                e.c.kind == "gap"))
            .order_by(e.c.ts.desc()).limit(50)).all()
        rd = schema.rollout_devices
        rollouts = [dict(r._mapping) for r in conn.execute(
            select(rd).where(rd.c.device_id == device_id).order_by(rd.c.assigned_at))]
    walk = [{"ts": ts, **json.loads(body)} for ts, body in states]
    current = dict(row._mapping)
    if current.get("state") and not any(w.get("ts") == current["state"].get("ts")
                                        for w in walk):
        walk.insert(0, current["state"])
    end = now if now is not None else time.time()
    series = signal_series(store, end - window_s, end, max(60.0, window_s / 60),
                           device_ids=[device_id])
    return {"device": current, "walk": walk,
            "audit": store.audit_log(f"device:{device_id}", 50), "rollouts": rollouts,
            "gaps": [vars(g) | {"events": g.events} for g in store.seq_gaps([device_id])],
            "reported_gaps": [{"ts": ts, **json.loads(body)} for ts, body in reported],
            "signals": series}


# -- one rollout ----------------------------------------------------------------

def gate_limits(gate: dict[str, Any]) -> dict[str, Any]:
    """Where a gate's estimate is judged: ``reference`` (no difference: 0 for a rate
    difference, 1 for a canary/control ratio) and the tolerated ``limits`` around it,
    as ``gates.judge_rate``/``judge_ratio`` apply them."""
    from ..rollouts.gates import RATE_METRICS

    tol = float(gate["tolerance"])
    direction = RATE_METRICS.get(gate["metric"])
    if direction is None:  # a ratio metric: worse is higher
        return {"reference": 1.0, "limits": [1.0 + tol]}
    if direction == "lower_is_better":
        return {"reference": 0.0, "limits": [tol]}
    if direction == "higher_is_better":
        return {"reference": 0.0, "limits": [-tol]}
    return {"reference": 0.0, "limits": [-tol, tol]}


def gate_bar(gate: dict[str, Any], width: float = 300) -> dict[str, Any]:
    """x positions (0..width) of a gate's estimate, interval, reference and limits on one
    scale that holds them all, for the rollout page's interval bars."""
    where = gate_limits(gate)
    values = [v for v in (gate.get("estimate"), gate.get("low"), gate.get("high"))
              if v is not None and math.isfinite(v)]
    everything = [*values, where["reference"], *where["limits"]]
    lo, hi = min(everything), max(everything)
    pad = (hi - lo) * 0.08 or 0.1
    lo, hi = lo - pad, hi + pad

    def x(v: float | None) -> float | None:
        return None if v is None else round(width * (v - lo) / (hi - lo), 1)

    return {"estimate": x(gate.get("estimate")), "low": x(gate.get("low")),
            "high": x(gate.get("high")), "reference": x(where["reference"]),
            "limits": [x(v) for v in where["limits"]], "scale": [lo, hi]}


def rollout_detail(engine: Any, rollout_id: str) -> dict[str, Any] | None:
    """A rollout's state, spec, steps with their targets, members by step and role,
    every verdict (oldest first) and its audit trail (newest first), and the pins of
    its cohort."""
    from ..rollouts.spec import resolve_count

    r = engine.get(rollout_id)
    if r is None:
        return None
    spec = engine.spec(rollout_id)
    members = engine.members(rollout_id)
    with engine.store.engine.connect() as conn:
        cohort_size = int(conn.execute(select(func.count()).select_from(schema.devices).where(
            selector_clause(Selector.parse(spec.cohort)))).scalar_one())
    steps = []
    for i, target in enumerate(spec.steps):
        at = [m for m in members if m["step"] == i]
        outcomes: dict[str, int] = {}
        for m in at:
            key = "control" if m["role"] == "control" else m["outcome"]
            outcomes[key] = outcomes.get(key, 0) + 1
        steps.append({"step": i + 1, "target": target,
                      "target_devices": resolve_count(target, cohort_size),
                      "current": i == r["step"], "devices": outcomes})
    audit = engine.store.audit_log(f"rollout:{rollout_id}", 2000)
    verdicts = [{"ts": a["ts"], **a["evidence"],
                 "gates": [{**g, **gate_limits(g), "bar": gate_bar(g)}
                           for g in a["evidence"].get("gates", [])]}
                for a in reversed(audit) if a["action"] == "rollout.verdict"]
    pins = [p for p in engine.pins() if p["cohort"] == spec.cohort]
    return {"rollout": r, "spec": spec.model_dump(mode="json", by_alias=True),
            "cohort_size": cohort_size, "steps": steps,
            "canaries": sum(1 for m in members if m["role"] == "canary"),
            "controls": sum(1 for m in members if m["role"] == "control"),
            "verdicts": verdicts, "audit": audit, "pins": pins}


def rollouts_summary(engine: Any) -> list[dict[str, Any]]:
    out = []
    for r in reversed(engine.rollouts()):
        spec = r["spec"]
        out.append({"id": r["id"], "state": r["state"], "step": r["step"] + 1,
                    "steps": len(spec.get("steps", [])), "phase": r["phase"],
                    "from": spec.get("from"), "to": spec.get("to"),
                    "cohort": spec.get("cohort"), "reason": r["reason"],
                    "updated_at": r["updated_at"]})
    return out


def states(store: Store, names: Iterable[str]) -> dict[str, int]:
    """How many rollouts are in each state (every state in ``names``, 0 included)."""
    r = schema.rollouts
    with store.engine.connect() as conn:
        found: dict[str, int] = {str(state): int(n) for state, n in conn.execute(
            select(r.c.state, func.count()).group_by(r.c.state))}
    return {n: int(found.get(n, 0)) for n in names}
