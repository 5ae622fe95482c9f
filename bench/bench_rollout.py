"""Rollout decision time at fleet scale, on SQLite and PostgreSQL.

    python bench/bench_rollout.py [--devices 1000,10000] [--stores sqlite,postgresql]
                                  [--events-per-device 20] [--history-windows 3]
                                  [--classes 3] [--pg-vacuum-window]

For each store and fleet size: devices in one cohort, 10 % of them canaries
on the candidate, spread evenly over ``--classes`` hardware classes (their
``cpu.class`` label; 0: none), and the telemetry a real fleet would have
stored — every device sends a batch of its requests every minute (ingested in
arrival order) for the bake window (``--events-per-device`` requests each) and
for ``--history-windows`` windows before it. Requests carry JSON and tool-call
validations, refusals, fallbacks and varied token counts, so every default
gate has data. Then, each the median of three runs after one warm-up:

- read: the store aggregates canary and control over the window (SQL), per
  side and hardware class, summed into the pool and the classes;
- gates: every gate of the default spec judged on that — pooled and per class
  (statistics only);
- step decision: one engine tick of the baking rollout (read state, judge,
  record the verdict, advance);
- every row, for reference: fetching the window's requests into Python, as
  the engine did before the store aggregated them (the ratio is to "read").

Target: a step decision under one second at 10,000 devices. PostgreSQL gets a
database of its own (created and dropped); see ``build`` for its maintenance.

The script also runs against the code before per-class judging (2a52c52:
``engine.samples`` returned pooled samples, the gates were judged pooled
only), so that before and after can be measured on the same data.
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, select, text

from quantfleet.agent.wire import (
    DeviceStatePayload,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
)
from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.rollouts.gates import combine, judge
from quantfleet.fleet.rollouts.spec import RolloutSpec
from quantfleet.fleet.store import Store, schema

BASE, CAND = "m-Q8_0", "m-Q4_K_M"
CLASSES = ("x86-avx512-vnni", "x86-avx2", "arm-dotprod", "x86-avx2-vnni", "arm-i8mm",
           "x86-avx512", "arm-neon", "x86-amx", "x86-sse")
BAKE_S = 600.0
NOW = 2_000_000.0
SWITCH = NOW - BAKE_S - 300  # when the canaries moved to the candidate


def _devices(store: Store, n: int, classes: int) -> None:
    """Device rows as births and healthy states leave them (bulk: setup, not measured);
    device ``i`` of class ``i % classes``, so the canaries (every tenth) are spread too."""
    rows = []
    for i in range(n):
        dev = f"d{i:05d}"
        variant = CAND if i % 10 == 0 else BASE
        labels = {"fleet": "a", **({"cpu.class": CLASSES[i % classes]} if classes else {})}
        birth = StatusPayload(device_id=dev, state="online", boot_epoch=1, reason="birth",
                              ts=SWITCH - 600, labels=labels)
        state = DeviceStatePayload(device_id=dev, boot_epoch=1, variant=variant,
                                   known_good=variant, update_state="healthy", ts=SWITCH)
        rows.append({"device_id": dev, "labels": birth.labels, "hardware": {}, "online": True,
                     "boot_epoch": 1, "status_reason": "birth", "agent_version": "bench",
                     "variant": variant, "update_state": "healthy",
                     "state": state.model_dump(mode="json"), "state_ts": state.ts,
                     "first_seen": birth.ts, "last_seen": NOW})
    with store.engine.begin() as conn:
        conn.execute(schema.devices.insert(), rows)


def _request(rng: random.Random, dev: str, seq: int, variant: str, ts: float) -> TelemetryEvent:
    validations = [ValidationOutcome(kind="json_schema", passed=rng.random() > 0.02)]
    if rng.random() < 0.3:
        validations.append(ValidationOutcome(kind="tool_call", passed=rng.random() > 0.05))
    if rng.random() < 0.05:
        validations.append(ValidationOutcome(kind="refusal", passed=True, detail="refused"))
    prompt, completion = rng.randint(20, 400), rng.randint(10, 200)
    fallback = "m-F16" if rng.random() < 0.01 else None
    body = RequestEvent(request_id=f"{dev}-{seq}", ts=ts, variant=variant,
                        latency_s=rng.lognormvariate(-1, 0.3), prompt_tokens=prompt,
                        completion_tokens=completion,
                        attempt_tokens=(prompt + completion) * (2 if fallback else 1),
                        fallback_from=fallback, validations=validations)
    return TelemetryEvent(boot_epoch=1, seq=seq, kind="request", ts=ts, body=body)


def build(store: Store, n: int, per_device: int, history_windows: int,
          progress: Callable[[str], None], vacuum_window: bool = False,
          classes: int = 0) -> int:
    """Every device sends its last minute's requests once a minute, oldest first.

    On PostgreSQL the history is then vacuumed and analyzed, as autovacuum would
    have done by then, and the bake window only analyzed: autovacuum's insert
    threshold (20 % of the table) has typically not come round for the newest rows
    (``vacuum_window``: it has, as with the setting docs/store.md suggests).
    """
    _devices(store, n, classes)
    rng = random.Random(1)
    per_minute = per_device * 60 / BAKE_S
    seq = [0] * n
    stored = 0
    start = NOW - BAKE_S * (1 + history_windows)
    minutes = int((NOW - start) // 60)
    for m in range(minutes):
        t0 = start + 60 * m
        if t0 == NOW - BAKE_S:
            maintain(store, vacuum=True)
        batches = []
        for i in range(n):
            dev = f"d{i:05d}"
            # Poisson-ish arrivals around the mean rate, the same mean for every device.
            k = int(per_minute) + (rng.random() < per_minute % 1)
            events = []
            for _ in range(k):
                ts = t0 + 60 * rng.random()
                variant = CAND if i % 10 == 0 and ts >= SWITCH else BASE
                seq[i] += 1
                events.append(_request(rng, dev, seq[i], variant, ts))
            if events:
                batches.append(TelemetryBatch(device_id=dev, sent_at=t0 + 60, events=events))
        for j in range(0, len(batches), 500):
            stored += store.ingest_batches(batches[j:j + 500], received_at=t0 + 60).inserted
        if m % 10 == 9 or m == minutes - 1:
            progress(f"  loaded {m + 1}/{minutes} minutes, {stored:,} events")
    maintain(store, vacuum=vacuum_window)
    return stored


def maintain(store: Store, *, vacuum: bool) -> None:
    if store.dialect != "postgresql":
        return  # the fleet's SQLite store runs without ANALYZE statistics
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE events" if vacuum else "ANALYZE events"))


@contextmanager
def open_store(kind: str, pg_admin: str) -> Iterator[Store]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(f"sqlite:///{Path(tmp) / 'fleet.db'}")
            try:
                yield store
            finally:
                store.close()
        return
    name = f"qf_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    store = Store(pg_admin.rsplit("/", 1)[0] + f"/{name}")
    try:
        yield store
    finally:
        store.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fetch_every_request(store: Store, window: tuple[float, float]) -> int:
    """For reference, what the aggregation replaces: every request of the window, the
    columns the gates need, into Python (as the engine read them before)."""
    e = schema.events
    q = select(e.c.device_id, e.c.status, e.c.latency_s, e.c.attempt_tokens,
               e.c.validation_failed, e.c.tool_call_ok, e.c.refused, e.c.fallback).where(
        e.c.kind == "request", e.c.variant.in_([BASE, CAND]), e.c.ts >= window[0],
        e.c.ts < window[1])
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    latency = np.asarray([r[2] or 0.0 for r in rows])  # the least any method would do
    return int(latency.size)


def _reset(store: Store) -> None:
    """Back to step 1, baking, so the next tick judges the same window again."""
    with store.engine.begin() as conn:
        conn.execute(schema.rollouts.update().values(
            state="running", step=0, phase="baking", phase_started_at=NOW - BAKE_S,
            bake_extensions=0, reason=""))


def read_and_judge(engine: RolloutEngine, spec: RolloutSpec, window: tuple[float, float]
                   ) -> tuple[Callable[[], Any], Callable[[Any], tuple[str, dict[str, str], int]]]:
    """(read, gates) for this code or the code before per-class judging: ``read`` what
    the engine reads for a step, ``gates`` judge it (verdict, pooled gate verdicts,
    requests in the pool)."""
    if not hasattr(engine, "_class_minimum"):  # before: pooled samples, pooled gates
        def gates_before(read: Any) -> tuple[str, dict[str, str], int]:
            canary, control = read[0]["*"], read[1]["*"]
            results = [judge(g.metric, canary, control, g.tolerance,
                             g.min_samples or spec.min_samples, g.alpha) for g in spec.gates]
            return combine(results), {r.metric: r.verdict for r in results}, \
                canary.n + control.n

        return (lambda: engine.samples("bench", spec, window)), gates_before

    from quantfleet.fleet.rollouts.verdict import POOL, decide

    def gates_now(read: Any) -> tuple[str, dict[str, str], int]:
        groups, required = read
        v = decide(spec, groups, window, required)
        pool = groups[POOL]
        return v.verdict, {g.metric: g.verdict for g in v.gates} | {
            c.name: c.verdict for c in v.classes}, pool.canary.n + pool.control.n

    return (lambda: engine.samples("bench", spec, window)), gates_now


def measure(store: Store, kind: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    stored = build(store, n, args.events_per_device, args.history_windows, print,
                   args.pg_vacuum_window, args.classes)
    load_s = time.perf_counter() - t
    spec = RolloutSpec.model_validate({
        "name": "bench", "cohort": "fleet=a", "from": BASE, "to": CAND,
        "steps": ["10%", "100%"], "bake_s": BAKE_S, "min_samples": 100})
    engine = RolloutEngine(store, lambda *a: None, clock=lambda: NOW)
    engine.create(spec)
    canaries = [{"rollout_id": "bench", "device_id": f"d{i:05d}", "role": "canary",
                 "step": 0, "stratum": "*", "assigned_at": SWITCH - 60,
                 "outcome": "healthy", "reason": ""} for i in range(0, n, 10)]
    with store.engine.begin() as conn:
        conn.execute(schema.rollout_devices.insert(), canaries)
    window = (NOW - BAKE_S, NOW)
    read, gates = read_and_judge(engine, spec, window)
    engine.judge_step("bench", spec, window)  # warm-up: caches, scipy's first calls
    reads, judged, ticks, fetches = [], [], [], []
    for _ in range(3):
        t = time.perf_counter()
        fetch_every_request(store, window)
        fetches.append(time.perf_counter() - t)
        t = time.perf_counter()
        data = read()
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        verdict, gate_verdicts, in_window = gates(data)
        judged.append(time.perf_counter() - t)
        _reset(store)
        t = time.perf_counter()
        engine.tick()
        ticks.append(time.perf_counter() - t)
    after = engine.get("bench")
    return {"store": kind, "devices": n, "stored": stored, "window": in_window,
            "load_s": load_s, "read_s": statistics.median(reads),
            "gates_s": statistics.median(judged), "tick_s": statistics.median(ticks),
            "fetch_s": statistics.median(fetches), "verdict": verdict,
            "gate_verdicts": gate_verdicts, "after": f"step {after['step'] + 1}, "
            f"{after['state']}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1000,10000")
    ap.add_argument("--stores", default="sqlite,postgresql")
    ap.add_argument("--events-per-device", type=int, default=20,
                    help="Requests per device in the bake window (600 s).")
    ap.add_argument("--history-windows", type=int, default=3,
                    help="Windows of telemetry stored before the bake window.")
    ap.add_argument("--pg-admin", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--pg-vacuum-window", action="store_true",
                    help="Vacuum the bake window too before measuring (PostgreSQL).")
    ap.add_argument("--classes", type=int, default=3, choices=range(len(CLASSES) + 1),
                    metavar=f"0..{len(CLASSES)}",
                    help="Hardware classes the devices are spread over (0: no cpu.class "
                    "label, as before the fingerprint).")
    args = ap.parse_args()
    for module in ("scipy.special", "scipy.stats"):  # a running fleet imports them once
        importlib.import_module(module)

    rows = []
    for kind in args.stores.split(","):
        for n in (int(x) for x in args.devices.split(",")):
            print(f"{kind}, {n:,} devices: loading")
            try:
                with open_store(kind, args.pg_admin) as store:
                    rows.append(measure(store, kind, n, args))
            except Exception as exc:  # PostgreSQL not running: say so, go on
                if kind != "postgresql":
                    raise
                print(f"  skipped: {exc}")
                break
            print(f"  {rows[-1]}")
    print()
    print(f"{'store':<11} {'devices':>8} {'stored':>10} {'in window':>10} {'read':>8} "
          f"{'gates':>8} {'step decision':>14} {'every row':>10} {'ratio':>6}  target <1 s")
    for r in rows:
        print(f"{r['store']:<11} {r['devices']:>8,} {r['stored']:>10,} {r['window']:>10,} "
              f"{r['read_s']:>7.3f}s {r['gates_s']:>7.3f}s {r['tick_s']:>13.3f}s "
              f"{r['fetch_s']:>9.3f}s {r['fetch_s'] / r['read_s']:>5.1f}x  "
              f"{'met' if r['tick_s'] < 1 else 'NOT met'} "
              f"(verdict {r['verdict']}, then {r['after']})")
    by = {(r["store"], r["devices"]): r["tick_s"] for r in rows}
    for kind in args.stores.split(","):
        sizes = sorted(n for k, n in by if k == kind)
        if len(sizes) >= 2:
            lo, hi = sizes[0], sizes[-1]
            print(f"{kind}: {hi:,} devices take {by[(kind, hi)] / by[(kind, lo)]:.1f}x the "
                  f"time of {lo:,} ({hi / lo:.0f}x the devices)")


if __name__ == "__main__":
    main()
