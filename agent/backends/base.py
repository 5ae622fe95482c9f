"""The backend seam: what every inference runtime (llama.cpp, ONNX Runtime) provides.

A backend loads one variant file and answers four questions: how many tokens
is this text, what does the model generate for this prompt (streamed or not,
optionally constrained to a JSON schema or a grammar), why did it stop, and
what were its logits at every position of a given token sequence (teacher
forcing, for quality evaluation). Everything above this seam — chat
templates, budgets, validation, fallback, telemetry — is shared by all
backends, so a precision change never changes the serving path.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:  # numpy comes with the runtime (llama_cpp, onnxruntime), not the seam
    import numpy as np

FinishReason = Literal["stop", "length", "cancelled"]

# How a structured-output request was enforced, recorded in telemetry:
# "grammar"       — the requested schema was compiled to a token mask;
# "generic_json"  — the schema could not be compiled, any-JSON grammar used;
# "validate_retry"— no masking in this backend, output validated and retried;
# "none"          — no constraint was asked for.
ConstraintMode = Literal["grammar", "generic_json", "validate_retry", "none"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond generating free text. The serving path asks
    these instead of guessing from which runtime it is talking to.

    ``grammar``
        Applies a GBNF grammar as a token mask (``GenerationRequest.grammar``).
        With it, ``tool_choice="auto"`` constrains the shape of a tool call while
        leaving a prose answer free; without it a grammar is never sent, and a
        JSON schema is held by the backend's own means (ONNX: generated, checked
        and retried), which it reports in ``GenerationResult.constraint``.
    """

    grammar: bool = False


class BackendError(RuntimeError):
    """A runtime failure inside a backend (not a bad request)."""


@dataclass(frozen=True)
class LoadOptions:
    """How to load a variant. Fields mean the same thing on every backend."""

    n_ctx: int = 2048
    n_threads: int | None = None  # None: the runtime's default for this machine
    n_batch: int = 256
    seed: int = 0
    warmup: bool = True  # one tiny inference at load, so the first request is not the slow one
    # Reuse the KV cache of a shared prompt prefix (faster; the last bits of the
    # logits then depend on what ran before). Evaluation turns it off.
    prefix_cache: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    """One generation from a rendered prompt.

    ``prompt`` is either text (tokenized with special tokens parsed, as chat
    templates require) or token ids.
    """

    prompt: str | Sequence[int]
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    json_schema: dict[str, object] | None = None
    grammar: str | None = None  # backend-specific grammar text (GBNF for llama.cpp)

    def __post_init__(self) -> None:
        # Below GREEDY_BELOW a temperature is greedy in all but name, and dividing
        # float32 logits by it overflows to inf: llama.cpp's grammar sampler then throws
        # and aborts the whole process (temperature 1.4e-45 with a JSON response_format
        # did, found by tests/serving/test_fuzz.py).
        if not self.temperature >= GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)  # frozen: set once, here


#: Temperatures below this are greedy decoding (the limit, and safe on every backend).
GREEDY_BELOW = 1e-3


@dataclass
class GenerationChunk:
    """One piece of a streamed generation."""

    text: str
    token_ids: list[int]


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    constraint: ConstraintMode = "none"
    time_to_first_token_s: float | None = None
    total_time_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Generation rate, counted from the first token (prompt processing excluded)."""
        if self.time_to_first_token_s is None or self.completion_tokens < 2:
            return 0.0
        gen_time = self.total_time_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / gen_time if gen_time > 0 else 0.0


class StreamHandle:
    """Iterates the chunks of a streamed generation; ``result`` is set when it ends.

    Closing it early (``close()`` or leaving the ``for`` loop and dropping it)
    stops generation: the finish reason becomes ``"cancelled"``.
    """

    def __init__(self, chunks: Iterator[GenerationChunk]) -> None:
        self._chunks = chunks
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self._chunks

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class Backend(abc.ABC):
    """One loaded variant. Not thread-safe: callers serialise access per instance."""

    #: the catalog's ``backend`` value this class serves
    kind: str = ""
    #: what it can do beyond free text (the serving path asks, never sniffs ``kind``)
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, path: Path, options: LoadOptions) -> None:
        self.path = path
        self.options = options

    # -- identity -------------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def n_ctx(self) -> int: ...

    @property
    @abc.abstractmethod
    def chat_template(self) -> str | None:
        """The chat template shipped with the model (Jinja2), if any."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, str]:
        """``bos_token`` / ``eos_token`` text, as chat templates expect them."""

    # -- tokens ---------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]: ...

    @abc.abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False, special=True))

    # -- generation -----------------------------------------------------
    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> StreamHandle:
        """Start a generation; iterate the handle for chunks."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        handle = self.stream(request)
        for _ in handle:
            pass
        if handle.result is None:  # pragma: no cover - a backend bug, not user input
            raise BackendError(f"{self.kind} stream ended without a result")
        return handle.result

    # -- quality evaluation ---------------------------------------------
    @abc.abstractmethod
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits: row i scores the token after ``tokens[: i + 1]``.

        Returns float32 of shape ``(len(tokens), vocab_size)``.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most backends free on GC
        """Release the runtime's memory now rather than at garbage collection."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, computed in float64 for stable small differences."""
    import numpy as np

    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


class Stopwatch:
    """Time to first token and total time of one generation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def mark_token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
