"""Compiled kernels for the hot paths that numpy alone cannot make short enough: each
does in one pass what would otherwise take several numpy calls (compare, compact,
encode, apply). One implementation per kernel; compiled once and cached on disk.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from array import array
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["ROW_DTYPE", "write_small", "write_small_counted", "ENC_RUN", "ENC_RUN16",
           "ENC_POS16", "ENC_POS32", "ENC_SEGRUN", "SMALL_WRITE", "LOG_CHUNK", "CLOCK_GETTIME",
           "CRC_TABLES", "CRC_HARDWARE", "crc_update", "crc_update_tables", "crc_update_hardware",
           "check_segment_rows", "gather_converted",
           "apply_rows_of_chunk",
           "counter_consts"]

ROW_DTYPE = np.dtype([
    ("page", np.int32), ("psize", np.uint32), ("plen", np.uint32), ("src", np.uint16),
    ("enc", np.uint8), ("epoch", np.int64), ("ts", np.int64), ("poff", np.int64),
], align=False)
"""One logged delta: its page, the page's size, payload length, source, payload
encoding, epoch after it, timestamp and payload place (39 bytes)."""

ENC_RUN = 0
ENC_POS16 = 1
ENC_POS32 = 2
ENC_FULL = 3
ENC_EXACT = 4
ENC_RUN16 = 6
ENC_SEGRUN = 7
"""One contiguous run read where a log segment's frame holds it: u32 start, u32 count,
then the values (see :mod:`mmsb._core.log`)."""

SMALL_WRITE = 4096
"""Writes up to this many bytes go through :func:`write_small`."""

LOG_CHUNK = 1 << 18
"""Bytes of one payload chunk of the transaction log."""


def entry_point(kernel: Any, *args: Any) -> Callable[..., Any]:
    """The compiled entry of ``kernel`` for the numba types of ``args`` (compiled, or
    loaded from the cache, without running it). Calling it skips numba's per-call
    choice of a compiled version (about 0.3 µs for a kernel of 14 arguments); only for
    call sites whose arguments always have exactly those types."""
    try:
        sig = tuple(numba.typeof(a) for a in args)
        kernel.compile(sig)
        entry: Callable[..., Any] = kernel.overloads[sig].entry_point
    except (AttributeError, KeyError, TypeError, ValueError, numba.core.errors.NumbaError):
        # No compiled version to call directly (numba's JIT turned off, or an
        # unexpected type): the kernel itself, with its dispatch.
        return kernel
    return entry


@njit(cache=True, nogil=True)
def _count_diff_bytes(a: np.ndarray, b: np.ndarray) -> int:  # pragma: no cover - compiled
    n = 0
    for i in range(a.shape[0]):
        n += a[i] != b[i]
    return n


_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_ONES = np.uint64(0x0101010101010101)


@njit(cache=True, nogil=True)
def _count_diff_words(a: np.ndarray, b: np.ndarray) -> int:  # pragma: no cover - compiled
    """Differing bytes of two uint64 arrays, without a branch: in ``x = a ^ b`` the high
    bit of ``~(((x & 0x7F..) + 0x7F..) | x | 0x7F..)`` is set exactly in the zero bytes,
    and a multiply sums those bits."""
    zeros = np.uint64(0)
    for i in range(a.shape[0]):
        x = a[i] ^ b[i]
        y = ~(((x & _LOW7) + _LOW7) | x | _LOW7)
        zeros += ((y >> np.uint64(7)) * _ONES) >> np.uint64(56)
    return a.shape[0] * 8 - zeros


def count_diff(a: np.ndarray, b: np.ndarray) -> int:
    """How many positions of the equal-length, contiguous byte arrays ``a`` and ``b``
    differ: one read of each, nothing written (a comparison into a temporary writes as
    much again). Where both start on an 8-byte boundary, 8 bytes are compared at a time
    (about three times faster), the tail byte by byte."""
    m = len(a)
    w = m & ~7
    if w and not (a.ctypes.data | b.ctypes.data) & 7:
        n = int(_count_diff_words(a[:w].view(np.uint64), b[:w].view(np.uint64)))
        return n + int(_count_diff_bytes(a[w:], b[w:])) if w < m else n
    return int(_count_diff_bytes(a, b))


@njit(cache=True, nogil=True)
def _diff_scan(a: np.ndarray, b: np.ndarray,
               limit: int) -> tuple[int, np.ndarray]:  # pragma: no cover - compiled
    m = a.shape[0]
    w = m >> 3
    words = w > 0 and ((a.ctypes.data | b.ctypes.data) & 7) == 0
    n = 0
    tail = 0
    if words:
        aw = a[:8 * w].view(np.uint64)
        bw = b[:8 * w].view(np.uint64)
        zeros = np.uint64(0)
        for i in range(w):
            x = aw[i] ^ bw[i]
            y = ~(((x & _LOW7) + _LOW7) | x | _LOW7)
            zeros += ((y >> np.uint64(7)) * _ONES) >> np.uint64(56)
        n = 8 * w - int(zeros)
        tail = 8 * w
    for j in range(tail, m):
        n += a[j] != b[j]
    if n == 0 or n > limit:
        return n, np.empty(0, np.intp)
    out = np.empty(n, np.intp)
    k = 0
    if words:
        aw = a[:8 * w].view(np.uint64)
        bw = b[:8 * w].view(np.uint64)
        for i in range(w):
            if aw[i] != bw[i]:
                for j in range(8 * i, 8 * i + 8):
                    if a[j] != b[j]:
                        out[k] = j
                        k += 1
    for j in range(tail, m):
        if a[j] != b[j]:
            out[k] = j
            k += 1
    return n, out


def diff_scan(a: np.ndarray, b: np.ndarray, limit: int) -> tuple[int, np.ndarray]:
    """Compare the equal-length, C-contiguous byte arrays ``a`` and ``b`` in one call:
    ``(n, positions)``, ``n`` the number of positions that differ and, when ``n`` is at
    most ``limit`` (and not 0), ``positions`` those ``n`` positions ascending (intp; else
    an empty array). The count reads 8 bytes at a time, without a branch, where both
    arrays start on an 8-byte boundary; the positions come from a second pass that skips
    equal words. Nothing is written but the positions: O(len(a)) reads, O(n) written."""
    n, out = _diff_scan(a, b, limit)
    return int(n), out


@njit(cache=True, nogil=True)
def _runs(idx: np.ndarray, starts: np.ndarray,
          lengths: np.ndarray) -> int:  # pragma: no cover - compiled
    k = 0
    s = idx[0]
    prev = s
    for i in range(1, idx.shape[0]):
        v = idx[i]
        if v != prev + 1:
            starts[k] = s
            lengths[k] = prev - s + 1
            k += 1
            s = v
        prev = v
    starts[k] = s
    lengths[k] = prev - s + 1
    return k + 1


def runs_of(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique positions (below 2**32) → the starts and lengths of their maximal
    consecutive runs, as little-endian uint32 arrays, in one pass. O(len(idx))."""
    n = len(idx)
    if n == 0:
        return np.empty(0, "<u4"), np.empty(0, "<u4")
    if idx.dtype != np.intp:
        idx = idx.astype(np.intp)
    starts = np.empty(n, "<u4")
    lengths = np.empty(n, "<u4")
    k = int(_runs(idx, starts, lengths))
    return starts[:k], lengths[:k]


@njit(cache=True, nogil=True, inline="always")
def count_changed(cur: np.ndarray, new: Any, m: int) -> int:  # pragma: no cover - compiled
    """How many of the first ``m`` bytes of ``new`` differ from ``cur``. Branch-free
    (indexing with the loop counter), so it vectorises; the ends come after."""
    n = 0
    for i in range(m):
        n += int(cur[i] != new[i])
    return n


@njit(cache=True, nogil=True, inline="always")
def change_ends(cur: np.ndarray, new: Any, m: int
                ) -> tuple[int, int]:  # pragma: no cover - compiled
    """The first and last of the first ``m`` positions where ``new`` differs from
    ``cur`` (some position must differ)."""
    first = 0
    while cur[first] == new[first]:
        first += 1
    last = m - 1
    while cur[last] == new[last]:
        last -= 1
    return first, last


@njit(cache=True, nogil=True, inline="always")
def sparse_encoding(n: int, first: int, last: int, size: int
                    ) -> tuple[int, int]:  # pragma: no cover - compiled
    """How the log keeps ``n`` changed bytes spanning ``first`` … ``last`` of a page of
    ``size`` bytes (at most a quarter of it): ``(encoding, payload length)`` — one run
    (its start, u16 for a page of at most 65,536 bytes, else u32, then the values), or
    u16 / u32 positions then the values."""
    if last - first + 1 == n:
        enc = ENC_RUN16 if size <= 65536 else ENC_RUN
        return enc, (2 if enc == ENC_RUN16 else 4) + n
    if size <= 65536:
        return ENC_POS16, 3 * n
    return ENC_POS32, 5 * n


@njit(cache=True, nogil=True, inline="always")
def encode_sparse(chunk: np.ndarray, coff: int, cur: np.ndarray, new: Any, off: int,
                  first: int, last: int, n: int, enc: int,
                  plen: int) -> None:  # pragma: no cover - compiled
    """Write the payload :func:`sparse_encoding` chose at ``chunk[coff:]``: the bytes of
    ``new`` that differ from ``cur`` (the page from ``off``), positions in the page."""
    if enc == ENC_RUN or enc == ENC_RUN16:
        start = off + first
        head = plen - n
        for j in range(head):
            chunk[coff + j] = (start >> (8 * j)) & 0xFF
        for k in range(n):
            chunk[coff + head + k] = new[first + k]
    else:
        w = 2 if enc == ENC_POS16 else 4
        v = coff + w * n
        k = 0
        for i in range(first, last + 1):
            b = new[i]
            if cur[i] != b:
                p = off + i
                for j in range(w):
                    chunk[coff + w * k + j] = (p >> (8 * j)) & 0xFF
                chunk[v + k] = b
                k += 1


# -- calls through addresses ----------------------------------------------------------

def _libc_clock_gettime() -> int:
    """The address of libc's ``clock_gettime`` (glibc and musl have it), for compiled
    code to call; 0 when not found (then the callers that need it take their general
    path)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        return ctypes.cast(ctypes.CDLL(None).clock_gettime, ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        return 0


CLOCK_GETTIME = _libc_clock_gettime()
CLOCK_MONOTONIC = 1
"""Linux's clock id of ``CLOCK_MONOTONIC``, the clock of ``time.perf_counter_ns``."""


def _clock_typer(typingctx: Any, fn: Any, clock: Any, addr: Any) -> Any:  # pragma: no cover
    sig = types.int64(types.int64, types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64, i32 = ir.IntType(64), ir.IntType(32)
        f = builder.inttoptr(args[0], ir.FunctionType(i32, [i32, i64]).as_pointer())
        return builder.sext(builder.call(f, [builder.trunc(args[1], i32), args[2]]), i64)

    return sig, codegen


def _ptr_typer(typingctx: Any, addr: Any, like: Any) -> Any:  # pragma: no cover
    dtype = like.dtype
    sig = types.CPointer(dtype)(types.int64, like)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(dtype).as_pointer())

    return sig, codegen


ptr: Any = intrinsic(_ptr_typer)
"""A typed pointer from an address (``like``: an array of the element type), for
numba.carray over memory whose address the caller keeps valid."""
c_clock_gettime: Any = intrinsic(_clock_typer)
"""libc's ``clock_gettime(clock, timespec address)`` called at the address passed (the
address is an argument, never baked into cached code)."""

TOTAL_MAX = (1 << 63) - 1
"""Where a latency ring's total stops growing (an int64: 292 years of summed latency)."""


@njit(cache=True, nogil=True, inline="always")
def ring_sample(k: np.ndarray, ring: int, ns: int) -> None:  # pragma: no cover - compiled
    """``LatencyRing.add(ns)`` on the ring whose ``samples``, ``at`` and capacity are at
    ``k[ring:ring + 3]`` (the two arrays through their addresses)."""
    cap = k[ring + 2]
    samples = carray(ptr(k[ring], k), (cap,))
    at = carray(ptr(k[ring + 1], k), (4,))
    pos = at[0]
    samples[pos] = ns
    pos += 1
    at[0] = 0 if pos == cap else pos
    at[1] += 1
    # It stops at TOTAL_MAX, as LatencyRing.add's; tested before the addition, which
    # LLVM takes as never overflowing (``at[2] + ns < at[2]`` would read as false).
    at[2] = TOTAL_MAX if ns > TOTAL_MAX - at[2] else at[2] + ns
    if ns > at[3]:
        at[3] = ns


# Words of Counters.consts (see counter_consts).
CK_CLOCK, CK_APPLY_RING, CK_LOGGED, CK_TIMESPEC = 0, 1, 4, 5
_CK_WORDS = CK_TIMESPEC + 2


def counter_consts(samples: array, at: array, logged: array) -> np.ndarray:
    """The int64 words :func:`write_small_counted` reads a state's counters through:
    libc's ``clock_gettime``, the ``delta_apply`` ring (its ``samples`` and ``at``
    arrays' addresses and its capacity: what :func:`ring_sample` reads), the ``logged``
    array's address, and two words of room for the clock's timespec. The arrays are
    never resized, so their addresses hold as long as they live."""
    k = np.zeros(_CK_WORDS, np.int64)
    k[CK_CLOCK] = CLOCK_GETTIME
    k[CK_APPLY_RING] = samples.buffer_info()[0]
    k[CK_APPLY_RING + 1] = at.buffer_info()[0]
    k[CK_APPLY_RING + 2] = len(samples)
    k[CK_LOGGED] = logged.buffer_info()[0]
    return k


# -- the small write ----------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _fill_row(rows: np.ndarray, row: int, pid: int, size: int, plen: int, src: int, enc: int,
              epoch: int, ts: int, poff: int) -> None:  # pragma: no cover - compiled
    """Fill log row ``row`` (the fields of :data:`ROW_DTYPE`)."""
    r = rows[row]
    r.page = pid
    r.psize = size
    r.plen = plen
    r.src = src
    r.enc = enc
    r.epoch = epoch
    r.ts = ts
    r.poff = poff


@njit(cache=True, nogil=True)
def write_small(mem: np.ndarray, base: int, size: int, off: int, new: bytes | np.ndarray,
                rows: np.ndarray, row: int, chunk: np.ndarray, coff: int, pid: int,
                epoch: int, ts: int, src: int, ci: int) -> tuple[int, int]:  # pragma: no cover
    """Write ``new`` at ``off`` of the page of ``size`` bytes at ``mem[base:]`` as one
    sparse delta, in one pass. The payload goes to ``chunk[coff:]``, the current log
    chunk (number ``ci``, :data:`LOG_CHUNK` bytes); its room and the row's payload
    place are worked out here rather than passed (each argument costs the caller's
    every small write some nanoseconds to cross into compiled code).

    Counts the changed bytes; when there are some, encodes them into ``chunk[coff:]``,
    fills log row ``row`` and applies the bytes. At most a quarter of the page changed:
    one run (its start, u16 for a page of at most 65,536 bytes, else u32, and the
    values), else u16 or u32 positions and the values. More
    (dense, as the log keeps it): the page's bytes when every byte changed, else the
    page's whole content after the write and the changed positions as packed bits.
    Returns ``(changed, payload length)``; changed is 0 when nothing differs (nothing
    written), -2 when the payload needs more than ``room`` bytes (nothing written).
    """
    room = LOG_CHUNK - coff
    poff = (ci << 32) | coff
    m = len(new)
    page = mem[base:base + size]
    # Indexing a slice with the loop counter lets the compare vectorise.
    cur = page[off:off + m]
    n = count_changed(cur, new, m)
    if n == 0:
        return 0, 0
    first, last = change_ends(cur, new, m)
    if n * 4 > size:
        return _write_dense(page, cur, size, off, new, n, rows, row, chunk, coff, room, pid,
                            epoch, ts, src, poff)
    enc, plen = sparse_encoding(n, first, last, size)
    if plen > room:
        return -2, plen
    encode_sparse(chunk, coff, cur, new, off, first, last, n, enc, plen)
    for i in range(first, last + 1):
        cur[i] = new[i]
    _fill_row(rows, row, pid, size, plen, src, enc, epoch, ts, poff)
    return n, plen


@njit(cache=True, nogil=True)
def write_small_counted(mem: np.ndarray, base: int, size: int, off: int, new: bytes,
                        rows: np.ndarray, row: int, chunk: np.ndarray, coff: int, pid: int,
                        epoch: int, ts: int, src: int, ci: int, k: np.ndarray,
                        t0: int) -> tuple[int, int]:  # pragma: no cover - compiled
    """:func:`write_small`, then, when it logged a delta and ``t0`` is not negative, the
    write's counters (``k``: the state's :attr:`Counters.consts
    <mmsb._core.monitor.Counters.consts>`): one ``delta_apply`` latency sample,
    ``perf_counter_ns`` now (libc's ``clock_gettime`` of ``CLOCK_MONOTONIC``) less
    ``t0``, and ``records_logged`` / ``payload_bytes_logged`` (the changed bytes; the
    page's size for a dense delta). In-memory one-frame writes call it: the
    counters cost a dozen element reads and writes of plain arrays in Python, a few
    nanoseconds here. Returns what write_small does."""
    n, plen = write_small(mem, base, size, off, new, rows, row, chunk, coff, pid, epoch, ts,
                          src, ci)
    if n > 0 and t0 >= 0:
        c_clock_gettime(k[CK_CLOCK], CLOCK_MONOTONIC, k.ctypes.data + 8 * CK_TIMESPEC)
        ring_sample(k, CK_APPLY_RING, k[CK_TIMESPEC] * 1_000_000_000 + k[CK_TIMESPEC + 1] - t0)
        logged = carray(ptr(k[CK_LOGGED], k), (2,))
        logged[0] += 1
        logged[1] += n if n * 4 <= size else size
    return n, plen


@njit(cache=True, nogil=True)
def _write_dense(page: np.ndarray, cur: np.ndarray, size: int, off: int,
                 new: bytes | np.ndarray, n: int,
                 rows: np.ndarray, row: int, chunk: np.ndarray, coff: int, room: int, pid: int,
                 epoch: int, ts: int, src: int, poff: int) -> tuple[int, int]:  # pragma: no cover
    """The dense case of :func:`write_small` (``n`` of the written bytes differ; ``cur``
    is ``page[off:off + len(new)]``)."""
    m = len(new)
    full = n == size
    plen = size if full else size + (size + 7) // 8
    if plen > room:
        return -2, plen
    if full:
        for i in range(m):
            chunk[coff + i] = new[i]
    else:
        for i in range(size):
            chunk[coff + i] = page[i]
        bits = coff + size
        for i in range(plen - size):
            chunk[bits + i] = 0
        for i in range(m):
            b = new[i]
            if cur[i] != b:
                p = off + i
                chunk[coff + p] = b
                chunk[bits + (p >> 3)] |= 0x80 >> (p & 7)
    for i in range(m):
        cur[i] = new[i]
    _fill_row(rows, row, pid, size, plen, src, ENC_FULL if full else ENC_EXACT, epoch, ts, poff)
    return n, plen


@njit(cache=True, nogil=True)
def batch_apply(mem: np.ndarray, bases: np.ndarray, offs: np.ndarray, lens: np.ndarray,
                cat: np.ndarray, pos_out: np.ndarray, val_out: np.ndarray,
                addr_out: np.ndarray, old_out: np.ndarray,
                counts: np.ndarray) -> int:  # pragma: no cover - compiled
    """Apply writes in order to ``mem``: write ``w`` puts ``cat``'s next ``lens[w]``
    bytes at offset ``offs[w]`` of the page at ``mem[bases[w]:]``. Each byte that
    differs from what the page holds at that moment (earlier writes of the batch
    included) is recorded in write order: its position in the page, new value, address
    in ``mem`` and old value; ``counts[w]`` is how many write ``w`` changed. Returns the
    number of changed bytes. Undo: restore ``old_out`` at ``addr_out`` in reverse."""
    k = 0
    src = 0
    for w in range(lens.shape[0]):
        base = bases[w]
        off = offs[w]
        c = 0
        for i in range(lens[w]):
            a = base + off + i
            b = cat[src + i]
            old = mem[a]
            if old != b:
                pos_out[k] = off + i
                val_out[k] = b
                addr_out[k] = a
                old_out[k] = old
                mem[a] = b
                k += 1
                c += 1
        counts[w] = c
        src += lens[w]
    return k


@njit(cache=True, nogil=True)
def held_apply(mem: np.ndarray, bases: np.ndarray, offs: np.ndarray, lens: np.ndarray,
               cat: np.ndarray, pos_out: np.ndarray, val_out: np.ndarray,
               counts: np.ndarray) -> int:  # pragma: no cover - compiled
    """:func:`batch_apply` without the undo columns: write ``w`` puts ``cat``'s next
    ``lens[w]`` bytes at offset ``offs[w]`` of the page at ``mem[bases[w]:]``; each byte
    that differs from what the page holds at that moment is recorded (position in the
    page, new value) and written; ``counts[w]`` is how many write ``w`` changed.
    Returns the number of changed bytes."""
    k = 0
    src = 0
    for w in range(lens.shape[0]):
        base = bases[w]
        off = offs[w]
        c = 0
        for i in range(lens[w]):
            a = base + off + i
            b = cat[src + i]
            if mem[a] != b:
                pos_out[k] = off + i
                val_out[k] = b
                mem[a] = b
                k += 1
                c += 1
        counts[w] = c
        src += lens[w]
    return k


@njit(cache=True, nogil=True)
def advance_epochs(epoch: np.ndarray, pids: np.ndarray, bases: np.ndarray) -> None:  # pragma: no cover - compiled
    """Deltas of pages ``pids`` in order, each advancing its page's epoch by one:
    ``bases[k]`` is the epoch delta ``k`` starts from; ``epoch`` ends advanced."""
    for k in range(pids.shape[0]):
        p = pids[k]
        e = epoch[p]
        bases[k] = e
        epoch[p] = e + 1


@njit(cache=True, nogil=True)
def order_by_page(pages: np.ndarray, top: int, order: np.ndarray) -> None:  # pragma: no cover - compiled
    """``order`` becomes the stable ordering of ``pages`` (ints in ``[0, top]``) by value:
    what ``np.argsort(pages, kind="stable")`` gives, by counting. O(len(pages) + top)."""
    start = np.zeros(top + 2, np.int64)
    for i in range(pages.shape[0]):
        start[pages[i] + 1] += 1
    for v in range(1, top + 2):
        start[v] += start[v - 1]
    for i in range(pages.shape[0]):
        p = pages[i]
        order[start[p]] = i
        start[p] += 1


@njit(cache=True, nogil=True)
def group_layout(pos: np.ndarray, bounds: np.ndarray, sizes: np.ndarray, enc: np.ndarray,
                 plen: np.ndarray) -> int:  # pragma: no cover - compiled
    """The payload encoding and length of each sparse delta of a column group (delta
    ``d`` writes positions ``pos[bounds[d]:bounds[d + 1]]``, at least one, of a page of
    ``sizes[d]`` bytes): a contiguous run keeps its start, others every position, in 2
    bytes on pages of at most 64 KiB, else 4. Returns the total payload length."""
    total = 0
    for d in range(sizes.shape[0]):
        a = bounds[d]
        z = bounds[d + 1]
        n = z - a
        small = sizes[d] <= 65536
        if pos[z - 1] - pos[a] + 1 == n:
            enc[d] = ENC_RUN16 if small else ENC_RUN
            h = 2 if small else 4
        else:
            enc[d] = ENC_POS16 if small else ENC_POS32
            h = (2 if small else 4) * n
        plen[d] = h + n
        total += h + n
    return total


@njit(cache=True, nogil=True)
def group_encode(pos: np.ndarray, vals: np.ndarray, bounds: np.ndarray, enc: np.ndarray,
                 out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Write the payloads :func:`group_layout` laid out, back to back into ``out``: each
    delta's head (its run start, or its positions, little-endian) then its values."""
    o = 0
    for d in range(enc.shape[0]):
        a = bounds[d]
        n = bounds[d + 1] - a
        e = enc[d]
        w = 2 if (e == ENC_RUN16 or e == ENC_POS16) else 4
        if e == ENC_RUN16 or e == ENC_RUN:
            s = pos[a]
            for i in range(w):
                out[o + i] = (s >> (8 * i)) & 0xFF
            o += w
        else:
            for j in range(n):
                p = pos[a + j]
                for i in range(w):
                    out[o + i] = (p >> (8 * i)) & 0xFF
                o += w
        for j in range(n):
            out[o + j] = vals[a + j]
        o += n


@njit(cache=True, nogil=True, inline="always")
def _mark_row(chunk: np.ndarray, o: Any, plen: Any, enc: Any, ps: Any, out: np.ndarray,
              base: Any, size: Any) -> None:  # pragma: no cover - compiled
    """Set ``out[base + p]`` for every position ``p`` < ``size`` that the payload at
    ``chunk[o:o + plen]`` (of a page of ``ps`` bytes) writes."""
    if enc == 0:
        start = (np.int64(chunk[o]) | (np.int64(chunk[o + 1]) << 8)
                 | (np.int64(chunk[o + 2]) << 16) | (np.int64(chunk[o + 3]) << 24))
        for p in range(start, min(start + plen - 4, size)):
            out[base + p] = True
    elif enc == 6:
        start = np.int64(chunk[o]) | (np.int64(chunk[o + 1]) << 8)
        for p in range(start, min(start + plen - 2, size)):
            out[base + p] = True
    elif enc == 7:
        start = (np.int64(chunk[o]) | (np.int64(chunk[o + 1]) << 8)
                 | (np.int64(chunk[o + 2]) << 16) | (np.int64(chunk[o + 3]) << 24))
        for p in range(start, min(start + plen - 8, size)):
            out[base + p] = True
    elif enc == 1 or enc == 2:
        w = 2 if enc == 1 else 4
        n = plen // (w + 1)
        for k in range(n):
            q = np.int64(0)
            for j in range(w):
                q |= np.int64(chunk[o + w * k + j]) << (8 * j)
            if q < size:
                out[base + q] = True
    elif enc == 3:
        for p in range(min(ps, size)):
            out[base + p] = True
    else:
        for p in range(min(ps, size)):
            if (chunk[o + ps + (p >> 3)] >> (7 - (p & 7))) & 1:
                out[base + p] = True


@njit(cache=True, nogil=True)
def mark_written(chunk: np.ndarray, offs: np.ndarray, plens: np.ndarray, encs: np.ndarray,
                 psizes: np.ndarray, out: np.ndarray, out_off: np.ndarray,
                 out_len: np.ndarray) -> None:  # pragma: no cover - compiled
    """For each payload ``r`` at ``offs[r]`` of ``chunk``, set ``out[out_off[r] + p]`` for
    every position ``p`` < ``out_len[r]`` it writes (encodings as in the log: a run, u16
    or u32 positions, dense bytes with or without packed mask bits). Several pages'
    masks can share ``out``, each at its own offset."""
    for r in range(offs.shape[0]):
        _mark_row(chunk, offs[r], plens[r], encs[r], psizes[r], out, out_off[r], out_len[r])


@njit(cache=True, nogil=True)
def mark_page_rows(rows: np.ndarray, r0: int, r1: int, cid: int, chunk: np.ndarray,
                   slot: np.ndarray, starts: np.ndarray, out: np.ndarray, bounds: np.ndarray,
                   lens: np.ndarray) -> None:  # pragma: no cover - compiled
    """Scan log rows ``r0 … r1-1`` (of :data:`ROW_DTYPE`) whose payload lies in chunk
    number ``cid`` (``chunk``): a row of a page ``p`` with ``k = slot[p] - 1 ≥ 0``, at or
    after row ``starts[k]``, marks the positions it writes in that page's mask,
    ``out[bounds[k]:]`` of ``lens[k]`` bytes. Reads the columns in place (no gathered
    copy). O(rows + payload bytes)."""
    n = slot.shape[0]
    for r in range(r0, r1):
        poff = rows[r].poff
        if (poff >> 32) != cid:
            continue
        pg = rows[r].page
        if pg >= n:
            continue
        k = slot[pg] - 1
        if k < 0 or r < starts[k]:
            continue
        _mark_row(chunk, poff & 0xFFFFFFFF, np.int64(rows[r].plen), np.int64(rows[r].enc),
                  np.int64(rows[r].psize), out, bounds[k], lens[k])


@njit(cache=True, nogil=True)
def _copy(dst: np.ndarray, src: np.ndarray) -> None:  # pragma: no cover - compiled
    """``dst[:] = src`` (same length) as a plain loop over non-negative indexes, which
    compiles to a vectorised copy; a slice assignment in compiled code copies through a
    temporary (its overlap check), at a quarter of the speed."""
    for k in range(dst.shape[0]):
        dst[k] = src[k]


@njit(cache=True, nogil=True)
def _apply_row(src: np.ndarray, o: int, plen: int, enc: int, size: int, dst: np.ndarray,
               d: int) -> int:  # pragma: no cover - compiled
    """Write one logged delta (payload ``src[o:o + plen]``, encoded as in the log: a
    run, u16 or u32 positions, dense bytes with or without packed mask bits) into its
    page ``dst[d:d + size]``. Returns the bytes written, or -1 when the payload does not
    fit the page or its chunk (nothing written for a run or dense row)."""
    if o + plen > src.shape[0] or d + size > dst.shape[0]:
        return -1
    page = dst[d:d + size]
    if enc == 0 or enc == 6 or enc == 7:
        head = 4 if enc == 0 else (2 if enc == 6 else 8)
        if plen < head:
            return -1
        start = np.int64(0)
        for j in range(head if head < 8 else 4):
            start |= np.int64(src[o + j]) << (8 * j)
        n = plen - head
        if start + n > size:
            return -1
        _copy(page[start:start + n], src[o + head:o + plen])
        return n
    if enc == 1 or enc == 2:
        w = 2 if enc == 1 else 4
        n = plen // (w + 1)
        if n * (w + 1) != plen:
            return -1
        v = o + w * n
        for k in range(n):
            q = np.int64(0)
            for j in range(w):
                q |= np.int64(src[o + w * k + j]) << (8 * j)
            if q >= size:
                return -1
            page[q] = src[v + k]
        return n
    if enc == 3:
        if plen != size:
            return -1
        _copy(page, src[o:o + size])
        return size
    if enc == 4 or enc == 5:
        if plen != size + (size + 7) // 8:
            return -1
        if enc == 4:
            _copy(page, src[o:o + size])
        else:
            b = o + size
            for p in range(size):
                if (src[b + (p >> 3)] >> (7 - (p & 7))) & 1:
                    page[p] = src[o + p]
        return size
    return -1


@njit(cache=True, nogil=True)
def apply_log_rows_one(src: np.ndarray, soff: np.ndarray, plens: np.ndarray,
                       encs: np.ndarray, sizes: np.ndarray, dst: np.ndarray,
                       doff: np.ndarray, pages: np.ndarray, epochs: np.ndarray,
                       table_epoch: np.ndarray) -> int:  # pragma: no cover - compiled
    """Write logged deltas into page bytes, in log order (later rows win): row ``r``'s
    payload is ``src[soff[r]:soff[r] + plens[r]]`` and its page of ``sizes[r]`` bytes is
    ``dst[doff[r]:]`` (see :func:`_apply_row`; every payload in one chunk, every page in
    one arena chunk); the page's epoch, ``table_epoch[pages[r]]``, becomes
    ``epochs[r]``. A dense row is one copy (:func:`_copy`).

    Returns the bytes written, or ``-1 - r`` for the first row ``r`` whose payload does
    not fit its page or its chunk (rows before it are written). O(payload bytes)."""
    wrote = 0
    for r in range(soff.shape[0]):
        n = _apply_row(src, soff[r], plens[r], encs[r], sizes[r], dst, doff[r])
        if n < 0:
            return -1 - r
        table_epoch[pages[r]] = epochs[r]
        wrote += n
    return wrote


@njit(cache=True, nogil=True)
def gather_payloads(chunk: np.ndarray, offs: np.ndarray, plens: np.ndarray, out: np.ndarray,
                    at: np.ndarray) -> None:  # pragma: no cover - compiled
    """Copy payload ``r`` (``chunk[offs[r]:offs[r] + plens[r]]``) to ``out[at[r]:]``."""
    for r in range(offs.shape[0]):
        _copy(out[at[r]:at[r] + plens[r]], chunk[offs[r]:offs[r] + plens[r]])


@njit(cache=True, nogil=True)
def check_payloads(buf: np.ndarray, offs: np.ndarray, plens: np.ndarray, encs: np.ndarray,
                   psizes: np.ndarray) -> int:  # pragma: no cover - compiled
    """The first row whose payload (``buf[offs[r]:offs[r] + plens[r]]``, encoded as in
    the log) is not one the log could have written, or -1 when every one is: a run
    inside the page; positions strictly ascending and inside the page (u16 positions
    only for pages of at most 65,536 bytes); dense bytes of the page's size with
    ``ceil(size / 8)`` mask bytes where the encoding has a mask, and zero bytes outside
    the mask of a masked one. O(payload bytes)."""
    for r in range(offs.shape[0]):
        o = offs[r]
        plen = plens[r]
        enc = encs[r]
        size = psizes[r]
        if o + plen > buf.shape[0]:
            return r
        if enc == 0 or enc == 6:
            head = 4 if enc == 0 else 2
            if plen < head or (enc == 6 and size > 65536):
                return r
            start = np.int64(0)
            for j in range(head):
                start |= np.int64(buf[o + j]) << (8 * j)
            if start + plen - head > size:
                return r
        elif enc == 1 or enc == 2:
            w = 2 if enc == 1 else 4
            if plen % (w + 1) or (enc == 1 and size > 65536):
                return r
            n = plen // (w + 1)
            prev = np.int64(-1)
            for k in range(n):
                q = np.int64(0)
                for j in range(w):
                    q |= np.int64(buf[o + w * k + j]) << (8 * j)
                if q <= prev or q >= size:
                    return r
                prev = q
        elif enc == 3:
            if plen != size:
                return r
        elif enc == 4 or enc == 5:
            if plen != size + (size + 7) // 8:
                return r
            if enc == 5:
                b = o + size
                for p in range(size):
                    if buf[o + p] != 0 and not (buf[b + (p >> 3)] >> (7 - (p & 7))) & 1:
                        return r
        else:
            return r
    return -1


@njit(cache=True, nogil=True)
def check_rows(lsn: np.ndarray, ids: np.ndarray, epoch: np.ndarray, ts: np.ndarray,
               page: np.ndarray, psize: np.ndarray, plen: np.ndarray, src: np.ndarray,
               enc: np.ndarray, payload: np.ndarray, n_sources: int, next_page_id: int,
               max_counter: int, max_page_size: int
               ) -> tuple[int, int]:  # pragma: no cover - compiled
    """The first row whose fields are out of range, and which check it fails (0: none
    fails, row -1): 1 page id, 2 page size, 3 epoch, 4 LSN, 5 delta id, 6 source, 7
    encoding, 8 LSNs not increasing, 9 timestamps decreasing; then 10 when the payload
    lengths do not add up to ``payload``'s size (with their sum in place of the row),
    and 11 for the first row whose payload (the rows' payloads lie back to back in
    ``payload``) is not one the log could have written (:func:`check_payloads`).
    O(rows + payload bytes)."""
    n = lsn.shape[0]
    offs = np.empty(n, np.int64)
    total = 0
    for r in range(n):
        if page[r] < 1 or page[r] >= next_page_id:
            return r, 1
        if psize[r] < 1 or psize[r] > max_page_size:
            return r, 2
        if epoch[r] < 1 or epoch[r] >= max_counter:
            return r, 3
        if lsn[r] < 1 or lsn[r] >= max_counter:
            return r, 4
        if ids[r] < 0 or ids[r] >= max_counter:
            return r, 5
        if src[r] < 0 or src[r] >= n_sources:
            return r, 6
        if enc[r] > 6 or plen[r] < 0:
            return r, 7
        if r and lsn[r] <= lsn[r - 1]:
            return r, 8
        if r and ts[r] < ts[r - 1]:
            return r, 9
        offs[r] = total
        total += plen[r]
    if total != payload.shape[0]:
        return total, 10
    r = check_payloads(payload, offs, plen, enc, psize)
    if r >= 0:
        return r, 11
    return -1, 0


@njit(cache=True, nogil=True)
def _breaks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Rows 0 and every row whose value is not the previous one's plus one, and their
    values (int64 each)."""
    n = values.shape[0]
    k = 1
    for r in range(1, n):
        if values[r] != values[r - 1] + 1:
            k += 1
    rows = np.empty(k, np.int64)
    vals = np.empty(k, np.int64)
    rows[0] = 0
    vals[0] = values[0]
    k = 1
    for r in range(1, n):
        if values[r] != values[r - 1] + 1:
            rows[k] = r
            vals[k] = values[r]
            k += 1
    return rows, vals


@njit(cache=True, nogil=True)
def fill_log_rows(rows: np.ndarray, page: np.ndarray, psize: np.ndarray, plen: np.ndarray,
                  src: np.ndarray, enc: np.ndarray, epoch: np.ndarray, ts: np.ndarray,
                  sids: np.ndarray, lsn: np.ndarray, ids: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                             np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Fill log rows ``0 … n-1`` (of :data:`ROW_DTYPE`) from the columns of ``n`` deltas
    (at least one) whose payloads lie back to back from offset 0 of one chunk (each
    row's ``poff`` is the running sum of ``plen``), with sources renumbered through
    ``sids`` (IndexError for a source past them; ValueError for columns of different
    lengths). Returns what the log's indexes need: the rows ordered by page, stably
    (uint32), where each page's rows start in that order and where the last ends,
    each page's id, and the break rows and values of the LSN and delta-id step maps
    (see :func:`_breaks`). O(rows + pages), or O(rows log rows) where page ids are
    sparse."""
    n = page.shape[0]
    if (psize.shape[0] != n or plen.shape[0] != n or src.shape[0] != n or enc.shape[0] != n
            or epoch.shape[0] != n or ts.shape[0] != n or lsn.shape[0] != n
            or ids.shape[0] != n or rows.shape[0] < n):
        raise ValueError("columns of different lengths")
    off = np.int64(0)
    top = np.int64(0)
    for i in range(n):
        r = rows[i]
        r.page = page[i]
        r.psize = psize[i]
        r.plen = plen[i]
        s = src[i]
        if s < 0 or s >= sids.shape[0]:
            raise IndexError("a row names a source past the columns' sources")
        r.src = sids[s]
        r.enc = enc[i]
        r.epoch = epoch[i]
        r.ts = ts[i]
        r.poff = off
        off += plen[i]
        if page[i] > top:
            top = page[i]
    order = np.empty(n, np.uint32)
    if top <= 4 * n + 1024:
        start = np.zeros(top + 2, np.int64)
        for i in range(n):
            start[page[i] + 1] += 1
        for v in range(1, top + 2):
            start[v] += start[v - 1]
        for i in range(n):
            p = page[i]
            order[start[p]] = i
            start[p] += 1
    else:
        order[:] = np.argsort(page, kind="mergesort")
    bounds = np.empty(n + 1, np.int64)
    keys = np.empty(n, np.int64)
    k = 0
    prev = np.int64(-1)
    for j in range(n):
        p = page[order[j]]
        if p != prev:
            bounds[k] = j
            keys[k] = p
            k += 1
            prev = p
    bounds[k] = n
    lsn_rows, lsn_vals = _breaks(lsn)
    id_rows, id_vals = _breaks(ids)
    return order, bounds[:k + 1], keys[:k], lsn_rows, lsn_vals, id_rows, id_vals


@njit(cache=True, nogil=True)
def live_rows(flags: np.ndarray, n: int, live: int) -> np.ndarray:  # pragma: no cover - compiled
    """The rows below ``n`` whose ``flags`` have a bit of ``live``, ascending (what
    ``np.flatnonzero(flags[:n] & live)`` gives, in one compiled call rather than four
    numpy calls)."""
    n = min(n, flags.shape[0])
    k = 0
    for i in range(n):
        if flags[i] & live:
            k += 1
    out = np.empty(k, np.int64)
    k = 0
    for i in range(n):
        if flags[i] & live:
            out[k] = i
            k += 1
    return out


@njit(cache=True, nogil=True)
def fill_rows(addr: np.ndarray, size: np.ndarray, epoch: np.ndarray, loc: np.ndarray,
              flags: np.ndarray, ids: np.ndarray, addrs: np.ndarray, sizes: np.ndarray,
              epochs: np.ndarray, locs: np.ndarray, live: int) -> None:  # pragma: no cover - compiled
    """Fill the page-table rows ``ids`` (inside the columns) from the given columns and
    mark them ``live``: five column assignments in one compiled call."""
    for k in range(ids.shape[0]):
        i = ids[k]
        addr[i] = addrs[k]
        size[i] = sizes[k]
        epoch[i] = epochs[k]
        loc[i] = locs[k]
        flags[i] = live


@njit(cache=True, nogil=True)
def uniform_starts(sizes: np.ndarray, base: int) -> np.ndarray:  # pragma: no cover - compiled
    """``base + i * sizes[0]`` for each page ``i`` when every size is ``sizes[0]`` (pages
    back to back from ``base``); empty when the sizes differ or there are none."""
    n = sizes.shape[0]
    if n == 0:
        return np.empty(0, np.int64)
    first = sizes[0]
    for i in range(1, n):
        if sizes[i] != first:
            return np.empty(0, np.int64)
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = base + i * first
    return out


@njit(cache=True, nogil=True)
def check_table(ids: np.ndarray, sizes: np.ndarray, epochs: np.ndarray, locs: np.ndarray,
                next_page_id: int, max_page_size: int, max_counter: int
                ) -> tuple[int, int]:  # pragma: no cover - compiled
    """Whether a checkpoint's page-table rows can be a state's: ``(0, total bytes of
    the pages)`` when they can; ``(1, 0)`` when the ids are not ascending, positive
    and below ``next_page_id``; ``(2, 0)`` when they are but a size (1 …
    ``max_page_size``), an epoch (0 … ``max_counter`` − 1) or a location (0 … 2) is
    out of range. O(rows)."""
    prev = np.int64(0)
    for i in range(ids.shape[0]):
        if ids[i] <= prev or ids[i] >= next_page_id:
            return 1, 0
        prev = ids[i]
    total = 0
    for i in range(ids.shape[0]):
        if (sizes[i] < 1 or sizes[i] > max_page_size or epochs[i] < 0
                or epochs[i] >= max_counter or locs[i] > 2):
            return 2, 0
        total += sizes[i]
    return 0, total


def _crc_tables() -> np.ndarray:
    """The eight 256-entry tables of CRC32C (reflected, slicing by 8), built with numpy."""
    t0 = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t0 = np.where(t0 & 1, (t0 >> 1) ^ np.uint32(0x82F63B78), t0 >> 1).astype(np.uint32)
    out = np.empty((8, 256), np.int64)
    out[0] = t0
    for k in range(1, 8):
        prev = out[k - 1]
        out[k] = (prev >> 8) ^ t0[prev & 0xFF]
    return out


CRC_TABLES = _crc_tables()
"""CRC32C's tables for :func:`crc_update` (the log segments' frame checksum)."""


@njit(cache=True, nogil=True, inline="always")
def _le32(buf: np.ndarray, p: Any) -> Any:  # pragma: no cover - compiled
    return (np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16)
            | (np.int64(buf[p + 3]) << 24))


@njit(cache=True, nogil=True)
def crc_update_tables(tab: np.ndarray, c: Any, buf: np.ndarray, p: Any, n: Any) -> Any:  # pragma: no cover
    """Continue the CRC32C register ``c`` (not inverted; int64 holding 32 bits) over
    ``buf[p:p + n]`` (uint8), eight bytes a step through the tables ``tab``
    (:data:`CRC_TABLES`): slicing by 8, for any CPU."""
    while n >= 8:
        one = c ^ _le32(buf, p)
        two = _le32(buf, p + 4)
        c = (tab[7, one & 0xFF] ^ tab[6, (one >> 8) & 0xFF] ^ tab[5, (one >> 16) & 0xFF]
             ^ tab[4, one >> 24] ^ tab[3, two & 0xFF] ^ tab[2, (two >> 8) & 0xFF]
             ^ tab[1, (two >> 16) & 0xFF] ^ tab[0, two >> 24])
        p += 8
        n -= 8
    while n > 0:
        c = tab[0, (c ^ np.int64(buf[p])) & 0xFF] ^ (c >> 8)
        p += 1
        n -= 1
    return c


def _crc_step_typer(typingctx: Any, c: Any, buf: Any, p: Any, width: Any) -> Any:  # pragma: no cover
    """``crc32`` of SSE4.2 (CRC32C) continuing ``c`` over the ``width`` (8, 4 or 1, a
    constant) bytes at ``buf[p]`` (a one-dimensional uint8 array whose bytes lie next
    to each other), read unaligned; int64 in and out."""
    if (not isinstance(buf, types.Array) or buf.dtype != types.uint8 or buf.ndim != 1
            or not isinstance(width, types.IntegerLiteral) or width.literal_value not in (1, 4, 8)):
        return None
    bits = 8 * width.literal_value
    sig = types.int64(types.int64, buf, types.intp, width)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64, wide = ir.IntType(64), ir.IntType(bits)
        reg = ir.IntType(64 if bits == 64 else 32)
        name = {64: "llvm.x86.sse42.crc32.64.64", 32: "llvm.x86.sse42.crc32.32.32",
                8: "llvm.x86.sse42.crc32.32.8"}[bits]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(reg, [reg, wide]), name)
        data = context.make_array(signature.args[1])(context, builder, args[1]).data
        at = builder.bitcast(builder.gep(data, [args[2]]), wide.as_pointer())
        word = builder.load(at, align=1)
        crc = builder.call(fn, [builder.trunc(args[0], reg) if bits != 64 else args[0], word])
        return crc if bits == 64 else builder.zext(crc, i64)

    return sig, codegen


_crc_step: Any = intrinsic(_crc_step_typer)


@njit(cache=True, nogil=True)
def crc_update_hardware(tab: np.ndarray, c: Any, buf: np.ndarray, p: Any, n: Any) -> Any:  # pragma: no cover
    """:func:`crc_update_tables` through the CPU's ``crc32`` instruction (SSE4.2, which
    computes CRC32C): eight bytes a step, then four, then single bytes; ``tab`` is not
    read. Only for x86-64 CPUs with SSE4.2, compiled for that CPU (see
    :data:`CRC_HARDWARE`)."""
    if buf.strides[0] != 1:
        # A strided view: its bytes are not next to each other, as the steps read them.
        return crc_update_tables(tab, c, buf, p, n)
    c = np.int64(c) & 0xFFFFFFFF
    p = np.intp(p)
    end = p + np.intp(n)
    while end - p >= 8:
        c = _crc_step(c, buf, p, 8)
        p += 8
    if end - p >= 4:
        c = _crc_step(c, buf, p, 4)
        p += 4
    while p < end:
        c = _crc_step(c, buf, p, 1)
        p += 1
    return c


def _crc_hardware_usable() -> bool:
    """Whether :func:`crc_update_hardware` can be compiled and run here: an x86-64 CPU
    whose features, as numba compiles for them, include SSE4.2's ``crc32``, numba
    compiling for the host CPU (``NUMBA_CPU_NAME`` unset or ``host``: a named CPU such
    as ``generic``, used for caches shared between machines, may lack the instruction),
    and ``MMSB_CRC_TABLES`` unset (or ``0``).

    numba's on-disk cache cannot hand this code to a CPU without the instruction: it
    keys each cached kernel on the target triple, the CPU name and the CPU feature
    string it compiled for (``CPUCodegen.magic_tuple`` in ``numba.core.codegen``, part
    of the index key in ``numba.core.caching``), so a machine whose CPU differs in any
    of them compiles its own kernels, and chooses its own path here first."""
    if os.environ.get("MMSB_CRC_TABLES", "") not in ("", "0"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if getattr(numba.config, "CPU_NAME", None) not in (None, "host"):
        return False
    features = getattr(numba.config, "CPU_FEATURES", None)
    if features is None:
        try:
            features = llvm_binding.get_host_cpu_features().flatten()
        except (RuntimeError, OSError):
            return False
    flags = set(str(features).split(","))
    # LLVM 14 and later name crc32 apart from sse4.2; older ones have no crc32 flag.
    return "+sse4.2" in flags and "-crc32" not in flags


CRC_HARDWARE: bool = _crc_hardware_usable()
"""Whether :func:`crc_update` is :func:`crc_update_hardware` (the CPU's ``crc32``
instruction, about 5-6 times the tables' speed) rather than :func:`crc_update_tables`.
Chosen once, when this module is imported, before any kernel that calls it compiles.
A calling kernel that numba loads from its on-disk cache holds the version it was
compiled with (numba's cache key of a kernel does not cover the functions it calls);
the key's CPU name and features make that the same CPU, where both are correct."""

crc_update: Any = crc_update_hardware if CRC_HARDWARE else crc_update_tables
"""Continue the CRC32C register ``c`` (not inverted; int64 holding 32 bits) over
``buf[p:p + n]`` (uint8): ``crc_update(tab, c, buf, p, n)`` with ``tab`` =
:data:`CRC_TABLES`. The compiled kernels that check or write CRC32C all call this name,
bound to the hardware or table version as :data:`CRC_HARDWARE` says; both give the
same results."""


SEG_BEFORE_RUN = 12 + 59 + 5
"""Bytes of a one-run delta's frame before its run's start field, its source name
aside: the frame's length and CRC (12), the delta's fixed fields and its source's
length (59), the body encoding byte and the run count (5)."""


@njit(cache=True, nogil=True)
def check_segment_rows(rows: np.ndarray, sel: np.ndarray, r0: int, r1: int, cid: int,
                       buf: np.ndarray, srclen: np.ndarray, crcs: np.ndarray, tab: np.ndarray,
                       end: int) -> tuple[Any, Any, Any]:  # pragma: no cover - compiled
    """Check the frames of the log rows ``sel`` (row numbers; when empty, rows ``r0 …
    r1-1``) whose payload is an :data:`ENC_SEGRUN` run in segment chunk ``cid``
    (``buf``, whose first ``end`` bytes the segment file holds): the frame, found from
    the payload's place and the row's source name length (``srclen[src]``), lies
    inside ``end`` and its CRC32C over its length and body is the one the log noted
    when it wrote the frame (``crcs[row]``). For a delta inside a record group (rows
    recovery kept), the place so found is 12 bytes before the delta's body, inside the
    group's frame, and ``crcs[row]`` is the CRC32C of that same span (its 8 bytes
    there, then the body): the bytes the row reads are covered either way. Returns ``(the first row that fails or
    -1, lowest, highest)`` chunk numbers of the segment rows met in any chunk (-1, -1:
    none), so that the caller checks the other chunks too. O(the rows + their frames'
    bytes in ``cid``)."""
    lo = np.int64(-1)
    hi = np.int64(-1)
    count = sel.shape[0] if sel.shape[0] else r1 - r0
    for i in range(count):
        r = np.int64(sel[i]) if sel.shape[0] else r0 + i
        if rows[r].enc != 7:
            continue
        poff = rows[r].poff
        c = poff >> 32
        if lo < 0 or c < lo:
            lo = c
        if c > hi:
            hi = c
        if c != cid:
            continue
        p = poff & 0xFFFFFFFF
        src = np.int64(rows[r].src)
        if src >= srclen.shape[0]:
            return r, lo, hi
        f = p - SEG_BEFORE_RUN - srclen[src]
        stop = p + np.int64(rows[r].plen)
        if f < 0 or stop > end or stop > buf.shape[0]:
            return r, lo, hi
        k = crc_update(tab, 0xFFFFFFFF, buf, f, 8)
        k = crc_update(tab, k, buf, f + 12, stop - f - 12) ^ 0xFFFFFFFF
        if k != np.int64(crcs[r]):
            return r, lo, hi
    return -1, lo, hi


@njit(cache=True, nogil=True)
def gather_converted(chunk: np.ndarray, offs: np.ndarray, plens: np.ndarray, encs: np.ndarray,
                     psizes: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:  # pragma: no cover
    """:func:`gather_payloads`, with each :data:`ENC_SEGRUN` payload (``u32 start, u32
    count, values``) written as the in-memory run encoding instead (u16 start for a page
    of at most 65,536 bytes, else u32, then the values)."""
    for r in range(offs.shape[0]):
        o = offs[r]
        a = at[r]
        if encs[r] == 7:
            head = 2 if psizes[r] <= 65536 else 4
            for j in range(head):
                out[a + j] = chunk[o + j]
            n = plens[r] - 8
            _copy(out[a + head:a + head + n], chunk[o + 8:o + 8 + n])
        else:
            _copy(out[a:a + plens[r]], chunk[o:o + plens[r]])


@njit(cache=True, nogil=True)
def apply_rows_of_chunk(rows: np.ndarray, sel: np.ndarray, start: int, cid: int,
                        chunk: np.ndarray, buf: np.ndarray) -> tuple[Any, Any]:  # pragma: no cover
    """Write into ``buf`` (one page's bytes) the deltas of log rows ``sel[start:]``, in
    order, while their payloads lie in chunk ``cid`` (``chunk``; see
    :func:`_apply_row`). Returns ``(the index in sel of the first row not applied,
    bytes written)``; the index is ``-1 - i`` for a row ``sel[i]`` whose payload does
    not fit the page or the chunk (nothing of it written for a run or dense row)."""
    wrote = 0
    size = buf.shape[0]
    for i in range(start, sel.shape[0]):
        r = sel[i]
        poff = rows[r].poff
        if (poff >> 32) != cid:
            return i, wrote
        if np.int64(rows[r].psize) != size:
            return -1 - i, wrote
        plen: Any = np.int64(rows[r].plen)
        enc: Any = np.int64(rows[r].enc)
        n = _apply_row(chunk, poff & 0xFFFFFFFF, plen, enc, size, buf, 0)
        if n < 0:
            return -1 - i, wrote
        wrote += n
    return sel.shape[0], wrote
