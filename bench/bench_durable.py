"""What "no answered request without its event" costs, measured side by side in one run.

    python bench/bench_durable.py --models-dir /tmp/qm [--requests 60] [--threads 1,4,16]

Part 1 (the outbox alone): T threads each append a request event and then either go
on (``append``) or wait for its group commit (``append + wait_committed``), for a few
seconds each, alternating. Printed: events/s both ways and the wait's p50/p99.

Part 2 (a real agent): two `quantfleet-agent serve` processes with the same model and
a [telemetry] outbox (broker unreachable, so nothing is forwarded), one with
``durable_wait_s = 1`` (the default) and one with ``0``; sequential requests
(max_tokens 2) alternate between them. Printed: median and p95 latency each way and
the difference, which is what an answer waits for its commit.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from quantfleet.agent.telemetry.outbox import Outbox
from quantfleet.agent.wire import RequestEvent


def event(i: int) -> RequestEvent:
    return RequestEvent(request_id=f"req-{i:08d}", ts=time.time(), variant="Q4_K_M",
                        latency_s=0.4, prompt_tokens=48, completion_tokens=96)


def q(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


def outbox_part(threads: list[int], seconds: float) -> None:
    print("== the outbox: append alone vs append + wait_committed (group commit) ==")
    print(f"{'threads':>7} {'append ev/s':>12} {'durable ev/s':>13} {'ratio':>6} "
          f"{'wait p50 ms':>12} {'wait p99 ms':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in threads:
            rates = {}
            waits: list[float] = []
            for durable in (False, True):
                ob = Outbox(Path(tmp) / f"o-{n}-{durable}.db", "bench", commit_interval_s=1.0,
                            max_bytes=1 << 30).start()
                done = [0]
                stop = threading.Event()
                lock = threading.Lock()

                def work(k: int, ob: Outbox = ob, durable: bool = durable,
                         stop: threading.Event = stop, done: list[int] = done,
                         lock: threading.Lock = lock, waits: list[float] = waits) -> None:
                    i = 0
                    while not stop.is_set():
                        ob.append(event(k * 10_000_000 + i))
                        if durable:
                            t0 = time.perf_counter()
                            ob.wait_committed(timeout=5)
                            with lock:
                                waits.append(time.perf_counter() - t0)
                        i += 1
                        with lock:
                            done[0] += 1

                ts = [threading.Thread(target=work, args=(k,)) for k in range(n)]
                start = time.perf_counter()
                for t in ts:
                    t.start()
                time.sleep(seconds)
                stop.set()
                for t in ts:
                    t.join()
                rates[durable] = done[0] / (time.perf_counter() - start)
                ob.close()
            print(f"{n:>7} {rates[False]:>12,.0f} {rates[True]:>13,.0f} "
                  f"{rates[True] / rates[False]:>6.2f} {q(waits, 0.5) * 1000:>12.2f} "
                  f"{q(waits, 0.99) * 1000:>12.2f}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_part(models_dir: Path, requests: int) -> None:
    agent_bin = Path(sys.executable).parent / "quantfleet-agent"
    closed = free_port()
    procs: dict[float, tuple[subprocess.Popen[bytes], str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for wait_s in (1.0, 0.0):
                d = Path(tmp) / f"w{wait_s}"
                d.mkdir()
                cfg = d / "agent.toml"
                cfg.write_text(
                    f'[models]\ndir = "{models_dir}"\nactive = "Q4_K_M"\nfallback = ""\n'
                    f'n_ctx = 512\n[events]\ndurable_wait_s = {wait_s}\n'
                    f'[telemetry]\ndevice_id = "bench-{int(wait_s)}"\nhealth_interval_s = 0\n'
                    f'[telemetry.mqtt]\nbroker = "mqtt://127.0.0.1:{closed}"\n'
                    f'[telemetry.outbox]\npath = "{d / "outbox.db"}"\n')
                port = free_port()
                proc = subprocess.Popen([str(agent_bin), "serve", "--config", str(cfg),
                                         "--port", str(port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
                procs[wait_s] = (proc, f"http://127.0.0.1:{port}")
            for _, url in procs.values():
                end = time.monotonic() + 120
                while True:
                    try:
                        if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > end:
                        raise SystemExit("an agent did not start")
                    time.sleep(0.2)
            lat: dict[float, list[float]] = {1.0: [], 0.0: []}
            body = {"max_tokens": 2, "messages": [{"role": "user", "content": "Say hi."}]}
            with httpx.Client(timeout=60) as client:
                for i in range(requests * 2):
                    wait_s = (1.0, 0.0)[i % 2]
                    t0 = time.perf_counter()
                    r = client.post(procs[wait_s][1] + "/v1/chat/completions", json=body)
                    r.raise_for_status()
                    lat[wait_s].append(time.perf_counter() - t0)
            print(f"\n== a real agent, {requests} requests each way, alternating "
                  "(max_tokens 2, outbox on, broker unreachable) ==")
            for wait_s, name in ((0.0, "durable_wait_s = 0"), (1.0, "durable_wait_s = 1")):
                v = lat[wait_s]
                print(f"{name:<20} median {statistics.median(v) * 1000:7.1f} ms   "
                      f"p95 {q(v, 0.95) * 1000:7.1f} ms")
            diff = statistics.median(lat[1.0]) - statistics.median(lat[0.0])
            print(f"the wait for the commit adds {diff * 1000:+.1f} ms to the median answer")
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, help="A built ladder (for part 2).")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    outbox_part([int(t) for t in args.threads.split(",")], args.seconds)
    if args.models_dir:
        agent_part(args.models_dir, args.requests)


if __name__ == "__main__":
    main()
