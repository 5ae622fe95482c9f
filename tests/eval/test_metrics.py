"""Logit metrics: the divergence arithmetic, the structured/prose split, on real tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import rel_entr

from quantfleet.agent.backends import Backend
from quantfleet.agent.quality.metrics import (
    DivergenceAccumulator,
    TokenDivergence,
    divergence,
    json_spans,
    structured_mask,
    token_offsets,
)


def test_identical_logits_have_zero_divergence() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    kl, same, dp = divergence(logits, logits.copy(), [1, 2, 3, 4, 5, 6])
    assert np.all(kl == 0.0) and same.all() and np.all(dp == 0.0)


def test_divergence_matches_scipy_and_the_chosen_token() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 30)).astype(np.float32)
    cand = base + rng.normal(scale=0.5, size=(4, 30)).astype(np.float32)
    chosen = [3, 7, 0, 29]
    kl, same, dp = divergence(base, cand, chosen)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(base), softmax(cand)
    assert kl == pytest.approx(rel_entr(p, q).sum(axis=1), rel=1e-6)
    assert list(same) == list(base.argmax(1) == cand.argmax(1))
    assert dp == pytest.approx(q[np.arange(4), chosen] - p[np.arange(4), chosen], abs=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        divergence(base, cand[:3], chosen)


def test_json_spans_find_embedded_values() -> None:
    text = 'Sure: {"a": [1, 2], "b": {"c": "}"}} and [3, 4] but not {broken'
    spans = json_spans(text)
    assert [text[s:e] for s, e in spans] == ['{"a": [1, 2], "b": {"c": "}"}}', "[3, 4]"]
    assert json_spans("no json here") == []


@given(st.lists(st.one_of(st.text(alphabet="ab {}[]:,\"", max_size=6),
                          st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
                          .map(json.dumps)), max_size=6).map(" ".join))
def test_every_span_is_a_json_object_or_array(text: str) -> None:
    last_end = 0
    for start, end in json_spans(text):
        assert start >= last_end  # spans never overlap
        assert isinstance(json.loads(text[start:end]), dict | list)
        last_end = end


def test_accumulator_splits_structured_from_prose() -> None:
    acc = DivergenceAccumulator()
    acc.add(TokenDivergence(kl=np.array([0.0, 1.0, 3.0]), same_top=np.array([True, False, False]),
                            dp=np.array([0.0, -0.5, -0.25]),
                            structured=np.array([False, True, True])))
    split = acc.split()
    assert split.all is not None and split.all.tokens == 3
    assert split.structured is not None and split.structured.kl_mean == pytest.approx(2.0)
    assert split.structured.same_top == 0.0 and split.structured.kl_max == 3.0
    assert split.prose is not None and split.prose.tokens == 1 and split.prose.same_top == 1.0
    assert DivergenceAccumulator().split().all is None


def test_tool_call_tokens_are_structured_on_the_real_tokenizer(loaded: dict[str, Backend]) -> None:
    backend = loaded["Q8_0"]
    text = 'Calling it now: {"name": "get_weather", "arguments": {"city": "Paris"}} done.'
    ids = backend.tokenize(text, add_bos=False, special=False)
    assert backend.detokenize(ids) == text
    offsets = token_offsets(backend, ids)
    assert offsets[-1][1] == len(text)
    mask = structured_mask(backend, ids)
    structured_text = "".join(backend.detokenize([t]) for t, m in zip(ids, mask, strict=True)
                              if m)
    assert '"city": "Paris"' in structured_text.replace("  ", " ")
    assert "Calling" not in structured_text and "done" not in structured_text
    assert structured_mask(backend, ids, whole=True).all()
