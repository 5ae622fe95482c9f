"""No answered request without its event: the answer leaves only once the request's
event is committed to the outbox (issue 14, case 3), shown on a real
`quantfleet-agent serve` whose broker is unreachable (so every event stays in the
outbox to be counted), including across `kill -9` at random moments under load."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from .conftest import free_port
from .test_service import write_config


def _config(tmp_path: Path, ladder_dir: Path, *, commit_s: float, wait_s: float) -> Path:
    closed = free_port()  # nothing listens there: events stay in the outbox
    return write_config(
        tmp_path / "agent.toml", ladder_dir,
        events=f"durable_wait_s = {wait_s}",
        telemetry=(f'device_id = "durable-1"\nhealth_interval_s = 0\n'
                   f'[telemetry.mqtt]\nbroker = "mqtt://127.0.0.1:{closed}"\n'
                   f'[telemetry.outbox]\npath = "{tmp_path / "outbox.db"}"\n'
                   f"commit_interval_s = {commit_s}\n"))


def _start(spawn: Any, config: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = spawn(config, "--port", str(port), "--host", "127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < end, "the agent did not become ready"
        time.sleep(0.1)


def _stored(outbox: Path) -> set[str]:
    """Request ids committed to the outbox (read as a second process would)."""
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT item FROM outbox WHERE kind = 'request'").fetchall()
    return {json.loads(r[0])["body"]["request_id"] for r in rows}


def _ask(url: str, stream: bool) -> str | None:
    """One request; its id when it was answered (200, and the stream ran to [DONE])."""
    body = {"max_tokens": 2, "stream": stream,
            "messages": [{"role": "user", "content": "Say hi."}]}
    try:
        if not stream:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            return str(r.json()["id"]) if r.status_code == 200 else None
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = [ln for ln in r.iter_lines() if ln] if r.status_code == 200 else []
        if not lines or lines[-1] != "data: [DONE]":
            return None
        return str(json.loads(lines[0][6:])["id"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None  # the agent died mid-answer: not answered


def test_the_answer_leaves_after_its_event_is_committed(tmp_path: Path, ladder_dir: Path,
                                                         spawn: Any) -> None:
    # A 10 s commit interval: without the wait, nothing would be in the file yet.
    proc, url = _start(spawn, _config(tmp_path, ladder_dir, commit_s=10, wait_s=2.0))
    try:
        for i in range(6):
            answered = _ask(url, stream=bool(i % 2))
            assert answered is not None
            assert answered in _stored(tmp_path / "outbox.db"), i
        late = [line for line in httpx.get(url + "/metrics").text.splitlines()
                if line.startswith("quantfleet_events_not_durable_total")]
        assert all(float(line.split()[-1]) == 0 for line in late), late
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_without_the_wait_an_answer_can_leave_before_its_event(tmp_path: Path,
                                                                ladder_dir: Path,
                                                                spawn: Any) -> None:
    """The window the wait closes: durable_wait_s = 0 and a 10 s commit interval."""
    proc, url = _start(spawn, _config(tmp_path, ladder_dir, commit_s=10, wait_s=0))
    try:
        answered = [_ask(url, stream=False) for _ in range(3)]
        assert all(answered)
        assert not set(answered) & _stored(tmp_path / "outbox.db")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert set(answered) <= _stored(tmp_path / "outbox.db")  # the clean stop committed them


def test_kill_9_under_load_never_loses_an_answered_request(tmp_path: Path, ladder_dir: Path,
                                                            spawn: Any,
                                                            fault_record: Any) -> None:
    config = _config(tmp_path, ladder_dir, commit_s=1.0, wait_s=2.0)
    rng = random.Random(7)
    answered: list[str] = []
    kills = 6
    for _ in range(kills):
        proc, url = _start(spawn, config)
        stop = threading.Event()

        def load(u: str = url, s: threading.Event = stop) -> None:
            n = 0
            while not s.is_set():
                got = _ask(u, stream=bool(n % 3 == 0))
                if got is not None:
                    answered.append(got)
                n += 1

        clients = [threading.Thread(target=load, daemon=True) for _ in range(3)]
        for c in clients:
            c.start()
        time.sleep(rng.uniform(0.5, 2.5))  # a random moment, under load
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for c in clients:
            c.join(35)
    assert len(answered) >= kills, "the load produced almost no answers"
    lost = set(answered) - _stored(tmp_path / "outbox.db")
    fault_record(f"agent kill -9 under HTTP load, {kills} times (answered requests)",
                 produced=len(set(answered)), stored=len(set(answered)) - len(lost))
    assert not lost, f"{len(lost)} of {len(answered)} answered requests have no event"
