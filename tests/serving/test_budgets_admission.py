"""Budget arithmetic, quotas and the admission queue as pure logic (no model, no socket)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantfleet.agent.serving.admission import Lane, Lease, Rejected
from quantfleet.agent.serving.budgets import (
    BudgetExceeded,
    QuotaBook,
    QuotaExceeded,
    clamp_max_tokens,
    fit_messages,
)
from quantfleet.agent.serving.metrics import agent_metrics
from quantfleet.agent.serving.tools import (
    constraint_for,
    messages_for_template,
    parse_tool_calls,
    tool_call_schema,
)


def words(msgs: list[dict[str, str]]) -> int:
    return sum(len(m["content"].split()) + 1 for m in msgs)


def role(m: dict[str, str]) -> str:
    return m["role"]


def test_fit_keeps_system_and_newest_and_drops_oldest() -> None:
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "one two three"},
            {"role": "assistant", "content": "four five"},
            {"role": "user", "content": "six"}]
    fit = fit_messages(msgs, words, 8, role)
    assert [m["content"] for m in fit.messages] == ["be brief", "four five", "six"]
    assert fit.dropped == 1 and fit.prompt_tokens == 8


def test_fit_that_cannot_be_met_says_by_how_much() -> None:
    msgs = [{"role": "system", "content": "a b c d e"}, {"role": "user", "content": "f g h"}]
    with pytest.raises(BudgetExceeded) as err:
        fit_messages(msgs, words, 6, role)
    assert err.value.needed == 10 and "4 over the budget of 6" in str(err.value)


@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]),
                          st.integers(0, 20)), min_size=1, max_size=12),
       st.integers(1, 120))
def test_fit_properties(spec: list[tuple[str, int]], budget: int) -> None:
    msgs = [{"role": r, "content": " ".join(["w"] * n)} for r, n in spec]
    try:
        fit = fit_messages(msgs, words, budget, role)
    except BudgetExceeded as exc:
        pinned = [m for m in msgs[:-1] if m["role"] == "system"] + [msgs[-1]]
        assert words(pinned) > budget and exc.needed == words(pinned)
        return
    assert fit.prompt_tokens <= budget
    assert fit.messages[-1] is msgs[-1]
    ids = {id(m) for m in fit.messages}
    assert all(id(m) in ids for m in msgs if m["role"] == "system")
    # Of the droppable turns, what is kept is the newest part of the conversation.
    droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
    kept = [i for i in droppable if id(msgs[i]) in ids]
    assert kept == droppable[len(droppable) - len(kept):]
    assert fit.dropped == len(droppable) - len(kept)


def one_at_a_time(msgs: list[dict[str, str]], count: Any, budget: int) -> tuple[list[Any], int]:
    """The policy as first written: drop the oldest candidate, recount, repeat."""
    kept, dropped = list(msgs), 0
    while (tokens := count(kept)) > budget:
        victim = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
        if victim is None:
            raise BudgetExceeded(tokens, budget)
        del kept[victim]
        dropped += 1
    return kept, dropped


def template_words(msgs: list[dict[str, str]]) -> int:
    """Like a real template: not additive (a default system prompt when none leads)."""
    return words(msgs) + 3 + (5 if msgs and msgs[0]["role"] != "system" else 0)


@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]),
                          st.integers(0, 30)), min_size=1, max_size=40),
       st.integers(1, 400), st.sampled_from([words, template_words]), st.booleans())
def test_fit_is_exactly_the_one_at_a_time_policy(spec: list[tuple[str, int]], budget: int,
                                                 count: Any, sized: bool) -> None:
    msgs = [{"role": r, "content": " ".join(["w"] * n)} for r, n in spec]
    calls: list[int] = []

    def counting(kept: list[dict[str, str]]) -> int:
        calls.append(len(kept))
        return int(count(kept))

    size = (lambda m: len(m["content"])) if sized else None
    try:
        want, dropped = one_at_a_time(msgs, count, budget)
    except BudgetExceeded as exc:
        with pytest.raises(BudgetExceeded) as err:
            fit_messages(msgs, counting, budget, role, size)
        assert err.value.needed == exc.needed
        return
    fit = fit_messages(msgs, counting, budget, role, size)
    assert [id(m) for m in fit.messages] == [id(m) for m in want]
    assert fit.dropped == dropped and fit.prompt_tokens == count(want)
    assert len(calls) <= 5 + max(1, len(msgs)).bit_length()


def test_fit_of_many_similar_turns_counts_a_handful_of_times() -> None:
    msgs = [{"role": "system", "content": "be brief"}] + [
        {"role": "user" if i % 2 else "assistant", "content": "hi"} for i in range(2000)]
    calls: list[int] = []

    def counting(kept: list[dict[str, str]]) -> int:
        calls.append(len(kept))
        return words(kept)

    fit = fit_messages(msgs, counting, 300, role, lambda m: len(m["content"]))
    # 3 tokens of system, 2 per turn: 148 turns fit in 300, the newest among them.
    assert fit.dropped == 2000 - 148 and fit.prompt_tokens == 299
    assert fit.messages[0] is msgs[0] and fit.messages[1:] == msgs[-148:]
    assert len(calls) <= 5, calls


def test_clamp() -> None:
    assert clamp_max_tokens(None, 256, 512) == (256, False)
    assert clamp_max_tokens(100, 256, 512) == (100, False)
    assert clamp_max_tokens(4000, 256, 512) == (512, True)


def test_quota_minute_and_day_windows_with_retry_after() -> None:
    now = [1000.0]
    book = QuotaBook(per_minute=100, per_day=150, clock=lambda: now[0])
    book.check("a")
    book.charge("a", 60)
    now[0] += 10
    book.charge("a", 50)
    with pytest.raises(QuotaExceeded) as err:
        book.check("a")
    assert err.value.window == "minute" and err.value.retry_after_s == 50
    book.check("b")  # other clients are unaffected
    now[0] += 51  # the first 60 tokens aged out of the minute, not the day
    book.check("a")
    book.charge("a", 45)
    now[0] += 120
    with pytest.raises(QuotaExceeded) as day:
        book.check("a")
    assert day.value.window == "day" and 86000 < day.value.retry_after_s <= 86400
    assert book.used("a", "day") == 155


def test_quota_memory_is_bounded() -> None:
    book = QuotaBook(per_minute=10, per_day=0, max_clients=3, clock=lambda: 0.0)
    for i in range(10):
        book.charge(f"c{i}", 1)
    assert len(book._usage) == 3


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_lane_queue_bound_priority_and_drain() -> None:
    async def scenario() -> None:
        a = object()
        lane = Lane("v", [a], queue_size=2)  # type: ignore[list-item]
        far = time.monotonic() + 30
        got = await lane.acquire(1, far)
        assert got is a and lane.in_flight == 1
        low = asyncio.create_task(lane.acquire(2, far))
        await asyncio.sleep(0)
        high = asyncio.create_task(lane.acquire(0, far))
        await asyncio.sleep(0)
        assert lane.queue_depth == 2
        with pytest.raises(Rejected) as full:
            await lane.acquire(1, far)
        assert full.value.status == 429 and full.value.retry_after_s >= 1
        lane.release(a, 1.0)  # type: ignore[arg-type]
        assert await high is a and not low.done()
        lane.drain()
        with pytest.raises(Rejected) as drained:
            await low
        assert drained.value.status == 503
        with pytest.raises(Rejected):
            await lane.acquire(0, far)

    run(scenario())


def test_lane_deadline_while_queued() -> None:
    async def scenario() -> None:
        lane = Lane("v", [object()], queue_size=4)  # type: ignore[list-item]
        await lane.acquire(1, time.monotonic() + 30)
        with pytest.raises(Rejected) as late:
            await lane.acquire(1, time.monotonic() + 0.05)
        assert late.value.status == 503 and late.value.reason == "deadline"
        assert lane.queue_depth == 0

    run(scenario())


def test_a_lease_gives_its_instance_back_once_and_never_while_work_runs_on_it() -> None:
    async def scenario() -> None:
        a = object()
        lane = Lane("v", [a], queue_size=2)  # type: ignore[list-item]
        far = time.monotonic() + 30
        lease = Lease(lane, await lane.acquire(1, far))
        started, finish = threading.Event(), threading.Event()

        def work() -> str:
            started.set()
            finish.wait(10)
            return "done"

        with ThreadPoolExecutor(1) as pool:
            fut = lease.run(pool, work)
            with pytest.raises(RuntimeError):
                lease.run(pool, work)  # one piece of work at a time
            await asyncio.to_thread(started.wait, 10)
            lease.release()
            lease.release()
            assert not lease.released and lane.in_flight == 1  # the thread still uses it
            waiter = asyncio.create_task(lane.acquire(1, far))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            finish.set()
            assert await fut == "done"
            assert await waiter is a and lane.in_flight == 1  # handed on exactly once
        assert lease.released
        lease.release()
        assert lane.in_flight == 1

    run(scenario())


def test_metrics_render_prometheus_text() -> None:
    m = agent_metrics()
    m.inc("quantfleet_requests_total", variant="Q8_0", status="200")
    m.observe("quantfleet_request_latency_seconds", 0.3, variant="Q8_0")
    m.observe("quantfleet_request_latency_seconds", 500, variant="Q8_0")
    text = m.render()
    assert 'quantfleet_requests_total{status="200",variant="Q8_0"} 1' in text
    assert 'quantfleet_request_latency_seconds_bucket{variant="Q8_0",le="0.25"} 0' in text
    assert 'quantfleet_request_latency_seconds_bucket{variant="Q8_0",le="0.5"} 1' in text
    assert 'quantfleet_request_latency_seconds_bucket{variant="Q8_0",le="+Inf"} 2' in text
    assert 'quantfleet_request_latency_seconds_count{variant="Q8_0"} 2' in text


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_prompt_constraint_and_parse() -> None:
    msgs = messages_for_template([{"role": "system", "content": "Be kind."},
                                  {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                 [WEATHER], "auto")
    assert msgs[0]["content"].startswith("Be kind.\n\nYou can call functions.")
    assert "get_weather" in msgs[0]["content"] and msgs[1]["content"] == "hi"
    assert constraint_for([WEATHER], "none") == ("none", None)
    kind, schema = constraint_for([WEATHER], "required")
    assert kind == "json_schema" and schema == tool_call_schema([WEATHER])
    kind, grammar = constraint_for([WEATHER], "auto")
    assert kind == "grammar" and "root ::= toolcall | prose" in grammar
    calls = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}', [WEATHER])
    assert calls and calls[0]["function"] == {"name": "get_weather",
                                              "arguments": '{"city": "Oslo"}'}
    assert parse_tool_calls("It is sunny.", [WEATHER]) is None
    assert parse_tool_calls('{"name": "other", "arguments": {}}', [WEATHER]) is None


@given(st.text(max_size=80))
def test_parse_tool_calls_never_raises(text: str) -> None:
    calls = parse_tool_calls(text, [WEATHER])
    assert calls is None or all(c["function"]["name"] == "get_weather" for c in calls)
