"""The local API's request and response shapes (OpenAI chat completions, a strict subset).

This module owns the HTTP contract of ``/v1/chat/completions``: what a
request may contain (unknown top-level fields are refused rather than
silently ignored, since a client that sends ``n=3`` or ``logprobs`` expects
behaviour we do not have), and the error body every failure uses
(``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it).

Every string of a request — message content and parts, tool names,
descriptions and arguments, stop sequences, every string and key of a JSON
schema — must be valid Unicode: a lone surrogate (``"\\ud800"`` is valid JSON
but encodes to no UTF-8) is refused with a 400 naming its field
(``messages.0.content: contains a lone surrogate (U+D800); ...``) before the
request reaches a model, whose tokenizer could not encode it.

The agent's own extension travels in an extra field the official client can
send with ``extra_body={"quantfleet": {...}}``: the quality tier, a citation
requirement, a priority and a deadline.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from quantfleet.strict import Strict

from .validation import schema_problem

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _surrogate(text: str) -> int | None:
    """The first code point of ``text`` that UTF-8 cannot encode (a surrogate), if any."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return ord(text[exc.start])
    return None


def _shown(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def unicode_problem(value: Any) -> tuple[str, str] | None:
    """``(path, message)`` for the first string in ``value`` (dict keys included) that
    is not valid Unicode, else None. Iterative: a deeply nested value cannot overflow."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if (bad := _surrogate(v)) is not None:
                return path, (f"{path or 'value'}: contains a lone surrogate (U+{bad:04X}); "
                              "text must be valid Unicode")
        elif isinstance(v, dict):
            for key in v:
                if isinstance(key, str) and (bad := _surrogate(key)) is not None:
                    where = f"{path}.{_shown(key)}" if path else _shown(key)
                    return where, (f"{where}: the key contains a lone surrogate "
                                   f"(U+{bad:04X}); text must be valid Unicode")
            stack.extend((f"{path}.{k}" if path else str(k), item)
                         for k, item in reversed(v.items()))
        elif isinstance(v, list | tuple):
            stack.extend((f"{path}.{i}" if path else str(i), v[i])
                         for i in range(len(v) - 1, -1, -1))
    return None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(Strict):
    name: str
    arguments: str
    parsed_arguments: dict[str, Any] | None = Field(
        None, description="Ignored: the openai client's parse() puts the arguments it parsed "
        "here, and sends them back when its message is appended to the history.")


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    parsed: dict[str, Any] | None = Field(
        None, description="Ignored: the openai client's parse() result, sent back when its "
        "message is appended to the history (`content` holds the same answer).")

    @model_validator(mode="after")
    def _content_present(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class FunctionDef(Strict):
    name: str = Field(description="The function's name: letters, digits, _ and -, at most 64.")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TOOL_NAME.match(v):
            raise ValueError("a function name is 1-64 letters, digits, '_' or '-'")
        return v

    @field_validator("parameters")
    @classmethod
    def _params(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and (problem := schema_problem(v)) is not None:
            raise ValueError(f"parameters: {problem}")
        return v


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and (problem := schema_problem(v)) is not None:
            raise ValueError(problem)
        return v


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class StreamOptions(Strict):
    include_usage: bool = False


class QuantfleetOptions(Strict):
    """The agent's extension, sent as ``extra_body={"quantfleet": {...}}``."""

    tier: str | None = Field(None, max_length=64, description="Quality tier to route by.")
    require_citation: bool = Field(False, description="Validate that the answer cites.")
    priority: Literal["high", "normal", "low"] | None = None
    deadline_s: float | None = Field(None, gt=0, le=3600)
    fallback: bool = Field(True, description="Allow a retry on the fallback variant.")


class ChatRequest(Strict):
    """``POST /v1/chat/completions``."""

    model: str = Field("", max_length=256)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64,
                             description="A 64-bit integer, as OpenAI takes it.")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only one choice is generated.")
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Sampling options we accept only at their neutral value: the backend
    # seam does not implement them, and pretending otherwise would mislead.
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    presence_penalty: float | None = Field(None, ge=0, le=0)
    logprobs: bool | None = Field(None, description="Only false is supported.")
    quantfleet: QuantfleetOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # Before the fields: one walk covers every string, whatever field holds it.
        if isinstance(data, dict) and (problem := unicode_problem(data)) is not None:
            path, message = problem
            raise PydanticCustomError("invalid_unicode", "{message}",
                                      {"message": message, "path": path})
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice: function {self.tool_choice.function.name!r} is not in tools")
        elif self.tool_choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        # tools with a JSON response_format are accepted, as OpenAI accepts them:
        # with "auto" the answer is a call or a value in the format; with
        # "required" or a named function it is a call; with "none", the format.
        return self

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def tool_choice_value(self) -> str | dict[str, Any]:
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return ErrorBody(error=ErrorDetail(message=message, type=type_, param=param,
                                       code=code)).model_dump()
