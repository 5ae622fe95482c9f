"""Output validation: pure checks over a model's answer, one ``ValidationOutcome`` each.

Quantization breaks structured output first, so every answer the agent serves
is checked here and every outcome is recorded. The same functions serve the
offline evaluator (golden sets), the agent's pre-flight and the live API, so a
"pass" means the same thing everywhere. Nothing here touches a model, a
socket or a clock: inputs are text and plain data, outputs are lists of
:class:`quantfleet.agent.wire.ValidationOutcome` (``kind``, ``passed``,
``detail``; the detail never quotes user content).

Entry points
------------

``validate_response(text, spec, finish_reason=..., tool_calls=..., completion_tokens=...)``
    Runs every check ``spec`` (a :class:`ValidationSpec`) asks for and returns
    all outcomes, in a stable order. This is what the server and the evaluator
    call. When the answer is a tool call (``tool_calls``), the JSON checks of
    ``json_expected`` / ``json_schema`` are skipped: with tools and a response
    format a call is checked as a call, any other answer against the format.

The single checks, usable on their own:

``check_json(text, schema=None)``
    ``json_parse`` (the text is one JSON value) and, given a schema,
    ``json_schema`` (the value matches it; the first error's path is the detail).
``check_tool_calls(calls, tools)``
    One ``tool_call`` outcome per call: it names a tool from ``tools`` (OpenAI
    ``{"type": "function", "function": {...}}`` shapes or bare function dicts)
    and its arguments (a JSON string or a dict) validate against that tool's
    ``parameters`` schema. ``tool_calls_required=True`` in the spec adds a
    failing outcome when no call was made.
``check_refusal(text, expected=False, patterns=DEFAULT_REFUSAL_PATTERNS)``
    ``refusal`` passes when refusing matches what was expected; ``detect_refusal``
    returns the bare boolean.
``check_citation(text, pattern=DEFAULT_CITATION_PATTERN)``
    ``citation`` passes when the answer cites something (``[1]``, ``[source: x]``,
    a URL, ...).
``check_length(completion_tokens, text, min_tokens, max_tokens, min_chars, max_chars)``
    ``length`` bounds.
``check_finish_reason(finish_reason)``
    ``finish_reason`` fails on ``"length"`` (the answer was cut off) and on
    ``"cancelled"``.
``schema_problem(schema)``
    Why a request's JSON Schema is not a valid JSON Schema, or ``None``.

``failures(outcomes)`` keeps the failed ones; ``FALLBACK_KINDS`` are the kinds
whose failure makes the agent retry on its fallback variant by default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quantfleet.agent.wire import ValidationOutcome

# Phrases small instruction-tuned models use when they decline. Matched
# case-insensitively anywhere in the first part of the answer: a refusal that
# only shows up after a paragraph of content is not a refusal to the user.
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI(?:'m| am) (?:sorry|afraid)\b.{0,40}\b(?:can(?:no|')t|unable|not able)\b",
    r"\bI can(?:no|')t (?:help|assist|provide|do|comply|answer|fulfil)",
    r"\bI(?:'m| am) (?:unable|not able) to (?:help|assist|provide|do|comply|answer)",
    r"\bI (?:won't|will not) (?:help|assist|provide|do|comply)",
    r"\bas an AI(?: language model)?\b",
    r"\bI(?:'m| am) not (?:allowed|permitted|comfortable)\b",
    r"\bI must (?:decline|refuse)\b",
    r"\b(?:cannot|can't) (?:comply|fulfil|fulfill) (?:with )?(?:that|this|your)",
)
REFUSAL_WINDOW_CHARS = 300

# A citation: a numbered or named bracket reference, a URL, or "Source:".
DEFAULT_CITATION_PATTERN = (
    r"\[\d+\]|\[(?:source|ref|doc)[^\]]*\]|https?://\S+|\b(?:source|sources|reference)s?:\s*\S"
)

# Failures that mean the answer is unusable for a program; the agent retries
# these on the fallback variant unless its config says otherwise.
FALLBACK_KINDS: frozenset[str] = frozenset({"json_parse", "json_schema", "tool_call"})


@dataclass(frozen=True)
class ValidationSpec:
    """What to check on one answer. Empty spec: only ``finish_reason`` is checked."""

    json_expected: bool = False
    json_schema: Mapping[str, Any] | None = None
    tools: Sequence[Mapping[str, Any]] = ()
    tool_calls_required: bool = False
    check_refusal: bool = True
    refusal_expected: bool = False
    refusal_patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS
    citation_required: bool = False
    citation_pattern: str = DEFAULT_CITATION_PATTERN
    min_tokens: int | None = None
    max_tokens: int | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    check_finish_reason: bool = True


def _outcome(kind: str, passed: bool, detail: str = "") -> ValidationOutcome:
    return ValidationOutcome(kind=kind, passed=passed, detail=detail[:200])


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a usable JSON Schema (None when it is)."""
    if not isinstance(schema, dict):
        return "a JSON Schema must be an object"
    # jsonschema (with referencing, rpds and attrs: 5 MB) is imported by the first
    # request that brings a schema, not with the agent: many devices never see one.
    from jsonschema import exceptions as js_exceptions
    from jsonschema import validators as js_validators

    try:
        cls = js_validators.validator_for(schema)
        cls.check_schema(schema)
    except js_exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"invalid JSON Schema at {where}: {exc.message}"
    except (js_exceptions.UnknownType, TypeError, ValueError) as exc:
        return f"invalid JSON Schema: {exc}"
    return None


def _schema_errors(instance: Any, schema: Mapping[str, Any]) -> str | None:
    from jsonschema import exceptions as js_exceptions  # see schema_problem
    from jsonschema import validators as js_validators

    try:
        cls = js_validators.validator_for(schema)
        validator = cls(schema)
        error = js_exceptions.best_match(validator.iter_errors(instance))
    except Exception as exc:  # unresolvable $ref, bad regex, ...: the schema, not the answer
        return f"schema unusable: {type(exc).__name__}"
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"at {where}: {error.validator} failed"


def parse_json(text: str) -> tuple[Any, str | None]:
    """(value, None) when ``text`` is exactly one JSON value, else (None, why)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc.msg} at char {exc.pos}"
    except RecursionError:
        return None, "not JSON: nested too deeply"


def check_json(text: str, schema: Mapping[str, Any] | None = None) -> list[ValidationOutcome]:
    """``json_parse``, then ``json_schema`` when a schema is given (fails if unparsable)."""
    value, why = parse_json(text)
    out = [_outcome("json_parse", why is None, why or "")]
    if schema is not None:
        if why is not None:
            out.append(_outcome("json_schema", False, "no JSON to validate"))
        else:
            err = _schema_errors(value, schema)
            out.append(_outcome("json_schema", err is None, err or ""))
    return out


def tool_function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function part of an OpenAI tool (``{"type": "function", "function": {...}}``)."""
    fn = tool.get("function")
    return fn if isinstance(fn, Mapping) else tool


def tool_index(tools: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Tool name -> its parameters schema (``{}`` when it declares none)."""
    index: dict[str, Mapping[str, Any]] = {}
    for tool in tools:
        fn = tool_function(tool)
        name = fn.get("name")
        if isinstance(name, str):
            params = fn.get("parameters")
            index[name] = params if isinstance(params, Mapping) else {}
    return index


def check_tool_calls(
    calls: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
) -> list[ValidationOutcome]:
    """One ``tool_call`` outcome per call.

    A call is OpenAI-shaped (``{"function": {"name", "arguments"}}``) or bare
    (``{"name", "arguments"}``); ``arguments`` is a JSON string or a dict.
    """
    index = tool_index(tools)
    out: list[ValidationOutcome] = []
    for call in calls:
        fn = call.get("function") if isinstance(call.get("function"), Mapping) else call
        assert isinstance(fn, Mapping)
        name = fn.get("name")
        if not isinstance(name, str) or name not in index:
            out.append(_outcome("tool_call", False, "names no declared tool"))
            continue
        args: Any = fn.get("arguments", {})
        if isinstance(args, str):
            args, why = parse_json(args)
            if why is not None:
                out.append(_outcome("tool_call", False, f"{name}: arguments {why}"))
                continue
        if not isinstance(args, dict):
            out.append(_outcome("tool_call", False, f"{name}: arguments are not an object"))
            continue
        err = _schema_errors(args, index[name]) if index[name] else None
        out.append(_outcome("tool_call", err is None, f"{name}: arguments {err}" if err else name))
    return out


def detect_refusal(text: str, patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS) -> bool:
    """Whether the start of ``text`` reads as the model declining."""
    head = text[:REFUSAL_WINDOW_CHARS]
    return any(re.search(p, head, re.IGNORECASE | re.DOTALL) for p in patterns)


def check_refusal(
    text: str, expected: bool = False, patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS
) -> ValidationOutcome:
    """``refusal`` passes when the answer refuses exactly when a refusal was expected."""
    refused = detect_refusal(text, patterns)
    if refused == expected:
        return _outcome("refusal", True, "refused" if refused else "")
    return _outcome("refusal", False, "refused" if refused else "did not refuse")


def check_citation(text: str, pattern: str = DEFAULT_CITATION_PATTERN) -> ValidationOutcome:
    found = re.search(pattern, text, re.IGNORECASE) is not None
    return _outcome("citation", found, "" if found else "no citation found")


def check_length(
    completion_tokens: int | None,
    text: str,
    *,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    min_chars: int | None = None,
    max_chars: int | None = None,
) -> ValidationOutcome:
    problems = []
    if completion_tokens is not None:
        if min_tokens is not None and completion_tokens < min_tokens:
            problems.append(f"{completion_tokens} tokens < {min_tokens}")
        if max_tokens is not None and completion_tokens > max_tokens:
            problems.append(f"{completion_tokens} tokens > {max_tokens}")
    n = len(text)
    if min_chars is not None and n < min_chars:
        problems.append(f"{n} chars < {min_chars}")
    if max_chars is not None and n > max_chars:
        problems.append(f"{n} chars > {max_chars}")
    return _outcome("length", not problems, "; ".join(problems))


def check_finish_reason(finish_reason: str | None) -> ValidationOutcome:
    """Truncation by the token limit (or a cancelled generation) is a failure signal."""
    if finish_reason in ("length", "cancelled"):
        return _outcome("finish_reason", False, f"finish_reason={finish_reason}")
    return _outcome("finish_reason", True, finish_reason or "")


def validate_response(
    text: str,
    spec: ValidationSpec,
    *,
    finish_reason: str | None = None,
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
    completion_tokens: int | None = None,
) -> list[ValidationOutcome]:
    """Every check ``spec`` asks for, in a stable order (json, tools, refusal, ...)."""
    out: list[ValidationOutcome] = []
    # With tools and a response format, the answer is one or the other: a call
    # is checked as a call, and only an answer that is not one as JSON.
    if (spec.json_expected or spec.json_schema is not None) and not tool_calls:
        out.extend(check_json(text, spec.json_schema))
    if tool_calls:
        out.extend(check_tool_calls(tool_calls, spec.tools))
    elif spec.tool_calls_required:
        out.append(_outcome("tool_call", False, "no tool call made"))
    # A JSON answer or a tool call is not prose: refusal phrases inside it are data.
    structured = bool(tool_calls) or spec.json_expected or spec.json_schema is not None
    if spec.check_refusal and (spec.refusal_expected or not structured):
        out.append(check_refusal(text, spec.refusal_expected, spec.refusal_patterns))
    if spec.citation_required:
        out.append(check_citation(text, spec.citation_pattern))
    if any(v is not None for v in (spec.min_tokens, spec.max_tokens, spec.min_chars,
                                    spec.max_chars)):
        out.append(check_length(completion_tokens, text, min_tokens=spec.min_tokens,
                                max_tokens=spec.max_tokens, min_chars=spec.min_chars,
                                max_chars=spec.max_chars))
    if spec.check_finish_reason and finish_reason is not None:
        out.append(check_finish_reason(finish_reason))
    return out


def failures(outcomes: Iterable[ValidationOutcome]) -> list[ValidationOutcome]:
    return [o for o in outcomes if not o.passed]
