"""The in-memory transaction log, kept as columns.

A delta is a row of a few typed columns (page, page size, epoch, timestamp, source,
payload place and encoding) and its payload sits in an append-only byte arena: a
contiguous write as one run (its start and its bytes), other sparse writes as their
positions and values, dense writes as the page's bytes. LSNs and delta ids are implied
by the row where they run in step, so they cost nothing until a structural record or
an out-of-order id breaks the step. Structural records (page creation, deletion,
resize, clone, migration, metadata, edges, compaction markers) are rare and stay as
objects; page creations that follow each other are kept as one run. A :class:`Delta`
object is built only when someone asks for one (``log.deltas[i]``, ``log.records``),
and every one built is a fresh, immutable copy of what the log holds.

Per-page indexes are arrays of row numbers, so a page's history is found without a
scan. Memory per logged small write: 39 bytes of columns, 4 of page index, the
payload (2 bytes of run start on a page of at most 64 KiB, plus the changed bytes, for
a contiguous write).

On a durable bus, a payload can stay where the bus's write-ahead log segment holds it:
the segment's read-only mapping is one of the log's chunks (:meth:`map_segment
<TransactionLog.map_segment>`) and the row (:data:`ENC_SEGRUN`) points at the run inside
the delta's frame (rows of the one-frame small write, and rows recovery replays from a
segment, :meth:`TransactionLog.point_at_segment`); the log then keeps the CRC32C of each such frame (4 bytes a row) and
checks the file's length and the frames' CRCs before reading them
(:meth:`TransactionLog.check_segments`), so a segment cut or rewritten under the bus is
refused, never read. Checkpoints and snapshots get those rows in the run encodings above.
"""

from __future__ import annotations

import bisect
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, overload

import numpy as np

from ..errors import SerializationError
from .arena import CHUNK_SHIFT, CHUNK_SIZE, Arena
from .delta import Delta
from .kernels import (
    CLOCK_GETTIME,
    CRC_TABLES,
    LOG_CHUNK,
    ROW_DTYPE,
    apply_log_rows_one,
    apply_rows_of_chunk,
    check_rows,
    check_segment_rows,
    entry_point,
    fill_log_rows,
    gather_converted,
    gather_payloads,
    group_encode,
    group_layout,
    mark_page_rows,
    mark_written,
    order_by_page,
    write_small,
    write_small_counted,
)
from .limits import MAX_COUNTER, MAX_PAGE_SIZE
from .page_table import LIVE, PageTable
from .records import AnyRecord, Compacted, PageCreate

__all__ = ["TransactionLog", "DeltaView", "RecordView", "PageDeltas", "LogColumns",
           "ColumnRecords", "join_records", "check_columns", "DeferredLog", "load_history"]

Sink = Callable[[AnyRecord], None]

# Payload encodings (the ``enc`` column).
ENC_RUN = 0
"""Sparse, one contiguous run: u32 start, then the values (pages over 64 KiB)."""
ENC_POS16 = 1
"""Sparse: u16 positions, then the values (pages of at most 65,536 bytes)."""
ENC_POS32 = 2
"""Sparse: u32 positions, then the values."""
ENC_FULL = 3
"""Dense, every byte written: the page's bytes."""
ENC_EXACT = 4
"""Dense: the page's whole content after the delta, then the mask as packed bits."""
ENC_MASKED = 5
"""Dense from a mask: full-length bytes (zero outside the mask), then packed bits."""
ENC_RUN16 = 6
"""Sparse, one contiguous run, page of at most 65,536 bytes: u16 start, then the
values."""
ENC_SEGRUN = 7
"""Sparse, one contiguous run, read from a log segment where the delta's frame holds
it: u32 start, u32 count, then the values (the payload is a mapped segment's bytes,
see :meth:`TransactionLog.map_segment`; never in a checkpoint, which gets the run
encodings above)."""


MAX_MAPPED_SEGMENTS = 64
"""Mapped segments a log keeps at most (each holds a descriptor, and the disk space of
a segment a checkpoint removed): past it, the oldest one's rows get their payloads
copied into memory (:meth:`TransactionLog.unmap_segment`)."""


class SegmentSource(Protocol):
    """A log segment whose mapping is one of a log's payload chunks
    (:meth:`TransactionLog.map_segment`)."""

    def readable(self) -> int:
        """The bytes of the file that hold frames the log points into, after checking
        that the file still holds them (else it raises
        :class:`~mmsb.errors.SerializationError`): reading the mapping past the file's
        end would kill the process (SIGBUS)."""
        ...

    @property
    def array(self) -> np.ndarray:
        """The mapping's bytes (the chunk's), as a read-only uint8 array."""
        ...


_CHUNK = LOG_CHUNK
_NO_CHUNK = np.zeros(0, np.uint8)
"""``cur_array`` of a log with no current payload chunk (empty: nothing is written
through it; shared by every such log)."""
"""Payload arena chunk (256 KiB: a fresh one is cheap to fault in); a payload over a
quarter of it gets a chunk of its own."""
_NO_SOURCE = 0xFFFF
_NO_ROWS = np.zeros(0, np.int64)
_ARRAY_DTYPES = {"I": np.uint32, "q": np.int64, "l": np.int_, "L": np.uint}
"""numpy dtypes of the typecodes of row-number arrays (array.array)."""
_U8 = np.dtype(np.uint8)
_CHECK_ENTRY: dict[int, Callable[..., Any]] = {}
"""The compiled entries of :func:`check_segment_rows` (0) and of
:func:`apply_rows_of_chunk` on a read-only payload chunk (1: a mapped segment, a chunk
over bytes) and on a writable one (2: the arena's) for the types the log passes
(numba's choice of a version costs about 2 µs a call with a structured array)."""
"""An empty row selection (check_segments of a row range)."""
_SMALL_ENTRY: dict[int, Callable[..., tuple[int, int]]] = {}
"""The compiled entries of :func:`write_small` for a write of ``bytes`` (1) and of a
writable C-contiguous uint8 array (2), and of :func:`write_small_counted` for a write
of ``bytes`` (3, only where libc's ``clock_gettime`` was found), set on first use."""
_NO_COUNTERS = np.zeros(8, np.int64)
"""Stands for a state's Counters.consts when the counted entry is compiled."""


class _Steps:
    """A map row → value that rises by one per row, except at recorded breaks: the
    LSNs and the delta ids of the delta rows. O(1) to extend, O(log breaks) to read."""

    __slots__ = ("rows", "vals", "last")

    def __init__(self) -> None:
        self.rows = array("q")
        self.vals = array("q")
        self.last = -2
        """Value of the newest row (-2: none)."""

    def at(self, row: int) -> int:
        j = bisect.bisect_right(self.rows, row) - 1
        return self.vals[j] + row - self.rows[j]

    def push(self, row: int, value: int) -> None:
        """Record that the new ``row`` has ``value`` (a break only where the step does
        not give it). O(1)."""
        if value != self.last + 1 or not row:
            self.rows.append(row)
            self.vals.append(value)
        self.last = value

    def find(self, value: int) -> int:
        """Number of rows whose value is ≤ ``value`` (values increase with rows)."""
        j = bisect.bisect_right(self.vals, value) - 1
        if j < 0:
            return 0
        end = self.rows[j + 1] if j + 1 < len(self.rows) else None
        k = self.rows[j] + value - self.vals[j] + 1
        return k if end is None or k < end else end

    def shifted(self, k: int, n: int) -> _Steps:
        """The map of rows ``k … n-1`` renumbered from 0."""
        out = _Steps()
        if k >= n:
            return out
        out.rows.append(0)
        out.vals.append(self.at(k))
        j = bisect.bisect_right(self.rows, k)
        for r, v in zip(self.rows[j:], self.vals[j:], strict=True):
            if r < n:
                out.rows.append(r - k)
                out.vals.append(v)
        out.last = self.at(n - 1)
        return out

    def nbytes(self) -> int:
        return 16 * len(self.rows)

    @classmethod
    def of_breaks(cls, rows: np.ndarray, vals: np.ndarray, last: int) -> _Steps:
        """The map whose breaks are at ``rows`` (ascending, from 0) with ``vals`` there
        (int64 each), and whose newest row has ``last``."""
        out = cls()
        out.rows.frombytes(rows.tobytes())
        out.vals.frombytes(vals.tobytes())
        out.last = last
        return out

    @classmethod
    def of(cls, values: np.ndarray) -> _Steps:
        """The map of rows ``0 … len(values)-1`` to ``values``. O(rows), vectorised."""
        out = cls()
        n = len(values)
        if n:
            out.rows.append(0)
            out.vals.append(int(values[0]))
            out.last = int(values[-1])
            brk = np.flatnonzero(values[1:] - values[:-1] != 1)
            if len(brk):
                brk += 1
                out.rows.frombytes(brk.astype(np.int64).tobytes())
                out.vals.frombytes(values[brk].astype(np.int64).tobytes())
        return out


class _CreateRun:
    """Single-page creations that followed each other (consecutive ids and LSNs, one
    size and location, no metadata): one object instead of one per page."""

    __slots__ = ("first_id", "size", "location", "lsn", "timestamp", "offsets")

    def __init__(self, rec: PageCreate) -> None:
        self.first_id = rec.first_id
        self.size = rec.size
        self.location = rec.location
        self.lsn = rec.lsn
        self.timestamp = rec.timestamp
        self.offsets = array("I", [0])
        """Nanoseconds of each creation after the first."""

    @property
    def count(self) -> int:
        return len(self.offsets)

    def take(self, rec: AnyRecord) -> bool:
        """Absorb ``rec`` if it is the next creation of this run."""
        if (type(rec) is not PageCreate or rec.count != 1 or rec.metadata
                or rec.size != self.size or rec.location != self.location):
            return False
        n = len(self.offsets)
        off = rec.timestamp - self.timestamp
        if rec.first_id != self.first_id + n or rec.lsn != self.lsn + n or not 0 <= off < 1 << 32:
            return False
        self.offsets.append(off)
        return True

    def record(self, k: int) -> PageCreate:
        return PageCreate(self.first_id + k, 1, self.size, self.location, None,
                          lsn=self.lsn + k, timestamp=self.timestamp + self.offsets[k])

    def records(self) -> list[AnyRecord]:
        return [self.record(k) for k in range(len(self.offsets))]

    def copy(self) -> _CreateRun:
        out = _CreateRun.__new__(_CreateRun)
        out.first_id, out.size, out.location = self.first_id, self.size, self.location
        out.lsn, out.timestamp, out.offsets = self.lsn, self.timestamp, array("I", self.offsets)
        return out


class DeltaGroup:
    """Sparse deltas a batch made, held as columns until the batch commits: delta
    ``k`` writes ``vals[bounds[k]:bounds[k+1]]`` at positions ``pos[...]`` of page
    ``pages[k]`` (of ``sizes[k]`` bytes), from epoch ``bases[k]`` to ``bases[k] + 1``,
    with LSN ``lsn + k`` and delta id ``first_id + k``, all at time ``ts``."""

    __slots__ = ("pages", "sizes", "bases", "pos", "vals", "bounds", "lsn", "ts", "first_id",
                 "source")

    def __init__(self, pages: np.ndarray, sizes: np.ndarray, bases: np.ndarray, pos: np.ndarray,
                 vals: np.ndarray, bounds: np.ndarray, lsn: int, ts: int, first_id: int,
                 source: str) -> None:
        self.pages = pages
        self.sizes = sizes
        self.bases = bases
        self.pos = pos
        self.vals = vals
        self.bounds = bounds
        self.lsn = lsn
        self.ts = ts
        self.first_id = first_id
        self.source = source

    def __len__(self) -> int:
        return len(self.pages)

    def deltas(self) -> list[Delta]:
        """The group as Delta objects (each a copy of its slice). O(deltas + bytes)."""
        b = self.bounds.tolist()
        return [Delta(self.first_id + k, p, e, e + 1, self.source, s,
                      self.pos[b[k]:b[k + 1]].copy(), self.vals[b[k]:b[k + 1]].copy(), None,
                      None, self.lsn + k, self.ts)
                for k, (p, e, s) in enumerate(zip(self.pages.tolist(), self.bases.tolist(),
                                                  self.sizes.tolist(), strict=True))]


@dataclass
class LogColumns:
    """The delta rows of a log as plain columns, with their payloads back to back and
    the structural records beside them: the form a checkpoint's log section holds
    (:meth:`TransactionLog.columns`, :meth:`TransactionLog.from_columns`). Row ``r``'s
    payload, in the log's encodings (``ENC_*``), is ``payload[offsets[r]:offsets[r] +
    plen[r]]`` with ``offsets`` the running sum of ``plen``."""

    lsn: np.ndarray
    """LSN of each row (int64)."""
    ids: np.ndarray
    """Delta id of each row (int64)."""
    epoch: np.ndarray
    """Page epoch after each row's delta (int64)."""
    ts: np.ndarray
    """Timestamp of each row (int64)."""
    page: np.ndarray
    """Page id of each row (int64)."""
    psize: np.ndarray
    """Page size each row was logged for (int64)."""
    plen: np.ndarray
    """Payload length of each row (int64)."""
    src: np.ndarray
    """Each row's source, an index into ``sources`` (int64)."""
    enc: np.ndarray
    """Payload encoding of each row (uint8)."""
    sources: list[str]
    base_rows: np.ndarray
    """Rows whose base epoch is not epoch − 1 (merged deltas), ascending (int64) …"""
    base_epochs: np.ndarray
    """… and their base epochs (int64)."""
    payload: np.ndarray
    """The rows' payloads back to back (uint8)."""
    structs: list[AnyRecord]
    """The structural records, in LSN order (a creation run one record per page)."""

    def __len__(self) -> int:
        return len(self.lsn)

    @classmethod
    def concat(cls, parts: Sequence[LogColumns]) -> LogColumns:
        """The rows and records of ``parts`` one after another (slices of one log in
        LSN order): columns concatenated, sources merged and renumbered. O(rows +
        payload bytes + sources)."""
        sources: list[str] = []
        index: dict[str, int] = {}
        srcs, bases_r, bases_e, structs = [], [], [], []
        at = 0
        for part in parts:
            lut = np.empty(len(part.sources), np.int64)
            for k, name in enumerate(part.sources):
                if name not in index:
                    index[name] = len(sources)
                    sources.append(name)
                lut[k] = index[name]
            srcs.append(lut[part.src] if len(lut) else part.src)
            bases_r.append(part.base_rows + at)
            bases_e.append(part.base_epochs)
            structs.extend(part.structs)
            at += len(part)

        def cat(name: str, dtype: Any) -> np.ndarray:
            arrays = [getattr(x, name) for x in parts]
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)

        return cls(cat("lsn", np.int64), cat("ids", np.int64), cat("epoch", np.int64),
                   cat("ts", np.int64), cat("page", np.int64), cat("psize", np.int64),
                   cat("plen", np.int64),
                   np.concatenate(srcs).astype(np.int64) if srcs else np.zeros(0, np.int64),
                   cat("enc", np.uint8), sources,
                   np.concatenate(bases_r).astype(np.int64) if parts else np.zeros(0, np.int64),
                   np.concatenate(bases_e).astype(np.int64) if parts else np.zeros(0, np.int64),
                   cat("payload", np.uint8), structs)


class ColumnRecords(Sequence[AnyRecord]):
    """Records held as :class:`LogColumns` (a decoded checkpoint's log section, a
    snapshot of a log): read-only, each record built on demand (from a log built from
    the columns once, when first read), and restored by building a log straight from
    the columns (:meth:`TransactionLog.from_columns`)."""

    def __init__(self, cols: LogColumns) -> None:
        self.cols = cols
        self._log: TransactionLog | None = None

    @property
    def log(self) -> TransactionLog:
        if self._log is None:
            self._log = TransactionLog.from_columns(self.cols)
        return self._log

    def __len__(self) -> int:
        return len(self.cols) + len(self.cols.structs)

    def first_lsn(self) -> int:
        """LSN of the oldest record (0 when there is none). O(1)."""
        c = self.cols
        out = [int(c.lsn[0])] if len(c) else []
        if c.structs:
            out.append(c.structs[0].lsn)
        return min(out, default=0)

    def last_lsn(self) -> int:
        """LSN of the newest record (0 when there is none). O(1)."""
        c = self.cols
        return max(int(c.lsn[-1]) if len(c) else 0, c.structs[-1].lsn if c.structs else 0)

    @overload
    def __getitem__(self, i: int) -> AnyRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[AnyRecord]: ...
    def __getitem__(self, i: int | slice) -> AnyRecord | list[AnyRecord]:
        return self.log.records[i]

    def __iter__(self) -> Iterator[AnyRecord]:
        return iter(self.log.records)


class TransactionLog:
    """All retained records of a state, in LSN order, as columns.

    ``deltas`` (the deltas alone), ``records`` (everything) and ``by_page`` are read-only
    views that build :class:`Delta` objects on demand. Appending a delta is O(its
    payload); reading one is O(log breaks + its payload).
    """

    def __init__(self) -> None:
        self.next_lsn = 1
        self.last_timestamp = 0
        self.horizon_lsn = 0
        """Replays can target LSNs ≥ this (0: the whole history is here)."""
        self.horizon_timestamp = 0
        """Timestamp of the record at the horizon (when history was trimmed there)."""
        self.sink: Sink | None = None
        """Called with each new record before it is kept (the write-ahead log)."""
        self.sink_many: Callable[[list[AnyRecord]], None] | None = None
        """Called with a batch's records in one go (group commit), when set."""
        self.generation = 0
        """Bumped each time the log's contents are replaced or rewritten (compression,
        trimming, a restored memento), so what was derived from them can tell."""
        self._clear()

    _index_parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    """What a log built by :meth:`from_columns` makes ``index`` from when it is first
    read: its rows ordered by page, where each page's rows start there (and the end),
    and the pages' ids."""

    @cached_property
    def index(self) -> dict[int, array[int]]:
        """page id → its delta rows, ascending. A log built from columns makes it the
        first time it is read, one array per page sliced from one array by C-level
        iteration; every other log holds it from the start."""
        parts = self._index_parts
        if parts is None:
            # Not a log that makes it on read: a deferred log, whose __getattr__ loads
            # its history on this error.
            raise AttributeError("index")
        order, bounds, keys = parts
        every = array("I", order.tobytes())
        b = bounds.tolist()
        index = dict(zip(keys.tolist(), map(every.__getitem__, map(slice, b, b[1:])),
                         strict=True))
        self._index_parts = None
        return index

    def _clear(self) -> None:
        self.generation += 1
        # delta rows
        self.rows = np.empty(1024, ROW_DTYPE)
        """Delta rows ``0 … n-1`` (capacity grows by doubling)."""
        self.n = 0
        self.lsns = _Steps()
        self.ids = _Steps()
        self.bases: dict[int, int] = {}
        """row → base epoch, where it is not epoch − 1 (merged deltas)."""
        self.rare_sources: dict[int, str] = {}
        self.sources: list[str] = []
        self.source_ids: dict[str, int] = {}
        self.index = {}
        if self._index_parts is not None:
            self._index_parts = None
        self.chunks: list[memoryview | None] = []
        self.segs: dict[int, SegmentSource] = {}
        """Payload chunks that are mapped log segments, by chunk number: the rows that
        point there (:data:`ENC_SEGRUN`) are checked against them before being read."""
        self.crcs: np.ndarray | None = None
        """uint32 per row, as long as ``rows``, when the log has segment chunks: the
        CRC32C of the frame an :data:`ENC_SEGRUN` row's payload lies in, as written (for
        a delta that recovery read inside a record group, the CRC32C of the same span
        of the group's bytes: the 8 bytes 12 before the delta's body, then the body,
        see :func:`~mmsb._core.kernels.check_segment_rows`)."""
        self.cur = -1
        """The shared chunk small payloads go to (-1: none yet)."""
        self.cur_array = _NO_CHUNK
        self.tail = _CHUNK
        # structural records, by first LSN
        self.structs: list[AnyRecord | _CreateRun] = []
        self.struct_lsn = array("q")
        self.struct_before = array("q")
        """Records the structural entries before each one stand for."""
        self.struct_count = 0
        """Records the structural entries stand for (a creation run counts its pages)."""
        self.payload_bytes = 0
        self.last_changed = 0
        self.last_counted = False
        """Whether the last write_small recorded the write's counters itself."""
        """Payload bytes of the delta the last write_small() logged (its values; the
        page's size for a dense one)."""

    # -- sizes and counters ----------------------------------------------------------
    @property
    def last_lsn(self) -> int:
        """LSN of the newest record; 0 when the log is empty."""
        return self.next_lsn - 1

    @property
    def record_count(self) -> int:
        return self.n + self.struct_count

    @property
    def bytes_logged(self) -> int:
        """Payload bytes of the retained deltas. O(1)."""
        return self.payload_bytes

    @property
    def nbytes(self) -> int:
        """Memory the log's columns, indexes and payload chunks hold. O(pages)."""
        cols = ROW_DTYPE.itemsize * self.n
        idx = sum(a.itemsize * len(a) for a in self.index.values())
        chunks = sum(c.nbytes for i, c in enumerate(self.chunks)
                     if c is not None and i not in self.segs)
        crcs = 4 * self.n if self.crcs is not None else 0
        return cols + idx + chunks + crcs + self.lsns.nbytes() + self.ids.nbytes()

    # -- stamping --------------------------------------------------------------------
    def stamp(self, rec: AnyRecord) -> None:
        """Give ``rec`` the next LSN and a timestamp that never decreases. O(1)."""
        rec.lsn = self.next_lsn
        ts = time.time_ns()
        if ts < self.last_timestamp:
            ts = self.last_timestamp
        rec.timestamp = ts

    def _next_stamp(self) -> tuple[int, int]:
        ts = time.time_ns()
        if ts < self.last_timestamp:
            ts = self.last_timestamp
        return self.next_lsn, ts

    # -- appending -------------------------------------------------------------------
    def append(self, rec: AnyRecord) -> None:
        """Stamp ``rec``, hand it to the sink (which may raise: then nothing changes), keep
        it. A delta is kept as a row and not stamped in place: the log holds a copy."""
        if type(rec) is Delta:
            lsn, ts = self._next_stamp()
            d = rec.stamped(lsn, ts)
            if self.sink is not None:
                self.sink(d)
            self.adopt(d)
            return
        self.stamp(rec)
        if self.sink is not None:
            try:
                self.sink(rec)
            except BaseException:
                rec.lsn = 0
                rec.timestamp = 0
                raise
        self.adopt(rec)

    def append_delta(self, d: Delta) -> tuple[int, int]:
        """append() for a fresh delta on a log without a sink; returns its LSN and
        timestamp. O(payload)."""
        lsn, ts = self._next_stamp()
        self._push_delta(d, lsn, ts)
        return lsn, ts

    def append_held(self, records: Sequence[AnyRecord | DeltaGroup]) -> None:
        """Keep records stamped earlier by a batch: the sink sees them in one call
        (and may raise: then none is kept)."""
        if not records:
            return
        if self.sink is not None or self.sink_many is not None:
            flat: list[AnyRecord] = []
            for item in records:
                if isinstance(item, DeltaGroup):
                    flat.extend(item.deltas())
                else:
                    flat.append(item)
            if self.sink_many is not None:
                self.sink_many(flat)
            elif self.sink is not None:
                for rec in flat:
                    self.sink(rec)
            records = flat
        for item in records:
            if isinstance(item, DeltaGroup):
                self._push_group(item)
            else:
                self.adopt(item)

    def _push_group(self, g: DeltaGroup) -> None:
        """Keep a batch's column group as rows, vectorised: a contiguous delta as one
        run, others as positions. O(deltas + bytes)."""
        k = len(g)
        if not k:
            return
        enc = np.empty(k, np.uint8)
        plen = np.empty(k, np.int64)
        total = group_layout(g.pos, g.bounds, g.sizes, enc, plen)
        offs = np.zeros(k + 1, np.int64)
        np.cumsum(plen, out=offs[1:])
        if total > _CHUNK >> 2:
            mv = memoryview(bytearray(total))
            self.chunks.append(mv)
            ci, base = len(self.chunks) - 1, 0
        else:
            mv, base, poff0 = self._room(total)
            ci = poff0 >> 32
        group_encode(g.pos, g.vals, g.bounds, enc, np.frombuffer(mv, np.uint8, total, base))
        r0 = self.n
        while self.n + k > len(self.rows):
            self._grow()
        rows = self.rows[r0:r0 + k]
        rows["page"] = g.pages
        rows["psize"] = g.sizes
        rows["plen"] = plen
        rows["src"] = self._source_id(g.source, r0)
        rows["enc"] = enc
        rows["epoch"] = g.bases + 1
        rows["ts"] = g.ts
        rows["poff"] = (ci << 32) + base + offs[:-1]
        if self.rows["src"][r0] == _NO_SOURCE:
            for r in range(r0 + 1, r0 + k):
                self.rare_sources[r] = g.source
        self.n = r0 + k
        self.lsns.push(r0, g.lsn)
        self.lsns.last = g.lsn + k - 1
        self.ids.push(r0, g.first_id)
        self.ids.last = g.first_id + k - 1
        top = int(g.pages.max())
        if top <= 4 * k + 65536:
            order = np.empty(k, np.int64)
            order_by_page(g.pages, top, order)
        else:  # ids spread too far for counting
            order = np.argsort(g.pages, kind="stable")
        sp = g.pages[order]
        cut = np.flatnonzero(sp[1:] != sp[:-1]) + 1
        rows_bytes = (order + r0).astype(np.uint32).tobytes()
        index = self.index
        lo = [0, *cut.tolist()]
        hi = [*cut.tolist(), k]
        for pid, a, z in zip(sp[lo].tolist(), lo, hi, strict=True):
            rows_of = index.get(pid)
            if rows_of is None:
                index[pid] = array("I", rows_bytes[4 * a:4 * z])
            else:
                rows_of.frombytes(rows_bytes[4 * a:4 * z])
        self.payload_bytes += total
        self.next_lsn = g.lsn + k
        self.last_timestamp = g.ts

    def adopt(self, rec: AnyRecord) -> None:
        """Keep an already-stamped record (replay, recovery, batches). O(1) plus the
        payload of a delta."""
        if type(rec) is Delta:
            self._push_delta(rec, rec.lsn, rec.timestamp)
            return
        self.next_lsn = rec.lsn + 1
        self.last_timestamp = rec.timestamp
        if self.structs:
            last = self.structs[-1]
            # A delta in between would have taken an LSN: take() sees the gap.
            if type(last) is _CreateRun and last.take(rec):
                self.struct_count += 1
                return
        if type(rec) is PageCreate and rec.count == 1 and not rec.metadata:
            self.structs.append(_CreateRun(rec))
        else:
            self.structs.append(rec)
        self.struct_lsn.append(rec.lsn)
        self.struct_before.append(self.struct_count)
        self.struct_count += 1
        if type(rec) is Compacted:
            self.horizon_lsn = rec.lsn

    def extend_creation(self, page_id: int, size: int, location: int) -> int:
        """Log the creation of the one page ``page_id`` (no metadata) by extending the
        open creation run, with no record object: what ``append(PageCreate(page_id, 1,
        size, location))`` keeps, for a log without a sink. Returns its LSN; 0 when the
        newest structural entry is not a run this creation continues (nothing changed:
        append the record instead). O(1)."""
        structs = self.structs
        if not structs:
            return 0
        run = structs[-1]
        if type(run) is not _CreateRun or run.size != size or run.location != location:
            return 0
        offsets = run.offsets
        n = len(offsets)
        lsn = self.next_lsn
        if page_id != run.first_id + n or lsn != run.lsn + n:
            return 0
        ts = time.time_ns()
        if ts < self.last_timestamp:
            ts = self.last_timestamp
        off = ts - run.timestamp
        if off >= 1 << 32:
            return 0
        offsets.append(off)
        self.struct_count += 1
        self.next_lsn = lsn + 1
        self.last_timestamp = ts
        return lsn

    def _new_chunk(self) -> None:
        # Not zeroed: every byte of a chunk is written before a row points at it, and a
        # zeroed 256 KiB costs its whole page-faulting up front (about 0.1 ms) where a
        # log that takes few records touches a page or two.
        buf = memoryview(np.empty(_CHUNK, np.uint8).data)
        self.chunks.append(buf)
        self.cur = len(self.chunks) - 1
        self.cur_array = np.frombuffer(buf, np.uint8)
        self.tail = 0

    def write_small(self, mem: np.ndarray, base: int, size: int, off: int,
                    new: bytes | np.ndarray, pid: int, epoch: int, delta_id: int,
                    source: str, consts: np.ndarray = _NO_COUNTERS, t0: int = -1) -> int:
        """Log and apply the write of ``new`` at ``off`` of the page of ``size`` bytes at
        ``mem[base:]`` as one delta to ``epoch``, in one compiled pass, encoded as
        ``append`` would keep the delta the write makes (sparse or dense). For a log
        without a sink. Returns the delta's LSN; 0 when no byte differs (nothing logged
        or written). O(len(new)), O(page size) for a dense write.

        With ``t0`` not negative and ``consts`` a state's :attr:`Counters.consts
        <mmsb._core.monitor.Counters.consts>`, the compiled call also records the write's
        counters (as :func:`~mmsb._core.kernels.write_small_counted` does) where it has
        an entry for ``new``'s type; :attr:`last_counted` says whether it did."""
        row = self.n
        if row == len(self.rows):
            self._grow()
        if self.cur < 0:
            self._new_chunk()
        ts = time.time_ns()
        if ts < self.last_timestamp:
            ts = self.last_timestamp
        lsn = self.next_lsn
        src = self.source_ids.get(source)
        if src is None:
            src = self._source_id(source, row)
        # bytes (the API's writes) and writable contiguous arrays (recomputed pages) go
        # through the kernel's compiled entry for their type directly.
        if type(new) is bytes:
            key = 1
        elif type(new) is np.ndarray and new.flags.c_contiguous and new.flags.writeable:
            key = 2
        else:
            key = 0
        # Entries 3 and 4: write_small_counted for bytes and for arrays.
        counting = _SMALL_ENTRY.get(key + 2) if t0 >= 0 and key else None
        while True:
            tail = self.tail
            if counting is not None:
                n, plen = counting(mem, base, size, off, new, self.rows, row, self.cur_array,
                                   tail, pid, epoch, ts, src, self.cur, consts, t0)
            else:
                n, plen = _SMALL_ENTRY.get(key, write_small)(
                    mem, base, size, off, new, self.rows, row, self.cur_array, tail, pid,
                    epoch, ts, src, self.cur)
            if n != -2:
                break
            self._new_chunk()
        self.last_counted = counting is not None
        if key and key not in _SMALL_ENTRY:
            _SMALL_ENTRY[key] = entry_point(write_small, mem, base, size, off, new, self.rows,
                                            row, self.cur_array, tail, pid, epoch, ts, src, 0)
            if CLOCK_GETTIME:
                # The entries that record the write's counters (MMSBState.write_small_bytes
                # takes the one for bytes), only compiled: they call libc through addresses.
                counted = entry_point(write_small_counted, mem, base, size, off, new,
                                      self.rows, row, self.cur_array, tail, pid, epoch, ts, src,
                                      0, _NO_COUNTERS, -1)
                if counted is not write_small_counted:
                    _SMALL_ENTRY[key + 2] = counted
        if n <= 0:
            return n
        # The payload bytes a delta counts: its values, or the page for a dense one.
        self.last_changed = n if n * 4 <= size else size
        self.tail = tail + plen
        # _note_row, inlined: the hot path of every small write.
        self.n = row + 1
        lsns = self.lsns
        if lsn != lsns.last + 1 or not row:
            lsns.rows.append(row)
            lsns.vals.append(lsn)
        lsns.last = lsn
        ids = self.ids
        if delta_id != ids.last + 1 or not row:
            ids.rows.append(row)
            ids.vals.append(delta_id)
        ids.last = delta_id
        rows = self.index.get(pid)
        if rows is None:
            self.index[pid] = array("I", [row])
        else:
            rows.append(row)
        self.payload_bytes += plen
        self.next_lsn = lsn + 1
        self.last_timestamp = ts
        return lsn

    def _grow(self) -> None:
        rows = np.empty(2 * len(self.rows), ROW_DTYPE)
        rows[: self.n] = self.rows[: self.n]
        self.rows = rows
        self._fit_crcs()

    def _fit_crcs(self) -> None:
        """Make ``crcs`` as long as ``rows`` (when the log has one)."""
        crcs = self.crcs
        if crcs is not None and len(crcs) != len(self.rows):
            out = np.zeros(len(self.rows), np.uint32)
            k = min(len(crcs), len(out))
            out[:k] = crcs[:k]
            self.crcs = out

    # -- payloads in mapped log segments -----------------------------------------------
    def map_segment(self, view: memoryview, source: SegmentSource) -> int:
        """Take ``view`` (a read-only mapping of a log segment, at most 4 GiB) as a
        payload chunk, checked through ``source`` before rows pointing into it are
        read; returns its chunk number. The writer then fills rows of encoding
        :data:`ENC_SEGRUN` pointing at the frames it appends there, and their CRCs in
        :attr:`crcs`. O(rows) the first time (the CRC column is made), else O(1)."""
        while len(self.segs) >= MAX_MAPPED_SEGMENTS:
            self.unmap_segment(min(self.segs))
        self.chunks.append(view)
        ci = len(self.chunks) - 1
        self.segs[ci] = source
        if self.crcs is None:
            self.crcs = np.zeros(len(self.rows), np.uint32)
        return ci

    def unmap_segment(self, ci: int) -> None:
        """Let go of the mapped segment chunk ``ci``: the rows that point there get
        their payloads copied into a chunk of memory (checked first, in the run
        encodings of memory), so the mapping and its file (kept open, even once a
        checkpoint removed it) go. O(rows + their payloads).

        Raises:
            SerializationError: the segment was cut or changed (nothing changed).
        """
        if ci not in self.segs:
            return
        n = self.n
        sel = np.flatnonzero((self.rows["enc"][:n] == ENC_SEGRUN)
                             & ((self.rows["poff"][:n] >> 32) == ci))
        if len(sel):
            self.check_segments(sel)
            rows = self.rows[sel]
            psize = rows["psize"].astype(np.int64)
            plen = rows["plen"].astype(np.int64)
            small = psize <= 1 << 16
            out_plen = plen - np.where(small, 6, 4)
            at = np.zeros(len(sel) + 1, np.int64)
            np.cumsum(out_plen, out=at[1:])
            buf = np.empty(int(at[-1]), np.uint8)
            gather_converted(self.segs[ci].array, rows["poff"] & 0xFFFFFFFF, plen,
                             np.ascontiguousarray(rows["enc"]), psize, buf, at[:-1])
            self.chunks.append(memoryview(buf.data))
            new = len(self.chunks) - 1
            col = self.rows
            col["poff"][sel] = (new << 32) | at[:-1]
            col["plen"][sel] = out_plen
            col["enc"][sel] = np.where(small, ENC_RUN16, ENC_RUN).astype(np.uint8)
            self.payload_bytes -= int(plen.sum() - out_plen.sum())
        del self.segs[ci]
        self.chunks[ci] = None

    def point_at_segment(self, r0: int, r1: int, keep: np.ndarray, at: np.ndarray,
                         crcs: np.ndarray, view: memoryview, source: SegmentSource) -> int:
        """Make the rows ``r0 … r1-1`` (just appended, their payloads in chunks that no
        other row uses, as :meth:`extend_from` of a log built by :meth:`from_columns`
        leaves them) read from a mapped log segment where they can: row ``r0 + i``
        with ``keep[i]`` is a one-run delta whose frame (CRC32C ``crcs[i]``) lies in
        the segment ``view`` maps (``source`` checks it), its run's start field at
        ``at[i]``: it becomes an :data:`ENC_SEGRUN` row pointing there (a delta inside
        a record group too: ``crcs[i]`` is then that of the same span of the group's
        bytes, see :attr:`crcs`). The other rows'
        payloads are copied into one chunk of their own, and the chunks the rows used
        are let go: what recovery keeps of a replayed segment is what a live bus kept
        of the same writes. Returns the rows pointed at the segment.

        The rows' runs are what the caller read from the same file (the frames checked
        then); the rows are checked against the mapping before they are read, as a
        live bus's are. O(rows + the other rows' payload bytes).
        """
        n = r1 - r0
        if n <= 0:
            return 0
        rows = self.rows[r0:r1]
        enc = rows["enc"]
        psize = rows["psize"].astype(np.int64)
        small = psize <= 1 << 16
        ok = (keep & ((enc == ENC_RUN16) & small | (enc == ENC_RUN) & ~small)
              & (rows["src"] != _NO_SOURCE) & (at >= 0) & (at < 1 << 32))
        sel = np.flatnonzero(ok)
        if not len(sel):
            return 0
        old = np.unique(rows["poff"] >> 32)
        ci = next((i for i, c in enumerate(self.chunks) if c is view), -1)
        if ci < 0 or ci not in self.segs:
            ci = self.map_segment(view, source)
        assert self.crcs is not None
        self._fit_crcs()
        plen = rows["plen"].astype(np.int64)
        new_plen = plen[sel] - np.where(small[sel], 2, 4) + 8
        # The other rows' payloads, gathered into a chunk of their own.
        rest = np.flatnonzero(~ok)
        if len(rest):
            poff = rows["poff"][rest]
            where = np.zeros(len(rest) + 1, np.int64)
            np.cumsum(plen[rest], out=where[1:])
            buf = np.empty(int(where[-1]), np.uint8)
            for c in np.unique(poff >> 32).tolist():
                part = np.flatnonzero((poff >> 32) == c)
                chunk = self.chunks[c]
                assert chunk is not None
                gather_payloads(np.frombuffer(chunk, np.uint8), poff[part] & 0xFFFFFFFF,
                                plen[rest][part], buf, where[part])
            self.chunks.append(memoryview(buf.data))
            rows["poff"][rest] = ((len(self.chunks) - 1) << 32) | where[:-1]
        rows["poff"][sel] = (ci << 32) | at[sel]
        rows["plen"][sel] = new_plen
        rows["enc"][sel] = ENC_SEGRUN
        self.crcs[r0 + sel] = crcs[sel]
        self.payload_bytes += int(new_plen.sum() - plen[sel].sum())
        for c in old.tolist():
            if c != ci and c not in self.segs and c != self.cur:
                self.chunks[c] = None
        return len(sel)

    def _source_lengths(self) -> np.ndarray:
        """The UTF-8 length of each numbered source's name (int64), as a frame holds it."""
        got = self.__dict__.get("_srclen")
        if got is None or len(got) != len(self.sources):
            got = np.array([len(x.encode("utf-8")) for x in self.sources], np.int64)
            self.__dict__["_srclen"] = got
        return got

    def check_segments(self, sel: np.ndarray | None = None, r0: int = 0,
                       r1: int | None = None) -> None:
        """Check the rows ``sel`` (row numbers; else rows ``r0 … r1-1``) whose payload is
        in a mapped segment before they are read: the segment file still holds their
        frames (a file cut under a mapping would kill the process on reading, SIGBUS)
        and each frame's CRC32C over its bytes in the mapping is the one the log noted
        when it wrote the frame, so a frame damaged or rewritten since (even with a
        valid checksum of its own) is refused rather than read. Nothing to do for a
        log without segment chunks. O(the rows + their frames' bytes).

        Raises:
            SerializationError: a segment was cut, replaced or changed under the log.
        """
        segs = self.segs
        if not segs or self.crcs is None:
            return
        if sel is None:
            r1 = self.n if r1 is None else min(r1, self.n)
            if r0 >= r1:
                return
            sel = _NO_ROWS
        elif not len(sel):
            return
        elif (sel.dtype != np.int64 or sel.ndim != 1 or not sel.flags.c_contiguous
              or not sel.flags.writeable):
            # The compiled entry takes exactly the types it was made for.
            sel = np.array(sel, np.int64).reshape(-1)
        check = _CHECK_ENTRY.get(0)
        if check is not None and len(segs) == 1:
            # One segment (the usual case), in one call.
            for ci, source in segs.items():
                bad, lo, hi = check(self.rows, sel, r0, r1 or 0, ci, source.array,
                                    self._source_lengths(), self.crcs, CRC_TABLES,
                                    source.readable())
                if bad < 0:
                    return
        # The newest segment first (reads are mostly of recent rows); the kernel tells
        # which other chunks the rows reach.
        todo = [max(segs)]
        seen: set[int] = set()
        while todo:
            ci = todo.pop()
            seen.add(ci)
            lo, hi = self._check_chunk(ci, segs[ci], sel, r0, r1 or 0)
            if lo >= 0 and (lo != ci or hi != ci) and not todo:
                todo = [c for c in segs if lo <= c <= hi and c not in seen]

    def _check_chunk(self, ci: int, source: SegmentSource, sel: np.ndarray, r0: int = 0,
                     r1: int = 0) -> tuple[int, int]:
        """:meth:`check_segments` of the rows ``sel`` (else ``r0 … r1-1``) whose payload
        lies in the mapped segment chunk ``ci``; ``sel`` is an int64, writable,
        contiguous 1-D array. Returns the lowest and highest chunk numbers of the
        segment rows met in any chunk (-1, -1: none).

        Raises:
            SerializationError: the segment was cut, replaced or changed under the log.
        """
        end = source.readable()
        args = (self.rows, sel, r0, r1, ci, source.array, self._source_lengths(),
                self.crcs, CRC_TABLES, end)
        check = _CHECK_ENTRY.get(0)
        if check is None:
            check = _CHECK_ENTRY[0] = entry_point(check_segment_rows, *args)
        bad, lo, hi = check(*args)
        if bad >= 0:
            at = int(self.rows["poff"][bad]) & 0xFFFFFFFF
            raise SerializationError(
                f"the frame of the delta at LSN {self.lsns.at(bad)} (page "
                f"{int(self.rows['page'][bad])}) no longer holds what the bus wrote "
                "there: the segment was changed or cut after it was written; its "
                "history cannot be read", path=getattr(source, "path", None), offset=at)
        return int(lo), int(hi)

    def _has_segment_rows(self, r0: int, r1: int) -> bool:
        return bool(self.segs) and bool((self.rows["enc"][r0:r1] == ENC_SEGRUN).any())

    def _source_id(self, source: str, row: int) -> int:
        sid = self.source_ids.get(source)
        if sid is None:
            if len(self.sources) >= _NO_SOURCE:
                self.rare_sources[row] = source
                return _NO_SOURCE
            sid = len(self.sources)
            self.sources.append(source)
            self.source_ids[source] = sid
        return sid

    def _room(self, n: int) -> tuple[memoryview, int, int]:
        """A place for ``n`` payload bytes: (chunk, offset in it, encoded offset).
        Chunks never grow or move, so views of them stay valid."""
        if n > _CHUNK >> 2:
            buf = memoryview(bytearray(n))
            self.chunks.append(buf)
            return buf, 0, (len(self.chunks) - 1) << 32
        if self.cur < 0 or self.tail + n > _CHUNK:
            self._new_chunk()
        ci = self.cur
        chunk = self.chunks[ci]
        assert chunk is not None
        off = self.tail
        self.tail = off + n
        return chunk, off, (ci << 32) | off

    def _push_delta(self, d: Delta, lsn: int, ts: int) -> None:
        row = self.n
        if row == len(self.rows):
            self._grow()
        size = d.page_size
        idx = d._idx
        if idx is not None:
            vals = d._vals
            n = len(vals)
            first = int(idx[0]) if n else 0
            if not n or int(idx[-1]) - first + 1 == n:
                enc, head = (ENC_RUN16, 2) if size <= 1 << 16 else (ENC_RUN, 4)
            elif size <= 1 << 16:
                enc, head = ENC_POS16, 2 * n
            else:
                enc, head = ENC_POS32, 4 * n
            plen = head + n
            chunk, off, poff = self._room(plen)
            if enc == ENC_RUN or enc == ENC_RUN16:
                chunk[off:off + head] = first.to_bytes(head, "little")
            else:
                chunk[off:off + head] = idx.astype(np.uint16 if enc == ENC_POS16 else np.uint32).view(np.uint8)
            chunk[off + head:off + plen] = vals
        else:
            data = d._data
            if d._mask is None:
                enc, plen = ENC_FULL, size
            else:
                enc = ENC_EXACT if d._exact else ENC_MASKED
                plen = size + (size + 7) // 8
            base = data.base if type(data) is np.ndarray else None
            if (enc == ENC_FULL and plen > _CHUNK >> 2 and type(base) is bytes
                    and data.nbytes == len(base)):
                # A large payload that is a whole bytes object (immutable): it becomes its
                # own chunk by reference, where a copy would fault in as much fresh memory.
                chunk, off = memoryview(base), 0
                self.chunks.append(chunk)
                poff = (len(self.chunks) - 1) << 32
            else:
                chunk, off, poff = self._room(plen)
                chunk[off:off + size] = data
            if d._mask is not None:
                chunk[off + size:off + plen] = np.packbits(d._mask).data
        pid = d.page_id
        self.rows[row] = (pid, size, plen, self._source_id(d.source, row), enc, d.epoch, ts, poff)
        if d.base_epoch != d.epoch - 1:
            self.bases[row] = d.base_epoch
        self._note_row(row, pid, plen, lsn, d.id, ts)

    def _note_row(self, row: int, pid: int, plen: int, lsn: int, delta_id: int, ts: int) -> None:
        """Count in the row just filled: its LSN and id, the page's index, the totals."""
        self.n = row + 1
        self.lsns.push(row, lsn)
        self.ids.push(row, delta_id)
        rows = self.index.get(pid)
        if rows is None:
            self.index[pid] = array("I", [row])
        else:
            rows.append(row)
        self.payload_bytes += plen
        self.next_lsn = lsn + 1
        self.last_timestamp = ts

    # -- reading ---------------------------------------------------------------------
    def delta_at(self, row: int, checked: bool = False) -> Delta:
        """The delta of ``row`` as a fresh, immutable object (``checked``: the caller
        has just checked the row with :meth:`check_segments`). O(log breaks +
        payload).

        Raises:
            SerializationError: the row's frame in a mapped segment is damaged or cut.
        """
        pid, size, plen, sid, enc, epoch, ts, poff = self.rows[row].item()
        if enc == ENC_SEGRUN and not checked:
            self.check_segments(np.array([row], np.int64))
        chunk = self.chunks[poff >> 32]
        assert chunk is not None
        off = poff & 0xFFFFFFFF
        raw = np.frombuffer(chunk, np.uint8, plen, off)
        idx = vals = data = mask = None
        if enc == ENC_RUN or enc == ENC_RUN16 or enc == ENC_SEGRUN:
            head = 4 if enc == ENC_RUN else (2 if enc == ENC_RUN16 else 8)
            first = int.from_bytes(raw[:min(head, 4)].tobytes(), "little")
            vals = raw[head:].copy()
            idx = np.arange(first, first + len(vals), dtype=np.intp)
        elif enc == ENC_POS16 or enc == ENC_POS32:
            w = 2 if enc == ENC_POS16 else 4
            n = plen // (w + 1)
            idx = raw[:w * n].view(np.uint16 if w == 2 else np.uint32).astype(np.intp)
            vals = raw[w * n:].copy()
        elif enc == ENC_FULL:
            data = raw.copy() if plen <= _CHUNK >> 2 else raw
        else:
            data = raw[:size].copy() if plen <= _CHUNK >> 2 else raw[:size]
            mask = np.unpackbits(raw[size:], count=size).astype(bool)
        if data is not None:
            data.flags.writeable = False
        source = self.rare_sources[row] if sid == _NO_SOURCE else self.sources[sid]
        return Delta(self.ids.at(row), pid, self.bases.get(row, epoch - 1), epoch,
                     source, size, idx, vals, data, mask, lsn=self.lsns.at(row),
                     timestamp=ts, exact=enc == ENC_EXACT)

    def rows_through(self, lsn: int) -> int:
        """Number of delta rows with LSN ≤ ``lsn``. O(log breaks)."""
        return min(self.lsns.find(lsn), self.n) if self.n else 0

    def _structs_through(self, lsn: int) -> int:
        """Structural records (creation runs counted page by page) with LSN ≤ ``lsn``.
        O(log n)."""
        j = bisect.bisect_right(self.struct_lsn, lsn)
        if not j:
            return 0
        last = self.structs[j - 1]
        own = min(last.count, lsn - last.lsn + 1) if type(last) is _CreateRun else 1
        return self.struct_before[j - 1] + own

    def index_after_lsn(self, lsn: int) -> int:
        """Number of records with LSN ≤ ``lsn``. O(log n) (plus creation runs)."""
        return self.rows_through(lsn) + self._structs_through(lsn)

    def iter_records(self, start: int = 0, stop: int | None = None) -> Iterator[AnyRecord]:
        """Records with ``start`` < LSN ≤ ``stop`` (all by default), in LSN order, built
        on demand. O(records yielded)."""
        hi = self.last_lsn if stop is None else stop
        r = self.rows_through(start)
        nr = self.rows_through(hi)
        lsns = self.lsns

        def structural() -> Iterator[AnyRecord]:
            j = max(0, bisect.bisect_right(self.struct_lsn, start) - 1)
            for s in self.structs[j:]:
                if isinstance(s, _CreateRun):
                    if s.lsn > hi:
                        return
                    for k in range(max(0, start + 1 - s.lsn), min(s.count, hi + 1 - s.lsn)):
                        yield s.record(k)
                elif s.lsn > hi:
                    return
                elif s.lsn > start:
                    yield s

        it = structural()
        nxt = next(it, None)
        # Rows in mapped segments are checked a block at a time, just before they are read.
        checked = r if self.segs else nr
        while r < nr or nxt is not None:
            if r < nr and (nxt is None or lsns.at(r) < nxt.lsn):
                if r >= checked:
                    checked = min(nr, r + 4096)
                    self.check_segments(r0=r, r1=checked)
                yield self.delta_at(r, True)
                r += 1
            else:
                assert nxt is not None
                yield nxt
                nxt = next(it, None)

    @property
    def records(self) -> RecordView:
        return RecordView(self)

    @property
    def deltas(self) -> DeltaView:
        return DeltaView(self)

    @property
    def by_page(self) -> _ByPage:
        return _ByPage(self)

    def written_masks(self, page_ids: Sequence[int], sizes: Sequence[int],
                      after_lsns: Sequence[int]) -> list[np.ndarray]:
        """For each page, one bool per byte of its ``size``: where its retained deltas
        with LSN > its ``after_lsn`` write (positions past the size ignored). The rows
        come from the pages' indexes, or from one scan of the columns when the pages
        hold most of the log (compaction); then one compiled pass per payload chunk.
        O(the pages' rows + their payload bytes)."""
        bounds = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(np.asarray(sizes, np.int64), out=bounds[1:])
        out = np.zeros(int(bounds[-1]), dtype=bool)
        n = self.n
        if not n or not page_ids:
            return [out[bounds[k]:bounds[k + 1]] for k in range(len(sizes))]
        first_row = np.array([self.rows_through(a) if a else 0 for a in after_lsns], np.int64)
        indexes = [self.index.get(pid) for pid in page_ids]
        wanted = sum(len(rows) for rows in indexes if rows)
        sel: slice | np.ndarray
        if wanted * 4 < n:
            parts = [np.frombuffer(rows, np.uint32).astype(np.int64) if rows else
                     np.zeros(0, np.int64) for rows in indexes]
            owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
            sel = np.concatenate(parts)
            keep = sel >= first_row[owner]
            sel, owner = sel[keep], owner[keep]
        else:
            pages = self.rows["page"][:n]
            pids = np.asarray(page_ids, np.int64)
            slot = np.full(max(int(pids.max()), int(pages.max())) + 1, -1, np.int64)
            slot[pids] = np.arange(len(pids))
            own = slot[pages]
            keep = own >= 0
            keep[keep] = np.arange(n)[keep] >= first_row[own[keep]]
            sel = slice(None) if keep.all() else np.flatnonzero(keep)
            owner = own[sel]
        # Field by field: a gather of whole packed rows is far slower than of columns.
        rows = self.rows
        if self.segs:
            self.check_segments(np.arange(n, dtype=np.int64)[sel])
        self._mark(rows["poff"][:n][sel], rows["plen"][:n][sel], rows["enc"][:n][sel],
                   rows["psize"][:n][sel], owner, bounds, np.asarray(sizes, np.int64), out)
        return [out[bounds[k]:bounds[k + 1]] for k in range(len(sizes))]

    def rows_masks(self, page_ids: Sequence[int], sizes: Any, starts: Sequence[int],
                   stop: int) -> tuple[np.ndarray, np.ndarray]:
        """For each page ``k``, one bool per byte of its ``sizes[k]``: where its delta
        rows from ``starts[k]`` up to (not including) row ``stop`` write (positions past
        the size ignored), all in one buffer: returns it and the pages' bounds in it
        (page ``k`` is ``out[bounds[k]:bounds[k + 1]]``). One compiled scan of the rows
        from the smallest start per payload chunk they use, reading the columns in
        place (:func:`~mmsb._core.kernels.mark_page_rows`). O(rows scanned + their
        payload bytes + the pages' sizes)."""
        lens = np.asarray(sizes, np.int64)
        bounds = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=bounds[1:])
        out = np.zeros(int(bounds[-1]), dtype=bool)
        if not len(lens):
            return out, bounds
        first = np.asarray(starts, np.int64)
        r0, r1 = max(0, int(first.min())), min(stop, self.n)
        if r0 >= r1:
            return out, bounds
        pids = np.asarray(page_ids, np.int64)
        # page id → 1 + its place (0: not asked for); zero memory is mapped lazily, so a
        # few pages of a large id space cost little.
        slot = np.zeros(int(pids.max()) + 1, np.int32)
        slot[pids] = np.arange(1, len(pids) + 1, dtype=np.int32)
        self.check_segments(r0=r0, r1=r1)
        for ci in self._chunks_of(r0, r1):
            chunk = self.chunks[ci]
            if chunk is None:
                continue
            mark_page_rows(self.rows, r0, r1, ci, np.frombuffer(chunk, np.uint8), slot, first,
                           out, bounds, lens)
        return out, bounds

    def scan_masks(self, r0: int, r1: int, slot: np.ndarray, starts: np.ndarray,
                   out: np.ndarray, bounds: np.ndarray) -> None:
        """Mark in ``out`` what rows ``r0 … r1-1`` write: a row of page ``p`` with
        ``k = slot[p] - 1 ≥ 0``, at or after row ``starts[k]``, into ``out[bounds[k]:
        bounds[k + 1]]``. One compiled scan per payload chunk the rows use, reading the
        columns in place. O(rows + their payload bytes)."""
        if r0 >= r1:
            return
        lens = np.diff(bounds)
        self.check_segments(r0=r0, r1=r1)
        for ci in self._chunks_of(r0, r1):
            chunk = self.chunks[ci]
            if chunk is not None:
                mark_page_rows(self.rows, r0, r1, ci, np.frombuffer(chunk, np.uint8), slot,
                               starts, out, bounds, lens)

    def _chunks_of(self, r0: int, r1: int) -> list[int]:
        """The payload chunks rows ``r0 … r1-1`` use, ascending (a chunk let go is
        never one: no row points there). O(rows)."""
        ci = self.rows["poff"][r0:r1] >> 32
        lo, hi = int(ci.min()), int(ci.max())
        if hi - lo < 4:
            chunks = self.chunks
            return [c for c in range(lo, hi + 1) if chunks[c] is not None]
        return np.unique(ci).tolist()

    def _mark(self, poff: np.ndarray, plen: np.ndarray, enc: np.ndarray, psize: np.ndarray,
              owner: np.ndarray, bounds: np.ndarray, lens: np.ndarray, out: np.ndarray) -> None:
        """Set in ``out`` the positions each row writes, row ``r`` into the mask of its
        page ``owner[r]`` (at ``bounds[owner]``, ``lens[owner]`` long), one compiled
        pass per payload chunk."""
        if not len(poff):
            return
        poff = np.ascontiguousarray(poff)
        plen = plen.astype(np.int64)
        enc = np.ascontiguousarray(enc)
        psize = psize.astype(np.int64)
        chunk_of = poff >> 32
        used = np.flatnonzero(np.bincount(chunk_of)).tolist()
        for ci in used:
            chunk = self.chunks[ci]
            assert chunk is not None
            pick: slice | np.ndarray = slice(None) if len(used) == 1 else chunk_of == ci
            o = owner[pick]
            mark_written(np.frombuffer(chunk, np.uint8), poff[pick] & 0xFFFFFFFF, plen[pick],
                         enc[pick], psize[pick], out, bounds[o], lens[o])

    def index_after_time(self, ns: int) -> int:
        """Number of records with timestamp ≤ ``ns``. O(log n)."""
        view = self.records
        return bisect.bisect_right(view, ns, key=lambda r: r.timestamp)

    # -- rewriting -------------------------------------------------------------------
    def replace_all(self, records: Iterable[AnyRecord]) -> None:
        """Swap in a rewritten log (compression, restore). LSNs keep increasing.
        O(records)."""
        next_lsn, last_ts, horizon = self.next_lsn, self.last_timestamp, self.horizon_lsn
        self._clear()
        for rec in records:
            self.adopt(rec)
        self.next_lsn = max(next_lsn, self.next_lsn)
        self.last_timestamp = max(last_ts, self.last_timestamp)
        self.horizon_lsn = max(horizon, self.horizon_lsn)

    def drop_through(self, lsn: int) -> None:
        """Forget the records with LSN ≤ ``lsn``. The kept rows are copied into fresh
        columns and renumbered from 0, the payload chunks no kept row uses are let go
        and the rest renumbered, and the structural entries after ``lsn`` are kept as
        they are (a creation run across ``lsn`` is cut), so a memento or a
        :meth:`frozen` copy taken before stays valid. O(kept rows + kept structural
        entries + log n)."""
        n = self.n
        k = self.rows_through(lsn)
        # The kept rows in columns of the same capacity: a log trimmed over and over
        # (compaction) does not grow its columns again each time.
        kept = np.empty(max(1024, n - k, min(len(self.rows), 2 * n)), ROW_DTYPE)
        kept[:n - k] = self.rows[k:n]
        lsns, ids, bases, rare = self.lsns, self.ids, self.bases, self.rare_sources
        sources, source_ids, chunks = self.sources, self.source_ids, self.chunks
        segs, crcs = self.segs, self.crcs
        cur, tail = self.cur, self.tail
        payload = int(kept["plen"][:n - k].sum(dtype=np.int64)) if k else self.payload_bytes
        # Structural entries: the ones after the last one at or before lsn, and the
        # part after lsn of a creation run across it.
        j = bisect.bisect_right(self.struct_lsn, lsn)
        structs = self.structs[j:]
        struct_lsn = self.struct_lsn[j:]
        first_kept = self.struct_before[j] if j < len(self.structs) else self.struct_count
        if j:
            last = self.structs[j - 1]
            if type(last) is _CreateRun and last.lsn + last.count - 1 > lsn:
                cut = lsn + 1 - last.lsn
                rest = _CreateRun(last.record(cut))
                rest.offsets = array("I", (o - last.offsets[cut] for o in last.offsets[cut:]))
                structs.insert(0, rest)
                struct_lsn.insert(0, rest.lsn)
                first_kept -= rest.count
        before = array("q", (b - first_kept for b in self.struct_before[j:]))
        if len(structs) > len(before):
            before.insert(0, 0)
        count = self.struct_count - first_kept
        counters = (self.next_lsn, self.last_timestamp, self.horizon_lsn, self.horizon_timestamp)
        self._clear()
        self.next_lsn, self.last_timestamp, self.horizon_lsn, self.horizon_timestamp = counters
        self.structs, self.struct_lsn, self.struct_before = structs, struct_lsn, before
        self.struct_count = count
        self.rows = kept
        self.n = n - k
        self.lsns = lsns.shifted(k, n)
        self.ids = ids.shifted(k, n)
        self.bases = {r - k: b for r, b in bases.items() if r >= k}
        self.rare_sources = {r - k: s for r, s in rare.items() if r >= k}
        self.sources, self.source_ids = sources, source_ids
        # Payload chunks: the ones kept rows use, and the open one, renumbered in order.
        used = np.unique(kept["poff"][:self.n] >> 32) if self.n else np.zeros(0, np.int64)
        if cur >= 0 and not (used == cur).any():
            used = np.sort(np.append(used, cur))
        self.chunks = [chunks[c] for c in used.tolist()]
        self.segs = {i: segs[c] for i, c in enumerate(used.tolist()) if c in segs}
        if self.segs and crcs is not None:
            self.crcs = np.zeros(len(kept), np.uint32)
            self.crcs[:n - k] = crcs[k:n]
        if self.n and len(used):
            remap = np.zeros(int(used[-1]) + 1, np.int64)
            remap[used] = np.arange(len(used))
            poff = self.rows["poff"][:self.n]
            poff[:] = (remap[poff >> 32] << 32) | (poff & 0xFFFFFFFF)
        if cur >= 0:
            self.cur = int(np.searchsorted(used, cur))
            self.tail = tail
            chunk = self.chunks[self.cur]
            assert chunk is not None
            self.cur_array = np.frombuffer(chunk, np.uint8)
        if self.n:
            pages = kept["page"][:self.n]
            order = np.argsort(pages, kind="stable")
            bounds = np.flatnonzero(np.diff(pages[order])) + 1
            for grp in np.split(order, bounds):
                self.index[int(pages[grp[0]])] = array("I", grp.astype(np.uint32).tobytes())
        self.payload_bytes = payload

    def frozen(self) -> TransactionLog:
        """A log that holds what this one holds now and keeps it while this one is
        rewritten (:meth:`drop_through`, :meth:`replace_all` and the like replace the
        columns, never edit them). Read it only up to this log's last LSN now: the
        two share the open payload chunk and the newest creation run, which this log
        goes on extending. O(1)."""
        self.index  # noqa: B018 - made now if it is made on read, so that both share it
        out = TransactionLog.__new__(TransactionLog)
        out.__dict__.update(self.__dict__)
        return out

    def memento(self) -> dict[str, Any]:
        """Everything a rewrite (replace_all, drop_through) replaces, to undo it."""
        self.index  # noqa: B018 - made now if it is made on read, so that it is saved
        return dict(self.__dict__)

    def restore_memento(self, saved: dict[str, Any]) -> None:
        if _DEFERRED_MEMENTO in saved:
            # Taken while the history was on disk, and the log read it since: nothing
            # rewrote it (a rewrite reads the history before its memento is taken).
            return
        generation = self.generation
        self.__dict__.update(saved)
        self.generation = generation + 1

    def mark(self) -> tuple[Any, ...]:
        """Where the log ends now, for :meth:`truncate` (an open batch's rollback)."""
        return (self.n, self.next_lsn, self.last_timestamp, self.payload_bytes,
                len(self.chunks), self.cur, self.tail, len(self.lsns.rows), self.lsns.last,
                len(self.ids.rows), self.ids.last, len(self.structs), self.struct_count)

    def truncate(self, mark: tuple[Any, ...]) -> None:
        """Forget every delta row appended since ``mark`` (no structural record may have
        come in between). O(rows dropped + pages they touched)."""
        (n0, next_lsn, last_ts, payload, nchunks, cur, tail, nl, lsn_last, ni, id_last,
         nstructs, struct_count) = mark
        assert len(self.structs) == nstructs and self.struct_count == struct_count, \
            "a structural record came after the mark"
        if self.n > n0:
            for pid in set(self.rows["page"][n0:self.n].tolist()):
                rows = self.index[pid]
                k = bisect.bisect_left(rows, n0)
                del rows[k:]
                if not rows:
                    del self.index[pid]
            for side in (self.bases, self.rare_sources):
                for r in [r for r in side if r >= n0]:
                    del side[r]
        del self.lsns.rows[nl:], self.lsns.vals[nl:], self.ids.rows[ni:], self.ids.vals[ni:]
        self.lsns.last, self.ids.last = lsn_last, id_last
        del self.chunks[nchunks:]
        for ci in [c for c in self.segs if c >= nchunks]:
            del self.segs[ci]
        self.cur, self.tail = cur, tail
        chunk = self.chunks[cur] if cur >= 0 else None
        self.cur_array = np.frombuffer(chunk, np.uint8) if chunk is not None else np.zeros(0, np.uint8)
        self.n = n0
        self.payload_bytes = payload
        self.next_lsn, self.last_timestamp = next_lsn, last_ts
        self.generation += 1

    def forget_all(self, horizon: int) -> None:
        """Retain nothing (logging disabled); LSNs keep moving."""
        self._clear()
        self.horizon_lsn = horizon

    def _check(self) -> None:
        """Assert LSNs strictly increase, timestamps never decrease, indexes agree."""
        prev_lsn, prev_ts = 0, 0
        count = 0
        for rec in self.iter_records():
            assert rec.lsn > prev_lsn, f"LSN {rec.lsn} does not increase after {prev_lsn}"
            assert rec.timestamp >= prev_ts, f"timestamp decreases at LSN {rec.lsn}"
            prev_lsn, prev_ts = rec.lsn, rec.timestamp
            count += 1
        assert count == self.record_count, f"{count} records, {self.record_count} counted"
        assert sum(len(v) for v in self.index.values()) == self.n
        pages = self.rows["page"]
        for pid, rows in self.index.items():
            assert (pages[np.asarray(rows, np.int64)] == pid).all(), f"index of page {pid} is off"

    # -- reading by LSN, applying rows, copying a prefix -----------------------------
    _row_struct = struct.Struct("=iIIHBqqq")
    """One row of :data:`ROW_DTYPE` (packed, native byte order), read without numpy."""
    def iter_structs(self, start: int = 0, stop: int | None = None) -> Iterator[AnyRecord]:
        """Structural records with ``start`` < LSN ≤ ``stop`` (all by default), in LSN
        order; a creation run yields one record per page. O(records yielded + log n)."""
        hi = self.last_lsn if stop is None else stop
        structs = self.structs
        for i in range(max(0, bisect.bisect_right(self.struct_lsn, start) - 1), len(structs)):
            s = structs[i]
            if s.lsn > hi:
                return
            if isinstance(s, _CreateRun):
                for k in range(max(0, start + 1 - s.lsn), min(s.count, hi + 1 - s.lsn)):
                    yield s.record(k)
            elif s.lsn > start:
                yield s

    def row_lsns(self, r0: int, r1: int) -> np.ndarray:
        """LSNs of rows ``r0 … r1-1`` (int64), read from the step map in one go.
        O(rows + log breaks)."""
        rows = np.arange(r0, r1, dtype=np.int64)
        if r0 >= r1:
            return rows
        # Copies, so the arrays are never held while they grow.
        brk = np.frombuffer(self.lsns.rows.tobytes(), np.int64)
        val = np.frombuffer(self.lsns.vals.tobytes(), np.int64)
        j = np.searchsorted(brk, rows, "right") - 1
        return val[j] + rows - brk[j]

    def row_ids(self, r0: int, r1: int) -> np.ndarray:
        """Delta ids of rows ``r0 … r1-1`` (int64), from the step map in one go."""
        rows = np.arange(r0, r1, dtype=np.int64)
        if r0 >= r1:
            return rows
        brk = np.frombuffer(self.ids.rows.tobytes(), np.int64)
        val = np.frombuffer(self.ids.vals.tobytes(), np.int64)
        j = np.searchsorted(brk, rows, "right") - 1
        return val[j] + rows - brk[j]

    # -- column groups ---------------------------------------------------------------
    def columns(self, start: int = 0, gather: bool = True) -> LogColumns:
        """The records with LSN > ``start`` as a :class:`LogColumns`: the delta rows'
        columns, their payloads gathered back to back in one compiled pass per payload
        chunk (left empty with ``gather=False``: see :meth:`payload_parts`), and the
        structural records. O(rows + payload bytes + structural records)."""
        r0, n = self.rows_through(start), self.n
        rows = self.rows[r0:n]
        plen = rows["plen"].astype(np.int64)
        enc = np.ascontiguousarray(rows["enc"])
        psize = rows["psize"].astype(np.int64)
        # Runs read from mapped segments are given in the run encodings of memory.
        seg = enc == ENC_SEGRUN if self.segs else None
        out_plen, out_enc = plen, enc
        if seg is not None and seg.any():
            self.check_segments(r0=r0, r1=n)
            small = psize[seg] <= 1 << 16
            out_plen = plen.copy()
            out_plen[seg] -= np.where(small, 6, 4)
            out_enc = enc.copy()
            out_enc[seg] = np.where(small, ENC_RUN16, ENC_RUN)
        else:
            seg = None
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(out_plen, out=offsets[1:])
        payload = np.empty(int(offsets[-1]) if gather else 0, np.uint8)
        if len(rows) and gather:
            poff = np.ascontiguousarray(rows["poff"])
            ci = poff >> 32
            for c in self._chunks_of(r0, n):
                chunk = self.chunks[c]
                assert chunk is not None, "a kept row's payload chunk was let go"
                sel = np.flatnonzero(ci == c)
                if seg is not None:
                    gather_converted(np.frombuffer(chunk, np.uint8), (poff & 0xFFFFFFFF)[sel],
                                     plen[sel], enc[sel], psize[sel], payload, offsets[sel])
                else:
                    gather_payloads(np.frombuffer(chunk, np.uint8),
                                    (poff & 0xFFFFFFFF)[sel], plen[sel], payload,
                                    offsets[sel])
        # Sources: the ones these rows name, numbered from 0.
        src = rows["src"].astype(np.int64)
        names: list[str] = []
        index: dict[str, int] = {}
        lut = np.zeros(max(len(self.sources), 1) + 1, np.int64)
        for sid in np.unique(src[src != _NO_SOURCE]).tolist():
            index[self.sources[sid]] = len(names)
            lut[sid] = len(names)
            names.append(self.sources[sid])
        out_src = lut[np.minimum(src, len(lut) - 1)]
        for i in np.flatnonzero(src == _NO_SOURCE).tolist():
            name = self.rare_sources[r0 + i]
            if name not in index:
                index[name] = len(names)
                names.append(name)
            out_src[i] = index[name]
        base_rows = np.array(sorted(r - r0 for r in self.bases if r >= r0), np.int64)
        base_epochs = np.array([self.bases[r + r0] for r in base_rows.tolist()], np.int64)
        return LogColumns(
            self.row_lsns(r0, n), self.row_ids(r0, n), rows["epoch"].astype(np.int64),
            rows["ts"].astype(np.int64), rows["page"].astype(np.int64),
            psize, out_plen, out_src, out_enc, names, base_rows, base_epochs, payload,
            list(self.iter_structs(start)))

    def clone(self) -> TransactionLog:
        """A log holding the same records that can go on independently: the columns,
        step maps, indexes and structural entries copied (creation runs too: they grow
        in place), the payload chunks shared (the copy starts a chunk of its own for
        what it logs, so a shared chunk is never written). O(rows + pages + structural
        entries), vectorised."""
        out = TransactionLog.__new__(TransactionLog)
        out.__dict__.update(self.__dict__)
        out.sink = out.sink_many = None
        out.rows = self.rows[:max(self.n, 1024)].copy() if self.n else np.empty(1024, ROW_DTYPE)
        for name in ("lsns", "ids"):
            old = getattr(self, name)
            new = _Steps()
            new.rows, new.vals, new.last = array("q", old.rows), array("q", old.vals), old.last
            setattr(out, name, new)
        out.bases = dict(self.bases)
        out.rare_sources = dict(self.rare_sources)
        out.sources = list(self.sources)
        out.source_ids = dict(self.source_ids)
        out.index = {pid: array("I", rows) for pid, rows in self.index.items()}
        out.chunks = list(self.chunks)
        out.segs = dict(self.segs)
        if self.crcs is not None:
            out.crcs = np.zeros(len(out.rows), np.uint32)
            out.crcs[:self.n] = self.crcs[:self.n]
        out.cur, out.tail, out.cur_array = -1, _CHUNK, np.zeros(0, np.uint8)
        out.structs = [_CreateRun.copy(s) if type(s) is _CreateRun else s for s in self.structs]
        out.struct_lsn = array("q", self.struct_lsn)
        out.struct_before = array("q", self.struct_before)
        out.generation = self.generation + 1
        return out

    def payload_parts(self, start: int = 0) -> Iterator[memoryview]:
        """The payloads of the rows with LSN > ``start``, back to back, as views of the
        payload chunks: one view per run of rows that lie back to back in one chunk (a
        log appends them so), no copy. O(rows) to find the runs."""
        r0, n = self.rows_through(start), self.n
        if r0 >= n:
            return
        if self._has_segment_rows(r0, n):
            # Runs read from mapped segments change encoding on the way (see columns).
            yield self.columns(start).payload.data
            return
        rows = self.rows[r0:n]
        poff = np.ascontiguousarray(rows["poff"])
        plen = rows["plen"].astype(np.int64)
        brk = np.flatnonzero(poff[1:] != poff[:-1] + plen[:-1]) + 1
        starts = [0, *brk.tolist()]
        stops = [*brk.tolist(), len(poff)]
        ends = np.cumsum(plen)
        for a, b in zip(starts, stops, strict=True):
            at = int(poff[a])
            chunk = self.chunks[at >> 32]
            assert chunk is not None, "a kept row's payload chunk was let go"
            lo = at & 0xFFFFFFFF
            size = int(ends[b - 1] - (ends[a] - plen[a]))
            yield chunk[lo:lo + size]

    @classmethod
    def from_columns(cls, cols: LogColumns, *, adopt: bool = False) -> TransactionLog:
        """A log holding ``cols`` (checked by the caller: see ``check_columns``): the
        payloads as the log's chunks (one per 4 GiB, cut at rows), the structural
        records adopted. Where the payloads fit one chunk and every source is numbered,
        one compiled pass (:func:`~mmsb._core.kernels.fill_log_rows`) fills the rows
        and finds the step maps and the rows' order by page, from which ``index`` is
        made when first read; otherwise rows, step maps, per-page indexes and sources
        are built vectorised. ``adopt``: ``cols.payload`` is memory nobody else
        refers to, and the chunks are read-only views of it instead of copies.
        O(rows + pages + structural records + payload bytes copied once, none with
        ``adopt``)."""
        keep = _readonly_view if adopt else _private_copy
        log = cls()
        n = len(cols)
        sids = np.empty(len(cols.sources) if n else 0, np.int64)
        for k, name in enumerate(cols.sources if n else ()):
            sids[k] = log._source_id(name, 0)
        if n and len(cols.payload) < 1 << 32 and 0 < len(sids) < _NO_SOURCE:
            # The usual case, in one compiled pass: the payloads in one chunk, every
            # source numbered. A quarter more room than the rows loaded, so that the
            # writes after a reopen do not start by copying every row into a doubled
            # array.
            rows = np.empty(max(n + n // 4, 1024), ROW_DTYPE)
            order, bounds, keys, lr, lv, ir, iv = fill_log_rows(
                rows, cols.page, cols.psize, cols.plen, cols.src, cols.enc, cols.epoch,
                cols.ts, sids, cols.lsn, cols.ids)
            log.chunks.append(keep(cols.payload))
            log.rows = rows
            log.n = n
            log.lsns = _Steps.of_breaks(lr, lv, int(cols.lsn[-1]))
            log.ids = _Steps.of_breaks(ir, iv, int(cols.ids[-1]))
            if len(cols.base_rows):
                log.bases = dict(zip(cols.base_rows.tolist(), cols.base_epochs.tolist(),
                                     strict=True))
            # The per-page row indexes are made the first time they are read (see
            # ``index``): a restored state that is only read never needs them.
            del log.index
            log._index_parts = (order, bounds, keys)
            log.payload_bytes = len(cols.payload)
        elif n:
            # Payloads past 4 GiB (several chunks), or sources past the numbered ones
            # (or none named).
            rows = np.empty(max(n + n // 4, 1024), ROW_DTYPE)
            rows["page"][:n] = cols.page
            rows["psize"][:n] = cols.psize
            rows["plen"][:n] = cols.plen
            rows["enc"][:n] = cols.enc
            rows["epoch"][:n] = cols.epoch
            rows["ts"][:n] = cols.ts
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(cols.plen, out=offsets[1:])
            # Payload chunks: at most 4 GiB each (offsets are 32-bit), cut at rows.
            if offsets[-1] < 1 << 32:
                log.chunks.append(keep(cols.payload))
                rows["poff"][:n] = offsets[:-1]
            else:
                chunk_of = offsets[:-1] >> 32
                poff = np.zeros(n, np.int64)
                for c in np.unique(chunk_of).tolist():
                    sel = np.flatnonzero(chunk_of == c)
                    lo, hi = int(offsets[sel[0]]), int(offsets[sel[-1] + 1])
                    log.chunks.append(keep(cols.payload[lo:hi]))
                    poff[sel] = ((len(log.chunks) - 1) << 32) | (offsets[sel] - lo)
                rows["poff"][:n] = poff
            mapped = sids[cols.src] if len(sids) else np.zeros(n, np.int64)
            rows["src"][:n] = mapped
            if len(sids) >= _NO_SOURCE:
                for i in np.flatnonzero(mapped == _NO_SOURCE).tolist():
                    log.rare_sources[i] = cols.sources[int(cols.src[i])]
            log.rows = rows
            log.n = n
            log.lsns = _Steps.of(cols.lsn)
            log.ids = _Steps.of(cols.ids)
            log.bases = dict(zip(cols.base_rows.tolist(), cols.base_epochs.tolist(), strict=True))
            order = np.argsort(cols.page, kind="stable")
            sp = cols.page[order]
            cut = np.flatnonzero(sp[1:] != sp[:-1]) + 1
            starts = np.concatenate(([0], cut))
            every = array("I", order.astype(np.uint32).tobytes())
            # One array of row numbers per page, sliced by C-level iteration (no Python
            # loop over the pages).
            spans = map(slice, starts.tolist(), np.append(cut, n).tolist())
            log.index = dict(zip(sp[starts].tolist(), map(every.__getitem__, spans),
                                 strict=True))
            log.payload_bytes = int(offsets[-1])
        for rec in cols.structs:
            log.adopt(rec)
        if n and (not cols.structs or cols.lsn[-1] > cols.structs[-1].lsn):
            log.next_lsn = int(cols.lsn[-1]) + 1
            log.last_timestamp = int(cols.ts[-1])
        return log

    def max_id_through(self, k: int) -> int:
        """The largest delta id among rows ``0 … k-1`` (0 when k is 0). O(breaks)."""
        k = min(k, self.n)
        if k <= 0:
            return 0
        m = bisect.bisect_left(self.ids.rows, k)
        brk = np.frombuffer(self.ids.rows.tobytes(), np.int64)[:m]
        val = np.frombuffer(self.ids.vals.tobytes(), np.int64)[:m]
        ends = np.append(brk[1:], k)
        return int((val + ends - 1 - brk).max())

    def apply_row(self, row: int, buf: np.ndarray) -> int:
        """Write the delta of ``row`` into ``buf`` (its page's bytes, same size) straight
        from the payload arena, as :func:`~mmsb._core.delta.apply_delta` writes the delta
        :meth:`delta_at` builds. Returns the bytes it writes (the page size when dense).
        O(payload)."""
        return self.apply_rows((row,), buf)

    def apply_rows(self, rows: Iterable[int], buf: np.ndarray) -> int:
        """:meth:`apply_row` for each of ``rows`` (deltas of one page, in log order);
        returns the bytes they write. O(their payloads)."""
        if self.segs:
            return self._apply_rows_compiled(rows, buf)
        unpack, width = self._row_struct.unpack_from, self._row_struct.size
        cols, chunks = self.rows.data, self.chunks
        wrote = 0
        for row in rows:
            _pid, size, plen, _sid, enc, _epoch, _ts, poff = unpack(cols, row * width)
            chunk = chunks[poff >> 32]
            assert chunk is not None
            off = poff & 0xFFFFFFFF
            if enc == ENC_RUN or enc == ENC_RUN16 or enc == ENC_SEGRUN:
                head = 4 if enc == ENC_RUN else (2 if enc == ENC_RUN16 else 8)
                first = int.from_bytes(chunk[off:off + min(head, 4)], "little")
                n = plen - head
                buf[first:first + n] = chunk[off + head:off + plen]
                wrote += n
            elif enc == ENC_POS16 or enc == ENC_POS32:
                w = 2 if enc == ENC_POS16 else 4
                n = plen // (w + 1)
                pos = np.frombuffer(chunk, np.uint16 if w == 2 else np.uint32, n, off)
                buf[pos] = np.frombuffer(chunk, np.uint8, n, off + w * n)
                wrote += n
            else:
                data = np.frombuffer(chunk, np.uint8, size, off)
                if enc == ENC_MASKED:
                    bits = np.frombuffer(chunk, np.uint8, plen - size, off + size)
                    np.copyto(buf, data, where=np.unpackbits(bits, count=size).view(bool))
                else:
                    buf[:] = data
                wrote += size
        return wrote

    def _apply_rows_compiled(self, rows: Iterable[int], buf: np.ndarray) -> int:
        """:meth:`apply_rows` of a log with mapped segments: one compiled call per run of
        rows whose payloads share a chunk
        (:func:`~mmsb._core.kernels.apply_rows_of_chunk`). The rows whose payloads lie
        in a mapped segment are checked before any of them is read, as
        :meth:`check_segments` does: once per segment the rows reach, all the rows in
        it (its file's size, then each of their frames' CRC32C), before the first of
        them is applied (on an error ``buf`` may hold the rows applied before). Rows
        whose payloads are in memory (every row that is not a one-run delta of the
        one-frame path or of recovery's mapped rows) are not checked: their bytes never
        left the process, so no other file or process can change them, and the
        segments' files are not looked at for them.

        Raises:
            SerializationError: a row's frame was cut or changed, or its payload does
                not fit the page (a damaged log).
        """
        if type(rows) is array and rows.typecode == "q":
            # A slice of a page line's refs: the row numbers as they are, no copy.
            if not rows:
                return 0
            sel = np.frombuffer(rows, np.int64)
        else:
            sel = (np.frombuffer(rows, _ARRAY_DTYPES[rows.typecode]).astype(np.int64)
                   if type(rows) is array and rows.typecode in _ARRAY_DTYPES
                   else np.array(list(rows), np.int64))
            if not len(sel):
                return 0
        chunks, segs, table = self.chunks, self.segs, self.rows
        # The compiled entries take only the types they were made for: a writable,
        # contiguous 1-D uint8 page buffer (other buffers go through numba's dispatch),
        # and a read-only (a mapping, bytes) or a writable (an arena chunk) payload
        # chunk.
        flags = buf.flags if type(buf) is np.ndarray else None
        plain = (flags is not None and buf.dtype is _U8 and buf.ndim == 1
                 and flags.c_contiguous and flags.writeable)
        poffs = table["poff"]
        checked: list[int] = []
        wrote = i = 0
        while i < len(sel):
            ci = int(poffs[sel[i]]) >> 32
            source = segs.get(ci)
            if source is not None:
                arr = source.array
                key = 1
                if ci not in checked:
                    # Before any row of the segment is read: all of the rows in it.
                    self._check_chunk(ci, source, sel)
                    checked.append(ci)
            else:
                chunk = chunks[ci]
                assert chunk is not None, "a kept row's payload chunk was let go"
                arr = np.frombuffer(chunk, np.uint8)
                key = 1 if chunk.readonly else 2
            apply = _CHECK_ENTRY.get(key) if plain else None
            args = (table, sel, i, ci, arr, buf)
            if apply is None:
                i, n = apply_rows_of_chunk(*args)
                if plain:
                    _CHECK_ENTRY[key] = entry_point(apply_rows_of_chunk, *args)
            else:
                i, n = apply(*args)
            if i < 0:
                bad = int(sel[-1 - i])
                raise SerializationError(
                    f"the log holds a delta whose payload does not fit page "
                    f"{int(table['page'][bad])} (delta row {bad})")
            wrote += n
        return int(wrote)

    def extend_from(self, other: TransactionLog, start: int, stop: int) -> None:
        """Keep ``other``'s records with ``start`` < LSN ≤ ``stop``, as adopting them one
        by one in LSN order would: delta rows copied in one go, with their payloads
        shared by reference (chunk numbers remapped; this log's next payload starts a
        chunk of its own, so a shared chunk is never written), structural records
        adopted. O(rows + structural records + breaks + chunks), no payload copied."""
        r0, r1 = other.rows_through(start), other.rows_through(stop)
        newest = (0, 0)
        if r1 > r0:
            m = r1 - r0
            at = self.n
            if at + m > len(self.rows):
                rows = np.empty(max(2 * len(self.rows), at + m), ROW_DTYPE)
                rows[:at] = self.rows[:at]
                self.rows = rows
                self._fit_crcs()
            new = self.rows[at:at + m]
            new.view(np.uint8)[:] = other.rows[r0:r1].view(np.uint8)
            # Payload chunks: shared, renumbered (by identity: a chunk taken before
            # keeps its number here).
            poff = new["poff"]
            ci = poff >> 32
            lo, hi = int(ci.min()), int(ci.max())
            have = {id(c): i for i, c in enumerate(self.chunks) if c is not None}
            lut = np.zeros(hi + 1 - lo, np.int64)
            for c in range(lo, hi + 1):
                buf = other.chunks[c]
                if buf is None:
                    continue
                k = have.get(id(buf))
                if k is None:
                    self.chunks.append(buf)
                    k = have[id(buf)] = len(self.chunks) - 1
                if c in other.segs:
                    self.segs[k] = other.segs[c]
                lut[c - lo] = k
            if other.crcs is not None and self.segs:
                if self.crcs is None:
                    self.crcs = np.zeros(len(self.rows), np.uint32)
                self._fit_crcs()
                self.crcs[at:at + m] = other.crcs[r0:r1]
            if not (lut == np.arange(lo, hi + 1)).all():
                poff[:] = (lut[ci - lo] << 32) | (poff & 0xFFFFFFFF)
            # Sources: renumbered where this log numbers them otherwise.
            src = new["src"]
            slo, shi = int(src.min()), int(src.max())
            used = np.flatnonzero(np.bincount(src - slo)) + slo
            slut = np.arange(slo, shi + 1)
            for sv in used.tolist():
                if sv == _NO_SOURCE:
                    for i in np.flatnonzero(src == sv).tolist():
                        self.rare_sources[at + i] = other.rare_sources[r0 + i]
                    continue
                name = other.sources[sv]
                first = at + int(np.argmax(src == sv))
                sid = self._source_id(name, first)
                if sid == _NO_SOURCE:
                    for i in np.flatnonzero(src == sv).tolist():
                        self.rare_sources[at + i] = name
                slut[sv - slo] = sid
            if not (slut == np.arange(slo, shi + 1)).all():
                src[:] = slut[src - slo]
            self._copy_steps(self.lsns, other.lsns, r0, r1, at)
            self._copy_steps(self.ids, other.ids, r0, r1, at)
            for r, b in other.bases.items():
                if r0 <= r < r1:
                    self.bases[r - r0 + at] = b
            # Each page's rows in the range are a slice of its index there.
            shift = at - r0
            for pid, prow in other.index.items():
                i = bisect.bisect_left(prow, r0)
                j = bisect.bisect_left(prow, r1, i)
                if i == j:
                    continue
                part = prow[i:j]
                if shift:
                    part = array("I", (np.frombuffer(part, np.uint32) + shift).astype(np.uint32)
                                 .tobytes())
                mine = self.index.get(pid)
                if mine is None:
                    self.index[pid] = part
                else:
                    mine.extend(part)
            self.n = at + m
            self.payload_bytes += int(new["plen"].sum(dtype=np.int64))
            self.cur, self.tail, self.cur_array = -1, _CHUNK, np.zeros(0, np.uint8)
            newest = (other.lsns.at(r1 - 1), int(new["ts"][-1]))
        for rec in other.iter_structs(start, stop):
            self.adopt(rec)
            if rec.lsn > newest[0]:
                newest = (rec.lsn, rec.timestamp)
        if newest[0]:
            self.next_lsn, self.last_timestamp = newest[0] + 1, newest[1]

    @staticmethod
    def _copy_steps(dst: _Steps, src: _Steps, r0: int, r1: int, at: int) -> None:
        """Append to ``dst`` (from its row ``at``) the values of ``src``'s rows
        ``r0 … r1-1``. O(log breaks + breaks copied)."""
        dst.push(at, src.at(r0))
        j0 = bisect.bisect_right(src.rows, r0)
        j1 = bisect.bisect_left(src.rows, r1)
        shift = at - r0
        for r, v in zip(src.rows[j0:j1], src.vals[j0:j1], strict=True):
            dst.rows.append(r + shift)
            dst.vals.append(v)
        dst.last = src.at(r1 - 1)

    def max_id_between(self, r0: int, r1: int) -> int:
        """The largest delta id among rows ``r0 … r1-1`` (0 when there are none): ids
        rise by one within a step, so only the row before each break and the last row
        can hold it. O(log breaks + breaks in the range)."""
        r1 = min(r1, self.n)
        if r0 >= r1:
            return 0
        ids = self.ids
        j0 = bisect.bisect_right(ids.rows, r0)
        j1 = bisect.bisect_left(ids.rows, r1)
        ends = [r - 1 for r in ids.rows[j0:j1]]
        ends.append(r1 - 1)
        return max(ids.at(r) for r in ends)

    def write_rows(self, r0: int, r1: int, table: PageTable, arena: Arena) -> int:
        """Write the deltas of rows ``r0 … r1-1`` into the pages ``table`` places in
        ``arena``, in log order (later rows win), straight from the payload chunks in
        compiled passes (:func:`~mmsb._core.kernels.apply_log_rows_one`, one per run of
        rows whose payloads share a chunk; a dense row is one copy) that also set each
        page's epoch to that of its last row. This
        is what applying :meth:`delta_at` of each row in turn does, without a Delta
        object. Returns the bytes written.

        Every row is checked first: its page live, of the size the row was logged for,
        its payload inside the page; on a refusal nothing is written.

        Raises:
            SerializationError: a row that does not fit the pages (a damaged log).

        Cost: O(rows + payload bytes + chunks touched).
        """
        if r0 >= r1:
            return 0
        self.check_segments(r0=r0, r1=r1)
        rows = self.rows[r0:r1]
        pages = rows["page"].astype(np.int64)
        sizes = rows["psize"].astype(np.int64)
        top = min(table.next_id, len(table.flags))
        ok = (pages > 0) & (pages < top)
        if ok.all():
            ok = (table.flags[pages] & LIVE).astype(bool)
        if not ok.all():
            bad = int(np.argmin(ok))
            raise SerializationError(f"the log holds a delta of page {int(pages[bad])}, which "
                                     f"does not exist (delta row {r0 + bad})")
        have = table.size[pages]
        if not (have == sizes).all():
            bad = int(np.argmax(have != sizes))
            raise SerializationError(
                f"the log holds a delta for {int(sizes[bad])} bytes on page {int(pages[bad])} "
                f"of {int(have[bad])} (delta row {r0 + bad})")
        poff = np.ascontiguousarray(rows["poff"])
        soff = poff & 0xFFFFFFFF
        plens = rows["plen"].astype(np.int64)
        encs = np.ascontiguousarray(rows["enc"])
        epochs = np.ascontiguousarray(rows["epoch"])
        addr = table.addr[pages]
        doff = addr & (CHUNK_SIZE - 1)
        pci = poff >> 32
        aci = addr >> CHUNK_SHIFT
        # One compiled call per run of rows whose payloads share a chunk, and within it
        # per arena chunk (rows of one page share its chunk and keep their order; rows
        # of different pages commute).
        brk = np.flatnonzero(pci[1:] != pci[:-1]) + 1
        edges = [0, *brk.tolist(), len(pci)]
        wrote = 0
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            src = self.chunks[int(pci[a])]
            if src is None:
                wrote = -1 - a
                break
            chunk = np.frombuffer(src, np.uint8)
            sel_a = aci[a:b]
            groups = [slice(a, b)] if (sel_a == sel_a[0]).all() else \
                [a + np.flatnonzero(sel_a == c) for c in np.unique(sel_a).tolist()]
            for g in groups:
                first = g.start if isinstance(g, slice) else int(g[0])
                dst = arena.chunk(int(aci[first]))
                if dst is None:
                    n = -1 - (first - a)
                else:
                    n = apply_log_rows_one(chunk, soff[g], plens[g], encs[g], sizes[g], dst,
                                           doff[g], pages[g], epochs[g], table.epoch)
                if n < 0:
                    k = -1 - n
                    wrote = -1 - (k + first if isinstance(g, slice) else int(g[k]))
                    break
                wrote += n
            if wrote < 0:
                break
        if wrote < 0:
            bad = -1 - wrote
            raise SerializationError(
                f"the log holds a delta whose payload does not fit page {int(pages[bad])} "
                f"(delta row {r0 + bad})")
        return int(wrote)


_DEFERRED_MEMENTO = "deferred tail"
"""The key of a :class:`DeferredLog`'s memento."""
_MIRRORED = ("next_lsn", "last_timestamp", "horizon_lsn", "horizon_timestamp", "sink",
             "sink_many")
"""The counters and sinks a :class:`DeferredLog` holds as its tail does."""
_OWN = frozenset((*_MIRRORED, "generation", "_tail", "_loader", "_upto"))


class DeferredLog(TransactionLog):
    """A log whose retained history is still on disk, in front of ``tail``: a log of
    the records after that history. It holds the tail's counters (the next LSN, the
    newest timestamp, the horizon) and sinks as plain attributes, and appends deltas
    to the tail (a plain write needs no history); the first touch of anything else (a
    record, a row, a structural record to append) builds the whole log with
    ``loader(tail)`` and turns this object into that :class:`TransactionLog` in place,
    so every holder of a reference sees the loaded log and nothing pays for a check
    afterwards. Attributes it does not hold are looked up through ``__getattr__``, so
    the counters cost what a loaded log's do. The records after the history's newest
    LSN (``upto``) as columns, their payloads and an undo record of the tail are served
    by the tail too: what a checkpoint that keeps the history needs.

    ``loader`` returns the complete log: the history, then the tail's records. It may
    raise (``SerializationError``: a file of the history is damaged), and then this
    object stays deferred, so the next touch tries again. Reopening a durable bus uses
    it so that the time to open does not grow with the retained history. Like every
    use of a state's log, appending and loading happen under the state's lock.
    """

    def __init__(self, tail: TransactionLog,
                 loader: Callable[[TransactionLog], TransactionLog], upto: int) -> None:
        own = self.__dict__
        for name in _MIRRORED:
            own[name] = getattr(tail, name)
        own["generation"] = tail.generation
        own["_tail"] = tail
        own["_loader"] = loader
        own["_upto"] = upto  # the history's newest LSN: the tail holds every record after it

    def __getattr__(self, name: str) -> Any:
        # Only called for what this object does not hold: anything of the history.
        if name.startswith("__") or type(self) is not DeferredLog:
            raise AttributeError(name)
        _materialize(self)
        return getattr(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _OWN:
            _materialize(self)
        elif name in _MIRRORED:
            setattr(self.__dict__["_tail"], name, value)
        object.__setattr__(self, name, value)

    def _mirror(self) -> None:
        own, tail = self.__dict__, self.__dict__["_tail"]
        own["next_lsn"], own["last_timestamp"] = tail.next_lsn, tail.last_timestamp

    def append(self, rec: AnyRecord) -> None:
        """A delta goes to the tail; any other record reads the history first (some
        derive from it: a resize or a clone carries the page's written mask)."""
        if type(rec) is Delta:
            self._tail.append(rec)
            self._mirror()
            return
        _materialize(self)
        self.append(rec)

    def append_held(self, records: Sequence[AnyRecord | DeltaGroup]) -> None:
        """A batch's deltas go to the tail (see :meth:`append`)."""
        if all(type(r) is Delta or type(r) is DeltaGroup for r in records):
            self._tail.append_held(records)
            self._mirror()
            return
        _materialize(self)
        self.append_held(records)

    # What a checkpoint that rewrites no history reads (the pages the records since
    # the last one name, its log section), served by the tail alone: closing a bus
    # after a reopen, or its automatic checkpoints with every checkpoint kept, never
    # read the history.
    def columns(self, start: int = 0, gather: bool = True) -> LogColumns:
        """As :meth:`TransactionLog.columns`; from the tail when ``start`` is at or
        after the history's newest LSN (the history is read otherwise)."""
        if start >= self._upto:
            return self._tail.columns(start, gather)
        _materialize(self)
        return self.columns(start, gather)

    def payload_parts(self, start: int = 0) -> Iterator[memoryview]:
        """As :meth:`TransactionLog.payload_parts`, from the tail as :meth:`columns`."""
        if start >= self._upto:
            return self._tail.payload_parts(start)
        _materialize(self)
        return self.payload_parts(start)

    def memento(self) -> dict[str, Any]:
        """The tail's: a caller that rewrites the log (a trim) reads the history
        before it takes this (see :meth:`TransactionLog.restore_memento`)."""
        return {_DEFERRED_MEMENTO: self._tail.memento()}

    def restore_memento(self, saved: dict[str, Any]) -> None:
        self._tail.restore_memento(saved[_DEFERRED_MEMENTO])
        self._mirror()


def _materialize(log: TransactionLog) -> None:
    if type(log) is not DeferredLog:
        return
    own = log.__dict__
    tail = own["_tail"]
    full = own["_loader"](tail)
    full.sink, full.sink_many = tail.sink, tail.sink_many
    full.generation = max(full.generation, own["generation"]) + 1
    full.next_lsn, full.last_timestamp = tail.next_lsn, tail.last_timestamp
    full.horizon_lsn, full.horizon_timestamp = tail.horizon_lsn, tail.horizon_timestamp
    object.__setattr__(log, "__dict__", full.__dict__)
    object.__setattr__(log, "__class__", TransactionLog)


def load_history(log: TransactionLog) -> None:
    """Read a deferred log's history now (nothing to do for a loaded log).

    Raises:
        SerializationError: a file of the history is damaged (the log stays deferred).
    """
    _materialize(log)


class RecordView(Sequence[AnyRecord]):
    """Every retained record in LSN order, read-only, each built on demand."""

    def __init__(self, log: TransactionLog) -> None:
        self._log = log

    def __len__(self) -> int:
        return self._log.record_count

    def __iter__(self) -> Iterator[AnyRecord]:
        return self._log.iter_records()

    @overload
    def __getitem__(self, i: int) -> AnyRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[AnyRecord]: ...
    def __getitem__(self, i: int | slice) -> AnyRecord | list[AnyRecord]:
        n = len(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                return list(self)[i]
            if start >= stop:
                return []
            lo = self._lsn_of_index(start) - 1
            hi = self._lsn_of_index(stop - 1)
            return list(self._log.iter_records(lo, hi))
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("record index out of range")
        lsn = self._lsn_of_index(i)
        return next(self._log.iter_records(lsn - 1, lsn))

    def _lsn_of_index(self, i: int) -> int:
        """LSN of the ``i``-th retained record (0-based). O(log n · log n)."""
        log = self._log
        lo, hi = 0, log.last_lsn
        # smallest LSN x with index_after_lsn(x) > i
        while lo < hi:
            mid = (lo + hi) // 2
            if log.index_after_lsn(mid) > i:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def __bool__(self) -> bool:
        return self._log.record_count > 0


class DeltaView(Sequence[Delta]):
    """``state.tlog``: the retained deltas in log order, as a read-only sequence of
    fresh :class:`Delta` objects built on demand."""

    def __init__(self, log: TransactionLog) -> None:
        self._log = log

    def __len__(self) -> int:
        return self._log.n

    @overload
    def __getitem__(self, i: int) -> Delta: ...
    @overload
    def __getitem__(self, i: slice) -> list[Delta]: ...
    def __getitem__(self, i: int | slice) -> Delta | list[Delta]:
        n = len(self)
        if isinstance(i, slice):
            return list(_deltas_of_rows(self._log, range(*i.indices(n))))
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("delta index out of range")
        return self._log.delta_at(i)

    def __iter__(self) -> Iterator[Delta]:
        return _deltas_of_rows(self._log, range(self._log.n))

    def __repr__(self) -> str:
        return f"<TLog {len(self)} deltas, last LSN {self._log.last_lsn}>"


class PageDeltas(Sequence[Delta]):
    """One page's retained deltas in log order, built on demand."""

    def __init__(self, log: TransactionLog, rows: array[int]) -> None:
        self._log = log
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> Delta: ...
    @overload
    def __getitem__(self, i: slice) -> list[Delta]: ...
    def __getitem__(self, i: int | slice) -> Delta | list[Delta]:
        if isinstance(i, slice):
            return list(_deltas_of_rows(self._log, self._rows[i]))
        return self._log.delta_at(self._rows[i])

    def __iter__(self) -> Iterator[Delta]:
        return _deltas_of_rows(self._log, list(self._rows))


_CHECK_BLOCK = 4096
"""Rows in mapped segments are checked this many at a time, just before they are read."""


def _deltas_of_rows(log: TransactionLog, rows: Sequence[int]) -> Iterator[Delta]:
    """The deltas of ``rows`` (row numbers), in that order, built on demand; rows whose
    payload is in a mapped segment are checked a block at a time (one compiled call per
    block rather than one per row) just before they are read.

    Raises:
        SerializationError: a row's frame in a mapped segment is damaged or cut.
    """
    if not log.segs:
        for r in rows:
            yield log.delta_at(r)
        return
    for k in range(0, len(rows), _CHECK_BLOCK):
        block = rows[k:k + _CHECK_BLOCK]
        if isinstance(block, range) and block.step == 1:
            log.check_segments(r0=block.start, r1=block.stop)
        else:
            log.check_segments(np.array(block, np.int64))
        for r in block:
            yield log.delta_at(r, True)


class _ByPage:
    """``log.by_page``: page id → :class:`PageDeltas` (a read-only mapping)."""

    def __init__(self, log: TransactionLog) -> None:
        self._log = log

    def get(self, page_id: int, default: Any = None) -> Any:
        rows = self._log.index.get(page_id)
        return default if rows is None else PageDeltas(self._log, rows)

    def __getitem__(self, page_id: int) -> PageDeltas:
        return PageDeltas(self._log, self._log.index[page_id])

    def __contains__(self, page_id: object) -> bool:
        return page_id in self._log.index

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._log.index))

    def __len__(self) -> int:
        return len(self._log.index)

    def items(self) -> Iterator[tuple[int, PageDeltas]]:
        log = self._log
        return ((pid, PageDeltas(log, rows)) for pid, rows in list(log.index.items()))

    def keys(self) -> list[int]:
        return list(self._log.index)


def join_records(parts: Sequence[Sequence[AnyRecord]]) -> Sequence[AnyRecord]:
    """The records of ``parts`` one after another (slices of one log, in LSN order):
    their columns concatenated when every part holds columns
    (:class:`ColumnRecords`), else a list."""
    if parts and all(isinstance(p, ColumnRecords) for p in parts):
        return ColumnRecords(LogColumns.concat([p.cols for p in parts]))  # type: ignore[attr-defined]
    out: list[AnyRecord] = []
    for part in parts:
        out.extend(part)
    return out


def _structs_around(cols: LogColumns) -> bool:
    """True when the structural records, in order among themselves, all come before
    the rows or all after them (LSNs increasing, timestamps not decreasing): the usual
    shape (the pages' creations first), checked without merging. O(structural
    records)."""
    structs = cols.structs
    prev_lsn, prev_ts = structs[0].lsn, structs[0].timestamp
    for rec in structs[1:]:
        if rec.lsn <= prev_lsn or rec.timestamp < prev_ts:
            return False
        prev_lsn, prev_ts = rec.lsn, rec.timestamp
    n = len(cols)
    if not n:
        return True
    if prev_lsn < cols.lsn[0] and prev_ts <= cols.ts[0]:
        return True
    return bool(structs[0].lsn > cols.lsn[-1] and structs[0].timestamp >= cols.ts[-1])


def _private_copy(payload: np.ndarray) -> memoryview:
    return memoryview(bytearray(payload))


def _readonly_view(payload: np.ndarray) -> memoryview:
    # Chunks other than the open one are never written: read-only says so, and keeps
    # the history from changing through this view.
    return payload.data.toreadonly()


def check_columns(cols: LogColumns, next_page_id: int) -> str | None:
    """Why ``cols`` (read from a file) cannot be a log's records, or None when it can:
    row fields in range (pages below ``next_page_id``, sizes, epochs, LSNs, ids and
    base epochs, encodings, sources), payload lengths that fit their encodings and add
    up to the payload, payloads the log could have written (see :func:`check_rows`),
    no delta among the structural records, and LSNs that increase across rows and
    structural records with timestamps that never decrease. O(rows + payload bytes +
    structural records), vectorised."""
    n = len(cols)
    for name in ("ids", "epoch", "ts", "page", "psize", "plen", "src", "enc"):
        if len(getattr(cols, name)) != n:
            return f"column {name} holds {len(getattr(cols, name))} values for {n} rows"
    if n:
        r, code = check_rows(cols.lsn, cols.ids, cols.epoch, cols.ts, cols.page, cols.psize,
                             cols.plen, cols.src, cols.enc, cols.payload, len(cols.sources),
                             next_page_id, MAX_COUNTER, MAX_PAGE_SIZE)
        if code == 10:
            return (f"the rows' payloads add up to {r} bytes, the section holds "
                    f"{len(cols.payload)}")
        if code:
            return f"delta row {r} has {_ROW_PROBLEMS[code]}"
    rows, bases = cols.base_rows, cols.base_epochs
    if len(rows) != len(bases):
        return "base epochs and their rows differ in number"
    if len(rows):
        if (rows < 0).any() or (rows >= n).any() or (np.diff(rows) <= 0).any():
            return "base epochs name rows out of order or out of range"
        if (bases < 0).any() or (bases >= cols.epoch[rows]).any():
            return "a base epoch is not below its delta's epoch"
    if any(type(rec) is Delta for rec in cols.structs):
        return "a delta among the structural records"
    if any(not 0 < rec.lsn < MAX_COUNTER for rec in cols.structs):
        return "a structural record with an LSN out of range"
    if cols.structs and not _structs_around(cols):
        # Rows are in order already; merged with the structural records, LSNs must
        # still increase and timestamps never decrease.
        lsn = np.concatenate((cols.lsn, np.fromiter((r.lsn for r in cols.structs), np.int64,
                                                    len(cols.structs))))
        ts = np.concatenate((cols.ts, np.fromiter((r.timestamp for r in cols.structs),
                                                  np.int64, len(cols.structs))))
        order = np.argsort(lsn, kind="stable")
        if (np.diff(lsn[order]) <= 0).any() or (np.diff(ts[order]) < 0).any():
            return "records whose LSNs do not increase or whose timestamps decrease"
    return None


_ROW_PROBLEMS = {
    1: "a page id at or past the next page id", 2: "an impossible page size",
    3: "an epoch out of range", 4: "an LSN out of range", 5: "a delta id out of range",
    6: "an unknown source", 7: "an unknown payload encoding",
    8: "an LSN that does not follow the row before", 9: "a timestamp before the row before",
    11: "a payload the log could not have written",
}
