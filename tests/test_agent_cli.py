"""quantfleet-agent generate: a person tries each variant by hand."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from quantfleet.agent.cli import cli


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
