"""quantfleet-agent: the device-side command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

import click

from quantfleet.models.catalog import Catalog, CatalogError, models_dir_option

from .backends import BackendError, GenerationRequest, LoadOptions, ModelFileError, load_backend
from .chat import ChatTemplate, ChatTemplateError


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
                 temperature: float, seed: int, schema_file: IO[str] | None,
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
    from .hardware import describe, fingerprint

    hardware = fingerprint()
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
            "hardware": hardware.model_dump(mode="json"),
        }))
        return
    click.echo(result.text)
    ttft = result.time_to_first_token_s or 0.0
    click.echo(
        f"\n[{entry.name}] {result.completion_tokens} tokens, finish={result.finish_reason}, "
        f"ttft={ttft * 1000:.0f} ms, {result.tokens_per_second:.1f} tokens/s",
        err=True,
    )
    click.echo(f"[hardware] {describe(hardware)}", err=True)


# --- telemetry (owner: agent/telemetry/) ------------------------------------
from .telemetry.cli import telemetry_group  # noqa: E402 - kept next to its block

cli.add_command(telemetry_group)
# --- end telemetry -----------------------------------------------------------


# -- serving: `serve` and `config check` (agent/serving/, agent/config.py) ----------------
config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="QUANTFLEET_AGENT_CONFIG", default="/etc/quantfleet/agent.toml",
    show_default=True, help="The agent's TOML configuration ($QUANTFLEET_AGENT_CONFIG).")


def _load_agent_config(path: Path) -> Any:
    """Load and validate the file; an option under an old name loads, and is said so.

    So does a setting that means less than it says (a :class:`ConfigNote`, e.g. a
    tier naming ``fallback`` when there is none).

    Each old name's DeprecationWarning (e.g. ``update.soak_s``) is printed on stderr
    as ``warning: FILE: ...``: under systemd that is the journal, from both
    ``config check`` (ExecStartPre=) and ``serve``.
    """
    import warnings

    from .config import ConfigError, ConfigNote, DeprecatedOptionWarning, load_config

    ours = (DeprecatedOptionWarning, ConfigNote)
    with warnings.catch_warnings(record=True) as caught:
        for category in ours:
            warnings.simplefilter("always", category)
        try:
            config = load_config(path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    for w in caught:
        if issubclass(w.category, ours):
            click.echo(f"warning: {path}: {w.message}", err=True)
        else:  # not ours to report: as if it had not been caught
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return config


def _check_update_key(config: Any) -> None:
    """[update] public_key and every retired key must be readable ed25519 keys before
    the agent starts."""
    if config.update is None:
        return
    from .update.service import keyring
    from .update.signing import SignatureError

    try:
        keyring(config)
    except SignatureError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command(name="serve")
@config_option
@click.option("--host", default=None, help="Override listen.host.")
@click.option("--port", default=None, type=click.IntRange(0, 65535), help="Override listen.port.")
@click.option("--variant", "-v", default=None, help="Override models.active.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve_cmd(config_path: Path, host: str | None, port: int | None, variant: str | None,
              log_level: str) -> None:
    """Serve the local OpenAI-compatible API until SIGTERM.

    \b
    Example:
      quantfleet-agent serve --config packaging/agent.example.toml --port 8088
    """
    import logging

    from .config import ConfigError, parse_config
    from .serving.server import serve

    config = _load_agent_config(config_path)
    data = config.model_dump(mode="json")
    if host is not None:
        data["listen"]["host"] = host
    if port is not None:
        data["listen"]["port"] = port
    if variant is not None:
        data["models"]["active"] = variant
    try:
        config = parse_config(data, "command line")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        Catalog(config.models.dir).resolve(config.models.active)
    except CatalogError as exc:
        raise click.ClickException(f"models.active: {exc}") from None
    _check_update_key(config)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(serve(config, log_level=log_level))


@cli.group(name="config")
def config_group() -> None:
    """Check the agent's configuration file."""


def _fingerprint_lines(hw: Any) -> list[str]:
    """The fingerprint as ``name: value`` lines for people (``config check``)."""
    from .hardware import llama_cpp_kernels

    cores = f"{hw.logical_cores} logical"
    if hw.physical_cores:
        cores += f", {hw.physical_cores} physical"
    kernels = llama_cpp_kernels(hw.llama_cpp_system_info)
    rows = [
        ("cpu", f"{hw.cpu_model} ({hw.cpu_vendor or 'vendor unknown'})"),
        ("arch", hw.arch),
        ("class", hw.cpu_class),
        ("features", " ".join(hw.features) or "none reported"),
        ("cores", cores),
        ("memory", f"{hw.memory_bytes / 2**30:.1f} GiB"),
        ("llama.cpp", (f"llama-cpp-python {hw.llama_cpp_python}: " + " ".join(kernels))
         if hw.llama_cpp_python else "not installed"),
        ("llama.cpp system info", hw.llama_cpp_system_info or "-"),
        ("onnxruntime", hw.onnxruntime or "not installed"),
        ("kernel", hw.kernel or "-"),
        ("labels", ", ".join(f"{k}={v}" for k, v in hw.labels().items())),
    ]
    return [f"  {name + ':':<23}{value}" for name, value in rows]


@config_group.command(name="check")
@config_option
@click.option("--json", "as_json", is_flag=True,
              help="Print {\"config\": the effective config, \"hardware\": the fingerprint}.")
def config_check(config_path: Path, as_json: bool) -> None:
    """Validate a config file and the variants it names; exit 1 with the first error.

    Also prints this device's hardware fingerprint (what its birth announces
    and the fleet's cpu.* labels come from).

    \b
    Example:
      quantfleet-agent config check --config /etc/quantfleet/agent.toml
    """
    config = _load_agent_config(config_path)
    try:
        catalog = Catalog(config.models.dir)
        for name in config.variant_names():
            entry = catalog.resolve(name)
            if not entry.path(catalog.dir).exists():
                raise CatalogError(f"{name}: {entry.path(catalog.dir)} is missing")
        config.api_keys()
        _check_update_key(config)
    except (CatalogError, ValueError) as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    from .hardware import fingerprint

    hardware = fingerprint()
    if as_json:
        click.echo(json.dumps({"config": config.model_dump(mode="json"),
                               "hardware": hardware.model_dump(mode="json")}, indent=2))
        return
    click.echo(f"{config_path}: ok (device {config.device.id}, active "
               f"{config.models.active}, fallback {config.models.fallback or 'none'})")
    click.echo("hardware:")
    for line in _fingerprint_lines(hardware):
        click.echo(line)


def main() -> None:
    cli(prog_name="quantfleet-agent")


if __name__ == "__main__":  # pragma: no cover
    main()
