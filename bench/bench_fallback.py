"""What a fallback variant costs under each `models.fallback_load` policy.

    python bench/bench_fallback.py --models-dir /tmp/qm [--active Q4_K_M] [--fallback Q8_0]
                                   [--fallbacks 3]

For each policy (eager, lazy, on_demand) a real `quantfleet-agent serve` is
started in a clean process with the active variant and the fallback, and
`validation.fallback_on = ["finish_reason"]`, so that every request with a
tiny `max_tokens` is retried on the fallback. Measured:

- idle memory once the agent is ready, before any request: RSS and USS
  (psutil), i.e. what the fallback costs while it is not needed;
- the latency of ``--fallbacks`` requests that each fall back, one after the
  other, and the `fallback_load_s` their events report (the seconds a request
  waited for the fallback to load);
- the memory after them.

Printed: a table per policy, and the ratios lazy/eager of idle memory and of
the first fallback's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import free_port, stop, wait_http

from quantfleet.models.catalog import Catalog

MB = 1024 * 1024
POLICIES = ("eager", "lazy", "on_demand")


def memory(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.rss / MB, info.uss / MB


def events(path: Path, n: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if len(lines) >= n:
                return lines
        time.sleep(0.1)
    raise SystemExit(f"fewer than {n} events in {path}")


def run_policy(policy: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    events_file = tmp / f"{policy}-events.jsonl"
    config = tmp / f"{policy}.toml"
    config.write_text(f"""
[models]
dir = "{args.models_dir}"
active = "{args.active}"
fallback = "{args.fallback}"
fallback_load = "{policy}"
n_ctx = 2048
[validation]
fallback_on = ["finish_reason"]
[events]
events_file = "{events_file}"
""")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "quantfleet-agent"), "serve",
                             "--config", str(config), "--port", str(port),
                             "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, f"the agent ({policy})")
        while httpx.get(url + "/healthz", timeout=2).status_code != 200:
            time.sleep(0.2)
        time.sleep(1.0)  # settle after the warm-up
        idle = memory(proc.pid)
        latencies = []
        with httpx.Client(timeout=300) as http:
            for i in range(args.fallbacks):
                t0 = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json={
                    "model": "default", "max_tokens": 3, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Describe city number {i}."}]})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
        evs = events(events_file, args.fallbacks)
        after = memory(proc.pid)
    finally:
        stop(proc)
    fell_back = [e for e in evs if e.get("fallback_from")]
    if len(fell_back) < args.fallbacks:
        raise SystemExit(f"{policy}: {len(fell_back)} of {args.fallbacks} requests fell back")
    return {"idle": idle, "after": after, "latencies": latencies,
            "load_s": [e.get("fallback_load_s") for e in fell_back]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--active", default="Q4_K_M")
    ap.add_argument("--fallback", default="Q8_0")
    ap.add_argument("--fallbacks", type=int, default=3)
    args = ap.parse_args()
    catalog = Catalog(args.models_dir)
    active, fallback = catalog.resolve(args.active), catalog.resolve(args.fallback)
    args.active, args.fallback = active.name, fallback.name
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; active "
          f"{active.name} ({active.size_bytes / MB:.0f} MB file), fallback {fallback.name} "
          f"({fallback.size_bytes / MB:.0f} MB file)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in POLICIES:
            results[policy] = run_policy(policy, args, Path(tmp))
    print(f"{'policy':<10} {'idle RSS':>9} {'idle USS':>9} {'RSS after':>10} "
          f"{'fallback latencies s':>24} {'fallback_load_s':>22}")
    for policy, r in results.items():
        lat = " ".join(f"{x:.2f}" for x in r["latencies"])
        load = " ".join("-" if x is None else f"{x:.2f}" for x in r["load_s"])
        print(f"{policy:<10} {r['idle'][0]:>9.1f} {r['idle'][1]:>9.1f} {r['after'][0]:>10.1f} "
              f"{lat:>24} {load:>22}")
    lazy, eager = results["lazy"], results["eager"]
    print(f"ratio idle RSS lazy / eager: {lazy['idle'][0] / eager['idle'][0]:.2f}")
    print(f"ratio first fallback latency lazy / eager: "
          f"{lazy['latencies'][0] / eager['latencies'][0]:.2f}; later fallbacks: "
          f"{sum(lazy['latencies'][1:]) / max(sum(eager['latencies'][1:]), 1e-9):.2f}")


if __name__ == "__main__":
    main()
