"""The device's telemetry path in one object: outbox, publisher, aggregates, health.

``TelemetryService`` is a serving ``Recorder``: ``record(event)`` keeps the raw
event and folds it into the minute aggregates; ``close()`` commits, publishes
an explicit offline status and stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from quantfleet.agent.hardware import fingerprint
from quantfleet.agent.telemetry.aggregates import MinuteAggregator
from quantfleet.agent.telemetry.config import TelemetryConfig
from quantfleet.agent.telemetry.health import HealthSampler
from quantfleet.agent.telemetry.outbox import Outbox
from quantfleet.agent.telemetry.publisher import Publisher
from quantfleet.agent.wire import RequestEvent

log = logging.getLogger(__name__)


class TelemetryService:
    """Outbox + publisher + periodic aggregates, health samples and device status."""

    def __init__(self, cfg: TelemetryConfig,
                 variant: Callable[[], str | None] = lambda: None) -> None:
        self.cfg = cfg
        self._variant = variant
        o = cfg.outbox
        self.outbox = Outbox(cfg.outbox_path(), cfg.device_id, max_bytes=o.max_bytes,
                             commit_interval_s=o.commit_interval_s, max_buffered=o.max_buffered,
                             min_free_bytes=o.min_free_bytes)
        self.publisher = Publisher(self.outbox, cfg.mqtt, cfg.publisher, labels=cfg.labels,
                                   hardware=fingerprint())
        self.aggregator = MinuteAggregator(self.outbox.append)
        self.health = HealthSampler(cfg.outbox_path()) if cfg.health_interval_s > 0 else None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="telemetry-ticker", daemon=True)

    def start(self) -> TelemetryService:
        self.outbox.start()
        self.publisher.start()
        self._ticker.start()
        return self

    def record(self, event: RequestEvent) -> None:
        self.outbox.record(event)
        try:
            self.aggregator.record(event)
        except Exception:  # never into the request path
            log.exception("aggregating request %s failed", event.request_id)

    def durable(self, timeout: float) -> bool:
        """Every request recorded so far is committed to the outbox (group commit)."""
        return self.outbox.wait_committed(timeout=timeout)

    def queue_device_status(self) -> None:
        p = self.publisher
        self.outbox.append(self.outbox.device_status(
            published_batches=p.published_batches,
            failed_pubacks={f"0x{k:02x}": v for k, v in p.failed_pubacks.items()},
            variant=self._variant()))

    def _tick(self) -> None:
        next_agg = time.monotonic() + self.cfg.aggregate_interval_s
        hi = self.cfg.health_interval_s
        next_health = time.monotonic() if hi > 0 else float("inf")
        while not self._stop.wait(max(0.0, min(next_agg, next_health) - time.monotonic())):
            now = time.monotonic()
            try:
                if now >= next_agg:
                    self.aggregator.flush()
                    self.queue_device_status()
                    next_agg = now + self.cfg.aggregate_interval_s
                if self.health is not None and now >= next_health:
                    self.outbox.append(self.health.sample())
                    next_health = now + hi
            except Exception:
                log.exception("telemetry ticker")

    def close(self, timeout: float = 10.0) -> None:
        """Queue what is aggregated so far, let the publisher drain, go offline, stop."""
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(timeout)
        self.aggregator.flush(everything=True)
        self.outbox.flush()
        self.publisher.stop(timeout)
        self.outbox.close()
