"""Device copies of a state's gpu and unified pages, and unified pages in managed memory.

The memory model: every page's bytes live in the host arena, which is what the log,
replay, time travel, checkpoints and every read use.

A ``unified`` page whose location's backend has managed memory (the CUDA unified
backend) keeps its bytes in a *managed* chunk of the host arena (memory the CPU and the
GPU both address, lent by the backend: :meth:`DeviceCopies.managed`): every host path
writes those bytes in place, and the device reads the same memory, so there is no
device copy and nothing to keep current. Its bytes are placed there when it is created
or migrated to ``unified``, and moved there on its next device use when they were
placed in ordinary memory (a restored checkpoint, a replayed state, a resize or a
clone without managed memory to hand, a device use inside a batch).

Any other device page (``gpu``, or ``unified`` without managed memory) has a *host
mirror* in ordinary arena memory and a *device copy*, a slot in the backend of its
location (:mod:`mmsb._device`). The host mirror is never behind: every logged change
is applied to it. The device copy follows:

- in the same call, for writes through the general write path (one apply launch of
  the logged delta) and writes of a device array (diffed on the device with
  ``diff(apply=True)``, only the changes come back to be logged and mirrored);
- lazily, for writes that take the compiled small-write paths, batches, replays into
  the state and resizes: the copy is *stale* (the epoch it holds is not the page's)
  and is brought up to date from the mirror by the next device use
  (``Page.device_array``, ``sync_page_to_gpu``, a GPU_SYNC edge).

Staleness is told by epochs: every delta raises the page's epoch, so a copy holding
the page's current epoch holds its current bytes. What restores an older epoch with
other bytes (a failed batch, a restored checkpoint) marks the copies stale or drops
them.

The backends are made on first use through :func:`mmsb._device.get_backend`, so a
device location that is not usable here is refused with the probe's reason. CuPy is
imported only then. The core does not import the device layer (which sits above it and
imports the core's delta kernels): the device layer binds its factory here when it is
imported (:func:`bind_backends`), as the storage layer binds its codecs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GPUMemoryError, InvalidArgumentError, InvalidDeltaError, MMSBError
from ..types import PageLocation, coerce_location
from .delta import as_bytes_array

if TYPE_CHECKING:
    from .._device.backend import DeviceBackend
    from .delta import Delta
    from .engine import MMSBState

__all__ = ["DeviceCopies", "gpu_flag_location", "DeviceSync", "as_host_bytes", "bind_backends", "check_device_page", "device_stats",
           "is_device_input", "location_name", "refuse_device_on_bus"]

_FACTORY: list[tuple[Callable[[str], DeviceBackend], type]] = []
"""The device layer's ``get_backend`` and its ``DeviceBackend`` class, once bound."""


def bind_backends(factory: Callable[[str], DeviceBackend], base: type) -> None:
    """Called by :mod:`mmsb._device.probe` when imported: ``factory(location_name)``
    makes a backend (raising GPUMemoryError with the reason when the location is not
    usable); ``base`` is the class every backend derives from."""
    _FACTORY[:] = [(factory, base)]


def backend_class() -> type:
    """The DeviceBackend class (the device layer is loaded with ``import mmsb``)."""
    if not _FACTORY:
        raise GPUMemoryError("no device layer is loaded (import mmsb)")
    return _FACTORY[0][1]


_UNIFIED = int(PageLocation.UNIFIED)
_NAMES = {int(PageLocation.CPU): "cpu", int(PageLocation.GPU): "gpu",
          int(PageLocation.UNIFIED): "unified"}


def as_host_bytes(data: Any) -> np.ndarray:
    """The bytes of a DLPack exporter in host memory (for a cpu page).

    Raises:
        InvalidDeltaError: the array lives on a device, or cannot be read.
    """
    try:
        arr = np.from_dlpack(data)
    except (TypeError, ValueError, BufferError, RuntimeError, AttributeError) as exc:
        raise InvalidDeltaError(
            f"a cpu page takes host bytes, and this {type(data).__name__} could not be read "
            f"as host memory ({exc}); copy it to the host first, or write it to a gpu or "
            "unified page") from None
    return as_bytes_array(arr)


def location_name(loc: int) -> str:
    """``"cpu"``, ``"gpu"`` or ``"unified"`` for a PageLocation value."""
    return _NAMES[int(loc)]


def is_device_input(data: Any) -> bool:
    """True for an array that may live on a device (CUDA array interface or DLPack) and
    is not one of the host types a write takes as bytes."""
    if isinstance(data, bytes | bytearray | memoryview | np.ndarray):
        return False
    return hasattr(data, "__cuda_array_interface__") or hasattr(data, "__dlpack__")



def _all_or_none(count: int, take: Callable[[], int], give: Callable[[int], None]) -> list[int]:
    """``count`` results of ``take()``; if one raises, those taken are given back
    (``give``) and the error goes on."""
    taken: list[int] = []
    try:
        for _ in range(count):
            taken.append(take())
    except BaseException:
        for x in taken:
            give(x)
        raise
    return taken

class DeviceCopies:
    """The backends of one state and the device copies of its device pages.

    ``slots[pid]`` is the page's slot in ``backends[locs[pid]]``; ``epochs[pid]`` the
    epoch whose bytes the slot holds (-1: unknown, so stale). A device page without an
    entry has no device copy yet (it gets one on its next device use).
    """

    __slots__ = ("backends", "slots", "locs", "epochs", "syncs", "async_syncs",
                 "pages_synced", "bytes_synced")

    def __init__(self) -> None:
        self.backends: dict[int, DeviceBackend] = {}
        self.slots: dict[int, int] = {}
        self.locs: dict[int, int] = {}
        self.epochs: dict[int, int] = {}
        self.syncs = 0
        """Syncs done (sync_page(s)_to_gpu, their async forms, GPU_SYNC edges); a refused
        one is not counted."""
        self.async_syncs = 0
        """Of those, the async ones."""
        self.pages_synced = 0
        """Device copies brought up to date from their mirrors (by any device use)."""
        self.bytes_synced = 0
        """Bytes copied from host mirrors into device copies (by any device use)."""

    # -- unified pages in managed memory -----------------------------------------------
    def managed(self, state: MMSBState) -> bool:
        """True when the state's unified pages can live in managed memory: the unified
        backend has it, and it is bound to the state's arena (done here on first use).

        Raises:
            GPUMemoryError: the unified location is not usable here.
        """
        arena = state.arena
        if arena.has_managed:
            return True
        source = self.backend(state, _UNIFIED).managed_source()
        if source is None:
            return False
        arena.bind_managed(source)
        return True

    def take_managed(self, state: MMSBState, count: int, size: int) -> list[int]:
        """``count`` zero-filled managed slots of ``size`` bytes, all or none.

        Raises:
            GPUMemoryError: not that much managed memory (the slots taken are given back).
        """
        arena = state.arena
        return _all_or_none(count, lambda: arena.alloc_managed(size),
                            lambda addr: arena.free(addr, size))

    @staticmethod
    def ordinary_slot(state: MMSBState, size: int) -> int:
        """A zero-filled slot of ordinary (host) arena memory.

        Raises:
            InvalidArgumentError: this process cannot get the memory.
        """
        try:
            return state.arena.alloc(size)
        except MemoryError:
            raise InvalidArgumentError(
                f"moving a {size}-byte page needs more host memory than this process can "
                "get; nothing was changed") from None

    @staticmethod
    def rebase(state: MMSBState, pid: int, addr: int) -> None:
        """Page ``pid``'s bytes now live at ``addr`` (a slot of its size holding them);
        its old slot is freed."""
        t = state.table
        old = int(t.addr[pid])
        state.arena.free(old, int(t.size[pid]))
        t.addr[pid] = addr

    def home(self, state: MMSBState, pid: int) -> bool:
        """True when page ``pid`` (live) is a unified page whose bytes live in managed
        memory, after moving them there from ordinary memory when the unified backend
        has managed memory (its device copy, if any, is dropped: the device reads the
        page's own bytes). False for a gpu page, for a unified page where the backend
        has no managed memory, and inside a batch (which remembers writes by address):
        those keep a device copy.

        Raises:
            GPUMemoryError: the unified location is not usable, or out of managed memory
                (nothing changed).
        """
        t = state.table
        if int(t.loc[pid]) != _UNIFIED:
            return False
        addr = int(t.addr[pid])
        arena = state.arena
        if arena.is_managed(addr):
            return True
        if state.batch_frame is not None or not self.managed(state):
            return False
        size = int(t.size[pid])
        new = arena.alloc_managed(size)
        arena.view(new, size)[:] = arena.view(addr, size)
        self.rebase(state, pid, new)
        self.drop(pid)
        return True

    # -- backends ----------------------------------------------------------------------
    def backend(self, state: MMSBState, loc: int, size: int | None = None) -> DeviceBackend:
        """The backend of device location ``loc``, made on first use.

        Raises:
            GPUMemoryError: ``enable_gpu`` is off, or the location is not usable here
                (the message says why: no CuPy, no driver, no device ...).
        """
        name = location_name(loc)
        if not state.config.enable_gpu:
            raise GPUMemoryError(f"{name} pages need enable_gpu=True in MMSBConfig",
                                 requested_bytes=size)
        b = self.backends.get(loc)
        if b is not None:
            return b
        if not _FACTORY:
            raise GPUMemoryError("no device layer is loaded (import mmsb)", requested_bytes=size)
        try:
            b = _FACTORY[0][0](name)
        except GPUMemoryError as exc:
            raise GPUMemoryError(exc.reason, requested_bytes=size) from None
        self.backends[loc] = b
        return b

    # -- slots -------------------------------------------------------------------------
    def take_slots(self, state: MMSBState, loc: int, count: int, size: int) -> list[int]:
        """``count`` zero-filled slots of ``size`` bytes at ``loc``, all or none.

        Raises:
            GPUMemoryError: the location is not usable, or out of device memory (the
                slots taken so far are given back).
        """
        b = self.backend(state, loc, size)
        return _all_or_none(count, lambda: b.alloc(size), b.free)

    def give_back(self, loc: int, slots: list[int]) -> None:
        """Free slots taken with :meth:`take_slots` that were never bound."""
        b = self.backends[loc]
        for s in slots:
            b.free(s)

    def bind(self, pid: int, loc: int, slot: int, epoch: int) -> None:
        """Page ``pid``'s device copy is ``slot`` at ``loc``, holding ``epoch``."""
        self.drop(pid)
        self.slots[pid] = slot
        self.locs[pid] = loc
        self.epochs[pid] = epoch

    def drop(self, pid: int) -> None:
        """Free page ``pid``'s device copy, if it has one."""
        slot = self.slots.pop(pid, None)
        if slot is None:
            return
        loc = self.locs.pop(pid)
        self.epochs.pop(pid, None)
        self.backends[loc].free(slot)

    def drop_all(self) -> None:
        """Free every device copy (the pages keep their locations and get new copies on
        their next device use)."""
        for pid in list(self.slots):
            self.drop(pid)

    def release(self, state: MMSBState) -> None:
        """For a stopped state: free every device copy and let go of the backends (and
        so of their device memory), the arena's managed-memory source included. The
        pages' bytes stay in the host arena, readable; unified pages in managed memory
        keep theirs (the arena holds the managed chunks it has)."""
        self.drop_all()
        self.backends.clear()
        state.arena.bind_managed(None)

    def restored(self, state: MMSBState, pids: Iterable[int]) -> None:
        """After a failed batch put pages ``pids`` back to their bytes and epochs from
        before it: a device copy that followed one of the batch's writes holds a later
        epoch, which the page will reach again with other bytes, and is marked stale. A
        copy holding the restored epoch was current before the batch wrote the page
        (every device use logs held writes first, raising the epoch), so it holds the
        restored bytes and stays current."""
        epochs = self.epochs
        page_epochs = state.table.epoch
        for pid in pids:
            if pid in epochs and epochs[pid] != int(page_epochs[pid]):
                epochs[pid] = -1

    # -- keeping copies current --------------------------------------------------------
    def current(self, state: MMSBState, pid: int) -> tuple[DeviceBackend, int, bool]:
        """Page ``pid``'s backend and slot, its device copy brought up to date from the
        host mirror first when it is stale or missing; the bool says whether bytes were
        copied. The page must be a live device page (the caller checked).

        Raises:
            GPUMemoryError: the location is not usable here, or out of device memory
                (nothing changed).
        """
        t = state.table
        loc = int(t.loc[pid])
        size = int(t.size[pid])
        epoch = int(t.epoch[pid])
        slot = self.slots.get(pid)
        if slot is not None and self.locs[pid] == loc:
            b = self.backends[loc]
            if self.epochs[pid] == epoch:
                return b, slot, False
            b.copy_in(slot, state.page_view(pid))
            self.epochs[pid] = epoch
        else:
            b = self.backend(state, loc, size)
            slot = b.alloc(size)
            try:
                b.copy_in(slot, state.page_view(pid))
            except BaseException:
                b.free(slot)
                raise
            self.bind(pid, loc, slot, epoch)
        self.pages_synced += 1
        self.bytes_synced += size
        return b, slot, True

    def refresh(self, state: MMSBState, pids: Iterable[int], *,
                asynchronous: bool = False) -> DeviceSync:
        """Bring the device copies of ``pids`` (live device pages) up to date from their
        host mirrors, as one batch per backend: the missing slots are taken (all or
        none), then every stale copy of the backend is written by one
        :meth:`~mmsb._device.DeviceBackend.copy_in_many` (one upload, one launch). Unified
        pages in managed memory need nothing. Waits for the copies to land unless
        ``asynchronous``; returns the handle of the copies either way.

        Raises:
            GPUMemoryError: a location not usable here, or out of device memory; the
                copies of the backends already done stand, the others are as before.
        """
        t = state.table
        groups: dict[int, list[int]] = {}
        used: set[int] = set()
        seen: set[int] = set()
        for pid in pids:
            if pid in seen or self.home(state, pid):
                continue
            seen.add(pid)
            loc = int(t.loc[pid])
            used.add(loc)
            if self.locs.get(pid) == loc and self.epochs.get(pid) == int(t.epoch[pid]):
                continue
            groups.setdefault(loc, []).append(pid)
        copied: list[int] = []
        tickets: list[Any] = []
        for loc, group in groups.items():
            b = self.backend(state, loc)
            fresh = [pid for pid in group if self.locs.get(pid) != loc]
            new: list[int] = []
            slot_of: dict[int, int] = {}
            try:
                for pid in fresh:
                    new.append(b.alloc(int(t.size[pid])))
                    slot_of[pid] = new[-1]
                ticket = b.copy_in_many(
                    (slot_of[pid] if pid in slot_of else self.slots[pid], state.page_view(pid))
                    for pid in group)
            except BaseException:
                for slot in new:
                    b.free(slot)
                raise
            for pid in group:
                epoch = int(t.epoch[pid])
                if pid in slot_of:
                    self.bind(pid, loc, slot_of[pid], epoch)
                else:
                    self.epochs[pid] = epoch
                self.bytes_synced += int(t.size[pid])
            self.pages_synced += len(group)
            copied.extend(group)
            if asynchronous:
                tickets.append(ticket)  # holds the batch's bytes until they landed
        # Current copies may still take applies queued by earlier writes: the handle
        # covers everything queued on each backend used.
        for loc in sorted(used):
            b = self.backends[loc]
            if asynchronous:
                tickets.append(b.marker())
            else:
                b.synchronize()
        # Counted once done: a refused sync (a location not usable, out of memory) is not.
        self.syncs += 1
        if asynchronous:
            self.async_syncs += 1
        return DeviceSync(copied, tickets)

    def follow(self, pid: int, d: Delta, base_epoch: int) -> None:
        """After the logged delta ``d`` was applied to page ``pid``'s mirror: apply it to
        the device copy too when that copy held ``base_epoch`` (one launch); a stale
        copy stays stale. A failed apply leaves the copy marked stale and does not
        fail the write: the delta is logged and in the mirror, so the write stands and
        its events and propagation follow; the next device use copies the mirror in
        (and reports a device that still fails)."""
        if self.epochs.get(pid) != base_epoch:
            return
        b = self.backends[self.locs[pid]]
        self.epochs[pid] = -1
        try:
            if d._exact:
                b.apply_dense(self.slots[pid], d._data)
            else:
                b.apply_delta(self.slots[pid], d)
        except MMSBError:
            return
        self.epochs[pid] = d.epoch

    # -- reporting ---------------------------------------------------------------------
    def stale_count(self, state: MMSBState) -> int:
        """Live device pages whose device copy is missing or behind their mirror
        (unified pages in managed memory have none to be behind)."""
        t = state.table
        live = t.live_ids()
        dev = live[t.loc[live] != 0].tolist() if live.size else []
        arena = state.arena
        return sum(1 for pid in dev if self.epochs.get(pid) != int(t.epoch[pid])
                   and not arena.is_managed(int(t.addr[pid])))

    def _check(self, state: MMSBState) -> None:
        """Assert that every device copy belongs to a live device page of its location
        and size, and that a current copy holds its mirror's bytes."""
        t = state.table
        # Writes an open batch holds are in their pages' bytes but not yet in their
        # epochs; they are logged, raising the epochs, before any device use.
        frame = state.batch_frame
        held = frame.held if frame is not None else {}
        for pid, slot in self.slots.items():
            assert t.is_live(pid), f"device copy kept for dead page {pid}"
            loc = self.locs[pid]
            assert int(t.loc[pid]) == loc, f"page {pid}'s device copy is at another location"
            b = self.backends[loc]
            assert b.size_of(slot) == int(t.size[pid]), f"page {pid}'s device copy has another size"
            if self.epochs[pid] == int(t.epoch[pid]) and pid not in held:
                assert np.array_equal(b.copy_out(slot), state.page_view(pid)), \
                    f"page {pid}'s current device copy differs from its mirror"
        for b in self.backends.values():
            b._check()
        arena = state.arena
        live = t.live_ids()
        for pid in live.tolist():
            if arena.is_managed(int(t.addr[pid])):
                assert int(t.loc[pid]) == _UNIFIED, f"page {pid} is in managed memory but not unified"
                assert pid not in self.slots, f"page {pid} is in managed memory and has a device copy"


class DeviceSync:
    """The handle of a sync of device copies: :meth:`wait` blocks until the copies have
    landed and returns the ids of the pages whose bytes were copied; :meth:`done` says
    whether they have, without blocking. A synchronous sync's handle is done already."""

    __slots__ = ("pages", "_tickets")

    def __init__(self, pages: list[int], tickets: list[Any]) -> None:
        self.pages = pages
        """Ids of the pages whose device copies were written by this sync."""
        self._tickets = tickets

    def done(self) -> bool:
        """True when every copy has landed (does not block)."""
        return all(t.done() for t in self._tickets)

    def wait(self) -> list[int]:
        """Block until every copy has landed; returns :attr:`pages`."""
        for t in self._tickets:
            t.wait()
        return self.pages

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"DeviceSync({len(self.pages)} page(s) copied, {state})"


def device_stats(state: MMSBState) -> dict[str, Any]:
    """Location name → the DeviceStats of that location's backend, for the backends the
    state has made."""
    copies = state.devices
    if copies is None:
        return {}
    return {location_name(loc): b.stats() for loc, b in sorted(copies.backends.items())}


def refuse_device_on_bus(state: MMSBState, loc: PageLocation, size: int | None) -> None:
    """Device pages are not built for durable buses: their pages are memory-mapped
    files, and a device copy beside them is not part of the bus's formats yet."""
    if state.bus is not None:
        raise GPUMemoryError(
            f"{location_name(int(loc))} pages are not available on a durable bus (a bus "
            "started with a path keeps its pages in memory-mapped files, and device "
            "copies of them are not built); use an in-memory state for device pages",
            requested_bytes=size)


def check_device_page(state: MMSBState, pid: int, fn: str) -> int:
    """The location of page ``pid`` when it is a device page, else a typed refusal."""
    loc = int(state.table.loc[pid])
    if loc == 0:
        raise InvalidArgumentError(
            f"{fn}(): page {pid} is on the cpu and has no device copy; migrate it to "
            "'gpu' or 'unified' first (migrate_page)")
    return loc


def gpu_flag_location(gpu: Any, location: Any, fn: str) -> Any:
    """The location a call's ``gpu=`` flag asks for (``gpu=True`` is ``location="gpu"``).

    Raises:
        InvalidArgumentError: ``gpu`` is not a bool, or contradicts ``location``.
    """
    if not isinstance(gpu, bool):
        raise InvalidArgumentError(f"{fn}(): gpu must be True or False, not {gpu!r}")
    if not gpu:
        return location
    if location != "cpu" and coerce_location(location) is not PageLocation.GPU:
        raise InvalidArgumentError(
            f"{fn}(): gpu=True asks for location 'gpu' but location={location!r} was given too")
    return "gpu"
