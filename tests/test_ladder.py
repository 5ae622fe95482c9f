"""The precision ladder of the real default model: built, catalogued, verifiable."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from quantfleet.fleet.cli import cli
from quantfleet.models.build import build_ladder, load_ladder
from quantfleet.models.catalog import Catalog, sha256_file
from quantfleet.models.sources import register_source

GGUF_LADDER = ["F16", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
ONNX_LADDER = ["onnx-fp32", "onnx-int8", "onnx-int4"]  # tests/onnx/ checks them in depth
LADDER = GGUF_LADDER + ONNX_LADDER


def test_every_rung_is_built_and_catalogued(catalog: Catalog) -> None:
    labels = sorted(v.precision.label for v in catalog.variants)
    assert labels == sorted(LADDER)
    for v in catalog.variants:
        path = v.path(catalog.dir)
        assert path.stat().st_size == v.size_bytes
        assert sha256_file(path) == v.sha256
        if v.precision.label in GGUF_LADDER:
            assert v.backend == "llama.cpp" and v.format == "gguf"
            assert v.build["tool"] == "llama_model_quantize"
        else:
            assert v.backend == "onnxruntime" and v.format == "onnx"


def test_sizes_fall_down_the_ladder(catalog: Catalog) -> None:
    size = {v.precision.label: v.size_bytes for v in catalog.variants}
    assert size["F16"] > size["Q8_0"] > size["Q4_K_M"] > size["Q2_K"]
    assert 250e6 < size["F16"] < 300e6  # 135M parameters at 2 bytes each


def test_reference_says_it_is_an_upcast(catalog: Catalog) -> None:
    ref = catalog.reference()
    assert ref is not None and ref.precision.label == "F16"
    assert any("upcast from the Q4_1 source" in n for n in ref.notes)
    assert ref.build["allow_requantize"] is True
    others = [v for v in catalog.variants if not v.reference and v.format == "gguf"]
    assert all(v.build["from_sha256"] == ref.sha256 for v in others)


def test_precision_reports_the_real_tensor_types(catalog: Catalog) -> None:
    q4km = catalog.resolve("Q4_K_M").precision
    # SmolLM2's 576-wide rows are not multiples of 256: most tensors fall back.
    assert q4km.tensor_types.get("Q4_K", 0) > 0
    assert q4km.tensor_types.get("Q5_0", 0) > q4km.tensor_types["Q4_K"]
    assert catalog.resolve("Q8_0").precision.tensor_types.keys() == {"Q8_0", "F32"}
    assert catalog.resolve("F16").precision.tensor_types.keys() == {"F16", "F32"}
    assert 15 < catalog.resolve("F16").precision.bits_per_weight < 17


def test_rebuild_skips_what_is_verified(ladder_dir: Path) -> None:
    files = [*ladder_dir.glob("*.gguf"), *ladder_dir.glob("*.onnx")]
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    assert len(mtimes) == len(LADDER)
    outcomes = build_ladder(ladder_dir)
    assert [o.action for o in outcomes] == ["verified"] * len(LADDER)
    assert [o.variant.precision.label for o in outcomes] == LADDER
    assert {p.name: p.stat().st_mtime_ns for p in files} == mtimes


def test_a_damaged_rung_is_detected_and_rebuilt(tmp_path: Path) -> None:
    outcomes = build_ladder(tmp_path, only={"Q8_0"})
    assert [o.variant.precision.label for o in outcomes] == ["F16", "Q8_0"]
    q8 = Catalog(tmp_path).resolve("Q8_0")
    path = q8.path(tmp_path)
    with path.open("r+b") as fh:  # flip one byte inside the tensor data
        fh.seek(path.stat().st_size - 100)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    problem = Catalog(tmp_path).verify(q8)
    assert problem is not None and "sha256" in problem
    again = build_ladder(tmp_path, only={"Q8_0"})
    assert [o.action for o in again] == ["verified", "built"]
    assert Catalog(tmp_path).verify(Catalog(tmp_path).resolve("Q8_0")) is None


# The catalog entry of onnx-int8 as quantfleet wrote it before the recipe recorded
# its kernel settings (U8S8, no reduce_range: garbage on x86 without VNNI).
OLD_INT8_RECIPE = {"tool": "onnxruntime.quantize_dynamic", "weight_type": "QInt8",
                   "per_channel": True, "op_types": ["MatMul"], "keep_float": ["ffn_down"]}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the build replaces files, it never writes into them
    except OSError:
        shutil.copyfile(src, dst)


def test_a_ladder_with_the_old_int8_recipe_is_rebuilt(ladder_dir: Path, tmp_path: Path) -> None:
    catalog = Catalog(ladder_dir)
    old = Catalog(tmp_path)
    old.doc.sources = dict(catalog.doc.sources)
    for label in ("F16", "onnx-fp32", "onnx-int8"):
        entry = catalog.resolve(label)
        _link_or_copy(entry.path(ladder_dir), tmp_path / entry.file)
        if label == "onnx-int8":  # the file still matches its size and sha256
            recipe = {k: v for k, v in entry.build.items()
                      if k in ("from", "from_sha256", "onnx", "onnxruntime")}
            entry = entry.model_copy(update={"build": {**recipe, **OLD_INT8_RECIPE},
                                             "requires_cpu": [], "validated_on": []})
        old.put_variant(entry)
    old.save()
    outcomes = build_ladder(tmp_path, only={"onnx-int8"})
    assert [(o.variant.precision.label, o.action) for o in outcomes] == [
        ("F16", "verified"), ("onnx-fp32", "verified"), ("onnx-int8", "built")]
    rebuilt = Catalog(tmp_path).resolve("onnx-int8")
    assert rebuilt.build["weight_type"] == "QUInt8" and rebuilt.build["kernel"] == "U8U8"
    assert rebuilt.validated_on == ["x86-amx", "x86-avx2"] and rebuilt.requires_cpu == []
    assert any("U8U8" in n and "every CPU" in n for n in rebuilt.notes)
    # the same weights as the session's int8 (one recipe, one result)
    assert rebuilt.size_bytes == catalog.resolve("onnx-int8").size_bytes
    again = build_ladder(tmp_path, only={"onnx-int8"})
    assert [o.action for o in again] == ["verified"] * 3


def test_models_list_json_gives_what_scripts_need(ladder_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["models", "list", "--models-dir", str(ladder_dir), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == len(LADDER)
    for row in rows:
        assert {"name", "backend", "precision", "path", "size_bytes", "sha256"} <= row.keys()
        assert Path(row["path"]).stat().st_size == row["size_bytes"]
        assert len(row["sha256"]) == 64


def test_models_list_table_and_verify(ladder_dir: Path) -> None:
    runner = CliRunner()
    table = runner.invoke(cli, ["models", "list", "--models-dir", str(ladder_dir)])
    assert table.exit_code == 0 and "Q4_K_M" in table.output and "(ref)" in table.output
    verify = runner.invoke(cli, ["models", "verify", "--models-dir", str(ladder_dir)])
    assert verify.exit_code == 0 and verify.output.count("ok") == len(LADDER)
    assert "onnx-int4" in table.output and "onnxruntime" in table.output


def test_a_user_registers_their_own_gguf(ladder_dir: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my-model.gguf"
    shutil.copy(Catalog(ladder_dir).resolve("Q8_0").path(ladder_dir), mine)
    models = tmp_path / "models"
    entry = register_source(models, mine, "mine")
    assert entry.file_type == "Q8_0" and entry.architecture == "llama"
    result = CliRunner().invoke(
        cli, ["models", "build", "--models-dir", str(models), "--source", "mine", "--only", "Q4_0"]
    )
    assert result.exit_code == 0, result.output
    names = sorted(v.name for v in Catalog(models).variants)
    assert names == ["mine-F16", "mine-Q4_0"]
    note = Catalog(models).resolve("mine-F16").notes
    assert any("upcast from the Q8_0 source" in n for n in note)


def test_bad_source_and_recipe_inputs_are_refused(tmp_path: Path) -> None:
    runner = CliRunner()
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    r = runner.invoke(cli, ["models", "register", str(not_gguf), "--name", "x",
                            "--models-dir", str(tmp_path)])
    assert r.exit_code == 1 and "not a GGUF file" in r.output and str(not_gguf) in r.output
    r = runner.invoke(cli, ["models", "build", "--models-dir", str(tmp_path), "--only", "Q9_9"])
    assert r.exit_code == 1 and "no rung ['Q9_9']" in r.output
    bad = tmp_path / "ladder.toml"
    bad.write_text('reference = "F32"\n[[rung]]\nlabel = "F16"\nftype = "F16"\n')
    r = runner.invoke(cli, ["models", "build", "--models-dir", str(tmp_path),
                            "--ladder", str(bad)])
    assert r.exit_code == 1 and "reference 'F32' is not one of the rungs" in r.output


def test_packaged_ladder_parses() -> None:
    ladder = load_ladder()
    assert ladder.rungs[0].label == ladder.reference == "F16"
    assert [r.label for r in ladder.rungs] == LADDER
    assert [r.label for r in ladder.gguf_rungs] == GGUF_LADDER
    assert [(r.label, r.method) for r in ladder.onnx_rungs] == [
        ("onnx-fp32", "export"), ("onnx-int8", "int8_dynamic"), ("onnx-int4", "int4_matmulnbits")]


def test_a_damaged_catalog_is_a_clear_error(tmp_path: Path) -> None:
    import pytest

    from quantfleet.models.catalog import CatalogError

    path = tmp_path / "catalog.json"
    for text, expected in [
        ("{oops", "not readable JSON"),
        ('{"version": 7}', "catalog version 7 is not supported"),
        ('{"version": 1, "variants": {"x": {"name": "x"}}}', "variants.x.source: Field required"),
        ('{"version": 1, "surprise": 1}', "surprise: Extra inputs are not permitted"),
    ]:
        path.write_text(text)
        with pytest.raises(CatalogError) as info:
            Catalog(tmp_path)
        assert expected in str(info.value) and str(path) in str(info.value)
