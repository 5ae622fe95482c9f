"""Poison never stops the line (issue 14): a message that is valid by the wire schema but
that the store cannot hold — NaN, an integer over 64 bits, a 3,000-deep payload, a string
longer than its column — is rejected with a counted reason before anything is committed,
on SQLite and PostgreSQL; what the screening misses and the commit refuses is retried
message by message, dead-lettered event by event, and acknowledged. The good messages of
the same group land either way. All through ``apply_messages``, the writer's path."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text

from quantfleet.agent.wire import RequestEvent, device_topic
from quantfleet.fleet.ingest import IngestStats, apply_messages
from quantfleet.fleet.messages import REJECTION_REASONS
from quantfleet.fleet.store import Store

ROOT = "quantfleet/v1"
TS = 1_764_000_000.0  # 24 Nov 2025


def request_body(seq: int, **changes: Any) -> dict[str, Any]:
    body = RequestEvent(request_id=f"r{seq}", ts=TS, variant="smollm2-135m-Q4_K_M",
                        latency_s=0.5, prompt_tokens=10, completion_tokens=5,
                        ).model_dump(mode="json")
    return {**body, **changes}


def ev(seq: int, epoch: int = 1, **changes: Any) -> dict[str, Any]:
    return {"boot_epoch": epoch, "seq": seq, "kind": "request", "ts": TS,
            "body": request_body(seq), **changes}


def batch(device: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema_version": 1, "type": "batch", "device_id": device, "sent_at": TS,
            "historical": False, "events": events}


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()  # NaN and Infinity as Python (and jiter) write them


def telemetry(device: str, doc: Any) -> tuple[str, bytes]:
    return device_topic(device, "telemetry", ROOT), doc if isinstance(doc, bytes) else enc(doc)


def good_stream(device: str, first: int, messages: int, per: int = 4) -> list[tuple[str, bytes]]:
    return [telemetry(device, batch(device, [ev(first + m * per + i) for i in range(per)]))
            for m in range(messages)]


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


# One poison event each, in a batch of its own device; what the store made of it on main
# is in the comment (SQLite / PostgreSQL).
POISON: dict[str, tuple[Any, str]] = {
    # sqlite3.IntegrityError NOT NULL events.ts / stored NaN
    "ts NaN": (batch("bad", [ev(1, ts=math.nan)]), "non_finite"),
    "ts Infinity": (batch("bad", [ev(1, ts=math.inf)]), "non_finite"),
    # a huge integer timestamp: parsed as inf
    "ts 10**400": (enc(batch("bad", [ev(1)])).replace(
        b'"ts": %r' % TS, b'"ts": 1' + b"0" * 400, 1), "non_finite"),
    "ts 1e30": (batch("bad", [ev(1, ts=1e30)]), "out_of_range"),
    # OverflowError binding / bigint out of range
    "seq 2**63": (batch("bad", [ev(2**63)]), "out_of_range"),
    "boot_epoch 2**63": (batch("bad", [ev(1, epoch=2**63)]), "out_of_range"),
    # stored / integer out of range (int4)
    "prompt_tokens 2**40": (batch("bad", [ev(1, body=request_body(1, prompt_tokens=2**40))]),
                            "out_of_range"),
    "latency NaN": (batch("bad", [ev(1, body=request_body(1, latency_s=math.nan))]),
                    "non_finite"),
    # stored, the NaN written as null: a body value no column holds is still checked
    "aggregate latency total NaN": (batch("bad", [ev(1, kind="aggregate", body={
        "type": "aggregate", "variant": "v1", "minute": 0,
        "latency": {"total": math.nan}})]), "non_finite"),
    # stored / value too long for varchar(128)
    "variant 300 chars": (batch("bad", [ev(1, body=request_body(1, variant="x" * 300))]),
                          "too_long"),
    # stored / text fields cannot contain NUL
    "variant with NUL": (batch("bad", [ev(1, body=request_body(1, variant="a\x00b"))]),
                         "nul_in_text"),
    # RecursionError out of the rejection's own classification, on both
    "3000-deep": (deep(3000), "too_deep"),
    "3000-deep in a body": (enc(batch("bad", [ev(1)])).replace(
        b'"tier": "default"', b'"tier": ' + deep(3000), 1), "too_deep"),
    "2 MiB": (enc(batch("bad", [ev(1, body=request_body(1, client="x" * (2 << 20)))])),
              "too_large"),
}


@pytest.mark.parametrize("name", list(POISON))
def test_a_poison_message_is_rejected_and_the_good_ones_of_its_group_land(
        store: Store, name: str) -> None:
    doc, reason = POISON[name]
    good = good_stream("good", 1, 20)
    group = [*good[:10], telemetry("bad", doc), *good[10:]]
    stats = apply_messages(store, group, ROOT)
    assert (stats.events_inserted, stats.rejected, stats.dead_lettered) == (80, {reason: 1}, 0)
    assert store.event_count() == 80 and store.rejection_counts() == {reason: 1}
    assert store.seq_gaps() == []


def test_twenty_one_nan_messages_do_not_halt_ingest(store: Store, fault_record: Any) -> None:
    """Issue 14 as measured on main: 21 NaN messages on another device's topic and good
    messages mixed in, over several groups — every good event is stored."""
    poison = [telemetry("bad", batch("bad", [ev(i, ts=math.nan)])) for i in range(1, 22)]
    good = good_stream("good", 1, 44)
    stream = [m for pair in zip(good, poison + [None] * 23, strict=True) for m in pair if m]
    stats = IngestStats()
    for i in range(0, len(stream), 64):
        apply_messages(store, stream[i:i + 64], ROOT, stats)
    fault_record(f"21 NaN poison messages among good ones ({store.engine.name})",
                 produced=176, stored=store.event_count())
    assert stats.events_inserted == 176 == store.event_count()
    assert stats.rejected == {"non_finite": 21}


def test_a_batch_loses_only_its_unstorable_events(store: Store) -> None:
    doc = batch("d1", [ev(1), ev(2, ts=math.nan), ev(3), ev(4), ev(5)])
    doc["events"][3]["seq"] = 2**64
    stats = apply_messages(store, [telemetry("d1", doc)], ROOT)
    assert stats.events_inserted == 3
    assert stats.rejected == {"non_finite": 1, "out_of_range": 1}
    with store.engine.connect() as conn:
        assert [r[0] for r in conn.execute(text("SELECT seq FROM events ORDER BY seq"))] == [
            1, 3, 5]


def status(device: str, **changes: Any) -> tuple[str, bytes]:
    doc = {"schema_version": 2, "type": "status", "device_id": device, "state": "online",
           "boot_epoch": 1, "reason": "birth", "ts": TS, "agent_version": "0.1",
           "labels": {}, **changes}
    return device_topic(device, "status", ROOT), enc(doc)


def state(device: str, **changes: Any) -> tuple[str, bytes]:
    doc = {"schema_version": 1, "type": "state", "device_id": device, "boot_epoch": 1,
           "variant": "v1", "update_state": "healthy", "ts": TS, **changes}
    return device_topic(device, "state", ROOT), enc(doc)


def test_unstorable_statuses_and_states_are_rejected_whole(store: Store) -> None:
    group = [status("bad", boot_epoch=2**63), status("bad", agent_version="v" * 65),
             status("bad", labels={"hw": "a\x00b"}), status("bad", ts=math.nan),
             state("bad", ts=math.inf), state("bad", variant="x" * 129),
             state("bad", desired_revision=2**70),
             status("ok"), state("ok"), *good_stream("ok", 1, 2)]
    stats = apply_messages(store, group, ROOT)
    assert stats.rejected == {"out_of_range": 2, "too_long": 2, "nul_in_text": 1,
                              "non_finite": 2}
    assert (stats.statuses, stats.states, stats.events_inserted) == (1, 1, 8)
    devices = {d["device_id"]: d for d in store.devices()}
    assert set(devices) == {"ok"}
    assert devices["ok"]["online"] is True and devices["ok"]["variant"] == "v1"


def poison_seq_13(store: Store) -> None:
    """A constraint the screening does not know: the store refuses any event with seq 13
    on the bad device (a trigger), as it would refuse a value some future column cannot hold."""
    with store.engine.begin() as conn:
        if store.dialect == "sqlite":
            conn.execute(text("CREATE TRIGGER poison BEFORE INSERT ON events "
                              "WHEN NEW.seq = 13 AND NEW.device_id = 'bad' "
                              "BEGIN SELECT RAISE(ABORT, 'seq 13'); END"))
        else:
            conn.execute(text(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                "IF NEW.seq = 13 AND NEW.device_id = 'bad' THEN "
                "RAISE EXCEPTION 'seq 13' USING ERRCODE = 'check_violation'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"))
            conn.execute(text("CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW "
                              "EXECUTE FUNCTION poison()"))


def test_a_commit_that_fails_is_retried_one_by_one_and_the_bad_event_dead_lettered(
        store: Store) -> None:
    poison_seq_13(store)
    bad = batch("bad", [ev(12), ev(13, body=request_body(13, latency_s=0.25)), ev(14)])
    group = [*good_stream("good", 1, 10), telemetry("bad", bad), status("good"),
             *good_stream("good", 41, 10)]
    stats = apply_messages(store, group, ROOT)  # returns: the writer acknowledges the group
    assert (stats.events_inserted, stats.dead_lettered, stats.statuses) == (82, 1, 1)
    assert store.event_count() == 82
    with store.engine.connect() as conn:
        assert sorted(r[0] for r in conn.execute(
            text("SELECT seq FROM events WHERE device_id = 'bad'"))) == [12, 14]
    [letter] = store.dead_letters()
    assert (letter["topic"], letter["device_id"]) == (device_topic("bad", "telemetry", ROOT),
                                                       "bad")
    assert "seq 13" in letter["reason"] and "IntegrityError" in letter["reason"]
    assert json.loads(letter["payload"]) == bad["events"][1]  # the event as it was sent
    # Delivered again (a fleet killed before its ack): stored once, dead-lettered again.
    again = apply_messages(store, [telemetry("bad", bad)], ROOT)
    assert (again.events_inserted, again.duplicates, again.dead_lettered) == (0, 2, 1)


def test_a_database_failure_is_not_dead_lettered(tmp_path: Any) -> None:
    """Only the data's fault sends a message to the dead letters: a store that cannot
    write at all fails the group, unacknowledged, to be delivered again."""
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    with s.engine.begin() as conn:
        conn.execute(text("ALTER TABLE events RENAME TO events_gone"))
    with pytest.raises(Exception, match="no such table"):
        apply_messages(s, good_stream("good", 1, 3), ROOT)
    with s.engine.begin() as conn:
        conn.execute(text("ALTER TABLE events_gone RENAME TO events"))
    assert s.dead_letters() == [] and s.event_count() == 0
    s.close()


def test_rejected_messages_cost_one_transaction_per_group_not_one_each(store: Store) -> None:
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    garbage = [telemetry("bad", b"{not json") for _ in range(60)]
    apply_messages(store, garbage + good_stream("good", 1, 4), ROOT)
    assert store.rejection_counts() == {"not_json": 60} and store.event_count() == 16
    assert len(commits) == 2  # the rejections, the telemetry


# -- property: poison mixed into good streams never costs a good event ---------------

_finite = st.floats(allow_nan=False, allow_infinity=False)
_huge_int = st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1))
_bad_number = st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf), _huge_int,
                        st.floats(min_value=1e300, max_value=1e308))
_any_json = st.recursive(st.none() | st.booleans() | st.integers() | _finite | st.text(),
                         lambda c: st.lists(c, max_size=3)
                         | st.dictionaries(st.text(max_size=5), c, max_size=3),
                         max_leaves=10)


@st.composite
def poison_payload(draw: st.DrawFn, seq: int) -> bytes:
    """A message on the bad device's topic that must not cost the good ones anything."""
    what = draw(st.sampled_from(["event", "body", "deep", "huge string", "wrong type",
                                 "garbage"]))
    if what == "deep":
        return deep(draw(st.integers(150, 5000)))
    if what == "garbage":
        return draw(st.one_of(st.binary(max_size=200), _any_json.map(enc)))
    e = ev(seq)
    if what == "event":
        e[draw(st.sampled_from(["ts", "seq", "boot_epoch"]))] = draw(_bad_number)
    elif what == "body":
        field = draw(st.sampled_from(["latency_s", "ts", "prompt_tokens", "status",
                                      "time_to_first_token_s", "tokens_per_second",
                                      "attempt_tokens", "queue_wait_s"]))
        e["body"][field] = draw(_bad_number)
    elif what == "huge string":
        e["body"][draw(st.sampled_from(["variant", "client", "request_id"]))] = draw(
            st.sampled_from(["x" * 129, "x" * 70_000, "nul\x00", "y" * (1 << 20)]))
    else:  # wrong type
        e[draw(st.sampled_from(["ts", "seq", "body", "kind"]))] = draw(_any_json)
    return enc(batch("bad", [e]))


@st.composite
def mixed_stream(draw: st.DrawFn, first: int) -> list[tuple[str, bytes]]:
    good = good_stream("good", first, draw(st.integers(1, 12)), per=3)
    poison = [telemetry("bad", draw(poison_payload(10**6 + first + i)))
              for i in range(draw(st.integers(1, 12)))]
    at = draw(st.lists(st.integers(0, len(good)), min_size=len(poison), max_size=len(poison)))
    out = list(good)
    for pos, p in sorted(zip(at, poison, strict=True), key=lambda x: -x[0]):
        out.insert(pos, p)
    return out


def good_stored(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM events WHERE device_id = 'good'")
                                ).scalar_one())


def run_property(store: Store, data: st.DataObject) -> None:
    had = good_stored(store)  # a store shared by the examples: fresh seqs for each
    stream = data.draw(mixed_stream(had + 1))
    good_events = sum(len(json.loads(p)["events"]) for t, p in stream if "/good/" in t)
    size = data.draw(st.sampled_from([1, 7, 64]))
    stats = IngestStats()
    for i in range(0, len(stream), size):
        apply_messages(store, stream[i:i + size], ROOT, stats)
    assert good_stored(store) - had == good_events, stats
    assert stats.dead_lettered == 0  # the screening caught every one before the commit
    assert set(stats.rejected) <= set(REJECTION_REASONS)
    assert stats.received == len(stream)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large, HealthCheck.too_slow])
@given(data=st.data())
def test_property_poison_never_reduces_the_good_events_stored(tmp_path: Any,
                                                              data: st.DataObject) -> None:
    s = Store(f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}")
    try:
        run_property(s, data)
    finally:
        s.close()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large, HealthCheck.too_slow])
@given(data=st.data())
def test_property_poison_never_reduces_the_good_events_stored_postgresql(
        store: Store, data: st.DataObject) -> None:
    run_property(store, data)
