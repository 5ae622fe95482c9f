"""Configuration parts that need no model: secrets, API keys, routing."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantfleet.agent.config import AgentConfig, ConfigError, parse_config


def test_bearer_token_from_env_or_systemd_credentials(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = AgentConfig()
    monkeypatch.delenv("QUANTFLEET_AGENT_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert config.bearer_token() is None
    (tmp_path / "agent-token").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert config.bearer_token() == "from-credential"
    monkeypatch.setenv("QUANTFLEET_AGENT_TOKEN", "from-env")
    assert config.bearer_token() == "from-env"


def test_api_keys_parse_and_reject_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTFLEET_AGENT_API_KEYS", "app1=k1, app2=k2")
    assert AgentConfig().api_keys() == {"k1": "app1", "k2": "app2"}
    monkeypatch.setenv("QUANTFLEET_AGENT_API_KEYS", "app1")
    with pytest.raises(ConfigError, match="expected name=key"):
        AgentConfig().api_keys()


def test_routes_and_fallback_defaults() -> None:
    config = parse_config({"models": {"active": "Q4_0", "fallback": "F16"},
                           "routing": {"tiers": {"default": "active", "high": "fallback",
                                                 "cheap": "Q2_K"}}})
    assert config.route("default") == "Q4_0"
    assert config.route("high") == "F16"
    assert config.route("cheap") == "Q2_K"
    assert config.variant_names() == ["Q4_0", "F16", "Q2_K"]
    no_fallback = parse_config({"models": {"fallback": ""}})
    assert no_fallback.models.fallback is None
    assert no_fallback.routing.tiers == {"default": "active"}


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match=r"cfg: modles: unknown option"):
        parse_config({"modles": {}}, "cfg")


def test_device_labels_are_announced_with_the_birth() -> None:
    """The fleet's cohorts select on what the device says it is: device.labels go out
    with every birth ([telemetry] labels add to them)."""
    config = parse_config({
        "device": {"id": "kiosk-1", "labels": {"hw": "rpi5", "region": "eu"}},
        "telemetry": {"device_id": "kiosk-1", "labels": {"site": "lab"}},
    })
    assert config.telemetry is not None
    assert config.telemetry.labels == {"hw": "rpi5", "region": "eu", "site": "lab"}
