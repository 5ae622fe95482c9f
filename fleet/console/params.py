"""Every query parameter the console accepts, parsed and checked in one place.

A bad value is a ``ParamError`` naming the parameter and saying what it takes;
the routes answer it with a 400.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..cohorts import Selector, SelectorError

#: The windows the pages offer; any ``<number><s|m|h|d>`` up to MAX_WINDOW_S is accepted.
WINDOWS = ("15m", "1h", "6h", "24h", "7d")
MAX_WINDOW_S = 31 * 86400
MAX_POINTS = 500
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: Steps a chart's buckets snap to, so that polling keeps the same buckets; from 600 s
#: on multiples of it, which the in-memory rollup answers (queries.SignalRollup).
_NICE_STEPS = (10, 30, 60, 300, 600, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


class ParamError(ValueError):
    """A query parameter that cannot be used; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"query parameter {param!r}: {message}")
        self.param = param


def duration(params: Mapping[str, str], name: str, default: str,
             maximum: float = MAX_WINDOW_S) -> float:
    """``15m``, ``24h``, ``7d`` or a number of seconds, in (0, maximum]."""
    text = params.get(name, default).strip()
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ParamError(name, f"{text!r} is not a duration (e.g. 15m, 24h, 7d, or seconds)")
    value = float(m.group(1)) * _UNIT[m.group(2)]
    if not 0 < value <= maximum:
        raise ParamError(name, f"{text!r} must be more than 0 and at most {maximum:g} s")
    return value


def step(params: Mapping[str, str], window_s: float, points: int = 60) -> float:
    """The bucket width of a time series: ``step`` if given (at most MAX_POINTS buckets
    in the window), else the smallest nice step giving at most ``points`` buckets."""
    if "step" in params:
        value = duration(params, "step", "60")
        if window_s / value > MAX_POINTS:
            raise ParamError("step", f"{params['step']!r} makes more than {MAX_POINTS} points "
                             f"in a {window_s:g} s window")
        return value
    for s in _NICE_STEPS:
        if window_s / s <= points:
            return float(s)
    return float(math.ceil(window_s / points))


def selector(params: Mapping[str, str], name: str = "selector") -> Selector | None:
    """A label selector (docs/fleet.md), or None when absent or empty."""
    text = params.get(name, "").strip()
    if not text:
        return None
    try:
        return Selector.parse(text)
    except SelectorError as exc:
        raise ParamError(name, str(exc)) from None


def integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ParamError(name, f"{text!r} is not an integer") from None
    if not low <= value <= high:
        raise ParamError(name, f"{value} is not in [{low}, {high}]")
    return value


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def name(params: Mapping[str, str], param: str) -> str | None:
    """A variant or rollout name (letters, digits, ``. _ -``), or None when absent."""
    text = params.get(param)
    if text is None or text == "":
        return None
    if not _NAME.fullmatch(text):
        raise ParamError(param, f"{text!r} is not a name (letters, digits, . _ -; at most 128)")
    return text
