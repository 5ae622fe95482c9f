"""Named migrations of the fleet store, applied in order when a store opens.

Each migration runs in one transaction together with the row that records
it, so a crash leaves either both or neither. A migration is never edited
once released: changes come as a new, higher-numbered one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, inspect, select, text

from . import schema

log = logging.getLogger(__name__)

Migration = Callable[[Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    name = fn.__name__
    if any(n == name for n, _ in MIGRATIONS):
        raise ValueError(f"duplicate migration {name}")
    MIGRATIONS.append((name, fn))
    return fn


@migration
def m001_initial(conn: Connection) -> None:
    tables = [schema.devices, schema.events, schema.rejections, schema.desired, schema.audit]
    schema.metadata.create_all(conn, tables=tables)


@migration
def m002_rollouts(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.rollouts, schema.rollout_devices,
                                             schema.pins])


@migration
def m003_events_request_signals_index(conn: Connection) -> None:
    """Replace (kind, variant, ts) by an index that also holds every signal the gates
    count: a window's aggregation reads the index, not the rows (docs/rollouts.md)."""
    index = next(i for i in schema.events.indexes if i.name == "ix_events_request_signals")
    index.create(conn, checkfirst=True)  # a blank store has it from m001
    conn.execute(text("DROP INDEX IF EXISTS ix_events_kind_variant_ts"))


def applied(engine: Engine) -> list[str]:
    if not inspect(engine).has_table(schema.migrations.name):
        return []
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(schema.migrations.c.name))]


def migrate(engine: Engine) -> list[str]:
    """Apply every pending migration; return the names applied now."""
    schema.metadata.create_all(engine, tables=[schema.migrations])
    done = set(applied(engine))
    now_applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with engine.begin() as conn:
            fn(conn)
            conn.execute(schema.migrations.insert().values(name=name, applied_at=time.time()))
        log.info("store: applied %s", name)
        now_applied.append(name)
    return now_applied
