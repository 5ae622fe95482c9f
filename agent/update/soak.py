"""The device's own soak watch: is the variant it just activated worse than the one before?

``SoakWatch`` is a serving ``Recorder``: it keeps, per variant, the recent
requests' outcomes — did the variant's own answer pass validation (the first
attempt's checks when a fallback ran, so a fallback does not hide a bad
answer), did the request fail with a server error, how long it took. After a
hot swap the updater asks ``judge(new, previous, since)`` every few seconds:

- validation failure rate: breach when the Wilson 95 % lower bound of the new
  variant's rate exceeds the previous variant's rate plus the tolerated
  increase (the evidence must clear the limit, a bad streak of three does not);
- error rate (5xx, a draining agent excluded): the same rule;
- p95 latency: breach when the new variant's p95 exceeds the previous one's
  times the allowed ratio, both on at least ``min_requests`` requests.

Nothing is judged on fewer than ``min_requests`` requests on the new variant.
Without traffic from the previous variant the rates are compared with 0 and
latency is not judged. The fleet's rollout gates do the fleet-wide statistics;
this watch is the device's own fast brake.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

from quantfleet.agent.quality.stats import wilson_interval
from quantfleet.agent.wire import RequestEvent


@dataclass(frozen=True)
class Outcome:
    ts: float
    valid: bool | None  # None: no output checks ran (an error, a plain prose answer)
    error: bool
    latency_s: float | None


@dataclass(frozen=True)
class SoakPolicy:
    min_requests: int = 20
    max_validation_increase: float = 0.10
    max_error_increase: float = 0.05
    max_latency_ratio: float = 2.0


@dataclass(frozen=True)
class SoakVerdict:
    breach: bool
    reason: str
    requests: int


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def outcome_of(event: RequestEvent) -> tuple[str, Outcome] | None:
    """Which variant answered first, and how it went (None: not the variant's doing)."""
    if event.status in (429, 499) or event.error_class == "draining" or not event.variant:
        return None  # backpressure, a client that left, a shutdown: not the model's doing
    variant = event.fallback_from or event.variant
    checks = event.fallback_validations if event.fallback_from else event.validations
    valid = all(o.passed for o in checks) if checks else None
    error = event.status >= 500
    latency = event.latency_s if event.status == 200 and not event.fallback_from else None
    return variant, Outcome(event.ts, valid, error, latency)


class SoakWatch:
    """Per-variant outcomes of the latest requests (a bounded window each)."""

    def __init__(self, per_variant: int = 5000) -> None:
        self.per_variant = per_variant
        self._by_variant: dict[str, deque[Outcome]] = {}
        self._lock = threading.Lock()

    # -- Recorder -------------------------------------------------------
    def record(self, event: RequestEvent) -> None:
        got = outcome_of(event)
        if got is None:
            return
        variant, outcome = got
        with self._lock:
            window = self._by_variant.get(variant)
            if window is None:
                window = self._by_variant[variant] = deque(maxlen=self.per_variant)
            window.append(outcome)

    def close(self) -> None:
        pass

    # -- the judgement ----------------------------------------------------
    def outcomes(self, variant: str, since: float | None = None,
                 until: float | None = None) -> list[Outcome]:
        with self._lock:
            window = list(self._by_variant.get(variant, ()))
        return [o for o in window if (since is None or o.ts >= since)
                and (until is None or o.ts < until)]

    def judge(self, new: str, previous: str | None, since: float,
              policy: SoakPolicy) -> SoakVerdict:
        """Compare ``new`` since ``since`` with ``previous`` before it."""
        cur = self.outcomes(new, since=since)
        base = self.outcomes(previous, until=since) if previous and previous != new else []
        n = len(cur)
        if n < policy.min_requests:
            return SoakVerdict(False, f"{n} requests on {new} so far (judged from "
                               f"{policy.min_requests})", n)
        problems: list[str] = []
        notes: list[str] = []
        rates = (  # (what, the new variant's outcomes, the previous one's, tolerated increase)
            ("validation failure", [o.valid is False for o in cur if o.valid is not None],
             [o.valid is False for o in base if o.valid is not None],
             policy.max_validation_increase),
            ("error", [o.error for o in cur], [o.error for o in base],
             policy.max_error_increase))
        for what, now_bad, before_bad, limit in rates:
            if not now_bad:
                continue
            k = sum(now_bad)
            base_rate = sum(before_bad) / len(before_bad) if before_bad else 0.0
            lower = wilson_interval(k, len(now_bad)).low
            line = (f"{what} rate {k}/{len(now_bad)} (lower bound {lower:.1%}) vs "
                    f"{base_rate:.1%} on {previous or 'nothing'} ({len(before_bad)}), "
                    f"limit +{limit:.0%}")
            (problems if lower > base_rate + limit else notes).append(line)
        lat = [o.latency_s for o in cur if o.latency_s is not None]
        lat0 = [o.latency_s for o in base if o.latency_s is not None]
        if len(lat) >= policy.min_requests and len(lat0) >= policy.min_requests:
            now, before = p95(lat), p95(lat0)
            line = (f"p95 latency {now:.2f}s vs {before:.2f}s on {previous} "
                    f"(limit x{policy.max_latency_ratio:g})")
            (problems if now > before * policy.max_latency_ratio else notes).append(line)
        if problems:
            return SoakVerdict(True, "; ".join(problems), n)
        return SoakVerdict(False, "; ".join(notes) or f"{n} requests, nothing to judge", n)
