"""A minimal telemetry consumer: validate, store idempotently in SQLite, find gaps.

It subscribes to ``{root}/devices/+/telemetry`` and ``…/status``, validates
every payload against the wire models (``quantfleet.agent.wire``), and writes
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

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    device_id TEXT NOT NULL, boot_epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, ts REAL NOT NULL, historical INTEGER NOT NULL,
    received_at REAL NOT NULL, body TEXT NOT NULL,
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
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()
        self.duplicates = 0

    def close(self) -> None:
        self._conn.close()

    # -- ingest -------------------------------------------------------------

    def ingest(self, topic: str, payload: bytes, root: str = TOPIC_ROOT) -> IngestResult:
        """Validate one MQTT message and store it; never raises for bad input."""
        try:
            device, leaf = parse_device_topic(topic, root)
        except ValueError:
            return self._reject("unknown_topic", topic, "not a device topic")
        if leaf == "telemetry":
            try:
                batch = TelemetryBatch.model_validate_json(payload)
            except ValidationError as exc:
                return self._reject(self._classify(payload), topic, str(exc.errors()[:1]))
            if batch.schema_version != WIRE_VERSION or any(
                    e.body.schema_version != WIRE_VERSION for e in batch.events):
                return self._reject("unsupported_version", topic,
                                    f"this consumer reads schema_version {WIRE_VERSION}")
            if batch.device_id != device:
                return self._reject("topic_mismatch", topic, f"payload says {batch.device_id}")
            inserted, dups = self.store_batch(batch)
            return IngestResult(inserted, dups)
        if leaf == "status":
            if not payload:
                return IngestResult()  # a cleared retained message
            try:
                status = StatusPayload.model_validate_json(payload)
            except ValidationError as exc:
                return self._reject(self._classify(payload), topic, str(exc.errors()[:1]))
            if status.schema_version != WIRE_VERSION:
                return self._reject("unsupported_version", topic,
                                    f"this consumer reads schema_version {WIRE_VERSION}")
            if status.device_id != device:
                return self._reject("topic_mismatch", topic, f"payload says {status.device_id}")
            self.store_status(status)
            return IngestResult()
        return self._reject("unknown_topic", topic, f"leaf {leaf!r} is not consumed here")

    @staticmethod
    def _classify(payload: bytes) -> str:
        # Only on the error path: tell "not JSON" and "a newer schema" from "wrong shape".
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return "not_json"
        if isinstance(doc, dict) and isinstance(doc.get("schema_version"), int) \
                and doc["schema_version"] != WIRE_VERSION:
            return "unsupported_version"
        return "invalid_payload"

    def _reject(self, reason: str, topic: str, detail: str) -> IngestResult:
        log.warning("rejected message on %s: %s (%s)", topic, reason, detail[:200])
        with self._lock:
            self._conn.execute(
                "INSERT INTO rejections VALUES (?, 1) "
                "ON CONFLICT(reason) DO UPDATE SET count = count + 1", (reason,))
        return IngestResult(rejected=reason)

    def store_batch(self, batch: TelemetryBatch) -> tuple[int, int]:
        """Insert a validated batch; returns (inserted, duplicates)."""
        now = time.time()
        dev = batch.device_id
        hist = int(batch.historical)
        rows = [(dev, e.boot_epoch, e.seq, e.kind, e.ts, hist, now, e.body.model_dump_json())
                for e in batch.events]
        gaps = [(dev, e.boot_epoch, e.seq, i, a, b)
                for e in batch.events if e.body.type == "gap"
                for i, (a, b) in enumerate(e.body.ranges)]
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                before = conn.total_changes
                conn.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 rows)
                inserted = conn.total_changes - before
                if gaps:
                    conn.executemany("INSERT OR IGNORE INTO evicted VALUES (?, ?, ?, ?, ?, ?)",
                                     gaps)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self.duplicates += len(rows) - inserted
        return inserted, len(rows) - inserted

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
            self._conn.execute(
                "INSERT OR REPLACE INTO device_status VALUES (?, ?, ?, ?, ?, ?)",
                (status.device_id, status.state, status.boot_epoch, status.reason, status.ts,
                 time.time()))
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
        sql = "SELECT boot_epoch, seq, kind, ts, historical, body FROM events WHERE device_id = ?"
        args: tuple[Any, ...] = (device_id,)
        if kind is not None:
            sql += " AND kind = ?"
            args += (kind,)
        for epoch, seq, k, ts, hist, body in self._query(sql + " ORDER BY seq", args):
            yield {"boot_epoch": epoch, "seq": seq, "kind": k, "ts": ts,
                   "historical": bool(hist), "body": json.loads(body)}

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
    away; paho reconnects on its own.
    """

    def __init__(self, store: TelemetryStore, host: str = "127.0.0.1", port: int = 1883, *,
                 root: str = TOPIC_ROOT, client_id: str = "qf-consumer",
                 protocol: str = "5", session_expiry_s: int = 86400,
                 username: str | None = None, password: str | None = None) -> None:
        self.store = store
        self.root = root
        self.host, self.port = host, port
        self.v5 = protocol == "5"
        self.received = 0
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else False,
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
        if not self.connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"consumer: no connection to {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

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
        try:
            self.store.ingest(msg.topic, bytes(msg.payload), self.root)
        except Exception:  # a store failure must not kill paho's thread
            log.exception("consumer: storing a message from %s failed", msg.topic)
