"""The fast paths against the general ones: one-page creation that extends the open
creation run without a record object, and the propagation pass for its common cases.
Each fast path must leave the same state, log and replays as the general path."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from conftest import assert_unchanged, new_state, snapshot
from mmsb._core import engine as mmsb_engine
from mmsb._core.monitor import TOTAL_MAX
from mmsb._core.records import PageCreate


def _records(state: mmsb.MMSBState) -> list[tuple[Any, ...]]:
    """The log's records without their timestamps (two states never share a clock)."""
    out = []
    for rec in state.log.records:
        if isinstance(rec, mmsb.Delta):
            out.append(("delta", rec.lsn, rec.page_id, rec.base_epoch, rec.epoch, rec.source,
                        rec.page_size, bytes(rec.indices.astype(np.int64)),
                        bytes(rec.values)))
        else:
            fields = {k: getattr(rec, k) for k in rec.__slots__ if k != "timestamp"}
            out.append((type(rec).__name__, rec.lsn, sorted(fields.items(), key=str)))
    return out


def _pages(state: mmsb.MMSBState) -> list[tuple[int, int, int, bytes, dict[str, Any]]]:
    return [(pid, p.size, p.epoch, p.query(), dict(p.metadata)) for pid, p in state.pages.items()]


def _general_create(state: mmsb.MMSBState, size: int | None, metadata: Any) -> int:
    return state.create(1, size, "cpu", metadata)


def _fast_create(state: mmsb.MMSBState, size: int | None, metadata: Any) -> int:
    return mmsb.create_page(state, size, metadata=metadata).id


_ops = st.lists(st.one_of(
    st.tuples(st.just("create"), st.sampled_from([None, 1, 16, 17, 1024, 4096]),
              st.sampled_from([None, {}, {"k": 1}])),
    st.tuples(st.just("write"), st.integers(0, 40), st.binary(min_size=1, max_size=80)),
    st.tuples(st.just("delete"), st.integers(0, 40), st.none()),
), max_size=40)


def _run(state: mmsb.MMSBState, ops: list[tuple[str, Any, Any]], create: Any) -> None:
    for op, a, b in ops:
        live = list(state.pages)
        if op == "create":
            create(state, a, b)
        elif live:
            pid = live[a % len(live)]
            if op == "write":
                size = state.pages[pid].size
                mmsb.write_page(state, pid, 0, b[:size])
            else:
                mmsb.delete_page(state, pid)


@settings(max_examples=60, deadline=None)
@given(ops=_ops)
def test_fast_create_logs_and_replays_as_the_general_path(ops: list[tuple[str, Any, Any]]) -> None:
    fast, general = new_state(page_size_default=64), _general_state(page_size_default=64)
    _run(fast, ops, _fast_create)
    _run(general, ops, _general_create)
    fast._check()
    general._check()
    assert _records(fast) == _records(general)
    assert _pages(fast) == _pages(general)
    assert fast.log.record_count == general.log.record_count
    assert fast.counters.records_logged == general.counters.records_logged
    replayed = mmsb.replay_to_lsn(fast, fast.last_lsn)
    assert _pages(replayed) == _pages(fast)


def test_consecutive_creations_share_one_run_and_read_back_as_records() -> None:
    s = new_state()
    ids = [mmsb.create_page(s, 256).id for _ in range(50)]
    assert len(s.log.structs) == 1
    recs = list(s.log.records)
    assert [r.first_id for r in recs] == ids
    assert [r.lsn for r in recs] == list(range(1, 51))
    stamps = [r.timestamp for r in recs]
    assert stamps == sorted(stamps)
    assert all(isinstance(r, PageCreate) and r.count == 1 and r.size == 256 for r in recs)


def test_fast_create_takes_no_record_object(monkeypatch: pytest.MonkeyPatch) -> None:
    s = new_state()
    mmsb.create_page(s, 64)

    def refuse(*args: Any) -> int:
        raise AssertionError("the general path ran")

    monkeypatch.setattr(s, "create", refuse)
    monkeypatch.setattr(s.log, "append", refuse)
    ids = [mmsb.create_page(s, 64).id for _ in range(10)]
    assert ids == list(range(2, 12))
    s._check()


def test_fast_create_emits_page_created() -> None:
    s = new_state()
    seen: list[int] = []
    mmsb.subscribe(s, mmsb.EventType.PAGE_CREATED, lambda _st, _et, pid: seen.append(pid))
    ids = [mmsb.create_page(s, 32).id for _ in range(5)]
    assert seen == ids


@pytest.mark.parametrize("first", [True, False])
def test_memory_error_while_logging_leaves_no_record(monkeypatch: pytest.MonkeyPatch,
                                                     first: bool) -> None:
    s = new_state()
    if not first:
        mmsb.create_page(s, 128)

    def fail(*args: Any) -> int:
        raise MemoryError

    # The first creation of a run is appended as a record, the next ones extend the run
    # (an append to its offsets, in create_page's frame).
    if first:
        monkeypatch.setattr(s.log, "append", fail)
        # A run is only continued by creations of its own size.
        monkeypatch.setattr(s.log, "extend_creation", lambda *a: 0)
    else:
        class _NoRoom(list):  # stands for the run's offsets array, out of memory
            def append(self, _value: Any) -> None:
                raise MemoryError

        run = s.log.structs[-1]
        monkeypatch.setattr(run, "offsets", _NoRoom(run.offsets))
    before = snapshot(s)
    in_use = s.arena.bytes_in_use
    with pytest.raises(MemoryError):
        mmsb.create_page(s, 128)
    assert_unchanged(s, before)
    assert s.arena.bytes_in_use == in_use
    monkeypatch.undo()
    s._check()
    p = mmsb.create_page(s, 128)
    assert p.query() == bytes(128)
    s._check()


def test_fast_create_falls_back_where_it_must() -> None:
    s = new_state(enable_logging=False)
    mmsb.create_page(s, 64)
    assert s.log.record_count == 0
    s = new_state()
    with mmsb.batch(s), pytest.raises(mmsb.InvalidArgumentError):
        mmsb.create_page(s, 64)
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.create_page(s, 0)
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.create_page(s, True)
    mmsb.mmsb_stop(s)
    with pytest.raises(mmsb.StateClosedError):
        mmsb.create_page(s, 64)


def test_fast_create_refuses_a_size_equal_to_the_runs_but_not_an_int() -> None:
    # 64.0 == 64 and True == 1: the open run of that size must not take them.
    for size, bad in ((64, 64.0), (1, True)):
        s = new_state()
        mmsb.create_page(s, size)
        before = snapshot(s)
        with pytest.raises(mmsb.InvalidArgumentError):
            mmsb.create_page(s, bad)
        assert_unchanged(s, before)
        s._check()


def test_fast_create_counts_records_logged_and_resets() -> None:
    s = new_state()
    for _ in range(5):
        mmsb.create_page(s, 64)
    mmsb.write_page(s, 1, 0, b"x")
    assert s.counters.records_logged == 6
    assert mmsb.get_stats(s).records_logged == 6
    mmsb.reset_stats(s)
    assert s.counters.records_logged == 0
    mmsb.create_page(s, 64)
    mmsb.create_pages(s, 3, 64)
    assert s.counters.records_logged == 2
    s.counters.records_logged += 3
    assert s.counters.records_logged == 5


def test_fast_create_starts_a_new_run_past_the_offsets_range(monkeypatch: pytest.MonkeyPatch) -> None:
    s = new_state()
    first = mmsb.create_page(s, 64).id
    t0 = s.log.last_timestamp
    now = [t0]
    monkeypatch.setattr(mmsb_engine.time, "time_ns", lambda: now[0])
    ids = []
    for ts in (t0 + 5, t0 + (1 << 32) + 7, t0 + (1 << 32) + 9, t0 + 3):
        now[0] = ts
        ids.append(mmsb.create_page(s, 64).id)
    monkeypatch.undo()
    assert ids == list(range(first + 1, first + 5))
    # The second one is more than 2**32 ns after the run's first: a new run starts
    # there; the last one reads a clock gone back and keeps the previous timestamp.
    assert len(s.log.structs) == 2
    recs = list(s.log.records)
    assert [r.first_id for r in recs] == [first, *ids]
    assert [r.timestamp for r in recs] == [t0, t0 + 5, t0 + (1 << 32) + 7, t0 + (1 << 32) + 9,
                                           t0 + (1 << 32) + 9]
    s._check()
    replayed = mmsb.replay_to_lsn(s, s.last_lsn)
    assert _pages(replayed) == _pages(s)


def test_fast_create_leaves_free_listed_slots_to_be_reused_first() -> None:
    s = new_state()
    small = [mmsb.create_page(s, 64) for _ in range(3)]
    big = mmsb.create_page(s, 4096)
    slot = int(s.table.addr[big.id])
    mmsb.delete_page(s, big.id)
    # A 4 KiB slot is free-listed: creations of 64 bytes go on (the open run is of 4096
    # bytes, so create_one takes them), and the next 4 KiB page reuses the slot.
    more = [mmsb.create_page(s, 64) for _ in range(3)]
    again = mmsb.create_page(s, 4096)
    assert int(s.table.addr[again.id]) == slot
    assert s.arena.bytes_free_listed == 0
    assert again.query() == bytes(4096)
    assert [p.id for p in small + more] == [1, 2, 3, 5, 6, 7]
    s._check()


def test_arena_caches_only_the_slot_classes_of_bump_chunks() -> None:
    s = new_state()
    huge = 32 << 20  # a dedicated buffer, not a slot of a bump chunk
    p = mmsb.create_page(s, 1024)
    q = mmsb.create_page(s, huge)
    r = mmsb.create_page(s, huge)
    assert 1024 in s.arena._classes and huge not in s.arena._classes
    assert s.arena.alloc_ready(huge) == -1
    assert (p.size, q.size, r.size) == (1024, huge, huge)
    s._check()


def test_hot_paths_return_handles_that_are_pages() -> None:
    s = new_state()
    first = mmsb.create_page(s, 16)
    with mmsb.batch(s):
        held = mmsb.write_page(s, first.id, 0, b"ab")
    handles = [mmsb.create_page(s, 16), mmsb.create_page(s, 16, metadata={"k": 1}),
               mmsb.write_page(s, 2, 1, b"x"), mmsb.update_page(s, 3, b"y" * 16), held]
    for h in handles:
        page = mmsb.Page(s, h.id)
        assert isinstance(h, mmsb.Page)
        assert h == page and page == h and hash(h) == hash(page)
        assert repr(h) == repr(page)
        assert (h.state, h.size, h.epoch, h.query()) == (s, page.size, page.epoch, page.query())
    assert [h.id for h in handles] == [2, 3, 2, 3, 1]


def test_fast_create_reuses_freed_slots_zeroed() -> None:
    s = new_state()
    a = mmsb.create_page(s, 512)
    mmsb.update_page(s, a.id, b"\xff" * 512)
    mmsb.delete_page(s, a.id)
    b = mmsb.create_page(s, 512)
    assert b.query() == bytes(512)
    s._check()


# --------------------------------------------------------------------------- propagation

_dags = st.tuples(
    st.integers(2, 9),
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), max_size=16),
    st.lists(st.tuples(st.integers(0, 8), st.binary(min_size=8, max_size=8)), min_size=1,
             max_size=6),
    st.booleans(),
)


def _general_state(**config: Any) -> mmsb.MMSBState:
    """A state whose log has a sink that keeps nothing: every write and creation takes
    the general path (Delta objects, records appended one by one)."""
    s = new_state(**config)
    s.log.sink = lambda rec: None
    return s


def _build(n: int, edges: list[tuple[int, int]], general: bool) -> tuple[mmsb.MMSBState, list[int]]:
    s = _general_state() if general else new_state()
    ids = [mmsb.create_page(s, 8).id for _ in range(n)]
    for a, b in edges:
        lo, hi = sorted((a % n, b % n))
        if lo == hi or mmsb.get_parents(s, ids[hi]):
            continue  # one DATA parent per page: a passthrough copies one source
        mmsb.add_dependency(s, ids[lo], ids[hi], mmsb.DATA_DEPENDENCY)
        if general:
            src = ids[lo]
            mmsb.register_recompute_fn(s, ids[hi], lambda st_, _p, src=src: bytes(st_.page_view(src)))
            s.write_recomputed = (  # type: ignore[method-assign]
                lambda pid, arr, s=s: s.write_bytes(pid, 0, arr, "propagation", True))
        else:
            mmsb.register_passthrough_recompute(s, ids[hi], ids[lo])
    return s, ids


@settings(max_examples=60, deadline=None)
@given(dag=_dags)
def test_fast_propagation_matches_the_general_path(dag: Any) -> None:
    n, edges, writes, dense = dag
    fast, ids = _build(n, edges, general=False)
    general, _ = _build(n, edges, general=True)
    for k, data in writes:
        payload = data * 2 if dense else data[:3]
        for s in (fast, general):
            mmsb.write_page(s, ids[k % n], 0, payload[:8])
    fast._check()
    general._check()
    assert _records(fast) == _records(general)
    assert _pages(fast) == _pages(general)
    for pid in ids:
        assert np.array_equal(fast.pages[pid].mask, general.pages[pid].mask)
    replayed = mmsb.replay_to_lsn(fast, fast.last_lsn)
    assert _pages(replayed) == _pages(fast)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 12), edges=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)),
                                            max_size=24), src=st.integers(0, 11))
def test_affected_order_is_topological_and_complete(n: int, edges: list[tuple[int, int]],
                                                    src: int) -> None:
    from mmsb._core.propagation import affected_order

    s = new_state()
    ids = [mmsb.create_page(s, 8).id for _ in range(n)]
    for a, b in edges:
        lo, hi = sorted((a % n, b % n))
        if lo != hi and not s.graph.has_edge(ids[lo], ids[hi]):
            mmsb.add_dependency(s, ids[lo], ids[hi], mmsb.DATA_DEPENDENCY)
    source = ids[src % n]
    order = affected_order(s, {source})
    assert sorted(order) == sorted(mmsb.find_descendants(s, source))
    pos = {p: i for i, p in enumerate(order)}
    for p, c, _ in s.graph.edges():
        if p in pos and c in pos:
            assert pos[p] < pos[c]


def test_passthrough_of_a_deleted_source_raises_propagation_error() -> None:
    s = new_state()
    a, b, c = (mmsb.create_page(s, 4) for _ in range(3))
    mmsb.add_dependency(s, a.id, c.id, mmsb.DATA_DEPENDENCY)
    mmsb.register_passthrough_recompute(s, c.id, b.id)
    mmsb.delete_page(s, b.id)
    with pytest.raises(mmsb.PropagationError):
        mmsb.update_page(s, a.id, b"\x01\x02\x03\x04")
    assert c.query() == bytes(4)


def test_passthrough_cutoff_stops_at_unchanged_bytes() -> None:
    s = new_state()
    a, b, c = (mmsb.create_page(s, 4) for _ in range(3))
    mmsb.add_dependency(s, a.id, b.id, mmsb.DATA_DEPENDENCY)
    mmsb.add_dependency(s, b.id, c.id, mmsb.DATA_DEPENDENCY)
    mmsb.register_passthrough_recompute(s, b.id, a.id, transform=lambda x: bytes(4))
    calls: list[int] = []

    def fn(st_: mmsb.MMSBState, page: mmsb.Page) -> bytes:
        calls.append(page.id)
        return b"\x09" * 4

    mmsb.register_recompute_fn(s, c.id, fn)
    mmsb.update_page(s, a.id, b"\x01\x02\x03\x04")
    assert b.epoch == 0 and calls == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60), st.binary(min_size=1, max_size=64),
                          st.sampled_from(["bytes", "array", "readonly", "strided", "bytearray"])),
                min_size=1, max_size=40))
def test_writes_of_every_data_type_log_the_same_deltas(writes: list[Any]) -> None:
    # bytes and writable contiguous arrays take the small-write kernel's compiled entries,
    # other inputs its dispatcher: the same state and log either way.
    a, b = new_state(), new_state()
    ids = [p.id for p in mmsb.create_pages(a, 4, 128)]
    mmsb.create_pages(b, 4, 128)
    for k, off, data, form in writes:
        off = min(off, 128 - len(data))
        if form == "bytes":
            given_data: Any = data
        elif form == "bytearray":
            given_data = bytearray(data)
        else:
            if form == "strided":
                given_data = np.repeat(np.frombuffer(data, np.uint8), 2)[::2]
            else:
                given_data = np.frombuffer(data, np.uint8).copy()
                if form == "readonly":
                    given_data.flags.writeable = False
        mmsb.write_page(a, ids[k], off, given_data)
        mmsb.write_page(b, ids[k], off, data)
    assert _pages(a) == _pages(b)
    assert _records(a) == _records(b)
    assert mmsb.verify_state_consistency(a)


def test_hot_objects_keep_to_cpythons_fast_attribute_reads() -> None:
    # CPython 3.11 reads the attributes of an object with at most 29 of them through its
    # fast path (inline values); one more slows every attribute read of the write path.
    s = new_state()
    for obj in (s, s.log, s.table):
        assert len(vars(obj)) <= 29, (type(obj).__name__, sorted(vars(obj)))


_write_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3), st.integers(-2, 130),
              st.binary(min_size=0, max_size=40)),
    st.tuples(st.just("update"), st.integers(0, 3), st.sampled_from([64, 128, 127]),
              st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("source"), st.integers(0, 3), st.sampled_from(["api", "x", "", 5]),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("batch"), st.integers(0, 3), st.booleans(),
              st.binary(min_size=1, max_size=8)),
), max_size=30)


def _apply_write_ops(state: mmsb.MMSBState, ids: list[int], ops: list[Any]) -> list[str]:
    outcomes = []
    for op, k, a, data in ops:
        pid = ids[k]
        try:
            if op == "write":
                mmsb.write_page(state, pid, a, data)
            elif op == "update":
                mmsb.update_page(state, pid, (data * a)[:a])
            elif op == "source":
                mmsb.write_page(state, pid, 3, data, source=a)
            else:
                with mmsb.batch(state):
                    mmsb.write_page(state, pid, 1, data)
                    mmsb.write_page(state, ids[(k + 1) % 4], 9, data)
                    if a:
                        raise KeyError("roll back")
            outcomes.append("ok")
        except (mmsb.MMSBError, KeyError) as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


@settings(max_examples=60, deadline=None)
@given(ops=_write_ops, events=st.booleans())
def test_fused_small_write_path_matches_the_general_path(ops: list[Any], events: bool) -> None:
    # write_page / update_page of small bytes take one fused frame (write_small_bytes);
    # a state where it always declines takes write_bytes. Same outcomes, refusals,
    # events, log, pages and propagation either way.
    states = []
    for fused in (True, False):
        s = new_state()
        if not fused:
            s.write_small_bytes = lambda *a, **k: None  # type: ignore[method-assign]
        ids = [p.id for p in mmsb.create_pages(s, 3, 128)] + [mmsb.create_page(s, 64).id]
        mmsb.add_dependency(s, ids[0], ids[2], mmsb.DATA_DEPENDENCY)
        mmsb.register_passthrough_recompute(s, ids[2], ids[0])
        seen: list[tuple[Any, ...]] = []
        for et in (mmsb.EventType.DELTA_APPLIED, mmsb.EventType.PAGE_CHANGED)[: 2 * events]:
            mmsb.subscribe(s, et, lambda st, t, *data, seen=seen: seen.append((t, data)))
        outcomes = _apply_write_ops(s, ids, ops)
        s._check()
        states.append((s, outcomes, seen))
    (a, out_a, ev_a), (b, out_b, ev_b) = states
    assert out_a == out_b
    assert ev_a == ev_b
    assert _records(a) == _records(b)
    assert _pages(a) == _pages(b)
    assert a.counters.records_logged == b.counters.records_logged
    for name in ("records_logged", "payload_bytes_logged"):
        assert getattr(a.counters, name) == getattr(b.counters, name), name
    assert a.counters.delta_apply.count == b.counters.delta_apply.count
    assert mmsb.verify_state_consistency(a)


@pytest.mark.parametrize("events", [False, True])
def test_fused_small_write_records_its_counters(events: bool) -> None:
    s = new_state()
    p = mmsb.create_page(s, 64)
    mmsb.write_page(s, p.id, 0, b"\x01")  # makes the compiled entries
    if events:
        mmsb.subscribe(s, mmsb.EventType.PAGE_CHANGED, lambda *_: None)
    mmsb.reset_stats(s)
    old = s.counters
    c = s.counters
    t0 = time.perf_counter_ns()
    mmsb.write_page(s, p.id, 8, b"abcd")  # sparse: 4 bytes
    mmsb.write_page(s, p.id, 8, b"abcd")  # nothing changes: nothing counted
    mmsb.update_page(s, p.id, bytes(range(1, 65)))  # dense: the page's 64 bytes
    elapsed = time.perf_counter_ns() - t0
    assert (c.records_logged, c.payload_bytes_logged) == (2, 4 + 64)
    ring = c.delta_apply
    assert ring.count == 2 and ring.pos == 2
    samples = list(ring.samples[:2])
    assert all(0 < ns <= elapsed for ns in samples)
    assert ring.total_ns == sum(samples) and ring.max_ns == max(samples)
    # After a reset the writes count into the new counters only.
    mmsb.reset_stats(s)
    mmsb.write_page(s, p.id, 0, b"\xff")
    assert s.counters is not old and old.records_logged == 2 and old.delta_apply.count == 2
    assert (s.counters.records_logged, s.counters.delta_apply.count) == (1, 1)


def test_fused_small_write_total_latency_stops_at_its_maximum() -> None:
    s = new_state()
    p = mmsb.create_page(s, 64)
    mmsb.write_page(s, p.id, 0, b"\x01")
    ring = s.counters.delta_apply
    ring.total_ns = TOTAL_MAX - 1
    mmsb.write_page(s, p.id, 0, b"\x02")
    assert ring.total_ns == TOTAL_MAX and ring.count == 2


def test_fused_small_writes_fill_log_chunks_and_go_on_in_a_fresh_one() -> None:
    # The write kernel works out the current payload chunk's room itself: writes that
    # fill a chunk must start the next one, and the log must still replay to the state.
    s = new_state(max_tlog_size=100_000)  # no compaction: every chunk stays
    ids = [p.id for p in mmsb.create_pages(s, 4, 4096)]
    rng = np.random.default_rng(11)
    for i in range(9000):  # about 66 payload bytes each: past two 256 KiB chunks
        off = int(rng.integers(0, 4096 - 64))
        page = mmsb.write_page(s, ids[i % 4], off, bytes(rng.integers(1, 256, 64, np.uint8)))
        assert page == mmsb.Page(s, ids[i % 4]) and page.state is s
    assert len(s.log.chunks) > 2
    s._check()
    assert mmsb.verify_state_consistency(s)


def test_fused_write_path_refuses_in_a_closed_state_and_in_a_recompute() -> None:
    s = new_state()
    p, q = mmsb.create_page(s, 8), mmsb.create_page(s, 8)
    mmsb.add_dependency(s, p.id, q.id, mmsb.DATA_DEPENDENCY)

    def sneaky(state: mmsb.MMSBState, page: Any) -> bytes:
        mmsb.write_page(state, p.id, 0, b"z")  # refused: a recompute changes nothing
        return b"\x00" * 8

    mmsb.register_recompute_fn(s, q.id, sneaky)
    with pytest.raises(mmsb.PropagationError):
        mmsb.write_page(s, p.id, 0, b"a")
    assert p.query()[:1] == b"a"
    mmsb.mmsb_stop(s)
    with pytest.raises(mmsb.StateClosedError):
        mmsb.write_page(s, p.id, 0, b"b")
    with pytest.raises(mmsb.StateClosedError):
        mmsb.update_page(s, p.id, b"b" * 8)


def test_a_large_all_changed_bytes_payload_is_kept_by_reference(tmp_path: Any) -> None:
    # A dense update of every byte of a large page from a bytes object keeps that object
    # as its payload (immutable: nothing can change it), where a copy would fault in as
    # much fresh memory; anything mutable is copied. History reads back either way.
    size = 1 << 18
    s = new_state()
    p = mmsb.create_page(s, size)
    rng = np.random.default_rng(7)
    one = (rng.integers(0, 255, size, dtype=np.uint8) + 1).tobytes()  # no zero byte
    two = bytes(255 - b for b in one[:16]) + one[16:]  # 16 bytes differ: sparse
    three = np.frombuffer(one, np.uint8) ^ 0xFF  # all differ again, a mutable array
    mmsb.update_page(s, p.id, one)
    assert any(c is not None and c.obj is one for c in s.log.chunks)
    mmsb.update_page(s, p.id, two)
    mmsb.update_page(s, p.id, three)
    three[:] = 0  # the caller reuses its array: the logged payload was a copy
    assert not any(c is not None and c.obj is three for c in s.log.chunks)
    mmsb.update_page(s, p.id, one)
    assert [mmsb.read_page_at(s, p.id, epoch=e) for e in (1, 2, 3, 4)] == [
        one, two, (np.frombuffer(one, np.uint8) ^ 0xFF).tobytes(), one]
    assert mmsb.verify_state_consistency(s)
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(s, path)
    t = new_state()
    mmsb.load_checkpoint(t, path)
    assert mmsb.read_page_at(t, p.id, epoch=3) == (np.frombuffer(one, np.uint8) ^ 0xFF).tobytes()
    assert t.pages[p.id].query() == one
    mmsb.compress_log(s)
    assert s.pages[p.id].query() == one and mmsb.verify_state_consistency(s)


@pytest.mark.parametrize("events", [False, True])
def test_recomputed_writes_record_their_counters(events: bool) -> None:
    # A propagation pass's write of a recomputed page (an array, through the compiled
    # entry that also counts) records one delta_apply sample, one logged record and
    # its payload bytes, whether the compiled call or after_write records them.
    s = new_state()
    a, b = (p.id for p in mmsb.create_pages(s, 2, 256))
    mmsb.add_dependency(s, a, b, mmsb.DATA_DEPENDENCY)
    mmsb.register_passthrough_recompute(s, b, a)
    mmsb.write_page(s, a, 0, b"\x01")  # makes the compiled entries
    if events:
        mmsb.subscribe(s, mmsb.EventType.PAGE_CHANGED, lambda *_: None)
    mmsb.reset_stats(s)
    c = s.counters
    for i in range(5):
        mmsb.write_page(s, a, 8 * i, bytes([i + 2]) * 4)  # sparse: 4 bytes each
    mmsb.update_page(s, a, bytes(range(256)))  # dense on both pages
    assert c.records_logged == 12
    assert c.delta_apply.count == 12
    assert c.payload_bytes_logged == 2 * (5 * 4 + 256)
    assert mmsb.query_page(s, b) == bytes(range(256))
    assert mmsb.verify_state_consistency(s)
