"""Device messages as the fleet receives them: topic + bytes to a validated payload.

One pure function decides, for every message on a device topic, either the
payload it carries or the counted reason it is rejected. It never raises for
bad input, so no device can stop ingest by sending garbage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeAlias

from pydantic import ValidationError

from quantfleet.agent.wire import (
    TOPIC_ROOT,
    WIRE_VERSION,
    DeviceStatePayload,
    StatusPayload,
    TelemetryBatch,
    parse_device_topic,
)
from quantfleet.strict import explain

REJECTION_REASONS = (
    "not_json", "unsupported_version", "invalid_payload", "topic_mismatch", "unknown_topic",
)

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
