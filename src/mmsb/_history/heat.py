"""Write heat across many pages at once: each page cut into a few cells of its bytes,
and per cell how many retained deltas wrote it and the newest LSN that did, read
straight from the log's payloads by one compiled pass per payload chunk (no Delta
objects, no per-byte Python).

A delta counts once per cell it writes, however many of the cell's bytes it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from .._core.log import TransactionLog

__all__ = ["PagesHeat", "pages_heat"]


@njit(cache=True, nogil=True, inline="always")
def _touch(p: Any, size: Any, nc: Any, base: Any, lsn: Any, prev: Any, counts: np.ndarray,
           last: np.ndarray) -> Any:  # pragma: no cover - compiled
    """Count position ``p`` of a page of ``size`` bytes cut into ``nc`` cells (stored
    from ``base``) for a delta at ``lsn``, unless the delta already touched its cell
    (``prev``, the last cell it touched: positions come in ascending order). Returns
    the cell."""
    c = p * nc // size
    if c != prev:
        counts[base + c] += 1
        if lsn > last[base + c]:
            last[base + c] = lsn
    return c


@njit(cache=True, nogil=True)
def _heat_rows(rows: np.ndarray, sel: np.ndarray, lsns: np.ndarray, slots: np.ndarray,
               chunk: np.ndarray, sizes: np.ndarray, ncells: np.ndarray, bases: np.ndarray,
               counts: np.ndarray, last: np.ndarray) -> None:  # pragma: no cover - compiled
    """For each log row ``sel[i]`` (its payload in ``chunk``, its LSN ``lsns[i]``, its
    page at output slot ``slots[i]``), count the cells of the page's current
    ``sizes[k]`` bytes it writes (``ncells[k]`` cells from ``bases[k]``)."""
    for i in range(sel.shape[0]):
        r = sel[i]
        k = slots[i]
        size = sizes[k]
        nc = ncells[k]
        base = bases[k]
        lsn = lsns[i]
        poff = rows[r].poff
        o = poff & 0xFFFFFFFF
        plen = np.int64(rows[r].plen)
        enc = np.int64(rows[r].enc)
        ps = np.int64(rows[r].psize)
        prev = -1
        if enc == 0 or enc == 6 or enc == 7:
            head = 4 if enc == 0 else (2 if enc == 6 else 8)
            start = np.int64(0)
            for j in range(min(head, 4)):
                start |= np.int64(chunk[o + j]) << (8 * j)
            for p in range(start, min(start + plen - head, size)):
                prev = _touch(p, size, nc, base, lsn, prev, counts, last)
        elif enc == 1 or enc == 2:
            w = 2 if enc == 1 else 4
            n = plen // (w + 1)
            for m in range(n):
                q = np.int64(0)
                for j in range(w):
                    q |= np.int64(chunk[o + w * m + j]) << (8 * j)
                if q < size:
                    prev = _touch(q, size, nc, base, lsn, prev, counts, last)
        elif enc == 3:
            for p in range(min(ps, size)):
                prev = _touch(p, size, nc, base, lsn, prev, counts, last)
        else:
            for p in range(min(ps, size)):
                if (chunk[o + ps + (p >> 3)] >> (7 - (p & 7))) & 1:
                    prev = _touch(p, size, nc, base, lsn, prev, counts, last)


@dataclass
class PagesHeat:
    """Cells of several pages: page ``ids[k]`` has ``ncells[k]`` cells, its values at
    ``counts[bases[k]:bases[k] + ncells[k]]`` (and ``last`` likewise, 0: never written
    in the retained log); cell ``c`` of a page of ``size`` bytes covers the positions
    ``p`` with ``p * ncells // size == c``."""

    ids: np.ndarray
    sizes: np.ndarray
    ncells: np.ndarray
    bases: np.ndarray
    counts: np.ndarray
    last: np.ndarray


def pages_heat(log: TransactionLog, ids: np.ndarray, sizes: np.ndarray, cols: int,
               lsn_of_row: np.ndarray) -> PagesHeat:
    """The heat of pages ``ids`` (of current ``sizes``), each cut into ``min(cols,
    size)`` cells, from their retained deltas; ``lsn_of_row`` holds the LSN of every
    delta row. The caller holds the state's lock. O(rows of these pages + the bytes
    they wrote), compiled."""
    ids = np.asarray(ids, np.int64)
    sizes = np.asarray(sizes, np.int64)
    ncells = np.minimum(sizes, cols).astype(np.int64)
    bases = np.zeros(len(ids), np.int64)
    if len(ids):
        bases[1:] = np.cumsum(ncells)[:-1]
    total = int(ncells.sum())
    counts = np.zeros(total, np.int64)
    last = np.zeros(total, np.int64)
    parts, slots = [], []
    for k, pid in enumerate(ids.tolist()):
        rows = log.index.get(pid)
        if rows is not None and len(rows) and sizes[k] > 0:
            parts.append(np.frombuffer(rows, np.uint32).astype(np.int64))
            slots.append(np.full(len(rows), k, np.int64))
    if parts:
        sel = np.concatenate(parts)
        slot = np.concatenate(slots)
        log.check_segments(sel)
        chunk_of = log.rows["poff"][sel] >> 32
        for ci in np.unique(chunk_of).tolist():
            mine = chunk_of == ci
            buf = log.chunks[ci]
            if buf is None:  # pragma: no cover - rows never point at a dropped chunk
                raise ValueError(f"delta rows refer to a released payload chunk {ci}")
            rows_here = sel[mine]
            _heat_rows(log.rows, rows_here, lsn_of_row[rows_here], slot[mine],
                       np.frombuffer(buf, np.uint8), sizes, ncells, bases, counts, last)
    return PagesHeat(ids, sizes, ncells, bases, counts, last)
