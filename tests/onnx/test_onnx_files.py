"""The ONNX rungs in the catalog, the graph contract, and bad .onnx files refused at load."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from quantfleet.agent.backends import LoadOptions, ModelFileError, load_backend
from quantfleet.models.catalog import Catalog, sha256_file
from quantfleet.models.onnx_export import META_TOKENIZER, metadata_of, set_metadata

NO_WARMUP = LoadOptions(warmup=False)


def test_onnx_rungs_are_catalogued_with_real_figures(catalog: Catalog) -> None:
    onnx_variants = {v.precision.label: v for v in catalog.variants if v.format == "onnx"}
    assert sorted(onnx_variants) == ["onnx-fp32", "onnx-int4", "onnx-int8"]
    f16 = catalog.resolve("F16")
    for v in onnx_variants.values():
        assert v.backend == "onnxruntime" and not v.reference
        assert v.path(catalog.dir).stat().st_size == v.size_bytes
        assert sha256_file(v.path(catalog.dir)) == v.sha256
    fp32, int8, int4 = (onnx_variants[k] for k in ("onnx-fp32", "onnx-int8", "onnx-int4"))
    assert fp32.build["from_sha256"] == f16.sha256
    assert fp32.build["tool"] == "quantfleet.onnx_export"
    assert int8.build["from_sha256"] == int4.build["from_sha256"] == fp32.sha256
    assert int8.build["tool"] == "onnxruntime.quantize_dynamic"
    assert int4.build["tool"] == "onnxruntime.MatMulNBitsQuantizer"
    assert int4.build["block_size"] == 32
    assert fp32.size_bytes > int8.size_bytes > int4.size_bytes
    # 135M weights in fp32 (the embedding table is stored once more as lossless fp16)
    assert 540e6 < fp32.size_bytes < 620e6
    # real op counts: 30 layers x 7 projections + the tied output head
    assert fp32.precision.tensor_types["op:MatMul"] == 211 + 60  # + 2 attention MatMuls/layer
    assert int4.precision.tensor_types["op:MatMulNBits"] == 211
    # int8 keeps the 30 ffn_down projections in float (activation outliers)
    assert int8.precision.tensor_types["op:MatMulInteger"] == 211 - 30
    assert any("ffn_down" in n for n in int8.notes)
    # U8U8: the weights are uint8 (per channel, with uint8 zero points), no int8 tensor left
    assert int8.precision.tensor_types["UINT8"] > 0 and "INT8" not in int8.precision.tensor_types
    assert int8.build["kernel"] == "U8U8" and int8.requires_cpu == []
    assert fp32.requires_cpu == int4.requires_cpu == []


def test_the_graph_has_a_kv_cache(onnx_path: dict[str, Path]) -> None:
    model = onnx.load_model(str(onnx_path["onnx-int4"]), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:2] == ["input_ids", "logits_to_keep"]
    assert [n for n in inputs if n.startswith("past_key_values.")] == [
        f"past_key_values.{i}.{k}" for i in range(30) for k in ("key", "value")]
    assert outputs[0] == "logits"
    assert outputs[1:] == [f"present.{i}.{k}" for i in range(30) for k in ("key", "value")]
    meta = metadata_of(model)
    assert json.loads(meta["quantfleet.config"])["n_layer"] == 30
    assert "<|im_start|>" in meta["quantfleet.chat_template"]
    # no torch anywhere in the device path
    import sys
    assert "torch" not in sys.modules


@pytest.fixture(scope="module")
def int4_model(onnx_path: dict[str, Path]) -> onnx.ModelProto:
    return onnx.load_model(str(onnx_path["onnx-int4"]))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def _refused(path: Path) -> str:
    with pytest.raises(ModelFileError) as err:
        load_backend("onnxruntime", path, NO_WARMUP)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_empty_and_foreign_files_are_refused(tmp_path: Path) -> None:
    assert "no such file" in _refused(tmp_path / "absent.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "empty file" in _refused(tmp_path / "empty.onnx")
    (tmp_path / "notes.onnx").write_text("hello, I am not a model\n")
    assert "onnxruntime could not load it" in _refused(tmp_path / "notes.onnx")


def test_a_truncated_file_is_refused(onnx_path: dict[str, Path], tmp_path: Path) -> None:
    data = onnx_path["onnx-int4"].read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert "onnxruntime could not load it" in _refused(cut)


def test_missing_kv_outputs_are_refused(int4_model: onnx.ModelProto, tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(int4_model)
    keep = [o for o in model.graph.output if not o.name.startswith("present.")]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    message = _refused(_save(model, tmp_path / "no-kv.onnx"))
    assert "lack the KV cache outputs 'present.0.key'" in message


def test_wrong_inputs_are_refused(int4_model: onnx.ModelProto, tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(int4_model)
    model.graph.input[0].name = "tokens"
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == "input_ids":
                node.input[i] = "tokens"
    message = _refused(_save(model, tmp_path / "renamed.onnx"))
    assert "graph inputs lack 'input_ids'" in message


def test_a_vocabulary_mismatch_is_refused(int4_model: onnx.ModelProto, tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(int4_model)
    tok = json.loads(metadata_of(model)[META_TOKENIZER])
    tok["tokens"], tok["token_types"] = tok["tokens"][:32000], tok["token_types"][:32000]
    set_metadata(model, {META_TOKENIZER: json.dumps(tok)})
    message = _refused(_save(model, tmp_path / "vocab.onnx"))
    assert "logits have 49152 entries but the tokenizer has 32000 tokens" in message


def test_a_foreign_onnx_without_our_metadata_is_refused(int4_model: onnx.ModelProto,
                                                        tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(int4_model)
    del model.metadata_props[:]
    assert "metadata 'quantfleet.config' is missing" in _refused(_save(model, tmp_path / "x.onnx"))
