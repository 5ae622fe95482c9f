"""What one fleet ingest process commits when the broker has a backlog for it.

    python bench/bench_ingest.py [--messages 60000] [--events-per-message 2]
                                 [--devices 10000] [--stores sqlite,postgresql]

The ingest's capacity alone, with nothing else running: a private Mosquitto
queues ``--messages`` telemetry batches (each ``--events-per-message`` request
events, as the simulator and the agent write them; 2 is a device at 2 requests/s
flushing every second) for the ingest's persistent session while it is away;
then ``FleetIngest`` (tuned as ``quantfleet serve`` tunes it) connects and
drains them into a fresh store. Printed: events and messages committed per
second, and the ingest process's CPU time per event — what a core buys, to
extrapolate from (docs/scaling.md). ``bench_simulate.py`` measures the same
ingest live, beside the simulator on the same cores.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from bench_simulate import _store_url, private_broker
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.fleet.ingest import FleetIngest, tune_gc
from quantfleet.fleet.simulate import SimRequest, render_batch
from quantfleet.fleet.store import Store

#: paho numbers a client's unacknowledged messages with 16 bits: publish in chunks.
CHUNK = 20_000


def payloads(n: int, per_message: int, devices: int) -> list[tuple[str, bytes]]:
    rng = random.Random(1)
    seqs: dict[str, int] = {}
    out = []
    for i in range(n):
        dev = f"sim-{i % devices:05d}"
        reqs = []
        for _ in range(per_message):
            seqs[dev] = seq = seqs.get(dev, 0) + 1
            reqs.append(SimRequest(seq, rng.lognormvariate(-0.7, 0.3), rng.randint(20, 200),
                                   rng.random() > 0.05))
        out.append((dev, render_batch(dev, "smollm2-135m-Q4_K_M", 1, 1.7e9 + i, reqs)))
    return out


def fill(broker: str, root: str, msgs: list[tuple[str, bytes]]) -> None:
    host, port = broker.removeprefix("mqtt://").rsplit(":", 1)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fill-{root}",
                      protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect(host, int(port))
    pub.loop_start()
    try:
        for k in range(0, len(msgs), CHUNK):
            infos = [pub.publish(f"{root}/devices/{dev}/telemetry", body, qos=1)
                     for dev, body in msgs[k:k + CHUNK]]
            for info in infos:
                info.wait_for_publish(120)
    finally:
        pub.disconnect()
        pub.loop_stop()


def drain(broker: str, engine: str, msgs: list[tuple[str, bytes]], events: int,
          workdir: Path) -> dict[str, float]:
    root = f"qfbench{uuid.uuid4().hex[:8]}"
    cfg = MqttConfig(broker=broker, topic_root=root)
    with _store_url(engine, workdir) as url:
        store = Store(url)
        try:
            # The session (and its subscriptions) first, then the backlog it is away for.
            FleetIngest(store, cfg, client_id=f"drain-{root}", session_expiry_s=3600).start().stop()
            fill(broker, root, msgs)
            tune_gc()
            ingest = FleetIngest(store, cfg, client_id=f"drain-{root}", session_expiry_s=0)
            t0, c0 = time.perf_counter(), time.process_time()
            ingest.start()
            try:
                while ingest.stats.events_inserted < events and time.perf_counter() - t0 < 600:
                    time.sleep(0.02)
                span, cpu = time.perf_counter() - t0, time.process_time() - c0
                done, received = ingest.stats.events_inserted, ingest.stats.received
            finally:
                ingest.stop()
        finally:
            store.close()
    return {"events": done, "span": span, "ev_s": done / span, "msg_s": received / span,
            "cpu_us": cpu / max(done, 1) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=60_000)
    ap.add_argument("--events-per-message", type=int, default=2)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--stores", default="sqlite,postgresql")
    args = ap.parse_args()
    msgs = payloads(args.messages, args.events_per_message, args.devices)
    events = args.messages * args.events_per_message
    print(f"{args.messages:,} messages of {args.events_per_message} request events from "
          f"{args.devices:,} devices, queued by the broker, then drained by one ingest")
    print(f"{'store':<11} {'events/s':>9} {'messages/s':>11} {'CPU us/event':>13} "
          f"{'events per core-second':>23}")
    for engine in args.stores.split(","):
        with tempfile.TemporaryDirectory() as tmp, private_broker(Path(tmp)) as broker:
            r = drain(broker, engine, msgs, events, Path(tmp))
        if r["events"] < events:
            print(f"{engine}: only {r['events']:,} of {events:,} events in {r['span']:.0f} s")
        print(f"{engine:<11} {r['ev_s']:>9,.0f} {r['msg_s']:>11,.0f} {r['cpu_us']:>13.1f} "
              f"{1e6 / r['cpu_us']:>23,.0f}", flush=True)


if __name__ == "__main__":
    main()
