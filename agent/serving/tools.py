"""Tool calling for models without a native tool format: prompt, constraint, parse.

SmolLM2 (and most small models) have no tool-calling template, so the agent
describes the tools in the system prompt and constrains the answer:

``tools_system_text(tools)``
    The text appended to the system message: how to call, then one line per
    tool with its description and parameter schema.
``tool_call_schema(tools, only=None)``
    JSON Schema of one call: ``{"name": <that tool>, "arguments": <its
    parameters>}`` as an ``anyOf`` over the tools (or just ``only``).
``call_or_value_schema(call, response_schema)``
    JSON Schema of "a call or a value in the response format": ``anyOf`` the
    two, with the response schema's ``$defs`` / ``definitions`` lifted to the
    root so its ``#/$defs/...`` references still resolve.
``constraint_for(tools, tool_choice, response_schema=None)``
    What to hand the backend: ``("json_schema", schema)`` when a call is
    required (``"required"`` or a named function), ``("grammar", gbnf)`` for
    ``"auto"`` — the model may either start a JSON call (``{``) that must then
    be a valid call, or write prose — and ``("none", None)`` for ``"none"``.
    With ``"auto"`` and a JSON ``response_format`` (``response_schema``) it is
    ``("json_schema", call_or_value_schema(...))``: a call or an answer in the
    format, nothing else; llama.cpp compiles it to one grammar, other backends
    validate and retry against it. A required call ignores the response format.
    The auto grammar needs llama.cpp's GBNF; other backends get ``("none",
    None)`` and the answer is parsed afterwards.
``parse_tool_calls(text, tools)``
    The model's text -> OpenAI ``tool_calls`` (``[{"id", "type": "function",
    "function": {"name", "arguments": <JSON string>}}]``) or ``None`` when the
    text is not a call to a declared tool.
``messages_for_template(messages, tools, tool_choice)``
    OpenAI messages -> plain ``{"role", "content"}`` dicts a chat template can
    render: content parts joined, assistant ``tool_calls`` written back as the
    JSON the model would have produced, ``tool`` results labelled, and the
    tool description merged into the system message.

Everything here is pure and shared by the HTTP server and the evaluator.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .validation import parse_json, tool_function, tool_index

ToolChoice = str | Mapping[str, Any] | None
ConstraintKind = Literal["json_schema", "grammar", "none"]

CALL_INSTRUCTIONS = (
    "You can call functions. To call one, reply with only a JSON object "
    '{"name": <function name>, "arguments": <object matching its parameters>} and nothing '
    "else. If no function fits, answer normally in plain text."
)
REQUIRED_INSTRUCTIONS = (
    "You must call one of these functions. Reply with only a JSON object "
    '{"name": <function name>, "arguments": <object matching its parameters>}.'
)


def chosen_function(tool_choice: ToolChoice) -> str | None:
    """The function name a ``{"type": "function", "function": {"name": ...}}`` choice forces."""
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            return str(fn["name"])
    return None


def call_required(tool_choice: ToolChoice) -> bool:
    return tool_choice == "required" or chosen_function(tool_choice) is not None


def tools_system_text(tools: Sequence[Mapping[str, Any]], tool_choice: ToolChoice = "auto") -> str:
    only = chosen_function(tool_choice)
    lines = [REQUIRED_INSTRUCTIONS if call_required(tool_choice) else CALL_INSTRUCTIONS,
             "Functions:"]
    for tool in tools:
        fn = tool_function(tool)
        name = fn.get("name")
        if only is not None and name != only:
            continue
        desc = str(fn.get("description") or "").strip()
        params = json.dumps(fn.get("parameters") or {"type": "object"}, separators=(",", ":"))
        lines.append(f"- {name}: {desc} Parameters: {params}".replace("  ", " "))
    return "\n".join(lines)


def tool_call_schema(tools: Sequence[Mapping[str, Any]], only: str | None = None) -> dict[str, Any]:
    alternatives = []
    for name, params in tool_index(tools).items():
        if only is not None and name != only:
            continue
        alternatives.append({
            "type": "object",
            "properties": {"name": {"const": name},
                           "arguments": dict(params) or {"type": "object"}},
            "required": ["name", "arguments"],
        })
    if len(alternatives) == 1:
        return alternatives[0]
    return {"anyOf": alternatives}


def call_or_value_schema(call: Mapping[str, Any],
                         response_schema: Mapping[str, Any]) -> dict[str, Any]:
    """A tool call (``call``, from :func:`tool_call_schema`) or a value of ``response_schema``."""
    value = dict(response_schema)
    # References inside the response schema point at its own root ("#/$defs/X");
    # under anyOf that root is the union's, so its definitions move up there.
    lifted: dict[str, Any] = {key: value.pop(key) for key in ("$defs", "definitions")
                              if key in value}
    value.pop("$schema", None)
    return {"anyOf": [dict(call), value], **lifted}


def _auto_grammar(schema: Mapping[str, Any]) -> str | None:
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:
        return None
    try:
        call = json_schema_to_gbnf(json.dumps(schema))
    except Exception:  # the converter raises bare Exceptions; fall back to parsing only
        return None
    # The converter names its start rule "root"; keep it as one alternative and
    # let prose be the other: anything that does not open with "{" or blank.
    call = str(call).replace("root ::=", "toolcall ::=", 1)
    return call + "\nroot ::= toolcall | prose\nprose ::= [^{ \\t\\n] [^\\x00]*\n"


def constraint_for(
    tools: Sequence[Mapping[str, Any]], tool_choice: ToolChoice, *, grammar_ok: bool = True,
    response_schema: Mapping[str, Any] | None = None,
) -> tuple[ConstraintKind, Any]:
    if not tools or tool_choice == "none":
        return "none", None
    only = chosen_function(tool_choice)
    schema = tool_call_schema(tools, only)
    if call_required(tool_choice):
        return "json_schema", schema
    if response_schema is not None:
        return "json_schema", call_or_value_schema(schema, response_schema)
    if grammar_ok:
        grammar = _auto_grammar(schema)
        if grammar is not None:
            return "grammar", grammar
    return "none", None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` from the model's text, or None when it is not a tool call.

    The text is a call when it is a JSON object (or a list of them) with a
    ``name`` of a declared tool. Arguments are passed on as the model wrote
    them (re-serialised); whether they satisfy the schema is validation's job.
    """
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return None
    value, why = parse_json(stripped)
    if why is not None:
        return None
    items = value if isinstance(value, list) else [value]
    names = tool_index(tools)
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        calls.append({
            "id": new_call_id(),
            "type": "function",
            "function": {"name": item["name"], "arguments": json.dumps(args)},
        })
    return calls or None


def content_text(content: Any) -> str:
    """OpenAI message content (a string, parts, or None) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        text = part.get("text") if isinstance(part, Mapping) else getattr(part, "text", None)
        if text is not None:
            parts.append(str(text))
    return "".join(parts)


def messages_for_template(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] = (),
    tool_choice: ToolChoice = "auto",
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for m in messages:
        role = str(m.get("role"))
        text = content_text(m.get("content"))
        if role == "developer":  # the newer name for system instructions
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function", {})
                args, why = parse_json(fn.get("arguments") or "{}")
                calls.append(json.dumps({"name": fn.get("name"),
                                         "arguments": args if why is None else {}}))
            text = "\n".join(filter(None, [text, *calls]))
        elif role == "tool":
            label = m.get("name") or m.get("tool_call_id") or "function"
            text = f"Result of {label}: {text}"
        out.append({"role": role, "content": text})
    if tools and tool_choice != "none":
        desc = tools_system_text(tools, tool_choice)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"].rstrip() + "\n\n" + desc}
        else:
            out.insert(0, {"role": "system", "content": desc})
    return out
