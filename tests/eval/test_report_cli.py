"""The report a person reads, and `quantfleet eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from quantfleet.agent.quality.results import EvalReport
from quantfleet.agent.quality.verdict import VerdictPolicy, judge
from quantfleet.fleet.cli import cli
from quantfleet.fleet.evaluation import report as render
from quantfleet.models.catalog import Catalog

from .conftest import comparison


def _verdicts(evaluation: EvalReport):  # type: ignore[no-untyped-def]
    return {c.candidate: judge(c, VerdictPolicy()) for c in evaluation.comparisons}


def test_terminal_table_shows_rates_flips_kld_and_noise(evaluation: EvalReport) -> None:
    console = Console(record=True, width=250)
    render.print_report(evaluation, _verdicts(evaluation), console)
    text = console.export_text()
    for needle in ("F16 (baseline)", "Q8_0", "Q2_K", "McNemar p", "KLD p99 struct",
                   "noise floor", "category tool_call", "property json_valid", "tokens/s"):
        assert needle in text, needle
    q2 = comparison(evaluation, "Q2_K")
    assert f"{q2.mcnemar_p:.3g}" in text


def test_html_report_is_self_contained_with_plots(evaluation: EvalReport) -> None:
    page = render.html(evaluation, _verdicts(evaluation))
    assert page.startswith("<!doctype html>")
    assert page.count("<svg") == 3  # quality vs size/speed, KLD distribution, flips
    assert "http" not in page.split("<svg")[0].lower().replace("http-equiv", "")
    q2 = comparison(evaluation, "Q2_K")
    for flip in q2.flips:
        assert flip.item_id in page
    assert "noise floor" in page and "Verdicts" in page


def test_markdown_summary(evaluation: EvalReport) -> None:
    md = render.markdown(evaluation, _verdicts(evaluation))
    assert md.startswith("# Evaluation")
    assert md.count("| smollm2-135m-") >= 3
    assert "## Flips" in md and "pass->fail" in md


def test_eval_command_writes_json_html_and_markdown(catalog: Catalog, tmp_path: Path) -> None:
    html_path, md_path = tmp_path / "r.html", tmp_path / "r.md"
    result = CliRunner().invoke(cli, [
        "eval", "--models-dir", str(catalog.dir), "--variants", "F16,Q2_K", "--baseline", "F16",
        "--sample", "5", "--seed", "1", "--json", "--html", str(html_path),
        "--markdown", str(md_path), "--json-out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    report = EvalReport.model_validate(payload["report"])
    assert report.golden.items == 5 and report.golden.seed == 1
    assert [v.precision for v in report.variants] == ["F16", "Q2_K"]
    assert set(payload["verdicts"]) == {"smollm2-135m-Q2_K"}
    assert payload["verdicts"]["smollm2-135m-Q2_K"]["decision"] in ("fail", "insufficient")
    assert report.comparisons[0].noise_floor is not None
    assert json.loads((tmp_path / "r.json").read_text())["report"] == payload["report"]
    assert html_path.read_text().count("<svg") == 3
    assert "smollm2-135m-Q2_K" in md_path.read_text()


def test_bad_golden_file_stops_before_any_model_loads(catalog: Catalog, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = ('{"id": "a", "category": "chat", "messages": [{"role": "user", "content": "hi"}], '
            '"expect": {"contains": ["hi"]}}')
    bad.write_text(good + "\n" + good.replace('"a"', '"b"').replace("contains", "containz") + "\n")
    result = CliRunner().invoke(cli, ["eval", "--models-dir", str(catalog.dir),
                                      "--golden", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:2: item 'b': expect.containz: unknown field" in result.output


def test_unknown_variant_and_bad_policy_are_user_errors(catalog: Catalog, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["eval", "--models-dir", str(catalog.dir),
                                      "--variants", "F16,Q9_9"])
    assert result.exit_code == 1 and "no variant 'Q9_9'" in result.output
    policy = tmp_path / "policy.json"
    policy.write_text('{"max_flips": -1}')
    result = CliRunner().invoke(cli, ["eval", "--models-dir", str(catalog.dir),
                                      "--policy", str(policy)])
    assert result.exit_code == 1 and "max_flips" in result.output
