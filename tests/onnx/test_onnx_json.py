"""The JSON prefix checker that keeps ONNX generations syntactically JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfleet.agent.backends.onnx_json import JsonPrefix

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.sampled_from([None, 2]), st.booleans())
def test_every_prefix_of_valid_json_is_accepted(value: object, indent: int | None,
                                                ascii_only: bool) -> None:
    data = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    state = JsonPrefix()
    for i in range(len(data)):
        assert state.accepts(data[i: i + 1]), data[: i + 1]
    assert state.complete


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from(list('{}[]",:0123456789-+.eEtrufalsn \\u"ab\n')), max_size=20))
def test_what_it_completes_is_json(text: str) -> None:
    state = JsonPrefix()
    if state.accepts(text.encode()) and state.complete:
        json.loads(text)  # raises if the checker let invalid JSON through
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return
    fresh = JsonPrefix()
    assert fresh.accepts(text.encode()) and fresh.complete, text


@pytest.mark.parametrize("text", ["{,}", "[1,]", '{"a" 1}', "01", '{"a":tru}', "[}", '"\x01"',
                                  '{"a":1}}', "nul1", '{"a",', "1 2"])
def test_invalid_json_is_refused(text: str) -> None:
    assert not JsonPrefix().accepts(text.encode())


def test_incomplete_values_are_not_complete() -> None:
    for text in ["-", "1.", "1e", "{", '{"a":', "[1", '"abc']:
        state = JsonPrefix()
        assert state.accepts(text.encode()) and not state.complete


def test_the_schema_root_type_is_enforced() -> None:
    assert not JsonPrefix.for_schema({"type": "object"}).accepts(b" [")
    assert JsonPrefix.for_schema({"type": "object"}).accepts(b' {"a"')
    assert not JsonPrefix.for_schema({"type": "array"}).accepts(b"{")
    assert JsonPrefix.for_schema({"anyOf": []}).accepts(b"3")


def test_copies_are_independent() -> None:
    state = JsonPrefix()
    assert state.accepts(b'{"a": [')
    trial = state.copy()
    assert trial.accepts(b"1]}") and trial.complete
    assert not state.complete and state.accepts(b'"x"]}') and state.complete
