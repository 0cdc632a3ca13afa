"""The device backend interface: page memory on one device, and the delta kernels on it.

A backend owns a :class:`~mmsb._device.arena.SlotArena` of page slots on its device and
applies deltas to them with its own kernels. The public methods here validate every
argument before anything is written, so a refused call raises a typed
:class:`~mmsb.errors.MMSBError` and changes neither the slots nor the counters; the
backend classes implement only the underscore primitives (allocation, copies, scatter,
diff, synchronisation), once per device kind.

Deltas travel in the shapes the CPU engine uses (:mod:`mmsb._core.delta`): *sparse* as sorted
unique positions and their byte values, *runs* as (start, length) pairs with their bytes
concatenated, *dense* as the full page (with a bool mask when not every byte is
covered). A diff returns :class:`Changes`, sparse or dense by the same 25 % rule
(:func:`mmsb._core.delta.sparse_enough`), which the engine logs.

Backends are not thread-safe: the engine calls them under its one lock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._core.delta import Delta, as_bytes_array
from ..errors import GPUMemoryError, InvalidArgumentError, InvalidDeltaError
from .arena import SlotArena

__all__ = [
    "DeviceBackend",
    "DeviceStats",
    "Changes",
    "DeltaBatch",
    "Pending",
    "DEFAULT_CHUNK_SIZE",
    "stream_pointer",
]

DEFAULT_CHUNK_SIZE = 1 << 26  # 64 MiB: few allocations, and a 16 MiB page still shares one


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """Counters of one backend, as returned by :meth:`DeviceBackend.stats`."""

    location: str
    """Where the backend keeps page bytes: ``"cpu"``, ``"gpu"`` or ``"unified"``."""
    device: str
    """The device in words (``"host memory"``, or the GPU's name and index)."""
    slots_in_use: int
    """Live slots (pages) held."""
    bytes_in_use: int
    """Bytes of the live slots, counted by size class."""
    bytes_reserved: int
    """Bytes of all chunks the arena holds (live slots, free slots, unused tail)."""
    chunks: int
    """Allocations the arena holds (shared chunks and dedicated large-slot chunks)."""
    allocations: int
    """Slots allocated since the backend was made."""
    frees: int
    """Slots freed since the backend was made."""
    deltas_applied: int
    """Deltas written into slots (each delta of a batch counts once)."""
    batches_applied: int
    """Calls of :meth:`DeviceBackend.apply_batch` (one kernel launch each)."""
    diffs: int
    """Diffs computed."""
    syncs: int
    """Waits for the device: :meth:`DeviceBackend.synchronize` and :meth:`Pending.wait`."""
    bytes_h2d: int
    """Bytes copied from host memory into the backend's memory."""
    bytes_d2h: int
    """Bytes copied from the backend's memory to host memory."""
    bytes_d2d: int
    """Bytes copied from other device arrays into slots, on the device."""
    bytes_prefetched: int
    """Bytes of managed memory prefetched (unified backend only)."""
    prefetches: int = 0
    """Prefetch calls (slots and the host arena's managed memory)."""
    advices: int = 0
    """Memory-advice calls (preferred location, read-mostly)."""
    bytes_managed_host: int = 0
    """Bytes of managed memory handed to the host arena for unified pages (chunks and
    large-page buffers), since the backend was made."""


class Changes:
    """What a diff found: the changed positions of a page and their new values.

    *Sparse* (at most a quarter of the page changed): :attr:`positions` (sorted, int64)
    and :attr:`values` (uint8) hold only the changed bytes. *Dense*: :attr:`data` is the
    whole page after the write and :attr:`mask` marks the changed bytes (``None`` when
    every byte changed). This is what the log stores.
    """

    __slots__ = ("size", "_pos", "_vals", "_data", "_mask")

    def __init__(self, size: int, positions: np.ndarray | None, values: np.ndarray | None,
                 data: np.ndarray | None, mask: np.ndarray | None) -> None:
        self.size = size
        self._pos = positions
        self._vals = values
        self._data = data
        self._mask = mask

    @classmethod
    def sparse(cls, size: int, positions: np.ndarray, values: np.ndarray) -> Changes:
        """Sparse changes: ``values[i]`` is the new byte at ``positions[i]``."""
        return cls(size, positions.astype(np.int64, copy=False), values, None, None)

    @classmethod
    def dense(cls, size: int, data: np.ndarray, mask: np.ndarray | None) -> Changes:
        """Dense changes: ``data`` is the page after the write, ``mask`` the changed bytes."""
        return cls(size, None, None, data, mask)

    @property
    def is_sparse(self) -> bool:
        """True when only the changed bytes are held."""
        return self._pos is not None

    @property
    def count(self) -> int:
        """Number of changed bytes. O(1) sparse, O(size) dense with a mask."""
        if self._pos is not None:
            return int(self._pos.size)
        if self._mask is None:
            return self.size
        return int(np.count_nonzero(self._mask))

    @property
    def positions(self) -> np.ndarray:
        """Sorted changed positions (int64)."""
        if self._pos is not None:
            return self._pos
        if self._mask is None:
            return np.arange(self.size, dtype=np.int64)
        return np.flatnonzero(self._mask).astype(np.int64)

    @property
    def values(self) -> np.ndarray:
        """New values at :attr:`positions` (uint8)."""
        if self._vals is not None:
            return self._vals
        assert self._data is not None
        return self._data if self._mask is None else self._data[self._mask]

    @property
    def data(self) -> np.ndarray | None:
        """Dense only: the whole page after the write."""
        return self._data

    @property
    def mask(self) -> np.ndarray | None:
        """Dense only: the changed bytes, or ``None`` when all changed."""
        return self._mask

    def to_delta(self, delta_id: int, page_id: int, base_epoch: int, source: str) -> Delta:
        """The :class:`mmsb._core.delta.Delta` of these changes, on a page at ``base_epoch``."""
        if self._pos is not None:
            return Delta(delta_id, page_id, base_epoch, base_epoch + 1, source, self.size,
                         self._pos.astype(np.intp, copy=False), self._vals, None, None)
        return Delta(delta_id, page_id, base_epoch, base_epoch + 1, source, self.size, None,
                     None, self._data, self._mask, exact=self._mask is not None)

    def __repr__(self) -> str:
        kind = "sparse" if self.is_sparse else "dense"
        return f"Changes({kind}, {self.count} of {self.size} bytes)"


class DeltaBatch:
    """Deltas to many slots, in columns, for one kernel launch.

    Delta ``d`` writes ``counts[d]`` bytes into ``slots[d]``. For a sparse delta its
    positions are the next ``counts[d]`` entries of ``positions`` (sorted, unique); for
    a dense one (``dense[d]``) ``counts[d]`` is the slot's size and it has no positions.
    ``values`` holds every delta's bytes, concatenated in order. Slots must be distinct:
    merge deltas of one page first (:func:`mmsb.merge_deltas`).

    Build it with :meth:`from_items` or :meth:`from_deltas`, or pass the columns.
    """

    __slots__ = ("slots", "counts", "positions", "values", "dense")

    def __init__(self, slots: Any, counts: Any, positions: Any, values: Any,
                 dense: Any = None) -> None:
        self.slots = np.asarray(slots)
        self.counts = np.asarray(counts)
        self.positions = np.asarray(positions) if not hasattr(positions, "__cuda_array_interface__") else positions
        self.values = values
        self.dense = (np.zeros(len(self.slots), dtype=bool) if dense is None
                      else np.asarray(dense))

    @classmethod
    def from_items(cls, items: Iterable[tuple[int, Any, Any]]) -> DeltaBatch:
        """A batch from ``(slot, positions, values)`` triples; ``positions=None`` means a
        dense delta whose ``values`` are the whole page. Host arrays only. O(total bytes).
        """
        slots: list[int] = []
        counts: list[int] = []
        dense: list[bool] = []
        pos_parts: list[np.ndarray] = []
        val_parts: list[np.ndarray] = []
        for slot, pos, vals in items:
            v = as_bytes_array(vals, "values")
            slots.append(slot)
            counts.append(len(v))
            dense.append(pos is None)
            if pos is not None:
                pos_parts.append(np.asarray(pos))
            val_parts.append(v)
        positions = (np.concatenate(pos_parts) if pos_parts else np.empty(0, dtype=np.int64))
        values = np.concatenate(val_parts) if val_parts else np.empty(0, dtype=np.uint8)
        return cls(np.array(slots, dtype=np.int64), np.array(counts, dtype=np.int64),
                   positions, values, np.array(dense, dtype=bool))

    @classmethod
    def from_deltas(cls, items: Iterable[tuple[int, Delta]]) -> DeltaBatch:
        """A batch from ``(slot, Delta)`` pairs: sparse deltas stay sparse; a dense delta
        that covers the whole page goes as dense bytes, a masked one as its positions."""
        triples: list[tuple[int, Any, Any]] = []
        for slot, d in items:
            if not d.is_sparse and d.count == d.page_size:
                triples.append((slot, None, d.values))
            else:
                triples.append((slot, d.indices, d.values))
        return cls.from_items(triples)

    def __len__(self) -> int:
        return len(self.slots)


class Pending:
    """An operation queued on a backend's stream; :meth:`wait` blocks until it landed.

    The host backend finishes every operation before returning, so its tickets are
    already done.
    """

    __slots__ = ("_backend", "_event", "_result", "_keep", "_done")

    def __init__(self, backend: DeviceBackend, event: Any, result: Any = None,
                 keep: Any = None) -> None:
        self._backend = backend
        self._event = event
        self._result = result
        self._keep = keep  # inputs the device may still be reading
        self._done = event is None

    def done(self) -> bool:
        """True when the operation has finished (does not block)."""
        if not self._done and self._backend._event_done(self._event):
            self._done = True
            self._keep = None
        return self._done

    def wait(self) -> Any:
        """Block until the operation has finished; returns its result (the host array
        of an async copy-out, else None)."""
        if not self._done:
            self._backend._event_wait(self._event)
            self._backend._syncs += 1
            self._done = True
            self._keep = None
        return self._result


def _host_array(host: Any) -> np.ndarray:
    if (not isinstance(host, np.ndarray) or host.dtype != np.uint8 or host.ndim != 1
            or not host.flags.c_contiguous):
        raise InvalidArgumentError("expected the page's bytes as a contiguous uint8 numpy array")
    return host


def stream_pointer(stream: Any) -> int | None:
    """None, or the raw pointer of a CuPy stream (``.ptr``) or of an int.

    Raises:
        InvalidArgumentError: anything else.
    """
    if stream is None:
        return None
    ptr = getattr(stream, "ptr", stream)
    if isinstance(ptr, bool) or not isinstance(ptr, int | np.integer) or ptr < 0:
        raise InvalidArgumentError(
            f"stream must be a CuPy stream, a raw stream pointer (int) or None, not {stream!r}")
    return int(ptr)


def _int_array(a: Any, what: str, page_id: int | None = None) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidDeltaError(
            f"{what} must be a one-dimensional array of integers, not "
            f"{arr.ndim}-d {arr.dtype}", page_id=page_id)
    return arr


class DeviceBackend(ABC):
    """Page memory on one device: an arena of slots and the delta kernels on it.

    Slots are zero-filled when allocated. Every method that takes a slot refuses one
    that is not live with :class:`~mmsb.errors.InvalidArgumentError`; byte arguments
    that do not fit (lengths, ranges, dtypes, order) are refused with
    :class:`~mmsb.errors.InvalidDeltaError`. A refused call changes nothing.

    Args:
        chunk_size: bytes of one shared arena chunk (default 64 MiB).
    """

    location: str = ""
    """``"cpu"``, ``"gpu"`` or ``"unified"``."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._arena = SlotArena(chunk_size, self._new_chunk, self._zero)
        self._deltas = 0
        self._batches = 0
        self._diffs = 0
        self._syncs = 0
        self._h2d = 0
        self._d2h = 0
        self._d2d = 0
        self._prefetched = 0
        self._prefetches = 0
        self._advices = 0
        self._managed_host = 0

    # == primitives each backend implements ============================================
    @abstractmethod
    def _new_chunk(self, nbytes: int) -> Any:
        """A zero-filled allocation of ``nbytes``; GPUMemoryError when none can be had."""

    @abstractmethod
    def _zero(self, chunk: Any, offset: int, nbytes: int) -> None:
        """Zero-fill ``nbytes`` of ``chunk`` at ``offset``."""

    @abstractmethod
    def _slot_array(self, chunk: Any, offset: int, nbytes: int) -> Any:
        """A writable uint8 array over the slot's bytes (host or device)."""

    @abstractmethod
    def _coerce(self, data: Any, what: str) -> tuple[Any, bool]:
        """``(uint8 1-d array, on_device)`` for bytes-like or device-array input.

        Raises InvalidDeltaError for input the backend cannot read."""

    @abstractmethod
    def _coerce_positions(self, positions: Any, what: str) -> tuple[Any, bool]:
        """``(integer 1-d array, on_device)``; InvalidDeltaError otherwise."""

    @abstractmethod
    def _coerce_mask(self, mask: Any) -> tuple[Any, bool]:
        """``(bool 1-d array, on_device)``; InvalidDeltaError otherwise."""

    @abstractmethod
    def _positions_ok(self, positions: Any, size: int) -> bool:
        """True when ``positions`` are strictly increasing and inside ``[0, size)``."""

    @abstractmethod
    def _copy_in(self, dst: Any, src: Any, on_device: bool) -> None:
        """Copy ``src`` (same length) into the slot array ``dst``."""

    @abstractmethod
    def _copy_out(self, src: Any, out: np.ndarray | None) -> np.ndarray:
        """A host copy of the slot array ``src`` (into ``out`` when given), finished."""

    @abstractmethod
    def _readonly_view(self, slot: int, arr: Any) -> Any:
        """A read-only view of the slot array for users."""

    @abstractmethod
    def _scatter(self, dst: Any, positions: Any, values: Any) -> None:
        """``dst[positions] = values`` (validated, unique positions)."""

    @abstractmethod
    def _apply_runs(self, dst: Any, starts: np.ndarray, lengths: np.ndarray,
                    values: Any) -> None:
        """Write each run: ``dst[starts[r]:starts[r]+lengths[r]]`` from ``values``."""

    @abstractmethod
    def _apply_masked(self, dst: Any, data: Any, mask: Any) -> None:
        """``dst[mask] = data[mask]``."""

    @abstractmethod
    def _apply_batch(self, targets: list[tuple[Any, int]], batch: DeltaBatch,
                     values: Any, positions: Any) -> None:
        """Write every delta of a validated batch with one launch; ``targets[d]`` is
        ``(chunk, offset)`` of delta ``d``'s slot."""

    @abstractmethod
    def _diff(self, page: Any, new: Any, on_device: bool, offset: int,
              apply: bool) -> tuple[Changes | None, int, int]:
        """Compare ``page[offset:offset+len(new)]`` with ``new``; returns the changes and
        the bytes moved host→device and device→host. With ``apply``, also writes ``new``."""

    @abstractmethod
    def _synchronize(self) -> None:
        """Wait until all work queued on the backend's stream has finished."""

    def _out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by the backend's own array library inside a device
        operation, means its memory ran out (the host backend: numpy's MemoryError)."""
        return isinstance(exc, MemoryError)

    def _compare(self, page: Any, src: Any, on_dev: bool, offset: int,
                 apply: bool) -> tuple[Changes | None, int, int]:
        """``_diff``, with the array library's out-of-memory error raised as
        GPUMemoryError. The compare's temporaries are all taken before ``apply`` writes
        anything, so a refusal leaves the slot as it was."""
        try:
            return self._diff(page, src, on_dev, offset, apply)
        except Exception as exc:
            if self._out_of_memory(exc):
                raise GPUMemoryError(
                    f"{self.device_name} ran out of memory comparing {len(src)} bytes "
                    f"({type(exc).__name__}: {exc}); free device pages, or write the "
                    "contents in smaller pieces", requested_bytes=len(src)) from exc
            raise

    @abstractmethod
    def _record_event(self) -> Any:
        """A marker after the work queued so far (None when nothing is pending)."""

    @abstractmethod
    def _event_done(self, event: Any) -> bool:
        """True when the work before ``event`` has finished."""

    @abstractmethod
    def _event_wait(self, event: Any) -> None:
        """Block until the work before ``event`` has finished."""

    @abstractmethod
    def device_name(self) -> str:
        """The device in words."""

    # == allocation =====================================================================
    def alloc(self, size: int) -> int:
        """A zero-filled slot of ``size`` bytes; returns its address (an int).

        Cost: amortised O(1); one zero-fill of the slot when a freed slot is reused, one
        device allocation when the arena grows by a chunk.

        Raises:
            InvalidArgumentError: ``size`` is not a positive int.
            GPUMemoryError: the device has no memory for another chunk.
        """
        return self._arena.alloc(size)

    def free(self, slot: int) -> None:
        """Return ``slot`` to the arena; its bytes may be handed out again.

        Raises:
            InvalidArgumentError: ``slot`` is not live (a second free is refused too).
        """
        self._arena.free(slot)

    def size_of(self, slot: int) -> int:
        """The size ``slot`` was allocated for.

        Raises:
            InvalidArgumentError: ``slot`` is not live.
        """
        return self._arena.size_of(slot)

    def is_live(self, slot: int) -> bool:
        """True when ``slot`` is allocated in this backend."""
        return self._arena.is_live(slot)

    def _array(self, slot: int) -> tuple[Any, int]:
        chunk, off, size = self._arena.locate(slot)
        return self._slot_array(chunk, off, size), size

    # == copies ========================================================================
    def copy_in(self, slot: int, data: Any, offset: int = 0) -> None:
        """Write ``data`` into the slot at ``offset`` as is (no diff, no log).

        ``data``: bytes-like, a numpy array, or (on a device backend) a device array or
        any object with ``__dlpack__`` on the same device; any dtype, read as its bytes.

        Cost: one copy of ``len(data)`` bytes (host→device when ``data`` is on the host).

        Raises:
            InvalidArgumentError: ``slot`` not live, or ``offset`` not a non-negative int.
            InvalidDeltaError: ``data`` unreadable, or it does not fit at ``offset``.
        """
        dst, size = self._array(slot)
        src, on_dev = self._coerce(data, "data")
        offset = self._offset(offset)
        n = len(src)
        if offset + n > size:
            raise InvalidDeltaError(
                f"{n} bytes at offset {offset} run past the end of a {size}-byte slot")
        if n:
            self._copy_in(dst[offset : offset + n], src, on_dev)
        self._count_in(n, on_dev)

    def copy_in_async(self, slot: int, data: Any, offset: int = 0) -> Pending:
        """:meth:`copy_in` queued on the backend's stream; do not change ``data`` until
        the ticket is done. Raises what :meth:`copy_in` raises."""
        self.copy_in(slot, data, offset)
        return Pending(self, self._record_event(), keep=data)

    def copy_out(self, slot: int, out: np.ndarray | None = None) -> np.ndarray:
        """A host copy of the slot's bytes (uint8, the slot's size), into ``out`` if given.

        Cost: one copy of the slot (device→host on a device backend), then a wait.

        Raises:
            InvalidArgumentError: ``slot`` not live, or ``out`` is not a writable uint8
                array of the slot's size.
        """
        src, size = self._array(slot)
        if out is not None:
            if (not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != (size,)
                    or not out.flags.writeable or not out.flags.c_contiguous):
                raise InvalidArgumentError(
                    f"out must be a writable, contiguous uint8 numpy array of shape ({size},)")
        result = self._copy_out(src, out)
        self._d2h += size
        return result

    def copy_out_async(self, slot: int) -> Pending:
        """:meth:`copy_out` queued on the backend's stream; ``wait()`` returns the host
        array. Raises what :meth:`copy_out` raises."""
        src, size = self._array(slot)
        result, event = self._copy_out_async(src)
        self._d2h += size
        return Pending(self, event, result=result)

    def _copy_out_async(self, src: Any) -> tuple[np.ndarray, Any]:
        return self._copy_out(src, None), None

    def view(self, slot: int) -> Any:
        """A read-only view of the slot's bytes on its device, without a copy.

        On the host backend a read-only numpy array; on a CUDA backend an object with
        ``__dlpack__`` and ``__cuda_array_interface__`` (marked read-only), so PyTorch,
        JAX or CuPy can take it zero-copy. The view refuses export once the slot is
        freed.

        Raises:
            InvalidArgumentError: ``slot`` not live.
        """
        arr, _ = self._array(slot)
        return self._readonly_view(slot, arr)

    # == deltas ========================================================================
    def apply_sparse(self, slot: int, positions: Any, values: Any) -> None:
        """Write ``values[i]`` at ``positions[i]``: one scatter launch.

        ``positions``: sorted, unique integers inside the slot; ``values``: one byte per
        position. Either may be on the host or (device backends) on the device.

        Cost: O(len(positions)), plus their upload when they come from the host.

        Raises:
            InvalidArgumentError: ``slot`` not live.
            InvalidDeltaError: wrong dtypes, lengths that differ, positions out of
                range, unsorted or repeated.
        """
        dst, size = self._array(slot)
        pos, pos_dev = self._coerce_positions(positions, "positions")
        vals, vals_dev = self._coerce(values, "values")
        if len(pos) != len(vals):
            raise InvalidDeltaError(
                f"{len(pos)} positions but {len(vals)} values; they must be equal")
        if not self._positions_ok(pos, size):
            raise InvalidDeltaError(
                f"positions must be strictly increasing and inside [0, {size})")
        if len(pos):
            self._scatter(dst, pos, vals)
        self._count_in(len(vals) + (len(pos) * pos.dtype.itemsize), vals_dev and pos_dev)
        self._deltas += 1

    def apply_runs(self, slot: int, starts: Any, lengths: Any, values: Any) -> None:
        """Write runs of bytes: run ``r`` puts the next ``lengths[r]`` bytes of
        ``values`` at ``starts[r]``. One launch.

        ``starts`` and ``lengths`` are host integer arrays; runs must be non-empty,
        ordered and not overlap; ``values`` holds ``sum(lengths)`` bytes.

        Cost: O(total run bytes).

        Raises:
            InvalidArgumentError: ``slot`` not live.
            InvalidDeltaError: wrong dtypes or lengths, empty, overlapping, unordered or
                out-of-range runs.
        """
        dst, size = self._array(slot)
        st = _int_array(starts, "starts").astype(np.int64)
        ln = _int_array(lengths, "lengths").astype(np.int64)
        vals, vals_dev = self._coerce(values, "values")
        if len(st) != len(ln):
            raise InvalidDeltaError(f"{len(st)} starts but {len(ln)} lengths; they must be equal")
        if len(st):
            ends = st + ln
            if (ln <= 0).any() or st[0] < 0 or ends[-1] > size or (st[1:] < ends[:-1]).any():
                raise InvalidDeltaError(
                    f"runs must be non-empty, ordered, not overlapping and inside [0, {size})")
        total = int(ln.sum())
        if total != len(vals):
            raise InvalidDeltaError(f"the runs cover {total} bytes but values has {len(vals)}")
        if total:
            self._apply_runs(dst, st, ln, vals)
        self._count_in(total + 16 * len(st), vals_dev)
        self._deltas += 1

    def apply_dense(self, slot: int, data: Any, mask: Any = None) -> None:
        """Write a whole page: all of ``data``, or only where ``mask`` is true. One copy
        (unmasked) or one masked-copy launch.

        Cost: O(slot size).

        Raises:
            InvalidArgumentError: ``slot`` not live.
            InvalidDeltaError: ``data`` or ``mask`` unreadable or not the slot's size.
        """
        dst, size = self._array(slot)
        src, on_dev = self._coerce(data, "data")
        if len(src) != size:
            raise InvalidDeltaError(f"dense data has {len(src)} bytes but the slot has {size}")
        if mask is None:
            self._copy_in(dst, src, on_dev)
            self._count_in(size, on_dev)
        else:
            m, m_dev = self._coerce_mask(mask)
            if len(m) != size:
                raise InvalidDeltaError(f"mask has {len(m)} entries but the slot has {size} bytes")
            self._apply_masked(dst, src, m)
            self._count_in(2 * size, on_dev and m_dev)
        self._deltas += 1

    def apply_delta(self, slot: int, delta: Delta) -> None:
        """Write an :class:`mmsb._core.delta.Delta` (built for a page of the slot's size).

        Sparse deltas go as one scatter, dense ones as one copy (or one masked copy).

        Raises:
            InvalidArgumentError: ``slot`` not live, or ``delta`` is not a Delta.
            InvalidDeltaError: the delta was built for another page size.
        """
        size = self.size_of(slot)
        if not isinstance(delta, Delta):
            raise InvalidArgumentError(f"expected a Delta, not {type(delta).__name__}")
        if delta.page_size != size:
            raise InvalidDeltaError(
                f"delta is for a {delta.page_size}-byte page but the slot has {size} bytes",
                page_id=delta.page_id, delta_id=delta.id)
        if delta.is_sparse:
            self.apply_sparse(slot, delta.indices, delta.values)
        elif delta.count == size:
            self.apply_dense(slot, delta.values)
        else:
            self.apply_sparse(slot, delta.indices, delta.values)

    def apply_batch(self, batch: DeltaBatch) -> None:
        """Write every delta of ``batch`` (to distinct slots) with one kernel launch.

        Cost: O(total bytes), one upload of the positions, values and a small table.

        Raises:
            InvalidArgumentError: a slot not live, or ``batch`` is not a DeltaBatch.
            InvalidDeltaError: columns of mismatched lengths, repeated slots, a dense
                delta not the size of its slot, positions out of range, unsorted or
                repeated within a delta.
        """
        n = self._run_batch(batch)
        self._deltas += n
        self._batches += 1

    def marker(self) -> Pending:
        """A ticket for the work queued on the backend's stream so far."""
        return Pending(self, self._record_event())

    def copy_in_many(self, items: Iterable[tuple[int, Any]]) -> Pending:
        """Write whole slots, each ``(slot, data)`` with ``data`` (host bytes) the
        slot's size, as one batch (one upload, one launch), queued on the backend's
        stream; returns a ticket. Counted as bytes copied in, not as deltas.

        Raises:
            InvalidArgumentError: a slot not live.
            InvalidDeltaError: data not the size of its slot, or a slot given twice.
        """
        batch = DeltaBatch.from_items((slot, None, data) for slot, data in items)
        self._run_batch(batch)
        return Pending(self, self._record_event(), keep=batch)

    def _run_batch(self, batch: DeltaBatch) -> int:
        """Validate and write a batch (see apply_batch); returns its delta count."""
        if not isinstance(batch, DeltaBatch):
            raise InvalidArgumentError(f"expected a DeltaBatch, not {type(batch).__name__}")
        n = len(batch.slots)
        slots = _int_array(batch.slots, "batch slots") if n else np.empty(0, dtype=np.int64)
        counts = _int_array(batch.counts, "batch counts") if n else np.empty(0, dtype=np.int64)
        dense = np.asarray(batch.dense)
        if len(counts) != n or dense.shape != (n,) or dense.dtype != bool:
            raise InvalidDeltaError(
                "a batch needs one count and one dense flag (bool) per slot")
        if n and (counts < 0).any():
            raise InvalidDeltaError("batch counts must not be negative")
        if len(np.unique(slots)) != n:
            raise InvalidDeltaError(
                "a batch writes each slot at most once; merge deltas of one page first")
        targets: list[tuple[Any, int]] = []
        sizes = np.empty(n, dtype=np.int64)
        for i, s in enumerate(slots.tolist()):
            chunk, off, size = self._arena.locate(s)
            targets.append((chunk, off))
            sizes[i] = size
        vals, vals_dev = self._coerce(batch.values, "batch values")
        pos, pos_dev = self._coerce_positions(batch.positions, "batch positions")
        total = int(counts.sum())
        if len(vals) != total:
            raise InvalidDeltaError(f"the batch counts sum to {total} but values has {len(vals)}")
        if (dense & (counts != sizes)).any():
            raise InvalidDeltaError("a dense delta of a batch must cover its whole slot")
        sparse_counts = np.where(dense, 0, counts)
        if len(pos) != int(sparse_counts.sum()):
            raise InvalidDeltaError(
                f"the sparse deltas of the batch have {int(sparse_counts.sum())} values "
                f"but positions has {len(pos)}")
        if len(pos) and not self._batch_positions_ok(pos, sparse_counts, sizes):
            raise InvalidDeltaError(
                "positions of each delta of a batch must be strictly increasing and "
                "inside its slot")
        if total:
            self._apply_batch(targets, batch, vals, pos)
        self._count_in(total + len(pos) * pos.dtype.itemsize + 32 * n, vals_dev and pos_dev)
        return n

    def apply_batch_async(self, batch: DeltaBatch) -> Pending:
        """:meth:`apply_batch` queued on the backend's stream. Raises what it raises."""
        self.apply_batch(batch)
        return Pending(self, self._record_event(), keep=batch)

    def _batch_positions_ok(self, pos: Any, sparse_counts: np.ndarray,
                            sizes: np.ndarray) -> bool:
        # Vectorised over every delta: each position under its slot's size, and each
        # step inside one delta strictly increasing.
        xp = self._xp(pos)
        limit = xp.asarray(np.repeat(sizes, sparse_counts))
        if bool((pos < 0).any()) or bool((pos >= limit).any()):
            return False
        starts = np.zeros(len(pos), dtype=bool)
        first = np.cumsum(sparse_counts) - sparse_counts
        starts[first[sparse_counts > 0]] = True
        steps_ok = pos[1:] > pos[:-1]
        return bool((steps_ok | xp.asarray(starts[1:])).all())

    def _xp(self, arr: Any) -> Any:
        return np

    def read_contents(self, new: Any) -> Any:
        """``new`` as this backend reads new contents (:meth:`diff`, :meth:`copy_in`,
        :meth:`diff_memory`): a 1-d uint8 array, on the device when ``new`` lives there.
        Passing the result to those calls reads it again at no cost; a caller reads
        first to refuse unreadable input before it does anything else.

        Raises:
            InvalidDeltaError: ``new`` unreadable (another device, not bytes, ...).
        """
        return self._coerce(new, "new contents")[0]

    def diff(self, slot: int, new: Any, offset: int = 0, *, apply: bool = False) -> Changes | None:
        """The changes of writing ``new`` into the slot at ``offset``, computed on the
        device; only the changed positions and values (or, when dense, the page and its
        mask) come back to the host. None when nothing differs.

        With ``apply=True`` the slot also takes ``new`` in the same call, so a write of
        device-resident contents never travels to the host and back.

        Cost: one compare of ``len(new)`` bytes and a compaction of the changed
        positions on the device; O(changed bytes) back to the host when sparse, O(page
        size) when dense.

        Raises:
            InvalidArgumentError: ``slot`` not live, or ``offset`` not a non-negative int.
            InvalidDeltaError: ``new`` unreadable, or it does not fit at ``offset``.
            GPUMemoryError: the device ran out of memory for the compare (the slot is
                left as it was).
        """
        page, size = self._array(slot)
        src, on_dev = self._coerce(new, "new contents")
        offset = self._offset(offset)
        if offset + len(src) > size:
            raise InvalidDeltaError(
                f"{len(src)} bytes at offset {offset} run past the end of a {size}-byte slot")
        changes, up, down = self._compare(page, src, on_dev, offset, bool(apply))
        self._h2d += up
        self._d2h += down
        self._diffs += 1
        if apply and changes is not None:
            self._deltas += 1
        return changes

    # == managed memory of the host arena ===============================================
    # A backend with managed memory lends it to the host arena for unified pages: the
    # engine's host paths write those bytes in place, and the device reads the same
    # memory (no device copy). These methods take such host arrays (``host``: a slice of
    # what ``managed_source()`` handed out), not slots.
    def managed_source(self) -> Callable[[int], np.ndarray] | None:
        """``source(nbytes)``, giving a zero-filled writable uint8 numpy array over
        managed memory (the CPU and the device address the same bytes), for the host
        arena's unified pages; None when the backend has no managed memory (its pages
        then keep a device copy beside their host mirror). The source raises
        GPUMemoryError where the memory is not there."""
        return None

    def memory_view(self, host: np.ndarray, alive: Callable[[], bool]) -> Any:
        """A read-only view on the device of ``host`` (managed memory), without a copy:
        the device reads the bytes the host arena holds, so the view is never behind.
        ``alive()`` says whether the bytes still belong to the page the view was made
        for; exports are refused once it says no.

        Raises:
            InvalidArgumentError: ``host`` is not a contiguous uint8 numpy array.
        """
        return self._memory_view(self._memory_array(_host_array(host)), alive)

    def diff_memory(self, host: np.ndarray, new: Any, offset: int = 0) -> Changes | None:
        """The changes of writing ``new`` into ``host`` (managed memory) at ``offset``,
        computed on the device as :meth:`diff` does, without writing anything (the
        engine writes the logged changes into the same memory). None when nothing
        differs.

        Raises:
            InvalidArgumentError: ``host`` not a contiguous uint8 numpy array, or
                ``offset`` not a non-negative int.
            InvalidDeltaError: ``new`` unreadable, or it does not fit at ``offset``.
            GPUMemoryError: the device ran out of memory for the compare.
        """
        page = self._memory_array(_host_array(host))
        size = len(host)
        src, on_dev = self._coerce(new, "new contents")
        offset = self._offset(offset)
        if offset + len(src) > size:
            raise InvalidDeltaError(
                f"{len(src)} bytes at offset {offset} run past the end of a {size}-byte page")
        changes, up, down = self._compare(page, src, on_dev, offset, False)
        self._h2d += up
        self._d2h += down
        self._diffs += 1
        return changes

    def prefetch_memory(self, host: np.ndarray, to: str, stream: Any = None) -> Pending:
        """Migrate ``host``'s managed memory to the device (``to="gpu"``) or the host
        (``"cpu"``) ahead of use, queued on ``stream`` (a CuPy stream, a raw stream
        pointer, or None for the backend's stream); returns a ticket to wait on. A
        backend without a device records the call and returns a done ticket.

        Raises:
            InvalidArgumentError: ``host`` not a contiguous uint8 numpy array, ``to``
                not ``"gpu"``/``"cpu"``, or ``stream`` not a stream.
            GPUMemoryError: the driver refused the prefetch.
        """
        arr = self._memory_array(_host_array(host))
        if to not in ("gpu", "cpu"):
            raise InvalidArgumentError(f"a prefetch goes to 'gpu' or 'cpu', not {to!r}")
        ptr = stream_pointer(stream)
        event = self._prefetch_memory(arr, to, ptr)
        self._prefetches += 1
        self._prefetched += len(host)
        return Pending(self, event)

    def advise_memory(self, host: np.ndarray, *, preferred: str | None = None,
                      read_mostly: bool | None = None) -> None:
        """Hints for ``host``'s managed memory: ``preferred`` location (``"gpu"``,
        ``"cpu"``, or ``"none"`` to clear it) and ``read_mostly`` (read copies on each
        side; a write drops them). A backend without a device records the call.

        Raises:
            InvalidArgumentError: ``host`` not a contiguous uint8 numpy array, or a hint
                value that is not one of those above.
            GPUMemoryError: the driver refused the advice.
        """
        arr = self._memory_array(_host_array(host))
        if preferred is not None and preferred not in ("gpu", "cpu", "none"):
            raise InvalidArgumentError(
                f"a preferred location is 'gpu', 'cpu' or 'none', not {preferred!r}")
        if read_mostly is not None and not isinstance(read_mostly, bool):
            raise InvalidArgumentError(f"read_mostly must be a bool, not {read_mostly!r}")
        self._advise_memory(arr, preferred, read_mostly)
        self._advices += 1

    def _memory_array(self, host: np.ndarray) -> Any:
        """The backend's array over the memory of ``host`` (the host array itself here)."""
        return host

    def _memory_view(self, arr: Any, alive: Callable[[], bool]) -> Any:
        v = arr.view()
        v.flags.writeable = False
        return v

    def _prefetch_memory(self, arr: Any, to: str, stream: int | None) -> Any:
        """Queue the prefetch; returns the event marking its end (None: finished)."""
        return None

    def _advise_memory(self, arr: Any, preferred: str | None, read_mostly: bool | None) -> None:
        return None

    # == waiting and counters ==========================================================
    def synchronize(self) -> None:
        """Block until every operation queued on this backend has finished."""
        self._synchronize()
        self._syncs += 1

    def stats(self) -> DeviceStats:
        """The backend's counters, as a frozen snapshot. O(chunks)."""
        a = self._arena
        return DeviceStats(
            location=self.location, device=self.device_name(),
            slots_in_use=len(a._live), bytes_in_use=a.bytes_in_use,
            bytes_reserved=a.bytes_reserved, chunks=a.chunk_count,
            allocations=a.allocations, frees=a.frees, deltas_applied=self._deltas,
            batches_applied=self._batches, diffs=self._diffs, syncs=self._syncs,
            bytes_h2d=self._h2d, bytes_d2h=self._d2h, bytes_d2d=self._d2d,
            bytes_prefetched=self._prefetched, prefetches=self._prefetches,
            advices=self._advices, bytes_managed_host=self._managed_host)

    def live_slots(self) -> dict[int, int]:
        """Every live slot and its size."""
        return self._arena.live_slots

    def _check(self) -> None:
        """Assert the arena's invariants (see :meth:`SlotArena._check`)."""
        self._arena._check()

    # == helpers =======================================================================
    @staticmethod
    def _offset(offset: Any) -> int:
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or offset < 0:
            raise InvalidArgumentError(f"offset must be a non-negative int, not {offset!r}")
        return int(offset)

    def _count_in(self, nbytes: int, on_device: bool) -> None:
        if on_device:
            self._d2d += nbytes
        else:
            self._h2d += nbytes

    def __repr__(self) -> str:
        a = self._arena
        return (f"{type(self).__name__}(location={self.location!r}, slots={len(a._live)}, "
                f"bytes_in_use={a.bytes_in_use})")
