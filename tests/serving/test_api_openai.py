"""The official openai client against the agent, on the real model, over real HTTP."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from quantfleet.agent.backends import Backend
from quantfleet.agent.serving.pipeline import complete

from .conftest import Running

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False},
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                        "b": {"type": "number"}},
                       "required": ["a", "b"]},
    },
}


@pytest.fixture(scope="module")
def agent(ladder_dir: Any, loaded: dict[str, Backend]) -> Any:
    from quantfleet.agent.serving.routing import ModelSet

    from .conftest import make_config, start_app

    config = make_config(ladder_dir)
    running = start_app(config, ModelSet.from_backends(
        config, {"Q4_K_M": loaded["Q4_K_M"], "Q8_0": loaded["Q8_0"]}))
    yield running
    running.stop()


@pytest.fixture
def client(agent: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.v1, api_key="unused", max_retries=0, timeout=120)


def ext(resp: Any) -> dict[str, Any]:
    extra = resp.model_extra or {}
    return dict(extra["quantfleet"])


def test_health_models_metrics(agent: Running, client: openai.OpenAI) -> None:
    health = httpx.get(agent.url + "/healthz").json()
    assert health["status"] == "ready" and health["active"] == "Q4_K_M"
    ids = [m.id for m in client.models.list()]
    assert ids == ["Q4_K_M", "Q8_0"]
    text = httpx.get(agent.url + "/metrics").text
    assert "# TYPE quantfleet_request_latency_seconds histogram" in text
    assert 'quantfleet_queue_depth{variant="Q4_K_M"} 0' in text
    assert "quantfleet_ready 1" in text


def test_completion_matches_the_pipeline_without_http(agent: Running, client: openai.OpenAI,
                                                      loaded: dict[str, Backend]) -> None:
    messages = [{"role": "user", "content": "Name a primary colour."}]
    # A seed makes llama.cpp start from a clean cache, so both paths are bit-identical.
    resp = client.chat.completions.create(model="default", messages=messages, max_tokens=12,
                                          seed=7)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.model == "Q4_K_M"
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 12
    # The evaluator's path: same request, same backend, no HTTP -> the same greedy answer.
    direct = complete({"messages": messages, "max_tokens": 12, "seed": 7}, loaded["Q4_K_M"],
                      agent.service.config)
    assert direct.text == choice.message.content
    event = agent.wait_event(resp.id)
    assert event.status == 200 and event.variant == "Q4_K_M"
    assert event.completion_tokens == resp.usage.completion_tokens
    assert event.time_to_first_token_s is not None and event.latency_s > 0
    assert {o.kind for o in event.validations} >= {"refusal", "finish_reason"}


def test_streaming_yields_the_same_text(agent: Running, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count from one to five."}]
    whole = client.chat.completions.create(model="default", messages=messages, max_tokens=16,
                                           seed=1)
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=16,
                                            seed=1,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 2, "the answer arrives in pieces"
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert agent.wait_event().stream is True


def test_json_schema_in_the_clients_shape(agent: Running, client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Ada Lovelace died at 36. Give her name and age."}],
        max_tokens=40,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    value = json.loads(resp.choices[0].message.content or "")
    jsonschema.validate(value, PERSON)
    meta = ext(resp)
    assert meta["constraint"] == "grammar"
    assert [(v["kind"], v["passed"]) for v in meta["validations"][:2]] == [
        ("json_parse", True), ("json_schema", True)]


def test_structured_parse_helper(client: openai.OpenAI) -> None:
    class City(BaseModel):
        name: str
        country: str

    parsed = client.chat.completions.parse(
        model="default", max_tokens=40, response_format=City,
        messages=[{"role": "user", "content": "Paris is in France. Give the city and country."}])
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_json_object(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="default", max_tokens=30, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as JSON."}])
    text = resp.choices[0].message.content or ""
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert ext(resp)["validations"][0]["kind"] == "json_parse"


def test_required_tool_call_is_valid(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="default", max_tokens=40, tools=[WEATHER, ADD], tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "add")
    schema = (WEATHER if call.function.name == "get_weather" else ADD)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert ("tool_call", True) in [(v["kind"], v["passed"]) for v in ext(resp)["validations"]]


def test_named_tool_choice_and_tool_results_in_history(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="default", max_tokens=40, tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "add"}},
        messages=[{"role": "user", "content": "What is 2 plus 3?"}])
    (call,) = resp.choices[0].message.tool_calls or []
    assert call.function.name == "add"
    args = json.loads(call.function.arguments)
    assert isinstance(args["a"], int | float) and isinstance(args["b"], int | float)
    follow = client.chat.completions.create(
        model="default", max_tokens=12, tools=[WEATHER, ADD], tool_choice="none",
        messages=[{"role": "user", "content": "What is 2 plus 3?"},
                  {"role": "assistant", "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "5"}])
    assert follow.choices[0].message.content
    assert not follow.choices[0].message.tool_calls


def test_auto_tool_choice_answers_prose_or_a_valid_call(client: openai.OpenAI) -> None:
    for question in ("What is the weather in Lima?", "Say hello."):
        resp = client.chat.completions.create(
            model="default", max_tokens=30, tools=[WEATHER], tool_choice="auto",
            messages=[{"role": "user", "content": question}])
        choice = resp.choices[0]
        assert ext(resp)["constraint"] == "grammar"
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                                WEATHER["function"]["parameters"])
        else:
            assert choice.message.content and not choice.message.content.startswith("{")


def test_streamed_tool_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default", max_tokens=40, tools=[WEATHER], tool_choice="required", stream=True,
        messages=[{"role": "user", "content": "Weather in Rome?"}])
    calls, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            calls.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls[0].function.name == "get_weather"
    assert "city" in json.loads(calls[0].function.arguments)


def test_stop_sequence(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="default", max_tokens=40, stop=["3"],
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    text = resp.choices[0].message.content or ""
    assert "3" not in text
    assert resp.choices[0].finish_reason == "stop"


def test_errors_are_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="default", messages=[], max_tokens=5)
    assert bad.value.body["message"].startswith("messages:")  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", max_tokens=5,
                                       messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as tier:
        client.chat.completions.create(model="default", max_tokens=5,
                                       messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"quantfleet": {"tier": "platinum"}})
    assert "unknown quality tier 'platinum'" in str(tier.value)


def test_tier_routes_to_the_fallback_variant(agent: Running, client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="default", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Quantfleet-Tier": "high"})
    assert resp.model == "Q8_0"
    assert agent.wait_event(resp.id).tier == "high"
    direct = client.chat.completions.create(
        model="Q8_0", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert direct.model == "Q8_0"


def test_tools_with_a_json_schema_response_format(client: openai.OpenAI) -> None:
    """The pattern LangChain and pydantic-ai send: tools and a response_format together."""
    resp = client.chat.completions.create(
        model="default", max_tokens=60, tools=[WEATHER],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        messages=[{"role": "user", "content": "Ada Lovelace died at 36. Name and age?"}])
    choice = resp.choices[0]
    assert ext(resp)["constraint"] == "grammar"
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                            WEATHER["function"]["parameters"])
    elif choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)
    required = client.chat.completions.create(
        model="default", max_tokens=40, tools=[WEATHER], tool_choice="required",
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert (required.choices[0].message.tool_calls or [])[0].function.name == "get_weather"
