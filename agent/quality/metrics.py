"""Teacher-forced logit metrics: how far a variant's next-token distribution moves.

The baseline's own answers (prompt + completion tokens, exactly as served)
are fed through both the baseline and the candidate; at every completion
position we compare the two full-vocabulary distributions:

- KL(P_baseline || P_candidate) in nats;
- whether both put the same token on top;
- Δp, the candidate's minus the baseline's probability of the token the
  baseline actually chose (a heavy negative tail means degradation, a
  symmetric spread means noise).

Tokens are split into *structured* (inside a JSON value: a JSON answer or a
tool call's JSON) and *prose*, because quantization hurts structure first and
an average over both hides it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from quantfleet.agent.backends.base import Backend, log_softmax

from .results import LogitSplit, LogitSummary

_DECODER = json.JSONDecoder()


def json_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the JSON objects and arrays embedded in ``text``.

    A span starts at a ``{`` or ``[`` from which a complete JSON value parses;
    scanning resumes after it, so nested values are inside their parent's span.
    """
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                _, end = _DECODER.raw_decode(text, i)
            except (json.JSONDecodeError, RecursionError):
                i += 1
                continue
            spans.append((i, end))
            i = end
        else:
            i += 1
    return spans


def token_offsets(backend: Backend, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """The character span of each token in the detokenized completion.

    Decoding prefixes (not single tokens) keeps multi-byte characters that are
    split across tokens in the right place.
    """
    spans: list[tuple[int, int]] = []
    prev = 0
    for i in range(len(token_ids)):
        end = max(prev, len(backend.detokenize(token_ids[: i + 1])))
        spans.append((prev, end))
        prev = end
    return spans


def structured_mask(backend: Backend, token_ids: Sequence[int], *, whole: bool = False
                    ) -> np.ndarray:
    """True for tokens inside a JSON value. ``whole``: the answer is JSON by contract."""
    if whole:
        return np.ones(len(token_ids), dtype=bool)
    text = backend.detokenize(token_ids)
    spans = json_spans(text)
    offsets = token_offsets(backend, token_ids)
    mask = np.zeros(len(token_ids), dtype=bool)
    for k, (start, end) in enumerate(offsets):
        # a token belongs to a span when any of its characters does
        mask[k] = any(start < s_end and end > s_start for s_start, s_end in spans)
    return mask


@dataclass
class TokenDivergence:
    """Per-token metrics of one item (completion positions only)."""

    kl: np.ndarray
    same_top: np.ndarray
    dp: np.ndarray
    structured: np.ndarray

    def __len__(self) -> int:
        return len(self.kl)


def divergence(base_logits: np.ndarray, cand_logits: np.ndarray, chosen: Sequence[int]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(KL, same-top, Δp) per row; row i's chosen token is ``chosen[i]``."""
    if base_logits.shape != cand_logits.shape:
        raise ValueError(f"logit shapes differ: {base_logits.shape} vs {cand_logits.shape}")
    lp_b = log_softmax(base_logits)
    lp_c = log_softmax(cand_logits)
    p_b = np.exp(lp_b)
    kl = np.sum(p_b * (lp_b - lp_c), axis=-1)
    kl = np.maximum(kl, 0.0)  # float64 rounding can give -1e-17 for identical rows
    same = np.argmax(base_logits, axis=-1) == np.argmax(cand_logits, axis=-1)
    rows = np.arange(len(chosen))
    idx = np.asarray(chosen, dtype=np.int64)
    dp = np.exp(lp_c[rows, idx]) - p_b[rows, idx]
    return kl, same, dp


def completion_logits(backend: Backend, prompt_ids: Sequence[int],
                      completion_ids: Sequence[int]) -> np.ndarray:
    """Logits at the positions that predict each completion token."""
    seq = list(prompt_ids) + list(completion_ids)
    out: np.ndarray = backend.logits(seq)
    start = len(prompt_ids) - 1
    return out[start: start + len(completion_ids)]


@dataclass
class DivergenceAccumulator:
    """Collects per-token metrics over items; summarises them per split."""

    items: list[TokenDivergence] = field(default_factory=list)

    def add(self, td: TokenDivergence) -> None:
        self.items.append(td)

    def _cat(self, attr: str, which: str) -> np.ndarray:
        parts = []
        for td in self.items:
            values = getattr(td, attr)
            if which == "structured":
                values = values[td.structured]
            elif which == "prose":
                values = values[~td.structured]
            parts.append(values)
        return np.concatenate(parts) if parts else np.zeros(0)

    def kl_values(self, which: str = "all") -> np.ndarray:
        return self._cat("kl", which)

    def summary(self, which: str = "all") -> LogitSummary | None:
        kl = self._cat("kl", which)
        if kl.size == 0:
            return None
        same = self._cat("same_top", which)
        dp = self._cat("dp", which)
        return LogitSummary(
            tokens=int(kl.size),
            kl_mean=float(kl.mean()),
            kl_p99=float(np.percentile(kl, 99)),
            kl_max=float(kl.max()),
            same_top=float(same.mean()),
            dp_mean=float(dp.mean()),
            dp_rms=float(np.sqrt(np.mean(dp * dp))),
            dp_p01=float(np.percentile(dp, 1)),
        )

    def split(self) -> LogitSplit:
        return LogitSplit(all=self.summary("all"), structured=self.summary("structured"),
                          prose=self.summary("prose"))
