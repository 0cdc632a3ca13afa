"""Time travel at lookup speed: one page as it was at a past LSN, epoch or moment, from
per-page keyframes instead of a replay of the whole log.

The index
---------
One :class:`HistoryIndex` per log object, kept beside it in a weak mapping (a copy of a
log gets its own, and the log's hot attributes stay few), rebuilt when the log's
``generation`` says its contents were replaced or rewritten (compression, trimming, a
restored checkpoint or memento). It follows the log by LSN: each read first
indexes the records logged since the last one, the new delta rows in one vectorised pass
over the log's columns (pages, epochs, LSNs from the step map). It holds:

* a *line* per page: its events in log order (creation, clone or replay-base image,
  deltas, resizes, deletion), with each event's LSN and the page epoch after it. A
  delta event is its row number in the log, never a :class:`Delta` object: its bytes
  are applied straight from the log's payload arena (25 bytes of index per delta);
* the page creations (first id, count, LSN, size), to start a page's line.

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
import contextlib
import dataclasses
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
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
    kind_of,
)
from .._core.snapshot import Snapshot
from ..errors import (
    HistoryUnavailableError,
    InvalidArgumentError,
    MMSBError,
    PageNotFoundError,
    SerializationError,
)

__all__ = [
    "KEYFRAME_EVERY",
    "KEYFRAME_BUDGET",
    "HistoryIndex",
    "PageLine",
    "history_index",
    "check_lsn_reachable",
    "read_page_at",
    "read_page_prefix_at",
    "read_page_prefixes_at",
    "lsn_at_time",
    "state_at_lsn",
]

KEYFRAME_EVERY = 8
"""K: a page gets a keyframe at least every K of its deltas."""

KEYFRAME_BUDGET = 64 << 20
"""Bytes of keyframes one log's index keeps before it drops the least recently read
pages' keyframes."""

SCRATCH_MAX = 1 << 20
"""Largest page a past version of which is rebuilt in the index's scratch buffer
(:meth:`HistoryIndex.prefix_after`); a larger one is rebuilt in a new array."""

CREATE, CLONE, BASE, DELTA, RESIZE, DELETE = range(6)
"""Event kinds of a page line (the first three start a line)."""


class PageLine:
    """One page's events in log order, and its keyframes.

    ``lsns``, ``epochs``, ``kinds`` and ``refs`` are parallel arrays, one entry per
    event; ``epochs`` never decreases. A delta event's ref is its row in the log (its
    bytes stay in the log's payload arena); any other event's ref is its place in
    ``recs`` (the size of a created page, the clone record, None for a replay-base
    image, resize and deletion records). ``frame_pos[i]`` is the event right after
    which ``frames[i]`` holds the page's bytes; events up to ``built`` are covered.
    Memory per delta: 25 bytes of arrays.
    """

    __slots__ = ("pid", "lsns", "epochs", "kinds", "refs", "recs", "frame_pos", "frames",
                 "built", "since", "weight", "nbytes")

    def __init__(self, pid: int, kind: int, lsn: int, epoch: int, rec: Any) -> None:
        self.pid = pid
        self.lsns = array("q", [lsn])
        self.epochs = array("q", [epoch])
        self.kinds = bytearray([kind])
        self.refs = array("q", [0])
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

    def add(self, kind: int, lsn: int, epoch: int, rec: AnyRecord) -> None:
        """A structural event (resize, deletion)."""
        self.lsns.append(lsn)
        self.epochs.append(epoch)
        self.kinds.append(kind)
        self.refs.append(len(self.recs))
        self.recs.append(rec)

    def add_rows(self, rows: np.ndarray, lsns: np.ndarray, epochs: np.ndarray) -> None:
        """Delta events: their log rows, LSNs and epochs (int64 arrays). O(len(rows))."""
        self.lsns.frombytes(lsns.tobytes())
        self.epochs.frombytes(epochs.tobytes())
        self.refs.frombytes(rows.tobytes())
        self.kinds.extend(bytes([DELTA]) * len(rows))

    def structural(self) -> Iterator[tuple[int, Any]]:
        """(kind, what ``recs`` holds for it) of each event that is not a delta."""
        recs = self.recs
        for kind, ref in zip(self.kinds, self.refs, strict=True):
            if kind != DELTA:
                yield kind, recs[ref]

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
        # Held weakly: the index is the value of its log in _INDEXES, a weak-keyed
        # table, and a value that held its key would keep every log indexed once (and
        # the segment mappings its rows point into) alive for the life of the process.
        self._log = weakref.ref(log)
        self.generation = log.generation
        self.horizon = log.horizon_lsn
        self.base = state.replay_base
        self.scanned = 0
        """Records with LSN ≤ this are indexed."""
        self.rows_done = 0
        """Delta rows indexed."""
        self.lines: dict[int, PageLine] = {}
        self.create_first = array("q")
        self.create_count = array("q")
        self.create_lsn = array("q")
        self.create_size = array("q")
        """Page creations in log order (a creation run counts one per page)."""
        self._base_snap: Snapshot | None = None
        self._base_pos: dict[int, tuple[int, int, int]] | None = None
        self.lru: OrderedDict[int, PageLine] = OrderedDict()
        self.frame_bytes = 0
        self._scratch = np.empty(0, np.uint8)
        """Where ``prefix_after`` rebuilds a page (never handed out)."""

    @property
    def log(self) -> TransactionLog:
        """The log this index is of (alive: the index is reached through it)."""
        log = self._log()
        assert log is not None
        return log

    def valid_for(self, state: MMSBState) -> bool:
        """True while the log still holds the contents this index was built from (same
        log, same generation, horizon and replay base)."""
        log = state.log
        return (log is self._log() and log.generation == self.generation
                and log.horizon_lsn == self.horizon and state.replay_base is self.base)

    # -- scanning ----------------------------------------------------------------------
    def catch_up(self) -> None:
        """Index the records logged since the last call, by LSN: the new delta rows'
        pages, LSNs and epochs are read from the log's columns in one go. O(new records),
        vectorised over the deltas."""
        log = self.log
        top = log.last_lsn
        if top == self.scanned:
            return
        events: list[AnyRecord] = []
        for rec in log.iter_structs(self.scanned, top):
            if type(rec) is PageCreate:
                self.create_first.append(rec.first_id)
                self.create_count.append(rec.count)
                self.create_lsn.append(rec.lsn)
                self.create_size.append(rec.size)
            elif isinstance(rec, PageClone | PageResize | PageDelete):
                events.append(rec)
        r0, r1 = self.rows_done, log.n
        cols = log.rows[r0:r1]
        pages = cols["page"].astype(np.int64)
        epochs = cols["epoch"].astype(np.int64)
        lsns = log.row_lsns(r0, r1)
        a = 0
        for rec in events:
            b = int(np.searchsorted(lsns, rec.lsn))
            self._add_rows(r0, a, b, pages, lsns, epochs)
            a = b
            self._add_event(rec)
        self._add_rows(r0, a, r1 - r0, pages, lsns, epochs)
        self.rows_done = r1
        self.scanned = top

    def _add_rows(self, r0: int, a: int, b: int, pages: np.ndarray, lsns: np.ndarray,
                  epochs: np.ndarray) -> None:
        """Add the new rows ``r0 + a … r0 + b - 1`` to their pages' lines, page by page."""
        if a >= b:
            return
        seg = pages[a:b]
        order = np.argsort(seg, kind="stable") + a
        bounds = np.flatnonzero(np.diff(pages[order])) + 1
        lines = self.lines
        for grp in np.split(order, bounds):
            pid = int(pages[grp[0]])
            line = lines.get(pid)
            if line is None:
                line = self._start(pid)
            line.add_rows(grp + r0, lsns[grp], epochs[grp])

    def _add_event(self, rec: AnyRecord) -> None:
        lines = self.lines
        if isinstance(rec, PageClone):
            src = lines.get(rec.source_id) or self._start(rec.source_id)
            lines[rec.page_id] = PageLine(rec.page_id, CLONE, rec.lsn, src.epochs[-1], rec)
        else:
            assert isinstance(rec, PageResize | PageDelete)
            line = lines.get(rec.page_id) or self._start(rec.page_id)
            line.add(RESIZE if isinstance(rec, PageResize) else DELETE, rec.lsn,
                     line.epochs[-1], rec)

    def _created(self, pid: int) -> int:
        """Index of the creation that made ``pid`` (-1: none retained)."""
        k = bisect.bisect_right(self.create_first, pid) - 1
        if k >= 0 and pid < self.create_first[k] + self.create_count[k]:
            return k
        return -1

    def _start(self, pid: int) -> PageLine:
        """A new line for a page whose first event here is not a clone: its creation,
        or its image in the replay base."""
        k = self._created(pid)
        if k >= 0:
            line = PageLine(pid, CREATE, self.create_lsn[k], 0, self.create_size[k])
        else:
            pos = self._base_positions().get(pid)
            # False: a page the retained log changes but never created and the replay
            # base does not hold (a log that starts mid-way); reads of it are refused.
            line = PageLine(pid, BASE, 0, 0 if pos is None else pos[2],
                            None if pos is not None else False)
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
        if self._created(pid) >= 0 or pid in self._base_positions():
            return self._start(pid)
        return None

    # -- bytes -------------------------------------------------------------------------
    def _start_bytes(self, line: PageLine) -> np.ndarray:
        kind, rec = line.kinds[0], line.recs[0]
        if kind == CREATE:
            return np.zeros(rec, np.uint8)
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
        docstring). One pass over the events not yet covered, applying each delta
        straight from the log's payload arena."""
        n = len(line.kinds)
        if line.built == n - 1:
            return
        kinds, refs, recs = line.kinds, line.refs, line.recs
        apply_row = self.log.apply_row
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
            self.log.apply_rows(refs[last + 1 : line.built + 1], buf)
        for j in range(line.built + 1, n):
            kind = kinds[j]
            if kind == DELTA:
                line.weight += apply_row(refs[j], buf)
                line.since += 1
                if line.since < KEYFRAME_EVERY and line.weight < buf.size:
                    continue
            elif kind == RESIZE:
                grown = np.zeros(recs[refs[j]].new_size, np.uint8)
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

    def _keyframe_for(self, line: PageLine, j: int) -> tuple[np.ndarray, int]:
        """The nearest keyframe at or before the page's event ``j`` and that keyframe's
        event, the page's keyframes built that far (and the page marked recently used)."""
        self._ready(line, j)
        f = bisect.bisect_right(line.frame_pos, j) - 1
        return line.frames[f], line.frame_pos[f]

    def _ready(self, line: PageLine, j: int) -> None:
        """Build the page's keyframes up to its event ``j`` (and mark it recently used)."""
        if line.built < j:
            self._build(line)
        elif self.lru and next(reversed(self.lru)) != line.pid:
            self._touch(line)

    def _buffer(self, size: int) -> np.ndarray:
        """A page-sized buffer to rebuild a version in: the index's scratch buffer (grown
        as needed) for pages up to ``SCRATCH_MAX`` bytes, else a new array."""
        if size > SCRATCH_MAX:
            return np.empty(size, np.uint8)
        if self._scratch.size < size:
            self._scratch = np.empty(size, np.uint8)
        return self._scratch[:size]

    def bytes_after(self, line: PageLine, j: int, out: np.ndarray | None = None) -> np.ndarray:
        """The page's bytes right after its event ``j`` (not a deletion): the nearest
        keyframe at or before it plus at most K deltas, applied from the log's columns.
        The keyframe itself (read-only by contract) when ``j`` is a keyframe and ``out``
        is None; else ``out`` or a new array. O(log events + page size + K deltas)."""
        frame, at = self._keyframe_for(line, j)
        if at == j and out is None:
            return frame
        if out is None:
            buf = frame.copy()
        else:
            out[:] = frame
            buf = out
        if j > at:
            self.log.apply_rows(line.refs[at + 1 : j + 1], buf)
        return buf

    def prefix_after(self, line: PageLine, j: int, length: int | None = None) -> bytes:
        """The first ``length`` bytes of the page (all of it when ``None``) right after
        its event ``j`` (not a deletion), as new bytes: copied straight from the
        keyframe when ``j`` is one, else rebuilt in the index's scratch buffer (pages up
        to ``SCRATCH_MAX`` bytes; a larger one in a new array) and copied out.

        Only the prefix is rebuilt: the keyframe's first ``length`` bytes are copied into
        the buffer and the deltas after it applied over the whole page-sized buffer,
        whose bytes past ``length`` are left as they are (stale, never read). Every delta
        encoding only writes its positions and never reads the page, so the prefix comes
        out as the whole page's would. A read of a past version then moves about twice
        the value's bytes (keyframe to buffer, buffer to the result), not a page-sized
        copy as well, which matters when the page is up to twice the value (pages that
        grow by doubling) and the keyframe is out of the CPU's caches (a history listed
        version by version, each one decoded in between).
        O(log events + length + K deltas)."""
        frame, at = self._keyframe_for(line, j)
        size = frame.size
        n = size if length is None or length > size else length
        if at == j:
            return frame[:n].tobytes()
        buf = self._buffer(size)
        buf[:n] = frame[:n]
        self.log.apply_rows(line.refs[at + 1 : j + 1], buf)
        return buf[:n].tobytes()

    def prefixes_after(self, line: PageLine,
                       wants: Sequence[tuple[int, int]]) -> list[bytes]:
        """:meth:`prefix_after` of several events of one line, ``(j, length)`` each
        (``j`` not a deletion), in the order asked. The events that share a keyframe
        are rebuilt in one pass in log order: the keyframe's prefix (as long as the
        longest asked of them) copied once into the scratch buffer, then each event's
        deltas applied once, on top of the event before it, and its prefix copied out.
        For a history read version by version (``MMSBSaver.list``) that is one keyframe
        copy and K deltas per K versions, where reading them one at a time costs a
        keyframe copy and up to K deltas each. O(log events + the keyframes' prefixes +
        the deltas up to the last event asked + the bytes returned)."""
        out: list[bytes] = [b""] * len(wants)
        if not wants:
            return out
        self._ready(line, max(j for j, _n in wants))
        frame_pos, frames, refs = line.frame_pos, line.frames, line.refs
        spans: dict[int, list[int]] = {}
        for k, (j, _n) in enumerate(wants):
            spans.setdefault(bisect.bisect_right(frame_pos, j) - 1, []).append(k)
        for f, ks in spans.items():
            frame = frames[f]
            at = frame_pos[f]
            size = frame.size
            ks.sort(key=lambda k: wants[k][0])
            buf: np.ndarray | None = None
            done = at
            for k in ks:
                j, n = wants[k]
                n = min(n, size)
                if j == at:
                    out[k] = frame[:n].tobytes()
                    continue
                if buf is None:
                    buf = self._buffer(size)
                    longest = min(size, max(wants[q][1] for q in ks))
                    buf[:longest] = frame[:longest]
                if j > done:
                    self.log.apply_rows(refs[done + 1 : j + 1], buf)
                    done = j
                out[k] = buf[:n].tobytes()
        return out

    def walk(self, line: PageLine) -> Iterator[tuple[Delta, np.ndarray]]:
        """Each delta of the line (built from its row) with the page's bytes right after
        it (one buffer, updated in place: copy what you keep), oldest first. O(the
        line's events and their bytes)."""
        buf = self.bytes_after(line, 0).copy()
        log = self.log
        if log.segs:
            # Rows read from mapped log segments: checked in one go.
            log.check_segments(np.array([r for k, r in zip(line.kinds[1:], line.refs[1:],
                                                            strict=True) if k == DELTA],
                                        np.int64))
        for kind, ref in zip(line.kinds[1:], line.refs[1:], strict=True):
            if kind == DELTA:
                d = log.delta_at(ref, True)
                apply_delta(buf, d)
                yield d, buf
            elif kind == RESIZE:
                grown = np.zeros(line.recs[ref].new_size, np.uint8)
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
            d = self.log.delta_at(line.refs[nxt])
            raise HistoryUnavailableError(
                f"page {pid}: epochs {d.base_epoch}..{d.epoch} were merged into one delta "
                f"({d.source}), so epoch {epoch} is not in the history")
        if line.lsns[j] < self.horizon and j + 1 < len(kinds) and line.lsns[j + 1] <= self.horizon:
            raise HistoryUnavailableError(
                f"page {pid}: epoch {epoch} is before the oldest retained history "
                f"(LSN {self.horizon})")
        return line, j


def _damaged(exc: BaseException) -> BaseException:
    """What :func:`damaged_log_errors` raises for ``exc``: a SerializationError for what
    only a damaged or crafted log can cause, ``exc`` itself for an MMSBError."""
    if isinstance(exc, MemoryError):
        return SerializationError("the retained log holds a record whose replay needs more "
                                  "memory than this process can get")
    if isinstance(exc, MMSBError):
        return exc
    return SerializationError(
        f"the retained log holds a record that cannot be replayed ({type(exc).__name__}: "
        f"{exc}); it names a page, size or epoch the state does not have")


@contextlib.contextmanager
def damaged_log_errors() -> Iterator[None]:
    """Turn what only a damaged or crafted log can cause (a record naming a page, size
    or epoch the state does not have: every record a live state logs was checked
    before it was logged) into a SerializationError."""
    try:
        yield
    except (MemoryError, IndexError, KeyError, ValueError, OverflowError) as exc:
        translated = _damaged(exc)
        if translated is exc:
            raise
        raise translated from None


_INDEXES: weakref.WeakKeyDictionary[TransactionLog, HistoryIndex] = weakref.WeakKeyDictionary()
"""Each log's history index; it goes with its log."""


def history_index(state: MMSBState) -> HistoryIndex:
    """The state's history index, rebuilt if the log's contents were replaced and
    caught up with the records logged since the last call. Caller holds the lock.
    O(new records)."""
    log = state.log
    ix = _INDEXES.get(log)
    if ix is None or not ix.valid_for(state):
        ix = HistoryIndex(state)
        _INDEXES[log] = ix
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
    with state.lock, damaged_log_errors():
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
        return ix.prefix_after(line, j)


def read_page_prefix_at(state: MMSBState, page_id: int, *, epoch: int, length: int) -> bytes:
    """``read_page_at(state, page_id, epoch=epoch)[:length]`` without building the
    whole page as bytes first (:meth:`HistoryIndex.prefix_after`): for a caller that
    keeps a value of ``length`` bytes at the start of a page larger than it (the
    LangGraph saver's channel pages). When ``epoch`` is the page's current epoch the
    bytes are copied straight from the page (the same bytes the history holds for that
    epoch), without the history index. Same errors as ``read_page_at``; ``length``
    must be an int ≥ 0.

    One lock, one copy of the ``length`` bytes for the current version; for a past one
    a copy of the keyframe's prefix, at most K deltas and the copy out."""
    state = require_state(state, "read_page_prefix_at")
    pid = require_page_id(page_id, "read_page_prefix_at")
    n = length if type(length) is int else _as_int(length, "length")
    if n < 0:
        raise InvalidArgumentError(f"length {n} is negative")
    e = epoch if type(epoch) is int else _as_int(epoch, "epoch")
    if e < 0:
        raise InvalidArgumentError(f"epoch {e} is negative")
    with state.lock:
        state.require_replayable("read_page_prefix_at")
        table = state.table
        if table.is_live(pid) and table.views[2][pid] == e:
            data: bytes = state.page_view(pid)[:n].tobytes()
            return data
        try:
            ix = history_index(state)
            line, j = ix.position_at_epoch(pid, e)
            return ix.prefix_after(line, j, n)
        except (MemoryError, IndexError, KeyError, ValueError, OverflowError) as exc:
            raise _damaged(exc) from None


def read_page_prefixes_at(state: MMSBState, page_id: int,
                          reads: Sequence[tuple[int, int]]) -> list[bytes]:
    """:func:`read_page_prefix_at` of several versions of one page: ``reads`` holds
    ``(epoch, length)`` pairs; returns ``read_page_at(state, page_id,
    epoch=epoch)[:length]`` for each, in the order asked, under one lock. The past
    versions that share a keyframe are rebuilt in one pass
    (:meth:`HistoryIndex.prefixes_after`); a version at the page's current epoch is
    copied from the page. Every pair is checked before anything is read. Same errors
    as ``read_page_at``; each ``length`` must be an int ≥ 0."""
    state = require_state(state, "read_page_prefixes_at")
    pid = require_page_id(page_id, "read_page_prefixes_at")
    if isinstance(reads, str | bytes) or not isinstance(reads, Sequence):
        raise InvalidArgumentError("read_page_prefixes_at(): reads must be a sequence of "
                                   f"(epoch, length) pairs, not {type(reads).__name__}")
    wanted: list[tuple[int, int]] = []
    for item in reads:
        if type(item) is not tuple or len(item) != 2:
            raise InvalidArgumentError("read_page_prefixes_at(): each read must be an "
                                       f"(epoch, length) tuple, not {item!r}")
        epoch, length = item
        e = epoch if type(epoch) is int else _as_int(epoch, "epoch")
        n = length if type(length) is int else _as_int(length, "length")
        if e < 0:
            raise InvalidArgumentError(f"epoch {e} is negative")
        if n < 0:
            raise InvalidArgumentError(f"length {n} is negative")
        wanted.append((e, n))
    out: list[bytes] = [b""] * len(wanted)
    with state.lock:
        state.require_replayable("read_page_prefixes_at")
        table = state.table
        current = int(table.views[2][pid]) if table.is_live(pid) else -1
        try:
            ix: HistoryIndex | None = None
            past: list[tuple[int, int]] = []
            slots: list[int] = []
            line: PageLine | None = None
            for k, (e, n) in enumerate(wanted):
                if e == current:
                    out[k] = state.page_view(pid)[:n].tobytes()
                    continue
                if ix is None:
                    ix = history_index(state)
                line, j = ix.position_at_epoch(pid, e)
                past.append((j, n))
                slots.append(k)
            if ix is not None and line is not None:
                for k, data in zip(slots, ix.prefixes_after(line, past), strict=True):
                    out[k] = data
        except (MemoryError, IndexError, KeyError, ValueError, OverflowError) as exc:
            raise _damaged(exc) from None
    return out


def state_at_lsn(state: MMSBState, lsn: int) -> MMSBState:
    """A new, detached state equal to ``state`` right after record ``lsn`` (checked by
    the caller, who holds the lock), built from the index instead of a replay of every
    record: the structural records up to ``lsn`` go through the engine's apply path
    (pages, sizes, metadata, edges, id counters, written-byte masks), each page that
    changed gets its bytes from its keyframe plus at most K deltas, and the log is the
    retained log's prefix (:meth:`TransactionLog.extend_from`: rows copied in one go,
    payloads shared).

    A resize keeps, and a clone copies, the page's written-byte mask as of that record,
    which the engine reads from the log: the new log is extended to the record before
    each of them, so the masks come out as a record-by-record replay leaves them.

    Cost: O(structural records + pages × (log n + page size + K deltas) + delta rows
    kept, vectorised), instead of O(every record and byte written) for a replay.
    """
    ix = history_index(state)
    new = MMSBState(dataclasses.replace(state.config))
    new.detached = True
    if ix.base is not None:
        new.restore(ix.base_snapshot())
        new.log.horizon_lsn = new.log.last_lsn
    nlog = new.log
    src_log = state.log
    t = new.table
    done = 0  # the records of src_log with LSN ≤ done are in nlog
    run: list[PageCreate] = []

    def flush_creates() -> None:
        # Pages created one after another become one bulk creation (same pages, same
        # rows; the log keeps the records themselves).
        if run:
            first = run[0]
            new.apply_record(PageCreate(first.first_id, len(run), first.size, first.location,
                                        None, lsn=first.lsn, timestamp=first.timestamp))
            run.clear()

    for rec in src_log.iter_structs(0, lsn):
        if type(rec) is PageCreate and rec.count == 1 and not rec.metadata:
            if run and (rec.first_id != run[-1].first_id + 1 or rec.size != run[0].size
                        or rec.location != run[0].location):
                flush_creates()
            run.append(rec)
            continue
        flush_creates()
        if kind_of(rec).reads_masks:
            nlog.extend_from(src_log, done, rec.lsn - 1)
            done = rec.lsn - 1
            if isinstance(rec, PageClone):
                # A clone copies its source's bytes and epoch as they were then.
                src = rec.source_id
                line, j = ix.position_at_lsn(src, rec.lsn)
                ix.bytes_after(line, j, out=new.page_view(src))
                t.epoch[src] = line.epochs[j]
            new.apply_record(rec)
        elif isinstance(rec, Compacted):
            # A compaction marker moves the page-id counter; the invariant checks that
            # applying it runs expect page bytes and epochs, which are set below.
            t.next_id = max(t.next_id, rec.next_id)
        else:
            new.apply_record(rec)
    flush_creates()
    nlog.extend_from(src_log, done, lsn)
    for pid in t.live_ids().tolist():
        line, j = ix.position_at_lsn(pid, lsn)
        if j == 0:
            continue  # as created, as in the replay base, or as cloned: already right
        ix.bytes_after(line, j, out=new.page_view(pid))
        t.epoch[pid] = line.epochs[j]
    top = src_log.max_id_through(src_log.rows_through(lsn))
    if top >= new.next_delta_id:
        new.next_delta_id = top + 1
    return new
