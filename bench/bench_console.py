"""How fast the console answers at fleet scale: every page and data endpoint, timed.

    python bench/bench_console.py [--devices 10000] [--days 7] [--requests-per-device-hour 0.25]
                                  [--store sqlite|postgresql] [--runs 5]

Fills a fresh store with ``--devices`` devices (births with labels and a
``cpu.class`` over three classes, healthy states on two variants) and
``--days`` of request telemetry — each device sends a batch of its requests
every hour, ``--requests-per-device-hour`` on average (sparse, so that a week
at 10,000 devices loads in minutes: 0.25 is 420,000 requests), ingested through
``Store.ingest_batches`` as the fleet would. One rollout is created and
assigned on half the fleet. Then each page and endpoint is requested through
the console's Starlette app in process (``TestClient``: routing, rendering and
the store's queries, without a network), once ("first": the Signals
endpoint's first week-long answer fills the in-memory rollup) then ``--runs``
times; printed is the first, the median and the slowest, in ms. Target:
< 300 ms each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from starlette.applications import Starlette
from starlette.testclient import TestClient

from quantfleet.agent.wire import (
    RequestEvent,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
)
from quantfleet.fleet.auth import HttpAuth
from quantfleet.fleet.console.app import ConsoleContext, console_mount
from quantfleet.fleet.console.metrics import fleet_metrics
from quantfleet.fleet.console.sessions import Sessions
from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.rollouts.spec import RolloutSpec
from quantfleet.fleet.store import Store, schema

BASE, CAND = "m-Q8_0", "m-Q4_K_M"
CLASSES = ("x86-avx512-vnni", "x86-avx2", "arm-dotprod")
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def fill(store: Store, n: int, days: float, per_hour: float, now: float) -> int:
    rows = []
    for i in range(n):
        variant = CAND if i % 4 == 0 else BASE
        rows.append({"device_id": f"d{i:05d}", "labels": {
            "region": ("eu", "us", "apac")[i % 3], "site": f"s{i % 50:02d}",
            "cpu.class": CLASSES[i % 3]}, "hardware": {"cpu_class": CLASSES[i % 3]},
            "online": i % 17 != 0, "boot_epoch": 1, "status_reason": "birth",
            "agent_version": "bench", "variant": variant, "update_state": "healthy",
            "state": {"type": "state", "device_id": f"d{i:05d}", "boot_epoch": 1,
                      "variant": variant, "update_state": "healthy", "reason": "",
                      "ts": now - 3600},
            "state_ts": now - 3600, "first_seen": now - days * 86400, "last_seen": now - i % 600})
    with store.engine.begin() as conn:
        conn.execute(schema.devices.insert(), rows)
    rng = random.Random(1)
    seq = [0] * n
    stored = 0
    hours = int(days * 24)
    for h in range(hours):
        t0 = now - (hours - h) * 3600
        batches = []
        for i in range(n):
            k = int(per_hour) + (rng.random() < per_hour % 1)
            if not k:
                continue
            events = []
            for _ in range(k):
                seq[i] += 1
                ts = t0 + 3600 * rng.random()
                v = [ValidationOutcome(kind="json_schema", passed=rng.random() > 0.03)]
                if rng.random() < 0.3:
                    v.append(ValidationOutcome(kind="tool_call", passed=rng.random() > 0.05))
                body = RequestEvent(request_id=f"{i}-{seq[i]}", ts=ts,
                                    variant=CAND if i % 4 == 0 else BASE,
                                    latency_s=rng.lognormvariate(-1, 0.4),
                                    prompt_tokens=rng.randint(20, 400),
                                    completion_tokens=rng.randint(10, 200),
                                    fallback_from="m-F16" if rng.random() < 0.01 else None,
                                    validations=v)
                events.append(TelemetryEvent(boot_epoch=1, seq=seq[i], kind="request", ts=ts,
                                             body=body))
            batches.append(TelemetryBatch(device_id=f"d{i:05d}", sent_at=t0 + 3600,
                                          events=events))
        for j in range(0, len(batches), 1000):
            stored += store.ingest_batches(batches[j:j + 1000], received_at=t0 + 3600).inserted
        if h % 24 == 23:
            print(f"  loaded {h + 1}/{hours} hours, {stored:,} requests", flush=True)
    return stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--days", type=float, default=7)
    ap.add_argument("--requests-per-device-hour", type=float, default=0.25)
    ap.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        pg_name = None
        if args.store == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'fleet.db'}"
        else:
            pg_name = f"qf_bench_{uuid.uuid4().hex[:8]}"
            with create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT").connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{pg_name}"'))
            url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_name}"
        store = Store(url)
        try:
            t = time.perf_counter()
            n = fill(store, args.devices, args.days, args.requests_per_device_hour, now)
            print(f"{args.devices:,} devices, {n:,} requests over {args.days:g} days "
                  f"({args.store}), loaded in {time.perf_counter() - t:.0f} s")
            if store.dialect == "postgresql":
                with store.engine.connect().execution_options(
                        isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(text("VACUUM ANALYZE"))
            run(store, args.runs, now)
        finally:
            store.close()
            if pg_name:
                with create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT").connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))


def run(store: Store, runs: int, now: float) -> None:
    assigned: list[Any] = []
    engine = RolloutEngine(store, lambda ids, v, r: assigned.append((list(ids), v)),
                           lambda label: f"m-{label}")
    engine.create(RolloutSpec.model_validate({
        "name": "bench", "cohort": "region=eu", "from": "Q8_0", "to": "Q4_K_M",
        "steps": ["10%", "50%", "100%"]}), actor="bench")
    engine.tick()  # assigns step 1: canaries and controls
    app = Starlette(routes=[console_mount(ConsoleContext(store, engine, None, HttpAuth(None),
                                                         Sessions(60)))])
    paths = [
        "/console/fleet", "/console/fleet?selector=region=eu,cpu.class=x86-avx2",
        "/console/signals?window=24h", "/console/rollouts", "/console/rollouts/bench",
        "/console/devices/d00042",
        "/console/api/fleet", "/console/api/fleet?selector=region=eu,cpu.class=x86-avx2",
        "/console/api/signals?window=1h", "/console/api/signals?window=24h",
        "/console/api/signals?window=7d",
        "/console/api/signals?window=24h&selector=site=s07",
        "/console/api/signals?window=7d&selector=site=s07",
        "/console/api/signals?window=7d&variant=m-Q4_K_M",
        "/console/api/rollouts", "/console/api/rollouts/bench",
        "/console/api/devices/d00042?window=7d",
    ]
    print(f"{'page or endpoint':<62} {'first ms':>9} {'median ms':>10} {'max ms':>8}")
    with TestClient(app) as client:
        for path in paths:
            t = time.perf_counter()
            r = client.get(path)
            first = (time.perf_counter() - t) * 1000
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                r = client.get(path)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200
            print(f"{path:<62} {first:>9.0f} {statistics.median(times):>10.0f} "
                  f"{max(times):>8.0f}", flush=True)
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        fleet_metrics(store)
        times.append((time.perf_counter() - t) * 1000)
    print(f"{'/metrics (the store part: fleet_metrics)':<62} {times[0]:>9.0f} "
          f"{statistics.median(times[1:]):>10.0f} {max(times[1:]):>8.0f}")


if __name__ == "__main__":
    main()
