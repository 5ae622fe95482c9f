"""Backpressure: bounded concurrency per loaded variant, a bounded priority queue.

A ``Lane`` owns the worker instances of one variant (each a loaded backend
context; a backend is not thread-safe, so one generation per instance). A
request either takes a free instance, waits in the lane's queue (higher
priority first, then arrival order), or is refused at once:

- the queue is full -> ``Rejected(429, ...)`` with a ``Retry-After`` estimated
  from the recent service time and the queue ahead;
- the lane is draining (SIGTERM) or was never loaded -> ``Rejected(503, ...)``;
- the request's deadline passes while queued -> ``Rejected(503, ...)``.

An instance taken from a lane is a :class:`Lease`: work on it runs in a worker
thread, and ``Lease.release`` gives it back exactly once — at once when nothing
runs on it, else when that work ends — so whatever goes wrong in a request, its
instance returns to the lane, and never while a thread still uses it.

Memory stays bounded because nothing waits beyond ``queue_size`` per lane.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from quantfleet.agent.backends.base import Backend

PRIORITIES = {"high": 0, "normal": 1, "low": 2}

T = TypeVar("T")


class Rejected(Exception):
    def __init__(self, status: int, reason: str, message: str, retry_after_s: int | None = None
                 ) -> None:
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(message)


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[Backend] = field(compare=False)


def _handed(future: asyncio.Future[Backend]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def home_thread(variant: str, index: int) -> ThreadPoolExecutor:
    """The one OS thread an instance of ``variant`` is loaded, warmed up and run on."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{variant}-{index}")


class Lane:
    """The loaded instances of one variant, each with its home thread.

    An instance is loaded, warmed up and used on one OS thread only (``home``):
    llama.cpp's thread pool (OpenMP) keeps a team per calling thread, and a model
    warmed up on one thread and then driven from others ran with two teams on two
    cores that slept between tokens (issue 16: the agent's generating threads at
    79 %/74 % CPU against 96 %/90 % for llama-cpp-python's own server).
    """

    def __init__(self, variant: str, instances: Sequence[Backend], queue_size: int,
                 homes: Sequence[ThreadPoolExecutor] | None = None) -> None:
        self.variant = variant
        self.instances = list(instances)
        threads = list(homes) if homes is not None else [
            home_thread(variant, i) for i in range(len(self.instances))]
        if len(threads) != len(self.instances):
            raise ValueError("one home thread per instance")
        self._homes = {id(b): t for b, t in zip(self.instances, threads, strict=True)}
        self.queue_size = queue_size
        self._free = list(instances)
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self.draining = False
        # Mean service time (exponentially weighted), for Retry-After.
        self.service_s = 2.0
        self.in_flight = 0

    def home(self, backend: Backend) -> ThreadPoolExecutor:
        """The thread ``backend`` (an instance of this lane) runs its work on."""
        return self._homes[id(backend)]

    def close(self, close_instances: bool = True) -> None:
        """Close each instance on its home thread (``close_instances``), then the threads."""
        for b in self.instances:
            home = self._homes[id(b)]
            if close_instances:
                home.submit(b.close).result()
            home.shutdown(wait=True, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return sum(1 for w in self._waiters if not w.future.done())

    def retry_after(self) -> int:
        ahead = self.queue_depth + self.in_flight
        return max(1, math.ceil(self.service_s * ahead / max(1, len(self.instances))))

    async def acquire(self, priority: int, deadline: float) -> Backend:
        if self.draining:
            raise Rejected(503, "draining", "the agent is shutting down", self.retry_after())
        if self._free and not self.queue_depth:
            self.in_flight += 1
            return self._free.pop()
        if self.queue_depth >= self.queue_size:
            raise Rejected(429, "queue_full",
                           f"variant {self.variant} is busy ({self.in_flight} running, "
                           f"{self.queue_depth} queued)", self.retry_after())
        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, next(self._seq), loop.create_future())
        heapq.heappush(self._waiters, waiter)
        timeout = deadline - time.monotonic()
        try:
            backend = await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, timeout))
        except TimeoutError:
            if _handed(waiter.future):
                # Handed an instance in the same instant the deadline passed: give it back.
                self.release(waiter.future.result(), 0.0)
            waiter.future.cancel()
            raise Rejected(503, "deadline", "the request's deadline passed while queued",
                           self.retry_after()) from None
        except asyncio.CancelledError:
            if _handed(waiter.future):
                self.release(waiter.future.result(), 0.0)
            waiter.future.cancel()
            raise
        except Rejected:
            raise
        return backend

    def release(self, backend: Backend, service_s: float | None) -> None:
        """Give an instance back (``service_s``: how long it was used, for estimates)."""
        self.in_flight -= 1
        if service_s:
            self.service_s = 0.8 * self.service_s + 0.2 * service_s
        while self._waiters:
            waiter = heapq.heappop(self._waiters)
            if not waiter.future.done():
                self.in_flight += 1
                waiter.future.set_result(backend)
                return
        self._free.append(backend)

    def drain(self) -> None:
        """Refuse new work and everyone still queued; running generations continue."""
        self.draining = True
        while self._waiters:
            waiter = heapq.heappop(self._waiters)
            if not waiter.future.done():
                waiter.future.set_exception(
                    Rejected(503, "draining", "the agent is shutting down", 1))

    async def idle(self, timeout: float) -> bool:
        """Wait until nothing runs on this lane (True) or ``timeout`` passes (False)."""
        end = time.monotonic() + timeout
        while self.in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return self.in_flight == 0


class Lease:
    """One instance of a lane, held by one request until ``release``."""

    def __init__(self, lane: Lane, backend: Backend) -> None:
        self.lane = lane
        self.backend = backend
        self.released = False
        self._running: asyncio.Future[Any] | None = None
        self._release_wanted = False
        self._busy_s = 0.0

    def run(self, executor: Executor, work: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``work`` (which uses the instance) in a worker thread; one at a time."""
        if self.released or self._running is not None:
            raise RuntimeError(f"the lease on {self.lane.variant} is not free to run work")
        start = time.monotonic()
        fut = asyncio.get_running_loop().run_in_executor(executor, work)
        self._running = fut

        def ended(_: object) -> None:
            self._running = None
            self._busy_s += time.monotonic() - start
            if self._release_wanted:
                self._give_back()

        fut.add_done_callback(ended)
        return fut

    def release(self) -> None:
        """Give the instance back now, or when the work running on it ends. Idempotent."""
        self._release_wanted = True
        if self._running is None:
            self._give_back()

    def _give_back(self) -> None:
        if not self.released:
            self.released = True
            self.lane.release(self.backend, self._busy_s or None)
