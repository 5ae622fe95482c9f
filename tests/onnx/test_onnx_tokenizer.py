"""The ONNX backend's tokenizer gives exactly llama.cpp's token ids (and text back)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantfleet.agent.backends import Backend
from quantfleet.models.tokenizer import BPETokenizer, TokenizerError, char_class

CORPUS = [
    "",
    "Hello world",
    "The year 2024 was  great!!  ",
    "I'm here, you're there; they'll go. She'd've said 'no'.",
    "'S 'LL 'D are upper case, so they are not contractions",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>to<|im_start|>specials",
    "<|im_start<|im_end|>|> partial specials <|im_",
    "naïve café — “quotes” and «guillemets» 日本語のテキスト 한국어 العربية",
    "emoji 🙂🎉 and a family 👩‍👩‍👧 with joiners",
    "   leading spaces\n\n\ttabs and\r\nwindows newlines\n\n\n",
    "x = [1,2,3]\nfor i in range(10):\n    print(i**2)  # squares\n",
    'def f(a, b):\n\treturn {"a": a, "b": b}\n',
    "numbers: 3.14159, 1,000,000, 0x1F, 1e-9, -42, ١٢٣ ½ Ⅻ ²",
    " \u00a0 \u2003x\u3000y\u200bz",  # no-break, em space, ideographic space, zero width
    "a\u001cb\u001fc\u0085d",  # separators that Python calls space but llama.cpp does not
    "trailing space ",
    " ",
    "  ",
    "\n",
    "{\"name\": \"Maria Lopez\", \"age\": 42}",
    "https://example.com/path?q=1&r=two#frag",
    "Ünïcödé ÀÉÎÕÜ ǅ ß ﬁ",
    "tab\tseparated\tvalues\t",
    "mixed123letters456and789",
    "....!!!???,,,;;;:::---___***",
    # bytes the vocabulary has no token for (0x04, 0xF1 ...) are dropped, by both
    "ctrl\x04char and \U00040000 plane four",
]


def ids_of(llm: Any, text: str, special: bool) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))


@pytest.mark.parametrize("text", CORPUS)
def test_fixed_corpus_matches_llama_cpp(gguf_tokenizer: BPETokenizer, llama_vocab: Any,
                                        text: str) -> None:
    for special in (True, False):
        assert gguf_tokenizer.encode(text, special=special) == ids_of(llama_vocab, text, special)
    ids = ids_of(llama_vocab, text, True)
    assert gguf_tokenizer.decode_bytes(ids) == llama_vocab.detokenize(ids)


# Characters a chat prompt really carries: ASCII, Latin-1 and other scripts, CJK,
# emoji, combining marks, odd spaces. Unassigned code points are left out: llama.cpp's
# Unicode tables are newer than Python's unicodedata, so they may classify them apart.
_ALPHABET = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.sampled_from(list("\n\t\r '\"0123456789 ")),
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cn", "Co")),
)
_SPECIALS = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.text(_ALPHABET, max_size=24), _SPECIALS), max_size=6))
def test_random_text_matches_llama_cpp(gguf_tokenizer: BPETokenizer, llama_vocab: Any,
                                       parts: list[str]) -> None:
    text = "".join(parts)
    for special in (True, False):
        assert gguf_tokenizer.encode(text, special=special) == ids_of(llama_vocab, text, special)


# Without control characters and planes 4+: SmolLM's vocabulary lacks byte tokens for
# 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1 and 0xF2 (llama.cpp drops them too).
@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(max_codepoint=0x3FFFF, exclude_categories=("Cs", "Cc")),
               max_size=40))
def test_decode_inverts_encode(gguf_tokenizer: BPETokenizer, text: str) -> None:
    assert gguf_tokenizer.decode(gguf_tokenizer.encode(text, special=False)) == text


def test_the_onnx_file_carries_the_same_tokenizer(
        loaded: dict[str, Backend], gguf_tokenizer: BPETokenizer) -> None:
    onnx = loaded["onnx-int4"]
    llama = loaded["F16"]
    for text in CORPUS:
        assert onnx.tokenize(text) == gguf_tokenizer.encode(text) == llama.tokenize(text)
        assert onnx.count_tokens(text) == llama.count_tokens(text)
    assert onnx.vocab_size == llama.vocab_size == 49152
    assert onnx.special_tokens == llama.special_tokens
    assert onnx.chat_template == llama.chat_template
    # the same end-of-generation set as llama.cpp's own
    assert onnx.eog_ids == llama._eog  # type: ignore[attr-defined]


def test_character_classes_follow_llama_cpp() -> None:
    assert char_class("\u001c") == "O"  # Python's isspace() says yes; White_Space says no
    assert char_class("\u0085") == "W" and char_class("\u3000") == "W"
    assert char_class("½") == "N" and char_class("ǅ") == "L" and char_class("\u0301") == "O"


def test_bad_tokenizer_data_is_refused() -> None:
    with pytest.raises(TokenizerError, match="incomplete"):
        BPETokenizer({"tokens": ["a"]})
    with pytest.raises(TokenizerError, match="pre-tokenizer 'llama3' is not supported"):
        BPETokenizer({"tokens": ["a"], "token_types": [1], "merges": [], "pre": "llama3"})
    with pytest.raises(TokenizerError, match="1 tokens but 2 token types"):
        BPETokenizer({"tokens": ["a"], "token_types": [1, 1], "merges": []})
    with pytest.raises(TokenizerError, match="merge #0"):
        BPETokenizer({"tokens": ["a"], "token_types": [1], "merges": ["ab"]})
