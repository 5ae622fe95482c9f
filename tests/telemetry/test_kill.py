"""A real telemetry process killed with SIGKILL mid-stream, then restarted."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import wait_until
from .helpers import FleetSide


def _run(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "quantfleet.agent.telemetry", "run", "--config", str(config),
         "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_sigkill_mid_stream_then_restart_delivers_every_committed_event(
        tmp_path: Path, topic_root: str, fault_record: Any) -> None:
    device = "dev-kill"
    outbox = tmp_path / "outbox.db"
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[telemetry]
device_id = "{device}"
health_interval_s = 0
aggregate_interval_s = 3600

[telemetry.mqtt]
broker = "mqtt://127.0.0.1:1883"
topic_root = "{topic_root}"

[telemetry.outbox]
path = "{outbox}"
commit_interval_s = 0.1

[telemetry.publisher]
backoff_initial_s = 0.1
backoff_max_s = 1.0
will_delay_s = 0
""")
    store = FleetSide(tmp_path, topic_root).start()
    first = second = None
    try:
        first = _run(config, "--synthetic-rate", "3000", "--synthetic-count", "10000000")
        wait_until(lambda: store.event_count(device) >= 3000, timeout=90,
                   what="events before the kill")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        assert first.returncode == -signal.SIGKILL

        # What the killed process had committed: its seq counter and its leftover rows.
        with sqlite3.connect(outbox) as db:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        committed = meta["next_seq"] - 1
        epoch1 = meta["boot_epoch"]
        assert committed > store.event_count(device) - 1 >= 2999

        second = _run(config, "--synthetic-count", "500", "--exit-when-drained")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err.decode()[-2000:]
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert summary["rows"] == 0 and summary["appended"] == 500
        epoch2 = summary["boot_epoch"]
        assert epoch2 > epoch1

        wait_until(lambda: store.event_count(device) == summary["committed_seq"],
                   what="every committed event of both runs")
        fault_record("telemetry process kill -9 mid-stream (committed events)",
                     produced=summary["committed_seq"], stored=store.event_count(device))
        # Every event the killed run committed arrived — once (the key forbids twice).
        boot1 = [e["seq"] for e in store.events(device) if e["boot_epoch"] == epoch1]
        assert boot1 == list(range(1, committed + 1))
        # The restart continued the sequence and delivered its own 500 requests.
        boot2 = list(store.events(device))[committed:]
        assert [e["seq"] for e in boot2] == list(range(committed + 1,
                                                       summary["committed_seq"] + 1))
        assert sum(e["kind"] == "request" for e in boot2) == 500
        assert store.gaps(device) == []
        # The Will of the killed run never overrides the newer start's statuses.
        wait_until(lambda: (store.status(device) or {}).get("boot_epoch") == epoch2,
                   what="status of the second run")
        assert store.status(device)["state"] == "offline"  # type: ignore[index]
        assert store.status(device)["reason"] == "shutdown"  # type: ignore[index]
    finally:
        for proc in (first, second):  # whatever the outcome, nothing is left running
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        store.stop()
