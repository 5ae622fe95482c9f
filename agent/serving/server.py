"""Running the API under uvicorn as a long-lived service (``quantfleet-agent serve``).

``serve(config)`` loads the models in the background, signals systemd when
they are ready, pets the watchdog, and on SIGTERM/SIGINT stops admitting
(new requests get 503), lets in-flight requests finish for up to
``concurrency.drain_timeout_s``, cancels what is still running, flushes the
recorder and returns 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from quantfleet.agent.config import AgentConfig

from .api import AgentService, create_app
from .recorder import JsonlRecorder, MemoryRecorder, Recorder, TeeRecorder
from .routing import ModelSet
from .systemd import CleanStopServer, Notifier

log = logging.getLogger(__name__)


def build_recorder(config: AgentConfig, variant: Callable[[], str | None] = lambda: None,
                   *extra: Recorder) -> Recorder:
    """Memory, plus the JSON-lines file and the durable telemetry path when configured."""
    sinks: list[Recorder] = [MemoryRecorder(config.events.memory_events), *extra]
    if config.events.events_file is not None:
        sinks.append(JsonlRecorder(config.events.events_file))
    if config.telemetry is not None:
        from quantfleet.agent.telemetry.service import TelemetryService

        sinks.append(TelemetryService(config.telemetry, variant).start())
    return sinks[0] if len(sinks) == 1 else TeeRecorder(*sinks)


def _telemetry(recorder: Recorder) -> Any:
    """The durable telemetry path among the recorder's sinks, if configured."""
    from quantfleet.agent.telemetry.service import TelemetryService

    sinks = recorder.recorders if isinstance(recorder, TeeRecorder) else (recorder,)
    return next((s for s in sinks if isinstance(s, TelemetryService)), None)


class _DrainingServer(CleanStopServer):
    def __init__(self, config: uvicorn.Config, service: AgentService, notifier: Notifier
                 ) -> None:
        super().__init__(config)
        self.service = service
        self.notifier = notifier
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_exit: list[Callable[[], None]] = []  # quick, non-blocking stops

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        self.notifier.start_watchdog()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.notifier.stopping()
        for stop in self.on_exit:
            stop()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.service.begin_drain)
        super().handle_exit(sig, frame)  # a drained, flushed agent exits 0 on SIGTERM


def serve(config: AgentConfig, models: Callable[[], ModelSet] | None = None,
          log_level: str = "info") -> int:
    holder: list[AgentService] = []

    def active() -> str | None:
        models_ = holder[0].models if holder else None
        return models_.active if models_ is not None else None

    watch = None
    if config.update is not None:
        from quantfleet.agent.update.service import restore_known_good
        from quantfleet.agent.update.soak import SoakWatch

        restore_known_good(config)
        watch = SoakWatch()
    recorder = build_recorder(config, active, *([watch] if watch else []))
    app = create_app(config, models or (lambda: ModelSet.load(config)), recorder)
    service: AgentService = app.state.service
    holder.append(service)
    notifier = Notifier()
    updates: list[Any] = []

    def ready() -> None:
        assert service.models is not None
        notifier.ready(f"serving {service.models.active}")
        if watch is not None:
            from quantfleet.agent.update.service import DeviceUpdates

            telemetry = _telemetry(recorder)
            try:
                updates.append(DeviceUpdates(
                    config, service.models, asyncio.get_running_loop(), watch,
                    boot_epoch=telemetry.outbox.boot_epoch if telemetry else int(time.time()),
                    record=telemetry.outbox.append if telemetry else None).start())
            except Exception as exc:  # the agent keeps serving; updates are off
                log.error("device updates could not start: %s", exc)

    service.on_ready.append(ready)
    listen = config.listen
    uv = uvicorn.Config(
        app,
        host=listen.host,
        port=listen.port,
        uds=str(listen.unix_socket) if listen.unix_socket else None,
        log_level=log_level,
        access_log=False,
        ws="none",  # no websocket route: uvicorn need not import a websockets protocol
        lifespan="on",
        timeout_graceful_shutdown=int(max(1, config.concurrency.drain_timeout_s)),
    )
    server = _DrainingServer(uv, service, notifier)
    # An update in progress stops before the models it would swap are closed.
    def stop_updates() -> None:
        for u in updates:
            u.updater.stop()

    server.on_exit.append(stop_updates)
    try:
        server.run()
    finally:
        for u in updates:
            u.stop()
    notifier.stop_watchdog()
    if service.load_error:
        log.error("exiting: models did not load (%s)", service.load_error)
        return 1
    return 0
