"""The fleet simulator's sustained message rate, and what the fleet's ingest keeps up with.

    python bench/bench_simulate.py [--devices 1000,5000] [--rate 2] [--duration 20]
                                   [--warmup 10] [--flush-s 1] [--store sqlite|postgresql]
                                   [--processes 1,2,4] [--broker mqtt://127.0.0.1:1883]

For each fleet size: ``FleetSimulator`` runs that many devices, each serving
``--rate`` requests per second and publishing what it served every
``--flush-s`` seconds (the agent's outbox commit interval, 1 s by default),
through a real Mosquitto (a private one on a free port unless ``--broker`` is
given) for ``--duration`` seconds, from ``--warmup`` seconds after their
births (a fleet's steady state, not its start: 20,000 births and update states
come first at 10,000 devices). The fleet's ingest
(``FleetIngest``, tuned as ``quantfleet serve`` tunes it) runs in processes of
its own — ``--processes`` of them on the shared subscription, each a
``quantfleet serve``'s ingest — into a SQLite store or a PostgreSQL database
of its own (created and dropped). Printed side by side: the
request events per second the simulator made, the messages per second it
published and the broker acknowledged (PUBACK), and the messages and events
per second the ingest committed over the same seconds (ratio: events);
then how far the ingest was behind when the measured seconds began and when the
simulator stopped (events: a backlog that keeps up stays level), how
long it took to commit the rest, and how many events it never committed
(lost; the bench waits while the ingest makes progress, up to ten minutes).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from common import pg_database

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.fleet.ingest import FleetIngest, tune_gc
from quantfleet.fleet.simulate import FleetSimulator
from quantfleet.fleet.store import Store

BASELINE = "smollm2-135m-Q8_0"


@contextmanager
def private_broker(workdir: Path) -> Iterator[str]:
    """A Mosquitto of our own on a free port; the fleet's queue is unbounded, as in
    production (the default 1,000 queued messages would drop a backlog)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous true",
        "user root" if os.geteuid() == 0 else "", "max_queued_messages 0",
        f"log_dest file {workdir}/mosquitto.log", ""]))
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {proc.stderr!r}") from None
                time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def run_ingest(index: int, broker: str, root: str, store_url: str, ready: Event, stop: Event,
               out: Any) -> None:
    """One fleet ingest, in its own process: its counters twice a second."""
    store = Store(store_url)
    ingest = FleetIngest(store, MqttConfig(broker=broker, topic_root=root),
                         client_id=f"qf-bench-{root}-{index}", session_expiry_s=0).start()
    tune_gc()  # what `quantfleet serve` does once it has started
    ready.set()
    while not stop.wait(0.5):
        s = ingest.stats
        out.put((index, time.time(), s.received, s.events_inserted, time.process_time()))
    ingest.stop()
    s = ingest.stats
    out.put((index, time.time(), s.received, s.events_inserted, time.process_time()))
    store.close()
    out.put((index, None, 0, 0, 0.0))


Point = tuple[float, int, int, float]  # time, messages, events committed, CPU seconds


def _at(timeline: list[Point], t: float) -> tuple[float, float, float]:
    """(messages, events, CPU seconds) of one ingest at time ``t``, interpolated."""
    before = [p for p in timeline if p[0] <= t] or timeline[:1]
    after = [p for p in timeline if p[0] >= t] or timeline[-1:]
    a, b = before[-1], after[0]
    if b[0] == a[0]:
        return float(a[1]), float(a[2]), a[3]
    f = (t - a[0]) / (b[0] - a[0])
    return a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2]), a[3] + f * (b[3] - a[3])


def _sum_at(timelines: dict[int, list[Point]], t: float) -> tuple[float, float, float]:
    parts = [_at(tl, t) for tl in timelines.values() if tl]
    return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))


@contextmanager
def _store_url(engine: str, workdir: Path) -> Iterator[str]:
    if engine == "sqlite":
        yield f"sqlite:///{workdir / 'fleet.db'}"
        return
    with pg_database() as url:
        Store(url).close()  # migrated once, before the ingest processes start
        yield url


def measure(broker: str, n: int, rate: float, duration: float, flush_s: float,
            engine: str = "sqlite", processes: int = 1,
            warmup: float = 10.0) -> dict[str, float]:
    root = f"qfbench{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp, _store_url(engine, Path(tmp)) as url:
        readies, procs = [], []
        for i in range(processes):
            ready = ctx.Event()
            proc = ctx.Process(target=run_ingest, args=(i, broker, root, url, ready, stop, out))
            proc.start()
            readies.append(ready)
            procs.append(proc)
        try:
            for ready in readies:
                if not ready.wait(60):
                    raise RuntimeError("an ingest process did not connect")
            sim = FleetSimulator(MqttConfig(broker=broker, topic_root=root), n,
                                 baseline=BASELINE, requests_per_s=rate, seed=1,
                                 flush_s=flush_s)

            def events() -> int:
                return sum(d.seq for d in sim.devices.values())

            sim.start()  # births and states: 2 messages per device
            time.sleep(warmup)  # the births applied, the traffic under way: then measure
            t0, p0, a0, e0 = time.time(), sim.published, sim.delivered, events()
            c0 = time.process_time()
            time.sleep(duration)
            t1, p1, a1, e1 = time.time(), sim.published, sim.delivered, events()
            sim_cpu = time.process_time() - c0
            sim.stop(clear_retained=False, drain_s=600)
            total = events()
            timelines: dict[int, list[Point]] = {i: [] for i in range(processes)}

            def collect() -> None:
                while not out.empty():
                    i, t, m, e, c = out.get()
                    if t is not None:
                        timelines[i].append((t, m, e, c))

            caught_up = None
            # Wait for the ingest to commit everything, while it makes progress.
            last_progress, done = time.time(), -1.0
            while time.time() - last_progress < 15 and time.time() - t1 < 600:
                collect()
                now_done = _sum_at(timelines, time.time())[1]
                if now_done > done:
                    done, last_progress = now_done, time.time()
                if done >= total:
                    caught_up = time.time()
                    break
                time.sleep(0.2)
            stop.set()
            ended = 0
            while ended < processes:
                i, t, m, e, c = out.get(timeout=60)
                if t is None:
                    ended += 1
                else:
                    timelines[i].append((t, m, e, c))
        finally:
            stop.set()
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
    m0, i0, c0 = _sum_at(timelines, t0)
    m1, i1, c1 = _sum_at(timelines, t1)
    span = t1 - t0
    final = sum(tl[-1][2] for tl in timelines.values() if tl)
    return {
        "store": engine, "processes": processes, "devices": n, "offered": n * rate,
        "sim_msgs": (p1 - p0) / span, "sim_acked": (a1 - a0) / span,
        "sim_events": (e1 - e0) / span,
        "ingest_msgs": (m1 - m0) / span, "ingest_events": (i1 - i0) / span,
        # CPU per event: what the machine's cores bound, whatever else runs on them
        "ingest_cpu_us": (c1 - c0) / max(i1 - i0, 1) * 1e6, "ingest_cores": (c1 - c0) / span,
        "sim_cpu_us": sim_cpu / max(e1 - e0, 1) * 1e6, "sim_cores": sim_cpu / span,
        "behind_start": e0 - i0, "behind": e1 - i1,
        "catch_up_s": (caught_up - t1) if caught_up else float("nan"),
        "missing": total - final,  # never committed: lost (or still queued)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1000,5000")
    ap.add_argument("--rate", type=float, default=2.0, help="Requests per second per device.")
    ap.add_argument("--duration", type=float, default=20.0, help="Seconds measured per size.")
    ap.add_argument("--warmup", type=float, default=10.0,
                    help="Seconds of traffic after the births before the measured ones.")
    ap.add_argument("--flush-s", type=float, default=1.0,
                    help="Each device publishes a batch this often (the agent's default: 1).")
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--processes", default="1",
                    help="Ingest processes on the shared subscription, e.g. 1,2,4.")
    ap.add_argument("--broker", help="An existing broker (default: a private Mosquitto).")
    args = ap.parse_args()
    procs = [int(x) for x in args.processes.split(",")]
    if args.store == "sqlite" and procs != [1]:
        ap.error("SQLite takes one writer: --processes above 1 needs --store postgresql")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, \
            _broker(args.broker, Path(tmp)) as broker:
        for k in procs:
            for n in (int(x) for x in args.devices.split(",")):
                rows.append(measure(broker, n, args.rate, args.duration, args.flush_s,
                                    args.store, k, args.warmup))
                print(f"  {rows[-1]}", flush=True)
    print()
    print(f"{'store':>10} {'procs':>5} {'devices':>8} {'offered ev/s':>13} | "
          f"{'simulator ev/s':>14} {'msg/s':>7} "
          f"{'acked':>7} | {'ingest msg/s':>12} {'ev/s':>8} {'ratio':>6} | "
          f"{'behind at start':>15} {'at end':>7} "
          f"{'catch-up':>9} {'missing':>7} | {'ingest CPU us/ev':>16} {'cores':>5} | "
          f"{'sim CPU us/ev':>13} {'cores':>5}")
    for r in rows:
        print(f"{r['store']:>10} {r['processes']:>5} "
              f"{r['devices']:>8,.0f} {r['offered']:>13,.0f} | {r['sim_events']:>14,.0f} "
              f"{r['sim_msgs']:>7,.0f} {r['sim_acked']:>7,.0f} | "
              f"{r['ingest_msgs']:>12,.0f} {r['ingest_events']:>8,.0f} "
              f"{r['ingest_events'] / r['sim_events']:>6.2f} | {r['behind_start']:>15,.0f} "
              f"{r['behind']:>7,.0f} "
              f"{r['catch_up_s']:>8.1f}s {r['missing']:>7,.0f} | "
              f"{r['ingest_cpu_us']:>16.1f} {r['ingest_cores']:>5.2f} | "
              f"{r['sim_cpu_us']:>13.1f} {r['sim_cores']:>5.2f}")


@contextmanager
def _broker(url: str | None, workdir: Path) -> Iterator[str]:
    if url:
        yield url
        return
    if shutil.which("mosquitto") is None:
        raise SystemExit("mosquitto is not installed: pass --broker mqtt://host:port")
    with private_broker(workdir) as broker:
        yield broker


if __name__ == "__main__":
    main()
