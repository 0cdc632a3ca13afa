"""The CUDA backends (CuPy): page slots in device memory or in managed memory.

:class:`CudaBackend` (``location="gpu"``) carves its slots out of plain device
allocations made through CuPy's allocator (``cudaMalloc`` underneath); never managed
memory. :class:`UnifiedBackend` (``location="unified"``) carves them out of managed
memory, so the CPU writes a page in place and the GPU reads it with no explicit copy,
with prefetch and advice hints, and it refuses to ask for more managed memory than the
device has free.

Kernels: a scatter (sparse deltas), a run writer, and a batch writer that applies many
deltas to many slots in one launch (each thread finds its delta by a binary search over
the per-delta value offsets). Dense deltas are one ``cudaMemcpyAsync``. A diff compares
on the device, compacts the changed positions there (``cupy.flatnonzero``) and brings
only those positions and values to the host.

All work goes to the backend's own non-blocking stream. Device inputs are ordered after
the work queued on the caller's current stream; exported views order the consumer's
stream after the backend's work (``__dlpack__(stream=...)``).

This module imports CuPy at import time; :mod:`mmsb._device.probe` imports it only
after checking that CuPy and a device are usable.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import cupy as cp
import numpy as np

from .._core.delta import sparse_enough
from ..errors import GPUMemoryError, InvalidArgumentError, InvalidDeltaError
from .backend import DEFAULT_CHUNK_SIZE, Changes, DeltaBatch, DeviceBackend, Pending
from .host import _host_bytes

__all__ = ["CudaBackend", "UnifiedBackend", "DeviceView", "ManagedView", "compile_kernels"]

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)
_CPU_DEVICE_ID = -1  # cudaCpuDeviceId
_ADVISE_SET_READ_MOSTLY = 1
_ADVISE_UNSET_READ_MOSTLY = 2
_ADVISE_SET_PREFERRED = 3
_ADVISE_UNSET_PREFERRED = 4
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_THREADS = 256

_SOURCE = r"""
typedef long long i64;

// The segment s with off[s] <= i < off[s + 1] (empty segments are skipped).
__device__ __forceinline__ i64 mmsb_segment(const i64* off, i64 nseg, i64 i) {
    i64 lo = 0, hi = nseg - 1;
    while (lo < hi) {
        i64 mid = (lo + hi + 1) >> 1;
        if (off[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void mmsb_scatter(unsigned char* __restrict__ dst,
                                        const i64* __restrict__ pos,
                                        const unsigned char* __restrict__ vals, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)blockDim.x * gridDim.x) {
        dst[pos[i]] = vals[i];
    }
}

extern "C" __global__ void mmsb_runs(unsigned char* __restrict__ dst,
                                     const i64* __restrict__ starts,
                                     const i64* __restrict__ voff, i64 nruns,
                                     const unsigned char* __restrict__ vals, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)blockDim.x * gridDim.x) {
        i64 r = mmsb_segment(voff, nruns, i);
        dst[starts[r] + (i - voff[r])] = vals[i];
    }
}

// meta holds four columns of nd entries: slot address, value offset, position offset,
// dense flag. A dense delta's k-th value goes to byte k of its slot; a sparse one's to
// pos[position offset + k].
extern "C" __global__ void mmsb_batch(const i64* __restrict__ meta, i64 nd,
                                      const i64* __restrict__ pos,
                                      const unsigned char* __restrict__ vals, i64 n) {
    const i64* addr = meta;
    const i64* voff = meta + nd;
    const i64* poff = meta + 2 * nd;
    const i64* dense = meta + 3 * nd;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)blockDim.x * gridDim.x) {
        i64 d = mmsb_segment(voff, nd, i);
        i64 k = i - voff[d];
        i64 p = dense[d] ? k : pos[poff[d] + k];
        ((unsigned char*)addr[d])[p] = vals[i];
    }
}
"""

_module: Any = None


class _MemLocation(ctypes.Structure):
    """``CUmemLocation``: a location type (1 device, 2 host) and a device ordinal."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


_LOC_DEVICE, _LOC_HOST = 1, 2
_driver_fns: Any = None


def _location_api() -> tuple[Any, Any] | None:
    """The driver's location-based prefetch and advice calls (``cuMemPrefetchAsync_v2``,
    ``cuMemAdvise_v2``, drivers of CUDA 12.2 and later), or None where absent. Under
    CUDA 13 the runtime's device-ordinal calls that CuPy wraps no longer accept the
    host as a target, so hints to the CPU go through these."""
    global _driver_fns
    if _driver_fns is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            prefetch = lib.cuMemPrefetchAsync_v2
            advise = lib.cuMemAdvise_v2
        except (OSError, AttributeError):
            _driver_fns = False
        else:
            prefetch.argtypes = [ctypes.c_uint64, ctypes.c_size_t, _MemLocation,
                                 ctypes.c_uint, ctypes.c_void_p]
            prefetch.restype = ctypes.c_int
            advise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, _MemLocation]
            advise.restype = ctypes.c_int
            _driver_fns = (prefetch, advise)
    return _driver_fns or None


def _location(dev: int) -> _MemLocation:
    return _MemLocation(_LOC_HOST, 0) if dev == _CPU_DEVICE_ID else _MemLocation(_LOC_DEVICE, dev)


def compile_kernels() -> Any:
    """The compiled kernel module (compiled once per process, then cached by CuPy)."""
    global _module
    if _module is None:
        _module = cp.RawModule(code=_SOURCE)
    return _module


def _grid(n: int, sms: int) -> tuple[int]:
    return (max(1, min(-(-n // _THREADS), sms * 32)),)


class DeviceView:
    """A read-only view of one slot on the device: no copy, no write methods.

    ``__cuda_array_interface__`` marks the data read-only; ``__dlpack__`` lets PyTorch,
    JAX or CuPy take the bytes zero-copy (DLPack itself has no read-only flag on every
    consumer: do not write through what it hands you). The view is valid while its slot
    is allocated; after the slot is freed every export is refused.
    """

    __slots__ = ("_backend", "_slot", "_gen", "_arr")

    def __init__(self, backend: CudaBackend, slot: int, arr: Any) -> None:
        self._backend = backend
        self._slot = slot
        self._gen = backend._arena.generation(slot)
        self._arr = arr

    def _live(self) -> Any:
        b = self._backend
        if not b._arena.is_live(self._slot) or b._arena.generation(self._slot) != self._gen:
            raise InvalidArgumentError("the slot under this device view was freed")
        return self._arr

    @property
    def shape(self) -> tuple[int]:
        """``(nbytes,)``."""
        return (int(self._arr.size),)

    @property
    def dtype(self) -> np.dtype:
        """uint8."""
        return np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        """Bytes in the view."""
        return int(self._arr.size)

    @property
    def size(self) -> int:
        """Bytes in the view."""
        return int(self._arr.size)

    def __len__(self) -> int:
        return int(self._arr.size)

    @property
    def ptr(self) -> int:
        """The device address of the first byte."""
        return int(self._live().data.ptr)

    @property
    def device_id(self) -> int:
        """The CUDA device index."""
        return int(self._arr.device.id)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        arr = self._live()
        return {"shape": (int(arr.size),), "typestr": "|u1", "descr": [("", "|u1")],
                "data": (int(arr.data.ptr), True), "strides": None, "version": 3,
                "stream": int(self._backend._stream.ptr)}

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None,
                   dl_device: Any = None, copy: Any = None) -> Any:
        arr = self._live()
        self._backend._order_consumer(stream)
        kwargs: dict[str, Any] = {}
        if stream is not None:
            kwargs["stream"] = stream
        if max_version is not None:
            kwargs["max_version"] = max_version
        if dl_device is not None:
            kwargs["dl_device"] = dl_device
        if copy is not None:
            kwargs["copy"] = copy
        return arr.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        dev = self._live().__dlpack_device__()
        return (int(dev[0]), int(dev[1]))

    def get(self) -> np.ndarray:
        """A host copy of the bytes."""
        self._live()
        return self._backend.copy_out(self._slot)

    def __repr__(self) -> str:
        return f"DeviceView({self.nbytes} bytes on cuda:{self.device_id}, read-only)"


class ManagedView(DeviceView):
    """A read-only device view of a unified page's bytes in the host arena's managed
    memory: the same memory the CPU writes, so never behind and never copied. Exports
    are refused once the page was deleted, resized or moved (``alive()`` says no)."""

    __slots__ = ("_alive",)

    def __init__(self, backend: CudaBackend, arr: Any, alive: Callable[[], bool]) -> None:
        self._backend = backend
        self._slot = -1
        self._gen = 0
        self._arr = arr
        self._alive = alive

    def _live(self) -> Any:
        if not self._alive():
            raise InvalidArgumentError(
                "the page under this device view was deleted, resized or moved; ask the "
                "page for a new one (device_array)")
        return self._arr

    def get(self) -> np.ndarray:
        """A host copy of the bytes."""
        with self._backend._device:
            return np.asarray(self._live().get(stream=self._backend._stream))


class _ManagedBuffer:
    """Managed memory handed to numpy: exposes the allocation through the array
    interface and keeps it alive while any array over it lives."""

    __slots__ = ("mem", "__array_interface__")

    def __init__(self, mem: Any, nbytes: int) -> None:
        self.mem = mem
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                    "data": (int(mem.ptr), False), "version": 3}


class CudaBackend(DeviceBackend):
    """Page slots in device memory on one CUDA device (plain allocations, no managed
    memory), with the delta and diff kernels on the device.

    Args:
        chunk_size: bytes of one shared arena chunk (default 64 MiB).
        device: the CUDA device index.

    Raises:
        InvalidArgumentError: ``device`` is not a device index that exists.
    """

    location = "gpu"

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, device: int = 0) -> None:
        count = cp.cuda.runtime.getDeviceCount()
        if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < count:
            raise InvalidArgumentError(
                f"device must be a CUDA device index in [0, {count}), not {device!r}")
        self._device = cp.cuda.Device(device)
        with self._device:
            self._stream = cp.cuda.Stream(non_blocking=True)
            props = cp.cuda.runtime.getDeviceProperties(device)
            self._sms = int(props["multiProcessorCount"])
            name = props["name"]
            self._name = (name.decode() if isinstance(name, bytes) else str(name))
            mod = compile_kernels()
            self._k_scatter = mod.get_function("mmsb_scatter")
            self._k_runs = mod.get_function("mmsb_runs")
            self._k_batch = mod.get_function("mmsb_batch")
        super().__init__(chunk_size)

    def device_name(self) -> str:
        return f"{self._name} (cuda:{self._device.id})"

    @property
    def stream(self) -> Any:
        """The backend's CuPy stream (non-blocking)."""
        return self._stream

    # -- memory ----------------------------------------------------------------------
    def _new_chunk(self, nbytes: int) -> Any:
        try:
            with self._device:
                arr = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=cp.cuda.alloc(nbytes))
                cp.cuda.runtime.memsetAsync(arr.data.ptr, 0, nbytes, self._stream.ptr)
        except (cp.cuda.memory.OutOfMemoryError, cp.cuda.runtime.CUDARuntimeError) as exc:
            raise GPUMemoryError(
                f"the device could not provide another {nbytes}-byte arena chunk ({exc})",
                requested_bytes=nbytes) from exc
        return arr

    def free(self, slot: int) -> None:
        """Return ``slot`` to the arena. A slot with a chunk of its own releases that
        chunk to CuPy's pool, so the work queued on the slot is waited for first.

        Raises:
            InvalidArgumentError: ``slot`` is not live.
        """
        if self._arena.size_of(slot) > self._arena.chunk_size // 4:
            self._stream.synchronize()
        super().free(slot)

    def _zero(self, chunk: Any, offset: int, nbytes: int) -> None:
        with self._device:
            cp.cuda.runtime.memsetAsync(chunk.data.ptr + offset, 0, nbytes, self._stream.ptr)

    def _slot_array(self, chunk: Any, offset: int, nbytes: int) -> Any:
        return chunk[offset : offset + nbytes]

    def _readonly_view(self, slot: int, arr: Any) -> DeviceView:
        return DeviceView(self, slot, arr)

    # -- input -----------------------------------------------------------------------
    def _device_array(self, data: Any) -> Any | None:
        """The CuPy array behind ``data`` when it lives on a CUDA device, else None."""
        if isinstance(data, DeviceView):
            return data._live()
        if isinstance(data, cp.ndarray):
            return data
        if isinstance(data, np.ndarray | bytes | bytearray | memoryview):
            return None
        if hasattr(data, "__cuda_array_interface__"):
            return cp.asarray(data)
        if hasattr(data, "__dlpack__") and hasattr(data, "__dlpack_device__"):
            if int(data.__dlpack_device__()[0]) in _DLPACK_CUDA:
                return cp.from_dlpack(data)
        return None

    def _after_caller(self) -> None:
        # Device inputs were produced on the caller's current stream: our stream waits
        # for that work before it reads them.
        cur = cp.cuda.get_current_stream()
        if cur.ptr != self._stream.ptr:
            self._stream.wait_event(cur.record())

    def _coerce(self, data: Any, what: str) -> tuple[Any, bool]:
        try:
            arr = self._device_array(data)
        except (TypeError, ValueError, BufferError, RuntimeError) as exc:
            raise InvalidDeltaError(f"{what}: could not read this {type(data).__name__} "
                                    f"as a device array ({exc})") from exc
        if arr is None:
            return np.ascontiguousarray(_host_bytes(data, what)), False
        if arr.device.id != self._device.id:
            raise InvalidDeltaError(f"{what} lives on cuda:{arr.device.id} but this backend "
                                    f"uses cuda:{self._device.id}")
        if arr.dtype.kind not in "biufc":
            raise InvalidDeltaError(f"{what} must hold bytes, not dtype {arr.dtype}")
        with self._device:
            if not arr.flags.c_contiguous:
                arr = cp.ascontiguousarray(arr)
            arr = arr.reshape(-1)
            if arr.dtype != cp.uint8:
                arr = arr.view(cp.uint8)
        self._after_caller()
        return arr, True

    def _coerce_positions(self, positions: Any, what: str) -> tuple[Any, bool]:
        try:
            arr = self._device_array(positions)
        except (TypeError, ValueError, BufferError, RuntimeError) as exc:
            raise InvalidDeltaError(f"{what}: unreadable ({exc})") from exc
        if arr is None:
            host = np.asarray(positions)
            if host.ndim != 1 or host.dtype.kind not in "iu":
                raise InvalidDeltaError(
                    f"{what} must be a one-dimensional array of integers, not "
                    f"{host.ndim}-d {host.dtype}")
            return host, False
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise InvalidDeltaError(f"{what} must be a one-dimensional array of integers, "
                                    f"not {arr.ndim}-d {arr.dtype}")
        self._after_caller()
        return arr, True

    def _coerce_mask(self, mask: Any) -> tuple[Any, bool]:
        arr = self._device_array(mask)
        m = np.asarray(mask) if arr is None else arr
        if m.ndim != 1 or m.dtype != bool:
            raise InvalidDeltaError(f"mask must be a one-dimensional bool array, not "
                                    f"{m.ndim}-d {m.dtype}")
        if arr is not None:
            self._after_caller()
        return m, arr is not None

    def _positions_ok(self, positions: Any, size: int) -> bool:
        n = len(positions)
        if not n:
            return True
        if isinstance(positions, np.ndarray):
            if positions[0] < 0 or positions[-1] >= size:
                return False
            return bool((positions[1:] > positions[:-1]).all())
        with self._device, self._stream:
            ends = positions[cp.asarray([0, n - 1])].get()
            if ends[0] < 0 or ends[1] >= size:
                return False
            return bool((positions[1:] > positions[:-1]).all().get())

    def _xp(self, arr: Any) -> Any:
        return np if isinstance(arr, np.ndarray) else cp

    def _batch_positions_ok(self, pos: Any, sparse_counts: np.ndarray,
                            sizes: np.ndarray) -> bool:
        if isinstance(pos, np.ndarray):
            return super()._batch_positions_ok(pos, sparse_counts, sizes)
        with self._device, self._stream:
            return super()._batch_positions_ok(pos, sparse_counts, sizes)

    def _upload(self, arr: Any, dtype: Any) -> Any:
        """A device array of ``arr`` (on the backend's stream; no copy if already there)."""
        if isinstance(arr, np.ndarray):
            return cp.asarray(np.ascontiguousarray(arr, dtype=dtype))
        return arr if arr.dtype == dtype else arr.astype(dtype)

    # -- copies ----------------------------------------------------------------------
    def _copy_in(self, dst: Any, src: Any, on_device: bool) -> None:
        ptr = src.data.ptr if on_device else src.ctypes.data
        with self._device:
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, ptr, len(src), _MEMCPY_DEFAULT,
                                        self._stream.ptr)

    def _copy_out(self, src: Any, out: np.ndarray | None) -> np.ndarray:
        host = np.empty(len(src), dtype=np.uint8) if out is None else out
        with self._device:
            cp.cuda.runtime.memcpyAsync(host.ctypes.data, src.data.ptr, len(src),
                                        _MEMCPY_DEFAULT, self._stream.ptr)
            self._stream.synchronize()
        return host

    def _copy_out_async(self, src: Any) -> tuple[np.ndarray, Any]:
        n = len(src)
        with self._device:
            pinned = cp.cuda.alloc_pinned_memory(max(n, 1))
            host = np.frombuffer(pinned, dtype=np.uint8, count=n)
            cp.cuda.runtime.memcpyAsync(host.ctypes.data, src.data.ptr, n, _MEMCPY_DEFAULT,
                                        self._stream.ptr)
        return host, self._record_event()

    # -- kernels ---------------------------------------------------------------------
    def _scatter(self, dst: Any, positions: Any, values: Any) -> None:
        n = len(values)
        with self._device, self._stream:
            pos = self._upload(positions, np.int64)
            vals = self._upload(values, np.uint8)
            self._k_scatter(_grid(n, self._sms), (_THREADS,), (dst, pos, vals, np.int64(n)))

    def _apply_runs(self, dst: Any, starts: np.ndarray, lengths: np.ndarray,
                    values: Any) -> None:
        n = len(values)
        voff = np.cumsum(lengths) - lengths
        with self._device, self._stream:
            table = cp.asarray(np.concatenate([starts, voff]).astype(np.int64))
            vals = self._upload(values, np.uint8)
            nr = len(starts)
            self._k_runs(_grid(n, self._sms), (_THREADS,),
                         (dst, table[:nr], table[nr:], np.int64(nr), vals, np.int64(n)))

    def _apply_masked(self, dst: Any, data: Any, mask: Any) -> None:
        with self._device, self._stream:
            cp.copyto(dst, self._upload(data, np.uint8), where=self._upload(mask, np.bool_))

    def _apply_batch(self, targets: list[tuple[Any, int]], batch: DeltaBatch,
                     values: Any, positions: Any) -> None:
        nd = len(targets)
        counts = batch.counts.astype(np.int64)
        sparse_counts = np.where(batch.dense, 0, counts)
        meta = np.empty(4 * nd, dtype=np.int64)
        meta[:nd] = [c.data.ptr + off for c, off in targets]
        meta[nd : 2 * nd] = np.cumsum(counts) - counts
        meta[2 * nd : 3 * nd] = np.cumsum(sparse_counts) - sparse_counts
        meta[3 * nd :] = batch.dense
        n = len(values)
        with self._device, self._stream:
            table = cp.asarray(meta)
            vals = self._upload(values, np.uint8)
            pos = (self._upload(positions, np.int64) if len(positions)
                   else cp.zeros(1, dtype=np.int64))
            self._k_batch(_grid(n, self._sms), (_THREADS,),
                          (table, np.int64(nd), pos, vals, np.int64(n)))

    def _diff(self, page: Any, new: Any, on_device: bool, offset: int,
              apply: bool) -> tuple[Changes | None, int, int]:
        size = len(page)
        m = len(new)
        up = 0 if on_device else m
        with self._device, self._stream:
            new_d = new if on_device else cp.asarray(new)
            cur = page[offset : offset + m]
            ne = cur != new_d
            n = int(cp.count_nonzero(ne))
            down = 8
            if n == 0:
                return None, up, down
            if sparse_enough(n, size):
                rel = cp.flatnonzero(ne)
                vals = new_d[rel].get()
                pos = rel.get().astype(np.int64)
                down += n * (1 + rel.dtype.itemsize)
                if offset:
                    pos += offset
                changes = Changes.sparse(size, pos, vals)
            else:
                if not on_device and m == size:
                    data = new.copy()
                elif on_device:
                    full = new_d if m == size else page.copy()
                    if m != size:
                        full[offset : offset + m] = new_d
                    data = full.get()
                    down += size
                else:
                    data = page.get()
                    data[offset : offset + m] = new
                    down += size
                mask: np.ndarray | None = None
                if n != size:
                    mask = np.zeros(size, dtype=bool)
                    mask[offset : offset + m] = ne.get()
                    down += m
                changes = Changes.dense(size, data, mask)
            if apply:
                cp.cuda.runtime.memcpyAsync(cur.data.ptr, new_d.data.ptr, m, _MEMCPY_DEFAULT,
                                            self._stream.ptr)
                if not on_device:
                    self._stream.synchronize()  # new_d is a temporary: let the copy land
        return changes, up, down

    def _out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, (cp.cuda.memory.OutOfMemoryError, MemoryError))

    # -- waiting ---------------------------------------------------------------------
    def _synchronize(self) -> None:
        self._stream.synchronize()

    def _record_event(self) -> Any:
        ev = cp.cuda.Event(disable_timing=True)
        ev.record(self._stream)
        return ev

    def _event_done(self, event: Any) -> bool:
        return bool(event.done)

    def _event_wait(self, event: Any) -> None:
        event.synchronize()

    def _order_consumer(self, stream: Any) -> None:
        """Make a DLPack consumer's stream wait for the work queued on ours (stream None:
        wait on the host; -1: the consumer asks for no ordering)."""
        ev = self._record_event()
        if stream is None:
            ev.synchronize()
        elif stream == -1:
            return
        else:
            ptr = {1: 0, 2: 2}.get(int(stream), int(stream))  # legacy / per-thread default
            with self._device:
                cp.cuda.runtime.streamWaitEvent(ptr, ev.ptr, 0)


class UnifiedBackend(CudaBackend):
    """Page slots in managed (unified) memory: the CPU writes a page in place and the
    GPU reads it with no explicit copy; pages migrate on touch or on a prefetch.

    ``copy_in`` of host bytes is a CPU write into managed memory (no ``cudaMemcpy``);
    ``copy_out`` is a DMA copy, so reading a page does not pull it off the GPU. Advice
    applies to whole memory pages of the host (usually 4 KiB), so slots that share one
    share its advice.

    Args:
        chunk_size: bytes of one shared arena chunk (default 64 MiB).
        device: the CUDA device index.
        reserve_bytes: device memory that must stay free beside the managed memory
            (default: the larger of 256 MiB and 1/32 of the device).
    """

    location = "unified"

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, device: int = 0,
                 reserve_bytes: int | None = None) -> None:
        super().__init__(chunk_size, device)
        if reserve_bytes is not None and (isinstance(reserve_bytes, bool)
                                          or not isinstance(reserve_bytes, int)
                                          or reserve_bytes < 0):
            raise InvalidArgumentError(
                f"reserve_bytes must be a non-negative int, not {reserve_bytes!r}")
        self._reserve = reserve_bytes

    def _malloc_managed(self, nbytes: int) -> Any:
        """A managed allocation of ``nbytes`` (a CuPy MemoryPointer), refused when it
        would leave less than the reserve of the device's free memory."""
        with self._device:
            free, total = cp.cuda.runtime.memGetInfo()
            reserve = self._reserve if self._reserve is not None else max(256 << 20, total // 32)
            if nbytes + reserve > free:
                raise GPUMemoryError(
                    f"{nbytes} bytes of managed memory would leave less than {reserve} of "
                    f"the {free} bytes the device has free; managed memory beyond free "
                    "device memory is refused", requested_bytes=nbytes)
            try:
                return cp.cuda.malloc_managed(nbytes)
            except (cp.cuda.memory.OutOfMemoryError, cp.cuda.runtime.CUDARuntimeError) as exc:
                raise GPUMemoryError(f"managed allocation failed ({exc})",
                                     requested_bytes=nbytes) from exc

    def _new_chunk(self, nbytes: int) -> Any:
        mem = self._malloc_managed(nbytes)
        with self._device:
            arr = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=mem)
            cp.cuda.runtime.memsetAsync(arr.data.ptr, 0, nbytes, self._stream.ptr)
        return arr

    # -- managed memory of the host arena ---------------------------------------------
    def managed_source(self) -> Callable[[int], np.ndarray]:
        """Managed allocations as numpy arrays, for the host arena's unified pages."""
        return self._managed_host_chunk

    def _managed_host_chunk(self, nbytes: int) -> np.ndarray:
        mem = self._malloc_managed(nbytes)
        with self._device:
            # Zero-filled, as the arena's chunks are; finished before the CPU uses it.
            cp.cuda.runtime.memsetAsync(mem.ptr, 0, nbytes, self._stream.ptr)
            self._stream.synchronize()
        self._managed_host += nbytes
        return np.asarray(_ManagedBuffer(mem, nbytes))

    def _memory_array(self, host: np.ndarray) -> Any:
        # The same bytes, addressed by the device: no copy. ``host`` is the owner, so
        # the memory outlives every array over it.
        n = len(host)
        mem = cp.cuda.UnownedMemory(int(host.ctypes.data), n, host, self._device.id)
        return cp.ndarray((n,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))

    def _memory_view(self, arr: Any, alive: Callable[[], bool]) -> ManagedView:
        return ManagedView(self, arr, alive)

    def _prefetch_memory(self, arr: Any, to: str, stream: int | None) -> Any:
        self._prefetch(arr, self._target(to), stream)
        if stream is None:
            return self._record_event()
        ev = cp.cuda.Event(disable_timing=True)
        with self._device:
            ev.record(cp.cuda.ExternalStream(stream))
        return ev

    def _advise_memory(self, arr: Any, preferred: str | None, read_mostly: bool | None) -> None:
        self._advise(arr, len(arr), preferred, read_mostly)

    def _host_array(self, dev: Any) -> np.ndarray:
        n = len(dev)
        buf = (ctypes.c_ubyte * n).from_address(int(dev.data.ptr))
        return np.ctypeslib.as_array(buf)

    def _copy_in(self, dst: Any, src: Any, on_device: bool) -> None:
        if on_device:
            super()._copy_in(dst, src, on_device)
            return
        # The CPU writes the managed bytes itself, after the device work that could
        # touch them has finished.
        self._stream.synchronize()
        self._host_array(dst)[:] = src

    def prefetch(self, slot: int, to: str = "gpu") -> Pending:
        """Migrate the slot's memory to the GPU (``to="gpu"``) or the host (``"cpu"``)
        ahead of use; returns a ticket to wait on.

        Raises:
            InvalidArgumentError: ``slot`` not live, or ``to`` not ``"gpu"``/``"cpu"``.
            GPUMemoryError: the driver refused the prefetch.
        """
        arr, size = self._array(slot)
        dst = self._target(to)
        self._prefetch(arr, dst)
        self._prefetched += size
        self._prefetches += 1
        return Pending(self, self._record_event())

    def _prefetch(self, arr: Any, dst: int, stream: int | None = None) -> None:
        api = _location_api()
        ptr = self._stream.ptr if stream is None else stream
        with self._device:
            if api is not None:
                rc = api[0](int(arr.data.ptr), len(arr), _location(dst), 0, ptr)
                if rc:
                    raise GPUMemoryError(f"the driver refused a prefetch (CUresult {rc})",
                                         requested_bytes=len(arr))
                return
            try:
                cp.cuda.runtime.memPrefetchAsync(arr.data.ptr, len(arr), dst, ptr)
            except cp.cuda.runtime.CUDARuntimeError as exc:
                raise GPUMemoryError(f"the runtime refused a prefetch ({exc})",
                                     requested_bytes=len(arr)) from exc

    def advise(self, slot: int, *, preferred: str | None = None,
               read_mostly: bool | None = None) -> None:
        """Give the driver hints for the slot: ``preferred`` location (``"gpu"``,
        ``"cpu"``, or ``"none"`` to clear it) and ``read_mostly`` (read copies on each
        side; a write drops them).

        Raises:
            InvalidArgumentError: ``slot`` not live, or a hint value that is not one of
                those above.
            GPUMemoryError: the driver refused the advice.
        """
        arr, size = self._array(slot)
        self._advise(arr, size, preferred, read_mostly)
        self._advices += 1

    def _advise(self, arr: Any, size: int, preferred: str | None,
                read_mostly: bool | None) -> None:
        calls: list[tuple[int, int]] = []
        if preferred is not None:
            if preferred == "none":
                calls.append((_ADVISE_UNSET_PREFERRED, self._device.id))
            else:
                calls.append((_ADVISE_SET_PREFERRED, self._target(preferred)))
        if read_mostly is not None:
            if not isinstance(read_mostly, bool):
                raise InvalidArgumentError(f"read_mostly must be a bool, not {read_mostly!r}")
            calls.append((_ADVISE_SET_READ_MOSTLY if read_mostly else _ADVISE_UNSET_READ_MOSTLY,
                          self._device.id))
        api = _location_api()
        with self._device:
            for advice, dev in calls:
                if api is not None:
                    rc = api[1](int(arr.data.ptr), size, advice, _location(dev))
                    if rc:
                        raise GPUMemoryError(f"the driver refused memory advice {advice} "
                                             f"(CUresult {rc})", requested_bytes=size)
                    continue
                try:
                    cp.cuda.runtime.memAdvise(arr.data.ptr, size, advice, dev)
                except cp.cuda.runtime.CUDARuntimeError as exc:
                    raise GPUMemoryError(f"memory advice refused ({exc})",
                                         requested_bytes=size) from exc

    def _target(self, to: Any) -> int:
        if to == "gpu":
            return int(self._device.id)
        if to == "cpu":
            return _CPU_DEVICE_ID
        raise InvalidArgumentError(f"a location hint must be 'gpu' or 'cpu', not {to!r}")
