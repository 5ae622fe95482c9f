"""Serving fixtures: the real API on a real socket, over the session's real model ladder.

``serve_app(config, backends)`` starts uvicorn in a thread on a free loopback
port and returns a ``Running`` handle (base URL, the app's service, the
in-memory recorder); it is stopped at the end of the test or module.
``ScriptedBackend`` is a real backend's tokenizer and template with scripted
output: it exists only to FORCE invalid answers for the fallback path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn

from quantfleet.agent.backends.base import (
    Backend,
    BackendError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    StreamHandle,
)
from quantfleet.agent.config import AgentConfig, parse_config
from quantfleet.agent.serving.api import AgentService, create_app
from quantfleet.agent.serving.recorder import MemoryRecorder
from quantfleet.agent.serving.routing import ModelSet
from quantfleet.agent.wire import RequestEvent

AGENT_BIN = Path(sys.executable).parent / "quantfleet-agent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str
    service: AgentService
    recorder: MemoryRecorder
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def events(self) -> list[RequestEvent]:
        return self.recorder.snapshot()

    def wait_event(self, request_id: str | None = None, timeout: float = 60.0) -> RequestEvent:
        """The event of ``request_id`` (or the newest one), waiting for it to be recorded."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            events = self.events()
            for ev in reversed(events):
                if request_id is None or ev.request_id == request_id:
                    return ev
            time.sleep(0.05)
        raise AssertionError(f"no event for {request_id}")

    def idle(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lanes = self.service.models.lanes.values() if self.service.models else []
            if all(lane.in_flight == 0 and lane.queue_depth == 0 for lane in lanes):
                return
            time.sleep(0.05)
        raise AssertionError("lanes still busy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def start_app(config: AgentConfig, models: ModelSet | Callable[[], ModelSet]) -> Running:
    recorder = MemoryRecorder(10_000)
    app = create_app(config, models, recorder)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > end or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return Running(url, app.state.service, recorder, server, thread)


def make_config(ladder_dir: Any, **sections: Mapping[str, Any]) -> AgentConfig:
    data: dict[str, Any] = {"models": {"dir": str(ladder_dir), "active": "Q4_K_M",
                                       "fallback": "Q8_0", "n_ctx": 1024}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, "test")


ServeFactory = Callable[..., Running]


@pytest.fixture
def serve_app(ladder_dir: Any) -> Iterator[ServeFactory]:
    """Start servers for one test; all are stopped afterwards."""
    started: list[Running] = []

    def factory(backends: Mapping[str, Backend | Sequence[Backend]],
                **sections: Mapping[str, Any]) -> Running:
        config = make_config(ladder_dir, **sections)
        running = start_app(config, ModelSet.from_backends(config, backends))
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


class ScriptedBackend(Backend):
    """A real backend's tokenizer and template with scripted answers (to force failures)."""

    kind = "scripted"

    def __init__(self, real: Backend, answers: Sequence[str], delay_s: float = 0.0) -> None:
        super().__init__(real.path, real.options)
        self.real = real
        self.answers = list(answers)
        self.calls: list[GenerationRequest] = []
        self.delay_s = delay_s

    @property
    def vocab_size(self) -> int:
        return self.real.vocab_size

    @property
    def n_ctx(self) -> int:
        return self.real.n_ctx

    @property
    def chat_template(self) -> str | None:
        return self.real.chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return self.real.special_tokens

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.real.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.real.detokenize(tokens)

    def stream(self, request: GenerationRequest) -> StreamHandle:
        self.calls.append(request)
        text = self.answers[(len(self.calls) - 1) % len(self.answers)]
        prompt_tokens = len(self.tokenize(str(request.prompt)))
        handle = StreamHandle(iter(()))

        def chunks() -> Iterator[GenerationChunk]:
            start = time.perf_counter()
            out = []
            finish = "stop"
            try:
                for word in text.split(" "):
                    time.sleep(self.delay_s)
                    if word == "<FAIL>":  # a runtime failure in the middle of a generation
                        raise BackendError("scripted failure")
                    piece = word if not out else " " + word
                    out.append(piece)
                    yield GenerationChunk(piece, [0])
            except GeneratorExit:
                finish = "cancelled"
                raise
            finally:
                handle.result = GenerationResult(
                    text="".join(out), finish_reason=finish,  # type: ignore[arg-type]
                    prompt_tokens=prompt_tokens, completion_tokens=len(out),
                    constraint="none", time_to_first_token_s=0.0,
                    total_time_s=time.perf_counter() - start)

        handle._chunks = chunks()
        return handle

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        raise NotImplementedError("scripted answers have no logits")


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s series on ``url``/metrics whose labels include ``labels``."""
    import re

    import httpx

    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


class BuggyBackend(ScriptedBackend):
    """A scripted backend with a bug: tokenizing text that holds ``bug`` (any text when it
    is "") raises ``RuntimeError`` — an exception no handler expects, after a worker was
    taken."""

    def __init__(self, real: Backend, answers: Sequence[str], bug: str = "<BUG>") -> None:
        super().__init__(real, answers)
        self.bug = bug

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        if self.bug in text:
            raise RuntimeError("a bug in the tokenizer")
        return super().tokenize(text, add_bos=add_bos, special=special)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(config: Path, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[str]:
        proc = subprocess.Popen([str(AGENT_BIN), "serve", "--config", str(config), *args],
                                env={**os.environ, **(env or {})}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
