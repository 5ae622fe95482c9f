"""The local API's OpenAPI 3.1 document, served at ``GET /openapi.json``.

The request schema is pydantic's JSON schema of :class:`.protocol.ChatRequest`
(the model the handler validates every body with) and the error body is
:class:`.protocol.ErrorBody`; the answers' shapes are the ``…Payload`` models
below, which :func:`.handler.response_body` and the other endpoints' bodies
must satisfy (tests/serving/test_openapi.py holds every answer the server gives
to the document). Every schema comes from a model, so a change of the protocol
changes the document; only the table of which status each route answers is
written here, after the handler.

No Swagger UI or ReDoc page is served: such pages load their scripts from a CDN.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from quantfleet.agent.wire import ValidationOutcome
from quantfleet.strict import Strict

from .protocol import ChatRequest, ErrorBody, ToolCall

REF = "#/components/schemas/{model}"


class AssistantMessagePayload(Strict):
    role: Literal["assistant"]
    content: str | None = Field(description="The answer; null when it is a tool call.")
    tool_calls: list[ToolCall] | None = Field(None, description="Present for a tool call.")


class ChoicePayload(Strict):
    index: int
    message: AssistantMessagePayload
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None


class UsagePayload(Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMetadataPayload(Strict):
    """How the agent produced the answer (``resp.model_extra["quantfleet"]``)."""

    variant: str = Field(description="The variant that produced the answer.")
    tier: str
    fallback_from: str | None = Field(description="The variant whose answer failed validation.")
    constraint: str = Field(description="How the output was constrained, e.g. none, grammar.")
    truncated_messages: int = Field(description="Older turns dropped to fit the prompt.")
    max_tokens_clamped: bool
    queue_wait_s: float
    validations: list[ValidationOutcome]
    fallback_validations: list[ValidationOutcome] = Field(
        description="The first attempt's outcomes when the answer is a fallback's.")


class ChatCompletionPayload(Strict):
    """A whole answer of ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="The variant that produced the answer.")
    choices: list[ChoicePayload] = Field(min_length=1, max_length=1)
    usage: UsagePayload
    quantfleet: ResponseMetadataPayload


class ChunkToolCallPayload(ToolCall):
    index: int


class ChunkDeltaPayload(Strict):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCallPayload] | None = None


class ChunkChoicePayload(Strict):
    index: int
    delta: ChunkDeltaPayload
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: None


class ChatCompletionChunkPayload(Strict):
    """One server-sent event of a streamed answer (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoicePayload] = Field(
        max_length=1, description="Empty only in the last chunk, the one with `usage`.")
    usage: UsagePayload | None = Field(
        None, description="With `stream_options.include_usage`, in a last chunk of its own.")


class ModelCardPayload(Strict):
    id: str = Field(description="What a request's `model` may name.")
    object: Literal["model"]
    created: int
    owned_by: str
    loaded: bool


class ModelListPayload(Strict):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCardPayload]


class ReadyPayload(Strict):
    """``GET /healthz`` when the active variant is loaded."""

    status: Literal["ready"]
    active: str
    loaded: list[str]


class NotReadyPayload(Strict):
    """``GET /healthz`` while loading, after a failed load, or draining."""

    status: Literal["loading", "failed", "draining"]
    error: str | None = Field(description="Why loading failed.")


_MODELS: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
    (ChatRequest, "validation"), (ErrorBody, "serialization"),
    (ChatCompletionPayload, "serialization"), (ChatCompletionChunkPayload, "serialization"),
    (ModelListPayload, "serialization"),
    (ReadyPayload, "serialization"), (NotReadyPayload, "serialization"),
]

# Which statuses the chat route answers with an error body, and why (handler.py).
CHAT_ERRORS: dict[int, str] = {
    400: "Malformed JSON, a body ChatRequest refuses (wrong types, unknown fields, a schema "
         "that is not JSON Schema, a lone surrogate...), an unknown tier or priority; "
         "`context_length_exceeded` when the prompt cannot fit.",
    404: "`model_not_found`: the model names no served variant.",
    413: "`body_too_large`: the body is over `listen.max_body_bytes`.",
    429: "`queue_full` (the variant's queue is full) or `quota_exceeded`; see Retry-After.",
    500: "`backend_error` (the runtime failed) or `internal_error` (a bug, logged).",
    503: "`not_ready`, `draining`, or `deadline` (it passed while queued); see Retry-After.",
    504: "`deadline`: the deadline passed while generating; generation was stopped.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer"}}}
_ANSWER_HEADERS = {
    "X-Request-Id": {"description": "The request's id (also in its telemetry event).",
                     "schema": {"type": "string"}},
    "X-Quantfleet-Variant": {"description": "The variant that answered.",
                             "schema": {"type": "string"}},
    "X-Quantfleet-Fallback-From": {"description": "Set when the answer is the fallback's.",
                                   "schema": {"type": "string"}},
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str,
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": _ref(model)}}}
    if headers:
        out["headers"] = headers
    return out


def document(*, auth: bool, title: str = "quantfleet agent", version: str = "1") -> dict[str, Any]:
    """The OpenAPI document; ``auth`` when a bearer token or API keys are configured."""
    _, defs = models_json_schema(_MODELS, ref_template=REF)
    security: list[dict[str, list[str]]] = [{"bearer": []}] if auth else []
    unauthorized = {401: _json(ErrorBody, "`invalid_api_key`: no or a wrong bearer token.")}
    chat_responses: dict[int, Any] = {
        200: {"description": "The answer: JSON, or server-sent events with `stream: true` "
                             "(`data: {chat.completion.chunk}` lines, a tool call as one delta "
                             "at the end, `data: {\"error\": ...}` if generation fails, then "
                             "`data: [DONE]`).",
              "headers": _ANSWER_HEADERS,
              "content": {"application/json": {"schema": _ref(ChatCompletionPayload)},
                          "text/event-stream": {
                              "schema": {"type": "string"},
                              # OpenAPI 3.1 has no schema for the events of a stream.
                              "x-quantfleet-event": {"oneOf": [
                                  _ref(ChatCompletionChunkPayload), _ref(ErrorBody)]}}}},
        **{s: _json(ErrorBody, d, _RETRY_AFTER if s in (429, 503) else None)
           for s, d in CHAT_ERRORS.items()},
        499: {"description": "The client disconnected before the answer; nobody receives this "
                             "(no body), it is the status the request is counted with."},
        **(unauthorized if auth else {}),
    }
    paths: dict[str, Any] = {
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion", "summary": "A chat completion.",
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref(ChatRequest)}}},
            "responses": {str(s): r for s, r in sorted(chat_responses.items())},
            **({"security": security} if auth else {})}},
        "/v1/models": {"get": {
            "operationId": "listModels", "summary": "The variants this agent serves.",
            "responses": {"200": _json(ModelListPayload, "The served variants."),
                          **({"401": unauthorized[401]} if auth else {})},
            **({"security": security} if auth else {})}},
        "/healthz": {"get": {
            "operationId": "health", "summary": "Ready only when the active variant is loaded.",
            "responses": {"200": _json(ReadyPayload, "Ready."),
                          "503": _json(NotReadyPayload, "Loading, failed, or draining.")}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics.",
            "responses": {"200": {"description": "Prometheus text format 0.0.4.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document.",
            "responses": {"200": {"description": "OpenAPI 3.1.",
                                  "content": {"application/json": {
                                      "schema": {"type": "object"}}}}}}},
    }
    not_found = _json(ErrorBody, "`not_found`: no such route.")
    for ops in paths.values():
        for op in ops.values():
            op["responses"].setdefault("404", not_found)
    components: dict[str, Any] = {"schemas": defs["$defs"]}
    if auth:
        components["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "The configured token, or one of `$QUANTFLEET_AGENT_API_KEYS`."}}
    return {"openapi": "3.1.0",
            "info": {"title": title, "version": version,
                     "description": "The agent's OpenAI-compatible local API (docs/api.md)."},
            "paths": paths, "components": components}
