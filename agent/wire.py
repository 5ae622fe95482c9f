"""The wire contract between devices and the fleet: MQTT topics and every payload.

This module is the one owner of what crosses the broker. The agent and the
fleet both import it; third-party consumers read the JSON Schemas generated
from it (docs/). Every payload carries ``schema_version`` so a consumer can
refuse what it does not understand instead of misreading it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from quantfleet.strict import Strict

#: The version of every payload that has not changed shape since the first
#: release. A payload that grew fields has its own, higher ``SCHEMA_VERSION``;
#: readers accept every version from 1 up to it (``accepts_version``).
WIRE_VERSION = 1
TOPIC_ROOT = "quantfleet/v1"


def device_topic(device_id: str, leaf: str, root: str = TOPIC_ROOT) -> str:
    """``quantfleet/v1/devices/{device}/{leaf}`` (leaf: status, telemetry, state, desired)."""
    return f"{root}/devices/{device_id}/{leaf}"


class WirePayload(Strict):
    """Base of every payload: unknown fields are refused, versions are explicit."""

    #: The newest shape of this payload; older ones still parse.
    SCHEMA_VERSION: ClassVar[int] = WIRE_VERSION

    schema_version: int = Field(WIRE_VERSION, description="Version of this payload's schema.")

    @classmethod
    def accepts_version(cls, version: int) -> bool:
        """Whether a reader of this module understands ``version`` of this payload."""
        return 1 <= version <= cls.SCHEMA_VERSION


ValidationKind = Literal[
    "json_parse", "json_schema", "tool_call", "refusal", "citation", "length", "finish_reason"
]


class ValidationOutcome(Strict):
    """One check run on one response."""

    kind: str = Field(description="What was checked, e.g. json_schema, tool_call, refusal.")
    passed: bool
    detail: str = Field("", description="Why it failed, in a few words (no user content).")


class RequestEvent(WirePayload):
    """One event per request the agent served (or refused)."""

    type: Literal["request"] = "request"
    request_id: str
    ts: float = Field(description="Unix time the request arrived.")
    variant: str = Field(description="The variant that produced the returned answer.")
    tier: str = Field("default", description="The quality tier the request asked for.")
    client: str | None = Field(None, description="The client id (API key name or header).")
    status: int = Field(200, description="HTTP status returned.")
    error_class: str | None = Field(None, description="Error kind when the request failed.")
    queue_wait_s: float = 0.0
    time_to_first_token_s: float | None = None
    latency_s: float = Field(0.0, description="Arrival to last byte.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_second: float = 0.0
    finish_reason: str | None = None
    stream: bool = False
    constraint: str = Field("none", description="How structured output was enforced.")
    truncated_messages: int = Field(0, description="Oldest turns dropped or cut to fit.")
    max_tokens_clamped: bool = False
    validations: list[ValidationOutcome] = Field(default_factory=list)
    fallback_from: str | None = Field(
        None, description="The variant whose answer failed validation, when a fallback ran."
    )
    fallback_validations: list[ValidationOutcome] = Field(
        default_factory=list,
        description="When a fallback ran: the outcomes of the first attempt (the evidence); "
        "`validations` are then the fallback answer's.",
    )
    fallback_load_s: float | None = Field(
        None, description="When the fallback variant was not loaded and this request waited "
        "for it to load (lazy or on-demand fallback): the seconds that load took.")
    attempt_tokens: int = Field(
        0, description="Tokens of every attempt (retries and fallbacks included), for cost."
    )


# ---------------------------------------------------------------------------
# Telemetry and liveness (owner: the telemetry path, agent/telemetry/).
#
# Every event the device keeps gets the triple (device_id, boot_epoch, seq):
# ``seq`` is one per-device counter persisted in the outbox across restarts
# (so the committed events of a device form one contiguous range), and
# ``boot_epoch`` grows with every start. The fleet deduplicates on the triple
# and finds gaps in ``seq``; losses the device knows about (eviction of a full
# outbox, a quarantined database) arrive as ``GapRecord`` events.
# ---------------------------------------------------------------------------

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TOPIC_LEAVES = ("status", "telemetry", "state", "desired")

EventKind = Literal["request", "aggregate", "health", "device_status", "state", "gap"]

#: Eviction order of a full outbox: the lowest priority goes first. Gap records
#: are never evicted (they are the account of what was), nor is the newest
#: device status.
EVENT_PRIORITY: dict[str, int] = {
    "request": 0, "aggregate": 1, "health": 1, "device_status": 2, "state": 2, "gap": 3,
}

#: Upper bounds (seconds) of the fixed latency histogram buckets; one more
#: bucket counts everything above the last bound.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)


def parse_device_topic(topic: str, root: str = TOPIC_ROOT) -> tuple[str, str]:
    """``(device_id, leaf)`` of a device topic; ValueError naming the topic otherwise."""
    prefix = f"{root}/devices/"
    if not topic.startswith(prefix):
        raise ValueError(f"topic {topic!r}: not under {prefix!r}")
    parts = topic[len(prefix):].split("/")
    if len(parts) != 2 or parts[1] not in TOPIC_LEAVES or not parts[0]:
        raise ValueError(f"topic {topic!r}: expected {prefix}<device>/<{'|'.join(TOPIC_LEAVES)}>")
    return parts[0], parts[1]


class Histogram(Strict):
    """Counts of observations in the fixed buckets of ``LATENCY_BUCKETS_S``."""

    bounds: list[float] = Field(
        default_factory=lambda: list(LATENCY_BUCKETS_S),
        description="Upper bounds of the buckets in seconds, ascending.",
    )
    counts: list[int] = Field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1),
        description="Observations per bucket; one more entry than bounds (the overflow).",
    )
    total: float = Field(0.0, description="Sum of the observed values (seconds).")

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError("counts must have one entry more than bounds")
        if any(c < 0 for c in self.counts):
            raise ValueError("counts must not be negative")
        return self


class AggregatePayload(WirePayload):
    """Per-variant, per-minute summary of the requests served, kept when raw events are not."""

    type: Literal["aggregate"] = "aggregate"
    variant: str = Field(description="The variant that answered.")
    minute: int = Field(description="Unix time (seconds) of the start of the minute.")
    requests: int = Field(0, ge=0, description="Requests in the minute.")
    errors: int = Field(0, ge=0, description="Requests answered with a status >= 400.")
    statuses: dict[str, int] = Field(default_factory=dict, description="Count per HTTP status.")
    validation_failures: dict[str, int] = Field(
        default_factory=dict, description="Failed output validations per kind."
    )
    tool_calls_ok: int = Field(0, ge=0, description="Tool-call validations that passed.")
    tool_calls_failed: int = Field(0, ge=0, description="Tool-call validations that failed.")
    refusals: int = Field(0, ge=0, description="Requests whose refusal check failed.")
    fallbacks: int = Field(0, ge=0, description="Requests answered after a fallback.")
    prompt_tokens: int = Field(0, ge=0, description="Prompt tokens of the requests.")
    completion_tokens: int = Field(0, ge=0, description="Completion tokens returned.")
    attempt_tokens: int = Field(0, ge=0, description="Tokens of every attempt, for cost.")
    latency: Histogram = Field(
        default_factory=lambda: Histogram.model_validate({}), description="Arrival to last byte."
    )
    time_to_first_token: Histogram = Field(
        default_factory=lambda: Histogram.model_validate({}),
        description="Arrival to first token (streams and not).",
    )


class HealthPayload(WirePayload):
    """Host health sampled by the agent (psutil)."""

    type: Literal["health"] = "health"
    cpu_percent: float = Field(description="Host CPU use over the sampling interval, 0-100×cores.")
    load_1m: float = Field(description="1-minute load average.")
    load_5m: float = Field(description="5-minute load average.")
    load_15m: float = Field(description="15-minute load average.")
    memory_total_bytes: int = Field(ge=0, description="Physical memory.")
    memory_available_bytes: int = Field(ge=0, description="Memory available to new processes.")
    disk_path: str = Field(description="The filesystem measured (the outbox's).")
    disk_total_bytes: int = Field(ge=0, description="Size of that filesystem.")
    disk_free_bytes: int = Field(ge=0, description="Free bytes on that filesystem.")
    temperatures_c: dict[str, float] = Field(
        default_factory=dict, description="Sensor name to °C, where the platform reports them."
    )
    agent_rss_bytes: int = Field(ge=0, description="Resident memory of the agent process.")
    agent_cpu_percent: float = Field(description="CPU use of the agent process.")


class DeviceStatusPayload(WirePayload):
    """The agent's own view of its telemetry path, queued like any event."""

    type: Literal["device_status"] = "device_status"
    outbox_rows: int = Field(ge=0, description="Events waiting in the outbox.")
    outbox_bytes: int = Field(ge=0, description="Bytes the outbox accounts for.")
    evicted_total: int = Field(ge=0, description="Events evicted since the outbox was created.")
    published_batches: int = Field(ge=0, description="Batches acknowledged this boot.")
    failed_pubacks: dict[str, int] = Field(
        default_factory=dict, description="Failing PUBACK reason codes (hex) and their counts."
    )
    variant: str | None = Field(None, description="The variant the agent serves, if any.")


class GapRecord(WirePayload):
    """Events the device lost on purpose (eviction) or by accident (a quarantined database)."""

    type: Literal["gap"] = "gap"
    reason: Literal["evicted", "quarantined", "lost", "unwritable"] = Field(
        description="Why the events are gone: evicted (the outbox was full), quarantined "
        "(its database failed the integrity check and was replaced), lost (its database or "
        "-wal file was removed), unwritable (shed from memory while its disk could not be "
        "written).")
    events: int = Field(ge=0, description="How many events are gone (0 when unknown).")
    counts: dict[str, int] = Field(default_factory=dict, description="Events gone per kind.")
    ranges: list[tuple[int, int]] = Field(
        default_factory=list, description="Inclusive seq ranges of the events gone."
    )
    detail: str = Field("", description="What happened, e.g. the quarantined file's name.")

    @model_validator(mode="after")
    def _ranges_add_up(self) -> GapRecord:
        if any(a > b or a < 1 for a, b in self.ranges):
            raise ValueError("each range must be (first, last) with 1 <= first <= last")
        if self.ranges and sum(b - a + 1 for a, b in self.ranges) != self.events:
            raise ValueError("events must equal the number of seqs in ranges")
        return self


UpdateState = Literal[
    "idle", "downloading", "verifying", "preflight", "activating", "soaking", "healthy",
    "failed", "rolled_back", "refused",
]
#: States a device passes through on the way to ``healthy``; the others are ends.
UPDATE_IN_PROGRESS: tuple[str, ...] = (
    "downloading", "verifying", "preflight", "activating", "soaking",
)


class DeviceStatePayload(WirePayload):
    """Retained on ``…/state``: what the device runs and where its update stands.

    "installed" is never "healthy": a device reports ``healthy`` only after the
    new variant passed its soak.
    """

    type: Literal["state"] = "state"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="The device.")
    boot_epoch: int = Field(ge=0, description="The agent start this state belongs to.")
    variant: str | None = Field(None, description="The variant serving requests now.")
    known_good: str | None = Field(None, description="The variant it would roll back to.")
    target: str | None = Field(None, description="The variant being applied, if any.")
    desired_revision: int | None = Field(None, description="The desired revision acted on.")
    update_state: UpdateState = Field(description="Where the update stands.")
    reason: str = Field("", max_length=1000, description="Why it failed, was refused or "
                        "rolled back.")
    progress: float | None = Field(None, ge=0, le=1, description="Download progress.")
    ts: float = Field(description="Unix time of this state.")


EventBody = Annotated[
    RequestEvent | AggregatePayload | HealthPayload | DeviceStatusPayload | DeviceStatePayload
    | GapRecord,
    Field(discriminator="type"),
]


class TelemetryEvent(Strict):
    """One event in a batch, with the triple that makes it unique."""

    boot_epoch: int = Field(ge=0, description="The agent start this event was recorded in.")
    seq: int = Field(ge=1, description="The device's persisted event counter.")
    kind: EventKind = Field(description="The body's type (eviction priority follows it).")
    ts: float = Field(description="Unix time the event was recorded.")
    body: EventBody = Field(description="The event itself.")

    @model_validator(mode="after")
    def _kind_matches_body(self) -> TelemetryEvent:
        if self.body.type != self.kind:
            raise ValueError(f"kind {self.kind!r} does not match body type {self.body.type!r}")
        return self


class TelemetryBatch(WirePayload):
    """What a device publishes on ``…/telemetry`` (QoS 1, at most 64 KiB)."""

    type: Literal["batch"] = "batch"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="The sending device.")
    sent_at: float = Field(description="Unix time the batch was (last) sent.")
    historical: bool = Field(
        False, description="True for backlog drained after an outage (oldest first)."
    )
    events: list[TelemetryEvent] = Field(min_length=1, description="Events, ascending seq.")


# ---------------------------------------------------------------------------
# Hardware: which kernels a device runs (owner: agent/hardware.py reads it,
# the fleet derives cohort labels from it with ``hardware_labels``).
# ---------------------------------------------------------------------------

#: Hardware classes, most capable first within an architecture. A class groups
#: devices that run the same int8/fp kernels of llama.cpp and onnxruntime.
CPU_CLASSES: tuple[str, ...] = (
    "x86-amx", "x86-avx512-vnni", "x86-avx512", "x86-avx2-vnni", "x86-avx2", "x86-sse",
    "arm-i8mm", "arm-dotprod", "arm-neon",
)


def cpu_class(arch: str, features: list[str] | tuple[str, ...] | set[str]) -> str:
    """The hardware class of an architecture and its kernel-relevant features.

    x86: AMX int8 tiles, then AVX-512 with VNNI, AVX-512, AVX2 with AVX-VNNI,
    AVX2, else SSE. ARM: i8mm, dot-product, else NEON. Anything else is its
    architecture's name.
    """
    f = set(features)
    if arch == "x86_64":
        if "amx_int8" in f:
            return "x86-amx"
        if "avx512f" in f:
            return "x86-avx512-vnni" if "avx512_vnni" in f else "x86-avx512"
        if "avx2" in f:
            return "x86-avx2-vnni" if "avx_vnni" in f else "x86-avx2"
        return "x86-sse"
    if arch == "aarch64":
        if "i8mm" in f:
            return "arm-i8mm"
        return "arm-dotprod" if "dotprod" in f else "arm-neon"
    return arch or "unknown"


class HardwareFingerprint(Strict):
    """What a device is, as far as its kernels are concerned (sent with the birth)."""

    arch: str = Field(max_length=32, description="CPU architecture: x86_64, aarch64, ...")
    cpu_model: str = Field(max_length=256, description="The CPU's model name.")
    cpu_vendor: str = Field("", max_length=64, description="GenuineIntel, AuthenticAMD, an "
                            "ARM implementer code, ...")
    features: list[str] = Field(
        default_factory=list, max_length=64,
        description="ISA features that change kernels (x86: avx2, fma, f16c, avx512f, "
        "avx512_vnni, avx_vnni, amx_int8, ...; ARM: asimd, dotprod, i8mm, sve, ...).",
    )
    cpu_class: str = Field(max_length=32, description="The hardware class (``cpu_class``).")
    logical_cores: int = Field(ge=1, description="CPUs the OS schedules on.")
    physical_cores: int | None = Field(None, ge=1, description="Physical cores, if known.")
    memory_bytes: int = Field(ge=0, description="Physical memory.")
    llama_cpp_system_info: str = Field(
        "", max_length=2048,
        description="llama.cpp's system info string: the kernels its build uses.")
    llama_cpp_python: str = Field("", max_length=32, description="llama-cpp-python version.")
    onnxruntime: str = Field("", max_length=32, description="onnxruntime version.")
    kernel: str = Field("", max_length=128, description="OS kernel release.")

    def labels(self) -> dict[str, str]:
        return hardware_labels(self)


#: Labels the fleet derives from a fingerprint; they override a device's own
#: labels of the same name (a fact is not configuration).
HARDWARE_LABEL_KEYS = ("cpu.arch", "cpu.class", "cpu.vnni", "cpu.avx512", "cpu.dotprod",
                       "cpu.i8mm")


def hardware_labels(hw: HardwareFingerprint) -> dict[str, str]:
    """``cpu.arch``, ``cpu.class`` and the yes/no features cohorts select on."""
    f = set(hw.features)
    out = {"cpu.arch": hw.arch or "unknown", "cpu.class": hw.cpu_class}
    if hw.arch == "x86_64":
        out["cpu.vnni"] = str(bool(f & {"avx512_vnni", "avx_vnni", "amx_int8"})).lower()
        out["cpu.avx512"] = str("avx512f" in f).lower()
    elif hw.arch == "aarch64":
        out["cpu.dotprod"] = str("dotprod" in f).lower()
        out["cpu.i8mm"] = str("i8mm" in f).lower()
    return out


class StatusPayload(WirePayload):
    """Retained liveness on ``…/status``: birth on connect, Will on loss, offline on stop.

    A consumer keeps the message with the highest ``boot_epoch``; a Will that
    arrives late from an older start never overrides a newer birth.

    Version 2 added ``hardware`` (version 1 births still parse, without it).
    """

    SCHEMA_VERSION: ClassVar[int] = 2

    schema_version: int = Field(2, description="Version of this payload's schema (2 added "
                                "hardware).")
    type: Literal["status"] = "status"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="The device.")
    state: Literal["online", "offline"] = Field(description="Whether the agent is connected.")
    boot_epoch: int = Field(ge=0, description="The agent start this status belongs to.")
    reason: Literal["birth", "will", "shutdown"] = Field(
        description="birth on connect, will when the broker lost us, shutdown on a clean stop."
    )
    ts: float = Field(description="Unix time the message was made (for a Will: at connect).")
    agent_version: str = Field("", description="quantfleet version of the agent.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="The device's own labels (from its config: hw, region, ...); the fleet's "
        "cohorts select on them. Sent with the birth.",
    )
    hardware: HardwareFingerprint | None = Field(
        None, description="The device's hardware fingerprint, sent with the birth (version 2)."
    )


# ---------------------------------------------------------------------------
# The update path: what the fleet wants a device to run (``…/desired``,
# retained, fleet → device) and where the device's update stands (``…/state``,
# retained, device → fleet).
# ---------------------------------------------------------------------------

class DesiredPayload(WirePayload):
    """The variant the fleet wants a device to run, signed so the device can check it.

    ``revision`` increases with every change for a device; a device ignores a
    revision lower than the last one it acted on (a stale retained message).
    Version 2 signs every field (``key_id`` names the key); a device refuses
    version 1, whose signature covered neither the device nor the revision.
    """

    SCHEMA_VERSION: ClassVar[int] = 2

    schema_version: int = Field(2, description="Version of this payload's schema.")
    type: Literal["desired"] = "desired"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="The device addressed.")
    revision: int = Field(ge=1, le=2**53, description="Increases with every change for this "
                          "device.")
    variant: str = Field(min_length=1, max_length=128, description="Catalog variant name.")
    backend: Literal["llama.cpp", "onnxruntime"] = Field(description="Runtime of the variant.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Of the artifact file.")
    size_bytes: int = Field(ge=1, description="Of the artifact file.")
    url: str = Field(pattern=r"^https?://", max_length=2048, description="Where to fetch it.")
    signature: str = Field(
        min_length=1, max_length=256,
        description="ed25519 over every other field as canonical JSON (version 2; version 1: "
        "over variant, backend, sha256, size_bytes); agent/update/signing.py.",
    )
    rollout_id: str | None = Field(None, max_length=128,
                                   description="The rollout that set it, if any.")
    issued_at: float = Field(ge=0, allow_inf_nan=False,
                             description="Unix time the fleet made this message.")
    key_id: str | None = Field(None, pattern=r"^[0-9a-f]{16}$",
                               description="Id of the key that signed it (version 2).")

    @model_validator(mode="after")
    def _v2_names_its_key(self) -> DesiredPayload:
        if self.schema_version >= 2 and self.key_id is None:
            raise ValueError("key_id is required from schema version 2")
        return self


#: The payloads whose JSON Schemas are published in docs/schemas/.
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "telemetry-batch": TelemetryBatch,
    "status": StatusPayload,
    "request-event": RequestEvent,
    "aggregate": AggregatePayload,
    "health": HealthPayload,
    "device-status": DeviceStatusPayload,
    "gap-record": GapRecord,
    "desired": DesiredPayload,
    "device-state": DeviceStatePayload,
    "hardware": HardwareFingerprint,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every published payload, by file stem."""
    return {name: model.model_json_schema() for name, model in SCHEMA_MODELS.items()}
