"""Rollout gates: judge a canary against its concurrent control, metric by metric.

A gate says **pass** only when the data show the canary is within the
tolerated effect, **fail** only when it is significantly worse by more than
that, and **insufficient** otherwise — too few samples, or an interval that
straddles the tolerance. Insufficient is never a pass: the engine extends the
bake, and a rollout that stays insufficient past its limit does not advance.

Rules, with ``tol`` the gate's tolerated effect and ``alpha`` its level:

- rate, lower is better (validation failures, fallbacks, errors):
  fail if ``diff > tol`` and Fisher's one-sided p < alpha; pass if the
  interval's upper bound <= tol;
- rate, higher is better (tool-call success): the mirror image;
- rate, both directions (refusals — missing refusals are a regression too):
  fail if ``|diff| > tol`` and the two-sided p < alpha; pass if the whole
  interval lies within ``[-tol, tol]``;
- ratio, lower is better (p95/p99 latency, cost per successful request):
  fail if ``ratio > 1 + tol`` and Mann–Whitney's one-sided p < alpha; pass if
  the interval's upper bound <= 1 + tol. Latency is judged on 1 % bins
  (``stats.latency_bin``; intervals widened to the bins' edges), token counts
  exactly.

A metric with no observations on either side (no tool calls at all) is
``n/a`` and left out; one side without data is insufficient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from .stats import Binned, latency_bin, rate_difference, ratio_estimate

Verdict = Literal["pass", "fail", "insufficient", "n/a"]
Direction = Literal["lower_is_better", "higher_is_better", "both"]

RATE_METRICS: dict[str, Direction] = {
    "validation_failure_rate": "lower_is_better",
    "tool_call_success_rate": "higher_is_better",
    "refusal_rate": "both",
    "fallback_rate": "lower_is_better",
    "error_rate": "lower_is_better",
}
RATIO_METRICS: dict[str, str] = {
    "p95_latency": "p95",
    "p99_latency": "p99",
    "cost_per_success": "cost",
}
RATE_METHOD = "difference: Newcombe hybrid score interval; Fisher's exact test"
_LATENCY_METHOD = ("canary/control {}: order-statistic intervals on 1 % latency bins "
                   "(Bonferroni); one-sided Mann–Whitney U on the bins")
RATIO_METHODS = {
    "p95": _LATENCY_METHOD.format("p95"),
    "p99": _LATENCY_METHOD.format("p99"),
    "cost": ("canary/control mean tokens per success: normal intervals (Bonferroni); "
             "one-sided Mann–Whitney U on the exact per-request values"),
}


_COUNTS = ("requests", "validation_failures", "tool_calls", "tool_calls_ok", "refusals",
           "fallbacks", "errors", "successes")


@dataclass
class Sample:
    """What a group of devices did over the judged window: counts of every rate's
    outcomes, latency in ``latency_bin`` bins, and tokens per request (exact).

    The engine has the store aggregate it in SQL (``samples.py``);
    ``from_requests`` builds the same from per-request values.
    """

    requests: int = 0
    validation_failures: int = 0
    tool_calls: int = 0  # requests with a tool-call check
    tool_calls_ok: int = 0
    refusals: int = 0
    fallbacks: int = 0
    errors: int = 0  # status >= 400
    successes: int = 0  # status < 400 and no failed validation
    latency: Binned = field(default_factory=Binned.empty)
    attempt_tokens: Binned = field(default_factory=Binned.empty)

    @property
    def n(self) -> int:
        return self.requests

    @classmethod
    def from_requests(cls, *, status: Sequence[int | None], latency_s: Sequence[float | None],
                      attempt_tokens: Sequence[int | None],
                      validation_failed: Sequence[bool | None],
                      tool_call_ok: Sequence[bool | None], refused: Sequence[bool | None],
                      fallback: Sequence[bool | None]) -> Sample:
        """One entry per request, as the events table holds them (None where unknown)."""
        st = np.asarray([x or 0 for x in status], dtype=np.int64)
        vf = np.asarray([bool(x) for x in validation_failed], dtype=bool)
        tool = [bool(x) for x in tool_call_ok if x is not None]
        latency = np.asarray([x or 0.0 for x in latency_s], dtype=float)
        return cls(
            requests=int(st.size),
            validation_failures=int(vf.sum()),
            tool_calls=len(tool),
            tool_calls_ok=sum(tool),
            refusals=sum(bool(x) for x in refused),
            fallbacks=sum(bool(x) for x in fallback),
            errors=int((st >= 400).sum()),
            successes=int(((st < 400) & ~vf).sum()),
            latency=Binned.of(latency, latency_bin(latency)),
            attempt_tokens=Binned.of([x or 0 for x in attempt_tokens]),
        )

    def merge(self, other: Sample) -> Sample:
        """Both groups together (strata into the whole)."""
        return Sample.combine([self, other])

    @classmethod
    def combine(cls, parts: Iterable[Sample]) -> Sample:
        """Every group together, in one pass (a hardware class from its strata, the pool
        from every class)."""
        parts = list(parts)
        counts = {name: sum(getattr(p, name) for p in parts) for name in _COUNTS}
        return cls(**counts,
                   latency=Binned.concat(p.latency for p in parts),
                   attempt_tokens=Binned.concat(p.attempt_tokens for p in parts))

    def rate(self, metric: str) -> tuple[int, int]:
        """(events, trials) of a rate metric."""
        return {
            "validation_failure_rate": (self.validation_failures, self.requests),
            "tool_call_success_rate": (self.tool_calls_ok, self.tool_calls),
            "refusal_rate": (self.refusals, self.requests),
            "fallback_rate": (self.fallbacks, self.requests),
            "error_rate": (self.errors, self.requests),
        }[metric]

    def cost_per_success(self) -> Binned:
        """Tokens of each request over the success rate: the mean of this is the tokens
        of every attempt divided by the successes."""
        rate = self.successes / self.requests if self.requests else 0.0
        if rate > 0:
            return self.attempt_tokens.scaled(1 / rate)
        if not self.requests:
            return Binned.empty()
        inf = np.asarray([np.inf])  # no successes at all: every request's cost is unbounded
        return Binned(inf, np.asarray([self.requests], dtype=np.int64), inf, inf)


@dataclass(frozen=True)
class GateResult:
    metric: str
    verdict: Verdict
    estimate: float | None  # rate difference, or canary/control ratio
    low: float | None
    high: float | None
    canary: float | None  # the canary's own figure
    control: float | None
    canary_n: int
    control_n: int
    p_value: float | None
    tolerance: float
    reason: str
    method: str = ""  # the interval and the test, so a verdict can be re-judged

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
        return out


def judge_rate(metric: str, canary: Sample, control: Sample, tolerance: float,
               min_samples: int, alpha: float = 0.05) -> GateResult:
    direction = RATE_METRICS[metric]
    (ka, na), (kb, nb) = canary.rate(metric), control.rate(metric)
    d = rate_difference(ka, na, kb, nb, 1 - alpha)

    def result(verdict: Verdict, p: float | None, reason: str) -> GateResult:
        return GateResult(metric, verdict, None if math.isnan(d.diff) else d.diff, d.low, d.high,
                          None if not na else d.canary_rate,
                          None if not nb else d.control_rate, na, nb,
                          p, tolerance, reason, RATE_METHOD)

    if na < min_samples or nb < min_samples:
        return result("insufficient", None,
                      f"{na} canary and {nb} control samples; {min_samples} needed")
    if direction == "lower_is_better":
        if d.diff > tolerance and d.p_greater < alpha:
            return result("fail", d.p_greater, f"canary {d.diff:+.1%} worse, tolerated "
                          f"{tolerance:.1%} (p={d.p_greater:.3g})")
        if d.high <= tolerance:
            return result("pass", d.p_greater, f"at most {d.high:+.1%}, within {tolerance:.1%}")
        return result("insufficient", d.p_greater,
                      f"interval [{d.low:+.1%}, {d.high:+.1%}] straddles {tolerance:.1%}")
    if direction == "higher_is_better":
        if -d.diff > tolerance and d.p_less < alpha:
            return result("fail", d.p_less, f"canary {d.diff:+.1%} lower, tolerated "
                          f"-{tolerance:.1%} (p={d.p_less:.3g})")
        if d.low >= -tolerance:
            return result("pass", d.p_less, f"at least {d.low:+.1%}, within -{tolerance:.1%}")
        return result("insufficient", d.p_less,
                      f"interval [{d.low:+.1%}, {d.high:+.1%}] straddles -{tolerance:.1%}")
    p_two = min(1.0, 2 * min(d.p_greater, d.p_less))
    if abs(d.diff) > tolerance and p_two < alpha:
        return result("fail", p_two, f"canary {d.diff:+.1%} off the control, tolerated "
                      f"±{tolerance:.1%} (p={p_two:.3g})")
    if -tolerance <= d.low and d.high <= tolerance:
        return result("pass", p_two, f"[{d.low:+.1%}, {d.high:+.1%}] within ±{tolerance:.1%}")
    return result("insufficient", p_two,
                  f"interval [{d.low:+.1%}, {d.high:+.1%}] reaches past ±{tolerance:.1%}")


def judge_ratio(metric: str, canary: Sample, control: Sample, tolerance: float,
                min_samples: int, alpha: float = 0.05) -> GateResult:
    stat = RATIO_METRICS[metric]
    if stat == "cost":
        a, b, which = canary.cost_per_success(), control.cost_per_success(), "mean"
    else:
        a, b, which = canary.latency, control.latency, stat
    if a.n < min_samples or b.n < min_samples:
        return GateResult(metric, "insufficient", None, None, None, None, None, a.n, b.n, None,
                          tolerance,
                          f"{a.n} canary and {b.n} control samples; {min_samples} needed",
                          RATIO_METHODS[stat])
    r = ratio_estimate(a, b, which, confidence=1 - alpha)
    limit = 1 + tolerance

    def result(verdict: Verdict, reason: str) -> GateResult:
        return GateResult(metric, verdict, r.ratio, r.low, r.high, r.canary, r.control,
                          r.canary_n, r.control_n, r.p_greater, tolerance, reason,
                          RATIO_METHODS[stat])

    if r.ratio > limit and r.p_greater < alpha:
        return result("fail", f"canary {which} {r.ratio:.2f}x the control, tolerated "
                      f"{limit:.2f}x (p={r.p_greater:.3g})")
    if r.high <= limit:
        return result("pass", f"at most {r.high:.2f}x, within {limit:.2f}x")
    return result("insufficient", f"interval [{r.low:.2f}x, {r.high:.2f}x] straddles "
                  f"{limit:.2f}x")


def judge(metric: str, canary: Sample, control: Sample, tolerance: float, min_samples: int,
          alpha: float = 0.05) -> GateResult:
    if metric == "tool_call_success_rate" and not canary.tool_calls and not control.tool_calls:
        # No tool calls on either side: the metric does not apply to this traffic.
        return GateResult(metric, "n/a", None, None, None, None, None, 0, 0, None, tolerance,
                          "no tool-call traffic on either side")
    if metric in RATE_METRICS:
        return judge_rate(metric, canary, control, tolerance, min_samples, alpha)
    if metric in RATIO_METRICS:
        return judge_ratio(metric, canary, control, tolerance, min_samples, alpha)
    raise ValueError(f"unknown gate metric {metric!r}")


def combine(results: list[GateResult]) -> Verdict:
    """Any failing gate fails the step; every applicable gate must pass to pass."""
    applicable = [r for r in results if r.verdict != "n/a"]
    if any(r.verdict == "fail" for r in applicable):
        return "fail"
    if applicable and all(r.verdict == "pass" for r in applicable):
        return "pass"
    return "insufficient"
