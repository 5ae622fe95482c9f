"""The console's routes, mounted at ``/console`` by ``FleetService.app``.

Pages are rendered on the server (Jinja2) and refreshed by ``static/console.js``
from the JSON data endpoints under ``/console/api/``; every chart's data is
aggregated by the store (``queries.py``). Reads need the ``read`` role and
writes the ``write`` role when ``[http.auth]`` is configured; a browser logs in
once (``sessions.py``) and sends the session's CSRF token with every write,
a script sends ``Authorization: Bearer``. Without ``[http.auth]`` the console
can be read by anyone who reaches it and written by no one.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..auth import REALM, HttpAuth, Principal, parse_bearer
from ..config import ConsoleUser
from ..desired import DesiredState
from ..rollouts.cli import _history_detail
from ..rollouts.engine import RolloutEngine
from ..store import Store
from . import actions, params, queries
from .sessions import COOKIE, CSRF_HEADER, Session, Sessions, csrf_ok, verify_password

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
PREFIX = "/console"
Role = Literal["read", "write"]


@dataclass
class ConsoleContext:
    store: Store
    engine: RolloutEngine
    desired: DesiredState | None
    auth: HttpAuth
    sessions: Sessions
    reports_dir: Path | None = None
    secure_cookie: bool = False
    users: Sequence[ConsoleUser] = ()


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "status": status}}, status_code=status,
                        headers=headers)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    s = max(0.0, time.time() - ts)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]))
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, default=str)
    env.globals["prefix"] = PREFIX
    return env


Endpoint = Callable[[Request], Awaitable[Response]] | Callable[[Request], Response]


class Console:
    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        self.env = _templates()
        self.rollup = queries.SignalRollup(ctx.store)

    # -- who is asking ----------------------------------------------------------
    def _session(self, request: Request) -> Session | None:
        return self.ctx.sessions.get(request.cookies.get(COOKIE))

    def _who(self, request: Request) -> tuple[Principal | None, Session | None, str | None]:
        """The operator, their browser session (None with a Bearer token) and, when the
        request carried credentials that are no good, why."""
        creds = self.ctx.auth.credentials
        header = request.headers.get("authorization")
        if header is not None:
            token = parse_bearer(header)
            who = creds.authenticate(token) if creds is not None and token else None
            if who is None or who.kind != "operator":
                return None, None, "the token is not an operator's valid token"
            return who, None, None
        session = self._session(request)
        if session is not None:
            return session.principal, session, None
        return None, None, None

    def _refusal(self, request: Request, role: Role, *, page: bool = False
                 ) -> Response | None:
        """None when the request may go on; else the 401/403 (a page: the login form)."""
        if not self.ctx.auth.enabled:
            if role == "read":
                return None
            return _error("writes need an authenticated operator: this fleet has no "
                          "[http.auth] (docs/console.md)", 401,
                          {"WWW-Authenticate": f'Bearer realm="{REALM}"'})
        who, session, bad = self._who(request)
        if who is None:
            if page and bad is None:
                return RedirectResponse(f"{PREFIX}/login?next={request.url.path}", 303)
            return _error(bad or "an operator must log in (or send Authorization: Bearer)",
                          401, {"WWW-Authenticate": f'Bearer realm="{REALM}"'})
        if role == "write" and session is not None:
            presented = request.headers.get(CSRF_HEADER)
            if not csrf_ok(session, presented):
                log.warning("refused %s %s: %s's session sent no valid CSRF token",
                            request.method, request.url.path, who.name)
                return _error("the CSRF token is missing or wrong (reload the page)", 403)
        if role not in who.roles:
            log.warning("refused %s %s: operator %s lacks the %s role", request.method,
                        request.url.path, who.name, role)
            return _error(f"operator {who.name!r} lacks the {role!r} role", 403)
        return None

    def guard(self, role: Role, endpoint: Endpoint, *, page: bool = False) -> Endpoint:
        async def guarded(request: Request) -> Response:
            refused = self._refusal(request, role, page=page)
            if refused is not None:
                return refused
            try:
                if inspect.iscoroutinefunction(endpoint):
                    answer: Response = await endpoint(request)
                    return answer
                # The reads query the store: in a worker thread, never on the event loop
                # that serves every other request (artifacts included).
                sync = cast(Callable[[Request], Response], endpoint)
                return await run_in_threadpool(sync, request)
            except params.ParamError as exc:
                return _error(str(exc), 400)
            except actions.ActionError as exc:
                return _error(str(exc), exc.status)

        guarded.__name__ = getattr(endpoint, "__name__", "guarded")
        return guarded

    def actor(self, request: Request) -> str:
        who, _, _ = self._who(request)
        if who is None:  # unreachable: writes are guarded
            raise actions.ActionError("no operator", 401)
        return who.name

    # -- pages ------------------------------------------------------------------
    def render(self, request: Request, template: str, status: int = 200,
               **context: Any) -> HTMLResponse:
        who, session, _ = self._who(request) if self.ctx.auth.enabled else (None, None, None)
        html = self.env.get_template(template).render(
            request=request, operator=who, csrf=session.csrf if session else "",
            auth=self.ctx.auth.enabled, page=template.removesuffix(".html"),
            windows=params.WINDOWS, **context)
        return HTMLResponse(html, status_code=status)

    def fleet_page(self, request: Request) -> Response:
        selector = params.selector(request.query_params)
        summary = queries.fleet_summary(self.ctx.store, selector, limit=100)
        return self.render(request, "fleet.html", summary=summary,
                           selector=str(selector) if selector else "")

    def signals_page(self, request: Request) -> Response:
        params.duration(request.query_params, "window", "1h")
        params.selector(request.query_params)
        return self.render(request, "signals.html",
                           window=request.query_params.get("window", "1h"),
                           selector=request.query_params.get("selector", ""),
                           charts=CHARTS, reports=self._reports(),
                           figures=self._eval_figures(self._fleet_variants()))

    def rollouts_page(self, request: Request) -> Response:
        return self.render(request, "rollouts.html",
                           rollouts=queries.rollouts_summary(self.ctx.engine),
                           pins=self.ctx.engine.pins())

    def rollout_page(self, request: Request) -> Response:
        rid = request.path_params["rollout_id"]
        detail = queries.rollout_detail(self.ctx.engine, rid)
        if detail is None:
            return self.render(request, "missing.html", 404, what=f"rollout {rid!r}")
        history = [{**a, "detail": _history_detail(a["action"], a["evidence"])}
                   for a in detail["audit"]]
        return self.render(request, "rollout.html", d=detail, history=history,
                           last=detail["verdicts"][-1] if detail["verdicts"] else None)

    def device_page(self, request: Request) -> Response:
        device_id = request.path_params["device_id"]
        detail = queries.device_detail(self.ctx.store, device_id)
        if detail is None:
            return self.render(request, "missing.html", 404, what=f"device {device_id!r}")
        return self.render(request, "device.html", d=detail)

    def _fleet_variants(self) -> set[str]:
        return {str(d["variant"]) for d in self.ctx.store.devices(["variant"]) if d["variant"]}

    def _reports(self) -> list[dict[str, Any]]:
        folder = self.ctx.reports_dir
        if folder is None or not folder.is_dir():
            return []
        return [{"name": p.name, "size": p.stat().st_size, "mtime": p.stat().st_mtime,
                 "json": p.with_suffix(".json").name if p.with_suffix(".json").exists()
                 else None}
                for p in sorted(folder.glob("*.html"))]

    def _eval_figures(self, variants: set[str]) -> list[dict[str, Any]]:
        """Per variant of every report JSON (``quantfleet eval --json``) in the reports
        folder: its golden-set pass rate with the interval and its speed — the offline
        figures beside the fleet's; ``in_fleet`` says whether a device runs it."""
        out = []
        for r in self._reports():
            if not r["json"]:
                continue
            assert self.ctx.reports_dir is not None
            try:
                doc = json.loads((self.ctx.reports_dir / r["json"]).read_text())
                rows = doc["report"]["variants"]
                for v in rows:
                    o = v["overall"]
                    out.append({"report": r["name"], "variant": v["name"],
                                "precision": v.get("precision"), "role": v.get("role"),
                                "passed": o["passed"], "n": o["n"], "rate": o["rate"],
                                "low": o["low"], "high": o["high"],
                                "tokens_per_second": v.get("tokens_per_second"),
                                "in_fleet": v["name"] in variants})
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("console: report %s is not an eval report's JSON (%s)",
                            r["json"], exc)
        return out

    def reports_page(self, request: Request) -> Response:
        return self.render(request, "reports.html", reports=self._reports(),
                           folder=self.ctx.reports_dir)

    def report_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        listed = {r["name"] for r in self._reports()} | {
            r["json"] for r in self._reports() if r["json"]}
        if name not in listed:  # only what the folder lists: no path ever leaves it
            return _error(f"no report named {name!r}", 404)
        assert self.ctx.reports_dir is not None
        return FileResponse(self.ctx.reports_dir / name)

    def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", next=_safe_next(request), message="",
                           users=bool(self.ctx.users))

    async def login(self, request: Request) -> Response:
        # A urlencoded form of two fields, read here (starlette's form() needs
        # python-multipart, a dependency for nothing else).
        raw = await request.body()
        form = {k: v[0] for k, v in parse_qs(raw[:8192].decode("utf-8", "replace")).items()}
        token = form.get("token", "").strip()
        nxt = _safe_next(request, form.get("next", ""))
        creds = self.ctx.auth.credentials
        who: Principal | None = None
        if creds is None:
            return self.render(request, "login.html", 401, next=nxt, message="This fleet "
                               "has no [http.auth]: there is nothing to log in to.")
        if "user" in form:
            user = next((u for u in self.ctx.users if u.name == form["user"]), None)
            # A hash is computed for an unknown name too: no answer says which names exist.
            # scrypt takes tens of ms on purpose: off the event loop.
            if await run_in_threadpool(verify_password, form.get("password", ""),
                                       user.password_scrypt if user else None) and user:
                who = Principal("operator", user.name, frozenset(user.roles))
            if who is None:
                log.warning("console login refused: wrong name or password")
                return self.render(request, "login.html", 401, next=nxt, users=True,
                                   message="Wrong name or password.")
        else:
            who = creds.authenticate(token) if token else None
            if who is None or who.kind != "operator":
                log.warning("console login refused: not an operator's token")
                return self.render(request, "login.html", 401, next=nxt,
                                   message="That is not a valid operator token.")
        session_id, _ = self.ctx.sessions.open(who)
        log.info("console login: operator %s (%s)", who.name, ", ".join(sorted(who.roles)))
        resp = RedirectResponse(nxt, 303)
        resp.set_cookie(COOKIE, session_id, max_age=int(self.ctx.sessions.ttl_s),
                        httponly=True, samesite="strict", secure=self.ctx.secure_cookie,
                        path=PREFIX)
        return resp

    async def logout(self, request: Request) -> Response:
        self.ctx.sessions.close(request.cookies.get(COOKIE))
        resp = RedirectResponse(f"{PREFIX}/login", 303)
        resp.delete_cookie(COOKIE, path=PREFIX)
        return resp

    # -- data -------------------------------------------------------------------
    def api_fleet(self, request: Request) -> Response:
        q = request.query_params
        selector = params.selector(q)
        limit = params.integer(q, "limit", 100, 1, 1000)
        offset = params.integer(q, "offset", 0, 0, 10_000_000)
        return _json(queries.fleet_summary(self.ctx.store, selector, limit=limit,
                                           offset=offset))

    def api_signals(self, request: Request) -> Response:
        q = request.query_params
        window = params.duration(q, "window", "1h")
        step = params.step(q, window)
        selector = params.selector(q)
        variant = params.name(q, "variant")
        end = time.time()
        ids = queries.device_ids(self.ctx.store, selector)
        if self.rollup.covers(step, ids):
            out = self.rollup.series(end - window, end, step, variant=variant)
        else:
            out = queries.signal_series(self.ctx.store, end - window, end, step,
                                        device_ids=ids, variant=variant)
        out.update(window_s=window, selector=str(selector) if selector else None,
                   devices=None if ids is None else len(ids))
        return _json(out)

    def api_rollouts(self, request: Request) -> Response:
        return _json({"rollouts": queries.rollouts_summary(self.ctx.engine),
                      "pins": self.ctx.engine.pins()})

    def api_rollout(self, request: Request) -> Response:
        rid = request.path_params["rollout_id"]
        detail = queries.rollout_detail(self.ctx.engine, rid)
        if detail is None:
            return _error(f"no rollout named {rid!r}", 404)
        return _json(detail)

    def api_device(self, request: Request) -> Response:
        device_id = request.path_params["device_id"]
        window = params.duration(request.query_params, "window", "1h")
        detail = queries.device_detail(self.ctx.store, device_id, window_s=window)
        if detail is None:
            return _error(f"no device named {device_id!r}", 404)
        return _json(detail)

    # -- writes -----------------------------------------------------------------
    # The writes read their body here, and do the work (the store, the engine) in a
    # worker thread.
    async def create(self, request: Request) -> Response:
        body = await _body(request)
        spec_text = _field(body, "spec", str)
        unpin = _field(body, "unpin", bool, False)
        actor = self.actor(request)

        def work() -> dict[str, Any]:
            spec = actions.create_rollout(self.ctx.engine, spec_text, actor, unpin)
            return {"id": spec.name, "state": self.ctx.engine.get(spec.name)["state"]}

        return _json(await run_in_threadpool(work), 201)

    async def control(self, request: Request) -> Response:
        body = await _body(request, optional=True)
        reason = _field(body, "reason", str, "")
        rid = request.path_params["rollout_id"]
        state = await run_in_threadpool(actions.control, self.ctx.engine, rid,
                                        request.path_params["action"], self.actor(request),
                                        reason)
        return _json({"id": rid, "state": state})

    async def unpin(self, request: Request) -> Response:
        body = await _body(request)
        return _json(await run_in_threadpool(
            actions.unpin, self.ctx.engine, _field(body, "cohort", str),
            _field(body, "variant", str), self.actor(request)))

    async def set_desired(self, request: Request) -> Response:
        body = await _body(request)
        selector, variant = _field(body, "selector", str), _field(body, "variant", str)
        actor = self.actor(request)

        def work() -> list[str]:
            return actions.set_desired(self.ctx.store.devices(["device_id", "labels"]),
                                       self.ctx.desired, selector, variant, actor)

        return _json({"devices": len(await run_in_threadpool(work))})

    def routes(self) -> list[BaseRoute]:
        g = self.guard
        page = [("/", self.fleet_page), ("/fleet", self.fleet_page),
                ("/signals", self.signals_page), ("/rollouts", self.rollouts_page),
                ("/rollouts/{rollout_id}", self.rollout_page),
                ("/devices/{device_id}", self.device_page), ("/reports", self.reports_page)]
        api = [("/api/fleet", self.api_fleet), ("/api/signals", self.api_signals),
               ("/api/rollouts", self.api_rollouts),
               ("/api/rollouts/{rollout_id}", self.api_rollout),
               ("/api/devices/{device_id}", self.api_device),
               ("/reports/{name}", self.report_file)]
        writes = [("/api/rollouts", self.create),
                  ("/api/rollouts/{rollout_id}/{action}", self.control),
                  ("/api/pins/unpin", self.unpin), ("/api/desired", self.set_desired)]
        return [
            Route("/login", self.login_page, methods=["GET"]),  # sync: starlette threads it
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
            *(Route(path, g("read", fn, page=True), methods=["GET"]) for path, fn in page),
            *(Route(path, g("read", fn), methods=["GET"]) for path, fn in api),
            *(Route(path, g("write", fn), methods=["POST"]) for path, fn in writes),
        ]


#: The Signals page's charts: (id, title, key in a point, kind).
CHARTS = [
    ("validation_failure", "Output-validation failure rate", "rate"),
    ("tool_call_success", "Tool-call success rate", "rate"),
    ("refusal", "Refusal rate", "rate"),
    ("fallback", "Fallback rate", "rate"),
    ("error", "Error rate", "rate"),
    ("latency_p95_s", "p95 latency (s)", "latency"),
    ("latency_p99_s", "p99 latency (s)", "latency"),
    ("cost_per_success_tokens", "Cost per successful request (tokens)", "plain"),
    ("requests", "Requests per bucket (drift: volume)", "plain"),
    ("tool_usage", "Tool usage (drift: share of requests with tool calls)", "plain"),
]


def _safe_next(request: Request, given: str | None = None) -> str:
    """Where to go after logging in: a path of the console, nothing else (no open
    redirect to another site)."""
    nxt = given if given is not None else request.query_params.get("next", "")
    if nxt.startswith(PREFIX + "/") and "//" not in nxt and "\\" not in nxt:
        return nxt
    return f"{PREFIX}/fleet"


def _json(doc: Any, status: int = 200) -> Response:
    return Response(json.dumps(doc, default=str, allow_nan=False), status_code=status,
                    media_type="application/json")


async def _body(request: Request, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return {}
        raise actions.ActionError("body: a JSON object is required", 400)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise actions.ActionError(f"body: not JSON ({exc})", 400) from None
    if not isinstance(doc, dict):
        raise actions.ActionError("body: must be a JSON object", 400)
    return doc


_MISSING = object()


def _field(body: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = body.get(name, default)
    if value is _MISSING:
        raise actions.ActionError(f"body field {name!r} is required", 400)
    if not isinstance(value, kind):
        raise actions.ActionError(f"body field {name!r} must be a {kind.__name__}", 400)
    return value


def console_mount(ctx: ConsoleContext, *, warm: bool = False) -> Mount:
    """The console's routes under PREFIX; ``warm`` fills the signal rollup in the
    background at once (the fleet service does), so that the first week-long chart
    does not wait for it."""
    console = Console(ctx)
    if warm:
        def fill() -> None:
            try:
                console.rollup.refresh()
            except Exception:  # a store closing under it; the first request fills it then
                log.warning("console: could not fill the signal rollup", exc_info=True)

        threading.Thread(target=fill, name="console-rollup", daemon=True).start()
    return Mount(PREFIX, routes=console.routes())


__all__ = ["CHARTS", "PREFIX", "Console", "ConsoleContext", "console_mount"]
