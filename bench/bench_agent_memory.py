"""The agent's memory with and without a model, beside llama-cpp-python's own server.

    python bench/bench_agent_memory.py --models-dir DIR [--variant Q4_K_M] [--requests 20]
                                       [--broker mqtt://HOST:PORT]

Every figure is taken from outside the process, each process started for it alone,
with psutil: ``memory_full_info`` gives RSS, USS (the pages no other process shares)
and PSS (RSS with each shared page divided among the processes sharing it);
``memory_maps`` gives the resident pages of the mapped model files. Three agent
configurations, each packaging/agent.example.toml with ``models.dir`` set to DIR
and ``--variant`` served; GGUF variants only:

- ``example``: the example as shipped: the Q8_0 fallback (loaded at its first use) beside the
  variant, no telemetry, no updates;
- ``fleet device``: the example with its ``[telemetry]`` and ``[update]`` tables
  uncommented (an outbox and the updater's state in a temporary folder, a fresh
  signing key; the broker is ``--broker``, else a private Mosquitto on a free port,
  so that no retained message is left on a shared one): what a device of a fleet
  runs;
- ``fleet device, no fallback``: the same with ``fallback = ""``, one model, as the
  peer serves.

Each agent is the real ``quantfleet-agent serve`` (its CLI, run by ``python -c``)
with one change: ``ModelSet.load`` first imports the backend modules and runtimes of
the configured variants (what loading a model imports first: here
``quantfleet.agent.backends.llama_cpp`` and ``llama_cpp``, which brings numpy), then
waits until the bench lets it go on. That gives three rows per configuration:

- ``before load``: the agent started, answering ``/healthz`` (503 "loading"), its
  telemetry and update threads running where configured, everything it imports at
  start and its runtime imported, no model file opened. **This is "the agent without
  a model" that the 80 MB target is about**, and its RSS is the figure judged;
- ``idle``: its variants loaded (and warmed up), no request yet;
- ``N requests``: after ``--requests`` chat completions of 16 tokens.

Also measured, as ``imports only``: a bare ``python -c`` that imports what ``serve``
imports for the configuration (CLI, server and API; for the fleet device also the
telemetry and update services and the soak watch; the llama.cpp backend and
``llama_cpp``), and for the fleet device reads the hardware fingerprint as its
telemetry does at start, then waits; and the peer, ``python -m llama_cpp.server`` on
the same GGUF with the same ``n_ctx``, idle and after the same requests (it needs the
``[bench]`` extra; skipped without it).

Printed: the table in MB; each configuration's before-load RSS against the 80 MB
target; and, serving, the agent's RSS beyond the model file's pages against the
peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from common import free_port, stop

MB = 1024 * 1024
TARGET_MB = 80.0
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "packaging" / "agent.example.toml"

# The bench itself imports neither quantfleet nor its libraries (only psutil and the
# stdlib), so that the measured processes share no library pages with it: USS and
# PSS would otherwise leave out what a device's agent pays alone. This short-lived
# process resolves the variant and makes the signing key instead.
SETUP = """
import json, sys
from pathlib import Path
from quantfleet.agent.update.signing import generate_keypair
from quantfleet.models.catalog import Catalog
catalog = Catalog(Path(sys.argv[1]))
entry = catalog.resolve(sys.argv[2])
_, public = generate_keypair(Path(sys.argv[3]))
print(json.dumps({"name": entry.name, "path": str(entry.path(catalog.dir)),
                  "size_bytes": entry.size_bytes, "dir": str(catalog.dir.resolve()),
                  "files": [str(v.path(catalog.dir).resolve()) for v in catalog.variants],
                  "public_key": str(public)}))
"""

# What `serve` imports with the example config (GGUF variants, no telemetry), and the
# runtime loading imports; then the process waits, to be measured from outside.
EXAMPLE_IMPORTS = """
import quantfleet.agent.cli, quantfleet.agent.serving.server
import quantfleet.agent.backends.llama_cpp, llama_cpp
"""
# ... and with [telemetry] and [update]: their services, the soak watch, and the
# hardware fingerprint the telemetry reads at start.
FLEET_IMPORTS = EXAMPLE_IMPORTS + """
import quantfleet.agent.telemetry.service, quantfleet.agent.update.service
import quantfleet.agent.update.soak
from quantfleet.agent.hardware import fingerprint
fingerprint()
"""
WAIT = """
import sys
print("ready", flush=True)
sys.stdin.read()
"""

# The real agent, whose model loading waits for the file sys.argv[1] once it has
# imported the backends and runtimes of the configured variants (it says so by
# creating sys.argv[1] + ".waiting").
AGENT = """
import importlib, sys, time
from pathlib import Path
gate = Path(sys.argv.pop(1))
from quantfleet.agent.backends import BACKENDS
from quantfleet.agent.serving import routing
from quantfleet.models.catalog import Catalog
RUNTIMES = {"llama.cpp": "llama_cpp", "onnxruntime": "onnxruntime"}
load = routing.ModelSet.load.__func__
def gated(cls, config, catalog=None):
    catalog = catalog or Catalog(config.models.dir)
    for kind in {catalog.resolve(n).backend for n in config.variant_names()}:
        importlib.import_module(BACKENDS[kind].partition(":")[0])
        importlib.import_module(RUNTIMES[kind])
    Path(str(gate) + ".waiting").touch()
    while not gate.exists():
        time.sleep(0.05)
    return load(cls, config, catalog)
routing.ModelSet.load = classmethod(gated)
from quantfleet.agent.cli import main
sys.argv[0] = "quantfleet-agent"
main()
"""


@dataclass
class Row:
    name: str
    rss: float
    uss: float
    pss: float
    model_files: float  # RSS of the mapped model files

    @property
    def beyond_model(self) -> float:
        return self.rss - self.model_files


def measure(name: str, pid: int, model_files: set[str]) -> Row:
    p = psutil.Process(pid)
    full = p.memory_full_info()
    mapped = sum(m.rss for m in p.memory_maps(grouped=True) if m.path in model_files)
    return Row(name, full.rss / MB, full.uss / MB, full.pss / MB, mapped / MB)


def wait_for(check: Callable[[], bool], proc: subprocess.Popen[Any], what: str,
             timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited (status {proc.returncode})")
        time.sleep(0.1)
    raise SystemExit(f"{what}: timed out")


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def chat(url: str, model: str, n: int) -> None:
    for i in range(n):
        body = {"model": model, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": f"Name {i % 5 + 1} colours."}]}
        req = urllib.request.Request(f"{url}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()


def edit(text: str, edits: list[tuple[str, str]]) -> str:
    lines = text.splitlines()
    for old, new in edits:
        if old not in lines:
            raise SystemExit(f"{EXAMPLE} no longer has the line {old!r}: update the bench")
        lines[lines.index(old)] = new
    return "\n".join(lines) + "\n"


def example_config(models_dir: Path) -> str:
    return edit(EXAMPLE.read_text(),
                [('# dir = "/var/lib/quantfleet/models"', f'dir = "{models_dir}"')])


def fleet_device_config(text: str, tmp: Path, broker: str, device: str, public: str) -> str:
    return edit(text, [
        ('# id = "edge-001"', f'id = "{device}"'),
        ("# [telemetry]", "[telemetry]"),
        ('# device_id = "edge-001"             # must equal device.id when both are set',
         f'device_id = "{device}"'),
        ("# [telemetry.mqtt]", "[telemetry.mqtt]"),
        ('# broker = "mqtt://127.0.0.1:1883"', f'broker = "{broker}"'),
        ("# [telemetry.outbox]", "[telemetry.outbox]"),
        ('# path = "/var/lib/quantfleet/telemetry/outbox.db"', f'path = "{tmp}/outbox.db"'),
        ("# [update]", "[update]"),
        ('# public_key = "/etc/quantfleet/signing.pub"   # the fleet\'s key: '
         "`quantfleet keys generate`",
         f'public_key = "{public}"\nstate_file = "{tmp}/updater.json"'),
    ])


def private_broker(tmp: Path) -> tuple[str, subprocess.Popen[Any]]:
    """A Mosquitto of the bench's own on a free port (anonymous, in memory)."""
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    try:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SystemExit("mosquitto is not installed: pass --broker mqtt://HOST:PORT") from None
    end = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"mqtt://127.0.0.1:{port}", proc
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit("the private mosquitto did not start")
        time.sleep(0.1)


def run_agent(label: str, config: Path, variant: str, requests: int, model_files: set[str],
              tmp: Path) -> list[Row]:
    port = free_port()
    gate = tmp / f"gate-{port}"
    proc = subprocess.Popen([sys.executable, "-c", AGENT, str(gate), "serve", "--config",
                             str(config), "--variant", variant, "--port", str(port),
                             "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: Path(f"{gate}.waiting").exists() and status(f"{url}/healthz") == 503,
                 proc, f"{label}: the agent")
        time.sleep(2)
        rows = [measure(f"{label}, before load", proc.pid, model_files)]
        gate.touch()
        wait_for(lambda: status(f"{url}/healthz") == 200, proc, f"{label}: loading")
        time.sleep(2)
        rows.append(measure(f"{label}, idle", proc.pid, model_files))
        chat(url, "default", requests)
        time.sleep(1)
        rows.append(measure(f"{label}, {requests} requests", proc.pid, model_files))
        return rows
    finally:
        stop(proc)


def run_imports(label: str, code: str) -> Row:
    proc = subprocess.Popen([sys.executable, "-c", code + WAIT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the imports-only process did not start")
        time.sleep(1)
        return measure(f"{label}, imports only", proc.pid, set())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def run_peer(gguf: Path, n_ctx: int, requests: int, model_files: set[str]) -> list[Row]:
    if subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"],
                      capture_output=True).returncode != 0:
        print("peer: llama-cpp-python's server needs the [bench] extra; skipped")
        return []
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                             "--n_ctx", str(n_ctx), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: status(f"{url}/v1/models") == 200, proc, "the peer server")
        time.sleep(2)
        rows = [measure("peer llama_cpp.server, idle", proc.pid, model_files)]
        chat(url, "x", requests)
        time.sleep(1)
        rows.append(measure(f"peer llama_cpp.server, {requests} requests", proc.pid,
                            model_files))
        return rows
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--variant", default="Q4_K_M")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--broker", default=None,
                    help="the fleet device's broker (default: a private mosquitto)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        setup = json.loads(subprocess.run(
            [sys.executable, "-c", SETUP, str(args.models_dir), args.variant, str(tmp / "keys")],
            capture_output=True, text=True, check=True).stdout)
        model_files = set(setup["files"])
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
              f"{setup['name']} ({setup['size_bytes'] / MB:.0f} MB file); "
              f"{args.requests} requests")

        broker, mosquitto = (args.broker, None) if args.broker else private_broker(tmp)
        try:
            example = example_config(Path(setup["dir"]))
            fleet = fleet_device_config(example, tmp, broker, f"bench-memory-{os.getpid()}",
                                        setup["public_key"])
            single = edit(fleet, [('fallback = "Q8_0"', 'fallback = ""')])
            rows = [run_imports("example", EXAMPLE_IMPORTS),
                    run_imports("fleet device", FLEET_IMPORTS)]
            for i, (label, text) in enumerate((("example", example), ("fleet device", fleet),
                                               ("fleet device, no fallback", single))):
                path = tmp / f"agent-{i}.toml"
                path.write_text(text)
                rows += run_agent(label, path, setup["name"], args.requests, model_files, tmp)
        finally:
            if mosquitto is not None:
                stop(mosquitto)
        n_ctx = int(tomllib.loads(example)["models"].get("n_ctx", 2048))
        rows += run_peer(Path(setup["path"]), n_ctx, args.requests, model_files)

    print(f"\n{'process (MB)':<44} {'RSS':>7} {'USS':>7} {'PSS':>7} {'model files':>12} "
          f"{'RSS-model':>10}")
    for r in rows:
        print(f"{r.name:<44} {r.rss:>7.1f} {r.uss:>7.1f} {r.pss:>7.1f} "
              f"{r.model_files:>12.1f} {r.beyond_model:>10.1f}")
    by = {r.name: r for r in rows}
    print(f"\nthe agent without a model (before load), RSS / {TARGET_MB:.0f} MB target:")
    for label in ("example", "fleet device"):
        r = by[f"{label}, before load"]
        print(f"  {label:<14} {r.rss:5.1f} MB  {r.rss / TARGET_MB:.2f}"
              f"  ({'under' if r.rss < TARGET_MB else 'NOT under'} the target)")
    peer = by.get(f"peer llama_cpp.server, {args.requests} requests")
    if peer is not None:
        ours = by[f"fleet device, no fallback, {args.requests} requests"]
        print(f"serving {args.requests} requests, RSS less the model file: agent (fleet device, "
              f"no fallback) {ours.beyond_model:.1f} / peer {peer.beyond_model:.1f} = "
              f"{ours.beyond_model / peer.beyond_model:.2f}")


if __name__ == "__main__":
    main()
