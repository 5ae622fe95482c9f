"""The verdict: may this candidate replace the baseline? pass, fail or insufficient, with evidence.

Used by the agent's pre-flight (before it activates a variant), by the
fleet's rollout gates and by ``quantfleet eval``. Input is a
:class:`~.results.Comparison` (plain data; no model needed) and a
:class:`VerdictPolicy`. Pure Python over that data: nothing here imports
scipy or any other operator-side dependency, so it runs on the device.

Rules, each becoming one :class:`Check`:

- too few items overall → *insufficient*: a small sample cannot clear a
  candidate (it can still fail one: 8 flips out of 10 is evidence enough);
- per property (and overall): the pass-rate drop must not exceed the
  policy's limit; a property checked on fewer than ``min_property_items``
  items is *insufficient*, not passed. A limit of ``None`` leaves the drop
  unjudged: on a dozen items (a device's pre-flight) a raw drop is noise, and
  the paired test and the KLD decide instead;
- pass→fail flips must not exceed ``max_flips``;
- McNemar's one-sided exact test must not show the candidate worse at
  ``alpha``;
- KLD mean and p99 (all, structured, prose tokens) must stay under their
  limits; a limit at or below the measured noise floor cannot be judged and
  is *insufficient*, so nobody sets a gate tighter than the hardware's own
  jitter.

Any failing check fails the verdict; otherwise any insufficient check makes it
insufficient; otherwise it passes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantfleet.strict import Strict

from .results import Comparison, LogitSplit

Status = Literal["pass", "fail", "insufficient"]


class VerdictPolicy(Strict):
    """Limits a candidate must stay within. Defaults suit a 60-item golden set."""

    min_items: int = Field(20, ge=1, description="Fewer paired items than this: insufficient.")
    min_property_items: int = Field(
        5, ge=1, description="A property checked on fewer items is insufficient, not passed.")
    max_drop: float | None = Field(
        0.10, ge=0, le=1,
        description="Largest pass-rate drop allowed on any property (None: not judged).")
    max_drop_by_property: dict[str, float] = Field(
        default_factory=dict,
        description="Per-property overrides of max_drop, e.g. {'tool_call': 0.0} (judged "
        "even when max_drop is None).")
    max_overall_drop: float | None = Field(
        0.10, ge=0, le=1,
        description="Largest drop of the all-properties pass rate (None: not judged).")
    max_flips: int | None = Field(
        5, ge=0, description="Most pass->fail items allowed (None: not checked).")
    alpha: float | None = Field(
        0.05, gt=0, lt=1,
        description="McNemar one-sided significance level (None: not checked).")
    max_kld_mean: float | None = Field(
        None, gt=0, description="Limit on the mean KLD over every scored token.")
    max_kld_p99: float | None = Field(None, gt=0, description="Limit on KLD p99, all tokens.")
    max_kld_p99_structured: float | None = Field(
        None, gt=0, description="Limit on KLD p99 of structured tokens (JSON, tool arguments).")
    max_kld_p99_prose: float | None = Field(None, gt=0, description="Limit on KLD p99 of prose.")
    min_tokens: int = Field(
        50, ge=1, description="Fewer scored tokens than this makes a KLD check insufficient.")


class Check(Strict):
    name: str = Field(description="What was checked, e.g. drop:tool_call, flips, kld_p99:prose.")
    status: Status = Field(description="pass, fail or insufficient.")
    observed: float | None = Field(None, description="The measured value.")
    limit: float | None = Field(None, description="The policy's limit.")
    detail: str = Field("", description="The evidence in a sentence.")


class Verdict(Strict):
    decision: Status = Field(description="pass, fail or insufficient.")
    baseline: str = Field(description="Baseline variant.")
    candidate: str = Field(description="Candidate variant.")
    checks: list[Check] = Field(description="Every check, in evaluation order.")

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def summary(self) -> str:
        """One line for logs and audit records."""
        bad = [c for c in self.checks if c.status != "pass"]
        why = "; ".join(f"{c.name} {c.status}: {c.detail}" for c in bad[:3])
        return f"{self.candidate} vs {self.baseline}: {self.decision}" + (f" ({why})" if why
                                                                         else "")

    def evidence(self) -> str:
        """Every judged check with its figure and limit, for a device's state message:
        ``pass: McNemar one-sided exact p=0.5 (1 worse, 2 better), fails below 0.05: ok;
        kld_mean:all 0.061 <= 0.3 (mean KLD 0.061 over 412 tokens): ok; ...``."""
        parts = []
        for c in self.checks:
            if c.name == "items":
                continue
            mark = {"pass": "ok", "fail": "FAIL", "insufficient": "insufficient"}[c.status]
            if c.name == "mcnemar":
                parts.append(f"McNemar {c.detail}, fails below {c.limit:g}: {mark}")
            elif c.observed is not None and c.limit is not None:
                op = "<=" if c.status == "pass" else ">" if c.status == "fail" else "vs"
                parts.append(f"{c.name} {c.observed:.3g} {op} {c.limit:g} ({c.detail}): {mark}")
            else:
                parts.append(f"{c.name}: {c.detail}: {mark}")
        return f"{self.decision}: " + "; ".join(parts)


def _drop_check(name: str, base_rate: float, cand_rate: float, n: int, limit: float,
                min_n: int) -> Check:
    drop = base_rate - cand_rate
    if n < min_n:
        return Check(name=name, status="insufficient", observed=drop, limit=limit,
                     detail=f"checked on {n} items (< {min_n})")
    ok = drop <= limit + 1e-12
    return Check(name=name, status="pass" if ok else "fail", observed=drop, limit=limit,
                 detail=f"{base_rate:.1%} -> {cand_rate:.1%} on {n} items")


def _kld_check(name: str, which: str, split: LogitSplit | None, noise: LogitSplit | None,
               limit: float, min_tokens: int, stat: str = "kl_p99") -> Check:
    s = getattr(split, which) if split is not None else None
    if s is None or s.tokens < min_tokens:
        got = 0 if s is None else s.tokens
        return Check(name=name, status="insufficient", limit=limit,
                     detail=f"{got} {which} tokens scored (< {min_tokens})")
    observed = float(getattr(s, stat))
    floor = getattr(noise, which) if noise is not None else None
    if floor is not None and getattr(floor, stat) >= limit:
        return Check(name=name, status="insufficient", observed=observed, limit=limit,
                     detail=f"limit is at or below the noise floor ({getattr(floor, stat):.3g})")
    ok = observed <= limit
    what = "KLD p99" if stat == "kl_p99" else "mean KLD"
    return Check(name=name, status="pass" if ok else "fail", observed=observed, limit=limit,
                 detail=f"{what} {observed:.3g} over {s.tokens} tokens")


def judge(comparison: Comparison, policy: VerdictPolicy | None = None) -> Verdict:
    """Pass, fail or insufficient for ``comparison.candidate``, with every check's evidence."""
    p = policy or VerdictPolicy()
    c = comparison
    checks: list[Check] = []
    enough = c.n_items >= p.min_items
    checks.append(Check(name="items", status="pass" if enough else "insufficient",
                        observed=c.n_items, limit=p.min_items,
                        detail=f"{c.n_items} paired items"))
    if p.max_overall_drop is not None:
        checks.append(_drop_check("drop:overall", c.overall.baseline.rate,
                                  c.overall.candidate.rate, c.n_items, p.max_overall_drop,
                                  p.min_items))
    for prop, delta in c.properties.items():
        limit = p.max_drop_by_property.get(prop, p.max_drop)
        if limit is not None:
            checks.append(_drop_check(f"drop:{prop}", delta.baseline.rate, delta.candidate.rate,
                                      delta.baseline.n, limit, p.min_property_items))
    if p.max_flips is not None:
        ok = c.worse <= p.max_flips
        checks.append(Check(name="flips", status="pass" if ok else "fail", observed=c.worse,
                            limit=p.max_flips,
                            detail=f"{c.worse} pass->fail, {c.better} fail->pass"))
    if p.alpha is not None:
        if c.worse + c.better == 0:
            status: Status = "pass"
        else:
            status = "fail" if c.mcnemar_p_worse < p.alpha else "pass"
        checks.append(Check(name="mcnemar", status=status, observed=c.mcnemar_p_worse,
                            limit=p.alpha,
                            detail=f"one-sided exact p={c.mcnemar_p_worse:.3g} "
                            f"({c.worse} worse, {c.better} better)"))
    if p.max_kld_mean is not None:
        checks.append(_kld_check("kld_mean:all", "all", c.logits, c.noise_floor,
                                 p.max_kld_mean, p.min_tokens, stat="kl_mean"))
    kld_limits = (("all", p.max_kld_p99), ("structured", p.max_kld_p99_structured),
                  ("prose", p.max_kld_p99_prose))
    for which, kld_limit in kld_limits:
        if kld_limit is not None:
            checks.append(_kld_check(f"kld_p99:{which}", which, c.logits, c.noise_floor,
                                     kld_limit, p.min_tokens))
    statuses = {ch.status for ch in checks}
    decision: Status = ("fail" if "fail" in statuses
                        else "insufficient" if "insufficient" in statuses else "pass")
    return Verdict(decision=decision, baseline=c.baseline, candidate=c.candidate, checks=checks)
