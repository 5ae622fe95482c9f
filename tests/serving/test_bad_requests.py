"""Bad input over real HTTP: each gets a specific 4xx in the OpenAI error shape, never a 500,
and none reaches the model (the scripted backend counts every generation)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantfleet.agent.backends import Backend

from .conftest import Running, ScriptedBackend, make_config, start_app

GOOD = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def target(ladder_dir: Any,
           loaded: dict[str, Backend]) -> Iterator[tuple[Running, ScriptedBackend]]:
    from quantfleet.agent.serving.routing import ModelSet

    backend = ScriptedBackend(loaded["Q4_K_M"], ["ok"])
    config = make_config(ladder_dir, models={"fallback": ""}, listen={"max_body_bytes": 65536})
    running = start_app(config, ModelSet.from_backends(config, {"Q4_K_M": backend}))
    yield running, backend
    running.stop()


@pytest.fixture(scope="module")
def http(target: tuple[Running, ScriptedBackend]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=target[0].url, timeout=30) as client:
        yield client


def post(http: httpx.Client, body: Any, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return http.post("/v1/chat/completions", content=content,
                     headers={"Content-Type": "application/json"})


def assert_4xx(resp: httpx.Response, status: int = 400, contains: str = "") -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    assert contains in err["message"], err["message"]
    return str(err["message"])


CASES = [
    (None, b"{not json", "not valid JSON"),
    (None, b"", "empty"),
    (None, b"\xff\xfe\x00", "not valid JSON"),
    ([1, 2], None, "must be a JSON object, not list"),
    ({**GOOD, "messages": []}, None, "messages: List should have at least 1 item"),
    ({"model": "default"}, None, "messages: Field required"),
    ({**GOOD, "messages": "hi"}, None, "messages"),
    ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, None, "messages.0.role"),
    ({**GOOD, "messages": [{"role": "user"}]}, None, "a user message needs content"),
    ({**GOOD, "max_tokens": "ten"}, None, "max_tokens"),
    ({**GOOD, "max_tokens": 0}, None, "max_tokens"),
    ({**GOOD, "temperature": 9}, None, "temperature"),
    ({**GOOD, "n": 3}, None, "n: "),
    ({**GOOD, "logprobs": True}, None, "logprobs are not supported"),
    ({**GOOD, "best_of": 2}, None, "best_of: unknown field"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, None, "at most 4 stop sequences"),
    ({**GOOD, "response_format": {"type": "xml"}}, None, "response_format"),
    ({**GOOD, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}}, None, "invalid JSON Schema"),
    ({**GOOD, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"properties": {"a": {"minimum": "low"}}}}}}, None,
     "invalid JSON Schema"),
    ({**GOOD, "tools": [{"type": "function", "function": {"description": "no name"}}]}, None,
     "tools.0.function.name: Field required"),
    ({**GOOD, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None,
     "a function name is 1-64 letters"),
    ({**GOOD, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": 5}}}]}, None, "invalid JSON Schema"),
    ({**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, None,
     "function 'g' is not in tools"),
    ({**GOOD, "tool_choice": "required"}, None, "'required' needs tools"),
    ({**GOOD, "quantfleet": {"tier": "platinum"}}, None, "unknown quality tier"),
    ({**GOOD, "quantfleet": {"priority": "urgent"}}, None, "quantfleet.priority"),
    ({**GOOD, "seed": 2**64}, None, "seed: "),
    # Valid JSON escapes that are not Unicode: refused before any tokenizer sees them.
    (None, b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content: contains a lone surrogate (U+D800); text must be valid Unicode"),
    ({**GOOD, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "ok"}, {"type": "text", "text": "a\udc00"}]}]}, None,
     "messages.0.content.1.text: contains a lone surrogate (U+DC00)"),
    ({**GOOD, "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {
        "name": "f", "arguments": '{"x": "\udfff"}'}}]}, {"role": "user", "content": "go"}]},
     None, "messages.0.tool_calls.0.function.arguments: contains a lone surrogate"),
    ({**GOOD, "tools": [{"type": "function", "function": {"name": "f",
                                                          "description": "\ud83d"}}]}, None,
     "tools.0.function.description: contains a lone surrogate (U+D83D)"),
    ({**GOOD, "stop": ["ok", "\ud800"]}, None, "stop.1: contains a lone surrogate"),
    ({**GOOD, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"enum": ["\udbff"]}}}}}}, None,
     "response_format.json_schema.schema.properties.a.enum.0: contains a lone surrogate"),
    ({**GOOD, "metadata": {"k\ud800": "v"}}, None,
     "metadata.k\\ud800: the key contains a lone surrogate"),
]


@pytest.mark.parametrize(("body", "raw", "message"), CASES,
                         ids=[c[2][:30] for c in CASES])
def test_specific_bad_requests(http: httpx.Client, target: tuple[Running, ScriptedBackend],
                               body: Any, raw: bytes | None, message: str) -> None:
    before = len(target[1].calls)
    assert_4xx(post(http, body, raw), 400, message)
    assert len(target[1].calls) == before, "a bad request reached the model"


def test_a_surrogate_names_its_field_in_param(http: httpx.Client) -> None:
    body = {**GOOD, "messages": [{"role": "system", "content": "fine"},
                                 {"role": "user", "content": "x\ud800y"}]}
    err = post(http, body).json()["error"]
    assert err["param"] == "messages.1.content" and err["type"] == "invalid_request_error"


def test_valid_non_ascii_text_is_served(http: httpx.Client) -> None:
    body = {**GOOD, "messages": [{"role": "user", "content": "h\u00e9llo \U0001f600 \u4e16"}]}
    raw = json.dumps(body).encode()  # astral characters as a surrogate *pair* escape
    assert b"\\ud83d\\ude00" in raw
    assert post(http, None, raw).status_code == 200


def test_huge_body_is_413(http: httpx.Client, target: tuple[Running, ScriptedBackend]) -> None:
    body = {**GOOD, "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_4xx(post(http, body), 413, "exceeds the limit of 65536")
    # A body that lies about its length (chunked, no Content-Length) is cut off too.
    chunked = http.post("/v1/chat/completions",
                        content=iter([json.dumps(body).encode()[i:i + 8192]
                                      for i in range(0, 80_000, 8192)]))
    assert_4xx(chunked, 413, "exceeds the limit")


def test_unknown_route_and_method_are_openai_shaped(http: httpx.Client) -> None:
    assert_4xx(http.get("/v1/nothing"), 404, "Not Found")
    assert_4xx(http.get("/v1/chat/completions"), 405, "Method Not Allowed")


def test_good_request_still_works(http: httpx.Client) -> None:
    assert post(http, GOOD).json()["choices"][0]["message"]["content"] == "ok"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=12,
)
FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "stop", "stream",
          "response_format", "tools", "tool_choice", "seed", "n", "quantfleet", "user"]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_any_wrong_value_is_a_4xx_never_a_500(http: httpx.Client, field: str,
                                              value: Any) -> None:
    body = {**GOOD, field: value}
    resp = post(http, body)
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        assert_4xx(resp, resp.status_code)
        assert resp.status_code in (400, 404)


message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot", ""]),
     "content": st.none() | st.text(max_size=20) | json_values},
    optional={"tool_calls": json_values, "name": json_values, "tool_call_id": json_values})


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(messages=st.lists(message, max_size=4))
def test_any_message_list_is_answered_or_refused_cleanly(http: httpx.Client,
                                                         messages: list[Any]) -> None:
    resp = post(http, {**GOOD, "messages": messages})
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert_4xx(resp)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_cleanly(http: httpx.Client, raw: bytes) -> None:
    resp = post(http, None, raw)
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert_4xx(resp)


surrogates = st.integers(0xD800, 0xDFFF).map(chr)
clean_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=6)
clean_keys = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="."),
                     max_size=6)  # paths are dotted, like pydantic's error locations
clean_json = st.recursive(
    st.none() | st.booleans() | st.integers() | clean_text,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(clean_keys, c, max_size=3),
    max_leaves=10,
)


def _at(value: Any, path: str) -> Any:
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


@given(value=clean_json, data=st.data())
def test_unicode_problem_finds_the_one_surrogate_and_names_its_path(value: Any,
                                                                    data: st.DataObject) -> None:
    from quantfleet.agent.serving.protocol import unicode_problem

    assert unicode_problem(value) is None
    # Put a lone surrogate into one string value of the tree (a new leaf if there is none).
    doc = {"root": value}
    strings: list[tuple[Any, Any]] = []
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        for key in (range(len(node)) if isinstance(node, list) else list(node)):
            if isinstance(node[key], str):
                strings.append((node, key))
            elif isinstance(node[key], list | dict):
                stack.append(node[key])
    node, key = data.draw(st.sampled_from(strings)) if strings else (doc, "extra")
    old = node[key] if strings else ""
    cut = data.draw(st.integers(0, len(old)))
    bad = data.draw(surrogates)
    node[key] = old[:cut] + bad + old[cut:]
    found = unicode_problem(doc)
    assert found is not None
    path, message = found
    assert bad in _at(doc, path)
    assert f"(U+{ord(bad):04X})" in message and message.startswith(f"{path}: ")
