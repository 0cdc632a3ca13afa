"""SPEC.md's *Performance targets* ("ours" column), as data, and the check against results.

A target is a quantity computed from case results (a median, a case metric, or a ratio
of two same-run numbers), a comparison and a threshold. :func:`check_targets` evaluates
every target against a results document (the JSON dict, or anything with ``"cases"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "TARGETS",
    "Median",
    "Metric",
    "Ratio",
    "Target",
    "TargetCheck",
    "check_targets",
]

Cases = Mapping[str, Mapping[str, Any]]


class _Missing(Exception):
    def __init__(self, key: str, status: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.status = status
        self.reason = reason


def _record(cases: Cases, key: str) -> Mapping[str, Any]:
    rec = cases.get(key)
    if rec is None:
        raise _Missing(key, "missing", f"{key} was not run")
    status = rec.get("status", "ok")
    if status != "ok":
        raise _Missing(key, status, f"{key} {status}: {rec.get('reason', '')}".rstrip(": "))
    return rec


@dataclass(frozen=True, slots=True)
class Median:
    """A case's median time per operation, in ns."""

    case: str

    def cases(self) -> tuple[str, ...]:
        return (self.case,)

    def evaluate(self, cases: Cases) -> float:
        return float(_record(cases, self.case)["median_ns"])

    def __str__(self) -> str:
        return f"median({self.case})"


@dataclass(frozen=True, slots=True)
class Metric:
    """A number a case reports in its ``metrics``."""

    case: str
    name: str

    def cases(self) -> tuple[str, ...]:
        return (self.case,)

    def evaluate(self, cases: Cases) -> float:
        rec = _record(cases, self.case)
        value = rec.get("metrics", {}).get(self.name)
        if not isinstance(value, int | float):
            raise _Missing(self.case, "error", f"{self.case} reports no metric {self.name!r}")
        return float(value)

    def __str__(self) -> str:
        return f"{self.case}.{self.name}"


@dataclass(frozen=True, slots=True)
class Ratio:
    """``numerator / denominator``, both from the same run."""

    numerator: Median | Metric
    denominator: Median | Metric

    def cases(self) -> tuple[str, ...]:
        return self.numerator.cases() + self.denominator.cases()

    def evaluate(self, cases: Cases) -> float:
        den = self.denominator.evaluate(cases)
        if den == 0:
            raise _Missing(str(self.denominator), "error", f"{self.denominator} is zero")
        return self.numerator.evaluate(cases) / den

    def __str__(self) -> str:
        return f"{self.numerator} / {self.denominator}"


Quantity = Median | Metric | Ratio


@dataclass(frozen=True, slots=True)
class Target:
    """One row of SPEC.md's table, in the form the benchmarks can check."""

    key: str
    """Short stable id."""
    benchmark: str
    """The row's name in SPEC.md (the name in its first column)."""
    spec: str
    """The "ours" cell, as SPEC.md words it."""
    quantity: Quantity
    """How the measured value is computed from the results."""
    op: str
    """``"<="`` or ``">="``: how measured compares with ``threshold`` when met."""
    threshold: float
    unit: str
    """``"ns"``, ``"x"`` (a ratio), ``"GB/s"``, ``"/s"``, ``"B"``, ``"MB"``."""
    seed: str = "—"
    """The target in SPEC.md's "seed target" column."""
    julia: str = "—"
    """The Julia build's measured baseline."""

    @property
    def how(self) -> str:
        return str(self.quantity)

    def met_by(self, value: float) -> bool:
        if self.op == "<=":
            return value <= self.threshold
        if self.op == ">=":
            return value >= self.threshold
        raise ValueError(f"unknown comparison {self.op!r}")


TARGETS: tuple[Target, ...] = (
    Target(
        "alloc_1kb_vs_naive",
        "allocation/cpu_1kb (create one 1 KiB page)",
        "≤ 1.5 × a naive dict + np.zeros registry, same run",
        Ratio(Median("allocation/cpu_1kb"), Median("allocation/naive_registry_1kb")),
        "<=",
        1.5,
        "x",
        seed="< 1 µs",
        julia="3.0 µs",
    ),
    Target(
        "alloc_1kb",
        "allocation/cpu_1kb (one create_page of 1 KiB)",
        "≤ 1 µs median",
        Median("allocation/cpu_1kb"),
        "<=",
        1_000,
        "ns",
        seed="< 1 µs",
        julia="3.0 µs",
    ),
    Target(
        "create_loop_1m_rss",
        "memory: 1,000,000 create_page(state, 64) calls in a loop",
        "≤ 96 MB of RSS in all",
        Metric("memory/create_page_loop_1m", "rss_growth_mb_per_million"),
        "<=",
        96,
        "MB",
    ),
    Target(
        "alloc_bulk_1kb",
        "allocation via create_pages(state, n, 1024), per page",
        "≤ 1 µs per page through a bulk create_pages",
        Median("allocation/bulk_1kb"),
        "<=",
        1_000,
        "ns",
        seed="< 1 µs",
        julia="3.0 µs",
    ),
    Target(
        "delta_sparse_1kb",
        "delta/cpu_sparse (1 KiB page, 1 % changed)",
        "≤ 10 µs",
        Median("delta/cpu_sparse_1kb"),
        "<=",
        10_000,
        "ns",
        seed="< 50 µs",
        julia="≈ 200 µs",
    ),
    Target(
        "delta_dense_1kb",
        "delta/cpu_dense (1 KiB page, all changed)",
        "≤ 15 µs",
        Median("delta/cpu_dense_1kb"),
        "<=",
        15_000,
        "ns",
        seed="< 500 µs",
    ),
    Target(
        "write_page_8b",
        "delta/write_page_8b (8 bytes into a 1 KiB page)",
        "≤ 2.5 µs median",
        Median("delta/write_page_8b"),
        "<=",
        2_500,
        "ns",
    ),
    Target(
        "write_tail_p999",
        "stress/write_tail_200k: p99.9 of 200,000 8-byte writes, default config",
        "≤ 50 µs",
        Metric("stress/write_tail_200k", "p999_ns"),
        "<=",
        50_000,
        "ns",
    ),
    Target(
        "write_tail_max",
        "stress/write_tail_200k: the longest single write (compaction included)",
        "≤ 1 ms: compaction never holds a user's call longer",
        Metric("stress/write_tail_200k", "max_ns"),
        "<=",
        1_000_000,
        "ns",
    ),
    Target(
        "log_bytes_per_small_write",
        "memory: RAM per logged 8-byte write, full history",
        "≤ 48 B beyond its changed bytes",
        Metric("memory/log_per_small_write", "bytes_per_write_beyond_changed"),
        "<=",
        48,
        "B",
    ),
    Target(
        "durable_log_bytes_per_small_write",
        "memory: RAM per retained record of a durable bus, full history",
        "≤ 64 B",
        Metric("memory/durable_log_per_small_write", "bytes_per_write"),
        "<=",
        64,
        "B",
    ),
    Target(
        "durable_history_2m_rss",
        "memory: a durable bus's RAM over 2,000,000 small writes, full history",
        "≤ 128 MB (64 B per retained record)",
        Metric("memory/durable_history_2m", "rss_growth_mb_per_2m"),
        "<=",
        128,
        "MB",
    ),
    Target(
        "delta_dense_1mb_vs_copy",
        "delta, 1 MiB page, all changed",
        "≤ 4 × one numpy copy of 1 MiB, same run",
        Ratio(Median("delta/cpu_dense_1mb"), Median("delta/numpy_copy_1mb")),
        "<=",
        4.0,
        "x",
    ),
    Target(
        "propagation_single_hop",
        "propagation/single_hop (update parent, child recomputed)",
        "≤ 10 µs",
        Median("propagation/single_hop"),
        "<=",
        10_000,
        "ns",
        seed="< 10 µs",
        julia="302 µs",
    ),
    Target(
        "propagation_chain_10",
        "propagation/chain_10",
        "≤ 150 µs",
        Median("propagation/chain_10"),
        "<=",
        150_000,
        "ns",
        julia="2.4 ms",
    ),
    Target(
        "time_travel_vs_sqlite",
        "time travel: one 1 KiB page at a past LSN (64 pages, 5,000 writes)",
        "≤ SQLite's indexed lookup of a stored whole version, same run",
        Ratio(Median("peers/read_page_at_mmsb"), Median("peers/read_version_sqlite")),
        "<=",
        1.0,
        "x",
    ),
    Target(
        "replay_to_lsn_64x1k",
        "replay_to_lsn (64 pages of 1 KiB, 5,000 writes of 64 B)",
        "≤ 1 ms",
        Median("replay/to_lsn_64x1k"),
        "<=",
        1_000_000,
        "ns",
    ),
    Target(
        "checkpoint_64mb_vs_raw",
        "persistence/checkpoint (64 MiB state)",
        "≥ 80 % of the throughput of writing the same bytes raw (temp file + rename), same run",
        Ratio(Median("persistence/raw_write_64mb"), Median("persistence/checkpoint_64mb")),
        ">=",
        0.8,
        "x",
        seed="> 100 MB/s",
        julia="0.34 ms / 100 pages",
    ),
    Target(
        "restore_100pages",
        "persistence/restore_100pages",
        "≤ 0.3 ms",
        Median("persistence/restore_100pages"),
        "<=",
        300_000,
        "ns",
        julia="0.83 ms",
    ),
    Target(
        "replay_1mb_gbps",
        "replay (1 MiB deltas)",
        "≥ 2 GB/s on 1 MiB deltas",
        Metric("replay/to_lsn_1mb_dense", "gb_per_s"),
        ">=",
        2.0,
        "GB/s",
        seed="> 1 GB/s",
        julia="28 µs / 100 epochs",
    ),
    Target(
        "replay_small_deltas",
        "replay (small deltas)",
        "≥ 1 M small deltas/s",
        Metric("replay/to_lsn_small_deltas", "deltas_per_s"),
        ">=",
        1_000_000,
        "/s",
        seed="> 1 GB/s",
    ),
    Target(
        "batch_small_deltas",
        "delta throughput, batch path",
        "apply_batch ≥ 2,000,000 small deltas/s on one core",
        Metric("batch/apply_batch_small", "deltas_per_s"),
        ">=",
        2_000_000,
        "/s",
    ),
    Target(
        "with_batch_small_deltas",
        "delta throughput, with batch(state)",
        "≥ 1,000,000 small deltas/s on one core",
        Metric("batch/with_batch_small", "deltas_per_s"),
        ">=",
        1_000_000,
        "/s",
    ),
    Target(
        "memory_1m_pages",
        "memory (1,000,000 pages of 64 B)",
        "≤ 1.5 × their bytes (96 MB) resident",
        Metric("memory/pages_1m_64b", "rss_ratio"),
        "<=",
        1.5,
        "x",
    ),
    Target(
        "gpu_delta_vs_copy",
        "GPU delta apply",
        "≥ 50 % of the device's copy bandwidth",
        Ratio(Metric("gpu/delta_dense_64mb", "gb_per_s"), Metric("gpu/copy_d2d_64mb", "gb_per_s")),
        ">=",
        0.5,
        "x",
        seed="> 10 GB/s",
    ),
    Target(
        "attach_read_1k",
        "durable/attach_read_1k: read a 1 KiB page of a bus another process writes",
        "≤ 1 µs median, never torn",
        Median("durable/attach_read_1k"),
        "<=",
        1_000,
        "ns",
    ),
    Target(
        "feed_latency_p50",
        "durable/feed_latency: a write in another process to its change-feed event, p50",
        "≤ 1 ms",
        Metric("durable/feed_latency", "p50_ns"),
        "<=",
        1_000_000,
        "ns",
    ),
    Target(
        "feed_latency_p99",
        "durable/feed_latency: p99",
        "≤ 10 ms",
        Metric("durable/feed_latency", "p99_ns"),
        "<=",
        10_000_000,
        "ns",
    ),
    Target(
        "reopen_after_kill",
        "durable/reopen_after_kill_100k: reopen after SIGKILL and read 64 pages",
        "≤ 2 × SQLite's open + read of the same pages, same run",
        Ratio(Median("durable/reopen_after_kill_100k"),
              Metric("durable/reopen_after_kill_100k", "sqlite_open_read_ns")),
        "<=",
        2.0,
        "x",
    ),
    Target(
        "durable_write_batch_vs_lmdb",
        "durable/append_batch vs durable/lmdb_put_nosync",
        "64 B write with fsync=\"batch\" ≤ LMDB sync=False, same run",
        Ratio(Median("durable/append_batch"), Median("durable/lmdb_put_nosync")),
        "<=",
        1.0,
        "x",
    ),
    Target(
        "durable_write_always_vs_lmdb",
        "durable/append_always vs durable/lmdb_put_sync",
        "64 B write with fsync=\"always\" ≤ LMDB sync=True, same run",
        Ratio(Median("durable/append_always"), Median("durable/lmdb_put_sync")),
        "<=",
        1.0,
        "x",
    ),
    Target(
        "replication_follower_apply",
        "replication/follower_apply: a follower applying a stream of small records",
        "≥ 200,000 records/s (applied, logged and synced, then acknowledged)",
        Metric("replication/follower_apply", "records_per_s"),
        ">=",
        200_000,
        "/s",
    ),
    Target(
        "instrument_calls_overhead",
        "instrumentation: call hooks on a module doing real work",
        "≤ 10 % overhead (a numpy pipeline, hook running against paused)",
        Metric("instrumentation/calls_numeric_pipeline", "overhead_ratio"),
        "<=",
        1.10,
        "x",
    ),
    Target(
        "instrument_disabled_overhead",
        "instrumentation: disabled",
        "0 when disabled (within 3 % run-to-run noise; nothing is installed)",
        Metric("instrumentation/disabled", "overhead_ratio"),
        "<=",
        1.03,
        "x",
    ),
    Target(
        "langgraph_put",
        "LangGraph checkpointer: put (500-step growing conversation)",
        "≤ SqliteSaver's, same run (both synced per put: MMSB fsync=\"always\", SQLite's "
        "default synchronous=FULL)",
        Ratio(Median("langgraph/put_always"), Median("langgraph/put_sqlite")),
        "<=",
        1.0,
        "x",
    ),
    Target(
        "langgraph_get_latest",
        "LangGraph checkpointer: get_tuple of the latest step",
        "≤ SqliteSaver's, same run",
        Ratio(Median("langgraph/get_latest"), Median("langgraph/get_latest_sqlite")),
        "<=",
        1.0,
        "x",
    ),
    Target(
        "langgraph_get_middle",
        "LangGraph checkpointer: get_tuple of the middle step",
        "≤ SqliteSaver's, same run",
        Ratio(Median("langgraph/get_middle"), Median("langgraph/get_middle_sqlite")),
        "<=",
        1.0,
        "x",
    ),
    Target(
        "langgraph_list",
        "LangGraph checkpointer: list of the whole history",
        "≤ SqliteSaver's, same run",
        Ratio(Median("langgraph/list_history"), Median("langgraph/list_history_sqlite")),
        "<=",
        1.0,
        "x",
    ),
    Target(
        "langgraph_disk",
        "LangGraph checkpointer: history on disk",
        "≤ 1/5 of SqliteSaver's file, same run",
        Metric("langgraph/reopen", "disk_ratio_to_sqlite"),
        "<=",
        0.2,
        "x",
    ),
)
"""SPEC.md's targets, in its table's order."""


class TargetCheck(NamedTuple):
    """One target against one run."""

    target: Target
    measured: float | None
    """The computed value; ``None`` when a needed case did not produce one."""
    met: bool
    status: str
    """``"met"``, ``"missed"``, ``"skipped"`` (a needed case skipped or its category not
    run) or ``"error"`` (a needed case failed). Only missed and error fail a check."""
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("missed", "error")


def _cases_of(results: Mapping[str, Any]) -> tuple[Cases, set[str] | None]:
    if "cases" in results and isinstance(results["cases"], Mapping):
        cats = results.get("categories")
        return results["cases"], (set(cats) if cats is not None else None)
    return results, None


def check_targets(results: Mapping[str, Any]) -> list[TargetCheck]:
    """Evaluate every target in :data:`TARGETS` against ``results``; one row each.

    ``results`` is a results document (``{"cases": {...}, "categories": [...]}``) or a
    plain mapping of case key to case record.
    """
    cases, categories = _cases_of(results)
    checks: list[TargetCheck] = []
    for target in TARGETS:
        try:
            value = target.quantity.evaluate(cases)
        except _Missing as miss:
            category = miss.key.split("/", 1)[0]
            if miss.status == "skipped":
                status = "skipped"
            elif miss.status == "missing" and (categories is None or category not in categories):
                status = "skipped"
            else:
                status = "error"
            checks.append(TargetCheck(target, None, False, status, miss.reason))
            continue
        met = target.met_by(value)
        checks.append(TargetCheck(target, value, met, "met" if met else "missed"))
    return checks
