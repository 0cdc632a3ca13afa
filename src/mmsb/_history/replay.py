"""Replay: rebuilding states from log records, through the same apply path as live
writes, and the log's compression."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .._core.compaction import compress_log_locked
from .._core.delta import Delta, apply_clipped, make_delta, union_mask
from .._core.engine import (
    MMSBState,
    Page,
    PageSnapshot,
    require_page_id,
    require_state,
)
from .._core.log import TransactionLog
from .._core.records import (
    AnyRecord,
    Compacted,
    EdgeAdd,
    PageClone,
    PageCreate,
    PageResize,
    kind_of,
)
from ..errors import (
    HistoryUnavailableError,
    InvalidArgumentError,
    InvalidDeltaError,
    PageNotFoundError,
    SerializationError,
)
from .timetravel import (
    check_lsn_reachable,
    damaged_log_errors,
    history_index,
    lsn_at_time,
    state_at_lsn,
)

__all__ = [
    "replay_into",
    "replay_log_into",
    "replay_to_lsn",
    "replay_to_timestamp",
    "replay_records_to_lsn",
    "replay_to_epoch",
    "replay_log",
    "replay_page_history",
    "verify_state_consistency",
    "state_differences",
    "compute_diff",
    "incremental_replay",
    "replay_with_predicate",
    "compress_log",
]


def _detached(state: MMSBState) -> MMSBState:
    new = MMSBState(dataclasses.replace(state.config))
    new.detached = True
    return new


def _origin(state: MMSBState) -> MMSBState:
    """A detached state where replay of ``state``'s retained log starts: empty, or its
    replay base (the checkpoint image at the log's horizon). Caller holds the lock."""
    new = _detached(state)
    if state.replay_base is not None:
        new.restore(state.replay_base.snapshot())
        new.log.horizon_lsn = new.log.last_lsn
    return new


def replay_into(target: MMSBState, records: Iterable[AnyRecord]) -> MMSBState:
    """Apply logged ``records`` to ``target`` and keep them in its log.

    Runs of deltas are applied together (sparse ones in one vectorised scatter).
    O(records + changed bytes).

    Raises:
        SerializationError: a record that does not follow the state (a damaged log).
    """
    with damaged_log_errors():
        return _replay_into(target, records)


def _replay_into(target: MMSBState, records: Iterable[AnyRecord]) -> MMSBState:
    run: list[Delta] = []
    log = target.log
    for rec in records:
        if type(rec) is Delta:
            log.adopt(rec)
            run.append(rec)
            continue
        if run:
            target.apply_delta_run(run)
            run = []
        target.apply_record(rec)
        log.adopt(rec)
    if run:
        target.apply_delta_run(run)
    return target


def replay_log_into(target: MMSBState, source: TransactionLog, start: int,
                    stop: int) -> MMSBState:
    """Apply ``source``'s records with ``start`` < LSN ≤ ``stop`` to ``target`` and keep
    them in its log, exactly as :func:`replay_into` of those records would, without a
    Delta object for any delta.

    The delta rows between two structural records that create, free, resize or copy
    pages go into the pages in one compiled pass over their payloads
    (:meth:`TransactionLog.write_rows`: later rows win, epochs set vectorised); every
    structural record goes through the engine's apply path; the log takes the rows as
    :meth:`TransactionLog.extend_from` copies them (payload chunks shared), extended up
    to each resize or clone before it is applied, since those read the written-byte
    masks from the log. Caller holds ``source``'s owner's lock.

    Raises:
        SerializationError: a record that does not follow the state (a damaged log).

    Cost: O(structural records + rows + payload bytes), vectorised per run of rows.
    """
    with damaged_log_errors():
        t = target.table
        log = target.log
        done = start  # source records with LSN <= done are in target's log
        r0 = r_first = source.rows_through(start)
        for rec in source.iter_structs(start, stop):
            kind = kind_of(rec)
            if kind.moves_bytes:
                r1 = source.rows_through(rec.lsn)
                source.write_rows(r0, r1, t, target.arena)
                r0 = r1
                if kind.reads_masks:
                    log.extend_from(source, done, rec.lsn - 1)
                    done = rec.lsn - 1
            target.apply_record(rec)
        r1 = source.rows_through(stop)
        source.write_rows(r0, r1, t, target.arena)
        log.extend_from(source, done, stop)
        top = source.max_id_between(r_first, r1)
        if top >= target.next_delta_id:
            target.next_delta_id = top + 1
    return target


def replay_to_lsn(state: MMSBState, lsn: int) -> MMSBState:
    """A new, detached state equal to ``state`` right after record ``lsn``: pages,
    bytes, epochs, written-byte masks, metadata, edges, id counters and the log up to
    that record.

    Built from the history index (see :mod:`mmsb._history.timetravel`): the structural
    records up to ``lsn`` are applied, each changed page is its nearest keyframe plus at
    most K deltas, and the log is sliced. O(structural records + pages × (log n + page
    size + K deltas)).

    Raises:
        InvalidArgumentError: ``lsn`` outside 0 … last LSN.
        HistoryUnavailableError: ``lsn`` before the retained history.
    """
    state = require_state(state, "replay_to_lsn")
    with state.lock:
        lsn = check_lsn_reachable(state, lsn)
        with damaged_log_errors():
            return state_at_lsn(state, lsn)


def replay_to_timestamp(state: MMSBState, ns: int) -> MMSBState:
    """The state at time ``ns``: replay_to_lsn of the last record with timestamp ≤ ns
    (an empty state when ``ns`` is before the first record).

    Raises:
        InvalidArgumentError: ``ns`` is not an int, or negative.
        HistoryUnavailableError: ``ns`` is before the retained history.
    """
    state = require_state(state, "replay_to_timestamp")
    with state.lock:
        state.require_replayable("replay_to_timestamp")
        lsn = lsn_at_time(state, ns)
        with damaged_log_errors():
            return state_at_lsn(state, lsn)


def replay_records_to_lsn(state: MMSBState, lsn: int) -> MMSBState:
    """replay_to_lsn the long way: every retained record up to ``lsn`` applied in order
    from the log's origin (:func:`replay_log_into`: runs of delta rows in one compiled
    pass, structural records through the engine's apply path). What verification
    compares the live state and the index against. O(records + bytes written)."""
    state = require_state(state, "replay_records_to_lsn")
    with state.lock:
        lsn = check_lsn_reachable(state, lsn)
        return replay_log_into(_origin(state), state.log, 0, lsn)


def _epoch_cut(state: MMSBState, lo: int, hi: int) -> MMSBState:
    """The pages as they stand now (ids, sizes, locations, metadata, edges), each with
    the bytes its history gives for the epoch window [lo, hi]. For lo = 0
    (replay_to_epoch): the page as it was right after its last change at an epoch ≤ hi —
    clones, resizes and the replay base included — laid into its current size. For
    lo > 0 (replay_log's window): only the page's own deltas of that window, applied
    from zero."""
    state = require_state(state, "replay_to_epoch")
    for name, value in (("start_epoch", lo), ("end_epoch", hi)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvalidArgumentError(f"{name} must be an int, not {value!r}")
    new = _detached(state)
    with state.lock:
        state.require_replayable("epoch replay")
        t = state.table
        live = t.live_ids().tolist()
        cut = _history_cut(state, live, hi) if lo == 0 else _window_cut(state, live, lo, hi)
        pages = [(pid, int(t.size[pid]), int(t.loc[pid]), t.meta.get(pid), *cut[pid])
                 for pid in live]
        next_id = t.next_id
        edges = state.graph.edges()
    for pid, size, loc, meta, data, epoch, mask in pages:
        new.commit(PageCreate(pid, 1, size, loc, dict(meta) if meta else None))
        buf = np.zeros(size, np.uint8)
        n = min(size, len(data))
        buf[:n] = data[:n]
        if epoch:
            m = np.zeros(size, bool)
            m[:n] = mask[:n]
            idx = np.flatnonzero(m | (buf != 0))
            new.commit(make_delta(new.new_delta_id(), pid, 0, size, idx, buf[idx], "replay",
                                   epoch=epoch))
    for parent, child, et in edges:
        new.commit(EdgeAdd(parent, child, int(et)))
    if new.table.next_id < next_id:
        new.commit(Compacted(next_id))
    return new


Cut = dict[int, tuple[np.ndarray, int, np.ndarray]]


def _merged_across(d: Delta, bound: int) -> bool:
    return d.base_epoch < bound < d.epoch


def _history_cut(state: MMSBState, live: list[int], bound: int) -> Cut:
    """Page id → (bytes, epoch, written mask) right after the page's last change at an
    epoch ≤ ``bound``. One pass finds, from the records alone, which record that is for
    each page; one replay from the origin snapshots each page there. Caller holds the
    lock. O(records) plus one copy per page."""
    origin = _origin(state)
    records = state.log.records
    ot = origin.table
    epoch_of: dict[int, int] = {pid: int(ot.epoch[pid]) for pid in ot.live_ids().tolist()}
    last: dict[int, int] = {pid: -1 for pid, e in epoch_of.items() if e <= bound}
    too_new = {pid for pid, e in epoch_of.items() if e > bound}
    for i, rec in enumerate(records):
        if isinstance(rec, Delta):
            if _merged_across(rec, bound):
                raise HistoryUnavailableError(
                    f"page {rec.page_id}: epochs {rec.base_epoch}..{rec.epoch} were merged into "
                    f"one delta ({rec.source}), so epoch {bound} is not in the history")
            epoch_of[rec.page_id] = rec.epoch
            touched: tuple[int, ...] = (rec.page_id,)
        elif isinstance(rec, PageCreate):
            touched = tuple(range(rec.first_id, rec.first_id + rec.count))
            epoch_of.update(dict.fromkeys(touched, 0))
        elif isinstance(rec, PageClone):
            epoch_of[rec.page_id] = epoch_of.get(rec.source_id, 0)
            touched = (rec.page_id,)
        elif isinstance(rec, PageResize):
            touched = (rec.page_id,)
        else:
            continue
        for pid in touched:
            if epoch_of.get(pid, 0) <= bound:
                last[pid] = i
                too_new.discard(pid)
    missing = [pid for pid in live if pid not in last]
    if missing:
        raise HistoryUnavailableError(
            f"page {missing[0]}: its epochs up to {bound} are before the oldest retained "
            f"history (LSN {state.log.horizon_lsn})")
    wanted: dict[int, list[int]] = {}
    for pid in live:
        wanted.setdefault(last[pid], []).append(pid)
    out: Cut = {}

    def take(pids: list[int]) -> None:
        for pid in pids:
            out[pid] = (origin.page_view(pid).copy(), int(origin.table.epoch[pid]),
                        origin.page_mask(pid))

    take(wanted.get(-1, []))
    stop = max(wanted)
    for i, rec in enumerate(records[: stop + 1]):
        origin.apply_record(rec)
        if isinstance(rec, Delta):
            origin.log.adopt(rec)  # masks come from the log
        if i in wanted:
            take(wanted[i])
    return out


def _window_cut(state: MMSBState, live: list[int], lo: int, hi: int) -> Cut:
    """Page id → (bytes, epoch, mask) from the page's own deltas with lo ≤ epoch ≤ hi,
    applied from zero in log order. Caller holds the lock."""
    out: Cut = {}
    t = state.table
    origin = _origin(state) if state.replay_base is not None else None
    for pid in live:
        size = int(t.size[pid])
        retained = state.log.by_page.get(pid, ())
        if origin is not None and origin.table.is_live(pid) and \
                lo <= int(origin.table.epoch[pid]):
            raise HistoryUnavailableError(
                f"page {pid}: epochs up to {int(origin.table.epoch[pid])} are before the "
                f"oldest retained history (LSN {state.log.horizon_lsn})")
        for d in retained:
            if d.base_epoch + 1 < lo <= d.epoch or _merged_across(d, hi):
                raise HistoryUnavailableError(
                    f"page {pid}: epochs {d.base_epoch}..{d.epoch} were merged into one delta "
                    f"({d.source}), so the window {lo}..{hi} is not in the history")
        applied = [d for d in retained if lo <= d.epoch <= hi]
        buf = np.zeros(size, np.uint8)
        for d in applied:
            apply_clipped(buf, d)
        out[pid] = (buf, max((d.epoch for d in applied), default=0), union_mask(size, applied))
    return out


def replay_to_epoch(state: MMSBState, epoch: int) -> MMSBState:
    """A per-page cut, detached: the pages as they stand now, each with only
    its deltas of epoch ≤ ``epoch`` applied, in log order."""
    return _epoch_cut(state, 0, epoch)


def replay_log(state: MMSBState, start_epoch: int, end_epoch: int) -> dict[int, Page]:
    """An epoch-window snapshot: page id → detached page rebuilt from the
    deltas with ``start_epoch ≤ epoch ≤ end_epoch``."""
    snap = _epoch_cut(state, start_epoch, end_epoch)
    return {pid: Page(snap, pid) for pid in snap.pages}


def replay_page_history(state: MMSBState, page_id: int) -> list[PageSnapshot]:
    """One detached snapshot per retained delta of ``page_id``, oldest first, each with
    ``.epoch`` and ``.data`` (the page's bytes right after that delta). Deleted pages
    keep their history while the log retains it.

    Built from the page's own events in the history index (its start — creation,
    clone or replay base — resizes and deltas), never a replay of other pages.
    O(log n + the page's events × its size).

    Raises:
        PageNotFoundError: the log holds nothing of that page.
    """
    state = require_state(state, "replay_page_history")
    page_id = require_page_id(page_id, "replay_page_history")
    with state.lock:
        state.require_replayable("replay_page_history")
        if page_id not in state.log.by_page:
            if state.table.is_live(page_id):
                return []
            raise PageNotFoundError(page_id, "replay_page_history (no history in the log)")
        with damaged_log_errors():
            ix = history_index(state)
            line = ix.line(page_id)
            assert line is not None, "a page with deltas has a line"
            return [PageSnapshot(page_id, d.epoch, d.lsn, d.timestamp, buf.tobytes(), d.source)
                    for d, buf in ix.walk(line)]


def state_differences(a: MMSBState, b: MMSBState, limit: int = 20) -> list[str]:
    """Human-readable differences between two states' pages, graphs and id counters."""
    out: list[str] = []
    ta, tb = a.table, b.table
    ids_a, ids_b = set(ta.live_ids().tolist()), set(tb.live_ids().tolist())
    for pid in sorted(ids_a - ids_b):
        out.append(f"page {pid} only in the first state")
    for pid in sorted(ids_b - ids_a):
        out.append(f"page {pid} only in the second state")
    for pid in sorted(ids_a & ids_b):
        if len(out) >= limit:
            break
        for col in ("size", "epoch", "loc"):
            va, vb = int(getattr(ta, col)[pid]), int(getattr(tb, col)[pid])
            if va != vb:
                out.append(f"page {pid}: {col} {va} != {vb}")
        if ta.meta.get(pid, {}) != tb.meta.get(pid, {}):
            out.append(f"page {pid}: metadata differs")
        va_, vb_ = a.page_view(pid), b.page_view(pid)
        if len(va_) == len(vb_) and not np.array_equal(va_, vb_):
            first = int(np.flatnonzero(va_ != vb_)[0])
            out.append(f"page {pid}: bytes differ from offset {first}")
    if a.graph.edges() != b.graph.edges():
        out.append("dependency edges differ")
    if ta.next_id != tb.next_id:
        out.append(f"next page id {ta.next_id} != {tb.next_id}")
    return out[:limit]


def verify_state_consistency(state: MMSBState) -> bool:
    """True when replaying the whole retained log gives exactly the live state: same
    pages, bytes, epochs, sizes, locations, metadata, edges and id counter. O(log)."""
    state = require_state(state, "verify_state_consistency")
    with state.lock:
        state.require_replayable("verify_state_consistency")
        scratch = _origin(state)
        try:
            replay_log_into(scratch, state.log, 0, state.log.last_lsn)
        except SerializationError:
            return False  # a log that cannot be replayed does not rebuild the state
        return not state_differences(state, scratch, limit=1)


def compute_diff(state_a: MMSBState, state_b: MMSBState) -> list[Delta]:
    """Deltas that turn ``state_a``'s pages into ``state_b``'s: one per page present in
    both with equal size and different bytes, built on a's epoch (so
    ``incremental_replay(state_a, deltas)`` applies them). Pages missing from either
    state, or of different sizes, cannot be expressed as deltas and are left out."""
    state_a = require_state(state_a, "compute_diff")
    state_b = require_state(state_b, "compute_diff")
    out: list[Delta] = []
    first, second = sorted((state_a, state_b), key=id)  # one lock order: no deadlock
    with first.lock, second.lock:
        ta, tb = state_a.table, state_b.table
        common = np.intersect1d(ta.live_ids(), tb.live_ids())
        for pid in common.tolist():
            size = int(ta.size[pid])
            if size != int(tb.size[pid]):
                continue
            va, vb = state_a.page_view(pid), state_b.page_view(pid)
            ne = va != vb
            idx = np.flatnonzero(ne)
            if idx.size:
                out.append(make_delta(state_a.new_delta_id(), pid, int(ta.epoch[pid]), size,
                                      idx, vb[idx], "diff"))
    return out


def incremental_replay(state: MMSBState, deltas: Sequence[Delta]) -> MMSBState:
    """Route ``deltas`` (e.g. from compute_diff, or another state's log) into ``state``
    in order, as new log records. All or nothing: the whole sequence is checked first
    (pages exist, sizes match, each delta's base epoch follows the page's epoch), and
    on any refusal nothing is applied.

    Raises:
        PageNotFoundError, InvalidDeltaError: as route_delta would, for the first bad delta.
    """
    state = require_state(state, "incremental_replay")
    if not isinstance(deltas, Iterable) or isinstance(deltas, str | bytes):
        raise InvalidArgumentError(f"incremental_replay() takes Delta objects, not {type(deltas).__name__}")
    deltas = list(deltas)
    state.enter()
    try:
        t = state.table
        epochs: dict[int, int] = {}
        for d in deltas:
            if not isinstance(d, Delta):
                raise InvalidDeltaError(f"incremental_replay takes Delta objects, not {type(d).__name__}")
            pid = state.require_page(d.page_id, "incremental_replay")
            if d.page_size != int(t.size[pid]):
                raise InvalidDeltaError(
                    f"delta was built for {d.page_size} bytes but the page has {int(t.size[pid])}",
                    page_id=pid, delta_id=d.id)
            cur = epochs.get(pid, int(t.epoch[pid]))
            if d.base_epoch != cur:
                raise InvalidDeltaError(
                    f"delta was built on epoch {d.base_epoch} but the page will be at epoch {cur}",
                    page_id=pid, delta_id=d.id)
            if d.epoch <= d.base_epoch:
                raise InvalidDeltaError(
                    f"delta epoch {d.epoch} must be greater than its base epoch {d.base_epoch}",
                    page_id=pid, delta_id=d.id)
            epochs[pid] = d.epoch
        # One batch: propagation waits for the end, so the epochs checked above hold,
        # and a failure undoes every delta applied so far.
        state.begin_batch()
        ok = False
        try:
            for d in deltas:
                copy = Delta(state.new_delta_id(), d.page_id, d.base_epoch, d.epoch, d.source,
                             d.page_size, d._idx, d._vals, d._data, d._mask)
                state.route(copy)
            ok = True
        finally:
            state.end_batch(ok)
    finally:
        state.leave()
    return state


def replay_with_predicate(state: MMSBState, pred: Callable[[int, Delta], Any]) -> list[tuple[int, MMSBState]]:
    """For each retained delta with ``pred(delta.epoch, delta)`` true (a
    predicate over epochs and deltas), ``(delta.epoch, the state right after that delta)``: detached
    states, oldest first. One pass over the log; each hit costs one state copy."""
    state = require_state(state, "replay_with_predicate")
    if not callable(pred):
        raise InvalidArgumentError(f"replay_with_predicate() takes a callable, not {type(pred).__name__}")
    with state.lock:
        state.require_replayable("replay_with_predicate")
        records = list(state.log.records)
        scratch = _origin(state)
    hits = {d.lsn for d in state.log.deltas if pred(d.epoch, d)}
    out: list[tuple[int, MMSBState]] = []
    run: list[AnyRecord] = []
    for rec in records:
        run.append(rec)
        if rec.lsn in hits:
            replay_into(scratch, run)
            run = []
            assert isinstance(rec, Delta)
            out.append((rec.epoch, _copy_state(scratch)))
    return out


def _copy_state(state: MMSBState) -> MMSBState:
    """A detached deep copy (via the in-memory checkpoint codec: no shared buffers)."""
    new = _detached(state)
    new.restore(state.snapshot())
    return new


def compress_log(state: MMSBState) -> None:
    """Merge each page's deltas into one (source ``"compressed"``), bounding the log.
    The state is unchanged; replay to an LSN before the compression is no longer
    possible (HistoryUnavailableError). Runs by itself past ``max_tlog_size`` deltas.
    O(pages + written bytes)."""
    state = require_state(state, "compress_log")
    state.enter()
    try:
        state.refuse_in_batch("compress_log")
        compress_log_locked(state)
    finally:
        state.leave()

