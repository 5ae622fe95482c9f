"""The catalog's ``requires_cpu`` / ``validated_on`` and the ladder's int8 keys, as parsers.

Property-based: whatever a catalog.json or ladder.toml holds in these fields,
reading it either gives values the load-time check can trust or a
``CatalogError`` naming where — never another exception.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfleet.agent.backends.cpu import UnsupportedCpuError, check_cpu, unmet
from quantfleet.agent.wire import HardwareFingerprint, cpu_class
from quantfleet.models.build import load_ladder
from quantfleet.models.catalog import (
    CLASS_PATTERN,
    NAME_PATTERN,
    Catalog,
    CatalogError,
    CpuRequirement,
)

ENTRY: dict[str, Any] = {
    "name": "m-onnx-int8", "source": "m", "backend": "onnxruntime", "format": "onnx",
    "precision": {"label": "onnx-int8", "tensor_types": {}, "bits_per_weight": 8.0},
    "file": "m-onnx-int8.onnx", "size_bytes": 1, "sha256": "0" * 64,
}
FEATURES = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd",
            "dotprod", "i8mm", "sve"]
names = st.one_of(st.sampled_from([*FEATURES, "x86_64", "aarch64", "x86-avx2", "arm-i8mm"]),
                  st.text(max_size=40))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | names,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12)
requirement_like = st.fixed_dictionaries(
    {"arch": names, "any_of": st.lists(names, max_size=4)},
    optional={"why": st.text(max_size=20), "extra": json_values})


def _read(fields: dict[str, Any]) -> Catalog:
    with tempfile.TemporaryDirectory() as tmp:
        doc = {"version": 1, "variants": {ENTRY["name"]: {**ENTRY, **fields}}}
        (Path(tmp) / "catalog.json").write_text(json.dumps(doc))
        return Catalog(tmp)


@settings(max_examples=300, deadline=None)
@given(requires=st.one_of(json_values, st.lists(requirement_like, max_size=3)),
       validated=st.one_of(json_values, st.lists(names, max_size=4)))
def test_catalog_fields_parse_or_fail_with_their_place(requires: Any, validated: Any) -> None:
    try:
        catalog = _read({"requires_cpu": requires, "validated_on": validated})
    except CatalogError as exc:
        message = str(exc)
        assert "\n" not in message
        assert re.search(r"variants\.m-onnx-int8\.(requires_cpu|validated_on)", message), message
        return
    entry = catalog.resolve("m-onnx-int8")
    for req in entry.requires_cpu:
        assert re.fullmatch(NAME_PATTERN, req.arch) and req.any_of
        assert all(re.fullmatch(NAME_PATTERN, f) for f in req.any_of)
        assert len(set(req.any_of)) == len(req.any_of)
    assert all(re.fullmatch(CLASS_PATTERN, c) for c in entry.validated_on)
    assert len(set(entry.validated_on)) == len(entry.validated_on)
    # what was read is what is written back
    again = _read(json.loads(entry.model_dump_json()))
    assert again.resolve("m-onnx-int8") == entry


def _hw(arch: str, features: list[str]) -> HardwareFingerprint:
    return HardwareFingerprint(arch=arch, cpu_model="test cpu", features=features,
                               cpu_class=cpu_class(arch, features), logical_cores=1,
                               memory_bytes=0)


@settings(max_examples=300, deadline=None)
@given(arch=st.sampled_from(["x86_64", "aarch64"]),
       have=st.lists(st.sampled_from(FEATURES), unique=True),
       reqs=st.lists(st.tuples(st.sampled_from(["x86_64", "aarch64"]),
                               st.lists(st.sampled_from(FEATURES), min_size=1, unique=True)),
                     max_size=3))
def test_a_device_is_refused_exactly_when_a_requirement_of_its_arch_is_unmet(
        arch: str, have: list[str], reqs: list[tuple[str, list[str]]]) -> None:
    requirements = [CpuRequirement(arch=a, any_of=f) for a, f in reqs]
    hw = _hw(arch, have)
    expected = [r for r in requirements if r.arch == arch and not set(r.any_of) & set(have)]
    assert unmet(requirements, hw) == expected
    if expected:
        with pytest.raises(UnsupportedCpuError) as err:
            check_cpu("/m/x.onnx", "m-x", requirements, hw)
        message = str(err.value)
        assert "\n" not in message and "'m-x'" in message and hw.cpu_class in message
        assert " or ".join(expected[0].any_of) in message
    else:
        check_cpu("/m/x.onnx", "m-x", requirements, hw)


INT8_KEYS = st.fixed_dictionaries({}, optional={
    "weight_type": st.one_of(st.sampled_from(["QInt8", "QUInt8"]), json_values),
    "per_channel": st.one_of(st.booleans(), json_values),
    "reduce_range": st.one_of(st.booleans(), json_values),
    "validated_on": st.one_of(st.lists(st.sampled_from(["x86-avx2", "x86-amx"])), json_values),
})


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return '""'  # TOML has no null


@settings(max_examples=200, deadline=None)
@given(keys=INT8_KEYS)
def test_ladder_int8_keys_parse_or_fail_naming_the_rung(keys: dict[str, Any]) -> None:
    body = "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    text = ('reference = "F16"\n[[rung]]\nlabel = "F16"\nftype = "F16"\n'
            '[[rung]]\nlabel = "onnx-fp32"\nformat = "onnx"\nmethod = "export"\n'
            '[[rung]]\nlabel = "i8"\nformat = "onnx"\nmethod = "int8_dynamic"\n' + body)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ladder.toml"
        path.write_text(text)
        try:
            ladder = load_ladder(path)
        except CatalogError as exc:
            assert "rung 'i8'" in str(exc) or "ladder.toml:" in str(exc)
            return
    [rung] = [r for r in ladder.rungs if r.label == "i8"]
    assert rung.weight_type in ("QInt8", "QUInt8")
    assert isinstance(rung.per_channel, bool) and isinstance(rung.reduce_range, bool)
    assert all(re.fullmatch(CLASS_PATTERN, c) for c in rung.validated_on)


@pytest.mark.parametrize(("weight_type", "reduce_range", "fmt", "needs_vnni"), [
    ("QInt8", False, "dynamic", True),    # U8S8: vpmaddubsw saturates without VNNI (3.9 KLD)
    ("QInt8", True, "dynamic", False),    # 7-bit weights: the pair sums fit in 16 bits
    ("QUInt8", False, "dynamic", False),  # U8U8: widened, exact (the ladder's rung)
    ("QInt8", False, "qdq_static", False),  # S8S8: measured the same on the AVX2 path
])
def test_which_int8_settings_need_vnni(weight_type: str, reduce_range: bool, fmt: str,
                                       needs_vnni: bool) -> None:
    from quantfleet.models.onnx_export import VNNI_FEATURES, Int8Settings

    settings = Int8Settings(weight_type, reduce_range=reduce_range, quant_format=fmt)
    requires = [CpuRequirement.model_validate(r) for r in settings.requires_cpu()]
    assert bool(requires) == needs_vnni
    haswell = _hw("x86_64", ["avx2", "fma", "f16c"])
    assert bool(unmet(requires, haswell)) == needs_vnni
    assert not unmet(requires, _hw("x86_64", ["avx2", "avx_vnni"]))
    assert not unmet(requires, _hw("aarch64", ["asimd"]))
    assert all(r.any_of == list(VNNI_FEATURES) for r in requires)
