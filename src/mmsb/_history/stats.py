"""Statistics of a retained log, computed over its columns with numpy: what
``compute_log_statistics`` and ``get_stats`` report about the deltas, and per page the
deltas, bytes changed and newest LSN, without building a :class:`~mmsb._core.delta.Delta`
per row.

Every function here only reads the log; the caller holds the state's lock. Cost:
O(delta rows + bytes of the written-byte masks of dense masked rows), vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._core.log import (
    ENC_EXACT,
    ENC_FULL,
    ENC_MASKED,
    ENC_POS16,
    ENC_POS32,
    ENC_RUN,
    ENC_RUN16,
    ENC_SEGRUN,
    TransactionLog,
    _CreateRun,
)

__all__ = ["RowColumns", "RecordColumns", "row_columns", "row_counts", "record_columns",
           "structural_columns", "log_statistics", "page_statistics"]

_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64)
"""Set bits of each byte value."""


@dataclass
class RowColumns:
    """The delta rows of a log as int64 columns (row ``r`` of each is delta row ``r``)."""

    lsn: np.ndarray
    page: np.ndarray
    ts: np.ndarray
    src: np.ndarray
    """Index into ``sources`` (rows of rare sources included)."""
    sources: list[str]
    """Source names, in the order of their first row."""
    count: np.ndarray
    """Byte positions each delta writes (``Delta.count``)."""
    sparse: np.ndarray
    """Whether each delta holds only its changed bytes (``Delta.is_sparse``), bool."""


def row_counts(log: TransactionLog, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """``Delta.count`` of rows ``r0 … r1-1`` (int64), read from the encodings: a run's or
    a position list's length from its payload length, a full dense row's page size, a
    masked dense row's set mask bits (one gather per payload chunk)."""
    r1 = log.n if r1 is None else r1
    rows = log.rows[r0:r1]
    enc = rows["enc"]
    plen = rows["plen"].astype(np.int64)
    psize = rows["psize"].astype(np.int64)
    out = np.zeros(len(rows), np.int64)
    for code, head in ((ENC_RUN, 4), (ENC_RUN16, 2), (ENC_SEGRUN, 8)):
        sel = enc == code
        out[sel] = plen[sel] - head
    for code, width in ((ENC_POS16, 2), (ENC_POS32, 4)):
        sel = enc == code
        out[sel] = plen[sel] // (width + 1)
    sel = enc == ENC_FULL
    out[sel] = psize[sel]
    masked = np.flatnonzero((enc == ENC_EXACT) | (enc == ENC_MASKED))
    if masked.size:
        poff = rows["poff"][masked]
        chunk_of = poff >> 32
        for ci in np.unique(chunk_of).tolist():
            mine = masked[chunk_of == ci]
            chunk = log.chunks[ci]
            if chunk is None:  # pragma: no cover - rows never point at a dropped chunk
                raise ValueError(f"delta rows refer to a released payload chunk {ci}")
            buf = np.frombuffer(chunk, np.uint8)
            size = psize[mine]
            start = (rows["poff"][mine] & 0xFFFFFFFF) + size  # the packed mask follows the data
            nbytes = (size + 7) // 8
            total = int(nbytes.sum())
            ends = np.cumsum(nbytes)
            owner = np.repeat(np.arange(mine.size), nbytes)
            at = start[owner] + np.arange(total) - (ends - nbytes)[owner]
            cells = buf[at].copy()
            # Bits past the page's size in its last mask byte are padding (packbits fills
            # from the most significant bit).
            tail = size % 8
            pad = tail > 0
            keep = (0xFF00 >> tail[pad]) & 0xFF
            cells[ends[pad] - 1] &= keep.astype(np.uint8)
            bits = _POPCOUNT[cells]
            firsts = ends - nbytes
            nz = nbytes > 0
            sums = np.zeros(mine.size, np.int64)
            if nz.any():
                sums[nz] = np.add.reduceat(bits, firsts[nz])
            out[mine] = sums
    return out


def row_columns(log: TransactionLog) -> RowColumns:
    """LSN, page, time, source and count of every retained delta row, as columns."""
    n = log.n
    rows = log.rows[:n]
    raw = rows["src"].astype(np.int64)
    names = list(log.sources)
    src = raw.copy()
    if log.rare_sources:
        index = {name: k for k, name in enumerate(names)}
        for row, name in log.rare_sources.items():
            if row < n:
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
                src[row] = index[name]
    # Order the names by their first row, as a pass over the deltas would meet them.
    if n:
        seen, first = np.unique(src, return_index=True)
        order = seen[np.argsort(first, kind="stable")]
    else:
        order = np.zeros(0, np.int64)
    lut = np.full(len(names), -1, np.int64)
    lut[order] = np.arange(order.size)
    unused = np.flatnonzero(lut < 0)
    lut[unused] = order.size + np.arange(unused.size)
    ordered = [""] * len(names)
    for k, name in enumerate(names):
        ordered[int(lut[k])] = name
    enc = rows["enc"]
    sparse = ((enc == ENC_RUN) | (enc == ENC_RUN16) | (enc == ENC_POS16) | (enc == ENC_POS32)
              | (enc == ENC_SEGRUN))
    return RowColumns(log.row_lsns(0, n), rows["page"].astype(np.int64), rows["ts"].astype(np.int64),
                      lut[src] if n else src, ordered, row_counts(log), sparse)


def log_statistics(log: TransactionLog, cols: RowColumns | None = None) -> dict[str, Any]:
    """What ``compute_log_statistics`` reports (``total_deltas``, ``bytes_changed``,
    ``sources``, ``pages``, ``records``, ``first_lsn``, ``last_lsn``, ``sparse_deltas``,
    ``payload_bytes``), from the columns."""
    c = row_columns(log) if cols is None else cols
    per_source = np.bincount(c.src, minlength=len(c.sources)) if len(c.src) else \
        np.zeros(len(c.sources), np.int64)
    first = [int(c.lsn[0])] if len(c.lsn) else []
    if len(log.struct_lsn):
        first.append(int(log.struct_lsn[0]))
    return {
        "total_deltas": int(log.n),
        "bytes_changed": int(c.count.sum()),
        "sources": {name: int(k) for name, k in zip(c.sources, per_source.tolist(), strict=True)
                    if k},
        "pages": {pid: len(rows) for pid, rows in list(log.index.items())},
        "records": int(log.record_count),
        "first_lsn": min(first, default=0),
        "last_lsn": int(log.last_lsn),
        "sparse_deltas": int(np.count_nonzero(c.sparse)),
        "payload_bytes": int(log.bytes_logged),
    }


def page_statistics(log: TransactionLog, cols: RowColumns | None = None
                    ) -> dict[int, tuple[int, int, int]]:
    """Page id → (retained deltas, bytes they wrote, LSN of the newest one), for every
    page with a retained delta."""
    c = row_columns(log) if cols is None else cols
    if not len(c.page):
        return {}
    top = int(c.page.max()) + 1
    deltas = np.bincount(c.page, minlength=top)
    nbytes = np.bincount(c.page, weights=c.count, minlength=top).astype(np.int64)
    # LSNs rise with rows: a page's newest delta is its last row.
    ids = np.fromiter(log.index.keys(), np.int64, len(log.index))
    last_row = np.fromiter((rows[-1] for rows in log.index.values()), np.int64, len(log.index))
    last = np.zeros(top, np.int64)
    keep = ids < top
    last[ids[keep]] = c.lsn[last_row[keep]]
    have = np.flatnonzero(deltas)
    return {pid: (d, b, lsn) for pid, d, b, lsn in zip(
        have.tolist(), deltas[have].tolist(), nbytes[have].tolist(), last[have].tolist(),
        strict=True)}


def structural_columns(log: TransactionLog) -> tuple[np.ndarray, np.ndarray]:
    """LSN and timestamp of every retained structural record (int64, in LSN order), a
    creation run counted page by page. O(structural entries + pages of creation runs),
    each run in one numpy step."""
    lsns: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    one_l: list[int] = []
    one_t: list[int] = []
    for rec in log.structs:
        if type(rec) is _CreateRun:
            if one_l:
                lsns.append(np.array(one_l, np.int64))
                stamps.append(np.array(one_t, np.int64))
                one_l, one_t = [], []
            lsns.append(rec.lsn + np.arange(rec.count, dtype=np.int64))
            stamps.append(rec.timestamp + np.frombuffer(rec.offsets, np.uint32).astype(np.int64))
        else:
            one_l.append(rec.lsn)
            one_t.append(rec.timestamp)
    if one_l:
        lsns.append(np.array(one_l, np.int64))
        stamps.append(np.array(one_t, np.int64))
    if not lsns:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(lsns), np.concatenate(stamps)


@dataclass
class RecordColumns:
    """Every retained record, deltas and structural ones merged in LSN order."""

    lsn: np.ndarray
    ts: np.ndarray
    page: np.ndarray
    """The delta's page; -1 for a structural record."""
    src: np.ndarray
    """Index into ``sources``; structural records have ``len(sources) - 1``."""
    sources: list[str]
    """The deltas' source names (first-row order), then ``structural``."""


def record_columns(log: TransactionLog, cols: RowColumns | None = None,
                   structural: str = "structural") -> RecordColumns:
    """The delta rows and the structural records of ``log`` as one set of columns in
    LSN order (both are in LSN order already: merged by position, no sort)."""
    c = row_columns(log) if cols is None else cols
    s_lsn, s_ts = structural_columns(log)
    n, m = len(c.lsn), len(s_lsn)
    at = np.searchsorted(c.lsn, s_lsn) + np.arange(m)
    is_struct = np.zeros(n + m, bool)
    is_struct[at] = True
    lsn = np.empty(n + m, np.int64)
    ts = np.empty(n + m, np.int64)
    page = np.full(n + m, -1, np.int64)
    src = np.full(n + m, len(c.sources), np.int64)
    lsn[at], ts[at] = s_lsn, s_ts
    rest = ~is_struct
    lsn[rest], ts[rest], page[rest], src[rest] = c.lsn, c.ts, c.page, c.src
    return RecordColumns(lsn, ts, page, src, [*c.sources, structural])
