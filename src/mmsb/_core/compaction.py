"""Log compaction: the canonical rewrite of ``compress_log``, and the incremental
compaction an in-memory state runs by itself.

**Canonical rewrite** (:func:`compress_log_locked`): the shortest record sequence that
rebuilds the current state, in one call.

**Incremental compaction** (:func:`compaction_step`): when an in-memory log holds more
than seven eighths of ``max_tlog_size`` delta rows, a :class:`FoldJob` starts. It replays the
retained records up to the newest one (the *cut*) into a detached state, the *fold*,
one bounded slice at a time: at most :data:`SLICE_ROWS` delta rows (through the
compiled row kernel), one structural record, :data:`SLICE_PAGES` pages of a creation
run, or the written-byte masks of :data:`SLICE_MASKS` pages. Each write (and each
batch's end) runs slices until :data:`STEP_NS` have passed. The fold's masks are
brought up to the cut at the end, page by page, and handed to the live state as they
go (a mask as of the cut, with the rows after it, is the same mask). Then one short
step swaps: the fold becomes the replay base (:class:`StateBase`), the records up to
the cut leave the log (O(records kept)) and the horizon moves to the cut. Until then
every replay and read uses the old base and the whole log, so the state is
consistent after every call. Should the log reach ``max_tlog_size`` while a job runs,
that call finishes it.

A base is never edited while it is the base. The fold of the next job starts from the
state of the base before it (the *spare*), catching up on the records between the two
from a frozen copy of the log's columns taken at the swap (the *side log*), so a job
folds about twice the rows of one threshold and never copies a whole state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import HistoryUnavailableError, SerializationError
from .delta import make_delta
from .log import TransactionLog, _CreateRun
from .page_table import LIVE
from .records import AnyRecord, Compacted, EdgeAdd, MetadataSet, PageCreate, kind_of
from .snapshot import ReplayBase, Snapshot

if TYPE_CHECKING:
    from .engine import MMSBState

__all__ = ["compress_log_locked", "compaction_step", "FoldJob", "StateBase", "SnapshotBase",
           "bind_base_encoder", "start_at", "STEP_NS", "START_EIGHTHS", "SLICE_ROWS", "SLICE_PAGES",
           "SLICE_MASKS", "SLICE_MASK_PAGES", "SLICE_BYTES", "COPY_PER_ROW"]

STEP_NS = 300_000
"""A compaction step starts no new slice after this many nanoseconds."""
START_EIGHTHS = 7
"""Compaction starts when the log holds more than this many eighths of max_tlog_size."""
SLICE_ROWS = 2048
"""Most delta rows folded in one slice."""
SLICE_PAGES = 1 << 14
"""Most pages of a creation run folded in one slice."""
SLICE_MASKS = 32
"""Most pages whose masks one slice takes from the current base (after the side log)."""
SLICE_MASK_PAGES = 256
"""Most pages whose masks one slice hands to the live state at the cut."""
SLICE_BYTES = 1 << 20
"""About the most page bytes one slice copies from the current base."""
COPY_PER_ROW = 64
"""A job catches up on the side log by copying the pages its rows changed when that
copies at most this many bytes per row it would otherwise replay."""


# -- the canonical rewrite ---------------------------------------------------------------

def compress_log_locked(state: MMSBState) -> None:
    """Rewrite the log as the shortest record sequence that rebuilds the current state:
    bulk page creations, metadata, one ``"compressed"`` delta per written page (its
    epoch span 0 → epoch, its mask the page's written bytes), the edges, and a
    Compacted marker. History before the marker is gone; an incremental compaction in
    progress is dropped. Caller holds the lock."""
    state.require_history("compress_log")
    saved = state.history_snapshot()
    t = state.table
    log = state.log
    recs: list[AnyRecord] = []
    live = t.live_ids()
    i, n = 0, len(live)
    sizes, locs = t.size, t.loc
    while i < n:
        j = i + 1
        first = int(live[i])
        while (j < n and int(live[j]) == first + (j - i) and sizes[live[j]] == sizes[first]
               and locs[live[j]] == locs[first]):
            j += 1
        recs.append(PageCreate(first, j - i, int(sizes[first]), int(locs[first]), None))
        i = j
    for pid in live.tolist():
        meta = t.meta.get(pid)
        if meta:
            recs.append(MetadataSet(pid, dict(meta), "compressed"))
    written = [pid for pid in live.tolist() if t.epoch[pid]]
    masks = dict(zip(written, state.page_masks(written), strict=True))
    for pid in live.tolist():
        epoch = int(t.epoch[pid])
        view = state.page_view(pid)
        if epoch == 0:
            assert not view.any(), f"page {pid} has bytes but epoch 0"
            continue
        mask = masks[pid] | (view != 0)
        idx = np.flatnonzero(mask)
        recs.append(make_delta(state.new_delta_id(), pid, 0, len(view), idx, view[idx],
                               "compressed", epoch=epoch))
    for parent, child, et in state.graph.edges():
        recs.append(EdgeAdd(parent, child, int(et)))
    recs.append(Compacted(t.next_id))
    for rec in recs:
        log.stamp(rec)
        log.next_lsn = rec.lsn + 1
        log.last_timestamp = rec.timestamp
    log.replace_all(recs)
    state.mask_base = {}
    state.replay_base = None
    state.orphan_from = 0
    state.compaction = None
    if state.bus is not None:
        try:
            state.bus.after_compress(state)
        except BaseException:
            state.history_restore(saved)
            raise


# -- replay bases held as states ---------------------------------------------------------

_ENCODE: list[Callable[[MMSBState], bytes]] = []


def bind_base_encoder(encode: Callable[[MMSBState], bytes]) -> None:
    """Give :class:`StateBase` the checkpoint encoder of the storage layer (the core
    imports no storage)."""
    _ENCODE[:] = [encode]


class StateBase(ReplayBase):
    """A replay base held as a detached state: what incremental compaction folded.

    It also carries what the next compaction starts from: ``spare``, the base before it
    (a detached state, a ReplayBase to decode, or None for an empty state), and
    ``side``, a frozen copy of the log that held the records from the spare's LSN to
    this base's. ``log`` is the live log it was made for; ``lsn`` its LSN.
    """

    def __init__(self, state: MMSBState, lsn: int, log: TransactionLog,
                 spare: MMSBState | ReplayBase | None, side: TransactionLog | None) -> None:
        self.state = state
        self.lsn = lsn
        self.log = log
        self.spare = spare
        self.side = side
        self.touched: list[int] = []
        """Pages whose masks the records from the spare's LSN to this base's changed."""
        self.retired = False
        """True once its state went on to become the next fold (it must not be read)."""

    def _live(self) -> MMSBState:
        if self.retired:
            raise HistoryUnavailableError(
                "this replay base was folded into a newer one by compaction; read the "
                "state's current replay base")
        return self.state

    def raw(self) -> bytes:
        state = self._live()
        if not _ENCODE:
            raise SerializationError("no checkpoint encoder is loaded (import mmsb)")
        with state.lock:
            return _ENCODE[0](state)

    def snapshot(self) -> Snapshot:
        """The base as a Snapshot whose own ``base`` is that same image, so a state
        restored from it (a replay's origin) has its history start there too."""
        state = self._live()
        with state.lock:
            snap = state.snapshot()
        snap.base = SnapshotBase(snap, lambda: _empty_like(state))
        return snap


class SnapshotBase(ReplayBase):
    """A replay base held as a decoded image (a replayed state's: the base its origin
    was restored from). Restoring never changes a Snapshot, so it is shared."""

    def __init__(self, snap: Snapshot, make_state: Callable[[], MMSBState]) -> None:
        self.snap = snap
        self.make_state = make_state

    def raw(self) -> bytes:
        if not _ENCODE:
            raise SerializationError("no checkpoint encoder is loaded (import mmsb)")
        state = self.make_state()
        state.restore(self.snap)
        state.replay_base = None
        with state.lock:
            return _ENCODE[0](state)

    def snapshot(self) -> Snapshot:
        return self.snap


# -- incremental compaction --------------------------------------------------------------

class _Source:
    """Records of one log to fold, up to LSN ``stop``: a cursor over its delta rows and
    its structural entries (``sub``: pages of a creation run already folded)."""

    __slots__ = ("log", "stop", "row", "struct", "sub", "live", "structs_only")

    def __init__(self, log: TransactionLog, stop: int, live: bool,
                 structs_only: bool = False) -> None:
        self.log = log
        self.stop = stop
        self.row = 0
        self.struct = 0
        self.sub = 0
        self.live = live
        """The live log (its masks are tracked), not the side log."""
        self.structs_only = structs_only
        """Fold the structural records only: the pages the rows change are copied from
        the current base afterwards."""


class FoldJob:
    """One incremental compaction of ``state``'s log up to LSN ``cut`` (see the module
    docstring). Every method expects the caller to hold the state's lock.

    Masks: the fold's written-byte masks are brought up to date lazily. Rows of the
    side log are folded without them; afterwards the masks of the pages they changed
    are taken from the current base, which has them as of the same LSN. For the live
    log, ``mask_row`` says up to which row a page's mask entry holds its rows; a resize
    or clone brings its pages up to date before it applies, and the end of the fold
    brings every page the live log's records changed up to the cut, a slice of pages
    at a time, handing each to the live state as it goes."""

    def __init__(self, state: MMSBState) -> None:
        log = state.log
        self.log = log
        self.cut = log.last_lsn
        self.cut_rows = log.n
        self.cut_ts = log.last_timestamp
        self.next_id = state.table.next_id
        self.next_delta_id = state.next_delta_id
        self.base0 = state.replay_base
        self.horizon0 = log.horizon_lsn
        self.rows_folded = 0
        self.mask_row: dict[int, int] = {}
        self.struct_pages: set[int] = set()
        """Pages the live log's structural records up to the cut name."""
        self.sources: list[_Source] = []
        self.copy_todo: list[int] = []
        """Pages whose bytes and epochs are still to be copied from the current base."""
        self.fixup: list[int] = []
        """Pages whose masks the side log changed, still to take from the base."""
        self.fixup_from: MMSBState | None = None
        base = self.base0
        self.start_from: MMSBState | ReplayBase | None
        """What the fold starts from: a spare state (taken as it is), a replay base
        (decoded), or None (an empty state)."""
        self.spare_out: MMSBState | ReplayBase | None
        """The next job's start: the state of the current base, or the base itself."""
        self.retire: StateBase | None = None
        if isinstance(base, StateBase) and base.log is log and base.lsn == log.horizon_lsn \
                and not base.retired and base.side is not None:
            # The usual case: the spare catches up on the side log to this base's LSN,
            # then on the live log to the cut. Its state is this machinery's alone.
            self.start_from = base.spare
            # Catching up: replay the side log's rows, or copy the pages they changed
            # from the current base when that moves fewer bytes (its structural records
            # are replayed either way).
            side_rows = base.side.rows_through(base.lsn)
            touched = np.asarray(base.touched, np.int64)
            copy_bytes = int(base.state.table.size[touched].sum()) if len(touched) else 0
            by_copy = copy_bytes <= COPY_PER_ROW * side_rows
            self.sources.append(_Source(base.side, base.lsn, False, structs_only=by_copy))
            self.copy_todo = list(base.touched) if by_copy else []
            self.fixup = list(base.touched)
            self.fixup_from = base.state
            self.spare_out = base.state
            self.retire = base
        else:
            # The first compaction (from an empty state), or a base that is not a
            # fold of this log (a loaded checkpoint's): it is decoded once.
            self.start_from = base
            self.spare_out = base
        self.fold: MMSBState | None = None
        self.sources.append(_Source(log, self.cut, True))
        self.touched: list[int] | None = None
        """Pages whose masks the live log's records up to the cut change (set when the
        fold reaches the cut)."""
        self.scan_row = 0
        """Live rows scanned into ``mask_out`` so far (after the fold reached the cut)."""
        self.mask_done = 0
        """Touched pages whose masks were handed over so far."""
        self.mask_out = np.zeros(0, bool)
        self.mask_bounds = np.zeros(1, np.int64)
        self.mask_slot = np.zeros(1, np.int32)
        self.mask_starts = np.zeros(0, np.int64)

    def valid_for(self, state: MMSBState) -> bool:
        """True while the state's log still holds what this job folds."""
        return (state.log is self.log and state.replay_base is self.base0
                and self.log.horizon_lsn == self.horizon0 and state.bus is None)

    # -- the fold --------------------------------------------------------------------
    def _start(self, state: MMSBState) -> MMSBState:
        start = self.start_from
        if isinstance(start, ReplayBase) or start is None:
            fold = _empty_like(state)
            if start is not None:
                fold.restore(start.snapshot())
        else:
            fold = start
        self.fold = fold
        self.start_from = None
        return fold

    def slice(self, state: MMSBState) -> bool:
        """Do one bounded slice of work; False when the job is done (swapped in)."""
        fold = self.fold if self.fold is not None else self._start(state)
        while self.sources:
            src = self.sources[0]
            if src.live and self.copy_todo:
                self._copy_pages(fold)
                return True
            if src.live and self.fixup:
                self._fix_masks(fold)
                return True
            if self._fold_slice(fold, src):
                return True
            self.sources.pop(0)
        if self.touched is None:
            self._finish_fold(fold)
            return True
        if self.scan_row < self.cut_rows:
            self._scan_masks()
            return True
        if self.mask_done < len(self.touched):
            self._final_masks(state, fold)
            return True
        self._swap(state, fold)
        return False

    def _fold_slice(self, fold: MMSBState, src: _Source) -> bool:
        """Fold the next slice of ``src``: delta rows up to its next structural record,
        or that record. False when ``src`` is folded up to its stop."""
        log = src.log
        structs = log.structs
        nxt = src.stop + 1
        entry: Any = None
        if src.struct < len(structs):
            entry = structs[src.struct]
            nxt = min(nxt, entry.lsn + src.sub)
        limit = log.rows_through(nxt - 1)
        if src.structs_only:
            src.row = max(src.row, limit)
        if src.row < limit:
            self._fold_rows(fold, src, limit)
            return True
        if nxt > src.stop:
            return False
        if type(entry) is _CreateRun:
            # One bulk creation per slice (the run's pages are consecutive ids).
            end = min(entry.count, src.stop - entry.lsn + 1)
            m = min(end - src.sub, SLICE_PAGES)
            fold.apply_record(PageCreate(entry.first_id + src.sub, m, entry.size,
                                         entry.location, None, lsn=nxt))
            src.sub += m
            if src.sub >= end:
                src.struct += 1
                src.sub = 0
            return True
        kind = kind_of(entry)
        pages = kind.pages(entry) if kind.moves_bytes or kind.reads_masks else ()
        if src.live and kind.reads_masks:
            self._masks_up_to(fold, [p for p in pages if fold.table.is_live(p)], src.row)
        fold.apply_record(entry)
        if src.live:
            self.struct_pages.update(pages)
            for p in pages:
                self.mask_row[p] = src.row
        src.struct += 1
        return True

    def _fold_rows(self, fold: MMSBState, src: _Source, limit: int) -> None:
        """Fold delta rows from ``src.row`` (before ``limit``): their bytes and epochs,
        in one compiled pass."""
        log = src.log
        a = src.row
        b = min(limit, a + SLICE_ROWS)
        log.write_rows(a, b, fold.table, fold.arena)
        top = log.max_id_between(a, b)
        if top >= fold.next_delta_id:
            fold.next_delta_id = top + 1
        self.rows_folded += b - a
        src.row = b

    def _masks_up_to(self, fold: MMSBState, pids: list[int], row: int) -> None:
        """Bring the fold's masks of ``pids`` (live pages of the fold) up to live row
        ``row``: their old entries OR'd with what their rows since ``mask_row`` write,
        in one compiled pass; the new entries share one buffer."""
        if not pids:
            return
        mask_row = self.mask_row
        sizes = fold.table.size[np.asarray(pids, np.int64)]
        starts = [mask_row.get(p, 0) for p in pids]
        out, bounds = self.log.rows_masks(pids, sizes, starts, row)
        bases = fold.mask_base
        olds = [bases.get(p) for p in pids]
        b = bounds.tolist()
        if all(o is not None and len(o[0]) == b[k + 1] - b[k] for k, o in enumerate(olds)):
            out |= np.concatenate([o[0] for o in olds])  # type: ignore[index]
        else:
            for k, old in enumerate(olds):
                if old is not None:
                    m = out[b[k]:b[k + 1]]
                    n = min(len(m), len(old[0]))
                    m[:n] |= old[0][:n]
        cut = self.cut
        for k, pid in enumerate(pids):
            bases[pid] = (out[b[k]:b[k + 1]], cut)
            mask_row[pid] = row

    def _copy_pages(self, fold: MMSBState) -> None:
        """Copy from the current base the bytes and epochs of a slice of the pages the
        side log's rows changed (about :data:`SLICE_BYTES` bytes): the fold, which got
        the side log's structural records only, then equals the base."""
        assert self.fixup_from is not None
        theirs = self.fixup_from
        tt, ft = theirs.table, fold.table
        done = 0
        todo = self.copy_todo
        while todo and done < SLICE_BYTES:
            pid = todo.pop()
            if not (tt.is_live(pid) and ft.is_live(pid)):
                continue
            size = int(tt.size[pid])
            fold.page_view(pid)[:] = theirs.page_view(pid)
            ft.epoch[pid] = tt.epoch[pid]
            done += size
        if not todo:
            fold.next_delta_id = max(fold.next_delta_id, theirs.next_delta_id)
            ft.next_id = max(ft.next_id, tt.next_id)

    def _fix_masks(self, fold: MMSBState) -> None:
        """Take from the current base the masks of a slice of the pages the side log
        changed (the fold is now at the base's LSN, and so are the base's masks)."""
        part = self.fixup[-SLICE_MASKS:]
        del self.fixup[-SLICE_MASKS:]
        assert self.fixup_from is not None
        theirs = self.fixup_from.mask_base
        mine = fold.mask_base
        for pid in part:
            entry = theirs.get(pid)
            if entry is not None:
                mine[pid] = entry
            else:
                mine.pop(pid, None)

    def _finish_fold(self, fold: MMSBState) -> None:
        """The fold is the state at the cut: its counters say so. Then set up the scan
        that brings the masks of every page the live log's records changed up to the
        cut: one buffer for all of them, filled a slice of rows at a time."""
        flog = fold.log
        flog.next_lsn = self.cut + 1
        flog.last_timestamp = max(flog.last_timestamp, self.cut_ts)
        flog.horizon_lsn = self.cut
        flog.horizon_timestamp = self.cut_ts
        fold.table.next_id = max(fold.table.next_id, self.next_id)
        fold.next_delta_id = max(fold.next_delta_id, self.next_delta_id)
        fold.replay_base = None
        fold.orphan_from = 0
        # Every page with delta rows in the log (some only after the cut: their masks
        # are brought up to the cut for nothing, which is harmless).
        touched = self.struct_pages.union(self.log.index)
        touched.discard(0)
        ids = np.fromiter(touched, np.int64, len(touched))
        ids = ids[_live_in(fold.table, ids)]
        self.touched = ids.tolist()
        self.struct_pages.difference_update(self.touched)  # pages gone by the cut
        sizes = fold.table.size[ids]
        self.mask_bounds = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(sizes, out=self.mask_bounds[1:])
        self.mask_out = np.zeros(int(self.mask_bounds[-1]), bool)
        self.mask_slot = np.zeros(int(ids.max()) + 1 if len(ids) else 1, np.int32)
        self.mask_slot[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        self.mask_starts = np.array([self.mask_row.get(p, 0) for p in self.touched], np.int64)
        self.scan_row = int(self.mask_starts.min()) if len(ids) else self.cut_rows

    def _scan_masks(self) -> None:
        """Mark what a slice of the live rows before the cut write into the touched
        pages' masks (one compiled scan)."""
        a = self.scan_row
        b = min(self.cut_rows, a + SLICE_ROWS)
        self.log.scan_masks(a, b, self.mask_slot, self.mask_starts, self.mask_out,
                            self.mask_bounds)
        self.scan_row = b

    def _final_masks(self, state: MMSBState, fold: MMSBState) -> None:
        """For a slice of the touched pages: the fold's mask as of the cut (its entry OR
        what the scan marked), handed to the live state as well. An entry the live
        state made after the cut (a later resize or clone) is newer and stays. Either
        entry gives the same mask while the rows up to the cut are still in the log, so
        this goes ahead of the swap."""
        touched = self.touched
        assert touched is not None
        k0 = self.mask_done
        k1 = min(len(touched), k0 + SLICE_MASK_PAGES)
        part = touched[k0:k1]
        b = self.mask_bounds[k0:k1 + 1].tolist()
        out = self.mask_out
        theirs = fold.mask_base
        olds = [theirs.get(p) for p in part]
        lo, hi = b[0], b[-1]
        if all(o is not None and len(o[0]) == b[k + 1] - b[k] for k, o in enumerate(olds)):
            out[lo:hi] |= np.concatenate([o[0] for o in olds])  # type: ignore[index]
        else:
            for k, old in enumerate(olds):
                if old is not None:
                    m = out[b[k]:b[k + 1]]
                    n = min(len(m), len(old[0]))
                    m[:n] |= old[0][:n]
        mine = state.mask_base
        cut = self.cut
        alive = _live_in(state.table, np.asarray(part, np.int64)).tolist()
        for k, pid in enumerate(part):
            entry = (out[b[k]:b[k + 1]], cut)
            theirs[pid] = entry
            cur = mine.get(pid)
            if cur is not None and cur[1] > cut:
                continue
            if alive[k]:
                mine[pid] = entry
            elif cur is not None:
                del mine[pid]
        self.mask_done = k1
        if k1 == len(touched):
            # Pages named by structural records and gone by the cut: no mask.
            for pid in self.struct_pages:
                cur = mine.get(pid)
                if cur is not None and cur[1] <= cut and not state.table.is_live(pid):
                    del mine[pid]

    def _swap(self, state: MMSBState, fold: MMSBState) -> None:
        """The fold becomes the replay base; the records up to the cut leave the log.
        O(records kept)."""
        log = self.log
        cut = self.cut
        side = log.frozen()
        log.drop_through(cut)
        log.horizon_lsn = cut
        log.horizon_timestamp = self.cut_ts
        if self.retire is not None:
            self.retire.retired = True
        base = StateBase(fold, cut, log, self.spare_out, side)
        base.touched = self.touched or []
        state.replay_base = base
        state.orphan_from = 0


def _live_in(table: Any, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` are live pages of ``table`` (bool per id). O(len(ids))."""
    ok = (ids > 0) & (ids < min(table.next_id, len(table.flags)))
    ok[ok] = (table.flags[ids[ok]] & LIVE).astype(bool)
    return ok


def _empty_like(state: MMSBState) -> MMSBState:
    new = type(state)(dataclasses.replace(state.config))
    new.detached = True
    return new


def start_at(threshold: int) -> int:
    """Delta rows past which compaction starts: :data:`START_EIGHTHS` eighths of
    ``max_tlog_size``, so that it is done (in a few calls) before the log holds
    ``max_tlog_size`` rows."""
    return threshold - threshold * (8 - START_EIGHTHS) // 8


def compaction_step(state: MMSBState, min_rows: int = 0) -> None:
    """Start or advance the state's incremental compaction (caller holds the lock; the
    state is in memory with logging on, outside a batch and a propagation pass): slices
    of work until :data:`STEP_NS` have passed and at least ``min_rows`` delta rows were
    folded (a call that logged many rows folds as many). A log past ``max_tlog_size``
    is compacted in this call until it is back under it, so no call leaves more behind.
    Cost per call: O(STEP_NS plus one slice); the swap that ends a job: O(records
    logged since it began)."""
    threshold = state.config.max_tlog_size
    t0 = time.perf_counter_ns()
    folded = 0
    while True:
        job = state.compaction
        if job is not None and not job.valid_for(state):
            job = state.compaction = None
        if job is None:
            if state.log.n <= start_at(threshold):
                state.compact_at = start_at(threshold)
                return
            if state.orphan_from:
                # The log does not reach back to a base: only the canonical rewrite can
                # bound it (once; later compactions fold from its records).
                compress_log_locked(state)
                state.compact_at = start_at(threshold)
                return
            job = state.compaction = FoldJob(state)
            state.compact_at = -1
        rows0 = job.rows_folded
        full = state.log.n > threshold
        try:
            while job.slice(state):
                if not full and time.perf_counter_ns() - t0 >= STEP_NS and (
                        folded + job.rows_folded - rows0 >= min_rows or not job.sources):
                    return
        except MemoryError:
            # The fold could not get its memory; the live state's history is whole.
            # Try again once the log has doubled.
            state.compaction = None
            state.compact_at = max(threshold, 2 * state.log.n)
            return
        folded += job.rows_folded - rows0
        state.compaction = None
        state.compact_at = start_at(threshold)
        if state.log.n <= threshold and folded >= min_rows:
            return
