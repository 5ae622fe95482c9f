"""The device updater against a real artifact server (asking for device credentials), real
signatures and real variants."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from quantfleet.agent.backends import GenerationRequest, LoadOptions, load_backend
from quantfleet.agent.update.signing import (
    Keyring,
    SignatureError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_desired,
)
from quantfleet.agent.update.updater import Check, SoakAnswer, UpdatePolicy, Updater
from quantfleet.agent.wire import DesiredPayload, DeviceStatePayload
from quantfleet.fleet.artifacts import create_artifact_app
from quantfleet.fleet.auth import Credentials, HttpAuth, issue_device_credential
from quantfleet.fleet.config import AuthEntries
from quantfleet.models.catalog import Catalog, VariantEntry
from tests.support import private_ca, serve


@dataclass
class DeviceHooks:
    """Hooks that really load the candidate: pre-flight answers one prompt with it."""

    soak_answers: list[tuple[SoakAnswer, str]] = field(default_factory=list)
    preflight_ok: bool = True
    activated: list[str] = field(default_factory=list)
    preflights: list[str] = field(default_factory=list)

    def preflight(self, entry: VariantEntry, path: Path) -> Check:
        self.preflights.append(entry.name)
        backend = load_backend(entry.backend, path, LoadOptions(n_ctx=256))
        try:
            out = backend.generate(GenerationRequest(
                prompt="<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
                max_tokens=8))
        finally:
            backend.close()
        if not out.text.strip():
            return Check(False, "empty answer")
        return Check(self.preflight_ok, "" if self.preflight_ok else "golden subset regressed")

    def activate(self, entry: VariantEntry) -> None:
        self.activated.append(entry.name)

    def soak(self, entry: VariantEntry, previous: str | None, elapsed_s: float
             ) -> tuple[SoakAnswer, str]:
        return self.soak_answers.pop(0) if self.soak_answers else ("healthy", "")


# The artifact server asks for device credentials, as a fleet with [http.auth] does;
# the device fixture's updater sends this one.
DEVICE_TOKEN, DEVICE_ENTRY = issue_device_credential("dev-1")


@pytest.fixture(scope="module")
def fleet(ladder_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[str, Path, Path]]:
    keys = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(keys)
    auth = HttpAuth(Credentials(AuthEntries(devices=[DEVICE_ENTRY])))
    app = create_artifact_app(ladder_dir, load_private_key(private), "http://unused", auth)
    with serve(app) as url:
        yield url, private, public


@pytest.fixture(scope="module")
def https_fleet(ladder_dir: Path, fleet: tuple[str, Path, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path, Path]]:
    """The same artifact server over HTTPS, its certificate signed by a private CA."""
    ca, cert, key = private_ca(tmp_path_factory.mktemp("tls"))
    auth = HttpAuth(Credentials(AuthEntries(devices=[DEVICE_ENTRY])))
    app = create_artifact_app(ladder_dir, load_private_key(fleet[1]), "http://unused", auth)
    with serve(app, tls=(cert, key)) as url:
        yield url, fleet[1], fleet[2], ca


def desired(fleet: tuple[str, Path, Path], catalog: Catalog, label: str, revision: int,
            *, device: str = "dev-1", key: Path | None = None,
            tamper: dict[str, object] | None = None, **fields: object) -> bytes:
    """A desired state signed (version 2) over its fields, ``fields`` included; then
    ``tamper`` is applied to the signed message, as someone on the broker would."""
    url, private, _ = fleet
    e = catalog.resolve(label)
    doc: dict[str, object] = {"device_id": device, "revision": revision,
                              "variant": e.name, "backend": e.backend, "sha256": e.sha256,
                              "size_bytes": e.size_bytes, "url": f"{url}/v1/artifacts/{e.name}",
                              "issued_at": time.time(), **fields}
    return signed(load_private_key(key or private), doc, tamper)


def signed(private: Any, doc: dict[str, object],
           tamper: dict[str, object] | None = None) -> bytes:
    unsigned = DesiredPayload.model_validate(
        {**doc, "key_id": key_id(private.public_key()), "signature": "-"})
    payload = unsigned.model_copy(update={
        "signature": sign_desired(private, unsigned.model_dump(mode="json"))})
    return payload.model_copy(update=tamper or {}).model_dump_json().encode()


@pytest.fixture
def device(tmp_path: Path, fleet: tuple[str, Path, Path], catalog: Catalog
           ) -> Iterator[tuple[Updater, DeviceHooks, list[DeviceStatePayload]]]:
    with device_on(tmp_path, fleet, catalog, DEVICE_TOKEN) as d:
        yield d


@contextmanager
def device_on(tmp_path: Path, fleet: tuple[str, Path, Path], catalog: Catalog,
                token: str | None, ca_file: Path | None = None
                ) -> Iterator[tuple[Updater, DeviceHooks, list[DeviceStatePayload]]]:
    models = tmp_path / "models"
    models.mkdir(parents=True)
    # The device starts with Q8_0 installed and known good.
    q8 = catalog.resolve("Q8_0")
    shutil.copy(q8.path(catalog.dir), models / q8.file)
    local = Catalog(models)
    local.put_variant(q8)
    local.save()
    states: list[DeviceStatePayload] = []
    hooks = DeviceHooks()
    updater = Updater("dev-1", models, tmp_path / "updater.json", load_public_key(fleet[2]),
                      hooks, states.append, boot_epoch=3, current=q8.name,
                      policy=UpdatePolicy(soak_s=5, soak_poll_s=0.01, min_free_bytes=0),
                      artifact_token=token, ca_file=ca_file)
    try:
        yield updater, hooks, states
    finally:
        updater.stop()


def walk(states: list[DeviceStatePayload]) -> list[str]:
    out: list[str] = []
    for s in states:
        if not out or out[-1] != s.update_state:
            out.append(s.update_state)
    return out


def test_a_good_variant_walks_every_state_to_healthy(device, fleet, catalog) -> None:  # type: ignore[no-untyped-def]
    updater, hooks, states = device
    assert updater.handle(desired(fleet, catalog, "Q4_K_M", 1)) is not None
    assert updater.wait(60)
    assert walk(states) == ["downloading", "verifying", "preflight", "activating", "soaking",
                            "healthy"]
    assert hooks.activated == ["smollm2-135m-Q4_K_M"]
    final = states[-1]
    assert final.variant == final.known_good == "smollm2-135m-Q4_K_M"
    assert final.desired_revision == 1 and final.boot_epoch == 3
    local = Catalog(updater.models_dir)
    installed = local.resolve("smollm2-135m-Q4_K_M")
    assert local.verify(installed) is None
    # The device describes the file the way `models build` did on the fleet.
    assert installed.precision == catalog.resolve("Q4_K_M").precision
    # The same revision again (a retained message after reconnect) changes nothing.
    states.clear()
    assert updater.handle(desired(fleet, catalog, "Q4_K_M", 1)) is None
    assert states == []


@pytest.mark.parametrize("token", [None, "qfd_not-issued"])
def test_a_device_without_its_credential_fetches_nothing(  # type: ignore[no-untyped-def]
        tmp_path, fleet, catalog, token) -> None:
    """The fleet asks for a device credential: without one, or with one it did not issue,
    the download fails with the reason and nothing is kept."""
    with device_on(tmp_path, fleet, catalog, token) as (updater, hooks, states):
        assert updater.handle(desired(fleet, catalog, "Q4_K_M", 1)) is not None
        assert updater.wait(60)
        assert walk(states) == ["downloading", "failed"]
        assert "HTTP 401" in states[-1].reason
        assert ("refused this device's artifact credential" if token else
                "wants an artifact credential") in states[-1].reason
        assert hooks.activated == [] and states[-1].variant == "smollm2-135m-Q8_0"
        assert not list(updater.models_dir.glob("*Q4_K_M*"))


def test_over_https_the_device_trusts_the_fleet_ca_it_is_given(  # type: ignore[no-untyped-def]
        tmp_path, https_fleet, catalog) -> None:
    """[update] ca_file: the fleet's certificate must chain to it; without it (the system's
    trust store) a private CA's certificate is refused before a byte is fetched."""
    url, private, public, ca = https_fleet
    served = (url, private, public)
    with device_on(tmp_path / "no-ca", served, catalog, DEVICE_TOKEN) as (updater, _, states):
        assert updater.handle(desired(served, catalog, "Q4_K_M", 1)) is not None
        assert updater.wait(60)
        assert walk(states) == ["downloading", "failed"]
        assert "CERTIFICATE_VERIFY_FAILED" in states[-1].reason, states[-1].reason
    with device_on(tmp_path / "ca", served, catalog, DEVICE_TOKEN,
                   ca_file=ca) as (updater, hooks, states):
        assert updater.handle(desired(served, catalog, "Q4_K_M", 1)) is not None
        assert updater.wait(60)
        assert states[-1].update_state == "healthy", states[-1].reason
        assert hooks.activated == ["smollm2-135m-Q4_K_M"]


def test_a_tampered_artifact_is_refused_and_deleted(device, fleet, catalog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    updater, hooks, states = device
    # The fleet signed the true sha256, but the file it serves was altered since.
    e = catalog.resolve("Q2_K")
    raw = desired(fleet, catalog, "Q2_K", 1, tamper={"sha256": "ab" * 32})
    assert updater.handle(raw) is None  # the signature no longer matches the fields
    assert states[-1].update_state == "refused" and "signature" in states[-1].reason
    states.clear()
    assert e.sha256 != "ab" * 32
    wrong = desired(fleet, catalog, "Q2_K", 2, sha256="ab" * 32)  # signed as it is
    assert updater.handle(wrong) is not None
    assert updater.wait(60)
    assert walk(states) == ["downloading", "failed"]
    assert "does not match the expected" in states[-1].reason
    assert not list(updater.models_dir.glob("*Q2_K*"))
    assert hooks.activated == [] and states[-1].variant == "smollm2-135m-Q8_0"


def test_bad_messages_are_refused_with_a_reason(device, fleet, catalog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    updater, hooks, states = device
    updater.handle(b"{not json")
    assert states[-1].update_state == "refused" and "malformed desired state" in states[-1].reason
    updater.handle(desired(fleet, catalog, "Q4_K_M", 1, device="dev-2"))
    assert "is for dev-2" in states[-1].reason
    other_key = generate_keypair(tmp_path / "other")[0]
    updater.handle(desired(fleet, catalog, "Q4_K_M", 1, key=other_key))
    assert "which this device does not trust" in states[-1].reason
    # Another key claiming to be the trusted one: the signature gives it away.
    trusted_id = key_id(load_public_key(fleet[2]))
    updater.handle(desired(fleet, catalog, "Q4_K_M", 1, key=other_key,
                           tamper={"key_id": trusted_id}))
    assert "signature does not match" in states[-1].reason
    updater.handle(desired(fleet, catalog, "Q4_K_M", 1, tamper={"url": "ftp://x"}))
    assert "url" in states[-1].reason
    v1 = json.loads(desired(fleet, catalog, "Q4_K_M", 1))
    v1.update(schema_version=1, key_id=None)
    updater.handle(json.dumps(v1).encode())
    assert "version 1 signs neither its device nor its revision" in states[-1].reason
    assert hooks.activated == [] and all(s.variant == "smollm2-135m-Q8_0" for s in states)


def test_a_forged_revision_is_refused_and_not_remembered(device, fleet, catalog) -> None:  # type: ignore[no-untyped-def]
    """A genuine message republished with revision 1006 and another URL (issue 14, #2):
    refused, and the fleet's next real revision is still acted on."""
    updater, _, states = device
    forged = desired(fleet, catalog, "Q4_K_M", 1,
                     tamper={"revision": 1006, "url": "http://127.0.0.1:9/evil"})
    assert updater.handle(forged) is None
    assert states[-1].update_state == "refused" and "signature does not match" in \
        states[-1].reason
    assert updater.memory.last_revision == 0
    assert json.loads((updater.state_file).read_text())["last_revision"] == 0 \
        if updater.state_file.exists() else True
    assert updater.handle(desired(fleet, catalog, "Q4_K_M", 2)) is not None
    assert updater.wait(120)
    assert states[-1].update_state == "healthy" and states[-1].desired_revision == 2


def test_replays_to_another_device_or_of_an_old_revision_are_refused(  # type: ignore[no-untyped-def]
        device, fleet, catalog) -> None:
    """A message signed for dev-2 re-addressed to dev-1 (issue 14, #11) is refused; a
    genuine older revision replayed is ignored; a huge revision cannot be stored."""
    updater, _, states = device
    for_dev2 = desired(fleet, catalog, "Q2_K", 5, device="dev-2", tamper={"device_id": "dev-1"})
    assert updater.handle(for_dev2) is None
    assert "signature does not match" in states[-1].reason
    assert updater.memory.last_revision == 0
    old = desired(fleet, catalog, "Q4_K_M", 2)
    assert updater.handle(desired(fleet, catalog, "Q4_K_M", 3)) is not None
    assert updater.wait(120) and updater.memory.last_revision == 3
    states.clear()
    assert updater.handle(old) is None and states == []  # stale: quietly ignored
    huge = json.loads(desired(fleet, catalog, "Q2_K", 4))
    huge["revision"] = 2**62
    updater.handle(json.dumps(huge).encode())
    assert "malformed desired state: revision" in states[-1].reason
    assert updater.memory.last_revision == 3


def test_a_retired_key_is_accepted_until_its_deadline(tmp_path: Path) -> None:
    old_priv, old_pub = generate_keypair(tmp_path / "old")
    new_priv, new_pub = generate_keypair(tmp_path / "new")
    now = time.time()
    ring = Keyring(load_public_key(new_pub), [(load_public_key(old_pub), now + 3600)])

    def doc(private: Path, issued_at: float) -> tuple[dict[str, Any], str]:
        raw = json.loads(signed(load_private_key(private), {
            "device_id": "dev-1", "revision": 1, "variant": "v", "backend": "llama.cpp",
            "sha256": "0" * 64, "size_bytes": 1, "url": "http://x/v1/artifacts/v",
            "issued_at": issued_at}))
        return raw, raw["signature"]

    ring.verify_desired(*doc(new_priv, now))  # the current key: no deadline
    ring.verify_desired(*doc(old_priv, now), now=now)  # the old one, before its deadline
    with pytest.raises(SignatureError, match="retired on"):
        ring.verify_desired(*doc(old_priv, now), now=now + 3601)
    with pytest.raises(SignatureError, match="after its retirement"):
        ring.verify_desired(*doc(old_priv, now + 3700), now=now)
    ring.verify_desired(*doc(new_priv, now + 3700), now=now + 3701)


def test_a_failed_preflight_never_activates(device, fleet, catalog) -> None:  # type: ignore[no-untyped-def]
    updater, hooks, states = device
    hooks.preflight_ok = False
    updater.handle(desired(fleet, catalog, "Q2_K", 1))
    assert updater.wait(60)
    assert walk(states)[-2:] == ["preflight", "failed"]
    assert "golden subset regressed" in states[-1].reason
    assert hooks.activated == [] and states[-1].variant == "smollm2-135m-Q8_0"


def test_a_soak_breach_rolls_back_to_known_good(device, fleet, catalog) -> None:  # type: ignore[no-untyped-def]
    updater, hooks, states = device
    hooks.soak_answers = [("continue", ""), ("breach", "validation failures 18% vs 2%")]
    updater.handle(desired(fleet, catalog, "Q2_K", 1))
    assert updater.wait(60)
    assert walk(states)[-3:] == ["activating", "soaking", "rolled_back"]
    assert hooks.activated == ["smollm2-135m-Q2_K", "smollm2-135m-Q8_0"]
    assert states[-1].variant == states[-1].known_good == "smollm2-135m-Q8_0"
    assert "validation failures 18% vs 2%" in states[-1].reason


def test_a_device_stopped_mid_download_resumes_the_same_revision(device, fleet, catalog,  # type: ignore[no-untyped-def]
                                                                 tmp_path) -> None:
    updater, hooks, states = device
    updater.policy.bandwidth_bps = 40e6  # slow enough to stop it part way
    updater.handle(desired(fleet, catalog, "Q4_K_M", 1))
    deadline = time.monotonic() + 30
    while not any(s.update_state == "downloading" and (s.progress or 0) >= 0.2 for s in states):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    updater.stop()
    assert updater.wait(30)
    partial = list(updater.models_dir.glob("*.partial"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    # The agent restarts: same state file, the retained message arrives again.
    again = Updater("dev-1", updater.models_dir, updater.state_file, updater.keyring, hooks,
                    states.append, boot_epoch=4, policy=UpdatePolicy(soak_s=1, soak_poll_s=0.01,
                                                                     min_free_bytes=0),
                    artifact_token=DEVICE_TOKEN)  # the resuming Range request carries it too
    assert again.memory.last_revision == 0
    assert again.handle(desired(fleet, catalog, "Q4_K_M", 1)) is not None
    assert again.wait(60)
    assert states[-1].update_state == "healthy"
    assert not list(updater.models_dir.glob("*.partial"))


def test_going_back_to_a_variant_healthy_here_before_skips_the_preflight(  # type: ignore[no-untyped-def]
        device, fleet, catalog) -> None:
    updater, hooks, states = device
    updater.handle(desired(fleet, catalog, "Q4_K_M", 1))
    assert updater.wait(60) and states[-1].update_state == "healthy"
    assert hooks.preflights == ["smollm2-135m-Q4_K_M"]
    # The fleet rolls the device back to its factory variant: no second pre-flight.
    states.clear()
    updater.handle(desired(fleet, catalog, "Q8_0", 2))
    assert updater.wait(60)
    assert walk(states) == ["verifying", "preflight", "activating", "soaking", "healthy"]
    assert "skipped" in next(s.reason for s in states if s.update_state == "preflight")
    assert hooks.preflights == ["smollm2-135m-Q4_K_M"]
    assert hooks.activated == ["smollm2-135m-Q4_K_M", "smollm2-135m-Q8_0"]
    # A variant never healthy here still gets its pre-flight.
    updater.handle(desired(fleet, catalog, "Q2_K", 3))
    assert updater.wait(60)
    assert hooks.preflights == ["smollm2-135m-Q4_K_M", "smollm2-135m-Q2_K"]
