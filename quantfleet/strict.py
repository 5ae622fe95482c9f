"""The one strict pydantic base, and the one way to say why input was refused.

Every model that reads outside input — config files, golden sets, rollout
specs, wire payloads, the local API's requests, reports — derives from
:class:`Strict`: an unknown field is an error naming it, never silently
dropped (a misspelt option must not be a line nobody reads). A subclass that
needs more (``frozen``, ``populate_by_name``) sets its own ``model_config``;
pydantic merges it with this one.

:func:`explain` turns a ``ValidationError`` into the line a file's author
needs, ``where: loc.dotted: message``, in the project's words: pydantic's
"Value error, " prefix dropped, "Extra inputs are not permitted" said as
"unknown field". :func:`problems` gives the same pieces one by one, for a
caller that reports the location separately (the HTTP API's ``param``).

This module imports nothing from quantfleet (an import-linter contract in
pyproject.toml), so every part can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

#: How an unknown field is described unless the caller names it otherwise.
UNKNOWN_FIELD = "unknown field"


class Strict(BaseModel):
    """Base of every model of outside input: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Problem:
    """One reason a value was refused: where in it, and why."""

    loc: str
    """The dotted path to the offending value ("" when it is about the whole input)."""
    message: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.message}" if self.loc else self.message


def problems(exc: ValidationError, *, unknown: str = UNKNOWN_FIELD,
             pydantic_words: bool = False) -> list[Problem]:
    """Every error of ``exc``, in order.

    ``unknown`` is what an unknown field is called ("unknown option" in a config
    file). ``pydantic_words`` keeps pydantic's own messages unchanged, for the
    callers whose output already says them.
    """
    out = []
    for err in exc.errors():
        # "function-after" is pydantic's name for a validator step, not a place in the input
        loc = ".".join(str(p) for p in err["loc"] if p != "function-after")
        message = str(err["msg"])
        if not pydantic_words:
            message = message.removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = unknown
        out.append(Problem(loc, message))
    return out or [Problem("", str(exc))]


def explain(exc: ValidationError, *, where: str | None = None, whole: str = "",
            unknown: str = UNKNOWN_FIELD, pydantic_words: bool = False,
            rest: Literal["omit", "count", "list"] = "omit") -> str:
    """``exc`` as one line: ``where: loc: message``.

    ``where`` names the input (a file, a topic, an option). ``whole`` is the
    location shown for an error about the input as a whole ("" shows none).
    After the first error, the ``rest`` are omitted, counted ("(and 2 more)"),
    or listed, each with its own ``where``, separated by "; ".
    """
    found = [Problem(p.loc or whole, p.message)
             for p in problems(exc, unknown=unknown, pydantic_words=pydantic_words)]
    prefix = "" if where is None else f"{where}: "
    if rest == "list":
        return "; ".join(f"{prefix}{p}" for p in found)
    more = f" (and {len(found) - 1} more)" if rest == "count" and len(found) > 1 else ""
    return f"{prefix}{found[0]}{more}"


__all__ = ["UNKNOWN_FIELD", "Problem", "Strict", "explain", "problems"]
