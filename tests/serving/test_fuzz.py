"""The agent survives any request (issue 14): a fuzz of the HTTP API against the real server
on the real model. Arbitrary JSON bodies and mutated valid requests — lone surrogates, huge
numbers, deep nesting, wrong types, unknown fields — get an answer or a 4xx in the OpenAI
shape, never a 5xx; afterwards nothing is wedged: every request was counted, no worker is
held, and a normal request still answers at once."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantfleet.agent.backends import Backend
from quantfleet.agent.serving.routing import ModelSet

from .conftest import Running, make_config, metric, start_app

PERSON = {"type": "object", "properties": {"name": {"type": "string", "description": "who"},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name"]}
TOOL = {"type": "function", "function": {"name": "weather", "description": "The weather.",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}}}}
VALID: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Say hi."}]},
    {"model": "default", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Name a colour."}],
     "temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n", "."], "user": "u1"},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Count: "},
                                               {"type": "text", "text": "one, two"}]}],
     "stream": True, "stream_options": {"include_usage": True}},
    {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [TOOL],
     "tool_choice": "auto"},
    {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                        "function": {"name": "weather",
                                                                     "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                  {"role": "user", "content": "And tomorrow?"}],
     "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "weather"}}},
    {"messages": [{"role": "user", "content": "Who wrote Hamlet?"}],
     "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
     "quantfleet": {"tier": "default", "priority": "high", "deadline_s": 30,
                    "require_citation": True}},
    {"messages": [{"role": "developer", "content": "JSON only."},
                  {"role": "user", "content": "A pet?"}],
     "response_format": {"type": "json_object"}, "max_completion_tokens": 3, "n": 1,
     "metadata": {"k": "v"}},
]

surrogate_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=4),
                           st.integers(0xD800, 0xDFFF).map(chr), st.text(max_size=4))
huge_numbers = st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**40, 1e308, -1e308,
                                float("inf"), float("-inf"), float("nan"), 1e-320])
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=8) | surrogate_text | huge_numbers)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                  max_size=3),
    max_leaves=12)


odd_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["\x00", "<|im_end|>", "<|im_start|>assistant\n", "\U0001f600" * 20, "{", "\n" * 50,
     " " * 500])


def deep(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


weird = (json_values | surrogate_text | huge_numbers
         | st.builds(deep, st.integers(20, 400), st.sampled_from(["x", 1, None, "\ud800"]))
         | st.text(min_size=1000, max_size=3000))


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, (*prefix, i))


def at(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    doc: Any = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(doc))))
        how = draw(st.sampled_from(["set", "delete", "unknown", "surrogate", "wrap", "text",
                                    "text"]))
        if not path:
            if how == "unknown":
                doc[draw(st.text(max_size=8))] = draw(weird)
            continue
        parent, key = at(doc, path[:-1]), path[-1]
        if how == "set":
            parent[key] = draw(weird)
        elif how == "delete":
            del parent[key]
        elif how == "unknown" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8)) + "_x"] = draw(weird)
        elif how == "surrogate":
            old = parent[key]
            parent[key] = (old if isinstance(old, str) else "") + draw(surrogate_text)
        elif how == "text" and isinstance(parent[key], str):
            # Valid but unusual text the model does see: control characters, special
            # tokens of the template, astral characters.
            parent[key] = draw(odd_text)
        elif how == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
    return doc


@pytest.fixture(scope="module")
def agent(ladder_dir: Any, loaded: dict[str, Backend]) -> Iterator[Running]:
    # The real model with one worker (a wedge would show at once) and two-token answers.
    config = make_config(ladder_dir, models={"fallback": "", "workers_per_model": 1},
                         budgets={"max_tokens_ceiling": 2, "default_max_tokens": 2},
                         listen={"max_body_bytes": 65536}, concurrency={"deadline_s": 20})
    running = start_app(config, ModelSet.from_backends(config, {"Q4_K_M": loaded["Q4_K_M"]}))
    yield running
    running.stop()


SENT: list[int] = []  # every status, to reconcile with the agent's own counts


def send(agent: Running, raw: bytes) -> httpx.Response:
    resp = httpx.post(agent.v1 + "/chat/completions", content=raw, timeout=60,
                      headers={"Content-Type": "application/json"})
    SENT.append(resp.status_code)
    assert resp.status_code < 500, (resp.status_code, resp.text[:500], raw[:300])
    if resp.status_code == 200:
        if resp.headers["content-type"].startswith("text/event-stream"):
            assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-300:]
            assert "server_error" not in resp.text, resp.text[-300:]
        else:
            assert resp.json()["object"] == "chat.completion"
    else:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert resp.status_code in (400, 404, 413), resp.text
    return resp


def encode(doc: Any) -> bytes:
    # allow_nan: Python's json (the agent's parser) reads NaN and Infinity too.
    return json.dumps(doc, allow_nan=True).encode()


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(doc=mutated())
def test_mutated_valid_requests_never_5xx(agent: Running, doc: Any) -> None:
    send(agent, encode(doc))


@st.composite
def odd_but_valid(draw: st.DrawFn) -> Any:
    doc: Any = copy.deepcopy(draw(st.sampled_from(VALID)))
    for m in doc["messages"]:
        if isinstance(m.get("content"), str):
            m["content"] = draw(odd_text)
    doc["seed"] = draw(st.none() | st.integers(-(2**63), 2**64 - 1))
    doc["temperature"] = draw(st.none() | st.floats(0, 2))
    doc["top_p"] = draw(st.none() | st.floats(0.01, 1))
    doc["max_tokens"] = draw(st.none() | st.integers(1, 10**30))
    if "tools" not in doc and draw(st.booleans()):
        doc["stop"] = draw(st.lists(odd_text.filter(bool), min_size=1, max_size=4))
    return doc


@settings(FUZZ, max_examples=50)
@given(doc=odd_but_valid())
def test_odd_but_valid_requests_are_answered(agent: Running, doc: Any) -> None:
    assert send(agent, encode(doc)).status_code == 200


@settings(FUZZ, max_examples=60)
@given(doc=st.dictionaries(st.sampled_from(["messages", "model", "tools", "stop", "seed",
                                            "max_tokens", "stream", "response_format",
                                            "quantfleet", "tool_choice", "temperature"])
                           | st.text(max_size=6), weird, max_size=4) | weird)
def test_arbitrary_json_bodies_never_5xx(agent: Running, doc: Any) -> None:
    send(agent, encode(doc))


@pytest.mark.parametrize("raw", [
    b"[" * 60_000, b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"seed": ' + b"9" * 5000 + b', "messages": [{"role": "user", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}',
    b'{"messages": [{"role": "user", "content": "\\ud800\\udc00\\udc00"}]}',
], ids=["deep array", "deep messages", "5000-digit int", "1e999", "pair then lone"])
def test_pathological_bodies_are_refused_cleanly(agent: Running, raw: bytes) -> None:
    send(agent, raw)


def test_a_denormal_temperature_with_a_grammar_is_answered(agent: Running) -> None:
    """Found by this fuzz (seed 26): temperature 1.4e-45 with a JSON response_format made
    llama.cpp's grammar sampler throw and abort the whole process. Below 1e-3 a
    temperature is greedy decoding now, on every backend."""
    for fmt in ({"type": "json_object"}, None):
        doc: dict[str, Any] = {"messages": [{"role": "user", "content": "<|im_end|>"}],
                               "max_tokens": 3, "temperature": 1.401298464324817e-45}
        if fmt:
            doc["response_format"] = fmt
        assert send(agent, encode(doc)).status_code == 200


def test_after_the_fuzz_nothing_is_wedged(agent: Running) -> None:
    start = time.monotonic()
    ok = httpx.post(agent.v1 + "/chat/completions", timeout=30,
                    json={"messages": [{"role": "user", "content": "Say hi."}]})
    assert ok.status_code == 200 and time.monotonic() - start < 15, ok.text
    SENT.append(200)
    agent.idle(10)
    assert httpx.get(agent.url + "/healthz").status_code == 200
    assert metric(agent.url, "quantfleet_in_flight") == 0
    assert metric(agent.url, "quantfleet_queue_depth") == 0
    # Every request was settled once: one event and one count each, none a 5xx.
    assert metric(agent.url, "quantfleet_requests_total") == len(SENT)
    assert len(agent.events()) == len(SENT)
    assert all(e.status < 500 for e in agent.events())
