"""systemd integration: readiness, the watchdog, and a graceful stop on SIGTERM.

``Notifier`` speaks the sd_notify protocol (through ``sdnotify``); without
``$NOTIFY_SOCKET`` every call is a no-op, so the same code runs under systemd,
in a container, or in a terminal. ``READY=1`` is sent once the model is
loaded (not when the socket opens), ``WATCHDOG=1`` every half of
``$WATCHDOG_USEC`` from the event loop itself — a wedged loop stops petting
and systemd restarts the service — and ``STOPPING=1`` when SIGTERM arrives.
Every message is sent without blocking: a notification socket whose reader
has fallen behind (a datagram queue holds ten messages by default) drops the
message, logged, instead of stopping the event loop that serves every request
(it did, mid-stream during a drain, with a reader that had stopped reading).

``CleanStopServer`` is a uvicorn server that exits normally on SIGTERM once
its shutdown has run. uvicorn re-raises a captured SIGTERM after its own
shutdown, so the process would die "by SIGTERM" (status 143) before any
``finally`` after ``server.run()`` — where a service closes its MQTT sessions
and flushes — could run; systemd then logs a failure for an ordered stop.
Both ``quantfleet-agent serve`` and ``quantfleet serve`` run on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._socket: socket.socket | None = None
        self.dropped = 0
        if self.enabled:
            import sdnotify

            try:
                self._socket = sdnotify.SystemdNotifier(debug=True).socket
            except OSError as exc:
                log.warning("cannot reach $NOTIFY_SOCKET %s (%s): systemd will not hear "
                            "readiness or the watchdog", os.environ.get("NOTIFY_SOCKET"), exc)
            else:
                self._socket.setblocking(False)
        self._task: asyncio.Task[None] | None = None

    def notify(self, state: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send(state.encode("utf-8"))
        except BlockingIOError:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("systemd's notification socket is full: %r dropped (%d so far)",
                            state.split("\n")[0], self.dropped)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", state.split("\n")[0], exc)

    def ready(self, status: str = "serving") -> None:
        self.notify(f"READY=1\nSTATUS={status}")
        log.info("ready: %s", status)

    def stopping(self) -> None:
        self.notify("STOPPING=1\nSTATUS=draining")

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half the watchdog timeout, or None when systemd set no watchdog for us."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
            return None
        try:
            return max(0.05, int(usec) / 2_000_000)
        except ValueError:
            return None

    def start_watchdog(self) -> None:
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return

        async def pet() -> None:
            while True:
                self.notify("WATCHDOG=1")
                await asyncio.sleep(interval)

        self._task = asyncio.get_running_loop().create_task(pet())

    def stop_watchdog(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class CleanStopServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM ends ``run()`` normally, after the shutdown."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [s for s in captured if s != signal.SIGTERM]
