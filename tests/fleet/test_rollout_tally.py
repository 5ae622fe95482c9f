"""A rollout window's tally, advanced tick by tick, equals the full read of the window.

Both engines: requests arrive between ticks inside the window, before it (late,
backfilled), stamped ahead of the tick's ``now``, from devices nobody judges and on
the wrong variant; the judged set changes; on PostgreSQL a transaction open during a
tick is counted by the next one, once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from quantfleet.agent.wire import TelemetryBatch
from quantfleet.fleet.rollouts.gates import Sample
from quantfleet.fleet.rollouts.samples import Member, read_samples
from quantfleet.fleet.rollouts.tally import WindowTallies
from quantfleet.fleet.store import Store, event_row
from tests.fleet.test_rollups import BASE, CAND, request

START = 10_000.0


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def members_of(n: int) -> dict[str, Member]:
    return {f"d{i:02d}": Member("canary" if i % 3 == 0 else "control",
                                CAND if i % 3 == 0 else BASE,
                                (("x86-avx2", "arm-dotprod")[i % 2],))
            for i in range(n)}


def assert_same(got: dict[Any, Sample], want: dict[Any, Sample]) -> None:
    assert set(got) == set(want)
    for g, w in want.items():
        s = got[g]
        for name in ("requests", "validation_failures", "tool_calls", "tool_calls_ok",
                     "refusals", "fallbacks", "errors", "successes"):
            assert getattr(s, name) == getattr(w, name), (g, name)
        for dist in ("latency", "attempt_tokens"):
            a, b = getattr(s, dist), getattr(w, dist)
            assert np.array_equal(a.key, b.key) and np.array_equal(a.count, b.count), (g, dist)
            assert np.allclose(a.low, b.low) and np.allclose(a.high, b.high), (g, dist)


def arrivals(rng: random.Random, seq: dict[str, int], now: float) -> list[TelemetryBatch]:
    """Requests of 24 devices (20 judged): mostly in the window so far, some before it,
    some stamped up to a minute ahead of ``now``, a tenth on the other variant."""
    out = []
    for i in range(24):
        dev = f"d{i:02d}"
        events = []
        for _ in range(rng.randint(0, 6)):
            seq[dev] = seq.get(dev, 0) + 1
            ts = rng.choice([rng.uniform(START, now), rng.uniform(START, now),
                             rng.uniform(START - 900, START), rng.uniform(now, now + 60),
                             START])
            own = CAND if i % 3 == 0 else BASE
            variant = own if rng.random() < 0.9 else (BASE if own == CAND else CAND)
            events.append(request(rng, dev, seq[dev], ts, variant))
        if events:
            out.append(TelemetryBatch(device_id=dev, sent_at=now, events=events))
    return out


def test_the_tally_equals_the_full_read_at_every_tick(store: Store) -> None:
    rng = random.Random(21)
    members = members_of(20)
    tallies = WindowTallies()
    seq: dict[str, int] = {}
    now = START + 30
    for tick in range(8):
        store.ingest_batches(arrivals(rng, seq, now))
        if tick == 5:  # a device leaves the judged set: the window is read again
            members = {d: m for d, m in members.items() if d != "d04"}
        got = tallies.samples(store.engine, "r1", None, members, (START, now))
        assert tallies.last == ("read" if tick in (0, 5) else "advanced")
        with store.engine.begin() as conn:
            want = read_samples(conn, members, (START, now))
        assert_same(got, want)
        now += rng.choice([0.0, 7.5, 30.0])
    # A new window (the next step) starts afresh.
    tallies.samples(store.engine, "r1", None, members, (now, now + 60))
    assert tallies.last == "read"


def test_a_transaction_open_during_a_tick_is_counted_by_the_next_once(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        rng = random.Random(4)
        members = members_of(6)
        tallies = WindowTallies()
        seq: dict[str, int] = {}
        now = START + 60
        store.ingest_batches(arrivals(rng, seq, now))
        tallies.samples(store.engine, "r1", None, members, (START, now))
        slow = store.engine.connect()
        try:
            tx = slow.begin()
            row = event_row("d00", request(rng, "d00", 999, START + 1, CAND), 0.0, False)
            cols = list(row)
            slow.execute(text(f"INSERT INTO events ({', '.join(cols)}) "
                              f"VALUES ({', '.join(':' + c for c in cols)})"), row)
            store.ingest_batches(arrivals(rng, seq, now))  # commits after the open one
            tallies.samples(store.engine, "r1", None, members, (START, now))
            tx.commit()
        finally:
            slow.close()
        for _ in range(2):
            got = tallies.samples(store.engine, "r1", None, members, (START, now))
            assert tallies.last == "advanced"
            with store.engine.begin() as conn:
                assert_same(got, read_samples(conn, members, (START, now)))
    finally:
        store.close()
