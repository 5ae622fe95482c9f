"""Per-device, per-variant, per-minute rollups of request events, kept exactly once.

``roll_up`` aggregates, in SQL, the request events committed since its
watermark into ``request_rollups`` (the counts every gate rate is made of) and
``request_rollup_bins`` (latency by the gates' bin, ``stats.latency_bin``, with
the smallest and largest latency in each; attempt tokens by exact value), adding
to the rows already there (``ON CONFLICT DO UPDATE SET n = n + excluded.n``). A
late (historical, backfilled) event lands in the minute of its own ``ts``.

Positions (what a watermark counts in) are where exactly-once rests:

- SQLite has one writer, so rowid order is commit order: the position of a row is
  its ``id``, and ``max(id) + 1`` read inside the write transaction bounds
  everything committed.
- PostgreSQL's ingest processes (several replicas) commit out of id order, so an
  ``id > watermark`` would miss a row whose transaction began first and committed
  last. The position there is ``events.txid``, the id of the transaction that wrote
  the row (the column's default, m006), and the bound is the snapshot's ``xmin``:
  every transaction below it has committed or aborted, so nothing can still appear
  below it. A long open transaction anywhere in the cluster holds the watermark back
  (the rollups lag; nothing is missed). Rows written before m006 have no txid and are
  taken by the first run.

A consumer's range is ``[previous, current)`` and its watermark moves in the same
transaction as the sums it wrote, with the watermark row locked: two replicas rolling
up at once serialise on it and neither counts a range twice.

Nothing here runs on ingest's path: ``quantfleet serve`` calls ``roll_up`` on its
ticker (fleet/service.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text

from ..rollouts.stats import LATENCY_BIN_FLOOR_S, LN_LATENCY_BIN_GROWTH
from . import schema

#: The watermark of the rollups themselves (``rollup_watermarks.name``).
ROLLUPS = "request_rollups"


@dataclass(frozen=True)
class RollupRun:
    """What one ``roll_up`` did: the positions ``[start, end)`` and the events in them."""

    start: int
    end: int
    events: int


def current_position(conn: Connection) -> int:
    """The position below which every row of ``events`` is final (committed or never
    will be): ``[watermark, current_position)`` is a range no later commit adds to."""
    if conn.dialect.name == "postgresql":
        return int(conn.execute(text(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")).scalar_one())
    return int(conn.execute(text(
        f"SELECT coalesce(max(id), 0) + 1 FROM {schema.events.name}")).scalar_one())


def position_range(dialect: str, start: int, end: int | None = None) -> str:
    """SQL selecting the rows of ``events`` with positions in ``[start, end)`` (``end``
    None: no bound), with ``:pos_start`` / ``:pos_end`` parameters."""
    if dialect == "postgresql":
        cond = "txid >= :pos_start" + ("" if end is None else " AND txid < :pos_end")
        # Rows from before m006 carry no txid: the first range (from 0) holds them.
        return f"(({cond}) OR txid IS NULL)" if start == 0 else f"({cond})"
    return "(id >= :pos_start" + ("" if end is None else " AND id < :pos_end") + ")"


def latency_bin_sql(column: str = "latency_s") -> str:
    """``stats.latency_bin`` in SQL (as ``samples.py`` computes it), with ``:bin_floor``
    and ``:bin_ln_growth`` parameters (``bin_params``)."""
    x = f"coalesce({column}, 0.0)"
    return (f"CASE WHEN {x} < :bin_floor THEN 0 "
            f"ELSE 1 + floor(ln({x} / :bin_floor) / :bin_ln_growth) END")


def bin_params() -> dict[str, float]:
    return {"bin_floor": LATENCY_BIN_FLOOR_S, "bin_ln_growth": LN_LATENCY_BIN_GROWTH}


#: The counts of a group of request rows, in ``request_rollups``' column order.
COUNTS = ("requests", "validation_failures", "tool_calls", "tool_calls_ok", "refusals",
          "fallbacks", "errors", "successes")
COUNT_SQL = (
    "count(*)",
    "count(*) FILTER (WHERE validation_failed)",
    "count(tool_call_ok)",
    "count(*) FILTER (WHERE tool_call_ok)",
    "count(*) FILTER (WHERE refused)",
    "count(*) FILTER (WHERE fallback)",
    "count(*) FILTER (WHERE status >= 400)",
    "count(*) FILTER (WHERE coalesce(status, 0) < 400 AND NOT coalesce(validation_failed, "
    "false))",
)


def _upsert_sql(dialect: str, where: str) -> list[str]:
    least, greatest = ("LEAST", "GREATEST") if dialect == "postgresql" else ("min", "max")
    r, b = schema.request_rollups.name, schema.request_rollup_bins.name
    minute = "CAST(floor(ts / 60.0) AS BIGINT)"
    requests = (f"FROM {schema.events.name} WHERE kind = 'request' AND variant IS NOT NULL "
                f"AND {where}")
    counts = (
        f"INSERT INTO {r} (device_id, variant, minute, {', '.join(COUNTS)}) "
        f"SELECT device_id, variant, {minute} AS m, {', '.join(COUNT_SQL)} {requests} "
        "GROUP BY device_id, variant, m "
        "ON CONFLICT (device_id, variant, minute) DO UPDATE SET "
        + ", ".join(f"{c} = {r}.{c} + excluded.{c}" for c in COUNTS))
    merge = (" ON CONFLICT (device_id, variant, minute, dist, key) DO UPDATE SET "
             f"n = {b}.n + excluded.n, low = {least}({b}.low, excluded.low), "
             f"high = {greatest}({b}.high, excluded.high)")
    latency = (
        f"INSERT INTO {b} (device_id, variant, minute, dist, key, n, low, high) "
        "SELECT device_id, variant, m, 0, k, count(*), min(x), max(x) FROM ("
        f"SELECT device_id, variant, {minute} AS m, CAST({latency_bin_sql()} AS BIGINT) AS k, "
        f"coalesce(latency_s, 0.0) AS x {requests}) AS q WHERE true "
        "GROUP BY device_id, variant, m, k" + merge)
    tokens = (
        f"INSERT INTO {b} (device_id, variant, minute, dist, key, n, low, high) "
        "SELECT device_id, variant, m, 1, k, count(*), min(k), max(k) FROM ("
        f"SELECT device_id, variant, {minute} AS m, CAST(coalesce(attempt_tokens, 0) AS BIGINT)"
        f" AS k {requests}) AS q WHERE true GROUP BY device_id, variant, m, k" + merge)
    return [counts, latency, tokens]


def _claim(conn: Connection, name: str) -> int:
    """The consumer's watermark, its row locked until the transaction ends."""
    w = schema.rollup_watermarks.name
    conn.execute(text(f"INSERT INTO {w} (name, position, updated_at) VALUES (:n, 0, :t) "
                      "ON CONFLICT (name) DO NOTHING"), {"n": name, "t": time.time()})
    lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
    return int(conn.execute(text(f"SELECT position FROM {w} WHERE name = :n{lock}"),
                            {"n": name}).scalar_one())


def watermark(conn: Connection, name: str = ROLLUPS) -> int:
    """Where the consumer ``name`` stands (0: it never ran)."""
    w = schema.rollup_watermarks.name
    got = conn.execute(text(f"SELECT position FROM {w} WHERE name = :n"), {"n": name}).first()
    return 0 if got is None else int(got[0])


def roll_up(engine: Engine) -> RollupRun:
    """Add the request events committed since the watermark to the rollups, and move the
    watermark past them, in one transaction."""
    with engine.begin() as conn:
        # On SQLite the watermark row's INSERT takes the write lock first: max(id)
        # read after it bounds every committed row, and no writer commits meanwhile.
        start = _claim(conn, ROLLUPS)
        end = current_position(conn)
        if end <= start:
            return RollupRun(start, start, 0)
        where = position_range(conn.dialect.name, start, end)
        params: dict[str, Any] = {"pos_start": start, "pos_end": end, **bin_params()}
        n = int(conn.execute(text(
            f"SELECT count(*) FROM {schema.events.name} WHERE kind = 'request' "
            f"AND variant IS NOT NULL AND {where}"), params).scalar_one())
        if n:
            for sql in _upsert_sql(conn.dialect.name, where):
                conn.execute(text(sql), params)
        conn.execute(text(f"UPDATE {schema.rollup_watermarks.name} SET position = :p, "
                          "updated_at = :t WHERE name = :n"),
                     {"p": end, "t": time.time(), "n": ROLLUPS})
        return RollupRun(start, end, n)


__all__ = ["COUNTS", "ROLLUPS", "RollupRun", "bin_params", "current_position",
           "latency_bin_sql", "position_range", "roll_up", "watermark"]
