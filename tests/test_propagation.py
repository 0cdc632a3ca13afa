"""Propagation: recompute functions, topological glitch-free order, cutoff, edge kinds,
modes, and replay that never needs user code."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import mmsb
from conftest import content_view, new_state, run_workers


def _chain(state, n: int, size: int = 8) -> list[int]:
    ids = [p.id for p in mmsb.create_pages(state, n, size)]
    for parent, child in zip(ids, ids[1:], strict=False):
        mmsb.add_dependency(state, parent, child, mmsb.DATA_DEPENDENCY)
        mmsb.register_passthrough_recompute(state, child, parent)
    return ids


def test_single_hop_passthrough(state) -> None:
    a = mmsb.create_page(state, 8)
    b = mmsb.create_page(state, 8)
    mmsb.add_dependency(state.graph, a.id, b.id, mmsb.DATA_DEPENDENCY)
    mmsb.register_passthrough_recompute(state, b.id, a.id)
    mmsb.update_page(state, a.id, b"abcdefgh")
    assert mmsb.query_page(state, b.id) == b"abcdefgh"
    assert b.epoch == 1
    last_b = mmsb.get_deltas_for_page(state, b.id)[-1]
    assert last_b.source == "propagation"
    assert last_b.lsn > mmsb.get_deltas_for_page(state, a.id)[-1].lsn
    mmsb.write_page(state, a.id, 2, b"ZZ")
    assert mmsb.query_page(state, b.id) == b"abZZefgh"
    assert mmsb.verify_state_consistency(state)


def test_passthrough_with_transform(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id)
    mmsb.register_passthrough_recompute(state, b.id, a.id, transform=lambda x: bytes(x)[::-1])
    mmsb.update_page(state, a.id, b"abcd")
    assert mmsb.query_page(state, b.id) == b"dcba"


def test_chain_of_ten(state) -> None:
    ids = _chain(state, 10)
    mmsb.update_page(state, ids[0], b"chain-10")
    for pid in ids:
        assert mmsb.query_page(state, pid) == b"chain-10"
        assert state.pages[pid].epoch == 1
    prop = mmsb.query_log(state, source="propagation")
    assert [d.page_id for d in prop] == ids[1:]
    assert mmsb.verify_state_consistency(state)


def test_long_chain_no_recursion_limit(state) -> None:
    limit = sys.getrecursionlimit()
    n = 3000
    assert n > limit
    ids = _chain(state, n, size=4)
    mmsb.update_page(state, ids[0], b"long")
    assert mmsb.query_page(state, ids[-1]) == b"long"
    assert state.pages[ids[-1]].epoch == 1
    assert len(mmsb.query_log(state, source="propagation")) == n - 1
    assert sys.getrecursionlimit() == limit


def test_diamond_glitch_free(state) -> None:
    a, b, c, d = (mmsb.create_page(state, 4).id for _ in range(4))
    calls: list[tuple[str, bytes, bytes]] = []

    def f_b(st, page):
        calls.append(("B", b"", b""))
        return bytes((x + 1) % 256 for x in mmsb.query_page(st, a))

    def f_c(st, page):
        calls.append(("C", b"", b""))
        return bytes((x * 2) % 256 for x in mmsb.query_page(st, a))

    def f_d(st, page):
        pb, pc = mmsb.query_page(st, b), mmsb.query_page(st, c)
        calls.append(("D", pb, pc))
        return bytes(x ^ y for x, y in zip(pb, pc, strict=True))

    for parent, child in ((a, b), (a, c), (b, d), (c, d)):
        mmsb.add_dependency(state, parent, child)
    mmsb.register_recompute_fn(state, b, f_b)
    mmsb.register_recompute_fn(state, c, f_c)
    mmsb.register_recompute_fn(state, d, f_d)

    for rnd, data in enumerate((b"\x01\x02\x03\x04", b"\x10\x20\x30\x40"), start=1):
        calls.clear()
        mmsb.update_page(state, a, data)
        names = [n for n, _, _ in calls]
        assert names.count("D") == 1, f"D recomputed {names.count('D')} times: {names}"
        assert names.count("B") == 1 and names.count("C") == 1
        assert names.index("D") > names.index("B") and names.index("D") > names.index("C")
        exp_b = bytes((x + 1) % 256 for x in data)
        exp_c = bytes((x * 2) % 256 for x in data)
        # D saw the new B and C, never a mix of old and new
        assert calls[names.index("D")][1:] == (exp_b, exp_c)
        assert mmsb.query_page(state, d) == bytes(x ^ y for x, y in zip(exp_b, exp_c, strict=True))
        assert state.pages[d].epoch == rnd
    assert mmsb.verify_state_consistency(state)


def test_cutoff_stops_propagation(state) -> None:
    a, b, c = (mmsb.create_page(state, 4).id for _ in range(3))
    counts = {"B": 0, "C": 0}

    def parity(st, page):
        counts["B"] += 1
        return bytes([mmsb.query_page(st, a)[0] % 2]) * 4

    def copy_b(st, page):
        counts["C"] += 1
        return mmsb.query_page(st, b)

    mmsb.add_dependency(state, a, b)
    mmsb.add_dependency(state, b, c)
    mmsb.register_recompute_fn(state, b, parity)
    mmsb.register_recompute_fn(state, c, copy_b)
    mmsb.update_page(state, a, b"\x02\x00\x00\x00")  # parity 0: B unchanged
    assert counts == {"B": 1, "C": 0}
    assert state.pages[b].epoch == 0
    assert mmsb.get_deltas_for_page(state, b) == []
    mmsb.update_page(state, a, b"\x03\x00\x00\x00")  # parity 1: B changes, C follows
    assert counts == {"B": 2, "C": 1}
    assert mmsb.query_page(state, c) == b"\x01" * 4
    mmsb.update_page(state, a, b"\x05\x00\x00\x00")  # parity 1 again: cut at B
    assert counts == {"B": 3, "C": 1}


def test_recompute_wrong_length_refused(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id)
    mmsb.register_recompute_fn(state, b.id, lambda st, page: b"too long!")
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.update_page(state, a.id, b"abcd")
    assert mmsb.query_page(state, b.id) == bytes(4)
    assert b.epoch == 0
    assert mmsb.verify_state_consistency(state)


def test_register_on_unknown_page(state) -> None:
    a = mmsb.create_page(state, 4)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.register_recompute_fn(state, 99, lambda st, p: b"")
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.register_passthrough_recompute(state, 99, a.id)


def _events(state, etype) -> list[tuple]:
    got: list[tuple] = []
    mmsb.subscribe(state, etype, lambda st, et, *data: got.append(data))
    return got


def test_control_edge_marks_stale(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id, mmsb.CONTROL_DEPENDENCY)
    got = _events(state, mmsb.EventType.PAGE_STALE)
    mmsb.update_page(state, a.id, b"abcd")
    assert b.metadata.get("stale") is True
    assert mmsb.query_page(state, b.id) == bytes(4) and b.epoch == 0
    assert got and got[0][0] == b.id
    assert got[0][1] == a.id
    assert mmsb.verify_state_consistency(state)
    r = mmsb.replay_to_lsn(state, state.last_lsn)
    assert r.pages[b.id].metadata.get("stale") is True


def test_gpu_sync_edge_emits_event(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id, mmsb.GPU_SYNC_DEPENDENCY)
    got = _events(state, mmsb.EventType.GPU_SYNC_NEEDED)
    mmsb.update_page(state, a.id, b"abcd")
    assert [g[0] for g in got] == [b.id]
    assert mmsb.query_page(state, b.id) == bytes(4)


def test_compiler_edge_invalidates_ir(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4, metadata={"ir_valid": True})
    mmsb.add_dependency(state, a.id, b.id, mmsb.COMPILER_DEPENDENCY)
    got = _events(state, mmsb.EventType.IR_INVALIDATED)
    mmsb.update_page(state, a.id, b"abcd")
    assert b.metadata["ir_valid"] is False
    assert [g[0] for g in got] == [b.id]
    assert mmsb.verify_state_consistency(state)


def test_no_event_when_parent_unchanged(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id, mmsb.CONTROL_DEPENDENCY)
    got = _events(state, mmsb.EventType.PAGE_STALE)
    mmsb.update_page(state, a.id, bytes(4))  # no byte changes
    assert got == []
    assert "stale" not in b.metadata
    mmsb.update_page(state, a.id, b"abcd")  # a real change is told, once
    assert got == [(b.id, a.id)]


def _counted_pair(state):
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    count = [0]

    def fn(st, page):
        count[0] += 1
        return mmsb.query_page(st, a.id)

    mmsb.add_dependency(state, a.id, b.id)
    mmsb.register_recompute_fn(state, b.id, fn)
    return a, b, count


def test_default_mode_is_immediate(state) -> None:
    assert state.propagation_mode == mmsb.PropagationMode.IMMEDIATE


def test_deferred_mode(state) -> None:
    a, b, count = _counted_pair(state)
    state.propagation_mode = mmsb.PropagationMode.DEFERRED
    mmsb.update_page(state, a.id, b"one!")
    mmsb.update_page(state, a.id, b"two!")
    assert count[0] == 0
    assert mmsb.query_page(state, b.id) == bytes(4)
    mmsb.execute_propagation(state)
    assert 1 <= count[0] <= 2
    assert mmsb.query_page(state, b.id) == b"two!"
    n = count[0]
    mmsb.execute_propagation(state)  # queue drained: nothing more to do
    assert count[0] == n
    assert mmsb.verify_state_consistency(state)


def test_batch_mode_ends_like_immediate(state) -> None:
    a, b, count = _counted_pair(state)
    state.propagation_mode = mmsb.PropagationMode.BATCH
    for word in (b"aaaa", b"bbbb", b"cccc"):
        mmsb.update_page(state, a.id, word)
    mmsb.execute_propagation(state)
    assert mmsb.query_page(state, b.id) == b"cccc"
    assert 1 <= count[0] <= 3
    assert mmsb.verify_state_consistency(state)


def test_propagate_change_explicit(state) -> None:
    a, b, count = _counted_pair(state)
    state.propagation_mode = mmsb.PropagationMode.DEFERRED
    mmsb.update_page(state, a.id, b"abcd")
    assert count[0] == 0
    mmsb.propagate_change(state, a.id, mode=mmsb.PropagationMode.IMMEDIATE)
    assert count[0] == 1
    assert mmsb.query_page(state, b.id) == b"abcd"


def test_queue_recomputation_and_execute(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.register_recompute_fn(state, b.id, lambda st, page: b"\x07" * 4)
    mmsb.queue_recomputation(state, b.id)
    mmsb.queue_recomputation(state, b.id)  # queued once
    assert mmsb.query_page(state, b.id) == bytes(4)
    mmsb.execute_propagation(state)
    assert mmsb.query_page(state, b.id) == b"\x07" * 4
    assert b.epoch == 1
    assert a.epoch == 0


def test_schedule_propagation(state) -> None:
    root, x, y = (mmsb.create_page(state, 4).id for _ in range(3))
    external = [b"ext1"]
    calls: list[str] = []

    def f_x(st, page):
        calls.append("x")
        return external[0]

    def f_y(st, page):
        calls.append("y")
        return mmsb.query_page(st, x)

    mmsb.add_dependency(state, root, x)
    mmsb.add_dependency(state, x, y)
    mmsb.register_recompute_fn(state, x, f_x)
    mmsb.register_recompute_fn(state, y, f_y)
    mmsb.schedule_propagation(state, [root])
    assert calls == []  # scheduled, not yet run
    mmsb.execute_propagation(state)
    assert calls == ["x", "y"]
    assert mmsb.query_page(state, x) == b"ext1"
    assert mmsb.query_page(state, y) == b"ext1"
    assert all(d.source == "propagation" for d in mmsb.get_deltas_for_page(state, y))
    assert mmsb.verify_state_consistency(state)


def test_deferred_chain(state) -> None:
    state.propagation_mode = mmsb.PropagationMode.DEFERRED
    ids = _chain(state, 4, size=4)
    mmsb.update_page(state, ids[0], b"wxyz")
    assert mmsb.query_page(state, ids[-1]) == bytes(4)
    mmsb.execute_propagation(state)
    for pid in ids:
        assert mmsb.query_page(state, pid) == b"wxyz"
    assert mmsb.verify_state_consistency(state)


def test_replay_needs_no_user_code(state, tmp_path) -> None:
    ids = _chain(state, 5, size=6)
    c = mmsb.create_page(state, 6)
    mmsb.add_dependency(state, ids[2], c.id)
    mmsb.register_recompute_fn(
        state, c.id, lambda st, page: bytes(x ^ 0x5A for x in mmsb.query_page(st, ids[2]))
    )
    rng = np.random.default_rng(3)
    for _ in range(4):
        mmsb.update_page(state, ids[0], rng.integers(0, 256, 6, dtype=np.uint8).tobytes())
    assert mmsb.verify_state_consistency(state)
    # a replayed state knows none of the recompute functions, yet has the same bytes
    r = mmsb.replay_to_lsn(state, state.last_lsn)
    assert content_view(r) == content_view(state)
    path = tmp_path / "p.ckpt"
    mmsb.checkpoint_log(state, str(path))
    t = new_state()
    mmsb.load_checkpoint(t, str(path))
    assert content_view(t) == content_view(state)
    assert mmsb.verify_state_consistency(t)
    # writing to the replayed state does not call the source's functions either
    calls_before = len(mmsb.query_log(state, source="propagation"))
    mmsb.update_page(r, ids[0], b"zzzzzz")
    assert len(mmsb.query_log(state, source="propagation")) == calls_before


def test_recompute_that_raises_leaves_bus_usable(state) -> None:
    import threading

    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id)

    def boom(st, page):
        raise RuntimeError("user recompute failed")

    mmsb.register_recompute_fn(state, b.id, boom)
    with pytest.raises(Exception):  # noqa: B017 - which type is not fixed by the contract
        mmsb.update_page(state, a.id, b"abcd")
    assert mmsb.verify_state_consistency(state)
    assert mmsb.query_page(state, b.id) == bytes(4) and b.epoch == 0
    # the state's lock was released: another thread can write
    done = threading.Event()

    def other() -> None:
        mmsb.write_page(state, b.id, 0, b"ok")
        done.set()

    run_workers(other, [()], timeout=10)
    assert done.is_set(), "state lock still held after a failed recompute"
    assert mmsb.query_page(state, b.id)[:2] == b"ok"


def test_deleted_page_with_recompute_fn(state) -> None:
    a, b, count = _counted_pair(state)
    mmsb.delete_page(state, b.id)
    mmsb.update_page(state, a.id, b"abcd")
    assert count[0] == 0
    assert mmsb.verify_state_consistency(state)


def test_deferred_queue_survives_deleted_page(state) -> None:
    a, b, count = _counted_pair(state)
    state.propagation_mode = mmsb.PropagationMode.DEFERRED
    mmsb.update_page(state, a.id, b"abcd")
    mmsb.delete_page(state, b.id)
    mmsb.execute_propagation(state)
    assert count[0] == 0
    assert mmsb.verify_state_consistency(state)


def test_propagation_emits_page_changed_for_children(state) -> None:
    ids = _chain(state, 3, size=4)
    got: list[tuple] = []
    mmsb.subscribe(state, mmsb.EventType.PAGE_CHANGED, lambda st, et, *data: got.append(data))
    mmsb.update_page(state, ids[0], b"evnt")
    assert [g[0] for g in got] == ids
    assert all(g[1] == 1 for g in got)


def test_data_child_without_recompute_fn_is_untouched(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id)
    invalidated = _events(state, mmsb.EventType.PAGE_INVALIDATED)
    mmsb.update_page(state, a.id, b"abcd")
    assert invalidated == [(b.id, a.id)]
    assert mmsb.query_page(state, b.id) == bytes(4) and b.epoch == 0
    assert mmsb.verify_state_consistency(state)
