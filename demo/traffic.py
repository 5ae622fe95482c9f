"""Traffic for the demo's real agents: prose, JSON-schema and tool-call requests.

One thread per agent sends OpenAI-style ``POST /v1/chat/completions`` requests
in turn — a short question, an extraction constrained by ``response_format``
(a JSON Schema), a command that must become a tool call (``tools`` with
``tool_choice: "required"``) — with a pause between them, for as long as the
demo runs. The questions are ones the default model answers within its
token budget, so a ``finish_reason: length`` in the signals means something.
What each agent answered is counted by kind and status, the variant that
answered is read from ``X-Quantfleet-Variant``, and the latencies are kept
(the demo sets the simulated devices' latency from them).
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "set_timer", "description": "Start a kitchen timer.",
        "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}},
                       "required": ["minutes"]}}},
]
QUESTIONS = [
    "In one sentence, why is the sky blue?",
    "What is the boiling point of water in Celsius?",
    "What is the capital of France?",
    "Give one tip for saving energy at home.",
]
PEOPLE = [
    "Ada Lovelace was 36 when she died.",
    "Alan Turing, aged 41, worked in Manchester.",
    "Grace Hopper retired at 79.",
    "Marie Curie was 66 years old in 1933.",
]
TOOL_ASKS = [
    "What's the weather like in Oslo right now?",
    "Set a timer for 12 minutes.",
    "Is it raining in Lisbon?",
    "Start a 5 minute timer for the eggs.",
]


def request_body(kind: str, i: int) -> dict[str, Any]:
    """The i-th request of a kind: ``prose``, ``json`` or ``tool``."""
    if kind == "prose":
        return {"model": "default", "max_tokens": 64, "temperature": 0,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    if kind == "json":
        return {"model": "default", "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": "Extract the person's name and "
                              "age as JSON: " + PEOPLE[i % len(PEOPLE)]}],
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "person", "schema": PERSON_SCHEMA, "strict": True}}}
    if kind == "tool":
        return {"model": "default", "max_tokens": 48, "temperature": 0, "tools": TOOLS,
                "tool_choice": "required",
                "messages": [{"role": "user", "content": TOOL_ASKS[i % len(TOOL_ASKS)]}]}
    raise ValueError(f"unknown request kind {kind!r}")


def _answer(body: dict[str, Any]) -> str:
    msg = body["choices"][0]["message"]
    if msg.get("tool_calls"):
        call = msg["tool_calls"][0]["function"]
        return f"{call['name']}({call['arguments']})"
    return str(msg.get("content") or "").strip()


@dataclass
class AgentTraffic:
    """What one agent answered so far."""

    device_id: str
    url: str
    counts: Counter[tuple[str, int | str]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    variant: str | None = None
    samples: dict[str, str] = field(default_factory=dict)  # kind -> last answer

    @property
    def answered(self) -> int:
        return sum(n for (_, status), n in self.counts.items() if status == 200)

    def median_latency(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None


class TrafficDriver:
    """Background threads, one per agent, until ``stop``."""

    KINDS = ("prose", "json", "tool")

    def __init__(self, agents: dict[str, str], pause_s: float = 0.5,
                 timeout_s: float = 90.0) -> None:
        self.agents = {d: AgentTraffic(d, url) for d, url in agents.items()}
        self.pause_s = pause_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(a,), daemon=True,
                                          name=f"traffic-{a.device_id}")
                         for a in self.agents.values()]

    def start(self) -> TrafficDriver:
        for t in self._threads:
            t.start()
        return self

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop sending; a request still in flight may finish for ``wait_s`` (the threads
        are daemons, and the agents are stopped next anyway)."""
        self._stop.set()
        deadline = time.monotonic() + wait_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def snapshot(self) -> dict[str, AgentTraffic]:
        with self._lock:
            return {d: AgentTraffic(a.device_id, a.url, Counter(a.counts), list(a.latencies),
                                    a.variant, dict(a.samples))
                    for d, a in self.agents.items()}

    def _run(self, agent: AgentTraffic) -> None:
        with httpx.Client(base_url=agent.url, timeout=self.timeout_s) as client:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                kind = self.KINDS[i % len(self.KINDS)]
                started = time.monotonic()
                status: int | str
                try:
                    r = client.post("/v1/chat/completions", json=request_body(kind, i // 3))
                    status = r.status_code
                    latency = time.monotonic() - started
                    with self._lock:
                        agent.counts[(kind, status)] += 1
                        if status == 200:
                            agent.latencies.append(latency)
                            agent.variant = r.headers.get("X-Quantfleet-Variant", agent.variant)
                            agent.samples[kind] = _answer(r.json())
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                    with self._lock:
                        agent.counts[(kind, status)] += 1
                # Back off on refusals (429/503 while loading, swapping or draining).
                self._stop.wait(self.pause_s if status == 200 else 1.0)
