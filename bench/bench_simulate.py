"""The fleet simulator's sustained message rate, and what the fleet's ingest keeps up with.

    python bench/bench_simulate.py [--devices 1000,5000] [--rate 2] [--duration 20]
                                   [--broker mqtt://127.0.0.1:1883]

For each fleet size: ``FleetSimulator`` runs that many devices, each serving
``--rate`` requests per second, through a real Mosquitto (a private one on a
free port unless ``--broker`` is given) for ``--duration`` seconds after their
births. The fleet's ingest (``FleetIngest`` into a SQLite store) runs in a
process of its own, as ``quantfleet serve`` would. Printed side by side: the
request events per second the simulator made, the messages per second it
published and the broker acknowledged (PUBACK), and the messages and events
per second the ingest committed over the same seconds (ratio: events);
then how far the ingest was behind when the simulator stopped (events), how
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

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.fleet.ingest import FleetIngest
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


def run_ingest(broker: str, root: str, store_url: str, ready: Event, stop: Event,
               out: Any) -> None:
    """The fleet side, in its own process: ingest, reporting its counters twice a second."""
    store = Store(store_url)
    ingest = FleetIngest(store, MqttConfig(broker=broker, topic_root=root),
                         client_id=f"qf-bench-{root}", session_expiry_s=0).start()
    ready.set()
    while not stop.wait(0.5):
        s = ingest.stats
        out.put((time.time(), s.received, s.events_inserted))
    ingest.stop()
    s = ingest.stats
    out.put((time.time(), s.received, s.events_inserted))
    store.close()
    out.put(None)


def _at(timeline: list[tuple[float, int, int]], t: float) -> tuple[float, float]:
    """(messages, events) the ingest had committed at time ``t``, interpolated."""
    before = [p for p in timeline if p[0] <= t] or timeline[:1]
    after = [p for p in timeline if p[0] >= t] or timeline[-1:]
    a, b = before[-1], after[0]
    if b[0] == a[0]:
        return float(a[1]), float(a[2])
    f = (t - a[0]) / (b[0] - a[0])
    return a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])


def measure(broker: str, n: int, rate: float, duration: float) -> dict[str, float]:
    root = f"qfbench{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        proc = ctx.Process(target=run_ingest, args=(
            broker, root, f"sqlite:///{Path(tmp) / 'fleet.db'}", ready, stop, out))
        proc.start()
        if not ready.wait(30):
            proc.kill()
            raise RuntimeError("the ingest process did not connect")
        sim = FleetSimulator(MqttConfig(broker=broker, topic_root=root), n,
                             baseline=BASELINE, requests_per_s=rate, seed=1)

        def events() -> int:
            return sum(d.seq for d in sim.devices.values())

        sim.start()  # births and states: 2 messages per device
        t0, p0, a0, e0 = time.time(), sim.published, sim.delivered, events()
        time.sleep(duration)
        t1, p1, a1, e1 = time.time(), sim.published, sim.delivered, events()
        sim.stop(clear_retained=False, drain_s=600)
        total = events()
        timeline: list[tuple[float, int, int]] = []
        caught_up = None
        # Wait for the ingest to commit everything, while it makes progress.
        last_progress, done = time.time(), -1
        while time.time() - last_progress < 15 and time.time() - t1 < 600:
            while not out.empty():
                timeline.append(out.get())
            if timeline and timeline[-1][2] > done:
                done, last_progress = timeline[-1][2], time.time()
            if done >= total:
                caught_up = timeline[-1][0]
                break
            time.sleep(0.2)
        stop.set()
        while (item := out.get(timeout=30)) is not None:
            timeline.append(item)
        proc.join(30)
    m0, i0 = _at(timeline, t0)
    m1, i1 = _at(timeline, t1)
    span = t1 - t0
    return {
        "devices": n, "offered": n * rate,
        "sim_msgs": (p1 - p0) / span, "sim_acked": (a1 - a0) / span,
        "sim_events": (e1 - e0) / span,
        "ingest_msgs": (m1 - m0) / span, "ingest_events": (i1 - i0) / span,
        "behind": e1 - i1, "catch_up_s": (caught_up - t1) if caught_up else float("nan"),
        "missing": total - timeline[-1][2],  # never committed: lost (or still queued)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1000,5000")
    ap.add_argument("--rate", type=float, default=2.0, help="Requests per second per device.")
    ap.add_argument("--duration", type=float, default=20.0, help="Seconds measured per size.")
    ap.add_argument("--broker", help="An existing broker (default: a private Mosquitto).")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, \
            _broker(args.broker, Path(tmp)) as broker:
        for n in (int(x) for x in args.devices.split(",")):
            rows.append(measure(broker, n, args.rate, args.duration))
            print(f"  {rows[-1]}", flush=True)
    print()
    print(f"{'devices':>8} {'offered ev/s':>13} | {'simulator ev/s':>14} {'msg/s':>7} "
          f"{'acked':>7} | {'ingest msg/s':>12} {'ev/s':>8} {'ratio':>6} | {'behind':>7} "
          f"{'catch-up':>9} {'missing':>7}")
    for r in rows:
        print(f"{r['devices']:>8,.0f} {r['offered']:>13,.0f} | {r['sim_events']:>14,.0f} "
              f"{r['sim_msgs']:>7,.0f} {r['sim_acked']:>7,.0f} | "
              f"{r['ingest_msgs']:>12,.0f} {r['ingest_events']:>8,.0f} "
              f"{r['ingest_events'] / r['sim_events']:>6.2f} | {r['behind']:>7,.0f} "
              f"{r['catch_up_s']:>8.1f}s {r['missing']:>7,.0f}")


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
