"""The outbox on its own: sequence, byte cap and eviction, quarantine, migrations."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from quantfleet.agent.telemetry.outbox import MIGRATIONS, Outbox, migrate
from quantfleet.agent.wire import (
    AggregatePayload,
    DeviceStatusPayload,
    GapRecord,
    TelemetryEvent,
)

from .helpers import request_event


def _all_rows(path: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT seq, kind, item FROM outbox ORDER BY seq").fetchall()


def test_seq_is_persisted_across_restarts_and_boot_epoch_grows(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, "d1")
    assert [ob.append(request_event(i)) for i in range(5)] == [1, 2, 3, 4, 5]
    ob.close()
    again = Outbox(path, "d1")
    assert again.boot_epoch > ob.boot_epoch
    assert again.append(request_event(9)) == 6
    again.close()
    events = [TelemetryEvent.model_validate_json(r[2]) for r in _all_rows(path)]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e.boot_epoch for e in events[:5]} == {ob.boot_epoch}
    assert events[5].boot_epoch == again.boot_epoch


def test_uncommitted_appends_do_not_consume_seqs(tmp_path: Path) -> None:
    """Seqs are committed with their rows, so a crash leaves no hole in the sequence."""
    path = tmp_path / "o.db"
    ob = Outbox(path, "d1")
    for i in range(3):
        ob.append(request_event(i))
    ob.flush()
    ob.append(request_event(3))  # never committed: the process "dies" here
    ob._conn.close()
    again = Outbox(path, "d1")
    assert again.append(request_event(4)) == 4
    again.close()


def test_full_outbox_evicts_by_priority_and_accounts_for_every_event(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    cap = 60_000
    ob = Outbox(path, "d1", max_bytes=cap)
    kinds: dict[int, str] = {}
    for i in range(400):
        if i % 40 == 0:
            kinds[ob.append(AggregatePayload(variant="Q8_0", minute=i * 60))] = "aggregate"
        if i % 100 == 0:
            kinds[ob.append(ob.device_status())] = "device_status"
        kinds[ob.append(request_event(i))] = "request"
        if i % 25 == 0:
            ob.flush()  # several commits, several eviction passes
    ob.flush()
    stats = ob.stats()
    assert stats["bytes"] <= cap
    rows = _all_rows(path)
    kept = {seq for seq, kind, _ in rows if kind != "gap"}
    gaps = [TelemetryEvent.model_validate_json(item).body for _, kind, item in rows
            if kind == "gap"]
    assert gaps, "the cap was exceeded, so something was evicted"
    evicted: list[int] = []
    for gap in gaps:
        assert isinstance(gap, GapRecord) and gap.reason == "evicted"
        assert gap.events == sum(gap.counts.values())
        evicted += [s for a, b in gap.ranges for s in range(a, b + 1)]
    # Every appended event is either still there or listed as evicted, never both.
    assert len(evicted) == len(set(evicted))
    assert set(evicted) | kept == set(kinds)
    assert not set(evicted) & kept
    assert ob.evicted_total == len(evicted) == sum(g.events for g in gaps)
    # Priority: raw requests went first; no aggregate was touched while requests remained.
    evicted_kinds = {kinds[s] for s in evicted}
    assert evicted_kinds == {"request"}
    assert sum(c for g in gaps for k, c in g.counts.items() if k == "request") == len(evicted)
    # Oldest first within the class: everything evicted is older than every kept request.
    kept_requests = [s for s in kept if kinds[s] == "request"]
    assert max(evicted) < min(kept_requests)
    ob.close()
    # The file itself stays near the cap (pages are reused, not grown).
    assert path.stat().st_size < 4 * cap + 64 * 1024


def test_eviction_reaches_aggregates_but_keeps_the_newest_status(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d1", max_bytes=20_000)
    statuses = []
    for i in range(300):
        ob.append(AggregatePayload(variant=f"v{i % 3}", minute=i * 60))
        if i % 50 == 0:
            statuses.append(ob.append(DeviceStatusPayload(
                outbox_rows=i, outbox_bytes=0, evicted_total=0, published_batches=0)))
        ob.flush()
    rows = _all_rows(tmp_path / "o.db")
    kept_status = [s for s, k, _ in rows if k == "device_status"]
    assert statuses[-1] in kept_status
    gaps = [TelemetryEvent.model_validate_json(i).body for _, k, i in rows if k == "gap"]
    assert sum(g.counts.get("aggregate", 0) for g in gaps) > 0  # type: ignore[union-attr]
    ob.close()


def test_in_flight_rows_are_never_evicted(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d1", max_bytes=30_000)
    for i in range(20):
        ob.append(request_event(i))
    ob.flush()
    token = ob.claim(1, 10)
    for i in range(200):
        ob.append(request_event(100 + i))
    ob.flush()
    seqs = {s for s, _, _ in _all_rows(tmp_path / "o.db")}
    assert set(range(1, 11)) <= seqs
    assert 11 not in seqs  # the oldest unclaimed went instead
    ob.release(token)
    ob.close()


def test_ack_deletes_exactly_the_claimed_rows(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d1")
    for i in range(10):
        ob.append(request_event(i))
    ob.flush()
    rows = ob.read(0, 5, 100_000)
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    token = ob.claim(1, 4)
    ob.ack(token)
    ob.flush()
    assert [r[0] for r in ob.read(0, None, 100_000)] == list(range(5, 11))
    assert len(ob.read(0, None, 3 * len(rows[0][2]))) in (2, 3)  # the byte budget holds
    assert ob.stats()["rows"] == 6 and ob.stats()["in_flight"] == 0
    ob.close()


def test_corrupt_database_is_quarantined_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not SQLite" * 500)
    ob = Outbox(path, "d1")
    assert ob.quarantined is not None and ob.quarantined.exists()
    assert ob.quarantined.read_bytes().startswith(b"this is not SQLite")
    ob.append(request_event(1))
    ob.close()
    rows = _all_rows(path)
    first = TelemetryEvent.model_validate_json(rows[0][2])
    assert isinstance(first.body, GapRecord) and first.body.reason == "quarantined"
    assert ob.quarantined.name in first.body.detail
    assert [k for _, k, _ in rows] == ["gap", "request"]


def test_damaged_pages_are_quarantined_too(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, "d1")
    for i in range(2000):
        ob.append(request_event(i))
    ob.close()
    data = bytearray(path.read_bytes())
    for off in range(8192, min(len(data), 40960)):  # scribble over pages 3..10
        data[off] = 0xA5
    path.write_bytes(bytes(data))
    again = Outbox(path, "d1")  # no crash loop: a fresh outbox
    assert again.quarantined is not None
    # Seq carries on after the quarantine gap record, which names the 2000 rows lost.
    assert again.append(request_event(0)) == 2002
    assert again.lost_at_open == 2000
    again.close()


def test_migrations_blank_to_latest_and_oldest_to_latest(tmp_path: Path) -> None:
    blank = sqlite3.connect(tmp_path / "blank.db", isolation_level=None)
    assert migrate(blank) == [name for name, _ in MIGRATIONS]
    assert migrate(blank) == []
    blank.close()
    old_path = tmp_path / "old.db"
    old = sqlite3.connect(old_path, isolation_level=None)
    assert migrate(old, old_path, MIGRATIONS[:1]) == ["m001_create_outbox"]
    old.execute("INSERT INTO outbox VALUES (1, 7, 'request', 0, 1.0, 10, '{}')")
    old.execute("INSERT INTO meta VALUES ('next_seq', 2)")
    assert migrate(old, old_path) == ["m002_eviction_index"]
    assert (tmp_path / "old.db.bak-m002_eviction_index").exists()
    indexes = [r[1] for r in old.execute("PRAGMA index_list(outbox)")]
    assert any("priority" in name for name in indexes)
    assert old.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
    old.close()
    ob = Outbox(old_path, "d1")
    assert ob.append(request_event(1)) == 2
    ob.close()


def test_append_rejects_a_non_finite_timestamp(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d1")
    with pytest.raises(ValueError, match="ts must be finite"):
        ob.append(request_event(1), ts=float("nan"))
    ob.close()


def test_items_are_valid_wire_events(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d1")
    ob.append(request_event(1))
    ob.append(AggregatePayload(variant="Q8_0", minute=60))
    ob.close()
    for _, kind, item in _all_rows(tmp_path / "o.db"):
        event = TelemetryEvent.model_validate_json(item)
        assert event.kind == kind
        assert json.loads(item)["body"]["type"] == kind


def test_read_joined_respects_the_byte_budget_and_covers_every_row(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d1")
    for i in range(3000):
        ob.append(request_event(i, request_id="r" * (i % 300)))  # uneven sizes
    ob.flush()
    cursor, seen = 0, []
    while (got := ob.read_joined(cursor, None, 16 * 1024)) is not None:
        first, last, n, items = got
        assert len(items) <= 16 * 1024
        events = json.loads(b"[" + items + b"]")
        assert [e["seq"] for e in events] == list(range(first, last + 1)) and n == len(events)
        seen += [e["seq"] for e in events]
        cursor = last
    assert seen == list(range(1, 3001))
    assert ob.read_joined(0, 11, 1 << 20)[:3] == (1, 10, 10)  # type: ignore[index]
    ob.close()
