"""quantfleet-agent generate and config check: a person tries a variant by hand and sees
what hardware it runs on."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from quantfleet.agent.cli import cli
from quantfleet.agent.hardware import fingerprint, llama_cpp_kernels
from quantfleet.agent.wire import HardwareFingerprint


def test_generate_answers_with_timing(ladder_dir: Path) -> None:
    result = CliRunner().invoke(cli, [
        "generate", "--models-dir", str(ladder_dir), "-v", "Q4_K_M", "--max-tokens", "16",
        "--json", "What is the capital of France?",
    ])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["variant"] == "smollm2-135m-Q4_K_M"
    assert out["completion_tokens"] > 0 and out["text"].strip()
    assert out["time_to_first_token_s"] > 0 and out["tokens_per_second"] > 0
    # where it ran: this machine's fingerprint, as its birth would announce it
    assert HardwareFingerprint.model_validate(out["hardware"]) == fingerprint()


def test_generate_names_the_hardware_class_and_the_llama_cpp_kernels(ladder_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["generate", "--models-dir", str(ladder_dir), "-v", "Q8_0",
                                      "--max-tokens", "4", "Say hi."])
    assert result.exit_code == 0, result.output
    hw = fingerprint()
    [line] = [x for x in result.stderr.splitlines() if x.startswith("[hardware]")]
    assert line.startswith(f"[hardware] {hw.cpu_class} ")
    kernels = llama_cpp_kernels(hw.llama_cpp_system_info)
    assert kernels and all(k in line for k in kernels)
    assert "[hardware]" not in result.stdout  # the answer alone goes to stdout


def test_config_check_prints_the_fingerprint(ladder_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nid = "kiosk-1"\n[models]\ndir = "{ladder_dir}"\n'
                      'active = "Q8_0"\n')
    hw = fingerprint()
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "ok (device kiosk-1, active Q8_0" in result.output
    fields = dict(line.strip().split(":", 1) for line in result.output.splitlines()
                  if line.startswith("  "))
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["class"] == hw.cpu_class and fields["arch"] == hw.arch
    assert hw.cpu_model in fields["cpu"]
    assert fields["features"].split() == hw.features
    assert fields["cores"].startswith(f"{hw.logical_cores} logical")
    assert fields["memory"].endswith("GiB")
    assert fields["llama.cpp system info"] == hw.llama_cpp_system_info
    assert fields["onnxruntime"] == hw.onnxruntime
    assert f"cpu.class={hw.cpu_class}" in fields["labels"]

    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["config"]["device"]["id"] == "kiosk-1"
    assert HardwareFingerprint.model_validate(out["hardware"]) == hw


def test_generate_with_a_schema(ladder_dir: Path, tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
    result = CliRunner().invoke(cli, [
        "generate", "--models-dir", str(ladder_dir), "-v", "Q8_0", "--json-schema", str(schema),
        "--json", "Which city is the capital of Italy? Answer as JSON.",
    ])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["constraint"] == "grammar"
    assert isinstance(json.loads(out["text"])["city"], str)


def test_generate_refuses_unknown_variants_and_bad_files(ladder_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", "--models-dir", str(ladder_dir), "-v", "Q1_X", "hi"])
    assert r.exit_code == 1
    assert "no variant 'Q1_X'" in r.output and "smollm2-135m-Q8_0" in r.output
    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text("{not json")
    r = runner.invoke(cli, ["generate", "--models-dir", str(ladder_dir), "--json-schema",
                            str(bad_schema), "hi"])
    assert r.exit_code == 1 and "--json-schema: not JSON" in r.output
