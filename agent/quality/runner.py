"""Running a golden set on variants: answers, checks, teacher forcing, comparisons.

``evaluate`` is what ``quantfleet eval`` runs: every item on every variant
(greedy, seeded, through the serving path), then the baseline's answers
teacher-forced through every candidate and through the baseline reloaded with
other thread and batch settings (the noise floor), then one
:class:`~.results.Comparison` per candidate. ``evaluate_backends`` is the
same on backends already loaded — what the agent's pre-flight calls.

Variants load with ``prefix_cache=False`` so an answer never depends on what
ran before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from quantfleet.agent.backends import Backend, LoadOptions, load_backend
from quantfleet.agent.config import AgentConfig
from quantfleet.agent.hardware import fingerprint, hidden_features
from quantfleet.agent.wire import HardwareFingerprint
from quantfleet.models.catalog import Catalog, VariantEntry, now_iso

from .answer import Answer, answer
from .checks import check_item
from .compare import category_rates, compare_runs, property_rates, rate
from .golden import GoldenItem, GoldenSet
from .metrics import (
    DivergenceAccumulator,
    TokenDivergence,
    completion_logits,
    divergence,
    structured_mask,
)
from .results import Comparison, EvalReport, GoldenInfo, ItemRun, KernelPath, VariantResult

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
NOISE = "noise"


@dataclass(frozen=True)
class EvalOptions:
    """How variants are loaded and items generated."""

    n_ctx: int = 1024
    # One thread: llama.cpp's worker threads spin at barriers, so on a shared or
    # oversubscribed CPU two threads run several times slower than one.
    threads: int = 1
    n_batch: int = 256
    seed: int = 0
    noise_floor: bool = True
    noise_threads: int = 1
    noise_batch: int = 64  # the noise reload differs from the baseline in batch size
    # Items the noise floor is scored on (None: all). It costs a full scoring pass
    # per item and llama.cpp's CPU kernels are row-deterministic (it measures 0 on
    # this build), so a slice of the set shows it without doubling the run.
    noise_items: int | None = 20

    def load(self, *, noise: bool = False) -> LoadOptions:
        return LoadOptions(n_ctx=self.n_ctx,
                           n_threads=self.noise_threads if noise else self.threads,
                           n_batch=self.noise_batch if noise else self.n_batch,
                           seed=self.seed, prefix_cache=False)


@dataclass
class VariantRun:
    """One variant's answers, kept with the backend for teacher forcing."""

    name: str
    precision: str
    role: str
    backend: Backend
    load: LoadOptions
    runs: list[ItemRun]
    answers: list[Answer]
    seconds: float
    entry: VariantEntry | None = None

    def result(self) -> VariantResult:
        gen_s = sum(a.result.total_time_s for a in self.answers)
        toks = sum(a.result.completion_tokens for a in self.answers)
        e = self.entry
        return VariantResult(
            name=self.name, precision=self.precision, role=self.role,
            backend=self.backend.kind, providers=session_providers(self.backend),
            load={k: v for k, v in asdict(self.load).items() if k != "warmup"},
            size_bytes=e.size_bytes if e else self.backend.path.stat().st_size,
            sha256=e.sha256 if e else "",
            bits_per_weight=e.precision.bits_per_weight if e else 0.0,
            tokens_per_second=toks / gen_s if gen_s > 0 else 0.0,
            seconds_per_item=self.seconds / max(1, len(self.runs)),
            seconds_total=self.seconds,
            overall=rate(sum(r.passed for r in self.runs), len(self.runs)),
            properties=property_rates(self.runs), categories=category_rates(self.runs),
            items=self.runs,
        )


def session_providers(backend: Backend) -> list[str]:
    """onnxruntime's execution providers of an ONNX backend's session ([] for llama.cpp).

    Read from the live session, so a report says what ran, not what was asked for.
    """
    session = getattr(backend, "_session", None)  # OnnxBackend's InferenceSession
    get = getattr(session, "get_providers", None)
    return [str(p) for p in get()] if callable(get) else []


def kernel_path(runs: Sequence[VariantRun]) -> tuple[HardwareFingerprint, KernelPath]:
    """This machine's fingerprint and the kernels the runs' runtimes used on it."""
    hw = fingerprint()
    providers: list[str] = []
    for r in runs:
        providers += [p for p in session_providers(r.backend) if p not in providers]
    return hw, KernelPath(llama_cpp_python=hw.llama_cpp_python,
                          llama_cpp_system_info=hw.llama_cpp_system_info,
                          onnxruntime=hw.onnxruntime, onnxruntime_providers=providers,
                          hidden_features=hidden_features(hw))


def run_items(backend: Backend, items: Sequence[GoldenItem], seed: int = 0,
              on_item: Callable[[int, GoldenItem, ItemRun], None] | None = None,
              config: AgentConfig | None = None,
              ) -> tuple[list[ItemRun], list[Answer], float]:
    """Answer and check every item on one backend; (runs, answers, wall seconds)."""
    runs: list[ItemRun] = []
    answers: list[Answer] = []
    start = time.perf_counter()
    for idx, item in enumerate(items):
        t0 = time.perf_counter()
        ans = answer(backend, item, seed, config)
        outcomes, props = check_item(item, ans.text, finish_reason=ans.finish_reason,
                                     tool_calls=ans.tool_calls,
                                     completion_tokens=ans.result.completion_tokens)
        run = ItemRun(
            item_id=item.id, category=item.category, text=ans.text, tool_calls=ans.tool_calls,
            finish_reason=ans.finish_reason, constraint=ans.result.constraint,
            prompt_tokens=ans.result.prompt_tokens,
            completion_tokens=ans.result.completion_tokens,
            seconds=time.perf_counter() - t0, tokens_per_second=ans.result.tokens_per_second,
            outcomes=outcomes, properties=props, passed=all(props.values()),
        )
        runs.append(run)
        answers.append(ans)
        if on_item is not None:
            on_item(idx, item, run)
    return runs, answers, time.perf_counter() - start


def teacher_force(baseline: Backend, others: dict[str, Backend], items: Sequence[GoldenItem],
                  base_answers: Sequence[Answer], *, limits: dict[str, int] | None = None
                  ) -> dict[str, DivergenceAccumulator]:
    """Feed the baseline's answers through every other backend; per-token divergence.

    The baseline's logits are computed once per item and compared with each
    other backend's, so the cost is one scoring pass per backend per item.
    ``limits`` caps how many (leading) items a backend scores.
    """
    accs = {name: DivergenceAccumulator() for name in others}
    caps = limits or {}
    for idx, (item, ans) in enumerate(zip(items, base_answers, strict=True)):
        completion = ans.result.token_ids
        if not completion:
            continue
        base = completion_logits(baseline, ans.prompt_ids, completion)
        json_answer = item.response_format is not None and item.response_format.type != "text"
        mask = structured_mask(baseline, completion, whole=json_answer)
        for name, backend in others.items():
            if idx >= caps.get(name, len(items)):
                continue
            cand = completion_logits(backend, ans.prompt_ids, completion)
            kl, same, dp = divergence(base, cand, completion)
            accs[name].add(TokenDivergence(kl=kl, same_top=same, dp=dp, structured=mask))
    return accs


def evaluate_backends(items: Sequence[GoldenItem], baseline: tuple[str, Backend],
                      candidates: dict[str, Backend], *, seed: int = 0,
                      noise: Backend | None = None) -> list[Comparison]:
    """Each candidate against the baseline on already-loaded backends (the pre-flight's path).

    ``noise`` is the baseline's file loaded with other threads or batch size;
    given, every comparison carries the noise floor the verdict checks limits
    against.
    """
    base_name, base_backend = baseline
    base_runs, base_answers, _ = run_items(base_backend, items, seed)
    cand_runs = {name: run_items(b, items, seed)[0] for name, b in candidates.items()}
    others = dict(candidates)
    if noise is not None:
        others[NOISE] = noise
    accs = teacher_force(base_backend, others, items, base_answers)
    floor = accs[NOISE].split() if noise is not None else None
    return [compare_runs(base_name, name, base_runs, runs, logits=accs[name].split(),
                         noise_floor=floor) for name, runs in cand_runs.items()]


def _sample_kl(acc: DivergenceAccumulator, limit: int = 4000) -> dict[str, list[float]]:
    """Per-token KL values for the report's distribution plots (thinned when large)."""
    out = {}
    for which in ("structured", "prose"):
        values = acc.kl_values(which)
        step = max(1, len(values) // limit)
        out[which] = [float(v) for v in values[::step]]
    return out


def evaluate(catalog: Catalog, golden: GoldenSet, variants: Sequence[str], baseline: str, *,
             options: EvalOptions | None = None, sample: int | None = None,
             command: str = "", progress: Progress | None = None) -> EvalReport:
    """Evaluate catalog variants against the baseline on the golden set (the CLI's engine)."""
    opts = options or EvalOptions()
    say = progress or (lambda msg: log.info("%s", msg))
    items = list(golden.sample(sample, opts.seed).items)
    started = time.perf_counter()
    base_entry = catalog.resolve(baseline)
    entries = [catalog.resolve(v) for v in variants]
    entries = [e for e in entries if e.name != base_entry.name]
    runs: list[VariantRun] = []
    others: dict[str, Backend] = {}
    try:
        for role, entry in [("baseline", base_entry)] + [("candidate", e) for e in entries]:
            runs.append(_run_variant(catalog, entry, role, items, opts, say))
        others = {r.name: r.backend for r in runs[1:]}
        if opts.noise_floor:
            # The noise floor needs the baseline's logits under other settings, not
            # its answers: the same file reloaded with other threads and batch size.
            others[NOISE] = load_backend(base_entry.backend, base_entry.path(catalog.dir),
                                         opts.load(noise=True))
        say(f"teacher forcing {len(items)} baseline answers through {len(others)} backend(s)")
        t0 = time.perf_counter()
        limits = {NOISE: opts.noise_items} if opts.noise_items is not None else {}
        accs = teacher_force(runs[0].backend, others, items, runs[0].answers, limits=limits)
        tf_seconds = time.perf_counter() - t0
        say(f"teacher forcing: {tf_seconds / max(1, len(items)):.2f} s per item")
        noise_split = accs[NOISE].split() if opts.noise_floor else None
        comparisons = [
            compare_runs(runs[0].name, r.name, runs[0].runs, r.runs,
                         logits=accs[r.name].split(), noise_floor=noise_split)
            for r in runs[1:]
        ]
        noise_load: dict[str, object] = {
            k: v for k, v in asdict(opts.load(noise=True)).items() if k != "warmup"}
        noise_load["items"] = min(len(items), opts.noise_items or len(items))
        hardware, kernels = kernel_path(runs)
        return EvalReport(
            created_at=now_iso(), command=command, hardware=hardware, kernels=kernels,
            golden=GoldenInfo(path=golden.path, sha256=golden.sha256, items=len(items),
                              total_items=len(golden.items), sample=sample, seed=opts.seed),
            baseline=runs[0].name, variants=[r.result() for r in runs],
            comparisons=comparisons, noise_load=noise_load if opts.noise_floor else None,
            kl_samples={name: _sample_kl(acc) for name, acc in accs.items()},
            seconds=time.perf_counter() - started, teacher_forcing_seconds=tf_seconds,
        )
    finally:
        if NOISE in others:
            others[NOISE].close()
        for r in runs:
            r.backend.close()


def _run_variant(catalog: Catalog, entry: VariantEntry, role: str, items: Sequence[GoldenItem],
                 opts: EvalOptions, say: Progress) -> VariantRun:
    load = opts.load()
    backend = load_backend(entry.backend, entry.path(catalog.dir), load)
    name = entry.name
    say(f"{name}: answering {len(items)} items (threads={load.n_threads}, "
        f"batch={load.n_batch})")
    try:
        runs, answers, seconds = run_items(backend, items, opts.seed)
    except BaseException:
        backend.close()
        raise
    say(f"{name}: {seconds / max(1, len(items)):.2f} s per item, "
        f"{sum(r.passed for r in runs)}/{len(runs)} passed")
    return VariantRun(name=name, precision=entry.precision.label, role=role, backend=backend,
                      load=load, runs=runs, answers=answers, seconds=seconds, entry=entry)
