"""Device messages as the fleet receives them: topic + bytes to a validated payload.

One pure function decides, for every message on a device topic, either the
payload it carries or the counted reason it is rejected. It never raises for
bad input, so no device can stop ingest by sending garbage.

Valid by the wire schema is not yet storable: the schema allows NaN, integers
of any size and strings of any length, the store's columns do not (SQLite
stores NaN as NULL, PostgreSQL refuses a bigint over 2**63 - 1, an integer
column over 2**31 - 1, a varchar(128) over 128 characters, a NUL in text).
``screen`` checks what the store needs before anything is committed: a status
or state that breaks a limit is rejected whole, a batch loses only the events
that break one, each counted with its reason, and its other events go on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

from pydantic import BaseModel, ValidationError

from quantfleet.agent.wire import (
    TOPIC_ROOT,
    WIRE_VERSION,
    DeviceStatePayload,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    parse_device_topic,
)
from quantfleet.strict import explain

REJECTION_REASONS = (
    "not_json", "unsupported_version", "invalid_payload", "topic_mismatch", "unknown_topic",
    # valid by the schema, not storable (``screen``), or refused before parsing
    "too_large", "too_deep", "non_finite", "out_of_range", "too_long", "nul_in_text",
)

#: A batch is at most 64 KiB, but a single event larger than that is sent alone;
#: anything this big is not a device's telemetry.
MAX_PAYLOAD_BYTES = 1 << 20
INT64 = (-(1 << 63), (1 << 63) - 1)  # BigInteger on both engines
INT32 = (-(1 << 31), (1 << 31) - 1)  # Integer: int4 on PostgreSQL
#: Timestamps (event ts, state ts) the store keeps and the gates window on: finite,
#: and from 1970 to the last second of 9999 (what datetime can show). Not narrower:
#: a device without a real-time clock reports 1970 until NTP syncs, and its events
#: are real; a clock running ahead is a device's fault worth seeing, not dropping.
TS_RANGE = (0.0, 253402300799.0)
#: The request columns typed Integer (schema.events) and the varchar lengths.
_INT32_FIELDS = ("status", "prompt_tokens", "completion_tokens", "attempt_tokens",
                 "truncated_messages")
VARIANT_MAX = 128  # events.variant, devices.variant
AGENT_VERSION_MAX = 64  # devices.agent_version
#: Tokens in the raw JSON that may hide a value the store cannot hold (a NaN, an
#: infinity, a NUL): a batch that has one is walked value by value. Substring
#: searches, not a regular expression: one over a 36 KiB batch cost as much as
#: parsing it.
_SUSPECT = (b"NaN", b"Infinity", b"\\u0000")

Payload: TypeAlias = TelemetryBatch | StatusPayload | DeviceStatePayload


@dataclass(frozen=True)
class Rejected:
    reason: str  # one of REJECTION_REASONS
    detail: str


@dataclass(frozen=True)
class Cleared:
    """An empty retained message: the topic was cleared on purpose."""

    device_id: str
    leaf: str


_MODELS: dict[str, type[Payload]] = {
    "telemetry": TelemetryBatch,
    "status": StatusPayload,
    "state": DeviceStatePayload,
}


def classify_payload(payload: bytes, model: type[Payload] | None = None) -> str:
    """Why a payload failed validation: not JSON, a newer schema, or the wrong shape."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return "not_json"
    except RecursionError:  # nested deeper than Python's json module goes
        return "too_deep"
    if isinstance(doc, dict) and isinstance(doc.get("schema_version"), int):
        known = model.accepts_version(doc["schema_version"]) if model else \
            doc["schema_version"] == WIRE_VERSION
        if not known:
            return "unsupported_version"
    return "invalid_payload"


def _unread_versions(parsed: Payload) -> list[int]:
    """The schema versions in ``parsed`` (its own and its events') this fleet cannot read."""
    bad = set() if parsed.accepts_version(parsed.schema_version) else {parsed.schema_version}
    if isinstance(parsed, TelemetryBatch):
        bad.update(e.body.schema_version for e in parsed.events
                   if not e.body.accepts_version(e.body.schema_version))
    return sorted(bad)


def parse_message(topic: str, payload: bytes,
                  root: str = TOPIC_ROOT) -> Payload | Rejected | Cleared:
    try:
        device, leaf = parse_device_topic(topic, root)
    except ValueError as exc:
        return Rejected("unknown_topic", str(exc))
    model = _MODELS.get(leaf)
    if model is None:
        return Rejected("unknown_topic", f"{topic!r}: the fleet does not consume {leaf!r}")
    if not payload and leaf in ("status", "state"):
        return Cleared(device, leaf)
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejected("too_large", f"{topic}: {len(payload)} bytes, the fleet takes up to "
                        f"{MAX_PAYLOAD_BYTES}")
    try:
        # Strict: the wire's JSON Schemas say integer where they say integer ("seq": "5" is
        # a broken device, not a sequence number).
        parsed: Payload = model.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        return Rejected(classify_payload(payload, model),
                        explain(exc, where=topic, whole="payload"))
    unread = _unread_versions(parsed)
    if unread:
        return Rejected("unsupported_version",
                        f"{topic}: schema_version {unread}, the fleet reads "
                        f"{model.__name__} up to version {model.SCHEMA_VERSION}")
    if parsed.device_id != device:
        return Rejected("topic_mismatch",
                        f"{topic}: payload is for device {parsed.device_id!r}")
    return parsed


# -- what the store can hold ---------------------------------------------------

def _values(value: object) -> Iterator[tuple[str, object]]:
    """Every scalar in a parsed payload, with where it is (a validated payload is
    as deep as its models, so the recursion is bounded)."""
    if isinstance(value, BaseModel):
        for name, v in value.__dict__.items():
            for where, x in _values(v):
                yield (f"{name}.{where}" if where else name), x
    elif isinstance(value, dict):
        for k, v in value.items():
            yield "", k
            for where, x in _values(v):
                yield (f"{k}.{where}" if where else str(k)), x
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            for where, x in _values(v):
                yield (f"{i}.{where}" if where else str(i)), x
    else:
        yield "", value


def _scan(value: object) -> tuple[str, str] | None:
    """The first NaN/infinity, integer outside 64 bits or NUL in ``value``."""
    for where, x in _values(value):
        if isinstance(x, float) and not math.isfinite(x):
            return "non_finite", f"{where or 'value'} is {x}"
        if isinstance(x, int) and not isinstance(x, bool) and not INT64[0] <= x <= INT64[1]:
            return "out_of_range", f"{where or 'value'} is outside signed 64-bit"
        if isinstance(x, str) and "\x00" in x:
            return "nul_in_text", f"{where or 'value'} holds a NUL character"
    return None


def _ts(name: str, ts: float) -> tuple[str, str] | None:
    if not math.isfinite(ts):
        return "non_finite", f"{name} is {ts}"
    if not TS_RANGE[0] <= ts <= TS_RANGE[1]:
        return "out_of_range", f"{name} {ts} is outside [{TS_RANGE[0]:.0f}, {TS_RANGE[1]:.0f}]"
    return None


def _text(name: str, value: object, limit: int) -> tuple[str, str] | None:
    if not isinstance(value, str):
        return None
    if len(value) > limit:
        return "too_long", f"{name} has {len(value)} characters, the store keeps {limit}"
    if "\x00" in value:
        return "nul_in_text", f"{name} holds a NUL character"
    return None


def _event_problem(ev: TelemetryEvent, suspect: bool) -> tuple[str, str] | None:
    """Why the store cannot hold this event (its columns' limits), or None."""
    if ev.seq > INT64[1] or ev.boot_epoch > INT64[1]:
        return "out_of_range", "seq or boot_epoch is outside signed 64-bit"
    problem = _ts("ts", ev.ts)
    if problem:
        return problem
    body = ev.body
    if isinstance(body, RequestEvent):
        for name in _INT32_FIELDS:
            if not INT32[0] <= getattr(body, name) <= INT32[1]:
                return "out_of_range", f"body.{name} is outside signed 32-bit"
        if not INT32[0] <= body.prompt_tokens + body.completion_tokens <= INT32[1]:
            return "out_of_range", "body.prompt_tokens + completion_tokens is outside 32-bit"
        for value in (body.latency_s, body.time_to_first_token_s):
            if value is not None and not math.isfinite(value):
                return "non_finite", f"body latency is {value}"
    problem = _text("body.variant", getattr(body, "variant", None), VARIANT_MAX)
    if problem:
        return problem
    return _scan(ev) if suspect else None


def _payload_problem(parsed: StatusPayload | DeviceStatePayload,
                     suspect: bool) -> tuple[str, str] | None:
    if parsed.boot_epoch > INT64[1]:
        return "out_of_range", "boot_epoch is outside signed 64-bit"
    if isinstance(parsed, StatusPayload):
        problem = _text("agent_version", parsed.agent_version, AGENT_VERSION_MAX)
    else:
        problem = _ts("ts", parsed.ts) or _text("variant", parsed.variant, VARIANT_MAX)
    if problem:
        return problem
    return _scan(parsed) if suspect else None


def screen(topic: str, parsed: Payload,
           payload: bytes) -> tuple[Payload | None, list[Rejected]]:
    """What of a valid payload the store can hold, and a rejection for each part it cannot.

    A status or state is kept or rejected whole; a batch keeps its storable events
    (``None`` when none is left), one rejection per event dropped. Cheap on good
    batches: the columns' limits are a few comparisons per event, and only a batch
    whose raw JSON has a NaN, an infinity or a NUL is walked value by value. So an
    integer over 64 bits, or a float that overflowed to infinity, in a body field
    no column holds (an aggregate's counts) is not looked for: the body's JSON text
    keeps it (the overflowed float as null), which the store can hold.
    """
    if not isinstance(parsed, TelemetryBatch):
        problem = _payload_problem(parsed, True)  # few and small: always walked
        if problem is None:
            return parsed, []
        return None, [Rejected(problem[0], f"{topic}: {problem[1]}")]
    suspect = _SUSPECT[0] in payload or _SUSPECT[1] in payload or _SUSPECT[2] in payload
    dropped: list[Rejected] = []
    kept: list[TelemetryEvent] = []
    for ev in parsed.events:
        problem = _event_problem(ev, suspect)
        if problem is None:
            kept.append(ev)
        else:
            dropped.append(Rejected(problem[0], f"{topic}: seq {ev.seq}: {problem[1]}"))
    if not dropped:
        return parsed, []
    if not kept:
        return None, dropped
    return parsed.model_copy(update={"events": kept}), dropped
