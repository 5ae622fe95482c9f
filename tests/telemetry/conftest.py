"""Telemetry fixtures: a private Mosquitto that tests may stop, restart and reconfigure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import free_port


class Mosquitto:
    """A real mosquitto on a free port, with a generated config and persistence."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.acl_file: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, acl: str | None = None, tls_listener: str | None = None) -> None:
        """The default config; ``acl`` adds an ACL file, ``tls_listener`` a second listener
        (its lines given whole, with ``per_listener_settings``)."""
        lines = [
            "per_listener_settings true" if tls_listener else "",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "user root" if os.geteuid() == 0 else "",
            "persistence true",
            f"persistence_location {self.dir}/",
            # The subscriber's persistent session must hold a whole outage.
            "max_queued_messages 0",
            "max_inflight_messages 20",
            f"log_dest file {self.dir}/mosquitto.log",
            "log_type all",
        ]
        if acl is not None:
            self.acl_file = self.dir / "acl"
            self.acl_file.write_text(acl)
            lines.append(f"acl_file {self.acl_file}")
        if tls_listener:
            lines.append(tls_listener)
        self.conf.write_text("\n".join(x for x in lines if x) + "\n")

    def start(self) -> None:
        if not self.conf.exists():
            self.write_config()
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file (sessions, queued messages) on exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="session")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """ONE private mosquitto per session, for the tests that stop or reconfigure it.

    Tests that change it must leave it running with the default config.
    """
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.write_config()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def topic_root() -> str:
    """A unique topic root per test, so tests sharing a broker never see each other."""
    return f"qftest-{uuid.uuid4().hex[:10]}/v1"


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.05,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)
