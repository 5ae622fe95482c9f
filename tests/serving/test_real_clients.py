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
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import langchain_core.exceptions
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field
from pydantic_ai import Agent, NativeOutput, RunContext, capture_run_messages
from pydantic_ai.exceptions import (
    ModelContextWindowExceededError,
    ModelNotFoundError,
    OutputTokenLimitExceeded,
    UsageLimitExceeded,
)
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai_compatible import OpenAICompatibleProvider
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import UsageLimits

from quantfleet.agent.backends import Backend
from quantfleet.agent.serving.pipeline import prepare
from quantfleet.agent.serving.protocol import ChatRequest
from quantfleet.agent.wire import RequestEvent

from .conftest import Running, make_config, start_app

MAX_TOKENS = 160
PERSON_PROMPT = "Ada Lovelace died at 36. Give her name and age."
WEATHER_PROMPT = "What is the weather in Oslo?"
# Over the prompt budget (min(1536, n_ctx 1024 - max_tokens)) by thousands of tokens.
TOO_LONG = "Summarise this: " + "lorem ipsum dolor sit amet " * 400
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


# -- LangChain ------------------------------------------------------------------------

def chat_openai(agent: Running, **options: Any) -> ChatOpenAI:
    options = {"model": "default", "max_tokens": MAX_TOKENS, "max_retries": 0,
               "timeout": 120, **options}
    return ChatOpenAI(base_url=agent.v1, api_key="unused", **options)


@tool("get_weather", args_schema=GetWeather)
def get_weather(city: str) -> str:
    """Current weather for a city."""
    return WEATHER


def usage_reported(message: AIMessage) -> None:
    usage = message.usage_metadata
    assert usage is not None and usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def calls_valid(message: AIMessage) -> None:
    """LangChain parsed every call the agent returned, with the tool's arguments."""
    assert not message.invalid_tool_calls
    for call in message.tool_calls:
        assert call["name"] == "get_weather"
        GetWeather.model_validate(call["args"])


def test_langchain_invoke(agent: Running) -> None:
    mark = len(agent.events())
    message = chat_openai(agent, max_tokens=24).invoke("Name three primary colours.")
    assert isinstance(message, AIMessage) and isinstance(message.content, str)
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    usage_reported(message)
    (event,) = answered(agent, mark)
    assert message.usage_metadata is not None
    assert event.completion_tokens == message.usage_metadata["output_tokens"]


def test_langchain_stream(agent: Running) -> None:
    mark = len(agent.events())
    chunks = list(chat_openai(agent, max_tokens=24, stream_usage=True).stream(
        "Name three primary colours."))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert any(c.content for c in chunks), "no content chunk"
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.response_metadata["finish_reason"] in ("stop", "length")
    usage_reported(whole)
    (event,) = answered(agent, mark)
    assert event.stream


# LangChain model_dump()s the events of openai's stream helper, whose generic "parsed"
# pydantic serializes as if typed None, and pydantic warns about the Person in it
# (langchain-openai 1.7.4, openai 3.51.0): the client's own, nothing the agent sends.
PARSED_DUMP = "ignore:Pydantic serializer warnings:UserWarning"


@pytest.mark.filterwarnings(PARSED_DUMP)
def test_langchain_with_structured_output_json_schema(agent: Running) -> None:
    mark = len(agent.events())
    structured = chat_openai(agent).with_structured_output(Person, method="json_schema")
    assert isinstance(structured.invoke(PERSON_PROMPT), Person)
    raw = chat_openai(agent).with_structured_output(Person, method="json_schema",
                                                    include_raw=True).invoke(PERSON_PROMPT)
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Person)
    usage_reported(raw["raw"])
    streamed = list(structured.stream(PERSON_PROMPT))
    assert streamed and all(isinstance(p, Person) for p in streamed)
    assert len(answered(agent, mark)) == 3


@pytest.mark.filterwarnings(PARSED_DUMP)
def test_langchain_bind_tools_with_a_response_format(agent: Running) -> None:
    """bind_tools([tool], response_format=Model), LangChain's tools with a structured
    answer (strict tools, parsed by openai's parse()): a call or a parsed answer; a named
    tool_choice forces the call, whose result goes back as a ToolMessage."""
    mark = len(agent.events())
    llm = chat_openai(agent)
    auto = llm.bind_tools([get_weather], response_format=Person)
    for prompt in (WEATHER_PROMPT, PERSON_PROMPT):
        message = auto.invoke(prompt)
        usage_reported(message)
        calls_valid(message)
        if not message.tool_calls:
            assert isinstance(message.additional_kwargs["parsed"], Person)
            Person.model_validate_json(str(message.content))
    forced = llm.bind_tools([get_weather], response_format=Person, tool_choice="get_weather")
    question = HumanMessage(WEATHER_PROMPT)
    call = forced.invoke([question])
    assert call.response_metadata["finish_reason"] == "tool_calls"
    calls_valid(call)
    (request,) = call.tool_calls
    result = ToolMessage(get_weather.invoke(request["args"]), tool_call_id=request["id"])
    answer = auto.invoke([question, call, result])
    calls_valid(answer)
    if not answer.tool_calls:
        assert isinstance(answer.additional_kwargs["parsed"], Person)
    # Streamed, the forced call arrives as tool-call chunks LangChain assembles.
    chunks = list(forced.stream([question]))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert isinstance(whole, AIMessageChunk) and whole.tool_calls
    calls_valid(whole)
    assert len(answered(agent, mark)) == 5


# -- pydantic-ai ----------------------------------------------------------------------

@pytest.fixture
def pai_model(agent: Running) -> OpenAIChatModel:
    provider = OpenAICompatibleProvider("quantfleet", base_url=agent.v1, api_key="unused")
    return OpenAIChatModel("default", provider=provider)


def weather_agent(model: OpenAIChatModel, calls: list[str],
                  settings: ModelSettings | Callable[[RunContext[None]], ModelSettings],
                  ) -> Agent[None, Person]:
    bot = Agent(model, output_type=NativeOutput(Person), model_settings=settings)

    @bot.tool_plain
    def get_weather(city: Annotated[str, Field(max_length=40)]) -> str:
        """Current weather for a city."""
        calls.append(city)
        return WEATHER

    return bot


def tool_calls_in(messages: list[ModelMessage]) -> list[ToolCallPart]:
    """Every call the model made, each to the tool with valid arguments; and pydantic-ai
    never had to send a retry (it would for a call or an answer it could not validate)."""
    assert not [p for m in messages if isinstance(m, ModelRequest) for p in m.parts
                if isinstance(p, RetryPromptPart)]
    calls = [p for m in messages if isinstance(m, ModelResponse) for p in m.parts
             if isinstance(p, ToolCallPart)]
    for call in calls:
        assert call.tool_name == "get_weather"
        GetWeather.model_validate(call.args_as_dict())
    return calls


def test_pydantic_ai_text_output(agent: Running, pai_model: OpenAIChatModel) -> None:
    mark = len(agent.events())
    bot = Agent(pai_model, model_settings=ModelSettings(max_tokens=24))
    result = bot.run_sync("Name three primary colours.")
    assert isinstance(result.output, str)
    assert result.usage.requests == 1
    assert result.usage.input_tokens > 0 and 0 < result.usage.output_tokens <= 24
    streamed = bot.run_stream_sync("Name three primary colours.")
    pieces = list(streamed.stream_text(delta=True))
    assert any(pieces), "no content chunk"
    assert streamed.usage.output_tokens > 0
    events = answered(agent, mark)
    assert [e.stream for e in events] == [False, True]


def test_pydantic_ai_native_output_beside_a_tool(agent: Running,
                                                 pai_model: OpenAIChatModel) -> None:
    """NativeOutput(Model) and one tool, as written: each step is a call or the answer."""
    mark = len(agent.events())
    calls: list[str] = []
    bot = weather_agent(pai_model, calls, ModelSettings(max_tokens=MAX_TOKENS))
    with capture_run_messages() as messages:
        try:
            result = bot.run_sync(PERSON_PROMPT, usage_limits=UsageLimits(request_limit=3))
        except UsageLimitExceeded:
            result = None  # the model called the tool at every step: its choice, bounded
    made = tool_calls_in(messages)
    assert len(made) == len(calls)
    if result is None:
        assert len(made) == 3
    else:
        assert isinstance(result.output, Person)
        assert result.usage.requests == len(made) + 1 and result.usage.output_tokens > 0
    assert len(answered(agent, mark)) == len(made) + (result is not None)


def test_pydantic_ai_native_output_after_a_forced_tool_call(
        agent: Running, pai_model: OpenAIChatModel) -> None:
    """The tool on the first step (pydantic-ai's per-step tool_choice), then the answer in
    the format: the call, its result sent back and the structured answer, on every CPU."""

    def first_the_tool(ctx: RunContext[None]) -> ModelSettings:
        return ModelSettings(max_tokens=MAX_TOKENS,
                             tool_choice=["get_weather"] if ctx.run_step <= 1 else "none")

    mark = len(agent.events())
    calls: list[str] = []
    with capture_run_messages() as messages:
        result = weather_agent(pai_model, calls, first_the_tool).run_sync(WEATHER_PROMPT)
    assert isinstance(result.output, Person)
    (call,) = tool_calls_in(messages)
    assert calls == [GetWeather.model_validate(call.args_as_dict()).city]
    kinds = [type(p) for m in messages for p in m.parts]
    assert kinds[1:] == [ToolCallPart, ToolReturnPart, TextPart]
    assert result.usage.requests == 2 and result.usage.tool_calls == 1
    assert len(answered(agent, mark)) == 2


# -- where a pattern ends in an error: the library's own, with the agent's words --------

def test_a_structured_answer_cut_off_is_each_librarys_length_error(
        agent: Running, client: openai.OpenAI, pai_model: OpenAIChatModel) -> None:
    """Three tokens cannot hold a Person: the agent answers 200 with finish_reason
    "length" (its fallback's retry is cut off too), and no library parses the prefix."""
    mark = len(agent.events())
    with pytest.raises(openai.LengthFinishReasonError) as cut:
        client.chat.completions.parse(model="default", max_tokens=3, response_format=Person,
                                      messages=[{"role": "user", "content": PERSON_PROMPT}])
    assert cut.value.completion.choices[0].finish_reason == "length"
    assert cut.value.completion.usage is not None
    assert cut.value.completion.usage.completion_tokens == 3
    with pytest.raises(openai.LengthFinishReasonError):
        chat_openai(agent, max_tokens=3).with_structured_output(
            Person, method="json_schema").invoke(PERSON_PROMPT)
    bot = Agent(pai_model, output_type=NativeOutput(Person),
                model_settings=ModelSettings(max_tokens=3))
    with pytest.raises(OutputTokenLimitExceeded):
        bot.run_sync(PERSON_PROMPT)
    events = answered(agent, mark)
    assert len(events) == 3 and {e.finish_reason for e in events} == {"length"}
    assert all(e.fallback_from == "Q4_K_M" for e in events)


def test_a_prompt_over_the_budget_is_each_librarys_context_error(
        agent: Running, client: openai.OpenAI, pai_model: OpenAIChatModel) -> None:
    """A prompt the device cannot fit: the agent's 400 context_length_exceeded. LangChain
    raises it as openai's BadRequestError, not as its ContextOverflowError: it looks for
    the code in the exception's text, where openai 3.x no longer puts it."""
    said = "even after dropping older turns"
    with pytest.raises(openai.BadRequestError) as direct:
        client.chat.completions.create(model="default", max_tokens=MAX_TOKENS,
                                       messages=[{"role": "user", "content": TOO_LONG}])
    assert direct.value.code == "context_length_exceeded" and said in direct.value.message
    with pytest.raises(openai.BadRequestError) as chained:
        chat_openai(agent).invoke(TOO_LONG)
    assert chained.value.code == "context_length_exceeded" and said in chained.value.message
    with pytest.raises(ModelContextWindowExceededError) as run:
        Agent(pai_model, model_settings=ModelSettings(max_tokens=MAX_TOKENS)).run_sync(TOO_LONG)
    assert run.value.status_code == 400 and said in str(run.value.body)


def test_a_model_the_agent_does_not_serve_is_each_librarys_not_found(
        agent: Running) -> None:
    """ChatOpenAI(base_url=..., api_key=...) without model= asks for its default,
    gpt-3.5-turbo; the agent's 404 names it and what it serves."""
    with pytest.raises(openai.NotFoundError) as lc:
        ChatOpenAI(base_url=agent.v1, api_key="unused", max_retries=0).invoke("Hi")
    assert isinstance(lc.value, langchain_core.exceptions.ModelNotFoundError)
    assert lc.value.code == "model_not_found" and "'gpt-3.5-turbo'" in lc.value.message
    provider = OpenAICompatibleProvider("quantfleet", base_url=agent.v1, api_key="unused")
    with pytest.raises(ModelNotFoundError) as pai:
        Agent(OpenAIChatModel("gpt-4o", provider=provider)).run_sync("Hi")
    assert "'gpt-4o' is not served here" in str(pai.value.body)
