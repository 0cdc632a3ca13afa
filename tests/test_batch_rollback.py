"""A failed batch restores everything, whatever mix of write paths it used: compiled
small writes, general (dense or large) writes, routed deltas and vectorised
``apply_batch`` groups, on an in-memory log (rows logged at once, truncated back) and on
a durable bus (records held back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from conftest import log_view, pages_view

SIZES = (64, 64, 8192)

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.integers(0, 63), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("dense"), st.integers(0, 2), st.integers(0, 255)),
    st.tuples(st.just("vector"), st.integers(0, 1), st.binary(min_size=16, max_size=40)),
    st.tuples(st.just("route"), st.integers(0, 1), st.integers(0, 63)),
)


def _apply(s: mmsb.MMSBState, ids: list[int], o: tuple[Any, ...]) -> None:
    kind = o[0]
    if kind == "write":
        pid = ids[o[1]]
        off = min(o[2], SIZES[o[1]] - len(o[3]))
        mmsb.write_page(s, pid, off, o[3])
    elif kind == "dense":
        pid = ids[o[1]]
        mmsb.update_page(s, pid, bytes([o[2]]) * SIZES[o[1]])
    elif kind == "vector":
        pid = ids[o[1]]
        mmsb.apply_batch(s, [(pid, i % 60, o[2][i:i + 1]) for i in range(len(o[2]))])
    else:
        pid = ids[o[1]]
        mask = np.zeros(SIZES[o[1]], bool)
        mask[o[2]] = True
        data = np.full(SIZES[o[1]], 7, np.uint8)
        mmsb.route_delta(s, mmsb.create_delta(s, pid, mask, data))


def _counted(s: mmsb.MMSBState) -> tuple[int, int]:
    stats = mmsb.get_stats(s)
    return stats.records_logged, stats.payload_bytes_logged


def _state(kind: str, tmp: Path) -> tuple[mmsb.MMSBState, list[int]]:
    s = mmsb.mmsb_start(path=tmp) if kind == "bus" else mmsb.MMSBState()
    ids = [mmsb.create_page(s, n).id for n in SIZES]
    mmsb.write_page(s, ids[0], 0, b"\x01" * 64)
    return s, ids


@pytest.mark.parametrize("kind", ["memory", "bus"])
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=8))
def test_a_failed_batch_changes_nothing(tmp_path_factory: Any, kind: str,
                                        ops: list[tuple[Any, ...]]) -> None:
    s, ids = _state(kind, tmp_path_factory.mktemp("b"))
    try:
        before = (pages_view(s), log_view(s), s.last_lsn, len(s.log.records), _counted(s))
        with pytest.raises(RuntimeError, match="user code failed"), mmsb.batch(s):
            for o in ops:
                _apply(s, ids, o)
            raise RuntimeError("user code failed")
        # The counters too: a failed batch logged nothing.
        assert (pages_view(s), log_view(s), s.last_lsn, len(s.log.records),
                _counted(s)) == before
        assert mmsb.verify_state_consistency(s)
        s._check()
        # and the state goes on: the same operations, committed this time
        with mmsb.batch(s):
            for o in ops:
                _apply(s, ids, o)
        assert mmsb.verify_state_consistency(s)
        s._check()
    finally:
        mmsb.mmsb_stop(s)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=8))
def test_a_batch_logs_what_the_writes_one_by_one_log(tmp_path_factory: Any,
                                                     ops: list[tuple[Any, ...]]) -> None:
    a, ids = _state("memory", tmp_path_factory.mktemp("a"))
    b, _ = _state("memory", tmp_path_factory.mktemp("b"))
    with mmsb.batch(a):
        for o in ops:
            _apply(a, ids, o)
    for o in ops:
        _apply(b, ids, o)
    assert pages_view(a) == pages_view(b)
    assert [(d.page_id, d.epoch, d.base_epoch, d.indices.tolist(), d.values.tolist())
            for d in a.tlog] == [(d.page_id, d.epoch, d.base_epoch, d.indices.tolist(),
                                  d.values.tolist()) for d in b.tlog]
    assert a.last_lsn == b.last_lsn
    assert _counted(a) == _counted(b)
