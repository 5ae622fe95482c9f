"""ONNX variants against the llama.cpp F16 reference, on the same token ids.

The figures are printed (run with ``-s``) and attached to the test report as
properties; docs/onnx.md quotes them. Thresholds are what the issue asks
(fp32: same top token >= 95 %) and what was measured with margin for the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from quantfleet.agent.backends import Backend, GenerationRequest
from quantfleet.agent.backends.base import log_softmax
from quantfleet.agent.chat import ChatTemplate

# A fixed English text (~320 tokens): prose, a list, numbers and a little code.
TEXT = (
    "The history of the bicycle begins in the early nineteenth century. In 1817 Karl Drais "
    "built a two-wheeled running machine that the rider pushed along with his feet. Pedals "
    "arrived in the 1860s in France, and by the 1890s the safety bicycle, with two wheels of "
    "equal size and a chain drive, had become the machine we still ride today.\n\n"
    "Why did it spread so quickly? Three reasons stand out:\n"
    "1. It was cheap compared with a horse.\n"
    "2. It let workers live farther from factories.\n"
    "3. It gave women a new kind of independence.\n\n"
    "Engineers kept improving it. Pneumatic tyres, patented by John Boyd Dunlop in 1888, made "
    "the ride smoother; gears let riders climb hills; aluminium and carbon frames made it "
    "lighter. A modern racing bicycle weighs less than seven kilograms.\n\n"
    "def average_speed(distance_km, hours):\n"
    "    return distance_km / hours if hours > 0 else 0.0\n\n"
    "Today there are more than a billion bicycles in the world, and in many cities they are "
    "the fastest way to cross town at rush hour. Cities such as Copenhagen and Amsterdam "
    "built separate lanes, parking and traffic lights for them, and the share of trips made "
    "by bicycle rose above forty percent. Other cities followed, because a bicycle lane "
    "moves several times more people per hour than a lane full of cars, costs far less to "
    "build, and makes the air cleaner for everyone who lives nearby."
)
RecordProperty = Callable[[str, object], None]  # pytest's record_property fixture
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
    "What is 12 plus 7?",
]


def compare(ref: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
    """(same-top-token rate, mean KLD(ref || test), p99 KLD) over positions."""
    lr, lt = log_softmax(ref), log_softmax(test)
    kld = (np.exp(lr) * (lr - lt)).sum(axis=-1)
    same = float((ref.argmax(-1) == test.argmax(-1)).mean())
    return same, float(kld.mean()), float(np.percentile(kld, 99))


@pytest.fixture(scope="module")
def figures(loaded: dict[str, Backend], fresh_onnx: dict[str, Backend]
            ) -> dict[str, tuple[float, float, float]]:
    ref = loaded["F16"]
    tokens = ref.tokenize(TEXT)
    assert 300 < len(tokens) < 1000
    ref_logits = ref.logits(tokens)
    out = {}
    for label in ("onnx-fp32", "onnx-int8", "onnx-int4", "Q8_0", "Q4_0"):
        backend = fresh_onnx[label] if label.startswith("onnx") else loaded[label]
        assert backend.tokenize(TEXT) == tokens  # the same ids on both runtimes
        out[label] = compare(ref_logits, backend.logits(tokens))
    for label, (same, kld, p99) in out.items():
        print(f"\n{label:>10} vs llama.cpp F16 on {len(tokens)} tokens: same top token "
              f"{same:.1%}, mean KLD {kld:.5f}, p99 KLD {p99:.4f}")
    return out


def test_fp32_matches_the_llama_cpp_reference(figures: dict[str, tuple[float, float, float]],
                                              record_property: RecordProperty) -> None:
    same, kld, p99 = figures["onnx-fp32"]
    record_property("onnx_fp32_same_top", same)
    record_property("onnx_fp32_mean_kld", kld)
    assert same >= 0.95
    # the same weights: what remains is llama.cpp's F16 activations vs fp32
    assert kld < 1e-3 and p99 < 1e-2


def test_int8_and_int4_lose_quality_in_order(figures: dict[str, tuple[float, float, float]],
                                             record_property: RecordProperty) -> None:
    fp32, int8, int4 = figures["onnx-fp32"], figures["onnx-int8"], figures["onnx-int4"]
    for label in ("onnx-int8", "onnx-int4"):
        record_property(f"{label}_same_top", figures[label][0])
        record_property(f"{label}_mean_kld", figures[label][1])
    assert fp32[1] < int8[1] < int4[1]
    assert fp32[0] >= int8[0] >= int4[0] - 0.02
    # Measured on this text (docs/onnx.md, "Every CPU"): int8 (U8U8) 87 % / 0.072 natively
    # on x86-amx; on the AVX2 path (qemu Haswell) its KLD moves by about +-11 % (fp32
    # rounding flips a quantized activation here and there), int4 61 % / 0.41 on both paths
    # alike (GGUF Q4_0: 71 % / 0.31, the same AVX2 build on both). The old U8S8 int8 gave
    # 4.4 on an AVX2-only CPU: these bounds fail it by 30x.
    assert int8[0] >= 0.75 and int8[1] < 0.15
    assert int4[0] >= 0.50 and int4[1] < 0.7


def test_int4_is_as_good_as_its_gguf_counterpart(
        figures: dict[str, tuple[float, float, float]]) -> None:
    # symmetric int4 blocks of 32 are Q4_0's format (Q4_0 keeps one Q8_0 tensor): the two
    # runtimes should lose about the same, and both far more than Q8_0
    int4, q4_0, q8_0 = figures["onnx-int4"], figures["Q4_0"], figures["Q8_0"]
    assert 0.5 < int4[1] / q4_0[1] < 2.0
    assert q8_0[1] < figures["onnx-int8"][1] < int4[1]


def _greedy(backend: Backend, user: str) -> list[int]:
    prompt = ChatTemplate(backend.chat_template, **backend.special_tokens).render(
        [{"role": "user", "content": user}])
    return list(backend.generate(GenerationRequest(prompt=prompt, max_tokens=32)).token_ids)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_greedy_generations_agree_with_llama_cpp(loaded: dict[str, Backend],
                                                 fresh_onnx: dict[str, Backend],
                                                 record_property: RecordProperty) -> None:
    ref = loaded["F16"]
    report = {}
    reference = {user: _greedy(ref, user) for user in PROMPTS}  # once, not per label
    for label in ("onnx-fp32", "onnx-int8", "onnx-int4"):
        agree = []
        for user in PROMPTS:
            a, b = reference[user], _greedy(fresh_onnx[label], user)
            agree.append(common_prefix(a, b) / max(1, max(len(a), len(b))))
            if label == "onnx-fp32":
                print(f"\n  F16 : {ref.detokenize(a)!r}\n  fp32: {ref.detokenize(b)!r}")
        report[label] = agree
        record_property(f"{label}_greedy_prefix_agreement", agree)
        print(f"\n{label}: share of each greedy answer identical to llama.cpp F16: "
              + ", ".join(f"{x:.0%}" for x in agree))
    # fp32 carries the same weights: every greedy answer is the reference's, token for token
    assert all(x == 1.0 for x in report["onnx-fp32"])
    # quantized variants drift, but they start the same way on these easy prompts: measured
    # int8 45 % (0, 100, 41, 41) and int4 21 % (19, 36, 6, 22) of each answer; greedy text
    # flips on one near-tie, so the bounds sit at about half of that (the old U8S8 int8 on
    # an AVX2-only CPU: 0.8 %)
    assert np.mean(report["onnx-int8"]) > 0.2
    assert np.mean(report["onnx-int4"]) > 0.1
