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
  the interval's upper bound <= 1 + tol.

A metric with no observations on either side (no tool calls at all) is
``n/a`` and left out; one side without data is insufficient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from .stats import rate_difference, ratio_estimate

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


@dataclass
class Sample:
    """What a group of devices did over the judged window (one entry per request)."""

    validation_failed: np.ndarray  # bool
    tool_call_ok: np.ndarray  # bool, only requests with a tool-call check
    refused: np.ndarray  # bool
    fallback: np.ndarray  # bool
    error: np.ndarray  # bool
    latency_s: np.ndarray  # float
    attempt_tokens: np.ndarray  # float
    success: np.ndarray  # bool

    @property
    def n(self) -> int:
        return int(self.latency_s.size)

    @classmethod
    def from_tuples(cls, rows: list[Any]) -> Sample:
        """Rows of (device_id, status, latency_s, attempt_tokens, validation_failed,
        tool_call_ok, refused, fallback), as the engine selects them."""
        if not rows:
            empty_b, empty_f = np.zeros(0, dtype=bool), np.zeros(0, dtype=float)
            return cls(empty_b, empty_b, empty_b, empty_b, empty_b, empty_f, empty_f, empty_b)
        _ids, status, latency, tokens, vf, tool, refused, fallback = zip(*rows, strict=True)
        st = np.asarray([x or 0 for x in status])
        vfa = np.asarray([bool(x) for x in vf], dtype=bool)
        return cls(
            validation_failed=vfa,
            tool_call_ok=np.asarray([bool(x) for x in tool if x is not None], dtype=bool),
            refused=np.asarray([bool(x) for x in refused], dtype=bool),
            fallback=np.asarray([bool(x) for x in fallback], dtype=bool),
            error=st >= 400,
            latency_s=np.asarray([x or 0.0 for x in latency], dtype=float),
            attempt_tokens=np.asarray([x or 0 for x in tokens], dtype=float),
            success=(st < 400) & ~vfa,
        )

    @classmethod
    def from_rows(cls, rows: list[Any]) -> Sample:
        def arr(name: str, dtype: Any = bool, keep_none: bool = False) -> np.ndarray:
            vals = [getattr(r, name) for r in rows]
            if not keep_none:
                vals = [v for v in vals if v is not None]
            return np.asarray(vals, dtype=dtype)

        status = np.asarray([r.status or 0 for r in rows])
        vf = np.asarray([bool(r.validation_failed) for r in rows], dtype=bool)
        return cls(
            validation_failed=vf,
            tool_call_ok=arr("tool_call_ok"),
            refused=np.asarray([bool(r.refused) for r in rows], dtype=bool),
            fallback=np.asarray([bool(r.fallback) for r in rows], dtype=bool),
            error=status >= 400,
            latency_s=np.asarray([r.latency_s or 0.0 for r in rows], dtype=float),
            attempt_tokens=np.asarray([r.attempt_tokens or 0 for r in rows], dtype=float),
            success=(status < 400) & ~vf,
        )


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

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
        return out


def _rate_arrays(metric: str, s: Sample) -> np.ndarray:
    return {
        "validation_failure_rate": s.validation_failed,
        "tool_call_success_rate": s.tool_call_ok,
        "refusal_rate": s.refused,
        "fallback_rate": s.fallback,
        "error_rate": s.error,
    }[metric]


def judge_rate(metric: str, canary: Sample, control: Sample, tolerance: float,
               min_samples: int, alpha: float = 0.05) -> GateResult:
    direction = RATE_METRICS[metric]
    a, b = _rate_arrays(metric, canary), _rate_arrays(metric, control)
    d = rate_difference(int(a.sum()), int(a.size), int(b.sum()), int(b.size), 1 - alpha)

    def result(verdict: Verdict, p: float | None, reason: str) -> GateResult:
        return GateResult(metric, verdict, None if math.isnan(d.diff) else d.diff, d.low, d.high,
                          None if not a.size else d.canary_rate,
                          None if not b.size else d.control_rate, int(a.size), int(b.size),
                          p, tolerance, reason)

    if a.size < min_samples or b.size < min_samples:
        return result("insufficient", None,
                      f"{a.size} canary and {b.size} control samples; {min_samples} needed")
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


def _cost_values(s: Sample) -> np.ndarray:
    """Per-request cost spread over successes: sum(tokens)/successes equals the mean of this."""
    rate = float(s.success.mean()) if s.n else 0.0
    return s.attempt_tokens / rate if rate > 0 else np.full(s.n, np.inf)


def judge_ratio(metric: str, canary: Sample, control: Sample, tolerance: float,
                min_samples: int, alpha: float = 0.05) -> GateResult:
    stat = RATIO_METRICS[metric]
    if stat == "cost":
        a, b, which = _cost_values(canary), _cost_values(control), "mean"
    else:
        a, b, which = canary.latency_s, control.latency_s, stat
    if a.size < min_samples or b.size < min_samples:
        return GateResult(metric, "insufficient", None, None, None, None, None, int(a.size),
                          int(b.size), None, tolerance,
                          f"{a.size} canary and {b.size} control samples; {min_samples} needed")
    r = ratio_estimate(a, b, which, confidence=1 - alpha)
    limit = 1 + tolerance

    def result(verdict: Verdict, reason: str) -> GateResult:
        return GateResult(metric, verdict, r.ratio, r.low, r.high, r.canary, r.control,
                          r.canary_n, r.control_n, r.p_greater, tolerance, reason)

    if r.ratio > limit and r.p_greater < alpha:
        return result("fail", f"canary {which} {r.ratio:.2f}x the control, tolerated "
                      f"{limit:.2f}x (p={r.p_greater:.3g})")
    if r.high <= limit:
        return result("pass", f"at most {r.high:.2f}x, within {limit:.2f}x")
    return result("insufficient", f"interval [{r.low:.2f}x, {r.high:.2f}x] straddles "
                  f"{limit:.2f}x")


def judge(metric: str, canary: Sample, control: Sample, tolerance: float, min_samples: int,
          alpha: float = 0.05) -> GateResult:
    if metric == "tool_call_success_rate" and not canary.tool_call_ok.size \
            and not control.tool_call_ok.size:
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
