"""The vectorised batch path must log and apply exactly what one-by-one writes do."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb


def _twin(sizes):
    out = []
    for _ in range(2):
        s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 30))
        for size in sizes:
            mmsb.create_page(s, size)
        out.append(s)
    return out


def _log_view(state):
    return [(d.page_id, d.base_epoch, d.epoch, d.indices.tolist(), d.values.tolist(), d.source)
            for d in state.tlog]


writes_strategy = st.lists(
    st.tuples(st.integers(1, 3), st.integers(0, 60), st.binary(min_size=0, max_size=4)),
    min_size=16, max_size=80)


@settings(max_examples=150, deadline=None)
@given(writes_strategy)
def test_vector_batch_equals_one_by_one(writes):
    a, b = _twin([64, 64, 64])
    writes = [(p, min(off, 64 - len(data)), data) for p, off, data in writes]
    mmsb.apply_batch(a, writes)
    for p, off, data in writes:
        mmsb.write_page(b, p, off, data)
    assert _log_view(a) == _log_view(b)
    for pid in (1, 2, 3):
        assert mmsb.query_page(a, pid) == mmsb.query_page(b, pid)
        assert a.pages[pid].epoch == b.pages[pid].epoch
    assert [d.lsn for d in a.tlog] == sorted({d.lsn for d in a.tlog})
    assert mmsb.verify_state_consistency(a)


def test_vector_batch_many_overlapping_small_writes():
    a, b = _twin([1024] * 10)
    rng = np.random.default_rng(7)
    writes = [(int(rng.integers(1, 11)), int(rng.integers(0, 1016)), bytes(rng.integers(0, 4, 8, dtype=np.uint8)))
              for _ in range(3000)]
    logged = mmsb.apply_batch(a, writes)
    for p, o, d in writes:
        mmsb.write_page(b, p, o, d)
    assert logged == len(b.tlog)
    assert _log_view(a) == _log_view(b)
    a._check()


def test_vector_batch_refusal_changes_nothing():
    a, _ = _twin([64, 64])
    mmsb.write_page(a, 1, 0, b"keep")
    before = (mmsb.query_page(a, 1), mmsb.query_page(a, 2), len(a.tlog), a.last_lsn)
    writes = [(1, i, b"x") for i in range(20)] + [(2, 63, b"too long")]
    with pytest.raises(mmsb.InvalidDeltaError):  # an out-of-range write is refused
        mmsb.apply_batch(a, writes)
    assert (mmsb.query_page(a, 1), mmsb.query_page(a, 2), len(a.tlog), a.last_lsn) == before


def test_vector_batch_rolls_back_inside_a_failed_block():
    a, _ = _twin([64, 64])
    before = (mmsb.query_page(a, 1), a.pages[1].epoch, a.last_lsn)
    # the block's exception leaves the batch (it is not swallowed) and nothing stays
    with pytest.raises(RuntimeError, match="user code failed"):
        with mmsb.batch(a):
            mmsb.apply_batch(a, [(1, i, bytes([i + 1])) for i in range(32)])
            raise RuntimeError("user code failed")
    assert (mmsb.query_page(a, 1), a.pages[1].epoch, a.last_lsn) == before
