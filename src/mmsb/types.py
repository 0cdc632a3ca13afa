"""Names shared by every layer: locations, edge types, event types, modes."""

from __future__ import annotations

import enum

from .errors import UnsupportedLocationError

__all__ = [
    "PageLocation",
    "EdgeType",
    "EventType",
    "PropagationMode",
    "DATA_DEPENDENCY",
    "CONTROL_DEPENDENCY",
    "GPU_SYNC_DEPENDENCY",
    "COMPILER_DEPENDENCY",
    "coerce_location",
]


class PageLocation(enum.IntEnum):
    """Where a page's bytes live."""

    CPU = 0
    GPU = 1
    UNIFIED = 2

    def __str__(self) -> str:
        return self.name.lower()


_LOCATION_NAMES = {"cpu": PageLocation.CPU, "gpu": PageLocation.GPU, "unified": PageLocation.UNIFIED}


def coerce_location(location: object) -> PageLocation:
    """Turn ``"cpu"``/``"gpu"``/``"unified"`` or a :class:`PageLocation` into a PageLocation.

    Raises:
        UnsupportedLocationError: for anything else.
    """
    if isinstance(location, PageLocation):
        return location
    if isinstance(location, str):
        found = _LOCATION_NAMES.get(location.strip().lower())
        if found is not None:
            return found
    raise UnsupportedLocationError(location)


class EdgeType(enum.IntEnum):
    """What a dependency edge parent → child means when the parent changes."""

    DATA = 0
    """The child is recomputed from its parents (its recompute function)."""
    CONTROL = 1
    """The child is marked stale (``metadata["stale"] = True``)."""
    GPU_SYNC = 2
    """A device sync of the child is scheduled (GPU_SYNC_NEEDED event); for a gpu or
    unified child its device copy is brought up to date after the pass
    (GPU_SYNC_COMPLETE event once it has landed)."""
    COMPILER = 3
    """Compiled artifacts of the child are invalidated (``metadata["ir_valid"] = False``)."""


DATA_DEPENDENCY = EdgeType.DATA
CONTROL_DEPENDENCY = EdgeType.CONTROL
GPU_SYNC_DEPENDENCY = EdgeType.GPU_SYNC
COMPILER_DEPENDENCY = EdgeType.COMPILER


class EventType(enum.IntEnum):
    """What subscribers can be told. ``data[0]`` is the page id for every page event."""

    PAGE_CREATED = 0
    """(page_id,)"""
    PAGE_DELETED = 1
    """(page_id,)"""
    PAGE_CHANGED = 2
    """(page_id, epoch, delta_id)"""
    PAGE_INVALIDATED = 3
    """(page_id, parent_id): a DATA child without a recompute function."""
    PAGE_STALE = 4
    """(page_id, parent_id)"""
    DELTA_APPLIED = 5
    """(page_id, epoch, delta_id, lsn)"""
    GPU_SYNC_NEEDED = 6
    """(page_id, parent_id)"""
    GPU_SYNC_COMPLETE = 7
    """(page_id,): a gpu or unified page's device copy holds its current bytes, after a
    GPU_SYNC edge scheduled the sync."""
    IR_INVALIDATED = 8
    """(page_id, parent_id)"""
    PAGE_RESIZED = 9
    """(page_id, old_size, new_size)"""
    PAGE_MIGRATED = 10
    """(page_id, old_location, new_location)"""
    METADATA_CHANGED = 11
    """(page_id,)"""
    EDGE_ADDED = 20
    """Change feed only (``page_id`` = the child; payload ``parent_id``, ``edge_type``)."""
    EDGE_REMOVED = 21
    """Change feed only (``page_id`` = the child; payload ``parent_id``)."""
    LOG_COMPACTED = 22
    """Change feed only: the log was rewritten by compaction (``page_id`` 0)."""
    COMPILE_START = 12
    """(page_id, name): capture of a function's or module's code artefacts begins;
    page_id is its IR page when it was captured before, else 0."""
    COMPILE_COMPLETE = 13
    """(page_id, name, world_age, changed): the artefacts are on pages; page_id is the IR
    page (or the last artefact page captured); changed is True when the code differs
    from what the pages held."""


class PropagationMode(enum.IntEnum):
    """When a change reaches the dependents of the changed page."""

    IMMEDIATE = 0
    """Propagate inside the write call, before it returns."""
    DEFERRED = 1
    """Queue the change; propagate when execute_propagation() is called."""
    BATCH = 2
    """Queue the change; propagate at the end of the enclosing batch (or execute_propagation)."""
