"""The request -> answer path, without HTTP: the same code the agent serves.

The evaluator and the agent's pre-flight run golden items through here, so a
variant is judged on exactly the prompt, budgets and constraints it serves.

``prepare(request, backend, config=None) -> Prepared``
    Validates nothing about HTTP; takes a :class:`ChatRequest` (or a dict in
    the OpenAI shape), clamps ``max_tokens`` to the configured ceiling, renders
    the chat template (tools described in the system message, a JSON schema
    hint for structured output), drops the oldest turns to fit the prompt
    budget (``BudgetExceeded`` when even that fails; O(log n) renders of the
    conversation, see :func:`.budgets.fit_messages`), and picks the
    constraint: a JSON schema for ``response_format`` and required tool calls,
    a GBNF grammar for ``tool_choice="auto"``, and for ``"auto"`` with a JSON
    ``response_format`` the schema of "a call or a value in the format"
    (:func:`.tools.call_or_value_schema`; a required call ignores the format).
    ``Prepared.generation`` is the backend's :class:`GenerationRequest` (its
    prompt the token ids the budget counted, so nothing is rendered or
    tokenized twice); ``Prepared.spec`` the validation spec.
``run(prepared, backend, cancel=None, deadline=None, on_text=None) -> Completion``
    Generates (calling ``on_text`` with each piece of text as it streams),
    stops early when ``cancel`` is set or the monotonic ``deadline`` passes,
    turns a tool-call answer into OpenAI ``tool_calls``, and validates.
``complete(request, backend, config=None) -> Completion``
    ``prepare`` then ``run``.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quantfleet.agent.backends.base import Backend, GenerationRequest, GenerationResult
from quantfleet.agent.chat import ChatTemplate
from quantfleet.agent.config import AgentConfig
from quantfleet.agent.wire import ValidationOutcome

from .budgets import BudgetExceeded, clamp_max_tokens, fit_messages
from .protocol import ChatRequest, JsonObjectFormat, JsonSchemaFormat
from .tools import call_required, constraint_for, messages_for_template, parse_tool_calls
from .validation import ValidationSpec, validate_response

SCHEMA_HINT = "Reply with only a JSON value that matches this JSON Schema: {schema}"
JSON_HINT = "Reply with only a JSON object."
OR_CALL_HINT = "If you do not call a function, "


@dataclass
class Prepared:
    request: ChatRequest
    prompt: str
    prompt_tokens: int
    max_tokens: int
    max_tokens_clamped: bool
    dropped_messages: int
    generation: GenerationRequest
    spec: ValidationSpec
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]


@dataclass
class Completion:
    text: str
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str
    result: GenerationResult
    validations: list[ValidationOutcome] = field(default_factory=list)

    @property
    def content(self) -> str | None:
        return None if self.tool_calls else self.text


# Weak keys: an on-demand variant that is unloaded takes its template with it.
_templates: weakref.WeakKeyDictionary[Backend, ChatTemplate] = weakref.WeakKeyDictionary()
_templates_lock = threading.Lock()


def template_for(backend: Backend) -> ChatTemplate:
    """One compiled template per backend instance (compiling Jinja costs milliseconds)."""
    with _templates_lock:
        tpl = _templates.get(backend)
        if tpl is None:
            tpl = ChatTemplate(backend.chat_template, **backend.special_tokens)
            _templates[backend] = tpl
        return tpl


def _as_request(request: ChatRequest | Mapping[str, Any]) -> ChatRequest:
    return request if isinstance(request, ChatRequest) else ChatRequest.model_validate(request)


def prepare(request: ChatRequest | Mapping[str, Any], backend: Backend,
            config: AgentConfig | None = None) -> Prepared:
    req = _as_request(request)
    cfg = config or AgentConfig()
    budgets = cfg.budgets
    max_tokens, clamped = clamp_max_tokens(req.requested_max_tokens, budgets.default_max_tokens,
                                           budgets.max_tokens_ceiling)
    tools = req.tool_dicts()
    tool_choice = req.tool_choice_value()
    # With tools and tool_choice "auto", a JSON response_format is one of two
    # answers (a call or a value in the format); a required call ignores it.
    calls_shown = bool(tools) and tool_choice != "none"
    must_call = calls_shown and call_required(tool_choice)
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None
    json_expected = False
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    fmt = req.response_format
    hint = None
    if isinstance(fmt, JsonSchemaFormat) and not must_call:
        json_schema = fmt.json_schema.schema_ or {}
        json_expected = True
        hint = SCHEMA_HINT.format(schema=json.dumps(json_schema, separators=(",", ":")))
    elif isinstance(fmt, JsonObjectFormat) and not must_call:
        json_schema = {"type": "object"}
        json_expected = True
        hint = JSON_HINT
    if hint and calls_shown:
        hint = OR_CALL_HINT + hint[0].lower() + hint[1:]
    response_schema = json_schema
    kind, constraint = constraint_for(tools, tool_choice,
                                      grammar_ok=backend.capabilities.grammar,
                                      response_schema=response_schema)
    if kind == "json_schema":
        json_schema = constraint
    elif kind == "grammar":
        grammar = constraint
    if hint:
        if messages and messages[0]["role"] in ("system", "developer"):
            messages[0] = {**messages[0], "content": f"{_text(messages[0])}\n\n{hint}".strip()}
        else:
            messages.insert(0, {"role": "system", "content": hint})

    template = template_for(backend)

    def render(msgs: list[dict[str, Any]]) -> str:
        return str(template.render(messages_for_template(msgs, tools, tool_choice)))

    # The prompt the budget counted last is, when it fits, the one generated from: its
    # text and tokens are kept, so the template is not rendered and the prompt not
    # tokenized again before the first token.
    counted: list[tuple[list[dict[str, Any]], str, list[int]]] = []

    def count(msgs: list[dict[str, Any]]) -> int:
        text = render(msgs)
        tokens = backend.tokenize(text, add_bos=False, special=True)
        counted[:] = [(msgs, text, tokens)]
        return len(tokens)

    budget = min(budgets.max_prompt_tokens, backend.n_ctx - max_tokens)
    if budget <= 0:
        raise BudgetExceeded(max_tokens, backend.n_ctx)
    fit = fit_messages(messages, count, budget, lambda m: str(m["role"]),
                       lambda m: len(json.dumps(m, ensure_ascii=False)))
    prompt_ids: str | list[int]
    if counted and counted[0][0] == fit.messages:
        _, prompt, prompt_ids = counted[0]
    else:
        prompt = prompt_ids = render(fit.messages)

    policy = cfg.validation
    prose_citation = policy.require_citation and not tools and not json_expected
    want_citation = bool(req.quantfleet and req.quantfleet.require_citation) or prose_citation
    spec = ValidationSpec(
        # A tool call is validated as a call, any other answer against the format
        # (validate_response skips the JSON checks when the answer is a call).
        json_expected=json_expected,
        json_schema=response_schema if json_expected else None,
        tools=tools if tool_choice != "none" else (),
        tool_calls_required=call_required(tool_choice),
        refusal_patterns=tuple(policy.refusal_patterns),
        citation_required=want_citation,
        citation_pattern=policy.citation_pattern,
        max_chars=policy.max_completion_chars,
    )
    generation = GenerationRequest(
        prompt=prompt_ids,
        max_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else 0.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        seed=req.seed,
        stop=tuple(req.stops),
        json_schema=json_schema,
        grammar=grammar,
    )
    return Prepared(req, prompt, fit.prompt_tokens, max_tokens, clamped, fit.dropped,
                    generation, spec, tools, tool_choice)


def _text(message: Mapping[str, Any]) -> str:
    from .tools import content_text

    return content_text(message.get("content"))


def run(prepared: Prepared, backend: Backend, *, cancel: threading.Event | None = None,
        deadline: float | None = None, on_text: Callable[[str], None] | None = None,
        ) -> Completion:
    handle = backend.stream(prepared.generation)
    stopped_early = False
    try:
        for chunk in handle:
            if on_text is not None and chunk.text:
                on_text(chunk.text)
            if (cancel is not None and cancel.is_set()) or (
                    deadline is not None and time.monotonic() > deadline):
                stopped_early = True
                break
    finally:
        handle.close()
    result = handle.result
    if result is None:  # pragma: no cover - a backend bug
        raise RuntimeError("generation ended without a result")
    if stopped_early:
        result.finish_reason = "cancelled"
    return finish(prepared, result)


def finish(prepared: Prepared, result: GenerationResult) -> Completion:
    """Parse tool calls out of a finished generation and validate it."""
    tool_calls = None
    finish_reason: str = result.finish_reason
    if prepared.spec.tools and result.finish_reason != "cancelled":
        tool_calls = parse_tool_calls(result.text, prepared.spec.tools)
        if tool_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
    validations = validate_response(result.text, prepared.spec, finish_reason=finish_reason,
                                    tool_calls=tool_calls,
                                    completion_tokens=result.completion_tokens)
    return Completion(result.text, tool_calls, finish_reason, result, validations)


def complete(request: ChatRequest | Mapping[str, Any], backend: Backend,
             config: AgentConfig | None = None) -> Completion:
    return run(prepare(request, backend, config), backend)
