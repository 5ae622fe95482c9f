"""Rollout decision time at fleet scale, and the simulator's sustained message rate.

    python bench/bench_rollout.py [--devices 1000,10000] [--events-per-device 20]

For each fleet size: a SQLite store with that many devices in one cohort and a
realistic window of request telemetry (every device's last bake window), a
rollout in its baking phase with 10 % of the cohort as canaries, then the time
of one gate evaluation (every gate of the default spec over canary and control)
and of one engine step decision (tick: read state, judge, record the verdict).
Target: under one second at 10,000 devices.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from quantfleet.agent.wire import (
    DeviceStatePayload,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
)
from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.rollouts.spec import RolloutSpec
from quantfleet.fleet.store import Store, schema

BASE, CAND = "m-Q8_0", "m-Q4_K_M"


def build(store: Store, n: int, per_device: int, now: float) -> None:
    rng = random.Random(1)
    batches = []
    for i in range(n):
        dev = f"d{i:05d}"
        store.apply_status(StatusPayload(device_id=dev, state="online", boot_epoch=1,
                                         reason="birth", ts=now - 900, labels={"fleet": "a"}))
        variant = CAND if i % 10 == 0 else BASE
        store.apply_state(DeviceStatePayload(device_id=dev, boot_epoch=1, variant=variant,
                                             update_state="healthy", ts=now - 800))
        events = []
        for s in range(per_device):
            ts = now - 600 + 600 * s / per_device
            body = RequestEvent(request_id=f"{dev}-{s}", ts=ts, variant=variant,
                                latency_s=rng.lognormvariate(-1, 0.3), prompt_tokens=50,
                                completion_tokens=30, validations=[
                                    ValidationOutcome(kind="json_schema",
                                                      passed=rng.random() > 0.02)])
            events.append(TelemetryEvent(boot_epoch=1, seq=s + 1, kind="request", ts=ts,
                                         body=body))
        batches.append(TelemetryBatch(device_id=dev, sent_at=now, events=events))
        if len(batches) == 200:
            store.ingest_batches(batches)
            batches = []
    if batches:
        store.ingest_batches(batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="1000,10000")
    ap.add_argument("--events-per-device", type=int, default=20)
    args = ap.parse_args()
    print(f"{'devices':>8} {'events':>9} {'gate evaluation':>16} {'step decision':>14}  target")
    for n in (int(x) for x in args.devices.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(f"sqlite:///{Path(tmp) / 'fleet.db'}")
            now = 2_000_000.0
            build(store, n, args.events_per_device, now)
            spec = RolloutSpec.model_validate({
                "name": "bench", "cohort": "fleet=a", "from": BASE, "to": CAND,
                "steps": ["10%", "100%"], "bake_s": 600, "min_samples": 100})
            engine = RolloutEngine(store, lambda *a: None, clock=lambda now=now: now)
            engine.create(spec)
            canaries = [{"rollout_id": "bench", "device_id": f"d{i:05d}", "role": "canary",
                         "step": 0, "stratum": "*", "assigned_at": now - 900,
                         "outcome": "healthy", "reason": ""} for i in range(0, n, 10)]
            with store.engine.begin() as conn:
                conn.execute(schema.rollout_devices.insert(), canaries)
                conn.execute(schema.rollouts.update().values(phase="baking",
                                                             phase_started_at=now - 600))
            t = time.perf_counter()
            verdict = engine.judge_step("bench", spec, (now - 600, now))
            gate_s = time.perf_counter() - t
            t = time.perf_counter()
            engine.tick()
            tick_s = time.perf_counter() - t
            state = engine.get("bench")
            print(f"{n:>8} {n * args.events_per_device:>9} {gate_s:>15.3f}s {tick_s:>13.3f}s  "
                  f"{'met' if tick_s < 1 else 'NOT met'} (verdict {verdict.verdict}, "
                  f"then step {state['step'] + 1}, {state['state']})")
            store.close()


if __name__ == "__main__":
    main()
