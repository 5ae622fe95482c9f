"""The README's end-to-end job: build the ladder and put one prompt to every rung."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantfleet.agent.backends import GenerationRequest, LoadOptions, load_backend
from quantfleet.agent.chat import ChatTemplate
from quantfleet.models.build import build_ladder
from quantfleet.models.catalog import Catalog


def run_ladder_demo(models_dir: Path, prompt: str, max_tokens: int, console: Console) -> None:
    with console.status("building the precision ladder") as status:
        outcomes = build_ladder(models_dir, progress=lambda m: status.update(m))
    for o in outcomes:
        console.print(f"{o.action:>8}  {o.variant.name}")
    catalog = Catalog(models_dir)
    table = Table(title=f"one prompt on every variant: {prompt!r}", show_lines=True)
    for col in ("variant", "size MB", "bpw", "ttft ms", "tokens/s", "answer"):
        table.add_column(col, justify="left" if col in ("variant", "answer") else "right",
                         overflow="fold")
    for o in outcomes:
        v = o.variant
        with console.status(f"answering on {v.name}"):
            backend = load_backend(v.backend, v.path(catalog.dir), LoadOptions(n_ctx=1024))
            try:
                rendered = ChatTemplate(backend.chat_template, **backend.special_tokens).render(
                    [{"role": "user", "content": prompt}]
                )
                r = backend.generate(GenerationRequest(prompt=rendered, max_tokens=max_tokens))
            finally:
                backend.close()
        table.add_row(v.precision.label, f"{v.size_bytes / 1e6:.0f}",
                      f"{v.precision.bits_per_weight:.2f}",
                      f"{(r.time_to_first_token_s or 0) * 1000:.0f}",
                      f"{r.tokens_per_second:.0f}", r.text.strip())
    console.print(table)
