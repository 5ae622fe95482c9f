"""Per-variant, per-minute aggregates of the request events.

The fleet computes rates and p95/p99 latency from these even when the raw
events were evicted from a full outbox, and one row per variant and minute
spares the flash compared with one per request. Histograms use the fixed
buckets of ``wire.LATENCY_BUCKETS_S`` so any two devices' figures add up.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Any

from quantfleet.agent.wire import LATENCY_BUCKETS_S, AggregatePayload, Histogram, RequestEvent


def observe(hist: Histogram, value: float) -> None:
    """Count ``value`` (seconds) in its bucket: the first bound it does not exceed."""
    hist.counts[bisect.bisect_left(hist.bounds, value)] += 1
    hist.total += value


def quantile(hist: Histogram, q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile (None: empty; inf: overflow)."""
    n = sum(hist.counts)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for i, count in enumerate(hist.counts):
        seen += count
        if seen >= rank and count:
            return hist.bounds[i] if i < len(hist.bounds) else float("inf")
    return float("inf")


class MinuteAggregator:
    """Folds request events into one ``AggregatePayload`` per (variant, minute)."""

    def __init__(self, sink: Callable[[AggregatePayload], Any],
                 clock: Callable[[], float] = time.time) -> None:
        self._sink = sink
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], AggregatePayload] = {}

    def record(self, event: RequestEvent) -> None:
        minute = int(event.ts // 60) * 60
        key = (event.variant, minute)
        with self._lock:
            agg = self._open.get(key)
            if agg is None:
                agg = self._open[key] = AggregatePayload(variant=event.variant, minute=minute)
            agg.requests += 1
            if event.status >= 400:
                agg.errors += 1
            status = str(event.status)
            agg.statuses[status] = agg.statuses.get(status, 0) + 1
            for check in event.validations:
                if check.kind == "tool_call":
                    if check.passed:
                        agg.tool_calls_ok += 1
                    else:
                        agg.tool_calls_failed += 1
                if not check.passed:
                    agg.validation_failures[check.kind] = (
                        agg.validation_failures.get(check.kind, 0) + 1)
                    if check.kind == "refusal":
                        agg.refusals += 1
            if event.fallback_from is not None:
                agg.fallbacks += 1
            agg.prompt_tokens += event.prompt_tokens
            agg.completion_tokens += event.completion_tokens
            agg.attempt_tokens += event.attempt_tokens
            observe(agg.latency, event.latency_s)
            if event.time_to_first_token_s is not None:
                observe(agg.time_to_first_token, event.time_to_first_token_s)

    def flush(self, everything: bool = False) -> list[AggregatePayload]:
        """Hand finished minutes (all of them with ``everything``) to the sink, oldest first."""
        now = self._clock()
        with self._lock:
            done = sorted((k for k in self._open if everything or k[1] + 60 <= now),
                          key=lambda k: (k[1], k[0]))
            out = [self._open.pop(k) for k in done]
        for agg in out:
            self._sink(agg)
        return out


__all__ = ["LATENCY_BUCKETS_S", "MinuteAggregator", "observe", "quantile"]
