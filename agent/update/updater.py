"""The device updater: a desired variant becomes the served one only when it has earned it.

``downloading → verifying → preflight → activating → soaking → healthy``, or
``refused`` (the message itself is unusable), ``failed`` (the artifact or the
pre-flight failed; the current variant keeps serving) or ``rolled_back`` (the
soak breached local policy; the last known-good variant serves again). Every
step is reported as a retained ``DeviceStatePayload``; "installed" is never
"healthy".

What is checked before a byte is fetched: the payload validates, it is for
this device, its revision is newer than the last one acted on, its backend
runs here, and a key the device trusts (its current key, or a retiring one
before its deadline) signed every field of it — device, revision, variant,
backend, sha256, size, URL, issue time (``signing.Keyring``); a refused
message's revision is never remembered, so a forged one cannot make the
device ignore the fleet's next real revision. What is checked after: size
and sha256 of the file (a mismatch deletes it). The model-specific steps —
pre-flight on a golden subset, the hot swap, the soak watch — are hooks, so
the state machine is the same for every backend and testable on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from pydantic import ValidationError

from quantfleet.agent.wire import DesiredPayload, DeviceStatePayload, UpdateState
from quantfleet.models.catalog import Catalog, Precision, VariantEntry, now_iso

from .download import DownloadError, download
from .signing import Keyring, PublicKey, SignatureError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """A hook's answer: ``ok`` or not, and why in a few words."""

    ok: bool
    reason: str = ""


SoakAnswer = Literal["healthy", "continue", "breach"]


class UpdateHooks(Protocol):
    def preflight(self, entry: VariantEntry, path: Path) -> Check:
        """Judge the candidate (golden subset against the known-good variant)."""

    def activate(self, entry: VariantEntry) -> None:
        """Serve ``entry`` from now on; in-flight requests finish on the old variant."""

    def soak(self, entry: VariantEntry, previous: str | None, elapsed_s: float
             ) -> tuple[SoakAnswer, str]:
        """Compare the new variant's live signals with the previous one's."""


@dataclass
class UpdatePolicy:
    bandwidth_bps: float | None = None
    min_free_bytes: int = 256 * 1024 * 1024
    soak_s: float = 300.0
    soak_poll_s: float = 5.0
    download_timeout_s: float = 3600.0
    keep_variants: int = 3  # files kept on disk: current, known-good, and the newest others
    supported_backends: tuple[str, ...] = ("llama.cpp", "onnxruntime")


@dataclass
class UpdaterMemory:
    """What survives a restart: the revision acted on and the known-good variant."""

    last_revision: int = 0
    current: str | None = None
    known_good: str | None = None
    history: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> UpdaterMemory:
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["last_revision"]), raw.get("current"), raw.get("known_good"),
                       list(raw.get("history", [])))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("updater state %s unreadable (%s); starting from defaults", path, exc)
            return cls()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".updater.")
        with os.fdopen(fd, "w") as fh:
            json.dump(vars(self), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


class Updater:
    def __init__(self, device_id: str, models_dir: Path, state_file: Path,
                 public_key: PublicKey | Keyring, hooks: UpdateHooks,
                 report: Callable[[DeviceStatePayload], None], *, boot_epoch: int,
                 policy: UpdatePolicy | None = None, current: str | None = None,
                 artifact_token: str | None = None, ca_file: Path | None = None) -> None:
        self.device_id = device_id
        self.artifact_token = artifact_token  # the device's credential for the artifact server
        self.ca_file = ca_file
        self.models_dir = Path(models_dir)
        self.state_file = state_file
        self.keyring = public_key if isinstance(public_key, Keyring) else Keyring(public_key)
        self.hooks = hooks
        self.report_fn = report
        self.boot_epoch = boot_epoch
        self.policy = policy or UpdatePolicy()
        self.memory = UpdaterMemory.load(state_file)
        if current is not None:
            self.memory.current = current
            self.memory.known_good = self.memory.known_good or current
        if self.memory.known_good and self.memory.known_good not in self.memory.history:
            self.memory.history.insert(0, self.memory.known_good)
        self._lock = threading.Lock()
        self._busy = threading.Event()
        self._stop = threading.Event()
        self.last_state: DeviceStatePayload | None = None
        self._working_on = 0

    # -- reporting ------------------------------------------------------
    def _end(self, state: UpdateState, d: DesiredPayload, reason: str = "",
             target: str | None = None) -> None:
        self.memory.last_revision = max(self.memory.last_revision, d.revision)
        self.memory.save(self.state_file)
        self.report(state, target=target, revision=d.revision, reason=reason)

    def report(self, state: UpdateState, *, target: str | None = None, reason: str = "",
               revision: int | None = None, progress: float | None = None) -> None:
        payload = DeviceStatePayload(
            device_id=self.device_id, boot_epoch=self.boot_epoch, variant=self.memory.current,
            known_good=self.memory.known_good, target=target,
            desired_revision=revision if revision is not None else self.memory.last_revision,
            update_state=state, reason=reason[:1000], progress=progress, ts=time.time())
        self.last_state = payload
        log.info("update state %s%s%s", state, f" ({target})" if target else "",
                 f": {reason}" if reason else "")
        try:
            self.report_fn(payload)
        except Exception:  # reporting must not break the update itself
            log.exception("reporting update state failed")

    # -- entry point ----------------------------------------------------
    def handle(self, raw: bytes) -> DesiredPayload | None:
        """Check a desired-state message; start applying it in a thread if it is usable."""
        if not raw:
            return None  # a cleared retained message
        try:
            desired = DesiredPayload.model_validate_json(raw)
        except ValidationError as exc:
            from quantfleet.strict import explain

            self.report("refused", reason="malformed desired state: "
                        + explain(exc, whole="payload"))
            return None
        problem = self._refusal(desired)
        if problem is not None:
            if problem:  # an empty reason means a quiet ignore (stale or already applied)
                self.report("refused", target=desired.variant, revision=desired.revision,
                            reason=problem)
            return None
        if self._busy.is_set() and desired.revision == self._working_on:
            return None  # the retained message again, e.g. after a reconnect
        if self._busy.is_set():
            self.report("refused", target=desired.variant, revision=desired.revision,
                        reason="another update is in progress; the fleet will re-send")
            return None
        self._busy.set()
        self._working_on = desired.revision
        threading.Thread(target=self._apply_guarded, args=(desired,), daemon=True,
                         name="updater").start()
        return desired

    def _refusal(self, d: DesiredPayload) -> str | None:
        if d.device_id != self.device_id:
            return f"desired state is for {d.device_id}, not {self.device_id}"
        if d.revision <= self.memory.last_revision:
            return ""  # stale or already handled
        if d.backend not in self.policy.supported_backends:
            return f"backend {d.backend!r} does not run on this device"
        if d.schema_version < 2:
            return ("desired state version 1 signs neither its device nor its revision; "
                    "refused (the fleet must sign version 2)")
        try:
            self.keyring.verify_desired(d.model_dump(mode="json"), d.signature)
        except SignatureError as exc:
            return str(exc)
        if d.variant == self.memory.current:
            self._end("healthy", d, "already serving it")
            return ""
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for an update in progress to end (for tests and clean shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._busy.is_set():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self._stop.set()

    # -- the state machine ----------------------------------------------
    def _apply_guarded(self, d: DesiredPayload) -> None:
        try:
            with self._lock:
                self._apply(d)
        except Exception as exc:  # an unexpected failure must still be reported
            if self._stop.is_set():  # the agent is stopping under us: act again next start
                log.warning("update to %s interrupted by shutdown (%s)", d.variant, exc)
                return
            log.exception("update to %s crashed", d.variant)
            self._end("failed", d, f"internal error: {type(exc).__name__}: {exc}", d.variant)
        finally:
            self._busy.clear()

    def _apply(self, d: DesiredPayload) -> None:
        # The revision is recorded only when the update ends (in _end), so a device
        # killed mid-download acts on the same retained message again and resumes.
        dest = self.models_dir / f"{d.variant}.{'gguf' if d.backend == 'llama.cpp' else 'onnx'}"
        catalog = Catalog(self.models_dir)
        existing = catalog.doc.variants.get(d.variant)
        have_file = (existing is not None and existing.sha256 == d.sha256
                     and catalog.verify(existing) is None)
        if not have_file:
            partial = dest.with_name(dest.name + ".partial")
            have = partial.stat().st_size if partial.exists() else 0
            if 0 < have < d.size_bytes:  # a download cut short (e.g. the agent was killed)
                self.report("downloading", target=d.variant, revision=d.revision,
                            progress=round(have / d.size_bytes, 3),
                            reason=f"resuming at byte {have} of {d.size_bytes}")
            else:
                self.report("downloading", target=d.variant, revision=d.revision, progress=0.0)
            last = [have / d.size_bytes if have < d.size_bytes else 0.0]

            def progress(have: int, total: int) -> None:
                frac = have / total
                if frac - last[0] >= 0.1:
                    last[0] = frac
                    self.report("downloading", target=d.variant, revision=d.revision,
                                progress=round(frac, 3))

            try:
                download(d.url, dest, sha256=d.sha256, size_bytes=d.size_bytes,
                         bandwidth_bps=self.policy.bandwidth_bps,
                         min_free_bytes=self.policy.min_free_bytes,
                         timeout_s=min(60.0, self.policy.download_timeout_s),
                         token=self.artifact_token, ca_file=self.ca_file,
                         progress=progress, stop=self._stop.is_set)
            except DownloadError as exc:
                if self._stop.is_set():
                    return  # shutting down: the partial file is kept to resume
                self._end("failed", d, str(exc), target=d.variant)
                return
        # The download already hashed every byte; verifying re-reads the file as it
        # lies on disk now, which is what will be loaded.
        self.report("verifying", target=d.variant, revision=d.revision)
        path = existing.path(self.models_dir) if have_file and existing is not None else dest
        entry = self._catalog_entry(d, path)
        problem = Catalog(self.models_dir).verify(entry)
        if problem is not None:
            entry.path(self.models_dir).unlink(missing_ok=True)
            self._end("failed", d, f"verification failed: {problem}; file deleted", d.variant)
            return
        if d.variant in self.memory.history:
            # Going back to a variant that passed its soak here (a fleet rollback):
            # shift back quickly; the soak still watches it.
            self.report("preflight", target=d.variant, revision=d.revision,
                        reason=f"skipped: {d.variant} passed its soak on this device before")
            verdict = Check(True)
        else:
            self.report("preflight", target=d.variant, revision=d.revision)
            verdict = self.hooks.preflight(entry, entry.path(self.models_dir))
        if self._stop.is_set():
            return  # shutting down: the retained desired state resumes it next start
        if not verdict.ok:
            self._end("failed", d, f"pre-flight failed: {verdict.reason}", d.variant)
            return
        self.report("activating", target=d.variant, revision=d.revision)
        previous = self.memory.current
        try:
            self.hooks.activate(entry)
        except Exception as exc:
            self._end("failed", d, f"activation failed: {exc}", d.variant)
            return
        self.memory.current = d.variant
        self.memory.save(self.state_file)
        started = time.monotonic()
        while True:
            self.report("soaking", target=d.variant, revision=d.revision)
            answer, why = self.hooks.soak(entry, previous, time.monotonic() - started)
            if answer == "breach":
                self._roll_back(d, previous, why)
                return
            if answer == "healthy" or time.monotonic() - started >= self.policy.soak_s:
                break
            if self._stop.wait(self.policy.soak_poll_s):
                return
        self.memory.known_good = d.variant
        self.memory.history = [v for v in self.memory.history if v != d.variant] + [d.variant]
        self._end("healthy", d)
        self._prune()

    def _roll_back(self, d: DesiredPayload, previous: str | None, why: str) -> None:
        target = self.memory.known_good or previous
        if target is None:
            self._end("failed", d, f"soak breached ({why}) and there is no known-good variant",
                      d.variant)
            return
        entry = Catalog(self.models_dir).doc.variants.get(target)
        if entry is None:
            self._end("failed", d, f"soak breached ({why}); known-good {target} is not on disk",
                      d.variant)
            return
        self.hooks.activate(entry)
        self.memory.current = target
        self._end("rolled_back", d, f"soak breached: {why}; serving {target} again", d.variant)

    def _catalog_entry(self, d: DesiredPayload, path: Path) -> VariantEntry:
        catalog = Catalog(self.models_dir)
        label = d.variant.rsplit("-", 1)[-1]
        precision = Precision(label=label, tensor_types={}, bits_per_weight=0.0)
        if d.backend == "llama.cpp":
            from quantfleet.models.build import describe_gguf
            from quantfleet.models.gguf_file import ModelFileError

            # A file that does not parse keeps the empty description: verification
            # below reports its real problem.
            with contextlib.suppress(ModelFileError):
                precision = describe_gguf(path, label)  # as `models build` describes it
        entry = VariantEntry(
            name=d.variant, source=d.variant.rsplit("-", 1)[0], backend=d.backend,
            format="gguf" if d.backend == "llama.cpp" else "onnx",
            precision=precision,
            file=path.name, size_bytes=d.size_bytes, sha256=d.sha256,
            notes=[f"installed from {d.url} (revision {d.revision})"],
            build={"installed_by": "updater", "rollout_id": d.rollout_id},
            created_at=now_iso())
        catalog.put_variant(entry)
        catalog.save()
        return entry

    def _prune(self) -> None:
        """Keep the current and known-good files and the newest others, up to the policy."""
        catalog = Catalog(self.models_dir)
        keep = {self.memory.current, self.memory.known_good}
        keep.update(self.memory.history[-self.policy.keep_variants:])
        removed = False
        for name, entry in list(catalog.doc.variants.items()):
            if name in keep or entry.build.get("installed_by") != "updater":
                continue
            entry.path(self.models_dir).unlink(missing_ok=True)
            del catalog.doc.variants[name]
            removed = True
            log.info("pruned %s", name)
        if removed:
            catalog.save()
