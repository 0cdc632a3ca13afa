"""Batches: apply_batch and ``with batch(state)`` log and replay exactly like the same
writes done one by one, and a bad write refuses the whole batch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from conftest import assert_unchanged, content_view, delta_key, new_state, snapshot

SIZES = (16, 8, 32)


def _twins():
    a, b = new_state(), new_state()
    for s in (a, b):
        for size in SIZES:
            mmsb.create_page(s, size)
    return a, b


def _assert_same(a, b) -> None:
    assert content_view(a) == content_view(b)
    assert [delta_key(d) for d in a.tlog] == [delta_key(d) for d in b.tlog]
    assert mmsb.verify_state_consistency(a)
    ra = mmsb.replay_to_lsn(a, a.last_lsn)
    assert content_view(ra) == content_view(b)


WRITES = [
    (1, 0, b"abc"),
    (2, 5, b"xyz"),
    (1, 1, b"QQ"),
    (3, 31, b"\x09"),
    (1, 0, b"aQQ"),  # changes nothing
    (2, 0, bytes(3)),  # changes nothing
    (3, 0, b"head"),
    (1, 14, b"!!"),
]


def test_apply_batch_equals_one_by_one() -> None:
    a, b = _twins()
    mmsb.apply_batch(a, WRITES)
    for pid, off, data in WRITES:
        mmsb.write_page(b, pid, off, data)
    _assert_same(a, b)


def test_batch_context_equals_one_by_one() -> None:
    a, b = _twins()
    with mmsb.batch(a):
        for pid, off, data in WRITES:
            mmsb.write_page(a, pid, off, data)
    for pid, off, data in WRITES:
        mmsb.write_page(b, pid, off, data)
    _assert_same(a, b)


def test_apply_batch_accepts_generator_and_bytes_like() -> None:
    a, b = _twins()
    mmsb.apply_batch(a, ((pid, off, bytearray(d)) for pid, off, d in WRITES))
    for pid, off, data in WRITES:
        mmsb.write_page(b, pid, off, data)
    _assert_same(a, b)


def test_empty_batch(state) -> None:
    mmsb.create_page(state, 4)
    before = snapshot(state)
    mmsb.apply_batch(state, [])
    with mmsb.batch(state):
        pass
    assert_unchanged(state, before)


@settings(max_examples=40, deadline=None)
@given(st.lists(
    st.integers(0, 2).flatmap(
        lambda i: st.tuples(
            st.just(i + 1),
            st.integers(0, SIZES[i] - 1),
            st.binary(min_size=1, max_size=6),
        )
    ),
    max_size=25,
))
def test_batch_random_equals_one_by_one(raw) -> None:
    writes = [(pid, off, data[: SIZES[pid - 1] - off]) for pid, off, data in raw]
    a, b = _twins()
    mmsb.apply_batch(a, writes)
    for w in writes:
        mmsb.write_page(b, *w)
    _assert_same(a, b)


@pytest.mark.parametrize("bad,error", [
    ((9, 0, b"x"), mmsb.PageNotFoundError),
    ((1, 15, b"xy"), mmsb.InvalidDeltaError),
    ((2, 8, b"x"), mmsb.InvalidDeltaError),
])
def test_bad_write_refuses_whole_apply_batch(bad, error) -> None:
    a, _ = _twins()
    mmsb.write_page(a, 1, 0, b"pre")
    before = snapshot(a)
    with pytest.raises(error):
        mmsb.apply_batch(a, [(1, 0, b"ok!"), (2, 0, b"fine"), bad, (3, 0, b"never")])
    assert_unchanged(a, before)


@pytest.mark.parametrize("bad,error", [
    ((9, 0, b"x"), mmsb.PageNotFoundError),
    ((1, 15, b"xy"), mmsb.InvalidDeltaError),
])
def test_bad_write_refuses_whole_batch_context(bad, error) -> None:
    a, _ = _twins()
    mmsb.write_page(a, 1, 0, b"pre")
    before = snapshot(a)
    with pytest.raises(error):
        with mmsb.batch(a):
            mmsb.write_page(a, 1, 0, b"ok!")
            mmsb.write_page(a, *bad)
            mmsb.write_page(a, 3, 0, b"never")
    assert_unchanged(a, before)


def test_exception_in_batch_block_discards_it() -> None:
    a, _ = _twins()
    before = snapshot(a)
    with pytest.raises(RuntimeError):
        with mmsb.batch(a):
            mmsb.write_page(a, 1, 0, b"ok!")
            raise RuntimeError("user code failed")
    assert_unchanged(a, before)


def test_batch_events_after_the_block() -> None:
    a, _ = _twins()
    got: list[tuple] = []
    mmsb.subscribe(a, mmsb.EventType.PAGE_CHANGED, lambda st, et, *data: got.append(data))
    with mmsb.batch(a):
        mmsb.write_page(a, 1, 0, b"x")
        mmsb.write_page(a, 2, 0, b"y")
        assert got == []
    assert sorted(g[0] for g in got) == [1, 2]


def test_batch_propagates_once() -> None:
    s = new_state()
    p = mmsb.create_page(s, 4)
    c = mmsb.create_page(s, 4)
    count = [0]

    def fn(st, page):
        count[0] += 1
        return mmsb.query_page(st, p.id)

    mmsb.add_dependency(s, p.id, c.id)
    mmsb.register_recompute_fn(s, c.id, fn)
    mmsb.apply_batch(s, [(p.id, 0, b"a"), (p.id, 1, b"b"), (p.id, 2, b"c")])
    assert mmsb.query_page(s, c.id) == b"abc\x00"
    assert count[0] == 1
    assert mmsb.verify_state_consistency(s)
