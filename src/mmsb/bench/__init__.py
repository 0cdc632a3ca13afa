"""MMSB's benchmark suite: cases by category, a timing harness, SPEC.md targets, peers.

Run it with ``mmsb bench`` (see :mod:`mmsb.bench.command`) or ``python benchmarks/run.py``;
from code::

    from mmsb.bench import run_suite, check_targets
    doc = run_suite(["delta", "replay"], smoke=True)
    for check in check_targets(doc):
        print(check.target.key, check.measured, check.status)
"""

from ._harness import AllocStats, HarnessSettings, Measurement, Stats, measure, summarize
from ._registry import (
    CATEGORIES,
    BenchCheckError,
    Case,
    CaseOutcome,
    CaseResult,
    CaseSkipped,
    RunContext,
    all_cases,
    case,
    cases_for,
)
from ._results import (
    Comparison,
    compare_results,
    environment,
    load_results,
    merge_baseline,
    save_results,
)
from ._runner import parse_categories, run_case, run_suite
from ._targets import TARGETS, Target, TargetCheck, check_targets

__all__ = [
    "CATEGORIES",
    "TARGETS",
    "AllocStats",
    "BenchCheckError",
    "Case",
    "CaseOutcome",
    "CaseResult",
    "CaseSkipped",
    "Comparison",
    "HarnessSettings",
    "Measurement",
    "RunContext",
    "Stats",
    "Target",
    "TargetCheck",
    "all_cases",
    "case",
    "cases_for",
    "check_targets",
    "compare_results",
    "environment",
    "load_results",
    "measure",
    "merge_baseline",
    "parse_categories",
    "run_case",
    "run_suite",
    "save_results",
    "summarize",
]
