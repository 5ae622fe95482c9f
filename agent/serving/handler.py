"""``POST /v1/chat/completions``: one handler, two ways to answer, one settle step.

:class:`ChatHandler` is the whole request path of the local API:

1. ``handle`` authenticates, reads the body (size-capped), parses it
   (:mod:`.protocol`), routes it to a variant (model name or tier), checks the
   client's quota, admits it to the variant's lane (priority, deadline) and
   prepares the generation (:func:`.pipeline.prepare`: budgets, template,
   constraint);
2. ``complete`` answers in one JSON body: it generates in a worker thread,
   stops when the client leaves or the deadline passes, and falls back once to
   the higher-precision variant when validation fails; or ``stream`` answers
   with server-sent events as the text is generated (tool calls are sent whole
   at the end);
3. ``settle`` ends every request, whatever its outcome — an answer, an error
   before or after generation, a client that left, a deadline: it charges the
   client's quota with every token generated for it (both attempts of a
   fallback), records the one request event and moves the metrics. Nothing
   else charges or records, and a request settles once.

Whatever is raised after admission — a bug included — the worker instance goes
back to its lane (every :class:`.admission.Lease` a request took is released in
``handle``'s ``finally``) and the request is settled: an unexpected exception is
a 500 ``internal_error`` whose event's ``error_class`` names the exception. One
bad request can cost itself an answer, never the agent its worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from quantfleet.agent.backends.base import BackendError
from quantfleet.agent.chat import ChatTemplateError
from quantfleet.agent.wire import RequestEvent, ValidationOutcome
from quantfleet.strict import problems

from .admission import PRIORITIES, Lease, Rejected
from .budgets import BudgetExceeded, QuotaExceeded
from .pipeline import Completion, Prepared
from .protocol import ChatRequest, error_body
from .recorder import durable, keeps_durably
from .routing import UnknownTier

if TYPE_CHECKING:
    from .api import AgentService

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = ("", "default", "auto", "quantfleet")


class ApiError(Exception):
    """An answer with an OpenAI error body (status, message, type, param, code)."""

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
class Exchange:
    """One request as it goes: what its event will say, filled in step by step."""

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
    attempt_tokens: int = 0  # prompt + completion tokens of every attempt: what is charged
    fallback_from: str | None = None
    fallback_load_s: float | None = None  # the fallback was loaded for this request
    validations: list[ValidationOutcome] = field(default_factory=list)
    first_validations: list[ValidationOutcome] = field(default_factory=list)
    settled: bool = False
    leases: list[Lease] = field(default_factory=list)  # released when the request ends

    @classmethod
    def new(cls) -> Exchange:
        return cls(request_id="chatcmpl-" + uuid.uuid4().hex[:24], ts=time.time(),
                   start=time.monotonic())

    def spent(self, completion: Completion) -> None:
        """Count an attempt's tokens toward what the client is charged."""
        self.attempt_tokens += completion.result.prompt_tokens + \
            completion.result.completion_tokens


@dataclass
class Admitted:
    """A parsed request holding an instance of its variant, ready to generate."""

    request: ChatRequest
    lease: Lease
    prepared: Prepared
    deadline: float  # monotonic
    deadline_s: float


class ChatHandler:
    """The chat-completions route over an :class:`AgentService`'s shared state."""

    def __init__(self, service: AgentService) -> None:
        self.service = service
        self.config = service.config
        self._wait_s = service.config.events.durable_wait_s
        self._durable_sink = keeps_durably(service.recorder) and self._wait_s > 0

    # -- the route ------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        """Answer, then — for a whole answer — let it leave only once its event is
        durable (a stream waits before its last chunks, in ``stream``)."""
        response = await self.answer(request, Exchange.new())
        if not isinstance(response, StreamingResponse):
            await self.durable()
        return response

    async def durable(self) -> None:
        """Wait for the recorder's group commit of every event so far (bounded)."""
        if not self._durable_sink:
            return
        if not await asyncio.to_thread(durable, self.service.recorder, self._wait_s):
            self.service.metrics.inc("quantfleet_events_not_durable_total")

    async def answer(self, request: Request, ex: Exchange) -> Response:
        try:
            admitted = await self.admit(request, ex)
            if admitted.request.stream:
                return await self.stream(request, ex, admitted)
            return await self.complete(request, ex, admitted)
        except ApiError as exc:
            self.settle(ex, exc.status, error_class=exc.code or exc.type)
            return exc.response({"X-Request-Id": ex.request_id})
        except asyncio.CancelledError:
            if not ex.settled:
                self.settle(ex, 499, error_class="cancelled")
            raise
        except Exception as exc:
            log.exception("%s: internal error", ex.request_id)
            if not ex.settled:
                self.settle(ex, 500, error_class=f"internal_error:{type(exc).__name__}")
            return ApiError(500, f"internal error ({type(exc).__name__}); the agent logged it",
                            "server_error", code="internal_error",
                            ).response({"X-Request-Id": ex.request_id})
        finally:
            # At once, or when the generation running on it ends (a stream, a cancel).
            for lease in ex.leases:
                lease.release()

    async def admit(self, request: Request, ex: Exchange) -> Admitted:
        """Everything before generation; an :class:`ApiError` when the request cannot run."""
        service, config = self.service, self.config
        ex.client = service.authenticate(request)
        req = parse_request(await read_json(request, config.listen.max_body_bytes))
        ex.stream = req.stream
        if service.draining:
            raise ApiError(503, "the agent is shutting down", "service_unavailable",
                           code="draining", retry_after_s=5)
        models = service.models
        if models is None or not models.ready:
            raise ApiError(503, "no model is loaded yet", "service_unavailable",
                           code="not_ready", retry_after_s=5)
        opts = req.quantfleet
        ex.tier = (request.headers.get(config.routing.tier_header)
                   or (opts.tier if opts and opts.tier else None) or "default")
        try:
            variant = models.for_model(req.model)
            if variant is None:
                if req.model not in DEFAULT_MODEL_ALIASES:
                    known = ", ".join(["default", *models.served()])
                    raise ApiError(404, f"model {req.model!r} is not served here "
                                   f"(known: {known})", param="model", code="model_not_found")
                variant = models.for_tier(ex.tier)
        except UnknownTier as exc:
            raise ApiError(400, str(exc), param="quantfleet.tier") from None
        ex.variant = variant
        try:
            service.quotas.check(ex.client)
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
        deadline = ex.start + deadline_s
        try:
            lease = await service.admit(variant, PRIORITIES[prio_name], deadline)
        except Rejected as exc:
            raise _rejected(exc) from None
        ex.leases.append(lease)
        ex.queue_wait_s = time.monotonic() - ex.start
        try:
            prepared = await service.prepare(lease, req)
        except BudgetExceeded as exc:
            raise ApiError(400, str(exc), param="messages",
                           code="context_length_exceeded") from None
        except (ChatTemplateError, BackendError) as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from None
        ex.truncated = prepared.dropped_messages
        ex.clamped = prepared.max_tokens_clamped
        return Admitted(req, lease, prepared, deadline, deadline_s)

    # -- one JSON answer ------------------------------------------------
    async def complete(self, request: Request, ex: Exchange, a: Admitted) -> Response:
        models = self.service.models
        assert models is not None
        fut, cancel = await self.service.generate(a.lease, a.prepared, a.deadline)
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
            if models.on_demand:
                await models.done_with(ex.variant)
        ex.spent(completion)
        if completion.finish_reason == "cancelled":
            if watcher.done() and not watcher.cancelled() and watcher.result():
                # Nobody is listening any more; 499 as proxies log it, for the event only.
                self.settle(ex, 499, error_class="client_disconnected", completion=completion)
                return Response(status_code=499)
            self.settle(ex, 504, error_class="deadline", completion=completion)
            return ApiError(504, f"the request's deadline of {a.deadline_s:g} s passed after "
                            f"{completion.result.completion_tokens} tokens", "timeout",
                            code="deadline").response({"X-Request-Id": ex.request_id})
        completion = await self.fallback(a.request, ex, completion, a.deadline)
        self.settle(ex, 200, completion=completion)
        return JSONResponse(response_body(ex, completion), headers=_headers(ex))

    async def fallback(self, req: ChatRequest, ex: Exchange, first: Completion,
                       deadline: float) -> Completion:
        """The answer of the fallback variant when ``first`` failed a validation that
        the config falls back on; ``first`` itself otherwise or when that is impossible."""
        service = self.service
        assert service.models is not None
        fallback = service.models.fallback
        wanted = set(self.config.validation.fallback_on)
        failed = [o.kind for o in first.validations if not o.passed and o.kind in wanted]
        allowed = not (req.quantfleet and not req.quantfleet.fallback)
        if not failed or not allowed or fallback is None or fallback == ex.variant:
            return first
        log.info("%s: %s failed %s; retrying on %s", ex.request_id, ex.variant,
                 ",".join(failed), fallback)
        loaded = fallback in service.models.lanes
        try:
            lease = await service.admit(fallback, PRIORITIES["high"], deadline)
        except Rejected as exc:
            log.warning("fallback to %s refused (%s); answering with the first attempt",
                        fallback, exc)
            return first
        ex.leases.append(lease)
        if not loaded:
            ex.fallback_load_s = service.models.load_seconds.get(fallback)
        try:
            try:
                prepared = await service.prepare(lease, req)
            except Exception as exc:  # the first answer stands; the retry is best effort
                log.warning("fallback prepare failed (%s: %s); answering with the first "
                            "attempt", type(exc).__name__, exc)
                return first
            fut, cancel = await service.generate(lease, prepared, deadline)
            try:
                second = await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancel.set()
                raise
            except BackendError as exc:
                log.warning("fallback generation failed (%s); answering with the first "
                            "attempt", exc)
                return first
        finally:
            lease.release()
            await service.models.done_with(fallback)
        service.metrics.inc("quantfleet_fallbacks_total", **{"from": ex.variant,
                                                             "to": fallback})
        ex.spent(second)
        # Both attempts' outcomes are kept: the first one's failures are the evidence.
        ex.fallback_from = ex.variant
        ex.variant = fallback
        ex.first_validations = first.validations
        return second

    # -- server-sent events ---------------------------------------------
    async def stream(self, request: Request, ex: Exchange, a: Admitted) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        buffered = bool(a.prepared.spec.tools)  # tool calls are sent whole, at the end

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        fut, cancel = await self.service.generate(a.lease, a.prepared, a.deadline, on_text)
        fut.add_done_callback(lambda _: queue.put_nowait(None))

        def finished(f: asyncio.Future[Completion]) -> None:
            # Runs whether the client stayed or left: the request always settles.
            if f.cancelled() or f.exception() is not None:
                self.settle(ex, 500, error_class="backend_error")
                return
            completion = f.result()
            ex.spent(completion)
            self.settle(ex, 200, completion=completion,
                        error_class="client_disconnected" if cancel.is_set() else None)

        fut.add_done_callback(finished)
        include_usage = bool(a.request.stream_options and a.request.stream_options.include_usage)
        content_chunk = _content_chunks(ex)

        async def events() -> AsyncIterator[str]:
            try:
                yield _chunk(ex, {"role": "assistant", "content": ""})
                while True:
                    piece = await queue.get()
                    if piece is None:
                        break
                    if not buffered:
                        yield content_chunk(piece)
                try:
                    completion = fut.result()
                except Exception as exc:  # the status line is sent: report in-band, end
                    log.exception("%s: generation failed mid-stream", ex.request_id)
                    yield "data: " + json.dumps(error_body(
                        f"generation failed: {type(exc).__name__}", "server_error",
                        code="backend_error")) + "\n\n"
                    return
                if buffered:
                    if completion.tool_calls:
                        yield _chunk(ex, {"tool_calls": [{"index": i, **c} for i, c in
                                                         enumerate(completion.tool_calls)]})
                    else:
                        yield _chunk(ex, {"content": completion.text})
                finish = completion.finish_reason
                if finish == "cancelled":
                    finish = "length"  # the deadline cut it; OpenAI clients know "length"
                if ex.settled:  # the answer is complete only once its event is durable
                    await self.durable()
                yield _chunk(ex, {}, finish)
                if include_usage:
                    r = completion.result
                    yield _chunk(ex, {}, None, {"prompt_tokens": r.prompt_tokens,
                                                "completion_tokens": r.completion_tokens,
                                                "total_tokens": r.prompt_tokens +
                                                r.completion_tokens})
                yield "data: [DONE]\n\n"
            finally:
                if not fut.done():
                    # The client went away mid-stream: stop generating at the next token.
                    log.info("%s: client disconnected; cancelling", ex.request_id)
                    cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**_headers(ex), "Cache-Control": "no-cache"})

    # -- accounting and telemetry ---------------------------------------
    def settle(self, ex: Exchange, status: int, *, error_class: str | None = None,
               completion: Completion | None = None) -> None:
        """Charge the quota, record the request event, move the metrics: once per request."""
        if ex.settled:
            log.error("%s settled twice (status %d); the second is ignored", ex.request_id,
                      status)
            return
        ex.settled = True
        service = self.service
        if completion is not None:
            ex.validations = completion.validations
        if ex.attempt_tokens:
            service.quotas.charge(ex.client or "anonymous", ex.attempt_tokens)
        latency = time.monotonic() - ex.start
        result = completion.result if completion else None
        ttft = None
        if result is not None and result.time_to_first_token_s is not None:
            ttft = ex.queue_wait_s + result.time_to_first_token_s
        service.recorder.record(RequestEvent(
            request_id=ex.request_id, ts=ex.ts, variant=ex.variant, tier=ex.tier,
            client=ex.client, status=status, error_class=error_class,
            queue_wait_s=ex.queue_wait_s, time_to_first_token_s=ttft, latency_s=latency,
            prompt_tokens=result.prompt_tokens if result else 0,
            completion_tokens=result.completion_tokens if result else 0,
            tokens_per_second=result.tokens_per_second if result else 0.0,
            finish_reason=completion.finish_reason if completion else None,
            stream=ex.stream, constraint=result.constraint if result else "none",
            truncated_messages=ex.truncated, max_tokens_clamped=ex.clamped,
            validations=ex.validations, fallback_from=ex.fallback_from,
            fallback_load_s=ex.fallback_load_s,
            fallback_validations=ex.first_validations,
            attempt_tokens=ex.attempt_tokens,
        ))
        m = service.metrics
        variant = ex.variant or "none"
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
        m.observe("quantfleet_queue_wait_seconds", ex.queue_wait_s, variant=variant)
        for attempt, outcomes in (("final", ex.validations), ("first", ex.first_validations)):
            for o in outcomes:
                m.inc("quantfleet_validation_outcomes_total", kind=o.kind,
                      result="pass" if o.passed else "fail", attempt=attempt)
        if ex.truncated:
            m.inc("quantfleet_truncations_total", ex.truncated, kind="dropped_messages")
        if ex.clamped:
            m.inc("quantfleet_truncations_total", kind="max_tokens_clamped")


# -- reading a request ----------------------------------------------------
async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read at most ``limit`` bytes far."""
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
    except ValueError:  # Python refuses integers of more than sys.get_int_max_str_digits()
        raise ApiError(400, "request body holds a number too long to read "
                       f"(over {sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(data).__name__}")
    return data


def parse_request(data: dict[str, Any]) -> ChatRequest:
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        message, param = _pydantic_message(exc)
        raise ApiError(400, message, param=param) from None
    except RecursionError:
        raise ApiError(400, "request is nested too deeply") from None


def _pydantic_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first["type"] == "invalid_unicode":  # names its own field, however deep
        return str(first["msg"]), str(first["ctx"]["path"]) or None
    problem = problems(exc)[0]
    return str(problem), problem.loc or None


def _rejected(exc: Rejected) -> ApiError:
    type_ = "rate_limit_error" if exc.status == 429 else "service_unavailable"
    return ApiError(exc.status, str(exc), type_, code=exc.reason, retry_after_s=exc.retry_after_s)


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


# -- writing an answer ----------------------------------------------------
def _headers(ex: Exchange) -> dict[str, str]:
    h = {"X-Request-Id": ex.request_id, "X-Quantfleet-Variant": ex.variant}
    if ex.fallback_from:
        h["X-Quantfleet-Fallback-From"] = ex.fallback_from
    return h


def _chunk(ex: Exchange, delta: dict[str, Any], finish: str | None = None,
           usage: dict[str, int] | None = None) -> str:
    body: dict[str, Any] = {
        "id": ex.request_id, "object": "chat.completion.chunk", "created": int(ex.ts),
        "model": ex.variant,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                     "logprobs": None}] if usage is None else [],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def _content_chunks(ex: Exchange) -> Callable[[str], str]:
    """``_chunk(ex, {"content": piece})`` for every token of a stream, without building
    and serializing the whole envelope each time: the envelope is rendered once around
    a marker, and each piece is JSON-escaped into the gap (a quarter of the event loop's
    time per streamed token; bench/bench_api.py)."""
    marker = "\u0000quantfleet-piece\u0000"
    parts = _chunk(ex, {"content": marker}).split(json.dumps(marker))
    if len(parts) != 2:  # the marker in the envelope itself: build each chunk whole
        return lambda piece: _chunk(ex, {"content": piece})
    head, tail = parts

    def render(piece: str) -> str:
        return head + json.dumps(piece) + tail

    return render


def response_body(ex: Exchange, completion: Completion) -> dict[str, Any]:
    r = completion.result
    message: dict[str, Any] = {"role": "assistant", "content": completion.content}
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    return {
        "id": ex.request_id,
        "object": "chat.completion",
        "created": int(ex.ts),
        "model": ex.variant,
        "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason,
                     "logprobs": None}],
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                  "total_tokens": r.prompt_tokens + r.completion_tokens},
        "quantfleet": {
            "variant": ex.variant,
            "tier": ex.tier,
            "fallback_from": ex.fallback_from,
            "constraint": r.constraint,
            "truncated_messages": ex.truncated,
            "max_tokens_clamped": ex.clamped,
            "queue_wait_s": round(ex.queue_wait_s, 4),
            "validations": [o.model_dump() for o in completion.validations],
            "fallback_validations": [o.model_dump() for o in ex.first_validations],
        },
    }

