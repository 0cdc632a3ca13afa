"""Recompute functions that try to write other pages.

A recompute function returns its page's new bytes; it may read any page but change
none. A write from inside one would reach a page whose dependants the running pass has
already passed by (they would never be recomputed), so it is refused: the function's
page is left as it was, PAGE_INVALIDATED is emitted, and the write that started the
pass raises PropagationError (its cause an InvalidArgumentError). The property: every
page whose recompute function is pure always equals that function of its parents, and
the live state always equals the replay of its log.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb

SIZE = 8


def _xor_of_parents(parents: list[int], writes_to: int | None) -> Any:
    def fn(state: mmsb.MMSBState, page: Any) -> bytes:
        out = np.zeros(SIZE, np.uint8)
        for p in parents:
            out ^= np.frombuffer(mmsb.query_page(state, p), np.uint8)
        if writes_to is not None:
            mmsb.write_page(state, writes_to, 0, bytes(out[:4] + 1))
        return out.tobytes()
    return fn


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(3, 7))
    parents: dict[int, list[int]] = {}
    for child in range(2, n + 1):
        ps = draw(st.lists(st.integers(1, child - 1), max_size=3, unique=True))
        if ps:
            parents[child] = ps
    writers = {c: draw(st.integers(1, n)) for c in parents if draw(st.booleans())}
    roots = [p for p in range(1, n + 1) if p not in parents]
    writes = draw(st.lists(st.tuples(st.sampled_from(roots), st.binary(min_size=1, max_size=SIZE)),
                           min_size=1, max_size=8))
    return {"n": n, "parents": parents, "writers": writers, "writes": writes}


@settings(max_examples=60, deadline=None)
@given(graphs())
def test_recompute_functions_that_write_never_leave_stale_dependants(g: dict[str, Any]) -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    for _ in range(g["n"]):
        mmsb.create_page(s, SIZE)
    for child, ps in g["parents"].items():
        for p in ps:
            mmsb.add_dependency(s, p, child)
        mmsb.register_recompute_fn(s, child, _xor_of_parents(ps, g["writers"].get(child)))
    for pid, data in g["writes"]:
        try:
            mmsb.write_page(s, pid, 0, data)
        except mmsb.PropagationError as exc:
            assert isinstance(exc.__cause__, mmsb.InvalidArgumentError)
            assert exc.page_id in g["writers"]
        for child, ps in g["parents"].items():
            if child in g["writers"]:
                continue
            want = np.zeros(SIZE, np.uint8)
            for p in ps:
                want ^= np.frombuffer(mmsb.query_page(s, p), np.uint8)
            assert mmsb.query_page(s, child) == want.tobytes(), (child, g)
        assert mmsb.verify_state_consistency(s)


def test_a_recompute_write_is_refused_and_reported() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    a, b, x, y = (mmsb.create_page(s, 4) for _ in range(4))
    mmsb.add_dependency(s, a.id, b.id)
    mmsb.add_dependency(s, x.id, y.id)
    mmsb.register_passthrough_recompute(s, y.id, x.id)

    def sneaky(state: mmsb.MMSBState, page: Any) -> bytes:
        mmsb.write_page(state, x.id, 0, b"side")
        return mmsb.query_page(state, a.id)

    mmsb.register_recompute_fn(s, b.id, sneaky)
    invalidated: list[int] = []
    mmsb.subscribe(s, mmsb.EventType.PAGE_INVALIDATED, lambda st_, et, pid, *r: invalidated.append(pid))
    with pytest.raises(mmsb.PropagationError) as exc:
        mmsb.write_page(s, a.id, 0, b"go")
    assert isinstance(exc.value.__cause__, mmsb.InvalidArgumentError)
    assert mmsb.query_page(s, x.id) == bytes(4) and mmsb.query_page(s, y.id) == bytes(4)
    assert mmsb.query_page(s, b.id) == bytes(4) and invalidated == [b.id]
    assert mmsb.verify_state_consistency(s)
    mmsb.write_page(s, x.id, 0, b"ok!!")  # outside a recompute function writes work
    assert mmsb.query_page(s, y.id) == b"ok!!"
