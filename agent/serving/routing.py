"""Which variant answers: tiers, the fallback, and the loaded models behind them.

Routing policy: a request names a quality tier (header or the ``quantfleet``
field; ``default`` otherwise); ``config.routing.tiers`` maps each tier to
``active``, ``fallback`` or a variant name. A request may also name a loaded
variant directly as its ``model``. When an answer fails validation, the
agent retries once on ``models.fallback`` (unless the answer already came
from it).

Hot swap (``swap``, the updater's activation): the new variant's lane is
loaded beside the old one, then ``active`` points at it in one step of the
event loop. Routing a request and taking its place in a lane never yield in
between, so every request is either on the old lane (and finishes there) or
on the new one. The old lane is closed once nothing runs or waits on it —
unless the fallback or a tier still routes to it.

Memory policy: with ``fallback_load = "lazy"`` (the default) the fallback
costs nothing until the first answer needs it: that request waits for the
load (``load_seconds``, reported in its event) and the fallback stays loaded
until ``fallback_idle_s`` pass without a use. ``"on_demand"`` unloads it
after every fallback (one model's memory, a load per fallback). With
``"eager"`` every routed variant is loaded at start, unless the available
memory (psutil) cannot hold them all with headroom: then the fallback is
lazy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from quantfleet.agent.backends import Backend, LoadOptions, load_backend
from quantfleet.agent.config import AgentConfig
from quantfleet.models.catalog import Catalog

from .admission import Lane, Rejected, home_thread

log = logging.getLogger(__name__)

Loader = Callable[[str], Backend]  # canonical variant name -> a loaded backend
MEMORY_HEADROOM = 1.5  # a model needs its file mmapped plus KV cache and scratch


class UnknownTier(ValueError):
    pass


class ModelSet:
    def __init__(self, config: AgentConfig, canonical: Mapping[str, str],
                 loader: Loader | None = None, on_demand: Sequence[str] = (),
                 keep_s: float = 0.0) -> None:
        self.config = config
        self.canonical = dict(canonical)  # configured name or alias -> canonical name
        self.lanes: dict[str, Lane] = {}
        self.loader = loader
        self.on_demand = set(on_demand)  # loaded when a request needs them
        # How long an on-demand variant stays loaded after its last use (0: unloaded at
        # once; the lazy policy keeps it for models.fallback_idle_s).
        self.keep_s = keep_s
        self.load_seconds: dict[str, float] = {}  # variant -> its last load's duration
        self._last_used: dict[str, float] = {}
        self._unloads: dict[str, asyncio.TimerHandle] = {}  # variant -> its idle check
        self._tasks: set[asyncio.Task[None]] = set()
        self.owned = True  # close() frees the backends only when this set loaded them
        self._load_lock = asyncio.Lock()
        self._swap_lock = asyncio.Lock()
        self.swaps = 0

    # -- construction -------------------------------------------------
    @classmethod
    def from_backends(cls, config: AgentConfig,
                      backends: Mapping[str, Backend | Sequence[Backend]]) -> ModelSet:
        """Already loaded backends, keyed by the names the config uses (tests, benches)."""
        models = cls(config, {name: name for name in backends})
        models.owned = False
        for name, b in backends.items():
            instances = [b] if isinstance(b, Backend) else list(b)
            models.lanes[name] = Lane(name, instances, config.concurrency.queue_size)
        return models

    @classmethod
    def load(cls, config: AgentConfig, catalog: Catalog | None = None) -> ModelSet:
        catalog = catalog or Catalog(config.models.dir)
        canonical: dict[str, str] = {}
        paths: dict[str, tuple[str, Path, int]] = {}
        for name in config.variant_names():
            entry = catalog.resolve(name)  # CatalogError names the missing variant
            canonical[name] = entry.name
            canonical[entry.name] = entry.name
            paths[entry.name] = (entry.backend, entry.path(catalog.dir), entry.size_bytes)
        options = LoadOptions(n_ctx=config.models.n_ctx, n_threads=config.models.threads)

        def loader(variant: str) -> Backend:
            if variant not in paths:  # e.g. a variant the updater installed since the start
                entry = Catalog(catalog.dir).resolve(variant)
                paths[variant] = (entry.backend, entry.path(catalog.dir), entry.size_bytes)
            kind, path, _ = paths[variant]
            return load_backend(kind, path, options)

        active = canonical[config.models.active]
        fallback = canonical.get(config.models.fallback or "")
        on_demand: list[str] = []
        policy = config.models.fallback_load
        if fallback and fallback != active and policy == "eager" and not _memory_allows(
                [paths[v][2] for v in set(canonical.values())]):
            log.warning("fallback %s will be loaded at its first use: the available memory "
                        "cannot hold every variant with %.1fx headroom", fallback,
                        MEMORY_HEADROOM)
            policy = "lazy"
        if fallback and fallback != active and policy != "eager":
            on_demand.append(fallback)
        keep_s = config.models.fallback_idle_s if policy == "lazy" else 0.0
        models = cls(config, canonical, loader, on_demand, keep_s)
        for variant in dict.fromkeys(canonical.values()):
            if variant in on_demand:
                continue
            models._load_sync(variant)
        return models

    def _load_sync(self, variant: str) -> Lane:
        started = time.monotonic()
        lane = self._new_lane(variant)
        self.load_seconds[variant] = time.monotonic() - started
        self.lanes[variant] = lane
        return lane

    def _new_lane(self, variant: str) -> Lane:
        """Load the variant's instances, each on the thread it will always run on
        (load and warm-up included; see ``Lane``)."""
        assert self.loader is not None
        loader = self.loader
        instances: list[Backend] = []
        homes = []
        try:
            for i in range(self.config.models.workers_per_model):
                home = home_thread(variant, i)
                homes.append(home)
                instances.append(home.submit(loader, variant).result())
        except BaseException:
            Lane(variant, instances, 0, homes[:len(instances)]).close()
            for home in homes[len(instances):]:
                home.shutdown(wait=False)
            raise
        log.info("loaded %s (%d worker(s))", variant, len(instances))
        return Lane(variant, instances, self.config.concurrency.queue_size, homes)

    # -- hot swap ---------------------------------------------------------
    async def swap(self, variant: str, settle_timeout_s: float | None = None) -> str | None:
        """Serve ``variant`` (a catalog name) as the active variant; return the previous one.

        In-flight and queued requests finish on the old lane; new ones go to the
        new lane; no request is refused because of the swap. Loading failures
        raise before anything changes.
        """
        async with self._swap_lock:
            old = self.active
            if variant == old and variant in self.lanes:
                return old
            lane = self.lanes.get(variant)
            if lane is None:
                if self.loader is None:
                    raise RuntimeError(f"cannot load {variant}: this model set has no loader")
                lane = await asyncio.to_thread(self._new_lane, variant)
                self.lanes[variant] = lane
            # One step of the event loop: from here on every new request routes to it.
            self.on_demand.discard(variant)
            self.canonical[variant] = variant
            self.config.models.active = variant
            self.swaps += 1
            log.info("hot swap: %s -> %s", old, variant)
            needed = {self.canonical.get(n, n) for n in self.config.variant_names()}
            if old in needed or old not in self.lanes:
                return old  # still routed (fallback or a tier): keep it loaded
            for name, target in list(self.canonical.items()):
                if target == old:
                    del self.canonical[name]
            await self._retire(old, settle_timeout_s)
            return old

    async def _retire(self, variant: str, timeout_s: float | None) -> None:
        """Close a lane once nothing runs or waits on it (requests have deadlines)."""
        lane = self.lanes[variant]
        limit = timeout_s if timeout_s is not None else self.config.concurrency.deadline_s + 30
        end = asyncio.get_running_loop().time() + limit
        while lane.in_flight > 0 or lane.queue_depth > 0:
            if asyncio.get_running_loop().time() > end:
                log.warning("%s still has %d running, %d queued after %.0f s; kept loaded",
                            variant, lane.in_flight, lane.queue_depth, limit)
                return
            await asyncio.sleep(0.05)
        del self.lanes[variant]
        await asyncio.to_thread(lane.close, self.owned)
        log.info("retired %s after the swap", variant)

    # -- routing --------------------------------------------------------
    def name(self, configured: str | None) -> str | None:
        if configured is None:
            return None
        return self.canonical.get(configured, configured)

    @property
    def active(self) -> str:
        return self.name(self.config.models.active) or self.config.models.active

    @property
    def fallback(self) -> str | None:
        return self.name(self.config.models.fallback)

    def for_tier(self, tier: str) -> str:
        if tier not in self.config.routing.tiers:
            known = ", ".join(sorted(self.config.routing.tiers))
            raise UnknownTier(f"unknown quality tier {tier!r} (known: {known})")
        target = self.config.route(tier)
        return self.name(target) or self.active

    def for_model(self, model: str) -> str | None:
        """A request's ``model`` naming a served variant, else None (route by tier)."""
        if model in self.canonical:
            return self.canonical[model]
        return None

    def served(self) -> list[str]:
        return list(dict.fromkeys(self.canonical.values()))

    @property
    def ready(self) -> bool:
        return self.active in self.lanes

    async def lane(self, variant: str) -> Lane:
        lane = self.lanes.get(variant)
        if lane is not None:
            return lane
        if variant not in self.on_demand or self.loader is None:
            raise Rejected(503, "not_loaded", f"variant {variant} is not loaded", 5)
        async with self._load_lock:
            lane = self.lanes.get(variant)
            if lane is None:
                lane = await asyncio.to_thread(self._load_sync, variant)
            return lane

    async def done_with(self, variant: str) -> None:
        """Unload an on-demand variant once nothing uses it: now, or ``keep_s`` after
        its last use."""
        if variant not in self.on_demand:
            return
        self._last_used[variant] = time.monotonic()
        if self.keep_s <= 0:
            await self._unload_if_idle(variant)
            return
        if variant not in self._unloads:  # one pending check per variant, however busy
            self._check_later(variant, self.keep_s)

    def _check_later(self, variant: str, delay_s: float) -> None:
        loop = asyncio.get_running_loop()

        def check() -> None:
            del self._unloads[variant]
            idle_s = time.monotonic() - self._last_used.get(variant, 0.0)
            if idle_s < self.keep_s:  # used since: look again once it has been idle enough
                self._check_later(variant, self.keep_s - idle_s)
                return
            task = loop.create_task(self._unload_if_idle(variant))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._unloads[variant] = loop.call_later(delay_s, check)

    async def _unload_if_idle(self, variant: str) -> None:
        lane = self.lanes.get(variant)
        if lane is None or variant not in self.on_demand or lane.in_flight or lane.queue_depth:
            return
        if time.monotonic() - self._last_used.get(variant, 0.0) < self.keep_s:
            return  # used again since: a later check unloads it
        del self.lanes[variant]
        await asyncio.to_thread(lane.close)
        log.info("unloaded on-demand variant %s (%s)", variant,
                 f"unused for {self.keep_s:.0f} s" if self.keep_s else "after its use")

    def close(self) -> None:
        for handle in self._unloads.values():
            handle.cancel()
        self._unloads.clear()
        for lane in self.lanes.values():
            lane.close(self.owned)
        self.lanes.clear()


def _memory_allows(sizes: Sequence[int]) -> bool:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the agent extra
        return True
    return bool(psutil.virtual_memory().available > MEMORY_HEADROOM * sum(sizes))
