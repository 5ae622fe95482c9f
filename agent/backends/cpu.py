"""Refuses, at load, a variant whose kernels need a CPU feature this device lacks.

A quantized file can be right on one processor and garbage on another: ONNX
Runtime's int8 U8S8 MatMuls without ``reduce_range`` saturate on x86 CPUs
without VNNI (docs/onnx.md). A variant says what it needs — in its catalog
entry (``requires_cpu``) and, for ONNX files, inside the file
(``quantfleet.quantization``), so a file that reached the device on its own
says it too. Loading it where a requirement is unmet raises
``UnsupportedCpuError``, a ``ModelFileError``: one line naming the variant,
the missing feature and the device's hardware class, which ``generate``,
``serve`` and the updater's pre-flight already report as the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from quantfleet.agent.wire import HardwareFingerprint
from quantfleet.models.catalog import CpuRequirement
from quantfleet.models.gguf_file import ModelFileError


class UnsupportedCpuError(ModelFileError):
    """The variant needs a CPU feature this device does not have."""


def unmet(requirements: Iterable[CpuRequirement], hw: HardwareFingerprint
          ) -> list[CpuRequirement]:
    have = set(hw.features)
    return [r for r in requirements if not r.met_by(hw.arch, have)]


def check_cpu(path: Path | str, variant: str, requirements: Iterable[CpuRequirement],
              hw: HardwareFingerprint | None = None) -> None:
    """Raise ``UnsupportedCpuError`` when this device (or ``hw``) misses a requirement."""
    requirements = list(requirements)
    if not requirements:
        return
    if hw is None:
        from quantfleet.agent.hardware import read_fingerprint

        # arch and features only: importing llama.cpp here would cost an ONNX device memory
        hw = read_fingerprint(runtimes=False)
    missing = unmet(requirements, hw)
    if not missing:
        return
    first = missing[0]
    needs = " or ".join(first.any_of)
    why = f" ({first.why})" if first.why else ""
    raise UnsupportedCpuError(
        path, f"variant {variant!r} needs {needs} on {first.arch}{why}; this device is "
              f"{hw.cpu_class} ({hw.cpu_model}) and has none of them")
