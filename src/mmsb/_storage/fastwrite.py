"""The durable bus's one-frame small write.

``write_page`` / ``update_page`` of a ``bytes`` payload of at most
:data:`~mmsb._core.kernels.SMALL_WRITE` bytes into a live page of an exclusive, healthy
durable bus take this path: one Python frame and one compiled call, where the general
path builds a :class:`~mmsb._core.delta.Delta`, encodes it with the codec, frames it,
writes it, keeps it, applies it and publishes it through a dozen calls. The compiled
call (:func:`_write_frame`) does, in order:

1. :func:`_encode`: compare the payload with the page and, when at most a quarter of
   the page changes (a sparse delta, as ``diff_write`` decides), encode the log row and
   payload the in-memory log keeps and the whole write-ahead-log frame (``length u64 |
   crc32c u32 | body``, the body exactly as :func:`~mmsb._storage.codec.encode_record`
   writes the delta; its CRC32C by the bulk segment reader's compiled loop). A delta of
   one run whose frame fits the segment's read-only mapping (a chunk of the log, see
   histmap.py) keeps no payload in the log: its row points at the run inside the frame
   (``ENC_SEGRUN``) and the frame's CRC goes to the log's CRC column. Nothing the state
   or the files show changes.
2. ``pwrite(2)`` of the frame to the segment at the end of its frames (libc's, called
   at its address; the segment is written ahead with zeros, see wal.py, so the write
   lands in blocks the file has and the sync commits no new size), and
   ``fdatasync`` with ``fsync="always"``: the record is in the kernel (safe from a crash
   of the process), or on stable storage, before anything takes effect, as on the
   general path. A failure returns here with nothing applied.
3. :func:`_apply_publish`: apply the changed bytes to the page and show them to attached
   readers: the log's end in the head, then, under the seqlock, the bytes of the mapped
   page, its table row and the head's LSN and time; then the notify word.
4. The state's counters: the ``log_append`` and ``delta_apply`` latency samples (timed
   with libc's ``clock_gettime``, the clock of ``time.perf_counter_ns``) and
   ``records_logged`` / ``payload_bytes_logged``, written into their plain arrays.

What the call reaches through addresses rather than arguments (the frame buffer, the
log's current chunk, the mapped files, the counters' arrays) sits in one int64 array
the bus keeps (:attr:`FastWriter.consts`), refreshed when one of them is replaced: each
array passed costs the call's entry some tens of nanoseconds. The call keeps the GIL:
it takes a microsecond or two, less than releasing and taking back the GIL costs.

Anything else declines (returns None) before changing anything and the general path,
which stays the reference, takes the call: a batch, a shared writer, replication, a
dense or new-source write, a publication that must be redone, a segment due to roll or
whose space written ahead may not hold the frame (the general path writes ahead, so the
segments' bytes do not depend on which path wrote them), a
bus that failed, a fault hook installed (:func:`~mmsb._storage.fsops.set_fault_hook`:
its loops walk the general path's steps) or a libc without those calls. The frames are
byte for byte those of the general path (a property test holds the two paths to the
same segment bytes, pages, epochs, log, events, mapped pages and refusals), so
recovery, readers, the change feed and replication read them unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from array import array
from typing import TYPE_CHECKING, Any

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from .._core.arena import CHUNK_MASK, CHUNK_SHIFT
from .._core.engine import _API, _GOOD_SOURCES
from .._core.kernels import (
    CLOCK_MONOTONIC,
    LOG_CHUNK,
    SMALL_WRITE,
    _fill_row,
    change_ends,
    count_changed,
    encode_sparse,
    entry_point,
    sparse_encoding,
)
from .._core.kernels import c_clock_gettime as _c_clock_gettime
from .._core.kernels import ptr as _ptr
from .._core.kernels import ring_sample as _sample
from .._core.log import DeferredLog
from ..errors import DurabilityError
from . import fsops, notify
from .codec import KIND_DELTA
from .histmap import MappedSegment, map_segment
from .mapped import _BUMP_OFF, _LOG_OFF, _LSN, _ROWS, _SEQ, _TS, HEAD_SIZE
from .notify import _atomic_add_u32, _atomic_add_u64, _atomic_load_u32
from .wal import FRAME_HEAD
from .walbulk import CRC_TABLES, _crc

if TYPE_CHECKING:
    from .._core.engine import MMSBState
    from .bus import DurableBus

__all__ = ["durable_write_small", "FastWriter"]

_SRC_AT = FRAME_HEAD + 57
"""Offset in the frame of the delta's source length (after the 17-byte record head and
the five u64 fields of a delta)."""
_MAX_SOURCE = 1024
"""Longer source names take the general path (the frame buffer has room for this)."""
_OUT_BYTES = _SRC_AT + 2 + _MAX_SOURCE + 9 + 8 * (SMALL_WRITE // 2 + 1) + SMALL_WRITE
"""A frame of the largest write this path takes: head, source, run count, at most
SMALL_WRITE / 2 + 1 runs (u32 start and length each) and the values."""
_DECLINE_DENSE = -3
_DECLINE_ROW = -4
_NO_ROW = -5
_NO_ROOM = -2
_EINTR = 4


def _libc_addresses() -> tuple[int, int, int, int]:
    """Addresses of libc's ``pwrite``, ``fdatasync``, ``__errno_location`` and
    ``clock_gettime`` (glibc and musl have all four), for the compiled path to call;
    zeros where not found (then the general path takes every write)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return tuple(ctypes.cast(getattr(libc, name), ctypes.c_void_p).value or 0
                     for name in ("pwrite", "fdatasync", "__errno_location",
                                  "clock_gettime"))  # type: ignore[return-value]
    except (OSError, AttributeError):
        return 0, 0, 0, 0


_LIBC = _libc_addresses() if sys.platform.startswith("linux") else (0, 0, 0, 0)
_CLOCK_MONOTONIC = CLOCK_MONOTONIC


def _pwrite_typer(typingctx: Any, fn: Any, fd: Any, addr: Any, n: Any,
                  off: Any) -> Any:  # pragma: no cover
    sig = types.int64(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64, i32 = ir.IntType(64), ir.IntType(32)
        fnty = ir.FunctionType(i64, [i32, i64, i64, i64])
        f = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(f, [builder.trunc(args[1], i32), args[2], args[3], args[4]])

    return sig, codegen


def _sync_typer(typingctx: Any, fn: Any, fd: Any) -> Any:  # pragma: no cover
    sig = types.int64(types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        f = builder.inttoptr(args[0], ir.FunctionType(i32, [i32]).as_pointer())
        return builder.sext(builder.call(f, [builder.trunc(args[1], i32)]), ir.IntType(64))

    return sig, codegen


def _errno_typer(typingctx: Any, fn: Any) -> Any:  # pragma: no cover
    sig = types.int64(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        f = builder.inttoptr(args[0], ir.FunctionType(i32.as_pointer(), []).as_pointer())
        return builder.sext(builder.load(builder.call(f, [])), ir.IntType(64))

    return sig, codegen


# Calls of libc functions at an address (passed in, never baked into cached code).
_c_pwrite: Any = intrinsic(_pwrite_typer)
_c_fdatasync: Any = intrinsic(_sync_typer)
_c_errno: Any = intrinsic(_errno_typer)

# Fields of FastWriter.consts, the ints that change only when the segment, the
# publisher's mappings, the log's chunk, the state's counters or the source name do;
# the last two words are the kernel's room for clock_gettime's timespec.
_K_FD, _K_WRITE, _K_SYNC, _K_ERRNO, _K_HEAD, _K_NOTIFY, _K_WAITERS, _K_GEN, _K_SEQ, \
    _K_BODY, _K_ALWAYS, _K_PAGES, _K_PAGES_LEN, _K_TABLE, _K_TABLE_LEN, _K_OUT, \
    _K_CHUNK, _K_CLOCK, _K_LOG_RING, _K_LOG_AT, _K_LOG_CAP, _K_APPLY_RING, _K_APPLY_AT, \
    _K_APPLY_CAP, _K_LOGGED, _K_SEG, _K_SEG_LEN, _K_CRCS, _K_CRCS_LEN, _K_SLOTS, _K_SLOTS_LEN, \
    _K_TIMESPEC = range(32)
_K_WORDS = _K_TIMESPEC + 2
_U32_LIKE = np.zeros(1, np.uint32)
"""The element type of the log's CRC column, for the kernel's typed pointer to it."""
_HEAD_WORDS = HEAD_SIZE // 8
# Words of the mapped head (see mapped.py's layout).
_LOG_WORD = _LOG_OFF // 8
_BUMP_WORD = _BUMP_OFF // 8


@njit(cache=True, nogil=True, inline="always")
def _put(out: np.ndarray, at: int, value: int, nbytes: int) -> None:  # pragma: no cover
    for j in range(nbytes):
        out[at + j] = (value >> (8 * j)) & 0xFF


@njit(cache=True, nogil=True, inline="always")
def _append_synced(k: np.ndarray, at: int, flen: int, end: int) -> int:  # pragma: no cover
    """Write the ``flen`` bytes at address ``at`` to the segment at offset ``end``
    (``pwrite`` until done, again on EINTR), then ``fdatasync`` it when the bus syncs
    every write. Returns 0, ``-2 * errno`` for a failed write, ``-2 * errno - 1`` for
    a failed sync."""
    done = 0
    while done < flen:
        got = _c_pwrite(k[_K_WRITE], k[_K_FD], at + done, flen - done, end + done)
        if got < 0:
            e = _c_errno(k[_K_ERRNO])
            if e == _EINTR:
                continue
            return -2 * e
        done += got
    if k[_K_ALWAYS]:
        while _c_fdatasync(k[_K_SYNC], k[_K_FD]) != 0:
            e = _c_errno(k[_K_ERRNO])
            if e != _EINTR:
                return -2 * e - 1
    return 0


@njit(cache=True, nogil=True, inline="always")
def _put_delta_head(out: np.ndarray, at: int, lsn: int, ts: int, did: int, pid: int,
                    epoch: int, size: int) -> None:  # pragma: no cover - compiled
    """A delta record's fixed head at ``out[at:]``, as codec.encode_record writes it: the
    kind, LSN, timestamp, delta id, page, base epoch, epoch and page size (the source
    name's length and the payload follow)."""
    out[at] = KIND_DELTA
    _put(out, at + 1, lsn, 8)
    _put(out, at + 9, ts, 8)
    _put(out, at + 17, did, 8)
    _put(out, at + 25, pid, 8)
    _put(out, at + 33, epoch - 1, 8)
    _put(out, at + 41, epoch, 8)
    _put(out, at + 49, size, 8)


@njit(cache=True, nogil=True, inline="always")
def _clock(k: np.ndarray, clock: int) -> int:  # pragma: no cover - compiled
    """``clock``'s time in ns through libc's ``clock_gettime``, the timespec in ``k``'s
    last two words (``time.perf_counter_ns()`` of :data:`_CLOCK_MONOTONIC`)."""
    _c_clock_gettime(k[_K_CLOCK], clock, k.ctypes.data + 8 * _K_TIMESPEC)
    return k[_K_TIMESPEC] * 1_000_000_000 + k[_K_TIMESPEC + 1]


@njit(cache=True, nogil=True)
def _encode(mem: np.ndarray, base: int, size: int, off: int, new: bytes, rows: np.ndarray,
            row: int, chunk: np.ndarray, coff: int, ci: int, out: np.ndarray, slots: np.ndarray,
            pid: int, epoch: int, ts: int, src: int, lsn: int, did: int,
            body: int, seg: int, seg_len: int, end: int,
            crcs: np.ndarray) -> tuple[int, int, int, int, int, bool]:  # pragma: no cover
    """Step 1 of the module's path. ``body``: where the frame's delta encoding starts in
    ``out`` (after the source name, which the caller keeps there). ``seg``: the log's
    chunk number of the segment's mapping (``seg_len`` bytes; -1: none), the frame to
    go at ``end`` of the segment: a one-run delta whose frame fits the mapping gets a
    row pointing at its run in the frame there (``ENC_SEGRUN``, the frame's CRC in
    ``crcs[row]``) and nothing in the log chunk. Returns ``(changed, log payload
    length, frame length, first, last, in segment)``, ``first`` … ``last`` the range of
    ``new`` that changes; changed 0: nothing differs; -2: no room in the log chunk; -3:
    a dense delta; -4: the page's slot (``slots``, the publisher's own record of the
    mapped rows) is not of its size (nothing written in
    any of these cases)."""
    if slots.shape[0] <= 2 * pid + 1 or slots[2 * pid + 1] != size or size > 0xFFFFFFFF:
        return _DECLINE_ROW, 0, 0, 0, 0, False
    m = len(new)
    page = mem[base:base + size]
    cur = page[off:off + m]
    n = count_changed(cur, new, m)
    if n == 0:
        return 0, 0, 0, 0, 0, False
    if n * 4 > size:
        return _DECLINE_DENSE, 0, 0, 0, 0, False
    first, last = change_ends(cur, new, m)
    one_run = last - first + 1 == n
    # A one-run delta whose frame fits the segment's mapping: its row points at the run
    # in the frame (u32 start, u32 count, values, 5 bytes into the body's encoding).
    in_seg = one_run and seg >= 0 and end + body + 13 + n <= seg_len
    if in_seg:
        if row >= crcs.shape[0]:
            return _NO_ROW, 0, 0, 0, 0, False
        plen = 8 + n
        _fill_row(rows, row, pid, size, plen, src, 7, epoch, ts, (seg << 32) | (end + body + 5))
    else:
        # The log's row and payload, as TransactionLog keeps the delta (see write_small).
        enc, plen = sparse_encoding(n, first, last, size)
        if plen > LOG_CHUNK - coff:
            return _NO_ROOM, plen, 0, 0, 0, False
        encode_sparse(chunk, coff, cur, new, off, first, last, n, enc, plen)
        _fill_row(rows, row, pid, size, plen, src, enc, epoch, ts, (ci << 32) | coff)
    # The frame: the record head and the delta's fields ...
    _put_delta_head(out, FRAME_HEAD, lsn, ts, did, pid, epoch, size)
    # ... the source name is in place; then the sparse payload: its runs, the values.
    p = body
    out[p] = 0  # codec.ENC_SPARSE_RUNS
    if one_run:
        _put(out, p + 1, 1, 4)
        _put(out, p + 5, off + first, 4)
        _put(out, p + 9, n, 4)
        p += 13
        for k in range(n):
            out[p + k] = new[first + k]
    else:
        runs = 1
        prev = first
        for i in range(first + 1, last + 1):
            if cur[i] != new[i]:
                if i != prev + 1:
                    runs += 1
                prev = i
        _put(out, p + 1, runs, 4)
        starts = p + 5
        lengths = starts + 4 * runs
        vals = lengths + 4 * runs
        r = 0
        k = 0
        start = first
        prev = first
        for i in range(first, last + 1):
            b = new[i]
            if cur[i] != b:
                if i != prev + 1 and k:
                    _put(out, starts + 4 * r, off + start, 4)
                    _put(out, lengths + 4 * r, prev - start + 1, 4)
                    r += 1
                    start = i
                prev = i
                out[vals + k] = b
                k += 1
        _put(out, starts + 4 * r, off + start, 4)
        _put(out, lengths + 4 * r, prev - start + 1, 4)
        p = vals
    flen = p + n
    _put(out, 0, flen - FRAME_HEAD, 8)
    crc = _crc(CRC_TABLES, 0xFFFFFFFF, out, 0, 8)
    crc = _crc(CRC_TABLES, crc, out, FRAME_HEAD, flen - FRAME_HEAD) ^ 0xFFFFFFFF
    _put(out, 8, crc, 4)
    if in_seg:
        crcs[row] = crc
    return n, plen, flen, first, last, in_seg


@njit(cache=True, nogil=True)
def _apply_publish(mem: np.ndarray, at: int, new: bytes, first: int, last: int,
                   pages: np.ndarray, table: np.ndarray, head: np.ndarray, head_addr: int,
                   pid: int, slot: int, size: int, off: int, epoch: int, lsn: int, ts: int,
                   rows: int, bump: int,
                   gen: int, seq: int, end: int, notify_addr: int, waiters_addr: int,
                   publish: bool) -> bool:  # pragma: no cover - compiled
    """Step 3 of the module's path: ``new[first:last + 1]`` to ``mem[at + first:]`` (the
    write's place in the page, at offset ``off``); the log's end to the head; then, when
    ``publish``, the same bytes to the mapped page (at ``slot``, the publisher's own
    record of where it lies: the mapped row is written, never read) and the page's
    table row between two increments of the head's seqlock word (each a full barrier, so no
    store moves out of the odd section), and the notify word bumped. Returns True when
    followers wait on the notify word (the caller wakes them)."""
    for i in range(first, last + 1):
        mem[at + i] = new[i]
    head[_LOG_WORD] = gen
    head[_LOG_WORD + 1] = seq
    head[_LOG_WORD + 2] = end
    head[_LOG_WORD + 3] = lsn
    if not publish:
        return False
    _atomic_add_u64(head_addr + _SEQ * 8, np.uint64(1))
    r = 4 * pid
    at_slot = slot + off
    for i in range(first, last + 1):
        pages[at_slot + i] = mem[at + i]
    table[r] = slot
    table[r + 1] = size
    table[r + 2] = epoch
    table[r + 3] = lsn
    head[_LSN] = lsn
    head[_ROWS] = rows
    head[_TS] = ts if ts > 0 else 0
    head[_BUMP_WORD] = bump
    _atomic_add_u64(head_addr + _SEQ * 8, np.uint64(1))
    _atomic_add_u32(notify_addr, np.uint32(1))
    return _atomic_load_u32(waiters_addr) != 0


# Not nogil: the call takes a microsecond or two, less than handing the GIL to another
# thread and taking it back costs the caller (the state's lock is held throughout, so
# no other writer could use the time anyway); and a thread that reads the counters it
# writes (the bus's stats file, from the group commit's thread) sees them whole.
@njit(cache=True)
def _write_frame(mem: np.ndarray, addr: int, size: int, off: int, new: bytes, rows: np.ndarray,
                 row: int, coff: int, ci: int, pid: int, epoch: int, ts: int, src: int,
                 lsn: int, did: int, next_id: int, bump: int, end: int, publish: bool,
                 k: np.ndarray) -> tuple[int, int, int, int, int]:  # pragma: no cover
    """The whole path in one call: :func:`_encode`; the frame written to the segment
    (``pwrite(2)`` at ``end`` until all of it is, ``fdatasync`` too with
    ``fsync="always"``); then
    :func:`_apply_publish`. ``addr``: the page's arena address (its place in ``mem``,
    the arena chunk, is ``addr & CHUNK_MASK``); ``k``: the :data:`FastWriter.consts` (the frame buffer, the
    log's current chunk, the mapped files and the counters' rings are reached through
    the addresses there: each array passed costs the call about 0.09 µs); ``end``: the
    end of the segment's frames before this one. A written frame records the state's
    ``log_append`` sample (this call's start to the frame in the kernel) and, when
    ``publish``, its ``delta_apply`` sample (to the page published) and adds to the
    counters' ``records_logged`` and ``payload_bytes_logged``. Returns
    ``_encode``'s five values and a status: 0, or 1 when followers wait on the notify
    word (the caller wakes them), or, when a file step failed (nothing applied),
    ``-(errno * 2 + (1 if it was the sync))``; ``first`` and ``last`` as one int,
    ``first << 32 | last`` (the caller needs them only when the call does not end here).
    Changed -5: no row left in ``rows`` (or in the log's CRC column); -2 also when
    there is no current log chunk (``ci`` < 0). Status bit 2 (status ≥ 0): the row
    points at the frame in the segment's mapping (``ENC_SEGRUN``), and the log chunk
    was not used."""
    if (k[_K_PAGES] == 0 or k[_K_TABLE] == 0 or k[_K_SLOTS] == 0 or k[_K_HEAD] == 0
            or k[_K_LOG_RING] == 0):
        return _DECLINE_ROW, 0, 0, 0, 0  # nothing mapped (yet)
    slots = carray(_ptr(k[_K_SLOTS], k), (k[_K_SLOTS_LEN],))
    slot = slots[2 * pid] if slots.shape[0] > 2 * pid + 1 else -1
    if slot < 0 or slot + size > k[_K_PAGES_LEN] or 4 * pid + 3 >= k[_K_TABLE_LEN]:
        return _DECLINE_ROW, 0, 0, 0, 0  # (the general path publishes it)
    if row >= rows.shape[0]:
        return _NO_ROW, 0, 0, 0, 0
    if ci < 0:
        return _NO_ROOM, 0, 0, 0, 0
    if k[_K_CHUNK] == 0:
        return _DECLINE_ROW, 0, 0, 0, 0  # a chunk this path cannot write into
    t0 = _clock(k, _CLOCK_MONOTONIC)
    table = carray(_ptr(k[_K_TABLE], k), (k[_K_TABLE_LEN],))
    out = carray(_ptr(k[_K_OUT], mem), (_OUT_BYTES,))
    chunk = carray(_ptr(k[_K_CHUNK], mem), (LOG_CHUNK,))
    crcs = carray(_ptr(k[_K_CRCS], _U32_LIKE), (k[_K_CRCS_LEN],))
    base = addr & CHUNK_MASK
    n, plen, flen, first, last, in_seg = _encode(mem, base, size, off, new, rows, row, chunk,
                                                 coff, ci, out, slots, pid, epoch, ts, src,
                                                 lsn, did, k[_K_BODY], k[_K_SEG],
                                                 k[_K_SEG_LEN], end, crcs)
    span = first << 32 | last
    if n <= 0:
        return n, plen, flen, span, 0
    err = _append_synced(k, k[_K_OUT], flen, end)
    if err:
        return n, plen, flen, span, err
    _sample(k, _K_LOG_RING, _clock(k, _CLOCK_MONOTONIC) - t0)
    pages = carray(_ptr(k[_K_PAGES], out), (k[_K_PAGES_LEN],))
    head = carray(_ptr(k[_K_HEAD], k), (_HEAD_WORDS,))
    woke = _apply_publish(mem, base + off, new, first, last, pages, table, head, k[_K_HEAD],
                          pid, slot, size, off, epoch, lsn, ts, next_id, bump, k[_K_GEN],
                          k[_K_SEQ],
                          end + flen, k[_K_NOTIFY], k[_K_WAITERS], publish)
    if publish:
        _sample(k, _K_APPLY_RING, _clock(k, _CLOCK_MONOTONIC) - t0)
        logged = carray(_ptr(k[_K_LOGGED], k), (2,))
        logged[0] += 1
        logged[1] += n
    return n, plen, flen, span, (1 if woke else 0) | (2 if in_seg else 0)


_ENTRIES: dict[str, Any] = {}
"""The compiled entries of the two kernels, made on first use (see entry_point)."""


class FastWriter:
    """What the path keeps between calls on one bus: the frame buffer (its source name
    in place for the last source used), the int64 view of the mapped table and the
    ints the kernel reads from :attr:`consts`."""

    __slots__ = ("out", "source", "table_of", "pages_of", "slots_of", "consts", "writer_of",
                 "pub_of",
                 "always", "segment_bytes", "usable", "kernel", "chunk_of", "counters_of",
                 "room", "seg_writer", "seg", "seg_ci", "crcs_of", "source_bytes",
                 "batch_out", "batch_chunk", "batch_pos")

    def __init__(self, always: bool, segment_bytes: int) -> None:
        self.segment_bytes = segment_bytes
        """The bus's ``segment_bytes``: a segment this long rolls (the general path)."""
        self.out = np.zeros(_OUT_BYTES, np.uint8)
        self.source: str | None = None
        self.source_bytes = np.zeros(0, np.uint8)
        """The source's name, UTF-8 (what the frame buffer holds)."""
        self.batch_out = np.zeros(1 << 16, np.uint8)
        """The frame buffer of a staged batch (fastbatch.py), grown as batches need."""
        self.batch_pos = np.empty(1 << 12, np.intp)
        """Room for the changed positions a staged write finds."""
        self.batch_chunk: object = None
        """The log chunk a staged batch last found whole and writable."""
        self.room = _OUT_BYTES
        """A frame of a write of ``n`` bytes is at most ``room + 5 * n`` bytes long (the
        frame's head and source name, the encoding's 9 bytes, at most ``n / 2 + 1`` runs
        of 8 bytes and the ``n`` values), for the source in the buffer."""
        self.table_of: object = None
        self.pages_of: object = None
        self.slots_of: object = None
        """The publisher's table, pages and slots arrays whose addresses ``consts`` holds
        (kept referenced, so that their mappings stay while the addresses are in use)."""
        self.consts = np.zeros(_K_WORDS, np.int64)
        """The kernel's ints that change only with the segment, the publisher, the
        log's chunk, the counters or the source (the fields ``_K_*``)."""
        self.chunk_of: object = None
        """The log chunk (``cur_array``) whose address ``consts`` holds."""
        self.counters_of: object = None
        """The state's counters whose rings' addresses ``consts`` holds (kept
        referenced, so that the arrays stay while their addresses are in use)."""
        self.writer_of: object = None
        self.pub_of: object = None
        self.always = always
        """``fsync="always"``: each frame is synced before the call returns."""
        self.usable = all(_LIBC)
        """False where libc's calls were not found: the general path takes every write."""
        self.seg_writer: object = None
        """The segment writer whose file :attr:`seg` maps (or failed to)."""
        self.seg: MappedSegment | None = None
        """The read-only mapping of the open segment, a payload chunk of the log: the
        rows of one-run writes point at their frames there (see histmap.py)."""
        self.seg_ci = -1
        """The log's chunk number of :attr:`seg` (as in ``consts``)."""
        self.crcs_of: object = None
        """The log's CRC column whose address ``consts`` holds."""
        self.kernel: Any = _ENTRIES.get("write", _write_frame)
        """The kernel: its compiled entry once made (see entry_point)."""
        k = self.consts
        k[_K_WRITE], k[_K_SYNC], k[_K_ERRNO], k[_K_CLOCK] = _LIBC
        k[_K_ALWAYS] = always
        k[_K_OUT] = self.out.ctypes.data
        k[_K_SEG] = -1

    def refresh(self, w: Any, pub: Any, generation: int) -> None:
        """Take the segment's and the publisher's ints (after a roll, a reopen or the
        growth of a mapped file)."""
        k = self.consts
        k[_K_FD] = w.fd
        k[_K_GEN] = generation
        k[_K_SEQ] = w.seq
        k[_K_HEAD] = pub.head_addr
        k[_K_NOTIFY] = pub.notify_addr
        k[_K_WAITERS] = pub.waiters_addr
        table = pub.table.view(np.int64).reshape(-1)
        k[_K_TABLE] = table.ctypes.data if table.size else 0
        k[_K_TABLE_LEN] = table.size
        k[_K_PAGES] = pub.pages.ctypes.data if pub.pages.size else 0
        k[_K_PAGES_LEN] = pub.pages.size
        k[_K_SLOTS] = pub.slots.ctypes.data if pub.slots.size else 0
        k[_K_SLOTS_LEN] = pub.slots.size
        self.writer_of = w
        self.pub_of = pub
        self.table_of = pub.table
        self.pages_of = pub.pages
        self.slots_of = pub.slots

    def take_chunk(self, chunk: np.ndarray) -> None:
        """Take the address of the log's current payload chunk (a new one was started);
        0 (the general path takes the writes) for one that is not a whole writable
        :data:`~mmsb._core.kernels.LOG_CHUNK`."""
        ok = chunk.size == LOG_CHUNK and chunk.flags.writeable
        self.consts[_K_CHUNK] = chunk.ctypes.data if ok else 0
        self.chunk_of = chunk

    def take_segment(self, w: Any) -> None:
        """Map the segment ``w`` writes (see histmap.py); none when it cannot be."""
        self.seg_writer = w
        self.seg = map_segment(w, self.segment_bytes, _OUT_BYTES)
        self.seg_ci = -1
        self.consts[_K_SEG] = -1
        self.consts[_K_SEG_LEN] = self.seg.length if self.seg is not None else 0

    def take_log(self, log: Any) -> None:
        """Make the mapped segment one of ``log``'s payload chunks (found, or added),
        and take the address of the log's CRC column."""
        seg = self.seg
        assert seg is not None
        view = seg.view
        ci = next((i for i, c in enumerate(log.chunks) if c is view), -1)
        if ci < 0 or ci not in log.segs:
            ci = log.map_segment(view, seg)
        self.seg_ci = ci
        self.consts[_K_SEG] = ci
        self.take_crcs(log.crcs)

    def take_crcs(self, crcs: np.ndarray | None) -> None:
        """Take the address of the log's CRC column (one exists once the segment is
        one of its chunks)."""
        assert crcs is not None
        self.crcs_of = crcs
        self.consts[_K_CRCS] = crcs.ctypes.data
        self.consts[_K_CRCS_LEN] = len(crcs)

    def take_counters(self, counters: Any) -> None:
        """Take the addresses of ``counters``' ``log_append`` and ``delta_apply`` rings,
        which the kernel records its samples into, and of its ``logged`` counts."""
        k = self.consts
        for at, ring in ((_K_LOG_RING, counters.log_append),
                         (_K_APPLY_RING, counters.delta_apply)):
            k[at] = ring.samples.buffer_info()[0]
            k[at + 1] = ring.at.buffer_info()[0]
            k[at + 2] = len(ring.samples)
        k[_K_LOGGED] = counters.logged.buffer_info()[0]
        self.counters_of = counters

    def compile(self, mem: np.ndarray, data: bytes, log: Any, pub: Any) -> None:
        """Take the kernel's compiled entry for the types this path passes (made, or
        loaded from numba's cache, once a process)."""
        if "write" not in _ENTRIES:
            _ENTRIES["write"] = entry_point(
                _write_frame, mem, 0, 1, 0, data, log.rows, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0,
                0, True, self.consts)
        self.kernel = _ENTRIES["write"]

    def forget(self) -> None:
        """Let go of the segment and the mapped files (the bus closes: their mappings
        and descriptors go)."""
        k = self.consts
        k[_K_TABLE] = k[_K_PAGES] = k[_K_SLOTS] = k[_K_HEAD] = k[_K_CHUNK] = k[_K_LOG_RING] = 0
        k[_K_APPLY_RING] = k[_K_LOGGED] = k[_K_CRCS] = k[_K_CRCS_LEN] = 0
        k[_K_SEG] = -1
        self.table_of = self.pages_of = self.slots_of = self.writer_of = self.pub_of = None
        self.chunk_of = self.counters_of = self.seg_writer = self.seg = self.crcs_of = None
        self.seg_ci = -1

    def use_source(self, source: str) -> bool:
        """Put ``source``'s name in the frame buffer; False when it is too long."""
        raw = source.encode("utf-8")
        if len(raw) > _MAX_SOURCE:
            return False
        out = self.out
        out[_SRC_AT] = len(raw) & 0xFF
        out[_SRC_AT + 1] = len(raw) >> 8
        out[_SRC_AT + 2 : _SRC_AT + 2 + len(raw)] = np.frombuffer(raw, np.uint8)
        self.source_bytes = np.frombuffer(raw, np.uint8)
        self.source = source
        self.consts[_K_BODY] = _SRC_AT + 2 + len(raw)
        self.room = _SRC_AT + 2 + len(raw) + 24
        return True


def durable_write_small(bus: DurableBus, state: MMSBState, pid: int, off: int, data: bytes,
                        source: str, whole: bool) -> bool | None:
    """``state.write_small_bytes`` on a durable bus (see the module's docstring): True
    or False as ``write_bytes`` returns (a delta logged or not), or None when the call
    is not this path's case (nothing was done; ``write_bytes`` takes it). O(len(data)).

    Raises:
        DurabilityError: the frame could not be written (or synced, ``fsync="always"``);
            nothing of the write took effect, as on the general path.
    """
    w = bus.writer
    log = state.log
    deferred = None
    if type(log) is DeferredLog:
        # History not read yet (a reopen): the write goes to the log of the records
        # after it, as DeferredLog.append does, and the counters are mirrored after.
        deferred = log
        log = log.__dict__["_tail"]
    fw = bus.fast
    if (w is None or bus.shared or bus.failed is not None or bus.not_leader is not None
            or bus.ship is not None or bus.replication is not None or log.sink is None
            or not state.config.enable_logging or w.size >= fw.segment_bytes or fsops._hook is not None
            or not fw.usable):
        return None
    lock = state.lock
    lock.acquire()
    try:
        pub = bus.publisher
        if (state.closed or state.recomputing is not None or state.batch_frame is not None
                or state.call_depth or bus.closed or pub is None or pub.full or pub.failed
                or pub.touched):
            return None
        addr_v, size_v, epoch_v, flags_v = state.table.views
        if not (0 < pid < len(flags_v) and flags_v[pid]):
            return None
        size = size_v[pid]
        n_new = len(data)
        if n_new > SMALL_WRITE or off < 0 or off + n_new > size or (whole and n_new != size) or (
                source is not _API and (type(source) is not str
                                        or source not in _GOOD_SOURCES)):
            return None
        src = log.source_ids.get(source)
        if src is None:
            return None
        if source is not fw.source and not fw.use_source(source):
            return None
        if (fw.writer_of is not w or fw.pub_of is not pub or fw.table_of is not pub.table
                or fw.pages_of is not pub.pages or fw.slots_of is not pub.slots):
            fw.refresh(w, pub, bus.generation)
        c = state.counters
        if c is not fw.counters_of:
            fw.take_counters(c)
        lsn = log.next_lsn
        addr = addr_v[pid]
        epoch = epoch_v[pid] + 1
        mem = state.arena._chunks[addr >> CHUNK_SHIFT]
        assert mem is not None
        row = log.n
        if log.cur_array is not fw.chunk_of:
            fw.take_chunk(log.cur_array)
        if fw.seg_writer is not w:
            fw.take_segment(w)
        seg = fw.seg
        if seg is not None:
            ci = fw.seg_ci
            chunks = log.chunks
            if ci < 0 or ci >= len(chunks) or chunks[ci] is not seg.view:
                fw.take_log(log)
            elif log.crcs is not fw.crcs_of:
                fw.take_crcs(log.crcs)
        ts = time.time_ns()
        if ts < log.last_timestamp:
            ts = log.last_timestamp
        did = state.next_delta_id
        # Published with the write, unless events, propagation or compaction come first
        # (they do on the general path): then the call's ordinary publication at its end.
        simple = not state.events.active and pid not in state.graph.children and not (
            row >= state.compact_at and not state.propagating and not state.batch_depth)
        # The kernel records the latency samples of a simple call; the others end in
        # after_write, which records delta_apply from here.
        t0 = 0 if simple else time.perf_counter_ns()
        before = w.size
        if before + 5 * n_new + fw.room > w.allocated and w.ahead:
            # The frame (at most this long: the sparse encoding's runs and values) may
            # not fit the space written ahead: the general path writes ahead, so the
            # segments' bytes do not depend on which path wrote them.
            return None
        # The frame goes to the kernel before anything takes effect. No io_lock: the
        # writer changes only under the state's lock (held), and the group commit clears
        # the dirty mark before its fdatasync, so marking it after the write suffices.
        kernel = fw.kernel
        while True:
            tail = log.tail
            n, plen, flen, span, status = kernel(
                mem, addr, size, off, data, log.rows, row, tail, log.cur, pid,
                epoch, ts, src, lsn, did, state.table.next_id, pub.bump, before, simple,
                fw.consts)
            if n == _NO_ROOM:
                log._new_chunk()
                fw.take_chunk(log.cur_array)
            elif n == _NO_ROW:
                log._grow()
                if seg is not None:
                    fw.take_crcs(log.crcs)
            else:
                break
        if n > 0 and (status >= 0 or status & 1):
            w.size = before + flen  # written whole (a failed sync leaves it there)
            if w.size > w.allocated:
                w.allocated = w.size  # written past the space written ahead
            w.dirty = status < 0 or not fw.always
        if kernel is _write_frame:
            fw.compile(mem, data, log, pub)
        if n <= 0:
            if n < 0:
                return None
            # Nothing differs: nothing is logged, as on the general path, whose call
            # ends with a checkpoint when one is due.
            bus.maybe_checkpoint(state)
            return False
        if status < 0:
            err = -status
            exc = OSError(err >> 1, os.strerror(err >> 1))
            pub = None  # the error's traceback keeps this frame: not the mapped files
            raise _failed(bus, state, w, before, pid, off + (span >> 32),
                          off + (span & 0xFFFFFFFF) + 1, exc,
                          "fsync" if err & 1 else "append") from exc
        if status & 1:
            notify.wake(pub.notify_addr)
        since = bus.records_since_ckpt + 1
        bus.records_since_ckpt = since
        # The log keeps the row the kernel filled: TransactionLog.write_small's tail,
        # inlined as in MMSBState.write_small_bytes (keep the three alike).
        if not status & 2:
            log.tail = tail + plen
        log.n = row + 1
        lsns = log.lsns
        ids = log.ids
        if lsn != lsns.last + 1 or did != ids.last + 1 or not row:
            if lsn != lsns.last + 1 or not row:
                lsns.rows.append(row)
                lsns.vals.append(lsn)
            if did != ids.last + 1 or not row:
                ids.rows.append(row)
                ids.vals.append(did)
        lsns.last = lsn
        ids.last = did
        rows = log.index.get(pid)
        if rows is None:
            log.index[pid] = array("I", [row])
        else:
            rows.append(row)
        log.payload_bytes += plen
        log.next_lsn = lsn + 1
        log.last_timestamp = ts
        if deferred is not None:
            deferred._mirror()
        state.next_delta_id = did + 1
        epoch_v[pid] = epoch
        if not simple:
            pub.touched[pid] = (off + (span >> 32), off + (span & 0xFFFFFFFF) + 1)
            state.call_depth += 1
            try:
                state.after_write(pid, epoch, did, lsn, t0, n)
            finally:
                state.call_depth -= 1
            bus.after_call(state)
            return True
        # bus.maybe_checkpoint()'s test, inlined.
        cfg = bus.config
        if since >= cfg.max_tlog_size + bus._retry_after or (
                cfg.checkpoint_interval > 0
                and time.monotonic() - bus.last_ckpt_time >= cfg.checkpoint_interval):
            bus.maybe_checkpoint(state)
        return True
    finally:
        if state.event_queue:
            state.unlock_and_deliver()
        else:
            lock.release()


def _failed(bus: DurableBus, state: MMSBState, w: Any, before: int, pid: int, lo: int,
            hi: int, exc: OSError, stage: str) -> DurabilityError:
    """The error of a frame that could not be written (``stage`` "append") or synced
    ("fsync"), with the bus left as the general path (``SegmentWriter.append`` and
    ``append_frames``) leaves it: a partial frame cut back and the write refused alone,
    or the bus refusing every later write when the cut or the sync failed; then the
    call's end as its ``leave`` makes it (the page, unchanged, published again; a
    checkpoint when one is due). Nothing of the write took effect in the state."""
    if stage == "append":
        w.cut(before)
        w.size = before
    why = exc.strerror or exc
    if stage == "append" and w.intact:
        err = DurabilityError(f"writing the log at {bus.root} failed ({why}); this write was "
                              "not applied or logged, and the bus goes on")
    else:
        bus.failed = exc
        err = DurabilityError(f"writing the log at {bus.root} failed ({why}); the bus "
                              "refuses further writes")
    pub = bus.publisher
    if pub is not None:
        pub.touched[pid] = (lo, hi)
    bus.after_call(state)
    return err
