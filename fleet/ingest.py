"""The fleet's ingest: device messages from the broker into the store, acknowledged late.

Telemetry comes in on a shared subscription (``$share/<group>/…``), so several
fleet instances split the load. Status and state are retained and few, and a
broker does not hand retained messages to shared subscriptions, so every
instance subscribes to them directly (applying them is idempotent).

A QoS 1 message is acknowledged to the broker only after its events are
committed (paho's manual acks): a fleet killed between receipt and commit
gets the message again from its persistent session, and the store's
uniqueness on the event triple drops the copy. One writer thread
group-commits whatever arrived since its last commit (up to ``max_group``
messages, lingering ``linger_s`` for more): the group's statuses in one
transaction, its states in one, its telemetry in one, its rejections in one, and
only then acknowledges them.

Poison never stops the line: what the store cannot hold is rejected, counted
by reason, before the commit (``messages.screen``); a group whose commit still
fails on its data is applied again message by message, and a message that
fails alone event by event, the events that fail going to the dead letters.
Only a database that cannot write at all leaves a group unacknowledged.
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MessageState, MQTTErrorCode
from sqlalchemy.exc import DataError, IntegrityError

from quantfleet.agent.mqtt import MqttConfig, connect_options, make_client
from quantfleet.agent.wire import (
    DeviceStatePayload,
    StatusPayload,
    TelemetryBatch,
    parse_device_topic,
)

from .messages import Cleared, Payload, Rejected, parse_message, screen
from .store import Store, event_tuple

log = logging.getLogger(__name__)


class _ReadAhead:
    """A socket that reads ahead: paho reads a packet with three or four ``recv`` calls
    (the type byte, each length byte, the rest), one system call each; here one call
    fills a buffer that serves the next packets. ``pending`` tells paho's loop that
    bytes are waiting, as an SSL socket's does, so it reads them before it waits.
    Everything else goes to the socket underneath (an SSL socket included)."""

    def __init__(self, sock: Any, size: int = 1 << 18) -> None:
        self._sock = sock
        self._size = size
        self._buf = b""
        self._pos = 0

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + int(inner)

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            data: bytes = self._sock.recv(max(n, self._size))
            if len(data) <= n:
                return data
            self._buf, self._pos = data, 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        if self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
        return out

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


_PUBACK = struct.Struct("!BBH")  # PUBACK, remaining length 2, the packet id: success


class _IngestClient(mqtt.Client):
    """paho's client with a lean receive path for the ingest's own traffic.

    At ten thousand messages a second paho's receive path took two thirds of the
    ingest process (profiled with py-spy): three or four ``recv`` calls per packet,
    and per PUBLISH an MQTT 5 ``Properties`` object (15 µs to build, even when the
    packet has none) and a ``MQTTMessageInfo`` with its own lock and condition that
    only outgoing messages use. Here the socket reads ahead (``_ReadAhead``), and a
    QoS 0 or 1 PUBLISH without properties — every device message: the agent sets
    none, and this client allows the broker no topic aliases — is decoded in a few
    slices. Anything else (QoS 2, properties, an automatic acknowledgement, a
    malformed packet) goes through paho's own code. paho is pinned (pyproject.toml);
    tests/fleet/test_ingest_client.py holds the two paths equal and fails if the
    hooks move in a new release.
    """

    def _create_socket(self) -> Any:
        return _ReadAhead(super()._create_socket())

    def ack_all(self, mids: Sequence[int]) -> None:
        """Acknowledge QoS 1 messages, in the order given (the order they came: MQTT
        wants PUBACKs in the order of their PUBLISHes), as one write: ``ack`` queues
        a packet and wakes paho's loop with a system call for each."""
        if mids:
            blob = b"".join([_PUBACK.pack(0x40, 2, mid) for mid in mids])
            self._packet_queue(0x40, blob, 0, 1)

    def _handle_publish(self) -> MQTTErrorCode:
        message = _lean_publish(self._in_packet["command"], self._in_packet["packet"],
                                self._protocol == mqtt.MQTTv5)
        on_message = self.on_message
        if message is None or not self._manual_ack or on_message is None:
            return super()._handle_publish()
        with self._in_callback_mutex:
            on_message(self, self._userdata, message)  # no per-topic callbacks here
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _lean_publish(command: int, packet: bytes | bytearray,
                  v5: bool) -> mqtt.MQTTMessage | None:
    """A QoS 0/1 PUBLISH without properties as paho's message (its ``info`` unset), or
    None for anything to leave to paho (QoS 2, properties, a short or odd packet)."""
    qos = (command & 0x06) >> 1
    if qos > 1 or len(packet) < 2:
        return None
    end = 2 + ((packet[0] << 8) | packet[1])
    mid = 0
    if qos:
        if len(packet) < end + 2:
            return None
        mid = (packet[end] << 8) | packet[end + 1]
        if mid == 0:
            return None  # a protocol error: paho's code reports it
        start = end + 2
    else:
        start = end
    if v5:
        if len(packet) <= start or packet[start] != 0:
            return None  # properties present (or none at all): paho's path
        start += 1
    topic = bytes(packet[2:end])
    if not topic:
        return None
    message = mqtt.MQTTMessage.__new__(mqtt.MQTTMessage)
    message.timestamp = time.monotonic()
    message.state = MessageState.MQTT_MS_INVALID
    message.dup = bool(command & 0x08)
    message.mid = mid
    message._topic = topic
    message.payload = packet[start:]
    message.qos = qos
    message.retain = bool(command & 0x01)
    message.info = None  # type: ignore[assignment]  # outgoing messages' only
    message.properties = None
    return message


@dataclass
class IngestStats:
    received: int = 0
    events_inserted: int = 0
    duplicates: int = 0
    statuses: int = 0
    states: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by reason (fleet/messages.py)
    dead_lettered: int = 0  # valid, screened, and still refused by the store's commit
    commits: int = 0


class FleetIngest:
    def __init__(self, store: Store, mqtt_cfg: MqttConfig, *, share_group: str = "quantfleet",
                 client_id: str = "quantfleet-fleet", session_expiry_s: int = 7 * 86400,
                 max_group: int = 1024, linger_s: float = 0.02) -> None:
        self.store = store
        self.cfg = mqtt_cfg
        self.root = mqtt_cfg.topic_root
        self.share_group = share_group
        self.max_group = max_group
        self.linger_s = linger_s
        self.stats = IngestStats()
        self.connected = threading.Event()
        self._queue: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(maxsize=10_000)
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="fleet-ingest",
                                        daemon=True)
        client = make_client(mqtt_cfg, client_id, _IngestClient)
        assert isinstance(client, _IngestClient)
        self.client = client
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(1, 30)
        self._session_expiry_s = session_expiry_s

    # -- lifecycle ------------------------------------------------------
    def start(self, timeout: float = 10.0) -> FleetIngest:
        host, port = self.cfg.address()
        # A persistent session: messages the fleet has not acknowledged (not committed)
        # are delivered again when it comes back.
        kwargs = connect_options(self.cfg, session_expiry_s=self._session_expiry_s,
                                 clean_start=False)
        self._writer.start()
        self.client.connect_async(host, port, **kwargs)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"fleet ingest: no connection to {self.cfg.broker}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, commit what was received, then disconnect."""
        self._stop.set()
        self._queue.put(None)
        if self._writer.is_alive():
            self._writer.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks -------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if rc.is_failure:
            log.error("fleet ingest: connection refused: %s", rc)
            return
        # Every connect, whatever "session present" says: Mosquitto restores a persistent
        # session's plain subscriptions after a restart but not its $share ones.
        devices = f"{self.root}/devices/+"
        telemetry = f"{devices}/telemetry"
        if self.share_group:  # empty: one fleet instance on a broker without $share
            telemetry = f"$share/{self.share_group}/{telemetry}"
        client.subscribe([
            (telemetry, 1),
            (f"{devices}/status", 1),
            (f"{devices}/state", 1),
        ])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      props: Any) -> None:
        # Ready only once the broker has the subscriptions: a message published
        # before the SUBACK would otherwise miss a fresh session.
        failed = [r for r in reasons if getattr(r, "is_failure", False)]
        if failed:
            log.error("fleet ingest: subscriptions refused: %s", failed)
            return
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("fleet ingest: disconnected (%s); paho reconnects", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # A full queue blocks paho's thread: backpressure to the broker, not loss.
        self._queue.put(msg)

    # -- the writer -----------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            group = [first]
            # Linger a little for more: a commit costs the pages it touches, whatever
            # the number of events on them, so bigger groups write less per event. A
            # sleep, not a wait on the queue: that woke this thread (and passed the GIL
            # back and forth with paho's) at every message.
            if self.linger_s > 0 and self._queue.qsize() < self.max_group:
                time.sleep(self.linger_s)
            while len(group) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                group.append(nxt)
            try:
                self._commit(group)
            except Exception:
                # Unacknowledged: the broker redelivers after our reconnect.
                log.exception("fleet ingest: committing %d messages failed", len(group))
                time.sleep(1.0)
                continue
            self.client.ack_all([m.mid for m in group if m.qos == 1])
            for msg in group:
                if msg.qos == 2:  # not asked for (the subscriptions are QoS 1)
                    self.client.ack(msg.mid, msg.qos)
        log.info("fleet ingest: writer stopped")

    def _commit(self, group: list[mqtt.MQTTMessage]) -> None:
        # Decoded here, on the writer's thread, not on paho's as they arrive: that was
        # a quarter slower (the drain measured in docs/store.md, Ingest rate). While
        # paho's thread ran Python, this thread waited for the GIL at every step of
        # SQLite's executemany (the driver lets it go around each), up to the switch
        # interval each time.
        apply_messages(self.store, [(m.topic, bytes(m.payload)) for m in group], self.root,
                       self.stats)


def tune_gc() -> None:
    """Make CPython's cyclic garbage collector cheap for a fleet service process.

    Ingest makes and drops some thirty objects per event (the parsed models, the row),
    none of them in a cycle: reference counting frees them all. With the default
    thresholds (a collection every 700 allocations, a full one every 70,000) the
    collector ran every twenty events and kept walking every object the process
    holds (modules, schemas, the store's engine) — 20-30 % of ingest's time. What
    is alive once the service has started is moved out of its sight (``gc.freeze``)
    and the youngest generation is collected every 50,000 allocations instead;
    cyclic garbage still goes, a little later. ``quantfleet serve`` calls this once,
    after start-up.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


#: What a commit that fails on the data (not on the database) raises: constraint and
#: range errors from the engine, and what a driver raises binding a value (pysqlite's
#: OverflowError for an integer over 64 bits). Anything else — a lost connection, a
#: locked or full database — fails the group unacknowledged, to be delivered again.
_DATA_ERRORS = (IntegrityError, DataError, OverflowError, ValueError, TypeError)


@dataclass
class Prepared:
    """A message decoded for the store, before the commit: what of it is storable (its
    event rows built), the rejections it earned, and its raw bytes for the dead letters."""

    topic: str
    payload: bytes
    parsed: Payload | None  # the storable part; None: rejected whole, or a cleared topic
    rejections: list[Rejected]
    rows: list[tuple[Any, ...]] | None = None  # a batch's events (store.event_tuple)


def prepare(topic: str, payload: bytes, root: str, received_at: float) -> Prepared:
    """Parse and screen one message (never raises for bad input: it is rejected)."""
    parsed = parse_message(topic, payload, root)
    if isinstance(parsed, Cleared):
        return Prepared(topic, payload, None, [])
    if isinstance(parsed, Rejected):
        return Prepared(topic, payload, None, [parsed])
    storable, dropped = screen(topic, parsed, payload)
    rows = None
    if isinstance(storable, TelemetryBatch):
        rows = [event_tuple(storable.device_id, ev, received_at, storable.historical)
                for ev in storable.events]
    return Prepared(topic, payload, storable, dropped, rows)


@dataclass
class _Applied:
    inserted: int = 0
    duplicates: int = 0
    statuses: int = 0
    states: int = 0


def apply_messages(store: Store, messages: Sequence[tuple[str, bytes]], root: str,
                   stats: IngestStats | None = None) -> IngestStats:
    """Apply a group of (topic, payload) as the ingest's writer does, each decoded by
    ``prepare``: its statuses, states and telemetry, each kind in one transaction;
    rejections counted by reason and recorded together in one more.

    Within a kind, messages are applied in arrival order (the store folds several
    for one device as one by one would); the kinds touch different columns, so
    their order between each other does not matter.

    A group whose commit fails on the data is applied again message by message, so
    one poison message never takes the others down; a message that fails on its own
    is applied event by event, and what still fails is dead-lettered (raw payload,
    topic, device, reason) — the message then counts as applied and is acknowledged.
    """
    stats = stats if stats is not None else IngestStats()
    rejections: list[tuple[str, str]] = []
    kept: list[Prepared] = []
    first_detail = ""
    now = time.time()
    for m in (prepare(topic, payload, root, now) for topic, payload in messages):
        stats.received += 1
        for r in m.rejections:
            stats.rejected[r.reason] = stats.rejected.get(r.reason, 0) + 1
            rejections.append((m.topic, r.reason))
            first_detail = first_detail or r.detail
            log.debug("rejected (%s) %s", r.reason, r.detail[:300])
        if m.parsed is not None:
            kept.append(m)
    if rejections:
        # One line and one transaction for the group, not one per message: a flood of
        # garbage must not cost more than the good messages it is mixed with.
        log.warning("rejected %d (%s); the first: %s", len(rejections),
                    ", ".join(sorted({r for _, r in rejections})), first_detail[:300])
        store.record_rejections(rejections)
    try:
        applied = _apply(store, kept)
    except _DATA_ERRORS as exc:
        log.warning("committing %d messages failed on their data (%s); applying them one "
                    "by one", len(kept), _why(exc))
        applied = _Applied()
        for one in kept:
            _add(applied, _apply_alone(store, one, root, stats))
    stats.events_inserted += applied.inserted
    stats.duplicates += applied.duplicates
    stats.statuses += applied.statuses
    stats.states += applied.states
    stats.commits += 1
    return stats


def _apply(store: Store, kept: Sequence[Prepared]) -> _Applied:
    statuses = [k.parsed for k in kept if isinstance(k.parsed, StatusPayload)]
    states = [k.parsed for k in kept if isinstance(k.parsed, DeviceStatePayload)]
    batches = [k for k in kept if isinstance(k.parsed, TelemetryBatch)]
    out = _Applied(statuses=len(statuses), states=len(states))
    if statuses:
        store.apply_statuses(statuses)
    if states:
        store.apply_states(states)
    if batches:
        result = store.ingest_rows([row for k in batches for row in k.rows or ()],
                                   time.time())
        out.inserted, out.duplicates = result.inserted, result.duplicates
    return out


def _add(total: _Applied, part: _Applied) -> None:
    total.inserted += part.inserted
    total.duplicates += part.duplicates
    total.statuses += part.statuses
    total.states += part.states


def _apply_alone(store: Store, one: Prepared, root: str, stats: IngestStats) -> _Applied:
    """One message on its own; if that fails on the data, a batch event by event, and
    the events (or the status or state) that still fail to the dead letters."""
    try:
        return _apply(store, [one])
    except _DATA_ERRORS as exc:
        if not isinstance(one.parsed, TelemetryBatch):
            _dead_letter(store, one.topic, root, one.payload, exc, stats)
            return _Applied()
    batch = one.parsed
    assert isinstance(batch, TelemetryBatch)  # the others returned above
    raw = _raw_events(one.payload)
    out = _Applied()
    for ev in batch.events:
        try:
            result = store.ingest_batch(batch.model_copy(update={"events": [ev]}))
        except _DATA_ERRORS as exc:
            text = raw.get((ev.boot_epoch, ev.seq)) or ev.model_dump_json()
            _dead_letter(store, one.topic, root, text.encode(), exc, stats)
            continue
        out.inserted += result.inserted
        out.duplicates += result.duplicates
    return out


def _raw_events(payload: bytes) -> dict[tuple[int, int], str]:
    """Each event of a batch as the device sent it (NaN and all), by its triple's tail."""
    try:
        doc = json.loads(payload)
        return {(e["boot_epoch"], e["seq"]): json.dumps(e) for e in doc["events"]}
    except (ValueError, TypeError, KeyError, RecursionError):
        return {}


def _why(exc: BaseException) -> str:
    """``IntegrityError (CheckViolation): the engine's first line``."""
    orig = getattr(exc, "orig", None) or exc
    name = type(exc).__name__
    if type(orig).__name__ != name:
        name += f" ({type(orig).__name__})"
    lines = str(orig).splitlines()
    return f"{name}: {lines[0] if lines else ''}"


def _dead_letter(store: Store, topic: str, root: str, payload: bytes, exc: BaseException,
                 stats: IngestStats) -> None:
    reason = _why(exc)
    log.error("dead-lettered a message on %s: %s", topic, reason)
    device = parse_device_topic(topic, root)[0]  # parsed once already: it is a device's
    store.dead_letter(topic, device, reason, payload.decode("utf-8", "replace"))
    stats.dead_lettered += 1
