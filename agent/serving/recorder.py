"""Where per-request telemetry events go: a small interface and two simple sinks.

``Recorder`` is the seam: ``record(event)`` must be cheap and must not raise
into the request path; ``close()`` flushes. ``durable(timeout)`` returns once
everything recorded so far survives a crash of the process (True), or False
after ``timeout`` or when it cannot; the request path calls it before an
answer leaves, so no answered request lacks its event. A sink that keeps
nothing durable answers True at once. ``MemoryRecorder`` keeps the
latest events (tests, ``/metrics`` debugging); ``JsonlRecorder`` appends one
JSON line per event. The durable SQLite outbox (telemetry) implements the
same protocol and replaces them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path
from typing import Protocol, runtime_checkable

from quantfleet.agent.wire import RequestEvent

log = logging.getLogger(__name__)


@runtime_checkable
class Recorder(Protocol):
    def record(self, event: RequestEvent) -> None: ...

    def close(self) -> None: ...


def durable(recorder: object, timeout: float) -> bool:
    """``recorder.durable(timeout)`` where the recorder has it (True otherwise)."""
    wait = getattr(recorder, "durable", None)
    return True if wait is None else bool(wait(timeout))


def keeps_durably(recorder: object) -> bool:
    """Whether waiting for ``durable`` can matter (a sink of it keeps events durably)."""
    if isinstance(recorder, TeeRecorder):
        return any(keeps_durably(r) for r in recorder.recorders)
    return hasattr(recorder, "durable")


class MemoryRecorder:
    """The newest ``capacity`` events, in arrival order."""

    def __init__(self, capacity: int = 1000) -> None:
        self.events: deque[RequestEvent] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def record(self, event: RequestEvent) -> None:
        with self._lock:
            self.events.append(event)

    def snapshot(self) -> list[RequestEvent]:
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        pass


class JsonlRecorder:
    """Appends events to a file, one JSON object per line, flushed per event."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def record(self, event: RequestEvent) -> None:
        line = event.model_dump_json() + "\n"
        with self._lock:
            if self._fh.closed:
                log.warning("event %s recorded after close; dropped", event.request_id)
                return
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


class TeeRecorder:
    """Sends each event to several recorders; one failing does not stop the others."""

    def __init__(self, *recorders: Recorder) -> None:
        self.recorders = recorders

    def record(self, event: RequestEvent) -> None:
        for rec in self.recorders:
            try:
                rec.record(event)
            except Exception:  # telemetry must never fail a request
                log.exception("recorder %s failed", type(rec).__name__)

    def durable(self, timeout: float) -> bool:
        return all([durable(rec, timeout) for rec in self.recorders])

    def close(self) -> None:
        for rec in self.recorders:
            rec.close()
