"""The rollout spec: a YAML file an operator writes and reviews, validated strictly.

Example (docs/rollouts.md has every field)::

    name: q4km-eu
    cohort: "hw=rpi5,region=eu"
    from: Q8_0
    to: Q4_K_M
    steps: [1, "10%", "50%", "100%"]
    bake_s: 600
    min_samples: 200
    holdback: "10%"
    gates:
      - {metric: validation_failure_rate, tolerance: 0.02}
      - {metric: p95_latency, tolerance: 0.15}
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from quantfleet.agent.wire import CPU_CLASSES
from quantfleet.fleet.cohorts import Selector, SelectorError
from quantfleet.strict import Strict, explain

from .gates import RATE_METRICS, RATIO_METRICS

_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")  # as cohorts.py's tokens

#: The hardware class of a device that reports none (an agent older than the
#: fingerprint): not a label value a device can have, so it never collides.
UNKNOWN_CLASS = "(unknown)"
_ARCH = re.compile(r"^[a-z][a-z0-9]{0,31}$")  # riscv64, ppc64le: cpu_class of other CPUs


class SpecError(ValueError):
    """The spec is unusable; the message names the file and the field."""


def _count_or_percent(v: Any, what: str) -> int | str:
    if isinstance(v, bool):
        raise ValueError(f"{what} must be a device count or a percentage like '10%'")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"{what} must not be negative")
        return v
    if isinstance(v, str) and (m := _PERCENT.match(v.strip())):
        if not 0 <= float(m[1]) <= 100:
            raise ValueError(f"{what} {v!r} must be between 0% and 100%")
        return v.strip()
    raise ValueError(f"{what} {v!r} must be a device count or a percentage like '10%'")


def resolve_count(v: int | str, total: int) -> int:
    """A count, or a percentage of ``total`` rounded up (10% of 5 devices is 1 device)."""
    if isinstance(v, int):
        return min(v, total)
    pct = float(v.rstrip("%"))
    return min(total, math.ceil(pct * total / 100 - 1e-9))


class GateSpec(Strict):
    metric: str = Field(description="validation_failure_rate, tool_call_success_rate, "
                        "refusal_rate, fallback_rate, error_rate, p95_latency, p99_latency "
                        "or cost_per_success.")
    tolerance: float = Field(ge=0, description="Tolerated effect: an absolute difference for "
                             "rates (0.02 = 2 points), a relative increase for latency and "
                             "cost (0.15 = 15 %).")
    min_samples: int | None = Field(None, ge=1, description="Requests needed on each side "
                                    "(default: the rollout's min_samples).")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level of the test.")

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        known = sorted([*RATE_METRICS, *RATIO_METRICS])
        if v not in known:
            raise ValueError(f"unknown metric {v!r} (known: {', '.join(known)})")
        return v


class Deadlines(Strict):
    download_s: float = Field(1800, gt=0, description="From desired to downloaded.")
    preflight_s: float = Field(900, gt=0, description="Verification and pre-flight.")
    activation_s: float = Field(300, gt=0, description="Activation (hot swap).")
    soak_s: float = Field(1800, gt=0, description="From activated to healthy.")

    @property
    def total_s(self) -> float:
        return self.download_s + self.preflight_s + self.activation_s + self.soak_s


def default_gates() -> list[GateSpec]:
    return [
        GateSpec(metric="validation_failure_rate", tolerance=0.02),
        GateSpec(metric="tool_call_success_rate", tolerance=0.03),
        GateSpec(metric="refusal_rate", tolerance=0.03),
        GateSpec(metric="fallback_rate", tolerance=0.03),
        GateSpec(metric="p95_latency", tolerance=0.25),
        GateSpec(metric="cost_per_success", tolerance=0.15),
    ]


class RolloutSpec(Strict):
    # "from" and "to" are Python keywords: the fields are from_variant and to_variant,
    # and code builds specs by those names
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="Unique id.")
    cohort: str = Field(description="Label selector of the devices in scope.")
    from_variant: str = Field(alias="from", description="The baseline variant.")
    to_variant: str = Field(alias="to", description="The candidate variant.")
    steps: list[int | str] = Field(min_length=1, description="Devices on the candidate after "
                                   "each step (cumulative): counts or percentages of the "
                                   "cohort less its holdback.")
    bake_s: float = Field(600, gt=0, description="How long each step is watched.")
    max_bake_extensions: int = Field(3, ge=0, description="Extensions of a bake whose "
                                     "verdict is insufficient data, before the step stops.")
    min_samples: int = Field(100, ge=1, description="Requests needed on each side per gate.")
    deadlines: Deadlines = Field(default_factory=lambda: Deadlines.model_validate({}),
                                 description="Per-state deadlines for each device.")
    max_parallel_downloads: int = Field(50, ge=1, description="Devices downloading at once.")
    holdback: int | str = Field("10%", description="Devices kept on the baseline as the "
                                "concurrent control (count or percentage).")
    stratify_by: str | None = Field(None, description="A label key: devices are picked "
                                    "across its values, and gates are judged per value.")
    hardware_label: str | None = Field(
        "cpu.class", description="The label naming a device's hardware class (the fleet "
        "derives cpu.class from its hardware fingerprint): canaries are spread over its "
        "values and each class is judged against controls of the same class, as well as "
        "pooled. Devices without it form the class '(unknown)'. null turns it off.")
    min_canaries_per_class: int = Field(
        0, ge=0, description="Healthy canaries each required class needs for a step to "
        "pass; the assignment picks them first. With required_classes empty, every class "
        "of the cohort but '(unknown)' is required when this is above 0.")
    required_classes: list[str] = Field(
        default_factory=list, description="Classes that must each be judged on their own "
        "(at least max(1, min_canaries_per_class) healthy canaries, every gate passing) "
        "for a step to pass; a required class short of data makes the step insufficient.")
    manual_approval: bool = Field(False, description="Wait for `rollout promote` between "
                                  "steps.")
    max_failed_devices: int = Field(0, ge=0, description="Device update failures tolerated "
                                    "in a step.")
    gates: list[GateSpec] = Field(default_factory=default_gates, min_length=1,
                                  description="What the canary is judged on.")

    @field_validator("cohort")
    @classmethod
    def _cohort(cls, v: str) -> str:
        try:
            Selector.parse(v)
        except SelectorError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("hardware_label")
    @classmethod
    def _label_key(cls, v: str | None) -> str | None:
        if v is not None and not _LABEL_KEY.match(v):
            raise ValueError(f"{v!r} is not a label key (1-63 letters, digits, . _ - /)")
        return v

    @field_validator("required_classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        for name in v:
            if name != UNKNOWN_CLASS and not _LABEL_KEY.match(name):
                raise ValueError(f"{name!r} is not a class name (a label value: 1-63 "
                                 f"letters, digits, . _ - /, or {UNKNOWN_CLASS!r})")
        if len(set(v)) != len(v):
            raise ValueError("a class is listed twice")
        return v

    @model_validator(mode="after")
    def _known_classes(self) -> RolloutSpec:
        if self.hardware_label != "cpu.class":
            return self
        for name in self.required_classes:
            # cpu_class() names the x86 and ARM classes, else the bare architecture.
            if name not in (*CPU_CLASSES, UNKNOWN_CLASS) and not _ARCH.match(name):
                raise ValueError(f"required class {name!r} is not a cpu.class (known: "
                                 f"{', '.join(CPU_CLASSES)}, another architecture's name, "
                                 f"or {UNKNOWN_CLASS!r})")
        return self

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int | str]) -> list[int | str]:
        return [_count_or_percent(s, f"step {i + 1}") for i, s in enumerate(v)]

    @field_validator("holdback", mode="before")
    @classmethod
    def _holdback(cls, v: Any) -> int | str:
        return _count_or_percent(v, "holdback")

    @model_validator(mode="after")
    def _consistent(self) -> RolloutSpec:
        if self.from_variant == self.to_variant:
            raise ValueError("from and to are the same variant")
        pct = [s for s in self.steps if isinstance(s, str)]
        counts = [s for s in self.steps if isinstance(s, int)]
        if any(s == 0 for s in counts) or any(float(s.rstrip("%")) == 0 for s in pct):
            raise ValueError("a step of 0 devices moves nothing")
        if counts != sorted(counts) or [float(s.rstrip('%')) for s in pct] != sorted(
                float(s.rstrip('%')) for s in pct):
            raise ValueError("steps must grow")
        if self.hardware_label is None and (self.required_classes
                                            or self.min_canaries_per_class):
            raise ValueError("required_classes and min_canaries_per_class need a "
                             "hardware_label")
        return self

    def class_minimum(self, cohort_classes: Iterable[str]) -> dict[str, int]:
        """The healthy canaries each required class needs, given the classes the cohort
        has: ``required_classes`` if listed, else (with ``min_canaries_per_class``) every
        class of the cohort except the unknown one."""
        if self.hardware_label is None:
            return {}
        if self.required_classes:
            return dict.fromkeys(self.required_classes, max(1, self.min_canaries_per_class))
        if not self.min_canaries_per_class:
            return {}
        return dict.fromkeys(sorted(set(cohort_classes) - {UNKNOWN_CLASS}),
                             self.min_canaries_per_class)


def load_spec(path: Path) -> RolloutSpec:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_spec(text, str(path))


def parse_spec(text: str, where: str) -> RolloutSpec:
    """A spec from YAML (or JSON, which is YAML) text; errors name ``where`` and the field."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: the spec must be a mapping of fields")
    try:
        return RolloutSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(explain(exc, where=where, whole="spec", pydantic_words=True,
                                rest="list")) from None
