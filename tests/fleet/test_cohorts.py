"""Cohort selectors: parsed strictly, evaluated against live labels."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantfleet.agent.wire import HardwareFingerprint, cpu_class, hardware_labels
from quantfleet.fleet.cohorts import Selector, SelectorError, parse_labels

DEVICES = [
    {"device_id": "a", "labels": {"hw": "rpi5", "region": "eu"}},
    {"device_id": "b", "labels": {"hw": "rpi5", "region": "us"}},
    {"device_id": "c", "labels": {"hw": "jetson", "region": "eu", "canary": "yes"}},
    {"device_id": "d", "labels": {}},
]


@pytest.mark.parametrize(("text", "expected"), [
    ("hw=rpi5,region=eu", ["a"]),
    ("hw=rpi5", ["a", "b"]),
    ("region=eu|us", ["a", "b", "c"]),
    ("hw!=rpi5", ["c", "d"]),
    ("canary", ["c"]),
    ("!canary,region", ["a", "b"]),
    ("*", ["a", "b", "c", "d"]),
    (" hw=rpi5 , region=eu ", ["a"]),
])
def test_selectors_pick_the_right_devices(text: str, expected: list[str]) -> None:
    assert Selector.parse(text).select(DEVICES) == expected


@pytest.mark.parametrize("bad", ["", "hw==rpi5", "hw=", "=rpi5", "hw=rpi 5", "a,,b", "hw=é"])
def test_bad_selectors_name_the_term(bad: str) -> None:
    with pytest.raises(SelectorError) as info:
        Selector.parse(bad)
    assert "\n" not in str(info.value)


def test_labels_parse() -> None:
    assert parse_labels(["hw=rpi5", "region=eu"]) == {"hw": "rpi5", "region": "eu"}
    with pytest.raises(SelectorError, match="must be key=value"):
        parse_labels(["hw"])
    with pytest.raises(SelectorError, match="must be key=value"):
        parse_labels(["hw=rpi5\n"])  # a trailing newline is not part of a value


def _hw(arch: str, features: list[str]) -> dict[str, object]:
    hw = HardwareFingerprint(arch=arch, cpu_model="x", features=features,
                             cpu_class=cpu_class(arch, features), logical_cores=1,
                             memory_bytes=1)
    return {"region": "eu", **hardware_labels(hw)}


HARDWARE = [
    {"device_id": "epyc", "labels": _hw("x86_64", ["avx2", "fma", "f16c"])},
    {"device_id": "alder", "labels": _hw("x86_64", ["avx2", "avx_vnni"])},
    {"device_id": "spr", "labels": _hw("x86_64", ["avx2", "avx512f", "avx512_vnni",
                                                  "amx_int8"])},
    {"device_id": "graviton", "labels": _hw("aarch64", ["asimd", "dotprod", "i8mm"])},
    {"device_id": "pi4", "labels": _hw("aarch64", ["asimd"])},
    {"device_id": "old", "labels": {"region": "eu"}},  # an agent from before fingerprints
]


@pytest.mark.parametrize(("text", "expected"), [
    ("cpu.class=x86-avx2", ["epyc"]),
    ("cpu.vnni=false", ["epyc"]),
    ("cpu.vnni=true", ["alder", "spr"]),
    ("cpu.arch=x86_64,cpu.avx512=false", ["epyc", "alder"]),
    ("cpu.class=x86-avx2|x86-avx2-vnni", ["epyc", "alder"]),
    ("cpu.arch=aarch64,cpu.dotprod=false", ["pi4"]),
    ("cpu.i8mm=true", ["graviton"]),
    ("!cpu.class", ["old"]),
    ("region=eu,cpu.class!=x86-amx", ["epyc", "alder", "graviton", "pi4", "old"]),
])
def test_selectors_on_the_labels_derived_from_hardware(text: str, expected: list[str]) -> None:
    assert Selector.parse(text).select(HARDWARE) == expected


token = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,10}", fullmatch=True)


@given(st.lists(st.tuples(token, st.sampled_from(["=", "!=", "", "!"]),
                          st.lists(token, min_size=1, max_size=3)), min_size=1, max_size=4))
def test_a_selector_round_trips_through_its_text(terms: list) -> None:  # type: ignore[type-arg]
    parts = []
    for key, op, values in terms:
        if op in ("=", "!="):
            parts.append(f"{key}{op}{'|'.join(values)}")
        elif op == "!":
            parts.append(f"!{key}")
        else:
            parts.append(key)
    sel = Selector.parse(",".join(parts))
    assert Selector.parse(str(sel)) == sel


@given(st.text(max_size=40))
def test_any_text_parses_or_gives_a_selector_error(text: str) -> None:
    try:
        sel = Selector.parse(text)
    except SelectorError as exc:
        assert "\n" not in str(exc)
        return
    assert Selector.parse(str(sel)) == sel  # what parsed has a stable text form
