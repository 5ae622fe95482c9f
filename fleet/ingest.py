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
messages): the group's statuses in one transaction, its states in one, its
telemetry in one, and only then acknowledges them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from quantfleet.agent.mqtt import MqttConfig, connect_options, make_client
from quantfleet.agent.wire import DeviceStatePayload, StatusPayload, TelemetryBatch

from .messages import Cleared, Rejected, parse_message
from .store import Store

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    received: int = 0
    events_inserted: int = 0
    duplicates: int = 0
    statuses: int = 0
    states: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    commits: int = 0


class FleetIngest:
    def __init__(self, store: Store, mqtt_cfg: MqttConfig, *, share_group: str = "quantfleet",
                 client_id: str = "quantfleet-fleet", session_expiry_s: int = 7 * 86400,
                 max_group: int = 64) -> None:
        self.store = store
        self.cfg = mqtt_cfg
        self.root = mqtt_cfg.topic_root
        self.share_group = share_group
        self.max_group = max_group
        self.stats = IngestStats()
        self.connected = threading.Event()
        self._queue: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(maxsize=10_000)
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="fleet-ingest",
                                        daemon=True)
        self.client = make_client(mqtt_cfg, client_id)
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
            for msg in group:
                if msg.qos > 0:
                    self.client.ack(msg.mid, msg.qos)
        log.info("fleet ingest: writer stopped")

    def _commit(self, group: list[mqtt.MQTTMessage]) -> None:
        apply_messages(self.store, [(m.topic, bytes(m.payload)) for m in group], self.root,
                       self.stats)


def apply_messages(store: Store, messages: Sequence[tuple[str, bytes]], root: str,
                   stats: IngestStats | None = None) -> IngestStats:
    """Apply a group of (topic, payload) as the ingest's writer does: its statuses,
    states and telemetry, each kind in one transaction; rejections counted by reason.

    Within a kind, messages are applied in arrival order (the store folds several
    for one device as one by one would); the kinds touch different columns, so
    their order between each other does not matter.
    """
    stats = stats if stats is not None else IngestStats()
    batches: list[TelemetryBatch] = []
    statuses: list[StatusPayload] = []
    states: list[DeviceStatePayload] = []
    for topic, payload in messages:
        stats.received += 1
        parsed = parse_message(topic, payload, root)
        if isinstance(parsed, Rejected):
            stats.rejected[parsed.reason] = stats.rejected.get(parsed.reason, 0) + 1
            log.warning("rejected %s", parsed.detail[:300])
            store.record_rejection(topic, parsed.reason)
        elif isinstance(parsed, Cleared):
            continue
        elif isinstance(parsed, TelemetryBatch):
            batches.append(parsed)
        elif isinstance(parsed, StatusPayload):
            statuses.append(parsed)
        elif isinstance(parsed, DeviceStatePayload):
            states.append(parsed)
    if statuses:
        store.apply_statuses(statuses)
        stats.statuses += len(statuses)
    if states:
        store.apply_states(states)
        stats.states += len(states)
    if batches:
        result = store.ingest_batches(batches)
        stats.events_inserted += result.inserted
        stats.duplicates += result.duplicates
    stats.commits += 1
    return stats
