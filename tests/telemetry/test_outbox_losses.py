"""Every loss of the outbox is reported with real counts: a removed -wal file or
database, a quarantined one, and a disk that cannot be written (full, for real, on a
small tmpfs when this machine allows mounting one)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quantfleet.agent.telemetry.outbox import Outbox
from quantfleet.agent.wire import GapRecord, TelemetryEvent

from .helpers import request_event


def _events(path: Path) -> list[TelemetryEvent]:
    with sqlite3.connect(path) as db:
        items = db.execute("SELECT item FROM outbox ORDER BY seq").fetchall()
    return [TelemetryEvent.model_validate_json(i[0]) for (i) in items]


def _accounted(events: list[TelemetryEvent]) -> tuple[set[int], set[int]]:
    """(seqs held, seqs the gap records say are gone)."""
    held = {e.seq for e in events}
    gone: list[int] = []
    for e in events:
        if isinstance(e.body, GapRecord):
            gone += [s for a, b in e.body.ranges for s in range(a, b + 1)]
    assert len(gone) == len(set(gone)), "a seq reported gone twice"
    return held, set(gone)


def _gaps(events: list[TelemetryEvent], reason: str) -> list[GapRecord]:
    return [e.body for e in events if isinstance(e.body, GapRecord) and e.body.reason == reason]


def test_a_removed_wal_becomes_a_gap_record_and_seq_carries_on(tmp_path: Path,
                                                              fault_record: Any) -> None:
    first = Outbox(tmp_path / "o.db", "d1")
    for i in range(50):
        first.append(request_event(i))
    first.close()  # checkpointed into the database file
    second = Outbox(tmp_path / "o.db", "d1")
    for i in range(100):
        second.append(request_event(100 + i))
    second.flush()  # committed, but only in the -wal file so far
    # The device loses the -wal file (and the process): what is left is the database
    # file as of its last checkpoint, and the state file written after the commit.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(tmp_path / "o.db", crashed / "o.db")
    shutil.copy(tmp_path / "o.db.state", crashed / "o.db.state")
    second._conn.close()
    again = Outbox(crashed / "o.db", "d1")
    assert again.lost_at_open == 100
    nxt = again.append(request_event(999))
    again.close()
    events = _events(crashed / "o.db")
    [gap] = _gaps(events, "lost")
    fault_record("outbox -wal file removed with the process", produced=150,
                 stored=len([e for e in events if e.kind == "request" and e.seq <= 150]),
                 reported_lost=gap.events)
    assert gap.events == 100 and gap.ranges == [(51, 150)]
    assert nxt > 151  # seq carried on after the gap record instead of starting over
    held, gone = _accounted(events)
    assert held | gone == set(range(1, nxt + 1)) and not held & gone


def test_a_removed_database_is_reported_from_the_state_file(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d1")
    for i in range(30):
        ob.append(request_event(i))
    ob.flush()
    token = ob.claim(1, 10)
    ob.ack(token)  # 1-10 reached the fleet: not a loss
    ob.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'o.db'}{suffix}").unlink(missing_ok=True)
    again = Outbox(tmp_path / "o.db", "d1")
    again.close()
    [gap] = _gaps(_events(tmp_path / "o.db"), "lost")
    assert gap.events == 20 and gap.ranges == [(11, 30)]


def test_a_quarantined_database_reports_what_it_held(tmp_path: Path,
                                                    fault_record: Any) -> None:
    ob = Outbox(tmp_path / "o.db", "d1")
    for i in range(40):
        ob.append(request_event(i))
    ob.close()
    (tmp_path / "o.db").write_bytes(b"not SQLite any more" * 400)
    again = Outbox(tmp_path / "o.db", "d1")
    assert again.quarantined is not None
    again.close()
    [gap] = _gaps(_events(tmp_path / "o.db"), "quarantined")
    fault_record("corrupt outbox file (quarantined at start)", produced=40, stored=0,
                 reported_lost=gap.events)
    assert gap.events == 40 and gap.ranges == [(1, 40)]
    assert again.quarantined.name in gap.detail


def test_another_devices_state_file_is_ignored(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.db", "d1").close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'o.db'}{suffix}").unlink(missing_ok=True)
    other = Outbox(tmp_path / "o.db", "d2")
    assert other.lost_at_open == 0 and other.append(request_event(1)) == 1
    other.close()


def test_a_disk_that_cannot_be_written_sheds_within_bounds_and_reports_it(
        tmp_path: Path) -> None:
    """SQLite's page limit fails commits exactly as a full disk does (SQLITE_FULL)."""
    ob = Outbox(tmp_path / "o.db", "d1", max_buffered=200, commit_interval_s=0.05).start()
    for i in range(20):
        ob.append(request_event(i))
    ob.flush()
    pages = ob._conn.execute("PRAGMA page_count").fetchone()[0]
    ob._conn.execute(f"PRAGMA max_page_count = {pages}")  # "the disk is full" from now on
    seqs = [ob.append(request_event(100 + i)) for i in range(1500)]  # never raises
    deadline = time.monotonic() + 10
    while ob.stats()["writable"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not ob.stats()["writable"]
    assert ob.stats()["buffered"] <= 200 + 1  # memory stays bounded
    assert ob.shed_total > 0
    ob._conn.execute("PRAGMA max_page_count = 1073741823")  # space again
    ob.flush(timeout=20)
    assert ob.stats()["writable"]
    ob.close()
    events = _events(tmp_path / "o.db")
    shed = _gaps(events, "unwritable")
    assert shed and sum(g.events for g in shed) == ob.shed_total
    assert sum(g.counts.get("request", 0) for g in shed) == ob.shed_total
    held, gone = _accounted(events)
    everything = set(range(1, max(held) + 1))
    assert set(seqs) <= everything
    assert held | gone == everything and not held & gone  # nothing vanished unreported


# -- a real full disk ------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for this test (skipped where mounting is not allowed)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_is_a_reported_loss_and_recovers(small_disk: Path,
                                                          fault_record: Any) -> None:
    ob = Outbox(small_disk / "o.db", "d1", max_bytes=64 * 1024 * 1024, max_buffered=300,
                commit_interval_s=0.05).start()
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # someone else fills the disk
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    seqs = [ob.append(request_event(i)) for i in range(3000)]  # the agent keeps serving
    deadline = time.monotonic() + 10
    while ob.stats()["writable"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not ob.stats()["writable"]
    assert ob.stats()["buffered"] <= 301
    filler.unlink()  # space returns
    ob.flush(timeout=30)
    ob.close()
    events = _events(small_disk / "o.db")
    held, gone = _accounted(events)
    requests = {e.seq for e in events if e.kind == "request"}
    fault_record("full disk under the outbox (4 MiB tmpfs filled)", produced=len(seqs),
                 stored=len(set(seqs) & requests), reported_lost=len(set(seqs) & gone))
    assert set(seqs) <= held | gone and not held & gone
    assert sum(g.events for g in _gaps(events, "unwritable")) == ob.shed_total > 0


def test_the_free_space_floor_evicts_before_the_disk_fills(small_disk: Path) -> None:
    floor = 1536 * 1024
    ob = Outbox(small_disk / "o.db", "d1", max_bytes=64 * 1024 * 1024,
                min_free_bytes=floor, commit_interval_s=0.05).start()
    for i in range(12_000):
        ob.append(request_event(i))
        if i % 500 == 0:
            ob.flush()
    ob.flush()
    assert ob.stats()["writable"] and ob.shed_total == 0
    assert shutil.disk_usage(small_disk).free >= floor // 2  # SQLite's own pages aside
    ob.close()
    events = _events(small_disk / "o.db")
    assert _gaps(events, "evicted")
    held, gone = _accounted(events)
    assert held | gone == set(range(1, max(held) + 1))
