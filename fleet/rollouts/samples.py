"""What each judged group of devices did over a window, aggregated by the database.

The engine decides which devices are judged and on which side (canary or
control) and cell (hardware class and stratum); this module hands that
membership to the store as a temporary table and lets SQL do the counting,
so a step decision at 10,000 devices reads a few thousand rows instead of
200,000 requests:

- per group and latency bin (``stats.latency_bin``, computed in SQL): the
  requests, their smallest and largest latency, and the counts behind every
  rate (validation failures, tool calls and their successes, refusals,
  fallbacks, errors, successes);
- per group and token count: the requests (cost per success is judged on the
  exact values).

The same SQLAlchemy Core runs on SQLite and PostgreSQL; ``Sample.from_requests``
computes the same from per-request values, and the tests hold the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    case,
    delete,
    false,
    func,
    literal,
    null,
    select,
    text,
    union_all,
)
from sqlalchemy.schema import CreateTable

from quantfleet.fleet.store import schema
from quantfleet.fleet.store.rollups import rows_below

from .gates import Sample
from .stats import LATENCY_BIN_FLOOR_S, LN_LATENCY_BIN_GROWTH, Binned

#: Per-connection scratch table: who is judged, with which variant, in which group
#: (a number standing for side and cell: SQLite groups integers faster than text).
_judged = Table(
    "qf_judged", MetaData(),
    Column("device_id", String(64), primary_key=True),
    Column("variant", String(128), nullable=False),
    Column("grp", Integer, nullable=False),
    prefixes=["TEMPORARY"],
    sqlite_with_rowid=False,  # probed once per request: one B-tree search, not two
)


@dataclass(frozen=True)
class Member:
    side: str  # "canary" | "control"
    variant: str  # the variant whose requests count for this device
    cell: tuple[str, ...]  # its value of each judged dimension (verdict.cell_of)


def _latency_bin_sql(latency: Any) -> Any:
    x = func.coalesce(latency, 0.0)
    return case(
        (x < LATENCY_BIN_FLOOR_S, literal(0)),
        else_=1 + func.floor(func.ln(x / LATENCY_BIN_FLOOR_S)
                             / literal(LN_LATENCY_BIN_GROWTH, Float)),
    )


def _fill(conn: Connection, rows: list[tuple[str, str, int]]) -> None:
    """The judged devices into the scratch table, the cheapest way each driver has:
    SQLAlchemy's per-row parameter handling cost more than the whole query."""
    if conn.dialect.name == "postgresql":
        ids, variants, groups = (list(c) for c in zip(*rows, strict=True))
        conn.execute(text(
            f"INSERT INTO {_judged.name} (device_id, variant, grp) SELECT * FROM "
            "unnest(CAST(:ids AS text[]), CAST(:variants AS text[]), CAST(:groups AS integer[]))"
        ), {"ids": ids, "variants": variants, "groups": groups})
    else:
        conn.exec_driver_sql(
            f"INSERT INTO {_judged.name} (device_id, variant, grp) VALUES (?, ?, ?)", rows)


def read_samples(conn: Connection, members: Mapping[str, Member],
                 window: tuple[float, float], *, below: str | None = None
                 ) -> dict[tuple[str, tuple[str, ...]], Sample]:
    """Samples per (side, cell) of the members' requests with ``window[0] <= ts <
    window[1]`` that their assigned variant answered. Groups without requests are absent.
    ``below``: only the events a consumer at that mark has read (``store.rollups``), for
    a tally (``tally.py``) that goes on from there.

    One group per side and cell (hardware class x stratum): the engine sums cells into
    classes, strata and the pool (``verdict.merge_cells``), so one read serves them all."""
    conn.execute(CreateTable(_judged, if_not_exists=True))
    conn.execute(delete(_judged))  # what an earlier call on this connection left
    if not members:
        return {}
    groups = sorted({(m.side, m.cell) for m in members.values()})
    number = {g: i for i, g in enumerate(groups)}
    _fill(conn, [(d, m.variant, number[(m.side, m.cell)]) for d, m in members.items()])
    if conn.dialect.name == "postgresql":
        # Autovacuum never sees temporary tables: without statistics the planner
        # guesses a few hundred members and sorts where it should hash.
        conn.execute(text(f"ANALYZE {_judged.name}"))
    e, j = schema.events, _judged
    variants = sorted({m.variant for m in members.values()})
    # kind, variant and the window select from ix_events_request_signals, which
    # holds every column read here; the judged table is probed by device. Both
    # engines materialize a CTE read twice: the window is read once.
    bounded = []
    if below is not None:
        sql, params = rows_below(conn.dialect.name, below)
        bounded.append(text(sql).bindparams(**params))
    requests = (
        select(j.c.grp, _latency_bin_sql(e.c.latency_s).label("bin"),
               func.coalesce(e.c.latency_s, 0.0).label("latency"),
               func.coalesce(e.c.attempt_tokens, 0).label("tokens"),
               e.c.status, e.c.validation_failed, e.c.tool_call_ok, e.c.refused, e.c.fallback)
        .select_from(e.join(j, and_(j.c.device_id == e.c.device_id,
                                    j.c.variant == e.c.variant)))
        .where(e.c.kind == "request", e.c.variant.in_(variants), e.c.ts >= window[0],
               e.c.ts < window[1], *bounded)
        .cte("judged_requests"))
    r = requests.c
    vf = func.coalesce(r.validation_failed, false())
    by_bin = (select(literal(0), r.grp, r.bin, func.count(), func.min(r.latency),
                     func.max(r.latency), func.count().filter(r.validation_failed),
                     func.count(r.tool_call_ok), func.count().filter(r.tool_call_ok),
                     func.count().filter(r.refused), func.count().filter(r.fallback),
                     func.count().filter(r.status >= 400),
                     func.count().filter(and_(func.coalesce(r.status, 0) < 400, ~vf)))
              .group_by(r.grp, r.bin))
    by_tokens = (select(literal(1), r.grp, r.tokens, func.count(), *[null()] * 9)
                 .group_by(r.grp, r.tokens))
    bins: dict[int, list[Any]] = {}
    token_rows: dict[int, list[tuple[float, int, float, float]]] = {}
    for row in conn.execute(union_all(by_bin, by_tokens)):
        if row[0] == 0:
            bins.setdefault(row[1], []).append(row[2:])
        else:
            token_rows.setdefault(row[1], []).append((row[2], row[3], row[2], row[2]))
    conn.execute(delete(_judged))
    out = {}
    for grp, rows in bins.items():
        # rows: (bin, requests, min, max, then the rate counts in select order)
        (failures, tool_calls, tool_ok, refusals, fallbacks, errors,
         successes) = (sum(int(r[i]) for r in rows) for i in range(4, 11))
        out[groups[grp]] = Sample(
            requests=sum(int(r[1]) for r in rows), validation_failures=failures,
            tool_calls=tool_calls, tool_calls_ok=tool_ok, refusals=refusals,
            fallbacks=fallbacks, errors=errors, successes=successes,
            latency=Binned.from_rows([(float(r[0]), int(r[1]), float(r[2]), float(r[3]))
                                      for r in rows]),
            attempt_tokens=Binned.from_rows(token_rows.get(grp, [])))
    return out
