"""The host backend: page slots in numpy buffers, deltas applied with numpy.

This is the reference every device backend is checked against, and the CPU engine's
page memory. Every kernel is one vectorised numpy operation; nothing loops over bytes
in Python. Operations finish before they return, so its async tickets are done at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._core.delta import as_bytes_array, sparse_enough
from ..errors import InvalidDeltaError
from .backend import DEFAULT_CHUNK_SIZE, Changes, DeltaBatch, DeviceBackend

__all__ = ["HostBackend"]


def _host_bytes(data: Any, what: str) -> np.ndarray:
    if (not isinstance(data, np.ndarray | bytes | bytearray | memoryview)
            and hasattr(data, "__dlpack__")):
        try:
            data = np.from_dlpack(data)
        except (TypeError, ValueError, BufferError, RuntimeError) as exc:
            raise InvalidDeltaError(
                f"{what}: the host backend reads host memory only, and this "
                f"{type(data).__name__} could not be read through DLPack ({exc})") from exc
    arr = as_bytes_array(data, what)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


class HostBackend(DeviceBackend):
    """Page slots in host memory (numpy), the CPU engine's backend.

    Args:
        chunk_size: bytes of one shared arena chunk (default 64 MiB; chunks come from
            ``np.zeros``, so untouched bytes cost no resident memory).
    """

    location = "cpu"

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__(chunk_size)

    def device_name(self) -> str:
        return "host memory"

    # -- memory ----------------------------------------------------------------------
    def _new_chunk(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, dtype=np.uint8)

    def _zero(self, chunk: np.ndarray, offset: int, nbytes: int) -> None:
        chunk[offset : offset + nbytes] = 0

    def _slot_array(self, chunk: np.ndarray, offset: int, nbytes: int) -> np.ndarray:
        return chunk[offset : offset + nbytes]

    def _readonly_view(self, slot: int, arr: np.ndarray) -> np.ndarray:
        v = arr.view()
        v.flags.writeable = False
        return v

    # -- input -----------------------------------------------------------------------
    def _coerce(self, data: Any, what: str) -> tuple[np.ndarray, bool]:
        return _host_bytes(data, what), False

    def _coerce_positions(self, positions: Any, what: str) -> tuple[np.ndarray, bool]:
        arr = np.asarray(positions) if not hasattr(positions, "__dlpack__") or isinstance(
            positions, np.ndarray) else _dlpack_host(positions, what)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise InvalidDeltaError(
                f"{what} must be a one-dimensional array of integers, not "
                f"{arr.ndim}-d {arr.dtype}")
        return arr, False

    def _coerce_mask(self, mask: Any) -> tuple[np.ndarray, bool]:
        m = np.asarray(mask)
        if m.ndim != 1 or m.dtype != bool:
            raise InvalidDeltaError(f"mask must be a one-dimensional bool array, not "
                                    f"{m.ndim}-d {m.dtype}")
        return m, False

    def _positions_ok(self, positions: np.ndarray, size: int) -> bool:
        if not len(positions):
            return True
        if positions[0] < 0 or positions[-1] >= size:
            return False
        return bool((positions[1:] > positions[:-1]).all())

    # -- copies ----------------------------------------------------------------------
    def _copy_in(self, dst: np.ndarray, src: np.ndarray, on_device: bool) -> None:
        dst[:] = src

    def _copy_out(self, src: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return src.copy()
        out[:] = src
        return out

    # -- kernels ---------------------------------------------------------------------
    def _scatter(self, dst: np.ndarray, positions: np.ndarray, values: np.ndarray) -> None:
        dst[positions] = values

    def _apply_runs(self, dst: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                    values: np.ndarray) -> None:
        # Position of every run byte: its run's start plus its rank inside the run.
        first = np.cumsum(lengths) - lengths
        idx = np.repeat(starts - first, lengths) + np.arange(len(values), dtype=np.int64)
        dst[idx] = values

    def _apply_masked(self, dst: np.ndarray, data: np.ndarray, mask: np.ndarray) -> None:
        np.copyto(dst, data, where=mask)

    def _apply_batch(self, targets: list[tuple[Any, int]], batch: DeltaBatch,
                     values: np.ndarray, positions: np.ndarray) -> None:
        counts = batch.counts.astype(np.int64)
        dense = batch.dense
        n_el = len(values)
        # Slot-relative position of every value: dense deltas count 0, 1, 2 …, sparse
        # ones take the next entries of ``positions`` in order.
        voff = np.cumsum(counts) - counts
        local = np.arange(n_el, dtype=np.int64) - np.repeat(voff, counts)
        dense_el = np.repeat(dense, counts)
        local[~dense_el] = positions
        # Group deltas by chunk, then one fancy-indexed write per chunk.
        chunk_ids = np.array([id(c) for c, _ in targets], dtype=np.int64)
        offsets = np.array([o for _, o in targets], dtype=np.int64)
        absolute = local + np.repeat(offsets, counts)
        el_chunk = np.repeat(chunk_ids, counts)
        chunks = {id(c): c for c, _ in targets}
        for cid, chunk in chunks.items():
            sel = el_chunk == cid
            chunk[absolute[sel]] = values[sel]

    def _diff(self, page: np.ndarray, new: np.ndarray, on_device: bool, offset: int,
              apply: bool) -> tuple[Changes | None, int, int]:
        size = len(page)
        m = len(new)
        cur = page[offset : offset + m]
        ne = cur != new
        n = int(np.count_nonzero(ne))
        if n == 0:
            return None, 0, 0
        if sparse_enough(n, size):
            rel = np.flatnonzero(ne)
            changes = Changes.sparse(size, rel + offset, new[rel].copy())
        else:
            data = page.copy()
            data[offset : offset + m] = new
            mask: np.ndarray | None = None
            if n != size:
                mask = np.zeros(size, dtype=bool)
                mask[offset : offset + m] = ne
            changes = Changes.dense(size, data, mask)
        if apply:
            cur[:] = new
        return changes, 0, 0

    # -- waiting ---------------------------------------------------------------------
    def _synchronize(self) -> None:
        return None

    def _record_event(self) -> Any:
        return None

    def _event_done(self, event: Any) -> bool:
        return True

    def _event_wait(self, event: Any) -> None:
        return None


def _dlpack_host(obj: Any, what: str) -> np.ndarray:
    try:
        return np.from_dlpack(obj)
    except (TypeError, ValueError, BufferError, RuntimeError) as exc:
        raise InvalidDeltaError(
            f"{what}: the host backend reads host memory only ({exc})") from exc
