"""``quantfleet eval``: a golden set on the precision ladder, with the report and verdicts;
``quantfleet eval compare``: two reports of the same golden set from two machines."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console

from quantfleet.agent.quality.golden import (
    GoldenFileError,
    load_golden,
    starter_golden_path,
)
from quantfleet.models.catalog import default_models_dir
from quantfleet.strict import explain

_out = Console(width=None if sys.stdout.isatty() else 140)
_err = Console(stderr=True)


def _load_policy(path: Path | None):  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from quantfleet.agent.quality.verdict import VerdictPolicy

    if path is None:
        return VerdictPolicy()
    try:
        raw = json.loads(path.read_text())
        return VerdictPolicy.model_validate(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"--policy {path}: not readable JSON ({exc})") from None
    except ValidationError as exc:
        raise click.ClickException(explain(
            exc, where=f"--policy {path}",
            unknown="unknown field (see docs/eval.md for the format)")) from None


@click.group(name="eval", invoke_without_command=True)
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path),
              default=default_models_dir,
              show_default="$QUANTFLEET_MODELS_DIR or ~/.local/share/quantfleet/models",
              help="Directory holding the variant files and catalog.json.")
@click.option("--golden", "golden_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Golden JSONL file (default: the packaged starter set).")
@click.option("--variants", default="F16,Q8_0,Q4_K_M,Q2_K", show_default=True,
              help="Comma-separated variant names or precision labels.")
@click.option("--baseline", default=None,
              help="The variant the others are measured against (default: the catalog's "
              "reference).")
@click.option("--sample", type=click.IntRange(1), default=None,
              help="Evaluate a seeded subset of N items (every category kept).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sample and of generation.")
@click.option("--threads", type=click.IntRange(1, 512), default=1, show_default=True,
              help="CPU threads per variant (1 is fastest on a shared CPU).")
@click.option("--n-ctx", type=click.IntRange(256, 32768), default=1024, show_default=True,
              help="Context size variants are loaded with.")
@click.option("--noise-floor/--no-noise-floor", default=True, show_default=True,
              help="Also score the baseline reloaded with another batch size.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="A verdict policy (JSON, VerdictPolicy fields).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the HTML report (with plots) here.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write a Markdown summary here.")
@click.option("--json-out", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the JSON report here.")
@click.pass_context
def eval_cmd(ctx: click.Context, models_dir: Path, golden_file: Path | None, variants: str,
             baseline: str | None, sample: int | None, seed: int, threads: int, n_ctx: int,
             noise_floor: bool, policy_file: Path | None, as_json: bool,
             html_path: Path | None, md_path: Path | None, json_path: Path | None) -> None:
    """Run a golden set on variants and compare each with the baseline.

    Every item goes through the agent's serving pipeline (template, budgets,
    grammar, validators), greedy and seeded. Reports pass rates with Wilson
    intervals, paired flips with McNemar's exact test, teacher-forced KLD /
    same-top / Δp split into structured and prose tokens, a noise floor,
    tokens/s and size, and a verdict per candidate. The report records where
    it ran: the hardware fingerprint and the kernels of each runtime.
    `quantfleet eval compare A.json B.json` compares two reports.

    \b
    Example:
      quantfleet eval --golden models/golden/starter.jsonl \\
          --variants F16,Q8_0,Q4_K_M,Q2_K --baseline F16 --sample 12 --html report.html
    """
    if ctx.invoked_subcommand is not None:
        from click.core import ParameterSource

        given = [p.opts[0] for p in ctx.command.params
                 if p.name and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)}: an option of `quantfleet eval` "
                                   f"itself, not of `eval {ctx.invoked_subcommand}`")
        return
    from quantfleet.agent.backends import BackendError, ModelFileError
    from quantfleet.agent.quality.runner import EvalOptions, evaluate
    from quantfleet.agent.quality.verdict import judge
    from quantfleet.models.catalog import Catalog, CatalogError

    policy = _load_policy(policy_file)
    try:
        golden = load_golden(golden_file or starter_golden_path())
    except GoldenFileError as exc:
        raise click.ClickException(str(exc)) from None
    names = [v.strip() for v in variants.split(",") if v.strip()]
    if not names:
        raise click.ClickException("--variants: name at least one variant")
    try:
        catalog = Catalog(models_dir)
        if baseline is None:
            ref = catalog.reference()
            if ref is None:
                raise click.ClickException(
                    f"--baseline: {catalog.path} has no reference variant; name one")
            baseline = ref.name
        for name in [baseline, *names]:
            catalog.resolve(name)  # every name checked before anything loads
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from None
    command = ("quantfleet " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name == "quantfleet"
               else f"quantfleet eval (in-process, {len(names)} variants)")
    options = EvalOptions(n_ctx=n_ctx, threads=threads, seed=seed, noise_floor=noise_floor)
    try:
        report = evaluate(catalog, golden, names, baseline, options=options, sample=sample,
                          command=command, progress=lambda m: _err.print(f"[dim]{m}[/dim]"))
    except (CatalogError, ModelFileError, BackendError) as exc:
        raise click.ClickException(str(exc)) from None
    verdicts = {c.candidate: judge(c, policy) for c in report.comparisons}
    payload = {"report": report.model_dump(mode="json"),
               "verdicts": {k: v.model_dump(mode="json") for k, v in verdicts.items()},
               "policy": policy.model_dump(mode="json")}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=1) + "\n")
    if md_path is not None or html_path is not None:
        from . import report as render

        if md_path is not None:
            md_path.parent.mkdir(parents=True, exist_ok=True)
            md_path.write_text(render.markdown(report, verdicts, policy))
        if html_path is not None:
            html_path.parent.mkdir(parents=True, exist_ok=True)
            html_path.write_text(render.html(report, verdicts, policy))
    if as_json:
        click.echo(json.dumps(payload))
        return
    from .report import print_report

    print_report(report, verdicts, _out)


@eval_cmd.command(name="compare")
@click.argument("report_a", metavar="A.json", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("report_b", metavar="B.json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write it as Markdown here.")
def eval_compare(report_a: Path, report_b: Path, as_json: bool, md_path: Path | None) -> None:
    """Compare two reports of the same golden set, e.g. from two machines.

    Both must have run the same golden items (file sha256, sample and seed)
    on the same variant files against the same baseline; otherwise it says
    what differs and exits 1. Per variant: the items whose pass/fail differs
    between the machines (paired, with McNemar's exact test), the items whose
    answer text differs, and each candidate's KLD against the baseline (mean
    and p99; all, structured and prose tokens) side by side with the
    difference. Both fingerprints are named.

    \b
    Example:
      quantfleet eval compare docs/reports/starter-x86-amx.json \\
          docs/reports/starter-x86-avx2-qemu.json
    """
    from quantfleet.agent.quality.results import ReportFileError, load_report

    from .machines import ReportMismatch, compare_reports

    try:
        a, b = load_report(report_a), load_report(report_b)
        la, lb = report_a.stem, report_b.stem
        if la == lb:
            la, lb = str(report_a), str(report_b)
        comparison = compare_reports(a, b, la, lb)
    except (ReportFileError, ReportMismatch) as exc:
        raise click.ClickException(str(exc)) from None
    from . import report as render

    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(render.machines_markdown(comparison))
    if as_json:
        click.echo(comparison.model_dump_json(indent=1))
        return
    render.print_machines(comparison, _out)
