"""The batch write path: many writes under one lock, checked first, applied in order,
one propagation pass and one event burst at the end."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, InvalidDeltaError
from .arena import CHUNK_SHIFT
from .batch_writes import log_group
from .delta import as_bytes_array, sparse_enough
from .engine import MMSBState, check_source
from .kernels import batch_apply

__all__ = ["run_batch"]


def _prepare(state: MMSBState, writes: Iterable[tuple[int, int, Any]]) -> list[tuple[int, int, np.ndarray]]:
    """Check every write (page, range, bytes) before anything is applied."""
    t = state.table
    out: list[tuple[int, int, np.ndarray]] = []
    for k, w in enumerate(writes):
        try:
            page_id, offset, data = w
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"batch write #{k} must be a (page_id, offset, bytes) tuple, not {w!r:.80}") from None
        pid = state.require_page(page_id, f"apply_batch (write #{k})")
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer):
            raise InvalidDeltaError(f"batch write #{k}: offset must be an int, not {offset!r}", page_id=pid)
        arr = as_bytes_array(data, f"batch write #{k} data")
        size = int(t.size[pid])
        if offset < 0 or offset + len(arr) > size:
            raise InvalidDeltaError(
                f"batch write #{k} of {len(arr)} bytes at offset {offset} runs outside the page "
                f"(size {size})", page_id=pid)
        out.append((pid, int(offset), arr))
    return out


_BYTES_TYPES = (bytes, bytearray, memoryview)


def _columns(writes: list[Any]) -> tuple[np.ndarray, np.ndarray, list[Any]] | None:
    """The writes as (page ids, offsets, payloads) when every write is a plain
    ``(int, int, bytes-like)`` triple; None otherwise (the checked path then reports)."""
    try:
        pids_t, offs_t, datas = zip(*writes, strict=True)
    except (TypeError, ValueError):
        return None
    if not (set(map(type, pids_t)) == {int} and set(map(type, offs_t)) == {int}
            and set(map(type, datas)) <= set(_BYTES_TYPES)):
        return None
    return np.array(pids_t, dtype=np.int64), np.array(offs_t, dtype=np.int64), list(datas)


def _vector_batch(state: MMSBState, writes: list[Any], source: str) -> int | None:
    t0 = time.perf_counter_ns()
    logged = _vector_apply(state, writes, source)
    if logged:
        c = state.counters
        c.delta_apply.add_many(time.perf_counter_ns() - t0, logged)
        c.records_logged += logged
    return logged


def _vector_apply(state: MMSBState, writes: list[Any], source: str) -> int | None:
    """Apply a batch of small writes in one compiled pass (each byte compared with
    what the page holds at that moment, changes recorded with their old values), then
    log them as one column group.
    Returns the number of deltas logged, or None when the batch needs the
    write-by-write path (a dense delta, pages in several arena chunks, odd inputs, or
    any refusal — which that path then reports).
    The log and the pages end exactly as with the writes done one by one."""
    cols = _columns(writes)
    if cols is None:
        return None
    pids, offs, datas = cols
    t = state.table
    nw = len(datas)
    lens = np.fromiter(map(len, datas), np.int64, nw)
    if (pids <= 0).any() or (pids >= t.next_id).any():
        return None
    if not t.flags[pids].all() or (offs < 0).any():
        return None
    sizes = t.size[pids]
    if (offs + lens > sizes).any():
        return None
    cat = np.frombuffer(b"".join(datas), np.uint8)
    total = len(cat)
    if total == 0:
        return 0
    addrs = t.addr[pids]
    chunk_of = addrs >> CHUNK_SHIFT
    c0 = int(chunk_of[0])
    if not (chunk_of == c0).all() or not ((addrs + sizes - 1) >> CHUNK_SHIFT == c0).all():
        return None
    chunk = state.arena.chunk(c0)
    assert chunk is not None
    local = addrs & ((1 << CHUNK_SHIFT) - 1)
    rel = np.empty(total, np.int64)
    vals = np.empty(total, np.uint8)
    at = np.empty(total, np.int64)
    old = np.empty(total, np.uint8)
    counts = np.empty(nw, np.int64)
    nchanged = batch_apply(chunk, local, offs, lens, cat, rel, vals, at, old, counts)
    if nchanged == 0:
        return 0
    rel, vals, at, old = rel[:nchanged], vals[:nchanged], at[:nchanged], old[:nchanged]
    changed = np.flatnonzero(counts)
    if not sparse_enough(counts[changed], sizes[changed]).all():
        chunk[at[::-1]] = old[::-1]  # a dense delta: its payload depends on the writes before it
        return None
    frame = state.batch_frame
    assert frame is not None
    frame.undo_scatter(c0, at[::-1], old[::-1], pids[changed], t.epoch[pids[changed]].copy())
    return log_group(state, frame, pids, sizes, counts, rel, vals, source)


def run_batch(state: MMSBState, writes: Iterable[tuple[int, int, Any]], source: str = "api") -> int:
    """Apply ``writes`` as one group (see :func:`mmsb.apply_batch`). Returns the number of
    deltas logged."""
    check_source(source)
    state.enter()
    try:
        items = writes if isinstance(writes, list) else list(writes)
        state.begin_batch()
        ok = False
        try:
            fast = _vector_batch(state, items, source) if len(items) >= 16 else None
            if fast is not None:
                logged = fast
            else:
                logged = 0
                for pid, off, arr in _prepare(state, items):
                    logged += state.write_bytes(pid, off, arr, source, False)
            ok = True
        finally:
            state.end_batch(ok)
        return logged
    finally:
        state.leave()
