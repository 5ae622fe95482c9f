"""The fleet store's frozen migrations on both engines.

A store built by the migrations is compared with what ``schema.py`` declares
(reflected from a blank database of the same engine where ``schema.metadata``
made the tables), and stores as older code left them — m001 as first released,
m001 + m002 — are filled with data and upgraded by opening them.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    MetaData,
    String,
    create_engine,
    inspect,
    select,
    text,
)

from quantfleet.agent.wire import (
    DesiredPayload,
    GapRecord,
    RequestEvent,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
)
from quantfleet.fleet.store import Store, schema
from quantfleet.fleet.store.migrations import MIGRATIONS, Migration, applied, migrate
from tests.fleet.conftest import PG_ADMIN

ALL = [name for name, _ in MIGRATIONS]


def only(*names: str) -> list[tuple[str, Migration]]:
    """The named released migrations, as a store that never ran the others has them."""
    by_name = dict(MIGRATIONS)
    return [(n, by_name[n]) for n in names]


# -- the comparison -----------------------------------------------------------

def describe(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every table as the engine reflects it: columns (type, nullability, server default),
    primary key, indexes, unique and check constraints, foreign keys."""
    insp = inspect(engine)
    dialect = engine.dialect
    out: dict[str, dict[str, Any]] = {}
    for table in insp.get_table_names():
        columns = {
            c["name"]: {"type": str(c["type"].compile(dialect=dialect)),
                        "nullable": c["nullable"], "default": c.get("default"),
                        "autoincrement": c.get("autoincrement")}
            for c in insp.get_columns(table)}
        out[table] = {
            "columns": columns,
            "primary key": sorted(insp.get_pk_constraint(table)["constrained_columns"]),
            "indexes": {i["name"]: {"columns": i["column_names"], "unique": bool(i["unique"])}
                        for i in insp.get_indexes(table)},
            "unique constraints": {u["name"]: u["column_names"]
                                   for u in insp.get_unique_constraints(table)},
            "check constraints": {c["name"]: c["sqltext"]
                                  for c in insp.get_check_constraints(table)},
            "foreign keys": sorted((tuple(f["constrained_columns"]), f["referred_table"],
                                    tuple(f["referred_columns"]))
                                   for f in insp.get_foreign_keys(table)),
        }
    return out


def differences(declared: dict[str, dict[str, Any]],
                migrated: dict[str, dict[str, Any]]) -> list[str]:
    """What the migrations make differently from the declaration, one line per table,
    column, index or constraint, each naming it. Column order is not compared (an added
    column comes last on both engines)."""
    def show(x: Any) -> str:
        if x is None:
            return "(absent)"
        if isinstance(x, dict) and "type" in x:  # a column
            return " ".join([x["type"], "NULL" if x["nullable"] else "NOT NULL",
                             *([f"DEFAULT {x['default']}"] if x["default"] is not None else []),
                             *(["autoincrement"] if x["autoincrement"] is True else [])])
        if isinstance(x, dict):  # an index
            return ("UNIQUE " if x["unique"] else "") + f"({', '.join(x['columns'])})"
        if isinstance(x, list):
            return f"({', '.join(map(str, x))})"
        return str(x)

    out = []
    for table in sorted(declared.keys() | migrated.keys()):
        if table not in migrated:
            out.append(f"table {table}: declared in schema.py, not made by the migrations")
            continue
        if table not in declared:
            out.append(f"table {table}: made by the migrations, not declared in schema.py")
            continue
        d, m = declared[table], migrated[table]
        named = [(f"{table}.{c}", d["columns"].get(c), m["columns"].get(c))
                 for c in sorted(d["columns"].keys() | m["columns"].keys())]
        for part, what in (("indexes", "index"), ("unique constraints", "unique constraint"),
                           ("check constraints", "check constraint")):
            named += [(f"{table} {what} {n}", d[part].get(n), m[part].get(n))
                      for n in sorted(d[part].keys() | m[part].keys())]
        named += [(f"{table} {part}", d[part], m[part])
                  for part in ("primary key", "foreign keys")]
        out += [f"{name}: schema.py {show(a)}, migrations {show(b)}"
                for name, a, b in named if a != b]
    return out


def assert_as_declared(engine: Engine, reference: Engine) -> None:
    schema.metadata.create_all(reference)
    diffs = differences(describe(reference), describe(engine))
    assert not diffs, (
        "the store the migrations build is not what fleet/store/schema.py declares; a change "
        "to schema.py needs a new migration (fleet/store/migrations.py, docs/store.md):\n  "
        + "\n  ".join(diffs))


@pytest.fixture
def blank_database(store_url: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Makes further blank databases of the same engine as ``store_url``."""
    made: list[str] = []
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")

    def make() -> str:
        name = f"qf_ref_{uuid.uuid4().hex[:12]}"
        if store_url.startswith("sqlite"):
            return f"sqlite:///{tmp_path / f'{name}.db'}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    yield make
    if made:
        with admin.connect() as conn:
            for name in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def reference(blank_database: Callable[[], str]) -> Iterator[Engine]:
    """A blank database for schema.py's own tables."""
    engine = create_engine(blank_database())
    yield engine
    engine.dispose()


def assert_as_blank_to_latest(engine: Engine, blank_database: Callable[[], str]) -> None:
    """An upgraded store is the one blank → latest builds, column order too."""
    fresh = Store(blank_database())
    try:
        assert describe(engine) == describe(fresh.engine)
        assert column_order(engine) == column_order(fresh.engine)
    finally:
        fresh.close()


def column_order(engine: Engine) -> dict[str, list[str]]:
    insp = inspect(engine)
    return {t: [c["name"] for c in insp.get_columns(t)] for t in insp.get_table_names()}


# -- blank → latest -------------------------------------------------------------

def test_blank_to_latest_is_what_schema_py_declares(store_url: str, reference: Engine) -> None:
    s = Store(store_url)
    assert s.applied == ALL
    assert_as_declared(s.engine, reference)
    s.close()
    again = Store(store_url)  # reopening applies nothing twice
    assert again.applied == [] and applied(again.engine) == ALL
    again.close()


def test_a_schema_py_change_without_a_migration_fails_naming_table_and_column(
    store_url: str, reference: Engine,
) -> None:
    """What the check above reports when schema.py moves on alone."""
    s = Store(store_url)
    changed = MetaData()
    for table in schema.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["devices"].append_column(Column("site", String(32), nullable=False))
    changed.create_all(reference)
    diffs = differences(describe(reference), describe(s.engine))
    s.close()
    assert diffs == ["devices.site: schema.py VARCHAR(32) NOT NULL, migrations (absent)"]


# -- old stores → latest --------------------------------------------------------

def request_body(seq: int, *, refused: bool = False, failed: bool = False) -> dict[str, Any]:
    validations = [ValidationOutcome(kind="json_schema", passed=not failed),
                   ValidationOutcome(kind="refusal", passed=not refused,
                                     detail="refused" if refused else "answered")]
    body: dict[str, Any] = RequestEvent(
        request_id=f"r-{seq}", ts=1000.0 + seq, variant="v1", latency_s=0.25, prompt_tokens=30,
        completion_tokens=20, validations=validations).model_dump(mode="json")
    return body


def m001_event_row(seq: int, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """An events row as the code of m001 (195a140) wrote it: the body as JSON, refusal_ok."""
    row: dict[str, Any] = {
        "device_id": "dev-1", "boot_epoch": 1, "seq": seq, "kind": kind, "ts": 1000.0 + seq,
        "received_at": 2000.0, "historical": False, "body": body,
        **dict.fromkeys(("variant", "status", "latency_s", "ttft_s", "prompt_tokens",
                         "completion_tokens", "attempt_tokens", "validation_failed",
                         "tool_call_ok", "refusal_ok", "fallback", "truncated"))}
    if kind == "request":
        refusal = [v["passed"] for v in body["validations"] if v["kind"] == "refusal"]
        row.update(variant=body["variant"], status=body["status"],
                   latency_s=body["latency_s"], prompt_tokens=body["prompt_tokens"],
                   completion_tokens=body["completion_tokens"],
                   attempt_tokens=body["prompt_tokens"] + body["completion_tokens"],
                   validation_failed=not all(v["passed"] for v in body["validations"]),
                   refusal_ok=all(refusal) if refusal else None, fallback=False)
    return row


def desired_payload(revision: int) -> dict[str, Any]:
    # What a store of that time holds: desired state version 1 (no key id).
    payload: dict[str, Any] = DesiredPayload(
        schema_version=1, device_id="dev-1", revision=revision, variant="v2", backend="llama.cpp",
        sha256="0" * 64, size_bytes=1, url="http://x/v2.gguf", signature="sig",
        issued_at=3000.0).model_dump(mode="json")
    return payload


GAP = GapRecord(reason="evicted", events=2, counts={"request": 2}, ranges=[(4, 5)])
BODIES = {1: ("request", request_body(1)), 2: ("request", request_body(2, refused=True)),
          3: ("request", request_body(3, failed=True)),
          6: ("gap", GAP.model_dump(mode="json"))}


def fill_m001(engine: Engine) -> None:
    """Devices with labels, events, a rejection, desired state and audit rows, written into
    the tables as they are (reflected, not schema.py's)."""
    md = MetaData()
    md.reflect(engine)
    t = md.tables
    with engine.begin() as conn:
        conn.execute(t["devices"].insert(), [
            {"device_id": "dev-1", "labels": {"hw": "rpi5", "canary": "yes"}, "hardware": {},
             "online": True, "boot_epoch": 1, "status_reason": "birth",
             "agent_version": "0.1", "first_seen": 10.0, "last_seen": 20.0},
            {"device_id": "dev-2", "labels": {}, "hardware": {}, "online": False,
             "boot_epoch": 0, "status_reason": "", "agent_version": "", "first_seen": 11.0,
             "last_seen": 11.0}])
        conn.execute(t["events"].insert(),
                     [m001_event_row(seq, kind, body) for seq, (kind, body) in BODIES.items()])
        conn.execute(t["ingest_rejections"].insert().values(ts=1.0, topic="t", reason="not JSON"))
        conn.execute(t["desired"].insert(), [
            {"device_id": "dev-1", "variant": "v2", "payload": desired_payload(3),
             "updated_at": 3000.0},
            {"device_id": "dev-2", "variant": "v2", "payload": {"variant": "v2"},
             "updated_at": 3001.0}])
        conn.execute(t["audit"].insert(), [
            {"ts": 5.0, "actor": "op", "action": "label", "subject": "device:dev-1",
             "evidence": {"canary": "yes"}},
            {"ts": 6.0, "actor": "op", "action": "label", "subject": "device:dev-2",
             "evidence": {}}])


def fill_m002(engine: Engine) -> None:
    md = MetaData()
    md.reflect(engine, only=["rollouts", "rollout_devices", "pins"])
    t = md.tables
    with engine.begin() as conn:
        conn.execute(t["rollouts"].insert().values(
            id="r1", spec={"variant": "v2", "steps": [10, 50]}, state="baking", step=0,
            phase="bake", phase_started_at=7.0, bake_extensions=1, reason="", created_at=7.0,
            updated_at=8.0))
        conn.execute(t["rollout_devices"].insert().values(
            rollout_id="r1", device_id="dev-1", role="canary", step=0, stratum="hw=rpi5",
            assigned_at=7.0, outcome="pending", reason=""))
        conn.execute(t["pins"].insert().values(cohort="hw=rpi5", variant="v1", rollout_id="r0",
                                               pinned_at=6.0, reason="rolled back"))


def assert_m001_data_survived(s: Store) -> None:
    devices = {d["device_id"]: d for d in s.devices()}
    assert devices["dev-1"]["labels"] == {"hw": "rpi5", "canary": "yes"}
    assert (devices["dev-1"]["online"], devices["dev-1"]["agent_version"],
            devices["dev-1"]["first_seen"]) == (True, "0.1", 10.0)
    assert devices["dev-1"]["state"] is None and devices["dev-2"]["labels"] == {}
    with s.engine.connect() as conn:
        rows = conn.execute(text("SELECT seq, kind, body, refused, validation_failed "
                                 "FROM events ORDER BY seq")).all()
        revisions = dict(conn.execute(text("SELECT device_id, revision FROM desired")).all())
    assert [r.seq for r in rows] == list(BODIES)
    for r in rows:  # the body kept whole (now the JSON text), refused computed from it
        assert json.loads(r.body) == BODIES[r.seq][1]
    assert [r.refused for r in rows] == [False, True, False, None]
    assert [bool(r.validation_failed) for r in rows[:3]] == [False, True, True]
    assert [(g.first, g.last) for g in s.seq_gaps()] == []  # 4-5 are the gap record's
    assert revisions == {"dev-1": 3, "dev-2": 1}  # the payload's revision, else 1
    assert s.desired(["dev-1"])[0].model_dump(mode="json") == desired_payload(3)
    assert s.rejection_counts() == {"not JSON": 1}
    assert [(a["subject"], a["evidence"]) for a in s.audit_log()] == [
        ("device:dev-2", {}), ("device:dev-1", {"canary": "yes"})]


def assert_it_works_on(s: Store) -> None:
    """The upgraded store takes what today's code writes."""
    body = RequestEvent(request_id="new", ts=1010.0, variant="v2", latency_s=0.1,
                        prompt_tokens=1, completion_tokens=1)
    batch = TelemetryBatch(device_id="dev-1", sent_at=2000.0, events=[
        TelemetryEvent(boot_epoch=1, seq=10, kind="request", ts=1010.0, body=body)])
    assert s.ingest_batch(batch).inserted == 1 and s.ingest_batch(batch).duplicates == 1
    s.put_desired("dev-1", lambda rev: DesiredPayload.model_validate(
        {**desired_payload(3), "revision": rev}))
    assert s.desired(["dev-1"])[0].revision == 4
    s.set_labels("dev-2", {"canary": "no"})
    s.audit("op", "label", "device:dev-2", {"canary": "no"})


def test_the_original_m001_store_with_data_upgrades_to_latest(
    store_url: str, reference: Engine, blank_database: Callable[[], str],
) -> None:
    engine = create_engine(store_url)
    assert migrate(engine, only("m001_initial")) == ["m001_initial"]
    events = {c["name"]: c for c in inspect(engine).get_columns("events")}
    assert "refusal_ok" in events and "refused" not in events  # m001 as released
    assert "revision" not in {c["name"] for c in inspect(engine).get_columns("desired")}
    fill_m001(engine)
    engine.dispose()

    s = Store(store_url)
    assert s.applied == [n for n in ALL if n != "m001_initial"]
    assert applied(s.engine) == ALL
    assert_as_declared(s.engine, reference)
    assert_as_blank_to_latest(s.engine, blank_database)
    assert_m001_data_survived(s)
    assert_it_works_on(s)
    s.close()


def test_an_m001_m002_store_with_rollouts_upgrades_to_latest(
    store_url: str, reference: Engine, blank_database: Callable[[], str],
) -> None:
    engine = create_engine(store_url)
    assert migrate(engine, only("m001_initial", "m002_rollouts")) == [
        "m001_initial", "m002_rollouts"]
    assert "ix_events_kind_variant_ts" in {i["name"] for i in inspect(engine).get_indexes("events")}
    fill_m001(engine)
    fill_m002(engine)
    engine.dispose()

    s = Store(store_url)
    assert s.applied == ["m001a_columns_changed_without_a_migration",
                         "m003_events_request_signals_index", "m004_dead_letters",
                         "m005_rollout_leases", "m006_request_rollups",
                         "m007_drop_events_device_seq_index"]
    assert_as_declared(s.engine, reference)
    assert_as_blank_to_latest(s.engine, blank_database)
    indexes = {i["name"] for i in inspect(s.engine).get_indexes("events")}
    assert "ix_events_request_signals" in indexes and "ix_events_kind_variant_ts" not in indexes
    assert "ix_events_device_seq" not in indexes  # m007
    assert_m001_data_survived(s)
    with s.engine.connect() as conn:
        rollout = conn.execute(select(schema.rollouts)).one()
        member = conn.execute(select(schema.rollout_devices)).one()
        pin = conn.execute(select(schema.pins)).one()
    assert (rollout.spec, rollout.state, rollout.bake_extensions) == (
        {"variant": "v2", "steps": [10, 50]}, "baking", 1)
    assert (member.device_id, member.role, member.stratum) == ("dev-1", "canary", "hw=rpi5")
    assert (pin.cohort, pin.variant, pin.reason) == ("hw=rpi5", "v1", "rolled back")
    assert_it_works_on(s)
    s.close()


def test_an_m003_store_with_data_gains_the_dead_letters_and_keeps_the_rest(
    store_url: str, reference: Engine, blank_database: Callable[[], str],
) -> None:
    """m004 on a store in the field (m001 → m003, with data): only the new table comes."""
    engine = create_engine(store_url)
    migrate(engine, only("m001_initial"))
    fill_m001(engine)
    migrate(engine, only("m001a_columns_changed_without_a_migration", "m002_rollouts",
                         "m003_events_request_signals_index"))
    assert applied(engine) == ALL[:4]
    assert not inspect(engine).has_table("dead_letters")
    fill_m002(engine)
    tables = storage(engine)
    engine.dispose()

    s = Store(store_url)
    assert s.applied == ["m004_dead_letters", "m005_rollout_leases", "m006_request_rollups",
                         "m007_drop_events_device_seq_index"]
    assert_as_declared(s.engine, reference)
    assert_as_blank_to_latest(s.engine, blank_database)
    after = dict(storage(s.engine))
    assert {t: after[t] for t, _ in tables} == dict(tables)  # nothing else rebuilt
    assert_m001_data_survived(s)
    s.dead_letter("quantfleet/v1/devices/dev-1/telemetry", "dev-1", "IntegrityError: x",
                  '{"seq": NaN}')
    assert [(d["device_id"], d["payload"]) for d in s.dead_letters()] == [
        ("dev-1", '{"seq": NaN}')]
    assert_it_works_on(s)
    s.close()


def storage(engine: Engine) -> list[tuple[Any, ...]]:
    """What changes when a table is rebuilt (SQLite) or rewritten (PostgreSQL)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            query = ("SELECT name, rootpage FROM sqlite_master WHERE type = 'table' "
                     "ORDER BY name")
        else:
            query = ("SELECT relname, relfilenode FROM pg_class WHERE relkind = 'r' "
                     "AND relnamespace = 'public'::regnamespace ORDER BY relname")
        return [tuple(r) for r in conn.execute(text(query))]


def test_an_m004_store_with_a_running_rollout_gains_the_leases_and_keeps_the_rest(
    store_url: str, reference: Engine, blank_database: Callable[[], str],
) -> None:
    """m005 on a store in the field (m001 → m004, with a rollout): only the new table
    comes, empty — the first replica to tick a running rollout takes its lease."""
    engine = create_engine(store_url)
    migrate(engine, only("m001_initial"))
    fill_m001(engine)
    migrate(engine, [(n, fn) for n, fn in MIGRATIONS
                     if n not in ("m005_rollout_leases", "m006_request_rollups",
                                  "m007_drop_events_device_seq_index")])
    assert applied(engine) == ALL[:-3] and ALL[-3] == "m005_rollout_leases"
    fill_m002(engine)
    tables = storage(engine)
    engine.dispose()

    s = Store(store_url)
    assert s.applied == ["m005_rollout_leases", "m006_request_rollups",
                         "m007_drop_events_device_seq_index"]
    assert_as_declared(s.engine, reference)
    assert_as_blank_to_latest(s.engine, blank_database)
    after = dict(storage(s.engine))
    assert {t: after[t] for t, _ in tables} == dict(tables)  # nothing else rebuilt
    assert_m001_data_survived(s)
    with s.engine.connect() as conn:
        assert conn.execute(select(schema.rollout_leases)).all() == []
    from quantfleet.fleet.rollouts.leases import RolloutLeases

    assert RolloutLeases(s, 30, holder="replica-1").hold("r1") == 1
    assert_it_works_on(s)
    s.close()


def test_an_m005_store_with_events_gains_the_rollups_and_its_events_roll_up_once(
    store_url: str, reference: Engine, blank_database: Callable[[], str],
) -> None:
    """m006 on a store in the field: events gains ``txid`` without a rewrite (existing
    rows keep NULL), the rollup tables come empty, and the first roll-up takes the
    events written before it (and only once)."""
    from quantfleet.fleet.store.rollups import roll_up

    engine = create_engine(store_url)
    migrate(engine, only("m001_initial"))
    fill_m001(engine)
    migrate(engine, [(n, fn) for n, fn in MIGRATIONS
                     if n not in ("m006_request_rollups", "m007_drop_events_device_seq_index")])
    assert ALL[-2] == "m006_request_rollups"
    fill_m002(engine)
    with engine.connect() as conn:
        requests = conn.execute(text("SELECT count(*) FROM events WHERE kind = 'request' "
                                     "AND variant IS NOT NULL")).scalar_one()
    tables = storage(engine)
    engine.dispose()

    s = Store(store_url)
    assert s.applied == ["m006_request_rollups", "m007_drop_events_device_seq_index"]
    assert_as_declared(s.engine, reference)
    assert_as_blank_to_latest(s.engine, blank_database)
    after = dict(storage(s.engine))
    assert {t: after[t] for t, _ in tables} == dict(tables)  # events not rewritten
    assert_m001_data_survived(s)
    assert roll_up(s.engine).events == requests
    assert roll_up(s.engine).events == 0
    with s.engine.connect() as conn:
        assert conn.execute(text("SELECT coalesce(sum(requests), 0) FROM request_rollups")
                            ).scalar_one() == requests
    assert_it_works_on(s)
    s.close()


def test_a_store_made_since_766cf72_takes_m001a_as_nothing(
    store_url: str, reference: Engine,
) -> None:
    """A store in the field: m001, m002 and m003 recorded, its tables already in the shape
    m001a makes (m001 then built them from schema.py) — m001a changes nothing in it."""
    s = Store(store_url)
    s.ingest_batch(TelemetryBatch(device_id="dev-1", sent_at=2000.0, events=[
        TelemetryEvent(boot_epoch=1, seq=1, kind="request", ts=1001.0,
                       body=RequestEvent.model_validate(request_body(1, refused=True)))]))
    with s.engine.begin() as conn:
        conn.execute(text("DELETE FROM quantfleet_migrations WHERE name = :n"),
                     {"n": "m001a_columns_changed_without_a_migration"})
        before = conn.execute(text("SELECT id, body, refused FROM events")).all()
    shape, tables = describe(s.engine), storage(s.engine)
    s.close()

    again = Store(store_url)
    assert again.applied == ["m001a_columns_changed_without_a_migration"]
    assert describe(again.engine) == shape
    assert storage(again.engine) == tables  # not rebuilt or rewritten
    with again.engine.connect() as conn:
        assert conn.execute(text("SELECT id, body, refused FROM events")).all() == before
    assert_as_declared(again.engine, reference)
    again.close()


# -- the contract of migrate() ------------------------------------------------------

def test_a_failing_migration_leaves_neither_its_changes_nor_its_record(store_url: str) -> None:
    """DDL first, then rows, then a failure: all of it rolls back (on SQLite, too — pysqlite
    would commit DDL at the start of a transaction by itself)."""
    def m999_fails(conn: Any) -> None:
        conn.execute(text("CREATE TABLE half_done (x INTEGER)"))
        conn.execute(text("INSERT INTO half_done VALUES (1)"))
        conn.execute(text("ALTER TABLE devices ADD COLUMN half_column INTEGER"))
        raise RuntimeError("m999 failed")

    engine = create_engine(store_url)
    with pytest.raises(RuntimeError, match="m999 failed"):
        migrate(engine, [*only("m001_initial"), ("m999_fails", m999_fails)])
    assert applied(engine) == ["m001_initial"]
    insp = inspect(engine)
    assert not insp.has_table("half_done")
    assert "half_column" not in {c["name"] for c in insp.get_columns("devices")}
    engine.dispose()


def test_two_stores_opening_a_blank_database_at_once_apply_each_migration_once(
    store_url: str,
) -> None:
    """Two fleet instances starting together (threads here): one applies each migration,
    the other waits for it and skips it."""
    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def open_store() -> None:
        try:
            start.wait()
            s = Store(store_url)
            results.append(s.applied)
            s.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results[0] + results[1]) == sorted(ALL)  # each applied by exactly one
    engine = create_engine(store_url)
    assert applied(engine) == ALL
    engine.dispose()


def test_an_unknown_migration_name_is_reported(store_url: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    Store(store_url).close()
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO quantfleet_migrations VALUES ('m099_from_the_future', 1)"))
    with caplog.at_level(logging.WARNING, logger="quantfleet.fleet.store.migrations"):
        assert migrate(engine) == []
    assert "m099_from_the_future recorded in the store but unknown" in caplog.text
    engine.dispose()


# -- the backup ---------------------------------------------------------------------

def test_an_existing_sqlite_store_is_backed_up_before_migrating(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    engine = create_engine(f"sqlite:///{db}")
    migrate(engine, only("m001_initial"))
    fill_m001(engine)
    engine.dispose()

    Store(f"sqlite:///{db}").close()
    backup = tmp_path / "fleet.db.bak-m001a_columns_changed_without_a_migration"
    assert sorted(p.name for p in tmp_path.iterdir() if ".bak-" in p.name) == [backup.name]
    old = create_engine(f"sqlite:///{backup}")  # the store as it was before migrating
    assert applied(old) == ["m001_initial"]
    with old.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM events")).scalar_one() == len(BODIES)
    assert "refusal_ok" in {c["name"] for c in inspect(old).get_columns("events")}
    old.dispose()

    Store(f"sqlite:///{db}").close()  # nothing pending: no new copy
    assert sorted(p.name for p in tmp_path.iterdir() if ".bak-" in p.name) == [backup.name]


def test_a_blank_store_is_not_backed_up(tmp_path: Path) -> None:
    Store(f"sqlite:///{tmp_path / 'fleet.db'}").close()
    assert not [p.name for p in tmp_path.iterdir() if ".bak-" in p.name]


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_postgresql_upgrades_say_the_backup_is_the_operators(
    store_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="quantfleet.fleet.store.migrations"):
        Store(store_url).close()  # blank: nothing to back up, nothing said
    assert "pg_dump" not in caplog.text
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM quantfleet_migrations WHERE name = :n"),
                     {"n": "m003_events_request_signals_index"})
    engine.dispose()
    with caplog.at_level(logging.WARNING, logger="quantfleet.fleet.store.migrations"):
        Store(store_url).close()
    assert "applying m003_events_request_signals_index" in caplog.text
    assert "pg_dump" in caplog.text

