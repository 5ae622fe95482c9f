"""Where a report was measured, and one report against another from another machine.

Real reports: the session's evaluation of F16, Q8_0 and Q2_K (conftest.py), and a
two-item run of an ONNX variant. The second machine is that same report edited on
purpose, so the test knows exactly which differences ``eval compare`` must find.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from quantfleet.agent.hardware import fingerprint, hidden_features
from quantfleet.agent.quality.golden import GoldenSet
from quantfleet.agent.quality.results import (
    REPORT_SCHEMA_VERSION,
    EvalReport,
    ReportFileError,
    load_report,
    parse_report,
)
from quantfleet.agent.quality.runner import EvalOptions, evaluate
from quantfleet.agent.wire import HardwareFingerprint, cpu_class
from quantfleet.fleet.cli import cli
from quantfleet.fleet.evaluation import report as render
from quantfleet.fleet.evaluation.machines import (
    MachineComparison,
    ReportMismatch,
    compare_reports,
)
from quantfleet.models.catalog import Catalog

ROOT = Path(__file__).resolve().parents[2]
OLD_REPORT = ROOT / "docs" / "reports" / "starter-ladder.json"
AVX2 = ["avx", "avx2", "bmi2", "f16c", "fma", "sse4_2"]
# The "other machine" of the comparisons below: an AVX2-only EPYC, unless this machine is
# one; then an AVX-512 VNNI one, so that the two classes differ on every CPU.
if fingerprint().cpu_class == cpu_class("x86_64", AVX2):
    OTHER_FEATURES = [*AVX2, "avx512bw", "avx512f", "avx512vl", "avx512_vnni"]
    OTHER_MODEL = "AMD EPYC 9B14"
else:
    OTHER_FEATURES, OTHER_MODEL = AVX2, "AMD EPYC 7B13"
OTHER_CLASS = cpu_class("x86_64", OTHER_FEATURES)


@pytest.fixture(scope="module")
def onnx_report(catalog: Catalog, starter: GoldenSet) -> EvalReport:
    """F16 against the ONNX int4 rung on two items: an onnxruntime session, for real."""
    return evaluate(catalog, starter, ["F16", "onnx-int4"], "F16",
                    options=EvalOptions(noise_floor=False), sample=2)


# -- the report says where it ran -------------------------------------------------------

def test_a_report_records_the_fingerprint_and_the_kernel_path(evaluation: EvalReport) -> None:
    hw = fingerprint()
    assert evaluation.schema_version == REPORT_SCHEMA_VERSION == 2
    assert evaluation.hardware == hw
    k = evaluation.kernels
    assert k is not None
    assert k.llama_cpp_system_info == hw.llama_cpp_system_info != ""
    assert k.llama_cpp_python == hw.llama_cpp_python and k.onnxruntime == hw.onnxruntime
    assert k.onnxruntime_providers == []  # no ONNX variant ran
    assert k.hidden_features == hidden_features(hw)
    assert {v.backend for v in evaluation.variants} == {"llama.cpp"}
    # JSON round trip through the file parser
    again = parse_report(json.dumps({"report": evaluation.model_dump(mode="json")}), "r.json")
    assert again == evaluation


def test_json_markdown_html_and_terminal_name_the_machine(evaluation: EvalReport) -> None:
    hw = fingerprint()
    md = render.markdown(evaluation, {})
    section = md.split("## Where it was measured", 1)[1].split("## Variants", 1)[0]
    assert f"| arch · class | {hw.arch} · {hw.cpu_class} |" in section
    assert hw.cpu_model in section and hw.onnxruntime in section
    # the system info's "|" are escaped, so the table keeps two columns
    assert hw.llama_cpp_system_info.replace("|", "\\|") in section
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows and all(len(re.split(r"(?<!\\)\|", line)) == 4 for line in rows), rows
    assert "| llama.cpp |" in md.split("## Variants", 1)[1]  # the runtime column
    page = render.html(evaluation, {})
    assert "Where it was measured" in page and hw.cpu_class in page
    assert hw.llama_cpp_system_info in page
    console = Console(record=True, width=300)
    render.print_report(evaluation, {}, console)
    assert f"measured on: {hw.cpu_class} ({hw.cpu_model}" in console.export_text()


def test_onnx_variants_record_the_execution_provider_that_ran_them(
        onnx_report: EvalReport) -> None:
    by = {v.precision: v for v in onnx_report.variants}
    assert by["F16"].backend == "llama.cpp" and by["F16"].providers == []
    assert by["onnx-int4"].backend == "onnxruntime"
    assert by["onnx-int4"].providers == ["CPUExecutionProvider"]
    assert onnx_report.kernels is not None
    assert onnx_report.kernels.onnxruntime_providers == ["CPUExecutionProvider"]
    assert "onnxruntime (CPUExecutionProvider)" in render.markdown(onnx_report, {})


def test_a_report_from_before_fingerprints_still_loads_and_renders() -> None:
    old = load_report(OLD_REPORT)
    assert old.schema_version == 1 and old.hardware is None and old.kernels is None
    assert {v.backend for v in old.variants} == {""}
    assert render.NOT_RECORDED in render.markdown(old, {})
    assert render.NOT_RECORDED in render.html(old, {})
    mc = compare_reports(old, old, "then", "again")
    assert mc.same_class is None and all(v.worse == v.better == 0 for v in mc.variants)
    assert render.NOT_RECORDED in render.machines_markdown(mc)


# -- one report against another -----------------------------------------------------------

def _doc(report: EvalReport) -> dict[str, Any]:
    return {"report": report.model_dump(mode="json"), "verdicts": {}, "policy": {}}


def _other_machine(evaluation: EvalReport) -> tuple[dict[str, Any], str, str]:
    """The report as if measured on another class of machine where Q2_K answers one item the other
    way and words another differently, and Q8_0's structured KLD is 0.5 higher."""
    doc = _doc(evaluation)
    r = doc["report"]
    r["hardware"] = HardwareFingerprint(
        arch="x86_64", cpu_model=OTHER_MODEL, cpu_vendor="AuthenticAMD",
        features=OTHER_FEATURES, cpu_class=OTHER_CLASS, logical_cores=2, memory_bytes=8 << 30,
        llama_cpp_system_info=fingerprint().llama_cpp_system_info,
        onnxruntime="1.31.1").model_dump(mode="json")
    q2 = next(v for v in r["variants"] if v["precision"] == "Q2_K")
    flipped, reworded = q2["items"][0], q2["items"][1]
    flipped["passed"] = not flipped["passed"]
    flipped["properties"] = {p: flipped["passed"] for p in flipped["properties"]}
    reworded["text"] += " (worded otherwise)"
    q8 = next(c for c in r["comparisons"] if c["candidate"].endswith("Q8_0"))
    q8["logits"]["structured"]["kl_mean"] += 0.5
    return doc, flipped["item_id"], reworded["item_id"]


def test_compare_finds_exactly_the_differences_made(evaluation: EvalReport,
                                                    tmp_path: Path) -> None:
    other, flipped, reworded = _other_machine(evaluation)
    b = parse_report(json.dumps(other), "b.json")
    a_q2 = next(v for v in evaluation.variants if v.precision == "Q2_K")
    was = next(i for i in a_q2.items if i.item_id == flipped).passed

    mc = compare_reports(evaluation, b, "amx", "avx2")
    assert mc.same_class is False
    assert mc.a.hardware == fingerprint() and mc.b.hardware is not None
    assert mc.b.hardware.cpu_class == OTHER_CLASS
    by = {v.precision: v for v in mc.variants}
    assert [v.precision for v in mc.variants] == ["F16", "Q8_0", "Q2_K"]
    assert [(f.item_id, f.direction) for f in by["Q2_K"].flips] == [
        (flipped, "pass->fail" if was else "fail->pass")]
    assert (by["Q2_K"].worse, by["Q2_K"].better) == ((1, 0) if was else (0, 1))
    assert by["Q2_K"].answers_differ == [reworded]
    for name in ("F16", "Q8_0"):
        assert by[name].flips == [] and by[name].answers_differ == []
    assert by["F16"].kld == []  # the baseline has no KLD against itself
    q8 = {k.split: k for k in by["Q8_0"].kld}
    assert q8["structured"].mean_diff == pytest.approx(0.5)
    assert q8["prose"].mean_diff == q8["all"].mean_diff == q8["structured"].p99_diff == 0
    assert all(k.mean_diff == 0 for k in by["Q2_K"].kld)

    # The command: both files by name, human and JSON.
    (tmp_path / "amx.json").write_text(json.dumps(_doc(evaluation)))
    (tmp_path / "avx2.json").write_text(json.dumps(other))
    args = ["eval", "compare", str(tmp_path / "amx.json"), str(tmp_path / "avx2.json")]
    out = CliRunner().invoke(cli, [*args, "--json", "--markdown", str(tmp_path / "c.md")])
    assert out.exit_code == 0, out.output
    assert MachineComparison.model_validate_json(out.stdout) == mc
    md = (tmp_path / "c.md").read_text()
    assert f"different hardware classes: {fingerprint().cpu_class} against {OTHER_CLASS}" in md
    assert flipped in md and "+0.5000" in md
    human = CliRunner().invoke(cli, args)
    assert human.exit_code == 0, human.output
    assert "amx: " in human.output and f"avx2: {OTHER_CLASS} ({OTHER_MODEL}" in human.output
    assert flipped in human.output


def _edit(evaluation: EvalReport, change: Any) -> EvalReport:
    doc = copy.deepcopy(evaluation.model_dump(mode="json"))
    change(doc)
    return EvalReport.model_validate(doc)


def test_compare_refuses_reports_that_do_not_measure_the_same_thing(
        evaluation: EvalReport, tmp_path: Path) -> None:
    def other_golden(d: dict[str, Any]) -> None:
        d["golden"]["sha256"] = "f" * 64
        d["golden"]["path"] = "my-golden.jsonl"

    def fewer_variants(d: dict[str, Any]) -> None:
        d["variants"] = [v for v in d["variants"] if v["precision"] != "Q2_K"]
        d["comparisons"] = [c for c in d["comparisons"] if not c["candidate"].endswith("Q2_K")]

    def fewer_items(d: dict[str, Any]) -> None:
        for v in d["variants"]:
            v["items"] = v["items"][1:]
        d["golden"]["sample"] = 9

    def other_baseline(d: dict[str, Any]) -> None:
        d["baseline"] = "smollm2-135m-Q8_0"

    def other_file(d: dict[str, Any]) -> None:
        d["variants"][1]["sha256"] = "0" * 64

    first = evaluation.variants[0].items[0].item_id
    q8 = evaluation.variants[1].name
    for change, needles in [
        (other_golden, ["different golden sets", evaluation.golden.sha256[:12], "ffffffffffff",
                        "my-golden.jsonl"]),
        (fewer_variants, ["different variants", "only in A: smollm2-135m-Q2_K"]),
        (fewer_items, ["different items", "only in A: " + first, "sample 9"]),
        (other_baseline, ["different baselines", "smollm2-135m-F16 against smollm2-135m-Q8_0"]),
        (other_file, [f"{q8} is a different file", "000000000000"]),
    ]:
        with pytest.raises(ReportMismatch) as err:
            compare_reports(evaluation, _edit(evaluation, change))
        for needle in needles:
            assert needle in str(err.value), (change.__name__, str(err.value))
    # through the command: exit 1 with the reason, no table
    (tmp_path / "a.json").write_text(json.dumps(_doc(evaluation)))
    (tmp_path / "b.json").write_text(json.dumps(_doc(_edit(evaluation, other_golden))))
    out = CliRunner().invoke(cli, ["eval", "compare", str(tmp_path / "a.json"),
                                   str(tmp_path / "b.json")])
    assert out.exit_code == 1 and "Error: a and b are of different golden sets" in out.output


def test_eval_options_are_refused_before_a_subcommand(tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, ["eval", "--sample", "3", "compare", "a.json", "b.json"])
    assert out.exit_code == 2 and "--sample: an option of `quantfleet eval` itself" in out.output
    out = CliRunner().invoke(cli, ["eval", "compare", str(tmp_path / "missing.json"),
                                   str(OLD_REPORT)])
    assert out.exit_code == 1 and "missing.json: No such file or directory" in out.output


# -- report files from outside ------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("", "r.json: not JSON"),
    ("[1, 2]", "r.json: not an evaluation report"),
    ('{"report": {"golden": {}}}', "r.json: not an evaluation report"),
    ('{"report": {"schema_version": 9, "golden": {}, "variants": []}}',
     "r.json: report.schema_version 9 is newer than this quantfleet reads (up to 2)"),
])
def test_bad_report_files_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ReportFileError) as err:
        parse_report(text, "r.json")
    assert str(err.value).startswith(message), str(err.value)


def test_a_bad_field_is_named_with_its_path(evaluation: EvalReport) -> None:
    doc = _doc(evaluation)
    doc["report"]["variants"][1]["items"][3]["passed"] = "maybe"
    with pytest.raises(ReportFileError) as err:
        parse_report(json.dumps(doc), "r.json")
    assert str(err.value) == ("r.json: report.variants.1.items.3.passed: Input should be a "
                              "valid boolean, unable to interpret input")


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_bytes_are_a_report_or_a_clear_error(data: bytes | str) -> None:
    try:
        parse_report(data, "r.json")
    except ReportFileError as exc:
        assert str(exc).startswith("r.json: ")


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True),
                  st.text(max_size=8), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(data=st.data())
def test_a_damaged_report_parses_or_names_the_file(onnx_report: EvalReport,
                                                   data: st.DataObject) -> None:
    doc = _doc(onnx_report)
    paths = _paths(doc["report"])
    path = data.draw(st.sampled_from(paths))
    node = doc["report"]
    for key in path[:-1]:
        node = node[key]
    if data.draw(st.booleans()):
        node[path[-1]] = data.draw(_JUNK)
    elif isinstance(node, dict):
        del node[path[-1]]
    try:
        parsed = parse_report(json.dumps(doc), "r.json")
    except ReportFileError as exc:
        assert str(exc).startswith("r.json: "), str(exc)
    else:
        assert isinstance(parsed, EvalReport)
