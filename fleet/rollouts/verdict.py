"""A step's verdict: the pool, each hardware class and each stratum, judged on their own.

The same data are judged as several comparisons of canary against control
(pure functions over ``Sample``; the engine has the store aggregate them):

- the **pool**: every healthy canary against every control;
- each **hardware class** (the values of the spec's ``hardware_label``,
  ``cpu.class`` by default) that has a healthy canary: its canaries against
  the controls of the *same* class — devices that report no hardware are the
  class ``(unknown)``;
- each **stratum** (the values of ``stratify_by``), likewise.

Rules: any comparison that fails fails the step, and the verdict names it (a
regression confined to one class is not averaged away by the others). Otherwise
the pool decides: insufficient pooled data is an insufficient step. A class
with too little data of its own is *insufficient for that class* — reported,
named, and not holding up a step the pool and the other classes decide —
unless the spec requires it (``required_classes`` / ``min_canaries_per_class``):
a required class must pass with at least its minimum of healthy canaries, or
the step is insufficient.

The store aggregates one sample per *cell* (one value of each dimension, e.g.
``("x86-avx2", "rpi5")`` for ``cpu.class`` and ``hw``); ``merge_cells`` sums
the cells into the pool and into each dimension's values (``Sample.combine``),
so both dimensions come from the one read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .gates import GateResult, Sample, Verdict, combine, judge
from .spec import UNKNOWN_CLASS, RolloutSpec

#: The pool's key among the groups: (label, value) of every other group.
POOL = ("*", "*")

Cell = tuple[str, ...]  # one value per dimension, in ``dimensions(spec)`` order
GroupKey = tuple[str, str]  # (label key, value), or POOL


def dimensions(spec: RolloutSpec) -> list[str]:
    """The label keys a step is judged along: the hardware class, then the stratum
    (once, when ``stratify_by`` is the hardware label)."""
    dims = [spec.hardware_label] if spec.hardware_label else []
    if spec.stratify_by and spec.stratify_by not in dims:
        dims.append(spec.stratify_by)
    return dims


def cell_reader(spec: RolloutSpec) -> Callable[[Mapping[str, str] | None], Cell]:
    """The cell of a device from its labels (a device without the hardware label is
    ``(unknown)``, without the stratum label ``(none)``), for many devices."""
    keys = [(k, UNKNOWN_CLASS if k == spec.hardware_label else "(none)")
            for k in dimensions(spec)]

    def cell(labels: Mapping[str, str] | None) -> Cell:
        labels = labels or {}
        return tuple(str(labels.get(k, missing)) for k, missing in keys)

    return cell


def cell_of(spec: RolloutSpec, labels: Mapping[str, str] | None) -> Cell:
    """The cell of a device with these labels."""
    return cell_reader(spec)(labels)


@dataclass
class GroupSamples:
    """One group's canary and control: what they did, and how many devices each is."""

    canary: Sample = field(default_factory=Sample)
    control: Sample = field(default_factory=Sample)
    canary_devices: int = 0
    control_devices: int = 0


def merge_cells(cells: Mapping[Cell, GroupSamples],
                dims: Sequence[str]) -> dict[GroupKey, GroupSamples]:
    """The pool, and one group per value of each dimension, from the cells."""
    members: dict[GroupKey, list[GroupSamples]] = {POOL: list(cells.values())}
    for cell, g in cells.items():
        for label, value in zip(dims, cell, strict=True):
            members.setdefault((label, value), []).append(g)
    return {key: GroupSamples(Sample.combine(g.canary for g in gs),
                              Sample.combine(g.control for g in gs),
                              sum(g.canary_devices for g in gs),
                              sum(g.control_devices for g in gs))
            for key, gs in members.items()}


@dataclass(frozen=True)
class GroupVerdict:
    """Every gate on one group (a hardware class or a stratum), and what it means."""

    label: str
    value: str
    verdict: Verdict
    gates: list[GateResult]
    canary_devices: int
    control_devices: int
    required: int = 0  # healthy canaries this group needs (0: not required)
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.label}={self.value}"

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "verdict": self.verdict,
                "canary_devices": self.canary_devices,
                "control_devices": self.control_devices, "required": self.required,
                "reason": self.reason, "gates": [g.to_json() for g in self.gates]}


def _gates(spec: RolloutSpec, g: GroupSamples) -> list[GateResult]:
    return [judge(gate.metric, g.canary, g.control, gate.tolerance,
                  gate.min_samples or spec.min_samples, gate.alpha) for gate in spec.gates]


def _failing(gates: Sequence[GateResult], limit: int = 3) -> str:
    return "; ".join([f"{g.metric}: {g.reason}" for g in gates if g.verdict == "fail"][:limit])


def _short(gates: Sequence[GateResult]) -> str:
    """Why a group is insufficient: its first gate short of a verdict."""
    for g in gates:
        if g.verdict == "insufficient":
            return f"{g.metric}: {g.reason}"
    return "no gate applies"


def judge_group(spec: RolloutSpec, label: str, value: str, g: GroupSamples,
                required: int = 0) -> GroupVerdict:
    gates = _gates(spec, g)
    verdict = combine(gates)
    if verdict == "fail":
        reason = _failing(gates)
    elif required and g.canary_devices < required:
        verdict = "insufficient"
        reason = f"{g.canary_devices} of {required} required healthy canaries"
    elif verdict == "insufficient":
        reason = _short(gates)
        if not g.control_devices:
            reason = f"no control device in it; {reason}"
    else:
        reason = ""
    return GroupVerdict(label, value, verdict, gates, g.canary_devices, g.control_devices,
                        required, reason)


@dataclass
class StepVerdict:
    verdict: Verdict
    gates: list[GateResult]  # the pool
    classes: list[GroupVerdict]
    strata: list[GroupVerdict]
    window: tuple[float, float]
    canary_devices: int
    control_devices: int
    hardware_label: str | None = None
    reason: str = ""

    @property
    def groups(self) -> list[GroupVerdict]:
        return [*self.classes, *self.strata]

    @property
    def failed(self) -> list[GroupVerdict]:
        """The classes and strata that failed."""
        return [g for g in self.groups if g.verdict == "fail"]

    @property
    def failed_classes(self) -> list[str]:
        return [g.value for g in self.classes if g.verdict == "fail"]

    @property
    def insufficient(self) -> list[GroupVerdict]:
        return [g for g in self.groups if g.verdict == "insufficient"]

    def evidence(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "window": list(self.window),
            "canary_devices": self.canary_devices,
            "control_devices": self.control_devices,
            "gates": [g.to_json() for g in self.gates],
            "hardware_label": self.hardware_label,
            "classes": {g.value: g.to_json() for g in self.classes},
            # value -> gates, as before the per-class verdicts (readers of old records)
            "strata": {g.value: [r.to_json() for r in g.gates] for g in self.strata},
            "stratum_verdicts": {g.value: g.to_json() for g in self.strata},
            "failed": [g.name for g in self.failed],
            "insufficient": [g.name for g in self.insufficient],
        }


def decide(spec: RolloutSpec, groups: Mapping[GroupKey, GroupSamples],
           window: tuple[float, float], required: Mapping[str, int] | None = None
           ) -> StepVerdict:
    """Judge the pool, every class with a healthy canary (and every required class),
    and every stratum with a healthy canary; combine them by the rules above.

    ``required``: the healthy canaries each required class needs
    (``RolloutSpec.class_minimum``).
    """
    required = dict(required or {})
    pool = groups.get(POOL, GroupSamples())
    pooled = _gates(spec, pool)
    classes: list[GroupVerdict] = []
    strata: list[GroupVerdict] = []
    for (label, value), g in sorted(groups.items()):
        if (label, value) == POOL:
            continue
        if label == spec.hardware_label:
            if g.canary_devices or value in required:
                classes.append(judge_group(spec, label, value, g, required.get(value, 0)))
        elif g.canary_devices:
            strata.append(judge_group(spec, label, value, g))
    if spec.hardware_label:
        judged = {g.value for g in classes}
        for value in sorted(set(required) - judged):  # required, and nobody of it judged
            classes.append(judge_group(spec, spec.hardware_label, value, GroupSamples(),
                                       required[value]))
        classes.sort(key=lambda g: g.value)
    pool_verdict = combine(pooled)
    failed = [g for g in (*classes, *strata) if g.verdict == "fail"]
    short = [g for g in classes if g.required and g.verdict != "pass"]
    if pool_verdict == "fail" or failed:
        verdict: Verdict = "fail"
    elif pool_verdict == "insufficient" or short:
        verdict = "insufficient"
    else:
        verdict = "pass"
    result = StepVerdict(verdict, pooled, classes, strata, window, pool.canary_devices,
                         pool.control_devices, spec.hardware_label)
    result.reason = explain(result)
    return result


def explain(v: StepVerdict) -> str:
    """One line: why the step failed or is insufficient, or what passed short of data."""
    pool_verdict = combine(v.gates)
    lone = _lone_class(v)  # its verdict is the pool's: named once, not twice
    where = f" (every judged device is {lone})" if lone else ""

    def devices(g: GroupVerdict) -> str:
        return f"{g.canary_devices} canary, {g.control_devices} control devices"

    if v.verdict == "fail":
        others = [g for g in v.failed if g.name != lone]
        if pool_verdict == "fail":
            return f"gate failed{where}: {_failing(v.gates)}" + "".join(
                f"; on {g.name} ({devices(g)}): {g.reason}" for g in others)
        if len(others) == 1:
            g = others[0]
            return (f"gate failed on {g.name} only ({devices(g)}; pooled: {pool_verdict}): "
                    f"{g.reason}")
        return (f"gate failed on {', '.join(g.name for g in others)} (pooled: "
                f"{pool_verdict}): " + "; ".join(f"{g.name} ({devices(g)}): {g.reason}"
                                                for g in others))
    if v.verdict == "insufficient":
        parts = [f"pooled: {_short(v.gates)}"] if pool_verdict == "insufficient" else []
        parts += [f"{g.name} (required): {g.reason}" for g in v.classes
                  if g.required and g.verdict != "pass"]
        return f"insufficient data{where}: " + "; ".join(parts)
    short = [g for g in v.insufficient if g.name != lone]
    if short:
        return "passed; insufficient for " + "; ".join(f"{g.name}: {g.reason}" for g in short)
    return ""


def _lone_class(v: StepVerdict) -> str | None:
    """The class every judged device is in, if only one (its verdict is the pool's)."""
    if len(v.classes) == 1 and v.classes[0].value != UNKNOWN_CLASS:
        c = v.classes[0]
        if (c.canary_devices, c.control_devices) == (v.canary_devices, v.control_devices):
            return c.name
    return None
