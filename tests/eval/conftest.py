"""Evaluation fixtures: one real evaluation of the ladder, shared by the session.

A seeded, stratified sample of the starter golden set runs on F16 (the
baseline), Q8_0 and Q2_K through the agent's serving pipeline, with teacher
forcing and the noise floor — the same ``evaluate`` the CLI runs. Tests of
the verdict, the report and the metrics read this one result.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from quantfleet.agent.quality.golden import GoldenSet, load_golden, starter_golden_path
from quantfleet.agent.quality.results import Comparison, EvalReport
from quantfleet.agent.quality.runner import EvalOptions, evaluate
from quantfleet.models.catalog import Catalog

SAMPLE = 10
SEED = 0


@pytest.fixture(scope="session")
def starter() -> GoldenSet:
    return load_golden(starter_golden_path())


@pytest.fixture(scope="session")
def evaluation(catalog: Catalog, starter: GoldenSet) -> EvalReport:
    """F16 vs Q8_0 vs Q2_K on SAMPLE starter items, for real."""
    return evaluate(catalog, starter, ["F16", "Q8_0", "Q2_K"], "F16",
                    options=EvalOptions(seed=SEED, noise_items=None), sample=SAMPLE)


def comparison(report: EvalReport, label: str) -> Comparison:
    return next(c for c in report.comparisons if c.candidate.endswith(label))


@pytest.fixture()
def golden_file(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write golden JSONL lines to a file; returns its path."""

    def write(*lines: str) -> Path:
        path = tmp_path / "golden.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return path

    return write
