"""Inference backends behind one seam (``base.Backend``); one module per runtime."""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import Backend, BackendError, GenerationRequest, GenerationResult, LoadOptions
from .gguf_file import ModelFileError

# catalog ``backend`` value -> "module:Class"; imported lazily so a device that
# only runs GGUF never imports onnxruntime and vice versa.
BACKENDS: dict[str, str] = {
    "llama.cpp": "quantfleet.agent.backends.llama_cpp:LlamaCppBackend",
    "onnxruntime": "quantfleet.agent.backends.onnx:OnnxBackend",
}


def load_backend(kind: str, path: Path | str, options: LoadOptions | None = None) -> Backend:
    """Load the file at ``path`` with the backend named ``kind`` (as in the catalog)."""
    try:
        target = BACKENDS[kind]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise BackendError(f"unknown backend {kind!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls(Path(path), options or LoadOptions())


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "GenerationRequest",
    "GenerationResult",
    "LoadOptions",
    "ModelFileError",
    "load_backend",
]
