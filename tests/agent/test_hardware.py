"""The hardware fingerprint: parsed from what the kernel reports, classed for the fleet."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from quantfleet.agent.hardware import (
    X86_FEATURES,
    describe,
    hidden_features,
    llama_cpp_kernels,
    parse_cpuinfo,
    parse_system_info,
    read_fingerprint,
    x86_cpuid_features,
)
from quantfleet.agent.wire import CPU_CLASSES, HardwareFingerprint, cpu_class, hardware_labels

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand \
hypervisor lahf_lm abm sse4a misalignsse 3dnowprefetch bmi1 avx2 smep bmi2 erms rdseed adx sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu avx512f avx512_vnni
"""

GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs \
paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""

PI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
"""


def test_an_avx2_epyc_without_vnni_is_class_x86_avx2() -> None:
    model, vendor, features = parse_cpuinfo(EPYC, "x86_64")
    assert (model, vendor) == ("AMD EPYC 7B13 64-Core Processor", "AuthenticAMD")
    # only the first processor's block counts (the second is made up to prove it)
    assert features == ["avx", "avx2", "bmi2", "f16c", "fma", "sse4_2"]
    assert cpu_class("x86_64", features) == "x86-avx2"


def test_arm_features_are_named_as_llama_cpp_names_them() -> None:
    _, vendor, features = parse_cpuinfo(GRAVITON3, "aarch64")
    assert vendor == "arm-implementer-0x41"
    assert features == ["asimd", "bf16", "dotprod", "fp16", "i8mm", "sve"]
    assert cpu_class("aarch64", features) == "arm-i8mm"
    assert cpu_class("aarch64", parse_cpuinfo(PI4, "aarch64")[2]) == "arm-neon"


def test_classes_follow_the_kernel_deciding_features() -> None:
    assert cpu_class("x86_64", ["avx2", "avx512f", "avx512_vnni", "amx_int8"]) == "x86-amx"
    assert cpu_class("x86_64", ["avx2", "avx512f", "avx512_vnni"]) == "x86-avx512-vnni"
    assert cpu_class("x86_64", ["avx2", "avx512f"]) == "x86-avx512"
    assert cpu_class("x86_64", ["avx2", "avx_vnni"]) == "x86-avx2-vnni"
    assert cpu_class("x86_64", ["sse4_2"]) == "x86-sse"
    assert cpu_class("aarch64", ["asimd", "dotprod"]) == "arm-dotprod"
    assert cpu_class("riscv64", []) == "riscv64"


def test_labels_say_class_arch_and_the_int8_features() -> None:
    features = parse_cpuinfo(EPYC, "x86_64")[2]
    hw = HardwareFingerprint(arch="x86_64", cpu_model="EPYC", features=features,
                             cpu_class=cpu_class("x86_64", features), logical_cores=2,
                             memory_bytes=1)
    assert hardware_labels(hw) == {"cpu.arch": "x86_64", "cpu.class": "x86-avx2",
                                   "cpu.vnni": "false", "cpu.avx512": "false"}


def test_this_machine_fingerprints_itself(tmp_path: Path) -> None:
    hw = read_fingerprint()
    assert hw.logical_cores >= 1 and hw.memory_bytes > 0
    assert hw.cpu_class in CPU_CLASSES or hw.cpu_class == hw.arch
    # the llama.cpp build is the project's portable one: its system info names AVX2 or NEON
    assert hw.llama_cpp_system_info.startswith("CPU :")
    assert hw.onnxruntime
    # no /proc/cpuinfo (a container without it): still a fingerprint, with no features
    bare = read_fingerprint(tmp_path / "missing", runtimes=False)
    assert bare.features == [] and bare.llama_cpp_system_info == ""


@given(st.text(max_size=2000), st.sampled_from(["x86_64", "aarch64", "riscv64"]))
def test_any_cpuinfo_text_parses_without_error(text: str, arch: str) -> None:
    model, vendor, features = parse_cpuinfo(text, arch)
    assert isinstance(model, str) and isinstance(vendor, str) and "\n" not in model
    assert features == sorted(set(features))
    assert cpu_class(arch, features)


# -- what cpuid tells this process (x86-64) ---------------------------------------------

# numpy dispatches its own kernels on cpuid and names what it found; where it knows a
# feature, it must agree with ours (an independent check of the leaf/bit table).
NUMPY_NAMES = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA3", "f16c": "F16C", "bmi2": "BMI2",
               "sse4_2": "SSE42", "avx512f": "AVX512F", "avx512bw": "AVX512BW",
               "avx512vl": "AVX512VL", "avx512vbmi": "AVX512VBMI",
               "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16",
               "avx512_fp16": "AVX512FP16"}


def _x86_cpuid() -> set[str]:
    import platform

    import pytest

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("cpuid is an x86-64 instruction")
    visible = x86_cpuid_features()
    if visible is None:
        pytest.skip("this system refuses executable memory (W^X); /proc/cpuinfo alone is used")
    return set(visible)


def test_cpuid_agrees_with_numpy_and_with_the_llama_cpp_build() -> None:
    from numpy._core._multiarray_umath import __cpu_features__ as numpy_features

    visible = _x86_cpuid()
    for ours, theirs in NUMPY_NAMES.items():
        assert (ours in visible) == bool(numpy_features[theirs]), ours
    # The project's llama.cpp build needs AVX2/FMA/F16C; that it runs proves them.
    kernels = llama_cpp_kernels(read_fingerprint().llama_cpp_system_info)
    for need, feature in (("AVX2", "avx2"), ("FMA", "fma"), ("F16C", "f16c")):
        if need in kernels:
            assert feature in visible


def test_cpuid_only_takes_features_away(tmp_path: Path) -> None:
    visible = _x86_cpuid()
    # A kernel that claims every feature (the host seen through an emulator that hides
    # some): the fingerprint keeps only what cpuid shows, and names the rest as hidden.
    everything = tmp_path / "cpuinfo"
    everything.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Host\n"
                          f"flags\t\t: {' '.join(X86_FEATURES)}\n")
    hw = read_fingerprint(everything, runtimes=False)
    assert set(hw.features) == visible & set(X86_FEATURES)
    assert hw.cpu_class == cpu_class("x86_64", sorted(visible))
    assert hidden_features(hw, everything) == sorted(set(X86_FEATURES) - visible)
    # ...and never adds one the kernel does not report.
    _, _, few = parse_cpuinfo(EPYC, "x86_64")
    (tmp_path / "epyc").write_text(EPYC)
    assert set(read_fingerprint(tmp_path / "epyc", runtimes=False).features) <= set(few)
    assert read_fingerprint(tmp_path / "epyc", runtimes=False, cpuid=False).features == few


# -- llama.cpp's system info string ---------------------------------------------------------

def test_system_info_is_read_per_backend() -> None:
    text = ("CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
            "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | LLAMAFILE = 1 |")
    info = parse_system_info(text)
    assert info["CUDA"]["ARCHS"] == "890"
    assert info["CPU"] == {"SSE3": "1", "AVX": "1", "AVX2": "1", "AVX512": "0",
                           "LLAMAFILE": "1"}
    assert llama_cpp_kernels(text) == ["SSE3", "AVX", "AVX2", "LLAMAFILE"]
    assert llama_cpp_kernels("") == []


_KEY = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=12)


@given(st.dictionaries(_KEY, st.dictionaries(_KEY, st.sampled_from(["0", "1", "890"]),
                                             min_size=1, max_size=6), max_size=3))
def test_a_well_formed_system_info_round_trips(backends: dict[str, dict[str, str]]) -> None:
    text = " | ".join(f"{b} : " + " | ".join(f"{k} = {v}" for k, v in kv.items())
                      for b, kv in backends.items()) + (" |" if backends else "")
    assert parse_system_info(text) == backends


@given(st.text(max_size=500))
def test_any_system_info_text_parses_without_error(text: str) -> None:
    info = parse_system_info(text)
    assert all(isinstance(v, dict) for v in info.values())
    assert isinstance(llama_cpp_kernels(text), list)


def test_describe_names_the_class_and_the_llama_cpp_kernels() -> None:
    hw = read_fingerprint()
    line = describe(hw)
    assert line.startswith(hw.cpu_class) and hw.cpu_model in line
    for kernel in llama_cpp_kernels(hw.llama_cpp_system_info):
        assert kernel in line
