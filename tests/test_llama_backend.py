"""The llama.cpp backend on every real variant: answers, streams, constraints, logits."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from quantfleet.agent.backends import Backend, GenerationRequest
from quantfleet.agent.backends.base import log_softmax
from quantfleet.agent.chat import ChatTemplate

LABELS = ["F16", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def chat(backend: Backend, user: str, system: str | None = None) -> str:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    return ChatTemplate(backend.chat_template, **backend.special_tokens).render(msgs)


@pytest.mark.parametrize("label", LABELS)
def test_every_variant_answers_a_chat_prompt(loaded: dict[str, Backend], label: str) -> None:
    backend = loaded[label]
    prompt = chat(backend, "What is the capital of France?")
    result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=24))
    assert result.completion_tokens > 0 and result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.prompt_tokens == len(backend.tokenize(prompt))
    assert result.time_to_first_token_s is not None and result.total_time_s > 0


def test_greedy_answers_follow_the_models_own_argmax(loaded: dict[str, Backend]) -> None:
    """Greedy generation picks, token after token, the top token of the model's own
    teacher-forced logits — a property of a correct generation loop on any CPU, where
    the words themselves depend on the kernels."""
    backend = loaded["F16"]
    prompt = backend.tokenize(chat(backend, "What is the capital of France?"), add_bos=False,
                              special=True)
    result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=24))
    assert result.completion_tokens > 0 and len(result.token_ids) == result.completion_tokens
    logits = backend.logits([*prompt, *result.token_ids])
    predicted = logits[len(prompt) - 1:-1]
    top2 = np.sort(predicted, axis=-1)[:, -2:]
    chosen = predicted[np.arange(len(result.token_ids)), result.token_ids]
    # Chunked prompt processing and one-token steps may round apart in the last bits:
    # a token is accepted when it is the argmax or within 1e-3 of it (a near tie).
    assert np.all(chosen >= top2[:, 1] - 1e-3), (chosen, top2)


def test_the_model_carries_its_chat_template(loaded: dict[str, Backend]) -> None:
    backend = loaded["Q8_0"]
    assert backend.chat_template and "<|im_start|>" in backend.chat_template
    assert backend.special_tokens["eos_token"] == "<|im_end|>"
    text = chat(backend, "hi", system="be brief")
    assert text.endswith("<|im_start|>assistant\n")
    assert backend.vocab_size == 49152


@pytest.mark.parametrize("label", ["F16", "Q8_0", "Q4_K_M", "Q2_K"])
def test_json_schema_output_parses_and_validates(loaded: dict[str, Backend], label: str) -> None:
    backend = loaded[label]
    prompt = chat(backend, "Extract the person as JSON: Maria Lopez is 42 years old.")
    result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=64, json_schema=PERSON))
    assert result.constraint == "grammar"
    value = json.loads(result.text)
    jsonschema.validate(value, PERSON)


def test_a_schema_llama_cpp_cannot_compile_is_recorded(loaded: dict[str, Backend]) -> None:
    backend = loaded["Q8_0"]
    schema = {"type": "object", "properties": {"a": {"$ref": "http://example.com/x.json"}}}
    result = backend.generate(GenerationRequest(
        prompt=chat(backend, "Give me a JSON object."), max_tokens=32, json_schema=schema))
    assert result.constraint == "generic_json"


def test_streamed_chunks_add_up_to_the_result(loaded: dict[str, Backend]) -> None:
    backend = loaded["Q4_K_M"]
    request = GenerationRequest(prompt=chat(backend, "Count from one to ten."), max_tokens=40)
    handle = backend.stream(request)
    pieces = [c.text for c in handle]
    assert handle.result is not None
    assert "".join(pieces) == handle.result.text
    assert len(pieces) > 3
    assert handle.result.text == backend.generate(request).text  # greedy is repeatable


def test_closing_a_stream_cancels_generation(loaded: dict[str, Backend]) -> None:
    backend = loaded["Q4_K_M"]
    handle = backend.stream(GenerationRequest(
        prompt=chat(backend, "Write a long story about a cat."), max_tokens=200))
    it = iter(handle)
    next(it)
    next(it)
    handle.close()
    assert handle.result is not None
    assert handle.result.finish_reason == "cancelled"
    assert handle.result.completion_tokens < 10


def test_max_tokens_and_stop_strings(loaded: dict[str, Backend]) -> None:
    """The stop string comes from this model's own unconstrained answer on this machine:
    cutting there gives exactly the text before it, whatever the kernels made it say."""
    backend = loaded["Q8_0"]
    prompt = chat(backend, "Count from one to twenty, separated by commas.")
    capped = backend.generate(GenerationRequest(prompt=prompt, max_tokens=5))
    assert capped.finish_reason == "length" and capped.completion_tokens == 5
    full = backend.generate(GenerationRequest(prompt=prompt, max_tokens=60))
    assert len(full.text) >= 12, full.text
    middle = len(full.text) // 2
    stop = full.text[middle:middle + 3]
    cut = full.text.index(stop)  # its first occurrence, which may come earlier
    stopped = backend.generate(GenerationRequest(prompt=prompt, max_tokens=60, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    assert stopped.completion_tokens <= full.completion_tokens


def test_sampling_is_seeded(loaded: dict[str, Backend]) -> None:
    backend = loaded["Q4_K_M"]
    req = GenerationRequest(prompt=chat(backend, "Tell me a fun fact."), max_tokens=20,
                            temperature=1.0, top_p=0.95, top_k=40, seed=7)
    assert backend.generate(req).text == backend.generate(req).text


def test_prompt_longer_than_context_is_refused(loaded: dict[str, Backend]) -> None:
    from quantfleet.agent.backends import BackendError

    backend = loaded["Q2_K"]
    with pytest.raises(BackendError, match="does not fit the context of 1024"):
        backend.generate(GenerationRequest(prompt=[1] * 1100, max_tokens=4))


def test_teacher_forced_logits_show_the_quality_slope(loaded: dict[str, Backend]) -> None:
    text = (
        "Quantization stores the weights of a neural network with fewer bits. It makes a model "
        "smaller and faster on small devices, but it can change which answer the model gives, "
        'especially for structured output such as {"name": "Ada", "age": 36}.'
    )
    ref = loaded["F16"]
    tokens = ref.tokenize(text, add_bos=False)
    ref_logits = ref.logits(tokens)
    assert ref_logits.shape == (len(tokens), ref.vocab_size)
    assert ref_logits.dtype == np.float32
    lp_ref = log_softmax(ref_logits)

    def kld(label: str) -> tuple[float, float]:
        lp = log_softmax(loaded[label].logits(tokens))
        per_token = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
        same_top = float((lp.argmax(-1) == lp_ref.argmax(-1)).mean())
        return float(per_token.mean()), same_top

    self_kld, self_same = kld("F16")
    q8_kld, q8_same = kld("Q8_0")
    q2_kld, q2_same = kld("Q2_K")
    assert self_kld < 1e-4 and self_same == 1.0
    assert q8_kld < 0.02 and q8_same > 0.9
    assert q2_kld > 5 * q8_kld
    assert q8_same > q2_same
    # Teacher forcing agrees with generation: the greedy next token is the argmax.
    greedy = ref.generate(GenerationRequest(prompt=tokens, max_tokens=1))
    if greedy.token_ids:
        assert greedy.token_ids[0] == int(ref_logits[-1].argmax())
