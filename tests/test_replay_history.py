"""replay_page_history's own-records fast path must agree with a full replay."""

from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb

ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3), st.integers(0, 40), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("resize"), st.integers(0, 3), st.integers(8, 64)),
    st.tuples(st.just("clone"), st.integers(0, 3)),
    st.tuples(st.just("compress"),),
), min_size=1, max_size=40)


def _run(steps):
    """A state after ``steps``, and the ids of its pages."""
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 30))
    ids = [p.id for p in mmsb.create_pages(s, 2, 48)]
    for step in steps:
        kind = step[0]
        if kind == "write":
            pid = ids[step[1] % len(ids)]
            size = s.pages[pid].size
            data = step[3][:size]
            mmsb.write_page(s, pid, min(step[2], size - len(data)), data)
        elif kind == "resize":
            mmsb.resize_page(s, ids[step[1] % len(ids)], step[2])
        elif kind == "clone":
            ids.append(mmsb.clone_page(s, ids[step[1] % len(ids)]).id)
        else:
            mmsb.compress_log(s)
    return s, ids


@settings(max_examples=60, deadline=None)
@given(ops)
def test_history_matches_replay_to_lsn(steps):
    s, ids = _run(steps)
    for pid in ids:
        for snap in mmsb.replay_page_history(s, pid):
            # A compressed prefix ends at its Compacted marker: replay starts there.
            past = mmsb.replay_to_lsn(s, max(snap.lsn, s.log.horizon_lsn))
            if snap.lsn < s.log.horizon_lsn:
                assert snap.source == "compressed"
            assert mmsb.query_page(past, pid) == snap.data
            assert past.pages[pid].epoch == snap.epoch


@settings(max_examples=60, deadline=None)
@given(ops)
def test_epoch_cut_above_every_epoch_is_the_live_state(steps):
    s, ids = _run(steps)
    cut = mmsb.replay_to_epoch(s, 10**9)
    for pid in ids:
        assert mmsb.query_page(cut, pid) == mmsb.query_page(s, pid)
        assert cut.pages[pid].epoch == s.pages[pid].epoch
    assert mmsb.verify_state_consistency(cut)
