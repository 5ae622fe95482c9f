"""The request path settles every request once: one event, and the quota charged with
exactly the tokens its events say were spent, whatever the outcome."""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfleet.agent.backends import Backend
from quantfleet.agent.backends.base import Capabilities

from .conftest import BuggyBackend, ScriptedBackend, ServeFactory, metric

PERSON = {"type": "object", "properties": {"name": {"type": "string"}},
          "required": ["name"]}


def test_every_outcome_settles_once_and_the_quota_matches_the_events(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    real = loaded["Q4_K_M"]
    # The active variant breaks JSON (a fallback), fails mid-generation on "<FAIL>" and is
    # slow enough for a deadline; the fallback answers valid JSON.
    active = ScriptedBackend(real, ['{"name": ', "one two three four five six",
                                    "a <FAIL> b", " ".join(["word"] * 60)], delay_s=0.02)
    fallback = ScriptedBackend(real, ['{"name": "Ada"}'])
    agent = serve_app({"Q4_K_M": active, "Q8_0": fallback},
                      budgets={"tokens_per_minute": 1_000_000})
    url = agent.url + "/v1/chat/completions"
    msg = [{"role": "user", "content": "Who wrote the first program?"}]
    json_fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    requests: list[tuple[str, dict[str, Any] | bytes, int]] = [
        ("fallback", {"model": "default", "messages": msg, "response_format": json_fmt}, 200),
        ("stream", {"model": "default", "messages": msg, "stream": True,
                    "stream_options": {"include_usage": True}}, 200),
        ("backend failure", {"model": "default", "messages": msg}, 500),
        ("deadline", {"model": "default", "messages": msg, "max_tokens": 200,
                      "quantfleet": {"deadline_s": 0.3}}, 504),
        ("bad JSON", b'{"model": ', 400),
        ("unknown field", {"model": "default", "messages": msg, "surprise": 1}, 400),
        ("unknown model", {"model": "nope", "messages": msg}, 404),
        ("bad priority", {"model": "default", "messages": msg,
                          "quantfleet": {"priority": "urgent"}}, 400),
    ]
    ids: dict[str, str] = {}
    with httpx.Client(timeout=60, headers={"X-Client-Id": "app"}) as client:
        for name, body, want in requests:
            if isinstance(body, bytes):
                r = client.post(url, content=body, headers={"Content-Type": "application/json"})
            else:
                r = client.post(url, json=body)
            text = r.text  # a stream is read to its end
            assert r.status_code == want, (name, r.status_code, text)
            ids[name] = r.headers["X-Request-Id"]
            if name == "stream":
                assert text.rstrip().endswith("data: [DONE]")
                usage = [json.loads(line[6:]) for line in text.splitlines()
                         if line.startswith("data: {") and '"usage"' in line][-1]["usage"]
                assert usage["completion_tokens"] == 6
    agent.idle()
    events = {e.request_id: e for e in (agent.wait_event(i) for i in ids.values())}
    all_events = agent.events()
    assert len(all_events) == len(requests) and len(events) == len(requests)
    by_name = {name: events[i] for name, i in ids.items()}
    assert {n: e.status for n, e in by_name.items()} == {n: w for n, _, w in requests}
    fb = by_name["fallback"]
    assert fb.fallback_from == "Q4_K_M" and fb.variant == "Q8_0"
    assert fb.attempt_tokens > fb.prompt_tokens + fb.completion_tokens  # both attempts
    assert by_name["stream"].completion_tokens == 6 and by_name["stream"].stream
    deadline = by_name["deadline"]
    assert deadline.error_class == "deadline" and 0 < deadline.completion_tokens < 60
    assert by_name["backend failure"].attempt_tokens == 0
    for name in ("bad JSON", "unknown field", "unknown model", "bad priority"):
        assert by_name[name].attempt_tokens == 0 and by_name[name].completion_tokens == 0
    # The quota is charged with what the events say was spent, once each: nothing more.
    spent = sum(e.attempt_tokens for e in all_events)
    assert spent > 0 and agent.service.quotas.used("app") == spent


def test_capabilities_decide_the_constraint_not_the_backend_name(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    """tool_choice="auto" gets a grammar only from a backend that says it applies one."""
    real = loaded["Q4_K_M"]
    assert type(real).capabilities.grammar
    plain = ScriptedBackend(real, ["Hello."])
    assert not plain.capabilities.grammar

    class Masking(ScriptedBackend):
        kind = "llama.cpp-lookalike"  # neither "llama.cpp" nor sniffed
        capabilities = Capabilities(grammar=True)

    masking = Masking(real, ["Hello."])
    tools = [{"type": "function", "function": {
        "name": "weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}],
            "tools": tools, "tool_choice": "auto"}
    for backend, grammar in ((plain, False), (masking, True)):
        agent = serve_app({"Q4_K_M": backend}, models={"fallback": ""})
        r = httpx.post(agent.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert (backend.calls[-1].grammar is not None) is grammar


def test_an_unexpected_exception_after_admission_is_a_counted_500_and_frees_the_worker(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    # One worker: had the bug kept it, every later request would wait out its deadline.
    agent = serve_app({"Q4_K_M": BuggyBackend(loaded["Q4_K_M"], ["ok"])},
                      models={"fallback": "", "workers_per_model": 1},
                      concurrency={"deadline_s": 10})
    url = agent.url + "/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        for stream in (False, True):
            bad = client.post(url, json={"messages": [{"role": "user", "content": "<BUG>"}],
                                         "stream": stream})
            assert bad.status_code == 500, bad.text
            assert bad.json()["error"]["code"] == "internal_error"
            assert "RuntimeError" in bad.json()["error"]["message"]
            for _ in range(3):
                ok = client.post(url, json={"messages": [{"role": "user", "content": "hi"}],
                                            "stream": stream})
                assert ok.status_code == 200, ok.text
    agent.idle(5)
    events = agent.events()
    assert [e.status for e in events] == [500, 200, 200, 200] * 2
    assert {e.error_class for e in events if e.status == 500} == {
        "internal_error:RuntimeError"}
    assert metric(agent.url, "quantfleet_requests_total", status="500") == 2
    assert metric(agent.url, "quantfleet_requests_total", status="200") == 6
    assert metric(agent.url, "quantfleet_in_flight") == 0
    assert httpx.get(agent.url + "/healthz").status_code == 200


def test_a_lone_surrogate_is_a_counted_400_and_the_agent_keeps_serving(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    # Issue 14 #7, on the real model with one worker: the surrogate used to raise in the
    # tokenizer holding that worker; every later request then waited out its deadline.
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]},
                      models={"fallback": "", "workers_per_model": 1},
                      concurrency={"deadline_s": 20})
    url = agent.url + "/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        bad = client.post(url, content=b'{"messages":[{"role":"user","content":"\\ud800"}]}',
                          headers={"Content-Type": "application/json"})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"] == {
            "message": "messages.0.content: contains a lone surrogate (U+D800); "
                       "text must be valid Unicode",
            "type": "invalid_request_error", "param": "messages.0.content", "code": None}
        for i in range(5):
            ok = client.post(url, json={"messages": [{"role": "user", "content": f"Say {i}."}],
                                        "max_tokens": 2})
            assert ok.status_code == 200, ok.text
    agent.idle(5)
    assert [e.status for e in agent.events()] == [400] + [200] * 5
    assert agent.events()[0].request_id == bad.headers["X-Request-Id"]
    assert metric(agent.url, "quantfleet_requests_total", status="400") == 1
    assert metric(agent.url, "quantfleet_requests_total", status="200") == 5
    assert metric(agent.url, "quantfleet_in_flight") == 0
    assert httpx.get(agent.url + "/healthz").json()["status"] == "ready"


def test_a_bug_in_the_fallback_answers_with_the_first_attempt_and_frees_both_workers(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    real = loaded["Q4_K_M"]
    agent = serve_app({"Q4_K_M": ScriptedBackend(real, ['{"name": ']),
                       "Q8_0": BuggyBackend(real, ['{"name": "Ada"}'], bug="")})
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    with httpx.Client(timeout=30) as client:
        for _ in range(3):  # one worker per variant: a kept one would wedge the next
            r = client.post(agent.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Who?"}], "response_format": fmt})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == '{"name": '
            assert r.json()["quantfleet"]["fallback_from"] is None
    agent.idle(5)
    assert [e.status for e in agent.events()] == [200] * 3
    assert metric(agent.url, "quantfleet_in_flight") == 0


def test_an_instance_is_loaded_warmed_up_and_run_on_one_thread(
        ladder_dir: Any, loaded: dict[str, Backend]) -> None:
    """llama.cpp keeps a thread team per calling thread: an instance loaded (and warmed
    up) on one thread and driven from others ran two teams on two cores. Each instance
    now has a home thread that loads it, prepares its prompts and generates."""
    import threading

    from quantfleet.agent.serving.routing import ModelSet

    from .conftest import make_config, start_app

    seen: dict[str, list[int]] = {"load": [], "run": []}
    real = loaded["Q4_K_M"]

    class Recording(ScriptedBackend):
        def __init__(self) -> None:
            seen["load"].append(threading.get_ident())
            super().__init__(real, ["Hello there."])

        def tokenize(self, text: str, *, add_bos: bool = False,
                     special: bool = True) -> list[int]:
            seen["run"].append(threading.get_ident())
            return super().tokenize(text, add_bos=add_bos, special=special)

        def stream(self, request: Any) -> Any:
            seen["run"].append(threading.get_ident())
            return super().stream(request)

    config = make_config(ladder_dir, models={"fallback": "", "workers_per_model": 2})
    models = ModelSet(config, {"Q4_K_M": "Q4_K_M"}, lambda variant: Recording())
    models._load_sync("Q4_K_M")
    agent = start_app(config, models)
    try:
        with httpx.Client(timeout=60) as client:
            for _ in range(6):
                r = client.post(agent.url + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
                assert r.status_code == 200, r.text
    finally:
        agent.stop()
    assert len(set(seen["load"])) == 2 and threading.get_ident() not in seen["load"]
    assert set(seen["run"]) <= set(seen["load"]), "work ran off the instances' own threads"


@settings(max_examples=300)
@given(piece=st.text(), variant=st.text(min_size=1, max_size=40))
def test_a_streamed_token_chunk_is_the_full_chunk_rendered_faster(piece: str,
                                                                  variant: str) -> None:
    """The stream path writes each token into an envelope rendered once; the event it
    sends is byte for byte the one the general chunk builder makes, whatever the text
    (quotes, backslashes, control characters, non-BMP characters, the marker's NULs)."""
    from quantfleet.agent.serving.handler import Exchange, _chunk, _content_chunks

    ex = Exchange.new()
    ex.variant = variant
    assert _content_chunks(ex)(piece) == _chunk(ex, {"content": piece})
    assert json.loads(_content_chunks(ex)(piece)[len("data: "):])["choices"][0]["delta"] == {
        "content": piece}
    ex.variant = "\u0000quantfleet-piece\u0000"  # the marker itself, in the envelope
    assert _content_chunks(ex)(piece) == _chunk(ex, {"content": piece})
