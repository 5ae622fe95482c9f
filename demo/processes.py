"""The demo's child processes: started with their own log, stopped without orphans.

Each child runs in its own session (so the terminal's Ctrl-C reaches only the
demo, which then stops the children in order) and, on Linux, asks the kernel
for SIGTERM should the demo itself die without cleaning up (``PR_SET_PDEATHSIG``).
``ProcessGroup.stop_all`` stops them newest first: SIGTERM to the child's whole
process group, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class DemoError(RuntimeError):
    """A step of the demo could not be carried out; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. If the demo is SIGKILLed its
    # finally-blocks never run; the kernel then sends the child SIGTERM.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ProcessGroup:
    """Every process the demo started, stopped newest first by ``stop_all``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        try:
            proc = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as exc:
            log_file.close()
            raise DemoError(f"{name}: cannot start {argv[0]} ({exc})") from None
        child = Child(name, list(argv), proc, log_path, log_file)
        self.children.append(child)
        return child

    def get(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(name)

    def check(self) -> None:
        """Raise if a child has exited; the message carries the end of its log."""
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise DemoError(f"{c.name} exited with status {code}; the end of "
                                f"{c.log_path}:\n{c.tail()}")

    def wait_tcp(self, child: Child, port: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"{child.name} is not listening on port {port} after "
                                f"{timeout:.0f} s; see {child.log_path}")
            time.sleep(0.1)

    def wait_http(self, child: Child, url: str, timeout: float = 60) -> None:
        """Until ``url`` answers 200 (the fleet's and the agent's /healthz)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise DemoError(f"{child.name}: {url} did not answer 200 within "
                                f"{timeout:.0f} s; the end of {child.log_path}:\n{child.tail()}")
            time.sleep(0.25)

    def stop(self, child: Child, grace_s: float = 15) -> None:
        proc = child.proc
        try:
            if proc.poll() is None:
                # The whole group: a child's own children go too.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s; killing it", child.name,
                                grace_s)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            # A child that exited on its own may leave its group behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            child.log_file.close()

    def stop_all(self, grace_s: float = 15) -> None:
        """Newest first; every child is stopped even when stopping another fails."""
        errors = []
        while self.children:
            child = self.children.pop()
            try:
                self.stop(child, grace_s)
            except Exception as exc:  # keep stopping the others
                errors.append(f"{child.name}: {exc}")
        if errors:
            raise DemoError("could not stop: " + "; ".join(errors))
