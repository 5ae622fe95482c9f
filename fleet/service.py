"""``quantfleet serve``: ingest, desired state, artifacts and the read API in one process.

At start the fleet opens (and migrates) its store, connects its ingest to the
broker, starts its desired-state publisher and re-publishes every stored
desired state through it (a broker that lost its retained messages
converges), then serves HTTP: the artifacts devices fetch and a small read
API for consoles and scripts. The rollout ticker never waits on the broker:
desired state is stored, queued and acknowledged in the background
(``desired.py``); ``/healthz`` and ``/v1/desired`` show what is acknowledged.

Replicas: on PostgreSQL any number of services share the store and the
broker — ingest on all (a shared subscription), each running rollout ticked
by the one replica holding its lease (``rollouts/leases.py``; ``/healthz``
says which this one leads). A SQLite store takes one service
(``store/single_writer.py``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from quantfleet.agent.mqtt import connect_options, make_client
from quantfleet.agent.update.signing import load_private_key
from quantfleet.models.catalog import Catalog

from . import signals
from .artifacts import create_artifact_app
from .auth import HttpAuth, is_loopback, load_credentials, public_health
from .cohorts import LABEL_TOKEN, Selector, SelectorError
from .config import FleetConfig
from .console.app import ConsoleContext, console_mount
from .console.metrics import fleet_metrics
from .console.sessions import Sessions
from .desired import DesiredState
from .ingest import FleetIngest
from .rollouts.engine import RolloutEngine
from .rollouts.leases import RolloutLeases
from .store import Store, single_writer
from .store.retention import apply_retention
from .store.rollups import roll_up

log = logging.getLogger(__name__)


def _bad(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "status": status}}, status_code=status)


def read_api(store: Store, auth: HttpAuth | None = None) -> list[Route]:
    """The read API's routes; with ``auth`` enabled each needs an operator's ``read`` role."""
    guard = (auth or HttpAuth(None)).guard

    async def devices(request: Request) -> Response:
        # Every column: labels (the derived cpu.* ones included) and the hardware fingerprint.
        rows = store.devices()
        sel_text = request.query_params.get("selector")
        if sel_text:
            try:
                keep = set(Selector.parse(sel_text).select(rows))
            except SelectorError as exc:
                return _bad(str(exc))
            rows = [r for r in rows if r["device_id"] in keep]
        return JSONResponse({"devices": rows})

    async def signal_view(request: Request) -> Response:
        try:
            window = float(request.query_params.get("window_s", "3600"))
        except ValueError:
            return _bad("window_s must be a number of seconds")
        if not 0 < window <= 90 * 86400:
            return _bad("window_s must be in (0, 7776000]")
        end = time.time()
        ids = None
        by = request.query_params.getlist("by")
        for key in by:
            if not LABEL_TOKEN.fullmatch(key):
                return _bad(f"by={key!r} is not a label key (1-63 letters, digits, . _ - /)")
        devices = store.devices(["device_id", "labels"])
        sel_text = request.query_params.get("selector")
        if sel_text:
            try:
                ids = Selector.parse(sel_text).select(devices)
            except SelectorError as exc:
                return _bad(str(exc))
        rows = signals.by_variant(store, end - window, end, device_ids=ids, by=by,
                                  labels={d["device_id"]: d["labels"] or {} for d in devices})
        return JSONResponse({"window_s": window, "selector": sel_text, "by": by,
                             "variants": [s.to_json() for s in rows]})

    return [Route("/v1/devices", guard("read", devices)),
            Route("/v1/signals", guard("read", signal_view))]


class FleetService:
    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.writer = single_writer.hold(cfg.store.url)  # before the store migrates
        self.store = Store(cfg.store.url, idle_in_transaction_s=cfg.rollouts.lease_s)
        self.leases = RolloutLeases(self.store, cfg.rollouts.lease_s,
                                    exclusive=self.writer is not None)
        self.key = load_private_key(cfg.artifacts.signing_key)
        self.auth = HttpAuth(load_credentials(cfg.http.auth) if cfg.http.auth else None)
        self.ingest = FleetIngest(self.store, cfg.mqtt, share_group=cfg.ingest.share_group,
                                  client_id=cfg.ingest.client_id,
                                  session_expiry_s=cfg.ingest.session_expiry_s)
        self.publisher = make_client(cfg.mqtt, f"{cfg.ingest.client_id}-pub-{uuid.uuid4().hex[:6]}")
        self.desired = DesiredState(self.store, self.publisher, self.key,
                                    cfg.artifacts.models_dir, cfg.artifacts.base_url,
                                    topic_root=cfg.mqtt.topic_root)

        def assign(ids: Any, variant: str, rollout_id: str) -> None:
            self.desired.set_variant(ids, variant, rollout_id=rollout_id, actor="rollout",
                                     fence=self.leases.fence(rollout_id))

        def resolve(label: str) -> str:
            name: str = Catalog(cfg.artifacts.models_dir).resolve(label).name
            return name

        self.rollouts = RolloutEngine(self.store, assign, resolve, leases=self.leases,
                                      resend=self.desired.republish)

        def assign_now(ids: Any, variant: str, rollout_id: str) -> None:
            self.desired.set_variant(ids, variant, rollout_id=rollout_id, actor="rollout")

        # What an operator does from the console (create, pause, resume, abort) is not
        # the leader's tick: like the CLI's, it is unfenced, so it works on any replica
        # and does not depend on which one leads the rollout (the state changes are
        # compare-and-set in the repository).
        self.operator_rollouts = RolloutEngine(self.store, assign_now, resolve)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="rollouts", daemon=True)
        self._upkeep = threading.Thread(target=self._upkeep_loop, name="store-upkeep",
                                        daemon=True)

    def _tick_loop(self) -> None:
        # Interruptible: stop() wakes it at once rather than after a full interval.
        while not self._stop.wait(self.cfg.rollouts.tick_s):
            try:
                self.rollouts.tick()
            except Exception:  # the store unreachable, say: the next tick tries again
                log.exception("rollout tick failed; retried in %.1f s", self.cfg.rollouts.tick_s)

    def _upkeep_loop(self) -> None:
        """Rollups every ``rollup_every_s``, retention every ``every_s`` — off ingest's
        path, on every replica (the rollups' watermark row serialises them, and a
        retention delete is the same whoever runs it)."""
        r = self.cfg.retention
        next_retention = time.monotonic() + r.every_s
        while not self._stop.wait(r.rollup_every_s):
            try:
                roll_up(self.store.engine)
                if r.delete and time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + r.every_s
                    done = apply_retention(self.store.engine, raw_events_s=r.raw_events_s,
                                           rollups_s=r.rollups_s)
                    log.info("retention: %d raw events and %d rollup rows deleted",
                             done.events, done.rollups)
            except Exception:  # the store unreachable, say: the next round tries again
                log.exception("store upkeep (rollups, retention) failed; retried in %.1f s",
                              r.rollup_every_s)

    def start(self) -> FleetService:
        self.ingest.start()
        self.publisher.connect(*self.cfg.mqtt.address(), **connect_options(self.cfg.mqtt))
        self.publisher.loop_start()
        self.desired.start()
        self.desired.republish()  # queued: sent as soon as the client is connected
        self._ticker.start()
        self._upkeep.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(30)
        if self._upkeep.is_alive():
            self._upkeep.join(30)
        try:
            self.leases.release_all()  # another replica takes them at its next tick
        except Exception:
            log.exception("could not release the rollout leases; they expire in %.0f s",
                          self.leases.lease_s)
        # What is not acknowledged by then is in the store, re-published at the next start.
        self.desired.stop(flush_s=2.0)
        self.ingest.stop()
        self.publisher.disconnect()
        self.publisher.loop_stop()
        self.store.close()
        if self.writer is not None:
            self.writer.release()

    def app(self) -> Starlette:
        artifacts = create_artifact_app(self.cfg.artifacts.models_dir, self.key,
                                        self.cfg.artifacts.base_url, self.auth)

        async def health(request: Request) -> Response:
            ok = self.ingest.connected.is_set()
            body: dict[str, Any] = {"ingest_connected": ok, "stats": vars(self.ingest.stats),
                                    "desired": self.desired.status(),
                                    "rollouts": self.replica_status()}
            body = public_health(self.auth, request, body)
            return JSONResponse(body, status_code=200 if ok else 503)

        async def metrics(request: Request) -> Response:
            """Prometheus text: what ingest took, rejected and dead-lettered (this process's
            counters), and the store's signals per variant and rollout states
            (console/metrics.py)."""
            st = self.ingest.stats
            lines = []
            for name, help_, value in (
                    ("messages_received", "Messages received from the broker.", st.received),
                    ("events_inserted", "Telemetry events stored.", st.events_inserted),
                    ("events_duplicate", "Events received again and stored once.",
                     st.duplicates),
                    ("statuses", "Status messages applied.", st.statuses),
                    ("states", "Update-state messages applied.", st.states),
                    ("dead_lettered", "Messages or events the store refused at commit, "
                     "kept in dead_letters.", st.dead_lettered),
                    ("commits", "Group commits.", st.commits)):
                lines += [f"# HELP quantfleet_ingest_{name}_total {help_}",
                          f"# TYPE quantfleet_ingest_{name}_total counter",
                          f"quantfleet_ingest_{name}_total {value}"]
            lines += ["# HELP quantfleet_ingest_rejected_total Messages or events rejected, "
                      "by reason.", "# TYPE quantfleet_ingest_rejected_total counter"]
            lines += [f'quantfleet_ingest_rejected_total{{reason="{reason}"}} {n}'
                      for reason, n in sorted(st.rejected.items())]
            lines += ["# HELP quantfleet_ingest_connected 1 while ingest is subscribed.",
                      "# TYPE quantfleet_ingest_connected gauge",
                      f"quantfleet_ingest_connected {int(self.ingest.connected.is_set())}"]
            lines += fleet_metrics(self.store)  # signals and rollouts, from the store
            return PlainTextResponse("\n".join(lines) + "\n",
                                     media_type="text/plain; version=0.0.4")

        async def desired(request: Request) -> Response:
            """Every stored desired state, and whether this fleet's publication of it
            was acknowledged by the broker (null: not published by this process)."""
            sent = {d.device_id: d for d in self.desired.publisher.deliveries()}
            rows = []
            for p in self.store.desired():
                d = sent.get(p.device_id)
                mine = d if d is not None and d.revision == p.revision else None
                rows.append({"device_id": p.device_id, "revision": p.revision,
                             "variant": p.variant, "rollout_id": p.rollout_id,
                             "acknowledged": mine.acknowledged if mine else None,
                             "delivery": mine.to_json() if mine else None})
            return JSONResponse({"desired": rows})

        console = console_mount(ConsoleContext(
            self.store, self.operator_rollouts, self.desired, self.auth,
            Sessions(self.cfg.console.session_ttl_s), self.cfg.console.reports_dir,
            secure_cookie=self.cfg.http.tls_cert is not None, users=self.cfg.console.users),
            warm=True)
        return Starlette(routes=[Route("/healthz", health),
                                 Route("/metrics", self.auth.guard("read", metrics)),
                                 Route("/v1/desired", self.auth.guard("read", desired)),
                                 *read_api(self.store, self.auth),
                                 Route("/console", lambda _: RedirectResponse("/console/")),
                                 console,
                                 Mount("/", app=artifacts)])

    def replica_status(self) -> dict[str, Any]:
        """Which rollouts this replica leads (their lease tokens), and the lease terms."""
        return {"replica": self.leases.holder, "leads": self.leases.held,
                "lease_s": self.leases.lease_s, "tick_s": self.cfg.rollouts.tick_s,
                "takeover_within_s": self.leases.lease_s + self.cfg.rollouts.tick_s}

    def replica_summary(self) -> str:
        """One line for the start log: this replica and how rollouts are led."""
        single = f"the only writer of {self.writer.store_path}" if self.writer else \
            "one of any number of replicas on this PostgreSQL store"
        return (f"replica {self.leases.holder}, {single}; rollouts are led by lease "
                f"({self.leases.lease_s:g} s, handed over within "
                f"{self.leases.lease_s + self.cfg.rollouts.tick_s:g} s of a replica's loss; "
                "/healthz lists the ones this replica leads)")

    def auth_summary(self) -> str:
        """One line for the start log: who may use HTTP, and over what."""
        c = self.auth.credentials
        scheme = "HTTPS" if self.cfg.http.tls_cert else "HTTP"
        if c is not None:
            return (f"{scheme} authentication on: {c.operators} operator token(s), "
                    f"{c.devices} device credential(s)")
        return f"{scheme} authentication off"

    def warn_if_open(self) -> None:
        """Off loopback, no authentication, or tokens over plain HTTP, is said at start."""
        host = self.cfg.http.host
        if is_loopback(host):
            return
        if not self.auth.enabled:
            log.warning("serving HTTP on %s without authentication: anyone who reaches it "
                        "reads every device and signal and fetches every artifact; add "
                        "[http.auth] (docs/security.md)", host)
        elif self.cfg.http.tls_cert is None:
            log.warning("serving HTTP on %s without TLS: tokens and credentials cross the "
                        "network in clear; set [http] tls_cert and tls_key "
                        "(docs/security.md)", host)

