"""The updater inside ``quantfleet-agent serve``: desired state in, device state out.

``DeviceUpdates`` joins three parts:

- an MQTT session of its own (beside the telemetry publisher) that subscribes
  to ``…/devices/{id}/desired`` (QoS 1; the retained message arrives on every
  subscribe, so a device that was away converges when it returns) and
  publishes each update state retained on ``…/devices/{id}/state``; the latest
  state is published again after every reconnect. Each state also goes into
  the telemetry outbox as a ``state`` event, so the fleet keeps the whole walk;
- the ``Updater`` state machine (agent/update/updater.py);
- ``ServingHooks``, which give that machine the real model steps: pre-flight
  on a sampled golden subset against the variant serving now, the hot swap
  in the serving ``ModelSet``, and the soak watch on live requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from quantfleet.agent.backends import LoadOptions, load_backend
from quantfleet.agent.config import AgentConfig, UpdateConfig
from quantfleet.agent.hardware import fingerprint
from quantfleet.agent.mqtt import MqttConfig, connect_options, make_client
from quantfleet.agent.serving.routing import ModelSet
from quantfleet.agent.update.signing import Keyring, SignatureError, load_public_key
from quantfleet.agent.update.soak import SoakPolicy, SoakWatch
from quantfleet.agent.update.updater import (
    Check,
    SoakAnswer,
    UpdatePolicy,
    Updater,
    UpdaterMemory,
)
from quantfleet.agent.wire import DeviceStatePayload, device_topic
from quantfleet.models.catalog import Catalog, CatalogError, VariantEntry

log = logging.getLogger(__name__)

#: The pre-flight's verdict policy on a device, before ``[update.preflight] policy``.
#: A device checks a dozen items, so no raw pass-rate drop is judged (three items
#: are 25 points, and which three flip depends on the CPU's kernels). It decides
#: with McNemar's one-sided test on the items' paired pass/fail and with the KLD
#: of the candidate from the serving variant on every token of the serving
#: variant's answers: hundreds of tokens even on a few items, a far stronger
#: signal. The limits sit far from both a sound and a broken rung on every
#: instruction set measured (docs/updates.md, bench/bench_preflight.py).
DEVICE_PREFLIGHT_POLICY: dict[str, Any] = {
    "min_property_items": 1,
    "max_drop": None,
    "max_overall_drop": None,
    "max_flips": None,
    "alpha": 0.05,
    "max_kld_mean": 0.2,
    "max_kld_p99_structured": 1.0,
    "max_kld_p99_prose": 1.0,
    "min_tokens": 50,
}


def state_file(config: AgentConfig) -> Path:
    assert config.update is not None
    return config.update.state_file or Path(config.models.dir) / "updater.json"


def keyring(config: AgentConfig) -> Keyring:
    """The keys this device accepts desired states from: ``[update] public_key`` and
    each ``[[update.retired_keys]]`` until its deadline (SignatureError if unreadable)."""
    assert config.update is not None
    u = config.update
    retired = []
    for i, r in enumerate(u.retired_keys):
        try:
            retired.append((load_public_key(r.path), r.accept_until.timestamp()))
        except SignatureError as exc:
            raise SignatureError(f"update.retired_keys.{i}.path: {exc}") from None
    try:
        current = load_public_key(u.public_key)
    except SignatureError as exc:
        raise SignatureError(f"update.public_key: {exc}") from None
    return Keyring(current, retired)


def restore_known_good(config: AgentConfig) -> None:
    """After a restart, serve what the updater last found healthy, not the factory default.

    A variant activated but not through its soak (the agent died mid-soak) is not
    known good: the device starts on the known-good one, and the desired state —
    its revision recorded only when an update ends — drives the update again.
    """
    memory = UpdaterMemory.load(state_file(config))
    if not memory.known_good:
        return
    try:
        entry = Catalog(config.models.dir).resolve(memory.known_good)
    except CatalogError:
        log.warning("known-good %s is not in %s; serving %s", memory.known_good,
                    config.models.dir, config.models.active)
        return
    if entry.path(Catalog(config.models.dir).dir).exists():
        config.models.active = entry.name


class ServingHooks:
    """The updater's model steps on a serving agent."""

    def __init__(self, config: AgentConfig, models: ModelSet, loop: asyncio.AbstractEventLoop,
                 watch: SoakWatch) -> None:
        assert config.update is not None
        self.config = config
        self.cfg: UpdateConfig = config.update
        self.models = models
        self.loop = loop
        self.watch = watch
        self.activated_at = time.time()
        soak = self.cfg.soak
        self.policy = SoakPolicy(soak.min_requests, soak.max_validation_increase,
                                 soak.max_error_increase, soak.max_latency_ratio)

    def preflight(self, entry: VariantEntry, path: Path) -> Check:
        cfg = self.cfg.preflight
        n = cfg.sample
        if n == 0:
            return Check(True, "pre-flight skipped (update.preflight.sample = 0)")
        from quantfleet.agent.quality.golden import (
            GoldenFileError,
            load_golden,
            starter_golden_path,
        )
        from quantfleet.agent.quality.runner import evaluate_backends
        from quantfleet.agent.quality.verdict import VerdictPolicy, judge

        try:
            golden = load_golden(cfg.golden or starter_golden_path())
        except (GoldenFileError, OSError) as exc:
            return Check(False, f"golden set unusable: {exc}")
        items = golden.sample(n, seed=cfg.seed).items
        baseline = self.models.active
        catalog = Catalog(self.config.models.dir)
        try:
            base_entry = catalog.resolve(baseline)
        except CatalogError as exc:
            return Check(False, f"the serving variant is not in the catalog: {exc}")
        options = LoadOptions(n_ctx=self.config.models.n_ctx, n_threads=cfg.threads)
        policy = VerdictPolicy.model_validate(
            {**DEVICE_PREFLIGHT_POLICY, "min_items": len(items), **cfg.policy})
        started = time.monotonic()
        # Separate instances: serving keeps every one of its workers meanwhile.
        base = load_backend(base_entry.backend, base_entry.path(catalog.dir), options)
        try:
            cand = load_backend(entry.backend, path, options)
        except Exception as exc:
            base.close()
            return Check(False, f"{entry.name} does not load: {exc}")
        try:
            [comparison] = evaluate_backends(items, (baseline, base), {entry.name: cand},
                                             seed=cfg.seed)
        finally:
            cand.close()
            base.close()
        verdict = judge(comparison, policy)
        log.info("pre-flight in %.0f s: %s", time.monotonic() - started, verdict.evidence())
        # Where it ran is part of the evidence: the same files run other kernels elsewhere.
        return Check(verdict.decision == "pass",
                     f"{len(items)} items vs {baseline} on {fingerprint().cpu_class}: "
                     f"{verdict.evidence()}")

    def activate(self, entry: VariantEntry) -> None:
        timeout = 600.0 + self.config.concurrency.deadline_s
        future = asyncio.run_coroutine_threadsafe(self.models.swap(entry.name), self.loop)
        future.result(timeout)
        self.activated_at = time.time()

    def soak(self, entry: VariantEntry, previous: str | None, elapsed_s: float
             ) -> tuple[SoakAnswer, str]:
        verdict = self.watch.judge(entry.name, previous, self.activated_at, self.policy)
        return ("breach" if verdict.breach else "continue"), verdict.reason


class StateChannel:
    """One MQTT session: subscribe to desired state, publish device state (retained)."""

    def __init__(self, mqtt_cfg: MqttConfig, device_id: str,
                 on_desired: Any) -> None:
        self.cfg = mqtt_cfg
        self.device_id = device_id
        self.on_desired = on_desired
        self.desired_topic = device_topic(device_id, "desired", mqtt_cfg.topic_root)
        self.state_topic = device_topic(device_id, "state", mqtt_cfg.topic_root)
        base = mqtt_cfg.client_id or f"qf-{device_id}"
        # Its own user where the broker binds a username to one client id (fleet/broker.py).
        own = (mqtt_cfg.model_copy(update={"username": mqtt_cfg.update_username})
               if mqtt_cfg.update_username else mqtt_cfg)
        self.client = make_client(own, f"{base}-update")
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._last: DeviceStatePayload | None = None
        self._lock = threading.Lock()

    def start(self) -> StateChannel:
        self.client.connect_async(*self.cfg.address(), **connect_options(self.cfg))
        self.client.loop_start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if rc.is_failure:
            log.error("update channel: broker refused the connection: %s", rc)
            return
        self.connected.set()
        client.subscribe(self.desired_topic, qos=1)
        with self._lock:
            last = self._last
        if last is not None:  # what happened while we were away
            self._send(last)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any,
                      props: Any) -> None:
        codes = list(rcs) if isinstance(rcs, list) else [rcs]
        if any(getattr(c, "is_failure", False) for c in codes):
            log.error("update channel: subscription to %s refused (%s); check the broker ACL",
                      self.desired_topic, codes)
            return
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.on_desired(msg.payload)
        except Exception:  # a bad message must not take the session down
            log.exception("handling desired state failed")

    def publish(self, state: DeviceStatePayload) -> None:
        with self._lock:
            self._last = state
        self._send(state)

    def _send(self, state: DeviceStatePayload) -> None:
        info = self.client.publish(self.state_topic, state.model_dump_json(), qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.info("state %s queued until the broker is back (rc %s)", state.update_state,
                     info.rc)


class DeviceUpdates:
    """Started once the models are loaded; stopped when the agent stops."""

    def __init__(self, config: AgentConfig, models: ModelSet, loop: asyncio.AbstractEventLoop,
                 watch: SoakWatch, *, boot_epoch: int,
                 record: Callable[[DeviceStatePayload], object] | None = None) -> None:
        assert config.update is not None and config.telemetry is not None
        u = config.update
        self.hooks = ServingHooks(config, models, loop, watch)
        self.record = record
        self.channel = StateChannel(config.telemetry.mqtt, config.device.id, self._desired)
        policy = UpdatePolicy(
            bandwidth_bps=u.bandwidth_bps, min_free_bytes=u.min_free_mb * 1024 * 1024,
            soak_s=u.soak.duration_s, soak_poll_s=u.soak.poll_s,
            download_timeout_s=u.download_timeout_s,
            keep_variants=u.keep_variants)
        self.updater = Updater(config.device.id, Path(config.models.dir), state_file(config),
                               keyring(config), self.hooks, self._report,
                               boot_epoch=boot_epoch, policy=policy, current=models.active,
                               artifact_token=config.artifact_token(), ca_file=u.ca_file)

    def _report(self, state: DeviceStatePayload) -> None:
        """Retained on ``…/state`` for the registry, and as a telemetry event (durable,
        through the outbox) so the fleet keeps every step, not only the last."""
        self.channel.publish(state)
        if self.record is not None:
            self.record(state)

    def _desired(self, raw: bytes) -> None:
        self.updater.handle(raw)

    def start(self) -> DeviceUpdates:
        # Announce where this device stands before anything else happens: healthy on
        # the variant its last update ended on, or idle when it never had one.
        m = self.updater.memory
        settled = bool(m.last_revision) and m.current == m.known_good
        self.updater.report("healthy" if settled else "idle", reason="agent started")
        self.channel.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.updater.stop()
        self.updater.wait(timeout)
        self.channel.stop()
