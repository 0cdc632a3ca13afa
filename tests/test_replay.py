"""Replay: every past state can be rebuilt exactly from the log, and replayed states
are detached from their source."""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest

import mmsb
from conftest import as_bool, as_u8, content_view, edges, new_state, page_ids, pages_view


def _recorded_scenario() -> tuple[mmsb.MMSBState, list[tuple[int, dict, list]]]:
    """Runs many kinds of calls, noting (last_lsn, pages_view, edges) after each."""
    s = new_state()
    history: list[tuple[int, dict, list]] = []

    def note() -> None:
        history.append((s.last_lsn, pages_view(s), edges(s)))

    rng = np.random.default_rng(11)
    a = mmsb.create_page(s, 32, metadata={"role": "a"})
    note()
    b = mmsb.create_page(s, 16)
    note()
    mmsb.update_page(s, a.id, rng.integers(0, 256, 32, dtype=np.uint8).tobytes())
    note()
    mmsb.write_page(s, b.id, 3, b"hello")
    note()
    mmsb.set_metadata(s, b.id, "color", "blue")
    note()
    mmsb.resize_page(s, a.id, 48)
    note()
    mmsb.write_page(s, a.id, 40, b"grown")
    note()
    c = mmsb.clone_page(s, a.id)
    note()
    mmsb.add_dependency(s, a.id, b.id, mmsb.CONTROL_DEPENDENCY)
    note()
    mmsb.write_page(s, c.id, 0, b"clone")
    note()
    mmsb.resize_page(s, c.id, 8)
    note()
    mmsb.delete_page(s, b.id)
    note()
    d = mmsb.create_page(s, 4)
    note()
    mmsb.update_page(s, d.id, b"dddd")
    note()
    mmsb.update_metadata(s, d.id, {"x": 1, "y": [1, 2]})
    note()
    for k in range(5):
        mmsb.write_page(s, d.id, k % 4, bytes([65 + k]))
        note()
    pages = mmsb.create_pages(s, 3, 5)
    note()
    mmsb.write_page(s, pages[1].id, 1, b"mid")
    note()
    mmsb.delete_page(s, pages[0].id)
    note()
    return s, history


def test_replay_to_every_recorded_lsn() -> None:
    s, history = _recorded_scenario()
    lsns = [h[0] for h in history]
    assert all(x < y for x, y in zip(lsns, lsns[1:], strict=False)), "each call must log a record"
    for lsn, view, graph_edges in history:
        r = mmsb.replay_to_lsn(s, lsn)
        assert isinstance(r, mmsb.MMSBState)
        assert pages_view(r) == view, f"replay_to_lsn({lsn}) differs"
        assert edges(r) == graph_edges, f"replay_to_lsn({lsn}) edges differ"


def test_replay_to_lsn_zero_is_empty() -> None:
    s, _ = _recorded_scenario()
    r = mmsb.replay_to_lsn(s, 0)
    assert page_ids(r) == []


def test_replayed_state_is_detached() -> None:
    s, history = _recorded_scenario()
    lsn, view, _ = history[3]
    r = mmsb.replay_to_lsn(s, lsn)
    pid = page_ids(r)[0]
    before_source = pages_view(s)
    mmsb.write_page(r, pid, 0, b"\xee\xee")
    assert pages_view(s) == before_source
    # and writes to the source do not reach the replayed state
    r2 = mmsb.replay_to_lsn(s, s.last_lsn)
    frozen = pages_view(r2)
    live = page_ids(s)[0]
    mmsb.write_page(s, live, 0, b"\x99")
    assert pages_view(r2) == frozen
    assert mmsb.verify_state_consistency(r2)


def test_replay_to_timestamp() -> None:
    s = new_state()
    noted: dict[int, dict] = {}
    p = mmsb.create_page(s, 8)
    q = mmsb.create_page(s, 8)
    time.sleep(0.002)
    for i in range(6):
        pid = p.id if i % 2 else q.id
        mmsb.write_page(s, pid, i, bytes([i + 10]))
        noted[s.last_lsn] = content_view(s)
        time.sleep(0.002)
    for d in s.tlog:
        assert d.lsn in noted
        r = mmsb.replay_to_timestamp(s, d.timestamp)
        assert content_view(r) == noted[d.lsn]
        r = mmsb.replay_to_timestamp(s, d.timestamp + 1)
        assert content_view(r) == noted[d.lsn]
    first = s.tlog[0]
    r = mmsb.replay_to_timestamp(s, first.timestamp - 1)
    # before the first write: both pages exist (created earlier), zero-filled
    assert content_view(r) == {p.id: (bytes(8), 0), q.id: (bytes(8), 0)}


def _epoch_scenario():
    s = new_state()
    ids = [mmsb.create_page(s, 6).id for _ in range(3)]
    hist: dict[int, list[bytes]] = {pid: [bytes(6)] for pid in ids}
    rng = np.random.default_rng(5)
    counts = {ids[0]: 5, ids[1]: 2, ids[2]: 0}
    order = [pid for pid in ids for _ in range(counts[pid])]
    rng.shuffle(order)
    for pid in order:
        new = bytearray(hist[pid][-1])
        new[int(rng.integers(0, 6))] = len(hist[pid]) + 1  # always a change
        mmsb.update_page(s, int(pid), bytes(new))
        hist[int(pid)].append(bytes(new))
    return s, ids, hist


@pytest.mark.parametrize("bound", [0, 1, 2, 3, 5, 100])
def test_replay_to_epoch(bound) -> None:
    s, ids, hist = _epoch_scenario()
    r = mmsb.replay_to_epoch(s, bound)
    assert page_ids(r) == ids
    for pid in ids:
        e = min(bound, len(hist[pid]) - 1)
        assert mmsb.query_page(r, pid) == hist[pid][e]
        assert r.pages[pid].epoch == e


def test_replay_log_full_window_is_current_state() -> None:
    s, ids, hist = _epoch_scenario()
    snap = mmsb.replay_log(s, 0, 1000)
    assert isinstance(snap, dict)
    for pid in ids:
        assert pid in snap
        assert bytes(snap[pid].data) == hist[pid][-1]


def test_replay_page_history() -> None:
    s, ids, hist = _epoch_scenario()
    for pid in ids:
        h = mmsb.replay_page_history(s, pid)
        assert [x.epoch for x in h] == list(range(1, len(hist[pid])))
        assert [bytes(x.data) for x in h] == hist[pid][1:]
    # detached: later writes do not change earlier snapshots
    h = mmsb.replay_page_history(s, ids[0])
    frozen = [bytes(x.data) for x in h]
    mmsb.update_page(s, ids[0], b"zzzzzz")
    assert [bytes(x.data) for x in h] == frozen


def test_replay_page_history_unknown_page() -> None:
    s, _, _ = _epoch_scenario()
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.replay_page_history(s, 99)


def test_verify_state_consistency_detects_tampering() -> None:
    s, ids, _ = _epoch_scenario()
    assert mmsb.verify_state_consistency(s) is True
    arr = np.asarray(s.pages[ids[0]].data)
    assert arr.dtype == np.uint8
    old = int(arr[0])
    # write behind the log's back, bypassing the read-only flag
    ctypes.memmove(arr.ctypes.data, bytes([old ^ 0xFF]), 1)
    assert mmsb.query_page(s, ids[0])[0] == old ^ 0xFF, "tampering did not reach the page"
    assert mmsb.verify_state_consistency(s) is False
    ctypes.memmove(arr.ctypes.data, bytes([old]), 1)
    assert mmsb.verify_state_consistency(s) is True


def test_compute_diff_turns_a_into_b() -> None:
    s, ids, hist = _epoch_scenario()
    a = mmsb.replay_to_epoch(s, 1)
    b = s
    diff = mmsb.compute_diff(a, b)
    assert all(isinstance(d, mmsb.Delta) for d in diff)
    result = {pid: bytearray(mmsb.query_page(a, pid)) for pid in page_ids(a)}
    touched = set()
    for d in diff:
        m = as_bool(d.mask)
        dense = as_u8(d.dense_data())
        buf = np.frombuffer(result[d.page_id], dtype=np.uint8).copy()
        buf[m] = dense[m]
        result[d.page_id] = bytearray(buf.tobytes())
        touched.add(d.page_id)
    for pid in page_ids(b):
        assert bytes(result[pid]) == mmsb.query_page(b, pid)
    # pages that already agree need no changed bytes
    same = {pid for pid in ids if mmsb.query_page(a, pid) == mmsb.query_page(b, pid)}
    for d in diff:
        if d.page_id in same:
            assert mmsb.delta_byte_count(d) == 0
    assert ids[0] in touched


def test_compute_diff_of_equal_states_changes_nothing() -> None:
    s, _, _ = _epoch_scenario()
    r = mmsb.replay_to_lsn(s, s.last_lsn)
    assert all(mmsb.delta_byte_count(d) == 0 for d in mmsb.compute_diff(r, s))
    assert all(mmsb.delta_byte_count(d) == 0 for d in mmsb.compute_diff(s, s))


def test_incremental_replay() -> None:
    s = new_state()
    ids = [mmsb.create_page(s, 8).id for _ in range(2)]
    mmsb.write_page(s, ids[0], 0, b"one")
    mid = s.last_lsn
    mmsb.write_page(s, ids[1], 2, b"two")
    mmsb.write_page(s, ids[0], 4, b"four")
    mmsb.update_page(s, ids[1], b"eight!!!")
    later = [d for d in s.tlog if d.lsn > mid]
    assert len(later) == 3
    base = mmsb.replay_to_lsn(s, mid)
    out = mmsb.incremental_replay(base, later)
    target = out if isinstance(out, mmsb.MMSBState) else base
    assert content_view(target) == content_view(s)


def test_replay_with_predicate() -> None:
    s = new_state()
    p = mmsb.create_page(s, 4)
    q = mmsb.create_page(s, 4)
    mmsb.update_page(s, p.id, b"p1p1", source="x")
    mmsb.update_page(s, q.id, b"q1q1", source="y")
    mmsb.update_page(s, p.id, b"p2p2", source="x")
    mmsb.update_page(s, q.id, b"q2q2", source="y")
    got = mmsb.replay_with_predicate(s, lambda epoch, delta: delta.source == "y")
    assert isinstance(got, list) and len(got) == 2
    (e1, s1), (e2, s2) = got
    assert (e1, e2) == (1, 2)
    assert isinstance(s1, mmsb.MMSBState) and isinstance(s2, mmsb.MMSBState)
    assert mmsb.query_page(s1, q.id) == b"q1q1"
    assert mmsb.query_page(s1, p.id) == b"p1p1"
    assert mmsb.query_page(s2, q.id) == b"q2q2"
    assert mmsb.query_page(s2, p.id) == b"p2p2"
    assert mmsb.replay_with_predicate(s, lambda epoch, delta: False) == []
    everything = mmsb.replay_with_predicate(s, lambda epoch, delta: True)
    assert [e for e, _ in everything] == [1, 1, 2, 2]
    assert content_view(everything[-1][1]) == content_view(s)


def test_replay_from_checkpoint(tmp_path) -> None:
    s, ids, hist = _epoch_scenario()
    path = tmp_path / "r.ckpt"
    mmsb.checkpoint_log(s, str(path))
    r = mmsb.replay_from_checkpoint(str(path))
    assert isinstance(r, mmsb.MMSBState)
    assert content_view(r) == content_view(s)
    assert mmsb.verify_state_consistency(r)
    r1 = mmsb.replay_from_checkpoint(str(path), target_epoch=1)
    assert content_view(r1) == content_view(mmsb.replay_to_epoch(s, 1))
    for pid in ids:
        assert mmsb.query_page(r1, pid) == hist[pid][min(1, len(hist[pid]) - 1)]


def test_replay_from_damaged_checkpoint(tmp_path) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(mmsb.SerializationError):
        mmsb.replay_from_checkpoint(str(path))
