"""A rollout's states and the transitions between them: the one table every change obeys.

A rollout is in one of eight states. Three are the phases of a running step
(``assigning``, ``waiting``, ``baking``: the ``rollouts`` row has ``state =
'running'`` and that ``phase``); the others are the row's ``state`` itself
(``awaiting_approval``, ``paused`` — which keeps the phase it stopped in, so
``resume`` goes back there — and the three ends, ``completed``,
``rolled_back`` and ``aborted``, which never change again).

``TRANSITIONS`` maps (state, event) to the states the event may lead to; the
engine asks ``check`` before every change it writes, so an operator's request
that does not apply (promote a completed rollout, resume a rolled-back one) is
refused with a message that names the rollout, its state and the action, and
an engine bug cannot move a rollout along an edge that is not in the table.
docs/rollouts.md prints the same table (a test holds the two equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RUNNING_PHASES = ("assigning", "waiting", "baking")
ENDED = ("completed", "rolled_back", "aborted")
STATES = (*RUNNING_PHASES, "awaiting_approval", "paused", *ENDED)
#: The row states of a rollout that still holds its cohort.
ACTIVE = ("running", "awaiting_approval", "paused")

_RUNNING = frozenset(RUNNING_PHASES)

#: (state, event) -> the states it may lead to.
TRANSITIONS: dict[tuple[str, str], frozenset[str]] = {
    ("assigning", "assign"): frozenset({"waiting"}),
    ("waiting", "assign_more"): frozenset({"assigning"}),
    ("waiting", "bake"): frozenset({"baking"}),
    ("baking", "extend"): frozenset({"baking"}),
    # a passing step: the next step, the operator's approval first, or the end
    ("baking", "advance"): frozenset({"assigning", "awaiting_approval", "completed"}),
    ("waiting", "roll_back"): frozenset({"rolled_back"}),  # too many device updates failed
    ("baking", "roll_back"): frozenset({"rolled_back"}),  # a gate failed
    # by an operator, or by the engine: no device to assign, a bake out of extensions
    **{(s, "pause"): frozenset({"paused"}) for s in RUNNING_PHASES},
    ("paused", "resume"): _RUNNING,  # back to the phase it paused in
    ("awaiting_approval", "promote"): frozenset({"assigning", "completed"}),
    ("paused", "promote"): frozenset({"assigning", "completed"}),
    **{(s, "abort"): frozenset({"aborted"})
       for s in (*RUNNING_PHASES, "awaiting_approval", "paused")},
}

EVENTS = tuple(dict.fromkeys(e for _, e in TRANSITIONS))


class RolloutError(ValueError):
    """An operator request that cannot be carried out; the message says why."""


def state_of(row: Mapping[str, Any]) -> str:
    """The state of a ``rollouts`` row: its phase while running, else its state."""
    return str(row["phase"] if row["state"] == "running" else row["state"])


def columns_of(state: str, current_phase: str) -> dict[str, str]:
    """The ``state`` and ``phase`` columns that store a state (the phase is kept when
    the state is not a running phase: a paused rollout resumes there)."""
    if state in _RUNNING:
        return {"state": "running", "phase": state}
    return {"state": state, "phase": current_phase}


def _sources(event: str) -> list[str]:
    return [s for (s, e) in TRANSITIONS if e == event]


def _describe(states: list[str]) -> str:
    """``running`` for the three running phases together, the others by name."""
    names = (["running"] if set(states) >= _RUNNING else
             [s for s in states if s in _RUNNING]) + [s for s in states if s not in _RUNNING]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check(rollout_id: str, row: Mapping[str, Any], event: str, to: str) -> None:
    """Refuse ``event`` taking the rollout in ``row`` to ``to`` unless the table has it."""
    if event not in EVENTS:
        raise RolloutError(f"internal: {event!r} is not a rollout event")
    now = state_of(row)
    targets = TRANSITIONS.get((now, event))
    if targets is None:
        shown = now if now not in _RUNNING else f"running ({now})"
        message = (f"cannot {event.replace('_', ' ')} rollout {rollout_id!r}: it is {shown}, "
                   f"not {_describe(_sources(event))}")
        if now in ENDED:
            message += "; a rollout that has ended never moves again (create a new one)"
        raise RolloutError(message)
    if to not in targets:
        raise RolloutError(f"internal: {event} cannot take rollout {rollout_id!r} from "
                           f"{now} to {to} (only to {', '.join(sorted(targets))})")


__all__ = ["ACTIVE", "ENDED", "EVENTS", "RUNNING_PHASES", "STATES", "TRANSITIONS",
           "RolloutError", "check", "columns_of", "state_of"]
