"""The agent's own memory: a real `quantfleet-agent serve`, with and without its model.

    python bench/bench_agent_memory.py --models-dir /tmp/qm [--variant Q4_K_M]
                                       [--requests 20] [--broker mqtt://127.0.0.1:1883]

The design target is under 80 MB for the agent without the model. Three
processes are measured, one after the other, each after warm-up:

- ``imports``: a Python process that imports everything ``serve`` runs (API,
  telemetry, updater, both backends) and loads nothing;
- ``serve``: the real agent with telemetry and ``[update]`` configured, its
  variant loaded and ``--requests`` answered. Its RSS is split into the model
  file's pages (mmapped, shared, dropped by the kernel under pressure), the
  other file-backed pages (shared libraries) and anonymous memory (Python
  heap, llama.cpp's KV cache and compute buffers);
- the same agent's anonymous memory before and after ``--requests`` more
  requests, to show that serving does not grow it.

Printed: a table in MB, and the ratio of the agent's own memory (RSS less the
model file's pages) to the 80 MB target.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from quantfleet.agent.update.signing import generate_keypair
from quantfleet.models.catalog import Catalog

MB = 1024 * 1024
TARGET_MB = 80.0

IMPORTS = """
import quantfleet.agent.serving.server, quantfleet.agent.update.service
import quantfleet.agent.telemetry.service, quantfleet.agent.update.soak
import quantfleet.agent.backends.llama_cpp, quantfleet.agent.backends.onnx
import psutil, sys
p = psutil.Process()
print(p.memory_info().rss, p.memory_full_info().uss)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_rss(pid: int, model_path: Path) -> dict[str, float]:
    """RSS by kind of mapping, in MB."""
    model = str(model_path.resolve())
    out = {"rss": 0.0, "model_file": 0.0, "other_files": 0.0, "anonymous": 0.0}
    for m in psutil.Process(pid).memory_maps(grouped=True):
        rss = m.rss / MB
        out["rss"] += rss
        if m.path == model:
            out["model_file"] += rss
        elif m.path.startswith("/"):
            out["other_files"] += rss
        else:
            out["anonymous"] += rss
    return out


def chat(url: str, n: int) -> None:
    with httpx.Client(timeout=120) as http:
        for i in range(n):
            r = http.post(f"{url}/v1/chat/completions", json={
                "model": "default", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": f"Name {i % 5 + 1} colours."}]})
            r.raise_for_status()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--variant", default="Q4_K_M")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    args = ap.parse_args()
    catalog = Catalog(args.models_dir)
    entry = catalog.resolve(args.variant)
    model_path = entry.path(catalog.dir)
    print(f"load average {os.getloadavg()[0]:.2f}; variant {entry.name} "
          f"({entry.size_bytes / MB:.0f} MB file)")

    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                         check=True)
    rss, uss = (int(x) / MB for x in out.stdout.split())
    rows = [("imports only (no model, no server)", rss, None, None, uss)]

    with tempfile.TemporaryDirectory() as tmp:
        _, pub = generate_keypair(Path(tmp) / "keys")
        port = free_port()
        config = Path(tmp) / "agent.toml"
        config.write_text(f"""
[device]
id = "bench-memory"
[models]
dir = "{catalog.dir}"
active = "{entry.name}"
fallback = ""
n_ctx = 2048
[listen]
port = {port}
[telemetry]
device_id = "bench-memory"
[telemetry.mqtt]
broker = "{args.broker}"
[telemetry.outbox]
path = "{tmp}/outbox.db"
[update]
public_key = "{pub}"
state_file = "{tmp}/updater.json"
""")
        proc = subprocess.Popen([sys.executable, "-m", "quantfleet.agent.cli", "serve",
                                 "--config", str(config), "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the agent did not become ready")
                time.sleep(0.2)
            chat(url, args.requests)
            first = split_rss(proc.pid, model_path)
            uss1 = psutil.Process(proc.pid).memory_full_info().uss / MB
            chat(url, args.requests)
            second = split_rss(proc.pid, model_path)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    own = first["rss"] - first["model_file"]
    rows.append((f"serve, {entry.name} loaded, {args.requests} requests", first["rss"],
                 first["model_file"], own, uss1))
    print(f"{'process':<44} {'RSS':>7} {'model file':>11} {'RSS-model':>10} {'USS':>7}")
    for name, r, m, o, u in rows:
        def cell(v: float | None, w: int) -> str:
            return f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"
        print(f"{name:<44} {cell(r, 7)} {cell(m, 11)} {cell(o, 10)} {cell(u, 7)}")
    print(f"serve: other files {first['other_files']:.1f} MB (shared libraries), anonymous "
          f"{first['anonymous']:.1f} MB (Python heap, KV cache, compute buffers)")
    print(f"anonymous after {args.requests} more requests: {second['anonymous']:.1f} MB "
          f"({second['anonymous'] - first['anonymous']:+.1f})")
    print(f"ratio imports-only RSS / {TARGET_MB:.0f} MB target: {rss / TARGET_MB:.2f}")
    print(f"ratio serve RSS less model file / {TARGET_MB:.0f} MB target: {own / TARGET_MB:.2f}")


if __name__ == "__main__":
    main()
