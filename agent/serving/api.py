"""The local OpenAI-compatible HTTP API (Starlette): the agent's front door.

``create_app(config, models, recorder=None)`` builds the app. ``models`` is a
:class:`ModelSet` (already loaded) or a zero-argument callable that loads one:
it then loads in the background and ``/healthz`` answers 503 until it is done.

Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events; the
request path is :class:`.handler.ChatHandler`), ``GET /v1/models``, ``GET
/healthz``, ``GET /metrics``, ``GET /openapi.json`` (:mod:`.openapi`). Every
error is the OpenAI error body.
:class:`AgentService` holds what the endpoints share: the loaded models and
their lanes, quotas, metrics, the recorder, the worker threads and draining.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from quantfleet.agent.config import AgentConfig

from . import openapi, pipeline
from .admission import Lane, Lease
from .budgets import QuotaBook
from .handler import DEFAULT_MODEL_ALIASES, ApiError, ChatHandler
from .metrics import Metrics, agent_metrics
from .pipeline import Completion, Prepared
from .protocol import ChatRequest, error_body
from .recorder import MemoryRecorder, Recorder
from .routing import ModelSet

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL_ALIASES", "AgentService", "ApiError", "create_app"]


class AgentService:
    """State shared by the endpoints: models, quotas, metrics, recorder, drain."""

    def __init__(self, config: AgentConfig, recorder: Recorder, metrics: Metrics) -> None:
        self.config = config
        self.recorder = recorder
        self.metrics = metrics
        self.models: ModelSet | None = None
        self.load_error: str | None = None
        self.quotas = QuotaBook(config.budgets.tokens_per_minute, config.budgets.tokens_per_day)
        self.draining = False
        self.token = config.bearer_token()
        self.api_keys = config.api_keys()
        self.cancels: set[threading.Event] = set()
        self.on_ready: list[Callable[[], None]] = []
        metrics.gauge("quantfleet_queue_depth", "Requests waiting for a worker, by variant.",
                      lambda: {(("variant", n),): float(lane.queue_depth)
                               for n, lane in self._lanes().items()})
        metrics.gauge("quantfleet_in_flight", "Generations running, by variant.",
                      lambda: {(("variant", n),): float(lane.in_flight)
                               for n, lane in self._lanes().items()})
        metrics.gauge("quantfleet_ready", "1 when the active variant is loaded.",
                      lambda: {(): 1.0 if self.ready else 0.0})

    def _lanes(self) -> dict[str, Lane]:
        return dict(self.models.lanes) if self.models else {}

    @property
    def ready(self) -> bool:
        return self.models is not None and self.models.ready and not self.draining

    # -- lifecycle ------------------------------------------------------
    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        for lane in self._lanes().values():
            lane.drain()
        log.info("draining: new requests are refused")

    async def drain(self, timeout: float) -> None:
        self.begin_drain()
        lanes = list(self._lanes().values())
        results = await asyncio.gather(*(lane.idle(timeout) for lane in lanes))
        if not all(results):
            log.warning("cancelling %d generation(s) still running after %.1f s",
                        len(self.cancels), timeout)
            for ev in list(self.cancels):
                ev.set()
            await asyncio.gather(*(lane.idle(5.0) for lane in lanes))

    def close(self) -> None:
        if self.models is not None:
            self.models.close()
        self.recorder.close()

    # -- request pieces ---------------------------------------------------
    def authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if bearer and bearer in self.api_keys:
            return str(self.api_keys[bearer])
        if self.token is not None or self.api_keys:
            if not bearer:
                raise ApiError(401, "missing bearer token (Authorization: Bearer ...)",
                               code="invalid_api_key")
            if bearer != self.token:
                raise ApiError(401, "invalid bearer token", code="invalid_api_key")
        return request.headers.get(self.config.auth.client_header, "") or "anonymous"

    async def admit(self, variant: str, priority: int, deadline: float) -> Lease:
        assert self.models is not None
        lane = await self.models.lane(variant)
        return Lease(lane, await lane.acquire(priority, deadline))

    async def prepare(self, lease: Lease, request: ChatRequest) -> Prepared:
        """Budgets, template and constraint, in a worker thread: fitting a long
        conversation renders and tokenizes it, which must not stall the event loop."""
        return await lease.run(lease.lane.home(lease.backend),
                               lambda: pipeline.prepare(request, lease.backend, self.config))

    async def generate(self, lease: Lease, prepared: Prepared, deadline: float,
                       on_text: Callable[[str], None] | None = None,
                       ) -> tuple[asyncio.Future[Completion], threading.Event]:
        """Start generating in a worker thread; the instance returns to the lane when it ends."""
        cancel = threading.Event()
        self.cancels.add(cancel)
        fut = lease.run(lease.lane.home(lease.backend), lambda: pipeline.run(
            prepared, lease.backend, cancel=cancel, deadline=deadline, on_text=on_text))
        fut.add_done_callback(lambda _: self.cancels.discard(cancel))
        lease.release()
        return fut, cancel


def create_app(config: AgentConfig, models: ModelSet | Callable[[], ModelSet],
               recorder: Recorder | None = None, metrics: Metrics | None = None) -> Starlette:
    """The agent's ASGI app. Starlette alone: the chat route reads and validates its body
    itself (``protocol``) and the OpenAPI document is built by :mod:`.openapi`, so a
    framework's injection and schema generator would only cost memory (issue 16)."""
    service = AgentService(config, recorder or MemoryRecorder(config.events.memory_events),
                           metrics or agent_metrics())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader_task = None
        if isinstance(models, ModelSet):
            service.models = models
            for cb in service.on_ready:
                cb()
        else:
            async def load() -> None:
                try:
                    service.models = await asyncio.to_thread(models)
                except Exception as exc:  # reported on /healthz and in the log
                    service.load_error = str(exc)
                    log.error("loading models failed: %s", exc)
                    return
                for cb in service.on_ready:
                    cb()
            loader_task = asyncio.create_task(load())
        try:
            yield
        finally:
            if loader_task is not None:
                loader_task.cancel()
            await service.drain(config.concurrency.drain_timeout_s)
            await asyncio.to_thread(service.close)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=code),
                            status_code=exc.status_code, headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    async def healthz(request: Request) -> Response:
        if service.ready:
            assert service.models is not None
            return JSONResponse({"status": "ready", "active": service.models.active,
                                 "loaded": sorted(service.models.lanes)})
        status = "draining" if service.draining else (
            "failed" if service.load_error else "loading")
        return JSONResponse({"status": status, "error": service.load_error}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    async def list_models(request: Request) -> Response:
        try:
            service.authenticate(request)
        except ApiError as exc:
            return exc.response()
        names = service.models.served() if service.models else []
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "quantfleet",
             "loaded": bool(service.models and n in service.models.lanes)} for n in names]})

    spec = openapi.document(auth=service.token is not None or bool(service.api_keys))

    async def openapi_document(request: Request) -> Response:
        return JSONResponse(spec)

    app = Starlette(
        routes=[Route("/healthz", healthz, methods=["GET"]),
                Route("/metrics", metrics_endpoint, methods=["GET"]),
                Route("/v1/models", list_models, methods=["GET"]),
                Route("/v1/chat/completions", ChatHandler(service).handle, methods=["POST"]),
                Route("/openapi.json", openapi_document, methods=["GET"])],
        exception_handlers={StarletteHTTPException: http_error, Exception: internal_error},
        lifespan=lifespan)
    app.state.service = service
    return app
