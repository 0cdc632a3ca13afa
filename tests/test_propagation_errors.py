"""A recompute function that raises: typed error, the write stands, other branches run."""

import pytest

import mmsb


def test_raising_recompute_fn_is_reported_and_other_branches_still_run():
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    src, bad, good, below_bad = (mmsb.create_page(s, 4).id for _ in range(4))
    mmsb.add_dependency(s, src, bad)
    mmsb.add_dependency(s, src, good)
    mmsb.add_dependency(s, bad, below_bad)
    mmsb.register_recompute_fn(s, bad, lambda st, page: 1 / 0)
    mmsb.register_passthrough_recompute(s, good, src)
    mmsb.register_passthrough_recompute(s, below_bad, bad)
    invalidated = []
    mmsb.subscribe(s, mmsb.EventType.PAGE_INVALIDATED, lambda st, et, pid, parent: invalidated.append(pid))
    with pytest.raises(mmsb.PropagationError) as info:
        mmsb.update_page(s, src, b"abcd")
    assert info.value.page_id == bad
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert mmsb.query_page(s, src) == b"abcd"          # the write stands
    assert mmsb.query_page(s, good) == b"abcd"         # the other branch ran
    assert mmsb.query_page(s, bad) == bytes(4)         # the failed page is left as it was
    assert mmsb.query_page(s, below_bad) == bytes(4)
    assert invalidated == [bad]
    assert mmsb.verify_state_consistency(s)
    # The lock was released: the state takes writes again.
    mmsb.register_passthrough_recompute(s, bad, src)
    mmsb.update_page(s, src, b"wxyz")
    assert mmsb.query_page(s, below_bad) == b"wxyz"


def test_mmsb_start_refuses_a_config_of_the_wrong_type():
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.mmsb_start(config={"enable_gpu": False})
    assert mmsb.active_state() is None
