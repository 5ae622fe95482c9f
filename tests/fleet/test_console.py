"""The console's data, parameters, auth and metrics, in process on a real store (SQLite and
PostgreSQL); tests/fleet/test_console_browser.py drives the same console in Chromium."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.testclient import TestClient

from quantfleet.agent.wire import (
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
)
from quantfleet.fleet.auth import Credentials, HttpAuth, issue_operator_token
from quantfleet.fleet.config import AuthEntries, ConsoleUser
from quantfleet.fleet.console import queries
from quantfleet.fleet.console.app import ConsoleContext, console_mount
from quantfleet.fleet.console.metrics import fleet_metrics
from quantfleet.fleet.console.sessions import (
    COOKIE,
    Sessions,
    hash_password,
    verify_password,
)
from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.rollouts.spec import parse_spec
from quantfleet.fleet.store import Store

NOW = time.time()
VARIANTS = ("tiny-Q8_0", "tiny-Q4_K_M")


def _events(device: str, variant: str, n: int, rng: random.Random, start: float,
            span: float) -> TelemetryBatch:
    evs = []
    for i in range(n):
        ts = start + rng.random() * span
        tools = [ValidationOutcome(kind="tool_call", passed=rng.random() > 0.2)] \
            if rng.random() < 0.3 else []
        body = RequestEvent(
            request_id=f"{device}-{i}", ts=ts, variant=variant,
            status=500 if rng.random() < 0.03 else 200,
            latency_s=rng.lognormvariate(math.log(0.2), 0.5),
            prompt_tokens=rng.randint(10, 90), completion_tokens=rng.randint(5, 40),
            fallback_from="tiny-Q4_K_M" if rng.random() < 0.05 else None,
            validations=[ValidationOutcome(kind="json_schema", passed=rng.random() > 0.1),
                         *tools])
        evs.append(TelemetryEvent(boot_epoch=1, seq=i + 1, kind="request", ts=ts, body=body))
    return TelemetryBatch(device_id=device, sent_at=NOW, events=evs)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    rng = random.Random(7)
    for i in range(6):
        device = f"dev-{i}"
        s.apply_status(StatusPayload(device_id=device, state="online", boot_epoch=1,
                                     reason="birth", ts=NOW,
                                     labels={"region": "eu" if i % 2 else "us"}))
        s.ingest_batch(_events(device, VARIANTS[i % 2], 300, rng, NOW - 3600, 3600))
    yield s
    s.close()


def test_signal_series_matches_the_raw_requests(store: Store) -> None:
    """Each bucket's counts equal a count over the raw events; percentiles are within
    the bin's precision of numpy's over the same requests, inside their interval."""
    step = 600.0
    out = queries.signal_series(store, NOW - 3600, NOW + 1, step)
    raw: dict[tuple[str, int], list[Any]] = {}
    with store.engine.connect() as conn:
        from sqlalchemy import select

        from quantfleet.fleet.store import schema
        e = schema.events
        for r in conn.execute(select(e.c.variant, e.c.ts, e.c.latency_s, e.c.validation_failed,
                                     e.c.tool_call_ok, e.c.fallback, e.c.status)):
            raw.setdefault((r.variant, math.floor(r.ts / step)), []).append(r)
    assert [v["variant"] for v in out["variants"]] == sorted(VARIANTS)
    seen = 0
    for v in out["variants"]:
        for p in v["points"]:
            rows = raw[(v["variant"], round(p["t"] / step))]
            seen += len(rows)
            assert p["requests"] == len(rows)
            assert p["validation_failure"]["k"] == sum(bool(r.validation_failed) for r in rows)
            assert p["fallback"]["k"] == sum(bool(r.fallback) for r in rows)
            assert p["error"]["k"] == sum(r.status >= 400 for r in rows)
            tools = [r.tool_call_ok for r in rows if r.tool_call_ok is not None]
            assert p["tool_call_success"]["n"] == len(tools)
            assert p["tool_call_success"]["k"] == sum(tools)
            low, high = p["validation_failure"]["low"], p["validation_failure"]["high"]
            assert low <= p["validation_failure"]["value"] <= high
            lat = np.array([r.latency_s for r in rows])
            p95 = p["latency_p95_s"]
            assert p95["low"] <= p95["value"] <= p95["high"]
            exact = float(np.quantile(lat, 0.95, method="inverted_cdf"))
            assert abs(p95["value"] / exact - 1) <= queries.GROWTH - 1
    assert seen == sum(len(r) for r in raw.values()) == 1800


def test_quantile_interval_widens_with_fewer_observations() -> None:
    few = {100: 10}
    many = {i: 100 for i in range(50, 150)}
    v, lo, hi = queries.quantile_with_interval(many, 0.95)
    assert lo is not None and hi is not None and v is not None and lo <= v <= hi
    assert hi / lo < queries.GROWTH ** 3  # 10,000 observations: a few bins wide
    assert queries.quantile_with_interval(few, 0.95)[0] == queries.bin_value(100)
    assert queries.quantile_with_interval({}, 0.5) == (None, None, None)


class _Assign:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str, str]] = []

    def __call__(self, ids: Any, variant: str, rollout_id: str) -> None:
        self.calls.append((list(ids), variant, rollout_id))


@pytest.fixture
def console(store: Store) -> Iterator[tuple[TestClient, dict[str, str], Store]]:
    """The console with two operators, alice (read, write) and bob (read), and a login by
    password, carol (write)."""
    alice, a = issue_operator_token("alice", ["read", "write"])
    bob, b = issue_operator_token("bob", ["read"])
    auth = HttpAuth(Credentials(AuthEntries(operators=[a, b])))
    engine = RolloutEngine(store, _Assign(), lambda label: f"tiny-{label}")
    carol = ConsoleUser(name="carol", password_scrypt=hash_password(CAROL), roles=["write"])
    app = Starlette(routes=[console_mount(ConsoleContext(store, engine, None, auth,
                                                         Sessions(3600), users=[carol]))])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, {"alice": alice, "bob": bob}, store


CAROL = "correct horse battery staple"

SPEC = """name: q4
cohort: "region=eu"
from: Q8_0
to: Q4_K_M
steps: [1, "100%"]
"""


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_writes_need_an_operator_with_the_write_role(
        console: tuple[TestClient, dict[str, str], Store]) -> None:
    client, tokens, store = console
    r = client.post("/console/api/rollouts", json={"spec": SPEC})
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    r = client.post("/console/api/rollouts", json={"spec": SPEC}, headers=_bearer("qfo_nope"))
    assert r.status_code == 401
    r = client.post("/console/api/rollouts", json={"spec": SPEC}, headers=_bearer(tokens["bob"]))
    assert r.status_code == 403 and "'bob' lacks the 'write' role" in r.json()["error"]["message"]
    r = client.post("/console/api/rollouts", json={"spec": SPEC},
                    headers=_bearer(tokens["alice"]))
    assert r.status_code == 201, r.text
    assert r.json() == {"id": "q4", "state": "running"}
    r = client.post("/console/api/rollouts/q4/pause", headers=_bearer(tokens["alice"]))
    assert r.json()["state"] == "paused"
    r = client.post("/console/api/rollouts/q4/abort", json={"reason": "testing"},
                    headers=_bearer(tokens["alice"]))
    assert r.json()["state"] == "aborted"
    trail = [(a["actor"], a["action"]) for a in reversed(store.audit_log("rollout:q4"))]
    assert ("alice", "rollout.create") in trail and ("alice", "rollout.pause") in trail
    assert ("alice", "rollout.abort") in trail
    # Reads: every page and endpoint needs an operator too.
    assert client.get("/console/api/fleet").status_code == 401
    assert client.get("/console/fleet", follow_redirects=False).status_code == 303
    assert client.get("/console/api/fleet", headers=_bearer(tokens["bob"])).status_code == 200


def test_a_browser_session_writes_only_with_its_csrf_token(
        console: tuple[TestClient, dict[str, str], Store]) -> None:
    client, tokens, store = console
    r = client.post("/console/login", data={"token": "wrong", "next": "/console/rollouts"})
    assert r.status_code == 401 and COOKIE not in r.cookies
    r = client.post("/console/login", data={"token": tokens["alice"],
                                            "next": "https://evil.example/"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/fleet"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and tokens["alice"] not in cookie
    page = client.get("/console/rollouts").text
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert csrf and csrf.group(1)
    r = client.post("/console/api/rollouts", json={"spec": SPEC})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"]
    r = client.post("/console/api/rollouts", json={"spec": SPEC},
                    headers={"X-CSRF-Token": "not-it"})
    assert r.status_code == 403
    r = client.post("/console/api/rollouts", json={"spec": SPEC},
                    headers={"X-CSRF-Token": csrf.group(1)})
    assert r.status_code == 201, r.text
    assert store.audit_log("rollout:q4")[-1]["actor"] == "alice"
    client.post("/console/logout")
    assert client.get("/console/api/fleet").status_code == 401


@pytest.mark.parametrize(("path", "query", "param"), [
    ("/console/api/fleet", "selector=region==eu", "selector"),
    ("/console/api/fleet", "limit=0", "limit"),
    ("/console/api/fleet", "limit=ten", "limit"),
    ("/console/api/signals", "window=forever", "window"),
    ("/console/api/signals", "window=90d", "window"),
    ("/console/api/signals", "window=7d&step=1", "step"),
    ("/console/api/signals", "selector=a=b,,", "selector"),
    ("/console/api/signals", "variant=../x", "variant"),
    ("/console/api/devices/dev-1", "window=0", "window"),
])
def test_a_bad_query_parameter_is_400_naming_it(
        console: tuple[TestClient, dict[str, str], Store], path: str, query: str,
        param: str) -> None:
    client, tokens, _ = console
    r = client.get(f"{path}?{query}", headers=_bearer(tokens["bob"]))
    assert r.status_code == 400, r.text
    assert f"query parameter {param!r}" in r.json()["error"]["message"]


def test_bad_write_bodies_are_400_naming_the_field(
        console: tuple[TestClient, dict[str, str], Store]) -> None:
    client, tokens, _ = console
    h = _bearer(tokens["alice"])
    r = client.post("/console/api/rollouts", content=b"{not json", headers=h)
    assert r.status_code == 400 and "body: not JSON" in r.json()["error"]["message"]
    r = client.post("/console/api/rollouts", json={"spec": 3}, headers=h)
    assert r.json()["error"]["message"] == "body field 'spec' must be a str"
    r = client.post("/console/api/rollouts", json={"spec": "name: x\nsteps: [1]\n"}, headers=h)
    assert r.status_code == 400 and "spec" in r.json()["error"]["message"]
    r = client.post("/console/api/rollouts/nope/abort", headers=h)
    assert r.status_code == 404
    r = client.post("/console/api/rollouts/nope/explode", headers=h)
    assert r.status_code == 404
    r = client.post("/console/api/pins/unpin", json={"cohort": "*", "variant": "x"}, headers=h)
    assert r.status_code == 404 and "not pinned" in r.json()["error"]["message"]


def test_the_fleet_endpoint_counts_the_selected_devices(
        console: tuple[TestClient, dict[str, str], Store]) -> None:
    client, tokens, _ = console
    body = client.get("/console/api/fleet?selector=region=eu",
                      headers=_bearer(tokens["bob"])).json()
    assert body["total"] == 3
    assert body["counts"]["online"] == {"online": 3}
    assert [d["device_id"] for d in body["devices"]] == ["dev-1", "dev-3", "dev-5"]
    # The whole fleet is counted by the database, the same way.
    whole = client.get("/console/api/fleet?limit=2&offset=1",
                       headers=_bearer(tokens["bob"])).json()
    assert whole["total"] == 6 and whole["counts"]["class"] == {"(unknown)": 6}
    assert whole["counts"]["online"] == {"online": 6}
    assert [d["device_id"] for d in whole["devices"]] == ["dev-1", "dev-2"]
    sig = client.get("/console/api/signals?window=2h&selector=region=eu",
                     headers=_bearer(tokens["bob"])).json()
    assert sig["devices"] == 3
    assert {v["variant"]: v["requests"] for v in sig["variants"]} == {"tiny-Q4_K_M": 900}


def test_metrics_carry_variants_and_rollout_states_but_no_device_ids(store: Store) -> None:
    engine = RolloutEngine(store, _Assign(), lambda label: f"tiny-{label}")
    engine.create(parse_spec(SPEC, "spec"), actor="alice")
    engine.tick()  # step 1: its members join (these devices report no variant: controls)
    members = {m["device_id"]: m["role"] for m in engine.members("q4")}
    assert members
    lines = fleet_metrics(store, now=NOW + 1)
    text = "\n".join(lines)
    assert "dev-" not in text
    requests = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^quantfleet_signal_requests\{variant="([^"]+)"\} (\S+)$', text, re.M)}
    # The last 300 s of requests, as the store has them.
    from sqlalchemy import func, select

    from quantfleet.fleet.store import schema
    e = schema.events
    with store.engine.connect() as conn:
        want = {v: n for v, n in conn.execute(
            select(e.c.variant, func.count()).where(e.c.ts >= NOW + 1 - 300)
            .group_by(e.c.variant))}
    assert requests == {v: float(n) for v, n in want.items()}
    state = engine.get("q4")["state"]  # paused: no device reports running the baseline
    assert f'quantfleet_rollouts{{state="{state}"}} 1' in text
    assert 'quantfleet_rollouts{state="completed"} 0' in text
    assert f'quantfleet_rollout_step{{rollout="q4",state="{state}"' in text
    sides = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^quantfleet_rollout_signal_requests\{rollout="q4",side="([a-z]+)"\} (\S+)$', text,
        re.M)}
    with store.engine.connect() as conn:
        per_device = dict(conn.execute(select(e.c.device_id, func.count()).where(
            e.c.ts >= NOW + 1 - 300).group_by(e.c.device_id)).all())
    assert sides == {side: float(sum(per_device.get(d, 0) for d, r in members.items()
                                     if r == side)) for side in set(members.values())}
    assert re.search(r'^quantfleet_devices\{variant="none",update_state="none",online="true"\} 6$',
                     text, re.M)
    for line in lines:  # Prometheus text: comments, or name{labels} value
        assert line.startswith("# ") or re.fullmatch(r'[a-z_]+\{[^}]*\} \S+', line), line


def test_reports_are_listed_and_served_from_their_folder_only(
        store: Store, tmp_path: Path) -> None:
    import json
    import shutil

    (tmp_path / "ladder.html").write_text("<html>report</html>")
    real = Path(__file__).resolve().parents[2] / "docs" / "reports" / "starter-ladder.json"
    shutil.copy(real, tmp_path / "ladder.json")
    (tmp_path / "broken.html").write_text("<html></html>")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "secret.txt").write_text("no")
    engine = RolloutEngine(store, _Assign(), lambda label: label)
    app = Starlette(routes=[console_mount(ConsoleContext(
        store, engine, None, HttpAuth(None), Sessions(60), reports_dir=tmp_path))])
    with TestClient(app) as client:
        page = client.get("/console/reports").text
        assert 'href="/console/reports/ladder.html"' in page
        assert client.get("/console/reports/ladder.html").text == "<html>report</html>"
        assert client.get("/console/reports/secret.txt").status_code == 404
        assert client.get("/console/reports/..%2Fsecret.txt").status_code == 404
        # The Signals page shows each report variant's golden-set figures.
        page = client.get("/console/signals").text
        for v in json.loads(real.read_text())["report"]["variants"]:
            o = v["overall"]
            assert f"{v['name']}</td>" in page and f"{o['passed']}/{o['n']}" in page
        # No [http.auth]: anyone reads, no one writes.
        assert client.get("/console/api/fleet").status_code == 200
        r = client.post("/console/api/rollouts", json={"spec": SPEC})
        assert r.status_code == 401 and "[http.auth]" in r.json()["error"]["message"]


def test_the_grafana_dashboard_queries_only_series_the_fleet_exports(store: Store) -> None:
    """Every metric packaging/grafana/quantfleet.json names is one /metrics exports, with
    the labels and label values it selects on."""
    import json

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "packaging" / "grafana" / "quantfleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    lines = fleet_metrics(store, now=NOW)  # the window of the seeded events
    exported = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    service = (root / "fleet" / "service.py").read_text()
    for expr in exprs:
        for name in re.findall(r"\bquantfleet_[a-z_]+", expr):
            if name.startswith("quantfleet_ingest_"):
                assert name.removeprefix("quantfleet_ingest_").removesuffix("_total") \
                    in service, name
            else:
                assert name in exported, f"{name} (in {expr!r}) is not exported"
        for signal in re.findall(r'signal="([a-z_]+)"', expr):
            assert signal in queries.RATES, signal
        for q in re.findall(r'quantile="([0-9.]+)"', expr):
            assert float(q) in queries.PERCENTILES.values(), q


def test_the_rollup_answers_as_the_store_does_as_events_arrive(store: Store) -> None:
    """The in-memory rollup (week-long charts) gives what one query over the store gives:
    after its first fill, after more events (folded incrementally, a late one into an
    old bucket), and for the events not yet settled (aggregated afresh, not kept)."""
    # The rollup settles by the time events were received, which is when the fixture
    # stored them (the suite may have run for an hour since NOW was read); the charts'
    # window is the seeded events' time, NOW.
    clock = [time.time() + 120]
    start = clock[0]
    rollup = queries.SignalRollup(store, settle_s=60, clock=lambda: clock[0])

    def same(step: float, variant: str | None = None) -> None:
        end = NOW + 120 + (clock[0] - start)
        want = queries.signal_series(store, end - 7200, end, step, variant=variant)
        got = rollup.series(end - 7200, end, step, variant=variant)
        assert got == want

    same(600)
    same(1800)
    same(3600, variant="tiny-Q8_0")
    mark = rollup.high_water
    assert mark > 0
    rng = random.Random(3)
    # New events, received now (not settled for the rollup: read afresh) ...
    store.ingest_batch(_events("dev-9", "tiny-Q8_0", 50, rng, NOW - 3000, 600),
                       received_at=clock[0])
    same(600)
    assert rollup.high_water == mark
    # ... and once settled, folded in; the late history went to its old buckets.
    clock[0] += 120
    same(600)
    same(1800)
    assert rollup.high_water > mark


def test_a_console_user_logs_in_with_a_password_kept_as_scrypt(
        console: tuple[TestClient, dict[str, str], Store]) -> None:
    client, _, store = console
    encoded = hash_password(CAROL)
    assert encoded.startswith("scrypt$16384$8$1$") and CAROL not in encoded
    assert verify_password(CAROL, encoded) and not verify_password(CAROL + "!", encoded)
    assert not verify_password(CAROL, None)
    r = client.post("/console/login", data={"user": "carol", "password": "wrong"})
    assert r.status_code == 401 and "Wrong name or password" in r.text
    r = client.post("/console/login", data={"user": "mallory", "password": CAROL})
    assert r.status_code == 401
    r = client.post("/console/login", data={"user": "carol", "password": CAROL,
                                            "next": "/console/rollouts"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/rollouts"
    # Write only: the pages need read, the write goes through with the CSRF token.
    assert client.get("/console/rollouts").status_code == 403
    page = client.get("/console/login").text
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert csrf and csrf.group(1)
    r = client.post("/console/api/rollouts", json={"spec": SPEC},
                    headers={"X-CSRF-Token": csrf.group(1)})
    assert r.status_code == 201, r.text
    assert store.audit_log("rollout:q4")[-1]["actor"] == "carol"


def test_the_device_page_shows_the_gaps_its_outbox_reported_and_the_holes_left(
        console: tuple[TestClient, dict[str, str], Store]) -> None:
    from quantfleet.agent.wire import GapRecord

    client, tokens, store = console
    gap = GapRecord(reason="evicted", events=2, counts={"request": 2}, ranges=[(301, 302)])
    late = _events("dev-0", "tiny-Q8_0", 1, random.Random(1), NOW - 10, 1).events[0]
    store.ingest_batch(TelemetryBatch(device_id="dev-0", sent_at=NOW, events=[
        TelemetryEvent(boot_epoch=1, seq=305, kind="request", ts=late.ts, body=late.body),
        TelemetryEvent(boot_epoch=1, seq=306, kind="gap", ts=NOW, body=gap)]))
    body = client.get("/console/api/devices/dev-0", headers=_bearer(tokens["bob"])).json()
    assert [(g["reason"], g["ranges"]) for g in body["reported_gaps"]] == [
        ("evicted", [[301, 302]])]
    assert [(g["first"], g["last"]) for g in body["gaps"]] == [(303, 304)]
    assert [v["variant"] for v in body["signals"]["variants"]] == ["tiny-Q8_0"]
    page = client.get("/console/devices/dev-0", headers=_bearer(tokens["bob"])).text
    assert "evicted" in page and "events 303–304 (2) never arrived" in page
    assert client.get("/console/api/devices/nope",
                      headers=_bearer(tokens["bob"])).status_code == 404


def test_unpinning_removes_the_pin_and_audits_it_on_the_rollout_that_pinned_it(
        console: tuple[TestClient, dict[str, str], Store]) -> None:
    from quantfleet.fleet.store import schema

    client, tokens, store = console
    with store.engine.begin() as conn:  # what a rollback leaves (repository._pin)
        conn.execute(schema.pins.insert().values(cohort="region=eu", variant="tiny-Q2_K",
                                                 rollout_id="q2k", pinned_at=NOW,
                                                 reason="validation_failure_rate failed"))
    body = {"cohort": "region=eu", "variant": "tiny-Q2_K"}
    assert client.post("/console/api/pins/unpin", json=body,
                       headers=_bearer(tokens["bob"])).status_code == 403
    r = client.post("/console/api/pins/unpin", json=body, headers=_bearer(tokens["alice"]))
    assert r.status_code == 200 and r.json()["rollout_id"] == "q2k"
    with store.engine.connect() as conn:
        assert conn.execute(schema.pins.select()).all() == []
    [audit] = store.audit_log("rollout:q2k")
    assert (audit["actor"], audit["action"], audit["evidence"]["variant"]) == (
        "alice", "rollout.unpin", "tiny-Q2_K")
    # No desired-state publisher here: setting desired says so.
    r = client.post("/console/api/desired", json={"selector": "*", "variant": "Q4_K_M"},
                    headers=_bearer(tokens["alice"]))
    assert r.status_code == 409


KEYS = ("a", "b", "cpu.class", "x/y")
VALUES = ("1", "2", "v-3")


@pytest.fixture
def labelled(store_url: str) -> Iterator[Store]:
    """60 devices with random labels over a few keys and values."""
    s = Store(store_url)
    rng = random.Random(11)
    for i in range(60):
        labels = {k: rng.choice(VALUES) for k in KEYS if rng.random() < 0.6}
        s.apply_status(StatusPayload(device_id=f"l-{i:02d}", state="online", boot_epoch=1,
                                     reason="birth", ts=NOW, labels=labels))
    yield s
    s.close()


_term = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: f"!{k}"),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(["=", "!="]),
              st.lists(st.sampled_from(VALUES), min_size=1, max_size=3)).map(
        lambda t: f"{t[0]}{t[1]}{'|'.join(t[2])}"))


# The fixture's devices are read, never changed, by every example.
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(terms=st.lists(_term, min_size=0, max_size=3))
def test_a_selector_in_sql_picks_what_the_selector_picks(labelled: Store,
                                                         terms: list[str]) -> None:
    from quantfleet.fleet.cohorts import Selector

    selector = Selector.parse(",".join(terms) or "*")
    want = sorted(selector.select(labelled.devices(["device_id", "labels"])))
    assert queries.device_ids(labelled, selector) == want
    summary = queries.fleet_summary(labelled, selector, limit=1000)
    assert sorted(d["device_id"] for d in summary["devices"]) == want
    assert summary["total"] == len(want)
