"""The agent serves an ONNX variant through the same CLI as a GGUF one."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from quantfleet.agent.cli import cli
from quantfleet.models.catalog import Catalog


def test_agent_generate_with_an_onnx_variant(catalog: Catalog, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [
        "generate", "--models-dir", str(catalog.dir), "-v", "onnx-fp32", "--max-tokens", "24",
        "--json", "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert "Paris" in out["text"] and out["finish_reason"] == "stop"


def test_agent_generate_with_a_schema_records_validate_retry(catalog: Catalog,
                                                              tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object"}))
    result = CliRunner().invoke(cli, [
        "generate", "--models-dir", str(catalog.dir), "-v", "onnx-int4", "--max-tokens", "48",
        "--json-schema", str(schema), "--json", "Give me a JSON object describing a cat."])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["constraint"] == "validate_retry"


def test_a_damaged_onnx_variant_is_refused_by_name(catalog: Catalog, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    entry = catalog.resolve("onnx-int4")
    (models / entry.file).write_bytes(entry.path(catalog.dir).read_bytes()[:1000])
    doc = Catalog(models)
    doc.put_variant(entry)
    doc.save()
    result = CliRunner().invoke(cli, ["generate", "--models-dir", str(models), "-v", "onnx-int4",
                                      "hello"])
    assert result.exit_code == 1
    assert str(models / entry.file) in result.output and "could not load it" in result.output
