"""Fixtures for the ONNX backend tests: the real ONNX rungs of the session's ladder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from quantfleet.agent.backends import LoadOptions
from quantfleet.agent.backends.onnx import OnnxBackend
from quantfleet.models.catalog import Catalog
from quantfleet.models.tokenizer import BPETokenizer

ONNX_LABELS = ["onnx-fp32", "onnx-int8", "onnx-int4"]


@pytest.fixture(scope="session")
def onnx_path(catalog: Catalog) -> dict[str, Path]:
    """Paths of the ONNX variants, by precision label."""
    return {label: catalog.resolve(label).path(catalog.dir) for label in ONNX_LABELS}


@pytest.fixture(scope="session")
def gguf_tokenizer(catalog: Catalog) -> BPETokenizer:
    """The tokenizer read straight from the F16 reference GGUF (as the exporter reads it)."""
    from gguf import GGUFReader

    from quantfleet.models.onnx_export import tokenizer_data

    path = catalog.resolve("F16").path(catalog.dir)
    return BPETokenizer(tokenizer_data(GGUFReader(str(path)), path))


@pytest.fixture(scope="session")
def llama_vocab(catalog: Catalog) -> Iterator[object]:
    """llama.cpp's own tokenizer over the F16 reference (vocabulary only: loads in ms)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(catalog.resolve("F16").path(catalog.dir)),
                          vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def fresh_onnx(onnx_path: dict[str, Path]) -> Iterator[dict[str, OnnxBackend]]:
    """ONNX backends without prefix reuse, for figures that must not depend on history."""
    cache: dict[str, OnnxBackend] = {}

    class _Lazy(dict[str, OnnxBackend]):
        def __missing__(self, label: str) -> OnnxBackend:
            backend = OnnxBackend(onnx_path[label], LoadOptions(n_ctx=1024, prefix_cache=False,
                                                                warmup=False))
            self[label] = backend
            cache[label] = backend
            return backend

    yield _Lazy()
    for backend in cache.values():
        backend.close()
