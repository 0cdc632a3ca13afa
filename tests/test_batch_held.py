"""``write_page`` inside ``with batch(state)`` on an in-memory state holds small writes
(their bytes go into the page at once, their records are logged together later). Held
to the writes done one by one: the same bytes, epochs, log, events and refusals at
every point inside the block, and the same state after it, failed or not."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from conftest import assert_unchanged, snapshot

SIZES = (64, 256, 8, 70_000)

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3), st.integers(-2, 300),
              st.binary(min_size=0, max_size=20)),
    st.tuples(st.just("write_src"), st.integers(0, 2), st.integers(0, 40),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("update"), st.integers(0, 2), st.integers(0, 255)),
    st.tuples(st.just("route"), st.integers(0, 2), st.integers(0, 7)),
    st.tuples(st.just("apply_batch"), st.integers(0, 1), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("missing"), st.integers(0, 3)),
    st.tuples(st.just("read"), st.integers(0, 3)),
)


def _do(s: mmsb.MMSBState, ids: list[int], o: tuple[Any, ...]) -> Any:
    """One operation; returns what it observed (or the error it raised)."""
    kind = o[0]
    try:
        if kind == "write":
            pid = ids[o[1]]
            page = mmsb.write_page(s, pid, o[2], o[3])
            return ("page", page.id, page.epoch)
        if kind == "write_src":
            mmsb.write_page(s, ids[o[1]], o[2], o[3], source="tool")
        elif kind == "update":
            mmsb.update_page(s, ids[o[1]], bytes([o[2]]) * SIZES[o[1]])
        elif kind == "route":
            pid = ids[o[1]]
            mask = np.zeros(SIZES[o[1]], bool)
            mask[o[2]] = True
            data = np.full(SIZES[o[1]], 9, np.uint8)
            mmsb.route_delta(s, mmsb.create_delta(s, pid, mask, data))
        elif kind == "apply_batch":
            pid = ids[o[1]]
            mmsb.apply_batch(s, [(pid, i % 50, o[2][i:i + 1]) for i in range(len(o[2]))])
        elif kind == "missing":
            mmsb.write_page(s, 10_000 + o[1], 0, b"x")
        else:
            pid = ids[o[1]]
            p = s.pages[pid]
            return (mmsb.query_page(s, pid), bytes(p.data), p.epoch, s.last_lsn,
                    len(mmsb.query_log(s, page_id=pid)), mmsb.get_stats(s).total_deltas)
    except mmsb.MMSBError as exc:
        return (type(exc).__name__, str(exc))
    return None


def _state() -> tuple[mmsb.MMSBState, list[int], list[tuple[Any, ...]]]:
    s = mmsb.MMSBState()
    ids = [mmsb.create_page(s, n).id for n in SIZES]
    mmsb.write_page(s, ids[0], 0, b"\x01" * 64)
    got: list[tuple[Any, ...]] = []
    mmsb.subscribe(s, mmsb.EventType.DELTA_APPLIED, lambda _s, _et, *data: got.append(data))
    return s, ids, got


def _deltas(s: mmsb.MMSBState) -> list[tuple[Any, ...]]:
    return [(d.lsn, d.id, d.page_id, d.base_epoch, d.epoch, d.source, d.is_sparse,
             d.mask.tobytes(), bytes(d.data)) for d in s.tlog]


@settings(max_examples=120, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=14), fail=st.booleans())
def test_held_writes_equal_the_writes_one_by_one(ops: list[tuple[Any, ...]], fail: bool) -> None:
    held, ids, held_events = _state()
    plain, pids, plain_events = _state()
    before = snapshot(held)
    seen_held, seen_plain = [], []
    with pytest.raises(RuntimeError) if fail else _nothing():
        with mmsb.batch(held):
            for o in ops:
                seen_held.append(_do(held, ids, o))
            if fail:
                raise RuntimeError("the block fails")
    if fail:
        assert_unchanged(held, before)
        assert held_events == []
        assert mmsb.verify_state_consistency(held)
        return
    for o in ops:
        seen_plain.append(_do(plain, pids, o))
    assert seen_held == seen_plain
    assert snapshot(held) == snapshot(plain)
    assert _deltas(held) == _deltas(plain)
    assert held_events == plain_events
    assert mmsb.get_stats(held).total_deltas == mmsb.get_stats(plain).total_deltas
    assert mmsb.verify_state_consistency(held)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_held_write_is_in_the_page_at_once() -> None:
    s, ids, _ = _state()
    view = s.pages[ids[1]].data
    with mmsb.batch(s):
        page = mmsb.write_page(s, ids[1], 3, b"abc")
        assert s.batch_frame is not None and len(s.batch_frame.writes) == 2  # (slot, offset) and bytes
        assert bytes(view[3:6]) == b"abc"  # a view taken before sees it too
        assert page.epoch == 1  # reading an epoch logs the held writes
        assert s.batch_frame.writes == []
    assert mmsb.query_page(s, ids[1])[3:6] == b"abc"
    assert mmsb.verify_state_consistency(s)


def test_a_refused_write_inside_a_batch_changes_nothing_it_did_not_hold() -> None:
    s, ids, _ = _state()
    with mmsb.batch(s):
        mmsb.write_page(s, ids[1], 0, b"kept")
        inside = snapshot(s)
        for bad, error in (((ids[1], 250, b"too long"), mmsb.InvalidDeltaError),
                           ((ids[1], -1, b"x"), mmsb.InvalidDeltaError),
                           ((999, 0, b"x"), mmsb.PageNotFoundError)):
            with pytest.raises(error):
                mmsb.write_page(s, *bad)
            assert_unchanged(s, inside)
    assert mmsb.query_page(s, ids[1])[:4] == b"kept"
    assert mmsb.verify_state_consistency(s)


def test_another_threads_write_waits_for_the_batch() -> None:
    s, ids, _ = _state()
    done = threading.Event()

    def other() -> None:
        mmsb.write_page(s, ids[1], 0, b"zz")
        done.set()

    with mmsb.batch(s):
        mmsb.write_page(s, ids[1], 0, b"aa")
        t = threading.Thread(target=other)
        t.start()
        assert not done.wait(0.2)
        assert s.batch_frame is not None and len(s.batch_frame.writes) == 2  # (slot, offset) and bytes
    t.join(10)
    assert done.is_set()
    assert mmsb.query_page(s, ids[1])[:2] == b"zz"
    assert [d.epoch for d in mmsb.query_log(s, page_id=ids[1])] == [1, 2]
    assert mmsb.verify_state_consistency(s)


def test_a_recompute_function_cannot_write_inside_a_batch() -> None:
    s, ids, _ = _state()
    mmsb.add_dependency(s, ids[0], ids[1])

    def fn(st: mmsb.MMSBState, page: mmsb.Page) -> bytes:
        mmsb.write_page(st, ids[2], 0, b"no")
        return bytes(SIZES[1])

    mmsb.register_recompute_fn(s, ids[1], fn)
    with mmsb.batch(s):
        mmsb.write_page(s, ids[2], 0, b"ok")
        # A recompute function run inside the batch: its write is refused.
        mmsb.queue_recomputation(s, ids[1])
        with pytest.raises(mmsb.PropagationError):
            mmsb.execute_propagation(s)
        assert mmsb.query_page(s, ids[2])[:2] == b"ok"
    assert mmsb.query_page(s, ids[2])[:2] == b"ok"
    assert mmsb.verify_state_consistency(s)
