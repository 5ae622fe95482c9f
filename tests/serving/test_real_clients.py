"""The official openai client, LangChain and pydantic-ai against the agent (issue 16).

Each library's own patterns, not hand-built requests, with the versions pinned in the
dev extra (pyproject.toml), on the real Q4_K_M over real HTTP. The 135M model's greedy
text differs by CPU, so no test asserts it. Each asserts what the application relies
on: the library parsed the answer without error, a structured answer validates against
its pydantic model, a tool call's arguments against the tool's parameters, usage is
reported, a stream yields content and finishes, and the agent answered every request
the library sent with 200.

The models bound their strings and numbers, so the agent's grammar keeps every
structured answer far below the ``max_tokens`` the tests give. Where the model may
answer a tool call or a value in the format (tools with a JSON response_format,
``tool_choice`` "auto"), either branch is checked; a named tool choice forces the call
so that the call branch, and the tool result sent back, are exercised on every CPU.

Where a pattern can end in an error, it is the library's own documented one, carrying
what the agent said: a structured answer cut off by ``max_tokens``
(``finish_reason: "length"``), a prompt over the device's budget (400
``context_length_exceeded``), a model the agent does not serve (404
``model_not_found``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from quantfleet.agent.backends import Backend
from quantfleet.agent.serving.pipeline import prepare
from quantfleet.agent.serving.protocol import ChatRequest
from quantfleet.agent.wire import RequestEvent

from .conftest import Running, make_config, start_app

MAX_TOKENS = 160
PERSON_PROMPT = "Ada Lovelace died at 36. Give her name and age."
WEATHER_PROMPT = "What is the weather in Oslo?"
WEATHER = "sunny, 21 C"


class Person(BaseModel):
    """A person and their age."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)


class GetWeather(BaseModel):
    """Current weather for a city."""

    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=40)


@pytest.fixture(scope="module")
def agent(ladder_dir: Any, loaded: dict[str, Backend]) -> Iterator[Running]:
    from quantfleet.agent.serving.routing import ModelSet

    config = make_config(ladder_dir)
    running = start_app(config, ModelSet.from_backends(
        config, {"Q4_K_M": loaded["Q4_K_M"], "Q8_0": loaded["Q8_0"]}))
    yield running
    running.stop()


def answered(agent: Running, mark: int) -> list[RequestEvent]:
    """The agent's events of the requests sent since ``mark``: at least one, all 200."""
    events = agent.events()[mark:]
    assert events, "the library sent no request"
    assert all(e.status == 200 for e in events), [(e.status, e.error_class) for e in events]
    return events


# -- the official openai client -------------------------------------------------------

@pytest.fixture
def client(agent: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.v1, api_key="unused", max_retries=0, timeout=120)


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather")


def test_openai_create(agent: Running, client: openai.OpenAI) -> None:
    mark = len(agent.events())
    resp = client.chat.completions.create(
        model="default", max_tokens=24,
        messages=[{"role": "user", "content": "Name three primary colours."}])
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    (event,) = answered(agent, mark)
    assert event.completion_tokens == resp.usage.completion_tokens


def test_openai_stream(agent: Running, client: openai.OpenAI) -> None:
    mark = len(agent.events())
    stream = client.chat.completions.create(
        model="default", max_tokens=24, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Name three primary colours."}])
    pieces, finish, usage = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert pieces and finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 24 and usage.prompt_tokens > 0
    (event,) = answered(agent, mark)
    assert event.stream and event.completion_tokens == usage.completion_tokens


@pytest.mark.parametrize("where", ["chat", "beta"])
def test_openai_parse_with_a_pydantic_model(agent: Running, client: openai.OpenAI,
                                            where: str) -> None:
    completions = client.beta.chat.completions if where == "beta" else client.chat.completions
    mark = len(agent.events())
    resp = completions.parse(model="default", max_tokens=MAX_TOKENS, response_format=Person,
                             messages=[{"role": "user", "content": PERSON_PROMPT}])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    answered(agent, mark)


def test_openai_stream_helper_parses_the_final_answer(agent: Running,
                                                      client: openai.OpenAI) -> None:
    mark = len(agent.events())
    with client.chat.completions.stream(
            model="default", max_tokens=MAX_TOKENS, response_format=Person,
            messages=[{"role": "user", "content": PERSON_PROMPT}]) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert {"content.delta", "content.done"} <= kinds
    assert final.choices[0].finish_reason == "stop"
    assert isinstance(final.choices[0].message.parsed, Person)
    answered(agent, mark)


def test_openai_parse_with_tools_and_a_response_format(agent: Running,
                                                       client: openai.OpenAI) -> None:
    """parse() with a tool and a pydantic response_format: a call the client parses into
    the tool's model, or an answer it parses into the format's; then the tool's result
    sent back the way the client's docs do it (the parsed message appended as it is)."""
    mark = len(agent.events())
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in ("auto", named):
        resp = client.chat.completions.parse(
            model="default", max_tokens=MAX_TOKENS, response_format=Person, tools=[WEATHER_TOOL],
            tool_choice=tool_choice, messages=[{"role": "user", "content": WEATHER_PROMPT}])
        message = resp.choices[0].message
        if message.tool_calls:
            assert resp.choices[0].finish_reason == "tool_calls" and message.parsed is None
            for call in message.tool_calls:
                assert call.function.name == "get_weather"
                assert isinstance(call.function.parsed_arguments, GetWeather)
                GetWeather.model_validate_json(call.function.arguments)
        else:
            assert tool_choice == "auto", "a named tool choice is always a call"
            assert resp.choices[0].finish_reason == "stop"
            assert isinstance(message.parsed, Person)
    # The forced call, then its result: the client sends its ParsedChatCompletionMessage
    # back with "parsed" and "parsed_arguments" in it.
    (call,) = message.tool_calls or []
    follow = client.chat.completions.parse(
        model="default", max_tokens=MAX_TOKENS, response_format=Person, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": WEATHER_PROMPT}, message,
                  {"role": "tool", "tool_call_id": call.id, "content": WEATHER}])
    answer = follow.choices[0].message
    if answer.tool_calls:
        assert all(isinstance(c.function.parsed_arguments, GetWeather)
                   for c in answer.tool_calls)
    else:
        assert isinstance(answer.parsed, Person)
    assert follow.usage is not None and resp.usage is not None
    assert follow.usage.prompt_tokens > resp.usage.prompt_tokens  # the call and its result
    assert len(answered(agent, mark)) == 3


def test_what_parse_sends_back_is_accepted_and_ignored(loaded: dict[str, Backend]) -> None:
    """The fields the openai client adds to a message it parsed ("parsed" on the message,
    "parsed_arguments" on each call) are its own results: accepted, and the prompt is the
    one without them."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    plain = [{"role": "user", "content": WEATHER_PROMPT},
             {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": WEATHER},
             {"role": "assistant", "content": '{"name": "Ada", "age": 36}'},
             {"role": "user", "content": "And tomorrow?"}]
    echoed = json.loads(json.dumps(plain))
    echoed[1]["parsed"] = None
    echoed[1]["tool_calls"][0]["function"]["parsed_arguments"] = {"city": "Oslo"}
    echoed[3]["parsed"] = {"name": "Ada", "age": 36}
    tools = [WEATHER_TOOL]
    ChatRequest.model_validate({"messages": echoed, "tools": tools})
    real = loaded["Q4_K_M"]
    assert prepare({"messages": echoed, "tools": tools}, real).prompt == \
        prepare({"messages": plain, "tools": tools}, real).prompt
