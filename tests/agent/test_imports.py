"""What the agent imports follows what its config uses (issue 16: under 80 MB without a
model).

A device whose variants are all GGUF never imports onnxruntime (25 MB RSS) nor the
ONNX backend, and one whose variants are all ONNX never imports llama_cpp unless its
telemetry's hardware fingerprint asks llama.cpp how it sees the CPU; the start of
``serve`` imports no library that only some requests or events use (jsonschema for a
request's JSON Schema, httpx for an update's download), nor numpy before a runtime
brings it; device code never imports the fleet's libraries. Each check runs in a
clean interpreter: this test session has imported everything already.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from quantfleet.agent.update.signing import generate_keypair
from tests.support import Mosquitto, free_port

FLEET_ONLY = ["quantfleet.fleet", "quantfleet.demo", "sqlalchemy", "psycopg", "scipy",
              "matplotlib", "yaml",
              "fastapi",  # the agent serves on Starlette alone (6 MB less; issue 16)
              "cryptography"]  # signatures are libsodium's (PyNaCl): 1 MB, against 8
ONNX = ["onnxruntime", "quantfleet.agent.backends.onnx", "quantfleet.agent.backends.onnx_json"]
# Imported where they are used, not at start.
LATER = ["numpy", "llama_cpp", "jsonschema", "httpx"]

# Runs `quantfleet-agent serve ARGS...` and, at exit, writes every module the process
# ever imported to the file named by its first argument.
SERVE = """
import atexit, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
from quantfleet.agent.cli import main
sys.argv[0] = "quantfleet-agent"
main()
"""


def imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter has after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_start_of_serve_imports_no_runtime_and_nothing_only_some_requests_use(
        tmp_path: Path) -> None:
    """What ``serve`` imports at start and the app it builds, before any model loads:
    without telemetry, then with [telemetry] and [update] and the hardware fingerprint
    their birth announces."""
    _, public = generate_keypair(tmp_path / "keys")
    local = f'[models]\ndir = "{tmp_path}"\nactive = "Q4_K_M"\nfallback = ""\n'
    fleet = local + f"""
[device]
id = "imports-1"
[telemetry]
device_id = "imports-1"
[telemetry.mqtt]
broker = "mqtt://127.0.0.1:1"
[telemetry.outbox]
path = "{tmp_path}/outbox.db"
[update]
public_key = "{public}"
"""
    (tmp_path / "local.toml").write_text(local)
    (tmp_path / "fleet.toml").write_text(fleet)
    start = """
import quantfleet.agent.cli, quantfleet.agent.serving.server
from quantfleet.agent.config import load_config
from quantfleet.agent.serving.api import create_app
"""
    modules = imported_by(start + f"create_app(load_config({str(tmp_path / 'local.toml')!r}), "
                                  "lambda: None)")
    assert "quantfleet.agent.serving.api" in modules  # the check ran
    unwanted = {*FLEET_ONLY, *ONNX, *LATER}
    assert not modules & unwanted, sorted(modules & unwanted)

    start += f"""
import quantfleet.agent.telemetry.service, quantfleet.agent.update.service
import quantfleet.agent.update.soak
create_app(load_config({str(tmp_path / 'fleet.toml')!r}), lambda: None)
"""
    modules = imported_by(start)
    # numpy is the exception: sqlite_utils (the telemetry outbox) imports it, and pandas,
    # when they are installed, at its own import.
    unwanted -= {"numpy"}
    assert not modules & unwanted, sorted(modules & unwanted)
    # The fingerprint reads onnxruntime's version without importing it. (It imports
    # llama_cpp, for llama.cpp's view of the CPU: on an ONNX-only device with telemetry
    # that is paid for the birth message.)
    modules = imported_by(start + "from quantfleet.agent.hardware import fingerprint\n"
                                  "assert fingerprint().onnxruntime\n")
    assert not modules & set(ONNX), sorted(modules & set(ONNX))


def _serve(tmp_path: Path, config: str, body: dict[str, object]) -> set[str]:
    """Serve ``config`` in a clean interpreter, answer one chat request, stop with SIGTERM;
    every module the agent imported meanwhile."""
    port = free_port()
    path = tmp_path / "agent.toml"
    path.write_text(config)
    dump = tmp_path / "modules.txt"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(dump), "serve", "--config",
                             str(path), "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the agent did not become ready"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    return set(dump.read_text().split())


PERSON = {"model": "default", "max_tokens": 48, "temperature": 0,
          "messages": [{"role": "user", "content": "Ada Lovelace was 36. As JSON."}],
          "response_format": {"type": "json_schema", "json_schema": {
              "name": "person", "schema": {
                  "type": "object", "required": ["name", "age"],
                  "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}}}}


def test_a_gguf_only_device_never_imports_onnxruntime(tmp_path: Path, ladder_dir: Path) -> None:
    """The real agent with telemetry and updates on a real broker, a GGUF variant and a
    GGUF fallback, answering a JSON-schema request: from start to stop."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    _, public = generate_keypair(tmp_path / "keys")
    try:
        modules = _serve(tmp_path, f"""
[device]
id = "imports-gguf"
[models]
dir = "{ladder_dir}"
active = "Q4_K_M"
fallback = "Q8_0"
fallback_load = "on_demand"
n_ctx = 512
[telemetry]
device_id = "imports-gguf"
[telemetry.mqtt]
broker = "mqtt://127.0.0.1:{broker.port}"
topic_root = "qftest-imports/v1"
[telemetry.outbox]
path = "{tmp_path}/outbox.db"
[update]
public_key = "{public}"
state_file = "{tmp_path}/updater.json"
""", PERSON)
    finally:
        broker.stop()
    assert {"llama_cpp", "quantfleet.agent.backends.llama_cpp",
            "quantfleet.agent.telemetry.service", "quantfleet.agent.update.service"} <= modules
    assert "jsonschema" in modules  # imported by the request that brought a schema
    assert not modules & {*ONNX, *FLEET_ONLY}, sorted(modules & {*ONNX, *FLEET_ONLY})


def test_an_onnx_only_device_imports_onnxruntime_and_never_llama_cpp(
        tmp_path: Path, ladder_dir: Path) -> None:
    """The reverse, without telemetry: the real agent serving an ONNX variant alone."""
    modules = _serve(tmp_path, f"""
[models]
dir = "{ladder_dir}"
active = "onnx-int4"
fallback = ""
n_ctx = 512
""", {"model": "default", "max_tokens": 8, "temperature": 0,
       "messages": [{"role": "user", "content": "Name three colours."}]})
    assert {"onnxruntime", "quantfleet.agent.backends.onnx"} <= modules
    assert "llama_cpp" not in modules
    assert not modules & set(FLEET_ONLY), sorted(modules & set(FLEET_ONLY))
