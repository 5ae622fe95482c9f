"""Bad model files give one clear line naming the file — never a crash in C."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from quantfleet.agent.backends import ModelFileError, load_backend
from quantfleet.models.catalog import Catalog
from quantfleet.models.gguf_file import read_gguf


def _one_line(exc: BaseException, path: Path) -> str:
    msg = str(exc)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileError) as info:
        load_backend("llama.cpp", path)
    assert "no such file" in _one_line(info.value, path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError) as info:
        load_backend("llama.cpp", path)
    assert "empty file" in _one_line(info.value, path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07\x12\x0bpytorch" + b"\0" * 64)
    with pytest.raises(ModelFileError) as info:
        load_backend("llama.cpp", path)
    assert "not a GGUF file" in _one_line(info.value, path)


def test_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "future.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    with pytest.raises(ModelFileError) as info:
        read_gguf(path)
    assert "unsupported GGUF version 99" in _one_line(info.value, path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0005])
def test_truncated_real_variant(catalog: Catalog, tmp_path: Path, keep: float) -> None:
    src = catalog.resolve("Q2_K").path(catalog.dir)
    data = src.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError) as info:
        load_backend("llama.cpp", path)
    assert "truncated" in _one_line(info.value, path)


def test_real_variant_header(catalog: Catalog) -> None:
    summary = read_gguf(catalog.resolve("Q8_0").path(catalog.dir))
    assert summary.architecture == "llama"
    assert 130e6 < summary.n_parameters < 140e6
    assert summary.metadata["llama.embedding_length"] == 576
    assert "tokenizer.chat_template" in summary.metadata


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(max_size=512), version=st.sampled_from([2, 3]))
@example(tail=bytes(16), version=3)  # no tensors, no keys: a header that parses
def test_garbage_after_the_magic_is_always_a_clear_error(
    tmp_path: Path, tail: bytes, version: int
) -> None:
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", version) + tail)
    try:
        summary = read_gguf(path)
    except ModelFileError as exc:
        _one_line(exc, path)
        return
    # The tail happened to spell a well-formed header: everything it declares lies
    # inside the file, and a header without weights is still no model: loading it is a
    # clear error too.
    assert summary.version == version and summary.file_size == len(tail) + 8
    assert all(summary.data_offset + t.offset + t.nbytes <= summary.file_size
               for t in summary.tensors)
    with pytest.raises(ModelFileError) as info:
        load_backend("llama.cpp", path)
    _one_line(info.value, path)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupting_a_real_header_is_always_a_clear_error(
    catalog: Catalog, tmp_path: Path, data: st.DataObject
) -> None:
    src = catalog.resolve("Q2_K").path(catalog.dir)
    summary = read_gguf(src)
    head = bytearray(src.read_bytes()[: summary.data_offset])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(4, len(head) - 1))
        head[i] = data.draw(st.integers(0, 255))
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(head))  # the header alone: the tensor data is missing
    with pytest.raises(ModelFileError) as info:
        read_gguf(path)
    _one_line(info.value, path)
