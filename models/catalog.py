"""The variant catalog: what each built model file is, and proof that it is intact.

A models directory holds the variant files and ``catalog.json``. The catalog
is the one description both sides share: the agent resolves a variant name
to a file and a backend, the fleet serves artifacts and their sha256 from it,
the evaluator stamps every figure with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from quantfleet.strict import Strict, explain

CATALOG_FILE = "catalog.json"
CATALOG_VERSION = 1
MODELS_DIR_ENV = "QUANTFLEET_MODELS_DIR"


class CatalogError(ValueError):
    """The catalog or a name in it cannot be used; the message says why."""


class SourceEntry(Strict):
    """A source model that variants are built from."""

    name: str = Field(description="Short name, used as the variant name prefix.")
    path: str = Field(description="Absolute path of the source GGUF.")
    sha256: str
    size_bytes: int
    origin: str = Field(description="Where the file came from (a package, or 'registered').")
    file_type: str = Field(description="The source's own dominant tensor type, e.g. Q4_1.")
    architecture: str | None = None
    n_parameters: int = 0


class Precision(Strict):
    label: str = Field(description="The precision's name: F16, Q8_0, Q4_K_M, onnx-int8, ...")
    tensor_types: dict[str, int] = Field(
        description="How many tensors of each type the file really has (K-quants fall back "
        "to other types on rows that are not multiples of 256)."
    )
    bits_per_weight: float = Field(description="File bits divided by parameter count.")


# Names as ``agent.hardware`` and ``wire.cpu_class`` spell them: architectures
# (x86_64, aarch64), features (avx2, avx512_vnni, dotprod, ...) and hardware
# classes (x86-avx2, x86-amx, arm-i8mm, ...).
NAME_PATTERN = r"^[a-z0-9][a-z0-9_]*$"
CLASS_PATTERN = r"^[a-z0-9][a-z0-9_]*(-[a-z0-9][a-z0-9_]*)*$"


def _unique(values: list[str], what: str) -> list[str]:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{what} {dupes} appear more than once")
    return values


class CpuRequirement(Strict):
    """A CPU feature a variant's kernels need on one architecture to compute correctly."""

    arch: str = Field(max_length=32, pattern=NAME_PATTERN,
                      description="The architecture it applies to (x86_64, aarch64, ...); "
                      "devices of other architectures are not concerned.")
    any_of: list[str] = Field(
        min_length=1, max_length=16,
        description="Features, as the hardware fingerprint names them (avx512_vnni, "
        "avx_vnni, amx_int8, dotprod, ...); a device of this architecture needs one.")
    why: str = Field("", max_length=300, description="What goes wrong without it.")

    @field_validator("any_of")
    @classmethod
    def _feature_names(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not (len(v) <= 32 and re.fullmatch(NAME_PATTERN, v))]
        if bad:
            raise ValueError(f"feature names {bad} are not lower-case names like 'avx512_vnni'")
        return _unique(values, "features")

    def met_by(self, arch: str, features: Iterable[str]) -> bool:
        return arch != self.arch or not set(self.any_of).isdisjoint(features)


class VariantEntry(Strict):
    name: str = Field(description="Unique name: '<source>-<precision label>'.")
    source: str
    backend: Literal["llama.cpp", "onnxruntime"]
    format: Literal["gguf", "onnx"]
    precision: Precision
    file: str = Field(description="File name, relative to the models directory.")
    size_bytes: int
    sha256: str
    reference: bool = Field(False, description="The variant others are measured against.")
    notes: list[str] = Field(default_factory=list)
    build: dict[str, Any] = Field(default_factory=dict, description="How it was built.")
    requires_cpu: list[CpuRequirement] = Field(
        default_factory=list, max_length=8,
        description="CPU features its kernels need (every requirement of the device's "
        "architecture must be met); the agent refuses to load it on a device without them.")
    validated_on: list[str] = Field(
        default_factory=list, max_length=16,
        description="Hardware classes (``wire.cpu_class``: x86-avx2, x86-amx, ...) its "
        "quality was measured on against the reference (docs/onnx.md).")
    created_at: str = ""

    @field_validator("validated_on")
    @classmethod
    def _class_names(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not (len(v) <= 32 and re.fullmatch(CLASS_PATTERN, v))]
        if bad:
            raise ValueError(f"hardware classes {bad} are not names like 'x86-avx2'")
        return _unique(values, "hardware classes")

    def unmet_requirements(self, arch: str, features: Iterable[str]) -> list[CpuRequirement]:
        have = set(features)
        return [r for r in self.requires_cpu if not r.met_by(arch, have)]

    def path(self, models_dir: Path) -> Path:
        return models_dir / self.file

    def summary(self) -> dict[str, Any]:
        """The fields scripts read from ``quantfleet models list --json``."""
        return {
            "name": self.name,
            "backend": self.backend,
            "precision": self.precision.label,
            "tensor_types": self.precision.tensor_types,
            "bits_per_weight": self.precision.bits_per_weight,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "source": self.source,
            "reference": self.reference,
            "requires_cpu": [r.model_dump() for r in self.requires_cpu],
            "validated_on": list(self.validated_on),
        }


class CatalogDocument(Strict):
    version: int = CATALOG_VERSION
    sources: dict[str, SourceEntry] = Field(default_factory=dict)
    variants: dict[str, VariantEntry] = Field(default_factory=dict)


def default_models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data_home / "quantfleet" / "models"


def models_dir_option(fn: Any) -> Any:
    """``--models-dir`` for every command that reads a models directory (both CLIs)."""
    import click

    return click.option(
        "--models-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=default_models_dir,
        show_default="$QUANTFLEET_MODELS_DIR or ~/.local/share/quantfleet/models",
        help="Directory holding the variant files and catalog.json.",
    )(fn)


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class Catalog:
    """``catalog.json`` in a models directory, read and written atomically."""

    def __init__(self, models_dir: Path | str) -> None:
        self.dir = Path(models_dir)
        self.path = self.dir / CATALOG_FILE
        self.doc = self._read()

    def _read(self) -> CatalogDocument:
        if not self.path.exists():
            return CatalogDocument()
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CatalogError(f"{self.path}: not readable JSON ({exc})") from None
        if isinstance(raw, dict) and raw.get("version") not in (None, CATALOG_VERSION):
            raise CatalogError(
                f"{self.path}: catalog version {raw.get('version')!r} is not supported "
                f"(this quantfleet reads version {CATALOG_VERSION})"
            )
        try:
            return CatalogDocument.model_validate(raw)
        except ValidationError as exc:
            raise CatalogError(explain(exc, where=str(self.path), pydantic_words=True)) from None

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".catalog.", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            fh.write(self.doc.model_dump_json(indent=2))
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # -- lookups --------------------------------------------------------
    @property
    def variants(self) -> list[VariantEntry]:
        return list(self.doc.variants.values())

    def resolve(self, name: str) -> VariantEntry:
        """A variant by full name, or by precision label when only one source has it."""
        if name in self.doc.variants:
            return self.doc.variants[name]
        matches = [v for v in self.variants if v.precision.label.lower() == name.lower()]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(sorted(self.doc.variants)) or "none (run `quantfleet models build`)"
        if len(matches) > 1:
            names = ", ".join(v.name for v in matches)
            raise CatalogError(f"variant {name!r} is ambiguous here: {names}")
        raise CatalogError(f"no variant {name!r} in {self.path} (known: {known})")

    def reference(self, source: str | None = None) -> VariantEntry | None:
        for v in self.variants:
            if v.reference and (source is None or v.source == source):
                return v
        return None

    def verify(self, variant: VariantEntry, *, full: bool = True) -> str | None:
        """Why the variant's file does not match its entry, or None when it does."""
        path = variant.path(self.dir)
        if not path.exists():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != variant.size_bytes:
            return f"{path} has {size} bytes, the catalog says {variant.size_bytes}"
        if full:
            digest = sha256_file(path)
            if digest != variant.sha256:
                return f"{path} has sha256 {digest}, the catalog says {variant.sha256}"
        return None

    def put_variant(self, variant: VariantEntry) -> None:
        self.doc.variants[variant.name] = variant

    def put_source(self, source: SourceEntry) -> None:
        self.doc.sources[source.name] = source
