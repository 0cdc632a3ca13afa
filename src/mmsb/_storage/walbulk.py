"""Bulk decoding of write-ahead log segments into log columns.

Recovery reads a segment whose frames are almost all deltas (single frames, or record
groups of deltas). Decoding each frame into a :class:`~mmsb._core.delta.Delta` and
adopting it costs several microseconds of Python per record; here a compiled pass walks
the frames instead: it checks each frame's length and CRC32C, decodes the delta bodies
with the same checks as the record decoder, and fills one row of fields per delta; a
second pass writes each delta's payload in the encoding the in-memory log keeps
(:mod:`mmsb._core.log`). The result is a :class:`~mmsb._core.log.LogColumns`, which
recovery checks against the state and appends to the log in one go.

The compiled pass stops at the first frame it does not take whole — a short or damaged
frame, a bad checksum, an LSN out of step, a structural record, a group that holds one,
anything the record decoder might word differently — and leaves that frame to the
frame-by-frame reader (:func:`mmsb._storage.wal.scan_segment`), which reports damage
exactly as before or decodes the record; the compiled pass then resumes after it. So
what the bulk reader accepts is exactly what the record decoder accepts, decoded to the
same rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from .._core.kernels import CRC_TABLES
from .._core.kernels import crc_update as _crc
from .._core.limits import MAX_COUNTER, MAX_PAGE_SIZE
from .._core.log import LogColumns

__all__ = ["BulkRows", "crc32c_np", "decode_frames", "fill_payload", "CRC_TABLES", "base_epochs", "span_crcs",
           "slice_columns"]


# Row fields (columns of the ``meta`` array, int64).
F_LSN, F_ID, F_EPOCH, F_BASE, F_TS, F_PAGE, F_PSIZE, F_PLEN, F_ENC, F_SRC, F_AT, F_WENC, \
    F_NRUNS, F_FRAME = range(14)
FIELDS = 14

# Stop codes of decode_frames.
END, STOP, FULL = 0, 1, 2

# Delta body encodings in the log segments (codec.py) …
_W_SPARSE, _W_FULL, _W_MASKED, _W_EXACT = 0, 1, 2, 3
# … and payload encodings of the in-memory log (log.py).
_L_RUN, _L_POS16, _L_POS32, _L_FULL, _L_EXACT, _L_MASKED, _L_RUN16 = 0, 1, 2, 3, 4, 5, 6

_MAX_COUNTER = MAX_COUNTER
_MAX_PAGE_SIZE = MAX_PAGE_SIZE
_MAX_RECORD = 1 << 34
_MAX_ROW_PAGE = (1 << 31) - 1
"""Page ids a log row holds (int32); larger ones are left to the record decoder."""
_DELTA_FIXED = 59
"""kind u8 | lsn u64 | ts i64 | id, page, base, epoch, size u64 | source length u16."""


@njit(cache=True, nogil=True, inline="always")
def _u64(buf: np.ndarray, p: Any) -> Any:  # pragma: no cover - compiled
    v = np.uint64(0)
    for k in range(8):
        v |= np.uint64(buf[p + k]) << np.uint64(8 * k)
    return v


@njit(cache=True, nogil=True, inline="always")
def _u32(buf: np.ndarray, p: Any) -> Any:  # pragma: no cover - compiled
    return (np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16)
            | (np.int64(buf[p + 3]) << 24))


@njit(cache=True, nogil=True)
def crc32c_np(tab: np.ndarray, buf: np.ndarray, value: Any) -> Any:  # pragma: no cover - compiled
    """CRC32C of ``buf`` continuing from ``value`` (as :func:`mmsb._storage.codec.crc32c`)."""
    return _crc(tab, value ^ 0xFFFFFFFF, buf, 0, len(buf)) ^ 0xFFFFFFFF


@njit(cache=True, nogil=True, inline="always")
def _same(buf: np.ndarray, a: Any, p: Any, n: Any) -> bool:  # pragma: no cover - compiled
    for i in range(n):
        if buf[a + i] != buf[p + i]:
            return False
    return True


@njit(cache=True, nogil=True)
def _source(buf: np.ndarray, p: Any, n: Any, src_at: np.ndarray, src_len: np.ndarray,
            nsrc: np.ndarray) -> Any:  # pragma: no cover - compiled
    """The index of the source name ``buf[p:p + n]`` in the segment's table (added when
    new); -1 when the table is full. ``nsrc[0]`` counts the names, ``nsrc[1]`` is the
    last one found (tried first: a run of records usually shares its source)."""
    cnt = nsrc[0]
    hint = nsrc[1]
    if hint < cnt and src_len[hint] == n and _same(buf, src_at[hint], p, n):
        return hint
    for k in range(cnt):
        if k != hint and src_len[k] == n and _same(buf, src_at[k], p, n):
            nsrc[1] = k
            return k
    if cnt >= len(src_at):
        return -1
    src_at[cnt] = p
    src_len[cnt] = n
    nsrc[0] = cnt + 1
    nsrc[1] = cnt
    return cnt


@njit(cache=True, nogil=True)
def _delta(buf: np.ndarray, p: Any, e: Any, lsn_want: Any, kind_delta: Any, meta: np.ndarray,
           row: Any, frame: Any, src_at: np.ndarray, src_len: np.ndarray,
           nsrc: np.ndarray) -> bool:  # pragma: no cover - compiled
    """Decode the delta body ``buf[p:e]`` into ``meta[row]``, with the record decoder's
    checks; False on anything it would refuse or might word otherwise."""
    if e - p < _DELTA_FIXED + 1 or buf[p] != kind_delta:
        return False
    lsn = _u64(buf, p + 1)
    ts = _u64(buf, p + 9)
    did = _u64(buf, p + 17)
    pid = _u64(buf, p + 25)
    base = _u64(buf, p + 33)
    epoch = _u64(buf, p + 41)
    size = _u64(buf, p + 49)
    slen = np.int64(buf[p + 57]) | (np.int64(buf[p + 58]) << 8)
    maxc = np.uint64(_MAX_COUNTER)
    if (lsn >= maxc or epoch >= maxc or did >= maxc or np.int64(lsn) != lsn_want
            or size == 0 or size > np.uint64(_MAX_PAGE_SIZE) or epoch <= base
            or pid > np.uint64(_MAX_ROW_PAGE)):
        return False
    isize: Any = np.int64(size)
    q = p + _DELTA_FIXED + slen
    if q + 1 > e:
        return False
    src = _source(buf, p + _DELTA_FIXED, slen, src_at, src_len, nsrc)
    if src < 0:
        return False
    wenc = np.int64(buf[q])
    q += 1
    rem = e - q
    small = isize <= 65536
    nruns = 0
    if wenc == _W_SPARSE:
        if rem < 4:
            return False
        nruns = _u32(buf, q)
        if 8 * nruns > rem - 4:
            return False
        total = 0
        prev_end = 0
        contiguous = True
        for i in range(nruns):
            s = _u32(buf, q + 4 + 4 * i)
            ln = _u32(buf, q + 4 + 4 * nruns + 4 * i)
            if ln == 0:
                return False
            if i > 0:
                if prev_end > s:
                    return False
                if prev_end != s:
                    contiguous = False
            prev_end = s + ln
            total += ln
        if nruns > 0 and prev_end > isize:
            return False
        if rem - 4 - 8 * nruns != total:
            return False
        head = 2 if small else 4
        if total == 0 or contiguous:
            lenc = _L_RUN16 if small else _L_RUN
            plen = head + total
        else:
            lenc = _L_POS16 if small else _L_POS32
            plen = head * total + total
    elif wenc == _W_FULL:
        if rem != isize:
            return False
        lenc = _L_FULL
        plen = isize
    elif wenc == _W_MASKED or wenc == _W_EXACT:
        nbits = (isize + 7) // 8
        if rem != nbits + isize:
            return False
        if wenc == _W_MASKED:
            d = q + nbits
            for i in range(isize):
                if buf[d + i] != 0 and (buf[q + (i >> 3)] >> (7 - (i & 7))) & 1 == 0:
                    return False
        lenc = _L_MASKED if wenc == _W_MASKED else _L_EXACT
        plen = isize + nbits
    else:
        return False
    if plen >= 1 << 32:
        return False
    m = meta[row]
    m[F_LSN] = np.int64(lsn)
    m[F_ID] = np.int64(did)
    m[F_EPOCH] = np.int64(epoch)
    m[F_BASE] = np.int64(base)
    m[F_TS] = np.int64(ts)
    m[F_PAGE] = np.int64(pid)
    m[F_PSIZE] = isize
    m[F_PLEN] = plen
    m[F_ENC] = lenc
    m[F_SRC] = src
    m[F_AT] = q
    m[F_WENC] = wenc
    m[F_NRUNS] = nruns
    m[F_FRAME] = frame
    return True


@njit(cache=True, nogil=True)
def decode_frames(tab: np.ndarray, buf: np.ndarray, pos: Any, end: Any, expected: Any,
                  kind_delta: Any, kind_group: Any, meta: np.ndarray, row: Any,
                  src_at: np.ndarray, src_len: np.ndarray,
                  nsrc: np.ndarray) -> Any:  # pragma: no cover - compiled
    """Walk the frames of ``buf[pos:end]``, decoding each delta (or group of deltas)
    into ``meta`` from row ``row``, LSNs from ``expected``. Returns ``(pos, row, code)``:
    ``END`` (every frame taken), ``STOP`` (the frame at ``pos`` is left to the
    frame-by-frame reader) or ``FULL`` (``meta`` has no room for the frame at ``pos``)."""
    cap = len(meta)
    while pos < end:
        if end - pos < 12:
            return pos, row, STOP
        length = _u64(buf, pos)
        if length > np.uint64(_MAX_RECORD) or np.int64(length) > end - pos - 12:
            return pos, row, STOP
        n = np.int64(length)
        body = pos + 12
        body_end = body + n
        c = _crc(tab, 0xFFFFFFFF, buf, pos, 8)
        c = _crc(tab, c, buf, body, n)
        if (c ^ 0xFFFFFFFF) != _u32(buf, pos + 8) or n == 0:
            return pos, row, STOP
        if buf[body] == kind_group:
            if n < 5:
                return pos, row, STOP
            count = _u32(buf, body + 1)
            if count < 1 or count > (n - 5) // 4:
                return pos, row, STOP
            if row + count > cap:
                return pos, row, FULL
            p = body + 5
            r = row
            for k in range(count):
                if body_end - p < 4:
                    return pos, row, STOP
                ln = _u32(buf, p)
                p += 4
                if ln > body_end - p:
                    return pos, row, STOP
                if not _delta(buf, p, p + ln, expected + k, kind_delta, meta, r, pos,
                              src_at, src_len, nsrc):
                    return pos, row, STOP
                r += 1
                p += ln
            if p != body_end:
                return pos, row, STOP
            row = r
            expected += count
        else:
            if row + 1 > cap:
                return pos, row, FULL
            if not _delta(buf, body, body_end, expected, kind_delta, meta, row, pos,
                          src_at, src_len, nsrc):
                return pos, row, STOP
            row += 1
            expected += 1
        pos = body_end
    return pos, row, END


@njit(cache=True, nogil=True)
def fill_payload(buf: np.ndarray, meta: np.ndarray, r0: Any, r1: Any, out: np.ndarray,
                 offs: np.ndarray) -> None:  # pragma: no cover - compiled
    """Write the payload of rows ``r0 … r1-1`` at ``out[offs[r - r0]:]``, in the encoding
    each row's ``F_ENC`` names (what :meth:`TransactionLog.adopt` keeps for the delta)."""
    for r in range(r0, r1):
        o = offs[r - r0]
        q = meta[r, F_AT]
        lenc = meta[r, F_ENC]
        size = meta[r, F_PSIZE]
        plen = meta[r, F_PLEN]
        wenc = meta[r, F_WENC]
        if wenc == _W_SPARSE:
            nr = meta[r, F_NRUNS]
            vals = q + 4 + 8 * nr
            if lenc == _L_RUN16 or lenc == _L_RUN:
                head = 2 if lenc == _L_RUN16 else 4
                first = _u32(buf, q + 4) if nr > 0 else 0
                for k in range(head):
                    out[o + k] = (first >> (8 * k)) & 0xFF
                for k in range(plen - head):
                    out[o + head + k] = buf[vals + k]
            else:
                w = 2 if lenc == _L_POS16 else 4
                total = plen // (w + 1)
                at = o
                for i in range(nr):
                    s = _u32(buf, q + 4 + 4 * i)
                    ln = _u32(buf, q + 4 + 4 * nr + 4 * i)
                    for j in range(ln):
                        v = s + j
                        for k in range(w):
                            out[at + k] = (v >> (8 * k)) & 0xFF
                        at += w
                vo = o + w * total
                for k in range(total):
                    out[vo + k] = buf[vals + k]
        elif wenc == _W_FULL:
            for k in range(size):
                out[o + k] = buf[q + k]
        else:
            nbits = (size + 7) // 8
            for k in range(size):
                out[o + k] = buf[q + nbits + k]
            for k in range(nbits):
                out[o + size + k] = buf[q + k]
            if size & 7:
                out[o + size + nbits - 1] &= (0xFF00 >> (size & 7)) & 0xFF


class BulkRows:
    """The delta rows the compiled pass decoded from one segment, in order, with the
    segment's table of source names; grows as it is filled."""

    def __init__(self, buf: np.ndarray, span: int) -> None:
        self.buf = buf
        self.meta = np.empty((max(16, min(span // 68 + 1, 1 << 14)), FIELDS), np.int64)
        self.rows = 0
        self.src_at = np.zeros(1024, np.int64)
        self.src_len = np.zeros(1024, np.int64)
        self.nsrc = np.zeros(2, np.int64)
        self.names: list[str] = []

    def run(self, pos: int, end: int, expected: int, kind_delta: int,
            kind_group: int) -> tuple[int, int]:
        """Decode frames from ``pos`` until one is left to the frame-by-frame reader (or
        the end). Returns the position reached and the rows decoded by this call; the
        rows of a frame whose source name is not valid UTF-8 are dropped again and the
        position set back to that frame (the record decoder reports it)."""
        r0 = self.rows
        while True:
            pos, self.rows, code = decode_frames(CRC_TABLES, self.buf, pos, end, expected
                                                 + self.rows - r0, kind_delta, kind_group,
                                                 self.meta, self.rows, self.src_at,
                                                 self.src_len, self.nsrc)
            if code != FULL:
                break
            grown = np.empty((2 * len(self.meta), FIELDS), np.int64)
            grown[: self.rows] = self.meta[: self.rows]
            self.meta = grown
        while len(self.names) < self.nsrc[0]:
            k = len(self.names)
            at, n = int(self.src_at[k]), int(self.src_len[k])
            try:
                self.names.append(self.buf[at : at + n].tobytes().decode("utf-8"))
            except UnicodeDecodeError:
                used = np.flatnonzero(self.meta[r0 : self.rows, F_SRC] >= k)
                # Drop the rows from the first frame that names it (or a later name).
                if len(used):
                    first = r0 + int(used[0])
                    frame = int(self.meta[first, F_FRAME])
                    while first > r0 and self.meta[first - 1, F_FRAME] == frame:
                        first -= 1
                    self.rows = first
                    pos = frame
                self.nsrc[0] = k
                self.nsrc[1] = 0
                break
        return pos, self.rows - r0

    def columns(self, r0: int, r1: int) -> tuple[LogColumns, np.ndarray]:
        """Rows ``r0 … r1-1`` as log columns (payloads filled in the log's encodings),
        and the file offset of each row's frame."""
        m = self.meta[r0:r1]
        plen = np.ascontiguousarray(m[:, F_PLEN])
        offs = np.zeros(len(m) + 1, np.int64)
        np.cumsum(plen, out=offs[1:])
        payload = np.empty(int(offs[-1]), np.uint8)
        fill_payload(self.buf, self.meta, r0, r1, payload, offs)
        epoch = np.ascontiguousarray(m[:, F_EPOCH])
        base = m[:, F_BASE]
        merged = np.flatnonzero(base != epoch - 1).astype(np.int64)
        cols = LogColumns(
            np.ascontiguousarray(m[:, F_LSN]), np.ascontiguousarray(m[:, F_ID]), epoch,
            np.ascontiguousarray(m[:, F_TS]), np.ascontiguousarray(m[:, F_PAGE]),
            np.ascontiguousarray(m[:, F_PSIZE]), plen, np.ascontiguousarray(m[:, F_SRC]),
            m[:, F_ENC].astype(np.uint8), list(self.names),
            merged, np.ascontiguousarray(base[merged]), payload, [])
        return cols, np.ascontiguousarray(m[:, F_FRAME])


    def one_runs(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which of rows ``r0 … r1-1`` are one-run sparse deltas, whose payload a log
        may read from the segment itself (:data:`~mmsb._core.log.ENC_SEGRUN`: the
        run's start and length fields, then its values, the last bytes of the record's
        body); for each, the offset of that start field and the CRC32C a log checks
        the row's bytes against before reading them
        (:func:`~mmsb._core.kernels.check_segment_rows`: over the 8 bytes 12 before the
        record's body, then from the body to its end). For a record alone in its frame
        that is the frame's own CRC32C, as the frame holds it (checked by the decoder);
        for a record in a group it is computed here from the bytes read. Returns
        ``(which, offsets, crcs)``. O(rows + the grouped records' bytes)."""
        m = self.meta[r0:r1]
        frame = m[:, F_FRAME]
        slen = self.src_len[m[:, F_SRC]]
        which = (m[:, F_WENC] == _W_SPARSE) & (m[:, F_NRUNS] == 1)
        at = np.where(which, m[:, F_AT] + 4, -1)
        alone = m[:, F_AT] == frame + 12 + _DELTA_FIXED + slen + 1
        buf = self.buf
        head = np.where(alone & which, frame + 8, 0)
        crcs = (buf[head].astype(np.uint32) | (buf[head + 1].astype(np.uint32) << 8)
                | (buf[head + 2].astype(np.uint32) << 16)
                | (buf[head + 3].astype(np.uint32) << 24))
        grouped = np.flatnonzero(which & ~alone)
        if len(grouped):
            values = m[grouped, F_PLEN] - np.where(m[grouped, F_PSIZE] <= 65536, 2, 4)
            start = at[grouped] - 12 - _DELTA_FIXED - slen[grouped] - 5
            stop = at[grouped] + 8 + values
            crcs[grouped] = span_crcs(CRC_TABLES, buf, start, stop)
        return which, at, crcs


@njit(cache=True, nogil=True)
def span_crcs(tab: np.ndarray, buf: np.ndarray, start: np.ndarray,
              stop: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """For each span ``start[i] … stop[i]`` of ``buf``, the CRC32C of its first 8 bytes
    and of its bytes from 12 on (a frame's CRC, taken over any span: see
    :meth:`BulkRows.one_runs`)."""
    out = np.empty(start.shape[0], np.uint32)
    for i in range(start.shape[0]):
        f = start[i]
        c = _crc(tab, 0xFFFFFFFF, buf, f, 8)
        c = _crc(tab, c, buf, f + 12, stop[i] - f - 12)
        out[i] = c ^ 0xFFFFFFFF
    return out


def base_epochs(cols: LogColumns) -> Any:
    """Each row's base epoch (epoch − 1 except at ``base_rows``)."""
    out = cols.epoch - 1
    out[cols.base_rows] = cols.base_epochs
    return out


def slice_columns(cols: LogColumns, a: int, b: int) -> LogColumns:
    """Rows ``a … b-1`` of ``cols`` (which holds no structural records), their payloads
    and base epochs with them. O(rows + payload bytes)."""
    if a == 0 and b == len(cols):
        return cols
    offs = np.zeros(len(cols) + 1, np.int64)
    np.cumsum(cols.plen, out=offs[1:])
    keep = (cols.base_rows >= a) & (cols.base_rows < b)
    return LogColumns(cols.lsn[a:b], cols.ids[a:b], cols.epoch[a:b], cols.ts[a:b],
                      cols.page[a:b], cols.psize[a:b], cols.plen[a:b], cols.src[a:b],
                      cols.enc[a:b], cols.sources, cols.base_rows[keep] - a,
                      cols.base_epochs[keep], cols.payload[offs[a]:offs[b]], [])
