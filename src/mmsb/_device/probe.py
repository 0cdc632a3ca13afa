"""Which device locations are usable here, why not, and the backend for each.

Nothing here imports CuPy at module import: the probe looks for it, imports it inside a
guard, and turns every failure into a sentence (no CuPy, CuPy broken, no driver, no
device, no managed memory, no kernel compiler). ``import mmsb`` never needs CuPy.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from typing import Any

from .._core.devices import bind_backends
from ..errors import GPUMemoryError, UnsupportedLocationError
from .backend import DeviceBackend
from .host import HostBackend

__all__ = [
    "LOCATIONS",
    "normalize_location",
    "unavailable_reason",
    "is_location_available",
    "is_unified_memory_available",
    "get_backend",
]

LOCATIONS = ("cpu", "gpu", "unified")

_ATTR_MANAGED_MEMORY = 83  # cudaDevAttrManagedMemory
_ATTR_CONCURRENT_MANAGED = 89  # cudaDevAttrConcurrentManagedAccess

_INSTALL_HINT = ("install the 'gpu' extra, or the CuPy build that matches your CUDA "
                 "(cupy-cuda12x or cupy-cuda13x)")


def normalize_location(location: Any) -> str:
    """``"cpu"``, ``"gpu"`` or ``"unified"`` from a string or a PageLocation.

    Raises:
        UnsupportedLocationError: anything else.
    """
    name = getattr(location, "name", location)
    if isinstance(name, str) and name.strip().lower() in LOCATIONS:
        return name.strip().lower()
    raise UnsupportedLocationError(location)


@lru_cache(maxsize=1)
def _cuda_reason() -> str | None:
    try:
        if importlib.util.find_spec("cupy") is None:
            return f"CuPy is not installed; {_INSTALL_HINT}"
        cp = importlib.import_module("cupy")
    except Exception as exc:  # a broken CuPy install must not break MMSB
        return f"CuPy failed to import ({type(exc).__name__}: {exc}); {_INSTALL_HINT}"
    try:
        count = int(cp.cuda.runtime.getDeviceCount())
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if "InsufficientDriver" in text or "driver" in text.lower():
            return f"no usable NVIDIA driver ({text})"
        if "NoDevice" in text or "no CUDA-capable device" in text:
            return f"no CUDA device is visible ({text})"
        return f"the CUDA runtime is not usable ({text})"
    if count == 0:
        return "no CUDA device is visible (the runtime reports 0 devices)"
    try:
        with cp.cuda.Device(0):
            cp.zeros(16, dtype=cp.uint8).sum()
    except Exception as exc:
        return f"device 0 does not run work ({type(exc).__name__}: {exc})"
    try:
        from .cuda import compile_kernels

        compile_kernels()
    except Exception as exc:
        return f"CuPy could not compile the device kernels ({type(exc).__name__}: {exc})"
    return None


@lru_cache(maxsize=1)
def _unified_reason() -> str | None:
    base = _cuda_reason()
    if base is not None:
        return base
    cp = importlib.import_module("cupy")
    try:
        managed = cp.cuda.runtime.deviceGetAttribute(_ATTR_MANAGED_MEMORY, 0)
        concurrent = cp.cuda.runtime.deviceGetAttribute(_ATTR_CONCURRENT_MANAGED, 0)
    except Exception as exc:
        return f"could not query managed-memory support ({type(exc).__name__}: {exc})"
    if not managed:
        return "device 0 does not support managed (unified) memory"
    if not concurrent:
        return ("device 0 does not allow the CPU to touch managed memory while the GPU "
                "works (no concurrent managed access), so unified pages are refused")
    return None


def unavailable_reason(location: Any) -> str | None:
    """None when pages can live at ``location`` here, else a sentence saying what is
    missing (no CuPy, no driver, no device, no managed memory …). Cached per process.

    Raises:
        UnsupportedLocationError: ``location`` is not cpu, gpu or unified.
    """
    loc = normalize_location(location)
    if loc == "cpu":
        return None
    if loc == "gpu":
        return _cuda_reason()
    return _unified_reason()


def is_location_available(location: Any) -> bool:
    """True when pages can live at ``location`` here."""
    return unavailable_reason(location) is None


def is_unified_memory_available() -> bool:
    """True when a CUDA device with concurrent managed-memory access is usable."""
    return _unified_reason() is None


def get_backend(location: Any, **options: Any) -> DeviceBackend:
    """A new backend for ``location``: :class:`HostBackend` for ``"cpu"``,
    ``CudaBackend`` for ``"gpu"``, ``UnifiedBackend`` for ``"unified"``.

    Args:
        location: ``"cpu"``, ``"gpu"``, ``"unified"`` or a PageLocation.
        options: passed to the backend (``chunk_size``; ``device`` and
            ``reserve_bytes`` for the CUDA ones).

    Raises:
        UnsupportedLocationError: an unknown location.
        GPUMemoryError: a device location that is not usable here; the message says why.
    """
    loc = normalize_location(location)
    if loc == "cpu":
        return HostBackend(**options)
    reason = unavailable_reason(loc)
    if reason is not None:
        raise GPUMemoryError(f"{loc} pages are not available here: {reason}")
    from .cuda import CudaBackend, UnifiedBackend

    return CudaBackend(**options) if loc == "gpu" else UnifiedBackend(**options)


# The engine makes the backends of its device pages through get_backend (the core does
# not import this layer, which sits above it).
bind_backends(get_backend, DeviceBackend)
