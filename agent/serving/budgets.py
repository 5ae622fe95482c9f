"""Token budgets: prompt assembly, the max_tokens ceiling, and per-client quotas.

Pure arithmetic over data (the token counter and the clock are passed in), so
the policy is testable without a model.

Assembly policy (``fit_messages``): system messages always stay, and so does
the newest message; the oldest other turns are dropped until the rendered
prompt fits the budget — as few as possible, as if dropped one at a time, but
found by a guided binary search: O(log n) renders of the conversation, not n
(one per dropped turn made 2,000 short turns take minutes). If the system messages and the newest
turn alone do not fit, ``BudgetExceeded`` says by how many tokens — the
caller answers 400, because silently cutting the question itself would
answer a different question.

Quotas (``QuotaBook``): tokens (prompt + completion) per client over a
rolling minute and a rolling day. A client over either limit is refused with
the number of seconds until enough of its usage ages out (``Retry-After``).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

M = TypeVar("M")


class BudgetExceeded(ValueError):
    def __init__(self, needed: int, budget: int) -> None:
        self.needed = needed
        self.budget = budget
        super().__init__(
            f"the prompt needs {needed} tokens even after dropping older turns, "
            f"{needed - budget} over the budget of {budget}; shorten the system message "
            f"or the last message"
        )


@dataclass(frozen=True)
class Fit:
    messages: list[M]  # type: ignore[valid-type]
    dropped: int
    prompt_tokens: int


def is_pinned(role: str) -> bool:
    return role in ("system", "developer")


def fit_messages(
    messages: Sequence[M],
    count: Callable[[list[M]], int],
    budget: int,
    role_of: Callable[[M], str],
    size_of: Callable[[M], int] | None = None,
) -> Fit:
    """Drop the oldest unpinned turns until ``count(kept) <= budget``.

    The answer is the one-at-a-time loop's (drop the oldest candidate, recount,
    repeat: the fewest dropped turns that fit), found with O(log n) calls of
    ``count`` instead of n, on the premise that dropping a turn never adds tokens.
    ``size_of`` (a message's rough size, e.g. its length) guides the first guess;
    with it a conversation of similar turns fits in four or five counts.
    """
    tokens = count(list(messages))
    if tokens <= budget:
        return Fit(list(messages), 0, tokens)
    # The newest message is never a candidate: it is the question.
    candidates = [i for i, m in enumerate(messages[:-1]) if not is_pinned(role_of(m))]
    counted = {0: tokens}

    def kept(k: int) -> list[M]:
        gone = set(candidates[:k])
        return [m for i, m in enumerate(messages) if i not in gone]

    def tokens_without(k: int) -> int:
        if k not in counted:
            counted[k] = count(kept(k))
        return counted[k]

    n = len(candidates)
    if tokens_without(n) > budget:
        raise BudgetExceeded(counted[n], budget)
    lo, hi = 0, n  # tokens_without(lo) > budget >= tokens_without(hi)
    # First guess: the candidates' tokens shared out by size; then its neighbours.
    sizes = [size_of(messages[i]) if size_of else 1 for i in candidates]
    per_size = (counted[0] - counted[n]) / max(1, sum(sizes))
    guess, freed = 0, 0.0
    while guess < n and counted[0] - freed > budget:
        freed += sizes[guess] * per_size
        guess += 1
    probes = [guess, guess - 1, guess + 1]
    while hi - lo > 1:
        mid = next((p for p in probes if lo < p < hi), (lo + hi) // 2)
        probes = [p for p in probes if p != mid]
        if tokens_without(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return Fit(kept(hi), hi, counted[hi])


def clamp_max_tokens(requested: int | None, default: int, ceiling: int) -> tuple[int, bool]:
    """(max_tokens to use, whether the request's value was clamped)."""
    if requested is None:
        return min(default, ceiling), False
    if requested > ceiling:
        return ceiling, True
    return requested, False


class QuotaExceeded(Exception):
    def __init__(self, client: str, window: str, limit: int, retry_after_s: int) -> None:
        self.client = client
        self.window = window
        self.retry_after_s = retry_after_s
        super().__init__(
            f"client {client!r} used its {limit} tokens per {window}; retry in {retry_after_s} s"
        )


class QuotaBook:
    """Rolling per-client token usage. Thread-safe; memory bounded by ``max_clients``."""

    MINUTE = 60.0
    DAY = 86400.0

    def __init__(self, per_minute: int, per_day: int, *, max_clients: int = 10_000,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.per_minute = per_minute
        self.per_day = per_day
        self.max_clients = max_clients
        self.clock = clock or time.monotonic
        # client -> deque of [second, tokens], coalesced per second so a day
        # holds at most 86 400 entries per client whatever the request rate.
        self._usage: OrderedDict[str, deque[list[float]]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.per_minute or self.per_day)

    def _window(self, usage: deque[list[float]], now: float, span: float) -> tuple[int, float]:
        """(tokens used in the last ``span`` seconds, time of the oldest such entry)."""
        total = 0
        oldest = now
        for ts, tokens in reversed(usage):
            if ts <= now - span:
                break
            total += int(tokens)
            oldest = ts
        return total, oldest

    def check(self, client: str) -> None:
        """Raise ``QuotaExceeded`` when the client may not start a request now."""
        if not self.enabled:
            return
        now = self.clock()
        with self._lock:
            usage = self._usage.get(client)
            if not usage:
                return
            while usage and usage[0][0] <= now - self.DAY:
                usage.popleft()
            for limit, span, name in ((self.per_minute, self.MINUTE, "minute"),
                                      (self.per_day, self.DAY, "day")):
                if not limit:
                    continue
                used, _ = self._window(usage, now, span)
                if used >= limit:
                    raise QuotaExceeded(client, name, limit,
                                        self._retry_after(usage, now, span, used - limit + 1))

    def _retry_after(self, usage: deque[list[float]], now: float, span: float,
                     excess: int) -> int:
        """Seconds until at least ``excess`` tokens of the window have aged out."""
        freed = 0
        for ts, tokens in usage:
            if ts <= now - span:
                continue
            freed += int(tokens)
            if freed >= excess:
                return max(1, math.ceil(ts + span - now))
        return max(1, math.ceil(span))

    def charge(self, client: str, tokens: int) -> None:
        if not self.enabled or tokens <= 0:
            return
        now = self.clock()
        second = math.floor(now)
        with self._lock:
            usage = self._usage.get(client)
            if usage is None:
                usage = self._usage[client] = deque()
                while len(self._usage) > self.max_clients:
                    self._usage.popitem(last=False)
            self._usage.move_to_end(client)
            if usage and usage[-1][0] == second:
                usage[-1][1] += tokens
            else:
                usage.append([float(second), float(tokens)])

    def used(self, client: str, window: str = "minute") -> int:
        span = self.MINUTE if window == "minute" else self.DAY
        with self._lock:
            usage = self._usage.get(client)
            return self._window(usage, self.clock(), span)[0] if usage else 0
