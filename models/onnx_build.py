"""Builds the ONNX rungs of the ladder: export from the GGUF reference, then quantize.

The fp32 export carries the F16 reference's weights exactly (F16 -> fp32 is
lossless); int8 (``quantize_dynamic``) and int4 (``MatMulNBitsQuantizer``)
are quantized from it. Like the GGUF rungs, a rung whose file matches its
catalog entry and whose recipe has not changed is verified, not rebuilt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import (
    Catalog,
    CatalogError,
    CpuRequirement,
    Precision,
    SourceEntry,
    VariantEntry,
    now_iso,
)
from .catalog import sha256_file as _sha256

if TYPE_CHECKING:
    from .build import BuildOutcome, Rung
    from .onnx_export import Int8Settings

log = logging.getLogger(__name__)

# recipe keys that say which tool versions ran; a new version alone does not rebuild
_VERSION_KEYS = {"from", "onnx", "onnxruntime"}
INT8_METHODS = ("int8_dynamic", "int8_qdq_static")


def _int8_note(settings: Int8Settings, requires: list[CpuRequirement]) -> str:
    rr = ", reduce_range (7-bit weights)" if settings.reduce_range else ""
    where = ("exact on every CPU kernel" if not requires else
             "needs " + "; ".join(f"{' or '.join(r.any_of)} on {r.arch}" for r in requires))
    return (f"int8 {settings.kernel} ({settings.activation_type} activations, "
            f"{settings.weight_type} weights, "
            f"{'per channel' if settings.per_channel else 'per tensor'}{rr}): {where}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizers log every node at INFO on the root logger; keep the build readable."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def onnx_recipe(rung: Rung, parent: VariantEntry) -> dict[str, Any]:
    import onnx
    import onnxruntime

    from .onnx_export import EXPORTER_VERSION, OPSET

    recipe: dict[str, Any] = {"from": parent.name, "from_sha256": parent.sha256,
                              "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if rung.method == "export":
        recipe.update(tool="quantfleet.onnx_export", exporter_version=EXPORTER_VERSION,
                      opset=OPSET, dtype="float32")
    elif rung.method in INT8_METHODS:
        tool = ("onnxruntime.quantize_dynamic" if rung.method == "int8_dynamic"
                else "onnxruntime.quantize_static")
        # every setting that picks a kernel is part of the recipe: changing one rebuilds
        recipe.update(tool=tool, op_types=["MatMul"], **int8_settings(rung).record())
    else:
        recipe.update(tool="onnxruntime.MatMulNBitsQuantizer", bits=4,
                      block_size=rung.block_size, symmetric=True,
                      accuracy_level=rung.accuracy_level)
    return recipe


def int8_settings(rung: Rung) -> Int8Settings:
    from .onnx_export import Int8Settings

    return Int8Settings(
        weight_type=rung.weight_type, per_channel=rung.per_channel,
        reduce_range=rung.reduce_range,
        quant_format="dynamic" if rung.method == "int8_dynamic" else "qdq_static",
        keep_float=rung.keep_float)


def _matches(entry: VariantEntry, recipe: dict[str, Any]) -> bool:
    return all(entry.build.get(k) == v for k, v in recipe.items() if k not in _VERSION_KEYS)


def _make(rung: Rung, parent_path: Path, dst: Path, source_sha256: str, name: str) -> None:
    from . import onnx_export

    with _quiet():
        if rung.method == "export":
            onnx_export.export(parent_path, dst, source_sha256=source_sha256)
        elif rung.method in INT8_METHODS:
            onnx_export.quantize_int8(parent_path, dst, int8_settings(rung), variant=name)
        else:
            onnx_export.quantize_int4(parent_path, dst, block_size=rung.block_size,
                                      accuracy_level=rung.accuracy_level)


def build_onnx_rungs(
    models_dir: Path,
    catalog: Catalog,
    source: SourceEntry,
    reference: VariantEntry,
    rungs: list[Rung],
    say: Callable[[str], None],
) -> list[BuildOutcome]:
    """Build (or verify) ``rungs`` (the export first) from the GGUF ``reference``."""
    from .build import BuildOutcome
    from .onnx_export import ExportError, describe_onnx

    outcomes: list[BuildOutcome] = []
    export: VariantEntry | None = None
    for rung in rungs:
        parent = reference if rung.method == "export" else export
        if parent is None:  # pragma: no cover - load_ladder guarantees one export rung
            raise CatalogError(f"ONNX rung {rung.label!r} has no export rung to start from")
        name = f"{source.name}-{rung.label}"
        recipe = onnx_recipe(rung, parent)
        started = time.perf_counter()
        existing = catalog.doc.variants.get(name)
        if existing and _matches(existing, recipe) and catalog.verify(existing) is None:
            say(f"{name}: already built, sha256 verified")
            outcomes.append(BuildOutcome(existing, "verified", time.perf_counter() - started))
            if rung.method == "export":
                export = existing
            continue
        say(f"{name}: {rung.method} from {parent.name}")
        dst = models_dir / f"{name}.onnx"
        partial = dst.with_name(dst.name + ".partial")
        try:
            _make(rung, parent.path(models_dir), partial, reference.sha256, name)
            tensor_types, _ = describe_onnx(partial)
        except ExportError as exc:
            partial.unlink(missing_ok=True)
            raise CatalogError(str(exc)) from None
        except Exception as exc:  # onnx/ORT raise many kinds; the build must say which rung
            partial.unlink(missing_ok=True)
            raise CatalogError(f"{name}: {rung.method} failed ({exc})") from exc
        os.replace(partial, dst)
        size = dst.stat().st_size
        notes = [rung.why] if rung.why else []
        if rung.keep_float:
            notes.append(f"weights named {', '.join(rung.keep_float)} stay in float32")
        requires: list[CpuRequirement] = []
        if rung.method in INT8_METHODS:
            settings = int8_settings(rung)
            requires = [CpuRequirement.model_validate(r) for r in settings.requires_cpu()]
            notes.append(_int8_note(settings, requires))
        entry = VariantEntry(
            name=name,
            source=source.name,
            backend="onnxruntime",
            format="onnx",
            precision=Precision(
                label=rung.label,
                tensor_types=tensor_types,
                bits_per_weight=round(size * 8 / max(1, source.n_parameters), 3),
            ),
            file=dst.name,
            size_bytes=size,
            sha256=_sha256(dst),
            reference=False,
            notes=notes,
            build=recipe,
            requires_cpu=requires,
            validated_on=list(rung.validated_on),
            created_at=now_iso(),
        )
        catalog.put_variant(entry)
        catalog.save()
        outcomes.append(BuildOutcome(entry, "built", time.perf_counter() - started))
        if rung.method == "export":
            export = entry
    return outcomes
