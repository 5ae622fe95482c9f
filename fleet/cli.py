"""quantfleet: the operator's command line (model tools now; fleet commands join it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from quantfleet.agent.backends import ModelFileError
from quantfleet.models.catalog import Catalog, CatalogError, models_dir_option

# Pipes and CI logs get 120 columns rather than rich's 80, so tables stay readable.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)



def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group()
@click.version_option(package_name="quantfleet")
def cli() -> None:
    """quantfleet stages precision changes across a fleet of edge devices."""


@cli.group(name="models")
def models_group() -> None:
    """Build, list and register model variants (the precision ladder)."""


@models_group.command(name="build")
@models_dir_option
@click.option("--source", "source_name", default=None,
              help="A registered source name (default: the shipped SmolLM2-135M-Instruct).")
@click.option("--only", default=None,
              help="Comma-separated precision labels to build (the reference is always built).")
@click.option("--ladder", "ladder_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="A ladder recipe TOML (default: the packaged ladder.toml).")
def models_build(models_dir: Path, source_name: str | None, only: str | None,
                 ladder_file: Path | None) -> None:
    """Build the precision ladder of a source model into the models directory.

    Rungs already built and verified (size and sha256) are skipped.

    \b
    Example:
      quantfleet models build --models-dir ./var/models
    """
    from quantfleet.models.build import build_ladder, load_ladder
    from quantfleet.models.sources import catalog_source, source_entry

    try:
        source = catalog_source(models_dir, source_name) if source_name else source_entry()
        ladder = load_ladder(ladder_file)
        wanted = {s.strip() for s in only.split(",") if s.strip()} if only else None
        if wanted:
            unknown = wanted - {r.label for r in ladder.rungs}
            if unknown:
                raise CatalogError(f"--only: no rung {sorted(unknown)} in the ladder "
                                   f"(rungs: {', '.join(r.label for r in ladder.rungs)})")
        with console.status("building") as status:
            outcomes = build_ladder(models_dir, source, ladder=ladder, only=wanted,
                                    progress=lambda msg: status.update(msg))
    except (CatalogError, ModelFileError, OSError) as exc:
        raise _fail(exc) from None
    for o in outcomes:
        console.print(f"{o.action:>8}  {o.variant.name}  ({o.variant.size_bytes / 1e6:.1f} MB, "
                      f"{o.seconds:.1f} s)")
    console.print(f"catalog: {models_dir / 'catalog.json'}")


@models_group.command(name="list")
@models_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array for scripts.")
def models_list(models_dir: Path, as_json: bool) -> None:
    """Show the variant catalog: precision, real tensor types, size, sha256."""
    try:
        catalog = Catalog(models_dir)
    except CatalogError as exc:
        raise _fail(exc) from None
    variants = sorted(catalog.variants, key=lambda v: (v.source, -v.size_bytes))
    if as_json:
        rows = []
        for v in variants:
            row = v.summary()
            row["path"] = str(v.path(catalog.dir).resolve())
            rows.append(row)
        click.echo(json.dumps(rows, indent=2))
        return
    if not variants:
        console.print(f"no variants in {models_dir}; run `quantfleet models build`")
        return
    table = Table(title=f"variants in {models_dir}")
    for col in ("name", "backend", "precision", "tensor types", "bpw", "size MB", "sha256"):
        table.add_column(col, justify="right" if col in ("bpw", "size MB") else "left")
    for v in variants:
        types = ", ".join(f"{k}×{n}" for k, n in
                          sorted(v.precision.tensor_types.items(), key=lambda kv: -kv[1]))
        table.add_row(v.name + (" (ref)" if v.reference else ""), v.backend, v.precision.label,
                      types, f"{v.precision.bits_per_weight:.2f}",
                      f"{v.size_bytes / 1e6:.1f}", v.sha256[:12])
    console.print(table)


@models_group.command(name="verify")
@models_dir_option
def models_verify(models_dir: Path) -> None:
    """Check every variant file against its catalog size and sha256."""
    try:
        catalog = Catalog(models_dir)
    except CatalogError as exc:
        raise _fail(exc) from None
    bad = 0
    for v in catalog.variants:
        problem = catalog.verify(v)
        console.print(f"{'ok' if problem is None else 'BAD':>4}  {v.name}"
                      + (f"  {problem}" if problem else ""))
        bad += problem is not None
    if bad:
        raise click.ClickException(f"{bad} variant file(s) do not match the catalog")


@models_group.command(name="register")
@models_dir_option
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Short lowercase name for the source.")
def models_register(models_dir: Path, path: Path, name: str) -> None:
    """Register your own GGUF as a source model, then build its ladder.

    \b
    Example:
      quantfleet models register ./my-model-f16.gguf --name mymodel
      quantfleet models build --source mymodel
    """
    from quantfleet.models.sources import register_source

    try:
        entry = register_source(models_dir, path, name)
    except (CatalogError, ModelFileError) as exc:
        raise _fail(exc) from None
    console.print(f"registered {entry.name}: {entry.path} ({entry.file_type}, "
                  f"{entry.n_parameters / 1e6:.0f}M parameters)")


# -- commands other packages contribute (the demo: demo/run.py) -----------------
def _add_contributed_commands() -> None:
    """Commands registered under the ``quantfleet.commands`` entry point group.

    The demo drives the fleet, so the fleet must not import it; it is found by name
    (pyproject.toml) and left out when it is not installed.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group="quantfleet.commands"):
        try:
            make = ep.load()
        except ImportError as exc:  # an optional part whose dependencies are missing
            err_console.print(f"quantfleet: command {ep.name!r} unavailable ({exc})")
            continue
        cli.add_command(make())


_add_contributed_commands()


# -- fleet operations (fleet/commands.py) ------------------------------------
def _add_fleet_commands() -> None:
    from .commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_add_fleet_commands()


# -- quality evaluation (fleet/evaluation/cli.py) ---------------------------------
def _add_eval_command() -> None:
    from .evaluation.cli import eval_cmd

    cli.add_command(eval_cmd)


_add_eval_command()


# -- HTTP credentials (fleet/auth_commands.py) -------------------------------------
def _add_auth_command() -> None:
    from .auth_commands import auth_group

    cli.add_command(auth_group)


_add_auth_command()


def main() -> None:
    cli(prog_name="quantfleet")


if __name__ == "__main__":  # pragma: no cover
    main()
