"""Checking an answer against a golden item's expectations.

The format, schema, tool-call, refusal, citation, length and finish checks are
the serving validators themselves (:mod:`quantfleet.agent.serving.validation`),
called with a spec built from the item, so "passes on the golden set" and
"passes in production" are the same statement. Only what production cannot
know — the expected *content* (substrings, a regex, JSON field values, which
tool with which argument values) — is checked here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from quantfleet.agent.serving.validation import (
    ValidationSpec,
    parse_json,
    tool_function,
    validate_response,
)
from quantfleet.agent.wire import ValidationOutcome

from .golden import GoldenItem

# serving outcome kind -> the golden property it belongs to
_KIND_TO_PROPERTY = {
    "json_parse": "json_valid",
    "json_schema": "json_valid",
    "tool_call": "tool_call",
    "refusal": "refusal",
    "citation": "citation",
    "length": "length",
    "finish_reason": "finish_reason",
}


def validation_spec(item: GoldenItem) -> ValidationSpec:
    """The serving validator's spec for exactly what this item expects."""
    e = item.expect
    length = e.length
    return ValidationSpec(
        json_expected=e.json_valid is not None,
        json_schema=item.response_schema() if e.json_valid is not None else None,
        tools=[t.model_dump(exclude_none=True) for t in item.tools],
        tool_calls_required=e.tool_call is not None,
        check_refusal=e.refusal is not None,
        refusal_expected=bool(e.refusal),
        citation_required=e.citation is not None,
        citation_pattern=e.citation.pattern() if e.citation else ValidationSpec.citation_pattern,
        min_tokens=length.min_tokens if length else None,
        max_tokens=length.max_tokens if length else None,
        min_chars=length.min_chars if length else None,
        max_chars=length.max_chars if length else None,
        check_finish_reason=e.finish_reason is not None,
    )


def _norm(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _lookup(doc: Any, dotted: str) -> tuple[bool, Any]:
    cur = doc
    for part in dotted.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool) \
            and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return float(actual) == float(expected)
    return bool(_norm(actual) == _norm(expected))


def _call_arguments(call: Mapping[str, Any]) -> dict[str, Any] | None:
    args = tool_function(call).get("arguments", {})
    if isinstance(args, str):
        args, why = parse_json(args)
        if why is not None:
            return None
    return args if isinstance(args, dict) else None


def _call_name(call: Mapping[str, Any]) -> Any:
    return tool_function(call).get("name")


def content_outcomes(item: GoldenItem, text: str,
                     tool_calls: Sequence[Mapping[str, Any]]) -> list[ValidationOutcome]:
    """The item's content expectations; ``kind`` is the property name."""
    e = item.expect
    out: list[ValidationOutcome] = []
    low = text.lower()
    if e.contains:
        missing = [s for s in e.contains if s.lower() not in low]
        out.append(ValidationOutcome(kind="contains", passed=not missing,
                                     detail=f"missing {len(missing)} of {len(e.contains)}"
                                     if missing else ""))
    if e.not_contains:
        present = [s for s in e.not_contains if s.lower() in low]
        out.append(ValidationOutcome(kind="not_contains", passed=not present,
                                     detail=f"{len(present)} forbidden present" if present
                                     else ""))
    if e.regex is not None:
        hit = re.search(e.regex, text) is not None
        out.append(ValidationOutcome(kind="regex", passed=hit, detail="" if hit else "no match"))
    if e.tool_call is not None and tool_calls:
        # the serving check proved the call is valid; here: the right tool, the right values
        call = tool_calls[0]
        problems = []
        if e.tool_call.name is not None and _call_name(call) != e.tool_call.name:
            problems.append("another tool was called")
        args = _call_arguments(call) or {}
        for key, want in e.tool_call.arguments.items():
            found, got = _lookup(args, key)
            if not found or not _equal(got, want):
                problems.append(f"argument {key} differs")
        out.append(ValidationOutcome(kind="tool_call", passed=not problems,
                                     detail="; ".join(problems)[:200] or "expected call"))
    if e.json_fields:
        if tool_calls:
            doc: Any = _call_arguments(tool_calls[0])
        else:
            doc, _ = parse_json(text)
        wrong = []
        for key, want in e.json_fields.items():
            found, got = _lookup(doc, key)
            if not found or not _equal(got, want):
                wrong.append(key)
        out.append(ValidationOutcome(kind="json_fields", passed=not wrong,
                                     detail=f"{len(wrong)} field(s) differ: "
                                     + ", ".join(wrong) if wrong else ""))
    return out


def check_item(item: GoldenItem, text: str, *, finish_reason: str,
               tool_calls: Sequence[Mapping[str, Any]], completion_tokens: int
               ) -> tuple[list[ValidationOutcome], dict[str, bool]]:
    """Every outcome for one answer, and pass/fail per expected property."""
    outcomes = validate_response(text, validation_spec(item), finish_reason=finish_reason,
                                 tool_calls=list(tool_calls),
                                 completion_tokens=completion_tokens)
    if item.expect.json_valid is not None and tool_calls:
        # The serving validators check a call as a call and skip the format's
        # checks; an item that expects the format got something else instead.
        outcomes.append(ValidationOutcome(kind="json_parse", passed=False,
                                          detail="a tool call, not the response format"))
    outcomes += content_outcomes(item, text, tool_calls)
    props: dict[str, bool] = {p: True for p in item.expect.properties()}
    for o in outcomes:
        prop = _KIND_TO_PROPERTY.get(o.kind, o.kind)
        if prop in props and not o.passed:
            props[prop] = False
    return outcomes, props
