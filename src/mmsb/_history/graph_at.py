"""The dependency graph as it stood right after a past LSN, rebuilt from the log's
structural records alone: page creations, clones and deletions, metadata and edges.
No page byte is read or copied, so it costs O(structural records up to the LSN + pages
× log n) where a replay (:func:`mmsb.replay_to_lsn`) also rebuilds every page's bytes.

A page's epoch at the LSN is that of its newest delta row at or before it (a binary
search in the page's row index), or, without one, the epoch it started with: 0 for a
created page, the source's epoch at the clone for a cloned one, the replay base's for a
page that was there at the log's horizon.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from typing import Any

from .._core.engine import MMSBState
from .._core.log import TransactionLog, _CreateRun
from .._core.records import (
    EdgeAdd,
    EdgeRemove,
    MetadataSet,
    PageClone,
    PageCreate,
    PageDelete,
)
from .._core.snapshot import ReplayBase
from ..types import EdgeType
from .timetravel import check_lsn_reachable

__all__ = ["GraphAt", "graph_at_lsn"]


@dataclass
class GraphAt:
    """Pages and edges right after ``lsn``."""

    lsn: int
    epochs: dict[int, int] = field(default_factory=dict)
    """Live page id → epoch, ascending ids."""
    metadata: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Page id → metadata, for live pages that have any (shared with the log's records
    and the replay base: read, never change)."""
    edges: list[tuple[int, int, EdgeType]] = field(default_factory=list)
    """``(parent, child, type)``, sorted."""


_BASES: weakref.WeakKeyDictionary[ReplayBase, tuple[dict[int, int], dict[int, dict[str, Any]],
                                                    list[tuple[int, int, EdgeType]]]] = \
    weakref.WeakKeyDictionary()
"""Replay base → its pages' epochs, metadata and edges (decoded once per base)."""


def _base_graph(base: ReplayBase) -> tuple[dict[int, int], dict[int, dict[str, Any]],
                                           list[tuple[int, int, EdgeType]]]:
    got = _BASES.get(base)
    if got is None:
        snap = base.snapshot()
        got = (dict(zip(snap.ids.tolist(), snap.epochs.tolist(), strict=True)),
               dict(snap.metadata), list(snap.edges))
        _BASES[base] = got
    return got


def _epoch_at(log: TransactionLog, pid: int, rows_through: int, start: int) -> int:
    """Epoch of page ``pid`` after its delta rows below ``rows_through`` (``start`` when
    it has none there)."""
    rows = log.index.get(pid)
    if rows is None:
        return start
    j = bisect.bisect_left(rows, rows_through)
    return int(log.rows["epoch"][rows[j - 1]]) if j else start


def graph_at_lsn(state: MMSBState, lsn: int) -> GraphAt:
    """The pages (ids, epochs, metadata) and edges of ``state`` right after record
    ``lsn``, equal to those of ``replay_to_lsn(state, lsn)``. Reads the state only; the
    caller holds its lock.

    Raises:
        InvalidArgumentError: ``lsn`` outside 0 … the last LSN.
        HistoryUnavailableError: ``lsn`` before the retained history, or a log that
            cannot rebuild the state alone.
    """
    lsn = check_lsn_reachable(state, lsn)
    log = state.log
    start: dict[int, int] = {}
    """Live page id → the epoch it started with."""
    meta: dict[int, dict[str, Any]] = {}
    children: dict[int, dict[int, int]] = {}
    parents: dict[int, set[int]] = {}
    if state.replay_base is not None:
        epochs0, meta0, edges0 = _base_graph(state.replay_base)
        start.update(epochs0)
        meta.update(meta0)
        for p, c, t in edges0:
            children.setdefault(p, {})[c] = int(t)
            parents.setdefault(c, set()).add(p)
    for rec in log.structs:
        if rec.lsn > lsn:
            break
        if type(rec) is _CreateRun:
            for pid in range(rec.first_id, rec.first_id + min(rec.count, lsn - rec.lsn + 1)):
                start[pid] = 0
        elif type(rec) is PageCreate:
            for pid in range(rec.first_id, rec.first_id + rec.count):
                start[pid] = 0
                if rec.metadata:
                    meta[pid] = dict(rec.metadata)
        elif type(rec) is PageDelete:
            pid = rec.page_id
            start.pop(pid, None)
            meta.pop(pid, None)
            for c in children.pop(pid, {}):
                parents.get(c, set()).discard(pid)
            for p in parents.pop(pid, set()):
                children.get(p, {}).pop(pid, None)
        elif type(rec) is PageClone:
            src = rec.source_id
            start[rec.page_id] = _epoch_at(log, src, log.rows_through(rec.lsn), start.get(src, 0))
            if src in meta:
                meta[rec.page_id] = dict(meta[src])
        elif type(rec) is MetadataSet:
            if rec.metadata:
                meta[rec.page_id] = rec.metadata
            else:
                meta.pop(rec.page_id, None)
        elif type(rec) is EdgeAdd:
            children.setdefault(rec.parent_id, {})[rec.child_id] = rec.edge_type
            parents.setdefault(rec.child_id, set()).add(rec.parent_id)
        elif type(rec) is EdgeRemove:
            children.get(rec.parent_id, {}).pop(rec.child_id, None)
            parents.get(rec.child_id, set()).discard(rec.parent_id)
        # Resizes and migrations keep ids, epochs, metadata and edges; a compaction
        # marker only moves the id counter.
    k = log.rows_through(lsn)
    out = GraphAt(lsn)
    for pid in sorted(start):
        out.epochs[pid] = _epoch_at(log, pid, k, start[pid])
        if pid in meta:
            out.metadata[pid] = meta[pid]
    out.edges = sorted((p, c, EdgeType(t)) for p, cs in children.items() for c, t in cs.items())
    return out
