"""A variant whose kernels need a CPU feature this device lacks is refused at load.

Real files (copies of the session ladder's int8), the real load path
(``load_backend``, ``quantfleet-agent generate``, the serving ``ModelSet``).
A requirement can come from the catalog entry beside the file or from the
file's own ``quantfleet.quantization`` record; an int8 file from before the
record existed is taken to be the old U8S8 recipe. Where a test needs a CPU
this machine is not, it swaps in the fingerprint of a Haswell, parsed by the
agent's own /proc/cpuinfo reader.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from quantfleet.agent import hardware
from quantfleet.agent.backends import LoadOptions, ModelFileError, UnsupportedCpuError, load_backend
from quantfleet.agent.backends.onnx import OnnxBackend
from quantfleet.agent.cli import cli as agent_cli
from quantfleet.agent.wire import HardwareFingerprint
from quantfleet.models.catalog import Catalog, CatalogDocument, CpuRequirement, VariantEntry
from quantfleet.models.onnx_export import META_QUANTIZATION, VNNI_FEATURES

NO_WARMUP = LoadOptions(warmup=False)
HERE = hardware.read_fingerprint(runtimes=False)
HASWELL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 movbe popcnt

"""


@pytest.fixture
def haswell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HardwareFingerprint:
    """This process sees itself as a Haswell (AVX2, FMA, no AVX-512, no VNNI)."""
    info = tmp_path / "cpuinfo"
    info.write_text(HASWELL_CPUINFO)
    real = hardware.read_fingerprint
    hw = real(info, runtimes=False)
    if hw.arch != "x86_64":
        pytest.skip(f"a Haswell fingerprint is an x86-64 one; this machine is {hw.arch}")
    monkeypatch.setattr(hardware, "read_fingerprint", lambda *a, **k: hw)
    assert hw.cpu_class == "x86-avx2"
    return hw


def _models_dir(catalog: Catalog, label: str, dst: Path, **changes: object) -> VariantEntry:
    """A models directory holding a copy of the ladder's ``label`` and its entry, changed."""
    entry = catalog.resolve(label)
    dst.mkdir(parents=True, exist_ok=True)
    try:  # the same bytes: a hard link where it can be (nothing writes into it)
        os.link(entry.path(catalog.dir), dst / entry.file)
    except OSError:
        shutil.copyfile(entry.path(catalog.dir), dst / entry.file)
    changed = entry.model_copy(update=changes)
    copy = Catalog(dst)
    copy.doc = CatalogDocument(sources=catalog.doc.sources, variants={changed.name: changed})
    copy.save()
    return changed


def _with_record(src: Path, dst: Path, record: Mapping[str, object] | None,
                 producer: str | None = None) -> Path:
    model = onnx.load_model(str(src))
    keep = [p for p in model.metadata_props if p.key != META_QUANTIZATION]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if record is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = META_QUANTIZATION, json.dumps(record)
    if producer is not None:
        model.producer_name = producer
    onnx.save_model(model, str(dst))
    return dst


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_the_catalog_entry_s_requirement_refuses_the_file(catalog: Catalog,
                                                         tmp_path: Path) -> None:
    fake = CpuRequirement(arch=HERE.arch, any_of=["fake_feature"], why="a test asks for it")
    entry = _models_dir(catalog, "onnx-int8", tmp_path / "models", requires_cpu=[fake])
    path = entry.path(tmp_path / "models")
    with pytest.raises(UnsupportedCpuError) as err:
        load_backend(entry.backend, path, NO_WARMUP)
    message = _one_line(err)
    assert str(path) in message and repr(entry.name) in message
    assert "needs fake_feature on " + HERE.arch in message and "(a test asks for it)" in message
    assert f"this device is {HERE.cpu_class}" in message
    # the agent's generate turns it into a one-line error and exit status 1
    result = CliRunner().invoke(agent_cli, ["generate", "--models-dir", str(tmp_path / "models"),
                                            "-v", "onnx-int8", "Hi"])
    assert result.exit_code == 1
    assert "needs fake_feature" in result.output and HERE.cpu_class in result.output
    # a requirement for another architecture does not concern this device
    other = "aarch64" if HERE.arch == "x86_64" else "x86_64"
    entry = _models_dir(catalog, "onnx-int8", tmp_path / "other", requires_cpu=[
        CpuRequirement(arch=other, any_of=["fake_feature"])])
    load_backend(entry.backend, entry.path(tmp_path / "other"), NO_WARMUP).close()


def test_the_serving_model_set_refuses_it_too(catalog: Catalog, tmp_path: Path) -> None:
    from quantfleet.agent.config import parse_config
    from quantfleet.agent.serving.routing import ModelSet

    fake = CpuRequirement(arch=HERE.arch, any_of=["fake_feature"])
    _models_dir(catalog, "onnx-int8", tmp_path / "models", requires_cpu=[fake])
    config = parse_config({"models": {"dir": str(tmp_path / "models"), "active": "onnx-int8",
                                      "fallback": ""}},
                          "test")
    with pytest.raises(UnsupportedCpuError, match="needs fake_feature"):
        ModelSet.load(config)


def test_the_file_s_own_record_refuses_it_without_a_catalog(onnx_path: dict[str, Path],
                                                           tmp_path: Path) -> None:
    record = {"variant": "smollm2-135m-onnx-int8-fake", "requires_cpu": [
        {"arch": HERE.arch, "any_of": ["fake_feature", "other_fake"], "why": "recorded"}]}
    path = _with_record(onnx_path["onnx-int8"], tmp_path / "x.onnx", record)
    with pytest.raises(UnsupportedCpuError) as err:
        load_backend("onnxruntime", path, NO_WARMUP)
    message = _one_line(err)
    assert "variant 'smollm2-135m-onnx-int8-fake' needs fake_feature or other_fake" in message
    assert HERE.cpu_class in message


def test_an_unusable_record_is_a_model_file_error(onnx_path: dict[str, Path],
                                                  tmp_path: Path) -> None:
    path = _with_record(onnx_path["onnx-int8"], tmp_path / "x.onnx",
                        {"requires_cpu": [{"arch": "x86_64", "any_of": []}]})
    with pytest.raises(ModelFileError, match=r"metadata 'quantfleet\.quantization' is unusable"):
        load_backend("onnxruntime", path, NO_WARMUP)


def test_the_ladder_int8_records_its_settings_and_runs_on_avx2(
        catalog: Catalog, onnx_path: dict[str, Path], haswell: HardwareFingerprint) -> None:
    entry = catalog.resolve("onnx-int8")
    assert entry.requires_cpu == []
    assert set(entry.validated_on) >= {"x86-avx2"}
    assert entry.build["weight_type"] == "QUInt8" and entry.build["kernel"] == "U8U8"
    backend = OnnxBackend(onnx_path["onnx-int8"], NO_WARMUP)
    try:
        assert backend.quantization["kernel"] == "U8U8"
        assert backend.quantization["variant"] == entry.name
    finally:
        backend.close()


def test_a_vnni_only_int8_is_refused_on_avx2_and_an_old_file_too(
        onnx_path: dict[str, Path], tmp_path: Path, haswell: HardwareFingerprint) -> None:
    from quantfleet.models.onnx_export import LEGACY_INT8

    vnni: dict[str, object] = {**LEGACY_INT8.record(), "variant": "smollm2-135m-onnx-int8-vnni",
            "requires_cpu": LEGACY_INT8.requires_cpu()}
    path = _with_record(onnx_path["onnx-int8"], tmp_path / "vnni.onnx", vnni)
    with pytest.raises(UnsupportedCpuError) as err:
        load_backend("onnxruntime", path, NO_WARMUP)
    message = _one_line(err)
    assert "'smollm2-135m-onnx-int8-vnni' needs " + " or ".join(VNNI_FEATURES) in message
    assert "this device is x86-avx2 (Intel(R) Xeon(R) CPU E5-2680 v3" in message
    # an int8 file quantized before the settings were recorded: the old recipe, refused
    old = _with_record(onnx_path["onnx-int8"], tmp_path / "old.onnx", None,
                       producer="onnx.quantize")
    with pytest.raises(UnsupportedCpuError) as err:
        load_backend("onnxruntime", old, NO_WARMUP)
    assert "records no int8 settings" in _one_line(err) and "'old'" in str(err.value)


def test_a_vnni_only_int8_loads_where_there_is_vnni(onnx_path: dict[str, Path],
                                                   tmp_path: Path) -> None:
    if HERE.arch != "x86_64" or not set(VNNI_FEATURES) & set(HERE.features):
        pytest.skip(f"this machine ({HERE.cpu_class}, {platform.machine()}) has no VNNI")
    old = _with_record(onnx_path["onnx-int8"], tmp_path / "old.onnx", None,
                       producer="onnx.quantize")
    backend = load_backend("onnxruntime", old, NO_WARMUP)
    try:
        assert isinstance(backend, OnnxBackend) and backend.quantization["legacy"] is True
    finally:
        backend.close()


def test_an_int4_file_needs_nothing(onnx_path: dict[str, Path],
                                   haswell: HardwareFingerprint) -> None:
    backend = OnnxBackend(onnx_path["onnx-int4"], NO_WARMUP)  # MatMulNBits: no record, no check
    try:
        assert backend.quantization == {}
    finally:
        backend.close()
