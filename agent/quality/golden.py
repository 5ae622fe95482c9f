"""The golden-set format: one JSON object per line, each a request and what its answer must be.

A golden item is an OpenAI-shaped chat request (``messages``, optional
``tools``/``tool_choice``, ``response_format``, ``max_tokens``) plus
``expect``, the properties its answer must have, and a ``category`` for
slicing the report. The request part is made of the local API's own request
models (:mod:`quantfleet.agent.serving.protocol`), and the whole body is
checked by its ``ChatRequest``, so an item is validated exactly as the API
validates a request. Every property is optional; an item checks only what it
sets. The whole file is validated before anything runs: a malformed line, an
unknown property, an invalid JSON Schema or a regex that does not compile
stops the load with ``file:line: reason``, so a run never starts half-way.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from quantfleet.agent.serving.protocol import (
    ChatRequest,
    JsonSchemaFormat,
    Message,
    NamedToolChoice,
    ResponseFormat,
    Tool,
)
from quantfleet.strict import Strict, explain

#: the properties an item can expect, in report order
PROPERTIES = (
    "json_valid", "tool_call", "refusal", "citation", "length", "finish_reason",
    "contains", "not_contains", "regex", "json_fields",
)


class GoldenFileError(ValueError):
    """A golden file cannot be used; the message names the file, the line and why."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


class _Golden(Strict):
    model_config = ConfigDict(frozen=True)


#: Unknown fields point at the format's reference.
_UNKNOWN = "unknown field (see docs/eval.md for the format)"


def _tool_defaults(tool: Any) -> Any:
    if not isinstance(tool, dict):
        return tool
    out = {"type": "function", **tool}
    if isinstance(out.get("function"), dict):
        out["function"] = {"description": "",
                           "parameters": {"type": "object", "properties": {}},
                           **out["function"]}
    return out


def _request_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the golden format's defaults where the API's request has none.

    A golden file may leave out a tool's ``type``, its function's ``description``
    and ``parameters``, and a JSON schema's ``name``; the item then sends what it
    always sent: ``"function"``, ``""``, an empty object schema and ``"answer"``.
    """
    out = dict(raw)
    if isinstance(out.get("tools"), list):
        out["tools"] = [_tool_defaults(t) for t in out["tools"]]
    fmt = out.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        out["response_format"] = {**fmt, "json_schema": {"name": "answer",
                                                         **fmt["json_schema"]}}
    return out


class ToolCallExpect(_Golden):
    name: str | None = Field(None, description="The tool that must be called (any, if unset).")
    arguments: dict[str, Any] = Field(
        default_factory=dict,
        description="Argument values that must be present and equal (after lower-casing "
        "strings); arguments are always validated against the tool's schema.")


class CitationExpect(_Golden):
    sources: list[str] = Field(
        min_length=1, description="Source markers the answer may cite, e.g. ['[1]']; citing "
        "any one of them passes.")

    def pattern(self) -> str:
        """The serving validator's citation pattern, narrowed to these markers."""
        return "|".join(re.escape(s) for s in self.sources)


class LengthExpect(_Golden):
    min_chars: int | None = Field(None, ge=0, description="Fewest characters in the answer.")
    max_chars: int | None = Field(None, ge=1, description="Most characters in the answer.")
    min_tokens: int | None = Field(None, ge=0, description="Fewest completion tokens.")
    max_tokens: int | None = Field(None, ge=1, description="Most completion tokens.")


class Expect(_Golden):
    """What the answer must be. Unset properties are not checked."""

    json_valid: bool | None = Field(
        None, description="The answer parses as JSON and follows response_format's schema.")
    tool_call: ToolCallExpect | None = Field(
        None, description="A call of a declared tool with schema-valid arguments.")
    refusal: bool | None = Field(None, description="True: must refuse. False: must not.")
    citation: CitationExpect | None = Field(None, description="Source markers to cite.")
    length: LengthExpect | None = Field(None, description="Bounds on the answer's length.")
    finish_reason: Literal["stop"] | None = Field(
        None, description="'stop': the answer must end on its own, not be cut by max_tokens.")
    contains: list[str] = Field(
        default_factory=list, description="Substrings that must all appear (case-insensitive).")
    not_contains: list[str] = Field(
        default_factory=list, description="Substrings that must not appear (case-insensitive).")
    regex: str | None = Field(None, description="A Python regex the answer must match (search).")
    json_fields: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted paths into the JSON answer (or tool arguments) and the values "
        "they must equal; strings compare case-insensitively.")

    @model_validator(mode="after")
    def _regex_compiles(self) -> Expect:
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return self

    def properties(self) -> list[str]:
        """The properties this item checks, in report order."""
        out = []
        for name in PROPERTIES:
            value = getattr(self, name)
            if value not in (None, [], {}):
                out.append(name)
        return out


class GoldenItem(_Golden):
    """A request, in the local API's own request models, and what its answer must be."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$", description="Unique id.")
    category: str = Field(min_length=1, description="Slice of traffic, e.g. json_extraction.")
    messages: list[Message] = Field(min_length=1, description="The chat, ending with the user.")
    tools: list[Tool] = Field(default_factory=list, description="Tools the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="OpenAI tool_choice; 'required' or a named function forces a call.")
    response_format: ResponseFormat | None = Field(None, description="Structured output.")
    max_tokens: int = Field(96, ge=1, le=4096, description="The answer's token budget.")
    expect: Expect = Field(description="What the answer must be.")
    notes: str = Field("", description="Why the item exists, for the people who edit it.")

    @model_validator(mode="before")
    @classmethod
    def _golden_defaults(cls, data: Any) -> Any:
        return _request_defaults(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _coherent(self) -> GoldenItem:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be from the user")
        names = [t.function.name for t in self.tools]
        call = self.expect.tool_call
        if call is not None:
            if not self.tools:
                raise ValueError("expect.tool_call needs tools")
            if call.name is not None and call.name not in names:
                raise ValueError(f"expect.tool_call.name {call.name!r} is not a declared tool "
                                 f"(tools: {', '.join(names)})")
        if self.expect.json_valid is not None and self.response_format is None:
            raise ValueError("expect.json_valid needs a response_format")
        if self.expect.json_fields and self.response_format is None and call is None:
            raise ValueError("expect.json_fields needs a response_format or a tool_call")
        if not self.expect.properties():
            raise ValueError("expect sets no property; an item must check something")
        try:  # the rules across fields (unique tool names, a named tool_choice, ...)
            ChatRequest.model_validate(self.request_body())
        except ValidationError as exc:
            raise ValueError("not a request the agent accepts: "
                             + explain(exc, unknown=_UNKNOWN)) from None
        return self

    def request_body(self) -> dict[str, Any]:
        """The item as an OpenAI chat-completions request body (what the agent serves)."""
        body: dict[str, Any] = {
            "messages": [m.model_dump(exclude_none=True) for m in self.messages],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        if self.tools:
            body["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = (self.tool_choice.model_dump()
                                   if isinstance(self.tool_choice, NamedToolChoice)
                                   else self.tool_choice)
        if self.response_format is not None:
            body["response_format"] = self.response_format.model_dump(
                by_alias=True, exclude_none=True)
        return body

    def response_schema(self) -> dict[str, Any] | None:
        rf = self.response_format
        if not isinstance(rf, JsonSchemaFormat):
            return None
        return rf.json_schema.schema_

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.function.name == name), None)


@dataclass(frozen=True)
class GoldenSet:
    """A validated golden file."""

    path: str
    sha256: str
    items: tuple[GoldenItem, ...]

    @property
    def categories(self) -> list[str]:
        return sorted({i.category for i in self.items})

    def sample(self, n: int | None, seed: int = 0) -> GoldenSet:
        """A seeded subset of ``n`` items, stratified so every category keeps an item.

        The same file, n and seed always give the same items in file order.
        """
        if n is None or n >= len(self.items):
            return self
        if n < 1:
            raise ValueError("--sample must be at least 1")
        rng = random.Random(seed)
        by_cat: dict[str, list[int]] = {}
        for idx, item in enumerate(self.items):
            by_cat.setdefault(item.category, []).append(idx)
        picked: list[int] = []
        cats = sorted(by_cat)
        rng.shuffle(cats)
        for cat in cats[:n]:  # one per category first, while n allows
            picked.append(rng.choice(by_cat[cat]))
        rest = [i for i in range(len(self.items)) if i not in set(picked)]
        picked += rng.sample(rest, n - len(picked))
        return GoldenSet(self.path, self.sha256,
                         tuple(self.items[i] for i in sorted(picked)))


def parse_golden(text: str, path: Path | str = "<golden>") -> GoldenSet:
    """Validate golden JSONL text; raise GoldenFileError at the first bad line."""
    items: list[GoldenItem] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("//"):
            continue  # blank lines and // comments let people group items
        try:
            raw = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise GoldenFileError(path, lineno, f"not JSON ({exc.msg} at column {exc.colno})"
                                  ) from None
        if not isinstance(raw, dict):
            raise GoldenFileError(path, lineno, "an item must be a JSON object")
        try:
            item = GoldenItem.model_validate(raw)
        except ValidationError as exc:
            ident = raw.get("id")
            prefix = f"item {ident!r}: " if isinstance(ident, str) else ""
            raise GoldenFileError(path, lineno,
                                  prefix + explain(exc, unknown=_UNKNOWN)) from None
        if item.id in seen:
            raise GoldenFileError(path, lineno,
                                  f"duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = lineno
        items.append(item)
    if not items:
        raise GoldenFileError(path, None, "no items")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return GoldenSet(str(path), digest, tuple(items))


def load_golden(path: Path | str) -> GoldenSet:
    """Read and validate a golden file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GoldenFileError(p, None, f"cannot read it ({exc})") from None
    return parse_golden(text, p)


def starter_golden_path() -> Path:
    """The starter golden set shipped with the package (models/golden/starter.jsonl)."""
    import quantfleet.models

    return Path(quantfleet.models.__file__).resolve().parent / "golden" / "starter.jsonl"


__all__: Sequence[str] = (
    "PROPERTIES", "Expect", "GoldenFileError", "GoldenItem", "GoldenSet", "load_golden",
    "parse_golden", "starter_golden_path",
)
