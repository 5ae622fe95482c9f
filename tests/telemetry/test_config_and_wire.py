"""Broker URLs, the telemetry config, aggregates, health, and the published schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from quantfleet.agent.cli import cli
from quantfleet.agent.mqtt import parse_broker_url
from quantfleet.agent.telemetry.aggregates import MinuteAggregator, quantile
from quantfleet.agent.telemetry.config import TelemetryConfig
from quantfleet.agent.telemetry.health import HealthSampler
from quantfleet.agent.telemetry.outbox import Outbox
from quantfleet.agent.telemetry.schemas import render_schemas
from quantfleet.agent.wire import (
    AggregatePayload,
    GapRecord,
    TelemetryEvent,
    ValidationOutcome,
    parse_device_topic,
)

from .helpers import request_event

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://127.0.0.1:1883", (False, "127.0.0.1", 1883)),
    ("mqtt://broker.example", (False, "broker.example", 1883)),
    ("mqtts://broker.example", (True, "broker.example", 8883)),
    ("MQTTS://b:9000/", (True, "b", 9000)),
    ("mqtt://[::1]:1884", (False, "::1", 1884)),
])
def test_broker_urls(url: str, expected: tuple[bool, str, int]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("127.0.0.1:1883", "expected mqtt://"),
    ("http://b:80", "scheme must be mqtt or mqtts"),
    ("mqtt://:1883", "no host"),
    ("mqtt://b:99999", "port"),
    ("mqtt://b:x", "port"),
    ("mqtt://user:pw@b", "only scheme, host and port"),
    ("mqtt://b/topic", "only scheme, host and port"),
])
def test_bad_broker_urls_name_the_url(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as exc:
        parse_broker_url(url)
    assert repr(url) in str(exc.value) and "\n" not in str(exc.value)


@given(st.text(max_size=60))
def test_property_broker_parser_only_raises_value_error(text: str) -> None:
    try:
        tls, host, port = parse_broker_url(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert host and 1 <= port <= 65535 and isinstance(tls, bool)


def test_config_refuses_unknown_keys_and_bad_device_ids() -> None:
    with pytest.raises(ValidationError):
        TelemetryConfig.model_validate({"device_id": "d1", "nope": 1})
    with pytest.raises(ValidationError):
        TelemetryConfig.model_validate({"device_id": "a/b"})
    with pytest.raises(ValidationError, match="cert_file and key_file"):
        TelemetryConfig.model_validate({"device_id": "d", "mqtt": {"cert_file": "c.pem"}})


def test_cli_config_errors_name_file_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[telemetry]\ndevice_id = "d1"\n[telemetry.outbox]\nmax_bytes = 5\n')
    result = CliRunner().invoke(cli, ["telemetry", "run", "--config", str(cfg)])
    assert result.exit_code != 0
    assert f"{cfg}: outbox.max_bytes:" in result.output
    result = CliRunner().invoke(cli, ["telemetry", "run", "--device-id", "d",
                                      "--broker", "tcp://x"])
    assert result.exit_code != 0 and "scheme must be mqtt or mqtts" in result.output


def test_cli_status_reads_an_outbox(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d1")
    for i in range(7):
        ob.append(request_event(i))
    ob.close()
    result = CliRunner().invoke(cli, ["telemetry", "status", "--outbox", str(tmp_path / "o.db"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["rows"] == 7 and info["by_kind"] == {"request": 7} and info["next_seq"] == 8


def test_published_schemas_match_the_wire_models() -> None:
    """docs/schemas/ is generated from agent/wire.py; regenerate with
    `quantfleet-agent telemetry schemas` when a payload changes."""
    rendered = render_schemas()
    on_disk = {p.name: p.read_text() for p in (ROOT / "docs" / "schemas").glob("*.json")}
    assert on_disk == rendered


def test_aggregates_count_per_variant_and_minute() -> None:
    out: list[AggregatePayload] = []
    now = [1000.0 * 60]
    agg = MinuteAggregator(out.append, clock=lambda: now[0])
    t0 = 999.0 * 60
    for i in range(10):
        agg.record(request_event(i, ts=t0 + i, latency_s=0.03 if i < 9 else 7.0,
                                 time_to_first_token_s=0.02))
    agg.record(request_event(
        20, ts=t0 + 5, status=422, fallback_from="Q2_K",
        validations=[ValidationOutcome(kind="tool_call", passed=False),
                     ValidationOutcome(kind="refusal", passed=False)]))
    agg.record(request_event(21, variant="Q4_K_M", ts=t0 + 61,
                             validations=[ValidationOutcome(kind="tool_call", passed=True)]))
    assert [(a.variant, a.minute) for a in agg.flush()] == [("Q8_0", 999 * 60)]
    q8 = out[0]
    assert q8.requests == 11 and q8.errors == 1 and q8.statuses == {"200": 10, "422": 1}
    assert q8.validation_failures == {"tool_call": 1, "refusal": 1}
    assert (q8.tool_calls_ok, q8.tool_calls_failed, q8.refusals, q8.fallbacks) == (0, 1, 1, 1)
    assert sum(q8.latency.counts) == 11 and sum(q8.time_to_first_token.counts) == 10
    assert quantile(q8.latency, 0.5) == 0.05  # 0.03 s falls in the (0.025, 0.05] bucket
    assert quantile(q8.latency, 0.99) == 10.0  # the 7 s outlier
    assert [(a.variant, a.tool_calls_ok) for a in agg.flush(everything=True)] == [("Q4_K_M", 1)]
    AggregatePayload.model_validate_json(q8.model_dump_json())


def test_health_sample_is_a_valid_payload(tmp_path: Path) -> None:
    sample = HealthSampler(tmp_path).sample()
    assert sample.memory_total_bytes > 0 and sample.agent_rss_bytes > 0
    assert sample.disk_total_bytes > 0 and sample.disk_path == str(tmp_path)


def test_gap_record_counts_must_match_its_ranges() -> None:
    with pytest.raises(ValidationError, match="events must equal"):
        GapRecord(reason="evicted", events=3, ranges=[(1, 5)])
    with pytest.raises(ValidationError):
        GapRecord(reason="evicted", events=1, ranges=[(5, 4)])


def test_event_kind_must_match_its_body() -> None:
    doc = {"boot_epoch": 1, "seq": 1, "kind": "aggregate", "ts": 1.0,
           "body": request_event(1).model_dump(mode="json")}
    with pytest.raises(ValidationError, match="does not match"):
        TelemetryEvent.model_validate(doc)


@pytest.mark.parametrize("topic", ["quantfleet/v1/devices/d1", "quantfleet/v1/devices//status",
                                   "x/v1/devices/d1/status", "quantfleet/v1/devices/d1/cmd"])
def test_bad_device_topics(topic: str) -> None:
    with pytest.raises(ValueError, match="topic"):
        parse_device_topic(topic)
    assert parse_device_topic("quantfleet/v1/devices/d1/status") == ("d1", "status")


def test_the_config_table_in_the_docs_matches_the_code() -> None:
    from quantfleet.agent.telemetry.config import config_reference

    doc = (ROOT / "docs" / "telemetry.md").read_text()
    start = doc.index("<!-- config-reference:")
    block = doc[doc.index("\n", start) + 1:doc.index("<!-- end config-reference -->")]
    assert block == config_reference(), "regenerate with config_reference()"


def test_schemas_command_writes_and_checks_a_directory(tmp_path: Path) -> None:
    out = tmp_path / "schemas"
    runner = CliRunner()
    result = runner.invoke(cli, ["telemetry", "schemas", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_text() for p in out.glob("*.json")} == render_schemas()
    result = runner.invoke(cli, ["telemetry", "schemas", "--check", "--out", str(out)])
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    (out / "status.json").write_text("{}\n")
    result = runner.invoke(cli, ["telemetry", "schemas", "--check", "--out", str(out)])
    assert result.exit_code == 1 and "out of date: status.json" in result.output
    result = runner.invoke(cli, ["telemetry", "schemas", "--check", "--out",
                                 str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such directory" in result.output


def test_schemas_command_needs_no_source_tree(tmp_path: Path) -> None:
    """Installed from a wheel, quantfleet has no docs/ beside it: the schemas are rendered
    from the wire models, and the default directory is docs/schemas of where it runs."""
    import shutil
    import subprocess
    import sys

    pkg = tmp_path / "site" / "quantfleet"  # the package as a wheel installs it
    pkg.mkdir(parents=True)
    for f in (ROOT / "quantfleet").glob("*.py"):
        shutil.copy(f, pkg / f.name)
    for part in ("agent", "fleet", "models", "demo"):
        shutil.copytree(ROOT / part, pkg / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    work = tmp_path / "work"
    shutil.copytree(ROOT / "docs" / "schemas", work / "docs" / "schemas")

    def schemas(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quantfleet.agent.telemetry", "schemas",
                               *args], cwd=work, env={"PYTHONPATH": str(tmp_path / "site")},
                              capture_output=True, text=True, timeout=120)

    where = subprocess.run([sys.executable, "-c", "import quantfleet; print(quantfleet.__file__)"],
                           cwd=work, env={"PYTHONPATH": str(tmp_path / "site")},
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(pkg / "__init__.py"), where.stdout + where.stderr
    result = schemas("--check")
    assert result.returncode == 0 and "up to date" in result.stdout, result.stdout + result.stderr
    result = schemas("--out", "elsewhere")
    assert result.returncode == 0, result.stderr
    written = {p.name: p.read_text() for p in (work / "elsewhere").glob("*.json")}
    assert written == {p.name: p.read_text() for p in (ROOT / "docs" / "schemas").glob("*.json")}
