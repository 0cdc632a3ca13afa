"""Time travel at lookup speed: one page as it was at a past LSN, epoch or moment, from
per-page keyframes instead of a replay of the whole log.

The index
---------
One :class:`HistoryIndex` per log (kept in ``log.history_index``, rebuilt when the
log's record lists are replaced: compression, trimming, a restored checkpoint). It is
built from the records themselves, scanning each record once (new records are picked
up on the next read, O(1) each):

* a *line* per page: its events in log order (creation, clone or replay-base image,
  deltas, resizes, deletion), with each event's LSN and the page epoch after it;
* the structural (non-delta) records with their LSNs, and each delta's LSN with the
  largest delta id so far (what ``replay_to_lsn`` needs besides page bytes).

Keyframes
---------
A keyframe is a full copy of a page right after one of its events. A page gets one at
its start (creation, clone, replay base), at each resize, and after every
:data:`KEYFRAME_EVERY` (K = 8) deltas, or sooner when the bytes its deltas wrote since
the last keyframe reach the page's size (dense deltas count as the whole page). So a
past version is one keyframe plus at most K deltas, applied in log order by the delta
kernel: a read costs O(log n) to find the event and the keyframe, plus O(page size +
K deltas' bytes).

Keyframes are built lazily, on the first read of a page, by one pass over that page's
own events, and extended as it gets new ones. Their memory is about one page per K
deltas of the page (and never more than the bytes those deltas wrote, beyond one page
per keyframe), and it is bounded per log by :data:`KEYFRAME_BUDGET` (64 MiB): past it,
the pages read least recently lose their keyframes (LRU by bytes) and rebuild them on
their next read.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._core.delta import Delta, apply_delta
from .._core.engine import MMSBState, require_page_id, require_state
from .._core.log import TransactionLog
from .._core.records import (
    AnyRecord,
    Compacted,
    PageClone,
    PageCreate,
    PageDelete,
    PageResize,
)
from .._core.snapshot import Snapshot
from ..errors import HistoryUnavailableError, InvalidArgumentError, PageNotFoundError

__all__ = [
    "KEYFRAME_EVERY",
    "KEYFRAME_BUDGET",
    "HistoryIndex",
    "PageLine",
    "history_index",
    "check_lsn_reachable",
    "read_page_at",
    "lsn_at_time",
    "state_at_lsn",
]

KEYFRAME_EVERY = 8
"""K: a page gets a keyframe at least every K of its deltas."""

KEYFRAME_BUDGET = 64 << 20
"""Bytes of keyframes one log's index keeps before it drops the least recently read
pages' keyframes."""

CREATE, CLONE, BASE, DELTA, RESIZE, DELETE = range(6)
"""Event kinds of a page line (the first three start a line)."""


class PageLine:
    """One page's events in log order, and its keyframes.

    ``lsns``, ``epochs``, ``kinds`` and ``recs`` are parallel lists, one entry per
    event; ``epochs`` never decreases. ``frame_pos[i]`` is the event right after which
    ``frames[i]`` holds the page's bytes; events up to ``built`` are covered.
    """

    __slots__ = ("pid", "lsns", "epochs", "kinds", "recs", "frame_pos", "frames", "built",
                 "since", "weight", "nbytes")

    def __init__(self, pid: int, kind: int, lsn: int, epoch: int, rec: Any) -> None:
        self.pid = pid
        self.lsns = [lsn]
        self.epochs = [epoch]
        self.kinds = [kind]
        self.recs: list[Any] = [rec]
        self.frame_pos: list[int] = []
        self.frames: list[np.ndarray] = []
        self.built = -1
        self.since = 0
        """Deltas applied after the last keyframe (while building)."""
        self.weight = 0
        """Bytes those deltas wrote."""
        self.nbytes = 0
        """Bytes held by ``frames``."""

    def add(self, kind: int, lsn: int, epoch: int, rec: Any) -> None:
        self.lsns.append(lsn)
        self.epochs.append(epoch)
        self.kinds.append(kind)
        self.recs.append(rec)

    def drop_frames(self) -> None:
        self.frame_pos = []
        self.frames = []
        self.built = -1
        self.since = self.weight = 0
        self.nbytes = 0

    def at_lsn(self, lsn: int) -> int:
        """Index of the last event with LSN ≤ ``lsn`` (-1: none). O(log events)."""
        return bisect.bisect_right(self.lsns, lsn) - 1


class HistoryIndex:
    """Page lines and keyframes of one log (see the module docstring). Every method
    expects the caller to hold the state's lock."""

    def __init__(self, state: MMSBState) -> None:
        log = state.log
        self.log = log
        self.records = log.records
        self.generation = log.generation
        self.horizon = log.horizon_lsn
        self.base = state.replay_base
        self.scanned = 0
        self.lines: dict[int, PageLine] = {}
        self.create_first: list[int] = []
        self.creates: list[PageCreate] = []
        self.struct_lsns: list[int] = []
        self.struct: list[AnyRecord] = []
        """Non-delta records in log order, with their LSNs."""
        self.delta_lsns: list[int] = []
        self.max_delta_id: list[int] = []
        """Largest delta id among the deltas up to each one (parallel to delta_lsns)."""
        self._base_snap: Snapshot | None = None
        self._base_pos: dict[int, tuple[int, int, int]] | None = None
        self.lru: OrderedDict[int, PageLine] = OrderedDict()
        self.frame_bytes = 0

    def valid_for(self, state: MMSBState) -> bool:
        """True while the log still holds the record lists this index was built from."""
        log = state.log
        return (log is self.log and log.records is self.records
                and log.generation == self.generation and log.horizon_lsn == self.horizon
                and state.replay_base is self.base)

    # -- scanning ----------------------------------------------------------------------
    def catch_up(self) -> None:
        """Index the records appended since the last call. O(new records)."""
        records = self.records
        n = len(records)
        if n == self.scanned:
            return
        lines = self.lines
        for rec in records[self.scanned:]:
            if type(rec) is Delta:
                line = lines.get(rec.page_id)
                if line is None:
                    line = self._start(rec.page_id)
                line.add(DELTA, rec.lsn, rec.epoch, rec)
                self.delta_lsns.append(rec.lsn)
                top = self.max_delta_id[-1] if self.max_delta_id else 0
                self.max_delta_id.append(rec.id if rec.id > top else top)
                continue
            self.struct_lsns.append(rec.lsn)
            self.struct.append(rec)
            if isinstance(rec, PageCreate):
                self.create_first.append(rec.first_id)
                self.creates.append(rec)
            elif isinstance(rec, PageClone):
                src = lines.get(rec.source_id) or self._start(rec.source_id)
                lines[rec.page_id] = PageLine(rec.page_id, CLONE, rec.lsn, src.epochs[-1], rec)
            elif isinstance(rec, PageResize | PageDelete):
                line = lines.get(rec.page_id) or self._start(rec.page_id)
                line.add(RESIZE if isinstance(rec, PageResize) else DELETE, rec.lsn,
                         line.epochs[-1], rec)
        self.scanned = n

    def _start(self, pid: int) -> PageLine:
        """A new line for a page whose first event here is not its creation record:
        created by a bulk PageCreate, or present in the replay base."""
        k = bisect.bisect_right(self.create_first, pid) - 1
        if k >= 0:
            rec = self.creates[k]
            if pid < rec.first_id + rec.count:
                line = PageLine(pid, CREATE, rec.lsn, 0, rec)
                self.lines[pid] = line
                return line
        pos = self._base_positions().get(pid)
        if pos is not None:
            line = PageLine(pid, BASE, 0, pos[2], None)
        else:
            # A record of a page the retained log never created: the history it needs
            # is not here (a log that starts mid-way); reads of it are refused.
            line = PageLine(pid, BASE, 0, 0, None)
            line.recs[0] = False
        self.lines[pid] = line
        return line

    def _base_positions(self) -> dict[int, tuple[int, int, int]]:
        """page id → (offset, size, epoch) in the decoded replay base."""
        if self._base_pos is None:
            self._base_pos = {}
            if self.base is not None:
                snap = self.base_snapshot()
                offs = np.concatenate(([0], np.cumsum(snap.sizes))).tolist()
                for k, pid in enumerate(snap.ids.tolist()):
                    self._base_pos[pid] = (offs[k], int(snap.sizes[k]), int(snap.epochs[k]))
        return self._base_pos

    def base_snapshot(self) -> Snapshot:
        """The replay base, decoded once per index."""
        assert self.base is not None
        if self._base_snap is None:
            self._base_snap = self.base.snapshot()
        return self._base_snap

    def line(self, pid: int) -> PageLine | None:
        """The page's line; None when the retained history never held the page."""
        line = self.lines.get(pid)
        if line is not None:
            return line
        k = bisect.bisect_right(self.create_first, pid) - 1
        known = k >= 0 and pid < self.creates[k].first_id + self.creates[k].count
        if known or pid in self._base_positions():
            return self._start(pid)
        return None

    # -- bytes -------------------------------------------------------------------------
    def _start_bytes(self, line: PageLine) -> np.ndarray:
        kind, rec = line.kinds[0], line.recs[0]
        if kind == CREATE:
            return np.zeros(rec.size, np.uint8)
        if kind == CLONE:
            src = self.line(rec.source_id)
            assert src is not None
            return self.bytes_after(src, src.at_lsn(rec.lsn)).copy()
        if rec is False:
            raise HistoryUnavailableError(
                f"page {line.pid}: the retained log changes it but holds neither its creation "
                "nor a replay base with it")
        off, size, _epoch = self._base_positions()[line.pid]
        return self.base_snapshot().data[off : off + size].copy()

    def _build(self, line: PageLine) -> None:
        """Cover every event of the line with keyframes (the policy of the module
        docstring). One pass over the events not yet covered."""
        n = len(line.kinds)
        if line.built == n - 1:
            return
        kinds, recs = line.kinds, line.recs
        added = 0
        if line.built < 0:
            buf = self._start_bytes(line)
            line.frame_pos.append(0)
            line.frames.append(buf.copy())
            added += buf.nbytes
            line.built = 0
        else:
            last = line.frame_pos[-1]
            buf = line.frames[-1].copy()
            for k in range(last + 1, line.built + 1):
                apply_delta(buf, recs[k])
        for j in range(line.built + 1, n):
            kind = kinds[j]
            if kind == DELTA:
                d = recs[j]
                apply_delta(buf, d)
                line.since += 1
                line.weight += d.count if d.is_sparse else d.page_size
                if line.since < KEYFRAME_EVERY and line.weight < buf.size:
                    continue
            elif kind == RESIZE:
                grown = np.zeros(recs[j].new_size, np.uint8)
                keep = min(buf.size, grown.size)
                grown[:keep] = buf[:keep]
                buf = grown
            else:  # DELETE ends the line
                break
            line.frame_pos.append(j)
            line.frames.append(buf.copy())
            added += buf.nbytes
            line.since = line.weight = 0
        line.built = n - 1
        line.nbytes += added
        self.frame_bytes += added
        self._touch(line)

    def _touch(self, line: PageLine) -> None:
        lru = self.lru
        lru[line.pid] = line
        lru.move_to_end(line.pid)
        while self.frame_bytes > KEYFRAME_BUDGET and len(lru) > 1:
            _pid, old = lru.popitem(last=False)
            self.frame_bytes -= old.nbytes
            old.drop_frames()

    def bytes_after(self, line: PageLine, j: int, out: np.ndarray | None = None) -> np.ndarray:
        """The page's bytes right after its event ``j`` (not a deletion): the nearest
        keyframe at or before it plus at most K deltas. The keyframe itself (read-only
        by contract) when ``j`` is a keyframe and ``out`` is None; else ``out`` or a new
        array. O(log events + page size + K deltas)."""
        if line.built < j:
            self._build(line)
        elif self.lru and next(reversed(self.lru)) != line.pid:
            self._touch(line)
        f = bisect.bisect_right(line.frame_pos, j) - 1
        frame = line.frames[f]
        at = line.frame_pos[f]
        if at == j and out is None:
            return frame
        if out is None:
            buf = frame.copy()
        else:
            out[:] = frame
            buf = out
        recs = line.recs
        for k in range(at + 1, j + 1):
            apply_delta(buf, recs[k])
        return buf

    def walk(self, line: PageLine) -> Iterator[tuple[Delta, np.ndarray]]:
        """Each delta of the line with the page's bytes right after it (one buffer,
        updated in place: copy what you keep), oldest first. O(the line's events and
        their bytes)."""
        buf = self.bytes_after(line, 0).copy()
        for kind, rec in zip(line.kinds[1:], line.recs[1:], strict=True):
            if kind == DELTA:
                apply_delta(buf, rec)
                yield rec, buf
            elif kind == RESIZE:
                grown = np.zeros(rec.new_size, np.uint8)
                keep = min(buf.size, grown.size)
                grown[:keep] = buf[:keep]
                buf = grown
            else:
                return

    # -- positions ---------------------------------------------------------------------
    def position_at_lsn(self, pid: int, lsn: int) -> tuple[PageLine, int]:
        """The page's line and its last event at or before ``lsn``.

        Raises:
            PageNotFoundError: the page did not exist right after ``lsn``.
        """
        line = self.line(pid)
        j = -1 if line is None else line.at_lsn(lsn)
        if line is None or j < 0 or line.kinds[j] == DELETE:
            raise PageNotFoundError(pid, f"read_page_at (no such page right after LSN {lsn})")
        return line, j

    def position_at_epoch(self, pid: int, epoch: int) -> tuple[PageLine, int]:
        """The page's line and its last event that leaves it at ``epoch`` (retained,
        not before the horizon).

        Raises:
            PageNotFoundError: the retained history never held the page.
            InvalidArgumentError: the page never had that epoch (above its newest, or
                below its first as a clone).
            HistoryUnavailableError: that epoch is before the retained history, or
                inside a merged (compressed) delta.
        """
        line = self.line(pid)
        if line is None:
            raise PageNotFoundError(pid, "read_page_at (the retained history never held it)")
        epochs, kinds = line.epochs, line.kinds
        j = bisect.bisect_right(epochs, epoch) - 1
        while j >= 0 and kinds[j] == DELETE:
            j -= 1
        if j < 0:
            if kinds[0] == BASE:
                raise HistoryUnavailableError(
                    f"page {pid}: epoch {epoch} is before the oldest retained history (the "
                    f"replay base holds it at epoch {epochs[0]})")
            raise InvalidArgumentError(
                f"page {pid} never had epoch {epoch}: it began at epoch {epochs[0]} as a clone")
        if epochs[j] != epoch:
            nxt = j + 1
            while nxt < len(kinds) and kinds[nxt] != DELTA:
                nxt += 1
            if nxt == len(kinds):
                raise InvalidArgumentError(
                    f"page {pid} never reached epoch {epoch} (its newest epoch is {epochs[j]})")
            d = line.recs[nxt]
            raise HistoryUnavailableError(
                f"page {pid}: epochs {d.base_epoch}..{d.epoch} were merged into one delta "
                f"({d.source}), so epoch {epoch} is not in the history")
        if line.lsns[j] < self.horizon and j + 1 < len(kinds) and line.lsns[j + 1] <= self.horizon:
            raise HistoryUnavailableError(
                f"page {pid}: epoch {epoch} is before the oldest retained history "
                f"(LSN {self.horizon})")
        return line, j


def history_index(state: MMSBState) -> HistoryIndex:
    """The state's history index, rebuilt if the log was replaced and caught up with
    the records appended since the last call. Caller holds the lock. O(new records)."""
    ix = state.log.history_index
    if not isinstance(ix, HistoryIndex) or not ix.valid_for(state):
        ix = HistoryIndex(state)
        state.log.history_index = ix
    ix.catch_up()
    return ix


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidArgumentError(f"{what} must be an int, not {type(value).__name__}")
    return int(value)


def check_lsn_reachable(state: MMSBState, lsn: Any) -> int:
    """``lsn`` as an int, if a replay can target it. Caller holds the lock.

    Raises:
        InvalidArgumentError: not an int, or outside 0 … the last LSN.
        HistoryUnavailableError: before the retained history (or none is kept).
    """
    state.require_replayable("replay")
    log: TransactionLog = state.log
    if isinstance(lsn, bool) or not isinstance(lsn, int | np.integer):
        raise InvalidArgumentError(f"lsn must be an int, not {lsn!r}")
    if lsn < 0 or lsn > log.last_lsn:
        raise InvalidArgumentError(f"LSN {lsn} is outside the log (0 … {log.last_lsn})")
    if log.horizon_lsn and lsn < log.horizon_lsn:
        raise HistoryUnavailableError(
            f"LSN {lsn} is before the oldest retained history (LSN {log.horizon_lsn}): the "
            "log was compressed or truncated there")
    return int(lsn)


def lsn_at_time(state: MMSBState, ns: Any) -> int:
    """The LSN of the last record with timestamp ≤ ``ns`` (the horizon when ``ns`` is at
    or after the replay base's time but before every retained record; 0 when the whole
    history starts later). Caller holds the lock. O(log records).

    Raises:
        InvalidArgumentError: ``ns`` is not an int, or negative.
        HistoryUnavailableError: ``ns`` is before the retained history.
    """
    ns = _as_int(ns, "timestamp (ns)")
    if ns < 0:
        raise InvalidArgumentError(f"timestamp {ns} is negative")
    log = state.log
    k = log.index_after_time(ns)
    lsn = log.records[k - 1].lsn if k else 0
    if log.horizon_lsn and lsn < log.horizon_lsn:
        if k == 0 and state.replay_base is not None and ns >= log.horizon_timestamp:
            return log.horizon_lsn
        raise HistoryUnavailableError(
            f"time {ns} is before the oldest retained history (LSN {log.horizon_lsn})")
    return lsn


def read_page_at(state: MMSBState, page_id: int, *, lsn: int | None = None,
                 epoch: int | None = None, timestamp: int | None = None) -> bytes:
    """The bytes of page ``page_id`` as they were right after record ``lsn``, when the
    page was at ``epoch`` (after the last change that left it there), or at the moment
    ``timestamp`` (ns; right after the last record logged at or before it). Exactly one
    selector. Equal to ``query_page(replay_to_lsn(state, L), page_id)`` for the LSN
    ``L`` the selector names, without replaying any other page.

    Cost: O(log n) to find the page's event and keyframe, then one copy of the page and
    at most K = 8 of its deltas (the first read of a page builds its keyframes: one
    pass over its own records; the first read after new records indexes them).

    Raises:
        InvalidArgumentError: not exactly one selector; a selector of the wrong type,
            negative, or after the newest history (an LSN past the last one, an epoch
            the page never reached); an epoch below a cloned page's first one.
        HistoryUnavailableError: the selector is before the retained history (the log
            was compressed or trimmed there), inside a compressed delta's merged
            epochs, or the state keeps no history (logging off, a lone bus checkpoint).
        PageNotFoundError: the page did not exist then (not created yet, or deleted).
    """
    state = require_state(state, "read_page_at")
    pid = require_page_id(page_id, "read_page_at")
    chosen = [n for n, v in (("lsn", lsn), ("epoch", epoch), ("timestamp", timestamp))
              if v is not None]
    if len(chosen) != 1:
        raise InvalidArgumentError(
            "read_page_at() takes exactly one of lsn=, epoch=, timestamp=" +
            (f" (got {', '.join(chosen)})" if chosen else ""))
    with state.lock:
        state.require_replayable("read_page_at")
        if epoch is not None:
            e = _as_int(epoch, "epoch")
            if e < 0:
                raise InvalidArgumentError(f"epoch {e} is negative")
            ix = history_index(state)
            line, j = ix.position_at_epoch(pid, e)
        else:
            target = (check_lsn_reachable(state, lsn) if lsn is not None
                      else lsn_at_time(state, timestamp))
            ix = history_index(state)
            line, j = ix.position_at_lsn(pid, target)
        return ix.bytes_after(line, j).tobytes()


def _lsn_of(rec: AnyRecord) -> int:
    return rec.lsn


def state_at_lsn(state: MMSBState, lsn: int) -> MMSBState:
    """A new, detached state equal to ``state`` right after record ``lsn`` (checked by
    the caller, who holds the lock), built from the index instead of a replay of every
    record: the structural records up to ``lsn`` go through the engine's apply path
    (pages, sizes, metadata, edges, id counters, written-byte masks), each page that
    changed gets its bytes from its keyframe plus at most K deltas, and the log is
    the retained log's prefix, sliced.

    Cost: O(structural records + pages × (log n + page size + K deltas) + records
    kept), instead of O(every record and byte written) for a replay.
    """
    ix = history_index(state)
    new = MMSBState(dataclasses.replace(state.config))
    new.detached = True
    if ix.base is not None:
        new.restore(ix.base_snapshot())
        new.log.horizon_lsn = new.log.last_lsn
    nlog = new.log
    o_records, o_deltas, o_by_page = nlog.records, nlog.deltas, nlog.by_page
    src_log = state.log
    s_by_page = src_log.by_page

    def deltas_upto(pid: int, upto: int) -> list[Delta]:
        lst = s_by_page.get(pid)
        part = lst[: bisect.bisect_right(lst, upto, key=_lsn_of)] if lst else []
        first = o_by_page.get(pid)
        return first + part if first else part

    horizon = nlog.horizon_lsn
    work: dict[int, list[Delta]] = dict(o_by_page)
    nlog.by_page = work
    for rec in ix.struct[: bisect.bisect_right(ix.struct_lsns, lsn)]:
        if isinstance(rec, PageResize):
            # The mask the resize keeps is the page's written bytes at that point.
            work[rec.page_id] = deltas_upto(rec.page_id, rec.lsn)
        elif isinstance(rec, PageClone):
            # A clone copies its source's bytes, epoch and mask as they were then.
            src = rec.source_id
            work[src] = deltas_upto(src, rec.lsn)
            line, j = ix.position_at_lsn(src, rec.lsn)
            ix.bytes_after(line, j, out=new.page_view(src))
            new.table.epoch[src] = line.epochs[j]
        elif isinstance(rec, Compacted):
            horizon = rec.lsn
        new.apply_record(rec)
    t = new.table
    for pid in t.live_ids().tolist():
        line, j = ix.position_at_lsn(pid, lsn)
        if j == 0:
            continue  # as created, as in the replay base, or as cloned: already right
        ix.bytes_after(line, j, out=new.page_view(pid))
        t.epoch[pid] = line.epochs[j]
    k = src_log.index_after_lsn(lsn)
    kd = bisect.bisect_right(ix.delta_lsns, lsn)
    by_page: dict[int, list[Delta]] = {}
    for pid in set(s_by_page) | set(o_by_page):
        part = deltas_upto(pid, lsn)
        if part:
            by_page[pid] = part
    nlog.records = o_records + src_log.records[:k]
    nlog.deltas = o_deltas + src_log.deltas[:kd]
    nlog.by_page = by_page
    if k:
        last = src_log.records[k - 1]
        nlog.next_lsn = last.lsn + 1
        nlog.last_timestamp = last.timestamp
    nlog.horizon_lsn = horizon
    if kd and ix.max_delta_id[kd - 1] >= new.next_delta_id:
        new.next_delta_id = ix.max_delta_id[kd - 1] + 1
    return new
