"""Column groups of small writes made inside a batch.

Two producers log a batch's small writes as one :class:`DeltaGroup` (columns, no
``Delta`` object per write): ``apply_batch``'s vectorised pass, and the writes that
``write_page`` makes inside ``with batch(state)`` on an in-memory log, which put their
bytes into the page at once and keep only ``(page, offset, bytes)`` until something needs
their records (:func:`log_buffered`). Both end in :func:`log_group`, so their records,
epochs and events are those of the same writes done one by one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

import numpy as np

from ..types import EventType
from .kernels import advance_epochs, held_apply
from .log import DeltaGroup

if TYPE_CHECKING:
    from .engine import MMSBState, _BatchFrame

__all__ = ["BUFFERED_PAGE_MAX", "log_buffered", "log_group"]

BUFFERED_PAGE_MAX = 1 << 16
"""Largest page whose batch writes are held as columns: the first such write to a page
copies the whole page (the undo copy and the base the held writes are compared with)."""


def log_group(state: MMSBState, frame: _BatchFrame, pids: np.ndarray, sizes: np.ndarray,
              counts: np.ndarray, pos: np.ndarray, vals: np.ndarray, source: str) -> int:
    """Log writes that were compared and applied in order as one column group.

    Write ``w`` (of page ``pids[w]``, ``sizes[w]`` bytes) changed ``counts[w]`` bytes,
    whose positions in the page and new values are the next ``counts[w]`` entries of
    ``pos`` and ``vals``. Every changed write becomes one sparse delta (the caller makes
    sure each is sparse), advancing its page's epoch by one in write order; unchanged
    writes log nothing. Advances the epochs, queues the events and the pages to
    propagate. Returns the number of deltas logged. O(writes + changed bytes).
    """
    nw = len(pids)
    changed = np.flatnonzero(counts)
    ndeltas = len(changed)
    if not ndeltas:
        return 0
    t = state.table
    bounds = np.zeros(nw + 1, np.int64)
    np.cumsum(counts, out=bounds[1:])
    cpids = pids[changed]
    before = t.epoch[cpids]
    # A page written k times advances k times, in write order.
    base = np.empty(ndeltas, np.int64)
    advance_epochs(t.epoch, cpids, base)
    first_id = state.next_delta_id
    log = state.log
    stamp = log.next_lsn, log.last_timestamp
    lsn0, ts = frame.reserve(log, ndeltas)
    group = DeltaGroup(cpids, sizes[changed], base, pos, vals,
                       np.append(bounds[changed], bounds[nw]), lsn0, ts, first_id, source)
    try:
        frame.hold_group(log, group)
    except BaseException:
        t.epoch[cpids] = before
        log.next_lsn, log.last_timestamp = stamp
        raise
    state.next_delta_id = first_id + ndeltas
    state.counters.payload_bytes_logged += int(vals.size)
    if state.events.active:
        for k, (p, e) in enumerate(zip(cpids.tolist(), base.tolist(), strict=True)):
            state.emit(EventType.DELTA_APPLIED, p, e + 1, first_id + k, lsn0 + k)
            state.emit(EventType.PAGE_CHANGED, p, e + 1, first_id + k)
    children = state.graph.children
    if children:
        state.pending.update(p for p in set(cpids.tolist()) if p in children)
    return ndeltas


def log_buffered(state: MMSBState, frame: _BatchFrame) -> int:
    """Log the writes ``frame`` holds (``write_page`` calls inside a batch, whose bytes are
    already in their pages) and start holding anew. Each write is compared, in order,
    with a copy of its page taken before the first held write to it, so each logs the
    bytes it changed at that moment, as done one by one. Returns the deltas logged.
    Caller holds the lock. O(held writes + bytes of the pages copied)."""
    writes = frame.writes
    nw = len(writes) >> 1
    if not nw:
        return 0
    t0 = time.perf_counter_ns()
    keys = np.fromiter(writes[0::2], np.int64, nw)  # slot << 16 | offset
    datas = cast(list[bytes], writes[1::2])
    # The pages copied, in the order of their slots (a held write names its slot).
    held = np.array(frame.held_ids, np.int64)
    held_sizes = state.table.size[held]
    starts = np.zeros(len(held), np.int64)
    np.cumsum(held_sizes[:-1], out=starts[1:])
    # The compare runs on a scratch copy: the page copies are also the undo entries.
    shadow = np.frombuffer(bytearray().join(frame.copies), np.uint8)
    ks = keys >> 16
    offs = keys & 0xFFFF
    lens = np.fromiter(map(len, datas), np.int64, nw)
    cat = np.frombuffer(b"".join(datas), np.uint8)
    total = len(cat)
    pos = np.empty(total, np.int32)  # positions in pages of at most 64 KiB
    vals = np.empty(total, np.uint8)
    counts = np.empty(nw, np.int64)
    n = held_apply(shadow, starts[ks], offs, lens, cat, pos, vals, counts)
    logged = log_group(state, frame, held[ks], held_sizes[ks], counts, pos[:n], vals[:n], "api")
    frame.writes = []
    frame.held = {}
    frame.held_ids = []
    frame.copies = []
    if logged:
        c = state.counters
        c.delta_apply.add_many(time.perf_counter_ns() - t0, logged)
        c.records_logged += logged
    return logged
