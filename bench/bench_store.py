"""Fleet store ingest rate: events/s into SQLite and PostgreSQL, in one run.

    python bench/bench_store.py [--events 100000] [--batch 500] [--no-postgres]

Events are realistic request events (validations, tokens, latency) spread over
100 devices; each engine ingests the same batches, then the same batches again
(all duplicates), so the idempotent path is measured too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from quantfleet.agent.wire import RequestEvent, TelemetryBatch, TelemetryEvent, ValidationOutcome
from quantfleet.fleet.store import Store

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def make_batches(n_events: int, batch_size: int, devices: int = 100) -> list[TelemetryBatch]:
    per_device: dict[str, list[TelemetryEvent]] = {}
    for i in range(n_events):
        dev = f"dev-{i % devices:04d}"
        seq = i // devices + 1
        body = RequestEvent(
            request_id=uuid.uuid4().hex, ts=1e9 + i, variant="smollm2-135m-Q4_K_M",
            latency_s=0.3 + (i % 7) / 10, prompt_tokens=40, completion_tokens=25,
            validations=[ValidationOutcome(kind="json_schema", passed=i % 50 != 0)],
        )
        per_device.setdefault(dev, []).append(
            TelemetryEvent(boot_epoch=1, seq=seq, kind="request", ts=body.ts, body=body))
    batches = []
    for dev, evs in per_device.items():
        for k in range(0, len(evs), batch_size):
            batches.append(TelemetryBatch(device_id=dev, sent_at=1e9, events=evs[k:k + batch_size]))
    return batches


def run(url: str, batches: list[TelemetryBatch], group: int) -> tuple[float, float]:
    store = Store(url)
    n = sum(len(b.events) for b in batches)
    rates = []
    for _ in range(2):  # fresh, then every event a duplicate
        t = time.perf_counter()
        for k in range(0, len(batches), group):
            store.ingest_batches(batches[k:k + group])
        rates.append(n / (time.perf_counter() - t))
    store.close()
    return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500, help="events per device batch")
    ap.add_argument("--group", type=int, default=8, help="batches per transaction")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    batches = make_batches(args.events, args.batch)
    print(f"{args.events} request events in {len(batches)} batches, {args.group} per transaction")
    with tempfile.TemporaryDirectory() as tmp:
        fresh, dup = run(f"sqlite:///{Path(tmp) / 'fleet.db'}", batches, args.group)
        print(f"sqlite      ingest {fresh:>10,.0f} events/s   "
              f"re-ingest (duplicates) {dup:>10,.0f}/s"
              f"   target >= 50,000: {'met' if fresh >= 50_000 else 'NOT met'}")
    if not args.no_postgres:
        name = f"qf_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            fresh, dup = run(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", batches,
                             args.group)
            print(f"postgresql  ingest {fresh:>10,.0f} events/s   re-ingest (duplicates) "
                  f"{dup:>10,.0f}/s")
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
