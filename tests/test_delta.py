"""Deltas: creation, routing and the epoch conflict check, sparse/dense encoding,
merging, and the binary form (round trip and fuzzing)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmsb
from conftest import as_bool, as_u8, assert_unchanged, new_state, snapshot


def _mask(n: int, positions) -> list[bool]:
    m = [False] * n
    for i in positions:
        m[i] = True
    return m


# --------------------------------------------------------------------------- create / route


def test_create_delta_does_not_change_state(state) -> None:
    p = mmsb.create_page(state, 8)
    before = snapshot(state)
    d = mmsb.create_delta(state, p.id, _mask(8, [0, 7]), b"A" + bytes(6) + b"Z")
    assert isinstance(d, mmsb.Delta)
    assert d.page_id == p.id
    assert d.base_epoch == 0 and d.epoch == 1
    assert_unchanged(state, before)


def test_route_delta_applies_masked_bytes(state) -> None:
    p = mmsb.create_page(state, 8)
    mmsb.update_page(state, p.id, b"abcdefgh")
    d = mmsb.create_delta(state, p.id, _mask(8, [1, 6]), b"XXXXXXXX", source="unit")
    assert d.base_epoch == 1 and d.epoch == 2
    r = mmsb.route_delta(state, d)
    assert r.id == p.id
    assert mmsb.query_page(state, p.id) == b"aXcdefXh"
    assert p.epoch == 2
    last = state.tlog[-1]
    assert last.page_id == p.id and last.epoch == 2 and last.base_epoch == 1
    assert last.source == "unit"
    assert last.lsn == state.last_lsn
    assert last.timestamp > 0
    assert mmsb.verify_state_consistency(state)


def test_create_delta_accepts_numpy_mask(state) -> None:
    p = mmsb.create_page(state, 5)
    m = np.array([True, False, True, False, False])
    d = mmsb.create_delta(state, p.id, m, np.frombuffer(b"a?c??", dtype=np.uint8))
    mmsb.route_delta(state, d)
    assert mmsb.query_page(state, p.id) == b"a\x00c\x00\x00"


def test_stale_delta_refused(state) -> None:
    p = mmsb.create_page(state, 4)
    d1 = mmsb.create_delta(state, p.id, _mask(4, [0]), b"1\x00\x00\x00")
    d2 = mmsb.create_delta(state, p.id, _mask(4, [1]), b"\x002\x00\x00")
    assert d1.base_epoch == d2.base_epoch == 0
    mmsb.route_delta(state, d1)
    before = snapshot(state)
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.route_delta(state, d2)  # built on epoch 0, page is at epoch 1: lost update
    assert_unchanged(state, before)
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.route_delta(state, d1)  # applying the same delta twice
    assert_unchanged(state, before)
    assert mmsb.query_page(state, p.id) == b"1\x00\x00\x00"


def test_route_delta_to_deleted_page_refused(state) -> None:
    p = mmsb.create_page(state, 4)
    q = mmsb.create_page(state, 4)
    d = mmsb.create_delta(state, p.id, _mask(4, [0]), b"abcd")
    mmsb.delete_page(state, p.id)
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.route_delta(state, d)
    assert_unchanged(state, before)
    assert q.id in state.pages


def test_route_delta_after_resize_refused(state) -> None:
    p = mmsb.create_page(state, 4)
    d = mmsb.create_delta(state, p.id, _mask(4, [0]), b"abcd")
    mmsb.resize_page(state, p.id, 8)
    before = snapshot(state)
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.route_delta(state, d)
    assert_unchanged(state, before)


@pytest.mark.parametrize("mask_len,data_len", [(3, 4), (4, 3), (5, 5), (3, 3), (0, 0), (4, 8)])
def test_create_delta_length_mismatch(state, mask_len, data_len) -> None:
    p = mmsb.create_page(state, 4)
    before = snapshot(state)
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.create_delta(state, p.id, [True] * mask_len, b"x" * data_len)
    assert_unchanged(state, before)


def test_create_delta_unknown_page(state) -> None:
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.create_delta(state, 3, [True], b"x")
    assert_unchanged(state, before)


# --------------------------------------------------------------------------- sparse / dense


def test_sparse_chosen_for_few_changes(state) -> None:
    p = mmsb.create_page(state, 1024)
    data = bytearray(1024)
    for i in range(0, 1024, 100):  # 11 bytes ≈ 1 %
        data[i] = 0xAB
    mmsb.update_page(state, p.id, bytes(data))
    d = state.tlog[-1]
    assert d.is_sparse
    dense = as_u8(d.dense_data())
    assert len(dense) == 1024
    assert bytes(dense) == bytes(data)
    m = as_bool(d.mask)
    assert m.shape == (1024,)
    assert np.flatnonzero(m).tolist() == list(range(0, 1024, 100))


def test_dense_chosen_for_many_changes(state) -> None:
    p = mmsb.create_page(state, 64)
    mmsb.update_page(state, p.id, bytes(range(1, 65)))
    d = state.tlog[-1]
    assert not d.is_sparse
    assert bytes(as_u8(d.dense_data())) == bytes(range(1, 65))
    # half the bytes: still dense
    mmsb.update_page(state, p.id, bytes(range(101, 133)) + bytes(range(33, 65)))
    d = state.tlog[-1]
    assert mmsb.delta_byte_count(d) == 32
    assert not d.is_sparse


def test_exactly_quarter_is_sparse(state) -> None:
    p = mmsb.create_page(state, 100)
    d = mmsb.create_delta(state, p.id, _mask(100, range(25)), b"\x07" * 100)
    assert d.is_sparse
    d = mmsb.create_delta(state, p.id, _mask(100, range(60)), b"\x07" * 100)
    assert not d.is_sparse


def test_dense_data_zero_outside_mask(state) -> None:
    p = mmsb.create_page(state, 10)
    d = mmsb.create_delta(state, p.id, _mask(10, [2, 5]), b"abcdefghij")
    dense = bytes(as_u8(d.dense_data()))
    assert dense == b"\x00\x00c\x00\x00f\x00\x00\x00\x00"
    d2 = mmsb.create_delta(state, p.id, [True] * 7 + [False] * 3, b"abcdefghij")
    assert not d2.is_sparse
    assert bytes(as_u8(d2.dense_data())) == b"abcdefg\x00\x00\x00"


def test_one_byte_write_on_big_page_is_small(state) -> None:
    p = mmsb.create_page(state, 1 << 20)
    mmsb.write_page(state, p.id, 777_777, b"\x01")
    d = state.tlog[-1]
    assert d.is_sparse
    assert mmsb.delta_byte_count(d) == 1
    blob = mmsb.serialize_delta(d)
    assert len(blob) < 200, f"1-byte delta serialized to {len(blob)} bytes"
    back = mmsb.deserialize_delta(blob)
    m = as_bool(back.mask)
    assert m.shape == (1 << 20,)
    assert np.flatnonzero(m).tolist() == [777_777]
    assert as_u8(back.dense_data())[777_777] == 1


def test_delta_byte_count(state) -> None:
    p = mmsb.create_page(state, 16)
    assert mmsb.delta_byte_count(mmsb.create_delta(state, p.id, _mask(16, [1, 2, 3]), bytes(16))) == 3
    assert mmsb.delta_byte_count(mmsb.create_delta(state, p.id, [True] * 16, bytes(16))) == 16


# --------------------------------------------------------------------------- merge


def test_merge_deltas_later_wins_and_spans_epochs() -> None:
    s = new_state()
    p = mmsb.create_page(s, 6)
    mmsb.update_page(s, p.id, b"aaaa\x00\x00")
    mmsb.update_page(s, p.id, b"abbb\x00c")
    d1, d2 = s.tlog[0], s.tlog[1]
    m = mmsb.merge_deltas(d1, d2)
    assert m.page_id == p.id
    assert m.base_epoch == 0 and m.epoch == 2
    mask = as_bool(m.mask)
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 3, 5]
    dense = as_u8(m.dense_data())
    assert bytes(dense[mask]) == b"abbbc"
    # the merged delta applies onto the epoch-0 page in one step
    t = new_state()
    q = mmsb.create_page(t, 6)
    assert q.id == p.id
    mmsb.route_delta(t, m)
    assert mmsb.query_page(t, q.id) == mmsb.query_page(s, p.id)
    assert q.epoch == 2
    # ... and is refused where the page is not at its base epoch
    before = snapshot(t)
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.route_delta(t, m)
    assert_unchanged(t, before)


# --------------------------------------------------------------------------- binary form


def _fields(d) -> tuple:
    return (
        int(d.id), int(d.page_id), int(d.epoch), int(d.base_epoch), str(d.source),
        tuple(as_bool(d.mask).tolist()), bytes(as_u8(d.dense_data())), bool(d.is_sparse),
    )


@st.composite
def deltas(draw):
    size = draw(st.integers(1, 300))
    positions = draw(st.sets(st.integers(0, size - 1), max_size=size))
    data = draw(st.binary(min_size=size, max_size=size))
    source = draw(st.sampled_from(["api", "propagation", "tool", "ünïcode"]))
    prewrites = draw(st.integers(0, 3))
    s = new_state()
    p = mmsb.create_page(s, size)
    for k in range(prewrites):
        mmsb.write_page(s, p.id, 0, bytes([k + 1]))
    return mmsb.create_delta(s, p.id, _mask(size, positions), data, source=source)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deltas())
def test_serialize_round_trip(d) -> None:
    blob = mmsb.serialize_delta(d)
    assert isinstance(blob, bytes)
    back = mmsb.deserialize_delta(blob)
    assert isinstance(back, mmsb.Delta)
    assert _fields(back) == _fields(d)
    assert mmsb.serialize_delta(back) == blob


def test_serialize_round_trip_keeps_lsn_and_timestamp(state) -> None:
    p = mmsb.create_page(state, 32)
    mmsb.update_page(state, p.id, bytes(range(32)))
    mmsb.write_page(state, p.id, 4, b"zz")
    for d in state.tlog:
        back = mmsb.deserialize_delta(mmsb.serialize_delta(d))
        assert _fields(back) == _fields(d)
        assert back.lsn == d.lsn
        assert back.timestamp == d.timestamp


def _sample_blob() -> bytes:
    s = new_state()
    p = mmsb.create_page(s, 64)
    mmsb.update_page(s, p.id, bytes(range(64)))
    mmsb.write_page(s, p.id, 10, b"hello")
    return mmsb.serialize_delta(s.tlog[-1])


def test_deserialize_truncated_always_refused() -> None:
    blob = _sample_blob()
    for cut in range(len(blob)):
        with pytest.raises(mmsb.SerializationError):
            mmsb.deserialize_delta(blob[:cut])


def test_deserialize_empty_and_junk() -> None:
    for junk in (b"", b"\x00", b"\xff" * 50, b"MMSB", b"\x93\x01\x02\x03", b"{}"):
        with pytest.raises(mmsb.SerializationError):
            mmsb.deserialize_delta(junk)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_deserialize_random_bytes_only_serialization_error(blob) -> None:
    try:
        d = mmsb.deserialize_delta(blob)
    except mmsb.SerializationError:
        return
    # if random bytes do decode, they must make a coherent delta
    m = as_bool(d.mask)
    assert len(as_u8(d.dense_data())) == len(m)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_deserialize_mutated_only_serialization_error(data) -> None:
    blob = bytearray(_SAMPLE)
    n_flips = data.draw(st.integers(1, 4))
    for _ in range(n_flips):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        d = mmsb.deserialize_delta(bytes(blob))
    except mmsb.SerializationError:
        return
    m = as_bool(d.mask)
    assert len(as_u8(d.dense_data())) == len(m)


_SAMPLE = b""


def setup_module(module) -> None:
    module._SAMPLE = _sample_blob()


def test_merge_deltas_of_different_pages_refused(state) -> None:
    p = mmsb.create_page(state, 4)
    q = mmsb.create_page(state, 4)
    mmsb.update_page(state, p.id, b"pppp")
    mmsb.update_page(state, q.id, b"qqqq")
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.merge_deltas(state.tlog[0], state.tlog[1])


def test_sparse_delta_memory_proportional_to_change() -> None:
    import gc
    import tracemalloc

    s = new_state()
    p = mmsb.create_page(s, 1 << 20)
    mmsb.write_page(s, p.id, 0, b"\x01")  # warm up lazily built structures
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(1, 101):
            mmsb.write_page(s, p.id, i * 9973, bytes([i]))
        gc.collect()
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(s.tlog) == 101
    per_delta = (now - base) / 100
    assert per_delta < 4096, f"a retained 1-byte delta costs {per_delta:.0f} bytes on a 1 MiB page"
    d = s.tlog[-1]
    assert d.is_sparse
    assert as_u8(d.data).nbytes <= 64


@pytest.mark.parametrize("shift", [-1, 1, 0xFFFE])
def test_deserialize_other_version_names_both(state, shift: int) -> None:
    # "MMSD" | version u16 | crc32c(body) u32 | body: the checksum does not cover the
    # version, so only the version check can refuse this blob
    p = mmsb.create_page(state, 8)
    mmsb.write_page(state, p.id, 2, b"ab")
    blob = bytearray(mmsb.serialize_delta(state.tlog[-1]))
    ours = int.from_bytes(blob[4:6], "little")
    theirs = (ours + shift) % 0x10000
    blob[4:6] = theirs.to_bytes(2, "little")
    with pytest.raises(mmsb.SerializationError, match="version") as info:
        mmsb.deserialize_delta(bytes(blob))
    assert f"version {theirs}" in str(info.value) and f"reads {ours}" in str(info.value)


def _skewed_pair(data: bytes, flips: list[int], skew: int) -> tuple[np.ndarray, np.ndarray]:
    """``data`` at an address ``skew`` bytes off alignment, and a copy with the bytes at
    ``flips`` (those inside it) changed."""
    raw = np.frombuffer(bytes(skew) + data, np.uint8)
    a = raw[skew:]
    b = a.copy()
    for i in flips:
        if i < len(b):
            b[i] ^= (i % 255) + 1
    return a, b


@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), flips=st.lists(st.integers(0, 299)),
       skew=st.integers(0, 9))
def test_count_diff_counts_differing_bytes_at_any_alignment(data: bytes, flips: list[int],
                                                              skew: int) -> None:
    from mmsb._core.kernels import count_diff

    a, b = _skewed_pair(data, flips, skew)
    assert count_diff(a, b) == int(np.count_nonzero(a != b))
    assert count_diff(b, b) == 0 and count_diff(a, a ^ 0xFF) == len(a)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), flips=st.lists(st.integers(0, 299)),
       skew=st.integers(0, 9))
def test_diff_scan_and_runs_match_numpy(data: bytes, flips: list[int], skew: int) -> None:
    from mmsb._core.kernels import diff_scan, runs_of

    a, b = _skewed_pair(data, flips, skew)
    want = np.flatnonzero(a != b)
    n, got = diff_scan(a, b, len(a))
    assert n == want.size and got.dtype == np.intp and np.array_equal(got, want)
    if want.size:
        n, none = diff_scan(a, b, want.size - 1)
        assert n == want.size and none.size == 0
    starts, lengths = runs_of(want)
    brk = np.flatnonzero(np.diff(want) != 1) + 1
    ref_starts = want[np.concatenate(([0], brk))] if want.size else want
    ref_ends = want[np.concatenate((brk - 1, [want.size - 1]))] + 1 if want.size else want
    assert starts.dtype == np.dtype("<u4") and lengths.dtype == np.dtype("<u4")
    assert np.array_equal(starts, ref_starts) and np.array_equal(lengths, ref_ends - ref_starts)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("offset", [0, 3, 1000])
def test_write_of_a_large_value_logs_exactly_the_changed_bytes(state, strided: bool,
                                                              offset: int) -> None:
    rng = np.random.default_rng(5)
    n = 90_000
    p = mmsb.create_page(state, n + 2000)
    old = rng.integers(0, 256, n, dtype=np.uint8)
    mmsb.write_page(state, p.id, offset, old.tobytes())
    new = old.copy()
    new[[1, 2, 500, 40_000, n - 1]] ^= 0x5A
    new[n - 300:] = rng.integers(0, 256, 300, dtype=np.uint8)
    src = np.repeat(new, 2)[::2] if strided else new
    before = state.pages[p.id].data.copy()
    mmsb.write_page(state, p.id, offset, src)
    d = state.log.deltas[-1]
    after = state.pages[p.id].data
    want = np.flatnonzero(before != after)
    assert np.array_equal(after[offset:offset + n], new)
    assert d.page_id == p.id and d.is_sparse and np.array_equal(d.indices, want)
