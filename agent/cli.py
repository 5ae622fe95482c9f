"""quantfleet-agent: the device-side command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from quantfleet.models.catalog import Catalog, CatalogError, default_models_dir

from .backends import BackendError, GenerationRequest, LoadOptions, ModelFileError, load_backend
from .chat import ChatTemplate, ChatTemplateError

models_dir_option = click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_models_dir,
    show_default="$QUANTFLEET_MODELS_DIR or ~/.local/share/quantfleet/models",
    help="Directory holding the variant files and catalog.json.",
)


@click.group()
@click.version_option(package_name="quantfleet")
def cli() -> None:
    """quantfleet-agent runs quantized model variants on this device."""


@cli.command(name="generate")
@models_dir_option
@click.option("--variant", "-v", default="Q4_K_M", show_default=True,
              help="Variant name or precision label (see `quantfleet models list`).")
@click.option("--system", default=None, help="A system message.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1, 8192))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 5))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json-schema", "schema_file", type=click.File("r"), default=None,
              help="Constrain the answer to this JSON Schema (a file; - for stdin).")
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(64, 131072))
@click.option("--threads", default=None, type=click.IntRange(1, 512),
              help="CPU threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.argument("prompt")
def generate_cmd(models_dir: Path, variant: str, system: str | None, max_tokens: int,
                 temperature: float, seed: int, schema_file: click.utils.LazyFile | None,
                 n_ctx: int, threads: int | None, as_json: bool, prompt: str) -> None:
    """Load one variant and answer PROMPT, with time to first token and tokens/s.

    \b
    Example:
      quantfleet-agent generate -v Q8_0 "Name three primary colours."
    """
    schema = None
    if schema_file is not None:
        try:
            schema = json.load(schema_file)
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"--json-schema: not JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise click.ClickException("--json-schema: the schema must be a JSON object")
    try:
        entry = Catalog(models_dir).resolve(variant)
        backend = load_backend(entry.backend, entry.path(models_dir),
                               LoadOptions(n_ctx=n_ctx, n_threads=threads, seed=seed))
    except (CatalogError, ModelFileError, BackendError) as exc:
        raise click.ClickException(str(exc)) from None
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": prompt})
    try:
        template = ChatTemplate(backend.chat_template, **backend.special_tokens)
        rendered = template.render(messages)
        result = backend.generate(GenerationRequest(
            prompt=rendered, max_tokens=max_tokens, temperature=temperature, seed=seed,
            json_schema=schema,
        ))
    except (ChatTemplateError, BackendError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        backend.close()
    if as_json:
        click.echo(json.dumps({
            "variant": entry.name,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "constraint": result.constraint,
            "time_to_first_token_s": result.time_to_first_token_s,
            "total_time_s": result.total_time_s,
            "tokens_per_second": result.tokens_per_second,
        }))
        return
    click.echo(result.text)
    ttft = result.time_to_first_token_s or 0.0
    click.echo(
        f"\n[{entry.name}] {result.completion_tokens} tokens, finish={result.finish_reason}, "
        f"ttft={ttft * 1000:.0f} ms, {result.tokens_per_second:.1f} tokens/s",
        err=True,
    )


# --- telemetry (owner: agent/telemetry/) ------------------------------------
from .telemetry.cli import telemetry_group  # noqa: E402 - kept next to its block

cli.add_command(telemetry_group)
# --- end telemetry -----------------------------------------------------------


def main() -> None:
    cli(prog_name="quantfleet-agent")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
