"""Builds the precision ladder of a source model into a models directory.

The reference rung is written by llama.cpp's own quantizer with
``allow_requantize`` (for the default model that is an *upcast* of the
shipped Q4_1 file, and its manifest says so); every other rung is quantized
from the reference. Building is idempotent: a rung whose file matches its
catalog entry (size and sha256) and whose recipe has not changed is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quantfleet.models.gguf_file import ModelFileError, read_gguf

from .catalog import (
    CLASS_PATTERN,
    Catalog,
    CatalogError,
    Precision,
    SourceEntry,
    VariantEntry,
    now_iso,
)
from .catalog import sha256_file as _sha256
from .sources import file_type_of, source_entry

log = logging.getLogger(__name__)


ONNX_METHODS = ("export", "int8_dynamic", "int8_qdq_static", "int4_matmulnbits")
_GGUF_KEYS = {"label", "ftype", "why", "format"}
_ONNX_KEYS = {"label", "format", "method", "why", "block_size", "keep_float", "accuracy_level",
              "weight_type", "per_channel", "reduce_range", "validated_on"}


@dataclass(frozen=True)
class Rung:
    label: str
    ftype: str = ""
    why: str = ""
    format: str = "gguf"  # "gguf" (llama.cpp quantizer) or "onnx" (exporter / ORT quantizers)
    method: str = ""  # ONNX only: one of ONNX_METHODS
    block_size: int = 32  # int4 only: weights per scale
    keep_float: tuple[str, ...] = ()  # int8 only: weight-name parts left in float
    accuracy_level: int | None = None  # int4 only: MatMulNBits compute type (None: float)
    # int8 only (onnx_export.Int8Settings): the defaults are the recipe that is exact on
    # every CPU (U8U8, see docs/onnx.md)
    weight_type: str = "QUInt8"
    per_channel: bool = True
    reduce_range: bool = False
    validated_on: tuple[str, ...] = ()  # hardware classes its quality was measured on


@dataclass(frozen=True)
class Ladder:
    reference: str
    rungs: tuple[Rung, ...]

    @property
    def gguf_rungs(self) -> tuple[Rung, ...]:
        return tuple(r for r in self.rungs if r.format == "gguf")

    @property
    def onnx_rungs(self) -> tuple[Rung, ...]:
        """The ONNX rungs, the export (their parent) first."""
        rungs = [r for r in self.rungs if r.format == "onnx"]
        return tuple(sorted(rungs, key=lambda r: r.method != "export"))


@dataclass
class BuildOutcome:
    variant: VariantEntry
    action: str  # "built" or "verified"
    seconds: float


def load_ladder(path: Path | None = None) -> Ladder:
    """Read a ladder recipe (the packaged ``ladder.toml`` by default)."""
    if path is None:
        text = resources.files("quantfleet.models").joinpath("ladder.toml").read_text()
        where = "ladder.toml"
    else:
        text = Path(path).read_text()
        where = str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{where}: {exc}") from None
    rungs = [_rung(r, i, where) for i, r in enumerate(raw.get("rung", []))]
    labels = [r.label for r in rungs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise CatalogError(f"{where}: rung labels {dupes} appear more than once")
    onnx_rungs = [r for r in rungs if r.format == "onnx"]
    exports = [r for r in onnx_rungs if r.method == "export"]
    if onnx_rungs and len(exports) != 1:
        raise CatalogError(f"{where}: ONNX rungs need exactly one rung with method 'export' "
                           f"(found {len(exports)})")
    reference = raw.get("reference")
    if reference not in {r.label for r in rungs if r.format == "gguf"}:
        raise CatalogError(f"{where}: reference {reference!r} is not one of the rungs")
    # The reference is built first: the others are quantized from it.
    rungs.sort(key=lambda r: r.label != reference)
    return Ladder(reference, tuple(rungs))


def _rung(r: object, i: int, where: str) -> Rung:
    """One ``[[rung]]`` table, validated."""
    if not isinstance(r, dict) or not isinstance(r.get("label"), str):
        raise CatalogError(f"{where}: rung #{i + 1} needs a string 'label'")
    label = r["label"]
    fmt = r.get("format", "gguf")
    if fmt not in ("gguf", "onnx"):
        raise CatalogError(f"{where}: rung {label!r} has format {fmt!r} (use 'gguf' or 'onnx')")
    allowed = _GGUF_KEYS if fmt == "gguf" else _ONNX_KEYS
    unknown = set(r) - allowed
    if unknown:
        raise CatalogError(f"{where}: rung {label!r} has unknown keys {sorted(unknown)}")
    why = r.get("why", "")
    if fmt == "gguf":
        if not isinstance(r.get("ftype"), str):
            raise CatalogError(f"{where}: rung {label!r} needs a string 'ftype'")
        return Rung(label, r["ftype"], why)
    method = r.get("method")
    if method not in ONNX_METHODS:
        raise CatalogError(f"{where}: rung {label!r} needs 'method', one of {list(ONNX_METHODS)}")
    block = r.get("block_size", 32)
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise CatalogError(f"{where}: rung {label!r} block_size must be a power of two >= 16")
    keep = r.get("keep_float", [])
    if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
        raise CatalogError(f"{where}: rung {label!r} keep_float must be a list of names")
    level = r.get("accuracy_level")
    if level is not None and level not in (0, 1, 2, 3, 4):
        raise CatalogError(f"{where}: rung {label!r} accuracy_level must be 0-4")
    from .onnx_export import INT8_WEIGHT_TYPES

    weight_type = r.get("weight_type", Rung.weight_type)
    if weight_type not in INT8_WEIGHT_TYPES:
        raise CatalogError(f"{where}: rung {label!r} weight_type must be one of "
                           f"{list(INT8_WEIGHT_TYPES)}")
    flags = {k: r.get(k, getattr(Rung, k)) for k in ("per_channel", "reduce_range")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise CatalogError(f"{where}: rung {label!r} {key} must be true or false")
    validated = r.get("validated_on", [])
    if not isinstance(validated, list) or not all(
            isinstance(c, str) and re.fullmatch(CLASS_PATTERN, c) for c in validated) or len(
            set(validated)) != len(validated):
        raise CatalogError(f"{where}: rung {label!r} validated_on must be a list of distinct "
                           "hardware classes like 'x86-avx2'")
    return Rung(label, "", why, "onnx", method, block, tuple(keep), level, weight_type,
                flags["per_channel"], flags["reduce_range"], tuple(validated))


def ftype_id(name: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
    if value is None:
        value = getattr(llama_cpp, f"LLAMA_FTYPE_{name.upper()}", None)
    if value is None:
        raise CatalogError(f"llama.cpp has no file type {name!r}")
    return int(value)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """llama.cpp's quantizer prints a line per tensor on fd 2; keep it in a log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def quantize(src: Path, dst: Path, ftype: str, *, allow_requantize: bool, log_file: Path) -> None:
    """Run llama_model_quantize; raise CatalogError if llama.cpp reports failure."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_id(ftype)
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    with _stderr_to(log_file):
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    if rc != 0:
        raise CatalogError(f"llama_model_quantize {src.name} -> {ftype} failed (code {rc}); "
                           f"see {log_file}")


def _recipe(rung: Rung, source: SourceEntry, parent: VariantEntry | None) -> dict[str, object]:
    import llama_cpp

    return {
        "tool": "llama_model_quantize",
        "ftype": rung.ftype,
        "ftype_id": ftype_id(rung.ftype),
        "from": parent.name if parent else f"source:{source.name}",
        "from_sha256": parent.sha256 if parent else source.sha256,
        "allow_requantize": parent is None,
        "llama_cpp_python": llama_cpp.__version__,
    }


def _recipe_matches(entry: VariantEntry, recipe: dict[str, object]) -> bool:
    keys = ("tool", "ftype", "from_sha256", "allow_requantize")
    return all(entry.build.get(k) == recipe[k] for k in keys)


def describe_gguf(path: Path, label: str) -> Precision:
    summary = read_gguf(path)
    n_params = summary.n_parameters or 1
    return Precision(
        label=label,
        tensor_types=summary.tensor_type_counts,
        bits_per_weight=round(summary.file_size * 8 / n_params, 3),
    )


def build_ladder(
    models_dir: Path,
    source: SourceEntry | None = None,
    *,
    ladder: Ladder | None = None,
    only: set[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BuildOutcome]:
    """Build (or verify) every rung of ``ladder`` for ``source`` in ``models_dir``."""
    ladder = ladder or load_ladder()
    source = source or source_entry()
    catalog = Catalog(models_dir)
    catalog.put_source(source)
    catalog.save()
    say = progress or (lambda _msg: None)
    outcomes: list[BuildOutcome] = []
    reference: VariantEntry | None = None
    for rung in ladder.gguf_rungs:
        is_ref = rung.label == ladder.reference
        if only and not is_ref and rung.label not in only:
            continue
        name = f"{source.name}-{rung.label}"
        recipe = _recipe(rung, source, None if is_ref else reference)
        started = time.perf_counter()
        existing = catalog.doc.variants.get(name)
        if existing and _recipe_matches(existing, recipe) and catalog.verify(existing) is None:
            say(f"{name}: already built, sha256 verified")
            outcomes.append(BuildOutcome(existing, "verified", time.perf_counter() - started))
            if is_ref:
                reference = existing
            continue
        say(f"{name}: quantizing to {rung.ftype}")
        dst = models_dir / f"{name}.gguf"
        partial = dst.with_suffix(".gguf.partial")
        parent_path = Path(source.path) if is_ref else reference.path(models_dir)  # type: ignore[union-attr]
        quantize(parent_path, partial, rung.ftype, allow_requantize=is_ref,
                 log_file=models_dir / "build-logs" / f"{name}.log")
        try:
            precision = describe_gguf(partial, rung.label)
        except ModelFileError as exc:
            partial.unlink(missing_ok=True)
            raise CatalogError(f"the quantizer wrote an unusable file: {exc}") from None
        os.replace(partial, dst)
        notes = [rung.why] if rung.why else []
        if is_ref and source.file_type not in ("F16", "BF16", "F32"):
            notes.append(
                f"upcast from the {source.file_type} source: it carries the source's "
                f"{source.file_type} rounding, so it is the best this model file can be, "
                "not the original full-precision weights"
            )
        entry = VariantEntry(
            name=name,
            source=source.name,
            backend="llama.cpp",
            format="gguf",
            precision=precision,
            file=dst.name,
            size_bytes=dst.stat().st_size,
            sha256=_sha256(dst),
            reference=is_ref,
            notes=notes,
            build=recipe,
            created_at=now_iso(),
        )
        catalog.put_variant(entry)
        catalog.save()
        outcomes.append(BuildOutcome(entry, "built", time.perf_counter() - started))
        if is_ref:
            reference = entry
    if reference is not None:
        from .onnx_build import build_onnx_rungs  # build.py's dataclasses are imported there

        outcomes.extend(build_onnx_rungs(models_dir, catalog, source, reference,
                                         _wanted_onnx(ladder, only), say))
    return outcomes


def _wanted_onnx(ladder: Ladder, only: set[str] | None) -> list[Rung]:
    rungs = list(ladder.onnx_rungs)
    if only is None:
        return rungs
    picked = [r for r in rungs if r.label in only]
    if not picked:
        return []
    # the export is the parent of the quantized ONNX rungs: always built with them
    return [r for r in rungs if r.method == "export" or r in picked]


__all__ = ["ONNX_METHODS", "BuildOutcome", "Ladder", "Rung", "build_ladder", "describe_gguf",
           "file_type_of", "load_ladder", "quantize"]
