"""A byte-level BPE tokenizer that gives the same ids as llama.cpp's, in pure Python.

The ONNX backend must feed the model exactly the ids llama.cpp would (the
agreement test compares next-token distributions on the same ids, and the
serving layer counts tokens the same way on both runtimes). So this module
follows llama.cpp's "gpt2" tokenizer step by step rather than Hugging Face's:

1. special tokens are cut out of the text first, longest first (control
   tokens only when ``special=True``; user-defined ones always);
2. each remaining fragment is pre-split with the model's pre-tokenizer: for
   the ``smollm``/``starcoder`` family, every digit on its own, then the GPT-2
   pattern ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``;
3. each word's UTF-8 bytes are mapped to the GPT-2 byte alphabet and merged
   by rank, always the lowest-ranked pair first, leftmost on ties.

Unicode classes come from ``unicodedata`` (letters ``L*``, numbers ``N*``)
and the White_Space property; llama.cpp ships its own tables, so code points
assigned in a newer Unicode version than Python's may classify differently.
Needs nothing beyond the standard library.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# llama.cpp token types (GGUF tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The White_Space property (llama.cpp's whitespace set); Python's str.isspace
# also counts U+001C..U+001F, which llama.cpp does not.
WHITESPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
     0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
# Pre-tokenizers that split every digit first, then apply the GPT-2 pattern.
DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell",
                             "exaone", "minerva-7b"})
GPT2_PRE = frozenset({"gpt2", "default", "mpt", "olmo", "jais"}) | DIGIT_SPLIT_PRE
# Token texts llama.cpp treats as end of generation besides the EOS id: end-of-turn
# markers, and the fill-in-the-middle pad / repository / file-separator tokens.
EOG_TEXTS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>",
                       "<|return|>", "<|call|>", "<|eom_id|>", "<EOT>", "<|end_of_text|>",
                       "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<|repo_name|>", "<fim-repo>",
                       "<REPO>", "<reponame>", "<|file_sep|>", "<fim-file-sep>", "<FILE_SEP>"})


class TokenizerError(ValueError):
    """The tokenizer data cannot be used; the message says what is wrong."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


@lru_cache(maxsize=65536)
def char_class(ch: str) -> str:
    """'W' whitespace, 'L' letter, 'N' number, 'O' anything else."""
    if ord(ch) in WHITESPACE:
        return "W"
    major = unicodedata.category(ch)[0]
    return major if major in ("L", "N") else "O"


def _gpt2_split(text: str) -> list[str]:
    """The GPT-2 pre-tokenizer pattern, scanned by hand as llama.cpp does."""
    out: list[str] = []
    n = len(text)
    cls = [char_class(ch) for ch in text]
    pos = 0
    while pos < n:
        ch = text[pos]
        # contractions: 's 't 'm 'd 're 've 'll (lower case only)
        if ch == "'" and pos + 1 < n:
            nxt = text[pos + 1]
            if nxt in "stmd":
                out.append(text[pos: pos + 2])
                pos += 2
                continue
            if pos + 2 < n and text[pos + 1: pos + 3] in ("re", "ve", "ll"):
                out.append(text[pos: pos + 3])
                pos += 3
                continue
        start = pos
        # a leading space joins the run after it; past the end nothing matches
        nxt_cls = cls[pos + 1] if pos + 1 < n else ""
        kind = nxt_cls if ch == " " else cls[pos]
        if kind in ("L", "N", "O"):
            # ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
            pos += ch == " "
            while pos < n and cls[pos] == kind:
                pos += 1
            out.append(text[start:pos])
            continue
        # whitespace: '\s+(?!\S)' keeps the last blank for the next word, then '\s+'
        end = pos
        while end < n and cls[end] == "W":
            end += 1
        count = end - pos
        if count > 1 and end < n:
            out.append(text[pos: end - 1])
            pos = end - 1
            continue
        if count > 0:
            out.append(text[pos:end])
            pos = end
            continue
    return out


def _digit_split(text: str) -> list[str]:
    """Every number character becomes its own piece (the ``\\p{N}`` pre-split)."""
    pieces: list[str] = []
    run_start = 0
    for i, ch in enumerate(text):
        if char_class(ch) == "N":
            if run_start < i:
                pieces.append(text[run_start:i])
            pieces.append(ch)
            run_start = i + 1
    if run_start < len(text):
        pieces.append(text[run_start:])
    return pieces


@dataclass(frozen=True)
class _Special:
    text: str
    id: int
    control: bool


class BPETokenizer:
    """llama.cpp-compatible byte-level BPE over a GGUF vocabulary."""

    def __init__(self, data: dict[str, Any]) -> None:
        try:
            self.tokens: list[str] = [str(t) for t in data["tokens"]]
            self.types: list[int] = [int(t) for t in data["token_types"]]
            merges: Sequence[str] = data["merges"]
            self.pre = str(data.get("pre", "default"))
            self.bos_id = int(data.get("bos_token_id", -1))
            self.eos_id = int(data.get("eos_token_id", -1))
            self.add_bos = bool(data.get("add_bos_token", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenizerError(f"tokenizer data is incomplete ({exc})") from None
        if data.get("model", "gpt2") != "gpt2":
            raise TokenizerError(f"tokenizer model {data.get('model')!r} is not 'gpt2'")
        if self.pre not in GPT2_PRE:
            raise TokenizerError(f"pre-tokenizer {self.pre!r} is not supported "
                                 f"(supported: {', '.join(sorted(GPT2_PRE))})")
        if len(self.types) != len(self.tokens) or not self.tokens:
            raise TokenizerError(f"{len(self.tokens)} tokens but {len(self.types)} token types")
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            left, sep, right = str(merge).partition(" ")
            if not sep:
                raise TokenizerError(f"merge #{rank} {merge!r} is not 'left right'")
            self.ranks.setdefault((left, right), rank)
        specials = [
            _Special(t, i, self.types[i] != USER_DEFINED)
            for i, t in enumerate(self.tokens)
            if self.types[i] in (CONTROL, USER_DEFINED, UNKNOWN) and t
        ]
        # longest first, so "<|im_start|>" wins over any shorter special inside it
        self.specials = sorted(specials, key=lambda s: -len(s.text))
        self.eog_ids = frozenset(
            {self.eos_id} - {-1}
            | {i for i, t in enumerate(self.tokens) if t in EOG_TEXTS and self.types[i] == CONTROL}
        )
        self._bpe = lru_cache(maxsize=32768)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_text(self, token: int) -> str:
        return self.tokens[token]

    # -- encode -----------------------------------------------------------
    def _partition(self, text: str, special: bool) -> list[str | int]:
        parts: list[str | int] = [text]
        for sp in self.specials:
            if sp.control and not special:
                continue
            nxt: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or sp.text not in part:
                    nxt.append(part)
                    continue
                pieces = part.split(sp.text)
                for k, piece in enumerate(pieces):
                    if k:
                        nxt.append(sp.id)
                    if piece:
                        nxt.append(piece)
            parts = nxt
        return parts

    def _words(self, text: str) -> list[str]:
        chunks = _digit_split(text) if self.pre in DIGIT_SPLIT_PRE else [text]
        words: list[str] = []
        for chunk in chunks:
            words.extend(_gpt2_split(chunk))
        return words

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        parts = [BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best: best + 2] = [parts[best] + parts[best + 1]]
        ids: list[int] = []
        for p in parts:
            tid = self.vocab.get(p)
            if tid is not None:
                ids.append(tid)
            else:  # no token for the merged piece: one token per character, as llama.cpp
                ids.extend(self.vocab[c] for c in p if c in self.vocab)
        return tuple(ids)

    def encode(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        ids: list[int] = []
        if add_bos and self.add_bos and self.bos_id >= 0:
            ids.append(self.bos_id)
        for part in self._partition(text, special):
            if isinstance(part, int):
                ids.append(part)
                continue
            for word in self._words(part):
                ids.extend(self._bpe(word))
        return ids

    # -- decode -----------------------------------------------------------
    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """What llama.cpp's token_to_piece gives for one token."""
        if not 0 <= token < len(self.tokens):
            return b""
        kind = self.types[token]
        text = self.tokens[token]
        if kind == CONTROL:
            return text.encode("utf-8") if special else b""
        if kind in (USER_DEFINED, UNKNOWN):
            return text.encode("utf-8")
        out = bytearray()
        for ch in text:
            b = CHAR_TO_BYTE.get(ch)
            if b is None:
                out += ch.encode("utf-8")
            else:
                out.append(b)
        return bytes(out)

    def decode_bytes(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        return b"".join(self.token_bytes(int(t), special=special) for t in tokens)

    def decode(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return self.decode_bytes(tokens, special=special).decode("utf-8", errors="replace")
