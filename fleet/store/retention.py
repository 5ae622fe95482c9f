"""How long the store keeps raw events and rollups, and the deletes that enforce it.

Raw events are kept ``raw_events_s`` after they were received, and never deleted
while something still needs them:

- the rollups: only rows the rollup watermark has passed (``rollups.rows_below``)
  go, so a request is always counted before its row is dropped;
- a rollout in progress (running, awaiting approval, paused): its bake window
  starts at its phase start, and no request stamped at or after the earliest such
  start is deleted — the engine reads the window raw after a restart or takeover
  (``rollouts/tally.py``).

Events go oldest first, by id, in batches (one short transaction each): on SQLite
ids are commit order, so the oldest ids are the earliest received and each device
loses a prefix of its sequence — the sequence-gap check (``Store.seq_gaps``) sees no
hole where nothing was lost; holes older than the retention are forgotten with their
events. On SQLite the newest row is always kept: SQLite gives a new row the largest
id plus one, and an emptied table would hand out ids the rollup watermark has passed.

Rollups are kept ``rollups_s`` (by their minute), longer than raw events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

from ..rollouts.states import ACTIVE
from . import schema
from .rollups import ROLLUPS, rows_below, watermark


@dataclass(frozen=True)
class RetentionRun:
    events: int  # raw events deleted
    rollups: int  # rollup rows deleted (counts and bins)
    kept_from: float  # raw events received before this could go
    pinned_from: float | None  # requests stamped at or after this are kept (a rollout)


def pinned_from(conn: Connection) -> float | None:
    """The earliest phase start of a rollout in progress: its window reads raw events."""
    r = schema.rollouts
    states = ", ".join(f"'{s}'" for s in ACTIVE)
    got = conn.execute(text(
        f"SELECT min(phase_started_at) FROM {r.name} WHERE state IN ({states})")).scalar()
    return None if got is None else float(got)


def apply_retention(engine: Engine, *, raw_events_s: float, rollups_s: float,
                    now: float | None = None, batch: int = 20_000) -> RetentionRun:
    """Delete what the retention lets go (the module's docstring says what that is)."""
    now = time.time() if now is None else now
    cutoff = now - raw_events_s
    with engine.connect() as conn:
        mark = watermark(conn, ROLLUPS)
        pin = pinned_from(conn)
        # The first id received at or after the cutoff: everything below is older.
        first_kept = conn.execute(text(
            f"SELECT id FROM {schema.events.name} WHERE received_at >= :c ORDER BY id "
            "LIMIT 1"), {"c": cutoff}).scalar()
        last = conn.execute(text(f"SELECT max(id) FROM {schema.events.name}")).scalar()
    deleted = 0
    if mark is not None and last is not None:
        below = int(last) + 1 if first_kept is None else int(first_kept)
        if engine.dialect.name == "sqlite":
            below = min(below, int(last))  # the newest row stays (see above)
        rolled, params = rows_below(engine.dialect.name, mark)
        needed = "" if pin is None else " AND (kind <> 'request' OR ts < :pin)"
        sql = text(f"DELETE FROM {schema.events.name} WHERE id IN (SELECT id FROM "
                   f"{schema.events.name} WHERE id < :below AND {rolled}{needed} "
                   "ORDER BY id LIMIT :batch)")
        while True:
            with engine.begin() as conn:
                n = conn.execute(sql, {"below": below, "pin": pin, "batch": batch,
                                       **params}).rowcount
            deleted += max(n, 0)
            if n < batch:
                break
    minute = int((now - rollups_s) // 60)
    rollups = 0
    with engine.begin() as conn:
        for table in (schema.request_rollups, schema.request_rollup_bins):
            rollups += max(conn.execute(text(f"DELETE FROM {table.name} WHERE minute < :m"),
                                        {"m": minute}).rowcount, 0)
    return RetentionRun(deleted, rollups, cutoff, pin)


__all__ = ["RetentionRun", "apply_retention", "pinned_from"]
