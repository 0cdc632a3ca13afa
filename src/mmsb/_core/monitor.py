"""Monitoring: counters and latency samples kept by a state, and the frozen
:class:`MMSBStats` snapshot that :func:`get_stats` returns."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, TextIO

import numpy as np

from ..errors import InvalidArgumentError
from .kernels import TOTAL_MAX, counter_consts

__all__ = ["MMSBStats", "Counters", "LatencyRing", "TOTAL_MAX"]


_RING = 4096
_ZEROS = bytes(8 * _RING)
"""A zero ring's bytes, copied into each new ring (a state makes four)."""


class LatencyRing:
    """The last ``capacity`` latency samples (ns) of one operation, plus exact totals.

    The ring and its four counters are plain arrays, never resized: the durable bus's
    compiled one-frame write records its samples through their addresses
    (:attr:`at`), without a call back into Python."""

    __slots__ = ("samples", "at")

    def __init__(self, capacity: int = _RING) -> None:
        self.samples = array("q", _ZEROS if capacity == _RING else bytes(8 * capacity))
        """The ring (a plain array: a store into it costs less than into numpy)."""
        self.at = array("q", bytes(32))
        """The counters: the next sample's place in the ring, the operations recorded,
        their total ns and the largest sample (:attr:`pos`, :attr:`count`,
        :attr:`total_ns`, :attr:`max_ns`). The total stops at :data:`TOTAL_MAX`."""

    @property
    def pos(self) -> int:
        """Where the next sample goes in :attr:`samples`."""
        return self.at[0]

    @pos.setter
    def pos(self, value: int) -> None:
        self.at[0] = value

    @property
    def count(self) -> int:
        """Operations recorded."""
        return self.at[1]

    @count.setter
    def count(self, value: int) -> None:
        self.at[1] = value

    @property
    def total_ns(self) -> int:
        """Their total time (ns)."""
        return self.at[2]

    @total_ns.setter
    def total_ns(self, value: int) -> None:
        self.at[2] = value

    @property
    def max_ns(self) -> int:
        """The largest sample (ns)."""
        return self.at[3]

    @max_ns.setter
    def max_ns(self, value: int) -> None:
        self.at[3] = value

    def add(self, ns: int) -> None:
        """Record one sample. O(1). (The one-frame writes' compiled calls do the same
        through :func:`~mmsb._core.kernels.ring_sample`: keep the two alike.)"""
        at = self.at
        samples = self.samples
        pos = at[0]
        samples[pos] = ns
        pos += 1
        at[0] = 0 if pos == len(samples) else pos
        at[1] += 1
        try:
            at[2] += ns
        except OverflowError:
            at[2] = TOTAL_MAX
        if ns > at[3]:
            at[3] = ns

    def add_many(self, total_ns: int, n: int) -> None:
        """Record ``n`` operations that took ``total_ns`` together (one sample of their
        mean). O(1)."""
        if n <= 0:
            return
        mean = total_ns // n
        at = self.at
        self.samples[at[0]] = mean
        at[0] = (at[0] + 1) % len(self.samples)
        at[1] += n
        try:
            at[2] += total_ns
        except OverflowError:
            at[2] = TOTAL_MAX
        if mean > at[3]:
            at[3] = mean

    def percentiles(self) -> tuple[float, float, float]:
        """p50, p90, p99 over the retained samples (0 when none)."""
        n = min(self.count, len(self.samples))
        if n == 0:
            return 0.0, 0.0, 0.0
        p = np.percentile(np.frombuffer(self.samples, np.int64, n), [50, 90, 99])
        return float(p[0]), float(p[1]), float(p[2])

    @property
    def avg(self) -> float:
        return self.total_ns / self.count if self.count else 0.0


class Counters:
    """The live counters of one state (mutated by the engine; read by get_stats)."""

    def __init__(self) -> None:
        self.logged = array("q", bytes(16))
        """:attr:`records_logged` and :attr:`payload_bytes_logged`, in a plain array
        that the durable bus's compiled one-frame write adds to through its address."""
        self.creations_logged = 0
        """Records logged by create_page's one-frame case, counted apart in a plain int
        (cheaper to add to than an element of :attr:`logged`);
        :attr:`records_logged` includes them."""
        self.deltas_logged = 0
        self.torn_tails_recovered = 0

    # The rings are made when first used (a state that is opened and only read makes
    # none); each is the same object from then on, so addresses taken of it hold.
    @cached_property
    def delta_apply(self) -> LatencyRing:
        """Deltas applied (writes and propagation)."""
        return LatencyRing()

    @cached_property
    def propagation(self) -> LatencyRing:
        """Propagation passes."""
        return LatencyRing()

    @cached_property
    def log_append(self) -> LatencyRing:
        """Appends to the log."""
        return LatencyRing()

    @cached_property
    def checkpoint(self) -> LatencyRing:
        """Checkpoints."""
        return LatencyRing()

    @cached_property
    def consts(self) -> np.ndarray:
        """The addresses through which the in-memory one-frame write's compiled call
        records its ``delta_apply`` sample and adds to :attr:`logged` (see
        :func:`~mmsb._core.kernels.counter_consts`)."""
        ring = self.delta_apply
        return counter_consts(ring.samples, ring.at, self.logged)

    @property
    def records_logged(self) -> int:
        """Records appended to the log."""
        return self.logged[0] + self.creations_logged

    @records_logged.setter
    def records_logged(self, value: int) -> None:
        self.logged[0] = value - self.creations_logged

    @property
    def payload_bytes_logged(self) -> int:
        """Bytes the logged deltas change."""
        return self.logged[1]

    @payload_bytes_logged.setter
    def payload_bytes_logged(self, value: int) -> None:
        self.logged[1] = value


@dataclass(frozen=True, slots=True)
class MMSBStats:
    """A snapshot of a state's size and activity. Every field is a plain number."""

    total_pages: int
    """Live pages."""
    cpu_pages: int
    """Live pages on the CPU."""
    gpu_pages: int
    """Live pages on a GPU."""
    unified_pages: int
    """Live pages in unified memory."""
    total_page_bytes: int
    """Sum of the live pages' sizes."""
    total_deltas: int
    """Deltas retained in the log."""
    total_delta_bytes: int
    """Bytes the retained deltas write (changed bytes, not payload memory)."""
    avg_delta_bytes: float
    """total_delta_bytes / total_deltas (0 when none)."""
    graph_nodes: int
    """Pages with at least one dependency edge."""
    graph_edges: int
    """Dependency edges."""
    graph_max_depth: int
    """Longest path of the graph, in edges."""
    delta_apply_count: int
    """Deltas applied since the last reset (writes and propagation)."""
    delta_apply_total_ns: int
    """Time spent in those applies (the whole write path under the lock), ns."""
    delta_apply_avg_ns: float
    """delta_apply_total_ns / delta_apply_count."""
    propagation_count: int
    """Propagation passes run since the last reset."""
    propagation_total_ns: int
    """Time spent propagating, ns."""
    propagation_avg_ns: float
    """propagation_total_ns / propagation_count."""
    delta_apply_p50_ns: float
    """Median write latency over the last 4096 writes."""
    delta_apply_p90_ns: float
    """90th percentile write latency."""
    delta_apply_p99_ns: float
    """99th percentile write latency."""
    delta_apply_max_ns: int
    """Slowest write since the last reset."""
    propagation_p50_ns: float
    """Median propagation pass latency."""
    propagation_p90_ns: float
    """90th percentile propagation latency."""
    propagation_p99_ns: float
    """99th percentile propagation latency."""
    propagation_max_ns: int
    """Slowest propagation pass."""
    log_append_count: int
    """Appends timed through the full append path since the last reset: structural
    records, every record of a durable bus (the write-ahead log included) and batch
    commits. An in-memory delta's append is an O(1) list append and is not timed."""
    log_append_p50_ns: float
    """Median time to append one record (incl. the write-ahead log when durable)."""
    log_append_p90_ns: float
    """90th percentile append time."""
    log_append_p99_ns: float
    """99th percentile append time."""
    log_append_max_ns: int
    """Slowest append since the last reset."""
    checkpoint_count: int
    """Checkpoints written since the last reset."""
    checkpoint_p50_ns: float
    """Median checkpoint time."""
    checkpoint_p90_ns: float
    """90th percentile checkpoint time."""
    checkpoint_p99_ns: float
    """99th percentile checkpoint time."""
    checkpoint_max_ns: int
    """Slowest checkpoint."""
    log_records: int
    """Records of every kind in the log (deltas and structural)."""
    log_bytes: int
    """Payload memory of the retained deltas."""
    last_lsn: int
    """LSN of the newest record."""
    records_logged: int
    """Records appended since the last reset."""
    payload_bytes_logged: int
    """Delta payload bytes appended since the last reset (changed values, or the full
    page for dense deltas)."""
    events_emitted: int
    """Events delivered since the last reset."""
    handler_errors: int
    """Event handlers that raised since the last reset."""
    torn_tails_recovered: int
    """Torn log tails cut off by recovery (durable buses)."""
    arena_bytes_in_use: int
    """Arena bytes held by live page slots (size classes included)."""
    arena_bytes_free: int
    """Arena bytes in free lists, ready for reuse."""
    arena_bytes_reserved: int
    """Arena buffer bytes (virtual; untouched memory is not resident)."""
    arena_fragmentation: float
    """Share of carved arena bytes not holding page bytes (slack + free + tail waste)."""
    cpu_page_bytes: int = 0
    """Sum of the sizes of the live cpu pages."""
    gpu_page_bytes: int = 0
    """Sum of the sizes of the live gpu pages (each also has a host mirror)."""
    unified_page_bytes: int = 0
    """Sum of the sizes of the live unified pages (each also has a host mirror)."""
    device_bytes_in_use: int = 0
    """Bytes of the device slots held by device copies, counted by size class, over
    every device backend (``get_device_stats`` has each backend's counters)."""
    device_stale_pages: int = 0
    """Live gpu and unified pages whose device copy is missing or behind their host
    mirror (brought up to date on their next device use); unified pages in managed
    memory have no device copy and are never counted."""
    unified_managed_bytes: int = 0
    """Bytes of the unified pages whose bytes live in managed memory (by size class)."""
    device_syncs: int = 0
    """Device syncs done (sync_page(s)_to_gpu, their async forms, GPU_SYNC edges); a
    refused one (a location not usable here, out of device memory) is not counted."""
    device_async_syncs: int = 0
    """Of device_syncs, the async ones."""
    device_pages_synced: int = 0
    """Device copies brought up to date from their host mirrors, by any device use."""
    device_bytes_synced: int = 0
    """Bytes copied from host mirrors into device copies, by any device use."""
    gpu_deltas_applied: int = 0
    """Deltas the gpu backend applied to device copies (writes of gpu pages through the
    general path; device-array writes)."""
    unified_deltas_applied: int = 0
    """Deltas the unified backend applied to device copies (only unified pages kept as
    a mirror and a copy: writes to unified pages in managed memory are the host's own
    writes of that memory, counted with every delta)."""
    unified_prefetches: int = 0
    """Prefetch calls on unified pages (prefetch_to_gpu, prefetch_to_cpu)."""
    unified_bytes_prefetched: int = 0
    """Bytes those prefetches covered."""
    unified_advices: int = 0
    """Memory-advice calls on unified pages (set_preferred_location, set_read_mostly)."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def render(self, file: TextIO | None = None) -> None:
        """Print as a table (rich).

        Raises:
            InvalidArgumentError: ``file`` is neither None nor something with a
                ``write``.
        """
        if file is not None and not callable(getattr(file, "write", None)):
            raise InvalidArgumentError(f"file= takes a text file (something with write()) "
                                       f"or None, not {type(file).__name__}")
        from rich.console import Console
        from rich.table import Table

        table = Table(title="MMSB statistics", show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in self.as_dict().items():
            if isinstance(value, float):
                text = f"{value:,.1f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
            else:
                text = f"{value:,}"
            table.add_row(name, text)
        Console(file=file, width=80, force_terminal=False, no_color=file is not None).print(table)
