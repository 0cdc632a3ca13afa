"""The public calls. Each one validates fully before it
changes anything: a refused call raises a typed MMSBError and leaves state and log as
they were."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from threading import get_ident as _get_ident
from typing import Any

import numpy as np

from ._core.arena import CHUNK_MASK, CHUNK_SHIFT
from ._core.delta import Delta, delta_from_mask
from ._core.delta import merge_deltas as _merge
from ._core.devices import DeviceSync, gpu_flag_location
from ._core.devices import device_stats as _device_stats
from ._core.engine import (
    ACTIVE,
    MMSBState,
    Page,
    PageHandle,
    check_path,
    check_size,
    check_source,
    create_page,
    normalize_metadata,
    require_page_id,
    require_state,
)
from ._core.events import Subscription, describe_event, make_filter
from ._core.graph import ShadowPageGraph
from ._core.graph import compute_closure as _closure
from ._core.graph import detect_cycles as _cycles
from ._core.graph import reverse_postorder as _rpo
from ._core.monitor import Counters, MMSBStats
from ._core.page_table import LIVE
from ._core.propagation import Passthrough
from ._core.records import EdgeAdd, EdgeRemove, PageClone, PageDelete, PageMigrate, PageResize
from ._device.backend import DeviceStats, Pending, stream_pointer
from ._device.probe import is_location_available
from ._device.probe import is_unified_memory_available as is_unified_memory_available
from ._history.replay import verify_state_consistency as _verify
from ._history.stats import log_statistics as _log_statistics
from ._history.stats import row_counts as _row_counts
from ._instrument import calls as _calls
from ._instrument import manager as _instr
from ._instrument import provenance as _prov
from ._instrument.config import InstrumentationConfig
from ._replication.leader import preflight, start_leader
from ._storage.bus import BusChangedError, bus_part_at, open_bus, recover_readonly
from ._storage.checkpoint import read_checkpoint, write_checkpoint
from ._storage.pagecodec import PageImage, encode_page
from .config import MMSBConfig
from .errors import (
    InvalidArgumentError,
    InvalidDeltaError,
    MetadataError,
    PageNotFoundError,
    SerializationError,
)
from .types import (
    DATA_DEPENDENCY,
    EdgeType,
    EventType,
    PageLocation,
    PropagationMode,
    coerce_location,
)

__all__ = [
    "mmsb_start", "mmsb_stop", "open_readonly", "active", "active_state",
    "create_page", "create_pages", "update_page", "write_page", "query_page", "delete_page",
    "resize_page", "clone_page", "migrate_page", "sync_page_to_gpu", "ensure_page_on_device",
    "get_device_stats", "sync_pages_to_gpu", "sync_page_to_gpu_async", "sync_pages_to_gpu_async",
    "prefetch_to_gpu", "prefetch_to_cpu", "set_preferred_location", "set_read_mostly",
    "is_unified_memory_available",
    "set_metadata", "update_metadata",
    "create_delta", "route_delta", "batch", "apply_batch", "Batch",
    "query_log", "get_deltas_for_page", "get_deltas_in_range", "compute_log_statistics",
    "checkpoint_log", "load_checkpoint", "replay_from_checkpoint",
    "add_dependency", "remove_dependency", "get_children", "get_parents", "has_cycle",
    "topological_sort", "find_descendants", "find_ancestors",
    "register_recompute_fn", "register_passthrough_recompute",
    "propagate_change", "queue_recomputation", "schedule_propagation", "execute_propagation",
    "subscribe", "unsubscribe", "merge_deltas",
    "get_stats", "print_stats", "reset_stats", "track_delta_latency", "track_propagation_latency",
    "compute_closure", "detect_cycles", "reverse_postorder", "serialize_page",
    "clear_subscriptions", "get_subscription_count", "create_logging_subscriber",
    "create_debug_subscriber",
    "enable_instrumentation", "disable_instrumentation", "configure_instrumentation",
    "instrumentation_config", "code_pages", "refresh_code", "world_age",
    "flush_call_events", "call_events", "produced_by", "code_differences",
    "verify_state_consistency",
]

_active = ACTIVE
# The hot paths below return a PageHandle (a Page built without object.__new__'s
# argument tuple and subtype check, nor the frame of Page.__init__): see PageHandle.
_API = "api"


# -- lifecycle -------------------------------------------------------------------------

def mmsb_start(*, enable_gpu: bool | None = None, enable_instrumentation: bool = False,
               config: MMSBConfig | None = None, path: str | os.PathLike[str] | None = None,
               shared: bool = False) -> MMSBState:
    """Build a state and make it the active state.

    ``enable_gpu=None`` detects a usable CUDA device (through CuPy: see
    docs/Devices.md); ``True`` without one falls back to CPU pages with a warning, and
    gpu or unified locations are then refused with GPUMemoryError. ``path=None`` gives an in-memory state; a directory gives a durable bus
    there (created, or reopened and recovered). ``shared=True``: other processes (and
    other states) may open the same bus with ``shared=True`` and write it too; each
    changing call waits for the bus's write lock and first applies what the others
    appended. ``shared=False`` (the default) asks for exclusive use: any other writer
    gets ``BusLockedError``. With ``config.replicate_to`` (a Redis URL) the bus leads
    its followers: it claims a new term there and publishes its log (see
    docs/Replication.md); ReplicationError when it may not.
    """
    if not isinstance(shared, bool):
        raise InvalidArgumentError(f"shared must be True or False, not {shared!r}")
    if shared and path is None:
        raise InvalidArgumentError("shared=True needs a path: only a durable bus has other writers")
    if path is not None:
        check_path(path, "mmsb_start")
    import dataclasses

    if config is not None and not isinstance(config, MMSBConfig):
        raise InvalidArgumentError(f"config must be an MMSBConfig, not {type(config).__name__}")
    cfg = dataclasses.replace(config) if config is not None else MMSBConfig()
    if enable_gpu is None:
        cfg.enable_gpu = cfg.enable_gpu and is_location_available("gpu")
    elif enable_gpu:
        if not is_location_available("gpu"):
            warnings.warn("enable_gpu=True but no CUDA device is usable; pages stay on the CPU",
                          RuntimeWarning, stacklevel=2)
            cfg.enable_gpu = False
        else:
            cfg.enable_gpu = True
    else:
        cfg.enable_gpu = False
    cfg.enable_instrumentation = bool(enable_instrumentation or cfg.enable_instrumentation)
    if cfg.replicate_to is not None and (path is None or shared):
        cfg.validate()
        raise InvalidArgumentError(
            "MMSBConfig.replicate_to needs a durable bus with exclusive use (a path, "
            "shared=False): the leader is the one process that writes the log it publishes")
    if path is not None:
        if cfg.replicate_to is not None:
            cfg.validate()
            preflight(cfg.replicate_to)
        state = MMSBState(cfg, _defaults=config is None)
        open_bus(state, path, shared)
        if cfg.replicate_to is not None:
            try:
                start_leader(state, cfg.replicate_to)
            except BaseException:
                # Refused: the bus closes as it was opened, without writing anything.
                if state.bus is not None:
                    state.bus.abandon("replication could not start")
                state.close()
                raise
    else:
        state = MMSBState(cfg, _defaults=config is None)
    if cfg.enable_instrumentation:
        _instr.enable(state, InstrumentationConfig(), _ops())
    _active.set(state)
    return state


def mmsb_stop(state: MMSBState, *, checkpoint_path: str | os.PathLike[str] | None = None) -> None:
    """Optionally checkpoint, then flush and close ``state``; clears the active state if
    it is this one. Stopping a stopped state does nothing."""
    if not isinstance(state, MMSBState):
        raise InvalidArgumentError(f"mmsb_stop takes an MMSBState, not {type(state).__name__}")
    if state.closed:
        return
    with state.lock:
        state.refuse_in_batch("mmsb_stop")
    if checkpoint_path is not None:
        checkpoint_log(state, checkpoint_path)
    state.close()


def open_readonly(path: str | os.PathLike[str], config: MMSBConfig | None = None) -> MMSBState:
    """Recover a durable bus into a detached, in-memory state without writing anything:
    no lock is taken, nothing is checkpointed or cut, and a torn tail is only skipped.
    Safe beside a live writer (it sees what is on disk at that moment). Writes to the
    returned state stay in memory.

    Raises:
        InvalidArgumentError: path is not a path (or empty, or holds a NUL), or config is
            not an MMSBConfig or holds a bad value.
        SerializationError: no bus there, its ``wal`` or ``checkpoints`` is no folder (a
            file, a FIFO, a symlink), or damage the recovery mode does not tolerate.
    """
    check_path(path, "open_readonly")
    for _ in range(_READONLY_ATTEMPTS - 1):
        state = MMSBState(config)
        try:
            recover_readonly(state, path)
        except BusChangedError:
            continue  # a writer checkpointed meanwhile: list and read again
        return state
    state = MMSBState(config)
    recover_readonly(state, path)
    return state


_READONLY_ATTEMPTS = 200
"""Reads of a bus that a busy writer keeps changing, before open_readonly gives up."""


@contextlib.contextmanager
def active(state: MMSBState) -> Iterator[MMSBState]:
    """Inside the block ``active_state()`` is ``state``; after it, what it was before."""
    if not isinstance(state, MMSBState):
        raise InvalidArgumentError(f"active() takes an MMSBState, not {type(state).__name__}")
    token = _active.set(state)
    try:
        yield state
    finally:
        _active.reset(token)


def active_state() -> MMSBState | None:
    """The active state (``None`` at top level)."""
    return _active.get()


_state_of = require_state


# -- pages -----------------------------------------------------------------------------
# create_page is the core's (imported above): its common case reads the engine's log,
# arena and page table in one frame.



def create_pages(state: MMSBState, n: int, size: int | None = None, *, location: Any = "cpu",
                 metadata: dict[str, Any] | None = None, gpu: bool = False) -> list[Page]:
    """``n`` new pages in one call: one lock, one log record, one bulk allocation.
    O(n) in numpy (plus the handles returned). ``gpu=True`` is ``location="gpu"``."""
    state = _state_of(state, "create_pages")
    if gpu is not False:
        location = gpu_flag_location(gpu, location, "create_pages")
    first = state.create(n, size, location, metadata)
    return [Page(state, pid) for pid in range(first, first + int(n))]


def _split_page_args(first: Any, args: tuple[Any, ...], fn: str, nargs: int) -> tuple[MMSBState, Any, tuple[Any, ...]]:
    if isinstance(first, Page):
        if len(args) != nargs:
            raise InvalidArgumentError(f"{fn}(page, ...) takes {nargs} more argument(s)")
        return first.state, first.id, args
    if isinstance(first, MMSBState):
        if len(args) != nargs + 1:
            raise InvalidArgumentError(f"{fn}(state, page_id, ...) takes {nargs + 1} more argument(s)")
        return first, args[0], args[1:]
    raise InvalidArgumentError(f"{fn}() takes a state and a page id, or a Page, not {type(first).__name__}")


def update_page(state_or_page: MMSBState | Page, *args: Any, source: str = "api") -> Page:
    """Replace a page's whole content: ``update_page(state, page_id, data)`` or
    ``update_page(page, data)``. Logs the delta of the bytes that differ, applies it,
    propagates. Unchanged bytes: nothing logged, epoch unchanged. O(page size) compare,
    O(changed bytes) otherwise.

    Raises:
        PageNotFoundError: unknown page. InvalidDeltaError: wrong length or not bytes-like.
    """
    if type(state_or_page) is MMSBState and len(args) == 2:
        state, page_id, data = state_or_page, args[0], args[1]
        if type(page_id) is int and type(data) is bytes \
                and state.write_small_bytes(page_id, 0, data, source, True) is not None:
            page = PageHandle()
            page._state = state
            page.id = page_id
            return page
    else:
        state, page_id, (data,) = _split_page_args(state_or_page, args, "update_page", 1)
    state.write_bytes(page_id, 0, data, source, True)
    return Page(state, page_id if type(page_id) is int else state.require_page(page_id, "update_page"))


def write_page(state: MMSBState, page_id: int, offset: int, data: Any, *, source: str = "api") -> Page:
    """Write ``data`` at ``offset`` (a partial update). Only differing bytes are logged.

    Inside ``with batch(state)`` on an in-memory state, a write of ``bytes`` of at most a
    quarter of a page of at most 64 KiB (source ``"api"``) puts its bytes into the page
    and is held, without a record, until the batch ends or a call reads the log or an
    epoch: then the held writes are logged together, as the writes one by one would
    have logged them.

    Raises:
        PageNotFoundError: unknown page. InvalidDeltaError: the write runs outside the page.
    """
    if type(state) is MMSBState and type(page_id) is int and type(offset) is int \
            and type(data) is bytes:
        frame = state.batch_frame
        if frame is not None and frame.owner == _get_ident() and source is _API:
            # Held by the batch (see _BatchFrame): only what can be refused is checked
            # here (the page, the range); a page cannot change size or go inside a batch.
            entry = frame.held.get(page_id)
            if entry is None:
                entry = frame.hold_page(page_id)
            if entry is not None:
                view, page, quarter, size, slot = entry
                n = len(data)
                end = offset + n
                if n <= quarter and offset >= 0 and end <= size:
                    view[offset:end] = data
                    held = frame.writes
                    held.append(slot + offset)
                    held.append(data)
                    return page
        bus = state.bus
        if (state.write_small_bytes(page_id, offset, data, source) if bus is None
                else bus.write_small(state, page_id, offset, data, source, False)) is not None:
            page = PageHandle()
            page._state = state
            page.id = page_id
            return page
    if type(state) is not MMSBState:
        state = _state_of(state, "write_page")
    state.write_bytes(page_id, offset, data, source, False)
    return Page(state, page_id if type(page_id) is int else state.require_page(page_id, "write_page"))


def query_page(state: MMSBState, page_id: int) -> bytes:
    """A copy of the page's current bytes. O(size).

    Raises:
        PageNotFoundError: unknown page (or not a page id).
    """
    if type(state) is not MMSBState:
        state = _state_of(state, "query_page")
    with state.lock:
        # Read here rather than through a method of the state (one frame fewer a read):
        # an int id of a live page is found without the general checks of
        # require_page, which takes every other case (and raises as it does).
        t = state.table
        addr_v, size_v, _epoch_v, flags_v = t.views
        if not (type(page_id) is int and 0 < page_id < t.next_id and flags_v[page_id] & LIVE):
            page_id = state.require_page(page_id, "query_page")
        addr = addr_v[page_id]
        index = addr >> CHUNK_SHIFT
        # (The buffer's view from the arena's table, made by chunk_bytes the first time.)
        buf = state.arena.byte_views.get(index) or state.arena.chunk_bytes(index)
        off = addr & CHUNK_MASK
        return buf[off:off + size_v[page_id]].tobytes()


def delete_page(state: MMSBState, page_id: int) -> None:
    """Remove a page and its edges. Its id is never reused.

    Raises:
        PageNotFoundError: unknown page.
    """
    state = _state_of(state, "delete_page")
    state.enter()
    try:
        pid = state.require_page(page_id, "delete_page")
        state.commit(PageDelete(pid))
        state.emit(EventType.PAGE_DELETED, pid)
    finally:
        state.leave()


def resize_page(state: MMSBState, page_id: int, new_size: int) -> Page:
    """Give a page a new size: the common prefix is kept, growth is zero-filled, the
    epoch is unchanged. The bytes move to a new slot. O(size)."""
    state = _state_of(state, "resize_page")
    size = check_size(new_size, "new size")
    state.enter()
    try:
        pid = state.require_page(page_id, "resize_page")
        old = int(state.table.size[pid])
        if old != size:
            state.commit(PageResize(pid, size))
            state.rehome(pid)  # a unified page's new slot: into managed memory
            state.emit(EventType.PAGE_RESIZED, pid, old, size)
        return Page(state, pid)
    finally:
        state.leave()


def clone_page(state: MMSBState, page_id: int) -> Page:
    """A new page (new id) with the same bytes, epoch, metadata and location."""
    state = _state_of(state, "clone_page")
    state.enter()
    try:
        src = state.require_page(page_id, "clone_page")
        state.check_room(1, int(state.table.size[src]))
        new_id = state.table.next_id
        state.commit(PageClone(new_id, src))
        state.rehome(new_id)  # a unified clone: into managed memory
        state.emit(EventType.PAGE_CREATED, new_id)
        return Page(state, new_id)
    finally:
        state.leave()


def migrate_page(state: MMSBState, page_id: int, location: Any) -> Page:
    """Move a page between CPU / GPU / unified memory: same id, same bytes, same epoch,
    one logged PageMigrate (replay moves it too). A move to a device copies the page's
    bytes into a new device slot (taken before anything is logged); a move off a device
    frees its device copy. The host mirror stays where it is.

    Raises:
        PageNotFoundError; UnsupportedLocationError, GPUMemoryError: as for create_page.
    """
    state = _state_of(state, "migrate_page")
    return Page(state, state.migrate(page_id, location))


def sync_page_to_gpu(state: MMSBState, page_id: int) -> bool:
    """Bring a gpu or unified page's device copy up to date from its host mirror (writes
    through the compiled small-write path, batches and resizes leave it behind), and
    wait until it has landed. Returns True if bytes were copied, False if the copy was
    current. There is no ``sync_page_to_cpu``: the host mirror is never behind.

    Raises:
        PageNotFoundError; InvalidArgumentError: a cpu page; GPUMemoryError: the page's
        location is not usable here, or out of device memory.
    """
    state = _state_of(state, "sync_page_to_gpu")
    return bool(state.sync_to_device([page_id], "sync_page_to_gpu"))


def sync_pages_to_gpu(state: MMSBState, page_ids: Iterable[Any]) -> list[int]:
    """``sync_page_to_gpu`` for many pages at once: the stale device copies of each
    backend are written as one batch (one upload, one launch), then waited for. Returns
    the ids of the pages whose bytes were copied (unified pages in managed memory never
    need a copy). All pages are checked before anything is copied.

    Raises:
        PageNotFoundError; InvalidArgumentError: a cpu page, or ``page_ids`` not an
        iterable; GPUMemoryError: a location not usable here, or out of device memory.
    """
    state = _state_of(state, "sync_pages_to_gpu")
    return state.sync_to_device(_page_list(page_ids, "sync_pages_to_gpu"), "sync_pages_to_gpu")


def sync_page_to_gpu_async(state: MMSBState, page_id: int) -> DeviceSync:
    """``sync_page_to_gpu`` queued on the backend's stream without waiting: returns a
    handle whose ``wait()`` blocks until the copy has landed (and returns the ids of the
    pages copied) and whose ``done()`` says whether it has. Device uses after this call
    are ordered after the copy (same stream); a consumer on another stream waits for
    the handle, or takes the page through ``device_array`` (ordered by DLPack).

    Raises:
        as sync_page_to_gpu.
    """
    state = _state_of(state, "sync_page_to_gpu_async")
    return state.sync_to_device_async([page_id], "sync_page_to_gpu_async")


def sync_pages_to_gpu_async(state: MMSBState, page_ids: Iterable[Any]) -> DeviceSync:
    """``sync_pages_to_gpu`` without waiting: one handle for every backend's batch.

    Raises:
        as sync_pages_to_gpu.
    """
    state = _state_of(state, "sync_pages_to_gpu_async")
    return state.sync_to_device_async(_page_list(page_ids, "sync_pages_to_gpu_async"),
                                      "sync_pages_to_gpu_async")


def _page_list(page_ids: Any, fn: str) -> list[Any]:
    if isinstance(page_ids, str | bytes) or not isinstance(page_ids, Iterable):
        raise InvalidArgumentError(f"{fn}() takes an iterable of page ids, not {page_ids!r}")
    return list(page_ids)


def prefetch_to_gpu(state: MMSBState, page_id: int, *, stream: Any = None) -> Pending:
    """Migrate a unified page's managed memory to the GPU ahead of use
    (``cudaMemPrefetchAsync``), queued on ``stream`` (a CuPy stream, a raw stream
    pointer, or None: the unified backend's stream); returns a ticket (``wait()``,
    ``done()``). A hint: the page's bytes are correct on either side without it.

    Raises:
        PageNotFoundError; InvalidArgumentError: not a unified page, or ``stream`` not
        a stream; GPUMemoryError: the unified location is not usable here, has no
        managed memory, or the driver refused the prefetch.
    """
    state = _state_of(state, "prefetch_to_gpu")
    stream_pointer(stream)  # refused before anything is looked at
    return state.unified_hint(page_id, "prefetch_to_gpu", prefetch="gpu", stream=stream)


def prefetch_to_cpu(state: MMSBState, page_id: int, *, stream: Any = None) -> Pending:
    """``prefetch_to_gpu`` towards host memory, ahead of CPU reads and writes.

    Raises:
        as prefetch_to_gpu.
    """
    state = _state_of(state, "prefetch_to_cpu")
    stream_pointer(stream)
    return state.unified_hint(page_id, "prefetch_to_cpu", prefetch="cpu", stream=stream)


def set_preferred_location(state: MMSBState, page_id: int, location: str | None) -> None:
    """Advise the driver where a unified page's managed memory should live
    (``cudaMemAdviseSetPreferredLocation``): ``"gpu"``, ``"cpu"``, or None to clear the
    advice. Advice covers whole memory pages of the system (usually 4 KiB), so unified
    pages sharing one share it.

    Raises:
        PageNotFoundError; InvalidArgumentError: not a unified page, or a location
        other than those; GPUMemoryError: as for prefetch_to_gpu.
    """
    state = _state_of(state, "set_preferred_location")
    if location is not None and location not in ("gpu", "cpu"):
        raise InvalidArgumentError(
            f"set_preferred_location() takes 'gpu', 'cpu' or None, not {location!r}")
    state.unified_hint(page_id, "set_preferred_location",
                       preferred="none" if location is None else location)


def set_read_mostly(state: MMSBState, page_id: int, enabled: bool) -> None:
    """Advise the driver that a unified page is mostly read
    (``cudaMemAdviseSetReadMostly``; ``False`` unsets it): the CPU and the GPU then
    each read a copy of it, and a write drops the other side's copy.

    Raises:
        PageNotFoundError; InvalidArgumentError: not a unified page, or ``enabled``
        not a bool; GPUMemoryError: as for prefetch_to_gpu.
    """
    state = _state_of(state, "set_read_mostly")
    if not isinstance(enabled, bool):
        raise InvalidArgumentError(f"set_read_mostly() takes True or False, not {enabled!r}")
    state.unified_hint(page_id, "set_read_mostly", read_mostly=enabled)


def ensure_page_on_device(state: MMSBState, page_id: int, location: Any = None) -> Page:
    """Make a page a device page with a current device copy, in one call: a cpu page is
    migrated (logged) to ``location`` (``None``: ``"gpu"``); a device page is migrated
    when ``location`` names another device location, and stays otherwise; then its
    device copy is brought up to date and waited for (as ``sync_page_to_gpu``).

    Raises:
        PageNotFoundError; UnsupportedLocationError; InvalidArgumentError:
        ``location="cpu"``; GPUMemoryError: as for migrate_page and sync_page_to_gpu
        (a refused migration changes nothing).
    """
    state = _state_of(state, "ensure_page_on_device")
    want = None if location is None else coerce_location(location)
    if want is PageLocation.CPU:
        raise InvalidArgumentError(
            "ensure_page_on_device() puts a page on a device: give 'gpu', 'unified' or None")
    state.enter()
    try:
        pid = state.require_page(page_id, "ensure_page_on_device")
        here = PageLocation(int(state.table.loc[pid]))
        if here is PageLocation.CPU or (want is not None and want is not here):
            state.migrate(pid, want if want is not None else PageLocation.GPU)
        state.sync_to_device([pid], "ensure_page_on_device")
        return Page(state, pid)
    finally:
        state.leave()


def get_device_stats(state: MMSBState) -> dict[str, DeviceStats]:
    """The counters of each device backend the state has made (location name →
    :class:`mmsb._device.DeviceStats`: slots, bytes, copies each way, applies, diffs,
    syncs). ``DeviceStats.device`` names the memory the backend really uses. Empty
    before the first device page."""
    state = _state_of(state, "get_device_stats")
    state.settle()
    with state.lock:
        return _device_stats(state)


def set_metadata(state: MMSBState, page_id: int, key: str, value: Any) -> Page:
    """Set one metadata entry (logged; replayable). ``value`` must be msgpack-encodable.

    Raises:
        MetadataError: ``key`` is not a str, or ``value`` cannot be stored (nothing
            changes).
    """
    if not isinstance(key, str):
        raise MetadataError(f"metadata keys must be str, not {key!r}")
    return update_metadata(state, page_id, {key: value})


def update_metadata(state: MMSBState, page_id: int, mapping: dict[str, Any], *,
                    replace: bool = False) -> Page:
    """Merge ``mapping`` into a page's metadata (or replace it whole), as one logged change.

    Raises:
        MetadataError: keys not str, values msgpack cannot encode, or beyond the bounds
            every reader accepts (16 MiB encoded, 2**20 items per list or map, nesting
            64 deep); nothing is logged then.
    """
    state = _state_of(state, "update_metadata")
    state.enter()
    try:
        pid = state.require_page(page_id, "update_metadata")
        new = {} if replace else dict(state.table.meta.get(pid, {}))
        new.update(normalize_metadata(mapping, pid))
        if not replace:
            new = normalize_metadata(new, pid)  # the merged whole must stay in bounds too
        state.commit_metadata(pid, new)
        return Page(state, pid)
    finally:
        state.leave()


# -- deltas ----------------------------------------------------------------------------

def create_delta(state: MMSBState, page_id: int, mask: Any, data: Any, source: str = "api") -> Delta:
    """A delta for ``page_id`` (not yet applied): positions where ``mask`` is true take
    ``data``'s bytes. Built on the page's current epoch; its epoch is ``epoch + 1``.

    Raises:
        PageNotFoundError; InvalidDeltaError: mask and data lengths differ from each
        other or from the page.
    """
    state = _state_of(state, "create_delta")
    check_source(source)
    state.settle()
    with state.lock:
        pid = state.require_page(page_id, "create_delta")
        t = state.table
        d = delta_from_mask(0, pid, int(t.epoch[pid]), int(t.size[pid]), mask, data, source)
        d.id = state.new_delta_id()
        return d


def route_delta(state: MMSBState, delta: Delta) -> Page:
    """Validate (page exists, sizes, ``base_epoch == page.epoch``), log, apply,
    propagate and announce ``delta``.

    Raises:
        PageNotFoundError; InvalidDeltaError: size or epoch conflict (a lost update).
    """
    state = _state_of(state, "route_delta")
    if not isinstance(delta, Delta):
        raise InvalidDeltaError(f"route_delta takes a Delta, not {type(delta).__name__}")
    state.route(delta)
    return Page(state, delta.page_id)


def merge_deltas(d1: Delta, d2: Delta) -> Delta:
    """One delta equal to ``d1`` then ``d2`` (``d2`` wins where both write), spanning
    ``d1.base_epoch`` → ``d2.epoch``."""
    if not isinstance(d1, Delta) or not isinstance(d2, Delta):
        raise InvalidDeltaError("merge_deltas takes two Delta objects")
    return _merge(d1, d2)


class Batch:
    """The handle a ``batch`` block gives: shorthand for writes into its state."""

    def __init__(self, state: MMSBState) -> None:
        self.state = state

    def write(self, page_id: int, offset: int, data: Any, *, source: str = "api") -> None:
        """Write ``data`` at ``offset`` (as write_page)."""
        write_page(self.state, page_id, offset, data, source=source)

    def update(self, page_id: int, data: Any, *, source: str = "api") -> None:
        """Replace a page's content (as update_page)."""
        self.state.write_bytes(page_id, 0, data, source, True)


@contextlib.contextmanager
def batch(state: MMSBState) -> Iterator[Batch]:
    """Group writes as one unit: ``with batch(state) as b: ...``.

    Inside the block, ``write_page``/``update_page``/``route_delta`` (and ``b.write``)
    apply at once and are visible to reads, but their log records are appended together
    when the block ends, followed by one propagation pass and one event burst. If the
    block raises (a refused write included), every write it made is undone: state and
    log are as before. Structural changes (create, delete, resize, edges …) are refused
    inside a batch. Other threads wait until the block ends.
    """
    state = _state_of(state, "batch")
    b = Batch(state)
    state.enter()
    ok = False
    try:
        state.begin_batch()
        try:
            yield b
            ok = True
        finally:
            state.end_batch(ok)
    finally:
        state.leave()


def apply_batch(state: MMSBState, writes: Iterable[tuple[int, int, Any]], *,
                source: str = "api") -> int:
    """Apply many ``(page_id, offset, bytes)`` writes as one group: one lock, every
    write checked before any is applied, then one propagation pass and one event
    burst. The log and every replay are the same as for the writes done one by one.
    Returns the number of deltas logged. O(total bytes written).

    Raises:
        PageNotFoundError, InvalidDeltaError: for the first bad write; nothing applied.
    """
    from ._core.batching import run_batch

    state = _state_of(state, "apply_batch")
    if not isinstance(writes, Iterable) or isinstance(writes, str | bytes):
        raise InvalidArgumentError(
            f"apply_batch() takes an iterable of (page_id, offset, bytes), not {type(writes).__name__}")
    return run_batch(state, writes, source)


# -- log -------------------------------------------------------------------------------

def query_log(state: MMSBState, *, page_id: int | None = None, start_time: int | None = None,
              end_time: int | None = None, source: str | None = None) -> list[Delta]:
    """Retained deltas matching every given filter (times in ns, inclusive), in log
    order. O(matching page's deltas) with ``page_id``, else O(log)."""
    state = _state_of(state, "query_log")
    if page_id is not None:
        page_id = require_page_id(page_id, "query_log")
    if source is not None and not isinstance(source, str):
        raise InvalidArgumentError(f"query_log(): source must be a str, not {type(source).__name__}")
    for name, value in (("start_time", start_time), ("end_time", end_time)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidArgumentError(f"query_log(): {name} must be an int of nanoseconds, not {value!r}")
    state.settle()
    with state.lock:
        log = state.log
        pool = log.by_page.get(page_id, []) if page_id is not None else log.deltas
        return [d for d in pool
                if (start_time is None or d.timestamp >= start_time)
                and (end_time is None or d.timestamp <= end_time)
                and (source is None or d.source == source)]


def get_deltas_for_page(state: MMSBState, page_id: int) -> list[Delta]:
    """The retained deltas of one page, in log order. O(its deltas)."""
    state = _state_of(state, "get_deltas_for_page")
    page_id = require_page_id(page_id, "get_deltas_for_page")
    state.settle()
    with state.lock:
        return list(state.log.by_page.get(page_id, []))


def get_deltas_in_range(state: MMSBState, start: int, stop: int) -> list[Delta]:
    """Retained deltas ``start:stop`` (0-based, half-open, like a slice)."""
    state = _state_of(state, "get_deltas_in_range")
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgumentError(f"{name} must be an int, not {v!r}")
    state.settle()
    with state.lock:
        return state.log.deltas[start:stop]


def compute_log_statistics(state: MMSBState) -> dict[str, Any]:
    """``total_deltas``, ``bytes_changed``, ``sources`` (source → count), ``pages``
    (page id → delta count), ``records``, ``first_lsn``/``last_lsn``, ``sparse_deltas``,
    ``payload_bytes``."""
    state = _state_of(state, "compute_log_statistics")
    state.settle()
    with state.lock:
        # Over the log's columns (numpy), not one Delta object per row.
        return _log_statistics(state.log)


def checkpoint_log(state: MMSBState, path: str | os.PathLike[str]) -> int:
    """Write pages (bytes, epochs, metadata, locations), graph and log to one file
    (atomically, fsynced). Returns its size in bytes.

    Raises:
        InvalidArgumentError: path is not a path, or lies in a bus directory's own
            entries (its BUS, LOCK or WRITE file, or its checkpoints, wal or map folder),
            where the file would break that bus.
        SerializationError: the file cannot be written (nothing is left of it).
    """
    import time

    state = _state_of(state, "checkpoint_log")
    check_path(path, "checkpoint_log")
    part = bus_part_at(path)
    if part is not None:
        raise InvalidArgumentError(
            f"checkpoint_log() would write {path} {part}, which would break that bus; "
            "export to a path outside its own files and folders")
    with state.lock:
        state.refuse_in_batch("checkpoint_log")
        t0 = time.perf_counter_ns()
        try:
            size = write_checkpoint(state, path)
        except OSError as exc:
            raise SerializationError(f"cannot write the checkpoint ({exc.strerror})", path=path) from None
        state.counters.checkpoint.add(time.perf_counter_ns() - t0)
        return size


def load_checkpoint(state: MMSBState, path: str | os.PathLike[str], *,
                    keep_device_locations: bool = False) -> MMSBState:
    """Replace ``state``'s pages, graph and log with a checkpoint's. The file is read
    and checked in full first: on any damage nothing changes.

    Gpu and unified pages are loaded with their locations (device copies are made on
    their next device use); where a location is not usable, see
    ``MMSBConfig.restore_device_pages_on_cpu``; ``keep_device_locations=True`` loads
    them with their locations all the same, for reading the file (their device uses are
    then refused where the location is not usable; not on a durable bus).

    Raises:
        SerializationError: bad magic, version, truncation, checksum mismatch.
        GPUMemoryError: device pages whose location is not usable here (or a durable
            bus), without ``restore_device_pages_on_cpu``; nothing changed.
    """
    state = _state_of(state, "load_checkpoint")
    check_path(path, "load_checkpoint")
    if not isinstance(keep_device_locations, bool):
        raise InvalidArgumentError(
            f"keep_device_locations must be True or False, not {keep_device_locations!r}")
    with state.lock:
        state.refuse_in_batch("load_checkpoint")
    # Read privately: the state may keep the buffer's pages and log payload (restored
    # once, below) instead of copying them.
    ck = read_checkpoint(path, private=True)
    state.enter()
    try:
        state.refuse_in_batch("load_checkpoint")
        moved = state.restore_locations(ck, keep_device_locations)
        bus = state.bus
        if bus is not None:
            bus.before_restore(state)
        # What to put back if the bus cannot follow (a state without one has no step
        # after the restore that could fail).
        before = state.swap_snapshot() if bus is not None else {}
        try:
            state.restore(ck)
        except MemoryError:
            raise SerializationError("the checkpoint describes a state larger than the memory "
                                     "this process may use", path=path) from None
        if state.bus is not None:
            try:
                state.bus.after_restore(state)
            except BaseException:
                for name, value in before.items():
                    setattr(state, name, value)
                state.graph._owner = weakref.ref(state)
                raise
        for pid in moved:
            # restore_device_pages_on_cpu: their location is not usable here.
            state.commit(PageMigrate(pid, int(PageLocation.CPU)))
            state.emit(EventType.PAGE_MIGRATED, pid, PageLocation(int(ck.locs[
                int(np.searchsorted(ck.ids, pid))])), PageLocation.CPU)
    finally:
        state.leave()
    return state


def replay_from_checkpoint(path: str | os.PathLike[str], target_epoch: int | None = None,
                           *, config: MMSBConfig | None = None) -> MMSBState:
    """A new state from a checkpoint file; with ``target_epoch``, its per-page epoch
    cut (replay_to_epoch) instead."""
    from ._history.replay import replay_to_epoch

    check_path(path, "replay_from_checkpoint")
    state = MMSBState(config)
    load_checkpoint(state, path)
    if target_epoch is None:
        return state
    return replay_to_epoch(state, target_epoch)


# -- graph -----------------------------------------------------------------------------

def _resolve(obj: Any, fn: str) -> tuple[MMSBState, ShadowPageGraph]:
    if isinstance(obj, MMSBState):
        return obj, obj.graph
    if isinstance(obj, ShadowPageGraph):
        owner = obj.owner
        if owner is None:
            raise InvalidArgumentError(f"{fn}(): this graph belongs to no state")
        return owner, obj
    raise InvalidArgumentError(f"{fn}() takes a state or its graph, not {type(obj).__name__}")


def _edge_type(edge_type: Any) -> EdgeType:
    try:
        return EdgeType(edge_type)
    except (ValueError, TypeError):
        raise InvalidArgumentError(f"edge_type must be an EdgeType, not {edge_type!r}") from None


def add_dependency(graph_or_state: MMSBState | ShadowPageGraph, parent_id: int, child_id: int,
                   edge_type: EdgeType = DATA_DEPENDENCY) -> None:
    """Add the edge parent → child (logged). An existing edge takes the new type.
    O(edges reachable from the child) for the cycle check.

    Raises:
        PageNotFoundError: unknown page. GraphCycleError: the edge would close a cycle
        (self-edges included); the graph is unchanged.
    """
    state, graph = _resolve(graph_or_state, "add_dependency")
    et = _edge_type(edge_type)
    state.enter()
    try:
        p = state.require_page(parent_id, "add_dependency")
        c = state.require_page(child_id, "add_dependency")
        graph.check_edge(p, c)
        if graph.children.get(p, {}).get(c) is not et:
            state.commit(EdgeAdd(p, c, int(et)))
    finally:
        state.leave()


def remove_dependency(graph_or_state: MMSBState | ShadowPageGraph, parent_id: int, child_id: int) -> None:
    """Remove the edge parent → child (logged).

    Raises:
        PageNotFoundError: unknown page or no such edge.
    """
    state, graph = _resolve(graph_or_state, "remove_dependency")
    state.enter()
    try:
        p = state.require_page(parent_id, "remove_dependency")
        c = state.require_page(child_id, "remove_dependency")
        if not graph.has_edge(p, c):
            raise PageNotFoundError(c, f"remove_dependency (no edge {p} → {c})")
        state.commit(EdgeRemove(p, c))
    finally:
        state.leave()


def _g(obj: Any, fn: str) -> ShadowPageGraph:
    if isinstance(obj, MMSBState):
        return obj.graph
    if isinstance(obj, ShadowPageGraph):
        return obj
    raise InvalidArgumentError(f"{fn}() takes a state or its graph, not {type(obj).__name__}")


def get_children(graph: ShadowPageGraph | MMSBState, page_id: int) -> list[tuple[int, EdgeType]]:
    """``(child_id, edge_type)`` pairs of ``page_id``."""
    return _g(graph, "get_children").get_children(require_page_id(page_id, "get_children"))


def get_parents(graph: ShadowPageGraph | MMSBState, page_id: int) -> list[tuple[int, EdgeType]]:
    """``(parent_id, edge_type)`` pairs of ``page_id``."""
    return _g(graph, "get_parents").get_parents(require_page_id(page_id, "get_parents"))


def has_cycle(graph: ShadowPageGraph | MMSBState) -> bool:
    """True if the graph holds a cycle. O(V + E)."""
    return _g(graph, "has_cycle").has_cycle()


def topological_sort(graph: ShadowPageGraph | MMSBState) -> list[int]:
    """Ids with edges, parents before children, ties by id. O(V log V + E)."""
    return _g(graph, "topological_sort").topological_sort()


def find_descendants(graph: ShadowPageGraph | MMSBState, page_id: int) -> set[int]:
    """Every page reachable from ``page_id``."""
    return _g(graph, "find_descendants").find_descendants(require_page_id(page_id, "find_descendants"))


def find_ancestors(graph: ShadowPageGraph | MMSBState, page_id: int) -> set[int]:
    """Every page from which ``page_id`` is reachable."""
    return _g(graph, "find_ancestors").find_ancestors(require_page_id(page_id, "find_ancestors"))


# -- propagation -----------------------------------------------------------------------

def register_recompute_fn(state: MMSBState, page_id: int, fn: Callable[[MMSBState, Page], Any]) -> None:
    """``fn(state, page) -> bytes`` recomputes ``page`` when a DATA parent changes. Its
    result is logged as a delta (source ``"propagation"``), so replay never calls it.
    ``fn`` may read any page but change nothing: a change made from inside it raises
    InvalidArgumentError there (surfacing as the PropagationError's cause). Functions
    are code: they are not saved; register them again after a reload.

    Raises:
        PageNotFoundError: unknown page.
        InvalidArgumentError: ``fn`` is not callable.
    """
    state = _state_of(state, "register_recompute_fn")
    if not callable(fn):
        raise InvalidArgumentError(f"recompute fn must be callable, not {type(fn).__name__}")
    with state.lock:
        pid = state.require_page(page_id, "register_recompute_fn")
        state.recompute_fns[pid] = fn
    mgr = _instr.manager_of(state)
    if mgr is not None:
        mgr.link_recompute(state, pid, fn)


def register_passthrough_recompute(state: MMSBState, target_id: int, source_id: int,
                                   transform: Callable[[bytes], Any] | None = None) -> None:
    """Make ``target`` become ``transform(source bytes)`` (identity by default) whenever it
    is recomputed. Does not add the edge: use add_dependency(state, source, target)."""
    state = _state_of(state, "register_passthrough_recompute")
    if transform is not None and not callable(transform):
        raise InvalidArgumentError("transform must be callable")
    with state.lock:
        src = state.require_page(source_id, "register_passthrough_recompute")
        state.require_page(target_id, "register_passthrough_recompute")

    register_recompute_fn(state, target_id, Passthrough(src, transform))


def propagate_change(state: MMSBState, page_id: int | Iterable[int],
                     mode: PropagationMode = PropagationMode.IMMEDIATE) -> None:
    """Bring the dependents of ``page_id`` (or several ids) up to date: now
    (IMMEDIATE), or queue them (DEFERRED, BATCH) for execute_propagation()."""
    state = _state_of(state, "propagate_change")
    try:
        mode = PropagationMode(mode)
    except ValueError:
        raise InvalidArgumentError(f"mode must be a PropagationMode, not {mode!r}") from None
    if isinstance(page_id, int | np.integer | Page):
        ids = [page_id]
    elif isinstance(page_id, Iterable) and not isinstance(page_id, str | bytes):
        ids = list(page_id)
    else:
        raise InvalidArgumentError(
            f"propagate_change(): page_id must be a page id or ids, not {type(page_id).__name__}")
    state.enter()
    try:
        pids = {state.require_page(p, "propagate_change") for p in ids}
        if mode is PropagationMode.IMMEDIATE and not state.batch_depth:
            state.propagate(pids)
        else:
            state.pending.update(pids)
    finally:
        state.leave()


def queue_recomputation(state: MMSBState, page_id: int) -> None:
    """Queue ``page_id`` itself to be recomputed (with its recompute function) by the
    next execute_propagation(); its dependents follow if its bytes change. Queuing a
    page twice recomputes it once."""
    state = _state_of(state, "queue_recomputation")
    with state.lock:
        state.forced.add(state.require_page(page_id, "queue_recomputation"))


def schedule_propagation(state: MMSBState, page_ids: Iterable[int]) -> None:
    """Queue several pages' dependents for the next execute_propagation().

    Raises:
        InvalidArgumentError: page_ids is not an iterable of page ids.
        PageNotFoundError: one of them is not a live page (nothing is queued).
    """
    propagate_change(state, _page_list(page_ids, "schedule_propagation"),
                     PropagationMode.DEFERRED)


def _flush_pending(state: MMSBState) -> None:
    pending = {p for p in state.pending if state.table.is_live(p)}
    forced = frozenset(p for p in state.forced if state.table.is_live(p))
    state.pending.clear()
    state.forced.clear()
    if pending or forced:
        state.propagate(pending, forced)


def execute_propagation(state: MMSBState) -> int:
    """Run every queued propagation and recomputation now, as one topological pass.
    Returns how many queued pages it covered."""
    state = _state_of(state, "execute_propagation")
    state.enter()
    try:
        n = len(state.pending | state.forced)
        _flush_pending(state)
        return n
    finally:
        state.leave()


# -- events ----------------------------------------------------------------------------

def subscribe(state: MMSBState, event_type: EventType, handler: Callable[..., Any],
              filter: Any = None) -> Subscription:
    """Call ``handler(state, event_type, *data)`` for each event of that type on this
    state, after the change is complete. ``filter``: a page id, ids, or a predicate
    ``f(event_type, *data) -> bool``."""
    state = _state_of(state, "subscribe")
    try:
        et = EventType(event_type)
    except (ValueError, TypeError):
        raise InvalidArgumentError(f"event_type must be an EventType, not {event_type!r}") from None
    if not callable(handler):
        raise InvalidArgumentError(f"handler must be callable, not {type(handler).__name__}")
    sub = Subscription(et, handler, make_filter(filter), owner=id(state))
    with state.lock:
        state.events.add(sub)
    return sub


def unsubscribe(state: MMSBState, sub: Subscription) -> bool:
    """Stop delivering to ``sub``. Returns False if it was not subscribed here."""
    state = _state_of(state, "unsubscribe")
    if not isinstance(sub, Subscription):
        raise InvalidArgumentError(f"unsubscribe takes a Subscription, not {type(sub).__name__}")
    with state.lock:
        return state.events.remove(sub)


# -- monitoring ------------------------------------------------------------------------

def get_stats(state: MMSBState) -> MMSBStats:
    """A frozen snapshot of sizes, counters and latency percentiles."""
    state = _state_of(state, "get_stats")
    state.settle()
    with state.lock:
        state.count_creations()  # another thread's, since the settle
        t = state.table
        live = t.live_ids()
        locs = np.bincount(t.loc[live], minlength=3) if live.size else np.zeros(3, np.int64)
        c = state.counters
        a = state.arena
        deltas = state.log.deltas
        delta_bytes = int(_row_counts(state.log).sum())
        page_bytes = int(t.size[live].sum()) if live.size else 0
        loc_bytes = (np.bincount(t.loc[live], weights=t.size[live], minlength=3).astype(np.int64)
                     if live.size else np.zeros(3, np.int64))
        devices = _device_stats(state)
        copies = state.devices
        carved = a.bytes_in_use + a.bytes_free_listed + a.bytes_tail_waste
        da50, da90, da99 = c.delta_apply.percentiles()
        pr50, pr90, pr99 = c.propagation.percentiles()
        la50, la90, la99 = c.log_append.percentiles()
        ck50, ck90, ck99 = c.checkpoint.percentiles()
        g = state.graph
        return MMSBStats(
            total_pages=int(live.size), cpu_pages=int(locs[0]), gpu_pages=int(locs[1]),
            unified_pages=int(locs[2]), total_page_bytes=page_bytes,
            total_deltas=len(deltas), total_delta_bytes=delta_bytes,
            avg_delta_bytes=delta_bytes / len(deltas) if deltas else 0.0,
            graph_nodes=len(g.nodes), graph_edges=g.edge_count, graph_max_depth=g.max_depth(),
            delta_apply_count=c.delta_apply.count, delta_apply_total_ns=c.delta_apply.total_ns,
            delta_apply_avg_ns=c.delta_apply.avg,
            propagation_count=c.propagation.count, propagation_total_ns=c.propagation.total_ns,
            propagation_avg_ns=c.propagation.avg,
            delta_apply_p50_ns=da50, delta_apply_p90_ns=da90, delta_apply_p99_ns=da99,
            delta_apply_max_ns=c.delta_apply.max_ns,
            propagation_p50_ns=pr50, propagation_p90_ns=pr90, propagation_p99_ns=pr99,
            propagation_max_ns=c.propagation.max_ns,
            log_append_count=c.log_append.count, log_append_p50_ns=la50,
            log_append_p90_ns=la90, log_append_p99_ns=la99, log_append_max_ns=c.log_append.max_ns,
            checkpoint_count=c.checkpoint.count, checkpoint_p50_ns=ck50, checkpoint_p90_ns=ck90,
            checkpoint_p99_ns=ck99, checkpoint_max_ns=c.checkpoint.max_ns,
            log_records=len(state.log.records), log_bytes=state.log.bytes_logged,
            last_lsn=state.log.last_lsn, records_logged=c.records_logged,
            payload_bytes_logged=c.payload_bytes_logged,
            events_emitted=state.events.emitted, handler_errors=state.events.handler_errors,
            torn_tails_recovered=c.torn_tails_recovered,
            arena_bytes_in_use=a.bytes_in_use, arena_bytes_free=a.bytes_free_listed,
            arena_bytes_reserved=a.bytes_reserved,
            arena_fragmentation=(carved - page_bytes) / carved if carved else 0.0,
            cpu_page_bytes=int(loc_bytes[0]), gpu_page_bytes=int(loc_bytes[1]),
            unified_page_bytes=int(loc_bytes[2]),
            device_bytes_in_use=sum(d.bytes_in_use for d in devices.values()),
            device_stale_pages=(state.devices.stale_count(state)
                                if state.devices is not None else int(locs[1] + locs[2])),
            unified_managed_bytes=a.bytes_managed,
            device_syncs=copies.syncs if copies is not None else 0,
            device_async_syncs=copies.async_syncs if copies is not None else 0,
            device_pages_synced=copies.pages_synced if copies is not None else 0,
            device_bytes_synced=copies.bytes_synced if copies is not None else 0,
            gpu_deltas_applied=devices["gpu"].deltas_applied if "gpu" in devices else 0,
            unified_deltas_applied=(devices["unified"].deltas_applied
                                    if "unified" in devices else 0),
            unified_prefetches=devices["unified"].prefetches if "unified" in devices else 0,
            unified_bytes_prefetched=(devices["unified"].bytes_prefetched
                                      if "unified" in devices else 0),
            unified_advices=devices["unified"].advices if "unified" in devices else 0,
        )


def print_stats(state: MMSBState, file: Any = None) -> None:
    """Print get_stats() as a table (to ``file``, default stdout).

    Raises:
        InvalidArgumentError: ``file`` is neither None nor something with a ``write``.
    """
    get_stats(state).render(file)


def reset_stats(state: MMSBState) -> None:
    """Zero the counters and latency samples; pages, log and graph are untouched."""
    state = _state_of(state, "reset_stats")
    state.settle()
    with state.lock:
        state.counters = Counters()
        state.events.emitted = 0
        state.events.handler_errors = 0


def _ns(ns: Any) -> int:
    if isinstance(ns, bool) or not isinstance(ns, int | float) or not 0 <= ns < 1 << 62:
        raise InvalidArgumentError(f"latency must be a finite number of ns ≥ 0, not {ns!r}")
    return int(ns)


def track_delta_latency(state: MMSBState, ns: int) -> None:
    """Add one delta-apply latency sample (ns) to the state's counters."""
    state = _state_of(state, "track_delta_latency")
    with state.lock:
        state.counters.delta_apply.add(_ns(ns))


def track_propagation_latency(state: MMSBState, ns: int) -> None:
    """Add one propagation latency sample (ns) to the state's counters."""
    state = _state_of(state, "track_propagation_latency")
    with state.lock:
        state.counters.propagation.add(_ns(ns))


# -- whole-graph helpers ---------------------------------------------------------------

def _graph_and_state(obj: Any, fn: str) -> tuple[ShadowPageGraph, MMSBState | None]:
    """The graph to read and the state it belongs to (None for a free-standing graph)."""
    if isinstance(obj, MMSBState):
        return obj.graph, obj
    if isinstance(obj, ShadowPageGraph):
        owner = obj.owner
        return obj, owner if isinstance(owner, MMSBState) else None
    raise InvalidArgumentError(f"{fn}() takes a state or a ShadowPageGraph, not {type(obj).__name__}")


def compute_closure(graph: ShadowPageGraph | MMSBState, ids: int | Page | Iterable[int | Page]) -> set[int]:
    """Every page reachable from ``ids`` along dependency edges, ``ids`` included: the
    pages a change to ``ids`` can reach. Iterative.

    Args:
        graph: a state, or a ShadowPageGraph (its own or a free-standing one).
        ids: a page id, a Page, or an iterable of them.

    Raises:
        InvalidArgumentError: ``graph`` is neither, or an id is not an int.
        PageNotFoundError: an id that is not a live page of the graph's state (a
            free-standing graph accepts any int).

    Cost: O(ids + edges reachable from them).
    """
    g, state = _graph_and_state(graph, "compute_closure")
    if isinstance(ids, int | np.integer | Page):
        items: list[Any] = [ids]
    elif isinstance(ids, Iterable) and not isinstance(ids, str | bytes | bytearray):
        items = list(ids)
    else:
        raise InvalidArgumentError(
            f"compute_closure(): ids must be a page id or an iterable of ids, not {type(ids).__name__}")
    pids = [require_page_id(p, "compute_closure") for p in items]
    if state is None:
        return _closure(g, pids)
    with state.lock:
        for pid in pids:
            state.require_page(pid, "compute_closure")
        return _closure(g, pids)


def detect_cycles(graph: ShadowPageGraph | MMSBState) -> list[list[int]]:
    """The cycles of the graph, one per strongly connected group of pages that holds
    one: the shortest cycle through the group's smallest id, in edge order from there
    (``[2, 5, 7]`` is 2 → 5 → 7 → 2; ``[4]`` a self-edge), sorted by first id. Empty for
    an acyclic graph, which every graph changed only through add_dependency is; a graph
    whose edges were set directly (``ShadowPageGraph.add_edge``) may hold cycles.
    Iterative.

    Args:
        graph: a state, or a ShadowPageGraph (its own or a free-standing one).

    Raises:
        InvalidArgumentError: ``graph`` is not a state or a ShadowPageGraph.

    Cost: O(V + E).
    """
    g, state = _graph_and_state(graph, "detect_cycles")
    if state is None:
        return _cycles(g)
    with state.lock:
        return _cycles(g)


def reverse_postorder(graph: ShadowPageGraph | MMSBState) -> list[int]:
    """The ids that have edges in reverse postorder of a depth-first search from the
    pages without parents (then any page not reached), smallest id first, children by
    id. On an acyclic graph every parent comes before its children. Iterative: chains
    of any length work.

    Args:
        graph: a state, or a ShadowPageGraph (its own or a free-standing one).

    Raises:
        InvalidArgumentError: ``graph`` is not a state or a ShadowPageGraph.

    Cost: O(V log V + E log E).
    """
    g, state = _graph_and_state(graph, "reverse_postorder")
    if state is None:
        return _rpo(g)
    with state.lock:
        return _rpo(g)


# -- page serialization ----------------------------------------------------------------

def serialize_page(page: Page | PageImage) -> bytes:
    """One page as bytes: its id, epoch, location, metadata, written-mask and bytes,
    taken together under the state's lock (layout in docs/SerializationSpec.md; the
    payload is zstd-compressed when that pays). ``deserialize_page`` reads it back.

    Args:
        page: a live Page handle, or a PageImage (as deserialize_page returns).

    Raises:
        InvalidArgumentError: ``page`` is neither.
        PageNotFoundError: the handle's page was deleted.

    Cost: O(size + the page's retained deltas) (the mask is rebuilt from them).
    """
    if isinstance(page, PageImage):
        return encode_page(page)
    if not isinstance(page, Page):
        raise InvalidArgumentError(
            f"serialize_page takes a Page or a PageImage, not {type(page).__name__}")
    state = page.state
    state.settle()
    with state.lock:
        pid = state.require_page(page.id, "serialize_page")
        t = state.table
        image = PageImage._trusted(
            pid, int(t.epoch[pid]), PageLocation(int(t.loc[pid])), dict(t.meta.get(pid, {})),
            state.page_view(pid).tobytes(), np.array(state.page_mask(pid), dtype=bool))
    return encode_page(image)


# -- subscription helpers --------------------------------------------------------------

def _event_types(event_types: Any, fn: str) -> list[EventType]:
    """``None`` (every type), one EventType, or an iterable of them, without repeats."""
    if event_types is None:
        return list(EventType)
    items = [event_types] if isinstance(event_types, EventType | int) else event_types
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise InvalidArgumentError(
            f"{fn}(): event_types must be None, an EventType or an iterable of them, "
            f"not {type(event_types).__name__}")
    out: list[EventType] = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            et = EventType(item)
        except (ValueError, TypeError):
            raise InvalidArgumentError(f"{fn}(): {item!r} is not an EventType") from None
        if et not in out:
            out.append(et)
    if not out:
        raise InvalidArgumentError(f"{fn}(): event_types is empty; pass None for every type")
    return out


def _one_event_type(event_type: Any, fn: str) -> EventType | None:
    """``None``, or ``event_type`` as an EventType (a typed refusal otherwise)."""
    if event_type is None:
        return None
    try:
        if isinstance(event_type, bool):
            raise TypeError
        return EventType(event_type)
    except (ValueError, TypeError):
        raise InvalidArgumentError(
            f"{fn}(): event_type must be an EventType or None, not {event_type!r}") from None


def clear_subscriptions(state: MMSBState, event_type: EventType | None = None) -> int:
    """Remove every subscription of this state (or only those of ``event_type``); they
    become inactive. Returns how many were removed.

    Args:
        state: the state whose subscriptions go.
        event_type: None for all of them, or one EventType.

    Raises:
        InvalidArgumentError: ``state`` is not a state, or ``event_type`` is not an
            EventType.

    Cost: O(subscriptions removed).
    """
    state = _state_of(state, "clear_subscriptions")
    et = _one_event_type(event_type, "clear_subscriptions")
    with state.lock:
        return state.events.clear(et)


def get_subscription_count(state: MMSBState, event_type: EventType | None = None) -> int:
    """How many subscriptions this state holds (of ``event_type``, when given).

    Args:
        state: the state to ask.
        event_type: None to count all of them, or one EventType.

    Raises:
        InvalidArgumentError: ``state`` is not a state, or ``event_type`` is not an
            EventType.

    Cost: O(event types).
    """
    state = _state_of(state, "get_subscription_count")
    et = _one_event_type(event_type, "get_subscription_count")
    with state.lock:
        return state.events.count(et)


def _subscribe_all(state: MMSBState, types: list[EventType], handler: Callable[..., Any]) -> list[Subscription]:
    subs = [Subscription(et, handler, None, owner=id(state)) for et in types]
    with state.lock:
        for sub in subs:
            state.events.add(sub)
    return subs


def create_logging_subscriber(state: MMSBState, logger: logging.Logger | logging.LoggerAdapter[Any] | str | None = None,
                              level: int | str = logging.DEBUG,
                              event_types: EventType | Iterable[EventType] | None = None) -> list[Subscription]:
    """Log every event of this state (or of ``event_types``) through stdlib ``logging``,
    one record per event: ``mmsb event PAGE_CHANGED page=3 epoch=2 delta=7``. The line
    is only formatted when the logger is enabled for ``level``.

    Args:
        state: the state to watch.
        logger: a Logger or LoggerAdapter, a logger name, or None for ``mmsb.events``.
        level: a logging level (an int ≥ 0, or a name such as ``"INFO"``).
        event_types: None (every type), one EventType, or an iterable of them.

    Returns:
        One Subscription per event type; ``unsubscribe`` each (or
        ``clear_subscriptions``) to stop.

    Raises:
        InvalidArgumentError: a bad logger, level or event type; nothing is subscribed.

    Cost: one subscription per event type; per event, a level check (and one log call).
    """
    state = _state_of(state, "create_logging_subscriber")
    if logger is None:
        lg: Any = logging.getLogger("mmsb.events")
    elif isinstance(logger, str):
        lg = logging.getLogger(logger)
    elif isinstance(logger, logging.Logger | logging.LoggerAdapter):
        lg = logger
    else:
        raise InvalidArgumentError(
            f"create_logging_subscriber(): logger must be a logging.Logger, a LoggerAdapter, "
            f"a logger name or None, not {type(logger).__name__}")
    if isinstance(level, str):
        lvl = logging.getLevelNamesMapping().get(level.strip().upper())
        if lvl is None:
            raise InvalidArgumentError(
                f"create_logging_subscriber(): unknown logging level {level!r}; use DEBUG, "
                "INFO, WARNING, ERROR, CRITICAL or an int")
    elif isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        lvl = level
    else:
        raise InvalidArgumentError(
            f"create_logging_subscriber(): level must be an int ≥ 0 or a level name, not {level!r}")
    types = _event_types(event_types, "create_logging_subscriber")

    def log_event(_state: MMSBState, event_type: EventType, *data: Any) -> None:
        if lg.isEnabledFor(lvl):
            lg.log(lvl, "mmsb event %s", describe_event(event_type, data))

    return _subscribe_all(state, types, log_event)


def create_debug_subscriber(state: MMSBState, file: Any = None,
                            event_types: EventType | Iterable[EventType] | None = None) -> list[Subscription]:
    """Print one readable line per event of this state (or of ``event_types``):
    ``mmsb: PAGE_CHANGED page=3 epoch=2 delta=7``, flushed at once.

    Args:
        state: the state to watch.
        file: a text stream with ``write``; None prints to ``sys.stdout`` as it is at
            each event.
        event_types: None (every type), one EventType, or an iterable of them.

    Returns:
        One Subscription per event type; ``unsubscribe`` each (or
        ``clear_subscriptions``) to stop. A stream that fails to write is reported and
        counted like any handler error; it never breaks the write.

    Raises:
        InvalidArgumentError: ``file`` has no ``write`` method, or a bad event type;
            nothing is subscribed.

    Cost: one subscription per event type; one formatted line per event.
    """
    state = _state_of(state, "create_debug_subscriber")
    if file is not None and not callable(getattr(file, "write", None)):
        raise InvalidArgumentError(
            f"create_debug_subscriber(): file must be a text stream with write(), not "
            f"{type(file).__name__}")
    types = _event_types(event_types, "create_debug_subscriber")

    def print_event(_state: MMSBState, event_type: EventType, *data: Any) -> None:
        print(f"mmsb: {describe_event(event_type, data)}",
              file=sys.stdout if file is None else file, flush=True)

    return _subscribe_all(state, types, print_event)


# -- instrumentation -------------------------------------------------------------------

def _ops() -> _instr.PageOps:
    return _instr.PageOps(create_page, update_page, resize_page, add_dependency,
                          update_metadata, apply_batch, query_page)


def enable_instrumentation(state: MMSBState, config: InstrumentationConfig | None = None
                           ) -> InstrumentationConfig:
    """Turn on the instrumentation layer for ``state`` (or give it a new config): the
    config's functions and the loaded modules matching its patterns are captured onto
    code pages at once, the import hook captures matching modules imported later,
    recomputed pages record the code that produced them, and, with ``calls=True``,
    calls of instrumented code go to per-thread ring pages. Returns the config in force.

    Raises:
        InvalidArgumentError: ``config`` is not an InstrumentationConfig; ``calls=True``
            while another state records calls.
        StateClosedError: the state was stopped.
        Nothing is enabled or changed when it raises.
    """
    state = _state_of(state, "enable_instrumentation")
    cfg = InstrumentationConfig() if config is None else config
    if not isinstance(cfg, InstrumentationConfig):
        raise InvalidArgumentError(
            f"config must be an InstrumentationConfig, not {type(cfg).__name__}")
    state.enter()
    state.leave()
    return _instr.enable(state, cfg, _ops()).config


def disable_instrumentation(state: MMSBState) -> bool:
    """Remove every hook the state's instrumentation installed (import hook, monitoring
    callbacks or call trampolines — each function gets its own code object back —,
    recompute hook), after flushing buffered call records. Pages it made stay. Returns
    False when it was not enabled."""
    state = _state_of(state, "disable_instrumentation")
    return _instr.disable(state)


def configure_instrumentation(state: MMSBState, **options: Any) -> InstrumentationConfig:
    """Change some options of the state's instrumentation (enabling it with the default
    config plus ``options`` when it is off); returns the config in force.

    Raises:
        InvalidArgumentError: an unknown option or a bad value (nothing changes).
    """
    state = _state_of(state, "configure_instrumentation")
    mgr = _instr.manager_of(state)
    base = mgr.config if mgr is not None else InstrumentationConfig()
    return enable_instrumentation(state, base.replace(**options))


def instrumentation_config(state: MMSBState) -> InstrumentationConfig | None:
    """The config of the state's instrumentation, None when it is disabled."""
    mgr = _instr.manager_of(_state_of(state, "instrumentation_config"))
    return None if mgr is None else mgr.config


def _manager(state: MMSBState, fn: str) -> _instr.Instrumentation:
    mgr = _instr.manager_of(_state_of(state, fn))
    if mgr is None:
        raise InvalidArgumentError(
            f"{fn}() needs instrumentation on this state; call enable_instrumentation() first")
    return mgr


def code_pages(state: MMSBState, obj: Any) -> dict[str, int]:
    """The pages of an instrumented function, method, module (or unit name such as
    ``"pkg.mod:func"``): artefact kind (``"source"``, ``"ast"``, ``"ir"``) → page id.

    Raises:
        InvalidArgumentError: instrumentation is off, or ``obj`` was not captured.
    """
    mgr = _manager(state, "code_pages")
    unit = mgr.unit_for(obj)
    if unit is None:
        raise InvalidArgumentError(
            f"{obj!r} is not instrumented on this state; name it in "
            "InstrumentationConfig(functions=...) or match its module with modules=...")
    return dict(unit.pages)


def refresh_code(state: MMSBState) -> list[str]:
    """Recapture instrumented functions whose ``__code__`` was replaced (and captures
    that had to wait for a batch to end); returns the names of the units whose code
    changed. Module reloads and re-imports are picked up without it.

    Raises:
        InvalidArgumentError: instrumentation is off.
    """
    return _manager(state, "refresh_code").refresh()


def world_age() -> int:
    """The process-wide code generation: +1 each time instrumented code changes."""
    return _instr.world_age()


def flush_call_events(state: MMSBState) -> int:
    """Write the buffered call records of every thread to their ring pages; returns how
    many were written (0 when calls are not recorded).

    Raises:
        InvalidArgumentError: inside a batch or a propagation pass.
    """
    mgr = _instr.manager_of(_state_of(state, "flush_call_events"))
    if mgr is None or mgr.calls is None:
        return 0
    return mgr.calls.flush()


def call_events(state: MMSBState, thread_id: int | None = None) -> list[_calls.CallEvent]:
    """The calls the state's ring pages hold (one thread's, or all), per thread oldest
    first. Flush first to include buffered ones."""
    return _calls.read_call_events(_state_of(state, "call_events"), thread_id)


def produced_by(state: MMSBState, delta: Delta) -> dict[str, Any] | None:
    """The code that produced a propagated delta: ``{"name", "hash"}`` and, for
    instrumented code, ``"ir_page"``, ``"ir_epoch"``; None for other deltas or when the
    log does not say (recorded with instrumentation off)."""
    state = _state_of(state, "produced_by")
    if not isinstance(delta, Delta):
        raise InvalidArgumentError(f"produced_by() takes a Delta, not {type(delta).__name__}")
    return _prov.provenance_index(state).of(delta)


def code_differences(state: MMSBState) -> list[_prov.CodeDifference]:
    """Retained propagated deltas whose code differs from the code there now (the
    registered recompute function, or the code on the IR page that produced them), or
    cannot be compared. O(log)."""
    return _prov.code_differences(_state_of(state, "code_differences"))


def verify_state_consistency(state: MMSBState, *, check_code: bool = False) -> bool:
    """True when replaying the whole retained log gives exactly the live state (pages,
    bytes, epochs, sizes, locations, metadata, edges, id counter). With
    ``check_code=True`` also False when a retained propagated delta was produced by code
    that differs from the code registered now; each such difference is logged as a
    warning (logger ``mmsb.instrument``; :func:`code_differences` lists them). O(log)."""
    if not isinstance(check_code, bool):
        raise InvalidArgumentError(f"check_code must be True or False, not {check_code!r}")
    ok = _verify(state)
    if not check_code:
        return ok
    changed = [d for d in _prov.code_differences(state) if d.status == "changed"]
    for d in changed:
        _instr.log.warning("page %d: %d propagated delta(s) from LSN %d: %s", d.page_id,
                           d.deltas, d.lsn, d.reason)
    return ok and not changed
