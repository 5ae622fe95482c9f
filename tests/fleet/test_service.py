"""`quantfleet serve` as an operator runs it: a real process, the real broker, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.update.signing import Keyring, generate_keypair, load_public_key
from quantfleet.agent.wire import (
    DesiredPayload,
    HardwareFingerprint,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
    device_topic,
)
from quantfleet.fleet.cli import cli
from tests.support import broker_up, free_port, private_ca

from .test_ingest import publish, wait_for

pytestmark = pytest.mark.skipif(not broker_up(), reason="Mosquitto is not answering on 1883")


class Fleet:
    def __init__(self, config: Path, port: int, ca: Path | None = None) -> None:
        self.config = config
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) \
            if ca else True
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quantfleet.fleet.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise AssertionError(f"fleet exited: {out}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1,
                             verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("fleet did not become healthy")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_fleet(tmp_path: Path, store_url: str, models_dir: Path, *,
               broker: str = "mqtt://127.0.0.1:1883", extra: str = "",
               tls: tuple[Path, Path, Path] | None = None) -> tuple[Fleet, str]:
    """A fleet config in ``tmp_path`` (keys included) on a free port; returns (fleet, root).
    ``tls``: (CA, certificate, key) to serve HTTPS with."""
    root = f"qftest/{uuid.uuid4().hex[:10]}/v1"
    if not (tmp_path / "keys" / "signing.key").exists():
        generate_keypair(tmp_path / "keys")
    port = free_port()
    config = tmp_path / "fleet.toml"
    config.write_text(f"""
[store]
url = "{store_url}"
[mqtt]
broker = "{broker}"
topic_root = "{root}"
[ingest]
client_id = "fleet-{uuid.uuid4().hex[:8]}"
share_group = "g{uuid.uuid4().hex[:8]}"
[artifacts]
models_dir = "{models_dir}"
signing_key = "keys/signing.key"
base_url = "{'https' if tls else 'http'}://127.0.0.1:{port}"
[http]
port = {port}
{f'tls_cert = "{tls[1]}"{chr(10)}tls_key = "{tls[2]}"' if tls else ""}
{extra}
""")
    return Fleet(config, port, tls[0] if tls else None), root


@pytest.fixture
def setup(tmp_path: Path, store_url: str, ladder_dir: Path) -> Iterator[tuple[Fleet, str, Path]]:
    _, pub = generate_keypair(tmp_path / "keys")
    fleet, root = make_fleet(tmp_path, store_url, ladder_dir)
    fleet.start()
    yield fleet, root, pub
    fleet.stop()


def device(name: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", 1883)
    c.loop_start()
    return c


def requests(device_id: str, variant: str, n: int, failing: int) -> TelemetryBatch:
    now = time.time()
    events = []
    for i in range(n):
        body = RequestEvent(
            request_id=f"{device_id}-{i}", ts=now - 60 + i * 0.01, variant=variant,
            latency_s=0.1 * (i % 10 + 1), prompt_tokens=30, completion_tokens=20,
            validations=[ValidationOutcome(kind="json_schema", passed=i >= failing)])
        events.append(TelemetryEvent(boot_epoch=1, seq=i + 1, kind="request", ts=body.ts,
                                     body=body))
    return TelemetryBatch(device_id=device_id, sent_at=now, events=events)


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_an_operator_sees_groups_and_points_the_fleet(setup: tuple[Fleet, str, Path]) -> None:
    fleet, root, pub = setup
    cfg = str(fleet.config)
    dev = device("devices")
    try:
        for i, variant in [(1, "smollm2-135m-Q8_0"), (2, "smollm2-135m-Q8_0"),
                           (3, "smollm2-135m-Q4_K_M")]:
            name = f"dev-{i}"
            publish(dev, device_topic(name, "status", root), StatusPayload(
                device_id=name, state="online", boot_epoch=1, reason="birth",
                ts=time.time()).model_dump_json(), retain=True)
            publish(dev, device_topic(name, "telemetry", root),
                    requests(name, variant, 50, failing=5 * i).model_dump_json())

        def listed() -> list[dict]:  # type: ignore[type-arg]
            return json.loads(run("devices", "list", "--config", cfg, "--json"))

        wait_for(lambda: len(listed()) == 3 and all(d["online"] for d in listed()), 15)
        run("devices", "label", "--config", cfg, "dev-1", "hw=rpi5", "region=eu")
        run("devices", "label", "--config", cfg, "dev-2", "hw=rpi5", "region=us")
        run("devices", "label", "--config", cfg, "dev-3", "hw=jetson", "region=eu")
        cohort = json.loads(run("cohorts", "show", "--config", cfg, "hw=rpi5", "--json"))
        assert cohort["devices"] == ["dev-1", "dev-2"]

        def signal_rows() -> dict[str, Any]:
            sig = json.loads(run("signals", "--config", cfg, "--window", "1h", "--json"))
            return {s["group"]: s for s in sig["variants"]}

        # A device can be listed online before its telemetry is committed: wait for all of it.
        wait_for(lambda: sum(s["requests"] for s in signal_rows().values()) == 150, 15)
        by = signal_rows()
        assert by["smollm2-135m-Q8_0"]["requests"] == 100
        assert by["smollm2-135m-Q8_0"]["validation_failure"]["k"] == 5 + 10
        assert by["smollm2-135m-Q4_K_M"]["validation_failure"]["value"] == pytest.approx(0.3)
        assert by["smollm2-135m-Q4_K_M"]["latency_p50_s"] == pytest.approx(0.55)
        # cost per successful request: 50 tokens per attempt over the successes
        assert by["smollm2-135m-Q4_K_M"]["cost_per_success_tokens"] == pytest.approx(
            50 * 50 / 35)
        # The human table on an 80-column terminal keeps every variant's name whole.
        from quantfleet.fleet.commands import console
        width = console.width
        console.width = 80
        try:
            table = run("signals", "--config", cfg, "--window", "1h")
        finally:
            console.width = width
        assert "smollm2-135m-Q8_0" in table and "smollm2-135m-Q4_K_M" in table, table
        eu = json.loads(run("signals", "--config", cfg, "--cohort", "region=eu", "--json"))
        assert {s["group"]: s["requests"] for s in eu["variants"]} == {
            "smollm2-135m-Q8_0": 50, "smollm2-135m-Q4_K_M": 50}

        http = httpx.get(f"{fleet.url}/v1/devices", params={"selector": "hw=rpi5"}).json()
        assert [d["device_id"] for d in http["devices"]] == ["dev-1", "dev-2"]
        assert httpx.get(f"{fleet.url}/v1/devices",
                         params={"selector": "hw=="}).status_code == 400

        out = run("desired", "set", "--config", cfg, "--cohort", "hw=rpi5", "--variant",
                  "Q4_K_M")
        assert "dev-1: smollm2-135m-Q4_K_M (revision 1)" in out

        # The fleet restarts after the broker lost the retained messages: it re-publishes.
        fleet.stop()
        for name in ("dev-1", "dev-2"):
            publish(dev, device_topic(name, "desired", root), b"", retain=True)
        fleet.start()
        got: dict[str, DesiredPayload] = {}
        seen = threading.Event()

        def on_message(c, u, msg):  # type: ignore[no-untyped-def]
            if msg.payload:
                p = DesiredPayload.model_validate_json(msg.payload)
                got[p.device_id] = p
                if len(got) == 2:
                    seen.set()

        dev.on_message = on_message
        dev.subscribe(f"{root}/devices/+/desired", qos=1)
        assert seen.wait(10)
        for p in got.values():
            assert p.variant == "smollm2-135m-Q4_K_M" and p.revision == 1
            Keyring(load_public_key(pub)).verify_desired(p.model_dump(mode="json"), p.signature)
        manifest = httpx.get(got["dev-1"].url + "/manifest").json()
        assert manifest["sha256"] == got["dev-1"].sha256
    finally:
        for name in ("dev-1", "dev-2", "dev-3"):
            for leaf in ("status", "desired"):
                publish(dev, device_topic(name, leaf, root), b"", retain=True)
        dev.disconnect()
        dev.loop_stop()


def _fingerprint(cpu_model: str, features: list[str]) -> HardwareFingerprint:
    from quantfleet.agent.wire import cpu_class

    return HardwareFingerprint(
        arch="x86_64", cpu_model=cpu_model, features=features,
        cpu_class=cpu_class("x86_64", features), logical_cores=2, memory_bytes=8 << 30,
        llama_cpp_system_info="CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 |",
        llama_cpp_python="0.3.36", onnxruntime="1.31.1")


EPYC = _fingerprint("AMD EPYC 7B13", ["avx", "avx2", "bmi2", "f16c", "fma", "sse4_2"])
SAPPHIRE = _fingerprint("Intel Xeon Platinum 8481C", [
    "amx_int8", "amx_tile", "avx", "avx2", "avx512_vnni", "avx512bw", "avx512f", "avx512vl",
    "avx_vnni", "bmi2", "f16c", "fma", "sse4_2"])


def test_devices_cohorts_and_signals_by_hardware_class(setup: tuple[Fleet, str, Path]) -> None:
    """Births with fingerprints: the class in `devices list`, cpu.* selectors everywhere,
    `signals --by cpu.class`, labels an operator cannot override, and the read API."""
    fleet, root, _ = setup
    cfg = str(fleet.config)
    dev = device("hw")
    names = ("avx2-1", "amx-1", "old-1")
    try:
        for name, hw, variant, failing in [("avx2-1", EPYC, "smollm2-135m-Q8_0", 10),
                                           ("amx-1", SAPPHIRE, "smollm2-135m-Q8_0", 0),
                                           ("old-1", None, "smollm2-135m-Q4_K_M", 5)]:
            publish(dev, device_topic(name, "status", root), StatusPayload(
                device_id=name, state="online", boot_epoch=1, reason="birth", ts=time.time(),
                labels={"region": "eu"}, hardware=hw).model_dump_json(), retain=True)
            publish(dev, device_topic(name, "telemetry", root),
                    requests(name, variant, 50, failing=failing).model_dump_json())

        def listed(*selector: str) -> list[dict]:  # type: ignore[type-arg]
            return json.loads(run("devices", "list", "--config", cfg, "--json", *selector))

        wait_for(lambda: len(listed()) == 3 and all(d["online"] for d in listed())
                 and sum(json.loads(run("signals", "--config", cfg, "--json"))["variants"][i]
                         ["requests"] for i in range(2)) == 150, 15)
        by_id = {d["device_id"]: d for d in listed()}
        assert HardwareFingerprint.model_validate(by_id["avx2-1"]["hardware"]) == EPYC
        assert by_id["avx2-1"]["labels"] == {"region": "eu", "cpu.arch": "x86_64",
                                             "cpu.class": "x86-avx2", "cpu.vnni": "false",
                                             "cpu.avx512": "false"}
        assert by_id["amx-1"]["labels"]["cpu.class"] == "x86-amx"
        assert by_id["old-1"]["hardware"] == {} and "cpu.class" not in by_id["old-1"]["labels"]

        def ids(selector: str) -> list[str]:
            return [d["device_id"] for d in listed("--selector", selector)]

        assert ids("cpu.class=x86-avx2") == ["avx2-1"]
        assert ids("cpu.vnni=false") == ["avx2-1"]
        assert ids("cpu.vnni=true,region=eu") == ["amx-1"]
        assert ids("cpu.class=x86-avx2|x86-amx") == ["amx-1", "avx2-1"]
        assert ids("!cpu.class") == ["old-1"]
        from quantfleet.fleet.commands import console
        width = console.width
        console.width = 200
        try:
            table = run("devices", "list", "--config", cfg)
        finally:
            console.width = width
        assert "hardware" in table and "x86-avx2" in table and "x86-amx" in table, table
        # In an 80-column terminal the other columns fold; a device ID never splits.
        console.width = 80
        try:
            narrow = run("devices", "list", "--config", cfg)
        finally:
            console.width = width
        for word in ("avx2-1", "amx-1", "old-1"):
            assert word in narrow, narrow

        # An operator's labels replace the device's, but not the facts derived from its
        # hardware: a clashing cpu.* label is refused with a word why.
        result = CliRunner().invoke(cli, ["devices", "label", "--config", cfg, "avx2-1",
                                          "hw=epyc", "cpu.class=x86-amx"])
        assert result.exit_code == 0, result.output
        assert "cpu.class=x86-amx not set: cpu.class is derived from the device's hardware " \
               "(x86-avx2)" in result.stderr
        labels = {d["device_id"]: d["labels"] for d in listed()}["avx2-1"]
        assert labels["hw"] == "epyc" and labels["cpu.class"] == "x86-avx2"
        assert "region" not in labels  # replaced, as `devices label` always did

        cohort = json.loads(run("cohorts", "show", "--config", cfg, "cpu.avx512=false",
                                "--json"))
        assert cohort["devices"] == ["avx2-1"]
        assert cohort["hardware_classes"] == {"x86-avx2": 1}
        everyone = run("cohorts", "show", "--config", cfg, "*")
        assert "hardware: - 1, x86-amx 1, x86-avx2 1" in everyone

        sig = json.loads(run("signals", "--config", cfg, "--by", "cpu.class", "--json"))
        assert sig["by"] == ["cpu.class"]
        rows = {(s["group"], s["by"]["cpu.class"]): s for s in sig["variants"]}
        assert set(rows) == {("smollm2-135m-Q8_0", "x86-amx"), ("smollm2-135m-Q8_0", "x86-avx2"),
                             ("smollm2-135m-Q4_K_M", "-")}
        assert rows[("smollm2-135m-Q8_0", "x86-avx2")]["validation_failure"]["k"] == 10
        assert rows[("smollm2-135m-Q8_0", "x86-amx")]["validation_failure"]["k"] == 0
        assert rows[("smollm2-135m-Q8_0", "x86-amx")]["requests"] == 50
        only = json.loads(run("signals", "--config", cfg, "--cohort", "cpu.class=x86-avx2",
                              "--json"))
        assert [(s["group"], s["requests"]) for s in only["variants"]] == [
            ("smollm2-135m-Q8_0", 50)]
        two = json.loads(run("signals", "--config", cfg, "--by", "cpu.vnni", "--by", "hw",
                             "--json"))
        assert {(s["by"]["cpu.vnni"], s["by"]["hw"]) for s in two["variants"]} == {
            ("false", "epyc"), ("true", "-"), ("-", "-")}
        width = console.width
        console.width = 200
        try:
            table = run("signals", "--config", cfg, "--by", "cpu.class")
        finally:
            console.width = width
        assert "cpu.class" in table and "x86-avx2" in table and "x86-amx" in table, table
        bad = CliRunner().invoke(cli, ["signals", "--config", cfg, "--by", "cpu class"])
        assert bad.exit_code == 2 and "'cpu class' is not a label key" in bad.output

        http = httpx.get(f"{fleet.url}/v1/devices",
                         params={"selector": "cpu.class=x86-amx"}).json()
        assert [d["device_id"] for d in http["devices"]] == ["amx-1"]
        assert HardwareFingerprint.model_validate(http["devices"][0]["hardware"]) == SAPPHIRE
        http = httpx.get(f"{fleet.url}/v1/signals", params={"by": "cpu.class"}).json()
        assert {(s["group"], s["by"]["cpu.class"]) for s in http["variants"]} == set(rows)
        assert httpx.get(f"{fleet.url}/v1/signals", params={"by": "a b"}).status_code == 400
    finally:
        for name in names:
            publish(dev, device_topic(name, "status", root), b"", retain=True)
        dev.disconnect()
        dev.loop_stop()


def test_sigterm_runs_the_shutdown_and_exits_0(tmp_path: Path, store_url: str,
                                               ladder_dir: Path) -> None:
    """systemd's stop: the fleet closes its sessions and store, then exits 0 (not 143)."""
    fleet, _ = make_fleet(tmp_path, store_url, ladder_dir)
    fleet.start()
    assert fleet.proc is not None
    try:
        fleet.proc.send_signal(signal.SIGTERM)
        out, _ = fleet.proc.communicate(timeout=30)
    finally:
        fleet.stop()
    text = out.decode()
    assert fleet.proc.returncode == 0, text
    assert "quantfleet serve: stopped (ingest and publisher disconnected, store closed)" \
        in text, text


def test_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text('[store]\nurl = "mysql://x"\n[http]\nport = 99999\nsurprise = 1\n')
    result = CliRunner().invoke(cli, ["devices", "list", "--config", str(bad)])
    assert result.exit_code == 1
    assert "store.url: Value error, must start with sqlite:/// or postgresql" in result.output
    assert "http.port" in result.output and "http.surprise" in result.output


def test_poison_on_one_device_neither_stops_serve_nor_comes_back_after_a_restart(
        tmp_path: Path) -> None:
    """Issue 14 as measured: 21 NaN messages on another device's topic stopped ingest for
    good, restarts included. Now `quantfleet serve` rejects them (counted in /healthz),
    dead-letters what its store refuses at commit, stores every good event, and after a
    restart on the same persistent session nothing of it is delivered again."""
    from sqlalchemy import create_engine, text

    models = tmp_path / "models"
    models.mkdir()
    db = tmp_path / "fleet.db"
    fleet, root = make_fleet(tmp_path, f"sqlite:///{db}", models)
    fleet.start()

    def raw(device_id: str, seq: int, ts: float) -> str:
        body = RequestEvent(request_id=f"{device_id}-{seq}", ts=time.time(),
                            variant="v1").model_dump(mode="json")
        return json.dumps({"schema_version": 1, "type": "batch", "device_id": device_id,
                           "sent_at": time.time(), "events": [
                               {"boot_epoch": 1, "seq": seq, "kind": "request", "ts": ts,
                                "body": body}]})

    def stats() -> dict[str, Any]:
        return dict(httpx.get(f"{fleet.url}/healthz", timeout=5).json()["stats"])

    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:  # a refusal the screening cannot know of
        conn.execute(text("CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.seq = 99 "
                          "BEGIN SELECT RAISE(ABORT, 'seq 99'); END"))
    dev = device("poison")
    try:
        for i in range(1, 22):
            publish(dev, device_topic("bad", "telemetry", root), raw("bad", i, math.nan))
            publish(dev, device_topic("good", "telemetry", root), raw("good", i, time.time()))
        publish(dev, device_topic("bad", "telemetry", root), raw("bad", 99, time.time()))
        wait_for(lambda: stats()["events_inserted"] == 21 and stats()["dead_lettered"] == 1, 20)
        assert stats()["rejected"] == {"non_finite": 21}
        # The same counters for Prometheus, and per device for the operator.
        metrics = httpx.get(f"{fleet.url}/metrics", timeout=5).text
        assert 'quantfleet_ingest_rejected_total{reason="non_finite"} 21' in metrics
        assert "quantfleet_ingest_dead_lettered_total 1" in metrics
        assert "quantfleet_ingest_events_inserted_total 21" in metrics
        shown = CliRunner().invoke(cli, ["devices", "show", "bad", "--config",
                                         str(fleet.config), "--json"])
        assert shown.exit_code == 0, shown.output
        bad = json.loads(shown.output)
        assert bad["rejected"] == {"non_finite": 21} and bad["dead_lettered"] == 1
        good_shown = CliRunner().invoke(cli, ["devices", "show", "good", "--config",
                                              str(fleet.config)])
        assert good_shown.exit_code == 0, good_shown.output
        assert "rejected" in good_shown.output and "none" in good_shown.output
        unknown = CliRunner().invoke(cli, ["devices", "show", "nobody", "--config",
                                           str(fleet.config)])
        assert unknown.exit_code == 1 and "no device 'nobody'" in unknown.output
        fleet.stop()
        fleet.start()
        publish(dev, device_topic("good", "telemetry", root), raw("good", 22, time.time()))
        wait_for(lambda: stats()["events_inserted"] == 1, 20)
        time.sleep(0.5)
        assert stats()["rejected"] == {} and stats()["dead_lettered"] == 0  # all acknowledged
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM events WHERE device_id = 'good'")
                                ).scalar_one() == 22
            assert conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one() == 1
    finally:
        dev.loop_stop()
        dev.disconnect()
        fleet.stop()
        engine.dispose()


def test_with_http_auth_reads_need_an_operator_and_artifacts_a_device(
        tmp_path: Path, ladder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[http.auth] in fleet.toml and a device credential from $CREDENTIALS_DIRECTORY, as
    systemd's LoadCredential= gives it: every read endpoint is 401 without or with a bad
    token, 403 for an operator without the read role, 200 for one with it; /healthz stays
    open and names no device; artifacts want the device's credential."""
    from quantfleet.fleet.auth import issue_device_credential, issue_operator_token, toml_entry

    reader, reader_entry = issue_operator_token("alice", ["read"])
    writer, writer_entry = issue_operator_token("bob", ["write"])
    device_token, device_entry = issue_device_credential("kiosk-17")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "quantfleet-http-auth").write_text(f"devices = [{toml_entry(device_entry)}]\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    fleet, _ = make_fleet(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}", ladder_dir, extra=f"""
[http.auth]
operators = [{toml_entry(reader_entry)}, {toml_entry(writer_entry)}]
""")
    assert reader not in fleet.config.read_text()  # only hashes in the config
    fleet.start()
    try:
        for path in ("/v1/devices", "/v1/signals", "/v1/desired", "/metrics"):
            url = fleet.url + path
            none = httpx.get(url)
            assert none.status_code == 401 and none.headers["www-authenticate"].startswith(
                "Bearer"), path
            assert httpx.get(url, headers={"Authorization": "Bearer qfo_wrong"}
                             ).status_code == 401, path
            assert httpx.get(url, headers={"Authorization": f"Bearer {writer}"}
                             ).status_code == 403, path
            assert httpx.get(url, headers={"Authorization": f"Bearer {device_token}"}
                             ).status_code == 403, path
            ok = httpx.get(url, headers={"Authorization": f"Bearer {reader}"})
            assert ok.status_code == 200, (path, ok.text)
        health = httpx.get(f"{fleet.url}/healthz")
        assert health.status_code == 200
        assert "unacknowledged" not in health.json()["desired"]  # device ids and errors
        assert "devices" in health.json()["desired"]  # the counts stay
        assert health.json()["rollouts"]["leads"] == 0  # how many, not which
        full = httpx.get(f"{fleet.url}/healthz", headers={"Authorization": f"Bearer {reader}"})
        assert "unacknowledged" in full.json()["desired"]
        assert full.json()["rollouts"]["leads"] == {}
        manifest = f"{fleet.url}/v1/artifacts/smollm2-135m-Q2_K/manifest"
        assert httpx.get(manifest).status_code == 401
        assert httpx.get(manifest, headers={"Authorization": f"Bearer {reader}"}
                         ).status_code == 403
        got = httpx.get(manifest, headers={"Authorization": f"Bearer {device_token}"})
        assert got.status_code == 200 and got.json()["variant"] == "smollm2-135m-Q2_K"
    finally:
        fleet.stop()
    assert fleet.proc is not None and fleet.proc.stdout is not None
    log = fleet.proc.stdout.read().decode()
    assert "HTTP authentication on: 2 operator token(s), 1 device credential(s)" in log, log
    assert reader not in log and device_token not in log
    assert "refused GET /v1/devices: operator bob lacks the read role" in log, log


def test_serving_off_loopback_without_auth_or_tls_is_a_warning(tmp_path: Path,
                                                        ladder_dir: Path) -> None:
    fleet, _ = make_fleet(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}", ladder_dir,
                          extra='host = "0.0.0.0"')
    fleet.start()
    fleet.stop()
    assert fleet.proc is not None and fleet.proc.stdout is not None
    log = fleet.proc.stdout.read().decode()
    assert "HTTP authentication off" in log
    assert "WARNING:  quantfleet.fleet.service: serving HTTP on 0.0.0.0 without " \
           "authentication" in log, log
    # With authentication but without TLS, the tokens would cross the network in clear.
    clear, _ = make_fleet(tmp_path / "clear", f"sqlite:///{tmp_path / 'c.db'}", ladder_dir,
                          extra='host = "0.0.0.0"\n[http.auth]\n')
    clear.start()
    clear.stop()
    assert clear.proc is not None and clear.proc.stdout is not None
    log = clear.proc.stdout.read().decode()
    assert "HTTP authentication on: 0 operator token(s), 0 device credential(s)" in log, log
    assert "serving HTTP on 0.0.0.0 without TLS: tokens and credentials cross the network " \
           "in clear" in log, log
    quiet, _ = make_fleet(tmp_path / "loopback", f"sqlite:///{tmp_path / 'l.db'}", ladder_dir)
    quiet.start()
    quiet.stop()
    assert quiet.proc is not None and quiet.proc.stdout is not None
    assert "without authentication" not in quiet.proc.stdout.read().decode()


def test_over_https_a_device_downloads_with_its_credential_and_the_fleet_ca(
        tmp_path: Path, ladder_dir: Path, catalog: Any) -> None:
    """[http] tls_cert/tls_key with a private CA: the artifact URL in a desired state is
    https://, and a device that trusts the CA ([update] ca_file) and sends its credential
    downloads and verifies the file; one that does not trust it is refused by TLS."""
    from quantfleet.agent.update.download import DownloadError, download
    from quantfleet.fleet.auth import issue_device_credential, toml_entry

    ca, cert, key = private_ca(tmp_path)
    token, entry = issue_device_credential("kiosk-17")
    fleet, _ = make_fleet(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}", ladder_dir,
                          tls=(ca, cert, key), extra=f"""
[http.auth]
devices = [{toml_entry(entry)}]
""")
    fleet.start()
    try:
        v = catalog.resolve("Q2_K")
        head = {"Authorization": f"Bearer {token}"}
        manifest = httpx.get(f"{fleet.url}/v1/artifacts/{v.name}/manifest", headers=head,
                             verify=fleet.verify).json()
        assert manifest["url"].startswith("https://127.0.0.1:")
        with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            download(manifest["url"], tmp_path / "a.gguf", sha256=v.sha256,
                     size_bytes=v.size_bytes, token=token)
        result = download(manifest["url"], tmp_path / "b.gguf", sha256=v.sha256,
                          size_bytes=v.size_bytes, token=token, ca_file=ca)
        assert result.bytes_fetched == v.size_bytes
        with pytest.raises(DownloadError, match="HTTP 401"):
            download(manifest["url"], tmp_path / "c.gguf", sha256=v.sha256,
                     size_bytes=v.size_bytes, ca_file=ca)
    finally:
        fleet.stop()
    assert fleet.proc is not None and fleet.proc.stdout is not None
    log = fleet.proc.stdout.read().decode()
    assert "HTTPS authentication on: 0 operator token(s), 1 device credential(s)" in log, log
