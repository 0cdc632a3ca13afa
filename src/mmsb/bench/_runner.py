"""Run a selection of cases and assemble the results document."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._registry import CATEGORIES, Case, CaseResult, CaseSkipped, RunContext, cases_for
from ._results import SCHEMA_VERSION, environment
from ._targets import check_targets

__all__ = ["DEFAULT_CATEGORIES", "parse_categories", "run_case", "run_suite"]

ENV_CATEGORIES = "MMSB_BENCH_CATEGORIES"
DEFAULT_CATEGORIES: tuple[str, ...] = CATEGORIES
"""What runs when nothing is selected: everything (peers too)."""


def parse_categories(text: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` (or a list) -> validated category names in run order; ``None``/empty -> None."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [p.strip().lower() for p in parts if p.strip()]
    if not names:
        return None
    unknown = sorted(set(names) - set(CATEGORIES))
    if unknown:
        raise ValueError(
            f"unknown benchmark categor{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(repr(u) for u in unknown)}; choose from {', '.join(CATEGORIES)}"
        )
    return [c for c in CATEGORIES if c in names]


def run_case(case: Case, ctx: RunContext) -> CaseResult:
    """Run one case; a skip or an exception becomes the result's status, never a raise."""
    t0 = time.perf_counter()
    try:
        outcome = case.fn(ctx)
    except CaseSkipped as skip:
        return CaseResult(
            case.category,
            case.name,
            case.description,
            "skipped",
            str(skip),
            wall_s=time.perf_counter() - t0,
        )
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        reason = f"{type(exc).__name__}: {exc} ({os.path.basename(where.filename)}:{where.lineno})"
        return CaseResult(
            case.category,
            case.name,
            case.description,
            "error",
            reason,
            wall_s=time.perf_counter() - t0,
        )
    return CaseResult(
        case.category,
        case.name,
        case.description,
        "ok",
        measurement=outcome.measurement,
        metrics=outcome.metrics,
        wall_s=time.perf_counter() - t0,
    )


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine explains a slow run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def select(categories: Iterable[str] | None, *, peers: bool | None) -> list[str]:
    """The categories to run: the selection (default all), with peers forced on or off."""
    chosen = list(categories) if categories is not None else list(DEFAULT_CATEGORIES)
    if peers is True and "peers" not in chosen:
        chosen.append("peers")
    if peers is False:
        chosen = [c for c in chosen if c != "peers"]
    return [c for c in CATEGORIES if c in chosen]


def run_suite(
    categories: Iterable[str] | None = None,
    *,
    smoke: bool = False,
    peers: bool | None = None,
    seed: int = 20240601,
    on_start: Callable[[Case, int, int], object] | None = None,
    on_done: Callable[[CaseResult, int, int], object] | None = None,
) -> dict[str, Any]:
    """Run the selected categories and return the results document (JSON-ready).

    ``categories`` defaults to every category; ``peers`` True/False adds/removes the
    peers category; ``smoke`` runs tiny sizes and few repeats (for CI: checks that every
    case runs and gives sane bytes, not how fast). ``on_start``/``on_done`` get each case
    with its index and the total (the CLI's progress bar).
    """
    chosen = select(categories, peers=peers)
    cases = cases_for(chosen)
    load_start = _loadavg()
    ctx = RunContext(smoke=smoke, seed=seed)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for i, case in enumerate(cases):
            if on_start is not None:
                on_start(case, i, len(cases))
            result = run_case(case, ctx)
            results[result.key] = result.to_json()
            if on_done is not None:
                on_done(result, i, len(cases))
    finally:
        ctx.close()
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "mode": "smoke" if smoke else "full",
        "seed": seed,
        "environment": {**environment(), "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "categories": chosen,
        "wall_s": round(time.perf_counter() - started, 3),
        "cases": results,
    }
    doc["targets"] = [
        {
            "key": c.target.key,
            "benchmark": c.target.benchmark,
            "spec": c.target.spec,
            "how": c.target.how,
            "op": c.target.op,
            "threshold": c.target.threshold,
            "unit": c.target.unit,
            "measured": c.measured,
            "met": c.met,
            "status": c.status,
            "note": c.note,
        }
        for c in check_targets(doc)
    ]
    if "peers" in chosen:
        from .cases_peers import peer_ratios

        doc["peer_ratios"] = peer_ratios(results)
    return doc
