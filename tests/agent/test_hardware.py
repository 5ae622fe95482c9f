"""The hardware fingerprint: parsed from what the kernel reports, classed for the fleet."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from quantfleet.agent.hardware import parse_cpuinfo, read_fingerprint
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
