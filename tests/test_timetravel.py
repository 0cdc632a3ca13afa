"""read_page_at and replay_to_lsn (both served by the history index) against a
reference that replays the log's records one by one into a fresh state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from mmsb._core.delta import apply_delta
from mmsb._core.engine import MMSBState
from mmsb._history import timetravel
from mmsb._history.replay import state_differences
from mmsb.errors import (
    GraphCycleError,
    HistoryUnavailableError,
    InvalidArgumentError,
    MMSBError,
    PageNotFoundError,
)

CFG = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 30)

ops = st.lists(st.one_of(
    st.tuples(st.just("create"), st.integers(1, 48)),
    st.tuples(st.just("write"), st.integers(0, 9), st.integers(0, 60), st.binary(min_size=1, max_size=6)),
    st.tuples(st.just("dense"), st.integers(0, 9), st.integers(0, 255)),
    st.tuples(st.just("resize"), st.integers(0, 9), st.integers(1, 64)),
    st.tuples(st.just("clone"), st.integers(0, 9)),
    st.tuples(st.just("delete"), st.integers(0, 9)),
    st.tuples(st.just("meta"), st.integers(0, 9), st.integers(0, 3)),
    st.tuples(st.just("edge"), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("batch"), st.lists(st.tuples(st.integers(0, 9), st.integers(0, 60),
                                                   st.binary(min_size=1, max_size=4)),
                                         min_size=1, max_size=5)),
    st.tuples(st.just("compress"),),
), min_size=1, max_size=30)


def _live(s, ids, k):
    live = [p for p in ids if p in s.pages]
    return live[k % len(live)] if live else None


def _run(s, steps, ids):
    """Apply ``steps`` to ``s`` (ids: the pages created so far, extended in place)."""
    for step in steps:
        kind = step[0]
        if kind == "create":
            ids.append(mmsb.create_page(s, step[1]).id)
            continue
        if kind == "compress":
            mmsb.compress_log(s)
            continue
        if kind == "batch":
            writes = []
            for k, off, data in step[1]:
                pid = _live(s, ids, k)
                if pid is not None:
                    size = s.pages[pid].size
                    data = data[:size]
                    writes.append((pid, min(off, size - len(data)), data))
            if writes:
                mmsb.apply_batch(s, writes)
            continue
        pid = _live(s, ids, step[1])
        if pid is None:
            continue
        size = s.pages[pid].size
        if kind == "write":
            data = step[3][:size]
            mmsb.write_page(s, pid, min(step[2], size - len(data)), data)
        elif kind == "dense":
            rng = np.random.default_rng(step[2])
            mmsb.update_page(s, pid, rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        elif kind == "resize":
            mmsb.resize_page(s, pid, step[2])
        elif kind == "clone":
            ids.append(mmsb.clone_page(s, pid).id)
        elif kind == "delete":
            mmsb.delete_page(s, pid)
        elif kind == "meta":
            mmsb.set_metadata(s, pid, "k", step[2])
        elif kind == "edge":
            other = _live(s, ids, step[2])
            try:
                mmsb.add_dependency(s, pid, other, mmsb.CONTROL_DEPENDENCY)
            except GraphCycleError:
                pass
    return s


def _fingerprint(s):
    """What a refused call must leave as it was."""
    with s.lock:
        pages = {pid: (mmsb.query_page(s, pid), s.pages[pid].epoch) for pid in s.pages}
        return (list(s.log.records), s.last_lsn, s.log.horizon_lsn, pages, s.graph.edges())


def _reference_walk(s):
    """Yield (lsn, reference state right after it) for every LSN from the log's origin
    on, replaying the retained records one by one into a fresh state (no index)."""
    ref = MMSBState(dataclasses.replace(s.config))
    ref.detached = True
    if s.replay_base is not None:
        ref.restore(s.replay_base.snapshot())
        ref.log.horizon_lsn = ref.log.last_lsn
    records = list(s.log.records)
    start = ref.log.last_lsn
    yield start, ref
    for rec in records:
        ref.apply_record(rec)
        ref.log.adopt(rec)
        yield rec.lsn, ref


def _same_state(fast, ref):
    assert state_differences(fast, ref, limit=5) == []
    for pid in ref.table.live_ids().tolist():
        assert np.array_equal(fast.page_mask(pid), ref.page_mask(pid)), f"mask of page {pid}"
        assert fast.table.meta.get(pid) == ref.table.meta.get(pid)
    fl, rl = fast.log, ref.log
    assert len(fl.records) == len(rl.records)
    assert list(fl.records) == list(rl.records)
    assert list(fl.deltas) == list(rl.deltas)
    assert {p: [d.lsn for d in v] for p, v in fl.by_page.items()} == \
        {p: [d.lsn for d in v] for p, v in rl.by_page.items()}
    assert (fl.last_lsn, fl.last_timestamp, fl.horizon_lsn) == \
        (rl.last_lsn, rl.last_timestamp, rl.horizon_lsn)
    assert fast.next_delta_id == ref.next_delta_id
    assert fast.table.next_id == ref.table.next_id
    fast._check()


def _check_everything(s, ids):
    """read_page_at at every LSN, epoch and record time, and replay_to_lsn at every
    LSN, equal to the reference; every refusal typed and harmless."""
    horizon = s.log.horizon_lsn
    seen: dict[int, list[tuple[int, bytes, int]]] = {p: [] for p in ids}
    lsn_of_time: list[tuple[int, int]] = []
    for lsn, ref in _reference_walk(s):
        if lsn < horizon:
            for pid in ids:
                with pytest.raises(HistoryUnavailableError):
                    mmsb.read_page_at(s, pid, lsn=lsn)
            continue
        _same_state(mmsb.replay_to_lsn(s, lsn), ref)
        for pid in ids:
            if ref.table.is_live(pid):
                data = mmsb.query_page(ref, pid)
                assert mmsb.read_page_at(s, pid, lsn=lsn) == data, (pid, lsn)
                seen[pid].append((lsn, data, int(ref.table.epoch[pid])))
            else:
                with pytest.raises(PageNotFoundError):
                    mmsb.read_page_at(s, pid, lsn=lsn)
    for rec in s.log.records:
        lsn_of_time.append((rec.timestamp, rec.lsn))
    # Epochs: the bytes of the last LSN at which the page had that epoch.
    for pid, rows in seen.items():
        top = max((e for _, _, e in rows), default=-1)
        for e in range(top + 2):
            at = [data for _, data, ep in rows if ep == e]
            if at:
                assert mmsb.read_page_at(s, pid, epoch=e) == at[-1], (pid, e)
                for n in (0, 1, len(at[-1]) // 2, len(at[-1]), len(at[-1]) + 3):
                    assert timetravel.read_page_prefix_at(s, pid, epoch=e, length=n) == \
                        at[-1][:n], (pid, e, n)
            else:
                with pytest.raises((InvalidArgumentError, HistoryUnavailableError,
                                    PageNotFoundError)):
                    mmsb.read_page_at(s, pid, epoch=e)
        if rows:
            with pytest.raises(InvalidArgumentError):
                mmsb.read_page_at(s, pid, epoch=top + 1)
    # Timestamps: right after the last record logged at or before that moment.
    by_lsn = {pid: {lsn: data for lsn, data, _ in rows} for pid, rows in seen.items()}
    for ts, _ in lsn_of_time:
        for ns in (ts - 1, ts):
            last = max((lsn for t, lsn in lsn_of_time if t <= ns), default=0)
            if not last and s.replay_base is not None and ns >= s.log.horizon_timestamp:
                last = horizon  # the replay base is the state at its time
            for pid in ids:
                if last < horizon:
                    with pytest.raises((HistoryUnavailableError, PageNotFoundError)):
                        mmsb.read_page_at(s, pid, timestamp=ns)
                elif last in by_lsn[pid]:
                    assert mmsb.read_page_at(s, pid, timestamp=ns) == by_lsn[pid][last]
                else:
                    with pytest.raises(PageNotFoundError):
                        mmsb.read_page_at(s, pid, timestamp=ns)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_read_page_at_and_replay_match_a_record_by_record_replay(steps):
    s = MMSBState(CFG)
    ids = [p.id for p in mmsb.create_pages(s, 2, 32)]
    _run(s, steps, ids)
    _check_everything(s, ids)


@settings(max_examples=25, deadline=None)
@given(ops, ops)
def test_the_index_follows_new_records_and_replaced_logs(first, then):
    s = MMSBState(CFG)
    ids = [p.id for p in mmsb.create_pages(s, 2, 32)]
    _run(s, first, ids)
    for pid in ids:  # build keyframes, then change the log under them
        if s.log.last_lsn >= max(s.log.horizon_lsn, 1):
            try:
                mmsb.read_page_at(s, pid, lsn=s.last_lsn)
            except PageNotFoundError:
                pass
    _run(s, then, ids)
    _check_everything(s, ids)


@settings(max_examples=20, deadline=None)
@given(ops)
def test_after_load_checkpoint(tmp_path_factory, steps):
    s = MMSBState(CFG)
    ids = [p.id for p in mmsb.create_pages(s, 2, 32)]
    _run(s, steps, ids)
    mmsb.read_page_at(s, ids[0], lsn=s.last_lsn) if ids[0] in s.pages else None
    path = tmp_path_factory.mktemp("ck") / "state.ckpt"
    mmsb.checkpoint_log(s, path)
    other = _run(MMSBState(CFG), [("create", 8)] * 3, [])
    mmsb.read_page_at(other, 1, lsn=other.last_lsn)  # an index that load_checkpoint must drop
    mmsb.load_checkpoint(other, path)
    _check_everything(other, ids)


@pytest.mark.parametrize("retain", [1, 2, None])
def test_durable_bus_reopened_from_disk(tmp_path, retain):
    cfg = mmsb.MMSBConfig(enable_gpu=False, fsync="none", max_tlog_size=6,
                          retain_checkpoints=retain)
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    ids = [p.id for p in mmsb.create_pages(s, 3, 24)]
    rng = np.random.default_rng(7)
    steps = [("write", int(rng.integers(10)), int(rng.integers(24)), rng.bytes(3))
             for _ in range(40)]
    steps[10:10] = [("resize", 1, 40), ("clone", 2), ("meta", 0, 1), ("delete", 2)]
    _run(s, steps[:25], ids)
    _check_everything(s, ids)
    mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    try:
        _check_everything(s, ids)
        _run(s, steps[25:], ids)
        _check_everything(s, ids)
        if retain is not None:
            assert s.log.horizon_lsn > 0, "the bus should have trimmed its history"
    finally:
        mmsb.mmsb_stop(s)


def _history_state():
    s = MMSBState(CFG)
    a, b = (p.id for p in mmsb.create_pages(s, 2, 16))
    for i in range(20):
        mmsb.write_page(s, a, i % 16, bytes([i + 1]))
    mmsb.delete_page(s, b)
    late = mmsb.create_page(s, 8).id
    return s, a, b, late


@pytest.mark.parametrize("call", [
    dict(),
    dict(lsn=3, epoch=1),
    dict(lsn=3, timestamp=5),
    dict(lsn="3"),
    dict(lsn=3.0),
    dict(lsn=True),
    dict(lsn=-1),
    dict(lsn=10**9),
    dict(epoch=-1),
    dict(epoch=10**9),
    dict(epoch="1"),
    dict(timestamp=-5),
    dict(timestamp=1.5),
])
def test_refusals_are_typed_and_change_nothing(call):
    s, a, _b, _late = _history_state()
    before = _fingerprint(s)
    with pytest.raises(InvalidArgumentError):
        mmsb.read_page_at(s, a, **call)
    assert _fingerprint(s) == before


def test_pages_that_did_not_exist_then():
    s, a, b, late = _history_state()
    create_lsn = s.last_lsn
    before = _fingerprint(s)
    for pid, kw in [(b, dict(lsn=s.last_lsn)), (late, dict(lsn=create_lsn - 1)),
                    (late, dict(lsn=0)), (999, dict(lsn=5)), (999, dict(epoch=0)),
                    (a, dict(lsn=0))]:
        with pytest.raises(PageNotFoundError):
            mmsb.read_page_at(s, pid, **kw)
    assert _fingerprint(s) == before
    assert mmsb.read_page_at(s, b, lsn=create_lsn - 2) == bytes(16)  # before its deletion
    assert mmsb.read_page_at(s, late, lsn=create_lsn) == bytes(8)
    with pytest.raises(InvalidArgumentError):
        mmsb.read_page_at(s, "a", lsn=1)


def test_history_before_the_horizon_and_merged_epochs():
    s, a, _b, _late = _history_state()
    mmsb.compress_log(s)
    mmsb.write_page(s, a, 0, b"\xff")
    before = _fingerprint(s)
    for kw in [dict(lsn=s.log.horizon_lsn - 1), dict(epoch=5), dict(timestamp=0)]:
        with pytest.raises(HistoryUnavailableError):
            mmsb.read_page_at(s, a, **kw)
    assert _fingerprint(s) == before
    assert mmsb.read_page_at(s, a, epoch=20) == mmsb.read_page_at(s, a, lsn=s.log.horizon_lsn)
    assert mmsb.read_page_at(s, a, epoch=21) == mmsb.query_page(s, a)


def test_no_history_is_refused():
    s = MMSBState(mmsb.MMSBConfig(enable_gpu=False, enable_logging=False))
    p = mmsb.create_page(s, 8).id
    mmsb.write_page(s, p, 0, b"x")
    with pytest.raises(HistoryUnavailableError):
        mmsb.read_page_at(s, p, lsn=s.last_lsn)
    with pytest.raises(MMSBError):
        mmsb.read_page_at(s, p, epoch=1)


@pytest.mark.parametrize("scratch_max", [0, 40, timetravel.SCRATCH_MAX])
def test_prefix_reads_return_their_own_bytes(monkeypatch, scratch_max):
    # Rebuilt in the index's scratch buffer (or, past SCRATCH_MAX, in a new array):
    # each result is a copy that a later read does not change.
    monkeypatch.setattr(timetravel, "SCRATCH_MAX", scratch_max)
    s = MMSBState(CFG)
    p = mmsb.create_page(s, 64).id
    for i in range(30):
        mmsb.write_page(s, p, i, bytes([i + 1]) * 3)
    mmsb.resize_page(s, p, 96)
    for i in range(30, 40):
        mmsb.write_page(s, p, i, b"\xee")
    top = int(s.table.epoch[p])
    got = [(e, timetravel.read_page_prefix_at(s, p, epoch=e, length=50))
           for e in range(top + 1)]
    for e, data in got:
        assert type(data) is bytes
        assert data == mmsb.read_page_at(s, p, epoch=e)[:50], e


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "durable"])
def test_prefix_reads_equal_whole_page_reads_with_writes_past_the_prefix(durable, tmp_path):
    # Only the prefix of a past version is rebuilt: the keyframe's first bytes are
    # copied into the shared scratch buffer, whose bytes past the prefix are stale
    # (another page's, another version's), and the deltas are applied over the whole
    # buffer. Held to read_page_at's whole page, cut, for every epoch of pages whose
    # writes land before, across and past the prefix (sparse, runs, whole-page
    # rewrites), read in an order that leaves the scratch buffer holding other bytes.
    s = (mmsb.mmsb_start(path=str(tmp_path / "bus"), config=CFG) if durable
         else MMSBState(CFG))
    try:
        rng = np.random.default_rng(7)
        ids = [mmsb.create_page(s, size).id for size in (300, 300, 64)]
        for step in range(120):
            pid = ids[step % 3]
            size = s.pages[pid].size
            kind = step % 5
            if kind == 0:  # the whole page rewritten
                data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                mmsb.write_page(s, pid, 0, data)
            elif kind == 1:  # a few scattered bytes
                for off in rng.integers(0, size, 3):
                    mmsb.write_page(s, pid, int(off), bytes([int(rng.integers(1, 256))]))
            else:  # a run somewhere, often past a short prefix
                n = int(rng.integers(1, 40))
                off = int(rng.integers(0, size - n))
                mmsb.write_page(s, pid, off, rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            if step == 60:
                mmsb.resize_page(s, ids[0], 500)
        tops = {pid: int(s.table.epoch[pid]) for pid in ids}
        reads = [(pid, e, n) for e in range(max(tops.values()), -1, -1) for pid in ids
                 if e <= tops[pid] for n in (0, 5, 37, 150, 299, 1000)]
        rng.shuffle(reads)
        for pid, e, n in reads:
            try:
                whole = mmsb.read_page_at(s, pid, epoch=e)
            except MMSBError as exc:
                with pytest.raises(type(exc)):
                    timetravel.read_page_prefix_at(s, pid, epoch=e, length=n)
                continue
            got = timetravel.read_page_prefix_at(s, pid, epoch=e, length=n)
            assert type(got) is bytes
            assert got == whole[:n], (pid, e, n)
        # Several versions of a page in one call (rebuilt a keyframe span at a time, in
        # log order, whatever the order asked; repeats and the current epoch included).
        for pid in ids:
            asked = [(e, n) for (p, e, n) in reads if p == pid]
            asked += asked[:7] + [(tops[pid], 33)]
            rng.shuffle(asked)
            fine = []
            for e, n in asked:
                try:
                    fine.append(((e, n), mmsb.read_page_at(s, pid, epoch=e)[:n]))
                except MMSBError:
                    pass
            got = timetravel.read_page_prefixes_at(s, pid, [w for w, _ in fine])
            assert got == [want for _, want in fine]
            assert all(type(g) is bytes for g in got)
        for pid in ids:  # the current version, copied from the page itself
            assert timetravel.read_page_prefix_at(s, pid, epoch=tops[pid], length=40) == \
                mmsb.query_page(s, pid)[:40]
    finally:
        if durable:
            mmsb.mmsb_stop(s)


@pytest.mark.parametrize("call", [dict(epoch=1, length=-1), dict(epoch=1, length="3"),
                                  dict(epoch=1, length=2.0), dict(epoch=-1, length=3),
                                  dict(epoch=10**9, length=3), dict(epoch=True, length=3)])
def test_prefix_read_refusals(call):
    s, a, _b, _late = _history_state()
    before = _fingerprint(s)
    with pytest.raises(InvalidArgumentError):
        timetravel.read_page_prefix_at(s, a, **call)
    assert _fingerprint(s) == before


@pytest.mark.parametrize("reads", [
    "ab", b"ab", 5, None, [(1,)], [(1, 2, 3)], [[1, 2]], [(1.0, 2)], [(1, "2")],
    [(True, 2)], [(1, -1)], [(-1, 1)], [(1, 2), (10**9, 2)]])
def test_several_prefix_reads_refusals(reads):
    s, a, _b, _late = _history_state()
    before = _fingerprint(s)
    with pytest.raises(InvalidArgumentError):
        timetravel.read_page_prefixes_at(s, a, reads)
    assert _fingerprint(s) == before


def test_several_prefix_reads_of_nothing_and_of_a_missing_page():
    s, a, _b, _late = _history_state()
    assert timetravel.read_page_prefixes_at(s, a, []) == []
    with pytest.raises(PageNotFoundError):
        timetravel.read_page_prefixes_at(s, 10**6, [(1, 4)])


def test_a_read_applies_at_most_k_deltas():
    s = MMSBState(CFG)
    p = mmsb.create_page(s, 4096).id
    for i in range(100):
        mmsb.write_page(s, p, i, b"z")
    ix = timetravel.history_index(s)
    line = ix.line(p)
    ix.bytes_after(line, len(line.kinds) - 1)
    gaps = np.diff(line.frame_pos + [len(line.kinds)])
    assert gaps.max() <= timetravel.KEYFRAME_EVERY


def test_keyframes_stay_within_the_budget(monkeypatch):
    monkeypatch.setattr(timetravel, "KEYFRAME_BUDGET", 64 * 1024)
    s = MMSBState(CFG)
    ids = [p.id for p in mmsb.create_pages(s, 16, 4096)]
    for i in range(16 * 20):
        mmsb.write_page(s, ids[i % 16], i % 4000, b"q" * 8)
    for pid in ids:
        assert mmsb.read_page_at(s, pid, lsn=s.last_lsn) == mmsb.query_page(s, pid)
        ix = timetravel.history_index(s)
        assert ix.frame_bytes <= 64 * 1024 + 4096 * 4
        assert ix.frame_bytes == sum(line.nbytes for line in ix.lines.values())
    # Pages whose keyframes were dropped rebuild them and still read right.
    assert mmsb.read_page_at(s, ids[0], lsn=s.last_lsn) == mmsb.query_page(s, ids[0])


def _mixed_log_state():
    """Deltas of every payload encoding, a merged delta (compression), several sources."""
    s = MMSBState(CFG)
    big = mmsb.create_page(s, 70_000).id
    a, b = (p.id for p in mmsb.create_pages(s, 2, 64))
    rng = np.random.default_rng(3)
    for i in range(30):
        mmsb.write_page(s, a, i, bytes([i + 1]) * 3, source=f"w{i % 3}")
        mmsb.update_page(s, b, rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    page = bytearray(70_000)
    page[::1000] = b"\x07" * 70
    mmsb.update_page(s, big, bytes(page))  # scattered positions past 65,536: u32
    mmsb.update_page(s, a, bytes(range(64)))
    return s


def test_apply_row_writes_what_the_built_delta_writes():
    s = _mixed_log_state()
    mmsb.compress_log(s)
    mmsb.write_page(s, 2, 5, b"after")
    log = s.log
    for row in range(log.n):
        d = log.delta_at(row)
        mine = np.random.default_rng(row).integers(0, 256, d.page_size, dtype=np.uint8)
        ref = mine.copy()
        wrote = log.apply_row(row, mine)
        apply_delta(ref, d)
        assert np.array_equal(mine, ref), row
        assert wrote == (d.count if d.is_sparse else d.page_size)


def test_extend_from_copies_a_prefix_and_never_writes_a_shared_chunk():
    s = _mixed_log_state()
    log = s.log
    mid = log.last_lsn - 7
    copy = MMSBState(CFG).log
    copy.extend_from(log, 0, mid)
    assert list(copy.records) == list(log.iter_records(0, mid))
    assert copy.last_lsn == mid
    assert copy.max_id_through(copy.n) == max(d.id for d in copy.deltas)
    copy._check()
    shared = {id(c) for c in log.chunks if c is not None}
    before = [bytes(c) for c in log.chunks if c is not None]
    d = log.delta_at(0).stamped(copy.next_lsn, copy.last_timestamp)
    copy.adopt(d)
    assert id(copy.chunks[-1]) not in shared
    assert [bytes(c) for c in log.chunks if c is not None] == before
    assert copy.deltas[-1] == d
    copy.extend_from(log, copy.last_lsn, log.last_lsn)  # rows after a row of its own
    assert list(copy.records)[-1] == list(log.records)[-1]
    copy._check()


def test_rewrites_and_restored_mementos_move_the_generation():
    s = _mixed_log_state()
    log = s.log
    seen = [log.generation]
    memento = log.memento()
    mmsb.compress_log(s)
    seen.append(log.generation)
    log.restore_memento(memento)
    seen.append(log.generation)
    log.drop_through(3)
    seen.append(log.generation)
    log.forget_all(log.next_lsn)
    seen.append(log.generation)
    assert seen == sorted(set(seen)), seen


def test_a_state_read_in_the_past_is_freed_with_its_history_index(tmp_path):
    """The history index of a log is kept in a table weak on the log; an index that held
    its log strongly kept every log read in the past alive for the life of the process
    (200 states of one 64 KiB page: 145 MB, and a durable bus's mapped segments with
    their descriptors). Stopped and dropped, the state's log goes, index and all."""
    import gc
    import os
    import weakref

    def read_in_the_past(path):
        cfg = dataclasses.replace(CFG, max_tlog_size=50, checkpoint_interval=0, fsync="none")
        s = mmsb.mmsb_start(config=cfg, path=path)
        pid = mmsb.create_page(s, 1 << 16).id
        for k in range(30):
            mmsb.write_page(s, pid, k, bytes([k + 1]))
        assert mmsb.read_page_at(s, pid, lsn=s.last_lsn - 5)[:1] == b"\x01"
        assert timetravel._INDEXES.get(s.log) is not None
        ref = weakref.ref(s.log)
        mmsb.mmsb_stop(s)
        return ref

    for path in (None, tmp_path / "bus"):
        read_in_the_past(path)  # (a first round: whatever the process keeps once)
        gc.collect()
        fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
        refs = [read_in_the_past(path) for _ in range(5)]
        gc.collect()
        assert [r() for r in refs] == [None] * 5
        if fds:
            assert len(os.listdir("/proc/self/fd")) <= fds
