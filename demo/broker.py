"""The demo's private MQTT broker: Mosquitto when installed, else an embedded amqtt.

Mosquitto (MQTT 5) gets a generated config: one listener on 127.0.0.1 and a
free port, no persistence, and ``max_queued_messages 0`` so the fleet's
persistent session never drops a QoS 1 message (docs/fleet.md, "The broker").

Without Mosquitto the demo runs amqtt (``pip install 'quantfleet[demo]'``), a
Python broker that speaks MQTT 3.1.1 only, so the fleet, the agents and the
simulator are configured with protocol "3.1.1". amqtt has no shared
subscriptions: it grants ``$share/<group>/<filter>`` and then delivers nothing
to it. The fleet's ingest takes telemetry on a shared subscription, so the
embedded broker subscribes such a client to ``<filter>`` itself — exactly a
shared subscription with one member, which is what the demo's single fleet is.
It also fixes one amqtt 0.12.1 bug: on connect, a client was sent the retained
messages of every client's subscriptions, not only its own.

``python -m quantfleet.demo.broker --port N --dir DIR`` runs the embedded
broker (the demo starts it as a child process like every other part; DIR is
the run's broker folder, so ``pgrep -f <run directory>`` finds it too).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .processes import DemoError, ProcessGroup, free_port


@dataclass(frozen=True)
class BrokerInfo:
    url: str
    protocol: Literal["5", "3.1.1"]
    description: str


def mosquitto_config(port: int, log_file: Path) -> str:
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        # As root, mosquitto would switch to the "mosquitto" user and lose the log file.
        "user root" if os.geteuid() == 0 else "",
        "persistence false",
        # The fleet's persistent session must never lose a queued QoS 1 message.
        "max_queued_messages 0",
        f"log_dest file {log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    return "\n".join(x for x in lines if x) + "\n"


def amqtt_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


def start_broker(procs: ProcessGroup, run_dir: Path,
                 kind: Literal["auto", "mosquitto", "amqtt"] = "auto") -> BrokerInfo:
    """Start the broker as a child of ``procs``; return how to reach it."""
    mosquitto = shutil.which("mosquitto")
    if kind == "mosquitto" and not mosquitto:
        raise DemoError("--broker mosquitto: mosquitto is not installed "
                        "(apt-get install mosquitto)")
    if kind == "amqtt" and not amqtt_available():
        raise DemoError("--broker amqtt: amqtt is not installed "
                        "(pip install 'quantfleet[demo]')")
    if kind == "auto" and not mosquitto and not amqtt_available():
        raise DemoError("no MQTT broker: install mosquitto (apt-get install mosquitto) or "
                        "the embedded one (pip install 'quantfleet[demo]')")
    port = free_port()
    broker_dir = run_dir / "broker"
    broker_dir.mkdir(parents=True, exist_ok=True)
    if mosquitto and kind in ("auto", "mosquitto"):
        conf = broker_dir / "mosquitto.conf"
        conf.write_text(mosquitto_config(port, broker_dir / "mosquitto.log"))
        child = procs.start("broker", [mosquitto, "-c", str(conf)])
        procs.wait_tcp(child, port)
        version = subprocess.run([mosquitto, "-h"], capture_output=True, text=True,
                                 check=False).stdout.splitlines()[:1]
        what = version[0].strip() if version else "mosquitto"
        return BrokerInfo(f"mqtt://127.0.0.1:{port}", "5",
                          f"{what} (private, 127.0.0.1:{port}, MQTT 5)")
    child = procs.start("broker", [sys.executable, "-m", "quantfleet.demo.broker",
                                   "--port", str(port), "--dir", str(broker_dir)])
    procs.wait_tcp(child, port, timeout=30)
    why = "chosen with --broker amqtt" if mosquitto else "mosquitto is not installed"
    return BrokerInfo(f"mqtt://127.0.0.1:{port}", "3.1.1",
                      f"embedded amqtt (127.0.0.1:{port}, MQTT 3.1.1; {why})")


def run_embedded(port: int, workdir: Path) -> None:
    """Serve amqtt on 127.0.0.1:``port`` until SIGTERM; the config it ran is kept in
    ``workdir``."""
    import asyncio
    import logging
    import signal

    from amqtt.broker import Broker

    class SingleFleetBroker(Broker):  # type: ignore[misc]
        async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
            topic_filter, qos = subscription
            if topic_filter.startswith("$share/"):
                # $share/<group>/<filter>: one subscriber per group here, so the
                # plain filter delivers what the shared subscription would.
                topic_filter = topic_filter.split("/", 2)[2]
            granted: int = await super().add_subscription((topic_filter, qos), session)
            return granted

        async def _publish_retained_messages_for_subscription(
                self, subscription: tuple[str, int], session: Any) -> None:
            # amqtt 0.12.1 calls this on every connect for *every* client's filters,
            # so a device would get the retained messages other clients subscribed to
            # (another device's desired state). Only the session's own filters count.
            subscribers = self._subscriptions.get(subscription[0], [])
            if any(s.client_id == session.client_id for s, _ in subscribers):
                await super()._publish_retained_messages_for_subscription(subscription,
                                                                          session)

    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                    {"allow_anonymous": True}},
    }

    (workdir / "amqtt.json").write_text(json.dumps(config, indent=2) + "\n")

    async def main() -> None:
        broker = SingleFleetBroker(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await broker.start()
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())


if __name__ == "__main__":  # pragma: no cover - run as the demo's child process
    parser = argparse.ArgumentParser(description="The demo's embedded MQTT 3.1.1 broker.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="The run's broker folder.")
    args = parser.parse_args()
    run_embedded(args.port, args.dir)
