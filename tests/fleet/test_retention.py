"""Retention: raw events go once rolled up and old, never while a rollout's window needs
them; rollups go later; the config says what is wrong with which option in which file."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from quantfleet.agent.wire import TelemetryBatch
from quantfleet.fleet.config import FleetConfigError, load_fleet_config
from quantfleet.fleet.store import Store, schema
from quantfleet.fleet.store.retention import apply_retention
from quantfleet.fleet.store.rollups import roll_up
from tests.fleet.test_rollups import request

DAY = 86400.0
NOW = 100 * DAY


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def ingest(store: Store, rng: random.Random, seq: dict[str, int], received: float,
           ts: float, devices: int = 4, each: int = 5) -> None:
    batches = []
    for i in range(devices):
        dev = f"d{i}"
        events = []
        for _ in range(each):
            seq[dev] = seq.get(dev, 0) + 1
            events.append(request(rng, dev, seq[dev], ts + rng.random() * 60))
        batches.append(TelemetryBatch(device_id=dev, sent_at=received, events=events))
    store.ingest_batches(batches, received_at=received)


def count(store: Store, sql: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def test_old_events_go_once_rolled_up_and_the_totals_stay(store: Store) -> None:
    rng = random.Random(1)
    seq: dict[str, int] = {}
    ingest(store, rng, seq, NOW - 5 * DAY, NOW - 5 * DAY)  # old
    ingest(store, rng, seq, NOW - 3 * DAY, NOW - 3 * DAY)  # old
    ingest(store, rng, seq, NOW - 600, NOW - 600)  # recent
    keep = {"raw_events_s": 2 * DAY, "rollups_s": 90 * DAY, "now": NOW}
    # Not rolled up yet: nothing goes.
    assert apply_retention(store.engine, **keep).events == 0
    roll_up(store.engine)
    done = apply_retention(store.engine, **keep)
    assert done.events == 2 * 4 * 5
    assert count(store, "SELECT count(*) FROM events") == 4 * 5
    assert count(store, "SELECT sum(requests) FROM request_rollups") == 3 * 4 * 5
    assert store.seq_gaps() == []  # each device lost a prefix of its sequence, no hole
    assert apply_retention(store.engine, **keep).events == 0

    # The rollups outlive the events; past rollups_s they go too.
    done = apply_retention(store.engine, raw_events_s=2 * DAY, rollups_s=4 * DAY, now=NOW)
    assert done.rollups > 0
    assert count(store, "SELECT sum(requests) FROM request_rollups") == 2 * 4 * 5


def test_a_running_rollouts_window_is_never_deleted(store: Store) -> None:
    rng = random.Random(2)
    seq: dict[str, int] = {}
    start = NOW - 4 * DAY  # a rollout baking for four days, retention two
    with store.engine.begin() as conn:
        conn.execute(schema.rollouts.insert().values(
            id="r1", spec={}, state="running", step=0, phase="baking",
            phase_started_at=start, bake_extensions=0, reason="", created_at=start,
            updated_at=start))
    ingest(store, rng, seq, NOW - 5 * DAY, NOW - 5 * DAY)  # before the window: goes
    ingest(store, rng, seq, NOW - 3 * DAY, NOW - 3 * DAY)  # in it: stays
    roll_up(store.engine)
    done = apply_retention(store.engine, raw_events_s=2 * DAY, rollups_s=90 * DAY, now=NOW)
    assert done.events == 4 * 5 and done.pinned_from == start
    assert count(store, f"SELECT count(*) FROM events WHERE ts < {start}") == 0
    assert count(store, f"SELECT count(*) FROM events WHERE ts >= {start}") == 4 * 5

    with store.engine.begin() as conn:  # the rollout ends: its window is free
        conn.execute(text("UPDATE rollouts SET state = 'completed'"))
    assert apply_retention(store.engine, raw_events_s=2 * DAY, rollups_s=90 * DAY,
                           now=NOW).events == 4 * 5 - (1 if store.dialect == "sqlite" else 0)


def test_after_retention_new_events_are_rolled_up_once(store: Store) -> None:
    """SQLite keeps its newest row, so new rows never reuse ids the watermark passed."""
    rng = random.Random(3)
    seq: dict[str, int] = {}
    ingest(store, rng, seq, NOW - 5 * DAY, NOW - 5 * DAY)
    roll_up(store.engine)
    apply_retention(store.engine, raw_events_s=2 * DAY, rollups_s=90 * DAY, now=NOW)
    ingest(store, rng, seq, NOW, NOW)
    assert roll_up(store.engine).events == 4 * 5
    assert count(store, "SELECT sum(requests) FROM request_rollups") == 2 * 4 * 5


def test_the_retention_options_are_checked_naming_the_option_and_the_file(
        tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("[retention]\nraw_events_s = 864000\nrollups_s = 86400\n")
    with pytest.raises(FleetConfigError) as exc:
        load_fleet_config(path)
    assert str(path) in str(exc.value) and "rollups_s" in str(exc.value)
    path.write_text("[retention]\nraw_events_s = 60\n")
    with pytest.raises(FleetConfigError) as exc:
        load_fleet_config(path)
    assert str(path) in str(exc.value) and "raw_events_s" in str(exc.value)
    path.write_text("[retention]\nkeep = 1\n")
    with pytest.raises(FleetConfigError, match="keep"):
        load_fleet_config(path)
    path.write_text("[retention]\nraw_events_s = 7200\nrollups_s = 7200\nevery_s = 60\n")
    cfg = load_fleet_config(path)
    assert cfg.retention.raw_events_s == 7200 and cfg.retention.delete


def test_serve_rolls_up_and_applies_retention_on_its_own_thread(
        store: Store, tmp_path: Path) -> None:
    """FleetService's upkeep loop, alone (no broker): it rolls up what ingest committed
    every rollup_every_s and deletes what retention lets go every every_s."""
    import threading
    import time

    from quantfleet.fleet.service import FleetService

    rng = random.Random(4)
    seq: dict[str, int] = {}
    old = time.time() - 5 * DAY
    ingest(store, rng, seq, old, old)
    path = tmp_path / "fleet.toml"
    path.write_text("[retention]\nraw_events_s = 86400\nrollups_s = 864000\n"
                    "rollup_every_s = 0.05\nevery_s = 0.1\n")
    svc = FleetService.__new__(FleetService)  # only what the loop uses
    svc.cfg, svc.store, svc._stop = load_fleet_config(path), store, threading.Event()
    loop = threading.Thread(target=svc._upkeep_loop)
    loop.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if count(store, "SELECT count(*) FROM events") <= 1:
                break
            time.sleep(0.05)
    finally:
        svc._stop.set()
        loop.join(10)
    assert count(store, "SELECT coalesce(sum(requests), 0) FROM request_rollups") == 4 * 5
    assert count(store, "SELECT count(*) FROM events") == (1 if store.dialect == "sqlite" else 0)
