"""Page memory on devices: one backend interface, a host (numpy) backend, and CUDA
backends (CuPy) for device and unified memory.

The CUDA backends live in :mod:`mmsb._device.cuda`, which imports CuPy; nothing in this
package imports it unless :func:`get_backend` is asked for a usable device location.
"""

from __future__ import annotations

from .arena import SlotArena as SlotArena
from .arena import slot_class as slot_class
from .backend import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from .backend import Changes as Changes
from .backend import DeltaBatch as DeltaBatch
from .backend import DeviceBackend as DeviceBackend
from .backend import DeviceStats as DeviceStats
from .backend import Pending as Pending
from .host import HostBackend as HostBackend
from .probe import LOCATIONS as LOCATIONS
from .probe import get_backend as get_backend
from .probe import is_location_available as is_location_available
from .probe import is_unified_memory_available as is_unified_memory_available
from .probe import normalize_location as normalize_location
from .probe import unavailable_reason as unavailable_reason

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LOCATIONS",
    "Changes",
    "DeltaBatch",
    "DeviceBackend",
    "DeviceStats",
    "HostBackend",
    "Pending",
    "SlotArena",
    "get_backend",
    "is_location_available",
    "is_unified_memory_available",
    "normalize_location",
    "slot_class",
    "unavailable_reason",
]
