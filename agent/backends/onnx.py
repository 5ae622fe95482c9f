"""The ONNX Runtime backend (.onnx variants written by ``quantfleet.models.onnx_export``).

The decoder graph takes ``input_ids`` plus the past KV cache and returns the
logits of the last ``logits_to_keep`` positions plus the present cache, so
generation is incremental. Tokenization is ``quantfleet.models.tokenizer.BPETokenizer``
over the vocabulary stored in the file, which gives llama.cpp's ids exactly.

Structured output: the schema is not compiled to a token mask, so a
JSON-schema request is answered by validate-and-retry
(``constraint="validate_retry"``): each attempt is held to JSON syntax (and
the schema's root type) by a token filter (``onnx_json.JsonPrefix``), then
parsed and validated against the schema; a failed attempt is retried with
sampling, up to ``JSON_ATTEMPTS`` times.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantfleet.models.gguf_file import ModelFileError
from quantfleet.models.tokenizer import BPETokenizer, TokenizerError

from .base import (
    Backend,
    BackendError,
    Capabilities,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    LoadOptions,
    Stopwatch,
    StreamHandle,
)
from .onnx_json import DONE, JsonPrefix
from .stops import StopScanner

log = logging.getLogger(__name__)

META_CONFIG = "quantfleet.config"
META_TOKENIZER = "quantfleet.tokenizer"
META_CHAT_TEMPLATE = "quantfleet.chat_template"
META_QUANTIZATION = "quantfleet.quantization"
QUANTIZER_PRODUCER = "onnx.quantize"  # what onnxruntime's quantize_dynamic/_static write
JSON_ATTEMPTS = 3
RETRY_TEMPERATURE = 0.7
JSON_CANDIDATES = 256  # most likely tokens tried against the JSON syntax before the rest
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # the device extra was not installed
        raise BackendError("onnxruntime is not installed; install quantfleet[agent]") from exc
    return onnxruntime


class OnnxBackend(Backend):
    kind = "onnxruntime"
    # No token masks: a JSON schema is generated free, checked and retried
    # (onnx_json.py), and a grammar is refused; the serving path never sends one.
    capabilities = Capabilities(grammar=False)

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        options = options or LoadOptions()
        super().__init__(Path(path), options)
        p = self.path
        if not p.is_file():
            raise ModelFileError(p, "no such file" if not p.exists() else "not a regular file")
        if p.stat().st_size == 0:
            raise ModelFileError(p, "empty file (0 bytes)")
        ort = _import_ort()
        so = ort.SessionOptions()
        threads = options.n_threads or max(1, os.cpu_count() or 1)
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initializers are not the operator's
        try:
            self._session = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own pybind exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(p, f"onnxruntime could not load it ({first})") from None
        modelmeta = self._session.get_modelmeta()
        meta = modelmeta.custom_metadata_map
        self._cfg = self._read_config(meta)
        self.quantization = self._check_cpu(meta, modelmeta.producer_name)
        try:
            self._tok = BPETokenizer(json.loads(meta.get(META_TOKENIZER, "null") or "null"))
        except (TokenizerError, TypeError, json.JSONDecodeError) as exc:
            raise ModelFileError(p, f"the stored tokenizer is unusable ({exc})") from None
        self._n_layer = int(self._cfg["n_layer"])
        self._n_kv = int(self._cfg["n_head_kv"])
        self._head_dim = int(self._cfg["head_dim"])
        self._vocab = self._check_signature()
        if self._vocab != self._tok.vocab_size:
            raise ModelFileError(p, f"logits have {self._vocab} entries but the tokenizer has "
                                    f"{self._tok.vocab_size} tokens")
        self._n_ctx = min(options.n_ctx, int(self._cfg["n_ctx_train"]))
        self._template = meta.get(META_CHAT_TEMPLATE) or None
        self._specials = {
            "bos_token": self._tok.token_text(self._tok.bos_id) if self._tok.bos_id >= 0 else "",
            "eos_token": self._tok.token_text(self._tok.eos_id) if self._tok.eos_id >= 0 else "",
        }
        self._rng = np.random.default_rng(options.seed)
        self._cache_tokens: list[int] = []
        self._cache_past: list[np.ndarray] | None = None
        self._out_names = ["logits"] + [
            f"present.{i}.{kind}" for i in range(self._n_layer) for kind in ("key", "value")
        ]
        if options.warmup:
            self.generate(GenerationRequest(prompt="Hi", max_tokens=1))

    # -- load-time checks -------------------------------------------------
    def _read_config(self, meta: dict[str, str]) -> dict[str, Any]:
        raw = meta.get(META_CONFIG)
        if not raw:
            raise ModelFileError(self.path, f"metadata {META_CONFIG!r} is missing (not exported "
                                            "by quantfleet.models.onnx_export)")
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelFileError(self.path, f"metadata {META_CONFIG!r} is not JSON ({exc})"
                                 ) from None
        need = ("n_layer", "n_head_kv", "head_dim", "vocab_size", "n_ctx_train")
        missing = [k for k in need if not isinstance(cfg, dict) or not isinstance(cfg.get(k), int)]
        if missing:
            raise ModelFileError(self.path, f"metadata {META_CONFIG!r} lacks integer {missing}")
        return dict(cfg)

    def _check_cpu(self, meta: dict[str, str], producer: str) -> dict[str, Any]:
        """The file's recorded quantization settings; refuses a file this CPU cannot run."""
        from quantfleet.models.catalog import CpuRequirement

        from .cpu import check_cpu

        raw = meta.get(META_QUANTIZATION)
        if raw is None and producer != QUANTIZER_PRODUCER:
            return {}  # not quantized by onnxruntime's int8 quantizers (fp32, int4)
        if raw is None:
            # An int8 file from before the settings were recorded: quantfleet's
            # recipe then was U8S8 without reduce_range, garbage without VNNI.
            from quantfleet.models.onnx_export import LEGACY_INT8

            record: Any = {**LEGACY_INT8.record(), "legacy": True, "requires_cpu": [
                {**r, "why": r["why"] + "; the file records no int8 settings, so it is taken "
                 "to be that old recipe (rebuild it: quantfleet models build)"}
                for r in LEGACY_INT8.requires_cpu()]}
        else:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ModelFileError(self.path, f"metadata {META_QUANTIZATION!r} is not JSON "
                                                f"({exc})") from None
        try:
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")
            requires = [CpuRequirement.model_validate(r) for r in record.get("requires_cpu", [])]
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            first = " ".join(str(exc).split())
            raise ModelFileError(self.path, f"metadata {META_QUANTIZATION!r} is unusable "
                                            f"({first})") from None
        check_cpu(self.path, str(record.get("variant") or self.path.stem), requires)
        return dict(record)

    def _check_signature(self) -> int:
        """Check inputs and outputs against the export contract; return the vocab size."""
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        past = [f"past_key_values.{i}.{k}" for i in range(self._n_layer) for k in ("key", "value")]
        expected_in = ["input_ids", "logits_to_keep", *past]
        missing_in = [n for n in expected_in if n not in inputs]
        if missing_in:
            raise ModelFileError(self.path, f"graph inputs lack {_names(missing_in)}")
        extra_in = sorted(set(inputs) - set(expected_in))
        if extra_in:
            raise ModelFileError(self.path, f"graph has unexpected inputs {_names(extra_in)}")
        if inputs["input_ids"].type != "tensor(int64)" or len(inputs["input_ids"].shape) != 2:
            ids = inputs["input_ids"]
            raise ModelFileError(self.path, f"input 'input_ids' is {ids.type} {ids.shape}, "
                                            "expected int64 [batch, seq]")
        for name in past:
            shape = inputs[name].shape
            if len(shape) != 4 or shape[1] != self._n_kv or shape[3] != self._head_dim:
                raise ModelFileError(self.path, f"input {name!r} has shape {shape}, expected "
                                                f"[batch, {self._n_kv}, past, {self._head_dim}]")
        present = [f"present.{i}.{k}" for i in range(self._n_layer) for k in ("key", "value")]
        if "logits" not in outputs:
            raise ModelFileError(self.path, "graph outputs lack 'logits'")
        missing_out = [n for n in present if n not in outputs]
        if missing_out:
            raise ModelFileError(self.path, f"graph outputs lack the KV cache outputs "
                                            f"{_names(missing_out)}")
        shape = outputs["logits"].shape
        if len(shape) != 3 or not isinstance(shape[2], int):
            raise ModelFileError(self.path, f"output 'logits' has shape {shape}, expected "
                                            "[batch, keep, vocab]")
        if shape[2] != self._cfg["vocab_size"]:
            raise ModelFileError(self.path, f"logits have {shape[2]} entries but the file's config "
                                            f"says vocab_size {self._cfg['vocab_size']}")
        return int(shape[2])

    # -- identity -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def chat_template(self) -> str | None:
        return self._template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._specials)

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._tok.eog_ids

    # -- tokens ---------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self._tok.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._tok.decode(tokens)

    # -- the model ------------------------------------------------------
    def _empty_past(self) -> list[np.ndarray]:
        empty = np.zeros((1, self._n_kv, 0, self._head_dim), dtype=np.float32)
        return [empty] * (2 * self._n_layer)

    def _run(self, tokens: Sequence[int], past: list[np.ndarray], keep: int
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "logits_to_keep": np.asarray([keep], dtype=np.int64),
        }
        for i in range(self._n_layer):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        try:
            out = self._session.run(self._out_names, feeds)
        except Exception as exc:  # a runtime failure inside ORT, not a user error
            raise BackendError(f"onnxruntime failed: {str(exc).splitlines()[0]}") from None
        return out[0][0], list(out[1:])

    def _prefill(self, tokens: list[int], reuse: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        """Evaluate the prompt (in n_batch chunks); return the last logits and the cache."""
        start, past = 0, self._empty_past()
        if reuse and self._cache_past is not None:
            common = 0
            for a, b in zip(self._cache_tokens, tokens, strict=False):
                if a != b:
                    break
                common += 1
            common = min(common, len(tokens) - 1)  # at least one token must run for logits
            if common > 0:
                start = common
                past = [np.ascontiguousarray(p[:, :, :common, :]) for p in self._cache_past]
        step = max(1, self.options.n_batch)
        logits = np.empty(0, dtype=np.float32)
        for i in range(start, len(tokens), step):
            chunk = tokens[i: i + step]
            out, past = self._run(chunk, past, 1)
            logits = out[-1]
        return logits, past

    def _remember(self, tokens: list[int], past: list[np.ndarray]) -> None:
        self._cache_tokens, self._cache_past = tokens, past

    # -- generation -----------------------------------------------------
    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if isinstance(request.prompt, str):
            prompt = self.tokenize(request.prompt, add_bos=False, special=True)
        else:
            prompt = [int(t) for t in request.prompt]
        if not prompt:
            raise BackendError("empty prompt")
        bad = [t for t in prompt if not 0 <= t < self._vocab]
        if bad:
            raise BackendError(f"token ids {bad[:5]} are outside the vocabulary of {self._vocab}")
        if len(prompt) >= self.n_ctx:
            raise BackendError(
                f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        return prompt

    def stream(self, request: GenerationRequest) -> StreamHandle:
        if request.grammar is not None:
            raise BackendError("the onnxruntime backend cannot apply a grammar; "
                               "send a json_schema (validated and retried) instead")
        prompt = self._prompt_tokens(request)
        handle = StreamHandle(iter(()))
        if request.json_schema is not None:
            handle._chunks = self._json_stream(request, prompt, handle)
        else:
            handle._chunks = self._generate(request, prompt, handle)
        return handle

    def _sample(self, logits: np.ndarray, request: GenerationRequest,
                rng: np.random.Generator) -> int:
        if request.temperature <= 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / request.temperature
        idx = np.arange(x.shape[0])
        if 0 < request.top_k < x.shape[0]:
            idx = np.argpartition(-x, request.top_k)[: request.top_k]
        order = idx[np.argsort(-x[idx], kind="stable")]
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        if request.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(p), request.top_p)) + 1
            order, p = order[:cut], p[:cut] / p[:cut].sum()
        return int(order[rng.choice(len(order), p=p)])

    def _pick_json(self, logits: np.ndarray, request: GenerationRequest,
                   rng: np.random.Generator, state: JsonPrefix) -> tuple[int, JsonPrefix] | None:
        """The sampled token among those that keep the output a JSON prefix."""
        order = np.argsort(-logits, kind="stable")
        want = 1 if request.temperature <= 0 else max(request.top_k, 40)
        states: dict[int, JsonPrefix] = {}
        for start in (0, JSON_CANDIDATES):  # the rest of the vocabulary only if needed
            part = order[:JSON_CANDIDATES] if start == 0 else order[JSON_CANDIDATES:]
            for t in part:
                token = int(t)
                if token in self._tok.eog_ids:
                    if state.complete:
                        states[token] = state
                else:
                    data = self._tok.token_bytes(token)
                    trial = state.copy()
                    if data and trial.accepts(data):
                        states[token] = trial
                if len(states) >= want:
                    break
            if states:
                break
        if not states:
            return None
        masked = np.full_like(logits, -np.inf)
        allowed = np.fromiter(states, dtype=np.int64)
        masked[allowed] = logits[allowed]
        token = self._sample(masked, request, rng)
        return token, states[token]

    def _generate(self, request: GenerationRequest, prompt: list[int],
                  handle: StreamHandle, json_state: JsonPrefix | None = None
                  ) -> Iterator[GenerationChunk]:
        watch = Stopwatch()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(request.stop)
        generated: list[int] = []
        finish: FinishReason = "length"
        max_tokens = min(request.max_tokens, self.n_ctx - len(prompt))
        # numpy seeds are non-negative; -1 (llama.cpp's "any seed") must not raise.
        rng = (np.random.default_rng(request.seed % 2**64) if request.seed is not None
               else self._rng)
        # A seeded request asks for repeatability, so it never reuses a cached prefix
        # (a different chunking moves logits in their last bits).
        reuse = self.options.prefix_cache and request.seed is None
        try:
            if max_tokens > 0:
                logits, past = self._prefill(prompt, reuse)
                seen = list(prompt)
                while True:
                    if json_state is None:
                        token = self._sample(logits, request, rng)
                    else:
                        picked = self._pick_json(logits, request, rng, json_state)
                        if picked is None:
                            finish = "stop"
                            break
                        token, json_state = picked
                    watch.mark_token()
                    if token in self._tok.eog_ids:
                        finish = "stop"
                        break
                    generated.append(token)
                    piece = decoder.decode(self._tok.token_bytes(token))
                    emit, hit = scanner.feed(piece)
                    if emit:
                        yield GenerationChunk(emit, [token])
                    if hit or (json_state is not None and json_state.mode == DONE):
                        finish = "stop"
                        break
                    if len(generated) >= max_tokens:
                        finish = "length"
                        break
                    out, past = self._run([token], past, 1)
                    seen.append(token)
                    logits = out[-1]
                    self._remember(seen, past)
                self._remember(seen, past)
            if finish == "length" or not scanner.stopped:
                tail = scanner.flush(decoder.decode(b"", final=True))
                if tail:
                    yield GenerationChunk(tail, [])
        except GeneratorExit:
            finish = "cancelled"
            raise
        finally:
            handle.result = GenerationResult(
                text=scanner.text,
                finish_reason=finish,
                prompt_tokens=len(prompt),
                completion_tokens=len(generated),
                constraint="none",
                time_to_first_token_s=watch.first,
                total_time_s=watch.elapsed,
                token_ids=generated,
            )

    def _json_stream(self, request: GenerationRequest, prompt: list[int],
                     handle: StreamHandle) -> Iterator[GenerationChunk]:
        """Validate-and-retry: the validated text is emitted as one chunk at the end."""
        watch = Stopwatch()
        schema = request.json_schema or {}
        result: GenerationResult | None = None
        text = ""
        finish: FinishReason = "length"
        try:
            for attempt in range(JSON_ATTEMPTS):
                if attempt == 0:
                    req = request
                else:
                    seed = (request.seed if request.seed is not None else 0) + attempt
                    req = _replace(request, temperature=max(request.temperature,
                                                            RETRY_TEMPERATURE), seed=seed)
                inner = StreamHandle(iter(()))
                inner._chunks = self._generate(_replace(req, json_schema=None), prompt, inner,
                                               JsonPrefix.for_schema(schema))
                for _ in inner:
                    pass
                result = inner.result
                assert result is not None
                if watch.first is None and result.time_to_first_token_s is not None:
                    watch.first = result.time_to_first_token_s
                problem, text = json_problem(result.text, schema)
                if problem is None:
                    finish = result.finish_reason
                    break
                log.info("json attempt %d of %d failed: %s", attempt + 1, JSON_ATTEMPTS, problem)
                text, finish = result.text, result.finish_reason
            if text:
                yield GenerationChunk(text, list(result.token_ids) if result else [])
        except GeneratorExit:
            finish = "cancelled"
            raise
        finally:
            handle.result = GenerationResult(
                text=text,
                finish_reason=finish,
                prompt_tokens=len(prompt),
                completion_tokens=result.completion_tokens if result else 0,
                constraint="validate_retry",
                time_to_first_token_s=watch.first,
                total_time_s=watch.elapsed,
                token_ids=list(result.token_ids) if result else [],
            )

    # -- quality evaluation ---------------------------------------------
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        toks = [int(t) for t in tokens]
        if not toks:
            return np.zeros((0, self._vocab), dtype=np.float32)
        if len(toks) > self.n_ctx:
            raise BackendError(f"{len(toks)} tokens exceed the context of {self.n_ctx}")
        bad = [t for t in toks if not 0 <= t < self._vocab]
        if bad:
            raise BackendError(f"token ids {bad[:5]} are outside the vocabulary of {self._vocab}")
        rows: list[np.ndarray] = []
        past = self._empty_past()
        step = max(1, self.options.n_batch)
        for i in range(0, len(toks), step):
            chunk = toks[i: i + step]
            out, past = self._run(chunk, past, len(chunk))
            rows.append(np.asarray(out, dtype=np.float32))
        return np.concatenate(rows, axis=0)

    def close(self) -> None:
        self._cache_past = None
        self._cache_tokens = []
        self.__dict__.pop("_session", None)


def json_problem(text: str, schema: dict[str, object]) -> tuple[str | None, str]:
    """(why ``text`` is not a valid instance of ``schema`` or None, the JSON text found).

    A model often wraps JSON in a Markdown fence; the fence is removed, nothing else.
    """
    import jsonschema

    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at {exc.pos})", text
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"does not match the schema ({exc.message})", text
    except jsonschema.SchemaError as exc:
        return f"the schema itself is invalid ({exc.message})", text
    return None, body


def _replace(request: GenerationRequest, **changes: Any) -> GenerationRequest:
    from dataclasses import replace

    return replace(request, **changes)


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")
