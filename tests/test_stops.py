"""Stop strings are honoured however the text is split into tokens."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from quantfleet.agent.backends.stops import StopScanner

alphabet = st.sampled_from(list("ab,.\n<|>"))
texts = st.text(alphabet, max_size=60)
stops_st = st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3)


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@given(text=texts, stops=stops_st, cuts=st.lists(st.integers(0, 100), max_size=20))
def test_emitted_text_is_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    scanner = StopScanner(stops)
    out = []
    hit = False
    for piece in _split(text, cuts):
        emitted, hit = scanner.feed(piece)
        out.append(emitted)
        if hit:
            break
    if not hit:
        out.append(scanner.flush())
    positions = [text.find(s) for s in stops if s in text]
    expected = text[: min(positions)] if positions else text
    assert "".join(out) == expected == scanner.text
    assert hit == bool(positions)


def test_a_stop_split_across_tokens_is_held_back() -> None:
    scanner = StopScanner(["<|end|>"])
    assert scanner.feed("hello <|") == ("hello ", False)
    assert scanner.feed("en") == ("", False)
    assert scanner.feed("d|> tail") == ("", True)
    assert scanner.text == "hello "


def test_a_false_start_is_released() -> None:
    scanner = StopScanner(["<|end|>"])
    assert scanner.feed("a <|") == ("a ", False)
    assert scanner.feed("x") == ("<|x", False)
