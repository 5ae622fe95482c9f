"""Garbage and poison mixed into good telemetry, through a broker into the fleet's ingest.

A device-side client publishes, at QoS 1 with 20 in flight, ``--garbage`` rejected
messages (not JSON, the wrong shape, a newer schema, another device's payload; with
``--poison``, also batches the store cannot hold: NaN and infinite timestamps, seqs
over 2**63, 3,000-deep payloads) with ``--good`` good batches spread evenly among
them; the fleet's ``FleetIngest`` (its writer, groups of 64, acknowledged after the
commit) stores them in SQLite. Prints the time from the first publish until every
message is applied and the delay of the good events (stored ``received_at`` minus the
time the batch was published): median, p99, max — and the same for the good batches
alone, first, as the baseline.

    python bench/bench_poison.py                        # 10,000 garbage, 500 good batches
    python bench/bench_poison.py --garbage 10000 --poison

The code before issue 14 had no --poison to survive (one NaN halts it); run the same
command with ``PYTHONPATH`` pointing at an older tree to compare (docs/telemetry.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.agent.wire import RequestEvent, device_topic
from quantfleet.fleet.ingest import FleetIngest
from quantfleet.fleet.store import Store


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A loopback mosquitto with the packaged config's queue: unlimited, so a slow
    ingest makes the broker hold messages, never drop them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    + ("user root\n" if os.geteuid() == 0 else "")
                    + "max_inflight_messages 20\nmax_queued_messages 0\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")

PER = 4  # events per good batch


def good_batch(device: str, first_seq: int) -> bytes:
    now = time.time()
    events = [{"boot_epoch": 1, "seq": first_seq + i, "kind": "request", "ts": now,
               "body": RequestEvent(request_id=f"r{first_seq + i}", ts=now, variant="Q4_K_M",
                                    latency_s=0.4).model_dump(mode="json")}
              for i in range(PER)]
    return json.dumps({"schema_version": 1, "type": "batch", "device_id": device,
                       "sent_at": now, "historical": False, "events": events}).encode()


def garbage(i: int, poison: bool, root: str) -> tuple[str, bytes]:
    topic = device_topic("bad", "telemetry", root)
    ok = json.loads(good_batch("bad", i + 1))
    kinds: list[bytes] = [
        b"{not json", b"null",
        json.dumps({**ok, "events": []}).encode(),
        json.dumps({**ok, "schema_version": 9}).encode(),
        json.dumps({**ok, "device_id": "other"}).encode(),
    ]
    if poison:
        nan = json.loads(good_batch("bad", i + 1))
        nan["events"][0]["ts"] = float("nan")
        big = json.loads(good_batch("bad", i + 1))
        big["events"][0]["seq"] = 2**63
        kinds += [json.dumps(nan).encode(), json.dumps(big).encode(), b"[" * 3000 + b"]" * 3000]
    return topic, kinds[i % len(kinds)]


def run(port: int, store: Store, n_garbage: int, n_good: int, poison: bool) -> dict[str, float]:
    root = f"bench/{uuid.uuid4().hex[:8]}/v1"
    fleet = FleetIngest(store, MqttConfig(broker=f"mqtt://127.0.0.1:{port}", topic_root=root),
                        client_id=f"fleet-{root}", share_group="", session_expiry_s=0).start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(20)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    good = f"good-{uuid.uuid4().hex[:6]}"
    good_topic = device_topic(good, "telemetry", root)
    every = max(1, n_garbage // max(1, n_good))
    total = n_garbage + n_good
    sent_good = 0
    start = time.time()
    try:
        infos = []
        g = 0
        for i in range(total):
            if sent_good < n_good and (i % (every + 1) == every or total - i <= n_good - sent_good):
                infos.append(pub.publish(good_topic, good_batch(good, sent_good * PER + 1), 1))
                sent_good += 1
            else:
                infos.append(pub.publish(*garbage(g, poison, root), qos=1))
                g += 1
            if len(infos) >= 200:  # paho queues without limit: keep it near the window
                infos.pop(0).wait_for_publish(30)
        for info in infos:
            info.wait_for_publish(30)
        deadline = time.time() + 300
        while fleet.stats.received < total:
            if time.time() > deadline:
                raise TimeoutError(f"{fleet.stats}")
            time.sleep(0.01)
        done = time.time()
    finally:
        pub.loop_stop()
        pub.disconnect()
        fleet.stop()
    with store.engine.connect() as conn:
        delays = [r[0] - r[1] for r in conn.execute(text(
            "SELECT received_at, ts FROM events WHERE device_id = :d"), {"d": good})]
    stored = len(delays)
    delays.sort()
    return {"messages": total, "seconds": done - start, "good_events": n_good * PER,
            "stored": stored, "median": statistics.median(delays) if delays else 0.0,
            "p99": delays[int(0.99 * (len(delays) - 1))] if delays else 0.0,
            "max": delays[-1] if delays else 0.0}


def show(label: str, r: dict[str, float]) -> None:
    print(f"{label:34}: {int(r['messages']):6d} messages in {r['seconds']:6.2f} s; good events "
          f"stored {int(r['stored'])}/{int(r['good_events'])}, delay median "
          f"{r['median'] * 1000:7.1f} ms, p99 {r['p99'] * 1000:7.1f} ms, max "
          f"{r['max'] * 1000:7.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--garbage", type=int, default=10_000)
    ap.add_argument("--good", type=int, default=500, help="good batches (4 events each)")
    ap.add_argument("--poison", action="store_true",
                    help="also batches the store cannot hold (NaN, 2**63, deep nesting)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_broker(Path(tmp))
        try:
            store = Store(f"sqlite:///{Path(tmp) / 'fleet.db'}")
            load = os.getloadavg()[0]
            print(f"(load average {load:.2f} on {os.cpu_count()} CPUs)")
            show("good batches alone", run(port, store, 0, args.good, False))
            label = f"{args.garbage} {'garbage+poison' if args.poison else 'garbage'} + good"
            show(label, run(port, store, args.garbage, args.good, args.poison))
            print(f"rejections recorded: {store.rejection_counts()}")
            store.close()
        finally:
            broker.terminate()
            broker.wait()


if __name__ == "__main__":
    main()
