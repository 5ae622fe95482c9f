"""What hardware this device is: the fingerprint that decides which kernels run.

The same GGUF or ONNX file runs different kernels on different processors
(AVX2, AVX-512, VNNI, AMX; ARM dot-product, i8mm), and a quantized model's
outputs change with them. The agent reads its fingerprint once, announces it
with every birth (``wire.HardwareFingerprint``), prints it in
``quantfleet-agent generate --json`` and ``config check``, and the fleet
derives cohort labels from it (``wire.hardware_labels``).

Features come from what the kernel reports (``/proc/cpuinfo`` on Linux), the
runtimes' own view from llama.cpp's system-info string and onnxruntime's
version (read from its package metadata: importing onnxruntime for its version
would cost a GGUF-only device 25 MB). Only the features that change a kernel
are kept, so two devices of one class fingerprint alike. On x86-64 the features
are also checked against what the ``cpuid`` instruction tells this process
(``x86_cpuid_features``): the runtimes dispatch on ``cpuid``, and under an
emulator or a hypervisor that masks features (``qemu-x86_64 -cpu Haswell`` on
an AVX-512 host) ``/proc/cpuinfo`` still describes the host. ``cpuid`` only
ever removes features, never adds one.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import mmap
import os
import platform
import sys
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


#: Where ``cpuid`` reports each of X86_FEATURES: (leaf, subleaf, register, bit).
_CPUID_BITS: dict[str, tuple[int, int, int, int]] = {
    # registers: 0 eax, 1 ebx, 2 ecx, 3 edx
    "sse4_2": (1, 0, 2, 20), "fma": (1, 0, 2, 12), "avx": (1, 0, 2, 28), "f16c": (1, 0, 2, 29),
    "avx2": (7, 0, 1, 5), "bmi2": (7, 0, 1, 8), "avx512f": (7, 0, 1, 16),
    "avx512bw": (7, 0, 1, 30), "avx512vl": (7, 0, 1, 31), "avx512vbmi": (7, 0, 2, 1),
    "avx512_vnni": (7, 0, 2, 11), "amx_bf16": (7, 0, 3, 22), "avx512_fp16": (7, 0, 3, 23),
    "amx_tile": (7, 0, 3, 24), "amx_int8": (7, 0, 3, 25),
    "avx_vnni": (7, 1, 0, 4), "avx512_bf16": (7, 1, 0, 5),
}
# cpuid(leaf: edi, subleaf: esi, out: rdx -> uint32[4]) for the x86-64 System V ABI:
# push rbx; mov eax, edi; mov ecx, esi; mov r8, rdx; cpuid;
# mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3")


def x86_cpuid_features() -> set[str] | None:
    """The X86_FEATURES the ``cpuid`` instruction reports to this process, or None when
    it cannot be asked (not x86-64, or executable memory is refused).

    This is what llama.cpp and onnxruntime dispatch on. It can differ from
    ``/proc/cpuinfo``: an emulator (qemu-user) or a hypervisor shows the process
    another CPU than the one the kernel booted on.
    """
    if normalize_arch(platform.machine()) != "x86_64":
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):  # W^X policies, non-POSIX platforms
        return None
    try:
        page.write(_CPUID_CODE)
        # The c_char view is dropped at once (only its address kept): a live view
        # would make page.close() fail with "exported pointers exist".
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        call = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                ctypes.POINTER(ctypes.c_uint32))(address)
        out = (ctypes.c_uint32 * 4)()

        def regs(leaf: int, subleaf: int = 0) -> tuple[int, ...]:
            call(leaf, subleaf, out)
            return tuple(out)

        max_leaf = regs(0)[0]
        leaves = {(1, 0): regs(1) if max_leaf >= 1 else (0, 0, 0, 0)}
        leaves[(7, 0)] = regs(7, 0) if max_leaf >= 7 else (0, 0, 0, 0)
        leaves[(7, 1)] = regs(7, 1) if max_leaf >= 7 and leaves[(7, 0)][0] >= 1 \
            else (0, 0, 0, 0)
    finally:
        page.close()
    return {name for name, (leaf, sub, reg, bit) in _CPUID_BITS.items()
            if leaves[(leaf, sub)][reg] >> bit & 1}


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
    """onnxruntime's version, read from its installed metadata without importing it.

    Importing onnxruntime costs about 25 MB RSS, which a device that serves only
    GGUF variants never needs (issue 16); once an ONNX variant is loaded, the
    imported module's own version is the answer. Empty when it is not installed.
    """
    module = sys.modules.get("onnxruntime")
    if module is not None:
        return str(getattr(module, "__version__", ""))
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:  # or another build (onnxruntime-gpu, ...)
        for dist in importlib.metadata.packages_distributions().get("onnxruntime", []):
            return importlib.metadata.version(dist)
        return ""  # a GGUF-only device has no onnxruntime


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
                     runtimes: bool = True, cpuid: bool = True) -> HardwareFingerprint:
    """This machine's fingerprint. ``runtimes=False`` leaves out llama.cpp and
    onnxruntime (importing them costs memory a caller may not want to spend);
    ``cpuid=False`` trusts ``/proc/cpuinfo`` alone."""
    arch = normalize_arch(platform.machine())
    try:
        text = cpuinfo_path.read_text(errors="replace")
    except OSError:
        text = ""
    model, vendor, features = parse_cpuinfo(text, arch)
    visible = x86_cpuid_features() if cpuid and arch == "x86_64" else None
    if visible is not None:
        features = [f for f in features if f in visible]
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


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """llama.cpp's system info string, per backend: ``{"CPU": {"AVX2": "1", ...}}``.

    The string is ``BACKEND : KEY = VALUE | KEY = VALUE | ... | BACKEND : ...``;
    whatever does not fit the shape is skipped, never an error.
    """
    out: dict[str, dict[str, str]] = {}
    backend = ""
    for part in text.split("|"):
        head, sep, rest = part.partition(" : ")
        if sep:  # a new backend's first entry
            backend, part = head.strip(), rest
        key, eq, value = part.partition("=")
        if eq and key.strip() and backend:
            out.setdefault(backend, {})[key.strip()] = value.strip()
    return out


def llama_cpp_kernels(text: str) -> list[str]:
    """The CPU features llama.cpp was built to use, in its own order (``AVX2``, ``F16C``...)."""
    return [k for k, v in parse_system_info(text).get("CPU", {}).items() if v == "1"]


def describe(hw: HardwareFingerprint) -> str:
    """One line for people: the class, the CPU, and what each runtime runs on it."""
    kernels = llama_cpp_kernels(hw.llama_cpp_system_info)
    parts = [f"{hw.cpu_class} ({hw.cpu_model}, {hw.arch})"]
    if hw.llama_cpp_python or kernels:
        parts.append(f"llama.cpp {hw.llama_cpp_python or '?'}: "
                     + (" ".join(kernels) if kernels else "no CPU features reported"))
    if hw.onnxruntime:
        parts.append(f"onnxruntime {hw.onnxruntime}")
    return " · ".join(parts)


def hidden_features(hw: HardwareFingerprint,
                    cpuinfo_path: Path = Path("/proc/cpuinfo")) -> list[str]:
    """Features ``/proc/cpuinfo`` lists that ``hw`` (checked with ``cpuid``) does not have:
    the host's, hidden from this process by an emulator or a hypervisor's mask."""
    try:
        text = cpuinfo_path.read_text(errors="replace")
    except OSError:
        return []
    return sorted(set(parse_cpuinfo(text, hw.arch)[2]) - set(hw.features))


@functools.cache
def fingerprint() -> HardwareFingerprint:
    """This machine's fingerprint, read once per process."""
    return read_fingerprint()
