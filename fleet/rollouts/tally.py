"""A running rollout step's samples, kept up to date tick by tick instead of re-read.

A bake window only grows: from its phase start to the tick's ``now``. So the
engine keeps, per rollout, the window's samples per (side, cell) group and the
mark (``store.rollups``) up to which it has read ``events``; a tick adds only
the requests committed since — the delta is what arrived since the last tick, not
the window, and a decision's cost stops growing with the fleet.

- The first tick of a window (and the first after a restart or a leader takeover:
  the tally lives in the engine's process) reads the window once
  (``samples.read_samples``, bounded by the mark it starts from).
- A change of the judged devices — one joins, leaves, changes side, cell or variant
  — reads the window again: a removed device's contribution cannot be taken out of
  a bin's smallest and largest value. In a bake the judged set rarely changes.
- A request stamped at or after the tick's ``now`` (a device's clock ahead of the
  fleet's) is read but held aside until a later tick's ``now`` passes it, so every
  tick's samples are exactly the full read's over ``[start, now)`` of the events
  below the mark (tests/fleet/test_rollout_tally.py holds the two equal).

A tick reads what is committed when it starts (its mark); an ingest transaction
committing meanwhile is read by the next tick, once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text

from ..store.rollups import current_mark, events_by_position, rows_between
from .gates import Sample
from .samples import Member, read_samples

log = logging.getLogger(__name__)

GroupKey = tuple[str, tuple[str, ...]]  # (side, cell)


@dataclass
class _Tally:
    start: float
    now: float
    mark: str  # where in events it has read to (store.rollups)
    members: dict[str, Member]
    groups: dict[GroupKey, Sample]
    #: (ts, group, its requests at that ts): stamped at or after ``now``, not yet counted
    ahead: list[tuple[float, GroupKey, Sample]] = field(default_factory=list)


_SIGNALS = ("status", "latency_s", "attempt_tokens", "validation_failed", "tool_call_ok",
            "refused", "fallback")


def _changes(conn: Connection, members: Mapping[str, Member], prev: str | None, cur: str,
             since_ts: float, now: float) -> tuple[dict[GroupKey, Sample],
                                                   list[tuple[float, GroupKey, Sample]]]:
    """The members' requests a reader moving from mark ``prev`` to ``cur`` reads, with
    ``ts >= since_ts``, per group: those before ``now``, and those at or after it by
    their ts.

    What arrived since the last tick is a tick's worth of requests, not a window's:
    they come row by row and are counted as ``Sample.from_requests`` counts (the tests
    hold it equal to the store's SQL aggregation)."""
    where, params = rows_between(conn.dialect.name, prev, cur)
    rows = conn.execute(text(
        f"SELECT device_id, variant, ts, {', '.join(_SIGNALS)} FROM "
        f"{events_by_position(conn.dialect.name)} WHERE kind = 'request' "
        f"AND variant IS NOT NULL AND ts >= :since AND {where}"),
        {"since": since_ts, **params})
    before: dict[GroupKey, list[Any]] = {}
    later: dict[tuple[float, GroupKey], list[Any]] = {}
    for row in rows:
        m = members.get(row[0])
        if m is None or m.variant != row[1]:
            continue
        group = (m.side, m.cell)
        if row[2] < now:
            before.setdefault(group, []).append(row[3:])
        else:
            later.setdefault((float(row[2]), group), []).append(row[3:])

    def sample(requests: list[Any]) -> Sample:
        return Sample.from_requests(**{name: [r[i] for r in requests]
                                       for i, name in enumerate(_SIGNALS)})

    return ({g: sample(rs) for g, rs in before.items()},
            [(ts, g, sample(rs)) for (ts, g), rs in later.items()])


def _add(groups: dict[GroupKey, Sample], more: Mapping[GroupKey, Sample]) -> None:
    for g, s in more.items():
        groups[g] = Sample.combine([groups[g], s]) if g in groups else s


class WindowTallies:
    """The tallies of the rollouts this engine judges, one window each."""

    def __init__(self) -> None:
        self._tallies: dict[str, tuple[Any, _Tally]] = {}
        self.last: str = ""  # "read" | "advanced": what the last call did (tests, bench)

    def forget(self, rollout_id: str) -> None:
        self._tallies.pop(rollout_id, None)

    def samples(self, engine: Engine, rollout_id: str, key: Any,
                members: Mapping[str, Member], window: tuple[float, float]
                ) -> dict[GroupKey, Sample]:
        """The members' samples per (side, cell) over ``window``, as ``read_samples``
        gives them for the events below the current mark. ``key`` names the window
        (the rollout's step and phase start): another key starts a new tally."""
        start, now = window
        held = self._tallies.get(rollout_id)
        with engine.begin() as conn:
            if (held is None or held[0] != key or held[1].start != start
                    or now < held[1].now or held[1].members != members):
                t = self._read(conn, members, window)
                self._tallies[rollout_id] = (key, t)
                self.last = "read"
            else:
                t = held[1]
                self._advance(conn, t, now)
                self.last = "advanced"
        return dict(t.groups)

    def _read(self, conn: Connection, members: Mapping[str, Member],
              window: tuple[float, float]) -> _Tally:
        mark = current_mark(conn)
        groups = read_samples(conn, members, window, below=mark)
        _, ahead = _changes(conn, members, None, mark, window[1], window[1])
        return _Tally(window[0], window[1], mark, dict(members), groups, ahead)

    @staticmethod
    def _advance(conn: Connection, t: _Tally, now: float) -> None:
        mark = current_mark(conn)
        if mark != t.mark:
            before, later = _changes(conn, t.members, t.mark, mark, t.start, now)
            _add(t.groups, before)
            t.ahead.extend(later)
            t.mark = mark
        due = [(g, s) for ts, g, s in t.ahead if ts < now]
        if due:
            t.ahead = [x for x in t.ahead if x[0] >= now]
            for g, s in due:
                _add(t.groups, {g: s})
        t.now = now


__all__ = ["GroupKey", "WindowTallies"]
