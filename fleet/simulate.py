"""A device-fleet simulator that speaks the real wire protocol.

Hundreds of simulated devices announce themselves (retained birth with their
labels), report their update state, answer desired-state messages by walking
the updater's states, and publish request telemetry whose quality and latency
depend on the variant they run. The fleet cannot tell them from agents: it
sees the same topics and payloads.

Quality per variant comes from a profile — by default the figures of a real
golden-set evaluation (``--profile eval.json`` from ``quantfleet eval
--json``), else built-in defaults — plus optional faults: a variant that
fails JSON more often, devices that fail their update, devices that go
offline when they are asked to update.

One MQTT connection carries every simulated device (so no per-device Will);
the fleet's ingest and desired-state paths are exercised exactly as with real
devices.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from quantfleet.agent.telemetry.config import MqttConfig, parse_broker_url
from quantfleet.agent.telemetry.publisher import make_client
from quantfleet.agent.wire import (
    DesiredPayload,
    DeviceStatePayload,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    UpdateState,
    ValidationOutcome,
    device_topic,
)

log = logging.getLogger(__name__)

# Failure rate of structured output and relative latency, by precision label.
# Shaped after the starter golden set on the default ladder (docs/eval.md).
DEFAULT_PROFILE: dict[str, dict[str, float]] = {
    "F16": {"json_failure": 0.02, "latency": 1.6},
    "Q8_0": {"json_failure": 0.02, "latency": 1.0},
    "Q6_K": {"json_failure": 0.025, "latency": 0.95},
    "Q4_K_M": {"json_failure": 0.03, "latency": 0.8},
    "Q4_0": {"json_failure": 0.06, "latency": 0.75},
    "Q3_K_M": {"json_failure": 0.08, "latency": 0.8},
    "Q2_K": {"json_failure": 0.30, "latency": 0.8},
}


@dataclass
class SimDevice:
    device_id: str
    labels: dict[str, str]
    variant: str
    known_good: str
    seq: int = 0
    online: bool = True
    busy: bool = False
    last_revision: int = 0


@dataclass
class Faults:
    fail_update: float = 0.0  # share of devices whose update fails
    offline_on_update: float = 0.0  # share that go offline when asked to update
    extra_json_failure: dict[str, float] = field(default_factory=dict)  # by variant label


def load_profile(path: Path | None) -> dict[str, dict[str, float]]:
    """A profile from an evaluation JSON (per-variant pass rates), or the defaults."""
    if path is None:
        return dict(DEFAULT_PROFILE)
    doc = json.loads(Path(path).read_text())
    profile = dict(DEFAULT_PROFILE)
    for v in doc.get("variants", []):
        label = str(v.get("label") or v.get("name", "")).rsplit("-", 1)[-1]
        rate = v.get("format_failure_rate", v.get("json_failure_rate"))
        if label and isinstance(rate, (int, float)):
            profile.setdefault(label, {"latency": 1.0})
            profile[label] = {**profile[label], "json_failure": float(rate)}
    return profile


#: Messages published but not yet acknowledged by the broker, at most (see
#: ``FleetSimulator._wait_for_room``).
MAX_UNACKED = 10_000


class FleetSimulator:
    def __init__(self, mqtt_cfg: MqttConfig, n_devices: int, *, baseline: str,
                 labels: Callable[[int], dict[str, str]] | None = None,
                 requests_per_s: float = 2.0, step_s: float = 0.2, seed: int = 0,
                 profile: dict[str, dict[str, float]] | None = None,
                 faults: Faults | None = None, prefix: str = "sim") -> None:
        self.cfg = mqtt_cfg
        self.root = mqtt_cfg.topic_root
        self.rng = random.Random(seed)
        self.profile = profile or dict(DEFAULT_PROFILE)
        self.faults = faults or Faults()
        self.rate = requests_per_s
        self.step_s = step_s
        self.boot_epoch = int(time.time())
        make_labels = labels or (lambda i: {"hw": ("rpi5", "jetson", "x86")[i % 3],
                                            "region": ("eu", "us")[i % 2]})
        self.devices = {f"{prefix}-{i:04d}": SimDevice(f"{prefix}-{i:04d}", make_labels(i),
                                                       baseline, baseline)
                        for i in range(n_devices)}
        self.client = make_client(mqtt_cfg, f"qf-simulator-{seed}-{self.boot_epoch}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.published = 0  # handed to the client
        self.delivered = 0  # acknowledged by the broker (PUBACK)
        self.updates: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counting = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self._work: list[tuple[float, Callable[[], None]]] = []

    # -- lifecycle --------------------------------------------------------
    def start(self) -> FleetSimulator:
        _tls, host, port = parse_broker_url(self.cfg.broker)
        self.client.connect(host, port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        for d in self.devices.values():
            self._wait_for_room()
            self._birth(d)
            self._state(d, "healthy")
        self._thread.start()
        return self

    def stop(self, *, clear_retained: bool = True, drain_s: float = 60.0) -> None:
        """Stop the traffic, let the broker acknowledge what was published (up to
        ``drain_s``: a disconnect drops the client's queue), then disconnect."""
        self._stop.set()
        self._thread.join(10)
        deadline = time.monotonic() + drain_s
        if clear_retained:
            for d in self.devices.values():
                for leaf in ("status", "state", "desired"):
                    self._wait_for_room(deadline)
                    self._publish(device_topic(d.device_id, leaf, self.root), "", retain=True)
        while self.delivered < self.published and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.delivered < self.published:
            log.warning("simulator: %d messages not acknowledged when stopping",
                        self.published - self.delivered)
        self.client.disconnect()
        self.client.loop_stop()

    # -- MQTT -------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if rc.is_failure:
            log.error("simulator: connection refused: %s", rc)
            return
        client.subscribe(f"{self.root}/devices/+/desired", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        try:
            desired = DesiredPayload.model_validate_json(msg.payload)
        except ValidationError:
            log.warning("simulator: malformed desired state on %s", msg.topic)
            return
        with self._lock:
            d = self.devices.get(desired.device_id)
            if d is None or desired.revision <= d.last_revision:
                return
            d.last_revision = desired.revision
            self._schedule_update(d, desired)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any,
                    props: Any) -> None:
        with self._counting:
            self.delivered += 1
            if self.published - self.delivered < MAX_UNACKED:
                self._counting.notify_all()

    def _wait_for_room(self, deadline: float | None = None) -> None:
        """Hold the traffic while the broker has not acknowledged ``MAX_UNACKED`` messages.

        paho numbers unacknowledged messages with 16-bit ids and silently replaces
        one whose id comes round again: past 65,535 queued, messages were lost. Only
        the simulator's own threads wait here; paho's (answering desired state) never
        does, or it could not read the acknowledgements it waits for.
        """
        with self._counting:
            while self.published - self.delivered >= MAX_UNACKED:
                if deadline is None and self._stop.is_set():
                    return  # stopping: stop() waits for the acknowledgements
                if deadline is not None and time.monotonic() > deadline:
                    return
                self._counting.wait(0.1)

    def _publish(self, topic: str, payload: str, retain: bool = False) -> None:
        # Counted before publishing: the PUBACK can come back before publish() returns.
        with self._counting:  # paho's thread publishes too (answers to desired state)
            self.published += 1
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _birth(self, d: SimDevice) -> None:
        self._publish(device_topic(d.device_id, "status", self.root), StatusPayload(
            device_id=d.device_id, state="online", boot_epoch=self.boot_epoch,
            reason="birth", ts=time.time(), agent_version="simulator",
            labels=d.labels).model_dump_json(), retain=True)

    def _state(self, d: SimDevice, state: UpdateState, target: str | None = None,
               reason: str = "") -> None:
        self._publish(device_topic(d.device_id, "state", self.root), DeviceStatePayload(
            device_id=d.device_id, boot_epoch=self.boot_epoch, variant=d.variant,
            known_good=d.known_good, target=target, desired_revision=d.last_revision,
            update_state=state, reason=reason, ts=time.time()).model_dump_json(),
            retain=True)

    # -- behaviour --------------------------------------------------------
    def _schedule_update(self, d: SimDevice, desired: DesiredPayload) -> None:
        if desired.variant == d.variant:
            self._state(d, "healthy", reason="already serving it")
            return
        self.updates[desired.variant] = self.updates.get(desired.variant, 0) + 1
        if self.rng.random() < self.faults.offline_on_update:
            d.online = False
            self._publish(device_topic(d.device_id, "status", self.root), StatusPayload(
                device_id=d.device_id, state="offline", boot_epoch=self.boot_epoch,
                reason="will", ts=time.time()).model_dump_json(), retain=True)
            return
        fail = self.rng.random() < self.faults.fail_update
        now = time.monotonic()
        steps: list[UpdateState] = ["downloading", "verifying", "preflight", "activating",
                                    "soaking"]
        for i, st in enumerate(steps):
            self._work.append((now + i * self.step_s,
                               functools.partial(self._state, d, st, target=desired.variant)))
        if fail:
            self._work.append((now + 3 * self.step_s, lambda: self._state(
                d, "failed", target=desired.variant, reason="pre-flight failed (simulated)")))
            return

        def done() -> None:
            d.variant = desired.variant
            d.known_good = desired.variant
            self._state(d, "healthy")

        self._work.append((now + len(steps) * self.step_s, done))

    def _label(self, variant: str) -> str:
        return variant.rsplit("-", 1)[-1]

    def _traffic(self, dt: float) -> None:
        for d in self.devices.values():
            if not d.online:
                continue
            n = self._poisson(self.rate * dt)
            if not n:
                continue
            label = self._label(d.variant)
            prof = self.profile.get(label, {"json_failure": 0.05, "latency": 1.0})
            fail_p = prof.get("json_failure", 0.05) + self.faults.extra_json_failure.get(label, 0)
            events = []
            now = time.time()
            for _ in range(n):
                d.seq += 1
                ok = self.rng.random() >= fail_p
                body = RequestEvent(
                    request_id=f"{d.device_id}-{d.seq}", ts=now, variant=d.variant,
                    latency_s=self.rng.lognormvariate(-0.7, 0.3) * prof.get("latency", 1.0),
                    prompt_tokens=self.rng.randint(20, 200), completion_tokens=40,
                    validations=[ValidationOutcome(kind="json_schema", passed=ok,
                                                   detail="" if ok else "schema")],
                )
                events.append(TelemetryEvent(boot_epoch=self.boot_epoch, seq=d.seq,
                                             kind="request", ts=now, body=body))
            self._wait_for_room()
            self._publish(device_topic(d.device_id, "telemetry", self.root), TelemetryBatch(
                device_id=d.device_id, sent_at=now, events=events).model_dump_json())

    def _poisson(self, lam: float) -> int:
        # Knuth's method; lam is small per tick.
        limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._work if w[0] <= now]
                self._work = [w for w in self._work if w[0] > now]
                for _, fn in sorted(due, key=lambda w: w[0]):
                    fn()
                self._traffic(now - last)
            last = now

    def variants(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices.values():
            out[d.variant] = out.get(d.variant, 0) + 1
        return out
