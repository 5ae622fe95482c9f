"""Rollout decision time at fleet scale, on SQLite and PostgreSQL.

    python bench/bench_rollout.py [--devices 1000,10000,100000] [--stores sqlite,postgresql]
                                  [--events-per-device 20] [--history-windows 3]
                                  [--classes 3] [--fetch-max 50000] [--pg-vacuum-window]

For each store and fleet size: devices in one cohort, 10 % of them canaries
on the candidate, spread evenly over ``--classes`` hardware classes (their
``cpu.class`` label; 0: none), and the telemetry a real fleet would have
stored — every device's requests, a minute at a time, oldest first, for the bake
window (``--events-per-device`` requests each, Poisson) and for
``--history-windows`` windows before it. The rows are generated with numpy and
written in bulk (COPY on PostgreSQL, executemany on SQLite: 8 million rows at
100,000 devices), as ingest stores them, with JSON and tool-call validations,
refusals, fallbacks and varied token counts so every default gate has data.

The last 15 s of the window arrive afterwards, 2.5 s (one tick's worth) before
each measured read and tick. Each the median of three, after the window's first
read:

- tally: what a tick reads of the step's samples — the engine's judged set, and
  the requests that arrived since the last tick added to the window's tally
  (``fleet/rollouts/tally.py``);
- full read: the same samples re-read from the whole window
  (``samples.read_samples``), as every tick did before the tally (now only a
  window's first tick, or the first after a restart or a takeover); the verdicts of
  the two are checked equal;
- gates: every gate of the default spec judged (statistics only);
- step decision: one engine tick of the baking rollout (read state, judge from the
  tally, record the verdict, advance);
- every row, for reference: fetching the window's requests into Python (skipped
  above ``--fetch-max`` devices).

Target: a step decision under one second at 100,000 devices. PostgreSQL gets a
database of its own (created and dropped); see ``build`` for its maintenance.

The script also runs against the code before per-class judging (2a52c52:
``engine.samples`` returned pooled samples, the gates were judged pooled
only), so that before and after can be measured on the same data.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from common import pg_database
from sqlalchemy import select, text

from quantfleet.agent.wire import DeviceStatePayload, StatusPayload
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


#: The columns the bulk loader writes (what ingest writes; ``txid`` is the database's).
_COLUMNS = ("device_id", "boot_epoch", "seq", "kind", "ts", "received_at", "historical",
            "variant", "status", "latency_s", "prompt_tokens", "completion_tokens",
            "attempt_tokens", "validation_failed", "tool_call_ok", "refused", "fallback",
            "body")


class Requests:
    """Request rows as ingest stores them (``event_row``), generated in bulk with numpy:
    JSON and tool-call validations, refusals, fallbacks and varied token counts, so every
    default gate has data. The body is a stub: the gates never read it."""

    def __init__(self, n: int, seed: int = 1) -> None:
        self.rng = np.random.default_rng(seed)
        self.seq = np.zeros(n, dtype=np.int64)
        self.names = [f"d{i:05d}" for i in range(n)]

    def rows(self, dev: np.ndarray, ts: np.ndarray) -> list[tuple[Any, ...]]:
        rng, k = self.rng, dev.size
        order = np.argsort(ts, kind="stable")
        dev, ts = dev[order], ts[order]
        seq = np.empty(k, dtype=np.int64)
        for j, d in enumerate(dev.tolist()):  # per device, in arrival order
            self.seq[d] += 1
            seq[j] = self.seq[d]
        cand = (dev % 10 == 0) & (ts >= SWITCH)
        fallback = rng.random(k) < 0.01
        prompt = rng.integers(20, 401, k)
        completion = rng.integers(10, 201, k)
        tokens = (prompt + completion) * np.where(fallback, 2, 1)
        latency = rng.lognormal(-1, 0.3, k)
        json_failed = rng.random(k) < 0.02
        tool = rng.random(k) < 0.3
        tool_ok = rng.random(k) > 0.05
        refused = rng.random(k) < 0.05
        validation_failed = json_failed | (tool & ~tool_ok)
        body = '{"bench": true}'
        return [(self.names[d], 1, int(q), "request", float(t), float(t) + 1.0, False,
                 CAND if c else BASE, 200, float(lat), int(p), int(cm), int(tk), bool(vf),
                 (bool(ok) if tl else None), bool(rf), bool(fb), body)
                for d, q, t, c, lat, p, cm, tk, vf, tl, ok, rf, fb in zip(
                    dev.tolist(), seq.tolist(), ts.tolist(), cand.tolist(), latency.tolist(),
                    prompt.tolist(), completion.tolist(), tokens.tolist(),
                    validation_failed.tolist(), tool.tolist(), tool_ok.tolist(),
                    refused.tolist(), fallback.tolist(), strict=True)]

    def between(self, t0: float, t1: float, per_s: float) -> list[tuple[Any, ...]]:
        """Every device's requests over ``[t0, t1)`` at ``per_s`` each (Poisson)."""
        n = self.seq.size
        counts = self.rng.poisson(per_s * (t1 - t0), n)
        dev = np.repeat(np.arange(n), counts)
        return self.rows(dev, t0 + (t1 - t0) * self.rng.random(dev.size))


def write(store: Store, rows: list[tuple[Any, ...]]) -> None:
    """Rows into ``events`` with each driver's bulk path (COPY, executemany)."""
    if not rows:
        return
    raw = store.engine.raw_connection()
    try:
        cur = raw.cursor()
        if store.dialect == "postgresql":
            with cur.copy(f"COPY events ({', '.join(_COLUMNS)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
                for r in rows:
                    copy.write_row(r)
        else:
            cur.executemany(f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(_COLUMNS))})", rows)
        raw.commit()
    finally:
        raw.close()


def build(store: Store, n: int, per_device: int, history_windows: int,
          progress: Callable[[str], None], vacuum_window: bool = False,
          classes: int = 0, gen: Requests | None = None, upto: float = NOW) -> int:
    """Every device's requests, a minute at a time, oldest first, up to ``upto``.

    On PostgreSQL the history is then vacuumed and analyzed, as autovacuum would
    have done by then, and the bake window only analyzed: autovacuum's insert
    threshold (20 % of the table) has typically not come round for the newest rows
    (``vacuum_window``: it has, as with the setting docs/store.md suggests).
    """
    _devices(store, n, classes)
    gen = gen or Requests(n)
    per_s = per_device / BAKE_S
    stored = 0
    start = NOW - BAKE_S * (1 + history_windows)
    minutes = int((NOW - start) // 60)
    for m in range(minutes):
        t0 = start + 60 * m
        if t0 == NOW - BAKE_S:
            maintain(store, vacuum=True)
        rows = gen.between(t0, min(t0 + 60, upto), per_s)
        write(store, rows)
        stored += len(rows)
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
    with pg_database(pg_admin) as url:
        store = Store(url)
        try:
            yield store
        finally:
            store.close()


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


#: Requests that arrive between the build and each measured tick: this many ticks of
#: ``TICK_S`` each, the last ending at ``NOW``.
TICK_S = 2.5
DELTAS = 6


def measure(store: Store, kind: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    gen = Requests(n)
    t = time.perf_counter()
    head = NOW - TICK_S * DELTAS
    stored = build(store, n, args.events_per_device, args.history_windows, print,
                   args.pg_vacuum_window, args.classes, gen, upto=head)
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
    tallies = getattr(engine.repo, "tallies", None)
    t = time.perf_counter()
    engine.judge_step("bench", spec, window)  # the window's first read; warms scipy too
    first_s = time.perf_counter() - t
    per_s = args.events_per_device / BAKE_S
    slices = iter(range(DELTAS))

    def arrive() -> int:
        i = next(slices)
        rows = gen.between(head + TICK_S * i, head + TICK_S * (i + 1), per_s)
        write(store, rows)
        return len(rows)

    reads, fulls, judged, ticks, fetches, deltas = [], [], [], [], [], []
    for _ in range(3):
        deltas.append(arrive())
        t = time.perf_counter()
        data = read()  # the tally: what arrived since the last read
        reads.append(time.perf_counter() - t)
        if tallies is not None:
            assert tallies.last == "advanced", tallies.last
            tallies.forget("bench")
        t = time.perf_counter()
        full = read()  # the whole window again, as before the tally
        fulls.append(time.perf_counter() - t)
        t = time.perf_counter()
        verdict, gate_verdicts, in_window = gates(data)
        judged.append(time.perf_counter() - t)
        if gates(full) != (verdict, gate_verdicts, in_window):
            raise AssertionError("the tally's verdict differs from the full read's")
        if n <= args.fetch_max:
            t = time.perf_counter()
            fetch_every_request(store, window)
            fetches.append(time.perf_counter() - t)
        deltas.append(arrive())
        _reset(store)
        t = time.perf_counter()
        engine.tick()
        ticks.append(time.perf_counter() - t)
        if tallies is not None:
            assert tallies.last == "advanced", tallies.last
    after = engine.get("bench")
    return {"store": kind, "devices": n, "stored": stored + sum(deltas), "window": in_window,
            "load_s": load_s, "first_s": first_s, "read_s": statistics.median(reads),
            "full_s": statistics.median(fulls), "delta": int(statistics.median(deltas)),
            "gates_s": statistics.median(judged), "tick_s": statistics.median(ticks),
            "fetch_s": statistics.median(fetches) if fetches else math.nan,
            "verdict": verdict, "gate_verdicts": gate_verdicts,
            "after": f"step {after['step'] + 1}, {after['state']}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1000,10000")
    ap.add_argument("--stores", default="sqlite,postgresql")
    ap.add_argument("--events-per-device", type=int, default=20,
                    help="Requests per device in the bake window (600 s).")
    ap.add_argument("--history-windows", type=int, default=3,
                    help="Windows of telemetry stored before the bake window.")
    ap.add_argument("--pg-admin", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--fetch-max", type=int, default=50_000,
                    help="Fetch every row of the window into Python (the reference) only "
                    "up to this many devices.")
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
    print(f"{'store':<11} {'devices':>8} {'stored':>10} {'in window':>10} {'new/tick':>9} "
          f"{'tally':>8} {'full read':>10} {'gates':>8} {'step decision':>14} "
          f"{'every row':>10}  target <1 s")
    for r in rows:
        fetch = "skipped" if math.isnan(r["fetch_s"]) else f"{r['fetch_s']:.3f}s"
        print(f"{r['store']:<11} {r['devices']:>8,} {r['stored']:>10,} {r['window']:>10,} "
              f"{r['delta']:>9,} {r['read_s']:>7.3f}s {r['full_s']:>9.3f}s "
              f"{r['gates_s']:>7.3f}s {r['tick_s']:>13.3f}s {fetch:>10}  "
              f"{'met' if r['tick_s'] < 1 else 'NOT met'} "
              f"(verdict {r['verdict']}, then {r['after']})")
    print("tally: the engine's read of a step's samples, advanced by what arrived since the "
          "last tick (new/tick requests); full read: the same re-read from the whole window "
          "(what every tick did before the tally; now only a window's first tick, or the "
          "first after a restart or takeover); step decision: one engine tick from the "
          "tally; every row: the window's requests fetched into Python "
          f"(skipped above {args.fetch_max:,} devices).")
    by = {(r["store"], r["devices"]): r["tick_s"] for r in rows}
    for kind in args.stores.split(","):
        sizes = sorted(n for k, n in by if k == kind)
        if len(sizes) >= 2:
            lo, hi = sizes[0], sizes[-1]
            print(f"{kind}: {hi:,} devices take {by[(kind, hi)] / by[(kind, lo)]:.1f}x the "
                  f"time of {lo:,} ({hi / lo:.0f}x the devices)")


if __name__ == "__main__":
    main()
