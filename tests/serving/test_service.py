"""The agent as a service: `serve` and `config check`, systemd readiness, watchdog, SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from quantfleet.agent.cli import cli
from quantfleet.agent.config import AgentConfig, UpdateConfig, load_config, reference_markdown

from .conftest import AGENT_BIN, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "packaging" / "agent.example.toml"
UNIT = ROOT / "packaging" / "quantfleet-agent.service"


def write_config(path: Path, ladder_dir: Path, **extra: str) -> Path:
    text = f'[models]\ndir = "{ladder_dir}"\nactive = "Q4_K_M"\nfallback = ""\nn_ctx = 1024\n'
    for section, body in extra.items():
        text += f"[{section}]\n{body}\n"
    path.write_text(text)
    return path


# -- configuration ------------------------------------------------------------------------

def test_example_config_is_valid_and_checks_against_the_built_ladder(
        ladder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(EXAMPLE)
    assert config.listen.host == "127.0.0.1"
    monkeypatch.setenv("QUANTFLEET_MODELS_DIR", str(ladder_dir))
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "ok (device" in result.output and "active Q4_K_M, fallback Q8_0" in result.output


@pytest.mark.parametrize(("toml", "message"), [
    ("[listen]\nprot = 1\n", "listen.prot: unknown option"),
    ("[listen]\nport = \"http\"\n", "listen.port: Input should be a valid integer"),
    ("[listen]\nport = 70000\n", "listen.port: Input should be less than or equal to 65535"),
    ("[budgets]\ndefault_max_tokens = 900\n", "default_max_tokens must not exceed"),
    ("[validation]\nrefusal_patterns = [\"(\"]\n", "is not a regular expression"),
    ("[validation]\nfallback_on = [\"vibes\"]\n", "validation.fallback_on.0"),
    ("[routing]\ntiers = { gold = \"active\" }\n", "must define a 'default' tier"),
    ("[device]\nid = \"has space\"\n", "device.id: String should match pattern"),
    ("this is = not toml [", "not valid TOML"),
])
def test_bad_config_is_one_clear_error(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    for args in (["config", "check"], ["serve"]):
        result = CliRunner().invoke(cli, [*args, "--config", str(path)])
        assert result.exit_code == 1, result.output
        assert message in result.output, result.output
        assert result.output.count("Error:") == 1


def test_config_check_names_a_missing_variant(tmp_path: Path, ladder_dir: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[models]\ndir = "{ladder_dir}"\nactive = "Q4_K_M"\nfallback = "Q9_9"\n')
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == 1 and "no variant 'Q9_9'" in result.output


def test_config_reference_is_generated_from_the_model() -> None:
    """docs/config.md drifts from AgentConfig -> regenerate it (see its first lines)."""
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown()
    for section, field in AgentConfig.model_fields.items():
        assert field.description, section
        if section == "telemetry":
            continue  # the telemetry path's own config, documented and tested in its area
        model = UpdateConfig if section == "update" else field.annotation
        tables = [(section, model)]
        while tables:  # a table and the tables inside it ([update.soak])
            where, table = tables.pop()
            for name, f in table.model_fields.items():  # type: ignore[union-attr]
                assert f.description, f"{where}.{name} has no description"
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                    tables.append((f"{where}.{name}", f.annotation))
    assert "## [update.preflight]" in reference_markdown()
    assert "## [update.soak]" in reference_markdown()


def test_api_doc_mentions_every_endpoint_and_extension() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    for needle in ("POST /v1/chat/completions", "GET /v1/models", "GET /healthz",
                   "GET /metrics", "Retry-After", "X-Quantfleet-Tier", "bench/bench_api.py",
                   "prepare(", "complete("):
        assert needle in text, needle


# -- systemd ------------------------------------------------------------------------------

def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = UNIT.read_text()
    for needle in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "ExecStartPre=/opt/quantfleet/bin/quantfleet-agent "
                   "config check"):
        assert needle in unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    # Verify checks that ExecStart exists: point it at this checkout's installed command.
    local = tmp_path / "quantfleet-agent.service"
    local.write_text(unit.replace("/opt/quantfleet/bin", str(AGENT_BIN.parent)))
    proc = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "quantfleet-agent.service" not in proc.stderr, proc.stderr


class NotifySocket:
    """What systemd would receive on $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(needle in m for m in self.messages):
                return
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        raise AssertionError(f"{needle!r} not received; got {self.messages}")

    def count(self, needle: str) -> int:
        return sum(needle in m for m in self.messages)


def test_a_notification_socket_nobody_reads_never_blocks_the_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that stopped reading (systemd busy, a test done with its socket) fills
    the datagram queue; the notifier then drops and counts instead of blocking the event
    loop it runs on (which stalled a stream mid-drain before)."""
    from quantfleet.agent.serving.systemd import Notifier

    notify = NotifySocket(tmp_path / "full.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    notifier = Notifier()
    sent = 200
    worker = threading.Thread(target=lambda: [notifier.notify(f"WATCHDOG=1\nSTATUS={i}")
                                              for i in range(sent)], daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "notify blocked on a full socket"
    assert notifier.dropped > 0
    received = 0
    notify.sock.setblocking(False)
    while True:
        try:
            notify.sock.recv(4096)
        except BlockingIOError:
            break
        received += 1
    assert received + notifier.dropped == sent and received > 0
    notifier.notify("STOPPING=1")  # the queue has room again: sent, not dropped
    assert notify.sock.recv(4096) == b"STOPPING=1"


def test_ready_after_load_watchdog_and_graceful_sigterm(tmp_path: Path, ladder_dir: Path,
                                                        spawn: Any) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    events = tmp_path / "events.jsonl"
    config = write_config(tmp_path / "agent.toml", ladder_dir,
                          concurrency="drain_timeout_s = 300.0",
                          events=f'events_file = "{events}"')
    port = free_port()
    proc = spawn(config, "--port", str(port), "--host", "127.0.0.1",
                 env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    url = f"http://127.0.0.1:{port}"
    notify.wait_for("READY=1", 120)
    assert httpx.get(url + "/healthz").json()["status"] == "ready", "READY=1 only when loaded"
    notify.wait_for("WATCHDOG=1", 5)
    time.sleep(0.5)
    notify.wait_for("WATCHDOG=1", 5)
    assert notify.count("WATCHDOG=1") >= 2

    # A stream is in flight when SIGTERM arrives: it must finish, then the agent exits 0.
    lines: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        body = {"model": "default", "max_tokens": 24, "stream": True,
                "messages": [{"role": "user", "content": "Describe the moon."}]}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: {"):
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", 10)
    with pytest.raises(httpx.HTTPError):
        # The listener is closed at once: new requests cannot get in.
        r = httpx.post(url + "/v1/chat/completions", timeout=5,
                       json={"messages": [{"role": "user", "content": "hi"}]})
        if r.status_code == 503:
            raise httpx.HTTPError("refused with 503")
    reader.join(300)
    code = proc.wait(300)
    log = proc.stdout.read() if proc.stdout else ""
    assert [x for x in lines if x][-1] == "data: [DONE]", (lines[-3:], log)
    assert code == 0, log
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    assert recorded[-1]["stream"] is True and recorded[-1]["status"] == 200
    assert recorded[-1]["finish_reason"] in ("stop", "length")


def test_sigterm_cancels_what_outlives_the_drain_bound(tmp_path: Path, ladder_dir: Path,
                                                       spawn: Any) -> None:
    events = tmp_path / "events.jsonl"
    config = write_config(tmp_path / "agent.toml", ladder_dir,
                          concurrency="drain_timeout_s = 1.0",
                          events=f'events_file = "{events}"')
    port = free_port()
    proc = spawn(config, "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.2)
    started = threading.Event()

    def stream() -> None:
        body = {"model": "default", "max_tokens": 480, "stream": True,
                "messages": [{"role": "user", "content": "Write a very long story."}]}
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                              timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        started.set()
        except httpx.HTTPError:
            pass  # the server cut the stream at the drain bound

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - t0 < 15, "the drain bound holds"
    reader.join(30)
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    assert recorded and recorded[-1]["finish_reason"] == "cancelled"
    assert recorded[-1]["completion_tokens"] < 480


def test_unix_socket_listener(tmp_path: Path, ladder_dir: Path, spawn: Any) -> None:
    sock = tmp_path / "agent.sock"
    config = write_config(tmp_path / "agent.toml", ladder_dir,
                          listen=f'unix_socket = "{sock}"')
    proc = spawn(config)
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://agent", timeout=60) as http:
        end = time.monotonic() + 120
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end and proc.poll() is None
            time.sleep(0.2)
        r = http.post("/v1/chat/completions", json={
            "model": "default", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_serve_overrides_are_validated(tmp_path: Path, ladder_dir: Path) -> None:
    config = write_config(tmp_path / "agent.toml", ladder_dir)
    bad_variant = CliRunner().invoke(cli, ["serve", "--config", str(config), "-v", "Q9_9"])
    assert bad_variant.exit_code == 1 and "models.active: no variant 'Q9_9'" in bad_variant.output
    bad_port = CliRunner().invoke(cli, ["serve", "--config", str(config), "--port", "99999"])
    assert bad_port.exit_code == 2 and "--port" in bad_port.output


def test_request_events_reach_mqtt_through_the_durable_outbox(tmp_path: Path,
                                                               ladder_dir: Path,
                                                               spawn: Any) -> None:
    """[telemetry] in the agent's config: every request event is forwarded to the broker."""
    import uuid

    import paho.mqtt.client as mqtt

    root = f"qf-test-{uuid.uuid4().hex[:8]}"
    device = "serve-test-1"
    received: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, msg: received.append(msg.payload)
    sub.connect("127.0.0.1", 1883)
    sub.subscribe(f"{root}/devices/{device}/telemetry", qos=1)
    sub.loop_start()
    try:
        config = write_config(
            tmp_path / "agent.toml", ladder_dir,
            telemetry=f'device_id = "{device}"\n[telemetry.mqtt]\ntopic_root = "{root}"\n'
                      f'[telemetry.outbox]\npath = "{tmp_path / "outbox.db"}"')
        check = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
        assert check.exit_code == 0 and f"device {device}" in check.output, check.output
        port = free_port()
        proc = spawn(config, "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end and proc.poll() is None
            time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        request_id = r.json()["id"]
        end = time.monotonic() + 30
        while not any(request_id.encode() in p for p in received):
            assert time.monotonic() < end, "the request event never reached the broker"
            time.sleep(0.1)
        batch = json.loads(next(p for p in received if request_id.encode() in p))
        assert batch["device_id"] == device
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # A clean stop, as the broker saw it: the retained status is the agent's own
        # "shutdown", not its Will ("offline" after a lost connection).
        status: list[dict[str, Any]] = []
        got = threading.Event()

        def on_status(c: Any, u: Any, msg: Any) -> None:
            if msg.payload:
                status.append(json.loads(msg.payload))
                got.set()

        watch = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        watch.on_message = on_status
        watch.connect("127.0.0.1", 1883)
        watch.subscribe(f"{root}/devices/{device}/status", qos=1)
        watch.loop_start()
        try:
            assert got.wait(10), "no retained status after the stop"
        finally:
            watch.loop_stop()
            watch.disconnect()
        assert (status[-1]["state"], status[-1]["reason"]) == ("offline", "shutdown"), status
    finally:
        sub.loop_stop()
        sub.disconnect()
