"""Prometheus text exposition of the agent's counters, gauges and histograms.

A few dozen series do not justify a client library on a device: this module
keeps them in dicts under one lock and renders the text format (version
0.0.4) for ``GET /metrics``.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    body = ",".join(
        f'{k}="{v}"'.replace("\\", "\\\\").replace("\n", "\\n") for k, v in items)
    return "{" + body + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[Labels, float]] = {}
        self._hist: dict[str, dict[Labels, list[float]]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._gauges: dict[str, Callable[[], dict[Labels, float]]] = {}

    def counter(self, name: str, help_: str) -> None:
        self._help[name] = ("counter", help_)
        self._counters.setdefault(name, {})

    def histogram(self, name: str, help_: str, buckets: tuple[float, ...] = LATENCY_BUCKETS
                  ) -> None:
        self._help[name] = ("histogram", help_)
        self._hist.setdefault(name, {})
        self._buckets[name] = buckets

    def gauge(self, name: str, help_: str, read: Callable[[], dict[Labels, float]]) -> None:
        """A gauge read when scraped (queue depth is the admission's own state)."""
        self._help[name] = ("gauge", help_)
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1.0, /, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, /, **labels: str) -> None:
        key = _labels(labels)
        buckets = self._buckets[name]
        with self._lock:
            series = self._hist[name].get(key)
            if series is None:
                # per bucket counts, then +Inf count, then sum
                series = self._hist[name][key] = [0.0] * (len(buckets) + 2)
            series[bisect_left(buckets, value)] += 1
            series[-1] += value

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(_labels(labels), 0.0)

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            for name, (kind, help_) in self._help.items():
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for key, v in self._counters[name].items():
                        out.append(f"{name}{_fmt(key)} {v:g}")
                elif kind == "histogram":
                    buckets = self._buckets[name]
                    for key, series in self._hist[name].items():
                        cumulative = 0.0
                        for edge, n in zip(buckets, series, strict=False):
                            cumulative += n
                            out.append(f"{name}_bucket{_fmt(key, (('le', f'{edge:g}'),))} "
                                       f"{cumulative:g}")
                        count = cumulative + series[len(buckets)]
                        out.append(f"{name}_bucket{_fmt(key, (('le', '+Inf'),))} {count:g}")
                        out.append(f"{name}_sum{_fmt(key)} {series[-1]:g}")
                        out.append(f"{name}_count{_fmt(key)} {count:g}")
                else:
                    for key, v in self._gauges[name]().items():
                        out.append(f"{name}{_fmt(key)} {v:g}")
        return "\n".join(out) + "\n"


def agent_metrics() -> Metrics:
    m = Metrics()
    m.counter("quantfleet_requests_total", "Requests answered, by variant and HTTP status.")
    m.counter("quantfleet_tokens_total", "Tokens processed, by variant and kind (prompt, "
              "completion).")
    m.histogram("quantfleet_request_latency_seconds", "Arrival to last byte.")
    m.histogram("quantfleet_time_to_first_token_seconds", "Arrival to first generated token.")
    m.histogram("quantfleet_queue_wait_seconds", "Time spent waiting for a model worker.")
    m.counter("quantfleet_validation_outcomes_total", "Validation outcomes, by kind and result.")
    m.counter("quantfleet_fallbacks_total", "Retries on the fallback variant, by from and to.")
    m.counter("quantfleet_rejections_total", "Requests refused before generation, by reason.")
    m.counter("quantfleet_truncations_total", "Budget enforcement: dropped turns, clamped "
              "max_tokens.")
    m.counter("quantfleet_events_not_durable_total", "Answers that left before their "
              "request event was committed to the outbox (events.durable_wait_s passed, or "
              "the outbox could not be written).")
    return m
