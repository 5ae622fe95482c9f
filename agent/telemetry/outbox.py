"""The device's durable telemetry buffer: one SQLite file, one writer, a byte cap.

Every event gets ``(device_id, boot_epoch, seq)``; ``seq`` is persisted in the
same transaction as the rows, so the committed events of a device form one
contiguous range across restarts. Appends are cheap (serialise, buffer) and a
single writer thread group-commits them every ``commit_interval_s`` (WAL,
``synchronous=NORMAL``: a crash loses nothing committed, a power cut at worst
the last window). The same writer deletes acknowledged batches, so reads,
deletes and commits overlap with the network instead of being done row by row.

Full means evict, never refuse and never drop silently: raw request events
go first, then aggregates and health, then all but the newest device status;
gap records are kept. Every eviction pass appends a ``GapRecord`` with the
counts per kind and the seq ranges evicted, which is forwarded like any event.

Every loss is reported, with real counts. After each commit the outbox
writes a small state file beside the database (``outbox.db.state``: the next
seq and the seq ranges of the rows it holds). At start, when the database
holds less than that file says — its ``-wal`` file or the database itself was
removed, or it failed its integrity check and was renamed aside
(``outbox.db.corrupt-<time>``) and replaced by a fresh one — the rows that are
gone become a ``GapRecord`` (``lost`` or ``quarantined``) with their seq
ranges, and seq carries on from the state file instead of starting over at 1.

A disk that cannot be written (full, or failing) never stops serving: a
failed commit is rolled back and everything in it stays buffered and is
retried; while the disk stays unwritable the buffer is bounded by shedding
the lowest-priority, oldest buffered events, whose seqs are reported as a
``GapRecord`` (``unwritable``) as soon as a commit succeeds again. To keep
the disk from filling in the first place, the outbox evicts before a commit
would leave less than ``min_free_bytes`` free on its file system.

"In flight" lives only in memory: after a restart every row is pending again,
which is exactly what the publisher needs (the consumer deduplicates).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sqlite_utils
from pydantic import BaseModel

from quantfleet.agent.wire import (
    EVENT_PRIORITY,
    DeviceStatusPayload,
    GapRecord,
    RequestEvent,
)

log = logging.getLogger(__name__)

#: Bytes charged per row on top of its JSON, for SQLite's row and index overhead,
#: so the cap bounds the file and not only the payloads.
ROW_OVERHEAD = 64


class OutboxError(Exception):
    """The outbox cannot be used (closed, or its file cannot be created)."""


#: What an eviction's gap record becomes when its transaction is rolled back: its
#: seq stays taken, so it is kept and says that nothing was evicted.
_ROLLED_BACK_EVICTION = GapRecord(
    reason="evicted", events=0,
    detail="an eviction rolled back with a failed commit; nothing was evicted",
).model_dump_json()

#: One stored event as read for publishing: (seq, accounted size, ``TelemetryEvent`` JSON).
Row = tuple[int, int, bytes]


# -- migrations: named, each in one transaction with its record -------------

def _m001_create_outbox(db: sqlite_utils.Database) -> None:
    db["outbox"].create(  # type: ignore[union-attr]
        {"seq": int, "boot_epoch": int, "kind": str, "priority": int, "ts": float,
         "size": int, "item": str},
        pk="seq",
    )
    db["meta"].create({"key": str, "value": int}, pk="key")  # type: ignore[union-attr]


def _m002_eviction_index(db: sqlite_utils.Database) -> None:
    # Eviction walks one priority class oldest-first; without this it scans.
    db["outbox"].create_index(["priority", "seq"])  # type: ignore[union-attr]


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("m001_create_outbox", _m001_create_outbox),
    ("m002_eviction_index", _m002_eviction_index),
]


def migrate(conn: sqlite3.Connection, path: Path | None = None,
            migrations: list[tuple[str, Callable[[sqlite_utils.Database], None]]] | None = None,
            ) -> list[str]:
    """Apply the pending migrations in order; return their names.

    An existing database is backed up (``<file>.bak-<migration>``) before the
    first pending migration runs.
    """
    db = sqlite_utils.Database(conn)
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    done = {r[0] for r in conn.execute("SELECT name FROM _migrations")}
    pending = [(n, f) for n, f in (migrations or MIGRATIONS) if n not in done]
    if pending and done and path is not None:
        backup = path.with_name(f"{path.name}.bak-{pending[0][0]}")
        with sqlite3.connect(backup) as dest:
            conn.backup(dest)
        dest.close()
        log.info("backed up %s to %s before migrating", path, backup)
    for name, apply in pending:
        conn.execute("BEGIN IMMEDIATE")
        try:
            apply(db)
            conn.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("outbox migration %s applied", name)
    return [n for n, _ in pending]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _subtract(spans: Iterable[tuple[int, int]], minus: Iterable[tuple[int, int]]
              ) -> list[tuple[int, int]]:
    """The seqs of ``spans`` that are in none of ``minus`` (both inclusive ranges)."""
    cut = _merge(minus)
    out: list[tuple[int, int]] = []
    for a, b in _merge(spans):
        for c, d in cut:
            if d < a or c > b:
                continue
            if c > a:
                out.append((a, c - 1))
            a = max(a, d + 1)
            if a > b:
                break
        if a <= b:
            out.append((a, b))
    return out


def _coarsen(spans: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """At most ``limit`` ranges covering ``spans``, joining across the smallest holes."""
    out = list(spans)
    while len(out) > limit:
        i = min(range(len(out) - 1), key=lambda k: out[k + 1][0] - out[k][1])
        out[i:i + 2] = [(out[i][0], out[i + 1][1])]
    return out


#: Most seq ranges the state file keeps of the rows held (rows are mostly one range).
STATE_RANGES = 256


class Outbox:
    """Durable, bounded, priority-evicting event buffer; usable as the serving Recorder."""

    def __init__(self, path: Path, device_id: str, *, max_bytes: int = 64 * 1024 * 1024,
                 commit_interval_s: float = 0.5, max_buffered: int = 50_000,
                 min_free_bytes: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + ".state")
        self.device_id = device_id
        self.max_bytes = max_bytes
        self.commit_interval_s = commit_interval_s
        self.max_buffered = max_buffered
        self.min_free_bytes = min_free_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._committed = threading.Condition(self._lock)
        self._buffer: list[tuple[int, int, str, int, float, int, str]] = []
        self._deletes: list[tuple[int, int, int]] = []  # claim token, first seq, last seq
        self._claims: dict[int, tuple[int, int]] = {}
        self._next_claim = 0
        self._listeners: list[Callable[[], None]] = []
        self._stop = False
        self._writer: threading.Thread | None = None
        self._flush_requested = 0
        self._urgent = 0  # callers in wait_committed: commit now, not at the interval
        self._flush_done = 0
        self._writer_error: BaseException | None = None
        self._failed_ticket = 0  # the newest flush request an attempt failed with
        self._shed: list[int] = []  # seqs dropped from the buffer while the disk failed
        self._shed_counts: dict[str, int] = {}
        self.shed_total = 0
        self.lost_at_open = 0
        self._pending: list[tuple[int, int]] = []  # seq ranges of the rows in the database
        self._state_error_logged = False
        self.quarantined: Path | None = None
        self._mean_item = 512.0
        self._open()

    # -- opening, integrity, quarantine ------------------------------------

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"outbox {self.path}: cannot create its directory ({exc})") from None
        try:
            conn = self._open_checked()
        except sqlite3.DatabaseError as exc:
            self._quarantine(str(exc))
            conn = self._open_checked()
        self._conn = conn
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        state = self._read_state()
        self.boot_epoch = max(int(meta.get("boot_epoch", 0)) + 1, int(self._clock()),
                              int(state.get("boot_epoch", 0)) + 1)
        self._next_seq = int(meta.get("next_seq", 1))
        self.evicted_total = int(meta.get("evicted_total", 0))
        self._pending = _ranges(r[0] for r in conn.execute("SELECT seq FROM outbox"))
        lost: list[tuple[int, int]] = []
        if int(state.get("next_seq", 0)) > self._next_seq:
            # The database holds less than it had committed: what it held then and
            # holds no more is lost; seq carries on rather than start over.
            held = [(int(a), int(b)) for a, b in state.get("pending", [])]
            lost = _subtract(held, self._pending)
            self._next_seq = int(state["next_seq"])
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('boot_epoch', ?)", (self.boot_epoch,))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (self._next_seq,))
        conn.execute("COMMIT")
        rows, size = conn.execute("SELECT count(*), total(size) FROM outbox").fetchone()
        self._rows = int(rows)
        self._bytes = int(size)  # sizes already include ROW_OVERHEAD
        self._committed_seq = self._next_seq - 1
        self._reader = threading.local()
        self.lost_at_open = sum(b - a + 1 for a, b in lost)
        if self.quarantined is not None:
            self.append(GapRecord(
                reason="quarantined", events=self.lost_at_open, ranges=lost,
                detail=f"corrupt outbox moved to {self.quarantined.name}"
                       + ("" if state else " (no state file: how many events is unknown)")))
        elif lost:
            log.error("outbox %s lost %d committed events %s (its -wal file or the database "
                      "was removed); reported as a gap", self.path, self.lost_at_open, lost)
            self.append(GapRecord(
                reason="lost", events=self.lost_at_open, ranges=lost,
                detail="the database holds less than it had committed (its -wal file or "
                       "the file itself was removed)"))
        self._save_state()
        log.info("outbox %s open: boot epoch %d, next seq %d, %d rows, %d bytes",
                 self.path, self.boot_epoch, self._next_seq, self._rows, self._bytes)

    def _read_state(self) -> dict[str, Any]:
        """The state file of this device's outbox ({} when missing or unusable)."""
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("outbox state %s unreadable (%s); ignored", self.state_path, exc)
            return {}
        if not isinstance(data, dict) or data.get("device_id") != self.device_id:
            return {}
        return data

    def _save_state(self) -> None:
        """Write the state file (next seq, the ranges held) after a commit; never raises."""
        with self._lock:
            data = {"device_id": self.device_id, "boot_epoch": self.boot_epoch,
                    "next_seq": self._committed_seq + 1,
                    "pending": _coarsen(self._pending, STATE_RANGES)}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, self.state_path)
        except OSError as exc:  # a full disk: the next commit tries again
            if not self._state_error_logged:
                log.warning("outbox state %s not written (%s)", self.state_path, exc)
                self._state_error_logged = True
        else:
            self._state_error_logged = False

    def _open_checked(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {result[0] if result else 'no answer'}")
            migrate(conn, self.path)
        except BaseException:
            conn.close()
            raise
        return conn

    def _quarantine(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                shutil.move(src, Path(str(target) + suffix))
        self.quarantined = target
        log.error("outbox %s failed its integrity check (%s); moved to %s, starting fresh",
                  self.path, why, target)

    # -- appending ----------------------------------------------------------

    def start(self) -> Outbox:
        """Start the writer thread (idempotent)."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="outbox-writer",
                                            daemon=True)
            self._writer.start()
        return self

    def append(self, body: BaseModel, ts: float | None = None) -> int:
        """Queue one event for the next group commit; return its seq."""
        kind: str = body.type  # type: ignore[attr-defined]
        at = self._clock() if ts is None else ts
        if not math.isfinite(at):
            raise ValueError(f"outbox append: ts must be finite, got {at!r}")
        payload = body.model_dump_json()
        with self._lock:
            if self._stop:
                raise OutboxError(f"outbox {self.path} is closed")
            seq = self._enqueue_locked(kind, at, payload)
            full = len(self._buffer) >= self.max_buffered
            if full and self._writer_error is not None:
                # The disk cannot be written: bound memory, account for what goes.
                self._shed_locked()
                full = False
            elif full:
                self._wake.notify_all()
        if full and self._writer is not None and threading.current_thread() is not self._writer:
            # Backpressure: the writer is behind; wait for it rather than grow memory.
            try:
                self.flush(timeout=30)
            except OutboxError:
                with self._lock:  # the disk failed meanwhile: shed instead (bounded)
                    if self._writer_error is not None and \
                            len(self._buffer) >= self.max_buffered:
                        self._shed_locked()
        return seq

    def _enqueue_locked(self, kind: str, at: float, payload: str) -> int:
        seq = self._next_seq
        self._next_seq += 1
        item = (f'{{"boot_epoch":{self.boot_epoch},"seq":{seq},"kind":"{kind}",'
                f'"ts":{at!r},"body":{payload}}}')
        self._buffer.append((seq, self.boot_epoch, kind, EVENT_PRIORITY[kind], at,
                             len(item) + ROW_OVERHEAD, item))
        return seq

    def _shed_locked(self) -> None:
        """Drop a tenth of the buffer, lowest priority and oldest first (never a gap
        record), remembering each seq for the gap record of the next good commit."""
        n = max(1, len(self._buffer) // 10)
        order = sorted((row for row in self._buffer if row[2] != "gap"),
                       key=lambda row: (row[3], row[0]))
        drop = {row[0] for row in order[:n]}
        for row in order[:n]:
            self._shed_counts[row[2]] = self._shed_counts.get(row[2], 0) + 1
        self._shed.extend(drop)
        self.shed_total += len(drop)
        self._buffer = [row for row in self._buffer if row[0] not in drop]
        log.warning("outbox %s cannot be written: shed %d buffered events (%d so far)",
                    self.path, len(drop), self.shed_total)

    def record(self, event: RequestEvent) -> None:
        """The serving layer's Recorder: keep one raw request event (never raises)."""
        try:
            self.append(event, ts=event.ts)
        except Exception:  # the request path must not fail because telemetry did
            log.exception("outbox %s: could not record request %s", self.path, event.request_id)

    def durable(self, timeout: float) -> bool:
        """The Recorder's durability wait: everything appended so far is committed."""
        return self.wait_committed(timeout=timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything appended and acknowledged so far is committed."""
        if self._writer is None:
            self._write_once()
            return
        with self._lock:
            self._flush_requested += 1
            ticket = self._flush_requested
            self._wake.notify_all()
            deadline = time.monotonic() + timeout
            while self._flush_done < ticket:
                # Only a failed attempt that included this request counts; one from
                # before it is retried first.
                if self._failed_ticket >= ticket and self._writer_error is not None:
                    raise OutboxError(f"outbox writer failed: {self._writer_error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OutboxError(f"outbox {self.path}: flush timed out after {timeout}s")
                self._committed.wait(left)

    def wait_committed(self, seq: int | None = None, timeout: float = 1.0) -> bool:
        """Wait until ``seq`` (default: everything appended so far) is committed, and
        commit at once rather than at the next interval — a database's group commit:
        whatever arrives while one commit runs goes into the next. False after
        ``timeout``, without a writer, or while the disk cannot be written (the caller
        goes on; the loss, if it comes to one, is reported as a gap)."""
        with self._lock:
            want = self._next_seq - 1 if seq is None else seq
            if self._committed_seq >= want:
                return True
            if self._writer is None or self._writer_error is not None:
                return False
            self._urgent += 1
            self._wake.notify_all()
            deadline = time.monotonic() + timeout
            try:
                while self._committed_seq < want:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._writer_error is not None:
                        return False
                    self._committed.wait(left)
                return True
            finally:
                self._urgent -= 1

    def close(self) -> None:
        """Commit what is buffered and stop the writer."""
        if self._writer is not None:
            self.flush()
            with self._lock:
                self._stop = True
                self._wake.notify_all()
            self._writer.join(timeout=30)
            self._writer = None
        else:
            self._write_once()
            self._stop = True
        self._conn.close()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from the writer thread) after every commit."""
        self._listeners.append(callback)

    # -- the writer ---------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                if not (self._stop or self._flush_requested > self._flush_done
                        or (self._urgent and self._buffer)
                        or len(self._buffer) >= self.max_buffered
                        or len(self._deletes) >= 512):
                    self._wake.wait(self.commit_interval_s)
                if self._stop and not self._buffer and not self._deletes:
                    return
                ticket = self._flush_requested
            try:
                self._write_once()
            except BaseException as exc:  # a disk error must not vanish in a thread
                with self._lock:
                    first = self._writer_error is None
                    self._writer_error = exc
                    self._failed_ticket = max(self._failed_ticket, ticket)
                    self._committed.notify_all()
                if first:
                    log.exception("outbox %s: a commit failed; everything stays buffered "
                                  "and is retried", self.path)
                time.sleep(1.0)
                continue
            with self._lock:
                if self._writer_error is not None:
                    log.warning("outbox %s is writable again (%d events were shed)",
                                self.path, self.shed_total)
                self._writer_error = None
                self._flush_done = max(self._flush_done, ticket)
                self._committed.notify_all()

    def _write_once(self) -> None:
        with self._lock:
            if self._shed:
                # What the buffer shed while the disk failed, reported with this commit.
                shed = _ranges(self._shed)
                self._enqueue_locked("gap", self._clock(), GapRecord(
                    reason="unwritable", events=len(self._shed), counts=self._shed_counts,
                    ranges=shed, detail="dropped from memory while the outbox's disk "
                    "could not be written").model_dump_json())
                self._shed, self._shed_counts = [], {}
            rows, self._buffer = self._buffer, []
            deletes, self._deletes = self._deletes, []
        if not rows and not deletes:
            return
        conn = self._conn
        extra: list[tuple[int, int, str, int, float, int, str]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                conn.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            deleted_rows = freed = 0
            # Acks are mostly contiguous: merged, they are a few range deletes, and
            # counting what is really there keeps the byte figure exact.
            for a, b in _merge((d[1], d[2]) for d in deletes):
                n, size = conn.execute("SELECT count(*), total(size) FROM outbox "
                                       "WHERE seq BETWEEN ? AND ?", (a, b)).fetchone()
                if n:
                    conn.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (a, b))
                    deleted_rows += n
                    freed += int(size)
            added = sum(r[5] for r in rows)
            new_bytes = self._bytes + added - freed
            evicted_ranges: list[tuple[int, int]] = []
            evicted = 0
            limit = self._byte_limit(new_bytes, added)
            if new_bytes > limit:
                new_bytes, extra, evicted_ranges = self._evict(conn, new_bytes, limit)
                evicted = sum(b - a + 1 for a, b in evicted_ranges)
            last = (extra or rows)[-1][0] if (extra or rows) else None
            if last is not None:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (last + 1,))
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back itself (a full disk does that): then there is
            # no transaction left to roll back, and everything must still be kept.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("outbox %s: rollback failed", self.path)
            if extra:  # the eviction was rolled back with the rest: its record says so
                seq, epoch, kind, prio, at, _, _ = extra[0]
                item = (f'{{"boot_epoch":{epoch},"seq":{seq},"kind":"gap","ts":{at!r},'
                        f'"body":{_ROLLED_BACK_EVICTION}}}')
                extra[0] = (seq, epoch, kind, prio, at, len(item) + ROW_OVERHEAD, item)
            with self._lock:  # put everything back so the next attempt retries it
                self._buffer[:0] = rows + extra
                self._deletes[:0] = deletes
            raise
        with self._lock:
            self._bytes = new_bytes
            self._rows += len(rows) + len(extra) - deleted_rows - evicted
            self.evicted_total += evicted
            if last is not None:
                self._committed_seq = max(self._committed_seq, last)
            for d in deletes:
                self._claims.pop(d[0], None)
            held = self._pending + [(r[0], r[0]) for r in rows + extra]
            gone = [(d[1], d[2]) for d in deletes] + evicted_ranges
            self._pending = _subtract(held, gone)
        self._save_state()
        self._give_back_wal()
        for callback in self._listeners:
            callback()

    def _give_back_wal(self) -> None:
        """Near the free-space floor, fold the -wal file into the database and truncate
        it: the WAL otherwise keeps its largest size (up to ~4 MB between checkpoints)."""
        if not self.min_free_bytes:
            return
        try:
            if shutil.disk_usage(self.path.parent).free >= 2 * self.min_free_bytes:
                return
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (OSError, sqlite3.Error) as exc:
            log.debug("outbox %s: checkpoint near the floor failed (%s)", self.path, exc)

    def _byte_limit(self, total: int, added: int) -> int:
        """The bytes the outbox may hold after this commit: its cap, less what it must
        give back so that its file system keeps ``min_free_bytes`` free."""
        limit = self.max_bytes
        if self.min_free_bytes:
            try:
                free = shutil.disk_usage(self.path.parent).free
            except OSError:
                return limit
            # The -wal file takes about twice what a commit adds before it is folded in.
            shortfall = self.min_free_bytes - (free - 2 * added)
            if shortfall > 0:
                limit = max(0, min(limit, total - shortfall))
        return limit

    def _evict(self, conn: sqlite3.Connection, total: int, limit: int
               ) -> tuple[int, list[tuple[int, int, str, int, float, int, str]],
                          list[tuple[int, int]]]:
        """Delete the lowest-priority, oldest rows down to 90 % of ``limit``; add a gap
        record. Returns the new byte total, the rows added and the seq ranges evicted."""
        target = int(limit * 0.9)
        with self._lock:
            claimed = _merge(self._claims.values())
        newest_status = conn.execute(
            "SELECT max(seq) FROM outbox WHERE kind = 'device_status'").fetchone()[0]
        victims: list[int] = []
        counts: dict[str, int] = {}
        freed = 0
        for priority in sorted({p for p in EVENT_PRIORITY.values() if p < EVENT_PRIORITY["gap"]}):
            if total - freed <= target:
                break
            cur = conn.execute(
                "SELECT seq, kind, size FROM outbox WHERE priority = ? ORDER BY seq", (priority,))
            i = 0  # walk the claimed spans alongside the ascending seqs
            for seq, kind, size in cur:
                while i < len(claimed) and claimed[i][1] < seq:
                    i += 1
                if seq == newest_status or (i < len(claimed) and claimed[i][0] <= seq):
                    continue
                victims.append(seq)
                counts[kind] = counts.get(kind, 0) + 1
                freed += size
                if total - freed <= target:
                    break
            cur.close()
        if not victims:
            log.warning("outbox %s over its limit (%d > %d bytes) with nothing evictable",
                        self.path, total, limit)
            return total, [], []
        ranges = _ranges(victims)
        conn.executemany("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", ranges)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('evicted_total', ?)",
                     (self.evicted_total + len(victims),))
        gap = GapRecord(reason="evicted", events=len(victims), counts=counts, ranges=ranges)
        log.warning("outbox %s full: evicted %d events %s", self.path, len(victims), counts)
        # The gap record takes the next seq; anything appended meanwhile is written
        # first so that committed seqs stay a prefix of the allocated ones.
        with self._lock:
            self._enqueue_locked("gap", self._clock(), gap.model_dump_json())
            extra, self._buffer = self._buffer, []
        conn.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)", extra)
        return total - freed + sum(r[5] for r in extra), extra, ranges

    # -- the publisher's side -------------------------------------------------

    def _read_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._reader, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
            # Batches are read once, front to back: map the file instead of a read() per page.
            conn.execute("PRAGMA mmap_size=67108864")
            self._reader.conn = conn
        return conn

    def read(self, after: int, before: int | None, max_bytes: int) -> list[Row]:
        """Committed rows with ``after < seq < before``, ascending, ``max_bytes`` of items at most.

        Items come back as bytes (no UTF-8 decoding: they go straight into a payload);
        the row count is estimated from the mean item size so one ``fetchall`` does it.
        """
        hi = before if before is not None else 1 << 62
        limit = max(1, int(max_bytes / self._mean_item) + 2)
        rows = self._read_conn().execute(
            "SELECT seq, size, CAST(item AS BLOB) FROM outbox WHERE seq > ? AND seq < ? "
            "ORDER BY seq LIMIT ?", (after, hi, limit)).fetchall()
        used = 0
        for i, row in enumerate(rows):
            used += len(row[2]) + 1
            if used > max_bytes and i > 0:
                rows = rows[:i]
                break
        if rows:
            self._mean_item = 0.8 * self._mean_item + 0.2 * (
                sum(len(r[2]) for r in rows) / len(rows))
        return rows

    def read_joined(self, after: int, before: int | None, max_bytes: int
                    ) -> tuple[int, int, int, bytes] | None:
        """The next rows after ``after`` (and below ``before``) as one comma-joined blob.

        Returns ``(first seq, last seq, count, items)`` with ``items`` at most
        ``max_bytes`` long (unless a single item is longer). SQLite joins the rows
        itself, so a batch costs one query and no per-row Python. The order of the
        items inside the blob is the scan order; nothing downstream relies on it.
        """
        hi = before if before is not None else 1 << 62
        limit = max(1, int(max_bytes / self._mean_item))
        conn = self._read_conn()
        for _ in range(6):
            first, last, n, joined = conn.execute(
                "SELECT min(seq), max(seq), count(*), CAST(group_concat(item, ',') AS BLOB) "
                "FROM (SELECT seq, item FROM outbox WHERE seq > ? AND seq < ? "
                "ORDER BY seq LIMIT ?)", (after, hi, limit)).fetchone()
            if not n:
                return None
            self._mean_item = 0.7 * self._mean_item + 0.3 * (len(joined) / n)
            if len(joined) <= max_bytes or n == 1:
                return int(first), int(last), int(n), bytes(joined)
            limit = max(1, int(n * max_bytes / len(joined) * 0.97))
        return int(first), int(last), int(n), bytes(joined)  # pragma: no cover

    def seq_at(self, ts: float) -> int | None:
        """The lowest committed seq recorded at or after ``ts`` (None: nothing that recent)."""
        row = self._read_conn().execute(
            "SELECT min(seq) FROM outbox WHERE ts >= ?", (ts,)).fetchone()
        return None if row[0] is None else int(row[0])

    @property
    def committed_seq(self) -> int:
        """The highest seq written to the database (readers can see it)."""
        return self._committed_seq

    def claim(self, first: int, last: int) -> int:
        """Mark ``first..last`` in flight (not evictable); return the claim's token."""
        with self._lock:
            self._next_claim += 1
            self._claims[self._next_claim] = (first, last)
            return self._next_claim

    def release(self, token: int) -> None:
        """The batch was not acknowledged: its rows are pending again."""
        with self._lock:
            self._claims.pop(token, None)

    def ack(self, token: int) -> None:
        """The batch was acknowledged: delete its rows in the next commit."""
        with self._lock:
            span = self._claims.get(token)
            if span is None:
                return
            # The claim stays until the delete is committed, so eviction skips it.
            self._deletes.append((token, span[0], span[1]))
            if len(self._deletes) >= 512:
                self._wake.notify_all()

    # -- figures ------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"rows": self._rows, "bytes": self._bytes,
                    "buffered": len(self._buffer), "evicted_total": self.evicted_total,
                    "next_seq": self._next_seq, "committed_seq": self._committed_seq,
                    "in_flight": len(self._claims), "shed_total": self.shed_total,
                    "lost_at_open": self.lost_at_open,
                    "writable": int(self._writer_error is None)}

    def device_status(self, **publisher: object) -> DeviceStatusPayload:
        s = self.stats()
        return DeviceStatusPayload.model_validate({
            "outbox_rows": s["rows"], "outbox_bytes": s["bytes"],
            "evicted_total": s["evicted_total"], "published_batches": 0, **publisher})
