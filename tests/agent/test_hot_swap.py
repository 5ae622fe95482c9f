"""The hot swap under steady traffic: real variants, the real API on a real socket.

Requests keep arriving from several clients while the active variant changes
from Q8_0 to Q4_K_M; every one of them must succeed, those routed before the
swap finish on Q8_0, the rest run on Q4_K_M, and Q8_0 is closed afterwards.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from quantfleet.agent.config import AgentConfig, parse_config
from quantfleet.agent.serving.api import AgentService, create_app
from quantfleet.agent.serving.recorder import MemoryRecorder
from quantfleet.agent.serving.routing import ModelSet
from quantfleet.models.catalog import Catalog
from tests.support import free_port


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.recorder = MemoryRecorder(10_000)
        self.models = ModelSet.load(config)
        self.app = create_app(config, self.models, self.recorder)
        self.service: AgentService = self.app.state.service
        self.loop: asyncio.AbstractEventLoop | None = None
        self.service.on_ready.append(self._capture_loop)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def _capture_loop(self) -> None:
        self.loop = asyncio.get_running_loop()

    def start(self) -> Agent:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started or self.loop is None:
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.02)
        return self

    def swap(self, variant: str) -> str | None:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self.models.swap(variant), self.loop).result(120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def agent(ladder_dir: Path) -> Iterator[Agent]:
    config = parse_config({
        "models": {"dir": str(ladder_dir), "active": "Q8_0", "fallback": "", "threads": 1,
                   "n_ctx": 512},
        "concurrency": {"queue_size": 32},
    })
    a = Agent(config).start()
    yield a
    a.stop()


def test_hot_swap_drops_no_request_under_steady_traffic(agent: Agent, catalog: Catalog) -> None:
    q8, q4 = catalog.resolve("Q8_0").name, catalog.resolve("Q4_K_M").name
    url = f"http://127.0.0.1:{agent.port}/v1/chat/completions"
    results: list[tuple[float, float, int, str]] = []  # (sent, done, status, model)
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = 0
            while not stop.is_set():
                n += 1
                sent = time.monotonic()
                r = http.post(url, json={
                    "model": "default", "max_tokens": 6, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Count to {n + i}."}]})
                model = r.json().get("model", "") if r.status_code == 200 else r.text
                with lock:
                    results.append((sent, time.monotonic(), r.status_code, model))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in clients:
        t.start()
    try:
        # Swap while the old lane is busy: one generating, others queued behind it.
        deadline = time.monotonic() + 60
        old_lane = agent.models.lanes[q8]
        while not (old_lane.in_flight >= 1 and old_lane.queue_depth >= 1):
            assert time.monotonic() < deadline, "traffic never queued on the old lane"
            time.sleep(0.005)
        swap_started = time.monotonic()
        previous = agent.swap(q4)
        swap_done = time.monotonic()
        # Keep the traffic going on the new variant for a while.
        end = time.monotonic() + 60
        while time.monotonic() < end:
            with lock:
                after = sum(1 for r in results if r[0] > swap_done)
            if after >= 8:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in clients:
            t.join(120)

    assert previous == q8
    statuses = [r[2] for r in results]
    assert statuses and all(s == 200 for s in statuses), \
        [r for r in results if r[2] != 200][:5]
    models = {r[3] for r in results}
    assert models == {q8, q4}
    # Whatever was sent after the swap completed ran on the new variant...
    assert all(r[3] == q4 for r in results if r[0] > swap_done)
    # ...and requests already queued when the swap began finished on the old one.
    assert any(r[3] == q8 and r[0] < swap_started and r[1] > swap_started for r in results)
    # The old variant was retired once idle; only the new one is loaded and active.
    assert list(agent.models.lanes) == [q4]
    assert agent.models.active == q4 and agent.models.swaps == 1
    events = agent.recorder.snapshot()
    assert len(events) == len(results) and all(e.status == 200 for e in events)
    # /healthz tells the same story.
    health = httpx.get(f"http://127.0.0.1:{agent.port}/healthz").json()
    assert health["active"] == q4 and health["loaded"] == [q4]


def test_a_swap_that_cannot_load_changes_nothing(agent: Agent, catalog: Catalog) -> None:
    q8 = catalog.resolve("Q8_0").name
    with pytest.raises(Exception, match="no-such-variant"):
        agent.swap("no-such-variant")
    assert agent.models.active == q8 and list(agent.models.lanes) == [q8]
    r = httpx.post(f"http://127.0.0.1:{agent.port}/v1/chat/completions", timeout=60, json={
        "model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["model"] == q8
