"""``mmsb bench``: run the benchmark suite, compare, check SPEC.md's targets.

Attach to a click group with ``group.add_command(bench_command)``; ``benchmarks/run.py``
runs the same command stand-alone.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

__all__ = ["bench_command"]

BASELINE_RELPATH = Path("benchmarks") / "results" / "baseline.json"


def _categories_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[str] | None:
    from ._runner import parse_categories

    try:
        return parse_categories(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@click.command(
    "bench",
    help=(
        "Run MMSB's benchmark suite (and its peers: LMDB, SQLite, naive Python, numpy), "
        "print medians, and optionally save JSON, compare with a baseline, or check "
        "SPEC.md's performance targets."
    ),
)
@click.option(
    "--categories",
    envvar="MMSB_BENCH_CATEGORIES",
    callback=_categories_option,
    metavar="A,B",
    help=(
        "Comma-separated categories to run (default: all): allocation, delta, propagation, "
        "persistence, replay, stress, batch, durable, replication, memory, gpu, peers, instrumentation, "
        "langgraph. Also read from "
        "MMSB_BENCH_CATEGORIES."
    ),
)
@click.option("--smoke", is_flag=True, help="Tiny sizes, few repeats, no thresholds (CI).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results (with the environment) as JSON to this file.",
)
@click.option(
    "--compare",
    "compare_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A saved results JSON: print faster / slower / similar per case against it.",
)
@click.option(
    "--check-targets",
    is_flag=True,
    help="Print each SPEC.md target met or missed; exit 1 if any is missed.",
)
@click.option(
    "--save-baseline",
    is_flag=True,
    help=(
        "Save the results as the baseline: benchmarks/results/baseline.json of the "
        "checkout you run in, or the --out file. Cases of categories not run are kept."
    ),
)
@click.option(
    "--peers/--no-peers",
    default=None,
    help="Run (or leave out) the peer comparison; default: with the selected categories.",
)
@click.option("--list", "list_only", is_flag=True, help="List the cases and exit.")
def bench_command(
    categories: list[str] | None,
    smoke: bool,
    out: Path | None,
    compare_path: Path | None,
    check_targets: bool,
    save_baseline: bool,
    peers: bool | None,
    list_only: bool,
) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Logs and pipes: wide enough for the tables instead of rich's 80 columns.
        console = Console(highlight=False, width=180)
    if list_only:
        _list_cases(console, categories, peers)
        return
    try:
        import mmsb  # noqa: F401
    except Exception as exc:  # the package itself failing to import is the message
        raise click.ClickException(f"cannot import mmsb: {exc}") from exc

    from . import _results
    from ._report import compare_table, peers_table, results_table, targets_table
    from ._runner import run_suite, select
    from ._targets import check_targets as evaluate_targets

    baseline_doc: dict[str, Any] | None = None
    if compare_path is not None:
        try:
            baseline_doc = _results.load_results(compare_path)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc

    baseline_path: Path | None = None
    if save_baseline:
        baseline_path = out
        if baseline_path is None:
            root = _results.find_repo_root()
            if root is None:
                raise click.ClickException(
                    "--save-baseline: not inside the MMSB repository; pass --out FILE"
                )
            baseline_path = root / BASELINE_RELPATH

    doc = _run_with_progress(console, run_suite, select(categories, peers=peers), smoke)

    console.print(results_table(doc, compact=console.width < 150))
    errors = [k for k, r in doc["cases"].items() if r.get("status") == "error"]
    if doc.get("peer_ratios"):
        console.print(peers_table(doc["peer_ratios"]))
    if baseline_doc is not None:
        rows = _results.compare_results(doc, baseline_doc)
        console.print(compare_table(rows, str(compare_path)))
        counts = Counter(r.verdict for r in rows)
        console.print(
            ", ".join(
                f"{counts[v]} {v}"
                for v in ("faster", "slower", "similar", "new", "gone", "skipped")
                if counts[v]
            )
        )
        if baseline_doc.get("mode") != doc["mode"]:
            console.print(
                f"[yellow]note: baseline is a {baseline_doc.get('mode')} run, this is a "
                f"{doc['mode']} run; the numbers are not comparable[/]"
            )
        base_cpu = baseline_doc.get("environment", {}).get("cpu_model")
        if base_cpu and base_cpu != doc["environment"]["cpu_model"]:
            console.print(f"[yellow]note: baseline CPU was {base_cpu!r}[/]")

    missed: list[str] = []
    if check_targets:
        checks = evaluate_targets(doc)
        console.print(targets_table(checks, smoke=smoke))
        missed = [c.target.key for c in checks if c.failed]
        summary = Counter(c.status for c in checks)
        console.print(
            ", ".join(
                f"{summary[s]} {s}" for s in ("met", "missed", "error", "skipped") if summary[s]
            )
        )

    if out is not None and out != baseline_path:
        _results.save_results(doc, out)
        console.print(f"results written to {out}")
    if baseline_path is not None:
        old = None
        if baseline_path.exists():
            try:
                old = _results.load_results(baseline_path)
            except ValueError:
                old = None
        _results.save_results(_results.merge_baseline(old, doc), baseline_path)
        console.print(f"baseline written to {baseline_path}")
        if smoke:
            console.print("[yellow]note: this baseline holds smoke-mode numbers[/]")

    if errors:
        console.print(f"[bold red]{len(errors)} case(s) failed:[/] {', '.join(errors)}")
    if check_targets and missed and not smoke:
        console.print(f"[bold red]targets missed:[/] {', '.join(missed)}")
    if errors or (check_targets and missed and not smoke):
        sys.exit(1)


def _run_with_progress(
    console: Any, run_suite: Any, categories: list[str], smoke: bool
) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal or bool(os.environ.get("MMSB_BENCH_NO_PROGRESS")),
    )
    with progress:
        task = progress.add_task("benchmarks", total=None)

        def on_start(case: Any, i: int, total: int) -> None:
            progress.update(task, total=total, description=case.key)

        def on_done(result: Any, i: int, total: int) -> None:
            progress.advance(task)

        doc: dict[str, Any] = run_suite(
            categories, smoke=smoke, peers=None, on_start=on_start, on_done=on_done
        )
    return doc


def _list_cases(console: Any, categories: list[str] | None, peers: bool | None) -> None:
    from rich.table import Table

    from ._registry import cases_for
    from ._runner import select

    table = Table(title="MMSB benchmark cases")
    table.add_column("case", no_wrap=True)
    table.add_column("what it measures")
    for c in cases_for(select(categories, peers=peers)):
        table.add_row(c.key, c.description)
    console.print(table)
