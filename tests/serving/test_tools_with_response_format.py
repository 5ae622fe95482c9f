"""Tools together with a JSON response_format (issue 16): a call, or an answer in the format.

OpenAI accepts both in one request and LangChain / pydantic-ai rely on it. With
``tool_choice`` "auto" the constraint is the union of a tool call and the
response schema; a call is validated as a call, any other answer against the
format. Scripted answers over the real Q4_K_M's tokenizer force each branch;
the real model shows that what it generates under the union is one or the other.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai

from quantfleet.agent.backends import Backend
from quantfleet.agent.serving.pipeline import complete, prepare
from quantfleet.agent.serving.protocol import ChatRequest
from quantfleet.agent.serving.tools import parse_tool_calls

from .conftest import ScriptedBackend, ServeFactory

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def oa(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def outcomes(resp: Any, key: str = "validations") -> list[tuple[str, bool]]:
    return [(v["kind"], v["passed"]) for v in (resp.model_extra or {})["quantfleet"][key]]


def test_the_request_is_accepted_with_every_tool_choice() -> None:
    for choice in (None, "auto", "none", "required",
                   {"type": "function", "function": {"name": "get_weather"}}):
        for fmt in (FORMAT, {"type": "json_object"}):
            body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}],
                                    "tools": [WEATHER], "response_format": fmt}
            if choice is not None:
                body["tool_choice"] = choice
            ChatRequest.model_validate(body)  # was: "response_format: cannot be combined"


def test_a_tool_call_answer_is_a_validated_call(serve_app: ServeFactory,
                                                loaded: dict[str, Backend]) -> None:
    real = loaded["Q4_K_M"]
    active = ScriptedBackend(real, ['{"name": "get_weather", "arguments": {"city": "Oslo"}}'])
    fallback = ScriptedBackend(real, ["unused"])
    agent = serve_app({"Q4_K_M": active, "Q8_0": fallback})
    resp = oa(agent.v1).chat.completions.create(
        model="default", max_tokens=40, tools=[WEATHER], response_format=FORMAT,
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    kinds = outcomes(resp)
    assert ("tool_call", True) in kinds
    assert not {k for k, _ in kinds} & {"json_parse", "json_schema"}
    assert resp.model == "Q4_K_M" and not fallback.calls
    # The constraint handed to the backend is the union of a call and the format.
    (sent,) = active.calls
    assert sent.grammar is None and sent.json_schema is not None
    call_alt, value_alt = sent.json_schema["anyOf"]
    assert call_alt["properties"]["name"] == {"const": "get_weather"}
    assert value_alt == PERSON


def test_an_answer_in_the_format_is_validated_against_its_schema(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    real = loaded["Q4_K_M"]
    agent = serve_app({"Q4_K_M": ScriptedBackend(real, ['{"name": "Ada", "age": 36}']),
                       "Q8_0": ScriptedBackend(real, ["unused"])})
    resp = oa(agent.v1).chat.completions.create(
        model="default", max_tokens=40, tools=[WEATHER], tool_choice="auto",
        response_format=FORMAT, messages=[{"role": "user", "content": "Ada was 36."}])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert json.loads(choice.message.content or "") == {"name": "Ada", "age": 36}
    kinds = outcomes(resp)
    assert kinds[:2] == [("json_parse", True), ("json_schema", True)]
    assert "tool_call" not in {k for k, _ in kinds}


def test_an_answer_neither_call_nor_format_fails_json_schema_and_falls_back(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    real = loaded["Q4_K_M"]
    agent = serve_app({"Q4_K_M": ScriptedBackend(real, ['{"name": "Ada"}']),
                       "Q8_0": ScriptedBackend(real, ['{"name": "Ada", "age": 36}'])})
    resp = oa(agent.v1).chat.completions.create(
        model="default", max_tokens=40, tools=[WEATHER], response_format=FORMAT,
        messages=[{"role": "user", "content": "Ada was 36."}])
    assert resp.model == "Q8_0"
    assert ("json_schema", False) in outcomes(resp, "fallback_validations")
    assert json.loads(resp.choices[0].message.content or "") == {"name": "Ada", "age": 36}


def test_required_call_ignores_the_format_and_none_applies_it_alone(
        loaded: dict[str, Backend]) -> None:
    real = loaded["Q4_K_M"]
    base = {"messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [WEATHER], "response_format": FORMAT}
    required = prepare({**base, "tool_choice": "required"}, real)
    assert required.generation.json_schema == {
        "type": "object", "required": ["name", "arguments"],
        "properties": {"name": {"const": "get_weather"},
                       "arguments": WEATHER["function"]["parameters"]}}
    assert not required.spec.json_expected and required.spec.tool_calls_required
    assert "JSON Schema" not in required.prompt.split("Functions:")[0]
    none = prepare({**base, "tool_choice": "none"}, real)
    assert none.generation.json_schema == PERSON and not none.spec.tools
    assert "get_weather" not in none.prompt


def test_the_real_model_under_the_union_answers_a_call_or_the_format(
        loaded: dict[str, Backend]) -> None:
    """A property of the grammar, not of the text: every finished answer is one of the two."""
    real = loaded["Q4_K_M"]
    finished = 0
    # Asked outright, greedy Q4_K_M calls the tool; the others it answers in the
    # format, and "Say hello." (prose without a format) cannot be prose here.
    for question in ("What is the weather in Lima?", "Ada Lovelace died at 36. Who?",
                     'Reply with {"name": "get_weather", "arguments": {"city": "Oslo"}}',
                     "Say hello."):
        done = complete({"messages": [{"role": "user", "content": question}],
                         "tools": [WEATHER], "response_format": FORMAT, "max_tokens": 60},
                        real)
        assert done.result.constraint == "grammar"
        if done.finish_reason == "length":
            continue  # cut off: a prefix of either, nothing to parse
        finished += 1
        value = json.loads(done.text)
        if parse_tool_calls(done.text, [WEATHER]):
            assert done.finish_reason == "tool_calls"
            jsonschema.validate(value["arguments"], WEATHER["function"]["parameters"])
            assert ("tool_call", True) in [(v.kind, v.passed) for v in done.validations]
        else:
            jsonschema.validate(value, PERSON)
            assert [(v.kind, v.passed) for v in done.validations][:2] == [
                ("json_parse", True), ("json_schema", True)]
    assert finished >= 2


def test_the_format_s_definitions_still_resolve_under_the_union(
        loaded: dict[str, Backend]) -> None:
    """A pydantic model with a nested model sends ``$defs``; they move to the union's root."""
    schema = {"type": "object", "required": ["owner"], "additionalProperties": False,
              "properties": {"owner": {"$ref": "#/$defs/Owner"}},
              "$defs": {"Owner": {"type": "object", "required": ["name"],
                                  "properties": {"name": {"type": "string"}},
                                  "additionalProperties": False}}}
    done = complete({"messages": [{"role": "user", "content": "Ada owns a cat."}],
                     "tools": [WEATHER], "max_tokens": 40,
                     "response_format": {"type": "json_schema",
                                         "json_schema": {"name": "pet", "schema": schema}}},
                    loaded["Q4_K_M"])
    assert done.result.constraint == "grammar"  # compiled, not the generic JSON fallback
    if done.finish_reason == "stop" and not done.tool_calls:
        jsonschema.validate(json.loads(done.text), schema)


def test_without_a_grammar_the_union_is_validated_and_retried(
        loaded: dict[str, Backend]) -> None:
    """ONNX has no grammar engine: the answer is checked against the union and retried."""
    onnx = loaded["onnx-int8"]
    assert not onnx.capabilities.grammar
    done = complete({"messages": [{"role": "user", "content": "Ada Lovelace died at 36."}],
                     "tools": [WEATHER], "response_format": FORMAT, "max_tokens": 40}, onnx)
    assert done.result.constraint == "validate_retry"
    kinds = {(v.kind, v.passed) for v in done.validations}
    if done.tool_calls:
        assert done.finish_reason == "tool_calls" and ("tool_call", True) in kinds
    else:  # the format's checks, passed or not: what the fallback decides on
        assert {k for k, _ in kinds} >= {"json_parse", "json_schema"}
        if ("json_schema", True) in kinds:
            jsonschema.validate(json.loads(done.text), PERSON)


def test_streamed_either_branch_arrives_whole(serve_app: ServeFactory,
                                             loaded: dict[str, Backend]) -> None:
    real = loaded["Q4_K_M"]
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    agent = serve_app({"Q4_K_M": ScriptedBackend(real, [call, '{"name": "Ada", "age": 36}']),
                       "Q8_0": ScriptedBackend(real, ["unused"])})
    seen = []
    for _ in range(2):
        calls, content, finish = [], "", None
        for chunk in oa(agent.v1).chat.completions.create(
                model="default", max_tokens=40, tools=[WEATHER], response_format=FORMAT,
                stream=True, messages=[{"role": "user", "content": "Ada, or Oslo's weather?"}]):
            for choice in chunk.choices:
                calls.extend(choice.delta.tool_calls or [])
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
        seen.append((finish, [c.function.name for c in calls], content))
    assert seen == [("tool_calls", ["get_weather"], ""),
                    ("stop", [], '{"name": "Ada", "age": 36}')]
