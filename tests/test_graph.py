"""The dependency graph: typed edges, cycle refusal, queries, and edges following pages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from conftest import assert_unchanged, edges, new_state, snapshot


def _pages(state, n: int) -> list[int]:
    return [mmsb.create_page(state, 4).id for _ in range(n)]


def test_add_dependency_graph_or_state(state) -> None:
    a, b, c = _pages(state, 3)
    mmsb.add_dependency(state.graph, a, b)
    mmsb.add_dependency(state, b, c, mmsb.CONTROL_DEPENDENCY)
    assert isinstance(state.graph, mmsb.ShadowPageGraph)
    assert mmsb.get_children(state.graph, a) == [(b, mmsb.EdgeType.DATA)]
    assert mmsb.get_children(state.graph, b) == [(c, mmsb.EdgeType.CONTROL)]
    assert mmsb.get_parents(state.graph, b) == [(a, mmsb.EdgeType.DATA)]
    assert mmsb.get_parents(state.graph, c) == [(b, mmsb.EdgeType.CONTROL)]
    assert mmsb.get_children(state.graph, c) == []
    assert mmsb.get_parents(state.graph, a) == []


def test_children_are_tuples_of_id_and_edge_type(state) -> None:
    a, b, c, d = _pages(state, 4)
    mmsb.add_dependency(state, a, b, mmsb.DATA_DEPENDENCY)
    mmsb.add_dependency(state, a, c, mmsb.GPU_SYNC_DEPENDENCY)
    mmsb.add_dependency(state, a, d, mmsb.COMPILER_DEPENDENCY)
    kids = mmsb.get_children(state.graph, a)
    assert all(isinstance(k, tuple) and len(k) == 2 for k in kids)
    assert sorted(kids) == [(b, mmsb.EdgeType.DATA), (c, mmsb.EdgeType.GPU_SYNC),
                            (d, mmsb.EdgeType.COMPILER)]
    for _, et in kids:
        assert isinstance(et, mmsb.EdgeType)


def test_cycle_refused_graph_unchanged(state) -> None:
    a, b, c = _pages(state, 3)
    mmsb.add_dependency(state, a, b)
    mmsb.add_dependency(state, b, c)
    before = snapshot(state)
    for parent, child in ((c, a), (b, a), (c, b)):
        with pytest.raises(mmsb.GraphCycleError):
            mmsb.add_dependency(state, parent, child)
        assert_unchanged(state, before)
    assert not mmsb.has_cycle(state.graph)


def test_self_edge_refused(state) -> None:
    (a,) = _pages(state, 1)
    before = snapshot(state)
    for et in mmsb.EdgeType:
        with pytest.raises(mmsb.GraphCycleError):
            mmsb.add_dependency(state, a, a, et)
        assert_unchanged(state, before)


def test_unknown_page_refused(state) -> None:
    (a,) = _pages(state, 1)
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.add_dependency(state, a, 99)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.add_dependency(state, 99, a)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.add_dependency(state.graph, 98, 99)
    assert_unchanged(state, before)


def test_remove_dependency(state) -> None:
    a, b, c = _pages(state, 3)
    mmsb.add_dependency(state, a, b)
    mmsb.add_dependency(state, a, c)
    mmsb.remove_dependency(state.graph, a, b)
    assert mmsb.get_children(state.graph, a) == [(c, mmsb.EdgeType.DATA)]
    assert mmsb.get_parents(state.graph, b) == []
    mmsb.remove_dependency(state, a, c)
    assert mmsb.get_children(state.graph, a) == []
    # the reverse edge is now allowed
    mmsb.add_dependency(state, c, a)
    assert mmsb.get_children(state.graph, c) == [(a, mmsb.EdgeType.DATA)]


def test_topological_sort_descendants_ancestors(state) -> None:
    a, b, c, d, e = _pages(state, 5)
    for p, ch in ((a, b), (a, c), (b, d), (c, d), (d, e)):
        mmsb.add_dependency(state, p, ch)
    order = mmsb.topological_sort(state.graph)
    assert len(order) == len(set(order))
    assert {a, b, c, d, e} <= set(order)
    pos = {x: i for i, x in enumerate(order)}
    for p, ch, _ in edges(state):
        assert pos[p] < pos[ch]
    assert set(mmsb.find_descendants(state.graph, a)) == {b, c, d, e}
    assert set(mmsb.find_descendants(state.graph, d)) == {e}
    assert set(mmsb.find_descendants(state.graph, e)) == set()
    assert set(mmsb.find_ancestors(state.graph, d)) == {a, b, c}
    assert set(mmsb.find_ancestors(state.graph, a)) == set()
    assert not mmsb.has_cycle(state.graph)


def test_delete_page_removes_its_edges(state) -> None:
    a, b, c = _pages(state, 3)
    mmsb.add_dependency(state, a, b)
    mmsb.add_dependency(state, b, c)
    mmsb.delete_page(state, b)
    assert mmsb.get_children(state.graph, a) == []
    assert mmsb.get_parents(state.graph, c) == []
    assert b not in mmsb.topological_sort(state.graph)
    assert set(mmsb.find_descendants(state.graph, a)) == set()
    assert mmsb.verify_state_consistency(state)
    r = mmsb.replay_to_lsn(state, state.last_lsn)
    assert edges(r) == edges(state) == []


def test_edges_replayed(state) -> None:
    a, b, c = _pages(state, 3)
    mmsb.add_dependency(state, a, b, mmsb.CONTROL_DEPENDENCY)
    mid = state.last_lsn
    mmsb.add_dependency(state, b, c)
    mmsb.remove_dependency(state.graph, a, b)
    assert edges(mmsb.replay_to_lsn(state, mid)) == [(a, b, mmsb.EdgeType.CONTROL)]
    assert edges(mmsb.replay_to_lsn(state, state.last_lsn)) == [(b, c, mmsb.EdgeType.DATA)]


def _reachable(adj: dict[int, set[int]], src: int, dst: int) -> bool:
    stack, seen = [src], set()
    while stack:
        x = stack.pop()
        if x == dst:
            return True
        if x in seen:
            continue
        seen.add(x)
        stack.extend(adj.get(x, ()))
    return False


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), max_size=40))
def test_random_edges_against_model(pairs) -> None:
    s = new_state()
    for _ in range(8):
        mmsb.create_page(s, 2)
    adj: dict[int, set[int]] = {}
    for p, c in pairs:
        if c in adj.get(p, set()):
            continue  # duplicate edges are not part of the contract
        if p == c or _reachable(adj, c, p):
            before = snapshot(s)
            with pytest.raises(mmsb.GraphCycleError):
                mmsb.add_dependency(s, p, c)
            assert_unchanged(s, before)
        else:
            mmsb.add_dependency(s, p, c)
            adj.setdefault(p, set()).add(c)
    assert not mmsb.has_cycle(s.graph)
    order = mmsb.topological_sort(s.graph)
    pos = {x: i for i, x in enumerate(order)}
    for p, cs in adj.items():
        for c in cs:
            assert pos[p] < pos[c]
    for n in range(1, 9):
        expect = {m for m in range(1, 9) if m != n and _reachable(adj, n, m)}
        assert set(mmsb.find_descendants(s.graph, n)) == expect
        expect_up = {m for m in range(1, 9) if m != n and _reachable(adj, m, n)}
        assert set(mmsb.find_ancestors(s.graph, n)) == expect_up


def test_graph_queries_take_ids_or_pages_and_refuse_anything_else(state) -> None:
    """The graph queries take an int id or a Page (a Page was looked up as itself and
    found no edges); a list, a dict or a str is InvalidArgumentError (a list was an
    unhashable TypeError, a str found nothing), as are schedule_propagation with one id
    instead of ids, set_metadata with a key that is not a str, and delta_byte_count of a
    non-delta; nothing changes."""
    a, b, c = _pages(state, 3)
    mmsb.add_dependency(state, a, b)
    mmsb.add_dependency(state, b, c)
    page_a, page_c = state.pages[a], state.pages[c]
    assert mmsb.get_children(state, page_a) == mmsb.get_children(state, a) == [
        (b, mmsb.EdgeType.DATA)]
    assert mmsb.get_parents(state.graph, page_c) == [(b, mmsb.EdgeType.DATA)]
    assert mmsb.find_descendants(state, page_a) == {b, c}
    assert mmsb.find_ancestors(state, page_c) == {a, b}
    before = snapshot(state)
    for fn in (mmsb.get_children, mmsb.get_parents, mmsb.find_descendants, mmsb.find_ancestors):
        for bad in ([], {}, "1", 1.0, None, True):
            with pytest.raises(mmsb.InvalidArgumentError, match=f"^{fn.__name__}\\(\\)"):
                fn(state, bad)
    g = state.graph
    for bad in ([], {}, "1", 1.0, None, True):
        for name, call in (("has_edge", lambda x: g.has_edge(x, b)),
                           ("has_edge", lambda x: g.has_edge(a, x)),
                           ("get_children", g.get_children), ("get_parents", g.get_parents),
                           ("path", lambda x: g.path(a, x)),
                           ("find_descendants", g.find_descendants),
                           ("find_ancestors", g.find_ancestors),
                           ("topological_sort", lambda x: g.topological_sort([a, x]))):
            with pytest.raises(mmsb.InvalidArgumentError, match=f"^{name}\\(\\)"):
                call(bad)
    for bad_subset in (1, "12", b"1"):
        with pytest.raises(mmsb.InvalidArgumentError, match="subset must be an iterable"):
            g.topological_sort(bad_subset)  # type: ignore[arg-type]
    assert g.topological_sort([c, a, b]) == [a, b, c] and g.path(a, c) == [a, b, c]
    with pytest.raises(mmsb.InvalidArgumentError, match="iterable of page ids"):
        mmsb.schedule_propagation(state, a)  # type: ignore[arg-type]
    for key in ([], {}, 1, None):
        with pytest.raises(mmsb.MetadataError, match="keys must be str"):
            mmsb.set_metadata(state, a, key, 1)  # type: ignore[arg-type]
    for bad in (None, 1, b"\x01", state):
        with pytest.raises(mmsb.InvalidArgumentError, match="takes a Delta"):
            mmsb.delta_byte_count(bad)  # type: ignore[arg-type]
    assert_unchanged(state, before)
    assert not state.pending
