"""The durable bus's compiled batch: a batch of plain writes staged one by one, then
written to the log as one frame and published in one compiled call.

On the general path a write inside a batch builds a :class:`~mmsb._core.delta.Delta`,
stamps and holds a copy of it, and the batch's end encodes every held record with the
codec, joins them into one group frame with its CRC32C, appends it, keeps each record as
a log row and publishes the pages it touched, each step a few Python calls. Here:

- **Staging** (:func:`stage_write`, from ``write_bytes`` or ``batch_write`` inside a
  batch): one compiled call (:func:`_stage`) finds the changed positions in one pass
  (:func:`_changed`) and, when the delta is sparse (at most a quarter of the page,
  ``diff_write``'s rule), writes the delta's record body into the bus's batch buffer exactly as
  :func:`~mmsb._storage.codec.encode_record` encodes it, fills the log row and payload
  the in-memory log will keep (past its end: the log does not show them yet, as it
  does not show a held record), keeps the changed positions and their old bytes (the
  batch's undo entry), applies the write to the page and records the write's
  counters. The write is stamped with its LSN, time and delta id then, as a held
  record is.
- **Commit** (:func:`commit_staged`, from ``end_batch``): one compiled call
  (:func:`_commit`) completes the frame around the staged bodies (a group of them, or
  the single record's frame: the bytes :func:`~mmsb._storage.wal.records_frame`
  makes), its CRC32C, writes it at the end of the segment's frames (``pwrite(2)``,
  ``fdatasync`` with ``fsync="always"``), then publishes: the changed runs of each
  page to the mapped pages, its table row and the head, under the seqlock, and the
  notify word. Then the log takes the staged rows. Only the changed runs are copied
  to the mapped pages: a batch is staged only while no publication is pending, so
  they hold every other byte already.

Both calls keep the GIL, as the one-frame write's does (fastwrite.py): the state's lock
is held throughout, so no other writer could use the time, and a thread that reads the
counters the staging call writes sees them whole.

The general path stays the reference. A write this path does not take (a dense delta,
an unknown source, a page with dependants or device copies, events on, a shared or
replicating bus, a fault hook, a batch that already holds another record) goes the
general way; once a batch holds another record, or its end finds a condition the
commit cannot meet (a segment due to roll, a frame that may not fit the space written
ahead, mapped files to publish anew), the staged writes become held records (their
bodies decoded: :func:`unstage`) and the batch ends on the general path. So the
segments, the log, the pages, the mapped files and the events are byte for byte those
of the general path (a property test holds the two to that).
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import carray, njit

from .._core.arena import CHUNK_MASK, CHUNK_SHIFT
from .._core.kernels import (
    ENC_POS16,
    ENC_RUN,
    ENC_RUN16,
    LOG_CHUNK,
    _fill_row,
    entry_point,
    sparse_encoding,
)
from .._core.kernels import ptr as _ptr
from .._core.log import DeferredLog
from ..errors import DurabilityError
from . import fsops, notify
from .codec import decode_record
from .fastwrite import (
    _BUMP_WORD,
    _HEAD_WORDS,
    _K_APPLY_RING,
    _K_GEN,
    _K_HEAD,
    _K_LOGGED,
    _K_NOTIFY,
    _K_PAGES,
    _K_PAGES_LEN,
    _K_SEQ,
    _K_SLOTS,
    _K_SLOTS_LEN,
    _K_TABLE,
    _K_TABLE_LEN,
    _K_WAITERS,
    _LOG_WORD,
    _append_synced,
    _clock,
    _put,
    _put_delta_head,
    _sample,
)
from .fastwrite import (
    _CLOCK_MONOTONIC as CLOCK_MONOTONIC,
)
from .mapped import _LSN, _ROWS, _SEQ, _TS
from .notify import _atomic_add_u32, _atomic_add_u64, _atomic_load_u32
from .wal import FRAME_HEAD, KIND_GROUP
from .walbulk import CRC_TABLES, _crc

if TYPE_CHECKING:
    from .._core.engine import MMSBState
    from .bus import DurableBus

__all__ = ["commit_staged", "stage_write", "unstage"]

_FIXED = 59
"""A delta body's fixed head: kind u8, lsn u64, time i64, id, page, base epoch, epoch,
page size (u64 each), source length u16 (codec's ``_DELTA_FIXED``)."""
_FIRST_BODY = FRAME_HEAD + 5 + 4
"""Where the first staged body starts in the batch buffer: after the frame's head, the
group's head (kind u8, count u32) and the body's length (u32)."""
_SINGLE_AT = _FIRST_BODY - FRAME_HEAD
"""Where the frame starts when it holds a single record (no group: its head right
before the body)."""
_DENSE = -3
_NO_ROOM = -2
_SHORT = -6
_DECLINE_ROW = -4
# Columns of the commit's per-write table (int64).
_M_PAGE, _M_ADDR, _M_SIZE, _M_RUNS, _M_K, _M_EPOCH, _M_BODY, _M_ROW, _M_TS = range(9)
_M_COLS = 9
_TS8 = struct.Struct("<q")


_LOW_WORDS = 64
"""Words (of 8 bytes) per block of :func:`_changed`'s scan."""


@njit(cache=True, nogil=True)
def _changed(a: np.ndarray, b: np.ndarray, limit: int,
             out: np.ndarray) -> tuple[int, np.ndarray]:  # pragma: no cover - compiled
    """``(n, positions)`` as ``kernels.diff_scan`` returns them, in one pass; where both
    arrays start on an 8-byte boundary: blocks of 512 bytes are compared as the OR of
    their words' XORs (a loop the compiler vectorises), and only a block that differs
    is looked into, word by word, then byte by byte. The positions are written into
    ``out`` (room for at least ``min(len(a), limit)``) and returned as its first ``n``;
    the scan stops once more than ``limit`` differ (``n`` then says only that: over
    ``limit``). Unaligned arrays are compared byte by byte."""
    m = a.shape[0]
    w = m >> 3
    if w == 0 or ((a.ctypes.data | b.ctypes.data) & 7) != 0:
        # Not on 8-byte boundaries (a write at an odd offset): byte by byte, as
        # kernels.diff_scan does there.
        w = 0
    aw = a[:8 * w].view(np.uint64)
    bw = b[:8 * w].view(np.uint64)
    nb = w // _LOW_WORDS
    n = 0
    for blk in range(nb):
        acc = np.uint64(0)
        base = _LOW_WORDS * blk
        for i in range(base, base + _LOW_WORDS):
            acc |= aw[i] ^ bw[i]
        if acc:
            for i in range(base, base + _LOW_WORDS):
                if aw[i] != bw[i]:
                    for j in range(8 * i, 8 * i + 8):
                        if a[j] != b[j]:
                            if n < limit:
                                out[n] = j
                            n += 1
            if n > limit:
                return n, out[:0]
    for j in range(8 * _LOW_WORDS * nb, m):
        if a[j] != b[j]:
            if n < limit:
                out[n] = j
            n += 1
    if n > limit:
        return n, out[:0]
    return n, out[:n]


# Not nogil: it records the write's counters, which other threads read (as the
# one-frame write's kernel, fastwrite.py).
@njit(cache=True)
def _stage(mem: np.ndarray, at: int, size: int, off: int, new: np.ndarray, out: np.ndarray,
           body: int, src: np.ndarray, rows: np.ndarray, row: int, chunk: np.ndarray,
           coff: int, ci: int, pid: int, epoch: int, ts: int, srcid: int, lsn: int,
           did: int, k: np.ndarray, t0: int, scratch: np.ndarray
           ) -> tuple[int, int, int, int, int, int, int, int, np.ndarray,
                      np.ndarray]:  # pragma: no cover - compiled
    """Stage the write of ``new`` at ``off`` of the page of ``size`` bytes at
    ``mem[at:]``: the module's staging step (``scratch``: room for the changed
    positions, at least ``min(len(new), size // 4)``), the body's length written before
    it (``out[body - 4:body]``), the state's counters (``k``: :attr:`FastWriter.consts`)
    given the write's ``delta_apply`` sample (from ``t0``), a record and its changed
    bytes. The body and the log row take ``ts`` as their time stamp (:func:`stage_write`
    passes 0: :func:`_commit` writes the stamp). Returns ``(changed, body length, log payload length, where the body's run
    starts are in out, how many runs, the page's address, the first and one past the
    last changed position, the changed positions, their old bytes)``; changed 0:
    nothing differs (nothing done); -3: a dense delta, or a log payload the log keeps
    in a chunk of its own; -2: no room in the log's current chunk (``ci`` < 0: none);
    -6: the body does not fit ``out`` from ``body`` (its length returned); in all of
    these nothing is written."""
    m = new.shape[0]
    cur = mem[at + off:at + off + m]
    n, rel = _changed(cur, new, size >> 2, scratch)
    if n == 0:
        return 0, 0, 0, 0, 0, 0, 0, 0, np.empty(0, np.intp), np.empty(0, np.uint8)
    if n * 4 > size:
        return _DENSE, 0, 0, 0, 0, 0, 0, 0, np.empty(0, np.intp), np.empty(0, np.uint8)
    first = rel[0]
    last = rel[n - 1]
    runs = 1
    for i in range(1, n):
        if rel[i] != rel[i - 1] + 1:
            runs += 1
    slen = src.shape[0]
    blen = _FIXED + slen + 5 + 8 * runs + n
    if body + blen > out.shape[0]:
        return _SHORT, blen, 0, 0, 0, 0, 0, 0, np.empty(0, np.intp), np.empty(0, np.uint8)
    enc, plen = sparse_encoding(n, first, last, size)
    if plen > LOG_CHUNK >> 2:
        return _DENSE, 0, 0, 0, 0, 0, 0, 0, np.empty(0, np.intp), np.empty(0, np.uint8)
    if ci < 0 or plen > LOG_CHUNK - coff:
        return _NO_ROOM, 0, plen, 0, 0, 0, 0, 0, np.empty(0, np.intp), np.empty(0, np.uint8)
    # The record body, as codec.encode_record writes the delta.
    _put_delta_head(out, body, lsn, ts, did, pid, epoch, size)
    _put(out, body + 57, slen, 2)
    p = body + _FIXED
    for j in range(slen):
        out[p + j] = src[j]
    p += slen
    out[p] = 0  # codec.ENC_SPARSE_RUNS
    _put(out, p + 1, runs, 4)
    starts = p + 5
    lengths = starts + 4 * runs
    vals = lengths + 4 * runs
    # The log's payload (TransactionLog._push_delta's encodings): one run's start, or
    # every position, then the values.
    head = plen - n
    one = enc == ENC_RUN or enc == ENC_RUN16
    w = 0 if one else (2 if enc == ENC_POS16 else 4)
    if one:
        _put(chunk, coff, off + first, head)
    pos = np.empty(n, np.intp)
    old = np.empty(n, np.uint8)
    r = 0
    start = first
    for i in range(n):
        q = rel[i]
        if i and q != rel[i - 1] + 1:
            _put(out, starts + 4 * r, off + start, 4)
            _put(out, lengths + 4 * r, rel[i - 1] - start + 1, 4)
            r += 1
            start = q
        b = new[q]
        out[vals + i] = b
        chunk[coff + head + i] = b
        if not one:
            _put(chunk, coff + w * i, off + q, w)
        pos[i] = off + q
        old[i] = cur[q]
        cur[q] = b
    _put(out, starts + 4 * r, off + start, 4)
    _put(out, lengths + 4 * r, last - start + 1, 4)
    _fill_row(rows, row, pid, size, plen, srcid, enc, epoch, ts, (ci << 32) | coff)
    _put(out, body - 4, blen, 4)
    _sample(k, _K_APPLY_RING, _clock(k, CLOCK_MONOTONIC) - t0)
    logged = carray(_ptr(k[_K_LOGGED], k), (2,))
    logged[0] += 1
    logged[1] += n
    return (n, blen, plen, starts, runs, mem.ctypes.data + at, off + first, off + last + 1,
            pos, old)


@njit(cache=True)
def _commit(out: np.ndarray, count: int, stop: int, meta: np.ndarray, rows: np.ndarray,
            k: np.ndarray, end: int, lsn: int, ts: int, next_id: int,
            bump: int) -> tuple[int, int]:  # pragma: no cover - compiled
    """The module's commit step: each staged write's time stamp (read when it was
    staged, after its compare, as the general path reads it when it holds the record)
    into its body and its log row (``meta``'s last three columns: where the body
    starts in ``out``, the row, the time); the frame around the ``count`` staged bodies
    that end at ``out[stop]``, its CRC32C; ``pwrite(2)`` at ``end`` (the end of the segment's
    frames) until all of it is written, ``fdatasync`` too with ``fsync="always"``; the
    log's end to the head; then the publication of every staged write (``meta``'s rows:
    page, its bytes' address, size, where its runs are in ``out``, their count, its
    epoch): each run's bytes to the mapped page, the table row's epoch and LSN (the
    batch's last, ``lsn``), the head's LSN, rows, time and slot end, between two
    increments of the seqlock word; then the notify word. Returns ``(frame length,
    status)``: status 0, or 1 when followers wait on the notify word, or, when a file
    step failed (nothing published), ``-(errno * 2 + (1 if it was the sync))``;
    frame length -4 (nothing written) when a page's slot (the publisher's own record
    of the mapped rows) is not of its size or not inside the pages file."""
    table = carray(_ptr(k[_K_TABLE], k), (k[_K_TABLE_LEN],))
    # Where each page lies: the publisher's own record of the mapped rows (the shared
    # table is written, never read), checked inside the pages file before anything is
    # written.
    slots = carray(_ptr(k[_K_SLOTS], k), (k[_K_SLOTS_LEN],))
    for i in range(count):
        pid = meta[i, _M_PAGE]
        size = meta[i, _M_SIZE]
        if (table.shape[0] <= 4 * pid + 3 or slots.shape[0] <= 2 * pid + 1
                or slots[2 * pid + 1] != size or slots[2 * pid] < 0
                or slots[2 * pid] + size > k[_K_PAGES_LEN]):
            return _DECLINE_ROW, 0
    for i in range(count):
        _put(out, meta[i, _M_BODY] + 9, meta[i, _M_TS], 8)
        rows[meta[i, _M_ROW]].ts = meta[i, _M_TS]
    start = 0
    if count > 1:
        out[FRAME_HEAD] = KIND_GROUP
        _put(out, FRAME_HEAD + 1, count, 4)
    else:
        start = _SINGLE_AT
    flen = stop - start
    _put(out, start, flen - FRAME_HEAD, 8)
    crc = _crc(CRC_TABLES, 0xFFFFFFFF, out, start, 8)
    crc = _crc(CRC_TABLES, crc, out, start + FRAME_HEAD, flen - FRAME_HEAD) ^ 0xFFFFFFFF
    _put(out, start + 8, crc, 4)
    err = _append_synced(k, out.ctypes.data + start, flen, end)
    if err:
        return flen, err
    head = carray(_ptr(k[_K_HEAD], k), (_HEAD_WORDS,))
    head[_LOG_WORD] = k[_K_GEN]
    head[_LOG_WORD + 1] = k[_K_SEQ]
    head[_LOG_WORD + 2] = end + flen
    head[_LOG_WORD + 3] = lsn
    pages = carray(_ptr(k[_K_PAGES], out), (k[_K_PAGES_LEN],))
    _atomic_add_u64(k[_K_HEAD] + _SEQ * 8, np.uint64(1))
    for i in range(count):
        pid = meta[i, _M_PAGE]
        page = carray(_ptr(meta[i, _M_ADDR], out), (meta[i, _M_SIZE],))
        slot = slots[2 * pid]
        nr = meta[i, _M_K]
        runs = meta[i, _M_RUNS]
        for j in range(nr):
            s = np.int64(0)
            n = np.int64(0)
            for b in range(4):
                s |= np.int64(out[runs + 4 * j + b]) << (8 * b)
                n |= np.int64(out[runs + 4 * nr + 4 * j + b]) << (8 * b)
            for q in range(s, s + n):
                pages[slot + q] = page[q]
        table[4 * pid] = slot
        table[4 * pid + 1] = meta[i, _M_SIZE]
        table[4 * pid + 2] = meta[i, _M_EPOCH]
        table[4 * pid + 3] = lsn
    head[_LSN] = lsn
    head[_ROWS] = next_id
    head[_TS] = ts if ts > 0 else 0
    head[_BUMP_WORD] = bump
    _atomic_add_u64(k[_K_HEAD] + _SEQ * 8, np.uint64(1))
    _atomic_add_u32(k[_K_NOTIFY], np.uint32(1))
    return flen, 1 if _atomic_load_u32(k[_K_WAITERS]) != 0 else 0


_ENTRIES: dict[Any, Any] = {}
"""The kernels' compiled entries (see entry_point): ``_stage``'s for a read-only and a
writable payload (keyed False and True), ``_commit``'s ("commit")."""


def _entry(writable: bool, mem: np.ndarray, arr: np.ndarray, out: np.ndarray,
           src: np.ndarray, rows: np.ndarray, chunk: np.ndarray, k: np.ndarray) -> Any:
    """``_stage``'s compiled entry for these argument types, made (or loaded from the
    cache) once a process and kept for a payload that is (``writable``) or is not
    writable; for arguments of other types, the kernel itself, with its dispatch."""
    kernel = entry_point(_stage, mem, 0, 1, 0, arr, out, 0, src, rows, 0, chunk, 0, 0, 1,
                         1, 0, 0, 1, 1, k, 0, np.empty(0, np.intp))
    if (mem.dtype == np.uint8 and mem.ndim == 1 and mem.flags.c_contiguous
            and mem.flags.writeable and arr.ndim == 1 and arr.flags.c_contiguous
            and arr.flags.writeable == writable and chunk.flags.writeable
            and not src.flags.writeable):
        _ENTRIES[writable] = kernel
    return kernel


class Staged:
    """The staged writes of one batch (see the module's docstring)."""

    __slots__ = ("writes", "stop", "tail", "meta")

    def __init__(self, tail: int) -> None:
        self.writes: list[tuple[int, int, int, int, int, int, int, int, int, int]] = []
        """Per write: page, log row, LSN, delta id, log payload length, body start,
        body length, first and last changed position + 1, time stamp."""
        self.stop = _FIRST_BODY - 4
        """Where the next body's length goes (the end of the last body)."""
        self.tail = tail
        """Where the next log payload goes in the log's current chunk."""
        self.meta = array("q")
        """Per write, its row of the commit's ``meta`` (see :func:`_commit`)."""


def _tail_log(state: MMSBState) -> tuple[Any, Any]:
    """The log rows are kept in, and the DeferredLog in front of it (or None)."""
    log = state.log
    if type(log) is DeferredLog:
        return log.__dict__["_tail"], log
    return log, None


def _usable(bus: DurableBus, state: MMSBState) -> bool:
    """Whether the bus is in a state this path's commit can take."""
    w = bus.writer
    fw = bus.fast
    pub = bus.publisher
    return not (w is None or bus.shared or bus.failed is not None or bus.not_leader is not None
                or bus.ship is not None or bus.replication is not None
                or w.size >= fw.segment_bytes or fsops._hook is not None or not fw.usable
                or bus.closed or pub is None or pub.full or pub.failed or pub.touched
                or not state.config.enable_logging)


def stage_write(bus: DurableBus, state: MMSBState, frame: Any, pid: int, off: int, new: Any,
                source: str, t0: int) -> bool | None:
    """``write_bytes`` inside a batch on a durable bus (checked: a live page, the range
    inside it, a known kind of source; the state's lock held): stage the write (see the
    module's docstring). True: staged (a delta); False: nothing differs; None: the
    general path takes it (nothing was done). O(len(new))."""
    staged = frame.staged
    if staged is None:
        if frame.records or frame.direct or not _usable(bus, state):
            return None
    if (state.events.active or pid in state.graph.children or state.recomputing is not None
            or (state.devices is not None and pid in state.devices.slots)):
        return None
    log, deferred = _tail_log(state)
    if log.sink is None:
        return None
    srcid = log.source_ids.get(source)
    if srcid is None:
        return None
    fw = bus.fast
    if source is not fw.source and not fw.use_source(source):
        return None
    if type(new) is bytes:
        arr = np.frombuffer(new, np.uint8)
    elif new.flags.c_contiguous:
        arr = new
    else:
        arr = np.ascontiguousarray(new)
    if staged is None:
        staged = Staged(log.tail)
    t = state.table
    addr_v, size_v, epoch_v, _flags_v = t.views
    addr = addr_v[pid]
    size = size_v[pid]
    epoch = epoch_v[pid] + 1
    mem = state.arena._chunks[addr >> CHUNK_SHIFT]  # Arena.chunk, inlined
    assert mem is not None
    row = log.n + len(staged.writes)
    if row >= len(log.rows):
        # TransactionLog._grow, keeping the staged rows past the log's end too.
        rows = np.empty(2 * len(log.rows), log.rows.dtype)
        rows[:row] = log.rows[:row]
        log.rows = rows
        log._fit_crcs()
    lsn = log.next_lsn
    did = state.next_delta_id
    chunk = log.cur_array
    if chunk is not fw.batch_chunk:
        # The kernel writes payloads into a whole, writable chunk (or, with none yet,
        # asks for one): a chunk a checkpoint's log was read into may be neither.
        if log.cur >= 0 and not (chunk.size == LOG_CHUNK and chunk.flags.writeable):
            return None
        fw.batch_chunk = chunk
    out = fw.batch_out
    body = staged.stop + 4
    writable = type(new) is not bytes and arr.flags.writeable
    kernel = _ENTRIES.get(writable)
    if kernel is None:
        kernel = _entry(writable, mem, arr, out, fw.source_bytes, log.rows, chunk, fw.consts)
    c = state.counters
    if c is not fw.counters_of:
        fw.take_counters(c)
    scratch = fw.batch_pos
    if len(scratch) < len(arr) and len(scratch) < size >> 2:
        scratch = fw.batch_pos = np.empty(max(min(len(arr), size >> 2), 2 * len(scratch)),
                                          np.intp)
    while True:
        n, blen, plen, runs, nruns, at, lo, hi, pos, old = kernel(
            mem, addr & CHUNK_MASK, size, off, arr, out, body, fw.source_bytes, log.rows,
            row, chunk, staged.tail, log.cur, pid, epoch, 0, srcid, lsn, did, fw.consts, t0,
            scratch)
        if n == _NO_ROOM:
            if log.cur >= 0 and plen <= LOG_CHUNK and staged.tail == 0:
                return None  # pragma: no cover - a fresh chunk always has room
            log._new_chunk()
            staged.tail = 0
            chunk = fw.batch_chunk = log.cur_array
        elif n == _SHORT:
            grown = np.zeros(max(2 * len(out), body + blen + 64), np.uint8)
            grown[:body] = out[:body]
            fw.batch_out = out = grown
        else:
            break
    if n <= 0:
        return None if n else False
    # The time stamp, read as the general path reads it when it holds the record (the
    # commit writes it into the body and the row, which the kernel left at 0).
    ts = time.time_ns()  # TransactionLog._next_stamp, inlined
    if ts < log.last_timestamp:
        ts = log.last_timestamp
    frame.staged = staged
    frame.undo.append(("delta", pid, epoch - 1, pos, old))
    staged.writes.append((pid, row, lsn, did, plen, body, blen, lo, hi, ts))
    staged.meta.extend((pid, at, size, runs, nruns, epoch, body, row, ts))
    staged.stop = body + blen
    staged.tail += plen
    log.next_lsn = lsn + 1
    log.last_timestamp = ts
    if deferred is not None:
        deferred._mirror()
    state.next_delta_id = did + 1
    epoch_v[pid] = epoch
    return True


def unstage(bus: DurableBus, frame: Any) -> None:
    """Make the batch's staged writes held records, in order (their bodies decoded:
    the deltas the general path would hold), so that the batch goes on, or ends, on
    the general path. The log rows they filled past the log's end are left there
    (unused). O(staged bytes)."""
    staged = frame.staged
    if staged is None:
        return
    frame.staged = None
    out = bus.fast.batch_out.data
    for _pid, _row, _lsn, _did, _plen, at, _blen, _lo, _hi, ts in staged.writes:
        _TS8.pack_into(out, at + 9, ts)  # the time stamp the commit would write
    frame.records.extend(decode_record(out[at:at + blen], "staged write")
                         for _pid, _row, _lsn, _did, _plen, at, blen, _lo, _hi, _ts
                         in staged.writes)


def commit_staged(bus: DurableBus, state: MMSBState, frame: Any) -> bool:
    """End a batch that holds only staged writes (``end_batch``, the state's lock held):
    their frame written (and synced with ``fsync="always"``) and published in one
    compiled call, then kept as log rows. False when the commit cannot take them now
    (they became held records: :func:`unstage`); the general path then ends the batch.

    Raises:
        DurabilityError: the frame could not be written or synced: nothing of it is in
            the log (the caller rolls the batch back), as on the general path.
    """
    staged = frame.staged
    assert staged is not None and not frame.records
    w = bus.writer
    fw = bus.fast
    pub = bus.publisher
    count = len(staged.writes)
    flen = staged.stop - (0 if count > 1 else _SINGLE_AT)
    if not _usable(bus, state) or w is None or (w.ahead and w.size + flen > w.allocated):
        unstage(bus, frame)
        return False
    assert pub is not None
    if (fw.writer_of is not w or fw.pub_of is not pub or fw.table_of is not pub.table
            or fw.pages_of is not pub.pages or fw.slots_of is not pub.slots):
        fw.refresh(w, pub, bus.generation)
    log, deferred = _tail_log(state)
    last = staged.writes[-1]
    before = w.size
    meta = np.frombuffer(staged.meta, np.int64).reshape(count, _M_COLS)
    commit = _ENTRIES.get("commit")
    if commit is None:
        commit = _ENTRIES["commit"] = entry_point(_commit, fw.batch_out, 1, 1, meta,
                                                  log.rows, fw.consts, 0, 0, 0, 0, 0)
    got, status = commit(fw.batch_out, count, staged.stop, meta, log.rows, fw.consts, before,
                         last[2], log.last_timestamp, state.table.next_id, pub.bump)
    if got == _DECLINE_ROW:
        unstage(bus, frame)
        return False
    if status >= 0 or status & 1:
        w.size = before + flen  # written whole (a failed sync leaves it there)
        if w.size > w.allocated:
            w.allocated = w.size
        w.dirty = status < 0 or not fw.always
    if status < 0:
        err = -status
        exc = OSError(err >> 1, os.strerror(err >> 1))
        for pid, _row, _lsn, _did, _plen, _at, _blen, lo, hi, _ts in staged.writes:
            old = pub.touched.get(pid)
            pub.touched[pid] = (lo, hi) if old is None else (min(lo, old[0]), max(hi, old[1]))
        frame.staged = None
        raise _failed(bus, w, before, exc, "fsync" if err & 1 else "append") from exc
    if status:
        notify.wake(pub.notify_addr)
    # The log keeps the staged rows: TransactionLog._note_row for each, in order.
    lsns = log.lsns
    ids = log.ids
    index = log.index
    for pid, row, lsn, did, plen, _at, _blen, _lo, _hi, _ts in staged.writes:
        lsns.push(row, lsn)
        ids.push(row, did)
        rows = index.get(pid)
        if rows is None:
            index[pid] = array("I", [row])
        else:
            rows.append(row)
        log.payload_bytes += plen
    log.n = last[1] + 1
    log.tail = staged.tail
    if deferred is not None:
        deferred._mirror()
    bus.records_since_ckpt += count
    frame.staged = None
    return True


def _failed(bus: DurableBus, w: Any, before: int, exc: OSError, stage: str) -> DurabilityError:
    """The error of a frame that could not be written (``stage`` "append") or synced
    ("fsync"), the segment and the bus left as ``SegmentWriter.append`` and
    ``append_frames`` leave them: a partial frame cut back and the batch refused alone,
    or the bus refusing every later write when the cut or the sync failed."""
    if stage == "append":
        w.cut(before)
        w.size = before
    why = exc.strerror or exc
    if stage == "append" and w.intact:
        return DurabilityError(f"writing the log at {bus.root} failed ({why}); this write was "
                               "not applied or logged, and the bus goes on")
    bus.failed = exc
    return DurabilityError(f"writing the log at {bus.root} failed ({why}); the bus refuses "
                           "further writes")
