"""An answer against an item's expectations: the serving validators plus the expected content."""

from __future__ import annotations

import json
from typing import Any

from quantfleet.agent.quality.checks import check_item, validation_spec
from quantfleet.agent.quality.golden import GoldenItem

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def item(**kw: Any) -> GoldenItem:
    base: dict[str, Any] = {"id": "t", "category": "c",
                            "messages": [{"role": "user", "content": "q"}]}
    base.update(kw)
    return GoldenItem.model_validate(base)


def call(name: str, **args: Any) -> dict[str, Any]:
    return {"id": "call_1", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


def test_json_answer_properties() -> None:
    it = item(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"]}}},
        expect={"json_valid": True, "json_fields": {"name": "ada lovelace", "age": 36}})
    _, props = check_item(it, '{"name": "Ada Lovelace", "age": 36}', finish_reason="stop",
                          tool_calls=[], completion_tokens=12)
    assert props == {"json_valid": True, "json_fields": True}
    outcomes, props = check_item(it, '{"name": "Ada", "age": "36"}', finish_reason="stop",
                                 tool_calls=[], completion_tokens=12)
    assert props == {"json_valid": False, "json_fields": False}
    assert {o.kind for o in outcomes} == {"json_parse", "json_schema", "json_fields"}
    _, props = check_item(it, '{"name": "Ada Lovelace", "age": 3', finish_reason="length",
                          tool_calls=[], completion_tokens=48)
    assert props == {"json_valid": False, "json_fields": False}


def test_tool_call_needs_the_right_tool_and_values() -> None:
    it = item(tools=[WEATHER], tool_choice="required",
              expect={"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}},
                      "finish_reason": "stop"})
    ok = check_item(it, "", finish_reason="tool_calls", tool_calls=[call("get_weather",
                                                                         city="paris")],
                    completion_tokens=20)[1]
    assert ok == {"tool_call": True, "finish_reason": True}
    wrong_value = check_item(it, "", finish_reason="tool_calls",
                             tool_calls=[call("get_weather", city="Rome")],
                             completion_tokens=20)[1]
    assert wrong_value["tool_call"] is False
    invalid = check_item(it, "", finish_reason="tool_calls",
                         tool_calls=[call("get_weather", town="Paris")], completion_tokens=20)
    assert invalid[1]["tool_call"] is False
    assert any(o.kind == "tool_call" and "arguments" in o.detail for o in invalid[0])
    none = check_item(it, "It is sunny.", finish_reason="length", tool_calls=[],
                      completion_tokens=48)[1]
    assert none == {"tool_call": False, "finish_reason": False}


def test_refusal_citation_and_content() -> None:
    refuse = item(expect={"refusal": True, "length": {"max_chars": 40}})
    assert check_item(refuse, "I can't help with that.", finish_reason="stop", tool_calls=[],
                      completion_tokens=7)[1] == {"refusal": True, "length": True}
    assert check_item(refuse, "Sure! Step one: " + "x" * 40, finish_reason="stop",
                      tool_calls=[], completion_tokens=30)[1] == {"refusal": False,
                                                                  "length": False}
    grounded = item(expect={"citation": {"sources": ["[2]"]}, "contains": ["6650"],
                            "not_contains": ["Everest"], "regex": r"\bkm\b"})
    good = "The Nile is 6650 km long. [2]"
    assert all(check_item(grounded, good, finish_reason="stop", tool_calls=[],
                          completion_tokens=10)[1].values())
    wrong_source = check_item(grounded, "The Nile is 6650 km long. [1]", finish_reason="stop",
                              tool_calls=[], completion_tokens=10)[1]
    assert wrong_source["citation"] is False and wrong_source["contains"] is True
    assert validation_spec(grounded).citation_pattern == r"\[2\]"


def test_only_expected_properties_are_judged() -> None:
    chat = item(expect={"contains": ["Paris"]})
    outcomes, props = check_item(chat, "I can't help with that. Paris.", finish_reason="length",
                                 tool_calls=[], completion_tokens=48)
    assert props == {"contains": True}
    assert {o.kind for o in outcomes} == {"contains"}


def test_a_tool_call_is_not_the_response_format_an_item_expects() -> None:
    """With tools and a response_format the answer may be a call; json_valid then fails."""
    it = item(tools=[WEATHER], response_format={"type": "json_object"},
              expect={"json_valid": True})
    outcomes, props = check_item(it, '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                                 finish_reason="tool_calls",
                                 tool_calls=[call("get_weather", city="Oslo")],
                                 completion_tokens=20)
    assert props == {"json_valid": False}
    assert ("json_parse", False) in [(o.kind, o.passed) for o in outcomes]
    _, props = check_item(it, '{"city": "Oslo"}', finish_reason="stop", tool_calls=[],
                          completion_tokens=8)
    assert props == {"json_valid": True}
