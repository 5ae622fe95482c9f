"""Stop strings for streamed text, the same for every backend.

A stop string may arrive split across tokens, so the scanner holds back the
shortest tail that could still grow into one and releases it once it cannot.
Nothing after a stop string (nor the stop string itself) is ever emitted.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._emitted: list[str] = []
        self._held = ""
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def _holdback(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit now, whether a stop was hit)."""
        if self.stopped:
            return "", True
        buf = self._held + piece
        cut = -1
        for stop in self.stops:
            i = buf.find(stop)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.stopped = True
            self._held = ""
            out = buf[:cut]
            self._emitted.append(out)
            return out, True
        keep = self._holdback(buf)
        out = buf[: len(buf) - keep]
        self._held = buf[len(buf) - keep:]
        self._emitted.append(out)
        return out, False

    def flush(self, extra: str = "") -> str:
        """End of generation: release what was held back (and any final bytes)."""
        if self.stopped:
            return ""
        out, hit = self.feed(extra)
        if not hit:
            out += self._held
            self._emitted.append(self._held)
            self._held = ""
        return out
