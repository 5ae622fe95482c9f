"""The wire contract between devices and the fleet: MQTT topics and every payload.

This module is the one owner of what crosses the broker. The agent and the
fleet both import it; third-party consumers read the JSON Schemas generated
from it (docs/). Every payload carries ``schema_version`` so a consumer can
refuse what it does not understand instead of misreading it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

WIRE_VERSION = 1
TOPIC_ROOT = "quantfleet/v1"


def device_topic(device_id: str, leaf: str, root: str = TOPIC_ROOT) -> str:
    """``quantfleet/v1/devices/{device}/{leaf}`` (leaf: status, telemetry, state, desired)."""
    return f"{root}/devices/{device_id}/{leaf}"


class WirePayload(BaseModel):
    """Base of every payload: unknown fields are refused, versions are explicit."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(WIRE_VERSION, description="Version of this payload's schema.")


ValidationKind = Literal[
    "json_parse", "json_schema", "tool_call", "refusal", "citation", "length", "finish_reason"
]


class ValidationOutcome(BaseModel):
    """One check run on one response."""

    model_config = ConfigDict(extra="forbid")

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
    attempt_tokens: int = Field(
        0, description="Tokens of every attempt (retries and fallbacks included), for cost."
    )
