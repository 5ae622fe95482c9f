"""Inference backends behind one seam (``base.Backend``); one module per runtime."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from quantfleet.models.gguf_file import ModelFileError

from .base import Backend, BackendError, GenerationRequest, GenerationResult, LoadOptions
from .cpu import UnsupportedCpuError, check_cpu

log = logging.getLogger(__name__)

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
    _check_catalog_requirements(Path(path))
    module_name, _, class_name = target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls(Path(path), options or LoadOptions())


def _check_catalog_requirements(path: Path) -> None:
    """Refuse the file when its entry in the catalog beside it needs a CPU feature we lack.

    Checked before the runtime maps the file, so a refusal costs nothing. A file
    with no catalog next to it (or none naming it) has only its own record, which
    the backend checks.
    """
    from quantfleet.models.catalog import CATALOG_FILE, Catalog, CatalogError

    if not (path.parent / CATALOG_FILE).is_file():
        return
    try:
        catalog = Catalog(path.parent)
    except CatalogError as exc:  # the caller resolved its entry elsewhere; say so, go on
        log.warning("CPU requirements not checked from the catalog: %s", exc)
        return
    for entry in catalog.variants:
        if entry.file == path.name:
            check_cpu(path, entry.name, entry.requires_cpu)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "GenerationRequest",
    "GenerationResult",
    "LoadOptions",
    "ModelFileError",
    "UnsupportedCpuError",
    "check_cpu",
    "load_backend",
]
