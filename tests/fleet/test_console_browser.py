"""The console in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by scripts/services.sh) driven by selenium, against
`quantfleet serve` with 40 simulated devices on a private Mosquitto.

An operator logs in with a token, watches the fleet and its live counts, creates a
rollout from the page, follows its verdicts and aborts it from the page; the store
says it is aborted and the audit trail says who did it. The Signals charts draw the
series and points the store's requests make. No page logs a console error.
Screenshots of each page land in var/test-artifacts/console/ (docs/console/ has
copies: ``QUANTFLEET_CONSOLE_SCREENSHOTS=docs/console`` writes them there too).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.fleet.auth import issue_operator_token, toml_entry
from quantfleet.fleet.simulate import FleetSimulator, parse_class_mix
from quantfleet.fleet.store import Store, schema
from tests.support import Mosquitto

from .test_rollout_classes_e2e import models_dir
from .test_service import Fleet, make_fleet

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "var" / "test-artifacts" / "console"
N_DEVICES = 40

pytestmark = [
    pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed"),
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                       reason="Chromium or chromedriver is not installed (Debian: apt-get "
                       "install chromium chromium-driver; scripts/services.sh does it as root)"),
]


class World:
    def __init__(self, fleet: Fleet, sim: FleetSimulator, store_url: str,
                 tokens: dict[str, str], tmp: Path) -> None:
        self.fleet, self.sim, self.store_url, self.tokens, self.tmp = (
            fleet, sim, store_url, tokens, tmp)

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.fleet.url}/console/api/{path}", params=params, timeout=10,
                      headers={"Authorization": f"Bearer {self.tokens['bob']}"})
        r.raise_for_status()
        return r.json()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    broker = Mosquitto(tmp_path / "broker")
    fleet: Fleet | None = None
    sim: FleetSimulator | None = None
    alice, a = issue_operator_token("alice", ["read", "write"])
    bob, b = issue_operator_token("bob", ["read"])
    reports = tmp_path / "reports"
    reports.mkdir()
    shutil.copy(ROOT / "docs" / "reports" / "starter-ladder.html", reports)
    shutil.copy(ROOT / "docs" / "reports" / "starter-ladder.json", reports)
    broker.start()
    try:
        url = f"mqtt://127.0.0.1:{broker.port}"
        store_url = f"sqlite:///{tmp_path / 'fleet.db'}"
        fleet, root = make_fleet(
            tmp_path, store_url, models_dir(tmp_path / "models"), broker=url,
            extra=f"[http.auth]\noperators = [{toml_entry(a)}, {toml_entry(b)}]\n"
                  f"[rollouts]\ntick_s = 0.5\n[console]\nreports_dir = \"{reports}\"\n")
        fleet.start()
        sim = FleetSimulator(
            MqttConfig(broker=url, topic_root=root), N_DEVICES, baseline="tiny-Q8_0",
            labels=lambda i: {"region": ("eu", "us")[i % 2]}, requests_per_s=2, step_s=0.2,
            seed=5, classes=parse_class_mix("x86-avx512-vnni=0.5,x86-avx2=0.3,arm-dotprod=0.2"))
        sim.start()
        yield World(fleet, sim, store_url, {"alice": alice, "bob": bob}, tmp_path)
    finally:
        if sim is not None:
            sim.stop()
        if fleet is not None:
            fleet.stop()
        broker.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except Exception:  # a page still loading, an element not yet there
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def no_console_errors(driver: Any, page: str) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{page}: console errors {errors}"


def screenshot(driver: Any, name: str) -> None:
    """The whole page (up to 2,400 px high), then the window as it was."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(2400, max(600, int(height))))
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    driver.set_window_size(1400, 1100)
    also = os.environ.get("QUANTFLEET_CONSOLE_SCREENSHOTS")
    if also:
        Path(also).mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / f"{name}.png", Path(also) / f"{name}.png")


SPEC = """name: q4-browser
cohort: "region=eu"
from: Q8_0
to: Q4_K_M
steps: [2, "50%"]
bake_s: 3
max_bake_extensions: 1000
min_samples: 1000000
holdback: "20%"
deadlines: {download_s: 20, preflight_s: 10, activation_s: 10, soak_s: 20}
gates:
  - {metric: validation_failure_rate, tolerance: 0.05}
  - {metric: p95_latency, tolerance: 0.5}
"""


def test_an_operator_follows_and_steers_the_fleet_in_chromium(world: World,
                                                               browser: Any) -> None:
    from selenium.webdriver.common.by import By

    d, url = browser, world.fleet.url
    wait("every simulated device", lambda: world.api("fleet")["total"] == N_DEVICES)
    wait("requests of every device",
         lambda: sum(v["requests"] for v in world.api("signals", window="15m")["variants"])
         > 200)

    # Unauthenticated writes are refused, in the browser as anywhere.
    assert httpx.post(f"{url}/console/api/rollouts", json={"spec": SPEC}).status_code == 401
    r = httpx.post(f"{url}/console/api/rollouts", json={"spec": SPEC},
                   headers={"Authorization": f"Bearer {world.tokens['bob']}"})
    assert r.status_code == 403

    # Log in: the console sends an operator to its login form first.
    d.get(f"{url}/console/fleet")
    assert "/console/login" in d.current_url
    screenshot(d, "login")
    d.find_element(By.NAME, "token").send_keys(world.tokens["alice"])
    d.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait("the fleet page", lambda: d.current_url.endswith("/console/fleet"))
    assert d.find_element(By.ID, "total").text == str(N_DEVICES)
    classes = {row.find_elements(By.TAG_NAME, "td")[0].text
               for row in d.find_elements(By.CSS_SELECTOR, 'table[data-key="class"] tr')}
    assert classes == {"x86-avx512-vnni", "x86-avx2", "arm-dotprod"}
    first = d.find_element(By.ID, "updated").text
    wait("a live refresh", lambda: d.find_element(By.ID, "updated").text != first, 15)
    assert len(d.find_elements(By.CSS_SELECTOR, "#devices tbody tr")) == N_DEVICES
    no_console_errors(d, "fleet")
    screenshot(d, "fleet")
    d.get(f"{url}/console")  # what demo.sh prints, without its slash: the Fleet page
    assert d.current_url == f"{url}/console/"
    assert d.find_element(By.ID, "total").text == str(N_DEVICES)
    d.get(f"{url}/console/fleet?selector=region%3Deu")
    assert d.find_element(By.ID, "total").text == str(N_DEVICES // 2)
    no_console_errors(d, "fleet?selector")

    # Create a rollout from the page.
    d.get(f"{url}/console/rollouts")
    area = d.find_element(By.NAME, "spec")
    area.clear()
    area.send_keys(SPEC)
    d.find_element(By.CSS_SELECTOR, "#create-form button").click()
    wait("the rollout's page", lambda: d.current_url.endswith("/console/rollouts/q4-browser"))
    store = Store(world.store_url)
    try:
        def verdicts() -> list[dict[str, Any]]:
            return [a for a in store.audit_log("rollout:q4-browser", 1000)
                    if a["action"] == "rollout.verdict"]

        wait("two verdicts", lambda: len(verdicts()) >= 2, 90)
        d.get(f"{url}/console/rollouts/q4-browser")
        charts = wait("the verdict charts", lambda: d.execute_script(
            "const c = window.qfCharts; return c['verdict:validation_failure_rate'] && "
            "c['verdict:p95_latency'] && c['verdict:p95_latency'].draws > 0 && c"))
        shown = d.execute_script("return JSON.parse(document.getElementById("
                                 "'rollout-data').textContent).verdicts.length")
        assert shown >= 2
        for gate in ("validation_failure_rate", "p95_latency"):  # the spec's two gates
            chart = charts[f"verdict:{gate}"]
            # One point per verdict; estimate, the interval's two ends, the limit.
            assert chart["points"] == shown and chart["series"] == 4, (gate, chart)
        assert "insufficient" in d.find_element(By.ID, "verdicts").text
        rows = d.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
        assert any("alice" in r.text and "rollout.create" in r.text for r in rows)
        no_console_errors(d, "rollout")
        screenshot(d, "rollout")

        # Abort it from the page.
        d.find_element(By.NAME, "reason").send_keys("browser test")
        d.find_element(By.CSS_SELECTOR, 'button[value="abort"]').click()
        d.switch_to.alert.accept()
        wait("the page to show it aborted",
             lambda: d.find_element(By.ID, "state").text == "aborted", 20)
        with store.engine.connect() as conn:
            state = conn.execute(select(schema.rollouts.c.state).where(
                schema.rollouts.c.id == "q4-browser")).scalar_one()
        assert state == "aborted"
        aborts = [a for a in store.audit_log("rollout:q4-browser")
                  if a["action"] == "rollout.abort"]
        assert [(a["actor"], a["evidence"]["reason"]) for a in aborts] == [
            ("alice", "browser test")]
        no_console_errors(d, "rollout after abort")
        d.get(f"{url}/console/rollouts")
        assert "aborted" in d.find_element(By.CSS_SELECTOR,
                                           'tr[data-rollout="q4-browser"]').text
        no_console_errors(d, "rollouts")
        screenshot(d, "rollouts")

        # Set desired for a cohort from the Fleet page's form.
        d.get(f"{url}/console/fleet")
        form = d.find_element(By.ID, "desired-form")
        sel = form.find_element(By.NAME, "selector")
        sel.clear()
        sel.send_keys("region=us")
        form.find_element(By.NAME, "variant").send_keys("Q4_K_M")
        form.find_element(By.TAG_NAME, "button").click()
        wait("the form's answer", lambda: "desired state set for 20 devices"
             in d.find_element(By.ID, "flash").text, 20)
        us = [p for p in store.desired() if p.variant == "tiny-Q4_K_M"
              and p.rollout_id is None]
        assert len(us) == N_DEVICES // 2
        sets = [a for a in store.audit_log(None, 5000) if a["action"] == "desired.set"
                and a["evidence"]["rollout_id"] is None]
        assert len(sets) == N_DEVICES // 2 and {a["actor"] for a in sets} == {"alice"}
        no_console_errors(d, "fleet after desired")

        # Signals: stop the traffic so the store holds still, then compare the charts
        # with what the store has.
        world.sim.stop()
        count = wait("ingest to settle", lambda: _settled(store), 30)
        d.get(f"{url}/console/signals?window=15m")
        wait("every chart drawn", lambda: d.execute_script(
            "return Object.keys(window.qfCharts).length === 10 && "
            "Object.values(window.qfCharts).every(c => c.draws > 0)"))
        charts = d.execute_script("return window.qfCharts")
        step = 30.0  # 15 minutes in buckets of the smallest nice step giving <= 60 points
        e = schema.events
        now = time.time()
        with store.engine.connect() as conn:
            rows = conn.execute(select(e.c.variant, e.c.ts).where(
                e.c.kind == "request", e.c.ts >= now - 900)).all()
        assert len(rows) == count
        buckets = {math.floor(ts / step) for _, ts in rows}
        per_variant: dict[str, int] = {}
        for v, _ in rows:
            per_variant[v] = per_variant.get(v, 0) + 1
        for key in ("validation_failure", "fallback", "latency_p95_s", "latency_p99_s"):
            assert charts[key]["series"] == 3 * len(per_variant), key  # value + 95 % band
            assert charts[key]["points"] == len(buckets), key
        assert charts["requests"]["series"] == len(per_variant)
        drawn = d.execute_script(
            "const u = window.qfPlots.requests; return Object.fromEntries("
            "u.series.slice(1).map((s, i) => [s.label, u.data[i + 1]"
            ".reduce((a, b) => a + (b || 0), 0)]))")
        assert drawn == per_variant
        # The offline eval's figures of the reports folder, beside the fleet's.
        figures = d.find_elements(By.CSS_SELECTOR, "#eval-figures tbody tr")
        assert [f.text.split()[0] for f in figures] == [
            "smollm2-135m-F16", "smollm2-135m-Q8_0", "smollm2-135m-Q4_K_M", "smollm2-135m-Q2_K"]
        no_console_errors(d, "signals")
        screenshot(d, "signals")

        # A device: fingerprint, labels, update walk, its own signals.
        with store.engine.connect() as conn:  # a canary: it walked an update and back
            rd = schema.rollout_devices
            device = conn.execute(select(rd.c.device_id).where(
                rd.c.rollout_id == "q4-browser", rd.c.role == "canary")).scalars().first()
        assert device is not None
        d.get(f"{url}/console/devices/{device}")
        assert "cpu.class" in d.find_element(By.ID, "labels").text
        assert "cpu_class" in d.find_element(By.ID, "hardware").text
        assert len(d.find_elements(By.CSS_SELECTOR, "#walk tbody tr")) >= 1
        wait("the device's charts", lambda: d.execute_script(
            "return window.qfCharts.latency_p95_s.draws > 0"))
        no_console_errors(d, "device")
        screenshot(d, "device")

        # Eval reports: listed and served.
        d.get(f"{url}/console/reports")
        d.find_element(By.LINK_TEXT, "starter-ladder.html").click()
        wait("the report", lambda: "starter-ladder.html" in d.current_url)
        assert "Q4_K_M" in d.page_source
        # The report is the eval's own file, without an icon link: its /favicon.ico
        # miss is not the console's.
        d.get_log("browser")
        d.get(f"{url}/console/reports")
        no_console_errors(d, "reports")
        screenshot(d, "reports")
    finally:
        store.close()


def _settled(store: Store) -> int | None:
    """The stored request count once it stops growing (the fleet committed the rest)."""
    with store.engine.connect() as conn:
        q = select(func.count()).select_from(schema.events).where(
            schema.events.c.kind == "request")
        a = conn.execute(q).scalar_one()
        time.sleep(1.0)
        b = conn.execute(q).scalar_one()
    return int(b) if a == b else None
