"""What the demo's simulated devices do, measured on this machine.

The simulated devices stand in for more devices like the real agents. How often
one of them fails validation on a variant, and how fast it answers relative to
the baseline, is what that variant measurably does on this machine: its failure
rate on the starter golden set and its generation speed, from one evaluation
with the same runner as ``quantfleet eval`` (greedy, every item). Nothing is
injected.

Greedy decoding makes the result a function of the files and the CPU's kernels
only, so it is kept beside the ladder, keyed by both (the variants' sha256, the
golden set's, the hardware class, llama.cpp's kernels), and a later run on the
same machine with the same files reuses it instead of spending minutes again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError

from quantfleet.agent.backends import load_backend
from quantfleet.agent.hardware import fingerprint
from quantfleet.agent.quality.compare import compare_runs
from quantfleet.agent.quality.golden import load_golden, starter_golden_path
from quantfleet.agent.quality.results import Comparison, VariantResult
from quantfleet.agent.quality.runner import EvalOptions, VariantRun, run_items
from quantfleet.agent.wire import HardwareFingerprint
from quantfleet.models.catalog import Catalog, now_iso
from quantfleet.strict import Strict

#: One thread, as ``quantfleet eval`` does: llama.cpp's workers spin at barriers, so on a
#: machine with anything else running two threads are several times slower than one.
#: No teacher forcing: the devices are calibrated on what the variants answer, and the
#: KLD is the real agents' pre-flight's business.
OPTIONS = EvalOptions(threads=1, noise_floor=False, seed=0)
CALIBRATION_VERSION = 1


class CalibrationReport(Strict):
    """What the variants did on the golden set here; kept beside the ladder."""

    version: int = Field(CALIBRATION_VERSION, description="Shape version.")
    created_at: str = Field(description="UTC time the measurement finished.")
    hardware: HardwareFingerprint = Field(description="Where it was measured.")
    golden_sha256: str = Field(description="sha256 of the golden file.")
    items: int = Field(description="Items every variant answered.")
    variants: list[VariantResult] = Field(description="The baseline first.")
    comparisons: list[Comparison] = Field(description="Each other variant against it.")
    seconds: float = Field(description="Wall time of the measurement.")


@dataclass(frozen=True)
class Calibration:
    """A measurement of the demo's variants, and where it came from."""

    report: CalibrationReport
    path: Path
    reused: bool

    def variant(self, label: str) -> VariantResult:
        for v in self.report.variants:
            if v.precision == label:
                return v
        raise KeyError(f"the calibration has no {label}")

    def comparison(self, label: str) -> Comparison:
        name = self.variant(label).name
        return next(c for c in self.report.comparisons if c.candidate == name)

    def failure_rate(self, label: str) -> float:
        """Share of the golden items the variant failed here: its simulated devices'
        validation failure rate."""
        return 1.0 - self.variant(label).overall.rate

    def relative_latency(self, label: str) -> float:
        """How much longer the variant takes than the baseline for the same tokens."""
        base = self.report.variants[0].tokens_per_second
        return base / max(self.variant(label).tokens_per_second, 1e-9)


def _key(catalog: Catalog, labels: Sequence[str], golden_sha: str) -> str:
    hw = fingerprint()
    doc = {
        "version": CALIBRATION_VERSION,
        "variants": [catalog.resolve(label).sha256 for label in labels],
        "golden": golden_sha,
        "cpu_class": hw.cpu_class, "features": hw.features,
        "llama_cpp": hw.llama_cpp_system_info, "onnxruntime": hw.onnxruntime,
        "options": [OPTIONS.threads, OPTIONS.n_batch, OPTIONS.n_ctx, OPTIONS.seed],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _measure(catalog: Catalog, labels: Sequence[str], golden_sha: str,
             say: Callable[[str], None]) -> CalibrationReport:
    golden = load_golden(starter_golden_path())
    items = list(golden.items)
    started = time.perf_counter()
    runs: list[VariantRun] = []
    for i, label in enumerate(labels):
        entry = catalog.resolve(label)
        load = OPTIONS.load()
        backend = load_backend(entry.backend, entry.path(catalog.dir), load)
        try:
            say(f"{label}: answering {len(items)} golden items")
            item_runs, answers, seconds = run_items(backend, items, OPTIONS.seed)
        finally:
            backend.close()
        runs.append(VariantRun(name=entry.name, precision=entry.precision.label,
                               role="baseline" if i == 0 else "candidate", backend=backend,
                               load=load, runs=item_runs, answers=answers, seconds=seconds,
                               entry=entry))
    return CalibrationReport(
        created_at=now_iso(), hardware=fingerprint(), golden_sha256=golden_sha,
        items=len(items), variants=[r.result() for r in runs],
        comparisons=[compare_runs(runs[0].name, r.name, runs[0].runs, r.runs)
                     for r in runs[1:]],
        seconds=time.perf_counter() - started)


def calibrate(catalog: Catalog, labels: Sequence[str],
              progress: Callable[[str], None] | None = None) -> Calibration:
    """Measure ``labels`` (the first is the baseline) on the starter golden set, or reuse
    the measurement this machine already made of the same files."""
    golden_sha = hashlib.sha256(starter_golden_path().read_bytes()).hexdigest()
    path = catalog.dir / "calibration" / f"demo-{_key(catalog, labels, golden_sha)}.json"
    if path.exists():
        try:
            return Calibration(CalibrationReport.model_validate_json(path.read_text()), path,
                               True)
        except (ValidationError, ValueError, OSError):
            pass  # unreadable, or another shape: measure again
    report = _measure(catalog, labels, golden_sha, progress or (lambda _m: None))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(report.model_dump_json())
    tmp.replace(path)
    return Calibration(report, path, False)
