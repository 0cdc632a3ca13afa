"""Deltas: which bytes of a page changed and their new values, and the kernels that
build, merge and apply them.

A delta is *sparse* when it covers at most a quarter of the page: it keeps the sorted
positions (integers) and their values, so its memory grows with the changed bytes, not
with the page. Otherwise it is *dense*: the full-length bytes (zero outside the mask)
and a bool mask, or no mask at all when every byte is covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, InvalidDeltaError
from .kernels import diff_scan

__all__ = [
    "Delta",
    "sparse_enough",
    "as_bytes_array",
    "diff_write",
    "make_delta",
    "merge_deltas",
    "delta_byte_count",
    "apply_delta",
    "apply_clipped",
    "compress_delta",
]

def sparse_enough(changed: Any, size: Any) -> Any:
    """The representation rule: a delta is sparse when it changes at most a quarter of
    the page. Works on ints and on numpy arrays alike."""
    return changed * 4 <= size




def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def as_bytes_array(data: Any, what: str = "data") -> np.ndarray:
    """View a bytes-like object (bytes, bytearray, memoryview, uint8 array) as uint8.

    Raises:
        InvalidDeltaError: if ``data`` is not bytes-like.
    """
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and data.ndim == 1:
            return data
        if data.dtype.hasobject:
            raise InvalidDeltaError(f"{what} must hold bytes, not Python objects (dtype object)")
        if data.dtype.itemsize and data.flags.c_contiguous:
            return data.reshape(-1).view(np.uint8)
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except BufferError:
        # A non-contiguous buffer (a strided memoryview): its bytes, in order, copied.
        return as_bytes_array(np.array(data), what)
    except (TypeError, ValueError) as exc:
        raise InvalidDeltaError(
            f"{what} must be bytes-like (bytes, bytearray, memoryview or a numpy array), "
            f"not {type(data).__name__}"
        ) from exc


class Delta:
    """One change to one page: the covered byte positions and their new values.

    Attributes (read-only by contract):
        id: the delta's id, unique within its state.
        page_id: the page it changes.
        base_epoch: the page epoch it was built on; it applies only to a page at that epoch.
        epoch: the page epoch after it is applied.
        lsn: its log sequence number (0 until logged).
        timestamp: nanoseconds since the epoch when it was logged (0 until logged).
        source: who made it (``"api"``, ``"propagation"``, ``"compressed"`` …).
        page_size: the page size it was built for.
    """

    __slots__ = ("id", "page_id", "base_epoch", "epoch", "lsn", "timestamp", "source",
                 "page_size", "_idx", "_vals", "_data", "_mask", "_exact")

    def __init__(self, id: int, page_id: int, base_epoch: int, epoch: int, source: str,
                 page_size: int, idx: np.ndarray | None, vals: np.ndarray | None,
                 data: np.ndarray | None, mask: np.ndarray | None,
                 lsn: int = 0, timestamp: int = 0, exact: bool = False) -> None:
        self.id = id
        self.page_id = page_id
        self.base_epoch = base_epoch
        self.epoch = epoch
        self.source = source
        self.page_size = page_size
        # Payload arrays (numpy typing cannot express "set together"; see is_sparse).
        self._idx: Any = idx
        self._vals: Any = vals
        self._data: Any = data
        self._mask: Any = mask
        # Dense only: _data holds the page's whole content after the delta, the unmasked
        # positions being the bytes it had before. Applying it in log order is then one
        # plain copy; applying it anywhere else must go through the mask.
        self._exact = exact
        self.lsn = lsn
        self.timestamp = timestamp

    def stamped(self, lsn: int, timestamp: int) -> Delta:
        """A copy of this delta with ``lsn`` and ``timestamp`` (the payload is shared:
        both are read-only by contract)."""
        return Delta(self.id, self.page_id, self.base_epoch, self.epoch, self.source,
                     self.page_size, self._idx, self._vals, self._data, self._mask, lsn,
                     timestamp, self._exact)

    # -- views -----------------------------------------------------------------------
    @property
    def is_sparse(self) -> bool:
        """True when the payload holds only the changed bytes."""
        return self._idx is not None

    @property
    def span(self) -> tuple[int, int]:
        """``(lo, hi)``: the half-open byte range the delta may write (the whole page for
        a dense delta). O(1)."""
        idx = self._idx
        if idx is not None and len(idx):
            return int(idx[0]), int(idx[-1]) + 1
        return 0, self.page_size

    @property
    def indices(self) -> np.ndarray:
        """Sorted positions covered by the delta (integers, read-only)."""
        if self._idx is not None:
            return _readonly(self._idx)
        if self._mask is None:
            return np.arange(self.page_size, dtype=np.intp)
        return np.flatnonzero(self._mask)

    @property
    def values(self) -> np.ndarray:
        """The new values at :attr:`indices` (uint8, read-only)."""
        if self._vals is not None:
            return _readonly(self._vals)
        assert self._data is not None
        return self._data if self._mask is None else self._data[self._mask]

    @property
    def mask(self) -> np.ndarray:
        """One bool per byte of the page: True where the delta writes. O(page size)."""
        if self._idx is not None:
            m = np.zeros(self.page_size, dtype=bool)
            m[self._idx] = True
            return m
        if self._mask is None:
            return np.ones(self.page_size, dtype=bool)
        return _readonly(self._mask)

    @property
    def data(self) -> bytes:
        """The payload: the changed bytes (sparse) or the full-length bytes (dense)."""
        if self._vals is not None:
            return self._vals.tobytes()
        return self.dense_data()

    def dense_data(self) -> bytes:
        """Full-length bytes of the page size, 0 where the delta does not write."""
        if self._idx is not None:
            out = np.zeros(self.page_size, dtype=np.uint8)
            out[self._idx] = self._vals
            return out.tobytes()
        if self._exact and self._mask is not None:
            return np.where(self._mask, self._data, 0).astype(np.uint8).tobytes()
        return bytes(self._data.tobytes())

    @property
    def count(self) -> int:
        """Number of byte positions the delta writes. O(1) for sparse, O(size) dense."""
        if self._idx is not None:
            return int(self._idx.size)
        if self._mask is None:
            return self.page_size
        return int(np.count_nonzero(self._mask))

    @property
    def nbytes(self) -> int:
        """Bytes of memory the payload holds."""
        total = 0
        for a in (self._idx, self._vals, self._data, self._mask):
            if a is not None:
                total += a.nbytes
        return total

    def __repr__(self) -> str:
        kind = "sparse" if self.is_sparse else "dense"
        return (f"Delta(id={self.id}, page_id={self.page_id}, epoch={self.base_epoch}->"
                f"{self.epoch}, lsn={self.lsn}, source={self.source!r}, {kind}, "
                f"bytes={self.count})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Delta):
            return NotImplemented
        return (self.id == other.id and self.page_id == other.page_id
                and self.base_epoch == other.base_epoch and self.epoch == other.epoch
                and self.lsn == other.lsn and self.timestamp == other.timestamp
                and self.source == other.source and self.page_size == other.page_size
                and np.array_equal(self.indices, other.indices)
                and np.array_equal(self.values, other.values))

    __hash__ = None  # type: ignore[assignment]


# -- building ----------------------------------------------------------------------------

def make_delta(delta_id: int, page_id: int, base_epoch: int, page_size: int,
               idx: np.ndarray, vals: np.ndarray, source: str, epoch: int | None = None) -> Delta:
    """A delta writing ``vals`` at sorted unique positions ``idx``, sparse or dense by the
    25 % rule. ``vals`` is copied if it could alias caller memory."""
    n = int(idx.size)
    if epoch is None:
        epoch = base_epoch + 1
    if sparse_enough(n, page_size):
        return Delta(delta_id, page_id, base_epoch, epoch, source, page_size,
                     idx.astype(np.intp, copy=False), np.array(vals, dtype=np.uint8),
                     None, None)
    data = np.zeros(page_size, dtype=np.uint8)
    data[idx] = vals
    if n == page_size:
        return Delta(delta_id, page_id, base_epoch, epoch, source, page_size, None, None,
                     data, None)
    mask = np.zeros(page_size, dtype=bool)
    mask[idx] = True
    return Delta(delta_id, page_id, base_epoch, epoch, source, page_size, None, None, data, mask)


def diff_write(delta_id: int, page_id: int, base_epoch: int, view: np.ndarray, offset: int,
               new: np.ndarray, source: str) -> Delta | None:
    """The delta of writing ``new`` at ``offset`` into a page whose bytes are ``view``:
    only the positions that differ. None when nothing differs. Copies what it keeps,
    except a payload of every byte that is the whole of an immutable ``bytes`` object,
    which it keeps by reference.

    Cost: one compiled count of the differing bytes over ``len(new)`` bytes (nothing
    written), then, for a sparse delta, a second pass in the same call that skips equal
    8-byte words and writes only the changed positions, O(changed bytes) kept; for a
    dense one,
    one copy of the page (none for that referenced payload) and one compare into its
    mask.
    """
    size = len(view)
    m = len(new)
    cur = view if m == size else view[offset : offset + m]
    if not new.flags.c_contiguous:
        new = np.ascontiguousarray(new)
    # One compiled call: the count, and the positions when the delta is sparse.
    n, rel = diff_scan(cur, new, size >> 2)
    if n == 0:
        return None
    if sparse_enough(n, size):
        vals = new[rel]
        if offset:
            rel += offset
        return Delta(delta_id, page_id, base_epoch, base_epoch + 1, source, size, rel, vals,
                     None, None)
    if n == size:
        # Every byte changed: the delta's payload is ``new`` itself when it is the whole of
        # an immutable bytes object (nothing can change it later), else a copy.
        base = new.base
        keep = new if type(base) is bytes and new.nbytes == len(base) else new.copy()
        return Delta(delta_id, page_id, base_epoch, base_epoch + 1, source, size, None, None,
                     keep, None)
    if m == size:
        data = new.copy()
    else:
        data = view.copy()
        data[offset : offset + m] = new
    mask = np.zeros(size, dtype=bool)
    if n == m:
        mask[offset : offset + m] = True
    else:
        np.not_equal(cur, new, out=mask[offset : offset + m])
    return Delta(delta_id, page_id, base_epoch, base_epoch + 1, source, size, None, None, data,
                 mask, exact=True)


def delta_from_mask(delta_id: int, page_id: int, base_epoch: int, page_size: int,
                    mask: Any, data: Any, source: str) -> Delta:
    """The delta of ``create_delta``: positions where ``mask`` is true take ``data``.

    Raises:
        InvalidDeltaError: lengths that differ from each other or from the page.
    """
    m = np.asarray(mask)
    if m.ndim != 1:
        raise InvalidDeltaError("mask must be one-dimensional (one bool per byte)", page_id=page_id)
    if m.dtype != bool:
        if m.size and not np.isin(m, (0, 1)).all():
            raise InvalidDeltaError("mask must hold bools (or 0/1)", page_id=page_id)
        m = m.astype(bool)
    d = as_bytes_array(data)
    if len(m) != len(d):
        raise InvalidDeltaError(
            f"mask has {len(m)} entries but data has {len(d)} bytes; they must be equal",
            page_id=page_id)
    if len(m) != page_size:
        raise InvalidDeltaError(
            f"mask and data have {len(m)} entries but the page has {page_size} bytes",
            page_id=page_id)
    idx = np.flatnonzero(m)
    return make_delta(delta_id, page_id, base_epoch, page_size, idx, d[idx], source)


# -- merging -----------------------------------------------------------------------------

def merge_deltas(d1: Delta, d2: Delta, *, delta_id: int | None = None,
                 source: str | None = None) -> Delta:
    """One delta equal to applying ``d1`` then ``d2``; ``d2`` wins where both write.

    The result spans ``d1.base_epoch`` → ``d2.epoch`` and has ``d2``'s page size
    (``d1``'s positions beyond it are dropped). O(changed bytes) for sparse inputs.

    Raises:
        InvalidDeltaError: the deltas are of different pages, or ``d2`` does not follow ``d1``.
    """
    if d1.page_id != d2.page_id:
        raise InvalidDeltaError(
            f"cannot merge deltas of different pages ({d1.page_id} and {d2.page_id})")
    if d2.base_epoch < d1.epoch:
        raise InvalidDeltaError(
            f"delta {d2.id} (base epoch {d2.base_epoch}) does not follow delta {d1.id} "
            f"(epoch {d1.epoch}); merge them in log order", page_id=d1.page_id)
    size = d2.page_size
    i1, v1 = d1.indices, d1.values
    if d1.page_size > size:
        keep = i1 < size
        i1, v1 = i1[keep], v1[keep]
    i2, v2 = d2.indices, d2.values
    idx = np.concatenate([i1, i2]).astype(np.int64)
    vals = np.concatenate([v1, v2])
    # Stable sort then keep the last occurrence of each position: d2 wins.
    order = np.argsort(idx, kind="stable")
    idx, vals = idx[order], vals[order]
    last = np.ones(idx.size, dtype=bool)
    if idx.size > 1:
        last[:-1] = idx[1:] != idx[:-1]
    idx, vals = idx[last], vals[last]
    return make_delta(d2.id if delta_id is None else delta_id, d2.page_id, d1.base_epoch, size,
                      idx, vals, d2.source if source is None else source, epoch=d2.epoch)


def delta_byte_count(delta: Delta) -> int:
    """Number of bytes the delta writes.

    Raises:
        InvalidArgumentError: ``delta`` is not a Delta.
    """
    if not isinstance(delta, Delta):
        raise InvalidArgumentError(f"delta_byte_count() takes a Delta, not {type(delta).__name__}")
    return delta.count


# -- applying ----------------------------------------------------------------------------

def apply_delta(view: np.ndarray, delta: Delta) -> None:
    """Write ``delta`` into ``view`` (the page's bytes, same length). The one kernel every
    writer and every replay uses. O(changed bytes) sparse, O(size) dense."""
    if delta._idx is not None:
        view[delta._idx] = delta._vals
    elif delta._mask is None or delta._exact:
        view[:] = delta._data
    else:
        np.copyto(view, delta._data, where=delta._mask)


def apply_clipped(view: np.ndarray, delta: Delta) -> None:
    """Like :func:`apply_delta` for a delta built for another page size: positions past
    the shorter of the two are ignored."""
    if delta.page_size == len(view) and not delta._exact:
        apply_delta(view, delta)
        return
    n = min(len(view), delta.page_size)
    if delta._idx is not None:
        keep = delta._idx < n
        view[delta._idx[keep]] = delta._vals[keep]
    elif delta._mask is None:
        assert delta._data is not None
        view[:n] = delta._data[:n]
    else:
        assert delta._data is not None
        np.copyto(view[:n], delta._data[:n], where=delta._mask[:n])


def union_mask(size: int, deltas: Sequence[Delta]) -> np.ndarray:
    """Bool mask of every position any of ``deltas`` writes, cut to ``size``."""
    m = np.zeros(size, dtype=bool)
    for d in deltas:
        if d._idx is not None:
            idx = d._idx if d.page_size <= size else d._idx[d._idx < size]
            m[idx] = True
        elif d._mask is None:
            m[: min(size, d.page_size)] = True
        else:
            n = min(size, d.page_size)
            m[:n] |= d._mask[:n]
    return m


# -- compacting --------------------------------------------------------------------------

def _payload_of(delta: Delta) -> tuple[np.ndarray, np.ndarray]:
    """The positions and values a delta writes, checked: sorted, unique (a later value
    wins where a hand-built delta repeats a position), inside the page."""
    size = delta.page_size
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size <= 0:
        raise InvalidDeltaError(f"page_size must be a positive int, not {size!r}",
                                page_id=delta.page_id, delta_id=delta.id)
    where = {"page_id": delta.page_id, "delta_id": delta.id}
    if delta._idx is not None:
        idx = np.asarray(delta._idx)
        vals = np.asarray(delta._vals) if delta._vals is not None else None
        if vals is None or idx.ndim != 1 or vals.ndim != 1 or len(idx) != len(vals):
            raise InvalidDeltaError("a sparse delta needs as many values as positions", **where)
        if idx.size and idx.dtype.kind not in "iu":
            raise InvalidDeltaError(f"positions must be integers, not {idx.dtype}", **where)
        if vals.dtype != np.uint8:
            raise InvalidDeltaError(f"values must be uint8, not {vals.dtype}", **where)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise InvalidDeltaError(f"a position lies outside the page's {size} bytes", **where)
        idx = idx.astype(np.intp, copy=False)
        if idx.size > 1 and not (idx[1:] > idx[:-1]).all():
            order = np.argsort(idx, kind="stable")
            idx, vals = idx[order], vals[order]
            last = np.ones(idx.size, dtype=bool)
            last[:-1] = idx[1:] != idx[:-1]
            idx, vals = idx[last], vals[last]
        return idx, vals
    data = delta._data
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (size,):
        raise InvalidDeltaError(f"a dense delta needs {size} uint8 bytes of data", **where)
    mask = delta._mask
    if mask is None:
        return np.arange(size, dtype=np.intp), data
    if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape != (size,):
        raise InvalidDeltaError(f"a dense delta's mask needs {size} bools", **where)
    idx = np.flatnonzero(mask)
    return idx, data[idx]


def compress_delta(delta: Delta) -> Delta:
    """The same change in its most compact form, as a new delta.

    The positions are sorted and unique (where a hand-built delta repeats a position,
    its later value wins, as applying it would do). The payload follows the
    representation rule: sparse (positions and their values only) when the delta writes
    at most a quarter of the page, so it never takes more memory than the dense form;
    otherwise the full-length bytes with no mask when every byte is written, else the
    bytes (zero outside the mask) and the mask. A dense delta that also carried the
    page's unchanged bytes drops them. The result keeps the input's id, page, epochs,
    LSN, timestamp, source and page size, writes the same values at the same positions,
    and so has the same effect on a page at its base epoch. The input is not changed,
    and the result shares no array with it. Serialized, a sparse result is stored as
    runs of consecutive positions (``serialize_delta``).

    Args:
        delta: any delta, logged or not.

    Raises:
        InvalidDeltaError: ``delta`` is not a Delta, or its payload is inconsistent
            (lengths that differ, positions outside the page, values that are not bytes).

    Cost: O(written bytes) for a sparse delta (O(n log n) when its positions are not
    sorted), O(page size) for a dense one.
    """
    if not isinstance(delta, Delta):
        raise InvalidDeltaError(f"compress_delta takes a Delta, not {type(delta).__name__}")
    idx, vals = _payload_of(delta)
    out = make_delta(delta.id, delta.page_id, delta.base_epoch, int(delta.page_size),
                     np.array(idx, dtype=np.intp), vals, delta.source, epoch=delta.epoch)
    out.lsn = delta.lsn
    out.timestamp = delta.timestamp
    return out
