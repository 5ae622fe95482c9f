"""What an evaluation produces: the shapes of ``quantfleet eval --json`` and the verdict's input.

Everything here is plain data (pydantic, JSON round-trippable) so an
evaluation can be stored, shipped from a device, and judged later by
:mod:`.verdict` without a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from quantfleet.agent.wire import HardwareFingerprint, ValidationOutcome
from quantfleet.strict import Strict, explain

#: The shape of a ``Comparison`` (and of reports before version 2).
EVAL_SCHEMA_VERSION = 1
#: The shape of an ``EvalReport``: version 2 added ``hardware`` and ``kernels``
#: (where it was measured); version 1 reports still load, without them.
REPORT_SCHEMA_VERSION = 2


class Rate(Strict):
    """A pass rate with its 95 % Wilson interval."""

    passed: int = Field(description="Items that passed.")
    n: int = Field(description="Items that were checked.")
    rate: float = Field(description="passed / n (0 when n is 0).")
    low: float = Field(description="Lower bound of the 95 % Wilson interval.")
    high: float = Field(description="Upper bound of the 95 % Wilson interval.")


class ItemRun(Strict):
    """One golden item answered by one variant."""

    item_id: str = Field(description="The golden item's id.")
    category: str = Field(description="The golden item's category.")
    text: str = Field(description="The answer as the agent would return it.")
    tool_calls: list[dict[str, object]] = Field(
        default_factory=list, description="Tool calls parsed from the answer (OpenAI shape).")
    finish_reason: str = Field(description="stop, length or cancelled.")
    constraint: str = Field(description="How structured output was enforced.")
    prompt_tokens: int = Field(description="Tokens of the rendered prompt.")
    completion_tokens: int = Field(description="Tokens generated.")
    seconds: float = Field(description="Wall time of the generation.")
    tokens_per_second: float = Field(description="Generation rate after the first token.")
    outcomes: list[ValidationOutcome] = Field(description="Every check run on the answer.")
    properties: dict[str, bool] = Field(description="Expected property -> passed.")
    passed: bool = Field(description="Every expected property passed.")


class VariantResult(Strict):
    """One variant's run over the golden set."""

    name: str = Field(description="Catalog name of the variant.")
    precision: str = Field(description="Precision label (F16, Q8_0, ...).")
    backend: str = Field("", description="The runtime that ran it: llama.cpp or onnxruntime "
                         "(empty in reports before version 2).")
    providers: list[str] = Field(
        default_factory=list,
        description="onnxruntime's execution providers for this variant's session, in "
        "priority order (empty for llama.cpp).")
    role: Literal["baseline", "candidate"] = Field(
        description="The baseline, or a candidate measured against it.")
    load: dict[str, object] = Field(description="LoadOptions used (threads, batch, ...).")
    size_bytes: int = Field(description="Size of the variant file.")
    sha256: str = Field(description="sha256 of the variant file.")
    bits_per_weight: float = Field(0.0, description="File bits per parameter.")
    tokens_per_second: float = Field(
        description="Completion tokens / wall time of the generations (prompt processing "
        "included: what an app waits for).")
    seconds_per_item: float = Field(description="Mean wall time per golden item.")
    seconds_total: float = Field(description="Generation wall time of the whole set.")
    overall: Rate = Field(description="Items passing every expected property.")
    properties: dict[str, Rate] = Field(description="Pass rate per property.")
    categories: dict[str, Rate] = Field(description="Pass rate per category.")
    items: list[ItemRun] = Field(description="Per-item results, in golden-file order.")


class LogitSummary(Strict):
    """Teacher-forced divergence from the baseline over a set of tokens."""

    tokens: int = Field(description="Completion tokens scored.")
    kl_mean: float = Field(description="Mean KL(baseline || candidate), nats.")
    kl_p99: float = Field(description="99th percentile of the per-token KL.")
    kl_max: float = Field(description="Largest per-token KL.")
    same_top: float = Field(description="Share of positions with the same top-1 token.")
    dp_mean: float = Field(description="Mean Δp of the baseline's chosen token.")
    dp_rms: float = Field(description="Root mean square of Δp.")
    dp_p01: float = Field(description="1st percentile of Δp (the degradation tail).")


class LogitSplit(Strict):
    all: LogitSummary | None = Field(description="Every completion token.")
    structured: LogitSummary | None = Field(
        description="Tokens inside JSON answers and tool-call JSON.")
    prose: LogitSummary | None = Field(description="Every other completion token.")


class PropertyDelta(Strict):
    baseline: Rate = Field(description="The baseline's pass rate on this property.")
    candidate: Rate = Field(description="The candidate's pass rate on this property.")
    drop: float = Field(description="baseline rate minus candidate rate (positive: worse).")
    worse: int = Field(description="Items passing on the baseline and failing here.")
    better: int = Field(description="Items failing on the baseline and passing here.")


class Flip(Strict):
    item_id: str = Field(description="The golden item.")
    category: str = Field(description="Its category.")
    direction: Literal["pass->fail", "fail->pass"] = Field(description="Which way it flipped.")
    properties: list[str] = Field(description="Properties whose outcome changed.")


class Comparison(Strict):
    """A candidate against the baseline on the same items: what a verdict is made from."""

    schema_version: int = Field(EVAL_SCHEMA_VERSION, description="Shape version.")
    baseline: str = Field(description="Baseline variant name.")
    candidate: str = Field(description="Candidate variant name.")
    n_items: int = Field(description="Items answered by both.")
    worse: int = Field(description="Items pass->fail (every property together).")
    better: int = Field(description="Items fail->pass.")
    mcnemar_p: float = Field(description="Exact McNemar p-value, two-sided.")
    mcnemar_p_worse: float = Field(description="One-sided p-value that the candidate is worse.")
    overall: PropertyDelta = Field(description="All properties together.")
    properties: dict[str, PropertyDelta] = Field(description="Per property.")
    categories: dict[str, PropertyDelta] = Field(description="Per category.")
    flips: list[Flip] = Field(description="Every item whose outcome changed.")
    logits: LogitSplit | None = Field(
        None, description="Teacher-forced divergence on the baseline's answers.")
    noise_floor: LogitSplit | None = Field(
        None, description="The same divergence for the baseline against itself.")


class GoldenInfo(Strict):
    path: str = Field(description="The golden file.")
    sha256: str = Field(description="sha256 of its text.")
    items: int = Field(description="Items evaluated.")
    total_items: int = Field(description="Items in the file.")
    sample: int | None = Field(description="--sample, if a subset ran.")
    seed: int = Field(description="Seed of the sample and the generation.")


class KernelPath(Strict):
    """Which kernels the runtimes ran: what a report measured besides the files."""

    llama_cpp_python: str = Field("", description="llama-cpp-python version (empty: absent).")
    llama_cpp_system_info: str = Field(
        "", description="llama.cpp's system info: the CPU features its build uses.")
    onnxruntime: str = Field("", description="onnxruntime version (empty: absent).")
    onnxruntime_providers: list[str] = Field(
        default_factory=list,
        description="Execution providers the ONNX variants' sessions ran on.")
    hidden_features: list[str] = Field(
        default_factory=list,
        description="Features /proc/cpuinfo lists but cpuid hides from the process: the "
        "host's, masked by an emulator (qemu-user) or a hypervisor. Non-empty means the "
        "kernels ran for the fingerprint's features, not the host's.")


class EvalReport(Strict):
    """The whole evaluation: ``quantfleet eval --json``."""

    schema_version: int = Field(REPORT_SCHEMA_VERSION,
                                description="Shape version (2 added hardware and kernels).")
    created_at: str = Field(description="UTC time the run finished.")
    command: str = Field(description="The command line that produced it.")
    hardware: HardwareFingerprint | None = Field(
        None, description="Where it was measured (absent in reports before version 2).")
    kernels: KernelPath | None = Field(
        None, description="The kernel path: runtime versions, llama.cpp's build features, "
        "onnxruntime's execution providers (absent before version 2).")
    golden: GoldenInfo = Field(description="What was evaluated.")
    baseline: str = Field(description="Baseline variant name.")
    variants: list[VariantResult] = Field(description="Every variant, baseline first.")
    comparisons: list[Comparison] = Field(description="Each candidate against the baseline.")
    noise_load: dict[str, object] | None = Field(
        None, description="LoadOptions of the baseline's noise-floor reload (None: not run).")
    kl_samples: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="Per variant, per split (structured, prose): per-token KL values, "
        "for plotting distributions.")
    seconds: float = Field(description="Wall time of the whole evaluation.")
    teacher_forcing_seconds: float | None = Field(
        None, description="Wall time of the teacher-forcing phase (all backends).")


class ReportFileError(ValueError):
    """A report file that cannot be read; the message names the file and what is wrong."""


def parse_report(text: str | bytes, where: str = "<report>") -> EvalReport:
    """An ``EvalReport`` from the text of ``quantfleet eval --json-out`` (or a bare report).

    Every problem is a ``ReportFileError`` naming ``where`` and the field:
    not JSON, not a report, a newer shape than this quantfleet reads, or a bad
    field (``report.variants.0.items.3.passed: Input should be a valid boolean``).
    """
    import json

    from pydantic import ValidationError

    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError: ValueError
        raise ReportFileError(f"{where}: not JSON ({exc})") from None
    prefix = ""
    if isinstance(doc, dict) and isinstance(doc.get("report"), dict):
        doc, prefix = doc["report"], "report."
    if not isinstance(doc, dict) or "variants" not in doc or "golden" not in doc:
        raise ReportFileError(f"{where}: not an evaluation report (expected the JSON of "
                              "`quantfleet eval --json-out`, with report.golden and "
                              "report.variants)")
    version = doc.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) \
            and version > REPORT_SCHEMA_VERSION:
        raise ReportFileError(f"{where}: {prefix}schema_version {version} is newer than this "
                              f"quantfleet reads (up to {REPORT_SCHEMA_VERSION}); upgrade it")
    try:
        return EvalReport.model_validate(doc)
    except ValidationError as exc:
        raise ReportFileError(f"{where}: {prefix}{explain(exc, rest='count')}") from None


def load_report(path: Path) -> EvalReport:
    """``parse_report`` of a file; an unreadable file is a ``ReportFileError`` too."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReportFileError(f"{path}: {exc.strerror or exc}") from None
    return parse_report(data, str(path))
