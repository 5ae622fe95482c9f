"""A minimal telemetry consumer: validate, store idempotently in SQLite, find gaps.

It subscribes to ``{root}/devices/+/telemetry`` and ``…/status``, validates
every payload against the wire models (``quantfleet.agent.wire``, in strict
mode: ``"0.1"`` is not a number), and writes
events with ``INSERT OR IGNORE`` on ``(device_id, boot_epoch, seq)``, so a
batch delivered twice (QoS 1 is at-least-once) is stored once. Anything that
does not validate is counted by reason and dropped; the consumer keeps going.

Gap detection: a device's committed events carry one contiguous ``seq``
range, so every seq between the lowest and highest seen must be either stored
or listed in a gap record the device sent (eviction). What is neither is an
unexplained gap — still in flight, or lost.

The fleet ingest service builds on this; it is also what the tests and the
benchmark use as the receiving end.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from quantfleet.agent.wire import (
    TOPIC_ROOT,
    WIRE_VERSION,
    StatusPayload,
    TelemetryBatch,
    parse_device_topic,
)
from quantfleet.fleet.messages import classify_payload

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, received_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    device_id TEXT NOT NULL, boot_epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, ts REAL NOT NULL, historical INTEGER NOT NULL,
    batch_id INTEGER NOT NULL, idx INTEGER NOT NULL,
    PRIMARY KEY (device_id, boot_epoch, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS evicted (
    device_id TEXT NOT NULL, gap_epoch INTEGER NOT NULL, gap_seq INTEGER NOT NULL,
    part INTEGER NOT NULL, seq_first INTEGER NOT NULL, seq_last INTEGER NOT NULL,
    PRIMARY KEY (device_id, gap_epoch, gap_seq, part)
);
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_status (
    device_id TEXT PRIMARY KEY, state TEXT NOT NULL, boot_epoch INTEGER NOT NULL,
    reason TEXT NOT NULL, ts REAL NOT NULL, received_at REAL NOT NULL
);
"""

REJECTION_REASONS = (
    "not_json", "unsupported_version", "invalid_payload", "topic_mismatch", "unknown_topic",
)


@dataclass(frozen=True)
class IngestResult:
    """What one message did: events stored and duplicates skipped, or why it was rejected."""

    inserted: int = 0
    duplicates: int = 0
    rejected: str | None = None


class TelemetryStore:
    """The consumer's SQLite store (WAL). Thread-safe: one lock around the connection."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        # Fewer, larger checkpoints: ingest writes whole batches.
        self._conn.execute("PRAGMA wal_autocheckpoint=10000")
        self._conn.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._autocommit = True
        self.duplicates = 0

    def close(self) -> None:
        self.commit()
        self._conn.close()

    # -- ingest -------------------------------------------------------------

    def ingest(self, topic: str, payload: bytes, root: str = TOPIC_ROOT,
               commit: bool = True) -> IngestResult:
        """Validate one MQTT message and store it; never raises for bad input.

        With ``commit=False`` the write joins an open group transaction that
        ``commit()`` ends (the consumer acknowledges messages only after that).
        """
        self._autocommit = commit
        try:
            return self._ingest(topic, payload, root)
        finally:
            self._autocommit = True

    def commit(self) -> None:
        """End the open group transaction, if any."""
        with self._lock:
            if self._conn.in_transaction:
                self._conn.execute("COMMIT")

    def _begin(self) -> None:
        # One savepoint per message inside the group transaction: a failing message
        # rolls back alone.
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")
        self._conn.execute("SAVEPOINT msg")

    def _end(self, ok: bool) -> None:
        self._conn.execute("RELEASE msg" if ok else "ROLLBACK TO msg")
        if not ok:
            self._conn.execute("RELEASE msg")
        if self._autocommit:
            self._conn.execute("COMMIT")

    def _ingest(self, topic: str, payload: bytes, root: str) -> IngestResult:
        try:
            device, leaf = parse_device_topic(topic, root)
        except ValueError:
            return self._reject("unknown_topic", topic, "not a device topic")
        if leaf == "telemetry":
            try:
                batch = TelemetryBatch.model_validate_json(payload, strict=True)
            except ValidationError as exc:
                return self._reject(self._classify(payload), topic, str(exc.errors()[:1]))
            if batch.schema_version != WIRE_VERSION or any(
                    e.body.schema_version != WIRE_VERSION for e in batch.events):
                return self._reject("unsupported_version", topic,
                                    f"this consumer reads schema_version {WIRE_VERSION}")
            if batch.device_id != device:
                return self._reject("topic_mismatch", topic, f"payload says {batch.device_id}")
            inserted, dups = self.store_batch(batch, payload)
            return IngestResult(inserted, dups)
        if leaf == "status":
            if not payload:
                return IngestResult()  # a cleared retained message
            try:
                status = StatusPayload.model_validate_json(payload, strict=True)
            except ValidationError as exc:
                return self._reject(self._classify(payload), topic, str(exc.errors()[:1]))
            if not status.accepts_version(status.schema_version):
                return self._reject("unsupported_version", topic,
                                    "this consumer reads status schema_version up to "
                                    f"{StatusPayload.SCHEMA_VERSION}")
            if status.device_id != device:
                return self._reject("topic_mismatch", topic, f"payload says {status.device_id}")
            self.store_status(status)
            return IngestResult()
        return self._reject("unknown_topic", topic, f"leaf {leaf!r} is not consumed here")

    @staticmethod
    def _classify(payload: bytes) -> str:
        return classify_payload(payload)

    def _reject(self, reason: str, topic: str, detail: str) -> IngestResult:
        log.warning("rejected message on %s: %s (%s)", topic, reason, detail[:200])
        with self._lock:
            self._begin()
            self._conn.execute(
                "INSERT INTO rejections VALUES (?, 1) "
                "ON CONFLICT(reason) DO UPDATE SET count = count + 1", (reason,))
            self._end(True)
        return IngestResult(rejected=reason)

    def store_batch(self, batch: TelemetryBatch, payload: bytes | None = None) -> tuple[int, int]:
        """Insert a validated batch; returns (inserted, duplicates).

        The payload is kept verbatim (one row per batch, the evidence as received);
        each event gets a small row keyed on the triple that points into it, so
        ingest does not re-serialise every event.
        """
        raw = payload if payload is not None else batch.model_dump_json().encode()
        now = time.time()
        dev = batch.device_id
        hist = int(batch.historical)
        gaps = [(dev, e.boot_epoch, e.seq, i, a, b)
                for e in batch.events if e.body.type == "gap"
                for i, (a, b) in enumerate(e.body.ranges)]
        with self._lock:
            conn = self._conn
            self._begin()
            try:
                batch_id = conn.execute("INSERT INTO batches (device_id, received_at, payload) "
                                        "VALUES (?, ?, ?)", (dev, now, raw)).lastrowid
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(dev, e.boot_epoch, e.seq, e.kind, e.ts, hist, batch_id, i)
                     for i, e in enumerate(batch.events)])
                inserted = conn.total_changes - before
                if inserted == 0:  # a pure duplicate: keep nothing of it
                    conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
                if gaps:
                    conn.executemany("INSERT OR IGNORE INTO evicted VALUES (?, ?, ?, ?, ?, ?)",
                                     gaps)
            except BaseException:
                self._end(False)
                raise
            self._end(True)
            dups = len(batch.events) - inserted
            self.duplicates += dups
        return inserted, dups

    def store_status(self, status: StatusPayload) -> bool:
        """Keep the status with the highest boot epoch; a late Will of an older start loses."""
        with self._lock:
            row = self._conn.execute(
                "SELECT boot_epoch FROM device_status WHERE device_id = ?",
                (status.device_id,)).fetchone()
            if row is not None and status.boot_epoch < row[0]:
                log.info("ignored stale %s status of %s (epoch %d < %d)", status.state,
                         status.device_id, status.boot_epoch, row[0])
                return False
            self._begin()
            self._conn.execute(
                "INSERT OR REPLACE INTO device_status VALUES (?, ?, ?, ?, ?, ?)",
                (status.device_id, status.state, status.boot_epoch, status.reason, status.ts,
                 time.time()))
            self._end(True)
            return True

    # -- queries ------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def rejections(self) -> dict[str, int]:
        return dict(self._query("SELECT reason, count FROM rejections"))

    def event_count(self, device_id: str | None = None) -> int:
        if device_id is None:
            return int(self._query("SELECT count(*) FROM events")[0][0])
        return int(self._query("SELECT count(*) FROM events WHERE device_id = ?",
                               (device_id,))[0][0])

    def seqs(self, device_id: str, kind: str | None = None) -> list[int]:
        if kind is None:
            rows = self._query("SELECT seq FROM events WHERE device_id = ? ORDER BY seq",
                               (device_id,))
        else:
            rows = self._query("SELECT seq FROM events WHERE device_id = ? AND kind = ? "
                               "ORDER BY seq", (device_id, kind))
        return [r[0] for r in rows]

    def events(self, device_id: str, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Stored events of a device in seq order, bodies unpacked from their batches."""
        sql = ("SELECT e.boot_epoch, e.seq, e.kind, e.ts, e.historical, e.batch_id, e.idx "
               "FROM events e WHERE e.device_id = ?")
        args: tuple[Any, ...] = (device_id,)
        if kind is not None:
            sql += " AND e.kind = ?"
            args += (kind,)
        cache: dict[int, list[Any]] = {}
        for epoch, seq, k, ts, hist, batch_id, idx in self._query(sql + " ORDER BY seq", args):
            if batch_id not in cache:
                raw = self._query("SELECT payload FROM batches WHERE id = ?", (batch_id,))[0][0]
                cache[batch_id] = json.loads(raw)["events"]
            yield {"boot_epoch": epoch, "seq": seq, "kind": k, "ts": ts,
                   "historical": bool(hist), "body": cache[batch_id][idx]["body"]}

    def evicted_ranges(self, device_id: str) -> list[tuple[int, int]]:
        return [(a, b) for a, b in self._query(
            "SELECT seq_first, seq_last FROM evicted WHERE device_id = ? ORDER BY seq_first",
            (device_id,))]

    def gaps(self, device_id: str) -> list[tuple[int, int]]:
        """Seq ranges neither stored nor reported evicted, between the lowest and highest seen."""
        seen = self.seqs(device_id)
        if not seen:
            return []
        covered = sorted([(s, s) for s in seen] + self.evicted_ranges(device_id))
        missing: list[tuple[int, int]] = []
        reach = covered[0][1]
        for a, b in covered[1:]:
            if a > reach + 1:
                missing.append((reach + 1, a - 1))
            reach = max(reach, b)
        return missing

    def status(self, device_id: str) -> dict[str, Any] | None:
        row = self._query("SELECT state, boot_epoch, reason, ts FROM device_status "
                          "WHERE device_id = ?", (device_id,))
        if not row:
            return None
        state, epoch, reason, ts = row[0]
        return {"state": state, "boot_epoch": epoch, "reason": reason, "ts": ts}


class Consumer:
    """Subscribes to every device's telemetry and status and feeds a ``TelemetryStore``.

    A persistent session (``clean_start=False`` with a session expiry) keeps the
    subscription and queued QoS 1 messages on the broker while the consumer is
    away; paho reconnects on its own. Messages are acknowledged only after the
    group transaction holding them is committed (every ``commit_every``
    messages or ``commit_interval_s``), so a crash of the consumer loses nothing:
    the broker sends the unacknowledged ones again.
    """

    def __init__(self, store: TelemetryStore, host: str = "127.0.0.1", port: int = 1883, *,
                 root: str = TOPIC_ROOT, client_id: str = "qf-consumer",
                 protocol: str = "5", session_expiry_s: int = 86400,
                 username: str | None = None, password: str | None = None,
                 commit_every: int = 16, commit_interval_s: float = 0.02) -> None:
        self.store = store
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        self._pending: list[tuple[int, int]] = []
        self._pending_lock = threading.Lock()
        self._first_pending = 0.0
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="consumer-commit",
                                         daemon=True)
        self.root = root
        self.host, self.port = host, port
        self.v5 = protocol == "5"
        self.received = 0
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else False, manual_ack=True,
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._session_expiry_s = session_expiry_s

    def start(self, timeout: float = 10.0) -> Consumer:
        kwargs: dict[str, Any] = {"keepalive": 30}
        if self.v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry_s
            kwargs.update(clean_start=False, properties=props)
        self.client.connect(self.host, self.port, **kwargs)
        self.client.loop_start()
        self._flusher.start()
        if not self.connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"consumer: no connection to {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._flusher.is_alive():
            self._flusher.join(5)
        self.commit_and_ack()
        self.client.disconnect()
        self.client.loop_stop()

    def commit_and_ack(self) -> None:
        """Commit the group transaction, then acknowledge the messages it holds."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
            self.store.commit()
        for mid, qos in pending:
            if qos > 0:
                self.client.ack(mid, qos)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.commit_interval_s / 2):
            if self._pending and time.monotonic() - self._first_pending >= self.commit_interval_s:
                self.commit_and_ack()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if rc.is_failure:
            log.error("consumer: connection refused: %s", rc)
            return
        # Subscribe on every connect: after a broker restart without persistence
        # the session is gone.
        client.subscribe([(f"{self.root}/devices/+/telemetry", 1),
                          (f"{self.root}/devices/+/status", 1)])
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        with self._pending_lock:
            try:
                self.store.ingest(msg.topic, bytes(msg.payload), self.root, commit=False)
            except Exception:  # a store failure must not kill paho's thread
                # Not acknowledged: the broker delivers it again after a reconnect.
                log.exception("consumer: storing a message from %s failed", msg.topic)
                return
            if not self._pending:
                self._first_pending = time.monotonic()
            self._pending.append((msg.mid, msg.qos))
            full = len(self._pending) >= self.commit_every
        if full:
            self.commit_and_ack()
