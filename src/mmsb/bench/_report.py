"""Rich tables for results, targets, peers and baseline comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from ._results import Comparison
from ._targets import TargetCheck

__all__ = [
    "compare_table",
    "fmt_bytes",
    "fmt_ns",
    "fmt_quantity",
    "peers_table",
    "results_table",
    "targets_table",
]


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "—"
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.3g} µs"
    if ns < 1e9:
        return f"{ns / 1e6:.3g} ms"
    return f"{ns / 1e9:.3g} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_rate(per_s: float) -> str:
    if per_s >= 1e6:
        return f"{per_s / 1e6:.3g} M/s"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.3g} k/s"
    return f"{per_s:.3g} /s"


def fmt_quantity(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ns":
        return fmt_ns(value)
    if unit == "x":
        return f"{value:.3g}×"
    if unit == "GB/s":
        return f"{value:.3g} GB/s"
    if unit == "/s":
        return fmt_rate(value)
    return f"{value:.4g} {unit}"


def _headline(metrics: Mapping[str, Any]) -> str:
    """The one derived number worth a column, if the case has one."""
    parts: list[str] = []
    if "gb_per_s" in metrics:
        parts.append(f"{metrics['gb_per_s']:.3g} GB/s")
    if "deltas_per_s" in metrics:
        parts.append(f"{fmt_rate(metrics['deltas_per_s'])} deltas")
    if "rss_bytes_per_page" in metrics:
        ratio = f" ({metrics['rss_ratio']:.2f}×)" if "rss_ratio" in metrics else ""
        parts.append(f"{metrics['rss_bytes_per_page']:.1f} B/page{ratio}")
    if "rss_growth_mb_per_2m" in metrics:
        per = metrics.get("bytes_per_record", metrics.get("bytes_per_write", 0.0))
        parts.append(f"{per:.1f} B/record, "
                     f"{metrics['rss_growth_mb_per_2m']:.1f} MB per 2 M records")
    if "bytes_per_write_beyond_changed" in metrics:
        parts.append(f"{metrics['bytes_per_write_beyond_changed']:.1f} B/write beyond its bytes")
    if "p999_ns" in metrics:
        parts.append(f"p99.9 {fmt_ns(metrics['p999_ns'])}, max {fmt_ns(metrics['max_ns'])}")
        if "rss_ratio_written" in metrics:
            parts.append(f"written once: {metrics['rss_ratio_written']:.2f}×")
    if "state_mb_per_s" in metrics:
        parts.append(f"{metrics['state_mb_per_s']:.0f} MB/s state")
    elif "file_mb_per_s" in metrics:
        parts.append(f"{metrics['file_mb_per_s']:.0f} MB/s")
    if "storage_bytes" in metrics:
        parts.append(f"history {fmt_bytes(metrics['storage_bytes'])}")
    if "records_per_s" in metrics:
        parts.append(f"{fmt_rate(metrics['records_per_s'])} records")
    if "mb_per_s" in metrics:
        parts.append(f"{metrics['mb_per_s']:.3g} MB/s")
    if "source" in metrics:
        parts.append(str(metrics["source"]))
    return "; ".join(parts)


_STATUS_STYLE = {"ok": "green", "skipped": "yellow", "error": "bold red"}


def results_table(doc: Mapping[str, Any], *, compact: bool = False) -> Table:
    """Every case: median, mean, min, max, IQR, samples, derived metric, allocations.

    ``compact`` (for narrow terminals) keeps only median, IQR, samples and derived.
    """
    table = Table(title=f"MMSB benchmarks ({doc.get('mode', 'full')} run)", show_lines=False)
    table.add_column("case", no_wrap=True)
    table.add_column("median", justify="right", no_wrap=True)
    wide = not compact
    if wide:
        table.add_column("mean", justify="right", no_wrap=True)
        table.add_column("min", justify="right", no_wrap=True)
        table.add_column("max", justify="right", no_wrap=True)
    table.add_column("IQR", justify="right", no_wrap=True)
    table.add_column("n×ops", justify="right", no_wrap=True)
    if wide:
        table.add_column("alloc/op", justify="right", no_wrap=True)
    table.add_column("derived")
    previous = None
    for key, rec in doc.get("cases", {}).items():
        if previous is not None and rec.get("category") != previous:
            table.add_section()
        previous = rec.get("category")
        status = rec.get("status", "ok")
        if status != "ok":
            reason = Text(f"{status}: {rec.get('reason', '')}", style=_STATUS_STYLE[status])
            blanks = [""] * (len(table.columns) - 3)
            table.add_row(key, "—", *blanks, reason)
            continue
        alloc = rec.get("alloc")
        cells: list[str | Text] = [key, Text(fmt_ns(rec["median_ns"]), style="bold")]
        if wide:
            cells += [fmt_ns(rec["mean_ns"]), fmt_ns(rec["min_ns"]), fmt_ns(rec["max_ns"])]
        cells += [fmt_ns(rec["iqr_ns"]), f"{rec['samples']}×{rec['ops_per_sample']}"]
        if wide:
            cells.append(fmt_bytes(alloc["net_bytes_per_op"]) if alloc else "")
        cells.append(_headline(rec.get("metrics", {})))
        table.add_row(*cells)
    return table


_TARGET_STYLE = {"met": "green", "missed": "bold red", "skipped": "yellow", "error": "bold red"}


def targets_table(checks: Sequence[TargetCheck], *, smoke: bool = False) -> Table:
    """SPEC.md's targets next to what this run measured."""
    title = "SPEC.md performance targets"
    if smoke:
        title += " (smoke sizes: informational only)"
    table = Table(title=title)
    table.add_column("benchmark")
    table.add_column("seed", justify="right")
    table.add_column("Julia", justify="right")
    table.add_column("ours (SPEC.md)")
    table.add_column("measured", justify="right")
    table.add_column("status")
    for check in checks:
        t = check.target
        status = Text(check.status, style=_TARGET_STYLE[check.status])
        if check.note:
            status.append(f" ({check.note})", style="dim")
        table.add_row(
            t.benchmark,
            t.seed,
            t.julia,
            t.spec,
            fmt_quantity(check.measured, t.unit),
            status,
        )
    return table


def peers_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Each metric against each peer: the peer's value and MMSB ÷ peer (< 1: MMSB wins)."""
    from .cases_peers import PEER_METRICS, PEERS

    table = Table(title="Peers, same workload (cell: value · MMSB ÷ peer; < 1 = MMSB better)")
    table.add_column("metric")
    for peer, label in PEERS.items():
        table.add_column(label if peer != "mmsb" else f"{label} (=1)", justify="right")
    by_key = {(r["metric"], r["peer"]): r for r in rows}
    for metric, label, _source in PEER_METRICS:
        cells: list[str | Text] = [label]
        for peer in PEERS:
            row = by_key.get((metric, peer))
            if row is None or row["value"] is None:
                cells.append(Text("skipped", style="yellow"))
                continue
            value = fmt_bytes(row["value"]) if metric == "storage" else fmt_ns(row["value"])
            ratio = row["ratio"]
            if peer == "mmsb" or ratio is None:
                cells.append(value)
            else:
                style = "green" if ratio < 1 else "red" if ratio > 1 else ""
                cell = Text(f"{value} · ")
                cell.append(f"{ratio:.3g}×", style=style)
                cells.append(cell)
        table.add_row(*cells)
    return table


_VERDICT_STYLE = {
    "faster": "green",
    "slower": "bold red",
    "similar": "",
    "new": "cyan",
    "gone": "yellow",
    "skipped": "dim",
}


def compare_table(rows: Sequence[Comparison], baseline_label: str) -> Table:
    table = Table(title=f"Against baseline {baseline_label} (faster < 0.9×, slower > 1.1×)")
    table.add_column("case", no_wrap=True)
    table.add_column("baseline", justify="right")
    table.add_column("now", justify="right")
    table.add_column("now ÷ baseline", justify="right")
    table.add_column("verdict")
    for row in rows:
        table.add_row(
            row.key,
            fmt_ns(row.baseline_ns),
            fmt_ns(row.current_ns),
            f"{row.ratio:.2f}×" if row.ratio is not None else "—",
            Text(row.verdict, style=_VERDICT_STYLE[row.verdict]),
        )
    return table
