"""Budgets, quotas, validation, fallback, backpressure and cancellation, on the real model."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

import httpx
import openai
import psutil
import pytest

from quantfleet.agent.backends import Backend
from quantfleet.agent.config import parse_config

from .conftest import ScriptedBackend, ServeFactory

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def oa(url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120, **kw)


def ext(resp: Any) -> dict[str, Any]:
    return dict((resp.model_extra or {})["quantfleet"])


# -- budgets -------------------------------------------------------------------------------

def test_max_tokens_is_clamped_and_recorded(serve_app: ServeFactory,
                                            loaded: dict[str, Backend]) -> None:
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""},
                      budgets={"max_tokens_ceiling": 6, "default_max_tokens": 6})
    resp = oa(agent.v1).chat.completions.create(
        model="default", max_tokens=200,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    assert resp.usage is not None and resp.usage.completion_tokens == 6
    assert resp.choices[0].finish_reason == "length"
    assert ext(resp)["max_tokens_clamped"] is True
    event = agent.wait_event(resp.id)
    assert event.max_tokens_clamped is True
    assert ("finish_reason", False) in [(o.kind, o.passed) for o in event.validations]
    assert 'quantfleet_truncations_total{kind="max_tokens_clamped"} 1' in httpx.get(
        agent.url + "/metrics").text


def test_prompt_budget_drops_oldest_turns_keeps_system(serve_app: ServeFactory,
                                                       loaded: dict[str, Backend]) -> None:
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""},
                      budgets={"max_prompt_tokens": 120})
    history: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
    for i in range(12):
        history.append({"role": "user", "content": f"Remember the number {i}, please, "
                                                   "it matters a great deal to me."})
        history.append({"role": "assistant", "content": f"I will remember {i}."})
    history.append({"role": "user", "content": "Say OK."})
    resp = oa(agent.v1).chat.completions.create(model="default", max_tokens=4, messages=history)
    dropped = ext(resp)["truncated_messages"]
    assert dropped > 0
    assert resp.usage is not None and resp.usage.prompt_tokens <= 120
    assert agent.wait_event(resp.id).truncated_messages == dropped


def test_prompt_that_cannot_fit_is_400_with_the_overrun(serve_app: ServeFactory,
                                                        loaded: dict[str, Backend]) -> None:
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""},
                      budgets={"max_prompt_tokens": 64})
    with pytest.raises(openai.BadRequestError) as err:
        oa(agent.v1).chat.completions.create(
            model="default", max_tokens=4,
            messages=[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "word " * 200}])
    assert err.value.code == "context_length_exceeded"
    message = str(err.value)
    assert "over the budget of 64" in message
    over = int(message.split(" tokens even")[0].split("needs ")[1]) - 64
    assert f"{over} over the budget" in message
    assert agent.wait_event().status == 400


def test_quota_per_client_is_429_with_retry_after(serve_app: ServeFactory,
                                                  loaded: dict[str, Backend]) -> None:
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""},
                      budgets={"tokens_per_minute": 40})
    msg = [{"role": "user", "content": "Say hello to everyone in the room."}]
    alice = oa(agent.v1, default_headers={"X-Client-Id": "alice"})
    first = alice.chat.completions.create(model="default", max_tokens=8, messages=msg)
    assert first.usage is not None and first.usage.total_tokens >= 40
    with pytest.raises(openai.RateLimitError) as limited:
        alice.chat.completions.create(model="default", max_tokens=8, messages=msg)
    retry_after = int(limited.value.response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert limited.value.code == "quota_exceeded"
    assert "tokens per minute" in str(limited.value)
    bob = oa(agent.v1, default_headers={"X-Client-Id": "bob"})
    assert bob.chat.completions.create(model="default", max_tokens=2, messages=msg).choices
    event = agent.wait_event()
    assert event.client == "bob"
    statuses = [(e.client, e.status) for e in agent.events()]
    assert statuses == [("alice", 200), ("alice", 429), ("bob", 200)]


def test_api_keys_identify_clients_and_a_token_is_required(
        serve_app: ServeFactory, loaded: dict[str, Backend],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTFLEET_AGENT_TOKEN", "s3cret")
    monkeypatch.setenv("QUANTFLEET_AGENT_API_KEYS", "app1=k-app1")
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""})
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        oa(agent.v1).chat.completions.create(model="default", max_tokens=2, messages=msg)
    ok = openai.OpenAI(base_url=agent.v1, api_key="s3cret", max_retries=0)
    assert ok.chat.completions.create(model="default", max_tokens=2, messages=msg).choices
    app1 = openai.OpenAI(base_url=agent.v1, api_key="k-app1", max_retries=0)
    resp = app1.chat.completions.create(model="default", max_tokens=2, messages=msg)
    assert agent.wait_event(resp.id).client == "app1"


# -- validation and fallback ----------------------------------------------------------------

def test_invalid_json_falls_back_to_the_real_fallback_variant(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    """The active variant is scripted to emit broken JSON; the real Q8_0 answers instead."""
    broken = ScriptedBackend(loaded["Q4_K_M"], ['{"name": "Ada", "age": '])
    agent = serve_app({"Q4_K_M": broken, "Q8_0": loaded["Q8_0"]})
    resp = oa(agent.v1).chat.completions.create(
        model="default", max_tokens=40,
        messages=[{"role": "user", "content": "Ada Lovelace was 36. Name and age?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    value = json.loads(resp.choices[0].message.content or "")
    assert set(value) >= {"name", "age"}
    assert resp.model == "Q8_0"
    meta = ext(resp)
    assert meta["fallback_from"] == "Q4_K_M"
    assert meta["constraint"] == "grammar"
    first = {(v["kind"], v["passed"]) for v in meta["fallback_validations"]}
    assert ("json_parse", False) in first
    event = agent.wait_event(resp.id)
    assert event.fallback_from == "Q4_K_M" and event.variant == "Q8_0"
    assert event.attempt_tokens > event.prompt_tokens + event.completion_tokens
    assert len(broken.calls) == 1
    assert 'quantfleet_fallbacks_total{from="Q4_K_M",to="Q8_0"} 1' in httpx.get(
        agent.url + "/metrics").text


def test_invalid_tool_call_falls_back(serve_app: ServeFactory,
                                      loaded: dict[str, Backend]) -> None:
    wrong = ScriptedBackend(loaded["Q4_K_M"], ['{"name": "launch", "arguments": {}}'])
    agent = serve_app({"Q4_K_M": wrong, "Q8_0": loaded["Q8_0"]})
    tool = {"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}, "required": ["city"]}}}
    resp = oa(agent.v1).chat.completions.create(
        model="default", max_tokens=40, tools=[tool], tool_choice="required",
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert resp.model == "Q8_0" and ext(resp)["fallback_from"] == "Q4_K_M"
    (call,) = resp.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"


def test_fallback_between_real_variants_on_truncation(serve_app: ServeFactory,
                                                      loaded: dict[str, Backend]) -> None:
    """Real Q2_K answer cut off by max_tokens: configured as a failure, retried on real Q8_0."""
    agent = serve_app({"Q2_K": loaded["Q2_K"], "Q8_0": loaded["Q8_0"]},
                      models={"active": "Q2_K"}, validation={"fallback_on": ["finish_reason"]})
    resp = oa(agent.v1).chat.completions.create(
        model="default", max_tokens=3,
        messages=[{"role": "user", "content": "Write an essay about rivers."}])
    assert resp.model == "Q8_0"
    event = agent.wait_event(resp.id)
    assert event.fallback_from == "Q2_K"
    assert ("finish_reason", False) in [(o.kind, o.passed) for o in event.fallback_validations]


def test_schema_the_grammar_cannot_express_is_detected_and_revalidated(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    """A look-ahead pattern cannot become GBNF: llama.cpp would silently use any-JSON."""
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"], "Q8_0": loaded["Q8_0"]})
    schema = {"type": "object", "required": ["code"],
              "properties": {"code": {"type": "string", "pattern": "^(?=[A-Z])[A-Z]{3}$"}}}
    resp = oa(agent.v1).chat.completions.create(
        model="default", max_tokens=30,
        messages=[{"role": "user", "content": "Give the airport code of Oslo."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    meta = ext(resp)
    event = agent.wait_event(resp.id)
    assert meta["constraint"] == "generic_json" and event.constraint == "generic_json"
    first = event.fallback_validations or event.validations
    kinds = [o.kind for o in first]
    assert kinds[:2] == ["json_parse", "json_schema"]
    schema_ok = first[1].passed
    assert (event.fallback_from is None) == schema_ok, "fallback runs exactly when it failed"


def test_refusal_and_citation_are_recorded(serve_app: ServeFactory,
                                           loaded: dict[str, Backend]) -> None:
    scripted = ScriptedBackend(loaded["Q4_K_M"], ["I'm sorry, but I can't help with that.",
                                                  "Water boils at 100 C [1]."])
    agent = serve_app({"Q4_K_M": scripted}, models={"fallback": ""})
    client = oa(agent.v1)
    r1 = client.chat.completions.create(model="default", max_tokens=20,
                                        messages=[{"role": "user", "content": "x"}],
                                        extra_body={"quantfleet": {"require_citation": True}})
    r2 = client.chat.completions.create(model="default", max_tokens=20,
                                        messages=[{"role": "user", "content": "x"}],
                                        extra_body={"quantfleet": {"require_citation": True}})
    e1, e2 = agent.wait_event(r1.id), agent.wait_event(r2.id)
    assert [(o.kind, o.passed) for o in e1.validations][:2] == [("refusal", False),
                                                                ("citation", False)]
    assert [(o.kind, o.passed) for o in e2.validations][:2] == [("refusal", True),
                                                                ("citation", True)]
    assert e1.fallback_from is None  # refusals are recorded, not retried, by default


# -- backpressure, deadlines, cancellation ----------------------------------------------------

async def _burst(url: str, n: int, max_tokens: int, **headers: str) -> list[httpx.Response]:
    body = {"model": "default", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Tell me about the sea."}]}
    async with httpx.AsyncClient(timeout=300) as http:
        return list(await asyncio.gather(*(
            http.post(url + "/v1/chat/completions", json=body, headers=headers)
            for _ in range(n))))


def test_overload_is_refused_fast_with_retry_after(serve_app: ServeFactory,
                                                   loaded: dict[str, Backend],
                                                   fault_record: Any) -> None:
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""},
                      concurrency={"queue_size": 2})
    rss_before = psutil.Process(os.getpid()).memory_info().rss
    responses = asyncio.run(_burst(agent.url, 12, 16))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 3, codes  # one running + two queued are always admitted
    assert set(codes) <= {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, "12 at once against 1 worker + 2 queue slots must shed load"
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
    for r in responses:
        if r.status_code == 200:
            assert r.json()["choices"][0]["message"]["content"]
    agent.idle()
    events = {e.request_id for e in agent.events()}
    answered = {r.headers["X-Request-Id"] for r in responses}
    fault_record(f"overload: 12 requests at once on 1 worker + 2 queue slots "
                 f"({len(rejected)} refused 429)", produced=len(answered),
                 stored=len(answered & events))
    assert answered <= events  # every request, refused ones too, has its event
    growth = psutil.Process(os.getpid()).memory_info().rss - rss_before
    assert growth < 64 * 2**20, f"memory grew by {growth / 2**20:.0f} MiB"
    metrics = httpx.get(agent.url + "/metrics").text
    assert f'quantfleet_rejections_total{{reason="queue_full"}} {len(rejected)}' in metrics
    assert "quantfleet_queue_depth" in metrics


def test_queued_request_past_its_deadline_is_503(serve_app: ServeFactory,
                                                 loaded: dict[str, Backend]) -> None:
    slow = ScriptedBackend(loaded["Q4_K_M"], ["one two three four five six"], delay_s=0.3)
    agent = serve_app({"Q4_K_M": slow}, models={"fallback": ""})

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": "default", "messages": [{"role": "user", "content": "x"}]}
            first = asyncio.create_task(http.post(agent.url + "/v1/chat/completions", json=body))
            await asyncio.sleep(0.2)
            late = await http.post(agent.url + "/v1/chat/completions",
                                   json={**body, "quantfleet": {"deadline_s": 0.5}})
            return [await first, late]

    first, late = asyncio.run(run())
    assert first.status_code == 200
    assert late.status_code == 503 and late.json()["error"]["code"] == "deadline"
    assert "Retry-After" in late.headers


def test_generation_past_the_deadline_stops(serve_app: ServeFactory,
                                            loaded: dict[str, Backend]) -> None:
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""})
    start = time.monotonic()
    r = httpx.post(agent.url + "/v1/chat/completions", timeout=60, json={
        "model": "default", "max_tokens": 500, "quantfleet": {"deadline_s": 0.5},
        "messages": [{"role": "user", "content": "Write a very long story."}]})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline"
    assert time.monotonic() - start < 10
    event = agent.wait_event()
    assert event.status == 504 and event.completion_tokens < 500


def test_priority_high_leaves_the_queue_first(serve_app: ServeFactory,
                                              loaded: dict[str, Backend]) -> None:
    slow = ScriptedBackend(loaded["Q4_K_M"], ["a b c"], delay_s=0.2)
    agent = serve_app({"Q4_K_M": slow}, models={"fallback": ""})

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            def post(who: str, prio: str) -> Any:
                return http.post(agent.url + "/v1/chat/completions",
                                 headers={"X-Client-Id": who, "X-Quantfleet-Priority": prio},
                                 json={"model": "default",
                                       "messages": [{"role": "user", "content": who}]})
            busy = asyncio.create_task(post("busy", "normal"))
            await asyncio.sleep(0.15)
            low = asyncio.create_task(post("low", "low"))
            await asyncio.sleep(0.05)
            high = asyncio.create_task(post("high", "high"))
            await asyncio.gather(busy, low, high)

    asyncio.run(run())
    order = [e.client for e in agent.events()]
    assert order == ["busy", "high", "low"]


def test_client_disconnect_cancels_generation(serve_app: ServeFactory,
                                              loaded: dict[str, Backend]) -> None:
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""})
    body = {"model": "default", "max_tokens": 400, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story about ships."}]}
    with httpx.stream("POST", agent.url + "/v1/chat/completions", json=body,
                      timeout=60) as resp:
        request_id = resp.headers["X-Request-Id"]
        got = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                got += 1
            if got >= 4:
                break  # leaving the block closes the connection mid-stream
    event = agent.wait_event(request_id)
    assert event.finish_reason == "cancelled"
    assert event.error_class == "client_disconnected"
    assert 3 <= event.completion_tokens < 400
    agent.idle(10)


# -- loading and the memory policy -----------------------------------------------------------

def test_healthz_is_503_until_the_model_is_loaded(ladder_dir: Any) -> None:
    import threading

    from quantfleet.agent.serving.routing import ModelSet

    from .conftest import make_config, start_app

    config = make_config(ladder_dir, models={"fallback": ""})
    release = threading.Event()

    def slow_load() -> ModelSet:
        release.wait(60)
        return ModelSet.load(config)

    agent = start_app(config, slow_load)  # type: ignore[arg-type]
    try:
        early = httpx.get(agent.url + "/healthz")
        assert early.status_code == 503 and early.json()["status"] == "loading"
        refused = httpx.post(agent.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert "Retry-After" in refused.headers
        release.set()
        end = time.monotonic() + 120
        while httpx.get(agent.url + "/healthz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.1)
        assert httpx.get(agent.url + "/healthz").json()["loaded"] == ["smollm2-135m-Q4_K_M"]
    finally:
        agent.stop()


def test_on_demand_fallback_is_loaded_for_the_retry_and_unloaded(ladder_dir: Any) -> None:
    from quantfleet.agent.serving.routing import ModelSet

    from .conftest import make_config, start_app

    config = make_config(ladder_dir, models={"fallback_load": "on_demand"},
                         validation={"fallback_on": ["finish_reason"]})
    models = ModelSet.load(config)
    assert sorted(models.lanes) == ["smollm2-135m-Q4_K_M"], "only the active one at start"
    agent = start_app(config, models)
    try:
        resp = oa(agent.v1).chat.completions.create(
            model="default", max_tokens=3,
            messages=[{"role": "user", "content": "Write an essay about mountains."}])
        assert resp.model == "smollm2-135m-Q8_0"
        assert ext(resp)["fallback_from"] == "smollm2-135m-Q4_K_M"
        assert sorted(models.lanes) == ["smollm2-135m-Q4_K_M"], "unloaded after the retry"
    finally:
        agent.stop()


def test_lazy_fallback_costs_nothing_until_used_then_stays_until_idle(ladder_dir: Any) -> None:
    from quantfleet.agent.serving.routing import ModelSet

    from .conftest import make_config, start_app

    config = make_config(ladder_dir, models={"fallback_load": "lazy", "fallback_idle_s": 2},
                         validation={"fallback_on": ["finish_reason"]})
    assert parse_config({}).models.fallback_load == "lazy", "the default"
    models = ModelSet.load(config)
    assert sorted(models.lanes) == ["smollm2-135m-Q4_K_M"], "only the active one at start"
    agent = start_app(config, models)
    body = {"model": "default", "max_tokens": 3,
            "messages": [{"role": "user", "content": "Write an essay about mountains."}]}
    try:
        first = httpx.post(agent.v1 + "/chat/completions", json=body, timeout=120).json()
        assert first["model"] == "smollm2-135m-Q8_0"
        event = agent.wait_event(first["id"])
        # The request that needed the fallback waited for its load, and says how long.
        assert event.fallback_from == "smollm2-135m-Q4_K_M"
        assert event.fallback_load_s is not None and 0 < event.fallback_load_s < event.latency_s
        assert "smollm2-135m-Q8_0" in models.lanes, "kept for the next fallback"
        second = httpx.post(agent.v1 + "/chat/completions", json=body, timeout=120).json()
        assert second["model"] == "smollm2-135m-Q8_0"
        assert agent.wait_event(second["id"]).fallback_load_s is None, "already loaded"
        end = time.monotonic() + 30
        while "smollm2-135m-Q8_0" in models.lanes:  # fallback_idle_s without a fallback
            assert time.monotonic() < end, "the idle fallback was never unloaded"
            time.sleep(0.2)
        assert sorted(models.lanes) == ["smollm2-135m-Q4_K_M"]
    finally:
        agent.stop()


def test_a_backend_failure_is_a_500_in_the_openai_shape_and_recorded(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    failing = ScriptedBackend(loaded["Q4_K_M"], ["one two <FAIL> three"])
    agent = serve_app({"Q4_K_M": failing}, models={"fallback": ""})
    body = {"model": "default", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(agent.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "backend_error"
    assert agent.wait_event().error_class == "backend_error"
    with httpx.stream("POST", agent.url + "/v1/chat/completions", timeout=30,
                      json={**body, "stream": True}) as s:
        lines = [x for x in s.iter_lines() if x.startswith("data: ")]
    assert json.loads(lines[-1][6:])["error"]["code"] == "backend_error"
    agent.idle(10)
    # The worker is back: the next request is served.
    ok = ScriptedBackend(loaded["Q4_K_M"], ["fine"])
    agent2 = serve_app({"Q4_K_M": ok}, models={"fallback": ""})
    assert httpx.post(agent2.url + "/v1/chat/completions", json=body).status_code == 200


def test_non_streamed_client_that_gives_up_cancels_generation(
        serve_app: ServeFactory, loaded: dict[str, Backend]) -> None:
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(agent.url + "/v1/chat/completions", timeout=httpx.Timeout(10, read=1.0),
                   json={"model": "default", "max_tokens": 480,
                         "messages": [{"role": "user", "content": "Write a long story."}]})
    event = agent.wait_event(timeout=30)
    assert event.status == 499 and event.error_class == "client_disconnected"
    assert event.finish_reason == "cancelled" and event.completion_tokens < 480
    agent.idle(10)


def test_many_short_turns_are_fitted_off_the_event_loop(serve_app: ServeFactory,
                                                        loaded: dict[str, Backend]) -> None:
    # Issue 14 #8: 2,000 turns of "hi" blocked /healthz for minutes while they were fitted
    # one dropped turn at a time on the event loop (bench/bench_fit.py has the figures).
    agent = serve_app({"Q4_K_M": loaded["Q4_K_M"]}, models={"fallback": ""})
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"}
             for i in range(2000)]
    body = {"model": "default", "max_tokens": 2, "messages": turns}
    answer: dict[str, httpx.Response] = {}

    def ask() -> None:
        answer["r"] = httpx.post(agent.v1 + "/chat/completions", json=body, timeout=120)

    asker = threading.Thread(target=ask)
    asker.start()
    slowest = 0.0
    with httpx.Client(timeout=30) as client:
        while asker.is_alive():
            start = time.monotonic()
            assert client.get(agent.url + "/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.02)
    asker.join()
    resp = answer["r"]
    assert resp.status_code == 200, resp.text
    dropped = resp.json()["quantfleet"]["truncated_messages"]
    assert 0 < dropped < 2000 and resp.json()["usage"]["prompt_tokens"] <= 1024
    assert agent.wait_event(resp.headers["X-Request-Id"]).truncated_messages == dropped
    # A wide margin over the ~30 ms measured (it was minutes): the loop never blocked long.
    assert slowest < 1.0, slowest
