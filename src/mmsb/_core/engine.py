"""The state: pages, log, graph, events and counters behind one lock.

Every change follows the same path: validate → build a record → append it to the log
(the write-ahead log first, when the bus is durable) → apply it to the store → propagate
→ deliver events after the lock is released. Replay feeds logged records to the same
``_apply`` methods, so there is one implementation of every change.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
import weakref
from _thread import RLock as _RLock
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import PurePath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from ..config import MMSBConfig
from ..errors import (
    GPUMemoryError,
    HistoryUnavailableError,
    InvalidArgumentError,
    InvalidDeltaError,
    MetadataError,
    MMSBError,
    PageNotFoundError,
    StateClosedError,
)
from ..types import EdgeType, EventType, PageLocation, PropagationMode, coerce_location
from .arena import CHUNK_MASK, CHUNK_SHIFT, CHUNK_SIZE, Arena
from .batch_writes import BUFFERED_PAGE_MAX, log_buffered
from .compaction import FoldJob, compaction_step, start_at
from .delta import (
    Delta,
    apply_delta,
    as_bytes_array,
    diff_write,
    union_mask,
)
from .devices import (
    DeviceCopies,
    DeviceSync,
    as_host_bytes,
    backend_class,
    check_device_page,
    gpu_flag_location,
    is_device_input,
    refuse_device_on_bus,
)
from .events import EventBus
from .graph import ShadowPageGraph, as_page_id
from .kernels import SMALL_WRITE
from .limits import MAX_METADATA_BYTES, MAX_PAGE_ID, MAX_PAGE_SIZE, metadata_bounds_problem
from .log import _SMALL_ENTRY as _small_entries
from .log import (
    ColumnRecords,
    DeltaGroup,
    DeltaView,
    TransactionLog,
    _CreateRun,
    load_history,
)
from .monitor import Counters
from .page_table import LIVE, CreationCursor, PageTable
from .propagation import run_propagation
from .records import (
    AnyRecord,
    Compacted,
    EdgeAdd,
    EdgeRemove,
    MetadataSet,
    PageClone,
    PageCreate,
    PageDelete,
    PageMigrate,
    PageResize,
    bind_engine,
    kind_of,
)
from .snapshot import ReplayBase, Snapshot

if TYPE_CHECKING:
    from .._device.backend import DeviceBackend
    from .._storage.bus import DurableBus

__all__ = ["MMSBState", "Page", "PageHandle", "PageMap", "PageSnapshot", "check_size",
           "create_page", "normalize_metadata"]

RecomputeFn = Callable[["MMSBState", "Page"], Any]

ACTIVE: contextvars.ContextVar[MMSBState | None] = contextvars.ContextVar("mmsb_active", default=None)
"""The active state (``mmsb.active_state()``): the one ``mmsb_start`` made or ``with
mmsb.active(state)`` entered, per thread and task."""
Event = tuple[EventType, tuple[Any, ...]]


def require_state(obj: Any, fn: str) -> MMSBState:
    """``obj`` if it is an MMSBState, else a typed refusal naming the call."""
    if isinstance(obj, MMSBState):
        return obj
    raise InvalidArgumentError(f"{fn}() takes an MMSBState as its first argument, not {type(obj).__name__}")


def require_page_id(page_id: Any, fn: str) -> int:
    """A page id (an int, or a Page) as an int; anything else is a typed refusal."""
    if type(page_id) is int:
        return page_id  # (the usual case, first: read_page_at and the log queries)
    if isinstance(page_id, Page):
        return page_id.id
    return as_page_id(page_id, fn)


_IMMEDIATE = PropagationMode.IMMEDIATE
"""As a module constant: reading an enum member through its class costs ~0.1 µs."""
_PAGE_CREATED = EventType.PAGE_CREATED
_GOOD_SOURCES: set[str] = set()
_API = "api"  # the default source, tested by identity first


def check_source(source: Any) -> str:
    """A delta source name: a str that encodes as UTF-8 in at most 65535 bytes."""
    if type(source) is str and source in _GOOD_SOURCES:
        return source
    if not isinstance(source, str):
        raise InvalidArgumentError(f"source must be a str, not {type(source).__name__}")
    try:
        n = len(source.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"source {source!r} is not valid text (it cannot be UTF-8 encoded)") from None
    if n > 0xFFFF:
        raise InvalidArgumentError(f"source is {n} bytes long; at most 65535 bytes of UTF-8 are allowed")
    if len(_GOOD_SOURCES) < 4096:
        _GOOD_SOURCES.add(source)
    return source


def check_size(size: object, what: str = "size") -> int:
    """A page size must be a positive int (bools refused)."""
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise InvalidArgumentError(f"page {what} must be a positive int, not {size!r}")
    if size <= 0:
        raise InvalidArgumentError(f"page {what} must be a positive int, not {size}")
    if size > MAX_PAGE_SIZE:
        raise InvalidArgumentError(f"page {what} {size} is larger than the limit of {MAX_PAGE_SIZE} bytes")
    return int(size)


def check_path(path: object, fn: str) -> None:
    """A file or directory path a call takes: a str or an os.PathLike giving a str, not
    empty (which would name the current directory without saying so) and without a NUL
    character (which no file name holds: the system calls refuse it as ValueError)."""
    if isinstance(path, str):
        raw: object = path
    elif isinstance(path, PurePath) or isinstance(path, os.PathLike):
        # (A Path is told from the class itself, before the slower check of the ABC.)
        raw = os.fspath(path)
    else:
        raise InvalidArgumentError(f"{fn}() takes a file path (str or os.PathLike), not "
                                   f"{type(path).__name__}")
    if not isinstance(raw, str):
        raise InvalidArgumentError(f"{fn}() takes a path that is text, not "
                                   f"{type(raw).__name__}")
    if not raw:
        raise InvalidArgumentError(f"{fn}() got an empty path; name the file or directory "
                                   "('.' for the current directory)")
    if "\0" in raw:
        raise InvalidArgumentError(f"{fn}() got a path with a NUL character ({raw!r}), which "
                                   "no file name can hold")


def check_timeout(timeout: object) -> float | None:
    """A wait's limit in seconds: None (no limit) or a number >= 0 (``inf`` waits as long
    as None). NaN is refused with the rest: it compares false with every deadline, so a
    wait given it would neither end nor time out."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise InvalidArgumentError(f"timeout must be a number >= 0 or None, not {timeout!r}")
    return float(timeout)


def normalize_metadata(metadata: Any, page_id: int | None = None) -> dict[str, Any]:
    """The stored form of a metadata mapping: str keys, msgpack-encodable values, as
    they read back after a round trip (tuples become lists), so replay and reload
    give equal metadata. Raises MetadataError naming what cannot be stored."""
    where = f" of page {page_id}" if page_id is not None else ""
    if not isinstance(metadata, Mapping):
        raise MetadataError(f"metadata{where} must be a mapping (dict), not {type(metadata).__name__}")
    for key in metadata:
        if not isinstance(key, str):
            raise MetadataError(f"metadata{where} keys must be str, not {key!r}")
    problem = metadata_bounds_problem(dict(metadata))
    try:
        packed = msgpack.packb(dict(metadata), use_bin_type=True) if problem is None else b""
    except (TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(
            f"metadata{where} holds a value msgpack cannot encode ({exc}); use None, bool, "
            "int, float, str, bytes, and lists or dicts of those") from None
    if problem is None and len(packed) > MAX_METADATA_BYTES:
        problem = f"{len(packed)} bytes encoded (at most {MAX_METADATA_BYTES})"
    if problem is not None:
        raise MetadataError(f"metadata{where} is beyond what every reader accepts: {problem}")
    out: dict[str, Any] = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return out


def creation_cost(state: MMSBState, count: int, size: int) -> int:
    """Bytes that creating ``count`` pages of ``size`` bytes commits at least: their
    slots and the page-table rows up to their ids."""
    from .arena import size_class

    rows = max(0, state.table.next_id + count - state.table.capacity)
    return count * size_class(size) + rows * 26


def physical_memory() -> int:
    """Bytes of RAM of this machine (a large number where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 50


class PageSnapshot:
    """A detached, immutable view of one page at one point of its history."""

    __slots__ = ("page_id", "epoch", "lsn", "timestamp", "data", "source")

    def __init__(self, page_id: int, epoch: int, lsn: int, timestamp: int, data: bytes,
                 source: str) -> None:
        self.page_id = page_id
        self.epoch = epoch
        self.lsn = lsn
        self.timestamp = timestamp
        self.data = data
        self.source = source

    @property
    def size(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return (f"PageSnapshot(page_id={self.page_id}, epoch={self.epoch}, lsn={self.lsn}, "
                f"size={len(self.data)})")


class Page:
    """A live handle on one page of a state. Cheap: it holds the state and the id, and
    reads everything else from the page table when asked."""

    __slots__ = ("_state", "id")

    def __init__(self, state: MMSBState, page_id: int) -> None:
        self._state = state
        self.id = page_id

    @property
    def state(self) -> MMSBState:
        return self._state

    def _row(self) -> int:
        if not self._state.table.is_live(self.id):
            raise PageNotFoundError(self.id, "this page handle (the page was deleted)")
        return self.id

    @property
    def size(self) -> int:
        return int(self._state.table.size[self._row()])

    @property
    def epoch(self) -> int:
        self._state.settle()
        return int(self._state.table.epoch[self._row()])

    @property
    def location(self) -> PageLocation:
        return PageLocation(int(self._state.table.loc[self._row()]))

    @property
    def metadata(self) -> Mapping[str, Any]:
        """Read-only mapping; change it with set_metadata() / update_metadata()."""
        self._row()
        return MappingProxyType(dict(self._state.table.meta.get(self.id, {})))

    @property
    def data(self) -> np.ndarray:
        """Read-only uint8 view of the page's current bytes (re-read on each access, so
        it follows the page through resizes)."""
        with self._state.lock:
            return self._state.page_view(self._row(), readonly=True)

    @property
    def mask(self) -> np.ndarray:
        """One bool per byte: True where any applied delta has written."""
        self._state.settle()
        with self._state.lock:
            return self._state.page_mask(self._row())

    def query(self) -> bytes:
        return self._state.page_view(self._row()).tobytes()

    def device_array(self) -> Any:
        """A read-only device view of a gpu or unified page, without a copy to the
        host: on a CUDA backend an object with ``__dlpack__`` and
        ``__cuda_array_interface__`` (PyTorch, JAX and CuPy take it zero-copy). A
        unified page in managed memory is viewed in place: the GPU reads the page's own
        bytes, never behind (the view refuses export once the page is deleted, resized
        or moved). Otherwise the view is of the page's device copy, brought up to date
        from the host mirror first when a write left it behind, and shows the page as of
        this call: call again after writes.

        Raises:
            PageNotFoundError; InvalidArgumentError: a cpu page; GPUMemoryError: the
            page's location is not usable here, or out of device memory.
        """
        return self._state.device_view(self.id)

    def update(self, data: Any, *, source: str = "api") -> Page:
        """Replace the whole content (see update_page)."""
        self._state.write_bytes(self.id, 0, data, source, True)
        return self

    def write(self, offset: int, data: Any, *, source: str = "api") -> Page:
        """Write ``data`` at ``offset`` (see write_page)."""
        self._state.write_bytes(self.id, offset, data, source, False)
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Page) and other._state is self._state and other.id == self.id

    def __hash__(self) -> int:
        return hash((id(self._state), self.id))

    def __repr__(self) -> str:
        self._state.settle()
        t = self._state.table
        if not t.is_live(self.id):
            return f"<Page {self.id} (deleted)>"
        return (f"<Page {self.id} size={int(t.size[self.id])} epoch={int(t.epoch[self.id])} "
                f"location={PageLocation(int(t.loc[self.id]))}>")


class PageHandle(Page):
    """The :class:`Page` the hot paths (create_page, write_page, update_page) return: a
    Page in every respect (``isinstance``, equality, hash, members) but its class.
    ``PageHandle()`` and its two slots cost about 70 ns less than
    ``object.__new__(Page)`` and its two slots: with ``object.__init__`` as its
    ``__init__``, calling the class takes no argument tuple and no subtype check, and
    runs no Python frame. Only the hot paths make them; ``Page(state, page_id)`` stays
    the public constructor."""

    __slots__ = ()
    __init__ = object.__init__


class PageMap(Mapping[int, Page]):
    """``state.pages``: page id → live :class:`Page` handle, ids ascending."""

    def __init__(self, state: MMSBState) -> None:
        self._state = state

    def __getitem__(self, page_id: int) -> Page:
        if not isinstance(page_id, int | np.integer) or not self._state.table.is_live(int(page_id)):
            raise PageNotFoundError(page_id, "state.pages")
        return Page(self._state, int(page_id))

    def __contains__(self, page_id: object) -> bool:
        return isinstance(page_id, int | np.integer) and self._state.table.is_live(int(page_id))

    def __iter__(self) -> Iterator[int]:
        return iter(self._state.table.live_ids().tolist())

    def __len__(self) -> int:
        self._state.settle_creations()
        return self._state.table.live_count

    def __repr__(self) -> str:
        return f"<PageMap {len(self)} pages>"


class MMSBState:
    """One authoritative, versioned, replayable set of pages.

    Use the module-level functions (``create_page(state, …)``) or the methods they
    call. All changes go through one re-entrant lock.
    """

    detached = False
    """True for states built by replay (not backed by any bus); set on those only, so
    that a live state keeps to the 29 instance attributes below which CPython 3.11
    reads attributes through its fast path."""
    # Class defaults too, set on an instance only by the layer that uses them.
    close_hooks: tuple[Callable[[MMSBState], object], ...] = ()
    """Called once, in order, when the state is stopped (before its bus closes): the
    instrumentation layer removes its hooks there. Replace the tuple to add one."""
    recompute_hook: Callable[[MMSBState, int, RecomputeFn], None] | None = None
    """Called as ``hook(state, page_id, fn)`` before a propagation pass runs a page's
    recompute function (the instrumentation layer's provenance); None: nothing."""
    devices: DeviceCopies | None = None
    """The device backends and the device copies of gpu and unified pages (see
    _core/devices.py); set on the first device page, so a state without one keeps to
    the attributes below."""

    def __init__(self, config: MMSBConfig | None = None, *, _defaults: bool = False) -> None:
        # ``_defaults``: ``config`` is a default MMSBConfig() whose only changes are bools
        # (mmsb_start without a config): valid as built, so not checked field by field.
        cfg = MMSBConfig() if config is None else config
        if not isinstance(cfg, MMSBConfig):
            raise InvalidArgumentError(f"config must be an MMSBConfig, not {type(cfg).__name__}")
        if config is not None and not _defaults:
            cfg.validate()
        self.config = cfg
        self.lock = _RLock()  # (threading.RLock's C type, without its wrapper)
        self.arena = Arena()
        self.table = PageTable()
        self.log = TransactionLog()
        self.graph = ShadowPageGraph()
        self.graph._owner = weakref.ref(self)
        self.events = EventBus()
        self.counters = Counters()
        self.recompute_fns: dict[int, RecomputeFn] = {}
        self.mask_base: dict[int, tuple[np.ndarray, int]] = {}
        """page id → (bool mask, LSN): bytes written by deltas up to that LSN, for pages
        whose log no longer shows it all (resized, cloned, trimmed history)."""
        self.pending: set[int] = set()
        self.forced: set[int] = set()
        self.event_queue: list[Event] = []
        self._delivering = threading.local()
        # How many calls of this state's API are open in the thread holding its lock
        # (the lock is re-entrant): 0 between calls.
        self.call_depth = 0
        self.batch_depth = 0
        self.batch_frame: _BatchFrame | None = None
        self.next_delta_id = 1
        self.compact_at = start_at(cfg.max_tlog_size)
        """Delta rows past which a write advances compaction (-1 while a job runs)."""
        self.compaction: FoldJob | None = None
        """The incremental compaction in progress, if any (see _core/compaction.py)."""
        self.propagating = False
        self.propagation_mode = cfg.propagation_mode
        self.closed = False
        self.bus: DurableBus | None = None
        """The durable bus behind this state, when it was started with a path."""
        self.orphan_from = 0
        """Nonzero when the retained log starts after this LSN with no replay base (one
        checkpoint file of a bus, loaded on its own): the state is whole, its history
        is not, so replays are refused."""
        self.recovery_notes: list[str] = []
        """What recovery of a durable bus cut off or skipped (empty when nothing)."""
        self.recomputing: int | None = None
        """The page whose recompute function is running (changes are refused meanwhile)."""
        self.replay_base: ReplayBase | None = None
        """Replay base: the state at ``log.horizon_lsn``, where replays of the retained
        log start; None when the log rebuilds the state from nothing."""

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> MMSBState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the durable bus behind this state (if any), mark the state
        stopped and clear it as the active state. Stopping a stopped state does nothing.

        Raises:
            InvalidArgumentError: inside an open batch (its writes are not logged yet).
            DurabilityError: the final checkpoint failed; the state and its bus are
                closed all the same (the log holds every record; reopening recovers).
        """
        with self.lock:
            if self.closed:
                return
            self.refuse_in_batch("mmsb_stop")
            if self.bus is not None and self.bus.shared and self.bus.failed is None:
                # One last look at the other writers' records, so that this process's
                # recompute functions follow them before it goes.
                self.enter()
                self.leave()
            self.drop_cursor()
            hooks, self.close_hooks = self.close_hooks, ()
            for hook in hooks:
                try:
                    hook(self)
                except Exception:  # a layer's clean-up must not keep the state open
                    logging.getLogger("mmsb.engine").exception("close hook %r failed", hook)
            try:
                if self.bus is not None:
                    self.bus.close(self)
            finally:
                # A bus that failed its final checkpoint is still closed (log synced,
                # lock released): the state says so too.
                self.closed = self.bus is None or self.bus.closed
            if self.closed and self.devices is not None:
                # Device calls are refused from now on: their memory goes now, not when
                # the last reference to the state does.
                self.devices.release(self)
        if ACTIVE.get() is self:
            ACTIVE.set(None)

    def __repr__(self) -> str:
        self.settle()
        kind = "closed" if self.closed else ("durable" if self.bus else "in-memory")
        return (f"<MMSBState {kind} pages={self.table.live_count} "
                f"deltas={len(self.log.deltas)} last_lsn={self.log.last_lsn}>")

    # -- public views ----------------------------------------------------------------
    @property
    def pages(self) -> PageMap:
        return PageMap(self)

    @property
    def tlog(self) -> DeltaView:
        self.settle()
        return DeltaView(self.log)

    @property
    def last_lsn(self) -> int:
        """LSN of the newest record (0 when nothing was logged)."""
        self.settle()
        return self.log.last_lsn

    @property
    def bus_id(self) -> str | None:
        """The durable bus's id, 16 hex digits (what ``mmsb.follow`` and the Redis keys of
        a replicated bus name it by); None for an in-memory state."""
        bus = self.bus
        return None if bus is None else f"{bus.bus_id:016x}"

    @property
    def next_page_id(self) -> int:
        return self.table.next_id

    def settle(self) -> None:
        """Log the writes an open batch holds (see _BatchFrame), when called by the
        thread that holds them: for reads of epochs, the log and the counters. O(held
        writes); nothing to do outside a batch."""
        frame = self.batch_frame
        if frame is not None and frame.writes and frame.owner == threading.get_ident():
            with self.lock:
                log_buffered(self, frame)
        self.settle_creations()

    def settle_creations(self) -> None:
        """Count the creations create_page's cursor made and has not counted yet (see
        :meth:`count_creations`); nothing to do (and no lock taken) when there are
        none. O(1)."""
        t = self.table
        cur = t.creating
        if cur is not None and cur.start != t.next_id:
            with self.lock:
                self.count_creations()

    def count_creations(self) -> None:
        """Under the lock: add the creations create_page's cursor made since it last
        counted them to the arena (its bump offset and bytes in use) and to the table's
        live count; their records, rows and ids are in place already. O(1)."""
        t = self.table
        cur = t.creating
        if cur is None:
            return
        n = t.next_id - cur.start
        if n:
            cur.start = t.next_id
            arena = self.arena
            arena._bump = cur.bump
            arena.bytes_in_use += n * cur.cls
            t.live_count += n

    def drop_cursor(self) -> None:
        """Under the lock: count the creation cursor's creations and drop it, so that
        the next create_page takes create_one. O(1)."""
        self.count_creations()
        self.table.creating = None

    def page_handle(self, page_id: int) -> Page:
        """A live :class:`Page` handle on ``page_id`` (not checked: see ``require_page``)."""
        return Page(self, page_id)

    # -- locking and event delivery --------------------------------------------------
    def enter(self) -> None:
        self.lock.acquire()
        # Any call may change what create_page's creation cursor rests on (the log's
        # tail, the arena, the table, a batch) or read what it leaves out: its
        # creations are counted and it is dropped (the next create_one makes it again).
        if self.table.creating is not None:
            self.drop_cursor()
        if self.closed:
            self.lock.release()
            raise StateClosedError("this state was stopped with mmsb_stop(); start a new one")
        if self.recomputing is not None:
            self.lock.release()
            raise InvalidArgumentError(
                f"the recompute function of page {self.recomputing} tried to change the state; "
                "a recompute function returns its page's new bytes and changes nothing else")
        frame = self.batch_frame
        if frame is not None and frame.writes:
            # Every call that enters logs the batch's held writes first, so that what it
            # reads or logs follows them, as after the same writes done one by one.
            try:
                log_buffered(self, frame)
            except BaseException:
                self.lock.release()
                raise
        self.call_depth += 1
        if self.call_depth == 1 and self.bus is not None:
            self.bus.entered_at = self.log.last_lsn
            if not self.bus.shared:
                return
            try:
                changed = self.bus.before_call(self)
            except BaseException:
                self.call_depth -= 1
                self.lock.release()
                raise
            if changed:
                try:
                    self._follow_other_writers(changed)
                except BaseException:
                    self.leave()
                    raise

    def _follow_other_writers(self, changed: set[int]) -> None:
        """Pages other writers of a shared bus changed: run this process's recompute
        functions on their dependants (what it registered, it computes)."""
        fns = self.recompute_fns
        if not fns:
            return
        sources = {p for p in changed if self.table.is_live(p)
                   and any(c in fns for c, _ in self.graph.get_children(p))}
        if sources:
            self.propagate(sources)

    def leave(self) -> None:
        # The end-of-call hook may raise (a replication acknowledgement that timed out, a
        # failed publication): the call is still over, so the depth and the lock are
        # given back and queued events delivered before the error reaches the caller.
        failure: BaseException | None = None
        ended = 0
        # The newest LSN of a call that logged something: the bus may wait on it (for
        # replication acknowledgements) once the lock is free.
        if self.call_depth == 1 and self.bus is not None:
            try:
                if not self.batch_depth:
                    self.bus.after_call(self)
                    if self.log.last_lsn > self.bus.entered_at:
                        ended = self.log.last_lsn
            except BaseException as exc:
                failure = exc
            finally:
                if self.bus.held:
                    self.bus.end_call()
        self.call_depth -= 1
        if self.call_depth == 0 and self.event_queue and not getattr(self._delivering, "on", False):
            self.lock.release()
            self._deliver_queued()
        else:
            self.lock.release()
        if failure is not None:
            raise failure
        if ended:
            bus = self.bus
            if bus is not None:
                bus.after_unlock(ended)

    def unlock_and_deliver(self) -> None:
        """Give the state's lock back at the end of a call that took it itself (the
        durable one-frame write) and, when that was the outermost call, deliver the
        events it queued, as :meth:`leave` does."""
        if self.event_queue and self.call_depth == 0 and not getattr(self._delivering, "on",
                                                                     False):
            self.lock.release()
            self._deliver_queued()
        else:
            self.lock.release()

    def _deliver_queued(self) -> None:
        """Deliver queued events in order. A handler's own writes queue more events;
        they are delivered after the current burst, never in the middle of it."""
        flag = self._delivering
        flag.on = True
        try:
            while True:
                with self.lock:
                    events = self.event_queue
                    self.event_queue = []
                if not events:
                    return
                self.events.deliver(self, events)
        finally:
            flag.on = False

    def emit(self, event_type: EventType, *data: Any) -> None:
        if self.events.active:
            self.event_queue.append((event_type, data))

    # -- reading ---------------------------------------------------------------------
    def require_page(self, page_id: Any, context: str) -> int:
        if isinstance(page_id, Page):
            page_id = page_id.id
        if isinstance(page_id, bool) or not isinstance(page_id, int | np.integer):
            raise PageNotFoundError(page_id, context)
        pid = int(page_id)
        if not self.table.is_live(pid):
            raise PageNotFoundError(pid, context)
        return pid

    def page_view(self, pid: int, readonly: bool = False) -> np.ndarray:
        addr_v, size_v, _epoch_v, _flags_v = self.table.views
        addr = addr_v[pid]
        chunk = self.arena.chunk(addr >> CHUNK_SHIFT)
        assert chunk is not None
        off = addr & CHUNK_MASK
        v = chunk[off:off + size_v[pid]]
        if readonly:
            v = v.view()
            v.flags.writeable = False
        return v

    def page_mask(self, pid: int) -> np.ndarray:
        """Bytes any applied delta wrote: the folded base (if any) plus the retained
        deltas after it. O(the page's retained payload bytes), in one compiled pass."""
        return self.page_masks([pid])[0]

    def page_masks(self, pids: list[int]) -> list[np.ndarray]:
        """:meth:`page_mask` of many pages, their payloads read in one compiled pass per
        payload chunk. O(their retained payload bytes)."""
        t = self.table
        bases = self.mask_base
        sizes = [int(t.size[pid]) for pid in pids]
        after = [bases[pid][1] if pid in bases else 0 for pid in pids]
        masks = self.log.written_masks(pids, sizes, after)
        for pid, out in zip(pids, masks, strict=True):
            base = bases.get(pid)
            if base is not None:
                n = min(len(out), len(base[0]))
                out[:n] |= base[0][:n]
        return masks

    def fold_masks(self, pids: Iterable[int], lsn: int) -> None:
        """Record the current masks of ``pids`` as their base as of ``lsn``."""
        for pid in pids:
            if self.table.is_live(pid):
                self.mask_base[pid] = (self.page_mask(pid), lsn)

    def history_snapshot(self, rewrites: bool = True) -> tuple[Any, ...]:
        """What trimming or rewriting the log changes, to undo it if a checkpoint fails.
        O(pages with a mask base); the log's columns are replaced, never edited, by those
        operations, so references suffice. ``rewrites=False``: the caller neither trims
        nor rewrites the log, so a history still on disk (a reopened bus's) is not read
        for it.

        Raises:
            SerializationError: the history had to be read, and a file of it is damaged
                (nothing changed).
        """
        if rewrites:
            load_history(self.log)
        return (self.log.memento(), dict(self.mask_base), self.replay_base,
                self.orphan_from, self.next_delta_id)

    def history_restore(self, saved: tuple[Any, ...]) -> None:
        memento, self.mask_base, self.replay_base, self.orphan_from, self.next_delta_id = saved
        self.log.restore_memento(memento)

    def swap_snapshot(self) -> dict[str, Any]:
        """Every part load_checkpoint swaps, to swap back if the bus cannot follow."""
        names = ("arena", "table", "log", "graph", "mask_base", "next_delta_id", "replay_base",
                 "orphan_from", "recompute_fns", "pending", "forced")
        out = {n: getattr(self, n) for n in names}
        out["pending"] = set(self.pending)
        out["forced"] = set(self.forced)
        return out

    def trim_log(self, lsn: int) -> None:
        """Drop retained records with LSN ≤ ``lsn`` (history the bus no longer keeps),
        folding the masks they carried into the pages' mask bases."""
        log = self.log
        k = log.index_after_lsn(lsn)
        if k == 0 and log.horizon_lsn >= lsn:
            return
        rows = log.rows_through(lsn)
        self.fold_masks(set(log.rows["page"][:rows].tolist()), lsn)
        if k:
            log.horizon_timestamp = log.records[k - 1].timestamp
        log.drop_through(lsn)
        log.horizon_lsn = max(log.horizon_lsn, lsn)

    # -- building and logging --------------------------------------------------------
    @property
    def plain_log(self) -> bool:
        """True when a delta can take the log's fast path (no sink, logging on)."""
        return self.log.sink is None and self.config.enable_logging

    def log_append(self, rec: AnyRecord) -> int:
        """Append a record (deltas are counted by after_delta); returns its LSN. A delta
        is never stamped in place: the log keeps a stamped copy."""
        if self.batch_frame is not None:
            lsn = self.batch_frame.hold(self.log, rec)
            if type(rec) is not Delta:
                self.counters.records_logged += 1
            return lsn
        t0 = time.perf_counter_ns()
        self.log.append(rec)
        lsn = self.log.last_lsn
        c = self.counters
        c.log_append.add(time.perf_counter_ns() - t0)
        if type(rec) is not Delta:
            c.records_logged += 1
        if not self.config.enable_logging:
            self._forget(rec, lsn)
        return lsn

    def _forget(self, rec: AnyRecord, lsn: int) -> None:
        """enable_logging=False: keep LSNs moving but retain nothing."""
        if isinstance(rec, Delta):
            self._fold_mask(rec, lsn)
        self.log.forget_all(lsn + 1)

    def _fold_mask(self, d: Delta, lsn: int) -> None:
        pid = d.page_id
        size = int(self.table.size[pid])
        m = union_mask(size, [d])
        base = self.mask_base.get(pid)
        if base is not None:
            n = min(size, len(base[0]))
            m[:n] |= base[0][:n]
        self.mask_base[pid] = (m, lsn)

    def new_delta_id(self) -> int:
        i = self.next_delta_id
        self.next_delta_id = i + 1
        return i

    # -- applying records (shared by live writes and replay) -------------------------
    def check_record(self, rec: AnyRecord) -> str | None:
        """Why ``rec`` cannot be the next record of ``state``'s log (None when it can): the
        checks the live calls make before they log, applied to a record read from disk, so
        a crafted or foreign record can never be applied blindly. Dispatched through the
        kind table (:data:`~mmsb._core.records.KINDS`). O(1), except an edge's cycle
        check (O(edges reachable from its child)).

        Raises:
            InvalidArgumentError: ``rec`` is of no record kind.
        """
        check = kind_of(rec).check
        assert check is not None, "the engine binds every kind's check"
        return check(self, rec)

    def apply_record(self, rec: AnyRecord) -> None:
        """Apply one logged record to the store and graph, through the kind table. No
        validation, no events.

        Raises:
            InvalidArgumentError: ``rec`` is of no record kind (nothing changed).
        """
        if type(rec) is Delta:
            _apply_delta_record(self, rec)
            return
        apply = kind_of(rec).apply
        assert apply is not None, "the engine binds every kind's apply"
        apply(self, rec)

    def commit(self, rec: AnyRecord) -> None:
        """Log then apply a validated structural record."""
        if self.batch_frame is not None:
            self.refuse_structural(type(rec).__name__)
        self.reserve_for(rec)
        self.log_append(rec)
        self.apply_record(rec)

    def refuse_structural(self, kind: str) -> None:
        """A structural change (a record of ``kind``) cannot be made inside an open batch:
        callers that take memory before logging one (device slots, managed slots) ask
        first, so that the refusal changes nothing.

        Raises:
            InvalidArgumentError: a batch is open.
        """
        if self.batch_frame is not None:
            raise InvalidArgumentError(
                f"{kind} is a structural change, which a batch cannot hold "
                "(a batch groups writes); make it before or after the batch")

    def reserve_for(self, rec: AnyRecord) -> None:
        """Allocate ahead the memory applying ``rec`` needs (its kind's ``reserve``),
        before it is logged: a record is logged only when it will apply.

        Raises:
            InvalidArgumentError: the memory is not there (nothing logged or changed),
                or ``rec`` is of no record kind.
        """
        reserve = kind_of(rec).reserve
        if reserve is None:
            return
        try:
            reserve(self, rec)
        except MemoryError:
            raise InvalidArgumentError(
                f"{type(rec).__name__} needs more memory than this process can get; nothing "
                "was logged or changed") from None

    def apply_delta_run(self, deltas: list[Delta]) -> None:
        """Apply consecutive logged deltas at once (replay): sparse runs in one
        vectorised scatter, dense ones one by one, in log order."""
        i, n = 0, len(deltas)
        while i < n:
            d = deltas[i]
            if d._idx is None or n - i < 8:
                self.apply_record(d)
                i += 1
                continue
            j = i
            while j < n and deltas[j]._idx is not None:
                j += 1
            run = deltas[i:j]
            if len(run) < 8:
                for d in run:
                    self.apply_record(d)
            else:
                self._scatter(run)
            i = j
        last_id = max((d.id for d in deltas), default=0)
        if last_id >= self.next_delta_id:
            self.next_delta_id = last_id + 1

    def _scatter(self, run: list[Delta]) -> None:
        t = self.table
        pids = np.fromiter((d.page_id for d in run), np.int64, len(run))
        eps = np.fromiter((d.epoch for d in run), np.int64, len(run))
        lens = np.fromiter((d._idx.size for d in run), np.int64, len(run))
        gidx = np.concatenate([d._idx for d in run]).astype(np.int64)
        gidx += np.repeat(t.addr[pids], lens)
        gvals = np.concatenate([d._vals for d in run])
        # Later deltas win where they overlap: keep the last occurrence of each address.
        order = np.argsort(gidx, kind="stable")
        gidx, gvals = gidx[order], gvals[order]
        if gidx.size > 1:
            last = np.empty(gidx.size, dtype=bool)
            last[-1] = True
            np.not_equal(gidx[1:], gidx[:-1], out=last[:-1])
            gidx, gvals = gidx[last], gvals[last]
        chunk_ids = gidx >> CHUNK_SHIFT
        offsets = gidx & ((1 << CHUNK_SHIFT) - 1)
        first, last_c = int(chunk_ids[0]), int(chunk_ids[-1])
        if first == last_c:
            chunk = self.arena.chunk(first)
            assert chunk is not None
            chunk[offsets] = gvals
        else:
            for c in np.unique(chunk_ids).tolist():
                sel = chunk_ids == c
                chunk = self.arena.chunk(c)
                assert chunk is not None
                chunk[offsets[sel]] = gvals[sel]
        np.maximum.at(t.epoch, pids, eps)

    # -- live changes ----------------------------------------------------------------
    def check_location(self, location: Any, size: int | None) -> PageLocation:
        """The PageLocation of ``location``; a device location only when its backend is
        usable here (made on first use).

        Raises:
            UnsupportedLocationError: not cpu, gpu or unified.
            GPUMemoryError: a device location on a durable bus, with ``enable_gpu`` off,
                or not usable on this machine (the message says why).
        """
        loc = coerce_location(location)
        if loc is not PageLocation.CPU:
            refuse_device_on_bus(self, loc, size)
            copies = self.devices if self.devices is not None else DeviceCopies()
            copies.backend(self, int(loc), size)
            self.devices = copies
        return loc

    def restore_locations(self, snap: Snapshot, keep: bool = False) -> list[int]:
        """Before ``snap`` (a checkpoint read from a file) replaces this state: check that
        its device pages can be placed here. Returns the pages to move to the cpu after
        the restore (``config.restore_device_pages_on_cpu``); empty when all can stay.
        ``keep``: device pages keep their locations unchecked (a state loaded to be
        read: their device uses are refused where the location is not usable).

        Raises:
            GPUMemoryError: device pages on a durable bus, or whose location is not
                usable here without the config flag or ``keep``; nothing was changed.
        """
        locs = np.asarray(snap.locs)
        if not locs.size or not locs.any():
            return []
        if keep and self.bus is None:
            return []
        ids = np.asarray(snap.ids)
        moved: list[int] = []
        # The backends this check makes are forgotten again if it refuses the load.
        devices = self.devices
        had = None if devices is None else dict(devices.backends)
        for value in np.unique(locs[locs != 0]).tolist():
            loc = PageLocation(int(value))
            count = int(np.count_nonzero(locs == value))
            try:
                self.check_location(loc, None)
            except GPUMemoryError as exc:
                if not self.config.restore_device_pages_on_cpu or self.bus is not None:
                    if devices is None or had is None:
                        self.devices = None
                    else:
                        devices.backends = had
                    raise GPUMemoryError(
                        f"the checkpoint holds {count} {loc.name.lower()} page(s), which cannot "
                        f"be placed here ({exc.reason}); nothing was loaded. Set "
                        "MMSBConfig.restore_device_pages_on_cpu=True to load them as cpu "
                        "pages") from None
                moved.extend(ids[locs == value].tolist())
        return moved

    def _use_backend_for_tests(self, location: Any, backend: DeviceBackend) -> None:
        """Testing only: use ``backend`` (a DeviceBackend, e.g. a HostBackend) as the
        backend of device location ``location`` of this state, so that the engine's
        device paths run where no device is. Not reachable through any config; the
        backend reports what it is (``get_device_stats`` shows a HostBackend's
        ``device`` as host memory).

        Raises:
            InvalidArgumentError: not a device location, not a DeviceBackend, or the
                location already has a backend.
        """
        loc = coerce_location(location)
        if loc is PageLocation.CPU:
            raise InvalidArgumentError("the cpu location keeps its pages in the host arena")
        if not isinstance(backend, backend_class()):
            raise InvalidArgumentError(f"expected a DeviceBackend, not {type(backend).__name__}")
        copies = self.devices if self.devices is not None else DeviceCopies()
        if int(loc) in copies.backends:
            raise InvalidArgumentError(f"the {loc.name.lower()} location already has a backend")
        copies.backends[int(loc)] = backend  # an instance of the bound DeviceBackend class
        self.devices = copies

    def create(self, count: int, size: Any, location: Any, metadata: Any) -> int:
        if size is None:
            size = self.config.page_size_default
        elif type(size) is not int or not 0 < size <= MAX_PAGE_SIZE:
            size = check_size(size)
        if type(count) is not int:
            if isinstance(count, bool) or not isinstance(count, np.integer):
                raise InvalidArgumentError(f"page count must be an int ≥ 0, not {count!r}")
            count = int(count)
        if count < 0:
            raise InvalidArgumentError(f"page count must be an int ≥ 0, not {count!r}")
        # Metadata first: a refused call must not have made a device backend.
        meta = normalize_metadata(metadata) if metadata else None
        loc = PageLocation.CPU if location == "cpu" else self.check_location(location, size)
        self.enter()
        try:
            first = self.table.next_id
            if count > 1 or first >= self.table.capacity:
                self.check_room(count, size)
            if count:
                if loc is PageLocation.CPU:
                    self.commit(PageCreate(first, count, size, int(loc), meta))
                else:
                    self._create_on_device(first, count, size, loc, meta)
                if self.events.active:
                    for pid in range(first, first + count):
                        self.emit(EventType.PAGE_CREATED, pid)
            return first
        finally:
            self.leave()

    def create_one(self, size: Any) -> int:
        """``create(1, size, "cpu", None)``: one zero-filled cpu page without metadata;
        returns its id. :func:`create_page` calls it when its own one-frame case (the
        open creation run continued) does not apply. The common case here (an in-memory
        log without a sink, logging on, not in a batch or a nested call, a row free in
        the page table, a free-listed slot or room in the current arena chunk) takes no
        general path: the slot is taken first (it needs no new memory, so it cannot
        fail), then the creation is logged (the open run extended, or a record
        appended; the slot is freed again if that fails), then the table row is filled.
        Anything else takes ``create``, with its refusals. The creation cursor there was
        is counted and dropped first; when the open run was extended, a new one is
        left for create_page's one frame (see :class:`CreationCursor`). O(1), O(size)
        to zero a reused slot.
        """
        lock = self.lock
        lock.acquire()
        t = self.table
        if t.creating is not None:
            # The cursor's creations are counted before the arena is used (its bump
            # offset), and the cursor is dropped: this creation takes one id and one
            # LSN, as the cursor's do, so a cursor left in place would go on as if
            # its run were still the newest entry.
            self.drop_cursor()
        pid = t.next_id
        log = self.log
        if size is None:
            size = self.config.page_size_default
        if (type(size) is not int or not 0 < size <= MAX_PAGE_SIZE or pid >= len(t.flags)
                or self.call_depth or self.closed or self.bus is not None or log.sink is not None
                or not self.config.enable_logging):
            # A batch and a running recompute function hold the lock entered (call_depth):
            # both take the general path, which refuses them.
            lock.release()
            return self.create(1, size, "cpu", None)
        arena = self.arena
        addr = arena.alloc_ready(size)
        if addr < 0:
            lock.release()
            return self.create(1, size, "cpu", None)
        try:
            extended = log.extend_creation(pid, size, 0)
            if not extended:
                log.append(PageCreate(pid, 1, size, 0, None))
        except BaseException:
            arena.free(addr, size)
            lock.release()
            raise
        try:
            # Rows past next_id are all zero (PageTable._check), so epoch 0 and the cpu
            # location are already there.
            addr_v, size_v, _epoch_v, flags_v = t.views
            addr_v[pid] = addr
            size_v[pid] = size
            flags_v[pid] = LIVE
            t.next_id = pid + 1
            t.live_count += 1
            self.counters.logged[0] += 1
            if self.events.active:
                self.event_queue.append((_PAGE_CREATED, (pid,)))
            # A run continued here goes on through create_page's cursor while its slots
            # come from the current chunk (no slot is free-listed) and the table has
            # their rows. A run just opened makes none: creations of changing sizes,
            # or each after a write, open a run each and would never use it.
            cls = arena._classes.get(size) if extended else None
            if cls is not None and not arena.bytes_free_listed and arena._cur >= 0:
                run = log.structs[-1]
                assert type(run) is _CreateRun
                bump = arena._bump
                t.creating = CreationCursor(
                    size, cls, min(len(flags_v), pid + 1 + (CHUNK_SIZE - bump) // cls),
                    log.next_lsn - pid - 1, arena._cur << CHUNK_SHIFT, bump, pid + 1,
                    run.timestamp, run.offsets)
        finally:
            lock.release()
        if self.event_queue and not getattr(self._delivering, "on", False):
            self._deliver_queued()
        return pid

    def _create_on_device(self, first: int, count: int, size: int, loc: PageLocation,
                          meta: dict[str, Any] | None) -> None:
        """Create device pages: their device slots are taken first (a device out of
        memory refuses the call before anything is logged), then the creation is
        logged and applied (the host mirrors), then the slots are bound, zero-filled
        like the mirrors at epoch 0."""
        copies = self.devices
        assert copies is not None  # check_location made it
        self.refuse_structural("PageCreate")  # before any slot is taken
        if loc is PageLocation.UNIFIED and copies.managed(self):
            # Unified pages in managed memory: their managed slots are taken first, the
            # creation is logged and the pages are placed in them (no ordinary slot is
            # taken on the way).
            addrs = copies.take_managed(self, count, size)
            rec = PageCreate(first, count, size, int(loc), meta)
            try:
                try:
                    self.table.reserve(first + count)
                except MemoryError:
                    raise InvalidArgumentError(
                        f"{count} page rows need more memory than this process can get; "
                        "nothing was logged or changed") from None
                self.log_append(rec)
            except BaseException:
                for addr in addrs:
                    self.arena.free(addr, size)
                raise
            _place_create(self, rec, np.asarray(addrs, dtype=np.int64))
            return
        slots = copies.take_slots(self, int(loc), count, size)
        try:
            self.commit(PageCreate(first, count, size, int(loc), meta))
        except BaseException:
            copies.give_back(int(loc), slots)
            raise
        for k, slot in enumerate(slots):
            copies.bind(first + k, int(loc), slot, 0)

    def migrate(self, page_id: Any, location: Any) -> int:
        """migrate_page: log a PageMigrate and move the page's device copy. A move to a
        device takes the new slot and copies the mirror's bytes into it first, so a
        device out of memory refuses the call before anything is logged. Same bytes,
        same epoch. Returns the page id.

        Raises:
            PageNotFoundError; UnsupportedLocationError; GPUMemoryError.
        """
        loc = coerce_location(location)
        self.enter()
        try:
            pid = self.require_page(page_id, "migrate_page")
            old = PageLocation(int(self.table.loc[pid]))
            if old is loc:
                return pid
            self.refuse_structural("PageMigrate")  # before any slot is taken
            size = int(self.table.size[pid])
            self.check_location(loc, size)
            managed = self.arena.is_managed(int(self.table.addr[pid]))
            if loc is PageLocation.CPU:
                self._migrate_bytes(pid, PageMigrate(pid, int(loc)), managed, False)
            else:
                copies = self.devices
                assert copies is not None
                if loc is PageLocation.UNIFIED and copies.managed(self):
                    # The bytes move into managed memory: no device copy.
                    self._migrate_bytes(pid, PageMigrate(pid, int(loc)), managed, True)
                else:
                    (slot,) = copies.take_slots(self, int(loc), 1, size)
                    try:
                        copies.backends[int(loc)].copy_in(slot, self.page_view(pid))
                        self._migrate_bytes(pid, PageMigrate(pid, int(loc)), managed, False)
                    except BaseException:
                        copies.give_back(int(loc), [slot])
                        raise
                    copies.bind(pid, int(loc), slot, int(self.table.epoch[pid]))
            self.emit(EventType.PAGE_MIGRATED, pid, old, loc)
            return pid
        finally:
            self.leave()

    def _migrate_bytes(self, pid: int, rec: PageMigrate, managed: bool, to_managed: bool) -> None:
        """Log and apply ``rec``, moving the page's bytes between ordinary and managed
        arena memory when ``managed`` (where they are) differs from ``to_managed``: the
        new slot is taken and filled before anything is logged, and given back if
        logging fails."""
        if managed is to_managed:
            self.commit(rec)
            return
        size = int(self.table.size[pid])
        copies = self.device_copies()
        new = (copies.take_managed(self, 1, size)[0] if to_managed
               else copies.ordinary_slot(self, size))
        try:
            self.arena.view(new, size)[:] = self.page_view(pid)
            self.commit(rec)
        except BaseException:
            self.arena.free(new, size)
            raise
        copies.rebase(self, pid, new)

    def rehome(self, pid: int) -> None:
        """After a clone or a resize gave unified page ``pid`` an ordinary slot: move its
        bytes into managed memory when the unified backend has it at hand. Where it
        cannot (no backend here, out of managed memory), the page keeps the ordinary
        slot and a device copy, and its next device use tries again (and raises)."""
        copies = self.devices
        if copies is None or int(self.table.loc[pid]) != int(PageLocation.UNIFIED):
            return
        try:
            copies.home(self, pid)
        except GPUMemoryError:
            return

    def device_copies(self) -> DeviceCopies:
        """The state's DeviceCopies, made when missing (a state built by replay has
        device pages without one: their backends are made on their first device use)."""
        copies = self.devices
        if copies is None:
            copies = self.devices = DeviceCopies()
        return copies

    def device_view(self, page_id: Any) -> Any:
        """Page.device_array: a read-only view of the page's device copy, brought up to
        date from the host mirror first when it is stale.

        Raises:
            PageNotFoundError; InvalidArgumentError: a cpu page; GPUMemoryError.
        """
        self.enter()
        try:
            pid = self.require_page(page_id, "device_array")
            loc = check_device_page(self, pid, "device_array")
            copies = self.device_copies()
            if copies.home(self, pid):
                # Managed memory: the device reads the page's own bytes.
                return copies.backend(self, loc).memory_view(self.page_view(pid),
                                                             self._still_at(pid))
            b, slot, _ = copies.current(self, pid)
            return b.view(slot)
        finally:
            self.leave()

    def _still_at(self, pid: int) -> Callable[[], bool]:
        """A test that page ``pid``'s bytes are still where they are now (same arena,
        slot and size, page live)."""
        arena, addr, size = self.arena, int(self.table.addr[pid]), int(self.table.size[pid])

        def alive() -> bool:
            t = self.table
            return (self.arena is arena and t.is_live(pid) and int(t.addr[pid]) == addr
                    and int(t.size[pid]) == size)
        return alive

    def unified_hint(self, page_id: Any, fn: str, prefetch: str | None = None,
                     stream: Any = None, preferred: str | None = None,
                     read_mostly: bool | None = None) -> Any:
        """prefetch_to_gpu/_cpu, set_preferred_location, set_read_mostly: a hint for a
        unified page's managed memory (its bytes are moved there first when they are
        not). Returns the prefetch's ticket, else None.

        Raises:
            PageNotFoundError; InvalidArgumentError: not a unified page, or a bad hint;
            GPUMemoryError: the unified location is not usable here, has no managed
            memory, or the driver refused the hint.
        """
        self.enter()
        try:
            pid = self.require_page(page_id, fn)
            loc = int(self.table.loc[pid])
            if loc != int(PageLocation.UNIFIED):
                raise InvalidArgumentError(
                    f"{fn}(): page {pid} is a {PageLocation(loc).name.lower()} page; "
                    "memory hints apply to unified pages (migrate_page(state, page, "
                    "'unified') first)")
            copies = self.device_copies()
            b = copies.backend(self, loc)
            if not copies.home(self, pid):
                raise GPUMemoryError(
                    f"{fn}(): the unified location here keeps page {pid} as a host mirror and "
                    "a device copy, not in managed memory"
                    + (" (inside a batch pages are not moved; call it after the batch)"
                       if self.batch_frame is not None else
                       f" (its backend, {b.device_name()}, has no managed memory)"))
            view = self.page_view(pid)
            if prefetch is not None:
                return b.prefetch_memory(view, prefetch, stream)
            b.advise_memory(view, preferred=preferred, read_mostly=read_mostly)
            return None
        finally:
            self.leave()

    def sync_to_device(self, page_ids: Iterable[Any], fn: str) -> list[int]:
        """Bring the device copies of ``page_ids`` up to date from their mirrors, then
        wait until the copies have landed. Returns the pages whose bytes were copied.

        Raises:
            PageNotFoundError; InvalidArgumentError: a cpu page; GPUMemoryError.
        """
        self.enter()
        try:
            return self.sync_device_pages(self._device_pages(page_ids, fn))
        finally:
            self.leave()

    def _device_pages(self, page_ids: Iterable[Any], fn: str) -> list[int]:
        """The ids of ``page_ids``, each a live gpu or unified page (caller holds the
        lock). Raises PageNotFoundError, or InvalidArgumentError for a cpu page."""
        pids = [self.require_page(p, fn) for p in page_ids]
        for pid in pids:
            check_device_page(self, pid, fn)
        return pids

    def sync_to_device_async(self, page_ids: Iterable[Any], fn: str) -> DeviceSync:
        """sync_to_device queued on the backends' streams without waiting: returns the
        handle (``wait()``, ``done()``). Unified pages in managed memory need no copy.

        Raises:
            PageNotFoundError; InvalidArgumentError: a cpu page; GPUMemoryError.
        """
        self.enter()
        try:
            return self.device_copies().refresh(self, self._device_pages(page_ids, fn),
                                                asynchronous=True)
        finally:
            self.leave()

    def sync_device_pages(self, pids: list[int]) -> list[int]:
        """sync_to_device without the checks (caller holds the lock; live device pages):
        the stale copies of each backend in one batch, then a wait."""
        return self.device_copies().refresh(self, pids).pages

    def write_device_input(self, page_id: Any, offset: Any, data: Any, source: str,
                           whole: bool) -> bool:
        """write_bytes for ``data`` that may live on a device (a CUDA array or a DLPack
        exporter). On a device page the write is diffed on the page's backend against
        its device copy, which takes the new bytes in the same call
        (``diff(apply=True)``); only the changes come back, to be logged and applied to
        the host mirror. On a cpu page the data is read as host bytes. Returns True if
        a delta was logged.

        Raises:
            PageNotFoundError; InvalidDeltaError: the write runs outside the page, or the
            data cannot be read; GPUMemoryError.
        """
        fn = "update_page" if whole else "write_page"
        self.enter()
        try:
            pid = self.require_page(page_id, fn)
            t = self.table
            if int(t.loc[pid]) == 0:
                return self.write_bytes(pid, offset, as_host_bytes(data), source, whole)
            size = int(t.size[pid])
            nbytes = getattr(data, "nbytes", None)
            if isinstance(nbytes, bool) or not isinstance(nbytes, int | np.integer):
                raise InvalidDeltaError(
                    f"data of type {type(data).__name__} does not say its length (nbytes); "
                    "pass a CuPy, PyTorch or numpy array", page_id=pid)
            n_new = int(nbytes)
            off = write_range(pid, offset, n_new, size, whole)
            check_source(source)
            t0 = time.perf_counter_ns()
            copies = self.device_copies()
            # Read first: unreadable data is refused before the page is moved into
            # managed memory or its device copy brought up to date.
            data = copies.backend(self, int(t.loc[pid])).read_contents(data)
            if len(data) != n_new:
                raise InvalidDeltaError(
                    f"data says it holds {n_new} bytes (nbytes) but {len(data)} were read; "
                    "pass a contiguous CuPy, PyTorch or numpy array", page_id=pid)
            epoch = int(t.epoch[pid])
            if copies.home(self, pid):
                # Managed memory: diffed on the device against the page's own bytes;
                # the logged changes are then written into that memory by the host.
                changes = copies.backend(self, int(t.loc[pid])).diff_memory(
                    self.page_view(pid), data, off)
                if changes is None:
                    return False
                d = changes.to_delta(self.next_delta_id, pid, epoch, source)
                self.next_delta_id += 1
                view = self.page_view(pid)
                lsn = self.log_append(d)
                if self.batch_frame is not None:
                    self.batch_frame.save(view, d)
                apply_delta(view, d)
                t.epoch[pid] = d.epoch
                self.after_delta(d, t0, lsn)
                return True
            b, slot, _ = copies.current(self, pid)
            # From here the device copy may take the new bytes before the delta is
            # logged: until it is, and the mirror follows, the copy counts as stale.
            copies.epochs[pid] = -1
            try:
                changes = b.diff(slot, data, off, apply=True)
            except MMSBError:
                # Refused before anything was written (the backend checks first).
                copies.epochs[pid] = epoch
                raise
            if changes is None:
                copies.epochs[pid] = epoch
                return False
            d = changes.to_delta(self.next_delta_id, pid, epoch, source)
            self.next_delta_id += 1
            view = self.page_view(pid)
            if self.batch_frame is not None:
                lsn = self.log_append(d)
                self.batch_frame.save(view, d)
            else:
                lsn = self.log_append(d)
            apply_delta(view, d)
            t.epoch[pid] = d.epoch
            copies.epochs[pid] = d.epoch
            self.after_delta(d, t0, lsn)
            return True
        finally:
            self.leave()

    def check_room(self, count: int, size: int) -> None:
        """Refuse creations past the id space or the machine's memory, before anything is
        logged (a page table indexed by id grows with the highest id)."""
        first = self.table.next_id
        if first + count - 1 > MAX_PAGE_ID:
            raise InvalidArgumentError(
                f"creating {count} page(s) from id {first} passes the largest page id "
                f"{MAX_PAGE_ID}")
        need = creation_cost(self, count, size)
        if need > physical_memory():
            raise InvalidArgumentError(
                f"creating {count} page(s) of {size} bytes needs {need:,} bytes, more than "
                "this machine's memory")

    def write_bytes(self, page_id: Any, offset: Any, data: Any, source: str, whole: bool) -> bool:
        """The write path of update_page/write_page. Returns True if a delta was logged.

        Cost: O(bytes written) to compare, O(changed bytes) to keep and apply.
        """
        t0 = time.perf_counter_ns()
        tp = type(data)
        if tp is bytes or (tp is np.ndarray and data.dtype == np.uint8 and data.ndim == 1):
            new = data
        elif is_device_input(data):
            return self.write_device_input(page_id, offset, data, source, whole)
        else:
            new = as_bytes_array(data)
        self.enter()
        try:
            t = self.table
            if type(page_id) is int and 0 < page_id < len(t.flags) and t.flags[page_id]:
                pid = page_id
            else:
                pid = self.require_page(page_id, "update_page" if whole else "write_page")
            size = t.size.item(pid)
            n_new = len(new)
            off = write_range(pid, offset, n_new, size, whole)
            if type(source) is not str or source not in _GOOD_SOURCES:
                check_source(source)
            addr = t.addr.item(pid)
            frame = self.batch_frame
            if (n_new <= SMALL_WRITE and self.log.sink is None and self.config.enable_logging
                    and (frame is None or frame.direct)):
                if frame is not None and pid not in frame.touched:
                    frame.touch(pid)
                return self._write_compiled(pid, addr, size, off, new, source, t0)
            if frame is not None and self.bus is not None and not frame.direct:
                # A durable batch: the write staged for the batch's one compiled commit
                # (see _storage/fastbatch.py), unless that path declines it.
                staged = self.bus.stage_write(self, frame, pid, off, new, source, t0)
                if staged is not None:
                    return staged
            view = self.arena.view(addr, size)
            if tp is bytes:
                new = np.frombuffer(new, np.uint8)
            d = diff_write(self.next_delta_id, pid, t.epoch.item(pid), view, off, new, source)
            if d is None:
                return False
            self.next_delta_id += 1
            if self.batch_frame is not None:
                lsn = self.log_append(d)
                self.batch_frame.save(view, d)
            elif self.plain_log:
                lsn = self.log.append_delta(d)[0]
            else:
                lsn = self.log_append(d)
            apply_delta(view, d)
            t.epoch[pid] = d.epoch
            if self.devices is not None and pid in self.devices.slots:
                self.devices.follow(pid, d, d.base_epoch)
            self.after_delta(d, t0, lsn)
            return True
        finally:
            self.leave()

    def batch_write(self, page_id: Any, offset: Any, data: Any, source: str) -> bool:
        """``write_bytes(page_id, offset, data, source, False)`` for a caller that holds
        the state's lock (entered) inside a batch it began: on a durable bus, ``bytes``
        into a live page, in range, from a known kind of source, go straight to the
        bus's staged batch (see _storage/fastbatch.py) without entering again; anything
        else, and whatever that path declines, takes ``write_bytes``. Returns True if a
        delta was logged. O(len(data))."""
        frame = self.batch_frame
        bus = self.bus
        if (bus is not None and frame is not None and not frame.direct and type(data) is bytes
                and type(page_id) is int and type(offset) is int and self.call_depth
                and self.recomputing is None and not self.closed
                and (source is _API or (type(source) is str and source in _GOOD_SOURCES))):
            t = self.table
            if (0 < page_id < len(t.flags) and t.flags[page_id] and offset >= 0
                    and offset + len(data) <= t.size.item(page_id)):
                staged = bus.stage_write(self, frame, page_id, offset, data, source,
                                         time.perf_counter_ns())
                if staged is not None:
                    return staged
        return self.write_bytes(page_id, offset, data, source, False)

    def write_small_bytes(self, pid: int, off: int, data: bytes, source: str,
                          whole: bool = False) -> bool | None:
        """write_page's (and, ``whole``, update_page's) common case in one frame: ``pid``
        and ``off`` ints, ``data`` bytes of at most SMALL_WRITE, a log without a sink, no
        batch, no bus. It does what
        write_bytes → _write_compiled → TransactionLog.write_small do, with their checks,
        without their calls (each costs a tenth of a microsecond or more on a path that
        takes about two). On a durable bus the bus's own one-frame path takes the call
        (``DurableBus.write_small``, which also writes the log frame). Returns
        True/False as write_bytes does (a delta logged or not), or None when the call is
        not that case and write_bytes must take it (nothing was done). O(len(data)),
        O(page size) for a dense write."""
        log = self.log
        # write_small_counted's compiled entry, once it is made (with write_small's).
        kernel = _small_entries.get(3)
        if self.bus is not None:
            # A durable bus has its own one-frame path (it writes the log frame too).
            return self.bus.write_small(self, pid, off, data, source, whole)
        if (log.sink is not None or not self.config.enable_logging
                or len(data) > SMALL_WRITE or kernel is None):
            return None
        t0 = time.perf_counter_ns()
        lock = self.lock
        lock.acquire()
        try:
            frame = self.batch_frame
            if self.closed or self.recomputing is not None or (frame is not None
                                                               and not frame.direct):
                return None  # write_bytes raises the error the state is in, or takes it
            addr_v, size_v, epoch_v, flags_v = self.table.views
            if not (0 < pid < len(flags_v) and flags_v[pid]):
                return None
            size = size_v[pid]
            n_new = len(data)
            if off < 0 or off + n_new > size or (whole and n_new != size) or (
                    source is not _API and (type(source) is not str
                                            or source not in _GOOD_SOURCES)):
                return None
            # Nothing below calls out of this frame until the write is logged and applied
            # (no handler, no recompute function), so the call is marked entered
            # (call_depth) only around the calls that can.
            if frame is not None:
                if frame.writes:
                    log_buffered(self, frame)
                if pid not in frame.touched:
                    frame.touch(pid)
            addr = addr_v[pid]
            epoch = epoch_v[pid] + 1
            mem = self.arena._chunks[addr >> CHUNK_SHIFT]  # Arena.chunk, inlined
            # TransactionLog.write_small, inlined.
            row = log.n
            if row == len(log.rows):
                log._grow()
            if log.cur < 0:
                log._new_chunk()
            ts = time.time_ns()
            if ts < log.last_timestamp:
                ts = log.last_timestamp
            lsn = log.next_lsn
            src = log.source_ids.get(source)
            if src is None:
                src = log._source_id(source, row)
            # The compiled call records the write's counters (delta_apply's sample, from
            # t0 to when the delta is logged and applied, and the logged record and
            # bytes) unless events or propagation follow: after_write records them then.
            c = self.counters
            counted = -1 if self.events.active or pid in self.graph.children else t0
            while True:
                tail = log.tail
                n, plen = kernel(mem, addr & CHUNK_MASK, size, off, data, log.rows, row,
                                 log.cur_array, tail, pid, epoch, ts, src, log.cur, c.consts,
                                 counted)
                if n != -2:
                    break
                log._new_chunk()
            if n <= 0:
                return False
            changed = n if n * 4 <= size else size
            # TransactionLog.write_small's tail, inlined as in the durable one-frame
            # write (a method call per write costs about 0.1 µs): keep the three alike.
            log.tail = tail + plen
            log.n = row + 1
            lsns = log.lsns
            ids = log.ids
            did = self.next_delta_id
            if lsn != lsns.last + 1 or did != ids.last + 1 or not row:
                # A new run of consecutive LSNs or delta ids starts at this row (one
                # test for both in the common case, where both runs go on).
                if lsn != lsns.last + 1 or not row:
                    lsns.rows.append(row)
                    lsns.vals.append(lsn)
                if did != ids.last + 1 or not row:
                    ids.rows.append(row)
                    ids.vals.append(did)
            lsns.last = lsn
            ids.last = did
            rows = log.index.get(pid)
            if rows is None:
                log.index[pid] = array("I", [row])
            else:
                rows.append(row)
            log.payload_bytes += plen
            log.next_lsn = lsn + 1
            log.last_timestamp = ts
            # _write_compiled's tail.
            self.next_delta_id = did + 1
            epoch_v[pid] = epoch
            if counted < 0:
                # Events and propagation run recompute functions and handlers: the call
                # counts as entered (call_depth) while they run, as in write_bytes.
                self.call_depth += 1
                try:
                    self.after_write(pid, epoch, did, lsn, t0, changed)
                finally:
                    self.call_depth -= 1
                return True
            if row >= self.compact_at and not self.propagating and not self.batch_depth:
                self.call_depth += 1
                try:
                    self.auto_compress()
                finally:
                    self.call_depth -= 1
            return True
        finally:
            if self.event_queue and self.call_depth == 0 and not getattr(self._delivering, "on", False):
                lock.release()
                self._deliver_queued()
            else:
                lock.release()

    def write_recomputed(self, pid: int, data: np.ndarray) -> bool:
        """write_bytes(pid, 0, data, "propagation", True) for a propagation pass, which
        holds the lock and has checked the page and the length (``data`` is 1-D uint8 of
        the page's size): a log without a sink takes the compiled small-write path with
        no check repeated. Returns True if a delta was logged. O(page size)."""
        t = self.table
        size = t.views[1][pid]
        if (size > SMALL_WRITE or self.batch_frame is not None or self.log.sink is not None
                or not self.config.enable_logging):
            return self.write_bytes(pid, 0, data, "propagation", True)
        return self._write_compiled(pid, t.views[0][pid], size, 0, data, "propagation",
                                    time.perf_counter_ns())

    def _write_compiled(self, pid: int, addr: int, size: int, off: int, new: Any,
                        source: str, t0: int) -> bool:
        """Log and apply a checked write of at most SMALL_WRITE bytes in one compiled
        pass (a log without a sink, outside a batch). True if a delta was logged."""
        epoch_v = self.table.views[2]
        epoch = epoch_v[pid] + 1
        mem = self.arena.chunk(addr >> CHUNK_SHIFT)
        assert mem is not None
        log = self.log
        c = self.counters
        # The compiled call records the counters unless events or propagation follow
        # (after_write records them then), as in write_small_bytes.
        follow = self.events.active or pid in self.graph.children
        lsn = log.write_small(mem, addr & CHUNK_MASK, size, off, new, pid, epoch,
                              self.next_delta_id, source, c.consts, -1 if follow else t0)
        if lsn == 0:
            return False
        did = self.next_delta_id
        self.next_delta_id = did + 1
        epoch_v[pid] = epoch
        if follow:
            self.after_write(pid, epoch, did, lsn, t0, log.last_changed)
            return True
        if not log.last_counted:
            # after_write() with no event to queue and no child to propagate to.
            c.delta_apply.add(time.perf_counter_ns() - t0)
            c.records_logged += 1
            c.payload_bytes_logged += log.last_changed
        if log.n > self.compact_at and not self.propagating and not self.batch_depth:
            self.auto_compress()
        return True

    def route(self, d: Delta) -> None:
        """Validate, log, apply and propagate a user-built delta (route_delta)."""
        self.enter()
        try:
            t = self.table
            pid = self.require_page(d.page_id, "route_delta")
            size = int(t.size[pid])
            if d.page_size != size:
                raise InvalidDeltaError(
                    f"delta was built for {d.page_size} bytes but the page has {size}",
                    page_id=pid, delta_id=d.id)
            epoch = int(t.epoch[pid])
            if d.base_epoch != epoch:
                raise InvalidDeltaError(
                    f"delta was built on epoch {d.base_epoch} but the page is at epoch {epoch} "
                    "(another write came first); rebuild it from the current page",
                    page_id=pid, delta_id=d.id)
            if d.epoch <= d.base_epoch:
                raise InvalidDeltaError(
                    f"delta epoch {d.epoch} must be greater than its base epoch {d.base_epoch}",
                    page_id=pid, delta_id=d.id)
            if d.lsn:
                raise InvalidDeltaError(
                    f"delta was already logged (LSN {d.lsn}); build a new one with create_delta",
                    page_id=pid, delta_id=d.id)
            t0 = time.perf_counter_ns()
            lsn = self.log_append(d)
            view = self.arena.view(int(t.addr[pid]), size)
            if self.batch_frame is not None:
                self.batch_frame.save(view, d)
            if d._exact:
                # Built on another copy of the page: only its mask says what to write.
                np.copyto(view, d._data, where=d._mask)
            else:
                apply_delta(view, d)
            t.epoch[pid] = d.epoch
            if self.devices is not None and pid in self.devices.slots:
                # The device copy follows lazily (an exact delta's bytes are not the
                # page's outside its mask).
                self.devices.epochs[pid] = -1
            self.after_delta(d, t0, lsn)
        finally:
            self.leave()

    def after_delta(self, d: Delta, t0: int, lsn: int) -> None:
        """Counters, events and propagation after a delta was logged and applied."""
        self.after_write(d.page_id, d.epoch, d.id, lsn, t0,
                         (d._vals if d._idx is not None else d._data).size)

    def after_write(self, pid: int, epoch: int, did: int, lsn: int, t0: int,
                    changed: int) -> None:
        """after_delta() from the delta's parts: ``changed`` payload bytes."""
        if self.events.active:
            self.emit(EventType.DELTA_APPLIED, pid, epoch, did, lsn)
            self.emit(EventType.PAGE_CHANGED, pid, epoch, did)
        if pid in self.graph.children and not self.propagating:
            if self.batch_depth or self.propagation_mode is not _IMMEDIATE:
                self.pending.add(pid)
            else:
                self.propagate({pid})
        c = self.counters
        c.delta_apply.add(time.perf_counter_ns() - t0)
        c.records_logged += 1
        c.payload_bytes_logged += changed
        # A durable bus bounds its log by checkpoints (and its log may be deferred).
        if self.bus is None and self.log.n > self.compact_at and not self.propagating \
                and not self.batch_depth:
            self.auto_compress()

    def auto_compress(self, min_rows: int = 0) -> None:
        """Start or advance the incremental compaction of an in-memory log (a bounded
        step; see _core/compaction.py)."""
        if self.bus is not None:
            return  # a durable bus bounds its log by checkpoints and retention instead
        compaction_step(self, min_rows)

    def propagate(self, sources: set[int], forced: frozenset[int] = frozenset()) -> None:
        t0 = time.perf_counter_ns()
        self.propagating = True
        try:
            run_propagation(self, sources, forced)
        finally:
            self.propagating = False
            self.counters.propagation.add(time.perf_counter_ns() - t0)

    def commit_metadata(self, pid: int, meta: dict[str, Any], source: str = "api") -> bool:
        """Log and apply a metadata change (caller holds the lock). False if unchanged."""
        if self.table.meta.get(pid, {}) == meta:
            return False
        self.commit(MetadataSet(pid, meta, source))
        self.emit(EventType.METADATA_CHANGED, pid)
        return True

    # -- batches ---------------------------------------------------------------------
    def begin_batch(self) -> None:
        """Start (or nest into) a batch; caller holds the lock via _enter()."""
        if self.batch_depth == 0:
            self.batch_frame = _BatchFrame(self)
        self.batch_depth += 1

    def end_batch(self, ok: bool) -> None:
        """Leave a batch; the outermost one commits its records in one append (then
        propagates once), or, on failure, undoes every write it made."""
        self.batch_depth -= 1
        if self.batch_depth:
            return
        frame, self.batch_frame = self.batch_frame, None
        assert frame is not None
        if not ok:
            frame.rollback()
            return
        if frame.mark is not None:
            rows0 = frame.mark[0]
        else:
            rows0 = self.log.n if self.bus is None else 0  # a bus never compacts in memory
        try:
            if frame.writes:
                log_buffered(self, frame)
            if frame.staged is None or not self._commit_staged(frame):
                self.log.append_held(frame.records)
        except BaseException:
            frame.rollback()
            raise
        c = self.counters
        c.log_append.add(0)
        if not self.config.enable_logging and frame.records:
            for rec in frame.records:
                if not isinstance(rec, DeltaGroup):
                    self._forget(rec, rec.lsn)
        if self.pending and self.propagation_mode is not PropagationMode.DEFERRED:
            pending = {p for p in self.pending if self.table.is_live(p)}
            self.pending.clear()
            if pending:
                self.propagate(pending)
        if self.bus is None and self.log.n > self.compact_at:
            # A compaction in progress folds at least twice what the batch logged.
            self.auto_compress(2 * max(0, self.log.n - rows0))

    def _commit_staged(self, frame: _BatchFrame) -> bool:
        """End a batch of staged writes on the bus's compiled path; False when its
        writes became held records instead (then the general path ends it)."""
        bus = self.bus
        assert bus is not None
        return bus.commit_staged(self, frame)

    # -- invariants ------------------------------------------------------------------
    def _check(self) -> None:
        """Assert every invariant of the table, arena, log and graph."""
        with self.lock:
            self.count_creations()
            t = self.table
            t._check()
            live = t.live_ids()
            self.arena._check([(int(t.addr[i]), int(t.size[i])) for i in live])
            self.log._check()
            self.graph._check()
            for node in self.graph.nodes:
                assert t.is_live(node), f"edge kept for dead page {node}"
            for pid in self.recompute_fns:
                assert t.is_live(pid), f"recompute function kept for dead page {pid}"
            if self.devices is not None:
                self.devices._check(self)
            if self.config.enable_logging:
                for pid in live.tolist():
                    deltas = self.log.by_page.get(pid, [])
                    if deltas:
                        assert deltas[-1].epoch == t.epoch[pid], f"page {pid} epoch off its log"

    def base_bytes(self) -> bytes:
        """The replay base as checkpoint bytes (b"" when there is none)."""
        return b"" if self.replay_base is None else self.replay_base.raw()

    # -- whole-state images ----------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A deep copy of the state as a :class:`Snapshot` (caller holds the lock). The
        records are shared: they are immutable. O(pages + page bytes)."""
        t = self.table
        ids = t.live_ids().astype(np.int64)
        sizes = t.size[ids].astype(np.int64)
        data = np.empty(int(sizes.sum()), np.uint8)
        pos = 0
        for pid, size in zip(ids.tolist(), sizes.tolist(), strict=True):
            data[pos:pos + size] = self.page_view(pid)
            pos += size
        log = self.log
        return Snapshot(
            log.last_lsn, t.next_id, self.next_delta_id, ids, sizes, t.epoch[ids].copy(),
            t.loc[ids].copy(), data, {pid: dict(m) for pid, m in t.meta.items()},
            {pid: (m.copy(), lsn) for pid, (m, lsn) in self.mask_base.items()},
            self.graph.edges(), ColumnRecords(log.columns()), log.horizon_lsn, log.last_timestamp,
            {"horizon_timestamp": log.horizon_timestamp}, self.replay_base,
            self.orphan_from, None)

    def restore(self, snap: Snapshot, *, fresh: bool = False) -> None:
        """Replace everything but the lock, config, subscriptions, counters and the
        durable sink with ``snap`` (caller holds the lock). Fresh tables are built first
        and swapped in, so a failure changes nothing. ``fresh``: the state was built to
        be restored (a durable bus's recovery) and nothing keeps its parts to put them
        back: its page table, which never held a page, is filled in place, last, when
        nothing else can fail, instead of a second one being built.
        O(pages + page bytes + records)."""
        n = int(snap.ids.size)
        rows = int(snap.ids[-1]) + 1 if n else 0
        arena = Arena()
        graph = ShadowPageGraph()
        adopted = arena.adopt(snap.data, snap.sizes) if snap.owned and n else None
        cur = self.table
        reuse = (fresh and adopted is not None and cur.next_id == 1 and not cur.meta
                 and len(cur.flags) >= rows)
        t = cur if reuse else PageTable(max(rows + rows // 4, 64))  # room for creations
        if adopted is not None:
            # The snapshot's buffer becomes the arena's: the pages stay where the file
            # was read, no copy.
            if not reuse:
                t.set_rows(snap.ids, adopted, snap.sizes, snap.epochs, snap.locs)
        elif n:
            # Group runs of consecutive ids of one size: one bulk allocation each.
            ids, sizes = snap.ids, snap.sizes
            brk = np.flatnonzero((np.diff(ids) != 1) | (np.diff(sizes) != 0)) + 1
            starts = np.concatenate(([0], brk)).tolist()
            stops = np.concatenate((brk, [n])).tolist()
            offsets = np.concatenate(([0], np.cumsum(sizes)))
            for a, b in zip(starts, stops, strict=True):
                size = int(sizes[a])
                addrs = arena.alloc_many(b - a, size)
                t.add_rows(int(ids[a]), addrs, size, 0)
                src = snap.data[int(offsets[a]) : int(offsets[b])]
                if b - a == 1 or bool((np.diff(addrs) == size).all()):
                    arena.view(int(addrs[0]), size * (b - a))[:] = src
                else:
                    for k, addr in enumerate(addrs.tolist()):
                        arena.view(addr, size)[:] = src[k * size : (k + 1) * size]
            t.epoch[ids] = snap.epochs
            t.loc[ids] = snap.locs
        meta = {pid: dict(m) for pid, m in snap.metadata.items() if m}
        for p, c, et in snap.edges:
            graph.add_edge(p, c, et)
        if isinstance(snap.records, ColumnRecords):
            # A log held as columns: built from them in one go (the snapshot may be
            # restored again: its columns are only read).
            log = TransactionLog.from_columns(snap.records.cols, adopt=snap.owned)
        elif not snap.records and _untouched(self.log):
            # The log this state was built with, never written: as good as a new one
            # (a durable bus's open restores its newest checkpoint into a new state).
            log = self.log
            log.generation += 1
        else:
            log = TransactionLog()
            log.replace_all(snap.records)
        log.next_lsn = snap.lsn + 1
        log.last_timestamp = max(log.last_timestamp, snap.last_timestamp)
        log.horizon_lsn = snap.horizon_lsn
        ht = snap.info.get("horizon_timestamp", 0)
        log.horizon_timestamp = ht if isinstance(ht, int) else 0
        log.sink, log.sink_many = self.log.sink, self.log.sink_many
        if reuse:
            assert adopted is not None
            t.set_rows(snap.ids, adopted, snap.sizes, snap.epochs, snap.locs)
        t.next_id = snap.next_page_id
        t.meta = meta
        self.arena = arena
        self.table = t
        self.log = log
        self.graph = graph
        self.graph._owner = weakref.ref(self)
        self.mask_base = dict(snap.masks)
        self.next_delta_id = snap.next_delta_id
        self.replay_base = snap.base
        self.orphan_from = snap.log_from_lsn if snap.log_from_lsn and snap.base is None else 0
        self.recompute_fns = {pid: fn for pid, fn in self.recompute_fns.items() if t.is_live(pid)}
        self.pending.clear()
        self.forced.clear()
        self.compaction = None
        if self.devices is not None:
            # Other pages under the same ids, maybe at the same epochs: the device copies
            # are made again from the restored mirrors on their next use.
            self.devices.drop_all()
        snap.owned = False

    def refuse_in_batch(self, what: str) -> None:
        """Calls that read or replace the whole log cannot run inside an open batch,
        whose records are held back until it ends."""
        if self.batch_frame is not None:
            raise InvalidArgumentError(
                f"{what} cannot run inside an open batch (its writes are not in the log "
                "yet); call it after the batch ends")

    def require_replayable(self, what: str) -> None:
        """Replays need the log to rebuild the state from its start or replay base."""
        self.refuse_in_batch(what)
        self.require_history(what)
        if self.orphan_from:
            raise HistoryUnavailableError(
                f"{what} needs history this state does not have: its log starts after LSN "
                f"{self.orphan_from} and the checkpoint it came from did not carry what "
                "precedes it (a durable bus keeps that in its other checkpoint files: open "
                "the bus directory instead)")

    def require_history(self, what: str) -> None:
        if not self.config.enable_logging:
            raise HistoryUnavailableError(
                f"{what} needs the transaction log, but this state has enable_logging=False")


def _untouched(log: TransactionLog) -> bool:
    """Whether ``log`` is a plain log as a new state makes it, never written or
    replaced: no record, no payload chunk, no sink, LSNs from 1."""
    return (type(log) is TransactionLog and log.generation == 1 and log.next_lsn == 1
            and log.n == 0 and log.struct_count == 0 and not log.chunks
            and log.horizon_lsn == 0 and log.sink is None and log.sink_many is None)


def create_page(state: MMSBState, size: int | None = None, *, location: Any = "cpu",
                metadata: dict[str, Any] | None = None, gpu: bool = False) -> Page:
    """A new zero-filled page of ``size`` bytes (default ``config.page_size_default``),
    epoch 0, with the next id. O(1). ``gpu=True`` is ``location="gpu"``: a page with a
    device copy beside its host mirror (docs/Devices.md).

    Raises:
        InvalidArgumentError (a ValueError): size not a positive int; ``gpu`` not a bool
            or contradicting ``location``.
        UnsupportedLocationError: unknown location.
        GPUMemoryError: a GPU/unified page without a usable CUDA device, on a durable
            bus, or out of device memory.
        MetadataError: metadata msgpack cannot encode.
    """
    # The usual case runs in this one frame: a cpu page without metadata on an
    # in-memory state whose table holds a creation cursor (CreationCursor) of this
    # size, still valid (the log's next LSN minus the table's next id is the cursor's
    # gap: no record came in between, and no call entered the state since, which
    # drops the cursor), logging on, a row and a slot in the current arena chunk left
    # for it (the cursor's stop), under 2**32 ns after the run's first creation.
    # MMSBState.create_one, which every other case calls, opens or continues the run
    # the general way and makes the cursor; what the cursor holds was checked there
    # (the state open, no bus or sink, no nested call or batch, the run the newest
    # structural entry, no slot free-listed). The creation is logged first (the
    # offset's append is the only step that allocates), then the slot is taken from
    # the cursor, then the table row filled. The arena's bump offset and bytes in use
    # and the table's live count are brought up to date by count_creations, before
    # anything reads them (any call that enters, settle, len(state.pages), _check).
    if type(state) is MMSBState and location == "cpu" and not metadata and gpu is False:
        if size is None:
            size = state.config.page_size_default
        lock = state.lock
        lock.acquire()
        t = state.table
        cur = t.creating
        # The same int object as the run's size is the usual case (a constant).
        if cur is not None and (size is cur.size or type(size) is int and size == cur.size):
            pid = t.next_id
            log = state.log
            lsn = log.next_lsn
            if pid < cur.stop and lsn - pid == cur.gap and state.config.enable_logging:
                ts = time.time_ns()
                last = log.last_timestamp
                if ts < last:
                    ts = last
                off = ts - cur.t0
                if off < 4294967296:  # the offsets are 32-bit
                    try:
                        cur.offsets.append(off)
                    except BaseException:
                        lock.release()
                        raise
                    try:
                        log.struct_count += 1
                        log.next_lsn = lsn + 1
                        log.last_timestamp = ts
                        # The slot: the arena's bump offset and bytes in use, and the
                        # table's live count, are counted later (count_creations).
                        bump = cur.bump
                        cur.bump = bump + cur.cls
                        # Rows past next_id are all zero (PageTable._check): epoch 0 and
                        # the cpu location are already there.
                        addr_v, size_v, _epoch_v, flags_v = t.views
                        addr_v[pid] = cur.hi | bump
                        size_v[pid] = size
                        flags_v[pid] = LIVE
                        t.next_id = pid + 1
                        state.counters.creations_logged += 1
                        if state.events.active:
                            state.event_queue.append((_PAGE_CREATED, (pid,)))
                    finally:
                        lock.release()
                    if state.event_queue and not getattr(state._delivering, "on", False):
                        state._deliver_queued()
                    page = PageHandle()
                    page._state = state
                    page.id = pid
                    return page
        lock.release()
        page = PageHandle()
        page.id = state.create_one(size)
        page._state = state
        return page
    state = require_state(state, "create_page")
    if gpu is not False:
        location = gpu_flag_location(gpu, location, "create_page")
    return Page(state, state.create(1, size, location, metadata))



def write_range(pid: int, offset: Any, n_new: int, size: int, whole: bool) -> int:
    """Where a write of ``n_new`` bytes at ``offset`` lands in page ``pid`` of ``size``
    bytes (0 for ``whole``, update_page's write of the whole page).

    Raises:
        InvalidDeltaError: the length is not the page's (``whole``), the offset is not
            an int, or the write runs outside the page.
    """
    if whole:
        if n_new != size:
            raise InvalidDeltaError(
                f"data has {n_new} bytes but the page has {size}; update_page replaces "
                "the whole page (use write_page for a part)", page_id=pid)
        return 0
    if type(offset) is not int:
        if isinstance(offset, bool) or not isinstance(offset, np.integer):
            raise InvalidDeltaError(f"offset must be an int, not {offset!r}", page_id=pid)
        offset = int(offset)
    if offset < 0 or offset + n_new > size:
        raise InvalidDeltaError(
            f"write of {n_new} bytes at offset {offset} runs outside the page "
            f"(size {size})", page_id=pid)
    return offset

class _BatchFrame:
    """What an open batch holds back and how to undo it.

    On a log with a sink (the durable bus) the batch's records are stamped and held,
    then logged in one append when it ends. On an in-memory log (``direct``) they are
    logged at once, as rows, and a failed batch truncates the log back to where it
    began. Either way the bytes and epochs its writes replaced are kept, in order, and
    restored newest first if it fails.

    On an in-memory log, ``write_page`` calls of small bytes made by the thread that
    holds the batch put their bytes into the page at once and are held (``writes``:
    the page's slot and the offset, then the bytes) without a record; any call that
    enters the state, reads the log or an epoch, and the batch's end log them first, as
    one column group (``batch_writes.log_buffered``)."""

    __slots__ = ("state", "records", "undo", "touched", "direct", "mark", "next_lsn",
                 "last_ts", "next_delta_id", "queue_len", "pending", "owner", "writes",
                 "held", "held_ids", "copies", "chunk_views", "staged", "counted")

    def __init__(self, state: MMSBState) -> None:
        self.state = state
        self.records: list[AnyRecord | DeltaGroup] = []
        self.undo: list[tuple[Any, ...]] = []
        """("scatter", chunk, offsets, old bytes, pages, epochs) | ("delta", page, epoch,
        positions or None, old bytes) | ("page", page, epoch, old bytes) | ("bytes", page,
        epoch, old bytes as ``bytes``), oldest first."""
        self.touched: set[int] = set()
        """Pages whose whole bytes are saved (writes taking the compiled path)."""
        self.direct = state.log.sink is None and state.config.enable_logging
        self.mark = state.log.mark() if self.direct else None
        self.next_lsn = state.log.next_lsn
        self.last_ts = state.log.last_timestamp
        self.next_delta_id = state.next_delta_id
        self.queue_len = len(state.event_queue)
        self.pending = set(state.pending)
        self.owner = threading.get_ident() if self.direct else 0
        """The thread whose ``write_page`` calls are held (0: none are)."""
        self.writes: list[int | bytes] = []
        """Held writes, in call order, not logged yet (their bytes are in the pages)."""
        self.held: dict[int, tuple[memoryview, Page, int, int, int]] = {}
        """Page id → (its bytes, a handle, a quarter of its size, its size, its slot << 16)
        for the pages copied since the held writes were last logged. A held write is kept
        as two items of ``writes``: ``slot << 16 | offset`` (a held page has at most
        64 KiB), then its bytes."""
        self.held_ids: list[int] = []
        """The pages of those slots, in slot order."""
        self.copies: list[bytes] = []
        """Their bytes before their first held write, in slot order."""
        self.chunk_views: dict[int, memoryview] = {}
        """Arena chunk index → a memoryview of it (a held page's bytes are a slice)."""
        self.staged: Any = None
        """On a durable bus, the writes staged for the batch's compiled commit (see
        _storage/fastbatch.py; None: none). They come before any held record: holding
        one makes them held records first."""
        logged = state.counters.logged
        self.counted = (logged[0], logged[1])
        """``records_logged`` and ``payload_bytes_logged`` (less creations) when the
        batch began: a failed batch logged nothing, so its rollback puts them back."""

    def hold(self, log: TransactionLog, rec: AnyRecord) -> int:
        """Log ``rec`` at once (``direct``), or stamp it (a copy, for a delta) and hold
        it back; returns its LSN."""
        if self.direct:
            log.append(rec)
            return log.last_lsn
        if self.staged is not None:
            self._unstage()
        if type(rec) is Delta:
            lsn, ts = log._next_stamp()
            rec = rec.stamped(lsn, ts)
        else:
            log.stamp(rec)
        log.next_lsn = rec.lsn + 1
        log.last_timestamp = rec.timestamp
        self.records.append(rec)
        return rec.lsn

    def hold_group(self, log: TransactionLog, group: DeltaGroup) -> None:
        """A vectorised batch's column group: logged at once (``direct``) or held."""
        if self.direct:
            log._push_group(group)
            return
        if self.staged is not None:
            self._unstage()
        if log.sink is None and self.state.config.enable_logging:
            self.records.append(group)
        else:
            self.records.extend(group.deltas())

    def _unstage(self) -> None:
        """The staged writes become held records, in order (the general path then
        holds the batch's further records after them)."""
        bus = self.state.bus
        assert bus is not None
        bus.unstage(self)

    def reserve(self, log: TransactionLog, n: int) -> tuple[int, int]:
        """Reserve ``n`` consecutive LSNs and one timestamp for records about to be held;
        returns the first LSN and the timestamp."""
        lsn = log.next_lsn
        ts = time.time_ns()
        if ts < log.last_timestamp:
            ts = log.last_timestamp
        log.next_lsn = lsn + n
        log.last_timestamp = ts
        return lsn, ts

    def undo_scatter(self, chunk: int, offsets: np.ndarray, old: np.ndarray, pids: np.ndarray,
                     epochs: np.ndarray) -> None:
        """Remember a vectorised write: the bytes at ``offsets`` of arena chunk ``chunk``
        (restored in the order given) and the epochs of ``pids`` before it."""
        self.undo.append(("scatter", chunk, offsets, old, pids, epochs))

    def save(self, view: np.ndarray, d: Delta) -> None:
        """Remember what ``d`` is about to overwrite."""
        epoch = int(self.state.table.epoch[d.page_id])
        if d._idx is not None:
            self.undo.append(("delta", d.page_id, epoch, d._idx, view[d._idx].copy()))
        else:
            self.undo.append(("delta", d.page_id, epoch, None, view.copy()))

    def touch(self, pid: int) -> None:
        """Save page ``pid``'s bytes and epoch before the batch's first compiled write to
        it (later ones need nothing: a rollback restores this copy after undoing them)."""
        st = self.state
        addr_v, size_v, epoch_v, _flags_v = st.table.views  # plain ints, not numpy scalars
        self.touched.add(pid)
        self.undo.append(("page", pid, epoch_v[pid], st.arena.view(addr_v[pid], size_v[pid]).copy()))

    def hold_page(self, pid: int) -> tuple[memoryview, Page, int, int, int] | None:
        """Before the first held write to page ``pid`` since they were last logged: save
        its bytes and epoch (an undo entry, and the base the held writes are compared
        with when logged); returns what ``write_page`` needs to hold writes to it, or
        None when they cannot be held (no such page, a page over BUFFERED_PAGE_MAX, a
        recompute function running), and the write takes the general path.
        Holding starts only after an entered call, which logs the held writes and
        clears ``held``, so a recompute function started since finds ``held`` empty."""
        st = self.state
        addr_v, size_v, epoch_v, flags_v = st.table.views
        if not (0 < pid < len(flags_v) and flags_v[pid]) or st.recomputing is not None:
            return None
        size = size_v[pid]
        if size > BUFFERED_PAGE_MAX:
            return None
        addr = addr_v[pid]
        index = addr >> CHUNK_SHIFT
        chunk = self.chunk_views.get(index)
        if chunk is None:
            array = st.arena._chunks[index]
            assert array is not None
            chunk = self.chunk_views[index] = array.data
        at = addr & CHUNK_MASK
        view = chunk[at:at + size]
        copy = bytes(view)
        self.undo.append(("bytes", pid, epoch_v[pid], copy))
        page = PageHandle()
        page._state = st
        page.id = pid
        entry = (view, page, size >> 2, size, len(self.held_ids) << 16)
        self.held_ids.append(pid)
        self.copies.append(copy)
        self.held[pid] = entry
        return entry

    def rollback(self) -> None:
        st = self.state
        t = st.table
        restored: set[int] = set()
        for entry in reversed(self.undo):
            if entry[0] == "scatter":
                _kind, chunk, offsets, old_bytes, pids, epochs = entry
                buf = st.arena.chunk(chunk)
                assert buf is not None
                buf[offsets] = old_bytes
                t.epoch[pids] = epochs
                restored.update(pids.tolist())
                continue
            pid, epoch = entry[1], entry[2]
            restored.add(pid)
            view = st.arena.view(int(t.addr[pid]), int(t.size[pid]))
            if entry[0] == "page":
                view[:] = entry[3]
            elif entry[0] == "bytes":
                view[:] = np.frombuffer(entry[3], np.uint8)
            elif entry[3] is None:
                view[:] = entry[4]
            else:
                view[entry[3]] = entry[4]
            t.epoch[pid] = epoch
        self.staged = None  # their log rows, past the log's end, are left unused
        logged = st.counters.logged
        if logged[0] >= self.counted[0]:  # (not when the counters were reset meanwhile)
            logged[0], logged[1] = self.counted
        if self.mark is not None:
            st.log.truncate(self.mark)
        for rec in self.records:
            if not isinstance(rec, Delta | DeltaGroup):
                rec.lsn = 0
                rec.timestamp = 0
        st.log.next_lsn = self.next_lsn
        st.log.last_timestamp = self.last_ts
        st.next_delta_id = self.next_delta_id
        del st.event_queue[self.queue_len:]
        st.pending = self.pending
        if st.devices is not None:
            # The pages the batch wrote went back to older epochs: their device copies
            # that followed its writes are stale (the others stay as they were).
            st.devices.restored(st, restored)



# -- each record kind's check, apply and reserve (bound into the kind table) -------------
# A check says why a record read from disk cannot follow the state (None: it can); an
# apply changes the store and graph and validates nothing; a reserve takes the memory
# an apply will need, before the record is logged.

def _page_missing(state: MMSBState, rec: Any) -> str | None:
    pid = rec.page_id
    if not state.table.is_live(pid):
        return f"a {type(rec).__name__} of page {pid}, which does not exist"
    return None


def _check_delta(state: MMSBState, rec: Delta) -> str | None:
    t = state.table
    pid = rec.page_id
    if not t.is_live(pid):
        return f"a delta of page {pid}, which does not exist"
    if rec.page_size != int(t.size[pid]):
        return f"a delta for {rec.page_size} bytes on page {pid} of {int(t.size[pid])}"
    if rec.base_epoch != int(t.epoch[pid]):
        return (f"a delta built on epoch {rec.base_epoch} of page {pid}, which is at "
                f"epoch {int(t.epoch[pid])}")
    return None


def _apply_delta_record(state: MMSBState, rec: Delta) -> None:
    t = state.table
    pid = rec.page_id
    apply_delta(state.arena.view(int(t.addr[pid]), int(t.size[pid])), rec)
    t.epoch[pid] = rec.epoch
    if rec.id >= state.next_delta_id:
        state.next_delta_id = rec.id + 1


def _check_create(state: MMSBState, rec: PageCreate) -> str | None:
    t = state.table
    if rec.first_id != t.next_id:
        return f"pages created at id {rec.first_id} where the next id is {t.next_id}"
    need = creation_cost(state, rec.count, rec.size)
    if need > physical_memory():
        return (f"{rec.count} pages of {rec.size} bytes, which need {need} bytes of "
                "memory, more than this machine has")
    return None


def _apply_create(state: MMSBState, rec: PageCreate) -> None:
    t = state.table
    if rec.count == 1:
        t.add_row(rec.first_id, state.arena.alloc(rec.size), rec.size, rec.location)
        if rec.metadata:
            t.meta[rec.first_id] = dict(rec.metadata)
    else:
        _place_create(state, rec, state.arena.alloc_many(rec.count, rec.size))


def _place_create(state: MMSBState, rec: PageCreate, addrs: np.ndarray) -> None:
    """The rows of ``rec``'s pages, at ``addrs`` (slots of ``rec.size`` already taken)."""
    t = state.table
    t.add_rows(rec.first_id, addrs, rec.size, rec.location)
    if rec.metadata:
        for pid in range(rec.first_id, rec.first_id + rec.count):
            t.meta[pid] = dict(rec.metadata)


def _reserve_create(state: MMSBState, rec: PageCreate) -> None:
    state.table.reserve(rec.first_id + rec.count)
    state.arena.reserve(rec.count, rec.size)


def _apply_delete(state: MMSBState, rec: PageDelete) -> None:
    t = state.table
    pid = rec.page_id
    if state.devices is not None:
        state.devices.drop(pid)
    state.arena.free(int(t.addr[pid]), int(t.size[pid]))
    t.drop_row(pid)
    for parent, child in state.graph.edges_of(pid):
        state.graph.remove_edge(parent, child)
    state.recompute_fns.pop(pid, None)
    state.mask_base.pop(pid, None)
    state.pending.discard(pid)
    state.forced.discard(pid)


def _apply_resize(state: MMSBState, rec: PageResize) -> None:
    t = state.table
    pid = rec.page_id
    old_size = int(t.size[pid])
    mask = state.page_mask(pid)
    keep = min(old_size, rec.new_size)
    new_mask = np.zeros(rec.new_size, dtype=bool)
    new_mask[:keep] = mask[:keep]
    old_addr = int(t.addr[pid])
    new_addr = state.arena.alloc(rec.new_size)
    state.arena.view(new_addr, keep)[:] = state.arena.view(old_addr, keep)
    state.arena.free(old_addr, old_size)
    t.addr[pid] = new_addr
    t.size[pid] = rec.new_size
    state.mask_base[pid] = (new_mask, rec.lsn)
    if state.devices is not None:
        # Same epoch, other size: a new device copy is made on the page's next device use.
        state.devices.drop(pid)


def _reserve_resize(state: MMSBState, rec: PageResize) -> None:
    state.arena.reserve(1, rec.new_size)


def _apply_migrate(state: MMSBState, rec: PageMigrate) -> None:
    # The mirror keeps the bytes; the device copy at the old location goes (a live
    # migration binds the new one after this, see MMSBState.migrate).
    if state.devices is not None:
        state.devices.drop(rec.page_id)
    state.table.loc[rec.page_id] = rec.location


def _check_clone(state: MMSBState, rec: PageClone) -> str | None:
    t = state.table
    if rec.page_id != t.next_id:
        return f"pages created at id {rec.page_id} where the next id is {t.next_id}"
    if not t.is_live(rec.source_id):
        return f"a clone of page {rec.source_id}, which does not exist"
    return None


def _apply_clone(state: MMSBState, rec: PageClone) -> None:
    t = state.table
    src = rec.source_id
    size = int(t.size[src])
    addr = state.arena.alloc(size)
    state.arena.view(addr, size)[:] = state.page_view(src)
    t.add_rows(rec.page_id, np.array([addr], np.int64), size, int(t.loc[src]))
    t.epoch[rec.page_id] = t.epoch[src]
    if src in t.meta:
        t.meta[rec.page_id] = dict(t.meta[src])
    state.mask_base[rec.page_id] = (state.page_mask(src), rec.lsn)


def _reserve_clone(state: MMSBState, rec: PageClone) -> None:
    state.table.reserve(rec.page_id + 1)
    state.arena.reserve(1, int(state.table.size[rec.source_id]))


def _apply_metadata(state: MMSBState, rec: MetadataSet) -> None:
    if rec.metadata:
        state.table.meta[rec.page_id] = dict(rec.metadata)
    else:
        state.table.meta.pop(rec.page_id, None)


def _check_edge_add(state: MMSBState, rec: EdgeAdd) -> str | None:
    t = state.table
    if not (t.is_live(rec.parent_id) and t.is_live(rec.child_id)):
        return f"an edge {rec.parent_id} → {rec.child_id} between missing pages"
    try:
        state.graph.check_edge(rec.parent_id, rec.child_id)
    except Exception:
        return f"an edge {rec.parent_id} → {rec.child_id} that closes a cycle"
    return None


def _apply_edge_add(state: MMSBState, rec: EdgeAdd) -> None:
    state.graph.add_edge(rec.parent_id, rec.child_id, EdgeType(rec.edge_type))


def _check_edge_remove(state: MMSBState, rec: EdgeRemove) -> str | None:
    if not state.graph.has_edge(rec.parent_id, rec.child_id):
        return f"the removal of an edge {rec.parent_id} → {rec.child_id} that does not exist"
    return None


def _apply_edge_remove(state: MMSBState, rec: EdgeRemove) -> None:
    state.graph.remove_edge(rec.parent_id, rec.child_id)


def _check_compacted(state: MMSBState, rec: Compacted) -> str | None:
    return "a compaction marker, which only checkpoints hold"


def _apply_compacted(state: MMSBState, rec: Compacted) -> None:
    # Rows grow when pages are created; only the id counter moves here.
    state.table.next_id = max(state.table.next_id, rec.next_id)


bind_engine(Delta, _apply_delta_record, _check_delta)
bind_engine(PageCreate, _apply_create, _check_create, _reserve_create)
bind_engine(PageDelete, _apply_delete, _page_missing)
bind_engine(PageResize, _apply_resize, _page_missing, _reserve_resize)
bind_engine(PageMigrate, _apply_migrate, _page_missing)
bind_engine(PageClone, _apply_clone, _check_clone, _reserve_clone)
bind_engine(MetadataSet, _apply_metadata, _page_missing)
bind_engine(EdgeAdd, _apply_edge_add, _check_edge_add)
bind_engine(EdgeRemove, _apply_edge_remove, _check_edge_remove)
bind_engine(Compacted, _apply_compacted, _check_compacted)
