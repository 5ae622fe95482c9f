"""Forward the outbox to the broker: QoS 1 batches, deleted only on a successful PUBACK.

One thread owns the MQTT session (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``);
paho's network thread only turns packets into callbacks, which are queued back
to it. The outbox is the backlog: paho never holds more than the in-flight
window, and every session is a fresh client, so nothing in paho's memory
outlives a connection — batches not acknowledged when a connection dies go
back to pending and are sent again (the consumer deduplicates).

Two lanes after a (re)connect: the *live* lane sends what was recorded in the
last ``live_window_s`` and everything new; the *backfill* lane drains the older
backlog oldest-first, rate-limited, with ``historical: true``.

A failing PUBACK reason code (>= 0x80; paho reports the message as published
anyway) keeps the rows: the publisher lets the window drain, backs off with
jitter, and sends them again — forever, counting each reason code. So does
0x10 *No matching subscribers*, a success code in MQTT 5 that says nobody took
the message: after a broker restart a device can be back before the fleet,
whose ``$share`` subscription Mosquitto does not restore from its persistent
session (plain ones it does) until the fleet subscribes again.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from quantfleet.agent.mqtt import (
    MqttConfig,
    connect_options,
    make_client,
    parse_broker_url,
    will_properties,
)
from quantfleet.agent.telemetry.config import PublisherConfig
from quantfleet.agent.telemetry.outbox import Outbox
from quantfleet.agent.wire import (
    WIRE_VERSION,
    HardwareFingerprint,
    StatusPayload,
    device_topic,
)

log = logging.getLogger(__name__)

#: MQTT 5 PUBACK 0x10: accepted, but no subscription matched — not delivered.
NO_MATCHING_SUBSCRIBERS = 0x10


def undelivered(rc: Any) -> bool:
    """Whether a PUBACK's reason code leaves the batch undelivered (rows kept)."""
    return bool(rc.is_failure) or rc.value == NO_MATCHING_SUBSCRIBERS


@dataclass
class _InFlight:
    token: int
    rows: int


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("quantfleet")
    except Exception:  # pragma: no cover - not installed
        return ""


class Publisher:
    """Drains an ``Outbox`` to ``…/devices/{device}/telemetry``; birth/Will on ``…/status``."""

    def __init__(self, outbox: Outbox, mqtt_cfg: MqttConfig, cfg: PublisherConfig, *,
                 labels: dict[str, str] | None = None,
                 hardware: HardwareFingerprint | None = None,
                 rng: random.Random | None = None) -> None:
        self.labels = dict(labels or {})
        self.hardware = hardware
        self.outbox = outbox
        self.mqtt_cfg = mqtt_cfg
        self.cfg = cfg
        self.device_id = outbox.device_id
        self.client_id = mqtt_cfg.client_id or f"qf-{self.device_id}"
        self.topic = device_topic(self.device_id, "telemetry", mqtt_cfg.topic_root)
        self.status_topic = device_topic(self.device_id, "status", mqtt_cfg.topic_root)
        self._tls, self._host, self._port = parse_broker_url(mqtt_cfg.broker)
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self._stop_deadline = 0.0
        self._acks = 0
        self._wake_every = 1
        self.stopped_cleanly = False
        # figures
        self.published_batches = 0
        self.published_events = 0
        self.failed_pubacks: Counter[int] = Counter()
        self.connects = 0
        self.births = 0
        outbox.add_listener(self._kick.set)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> Publisher:
        self._thread = threading.Thread(target=self._run, name="telemetry-publisher",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) for the window to drain, publish offline, disconnect."""
        self._stop_deadline = time.monotonic() + timeout
        self._stopping.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout + 5)

    def stats(self) -> dict[str, Any]:
        return {"published_batches": self.published_batches,
                "published_events": self.published_events,
                "failed_pubacks": {f"0x{k:02x}": v for k, v in sorted(self.failed_pubacks.items())},
                "connects": self.connects, "connected": self.connected.is_set()}

    def _run(self) -> None:
        delay = self.cfg.backoff_initial_s
        while not self._stopping.is_set():
            try:
                was_up = self._session()
            except Exception as exc:
                was_up = False
                log.warning("telemetry session to %s:%d failed: %s", self._host, self._port, exc)
            if self._stopping.is_set():
                break
            if was_up:
                delay = self.cfg.backoff_initial_s
            # Equal jitter: a fleet that lost the same broker does not come back in step.
            self._stopping.wait(delay / 2 + self._rng.uniform(0, delay / 2))
            delay = min(delay * 2, self.cfg.backoff_max_s)

    # -- one connection -----------------------------------------------------

    def _status(self, state: str, reason: str) -> bytes:
        status = StatusPayload.model_validate({
            "device_id": self.device_id, "state": state, "boot_epoch": self.outbox.boot_epoch,
            "reason": reason, "ts": time.time(), "agent_version": _version(),
            "labels": self.labels if reason == "birth" else {},
            "hardware": self.hardware if reason == "birth" else None,
        })
        return bytes(status.model_dump_json(), "utf-8")

    def _session(self) -> bool:
        v5 = self.mqtt_cfg.protocol == "5"
        events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        client = make_client(self.mqtt_cfg, self.client_id)
        window = self.cfg.max_inflight
        # paho holds at most two windows: one in flight, one queued right behind it
        # so its network thread can send the next batch the moment a PUBACK frees a
        # slot. The rest of the backlog stays in the outbox.
        client.max_inflight_messages_set(window)
        client.max_queued_messages_set(2 * window + 8)
        client.will_set(self.status_topic, self._status("offline", "will"), qos=1, retain=True,
                        properties=will_properties(self.mqtt_cfg, self.cfg.will_delay_s))

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            events.put(("connect", rc, props))
            self._kick.set()

        def on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            events.put(("disconnect", rc))
            self._kick.set()

        def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
            events.put(("puback", mid, rc))
            # Wake the pump once per few acks, not per ack: paho has a queued window
            # to send meanwhile, and fewer thread switches leave it the CPU.
            self._acks += 1
            if self._acks >= self._wake_every or undelivered(rc):
                self._kick.set()

        def on_message(c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
            events.put(("message", msg.payload))
            self._kick.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_message = on_message
        # A Will Delay only matters if the session outlives the connection that long.
        client.connect(self._host, self._port, **connect_options(
            self.mqtt_cfg, session_expiry_s=self.cfg.will_delay_s))
        client.loop_start()
        inflight: dict[int, _InFlight] = {}
        try:
            deadline = time.monotonic() + self.cfg.connect_timeout_s
            while True:
                try:
                    event = events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError("no CONNACK") from None
                if event[0] == "connect":
                    break
                if event[0] == "disconnect":
                    raise ConnectionError(f"disconnected before CONNACK ({event[1]})")
            _, rc, props = event
            if rc.is_failure:
                # Refused: do nothing else on this connection (no birth, no publish).
                log.error("broker %s:%d refused the connection: %s", self._host, self._port, rc)
                return False
            handed = 2 * window
            if v5 and props is not None and getattr(props, "ReceiveMaximum", None):
                receive_max = int(props.ReceiveMaximum)
                if receive_max < window:
                    # paho cannot lower its window once connected: hand it no more
                    # than the broker takes (no queued second window).
                    log.warning("broker Receive Maximum %d < max_inflight %d; using %d",
                                receive_max, window, receive_max)
                    handed = receive_max
            self.connects += 1
            self.connected.set()
            client.publish(self.status_topic, self._status("online", "birth"), qos=1, retain=True)
            self.births += 1
            client.subscribe(self.status_topic, qos=1)
            log.info("telemetry connected to %s:%d (epoch %d)", self._host, self._port,
                     self.outbox.boot_epoch)
            self._wake_every = max(1, handed // 8)
            self._pump(client, events, inflight, handed)
            return True
        finally:
            self.connected.clear()
            for f in inflight.values():
                self.outbox.release(f.token)
            client.loop_stop()
            with contextlib.suppress(Exception):  # already gone
                client.disconnect()

    def _pump(self, client: mqtt.Client, events: queue.SimpleQueue[tuple[Any, ...]],
              inflight: dict[int, _InFlight], handed: int) -> None:
        """Keep the window full until the connection drops or a clean stop completes."""
        # Acknowledged deletes from the last session must be committed before the
        # cursors restart, or their rows would be read again.
        self.outbox.flush()
        self._lanes = _Lanes(self.outbox, self.cfg)
        try:
            self._pump_lanes(client, events, inflight, handed)
        finally:
            self._lanes.close()

    def _pump_lanes(self, client: mqtt.Client, events: queue.SimpleQueue[tuple[Any, ...]],
                    inflight: dict[int, _InFlight], handed: int) -> None:
        lanes = self._lanes
        retry_delay = self.cfg.backoff_initial_s
        retry_at = 0.0
        failing = False
        while True:
            self._kick.clear()
            self._acks = 0
            while True:
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    break
                kind = event[0]
                if kind == "disconnect":
                    log.warning("telemetry disconnected: %s", event[1])
                    return
                if kind == "puback":
                    f = inflight.pop(event[1], None)
                    if f is None:
                        continue  # birth/offline status
                    rc = event[2]
                    if undelivered(rc):
                        self.failed_pubacks[rc.value] += 1
                        log.warning("PUBACK 0x%02x (%s) for %d events: kept, will retry",
                                    rc.value, rc, f.rows)
                        self.outbox.release(f.token)
                        failing = True
                    else:
                        self.outbox.ack(f.token)
                        retry_delay = self.cfg.backoff_initial_s
                        self.published_batches += 1
                        self.published_events += f.rows
                elif kind == "message":
                    self._maybe_rebirth(client, event[1])
            now = time.monotonic()
            if failing and not inflight:
                # The window drained after a failure: restart the lanes after a jittered wait.
                failing = False
                retry_at = now + retry_delay / 2 + self._rng.uniform(0, retry_delay / 2)
                retry_delay = min(retry_delay * 2, self.cfg.backoff_max_s)
                lanes.close()
                self.outbox.flush()
                lanes = self._lanes = _Lanes(self.outbox, self.cfg)
            if self._stopping.is_set() and not failing:
                if not inflight or time.monotonic() > self._stop_deadline:
                    info = client.publish(self.status_topic, self._status("offline", "shutdown"),
                                          qos=1, retain=True)
                    info.wait_for_publish(timeout=max(0.5, self._stop_deadline - now))
                    client.disconnect()
                    self.stopped_cleanly = True
                    self.outbox.flush()
                    return
            elif not failing and now >= retry_at:
                while len(inflight) < handed:
                    batch = lanes.next()
                    if batch is None:
                        break
                    payload, first, _last, rows, token = batch
                    # No per-message properties: the payload describes itself, and paho
                    # packs properties in Python at a cost above the rest of the batch.
                    info = client.publish(self.topic, payload, qos=1)
                    if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                        self.outbox.release(token)
                        lanes.rewind(first)
                        break
                    inflight[info.mid] = _InFlight(token, rows)
            wait = 0.5 if not inflight else 0.002
            if retry_at > now:
                wait = min(wait, retry_at - now)
            elif lanes.throttled():
                wait = min(wait, 1.0 / self.cfg.backfill_batches_per_s)
            self._kick.wait(max(0.001, wait))

    def _maybe_rebirth(self, client: mqtt.Client, payload: bytes) -> None:
        """A late Will of an older start replaced our retained birth: publish the birth again."""
        try:
            status = StatusPayload.model_validate_json(payload)
        except ValueError:
            return
        if status.state == "offline" and status.boot_epoch < self.outbox.boot_epoch:
            log.info("stale Will (epoch %d) on %s; re-publishing birth",
                     status.boot_epoch, self.status_topic)
            client.publish(self.status_topic, self._status("online", "birth"), qos=1, retain=True)
            self.births += 1


class _Lanes:
    """The live lane (recent and new events) and the rate-limited backfill lane.

    Each batch is one query (SQLite joins the items). The span about to be read
    is claimed first, so eviction never takes rows from under a batch.
    """

    def __init__(self, outbox: Outbox, cfg: PublisherConfig) -> None:
        self.outbox = outbox
        self.cfg = cfg
        start = outbox.seq_at(time.time() - cfg.live_window_s)
        committed = outbox.committed_seq
        # Everything from `mark` on is live; below it is backlog.
        self.mark = start if start is not None else committed + 1
        self.live_cursor = self.mark - 1
        self.backfill_cursor = 0
        self.backfill_done = self.mark <= 1
        self.tokens = 1.0
        self.refilled = time.monotonic()
        self.prefix_live = self._prefix(False)
        self.prefix_hist = self._prefix(True)
        self.budget = int(cfg.batch_max_bytes) - sum(map(len, self.prefix_hist)) - 32

    def _prefix(self, historical: bool) -> tuple[bytes, bytes]:
        head = (f'{{"schema_version":{WIRE_VERSION},"type":"batch",'
                f'"device_id":"{self.outbox.device_id}","sent_at":')
        tail = f',"historical":{"true" if historical else "false"},"events":['
        return head.encode(), tail.encode()

    def close(self) -> None:
        """Nothing is held between batches (kept for symmetry with the session's end)."""

    def rewind(self, first: int) -> None:
        """Send again from ``first`` (a batch paho could not take)."""
        if first >= self.mark:
            self.live_cursor = min(self.live_cursor, first - 1)
        else:
            self.backfill_cursor = min(self.backfill_cursor, first - 1)
            self.backfill_done = False

    def throttled(self) -> bool:
        """Backlog is waiting only for the rate limit."""
        return not self.backfill_done and self.cfg.backfill_batches_per_s > 0 and self.tokens < 1

    def _read(self, after: int, before: int | None) -> tuple[int, int, int, bytes, int] | None:
        hold = self.outbox.claim(after + 1, (before or 1 << 62) - 1)
        try:
            got = self.outbox.read_joined(after, before, self.budget)
            if got is None:
                return None
            return (*got, self.outbox.claim(got[0], got[1]))
        finally:
            self.outbox.release(hold)

    def next(self) -> tuple[bytes, int, int, int, int] | None:
        """The next batch: (payload, first seq, last seq, events, claim), or None for now."""
        got = None
        historical = False
        if self.outbox.committed_seq > self.live_cursor:
            got = self._read(self.live_cursor, None)
            if got is not None:
                self.live_cursor = got[1]
        if got is None and not self.backfill_done and self._may_backfill():
            got = self._read(self.backfill_cursor, self.mark)
            if got is None:
                self.backfill_done = True
                return None
            self.backfill_cursor = got[1]
            historical = True
            if self.cfg.backfill_batches_per_s > 0:
                self.tokens -= 1
        if got is None:
            return None
        first, last, n, items, token = got
        head, tail = self.prefix_hist if historical else self.prefix_live
        body = b"".join((head, repr(time.time()).encode(), tail, items, b"]}"))
        return body, first, last, n, token

    def _may_backfill(self) -> bool:
        rate = self.cfg.backfill_batches_per_s
        if rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(max(1.0, rate), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        return self.tokens >= 1.0
