"""The simulator's hardware classes and per-class regressions: the option parsers
(property-tested), the fingerprints, and what the devices send on a real broker."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from quantfleet.agent.mqtt import MqttConfig, make_client
from quantfleet.agent.wire import CPU_CLASSES, StatusPayload, TelemetryBatch, cpu_class
from quantfleet.fleet.cli import cli
from quantfleet.fleet.simulate import (
    MACHINES,
    NO_HARDWARE,
    ClassRegression,
    Faults,
    FleetSimulator,
    SimulateOptionError,
    fingerprint,
    parse_class_mix,
    parse_class_regression,
    spread_classes,
)
from tests.support import Mosquitto

CLASS_NAMES = (*CPU_CLASSES, NO_HARDWARE)


def test_every_class_has_a_machine_whose_fingerprint_is_of_that_class() -> None:
    assert set(MACHINES) == set(CPU_CLASSES)
    for name in CPU_CLASSES:
        fp = fingerprint(name)
        assert cpu_class(fp.arch, fp.features) == name == fp.labels()["cpu.class"]
        assert fp.cpu_model and fp.llama_cpp_system_info.startswith("CPU : ")
    assert fingerprint("x86-avx2").labels()["cpu.vnni"] == "false"
    with pytest.raises(SimulateOptionError, match="no simulated machine of class 'z80'"):
        fingerprint("z80")


def test_the_mix_of_the_issue_parses_and_spreads_exactly() -> None:
    mix = parse_class_mix("x86-avx512-vnni=0.6, x86-avx2=0.3,arm-dotprod=0.1")
    assert mix == {"x86-avx512-vnni": 0.6, "x86-avx2": 0.3, "arm-dotprod": 0.1}
    spread = spread_classes(100, mix, seed=1)
    assert Counter(spread) == {"x86-avx512-vnni": 60, "x86-avx2": 30, "arm-dotprod": 10}
    assert spread == spread_classes(100, mix, seed=1) != spread_classes(100, mix, seed=2)
    # Not in a pattern: a label taken from the index (every other device) gets a mix.
    assert set(spread[::2]) == set(mix)


@given(st.dictionaries(st.sampled_from(CLASS_NAMES), st.integers(1, 20), min_size=1),
       st.integers(0, 300))
def test_a_valid_mix_round_trips_and_is_spread_to_whole_devices(
        weights: dict[str, int], n: int) -> None:
    total = sum(weights.values())
    text = ",".join(f"{k}={v / total!r}" for k, v in weights.items())
    mix = parse_class_mix(text)
    assert mix.keys() == weights.keys()
    assert sum(mix.values()) == pytest.approx(1)
    spread = spread_classes(n, mix)
    counts = Counter(spread)
    assert len(spread) == n and set(counts) <= set(mix)
    for k, share in mix.items():
        assert abs(counts[k] - share * n) < 1  # the share, rounded to a whole device


@given(st.text(max_size=60))
def test_any_text_either_parses_as_a_mix_or_says_why(text: str) -> None:
    try:
        mix = parse_class_mix(text)
    except SimulateOptionError as exc:
        assert str(exc).startswith("classes: ")
    else:
        assert set(mix) <= set(CLASS_NAMES) and sum(mix.values()) == pytest.approx(1)


@pytest.mark.parametrize(("text", "message"), [
    ("", "classes: empty"),
    ("x86-avx2", "'x86-avx2' is not CLASS=SHARE"),
    ("x86-avx3=1", "unknown hardware class 'x86-avx3' (known: x86-amx,"),
    ("x86-avx2=0.5,x86-avx2=0.5", "'x86-avx2' is listed twice"),
    ("x86-avx2=half,arm-neon=0.5", "share of x86-avx2: 'half' is not a number"),
    ("x86-avx2=0,arm-neon=1", "share of x86-avx2 must be in (0, 1]"),
    ("x86-avx2=nan", "'nan' is not a finite number"),
    ("x86-avx2=0.5,arm-neon=0.4", "the shares add up to 0.9; they must add up to 1"),
])
def test_a_bad_mix_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SimulateOptionError) as info:
        parse_class_mix(text)
    assert message in str(info.value)


@given(variant=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
       cls=st.sampled_from(CLASS_NAMES),
       json_failure=st.one_of(st.none(), st.floats(0.001, 1)),
       latency=st.one_of(st.none(), st.floats(0.01, 100)))
def test_a_valid_regression_round_trips(variant: str, cls: str, json_failure: float | None,
                                        latency: float | None) -> None:
    effects = [f"json+{json_failure!r}"] if json_failure is not None else []
    effects += [f"latency*{latency!r}"] if latency is not None else []
    if not effects:
        return
    r = parse_class_regression(f"{variant}@{cls}:{','.join(effects)}")
    assert r == ClassRegression(variant, cls, json_failure or 0.0,
                                latency if latency is not None else 1.0)


@given(st.text(max_size=60))
def test_any_text_either_parses_as_a_regression_or_says_why(text: str) -> None:
    try:
        r = parse_class_regression(text)
    except SimulateOptionError as exc:
        assert str(exc).startswith("class regression ")
    else:
        assert r.cpu_class in CLASS_NAMES and 0 <= r.json_failure <= 1 and r.latency > 0


@pytest.mark.parametrize(("text", "message"), [
    ("Q4_K_M:json+0.3", "is not VARIANT@CLASS:EFFECTS"),
    ("Q4_K_M@avx2:json+0.3", "unknown hardware class 'avx2'"),
    ("Q4_K_M@x86-avx2:json+30", "json+P needs P in (0, 1] (a probability: 0.3 is +30 "
     "points), got 30"),
    ("Q4_K_M@x86-avx2:latency*0", "latency*K needs K in (0, 100], got 0"),
    ("Q4_K_M@x86-avx2:json+0.1,json+0.2", "json is given twice"),
    ("Q4_K_M@x86-avx2:slower", "effect 'slower' is neither json+P nor latency*K"),
    ("Q4_K_M@x86-avx2:latency*fast", "latency: 'fast' is not a number"),
])
def test_a_bad_regression_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SimulateOptionError) as info:
        parse_class_regression(text)
    assert message in str(info.value)


def test_a_regression_matches_a_variant_by_name_or_precision_label() -> None:
    r = parse_class_regression("onnx-int8@x86-avx2:json+0.5")
    assert r.matches("smollm2-135m-onnx-int8") and r.matches("onnx-int8")
    assert not r.matches("smollm2-135m-onnx-int4")


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", "x86-avx2=0.5"], "the shares add up to 0.5"),
    (["--class-regression", "Q2_K@x86-avx2:json+2"], "json+P needs P in (0, 1]"),
])
def test_the_simulate_command_rejects_bad_options_with_the_reason(
        tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["simulate", "--config", str(tmp_path / "none.toml"),
                                      *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_regression_on_a_class_no_device_has_is_refused() -> None:
    cfg = MqttConfig(broker="mqtt://127.0.0.1:1", topic_root="qf-unused")
    with pytest.raises(SimulateOptionError, match="no simulated device is of that class "
                       r"\(classes: arm-dotprod, x86-avx2\)"):
        FleetSimulator(cfg, 10, baseline="m-Q8_0",
                       classes={"x86-avx2": 0.5, "arm-dotprod": 0.5},
                       faults=Faults(class_regressions=[
                           parse_class_regression("Q4_K_M@arm-neon:json+0.2")]))
    with pytest.raises(SimulateOptionError, match=r"\(classes: unknown\)"):  # no mix: none
        FleetSimulator(cfg, 10, baseline="m-Q8_0", faults=Faults(class_regressions=[
            parse_class_regression("Q4_K_M@arm-neon:json+0.2")]))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    b = Mosquitto(tmp_path / "broker")
    b.start()
    try:
        yield f"mqtt://127.0.0.1:{b.port}"
    finally:
        b.stop()


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")
def test_births_carry_the_class_and_only_that_class_regresses(broker: str) -> None:
    cfg = MqttConfig(broker=broker, topic_root=f"qf{uuid.uuid4().hex[:8]}")
    births: dict[str, StatusPayload] = {}
    fails: Counter[tuple[str, bool]] = Counter()
    slow: dict[str, list[float]] = {}
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        with lock:
            if msg.topic.endswith("/status"):
                s = StatusPayload.model_validate_json(msg.payload)
                births[s.device_id] = s
            elif msg.topic.endswith("/telemetry"):
                batch = TelemetryBatch.model_validate_json(msg.payload)
                hw = births[batch.device_id].hardware
                cls = hw.cpu_class if hw else NO_HARDWARE
                for e in batch.events:
                    body = e.body
                    fails[(cls, body.validations[0].passed)] += 1
                    slow.setdefault(cls, []).append(body.latency_s)

    sub = make_client(cfg, f"qf-test-sub-{uuid.uuid4().hex[:6]}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(f"{cfg.topic_root}/devices/+/+", qos=1)
    host, port = broker.removeprefix("mqtt://").split(":")
    sub.connect(host, int(port))
    sub.loop_start()
    sim = None
    try:
        assert subscribed.wait(10)
        sim = FleetSimulator(cfg, 60, baseline="m-Q8_0", requests_per_s=40, seed=5,
                             classes=parse_class_mix("x86-avx2=0.5,arm-dotprod=0.3,"
                                                     "unknown=0.2"),
                             faults=Faults(class_regressions=[parse_class_regression(
                                 "Q8_0@x86-avx2:json+0.5,latency*3")])).start()
        time.sleep(2)
    finally:
        if sim is not None:
            sim.stop(clear_retained=False)
        time.sleep(0.5)
        sub.loop_stop()
        sub.disconnect()
    assert sim.classes() == {"x86-avx2": 30, "arm-dotprod": 18, NO_HARDWARE: 12}
    with lock:
        kinds = Counter(b.hardware.cpu_class if b.hardware else NO_HARDWARE
                        for b in births.values())
        assert kinds == sim.classes()
        for cls in ("arm-dotprod", NO_HARDWARE):  # the default profile: 2 % failures
            assert fails[(cls, False)] / (fails[(cls, False)] + fails[(cls, True)]) < 0.1
        rate = fails[("x86-avx2", False)] / (fails[("x86-avx2", False)]
                                             + fails[("x86-avx2", True)])
        assert 0.4 < rate < 0.65  # 2 % + 50 points, on about a thousand requests
        median = {k: sorted(v)[len(v) // 2] for k, v in slow.items()}
        assert median["x86-avx2"] > 2.5 * median["arm-dotprod"]
