"""The fleet's Prometheus series beyond ingest's counters: signals per variant and per
active rollout's side (canaries and controls of its cohort), devices by variant,
update state and liveness, and rollouts by state.

Labels are bounded: variants, update states, rollout ids and states, the side —
never a device id. Rates and percentiles are over the last ``WINDOW_S`` seconds,
aggregated by the store (``queries.signal_series`` with one bucket).
"""

from __future__ import annotations

import math
import time
from typing import Any

from sqlalchemy import and_, case, func, select

from ..rollouts.states import ACTIVE, STATES
from ..store import Store, schema
from . import queries

WINDOW_S = 300.0
ROLLOUT_STATES = ("running", "awaiting_approval", "paused", "completed", "rolled_back",
                  "aborted")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kw: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in kw.items()) + "}"


class _Family:
    def __init__(self, name: str, kind: str, help_: str) -> None:
        self.lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, value: float | None, **labels: str) -> None:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return
        self.lines.append(f"{self.name}{_labels(**labels)} {value:.6g}")


def fleet_metrics(store: Store, now: float | None = None) -> list[str]:
    end = now if now is not None else time.time()
    start = end - WINDOW_S
    requests = _Family("quantfleet_signal_requests", "gauge",
                       f"Requests in the last {WINDOW_S:g} s, by variant.")
    rate = _Family("quantfleet_signal_rate", "gauge",
                   f"Share of the last {WINDOW_S:g} s's requests, by variant and signal "
                   "(tool_call_success: of the requests with tool calls).")
    latency = _Family("quantfleet_signal_latency_seconds", "gauge",
                      f"Latency percentiles of the last {WINDOW_S:g} s, by variant "
                      "(within 2.5 %: binned in the store).")
    cost = _Family("quantfleet_signal_cost_per_success_tokens", "gauge",
                   "Tokens of every attempt over the successful requests, by variant.")
    for point in queries.window_totals(store, start, end):
        variant = point["variant"]
        requests.add(point["requests"], variant=variant)
        for signal in queries.RATES:
            rate.add(point[signal]["value"], variant=variant, signal=signal)
        for key, q in queries.PERCENTILES.items():
            latency.add(point[key]["value"], variant=variant, quantile=f"{q:g}")
        cost.add(point["cost_per_success_tokens"], variant=variant)
    side_rate = _Family("quantfleet_rollout_signal_rate", "gauge",
                        f"Share of the last {WINDOW_S:g} s's requests of an active rollout's "
                        "canaries or controls, by rollout, side and signal.")
    side_requests = _Family("quantfleet_rollout_signal_requests", "gauge",
                            f"Requests of the last {WINDOW_S:g} s of an active rollout's "
                            "canaries or controls.")
    for row in _rollout_sides(store, start, end):
        labels = {"rollout": row["rollout"], "side": row["side"]}
        side_requests.add(row["n"], **labels)
        for signal in ("validation_failure", "refusal", "fallback", "error"):
            side_rate.add(row[signal] / row["n"] if row["n"] else None, signal=signal, **labels)
    devices = _Family("quantfleet_devices", "gauge",
                      "Devices by variant, update state and liveness.")
    d = schema.devices
    with store.engine.connect() as conn:
        for variant, state, online, n in conn.execute(
                select(d.c.variant, d.c.update_state, d.c.online, func.count())
                .group_by(d.c.variant, d.c.update_state, d.c.online)):
            devices.add(int(n), variant=variant or "none", update_state=state or "none",
                        online="true" if online else "false")
    rollouts = _Family("quantfleet_rollouts", "gauge", "Rollouts by state.")
    for state, n in queries.states(store, ROLLOUT_STATES).items():
        rollouts.add(n, state=state)
    info = _Family("quantfleet_rollout_step", "gauge",
                   "An active rollout's current step (1-based), with its state, phase and "
                   "variants as labels.")
    r = schema.rollouts
    with store.engine.connect() as conn:
        for rid, spec, state, step, phase in conn.execute(
                select(r.c.id, r.c.spec, r.c.state, r.c.step, r.c.phase)
                .where(r.c.state.in_(ACTIVE))):
            info.add(step + 1, rollout=rid, state=state, phase=phase,
                     from_variant=str(spec.get("from")), to_variant=str(spec.get("to")))
    lines: list[str] = []
    for fam in (requests, rate, latency, cost, side_requests, side_rate, devices, rollouts,
                info):
        lines += fam.lines
    return lines


def _rollout_sides(store: Store, start: float, end: float) -> list[dict[str, Any]]:
    """Per active rollout and side, its devices' requests of the window: the members and
    the window's per-device counts are read apart (two index reads) and summed here — a
    join lets SQLite scan every request once per member."""
    e, rd, r = schema.events, schema.rollout_devices, schema.rollouts

    def total(cond: Any) -> Any:
        return func.sum(case((cond, 1), else_=0))

    signals = ("validation_failure", "refusal", "fallback", "error")
    with store.engine.connect() as conn:
        members = conn.execute(select(rd.c.device_id, rd.c.rollout_id, rd.c.role)
                               .select_from(rd.join(r, r.c.id == rd.c.rollout_id))
                               .where(r.c.state.in_(ACTIVE))).all()
        if not members:
            return []
        per_device = {row[0]: row[1:] for row in conn.execute(
            select(e.c.device_id, func.count(), total(e.c.validation_failed.is_(True)),
                   total(e.c.refused.is_(True)), total(e.c.fallback.is_(True)),
                   total(e.c.status >= 400))
            .where(and_(e.c.kind == "request", e.c.ts >= start, e.c.ts < end))
            .group_by(e.c.device_id))}
    sides: dict[tuple[str, str], dict[str, Any]] = {}
    for device_id, rollout_id, role in members:
        side = sides.setdefault((rollout_id, role), {"rollout": rollout_id, "side": role,
                                                     "n": 0, **dict.fromkeys(signals, 0)})
        counts = per_device.get(device_id)
        if counts:
            side["n"] += int(counts[0])
            for name, k in zip(signals, counts[1:], strict=True):
                side[name] += int(k or 0)
    return [sides[k] for k in sorted(sides)]


__all__ = ["STATES", "WINDOW_S", "fleet_metrics"]
