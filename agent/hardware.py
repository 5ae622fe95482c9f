"""What hardware this device is: the fingerprint that decides which kernels run.

The same GGUF or ONNX file runs different kernels on different processors
(AVX2, AVX-512, VNNI, AMX; ARM dot-product, i8mm), and a quantized model's
outputs change with them. The agent reads its fingerprint once, announces it
with every birth (``wire.HardwareFingerprint``), prints it in
``quantfleet-agent generate --json`` and ``config check``, and the fleet
derives cohort labels from it (``wire.hardware_labels``).

Features come from what the kernel reports (``/proc/cpuinfo`` on Linux), the
runtimes' own view from llama.cpp's system-info string and onnxruntime's
version. Only the features that change a kernel are kept, so two devices of
one class fingerprint alike.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Iterable
from pathlib import Path

from .wire import HardwareFingerprint, cpu_class

#: x86 flags (as /proc/cpuinfo spells them) that select a different kernel in
#: llama.cpp (ggml-cpu) or onnxruntime (MLAS).
X86_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2",
    "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)
#: ARM feature names in /proc/cpuinfo, to the names llama.cpp and this project use.
ARM_FEATURES = {
    "asimd": "asimd", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
    "asimdhp": "fp16", "bf16": "bf16", "sme": "sme",
}

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def normalize_arch(machine: str) -> str:
    m = machine.strip().lower()
    return _ARCH_ALIASES.get(m, m)


def parse_cpuinfo(text: str, arch: str) -> tuple[str, str, list[str]]:
    """(model name, vendor, kernel-relevant features) from a /proc/cpuinfo text.

    Reads the first processor's block; unknown or missing fields give empty
    strings and no features rather than an error (a fingerprint never stops
    the agent).
    """
    model = vendor = ""
    raw: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if raw and not line.strip():
                break  # end of the first processor's block
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value
        elif key == "vendor_id" and not vendor:
            vendor = value
        elif key == "cpu implementer" and not vendor:
            vendor = f"arm-implementer-{value}"
        elif key in ("flags", "features") and not raw:
            raw = set(value.split())
    return model, vendor, kernel_features(raw, arch)


def kernel_features(raw: Iterable[str], arch: str) -> list[str]:
    """The features in ``raw`` that change kernels, canonically named and sorted."""
    present = set(raw)
    if arch == "x86_64":
        return sorted(f for f in X86_FEATURES if f in present)
    if arch == "aarch64":
        return sorted({name for flag, name in ARM_FEATURES.items() if flag in present})
    return []


def _llama_cpp() -> tuple[str, str]:
    """(llama.cpp system info, llama-cpp-python version), empty when it is not installed."""
    try:
        import llama_cpp
    except Exception:  # an ONNX-only device has no llama.cpp; that is fine
        return "", ""
    try:
        info = llama_cpp.llama_print_system_info()
        text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    except Exception:  # an odd build must not stop the fingerprint
        text = ""
    return " ".join(text.split()), str(getattr(llama_cpp, "__version__", ""))


def _onnxruntime() -> str:
    try:
        import onnxruntime
    except Exception:  # a GGUF-only device has no onnxruntime
        return ""
    return str(onnxruntime.__version__)


def _memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # fall back to sysconf
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            return 0


def _physical_cores() -> int | None:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        return int(n) if n else None
    except Exception:  # unknown is a fine answer
        return None


def read_fingerprint(cpuinfo_path: Path = Path("/proc/cpuinfo"), *,
                     runtimes: bool = True) -> HardwareFingerprint:
    """This machine's fingerprint. ``runtimes=False`` leaves out llama.cpp and
    onnxruntime (importing them costs memory a caller may not want to spend)."""
    arch = normalize_arch(platform.machine())
    try:
        text = cpuinfo_path.read_text(errors="replace")
    except OSError:
        text = ""
    model, vendor, features = parse_cpuinfo(text, arch)
    llama_info, llama_version = _llama_cpp() if runtimes else ("", "")
    return HardwareFingerprint(
        arch=arch,
        cpu_model=model or platform.processor() or "unknown",
        cpu_vendor=vendor,
        features=features,
        cpu_class=cpu_class(arch, features),
        logical_cores=os.cpu_count() or 1,
        physical_cores=_physical_cores(),
        memory_bytes=_memory_bytes(),
        llama_cpp_system_info=llama_info,
        llama_cpp_python=llama_version,
        onnxruntime=_onnxruntime() if runtimes else "",
        kernel=platform.release(),
    )


@functools.cache
def fingerprint() -> HardwareFingerprint:
    """This machine's fingerprint, read once per process."""
    return read_fingerprint()
