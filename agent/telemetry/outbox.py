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

A database that fails its integrity check at start is renamed aside
(``outbox.db.corrupt-<time>``), reported, and replaced by a fresh one.

"In flight" lives only in memory: after a restart every row is pending again,
which is exactly what the publisher needs (the consumer deduplicates).
"""

from __future__ import annotations

import logging
import math
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

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


class Outbox:
    """Durable, bounded, priority-evicting event buffer; usable as the serving Recorder."""

    def __init__(self, path: Path, device_id: str, *, max_bytes: int = 64 * 1024 * 1024,
                 commit_interval_s: float = 0.5, max_buffered: int = 50_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.device_id = device_id
        self.max_bytes = max_bytes
        self.commit_interval_s = commit_interval_s
        self.max_buffered = max_buffered
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
        self._flush_done = 0
        self._writer_error: BaseException | None = None
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
        self.boot_epoch = max(int(meta.get("boot_epoch", 0)) + 1, int(self._clock()))
        self._next_seq = int(meta.get("next_seq", 1))
        self.evicted_total = int(meta.get("evicted_total", 0))
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('boot_epoch', ?)", (self.boot_epoch,))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (self._next_seq,))
        conn.execute("COMMIT")
        rows, size = conn.execute("SELECT count(*), total(size) FROM outbox").fetchone()
        self._rows = int(rows)
        self._bytes = int(size)  # sizes already include ROW_OVERHEAD
        self._committed_seq = self._next_seq - 1
        self._reader = threading.local()
        if self.quarantined is not None:
            self.append(GapRecord(reason="quarantined", events=0,
                                  detail=f"corrupt outbox moved to {self.quarantined.name}"))
        log.info("outbox %s open: boot epoch %d, next seq %d, %d rows, %d bytes",
                 self.path, self.boot_epoch, self._next_seq, self._rows, self._bytes)

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
            if full:
                self._wake.notify_all()
        if full and self._writer is not None and threading.current_thread() is not self._writer:
            # Backpressure: the writer is behind; wait for it rather than grow memory.
            self.flush(timeout=30)
        return seq

    def _enqueue_locked(self, kind: str, at: float, payload: str) -> int:
        seq = self._next_seq
        self._next_seq += 1
        item = (f'{{"boot_epoch":{self.boot_epoch},"seq":{seq},"kind":"{kind}",'
                f'"ts":{at!r},"body":{payload}}}')
        self._buffer.append((seq, self.boot_epoch, kind, EVENT_PRIORITY[kind], at,
                             len(item) + ROW_OVERHEAD, item))
        return seq

    def record(self, event: RequestEvent) -> None:
        """The serving layer's Recorder: keep one raw request event (never raises)."""
        try:
            self.append(event, ts=event.ts)
        except Exception:  # the request path must not fail because telemetry did
            log.exception("outbox %s: could not record request %s", self.path, event.request_id)

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
                if self._writer_error is not None:
                    raise OutboxError(f"outbox writer failed: {self._writer_error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OutboxError(f"outbox {self.path}: flush timed out after {timeout}s")
                self._committed.wait(left)

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
                        or len(self._buffer) >= self.max_buffered
                        or len(self._deletes) >= 512):
                    self._wake.wait(self.commit_interval_s)
                if self._stop and not self._buffer and not self._deletes:
                    return
                ticket = self._flush_requested
            try:
                self._write_once()
            except BaseException as exc:  # a disk error must not vanish in a thread
                log.exception("outbox writer failed")
                with self._lock:
                    self._writer_error = exc
                    self._committed.notify_all()
                time.sleep(1.0)
                continue
            with self._lock:
                self._flush_done = max(self._flush_done, ticket)
                self._committed.notify_all()

    def _write_once(self) -> None:
        with self._lock:
            rows, self._buffer = self._buffer, []
            deletes, self._deletes = self._deletes, []
        if not rows and not deletes:
            return
        conn = self._conn
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
            extra: list[tuple[int, int, str, int, float, int, str]] = []
            evicted = 0
            if new_bytes > self.max_bytes:
                new_bytes, extra, evicted = self._evict(conn, new_bytes)
            last = (extra or rows)[-1][0] if (extra or rows) else None
            if last is not None:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (last + 1,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            with self._lock:  # put everything back so the next attempt retries it
                self._buffer[:0] = rows
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
        for callback in self._listeners:
            callback()

    def _evict(self, conn: sqlite3.Connection, total: int
               ) -> tuple[int, list[tuple[int, int, str, int, float, int, str]], int]:
        """Delete the lowest-priority, oldest rows down to 90 % of the cap; add a gap record."""
        target = int(self.max_bytes * 0.9)
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
            log.warning("outbox %s over its cap (%d > %d bytes) with nothing evictable",
                        self.path, total, self.max_bytes)
            return total, [], 0
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
        return total - freed + sum(r[5] for r in extra), extra, len(victims)

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
                    "in_flight": len(self._claims)}

    def device_status(self, **publisher: object) -> DeviceStatusPayload:
        s = self.stats()
        return DeviceStatusPayload.model_validate({
            "outbox_rows": s["rows"], "outbox_bytes": s["bytes"],
            "evicted_total": s["evicted_total"], "published_batches": 0, **publisher})
