"""The llama.cpp backend (GGUF variants) through llama-cpp-python.

Generation runs our own token loop over ``Llama.generate`` rather than
``create_completion`` so that every backend shares the same stop-string,
max-token and finish-reason rules, token ids are kept for telemetry, and a
client that goes away stops the loop at the next token.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantfleet.models.gguf_file import ModelFileError, read_gguf

from .base import (
    Backend,
    BackendError,
    Capabilities,
    ConstraintMode,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    LoadOptions,
    Stopwatch,
    StreamHandle,
)
from .stops import StopScanner

log = logging.getLogger(__name__)


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:  # the device extra was not installed
        raise BackendError(
            "llama-cpp-python is not installed; install quantfleet[agent]"
        ) from exc
    return llama_cpp


class LlamaCppBackend(Backend):
    kind = "llama.cpp"
    capabilities = Capabilities(grammar=True)

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        options = options or LoadOptions()
        super().__init__(Path(path), options)
        self.summary = read_gguf(self.path)  # clear one-line errors before llama.cpp sees it
        llama_cpp = _import_llama_cpp()
        self._llama_cpp = llama_cpp
        self._threads = options.n_threads or max(1, os.cpu_count() or 1)
        try:
            self._llm: Any = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=options.n_ctx,
                n_batch=options.n_batch,
                n_threads=self._threads,
                n_threads_batch=self._threads,
                seed=options.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelFileError(self.path, f"llama.cpp could not load it ({exc})") from None
        self._scorer: Any = None
        self._eog = self._end_of_generation_ids()
        meta: dict[str, str] = self._llm.metadata
        self._template: str | None = meta.get("tokenizer.chat_template")
        self._specials = {
            "bos_token": self._token_text(self._llm.token_bos()),
            "eos_token": self._token_text(self._llm.token_eos()),
        }
        if options.warmup:
            self.generate(GenerationRequest(prompt="Hi", max_tokens=1))

    # -- identity -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self._llm.n_vocab())

    @property
    def n_ctx(self) -> int:
        return int(self._llm.n_ctx())

    @property
    def chat_template(self) -> str | None:
        return self._template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._specials)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw: bytes = self._llm.detokenize([token], special=True)
        return raw.decode("utf-8", errors="replace")

    def _end_of_generation_ids(self) -> frozenset[int]:
        ids = {int(self._llm.token_eos())}
        vocab = getattr(self._llm._model, "vocab", None)
        is_eog = getattr(self._llama_cpp, "llama_vocab_is_eog", None)
        if vocab is not None and is_eog is not None:
            ids.update(t for t in range(self._llm.n_vocab()) if is_eog(vocab, t))
        return frozenset(ids)

    # -- tokens ---------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        raw: bytes = self._llm.detokenize(list(tokens))
        return raw.decode("utf-8", errors="replace")

    # -- generation -----------------------------------------------------
    def _grammar(self, request: GenerationRequest) -> tuple[object | None, ConstraintMode]:
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

        if request.grammar is not None:
            return LlamaGrammar.from_string(request.grammar, verbose=False), "grammar"
        if request.json_schema is None:
            return None, "none"
        # llama-cpp-python silently swaps in a generic JSON grammar when a schema
        # cannot be converted; convert it ourselves so the fallback is recorded.
        try:
            gbnf = json_schema_to_gbnf(json.dumps(request.json_schema))
            return LlamaGrammar.from_string(gbnf, verbose=False), "grammar"
        except Exception as exc:  # the converter raises bare Exceptions of several kinds
            log.warning("schema could not be compiled to a grammar (%s); using any-JSON", exc)
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False), "generic_json"

    def stream(self, request: GenerationRequest) -> StreamHandle:
        if isinstance(request.prompt, str):
            prompt_tokens = self.tokenize(request.prompt, add_bos=False, special=True)
        else:
            prompt_tokens = list(request.prompt)
        if not prompt_tokens:
            raise BackendError("empty prompt")
        room = self.n_ctx - len(prompt_tokens)
        if room <= 0:
            raise BackendError(
                f"prompt of {len(prompt_tokens)} tokens does not fit the context of {self.n_ctx}"
            )
        grammar, constraint = self._grammar(request)
        handle = StreamHandle(iter(()))
        handle._chunks = self._run(request, prompt_tokens, min(request.max_tokens, room),
                                   grammar, constraint, handle)
        return handle

    def _run(
        self,
        request: GenerationRequest,
        prompt_tokens: list[int],
        max_tokens: int,
        grammar: object | None,
        constraint: ConstraintMode,
        handle: StreamHandle,
    ) -> Iterator[GenerationChunk]:
        watch = Stopwatch()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(request.stop)
        generated: list[int] = []
        finish: FinishReason = "length"
        if request.seed is not None:
            self._llm.set_seed(request.seed)
        if request.seed is not None or not self.options.prefix_cache:
            # Reusing a cached prefix evaluates the rest in a different batch shape,
            # which moves logits in the last bits: enough to change a sampled token.
            # A seeded request asks for repeatability, so it always starts clean.
            self._llm.reset()
        gen = self._llm.generate(
            prompt_tokens,
            top_k=request.top_k if request.temperature > 0 else 1,
            top_p=request.top_p,
            min_p=0.0,
            temp=request.temperature,
            repeat_penalty=1.0,
            reset=True,
            grammar=grammar,
        )
        try:
            if max_tokens <= 0:
                finish = "length"
            else:
                for token in gen:
                    watch.mark_token()
                    if token in self._eog:
                        finish = "stop"
                        break
                    generated.append(int(token))
                    piece = decoder.decode(self._llm.detokenize([token]))
                    emit, hit = scanner.feed(piece)
                    if emit:
                        yield GenerationChunk(emit, [int(token)])
                    if hit:
                        finish = "stop"
                        break
                    if len(generated) >= max_tokens:
                        finish = "length"
                        break
                if finish == "length" or not scanner.stopped:
                    tail = scanner.flush(decoder.decode(b"", final=True))
                    if tail:
                        yield GenerationChunk(tail, [])
        except GeneratorExit:
            finish = "cancelled"
            raise
        finally:
            gen.close()
            handle.result = GenerationResult(
                text=scanner.text,
                finish_reason=finish,
                prompt_tokens=len(prompt_tokens),
                completion_tokens=len(generated),
                constraint=constraint,
                time_to_first_token_s=watch.first,
                total_time_s=watch.elapsed,
                token_ids=generated,
            )

    # -- quality evaluation ---------------------------------------------
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        toks = [int(t) for t in tokens]
        if not toks:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        if len(toks) > self.n_ctx:
            raise BackendError(f"{len(toks)} tokens exceed the context of {self.n_ctx}")
        if self._scorer is None:
            # A second context over the same mmapped weights: all-position logits
            # make prompt processing slower, so serving never pays for them.
            self._scorer = self._llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=self.options.n_ctx,
                n_batch=self.options.n_batch,
                n_threads=self._threads,
                n_threads_batch=self._threads,
                logits_all=True,
                verbose=False,
            )
        scorer = self._scorer
        scorer.reset()
        scorer.eval(toks)
        return np.array(scorer.scores[: len(toks)], dtype=np.float32)

    def close(self) -> None:
        for llm in (self._scorer, getattr(self, "_llm", None)):
            if llm is not None:
                llm.close()
        self._scorer = None
