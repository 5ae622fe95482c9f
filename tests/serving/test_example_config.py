"""Every edit packaging/agent.example.toml's comments suggest gives a config that checks.

The example says how to change its options ("" disables fallback, uncomment
unix_socket instead of host/port, the [telemetry] and [update] tables, ...).
EDITS lists each such edit as line substitutions on the example; the example
must stay in sync with it: every substituted line must still be in the file,
and every commented-out option the file offers must be covered by an edit.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantfleet.agent.cli import cli
from quantfleet.agent.update.signing import generate_keypair

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "packaging" / "agent.example.toml"
KEY = "@KEY@"  # the test puts a real public key's path here

Edit = list[tuple[str, str]]  # (a line of the example, what it becomes)


def uncomment(*lines: str) -> Edit:
    """Uncomment these lines (given without their leading "# ")."""
    return [(f"# {line}", line) for line in lines]


TELEMETRY = uncomment(
    "[telemetry]",
    'device_id = "edge-001"             # must equal device.id when both are set',
    "[telemetry.mqtt]",
    'broker = "mqtt://127.0.0.1:1883"',
    'username = "edge-001"',
    'update_username = "edge-001:update"   # the update channel\'s own user',
    'password_file = "/run/credentials/quantfleet-agent.service/mqtt-password"',
    "[telemetry.outbox]",
    'path = "/var/lib/quantfleet/telemetry/outbox.db"',
)
UPDATE = [
    ('# public_key = "/etc/quantfleet/signing.pub"   # the fleet\'s key: '
     "`quantfleet keys generate`", f'public_key = "{KEY}"'),
    ('# path = "/etc/quantfleet/signing-2026.pub"', f'path = "{KEY}"'),
    *uncomment(
        "[update]",
        "bandwidth_bps = 2000000        # download limit; unset = unlimited",
        "min_free_mb = 256              # disk that must stay free after a download",
        "keep_variants = 3              # downloaded files kept (current and known-good "
        "always are)",
        'artifact_token_env = "QUANTFLEET_ARTIFACT_TOKEN"',
        'artifact_token_credential = "artifact-token"',
        'ca_file = "/etc/quantfleet/fleet-ca.pem"   # the CA of the fleet\'s HTTPS certificate',
        "[[update.retired_keys]]        # a key being rotated out (docs/security.md)",
        "accept_until = 2027-03-01T00:00:00Z",
        "[update.preflight]",
        "sample = 12                    # golden items both variants answer; 0 skips the "
        "pre-flight",
        "[update.preflight.policy]      # VerdictPolicy overrides (docs/eval.md)",
        "max_kld_p99_structured = 1.0",
        "[update.soak]",
        'duration_s = 300               # watch the new variant this long before "healthy"',
        "min_requests = 20",
        "max_validation_increase = 0.10",
        "max_error_increase = 0.05",
        "max_latency_ratio = 2.0",
    ),
]

# Keep in sync with packaging/agent.example.toml: one entry per edit its comments suggest.
EDITS: dict[str, Edit] = {
    "device.id": uncomment('id = "edge-001"'),
    "models.dir": [('# dir = "/var/lib/quantfleet/models"', 'dir = "@MODELS@"')],
    "models.fallback disabled": [('fallback = "Q8_0"', 'fallback = ""')],
    "models.fallback_load eager": [('fallback_load = "lazy"', 'fallback_load = "eager"')],
    "models.fallback_load on_demand": [('fallback_load = "lazy"',
                                        'fallback_load = "on_demand"')],
    "models.threads": uncomment(
        "threads = 2                # CPU threads per generation (default: all cores)"),
    "listen.unix_socket": uncomment(
        'unix_socket = "/run/quantfleet/agent.sock"   # instead of host/port'),
    "budgets quotas": [("tokens_per_minute = 0        # per client, prompt + completion; "
                        "0 = unlimited", "tokens_per_minute = 5000"),
                       ("tokens_per_day = 0", "tokens_per_day = 100000")],
    "validation patterns": uncomment(
        'refusal_patterns = ["\\\\bI can(?:no|\')t help\\\\b"]   # default: a built-in list',
        'citation_pattern = "\\\\[\\\\d+\\\\]"                   # default: [n], '
        '[source ...], URLs, "Source:"',
        "max_completion_chars = 4000"),
    "routing.tiers to a variant name": [
        ('tiers = { default = "active", high = "fallback" }',
         'tiers = { default = "active", high = "fallback", low = "Q4_0" }')],
    "events.events_file": uncomment('events_file = "/var/lib/quantfleet/events.jsonl"'),
    "[telemetry]": TELEMETRY,
    "[telemetry] and [update]": TELEMETRY + UPDATE,
}


def apply(text: str, edit: Edit) -> str:
    lines = text.splitlines()
    for old, new in edit:
        assert old in lines, f"the example no longer has the line {old!r}: update EDITS"
        lines[lines.index(old)] = new
    return "\n".join(lines) + "\n"


def test_every_commented_option_of_the_example_is_an_edit_here() -> None:
    offered = {line for line in EXAMPLE.read_text().splitlines()
               if re.match(r"# (\[\[?[\w.]+\]\]?|\w+ = )", line)}
    covered = {old for edit in EDITS.values() for old, _ in edit}
    assert offered <= covered, f"commented options no edit applies: {sorted(offered - covered)}"


@pytest.mark.parametrize("name", list(EDITS))
def test_each_documented_edit_checks(name: str, tmp_path: Path, ladder_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTFLEET_MODELS_DIR", str(ladder_dir))
    _, public = generate_keypair(tmp_path / "keys")
    text = apply(EXAMPLE.read_text(), EDITS[name])
    path = tmp_path / "agent.toml"
    path.write_text(text.replace(KEY, str(public)).replace("@MODELS@", str(ladder_dir)))
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok (device" in result.output


def test_disabling_the_fallback_serves_its_tier_from_the_active_variant(
        tmp_path: Path, ladder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantfleet.agent.config import load_config

    monkeypatch.setenv("QUANTFLEET_MODELS_DIR", str(ladder_dir))
    path = tmp_path / "agent.toml"
    path.write_text(apply(EXAMPLE.read_text(), EDITS["models.fallback disabled"]))
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "fallback none" in result.output
    assert ("routing.tiers.high: 'fallback' but models.fallback is unset; tier 'high' is "
            "served by the active variant") in result.output
    with pytest.warns(UserWarning):
        config = load_config(path)
    assert config.route("high") == config.route("default") == "Q4_K_M"
