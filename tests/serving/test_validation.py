"""Output validation: pure functions over text, the same for the API and the evaluator."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from quantfleet.agent.serving.validation import (
    ValidationSpec,
    check_citation,
    check_finish_reason,
    check_json,
    check_length,
    check_refusal,
    check_tool_calls,
    detect_refusal,
    failures,
    schema_problem,
    validate_response,
)

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def kinds(outcomes):
    return [(o.kind, o.passed) for o in outcomes]


def test_json_valid_against_schema():
    assert kinds(check_json('{"name": "Ada", "age": 36}', PERSON)) == [
        ("json_parse", True), ("json_schema", True)]


def test_json_schema_mismatch_names_the_path():
    out = check_json('{"name": "Ada", "age": -1}', PERSON)
    assert kinds(out) == [("json_parse", True), ("json_schema", False)]
    assert "age" in out[1].detail and "minimum" in out[1].detail


def test_unparsable_json_fails_both():
    out = check_json('{"name": "Ada", ', PERSON)
    assert kinds(out) == [("json_parse", False), ("json_schema", False)]
    assert out[0].detail.startswith("not JSON")


def test_json_without_schema_only_parses():
    assert kinds(check_json("[1, 2]")) == [("json_parse", True)]
    assert kinds(check_json("yes")) == [("json_parse", False)]


def test_schema_problem():
    assert schema_problem(PERSON) is None
    assert "must be an object" in schema_problem([1])  # type: ignore[operator]
    problem = schema_problem({"type": "no-such-type"})
    assert problem is not None and "invalid JSON Schema" in problem
    assert schema_problem({"properties": {"a": {"minimum": "x"}}}) is not None


def test_tool_call_valid_openai_shape_and_bare():
    calls = [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"name": "get_weather", "arguments": {"city": "Lima"}},
    ]
    assert kinds(check_tool_calls(calls, [WEATHER])) == [("tool_call", True)] * 2


def test_tool_call_failures_are_specific():
    out = check_tool_calls([
        {"name": "launch_rocket", "arguments": {}},
        {"name": "get_weather", "arguments": "{city: Oslo}"},
        {"name": "get_weather", "arguments": {"town": "Oslo"}},
        {"name": "get_weather", "arguments": "[1]"},
    ], [WEATHER])
    assert [o.passed for o in out] == [False] * 4
    assert out[0].detail == "names no declared tool"
    assert "not JSON" in out[1].detail
    assert "required" in out[2].detail
    assert "not an object" in out[3].detail


def test_tool_without_parameters_accepts_any_object():
    tool = {"type": "function", "function": {"name": "ping"}}
    assert kinds(check_tool_calls([{"name": "ping", "arguments": "{}"}], [tool])) == [
        ("tool_call", True)]


def test_refusal_default_patterns():
    assert detect_refusal("I'm sorry, but I can't help with that.")
    assert detect_refusal("I cannot provide instructions for that.")
    assert detect_refusal("As an AI language model, I do not have opinions.")
    assert not detect_refusal("Paris is the capital of France.")
    assert not detect_refusal("Sorry for the delay: the answer is 42.")


def test_refusal_only_counts_at_the_start():
    assert not detect_refusal("x" * 400 + " I cannot help with that.")


def test_refusal_expected_and_custom_patterns():
    assert check_refusal("I cannot help with that.", expected=True).passed
    assert not check_refusal("Sure, here it is.", expected=True).passed
    assert not check_refusal("I cannot help with that.").passed
    assert check_refusal("Nope.", expected=True, patterns=[r"^nope"]).passed


def test_citation():
    assert check_citation("Water boils at 100 C [1].").passed
    assert check_citation("See https://example.org/x for details").passed
    assert check_citation("Source: the 2019 report").passed
    out = check_citation("Water boils at 100 C.")
    assert not out.passed and out.detail == "no citation found"
    assert check_citation("per (Smith 2020)", r"\(\w+ \d{4}\)").passed


def test_length_bounds():
    assert check_length(10, "abc", min_tokens=5, max_tokens=20).passed
    out = check_length(30, "abc", max_tokens=20, min_chars=5)
    assert not out.passed and "30 tokens > 20" in out.detail and "3 chars < 5" in out.detail


def test_finish_reason_length_is_a_failure():
    assert not check_finish_reason("length").passed
    assert not check_finish_reason("cancelled").passed
    assert check_finish_reason("stop").passed
    assert check_finish_reason("tool_calls").passed


def test_validate_response_json_spec():
    spec = ValidationSpec(json_schema=PERSON)
    out = validate_response('{"name": "Ada", "age": 36}', spec, finish_reason="stop")
    assert kinds(out) == [("json_parse", True), ("json_schema", True), ("finish_reason", True)]
    out = validate_response('{"name": "Ada"', spec, finish_reason="length")
    assert [o.kind for o in failures(out)] == ["json_parse", "json_schema", "finish_reason"]


def test_validate_response_prose_checks_refusal_and_citation():
    spec = ValidationSpec(citation_required=True, max_tokens=50)
    out = validate_response("I'm sorry, but I cannot do that.", spec,
                            finish_reason="stop", completion_tokens=9)
    assert kinds(out) == [("refusal", False), ("citation", False), ("length", True),
                          ("finish_reason", True)]


def test_validate_response_tools():
    spec = ValidationSpec(tools=[WEATHER], tool_calls_required=True)
    ok = validate_response("", spec, finish_reason="tool_calls",
                           tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}])
    assert kinds(ok) == [("tool_call", True), ("finish_reason", True)]
    missing = validate_response("It is sunny.", spec, finish_reason="stop")
    assert ("tool_call", False) in kinds(missing)


@given(st.text(max_size=300))
def test_check_json_never_raises_and_agrees_with_json(text):
    out = check_json(text, PERSON)
    try:
        json.loads(text)
        parsed = True
    except (ValueError, RecursionError):
        parsed = False
    assert out[0].passed is parsed
    assert len(out) == 2


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=10,
))
def test_tool_arguments_of_any_shape_give_one_outcome(args):
    out = check_tool_calls([{"name": "get_weather", "arguments": json.dumps(args)}], [WEATHER])
    assert len(out) == 1
    expect = isinstance(args, dict) and isinstance(args.get("city"), str)
    assert out[0].passed is expect


@given(st.dictionaries(st.sampled_from(["type", "properties", "items", "minimum", "enum"]),
                       st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers()),
                       max_size=4))
def test_schema_problem_never_raises(schema):
    problem = schema_problem(schema)
    assert problem is None or problem.startswith("invalid JSON Schema")
