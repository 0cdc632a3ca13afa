"""Log compaction: the shortest record sequence that rebuilds the current state."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .delta import make_delta
from .records import AnyRecord, Compacted, EdgeAdd, MetadataSet, PageCreate

if TYPE_CHECKING:
    from .engine import MMSBState

__all__ = ["compress_log_locked"]


def compress_log_locked(state: MMSBState) -> None:
    """Rewrite the log as the shortest record sequence that rebuilds the current state:
    bulk page creations, metadata, one ``"compressed"`` delta per written page (its
    epoch span 0 → epoch, its mask the page's written bytes), the edges, and a
    Compacted marker. History before the marker is gone. Caller holds the lock."""
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
    if state.bus is not None:
        try:
            state.bus.after_compress(state)
        except BaseException:
            state.history_restore(saved)
            raise
