"""The ONNX Runtime backend behind the seam, on the real ONNX variants."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from quantfleet.agent.backends import Backend, BackendError, GenerationRequest, load_backend
from quantfleet.agent.backends.onnx import JSON_ATTEMPTS, json_problem
from quantfleet.agent.chat import ChatTemplate

LABELS = ["onnx-fp32", "onnx-int8", "onnx-int4"]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def chat(backend: Backend, user: str) -> str:
    return ChatTemplate(backend.chat_template, **backend.special_tokens).render(
        [{"role": "user", "content": user}])


@pytest.mark.parametrize("label", LABELS)
def test_every_onnx_variant_answers_a_chat_prompt(loaded: dict[str, Backend], label: str) -> None:
    backend = loaded[label]
    assert backend.kind == "onnxruntime"
    prompt = chat(backend, "What is the capital of France?")
    result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=24))
    assert result.completion_tokens > 0 and result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.prompt_tokens == backend.count_tokens(prompt)
    assert result.constraint == "none"
    assert result.time_to_first_token_s is not None and result.total_time_s > 0
    assert backend.detokenize(result.token_ids) == result.text


def test_the_reference_answers_correctly(loaded: dict[str, Backend]) -> None:
    backend = loaded["onnx-fp32"]
    result = backend.generate(GenerationRequest(
        prompt=chat(backend, "What is the capital of France?"), max_tokens=24))
    assert "Paris" in result.text and result.finish_reason == "stop"


def test_streamed_chunks_add_up_to_the_result(loaded: dict[str, Backend]) -> None:
    backend = loaded["onnx-int4"]
    handle = backend.stream(GenerationRequest(prompt=chat(backend, "Count from one to ten."),
                                              max_tokens=40))
    pieces = [c.text for c in handle]
    assert handle.result is not None
    assert "".join(pieces) == handle.result.text
    assert sum(1 for p in pieces if p) > 1  # really streamed, not one lump
    streamed_ids = handle.result.token_ids
    whole = backend.generate(GenerationRequest(prompt=chat(backend, "Count from one to ten."),
                                               max_tokens=40))
    assert whole.token_ids == streamed_ids


def test_max_tokens_and_stop_strings(loaded: dict[str, Backend]) -> None:
    backend = loaded["onnx-int4"]
    prompt = chat(backend, "Count from one to ten, separated by commas.")
    capped = backend.generate(GenerationRequest(prompt=prompt, max_tokens=5))
    assert capped.completion_tokens == 5 and capped.finish_reason == "length"
    full = backend.generate(GenerationRequest(prompt=prompt, max_tokens=40))
    assert len(full.text) > 12
    # a stop string that is likely to straddle tokens: three characters from the middle
    stop = full.text[6:9]
    stopped = backend.generate(GenerationRequest(prompt=prompt, max_tokens=40, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)] and stop not in stopped.text
    none = backend.generate(GenerationRequest(prompt=prompt, max_tokens=0))
    assert none.completion_tokens == 0 and none.text == "" and none.finish_reason == "length"


def test_sampling_is_repeatable_with_a_seed_and_varies_without(
        loaded: dict[str, Backend]) -> None:
    backend = loaded["onnx-int8"]
    prompt = chat(backend, "Write a short poem about rain.")

    def sample(seed: int | None) -> list[int]:
        return backend.generate(GenerationRequest(prompt=prompt, max_tokens=24, temperature=1.0,
                                                  top_p=0.95, top_k=50, seed=seed)).token_ids

    assert sample(7) == sample(7)
    runs = {tuple(sample(s)) for s in (1, 2, 3, 4)}
    assert len(runs) > 1
    greedy = backend.generate(GenerationRequest(prompt=prompt, max_tokens=24)).token_ids
    assert greedy == backend.generate(GenerationRequest(prompt=prompt, max_tokens=24)).token_ids


def test_closing_the_stream_cancels(loaded: dict[str, Backend]) -> None:
    backend = loaded["onnx-int4"]
    handle = backend.stream(GenerationRequest(prompt=chat(backend, "Tell me a long story."),
                                              max_tokens=200))
    got = 0
    for chunk in handle:
        got += len(chunk.token_ids)
        if got >= 3:
            break
    handle.close()
    assert handle.result is not None and handle.result.finish_reason == "cancelled"
    assert 3 <= handle.result.completion_tokens < 200


def test_teacher_forced_logits_match_incremental_decoding(loaded: dict[str, Backend]) -> None:
    backend = loaded["onnx-fp32"]
    prompt = chat(backend, "Name a fruit.")
    result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=8))
    tokens = backend.tokenize(prompt) + result.token_ids
    logits = backend.logits(tokens)
    assert logits.shape == (len(tokens), backend.vocab_size) and logits.dtype == np.float32
    n = backend.count_tokens(prompt)
    # the KV cache path chose each generated token as the argmax of the full recompute
    assert list(logits[n - 1: n - 1 + len(result.token_ids)].argmax(-1)) == result.token_ids
    assert backend.logits([]).shape == (0, backend.vocab_size)


def test_logits_do_not_depend_on_chunking(onnx_path: dict[str, object]) -> None:
    from quantfleet.agent.backends import LoadOptions

    small = load_backend("onnxruntime", onnx_path["onnx-int4"],  # type: ignore[arg-type]
                         LoadOptions(n_batch=7, warmup=False))
    big = load_backend("onnxruntime", onnx_path["onnx-int4"],  # type: ignore[arg-type]
                       LoadOptions(n_batch=512, warmup=False))
    tokens = small.tokenize("One two three four five six seven eight nine ten eleven twelve.")
    a, b = small.logits(tokens), big.logits(tokens)
    assert np.abs(a - b).max() < 1e-3
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_prefix_reuse_gives_the_same_answer(loaded: dict[str, Backend],
                                            fresh_onnx: dict[str, Backend]) -> None:
    backend = loaded["onnx-fp32"]  # reuses the KV cache of a shared prefix
    fresh = fresh_onnx["onnx-fp32"]  # always starts from an empty cache
    turn1 = [{"role": "user", "content": "What is the capital of Italy?"}]
    render = ChatTemplate(backend.chat_template, **backend.special_tokens).render
    a = backend.generate(GenerationRequest(prompt=render(turn1), max_tokens=16))
    assert a.token_ids == fresh.generate(GenerationRequest(prompt=render(turn1),
                                                           max_tokens=16)).token_ids
    # the next turn starts with the whole first exchange: only the new part is evaluated
    turn2 = [*turn1, {"role": "assistant", "content": a.text},
             {"role": "user", "content": "And of Spain?"}]
    prompt2 = backend.tokenize(render(turn2))
    cached = backend._cache_tokens  # type: ignore[attr-defined]
    assert prompt2[:20] == cached[:20]
    b = backend.generate(GenerationRequest(prompt=prompt2, max_tokens=16))
    assert b.token_ids == fresh.generate(GenerationRequest(prompt=prompt2,
                                                           max_tokens=16)).token_ids


def test_json_schema_is_validated_and_retried(loaded: dict[str, Backend]) -> None:
    backend = loaded["onnx-fp32"]
    prompt = chat(backend, "Extract the person as JSON: Maria Lopez is 42 years old.")
    result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=64, json_schema=PERSON))
    assert result.constraint == "validate_retry"
    # the token filter keeps it JSON; the reference gets the content right too
    value = json.loads(result.text)
    jsonschema.validate(value, PERSON)
    assert value == {"name": "Maria Lopez", "age": 42}
    assert result.finish_reason == "stop"
    streamed = backend.stream(GenerationRequest(prompt=prompt, max_tokens=64,
                                                json_schema=PERSON))
    chunks = list(streamed)
    assert streamed.result is not None and streamed.result.constraint == "validate_retry"
    assert "".join(c.text for c in chunks) == streamed.result.text == result.text


@pytest.mark.parametrize("label", ["onnx-int8", "onnx-int4"])
def test_quantized_json_is_syntactically_json_or_reported(loaded: dict[str, Backend],
                                                          label: str) -> None:
    backend = loaded[label]
    prompt = chat(backend, "Give me a JSON object describing a cat.")
    result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=96,
                                                json_schema={"type": "object"}))
    assert result.constraint == "validate_retry"
    if result.finish_reason == "stop":  # ended by itself: a complete JSON object
        assert isinstance(json.loads(result.text), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        assert result.text.lstrip().startswith("{")
    assert JSON_ATTEMPTS >= 2


def test_json_problem_finds_what_is_wrong() -> None:
    assert json_problem('{"name": "A", "age": 3}', PERSON) == (None, '{"name": "A", "age": 3}')
    assert json_problem('```json\n{"name": "A", "age": 3}\n```', PERSON)[0] is None
    assert "not JSON" in (json_problem("{name: A}", PERSON)[0] or "")
    assert "schema" in (json_problem('{"name": "A"}', PERSON)[0] or "")


def test_bad_requests_are_refused(loaded: dict[str, Backend]) -> None:
    backend = loaded["onnx-int4"]
    with pytest.raises(BackendError, match="empty prompt"):
        backend.generate(GenerationRequest(prompt=""))
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.generate(GenerationRequest(prompt=[1, 99999]))
    with pytest.raises(BackendError, match="does not fit the context"):
        backend.generate(GenerationRequest(prompt=[42] * (backend.n_ctx + 1)))
    with pytest.raises(BackendError, match="cannot apply a grammar"):
        backend.generate(GenerationRequest(prompt="hi", grammar='root ::= "a"'))
    with pytest.raises(BackendError, match="exceed the context"):
        backend.logits([42] * (backend.n_ctx + 1))
