"""ONNX rungs in the ladder recipe: parsed, validated, picked by --only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quantfleet.models.build import Rung, _wanted_onnx, load_ladder
from quantfleet.models.catalog import CatalogError

BASE = 'reference = "F16"\n[[rung]]\nlabel = "F16"\nftype = "F16"\n'
EXPORT = '[[rung]]\nlabel = "onnx-fp32"\nformat = "onnx"\nmethod = "export"\n'


def ladder_from(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ladder.toml"
    path.write_text(text)
    return path


def test_only_picks_the_export_with_any_onnx_rung() -> None:
    ladder = load_ladder()
    def labels(rungs: list[Rung]) -> list[str]:
        return [r.label for r in rungs]

    assert labels(_wanted_onnx(ladder, None)) == ["onnx-fp32", "onnx-int8", "onnx-int4"]
    assert labels(_wanted_onnx(ladder, {"onnx-int4"})) == ["onnx-fp32", "onnx-int4"]
    assert labels(_wanted_onnx(ladder, {"onnx-fp32"})) == ["onnx-fp32"]
    assert _wanted_onnx(ladder, {"Q8_0"}) == []


def test_the_packaged_onnx_rungs_say_how_they_are_built() -> None:
    rungs = {r.label: r for r in load_ladder().onnx_rungs}
    assert rungs["onnx-int8"].keep_float == ("ffn_down",)
    # U8U8: exact on every CPU kernel (U8S8 without reduce_range saturates without VNNI)
    int8 = rungs["onnx-int8"]
    assert (int8.weight_type, int8.per_channel, int8.reduce_range) == ("QUInt8", True, False)
    assert int8.validated_on == ("x86-amx", "x86-avx2")
    assert rungs["onnx-int4"].block_size == 32
    assert all(r.why for r in rungs.values())


@pytest.mark.parametrize(("extra", "message"), [
    ('[[rung]]\nlabel = "x"\nformat = "onnx"\nmethod = "int3"\n', "needs 'method', one of"),
    ('[[rung]]\nlabel = "x"\nformat = "tflite"\n', "format 'tflite'"),
    ('[[rung]]\nlabel = "x"\nformat = "onnx"\nmethod = "int4_matmulnbits"\nblock_size = 24\n',
     "block_size must be a power of two"),
    ('[[rung]]\nlabel = "x"\nformat = "onnx"\nmethod = "int8_dynamic"\nkeep_float = "ffn"\n',
     "keep_float must be a list"),
    ('[[rung]]\nlabel = "x"\nformat = "onnx"\nmethod = "int8_dynamic"\nftype = "Q8_0"\n',
     "unknown keys ['ftype']"),
    ('[[rung]]\nlabel = "x"\nformat = "onnx"\nmethod = "int8_dynamic"\nweight_type = "QInt4"\n',
     "weight_type must be one of ['QInt8', 'QUInt8']"),
    ('[[rung]]\nlabel = "x"\nformat = "onnx"\nmethod = "int8_dynamic"\nreduce_range = "yes"\n',
     "reduce_range must be true or false"),
    ('[[rung]]\nlabel = "x"\nformat = "onnx"\nmethod = "int8_dynamic"\n'
     'validated_on = ["x86 avx2"]\n', "validated_on must be a list of distinct hardware classes"),
    (EXPORT.replace("onnx-fp32", "onnx-fp32b"), "exactly one rung with method 'export' (found 2)"),
    ('[[rung]]\nlabel = "onnx-fp32"\nftype = "Q8_0"\n', "appear more than once"),
])
def test_bad_onnx_rungs_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(message)):
        load_ladder(ladder_from(tmp_path, BASE + EXPORT + extra))


def test_quantized_onnx_rungs_need_an_export(tmp_path: Path) -> None:
    text = BASE + '[[rung]]\nlabel = "i8"\nformat = "onnx"\nmethod = "int8_dynamic"\n'
    with pytest.raises(CatalogError, match="found 0"):
        load_ladder(ladder_from(tmp_path, text))


def test_an_onnx_rung_cannot_be_the_reference(tmp_path: Path) -> None:
    text = 'reference = "onnx-fp32"\n' + BASE.split("\n", 1)[1] + EXPORT
    with pytest.raises(CatalogError, match="reference 'onnx-fp32' is not one of the rungs"):
        load_ladder(ladder_from(tmp_path, text))
