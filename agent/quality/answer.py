"""One golden item through the agent's serving pipeline, keeping what teacher forcing needs.

The item's request body goes through :func:`quantfleet.agent.serving.pipeline.prepare`
and :func:`~quantfleet.agent.serving.pipeline.run` — the code the local API
serves with: chat template, tool descriptions, schema hints, prompt budget,
``max_tokens`` ceiling, grammar or schema constraint, stop rules, tool-call
parsing. An item is answered on the evaluator exactly as an app's request is
answered on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from quantfleet.agent.backends.base import Backend, GenerationResult
from quantfleet.agent.config import AgentConfig
from quantfleet.agent.serving import pipeline

from .golden import GoldenItem


@dataclass
class Answer:
    """An item's answer plus the exact prompt tokens it was generated from."""

    prompt_ids: list[int]
    result: GenerationResult
    tool_calls: list[dict[str, Any]]
    finish_reason: str  # the API's: "tool_calls" when the answer is a call

    @property
    def text(self) -> str:
        return str(self.result.text)


def answer(backend: Backend, item: GoldenItem, seed: int = 0,
           config: AgentConfig | None = None) -> Answer:
    body = item.request_body()
    body["seed"] = seed
    prepared = pipeline.prepare(body, backend, config)
    # Generate from the token ids themselves, so teacher forcing replays exactly
    # the sequence that was served (tokenized as a text prompt is: specials parsed).
    prompt = prepared.generation.prompt
    prompt_ids = (backend.tokenize(prompt, add_bos=False, special=True)
                  if isinstance(prompt, str) else list(prompt))
    prepared.generation = replace(prepared.generation, prompt=prompt_ids)
    completion = pipeline.run(prepared, backend)
    return Answer(prompt_ids=prompt_ids, result=completion.result,
                  tool_calls=completion.tool_calls or [],
                  finish_reason=completion.finish_reason)
