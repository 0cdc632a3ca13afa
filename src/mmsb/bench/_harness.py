"""The timing harness: warm-up, repeated timed batches, robust statistics.

A case hands the harness two callables. ``setup(n)`` builds whatever one batch needs
(a fresh state, a list of payloads …) and is never timed; ``batch(obj, n)`` performs
``n`` operations on it and is timed as a whole with :func:`time.perf_counter_ns`. One
sample is the batch time divided by ``n``, so the loop overhead of a ``for`` statement
(about 20 ns) is the only thing added to each operation. Batches are sized so that one
takes at least ``target_batch_ns`` (clock resolution and timer overhead stop mattering),
unless the case caps ``n`` because every operation grows memory (1 MiB deltas, say).

The garbage collector is disabled while a batch is timed, as :mod:`timeit` does, and
runs between batches; an optional extra batch under :mod:`tracemalloc` reports the bytes
and blocks each operation leaves allocated.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AllocStats",
    "HarnessSettings",
    "Measurement",
    "Stats",
    "measure",
    "measure_paired",
    "summarize",
]


@dataclass(frozen=True, slots=True)
class HarnessSettings:
    """How hard the harness works for one case."""

    repeats: int
    """Timed batches per case (samples), before the time budget cuts it short."""
    warmup: int
    """Untimed batches run at the final batch size before the first sample."""
    target_batch_ns: int
    """Batch size is grown until one batch takes at least this long."""
    min_samples: int
    """Samples always taken, even past ``case_budget_ns``."""
    case_budget_ns: int
    """Soft wall-clock budget per measurement; sampling stops once it is spent."""

    @classmethod
    def full(cls) -> HarnessSettings:
        return cls(
            repeats=31,
            warmup=2,
            target_batch_ns=5_000_000,
            min_samples=5,
            case_budget_ns=3_000_000_000,
        )

    @classmethod
    def smoke(cls) -> HarnessSettings:
        return cls(
            repeats=3,
            warmup=1,
            target_batch_ns=100_000,
            min_samples=2,
            case_budget_ns=150_000_000,
        )


@dataclass(frozen=True, slots=True)
class Stats:
    """Per-operation timing statistics, in nanoseconds."""

    median_ns: float
    """Median over samples: the headline number."""
    mean_ns: float
    """Arithmetic mean over samples."""
    min_ns: float
    """Fastest sample."""
    max_ns: float
    """Slowest sample."""
    stdev_ns: float
    """Sample standard deviation (0 with one sample)."""
    iqr_ns: float
    """Inter-quartile range (Q3 - Q1): the spread, robust to outliers."""
    samples: int
    """Number of timed batches."""
    ops_per_sample: int
    """Operations per timed batch."""

    def to_json(self) -> dict[str, float | int]:
        return {
            "median_ns": self.median_ns,
            "mean_ns": self.mean_ns,
            "min_ns": self.min_ns,
            "max_ns": self.max_ns,
            "stdev_ns": self.stdev_ns,
            "iqr_ns": self.iqr_ns,
            "samples": self.samples,
            "ops_per_sample": self.ops_per_sample,
        }


@dataclass(frozen=True, slots=True)
class AllocStats:
    """What one operation leaves allocated, from one batch under tracemalloc."""

    net_bytes_per_op: float
    """Bytes still allocated after the batch, per operation."""
    net_blocks_per_op: float
    """Memory blocks still allocated after the batch, per operation."""
    peak_bytes: int
    """Peak traced bytes during the batch, above where it started."""
    ops: int
    """Operations in the traced batch."""

    def to_json(self) -> dict[str, float | int]:
        return {
            "net_bytes_per_op": self.net_bytes_per_op,
            "net_blocks_per_op": self.net_blocks_per_op,
            "peak_bytes": self.peak_bytes,
            "ops": self.ops,
        }


@dataclass(frozen=True, slots=True)
class Measurement:
    """The outcome of :func:`measure`."""

    stats: Stats
    alloc: AllocStats | None = None
    samples_ns: tuple[float, ...] = field(default=(), repr=False)


def summarize(samples_ns: list[float], ops_per_sample: int) -> Stats:
    """Reduce per-operation samples (ns) to :class:`Stats`."""
    if not samples_ns:
        raise ValueError("summarize() needs at least one sample")
    ordered = sorted(samples_ns)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        stdev = statistics.stdev(ordered)
    else:
        q1 = q3 = ordered[0]
        stdev = 0.0
    return Stats(
        median_ns=statistics.median(ordered),
        mean_ns=statistics.fmean(ordered),
        min_ns=ordered[0],
        max_ns=ordered[-1],
        stdev_ns=stdev,
        iqr_ns=q3 - q1,
        samples=len(ordered),
        ops_per_sample=ops_per_sample,
    )


def _no_setup(n: int) -> None:
    return None


def _time_batch(
    batch: Callable[[Any, int], object],
    setup: Callable[[int], Any],
    teardown: Callable[[Any], object] | None,
    n: int,
) -> int:
    obj = setup(n)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        batch(obj, n)
        elapsed = time.perf_counter_ns() - t0
    finally:
        if gc_was_enabled:
            gc.enable()
    if teardown is not None:
        teardown(obj)
    return elapsed


def _trace_batch(
    batch: Callable[[Any, int], object],
    setup: Callable[[int], Any],
    teardown: Callable[[Any], object] | None,
    n: int,
) -> AllocStats:
    obj = setup(n)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        start_bytes, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        batch(obj, n)
        end_bytes, peak = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    diff = after.compare_to(before, "filename")
    blocks = sum(d.count_diff for d in diff)
    if teardown is not None:
        teardown(obj)
    return AllocStats(
        net_bytes_per_op=(end_bytes - start_bytes) / n,
        net_blocks_per_op=blocks / n,
        peak_bytes=max(0, peak - start_bytes),
        ops=n,
    )


def measure(
    batch: Callable[[Any, int], object],
    settings: HarnessSettings,
    *,
    setup: Callable[[int], Any] | None = None,
    teardown: Callable[[Any], object] | None = None,
    inner: int | None = None,
    max_inner: int = 1_000_000,
    repeats: int | None = None,
    trace_alloc: bool = False,
    trace_inner: int = 256,
) -> Measurement:
    """Time ``batch(setup(n), n)`` repeatedly; return per-operation statistics.

    ``inner`` fixes the operations per batch; otherwise it is calibrated (doubling,
    then extrapolating) until one batch takes ``settings.target_batch_ns``, never past
    ``max_inner``. ``repeats`` overrides ``settings.repeats`` for heavy cases. With
    ``trace_alloc``, one extra untimed batch of at most ``trace_inner`` operations runs
    under tracemalloc.
    """
    setup_fn: Callable[[int], Any] = setup if setup is not None else _no_setup
    gc.collect()
    if inner is None:
        _time_batch(batch, setup_fn, teardown, 1)  # cold caches must not stop calibration
        n = 1
        while True:
            elapsed = _time_batch(batch, setup_fn, teardown, n)
            if elapsed >= settings.target_batch_ns or n >= max_inner:
                break
            grow = settings.target_batch_ns / max(elapsed, 1) * 1.2
            n = min(max_inner, max(n * 2, min(n * 100, math.ceil(n * grow))))
    else:
        n = max(1, inner)
    for _ in range(settings.warmup):
        _time_batch(batch, setup_fn, teardown, n)

    wanted = repeats if repeats is not None else settings.repeats
    samples: list[float] = []
    started = time.perf_counter_ns()
    while len(samples) < wanted:
        samples.append(_time_batch(batch, setup_fn, teardown, n) / n)
        spent = time.perf_counter_ns() - started
        if len(samples) >= settings.min_samples and spent > settings.case_budget_ns:
            break

    alloc = None
    if trace_alloc:
        alloc = _trace_batch(batch, setup_fn, teardown, max(1, min(n, trace_inner)))
    return Measurement(stats=summarize(samples, n), alloc=alloc, samples_ns=tuple(samples))


def measure_paired(
    batches: list[Callable[[Any, int], object]],
    settings: HarnessSettings,
    *,
    repeats: int | None = None,
) -> list[Measurement]:
    """Time several one-operation batches in turn, one sample each per round, the order
    rotating each round (A, B, then B, A …).

    For same-run ratios of slow, noisy operations (a checkpoint against a raw write of
    the same bytes, both ending in fsync): drift in the machine (page cache write-back,
    another process) then hits every side alike, and so does running right after the
    other side (whose freed memory the allocator hands on: a list of a LangGraph
    thread's 500 checkpoints ran ~1.5 % slower second than first).
    """
    gc.collect()
    for batch in batches:
        for _ in range(max(1, settings.warmup)):
            _time_batch(batch, _no_setup, None, 1)
    wanted = repeats if repeats is not None else settings.repeats
    samples: list[list[float]] = [[] for _ in batches]
    started = time.perf_counter_ns()
    while len(samples[0]) < wanted:
        first = len(samples[0]) % len(batches)
        for k in range(len(batches)):
            i = (first + k) % len(batches)
            samples[i].append(float(_time_batch(batches[i], _no_setup, None, 1)))
        spent = time.perf_counter_ns() - started
        if len(samples[0]) >= settings.min_samples and spent > settings.case_budget_ns * 2:
            break
    return [Measurement(stats=summarize(s, 1), samples_ns=tuple(s)) for s in samples]
