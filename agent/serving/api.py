"""The local OpenAI-compatible HTTP API (FastAPI): the agent's front door.

``create_app(config, models, recorder=None)`` builds the app. ``models`` is a
:class:`ModelSet` (already loaded) or a zero-argument callable that loads one:
it then loads in the background and ``/healthz`` answers 503 until it is done.

Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events),
``GET /v1/models``, ``GET /healthz``, ``GET /metrics``. Every error is the
OpenAI error body. The request path is: authenticate -> read (size-capped)
-> parse (protocol) -> route (tier/model) -> quota -> prepare (budgets,
template, constraint; pipeline) -> admit (lane) -> generate in a worker
thread -> validate -> maybe fall back once -> answer -> record one event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantfleet.agent.backends.base import Backend, BackendError
from quantfleet.agent.chat import ChatTemplateError
from quantfleet.agent.config import AgentConfig
from quantfleet.agent.wire import RequestEvent, ValidationOutcome

from .admission import PRIORITIES, Lane, Rejected
from .budgets import BudgetExceeded, QuotaBook, QuotaExceeded
from .metrics import Metrics, agent_metrics
from .pipeline import Completion, Prepared, prepare, run
from .protocol import ChatRequest, error_body
from .recorder import MemoryRecorder, Recorder
from .routing import ModelSet, UnknownTier

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = ("", "default", "auto", "quantfleet")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        hdrs = dict(headers or {})
        if self.retry_after_s is not None:
            hdrs["Retry-After"] = str(self.retry_after_s)
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=hdrs)


@dataclass
class Draft:
    """What the request event will say, filled in as the request goes."""

    request_id: str
    ts: float
    start: float
    variant: str = ""
    tier: str = "default"
    client: str | None = None
    stream: bool = False
    queue_wait_s: float = 0.0
    truncated: int = 0
    clamped: bool = False
    attempt_tokens: int = 0
    fallback_from: str | None = None
    validations: list[ValidationOutcome] = field(default_factory=list)
    first_validations: list[ValidationOutcome] = field(default_factory=list)


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
        self.executor = ThreadPoolExecutor(max_workers=4 * config.models.workers_per_model + 2,
                                           thread_name_prefix="generate")
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
        self.executor.shutdown(wait=True, cancel_futures=True)
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

    def record(self, draft: Draft, status: int, *, error_class: str | None = None,
               completion: Completion | None = None, prompt_tokens: int = 0) -> None:
        latency = time.monotonic() - draft.start
        result = completion.result if completion else None
        ttft = None
        if result is not None and result.time_to_first_token_s is not None:
            ttft = draft.queue_wait_s + result.time_to_first_token_s
        event = RequestEvent(
            request_id=draft.request_id, ts=draft.ts, variant=draft.variant, tier=draft.tier,
            client=draft.client, status=status, error_class=error_class,
            queue_wait_s=draft.queue_wait_s, time_to_first_token_s=ttft, latency_s=latency,
            prompt_tokens=result.prompt_tokens if result else prompt_tokens,
            completion_tokens=result.completion_tokens if result else 0,
            tokens_per_second=result.tokens_per_second if result else 0.0,
            finish_reason=completion.finish_reason if completion else None,
            stream=draft.stream, constraint=result.constraint if result else "none",
            truncated_messages=draft.truncated, max_tokens_clamped=draft.clamped,
            validations=draft.validations, fallback_from=draft.fallback_from,
            fallback_validations=draft.first_validations,
            attempt_tokens=draft.attempt_tokens,
        )
        self.recorder.record(event)
        m = self.metrics
        variant = draft.variant or "none"
        m.inc("quantfleet_requests_total", variant=variant, status=str(status))
        m.observe("quantfleet_request_latency_seconds", latency, variant=variant)
        if status >= 400 and error_class:
            if status in (429, 503):
                m.inc("quantfleet_rejections_total", reason=error_class)
            return
        if result is not None:
            m.inc("quantfleet_tokens_total", result.prompt_tokens, variant=variant, kind="prompt")
            m.inc("quantfleet_tokens_total", result.completion_tokens, variant=variant,
                  kind="completion")
        if ttft is not None:
            m.observe("quantfleet_time_to_first_token_seconds", ttft, variant=variant)
        m.observe("quantfleet_queue_wait_seconds", draft.queue_wait_s, variant=variant)
        for attempt, outcomes in (("final", draft.validations),
                                  ("first", draft.first_validations)):
            for o in outcomes:
                m.inc("quantfleet_validation_outcomes_total", kind=o.kind,
                      result="pass" if o.passed else "fail", attempt=attempt)
        if draft.truncated:
            m.inc("quantfleet_truncations_total", draft.truncated, kind="dropped_messages")
        if draft.clamped:
            m.inc("quantfleet_truncations_total", kind="max_tokens_clamped")

    async def generate(self, lane: Lane, backend: Backend, prepared: Prepared, deadline: float,
                       on_text: Callable[[str], None] | None = None,
                       ) -> tuple[asyncio.Future[Completion], threading.Event]:
        """Start generating in a worker thread; the instance returns to the lane when it ends."""
        cancel = threading.Event()
        self.cancels.add(cancel)
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        fut = loop.run_in_executor(self.executor, lambda: run(
            prepared, backend, cancel=cancel, deadline=deadline, on_text=on_text))

        def done(_: object) -> None:
            self.cancels.discard(cancel)
            lane.release(backend, time.monotonic() - start)

        fut.add_done_callback(done)
        return fut, cancel

    async def admit(self, variant: str, priority: int, deadline: float
                    ) -> tuple[Lane, Backend]:
        assert self.models is not None
        lane = await self.models.lane(variant)
        backend = await lane.acquire(priority, deadline)
        return lane, backend


def _pydantic_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in ("function-after",)) or None
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    return (f"{loc}: {msg}" if loc else msg), loc


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit}",
                       code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                           code="body_too_large")
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        data = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(data).__name__}")
    return data


def _parse(data: dict[str, Any]) -> ChatRequest:
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        message, param = _pydantic_message(exc)
        raise ApiError(400, message, param=param) from None
    except RecursionError:
        raise ApiError(400, "request is nested too deeply") from None


def _reject(exc: Rejected) -> ApiError:
    type_ = "rate_limit_error" if exc.status == 429 else "service_unavailable"
    return ApiError(exc.status, str(exc), type_, code=exc.reason, retry_after_s=exc.retry_after_s)


def create_app(config: AgentConfig, models: ModelSet | Callable[[], ModelSet],
               recorder: Recorder | None = None, metrics: Metrics | None = None) -> FastAPI:
    service = AgentService(config, recorder or MemoryRecorder(config.events.memory_events),
                           metrics or agent_metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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

    app = FastAPI(title="quantfleet agent", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=code),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if service.ready:
            assert service.models is not None
            return JSONResponse({"status": "ready", "active": service.models.active,
                                 "loaded": sorted(service.models.lanes)})
        status = "draining" if service.draining else (
            "failed" if service.load_error else "loading")
        return JSONResponse({"status": status, "error": service.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            service.authenticate(request)
        except ApiError as exc:
            return exc.response()
        names = service.models.served() if service.models else []
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "quantfleet",
             "loaded": bool(service.models and n in service.models.lanes)} for n in names]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        draft = Draft(request_id="chatcmpl-" + uuid.uuid4().hex[:24], ts=time.time(),
                      start=time.monotonic())
        try:
            return await _chat(request, draft)
        except ApiError as exc:
            service.record(draft, exc.status, error_class=exc.code or exc.type)
            return exc.response({"X-Request-Id": draft.request_id})

    async def _chat(request: Request, draft: Draft) -> Response:
        draft.client = service.authenticate(request)
        data = await _read_json(request, config.listen.max_body_bytes)
        req = _parse(data)
        draft.stream = req.stream
        if service.draining:
            raise ApiError(503, "the agent is shutting down", "service_unavailable",
                           code="draining", retry_after_s=5)
        if service.models is None or not service.models.ready:
            raise ApiError(503, "no model is loaded yet", "service_unavailable",
                           code="not_ready", retry_after_s=5)
        models_ = service.models
        opts = req.quantfleet
        draft.tier = (request.headers.get(config.routing.tier_header)
                      or (opts.tier if opts and opts.tier else None) or "default")
        try:
            variant = models_.for_model(req.model)
            if variant is None:
                if req.model not in DEFAULT_MODEL_ALIASES:
                    known = ", ".join(["default", *models_.served()])
                    raise ApiError(404, f"model {req.model!r} is not served here "
                                   f"(known: {known})", param="model", code="model_not_found")
                variant = models_.for_tier(draft.tier)
        except UnknownTier as exc:
            raise ApiError(400, str(exc), param="quantfleet.tier") from None
        draft.variant = variant
        try:
            service.quotas.check(draft.client)
        except QuotaExceeded as exc:
            raise ApiError(429, str(exc), "rate_limit_error", code="quota_exceeded",
                           retry_after_s=exc.retry_after_s) from None
        prio_name = (request.headers.get(config.concurrency.priority_header, "").lower()
                     or (opts.priority if opts and opts.priority else "normal"))
        if prio_name not in PRIORITIES:
            raise ApiError(400, f"priority {prio_name!r} is not one of high, normal, low",
                           param=config.concurrency.priority_header)
        deadline_s = config.concurrency.deadline_s
        if opts and opts.deadline_s:
            deadline_s = min(deadline_s, opts.deadline_s)
        deadline = draft.start + deadline_s

        try:
            lane, backend = await service.admit(variant, PRIORITIES[prio_name], deadline)
        except Rejected as exc:
            raise _reject(exc) from None
        draft.queue_wait_s = time.monotonic() - draft.start
        try:
            prepared = prepare(req, backend, config)
        except BudgetExceeded as exc:
            lane.release(backend, None)
            raise ApiError(400, str(exc), param="messages",
                           code="context_length_exceeded") from None
        except (ChatTemplateError, BackendError) as exc:
            lane.release(backend, None)
            raise ApiError(400, f"messages: {exc}", param="messages") from None
        draft.truncated = prepared.dropped_messages
        draft.clamped = prepared.max_tokens_clamped
        if req.stream:
            return await _stream(req, draft, lane, backend, prepared, deadline)
        fut, cancel = await service.generate(lane, backend, prepared, deadline)
        watcher = asyncio.create_task(_watch_disconnect(request, fut, cancel))
        try:
            completion = await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except BackendError as exc:
            raise ApiError(500, f"generation failed: {exc}", "server_error",
                           code="backend_error") from None
        finally:
            watcher.cancel()
            if models_.on_demand:
                await models_.done_with(variant)
        draft.attempt_tokens = completion.result.prompt_tokens + \
            completion.result.completion_tokens
        if completion.finish_reason == "cancelled" and watcher.done() and \
                not watcher.cancelled() and watcher.result():
            # Nobody is listening any more; 499 as proxies log it, for the event only.
            service.quotas.charge(draft.client or "anonymous", draft.attempt_tokens)
            draft.validations = completion.validations
            service.record(draft, 499, error_class="client_disconnected",
                           completion=completion)
            return Response(status_code=499)
        if completion.finish_reason == "cancelled":
            service.quotas.charge(draft.client or "anonymous", draft.attempt_tokens)
            draft.validations = completion.validations
            raise ApiError(504, f"the request's deadline of {deadline_s:g} s passed after "
                           f"{completion.result.completion_tokens} tokens", "timeout",
                           code="deadline")
        completion = await _maybe_fallback(req, draft, completion, deadline)
        service.quotas.charge(draft.client or "anonymous", draft.attempt_tokens)
        draft.validations = completion.validations
        service.record(draft, 200, completion=completion)
        return JSONResponse(_response_body(draft, completion), headers=_headers(draft))

    async def _maybe_fallback(req: ChatRequest, draft: Draft, first: Completion,
                              deadline: float) -> Completion:
        assert service.models is not None
        fallback = service.models.fallback
        wanted = set(config.validation.fallback_on)
        failed = [o.kind for o in first.validations if not o.passed and o.kind in wanted]
        allowed = not (req.quantfleet and not req.quantfleet.fallback)
        if not failed or not allowed or fallback is None or fallback == draft.variant:
            return first
        log.info("%s: %s failed %s; retrying on %s", draft.request_id, draft.variant,
                 ",".join(failed), fallback)
        try:
            lane, backend = await service.admit(fallback, PRIORITIES["high"], deadline)
        except Rejected as exc:
            log.warning("fallback to %s refused (%s); answering with the first attempt",
                        fallback, exc)
            return first
        try:
            prepared = prepare(req, backend, config)
        except (BudgetExceeded, ChatTemplateError, BackendError) as exc:
            lane.release(backend, None)
            log.warning("fallback prepare failed: %s", exc)
            return first
        fut, cancel = await service.generate(lane, backend, prepared, deadline)
        try:
            second = await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            await service.models.done_with(fallback)
        service.metrics.inc("quantfleet_fallbacks_total", **{"from": draft.variant,
                                                             "to": fallback})
        draft.attempt_tokens += second.result.prompt_tokens + second.result.completion_tokens
        # Both attempts' outcomes are kept: the first one's failures are the evidence.
        draft.fallback_from = draft.variant
        draft.variant = fallback
        draft.first_validations = first.validations
        return second

    async def _stream(req: ChatRequest, draft: Draft, lane: Lane, backend: Backend,
                      prepared: Prepared, deadline: float) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        buffered = bool(prepared.spec.tools)  # tool calls are sent whole, at the end

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        fut, cancel = await service.generate(lane, backend, prepared, deadline, on_text)
        fut.add_done_callback(lambda _: queue.put_nowait(None))

        def finished(f: asyncio.Future[Completion]) -> None:
            # Runs whether the client stayed or left: the event is always recorded.
            if f.cancelled() or f.exception() is not None:
                service.record(draft, 500, error_class="backend_error")
                return
            completion = f.result()
            draft.attempt_tokens = completion.result.prompt_tokens + \
                completion.result.completion_tokens
            draft.validations = completion.validations
            service.quotas.charge(draft.client or "anonymous", draft.attempt_tokens)
            service.record(draft, 200, completion=completion,
                           error_class="client_disconnected" if cancel.is_set() else None)

        fut.add_done_callback(finished)
        created = int(draft.ts)

        def chunk(delta: dict[str, Any], finish: str | None = None,
                  usage: dict[str, int] | None = None) -> str:
            body: dict[str, Any] = {
                "id": draft.request_id, "object": "chat.completion.chunk", "created": created,
                "model": draft.variant,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": None}] if usage is None else [],
            }
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    piece = await queue.get()
                    if piece is None:
                        break
                    if not buffered:
                        yield chunk({"content": piece})
                try:
                    completion = fut.result()
                except Exception as exc:  # the status line is sent: report in-band, end
                    log.exception("%s: generation failed mid-stream", draft.request_id)
                    yield "data: " + json.dumps(error_body(
                        f"generation failed: {type(exc).__name__}", "server_error",
                        code="backend_error")) + "\n\n"
                    return
                if buffered:
                    if completion.tool_calls:
                        yield chunk({"tool_calls": [{"index": i, **c} for i, c in
                                                    enumerate(completion.tool_calls)]})
                    else:
                        yield chunk({"content": completion.text})
                finish = completion.finish_reason
                if finish == "cancelled":
                    finish = "length"  # the deadline cut it; OpenAI clients know "length"
                yield chunk({}, finish)
                if req.stream_options and req.stream_options.include_usage:
                    r = completion.result
                    yield chunk({}, None, {"prompt_tokens": r.prompt_tokens,
                                           "completion_tokens": r.completion_tokens,
                                           "total_tokens": r.prompt_tokens +
                                           r.completion_tokens})
                yield "data: [DONE]\n\n"
            finally:
                if not fut.done():
                    # The client went away mid-stream: stop generating at the next token.
                    log.info("%s: client disconnected; cancelling", draft.request_id)
                    cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**_headers(draft), "Cache-Control": "no-cache"})

    return app


async def _watch_disconnect(request: Request, fut: asyncio.Future[Completion],
                            cancel: threading.Event) -> bool:
    """Stop a non-streamed generation whose client has gone (True when it had)."""
    while not fut.done():
        if await request.is_disconnected():
            log.info("client disconnected before the answer; cancelling")
            cancel.set()
            return True
        await asyncio.sleep(0.2)
    return False


def _headers(draft: Draft) -> dict[str, str]:
    h = {"X-Request-Id": draft.request_id, "X-Quantfleet-Variant": draft.variant}
    if draft.fallback_from:
        h["X-Quantfleet-Fallback-From"] = draft.fallback_from
    return h


def _response_body(draft: Draft, completion: Completion) -> dict[str, Any]:
    r = completion.result
    message: dict[str, Any] = {"role": "assistant", "content": completion.content}
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    return {
        "id": draft.request_id,
        "object": "chat.completion",
        "created": int(draft.ts),
        "model": draft.variant,
        "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason,
                     "logprobs": None}],
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                  "total_tokens": r.prompt_tokens + r.completion_tokens},
        "quantfleet": {
            "variant": draft.variant,
            "tier": draft.tier,
            "fallback_from": draft.fallback_from,
            "constraint": r.constraint,
            "truncated_messages": draft.truncated,
            "max_tokens_clamped": draft.clamped,
            "queue_wait_s": round(draft.queue_wait_s, 4),
            "validations": [o.model_dump() for o in completion.validations],
            "fallback_validations": [o.model_dump() for o in draft.first_validations],
        },
    }
