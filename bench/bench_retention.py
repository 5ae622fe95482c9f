"""The store's size after a week of a fleet, with and without retention, from measured rows.

    python bench/bench_retention.py [--devices 1000] [--minutes 2] [--rate 2]
                                    [--fleet 10000] [--days 7] [--stores sqlite,postgresql]

For each engine: ``--devices`` devices send ``--rate`` requests per second each for
``--minutes`` minutes, as real ``RequestEvent`` bodies through ``Store.ingest_batches``
(JSON and tool-call validations, refusals, fallbacks, lognormal latencies, varied
token counts — the distributions of bench_rollout.py). Then the rollups are made
(``rollups.roll_up``) and measured:

- bytes per raw event: the growth of ``events`` with its indexes
  (``pg_total_relation_size``; SQLite: the file's pages, ``PRAGMA page_count``);
- rollup rows per device-minute and bytes per rollup row (both rollup tables with
  their indexes, measured the same way).

It prints the measured inputs and the extrapolation to ``--fleet`` devices over
``--days`` days: raw events kept the whole time (no retention) against raw events
kept ``--raw-days`` (the ``[retention] raw_events_s`` default: 2 days) plus the
rollups of the whole period (``rollups_s`` defaults to 90 days).
"""

from __future__ import annotations

import argparse
import random

from bench_rollout import open_store
from sqlalchemy import text

from quantfleet.agent.wire import RequestEvent, TelemetryBatch, TelemetryEvent, ValidationOutcome
from quantfleet.fleet.store import Store
from quantfleet.fleet.store.rollups import roll_up

ROLLUP_TABLES = ("request_rollups", "request_rollup_bins")


def size(store: Store, tables: tuple[str, ...]) -> int:
    """Bytes the tables take with their indexes (PostgreSQL), or the whole file (SQLite:
    measure a difference)."""
    with store.engine.connect() as conn:
        if store.dialect == "postgresql":
            return sum(int(conn.execute(text("SELECT pg_total_relation_size(:t)"),
                                        {"t": t}).scalar_one()) for t in tables)
        pages = int(conn.execute(text("PRAGMA page_count")).scalar_one())
        page = int(conn.execute(text("PRAGMA page_size")).scalar_one())
        return pages * page


def rows(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def request(rng: random.Random, dev: str, seq: int, ts: float) -> TelemetryEvent:
    validations = [ValidationOutcome(kind="json_schema", passed=rng.random() > 0.02)]
    if rng.random() < 0.3:
        validations.append(ValidationOutcome(kind="tool_call", passed=rng.random() > 0.05))
    if rng.random() < 0.05:
        validations.append(ValidationOutcome(kind="refusal", passed=True, detail="refused"))
    prompt, completion = rng.randint(20, 400), rng.randint(10, 200)
    fallback = "m-F16" if rng.random() < 0.01 else None
    body = RequestEvent(request_id=f"{dev}-{seq}", ts=ts, variant="m-Q4_K_M",
                        latency_s=rng.lognormvariate(-1, 0.3), prompt_tokens=prompt,
                        completion_tokens=completion,
                        attempt_tokens=(prompt + completion) * (2 if fallback else 1),
                        fallback_from=fallback, validations=validations)
    return TelemetryEvent(boot_epoch=1, seq=seq, kind="request", ts=ts, body=body)


def measure(store: Store, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(1)
    t0 = 1_000_000.0 * 60
    if store.dialect == "sqlite":
        with store.engine.connect() as conn:  # a file as large as the data, no free pages
            conn.exec_driver_sql("VACUUM")
    before = size(store, ("events",))
    per_minute = int(args.rate * 60)
    seq = dict.fromkeys(range(args.devices), 0)
    events = 0
    for m in range(args.minutes):
        batches = []
        for d in range(args.devices):
            evs = []
            for k in range(per_minute):
                seq[d] += 1
                evs.append(request(rng, f"d{d:05d}", seq[d], t0 + 60 * m + k * 60 / per_minute))
            batches.append(TelemetryBatch(device_id=f"d{d:05d}", sent_at=t0 + 60 * (m + 1),
                                          events=evs))
        for j in range(0, len(batches), 50):
            events += store.ingest_batches(batches[j:j + 50]).inserted
    raw = size(store, ("events",)) - before
    before = size(store, ROLLUP_TABLES)
    roll_up(store.engine)
    rolled = size(store, ROLLUP_TABLES) - before
    n_rollups = sum(rows(store, t) for t in ROLLUP_TABLES)
    device_minutes = args.devices * args.minutes
    return {"events": events, "raw_bytes": raw, "per_event": raw / events,
            "rollup_rows": n_rollups, "per_rollup_row": rolled / n_rollups,
            "rollup_rows_per_device_minute": n_rollups / device_minutes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--minutes", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2.0, help="Requests per device per second.")
    ap.add_argument("--fleet", type=int, default=10_000)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--raw-days", type=float, default=2.0)
    ap.add_argument("--stores", default="sqlite,postgresql")
    ap.add_argument("--pg-admin", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    gb = 1e9
    for kind in args.stores.split(","):
        with open_store(kind, args.pg_admin) as store:
            m = measure(store, args)
        period_events = args.fleet * args.rate * 86400 * args.days
        kept_events = args.fleet * args.rate * 86400 * min(args.raw_days, args.days)
        device_minutes = args.fleet * 1440 * args.days
        rollup_rows = device_minutes * m["rollup_rows_per_device_minute"]
        without = period_events * m["per_event"]
        with_ret = kept_events * m["per_event"] + rollup_rows * m["per_rollup_row"]
        print(f"{kind}: measured {m['events']:,} events ({args.devices:,} devices x "
              f"{args.minutes} min at {args.rate:g}/s): {m['per_event']:.0f} bytes per raw "
              f"event with its indexes; {m['rollup_rows']:,} rollup rows = "
              f"{m['rollup_rows_per_device_minute']:.1f} per device-minute, "
              f"{m['per_rollup_row']:.0f} bytes each")
        print(f"  {args.fleet:,} devices x {args.rate:g}/s x {args.days:g} days = "
              f"{period_events:,.0f} events; {device_minutes:,.0f} device-minutes")
        print(f"  no retention: {period_events:,.0f} raw events = {without / gb:,.0f} GB")
        print(f"  retention ({args.raw_days:g} days raw + rollups of the {args.days:g} days): "
              f"{kept_events:,.0f} raw = {kept_events * m['per_event'] / gb:,.0f} GB + "
              f"{rollup_rows:,.0f} rollup rows = {rollup_rows * m['per_rollup_row'] / gb:,.0f}"
              f" GB; total {with_ret / gb:,.0f} GB ({with_ret / without:.0%} of no retention)")


if __name__ == "__main__":
    main()
