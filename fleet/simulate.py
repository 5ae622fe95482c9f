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

Devices can be given hardware classes (``classes``, ``--classes
x86-avx512-vnni=0.6,x86-avx2=0.3,arm-dotprod=0.1``): each then sends a
realistic ``HardwareFingerprint`` of its class in its birth, and the fleet
derives its ``cpu.*`` labels as from a real agent. A per-class regression
(``ClassRegression``, ``--class-regression Q4_K_M@x86-avx2:json+0.3,latency*2``)
makes a variant worse on one class only — what int8 without VNNI does.

One MQTT connection carries every simulated device (so no per-device Will);
the fleet's ingest and desired-state paths are exercised exactly as with real
devices.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from quantfleet.agent.mqtt import MqttConfig, connect_options, make_client
from quantfleet.agent.wire import (
    CPU_CLASSES,
    DesiredPayload,
    DeviceStatePayload,
    HardwareFingerprint,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    UpdateState,
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


#: The class of a simulated device that reports no hardware (an agent from before
#: the fingerprint); the fleet calls it "(unknown)".
NO_HARDWARE = "unknown"


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
    hardware: HardwareFingerprint | None = None
    cpu_class: str = NO_HARDWARE


class SimulateOptionError(ValueError):
    """A simulator option that does not parse; the message says what is wrong."""


@dataclass(frozen=True)
class ClassRegression:
    """A variant that is worse on one hardware class only (int8 without VNNI)."""

    variant: str  # a precision label (Q4_K_M) or a full variant name
    cpu_class: str  # a cpu.class, or NO_HARDWARE for devices that report none
    json_failure: float = 0.0  # added to the failure probability (0.3 = +30 points)
    latency: float = 1.0  # latency multiplied by it

    def matches(self, variant: str) -> bool:
        """The variant by its full name, or by its precision label (the name's end)."""
        return variant == self.variant or variant.endswith(f"-{self.variant}")


@dataclass
class Faults:
    fail_update: float = 0.0  # share of devices whose update fails
    offline_on_update: float = 0.0  # share that go offline when asked to update
    extra_json_failure: dict[str, float] = field(default_factory=dict)  # by variant label
    class_regressions: list[ClassRegression] = field(default_factory=list)


# -- hardware classes --------------------------------------------------------
#: A real machine of each class: (arch, CPU model, vendor, features as the agent
#: reports them, logical cores, GiB of memory). ``cpu_class`` of the features is
#: the class (tested).
_X86_BASE = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")
_AVX512 = ("avx512f", "avx512bw", "avx512vl")
MACHINES: dict[str, tuple[str, str, str, tuple[str, ...], int, int]] = {
    "x86-amx": ("x86_64", "Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel",
                (*_X86_BASE, *_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16",
                 "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"), 8, 32),
    "x86-avx512-vnni": ("x86_64", "Intel(R) Xeon(R) Gold 6348 CPU @ 2.60GHz", "GenuineIntel",
                        (*_X86_BASE, *_AVX512, "avx512vbmi", "avx512_vnni"), 4, 16),
    "x86-avx512": ("x86_64", "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", "GenuineIntel",
                   (*_X86_BASE, *_AVX512), 4, 16),
    "x86-avx2-vnni": ("x86_64", "12th Gen Intel(R) Core(TM) i5-1235U", "GenuineIntel",
                      (*_X86_BASE, "avx_vnni"), 12, 16),
    "x86-avx2": ("x86_64", "AMD EPYC 7B13", "AuthenticAMD", _X86_BASE, 2, 8),
    "x86-sse": ("x86_64", "Intel(R) Atom(TM) CPU C2758 @ 2.40GHz", "GenuineIntel",
                ("sse4_2",), 8, 8),
    "arm-i8mm": ("aarch64", "Neoverse-V1", "0x41",
                 ("asimd", "bf16", "dotprod", "fp16", "i8mm", "sve"), 4, 8),
    "arm-dotprod": ("aarch64", "Cortex-A76", "0x41", ("asimd", "dotprod", "fp16"), 4, 8),
    "arm-neon": ("aarch64", "Cortex-A72", "0x41", ("asimd",), 4, 4),
}
_LLAMA_FLAGS = {"sse4_2": "SSE3", "avx": "AVX", "avx2": "AVX2", "f16c": "F16C", "fma": "FMA",
                "bmi2": "BMI2", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI",
                "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
                "avx_vnni": "AVX_VNNI", "amx_int8": "AMX_INT8", "asimd": "NEON",
                "dotprod": "DOTPROD", "i8mm": "MATMUL_INT8", "fp16": "FP16_VA", "sve": "SVE"}


def fingerprint(cpu_class: str) -> HardwareFingerprint:
    """What an agent on a machine of ``cpu_class`` reports in its birth."""
    try:
        arch, model, vendor, features, cores, gib = MACHINES[cpu_class]
    except KeyError:
        raise SimulateOptionError(f"no simulated machine of class {cpu_class!r} "
                                  f"(known: {', '.join(MACHINES)})") from None
    info = "CPU : " + " | ".join(f"{_LLAMA_FLAGS[f]} = 1" for f in features
                                 if f in _LLAMA_FLAGS) + " | REPACK = 1 | "
    return HardwareFingerprint(
        arch=arch, cpu_model=model, cpu_vendor=vendor, features=sorted(features),
        cpu_class=cpu_class, logical_cores=cores, physical_cores=cores,
        memory_bytes=gib * 2**30, llama_cpp_system_info=info, llama_cpp_python="0.3.36",
        onnxruntime="1.22.0", kernel="6.1.0-simulated")


_KNOWN_CLASSES = (*CPU_CLASSES, NO_HARDWARE)


def _known_class(name: str, where: str) -> str:
    if name not in _KNOWN_CLASSES:
        raise SimulateOptionError(f"{where}: unknown hardware class {name!r} (known: "
                                  f"{', '.join(_KNOWN_CLASSES)})")
    return name


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SimulateOptionError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SimulateOptionError(f"{where}: {text!r} is not a finite number")
    return value


def parse_class_mix(text: str) -> dict[str, float]:
    """``x86-avx512-vnni=0.6,x86-avx2=0.3,arm-dotprod=0.1``: each class's share of the
    devices (shares in (0, 1], adding up to 1; ``unknown`` is devices without hardware)."""
    if not text.strip():
        raise SimulateOptionError("classes: empty (e.g. x86-avx2=0.5,arm-dotprod=0.5)")
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, share_text = (x.strip() for x in part.partition("="))
        if not sep or not name:
            raise SimulateOptionError(f"classes: {part.strip()!r} is not CLASS=SHARE "
                                      "(e.g. x86-avx2=0.3)")
        _known_class(name, "classes")
        if name in mix:
            raise SimulateOptionError(f"classes: {name!r} is listed twice")
        share = _number(share_text, f"classes: share of {name}")
        if not 0 < share <= 1:
            raise SimulateOptionError(f"classes: share of {name} must be in (0, 1], "
                                      f"got {share_text}")
        mix[name] = share
    total = sum(mix.values())
    if abs(total - 1) > 1e-6:
        raise SimulateOptionError(f"classes: the shares add up to {total:g}; they must "
                                  "add up to 1")
    return mix


_REGRESSION = re.compile(r"^(?P<variant>[A-Za-z0-9][A-Za-z0-9._-]{0,127})@(?P<cls>[a-z0-9-]+)"
                         r":(?P<effects>.+)$")


def parse_class_regression(text: str) -> ClassRegression:
    """``VARIANT@CLASS:EFFECT[,EFFECT]`` with effects ``json+P`` (the validation-failure
    probability raised by P in (0, 1]: 0.3 is +30 points) and ``latency*K`` (K in
    (0, 100]), e.g. ``Q4_K_M@x86-avx2:json+0.3,latency*2``."""
    m = _REGRESSION.match(text.strip())
    if m is None:
        raise SimulateOptionError(f"class regression {text!r} is not VARIANT@CLASS:EFFECTS "
                                  "(e.g. Q4_K_M@x86-avx2:json+0.3,latency*2)")
    where = f"class regression {text.strip()!r}"
    cls = _known_class(m["cls"], where)
    json_failure, latency = 0.0, 1.0
    seen: set[str] = set()
    for effect in m["effects"].split(","):
        e = effect.strip()
        kind = "json" if e.startswith("json+") else "latency" if e.startswith("latency*") \
            else None
        if kind is None:
            raise SimulateOptionError(f"{where}: effect {e!r} is neither json+P nor "
                                      "latency*K")
        if kind in seen:
            raise SimulateOptionError(f"{where}: {kind} is given twice")
        seen.add(kind)
        value = _number(e.split("+" if kind == "json" else "*", 1)[1], f"{where}: {kind}")
        if kind == "json":
            if not 0 < value <= 1:
                raise SimulateOptionError(f"{where}: json+P needs P in (0, 1] (a "
                                          f"probability: 0.3 is +30 points), got {value:g}")
            json_failure = value
        else:
            if not 0 < value <= 100:
                raise SimulateOptionError(f"{where}: latency*K needs K in (0, 100], got "
                                          f"{value:g}")
            latency = value
    return ClassRegression(m["variant"], cls, json_failure, latency)


def spread_classes(n: int, mix: Mapping[str, float], seed: int = 0) -> list[str]:
    """The class of each of ``n`` devices: each class's share of ``n`` rounded so the
    counts add up to ``n`` (largest remainders), in a seeded random order — not a
    pattern that labels derived from the device's index could line up with."""
    exact = {k: share * n for k, share in mix.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(mix, key=lambda k: (counts[k] - exact[k], list(mix).index(k)))
    for k in by_remainder[:n - sum(counts.values())]:
        counts[k] += 1
    out = [k for k in mix for _ in range(counts[k])]
    random.Random(seed).shuffle(out)
    return out


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


#: The simulator's clock: traffic and scheduled state changes advance this often.
TICK_S = 0.1

#: Messages published but not yet acknowledged by the broker, at most (see
#: ``FleetSimulator._wait_for_room``).
MAX_UNACKED = 10_000


class _SimClient(mqtt.Client):
    """paho's client with a lean path for the PUBACKs a simulated fleet gets back: a
    bare acknowledgement (two bytes, the packet id: success without properties) is
    what Mosquitto sends for nearly all, and paho built a ReasonCode and an MQTT 5
    Properties object for each — a quarter of the simulator's time at 10,000
    devices, time the fleet's ingest then lacked on the same cores. Anything else
    goes through paho's own code (tests/fleet/test_simulate.py)."""

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_OK, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


_PUBACK_OK = ReasonCode(PacketTypes.PUBACK, "Success")
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class SimRequest:
    """One simulated request: what varies between a device's request events."""

    seq: int
    latency_s: float
    prompt_tokens: int
    ok: bool  # its JSON validated


#: What pydantic writes for a request event and a batch, as dicts: a simulated batch
#: is these with its values put in, written by orjson — the JSON the agent sends, at a
#: fifth of the cost of building and dumping the models (tests/fleet/test_simulate.py
#: holds the two equal).
_REQUEST = RequestEvent(request_id="", ts=0.0, variant="").model_dump(mode="json")
_BATCH = TelemetryBatch(device_id="x", sent_at=0.0, events=[TelemetryEvent(
    boot_epoch=0, seq=1, kind="request", ts=0.0, body=RequestEvent(
        request_id="", ts=0.0, variant=""))]).model_dump(mode="json")


def render_batch(device_id: str, variant: str, boot_epoch: int, now: float,
                 requests: list[SimRequest]) -> bytes:
    """The telemetry batch a device sends for ``requests``, as JSON."""
    events = []
    for r in requests:
        body = dict(_REQUEST)
        body.update(request_id=f"{device_id}-{r.seq}", ts=now, variant=variant,
                    latency_s=r.latency_s, prompt_tokens=r.prompt_tokens,
                    completion_tokens=40, validations=[
                        {"kind": "json_schema", "passed": r.ok,
                         "detail": "" if r.ok else "schema"}])
        events.append({"boot_epoch": boot_epoch, "seq": r.seq, "kind": "request", "ts": now,
                       "body": body})
    batch = dict(_BATCH)
    batch.update(device_id=device_id, sent_at=now, events=events)
    return orjson.dumps(batch)


class FleetSimulator:
    def __init__(self, mqtt_cfg: MqttConfig, n_devices: int, *, baseline: str,
                 labels: Callable[[int], dict[str, str]] | None = None,
                 requests_per_s: float = 2.0, step_s: float = 0.2, seed: int = 0,
                 profile: dict[str, dict[str, float]] | None = None,
                 faults: Faults | None = None, prefix: str = "sim",
                 classes: Mapping[str, float] | None = None,
                 flush_s: float = TICK_S) -> None:
        """``flush_s``: how often each device publishes what it served since its last
        batch. The agent sends a batch per outbox commit (``[telemetry.outbox]
        commit_interval_s``, 1 s by default); the default here, one tick, gives the
        rollout tests the smoothest traffic. Devices are spread evenly over the
        interval, so the broker sees a steady stream, as from a real fleet."""
        if not TICK_S <= flush_s <= 60:
            raise SimulateOptionError(f"flush interval {flush_s} s: it is from {TICK_S} to 60 s")
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
        if classes:
            machines = {c: fingerprint(c) for c in classes if c != NO_HARDWARE}
            # A generator of its own: the traffic's stays what it was without classes.
            for d, cls in zip(self.devices.values(),
                              spread_classes(n_devices, classes, seed), strict=True):
                d.cpu_class, d.hardware = cls, machines.get(cls)
        self._regressions: dict[str, list[ClassRegression]] = {}
        present = {d.cpu_class for d in self.devices.values()}
        for r in self.faults.class_regressions:
            if r.cpu_class not in present:
                raise SimulateOptionError(
                    f"class regression of {r.variant} on {r.cpu_class}: no simulated device "
                    f"is of that class (classes: {', '.join(sorted(present))})")
            self._regressions.setdefault(r.cpu_class, []).append(r)
        self.client = make_client(mqtt_cfg, f"qf-simulator-{seed}-{self.boot_epoch}",
                                  _SimClient)
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
        # Device i publishes on tick i % buckets (when its bucket last published: its dt).
        self._buckets = max(1, round(flush_s / TICK_S))
        self._t0 = time.monotonic()
        self._flushed = [self._t0] * self._buckets
        self._tick = 0

    # -- lifecycle --------------------------------------------------------
    def start(self) -> FleetSimulator:
        self.client.connect(*self.cfg.address(), **connect_options(self.cfg))
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

    def _publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        # Counted before publishing: the PUBACK can come back before publish() returns.
        with self._counting:  # paho's thread publishes too (answers to desired state)
            self.published += 1
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _birth(self, d: SimDevice) -> None:
        self._publish(device_topic(d.device_id, "status", self.root), StatusPayload(
            device_id=d.device_id, state="online", boot_epoch=self.boot_epoch,
            reason="birth", ts=time.time(), agent_version="simulator",
            labels=d.labels, hardware=d.hardware).model_dump_json(), retain=True)

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

    def _traffic(self, now_mono: float) -> None:
        """Every bucket whose turn has come by the clock (several, when a tick ran
        late): each device publishes once per ``flush_s``, however slow a tick."""
        due = int((now_mono - self._t0) / TICK_S)
        while self._tick < due:
            k = self._tick % self._buckets
            self._tick += 1
            dt = now_mono - self._flushed[k]
            self._flushed[k] = now_mono
            for d in itertools.islice(self.devices.values(), k, None, self._buckets):
                if d.online:
                    self._serve(d, dt)

    def _serve(self, d: SimDevice, dt: float) -> None:
        """What device ``d`` served over ``dt`` seconds, published as one batch."""
        n = self._poisson(self.rate * dt)
        if not n:
            return
        label = self._label(d.variant)
        prof = self.profile.get(label, {"json_failure": 0.05, "latency": 1.0})
        fail_p = prof.get("json_failure", 0.05) + self.faults.extra_json_failure.get(label, 0)
        slower = prof.get("latency", 1.0)
        for r in self._regressions.get(d.cpu_class, ()):
            if r.matches(d.variant):
                fail_p, slower = fail_p + r.json_failure, slower * r.latency
        requests = []
        now = time.time()
        for _ in range(n):
            d.seq += 1
            ok = self.rng.random() >= fail_p
            requests.append(SimRequest(d.seq, self.rng.lognormvariate(-0.7, 0.3) * slower,
                                       self.rng.randint(20, 200), ok))
        self._wait_for_room()
        self._publish(device_topic(d.device_id, "telemetry", self.root),
                      render_batch(d.device_id, d.variant, self.boot_epoch, now, requests))

    def _poisson(self, lam: float) -> int:
        # Knuth's method; lam is small per tick.
        limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    def _run(self) -> None:
        self._t0 = time.monotonic()
        self._flushed = [self._t0] * self._buckets  # the births are not traffic
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._work if w[0] <= now]
                self._work = [w for w in self._work if w[0] > now]
                for _, fn in sorted(due, key=lambda w: w[0]):
                    fn()
                self._traffic(now)

    def variants(self, cpu_class: str | None = None) -> dict[str, int]:
        """Devices per variant (of one class only, if given)."""
        out: dict[str, int] = {}
        for d in self.devices.values():
            if cpu_class is None or d.cpu_class == cpu_class:
                out[d.variant] = out.get(d.variant, 0) + 1
        return out

    def classes(self) -> dict[str, int]:
        """Devices per hardware class."""
        out: dict[str, int] = {}
        for d in self.devices.values():
            out[d.cpu_class] = out.get(d.cpu_class, 0) + 1
        return out
