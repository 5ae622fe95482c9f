"""[update] and its two tables, [update.preflight] and [update.soak].

The first release's flat names (``preflight_sample``, ``soak_s``, ...) still load:
each one is a DeprecationWarning naming its new place, and ``quantfleet-agent``
prints those on stderr (the journal under systemd). Setting an option under both
names is an error naming both; the new tables refuse unknown options like every
other table."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfleet.agent.cli import cli
from quantfleet.agent.config import (
    MOVED_UPDATE_KEYS,
    ConfigError,
    DeprecatedOptionWarning,
    parse_config,
)
from quantfleet.agent.update.signing import generate_keypair

TELEMETRY = {"device_id": "d1"}

OLD_FILE = """
[update]
public_key = "{key}"
min_free_mb = 0
preflight_sample = 4
soak_s = 6
soak_max_latency_ratio = 1.5
[update.preflight_policy]
max_kld_mean = 0.3
"""

NEW_FILE = """
[update]
public_key = "{key}"
min_free_mb = 0
[update.preflight]
sample = 4
[update.preflight.policy]
max_kld_mean = 0.3
[update.soak]
duration_s = 6
max_latency_ratio = 1.5
"""

OLD_FILE_WARNINGS = [
    "update.preflight_sample is deprecated: use [update.preflight] sample",
    "update.soak_s is deprecated: use [update.soak] duration_s",
    "update.soak_max_latency_ratio is deprecated: use [update.soak] max_latency_ratio",
    "update.preflight_policy is deprecated: use [update.preflight] policy",
]


def write_config(tmp_path: Path, models_dir: Path, update: str) -> Path:
    _, public = generate_keypair(tmp_path / "keys")
    path = tmp_path / "agent.toml"
    path.write_text(f'[models]\ndir = "{models_dir}"\nactive = "Q8_0"\nfallback = ""\n'
                    '[telemetry]\ndevice_id = "d1"\n' + update.format(key=public))
    return path


def test_an_old_flat_file_loads_and_config_check_names_every_new_place(
        tmp_path: Path, ladder_dir: Path) -> None:
    path = write_config(tmp_path, ladder_dir, OLD_FILE)
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok (device d1" in result.stdout
    assert result.stderr.splitlines() == [f"warning: {path}: {w}" for w in OLD_FILE_WARNINGS]

    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert '"duration_s": 6.0' in result.stdout  # the effective config, in the new form
    assert OLD_FILE_WARNINGS[1] in result.stderr


def test_serve_prints_the_deprecations_too(tmp_path: Path) -> None:
    """Before anything else: here it then stops, as models.dir holds no variant."""
    path = write_config(tmp_path, tmp_path / "no-models", OLD_FILE)
    result = CliRunner().invoke(cli, ["serve", "--config", str(path)])
    assert result.exit_code == 1 and "models.active" in result.output, result.output
    assert f"warning: {path}: {OLD_FILE_WARNINGS[1]}" in result.stderr


def test_a_nested_file_loads_silently_and_means_the_same(tmp_path: Path,
                                                          ladder_dir: Path) -> None:
    path = write_config(tmp_path, ladder_dir, NEW_FILE)
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""

    old = write_config(tmp_path / "old", ladder_dir, OLD_FILE)
    flat = CliRunner().invoke(cli, ["config", "check", "--config", str(old), "--json"])
    nested = CliRunner().invoke(cli, ["config", "check", "--config", str(path), "--json"])
    assert flat.stdout.replace(str(old.parent), "X") == nested.stdout.replace(
        str(path.parent), "X")


@pytest.mark.parametrize(("update", "message"), [
    ({"soak_s": 6, "soak": {"duration_s": 5}},
     "update.soak_s and update.soak.duration_s both set; keep update.soak.duration_s"),
    ({"preflight_policy": {}, "preflight": {"policy": {}}},
     "update.preflight_policy and update.preflight.policy both set; keep "
     "update.preflight.policy"),
    ({"soak": {"duration": 5}}, "update.soak.duration: unknown option"),
    ({"preflight": {"samples": 5}}, "update.preflight.samples: unknown option"),
    ({"soak_duration_s": 5}, "update.soak_duration_s: unknown option"),
    ({"soak": {"poll_s": 0}}, "update.soak.poll_s: Input should be greater than 0"),
    ({"soak_poll_s": 0}, "update.soak.poll_s: Input should be greater than 0"),
    ({"preflight": {"policy": {"max_kld_p99": -1}}},
     "update.preflight.policy: max_kld_p99: Input should be greater than 0"),
])
def test_a_bad_update_table_is_one_clear_error(update: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecatedOptionWarning)
        parse_config({"telemetry": TELEMETRY, "update": {"public_key": "k.pub", **update}},
                     "agent.toml")
    assert message in str(err.value)


def test_both_names_in_one_file_stop_config_check(tmp_path: Path) -> None:
    path = write_config(tmp_path, tmp_path, OLD_FILE + "[update.soak]\nduration_s = 5\n")
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == 1
    assert "update.soak_s and update.soak.duration_s both set; keep update.soak.duration_s" \
        in result.output


def test_update_needs_telemetry_and_a_public_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[update\] needs \[telemetry\]"):
        parse_config({"update": {"public_key": str(tmp_path / "k.pub")}})
    with pytest.raises(ConfigError, match=r"update\.public_key: Field required"):
        parse_config({"telemetry": TELEMETRY, "update": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults come with no warning
        cfg = parse_config({"telemetry": TELEMETRY, "update": {"public_key": "k.pub"}})
    assert cfg.update is not None
    assert cfg.update.preflight.sample == 12 and cfg.update.soak.duration_s == 300


#: A valid value for every old name (ranges as the fields allow).
OLD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "preflight_sample": st.integers(0, 1000),
    "preflight_golden": st.sampled_from(["golden.jsonl", "/srv/g.jsonl"]),
    "preflight_seed": st.integers(-(2**31), 2**31),
    "preflight_threads": st.integers(1, 512),
    "preflight_policy": st.sampled_from([{}, {"max_kld_mean": 0.3}, {"alpha": 0.01}]),
    "soak_s": st.floats(0, 1e6),
    "soak_poll_s": st.floats(0.01, 1e3),
    "soak_min_requests": st.integers(1, 10_000),
    "soak_max_validation_increase": st.floats(0, 1),
    "soak_max_error_increase": st.floats(0, 1),
    "soak_max_latency_ratio": st.floats(0.01, 100),
}


def test_every_old_name_has_a_value_strategy() -> None:
    assert OLD_VALUES.keys() == MOVED_UPDATE_KEYS.keys()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(sorted(OLD_VALUES)), unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: OLD_VALUES[k] for k in keys})))
def test_old_names_mean_what_the_new_tables_mean(old: dict[str, Any]) -> None:
    """Any mix of old names loads as the same options in their new tables, with one
    warning per old name, in the file's order."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in old.items():
        table, new = MOVED_UPDATE_KEYS[key]
        nested.setdefault(table, {})[new] = value
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flat_cfg = parse_config({"telemetry": TELEMETRY,
                                 "update": {"public_key": "k.pub", **old}})
    assert [str(w.message) for w in caught if w.category is DeprecatedOptionWarning] == [
        f"update.{k} is deprecated: use [update.{MOVED_UPDATE_KEYS[k][0]}] "
        f"{MOVED_UPDATE_KEYS[k][1]}" for k in old]
    assert issubclass(DeprecatedOptionWarning, DeprecationWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nested_cfg = parse_config({"telemetry": TELEMETRY,
                                   "update": {"public_key": "k.pub", **nested}})
    assert flat_cfg == nested_cfg


def test_the_artifact_credential_comes_from_the_environment_or_systemd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like the bearer token: never in the file, read when the agent asks for it."""
    _, public = generate_keypair(tmp_path / "keys")
    config = parse_config({"telemetry": TELEMETRY, "update": {"public_key": str(public)}})
    monkeypatch.delenv("QUANTFLEET_ARTIFACT_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert config.artifact_token() is None
    (tmp_path / "artifact-token").write_text("qfd_from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert config.artifact_token() == "qfd_from-credential"
    monkeypatch.setenv("QUANTFLEET_ARTIFACT_TOKEN", "qfd_from-env")
    assert config.artifact_token() == "qfd_from-env"
    assert parse_config({"telemetry": TELEMETRY}).artifact_token() is None  # no [update]
    with pytest.raises(ConfigError, match=r"update\.artifact_token: unknown option"):
        parse_config({"telemetry": TELEMETRY, "update": {"public_key": str(public),
                                                         "artifact_token": "qfd_x"}})
