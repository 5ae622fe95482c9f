"""Fleet store ingest rate: events/s into SQLite and PostgreSQL, in one run.

    python bench/bench_store.py [--events 100000] [--batch 500] [--group 8]
                                [--devices 100] [--no-postgres]

Events are realistic request events (validations, tokens, latency) spread over
``--devices`` devices; each engine ingests the same batches, then the same
batches again (all duplicates), so the idempotent path is measured too.

Beside each figure, the limit: the same rows, prebuilt as tuples, written by the
bare driver into a fresh store of the same schema in the same transactions
(sqlite3's executemany; psycopg's binary COPY into the staging table and the INSERT …
ON CONFLICT that ``Store.ingest_rows`` runs) — what is left of the ingest's
time once parsing and Python are gone. The ratio is ``Store`` / bare.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import pg_database

from quantfleet.agent.wire import RequestEvent, TelemetryBatch, TelemetryEvent, ValidationOutcome
from quantfleet.fleet.store import (
    _PG_COPY_TYPES,
    _PG_STAGE_COPY,
    _PG_STAGE_CREATE,
    _PG_STAGE_INSERT,
    _SQLITE_EVENT_INSERT,
    Store,
    event_tuple,
)


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


def run_bare(url: str, batches: list[TelemetryBatch], group: int) -> float:
    """The same rows and transactions through the bare driver (the limit)."""
    store = Store(url)  # the schema; then only its driver connection is used
    groups = [[event_tuple(b.device_id, ev, 1e9, b.historical)
               for b in batches[k:k + group] for ev in b.events]
              for k in range(0, len(batches), group)]
    n = sum(len(g) for g in groups)
    raw: Any = store.engine.raw_connection().driver_connection
    t = time.perf_counter()
    if store.dialect == "sqlite":
        for rows in groups:
            raw.executemany(_SQLITE_EVENT_INSERT, rows)
            raw.commit()
    else:
        for rows in groups:
            with raw.cursor() as cur:
                cur.execute(_PG_STAGE_CREATE)
                with cur.copy(_PG_STAGE_COPY) as copy:
                    copy.set_types(_PG_COPY_TYPES)
                    for row in rows:
                        copy.write_row(row)
                cur.execute(_PG_STAGE_INSERT)
            raw.commit()
    rate = n / (time.perf_counter() - t)
    raw.close()
    store.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500, help="events per device batch")
    ap.add_argument("--group", type=int, default=8, help="batches per transaction")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    batches = make_batches(args.events, args.batch, args.devices)
    print(f"{args.events} request events from {args.devices} devices in {len(batches)} "
          f"batches, {args.group} per transaction")
    print(f"{'engine':<11} {'Store ev/s':>11} {'bare driver ev/s':>17} {'ratio':>6} "
          f"{'re-ingest (duplicates)/s':>25}   target >= 50,000")
    engines = ["sqlite"] + ([] if args.no_postgres else ["postgresql"])
    for engine in engines:
        with tempfile.TemporaryDirectory() as tmp, \
                (pg_database() if engine == "postgresql" else _sqlite(Path(tmp))) as url, \
                (pg_database() if engine == "postgresql" else _sqlite(Path(tmp), "bare")) \
                as bare_url:
            fresh, dup = run(url, batches, args.group)
            bare = run_bare(bare_url, batches, args.group)
        print(f"{engine:<11} {fresh:>11,.0f} {bare:>17,.0f} {fresh / bare:>6.2f} "
              f"{dup:>25,.0f}   {'met' if fresh >= 50_000 else 'NOT met'}", flush=True)


@contextmanager
def _sqlite(tmp: Path, name: str = "fleet") -> Iterator[str]:
    yield f"sqlite:///{tmp / f'{name}.db'}"


if __name__ == "__main__":
    main()
