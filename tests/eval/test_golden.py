"""The golden-set format: the starter set, and every kind of bad file rejected with file:line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantfleet.agent.quality.golden import (
    GoldenFileError,
    GoldenSet,
    load_golden,
    parse_golden,
)

GOOD: dict[str, Any] = {
    "id": "ok-1", "category": "chat",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "expect": {"contains": ["Paris"]},
}


def line(**changes: Any) -> str:
    item = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            item.pop(key, None)
        else:
            item[key] = value
    return json.dumps(item)


def test_starter_set_covers_real_edge_traffic(starter: GoldenSet) -> None:
    assert len(starter.items) >= 60
    cats = Counter(i.category for i in starter.items)
    assert set(cats) == {"json_extraction", "tool_call", "refusal", "grounded", "chat"}
    assert min(cats.values()) >= 10
    props = Counter(p for i in starter.items for p in i.expect.properties())
    # every property the evaluator reports is exercised by enough items to be judged
    for prop in ("json_valid", "tool_call", "refusal", "citation", "finish_reason",
                 "contains", "json_fields", "length"):
        assert props[prop] >= 5, prop
    assert any(i.expect.refusal is False for i in starter.items), "over-refusal is checked too"
    assert len(starter.sha256) == 64


def test_a_request_body_is_what_the_agent_serves(starter: GoldenSet) -> None:
    from quantfleet.agent.serving.protocol import ChatRequest

    tool_item = next(i for i in starter.items if i.tools)
    body = tool_item.request_body()
    req = ChatRequest.model_validate(body)
    assert req.tool_dicts()[0]["function"]["name"] == tool_item.tools[0].function.name
    json_item = next(i for i in starter.items if i.response_format is not None)
    assert ChatRequest.model_validate(json_item.request_body()).response_format is not None


def test_malformed_line_names_file_and_line(golden_file) -> None:  # type: ignore[no-untyped-def]
    path = golden_file(line(), line(id="ok-2"), '{"id": "broken", ')
    with pytest.raises(GoldenFileError) as err:
        load_golden(path)
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: not JSON")


def test_unknown_property_is_rejected(golden_file) -> None:  # type: ignore[no-untyped-def]
    path = golden_file(line(), line(id="ok-2", expect={"contains": ["x"], "sentiment": "happy"}))
    with pytest.raises(GoldenFileError, match=r":2: item 'ok-2': expect.sentiment: unknown field"):
        load_golden(path)


def test_unknown_top_level_field_is_rejected(golden_file) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GoldenFileError, match=r":1: .*temperture: unknown field"):
        load_golden(golden_file(line(temperture=0.5)))


def test_invalid_response_schema_is_rejected(golden_file) -> None:  # type: ignore[no-untyped-def]
    fmt = {"type": "json_schema",
           "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    path = golden_file(line(), line(id="bad-schema", response_format=fmt,
                                    expect={"json_valid": True}))
    with pytest.raises(GoldenFileError) as err:
        load_golden(path)
    assert err.value.line == 2
    assert "response_format.json_schema.json_schema.schema: invalid JSON Schema" \
        in err.value.reason


def test_invalid_tool_schema_is_rejected(golden_file) -> None:  # type: ignore[no-untyped-def]
    tools = [{"type": "function",
              "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}]
    with pytest.raises(GoldenFileError,
                       match=r":1: .*tools\.0\.function\.parameters: .*invalid JSON Schema"):
        load_golden(golden_file(line(tools=tools, expect={"tool_call": {"name": "f"}})))


@pytest.mark.parametrize("changes", [
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"tools": [{"type": "function", "function": {"name": "no spaces"}}],
     "expect": {"tool_call": {}}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x" * 65, "schema": {}}},
     "expect": {"json_valid": True}},
])
def test_the_request_is_refused_in_the_apis_own_words(golden_file,  # type: ignore[no-untyped-def]
                                                      changes: dict[str, Any]) -> None:
    """A golden item's request is made of the local API's request models."""
    from pydantic import ValidationError

    from quantfleet.agent.serving.protocol import ChatRequest
    from quantfleet.strict import problems

    request = {k: v for k, v in json.loads(line(**changes)).items()
               if k in ("messages", "tools", "response_format")}
    with pytest.raises(ValidationError) as api:
        ChatRequest.model_validate(request)
    with pytest.raises(GoldenFileError) as err:
        load_golden(golden_file(line(**changes)))
    assert err.value.reason == f"item 'ok-1': {problems(api.value)[0]}"


def test_a_file_may_leave_out_what_the_format_defaults(golden_file) -> None:  # type: ignore[no-untyped-def]
    """Files written before items embedded the API's models load, and send the same body."""
    tools = [{"function": {"name": "f"}}]  # no type, description or parameters
    fmt = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}  # no name
    tool_item, json_item = load_golden(golden_file(
        line(tools=tools, tool_choice="required", expect={"tool_call": {"name": "f"}}),
        line(id="ok-2", response_format=fmt, expect={"json_valid": True}))).items
    assert tool_item.request_body()["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "", "parameters": {"type": "object", "properties": {}}}}]
    assert json_item.request_body()["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    assert json_item.response_schema() == {"type": "object"}


@pytest.mark.parametrize(("changes", "reason"), [
    ({"expect": {}}, "expect sets no property"),
    ({"expect": {"regex": "(unclosed"}}, "regex does not compile"),
    ({"expect": {"tool_call": {"name": "f"}}}, "expect.tool_call needs tools"),
    ({"expect": {"json_valid": True}}, "expect.json_valid needs a response_format"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "the last message must be from the user"),
    ({"messages": []}, "messages"),
    ({"id": "has space"}, "id"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2,
      "expect": {"tool_call": {"name": "f"}}},
     "not a request the agent accepts: .*function names must be unique"),
])
def test_incoherent_items_are_rejected(golden_file, changes: dict[str, Any],  # type: ignore[no-untyped-def]
                                       reason: str) -> None:
    with pytest.raises(GoldenFileError, match=reason) as err:
        load_golden(golden_file(line(**changes)))
    assert err.value.line == 1


def test_undeclared_tool_name(golden_file) -> None:  # type: ignore[no-untyped-def]
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(GoldenFileError, match="'g' is not a declared tool"):
        load_golden(golden_file(line(tools=tools, expect={"tool_call": {"name": "g"}})))


def test_duplicate_ids_name_both_lines(golden_file) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GoldenFileError, match=r":3: duplicate id 'ok-1' \(first on line 1\)"):
        load_golden(golden_file(line(), line(id="ok-2"), line()))


def test_blank_lines_and_comments_keep_line_numbers(golden_file) -> None:  # type: ignore[no-untyped-def]
    path = golden_file("// chat items", "", line(), "", line(id="x", expect={"oops": 1}))
    with pytest.raises(GoldenFileError) as err:
        load_golden(path)
    assert err.value.line == 5


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n// nothing\n")
    with pytest.raises(GoldenFileError, match="no items"):
        load_golden(empty)
    with pytest.raises(GoldenFileError, match="cannot read it"):
        load_golden(tmp_path / "missing.jsonl")


def test_sample_is_seeded_stratified_and_ordered(starter: GoldenSet) -> None:
    a = starter.sample(10, seed=3)
    b = starter.sample(10, seed=3)
    c = starter.sample(10, seed=4)
    assert [i.id for i in a.items] == [i.id for i in b.items]
    assert [i.id for i in a.items] != [i.id for i in c.items]
    assert len(a.items) == 10
    assert {i.category for i in a.items} == set(starter.categories)
    order = {i.id: n for n, i in enumerate(starter.items)}
    assert [order[i.id] for i in a.items] == sorted(order[i.id] for i in a.items)
    assert starter.sample(None) is starter and starter.sample(1000) is starter
    assert len(starter.sample(2).items) == 2


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_any_text_is_either_a_golden_set_or_a_located_error(text: str) -> None:
    try:
        parsed = parse_golden(text, "fuzz.jsonl")
    except GoldenFileError as exc:
        assert str(exc).startswith("fuzz.jsonl")
    else:
        assert parsed.items


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["id", "category", "messages", "expect", "tools",
                                        "response_format", "max_tokens", "tool_choice",
                                        "bogus"]), json_values, max_size=6))
def test_any_json_object_is_either_an_item_or_a_located_error(raw: dict[str, Any]) -> None:
    text = json.dumps(raw)
    try:
        parse_golden(text, "fuzz.jsonl")
    except GoldenFileError as exc:
        assert exc.line == 1 and exc.reason


def test_every_property_and_policy_field_is_documented() -> None:
    """docs/eval.md is the format's reference; it must not drift from the models."""
    from quantfleet.agent.quality.golden import Expect, GoldenItem
    from quantfleet.agent.quality.verdict import VerdictPolicy

    doc = (Path(__file__).resolve().parents[2] / "docs" / "eval.md").read_text()
    for model in (Expect, GoldenItem, VerdictPolicy):
        for name in model.model_fields:
            assert f"`{name}" in doc, f"{model.__name__}.{name} is not in docs/eval.md"
