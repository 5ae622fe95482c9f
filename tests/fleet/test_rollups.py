"""Per-minute rollups of request events equal the per-request computation, exactly once.

Both engines; late events land in their own minute; a rollup run in several steps
over arbitrary splits equals one run over the union (hypothesis); on PostgreSQL two
ingest transactions committing out of id order are each counted once.
"""

from __future__ import annotations

import itertools
import math
import random
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from quantfleet.agent.wire import (
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
)
from quantfleet.fleet.rollouts.stats import latency_bin
from quantfleet.fleet.store import Store, event_row, schema
from quantfleet.fleet.store.rollups import COUNTS, ROLLUPS, roll_up, watermark
from tests.fleet.test_rollout_samples import random_request

BASE, CAND = "m-Q8_0", "m-Q4_K_M"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def request(rng: random.Random, dev: str, seq: int, ts: float,
            variant: str | None = None) -> TelemetryEvent:
    return random_request(rng, dev, seq, variant or rng.choice([BASE, CAND]), ts)


def expected(rows: list[dict[str, Any]]) -> tuple[dict[Any, tuple[int, ...]], dict[Any, Any]]:
    """The rollups computed row by row in Python: counts per (device, variant, minute),
    (n, low, high) per (device, variant, minute, dist, key)."""
    counts: dict[Any, list[int]] = defaultdict(lambda: [0] * len(COUNTS))
    bins: dict[Any, list[float]] = {}
    for r in rows:
        if r["kind"] != "request":
            continue
        k = (r["device_id"], r["variant"], math.floor(r["ts"] / 60.0))
        status = r["status"] or 0
        vf = bool(r["validation_failed"])
        c = counts[k]
        for i, hit in enumerate((True, vf, r["tool_call_ok"] is not None,
                                 bool(r["tool_call_ok"]), bool(r["refused"]),
                                 bool(r["fallback"]), status >= 400,
                                 status < 400 and not vf)):
            c[i] += int(hit)
        lat = r["latency_s"] or 0.0
        tok = r["attempt_tokens"] or 0
        for dist, key, value in ((0, int(latency_bin([lat])[0]), lat), (1, tok, float(tok))):
            b = bins.setdefault((*k, dist, key), [0, math.inf, -math.inf])
            b[0] += 1
            b[1], b[2] = min(b[1], value), max(b[2], value)
    return ({k: tuple(v) for k, v in counts.items()},
            {k: (int(v[0]), v[1], v[2]) for k, v in bins.items()})


def stored(store: Store) -> tuple[dict[Any, tuple[int, ...]], dict[Any, Any]]:
    r, b = schema.request_rollups, schema.request_rollup_bins
    with store.engine.connect() as conn:
        counts = {(x.device_id, x.variant, x.minute): tuple(int(getattr(x, c)) for c in COUNTS)
                  for x in conn.execute(select(r))}
        bins = {(x.device_id, x.variant, x.minute, x.dist, x.key): (int(x.n), x.low, x.high)
                for x in conn.execute(select(b))}
    return counts, bins


def assert_equal(got: Any, want: Any) -> None:
    (gc, gb), (wc, wb) = got, want
    assert gc == wc
    assert gb.keys() == wb.keys()
    for k, (n, lo, hi) in wb.items():
        assert gb[k][0] == n, k
        assert gb[k][1] == pytest.approx(lo, rel=1e-12) and gb[k][2] == pytest.approx(hi, rel=1e-12)


def batches(rng: random.Random, devices: int, per_device: int, t0: float, span: float,
            seq0: int = 0) -> list[TelemetryBatch]:
    return [TelemetryBatch(device_id=f"d{i:02d}", sent_at=t0 + span, events=[
        request(rng, f"d{i:02d}", seq0 + s, t0 + rng.random() * span)
        for s in range(1, per_device + 1)]) for i in range(devices)]


def rows_of(bs: list[TelemetryBatch]) -> list[dict[str, Any]]:
    return [event_row(b.device_id, e, 0.0, False) for b in bs for e in b.events]


def test_rollups_equal_the_per_request_computation_and_run_once(store: Store) -> None:
    rng = random.Random(3)
    first = batches(rng, 12, 30, 6000.0, 600.0)
    store.ingest_batches(first)
    # A status event (not a request) is never rolled up.
    store.apply_status(StatusPayload(device_id="d00", state="online", boot_epoch=1,
                                     reason="birth", ts=6000.0))
    run = roll_up(store.engine)
    assert run.events == 12 * 30
    assert_equal(stored(store), expected(rows_of(first)))
    assert roll_up(store.engine).events == 0  # nothing new: nothing added twice

    # More of the same minutes, then late (backfilled) events hours before.
    more = batches(rng, 12, 10, 6000.0, 600.0, seq0=30)
    late = batches(rng, 5, 7, 600.0, 120.0, seq0=40)
    store.ingest_batches(more + late)
    assert roll_up(store.engine).events == 12 * 10 + 5 * 7
    assert_equal(stored(store), expected(rows_of(first + more + late)))
    with store.engine.connect() as conn:
        assert watermark(conn, ROLLUPS) is not None
        minutes = {m for (m,) in conn.execute(select(schema.request_rollups.c.minute))}
    assert {10, 11} <= minutes  # the late events' own minutes (600 s .. 720 s)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(1, 59), max_size=4))
def test_rollups_of_parts_merge_to_the_rollup_of_the_union(seed: int, cuts: list[int]) -> None:
    """Rolling up the events in any split equals rolling them up at once (SQLite)."""
    rng = random.Random(seed)
    events = [request(rng, "d0", s, 60.0 * rng.randint(0, 3) + rng.random() * 60)
              for s in range(1, 61)]
    with tempfile.TemporaryDirectory() as tmp:
        stepwise, once = (Store(f"sqlite:///{Path(tmp) / n}.db") for n in ("a", "b"))
        try:
            edges = [0, *sorted(set(cuts)), 60]
            for lo, hi in itertools.pairwise(edges):
                stepwise.ingest_batches([TelemetryBatch(device_id="d0", sent_at=1,
                                                        events=events[lo:hi])])
                roll_up(stepwise.engine)
            once.ingest_batches([TelemetryBatch(device_id="d0", sent_at=1, events=events)])
            roll_up(once.engine)
            assert_equal(stored(stepwise), stored(once))
            assert_equal(stored(once), expected(rows_of(
                [TelemetryBatch(device_id="d0", sent_at=1, events=events)])))
        finally:
            stepwise.close()
            once.close()


def _insert(conn: Any, row: dict[str, Any]) -> None:
    cols = [c for c in row if c != "id"]
    conn.execute(text(f"INSERT INTO events ({', '.join(cols)}) "
                      f"VALUES ({', '.join(':' + c for c in cols)})"), row)


def test_postgresql_transactions_committing_out_of_id_order_are_each_rolled_up_once(
        pg_url: str) -> None:
    """T1 inserts first (the lower id) and commits last: an ``id > watermark`` rollup run
    between the two commits would skip T1's row for ever; the snapshot mark takes it in
    the run after its commit."""
    store = Store(pg_url)
    try:
        rng = random.Random(5)
        a = event_row("d1", request(rng, "d1", 1, 6010.0, BASE), 0.0, False)
        b = event_row("d2", request(rng, "d2", 1, 6020.0, BASE), 0.0, False)
        t1, t2 = store.engine.connect(), store.engine.connect()
        try:
            x1, x2 = t1.begin(), t2.begin()
            _insert(t1, a)
            _insert(t2, b)
            x2.commit()
            with store.engine.connect() as conn:
                ids = dict(conn.execute(text("SELECT device_id, id FROM events")).all())
            assert set(ids) == {"d2"}  # T1's row, the lower id, is not committed yet
            roll_up(store.engine)  # T2's row; T1's waits for its commit
            assert {k[0]: v[0] for k, v in stored(store)[0].items()} == {"d2": 1}
            x1.commit()
        finally:
            t1.close()
            t2.close()
        roll_up(store.engine)
        roll_up(store.engine)
        counts, _ = stored(store)
        assert {k[0]: v[0] for k, v in counts.items()} == {"d1": 1, "d2": 1}
        with store.engine.connect() as conn:
            ids = dict(conn.execute(text("SELECT device_id, id FROM events")).all())
        assert ids["d1"] < ids["d2"]  # committed out of id order indeed
    finally:
        store.close()


def test_events_from_before_m006_are_taken_by_the_first_run(pg_url: str) -> None:
    """Rows without a txid (written before the column existed) are rolled up once."""
    store = Store(pg_url)
    try:
        rng = random.Random(8)
        store.ingest_batches(batches(rng, 3, 5, 6000.0, 60.0))
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE events SET txid = NULL"))
        roll_up(store.engine)
        store.ingest_batches(batches(rng, 3, 2, 6000.0, 60.0, seq0=5))
        roll_up(store.engine)
        counts, _ = stored(store)
        assert sum(v[0] for v in counts.values()) == 3 * 7
    finally:
        store.close()
