"""The columnar page table: one row per page id, numpy columns, no object per page.

Row ``i`` describes page id ``i`` (row 0 is unused). Ids are never reused, so a
deleted page keeps its row with the LIVE flag cleared; this makes id → row free and
lets a million pages cost a few numpy columns.
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np

from .kernels import fill_rows, live_rows

__all__ = ["PageTable", "LIVE", "CreationCursor"]

LIVE = 1
_COLUMNS = (("addr", np.int64), ("size", np.int64), ("epoch", np.int64), ("loc", np.uint8), ("flags", np.uint8))


class CreationCursor:
    """What the engine's one-frame ``create_page`` needs to continue the open creation
    run, worked out once when the run is opened or continued by the general path
    (``MMSBState.create_one``), so that each further creation checks four numbers
    instead of the log's, the arena's and the state's conditions one by one.

    It is valid while the log's next LSN minus the table's next id is ``gap``: every
    record logged moves the next LSN, and the only calls that move both by one
    (a page created apart, with its own record) enter the state, which drops the
    cursor (so do ``close`` and a restore, which replaces the table).

    While it is on the table, the creations it made since ``start`` have their log
    records, table rows and ids, but the arena's bump offset is ``bump`` here and the
    arena's bytes in use and the table's live count leave them out:
    ``MMSBState.count_creations`` adds them, before any call that enters the state,
    a settle (the counters' readers) or a check reads them."""

    __slots__ = ("size", "cls", "stop", "gap", "hi", "bump", "start", "t0", "offsets")

    def __init__(self, size: int, cls: int, stop: int, gap: int, hi: int, bump: int,
                 start: int, t0: int, offsets: array[int]) -> None:
        self.size = size
        """The run's page size (the size of the page the call asks for)."""
        self.cls = cls
        """Its arena size class: the bytes each slot takes from the current chunk."""
        self.stop = stop
        """The first page id this cursor cannot create: past the table's rows or the
        room left in the arena's current chunk."""
        self.gap = gap
        """The log's next LSN minus the table's next id when the cursor is valid."""
        self.hi = hi
        """The current arena chunk's index, shifted to an address's high bits."""
        self.bump = bump
        """Where the next slot starts in that chunk (the arena's bump offset)."""
        self.start = start
        """The first page id the cursor made that the arena's and the table's counts
        leave out (``count_creations`` moves it to the next id)."""
        self.t0 = t0
        """The run's first timestamp (the offsets count from it, in 32 bits)."""
        self.offsets = offsets
        """The run's offsets column (appending one is logging the creation)."""


class PageTable:
    """Columns ``addr``, ``size``, ``epoch``, ``loc``, ``flags`` indexed by page id.
    Rows from ``next_id`` on are all zero.

    ``meta`` maps page id → metadata dict, only for pages that have metadata.
    """

    def __init__(self, capacity: int = 128) -> None:
        capacity = max(capacity, 2)
        # Two allocations, not five: the columns are rows of them (each contiguous;
        # reserve() gives every column an array of its own when the table grows).
        self.addr, self.size, self.epoch = np.zeros((3, capacity), np.int64)
        self.loc, self.flags = np.zeros((2, capacity), np.uint8)
        self.views = self._views()
        self.meta: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self.live_count = 0
        self.creating: CreationCursor | None = None
        """The engine's open creation cursor (see :class:`CreationCursor`); None when
        ``create_page`` takes its general path next. Dropped with the table."""

    @property
    def capacity(self) -> int:
        return int(self.addr.shape[0])

    def reserve(self, upto: int) -> None:
        """Make rows ``0..upto-1`` exist (amortised doubling)."""
        cap = self.capacity
        if upto <= cap:
            return
        new_cap = max(upto, cap * 2)
        for name, dtype in _COLUMNS:
            old = getattr(self, name)
            col = np.zeros(new_cap, dtype)
            col[:cap] = old
            setattr(self, name, col)
        self.views = self._views()

    def _views(self) -> tuple[memoryview, memoryview, memoryview, memoryview]:
        """Memoryviews of the ``addr``, ``size``, ``epoch`` and ``flags`` columns (the
        same memory): one element reads and writes as a plain int about three times
        faster than through numpy, for the per-call paths."""
        return (memoryview(self.addr.data), memoryview(self.size.data),
                memoryview(self.epoch.data), memoryview(self.flags.data))

    def is_live(self, page_id: int) -> bool:
        """True if ``page_id`` names a live page. O(1)."""
        return 0 < page_id < self.next_id and bool(self.views[3][page_id] & LIVE)

    def live_ids(self) -> np.ndarray:
        """Ids of live pages, ascending. O(rows)."""
        return live_rows(self.flags, self.next_id, LIVE)

    def add_rows(self, first_id: int, addrs: np.ndarray, size: int, loc: int) -> None:
        """Fill rows ``first_id …`` for new pages at ``addrs``. O(n) in numpy."""
        n = len(addrs)
        end = first_id + n
        self.reserve(end)
        self.addr[first_id:end] = addrs
        self.size[first_id:end] = size
        self.epoch[first_id:end] = 0
        self.loc[first_id:end] = loc
        self.flags[first_id:end] = LIVE
        self.next_id = max(self.next_id, end)
        self.live_count += n

    def set_rows(self, ids: np.ndarray, addrs: np.ndarray, sizes: np.ndarray,
                 epochs: np.ndarray, locs: np.ndarray) -> None:
        """Fill the rows of new pages ``ids`` (positive, ascending, not live yet) from
        columns. O(n), in one compiled pass."""
        n = len(ids)
        if not n:
            return
        last = int(ids[-1])
        assert int(ids[0]) > 0, "page ids are positive"  # (checked by every reader)
        self.reserve(last + 1)
        fill_rows(self.addr, self.size, self.epoch, self.loc, self.flags, ids, addrs, sizes,
                  epochs, locs, LIVE)
        self.next_id = max(self.next_id, last + 1)
        self.live_count += n

    def add_row(self, page_id: int, addr: int, size: int, loc: int) -> None:
        """Fill the row of one new page. O(1)."""
        if page_id >= len(self.addr):
            self.reserve(page_id + 1)
        self.addr[page_id] = addr
        self.size[page_id] = size
        self.loc[page_id] = loc
        self.flags[page_id] = LIVE
        if page_id >= self.next_id:
            self.next_id = page_id + 1
        self.live_count += 1

    def drop_row(self, page_id: int) -> None:
        self.flags[page_id] = 0
        self.meta.pop(page_id, None)
        self.live_count -= 1

    def _check(self) -> None:
        """Assert the table's invariants: live count matches the flags, ids below
        ``next_id``, sizes positive, epochs non-negative, metadata only for live pages."""
        live = self.live_ids()
        assert len(live) == self.live_count, (len(live), self.live_count)
        assert not (self.flags[self.next_id :] & LIVE).any(), "a live row past next_id"
        for name, _ in _COLUMNS:
            # Creating a page fills only addr, size and flags: the rest must be zero.
            assert not getattr(self, name)[self.next_id :].any(), f"{name} set past next_id"
        assert not (self.flags[0] & LIVE), "row 0 must stay unused"
        assert (self.size[live] > 0).all(), "a live page has a non-positive size"
        assert (self.epoch[live] >= 0).all(), "a live page has a negative epoch"
        for pid in self.meta:
            assert self.is_live(pid), f"metadata kept for dead page {pid}"
