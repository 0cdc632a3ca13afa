"""create_page's creation cursor: the one-frame creation that continues the open
creation run from what ``create_one`` worked out (see ``CreationCursor``) must leave
the state, the log, the counters, the arena and the events exactly as creation through
the general path, whatever comes between two creations."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from conftest import new_state, run_workers
from mmsb._core.arena import CHUNK_SHIFT, CHUNK_SIZE
from mmsb._core.records import PageCreate


class _Abort(Exception):
    """Raised inside a batch to roll it back."""


def _records(state: mmsb.MMSBState) -> list[tuple[Any, ...]]:
    """The log's records without their timestamps (two states never share a clock)."""
    out = []
    for rec in state.log.records:
        if isinstance(rec, mmsb.Delta):
            out.append(("delta", rec.lsn, rec.page_id, rec.epoch, bytes(rec.values)))
        else:
            fields = {k: getattr(rec, k) for k in rec.__slots__ if k != "timestamp"}
            out.append((type(rec).__name__, rec.lsn, sorted(fields.items(), key=str)))
    return out


def _pages(state: mmsb.MMSBState) -> list[tuple[int, int, int, bytes, dict[str, Any]]]:
    return [(pid, p.size, p.epoch, p.query(), dict(p.metadata)) for pid, p in state.pages.items()]


def _counts(state: mmsb.MMSBState) -> tuple[int, ...]:
    """The engine's counters, read straight from its objects after a settle (what the
    readers of counters do: get_stats, len(state.pages), repr, _check), without
    entering the state."""
    state.settle()
    a = state.arena
    return (state.table.next_id, state.table.live_count, state.log.next_lsn,
            state.log.record_count, state.counters.records_logged, a.bytes_in_use,
            a.bytes_free_listed, len(state.pages))


_SIZES = st.sampled_from([None, 64, 64, 64, 16, 100])
_OPS = {
    "create": st.tuples(st.just("create"), _SIZES, st.none()),
    # A creation with metadata takes one id and one LSN, as a creation by the cursor
    # does.
    "apart": st.tuples(st.just("create"), _SIZES, st.just({"k": 1})),
    "bulk": st.tuples(st.just("bulk"), st.integers(1, 3), st.none()),
    "clone": st.tuples(st.just("clone"), st.integers(0, 40), st.none()),
    # A one-frame write takes an LSN without entering the state.
    "write": st.tuples(st.just("write"), st.integers(0, 40), st.binary(min_size=1, max_size=16)),
    "read": st.tuples(st.just("read"), st.integers(0, 40), st.none()),
    "delete": st.tuples(st.just("delete"), st.integers(0, 40), st.none()),
    "meta": st.tuples(st.just("meta"), st.integers(0, 40), st.none()),
    "resize": st.tuples(st.just("resize"), st.integers(0, 40), st.none()),
    "batch": st.tuples(st.just("batch"), st.integers(0, 40), st.booleans()),
}
# Creations are half the calls, so that runs of them, broken by every other kind of
# call, are common (a kind is drawn uniformly from this list).
_KINDS = ["create"] * 7 + ["apart"] * 2 + ["write"] * 3 + [
    "bulk", "clone", "read", "delete", "meta", "resize", "batch"]
_ops = st.lists(st.sampled_from(_KINDS).flatmap(_OPS.__getitem__), min_size=2, max_size=40)


def _run(state: mmsb.MMSBState, ops: list[tuple[str, Any, Any]], seen: list[int],
         general: bool) -> None:
    """Run ``ops``; with ``general``, every single creation takes the engine's general
    path (``MMSBState.create``: entered, a record appended), never the cursor."""
    for op, a, b in ops:
        if op == "create":
            if general:
                seen.append(state.create(1, a, "cpu", b))
            else:
                seen.append(mmsb.create_page(state, a, metadata=b).id)
            continue
        if op == "bulk":
            seen.extend(p.id for p in mmsb.create_pages(state, a, 64))
            continue
        live = list(state.pages)
        if not live:
            continue
        pid = live[a % len(live)]
        if op == "clone":
            seen.append(mmsb.clone_page(state, pid).id)
        elif op == "write":
            mmsb.write_page(state, pid, 0, b[:state.pages[pid].size])
        elif op == "read":
            mmsb.query_page(state, pid)
            mmsb.get_stats(state)
        elif op == "delete":
            mmsb.delete_page(state, pid)
        elif op == "meta":
            mmsb.set_metadata(state, pid, "m", 1)
        elif op == "resize":
            mmsb.resize_page(state, pid, 32)
        elif op == "batch":
            # A batch holds writes only: a creation inside it is refused (and changes
            # nothing); a failed batch is rolled back.
            try:
                with mmsb.batch(state):
                    mmsb.write_page(state, pid, 0, b"\x07")
                    with pytest.raises(mmsb.InvalidArgumentError):
                        mmsb.create_page(state, 64)
                    mmsb.write_page(state, pid, 0, b"\x08")
                    if not b:
                        raise _Abort
            except _Abort:
                pass


@settings(max_examples=150, deadline=None)
@given(ops=_ops)
def test_cursor_creation_leaves_what_the_general_path_leaves(
        ops: list[tuple[str, Any, Any]]) -> None:
    fast, general = new_state(page_size_default=64), new_state(page_size_default=64)
    events: dict[str, list[int]] = {"fast": [], "general": []}
    for name, s in (("fast", fast), ("general", general)):
        mmsb.subscribe(s, mmsb.EventType.PAGE_CREATED,
                       lambda _st, _et, pid, out=events[name]: out.append(pid))
    ids_fast: list[int] = []
    ids_general: list[int] = []
    # Two creations first: the first one of a state takes the general path (no arena
    # chunk yet), the second makes the cursor.
    ops = [("create", 64, None), ("create", 64, None), *ops]
    _run(fast, ops, ids_fast, False)
    _run(general, ops, ids_general, True)
    # Counters first, read from the objects after a settle, before any other call.
    assert _counts(fast) == _counts(general)
    assert ids_fast == ids_general
    assert events["fast"] == events["general"]
    fast._check()
    general._check()
    assert _records(fast) == _records(general)
    assert _pages(fast) == _pages(general)
    stamps = [r.timestamp for r in fast.log.records]
    assert stamps == sorted(stamps)
    replayed = mmsb.replay_to_lsn(fast, fast.last_lsn)
    assert _pages(replayed) == _pages(fast)


def _has_cursor(state: mmsb.MMSBState) -> bool:
    return state.table.creating is not None


def test_a_page_created_apart_between_two_cursor_creations_keeps_the_log_in_order() -> None:
    # A creation with metadata or a clone takes one id and one LSN, as the cursor's
    # creation does: the call enters the state, which drops the cursor, so the next
    # creation opens a new run instead of extending the old one out of order.
    s = new_state()
    a = [mmsb.create_page(s, 64).id for _ in range(3)]
    assert _has_cursor(s)
    b = mmsb.create_page(s, 64, metadata={"k": 1}).id
    assert not _has_cursor(s)
    c = [mmsb.create_page(s, 64).id for _ in range(2)]
    d = mmsb.clone_page(s, c[0]).id
    e = mmsb.create_page(s, 64).id
    assert a + [b] + c + [d, e] == list(range(1, 9))
    recs = list(s.log.records)
    assert [r.lsn for r in recs] == list(range(1, 9))
    assert [type(r).__name__ for r in recs] == ["PageCreate"] * 6 + ["PageClone", "PageCreate"]
    assert [r.first_id for r in recs if isinstance(r, PageCreate)] == a + [b] + c + [e]
    assert len(s.log.structs) == 5  # run of 3, the one with metadata, run of 2, clone, run
    s._check()
    replayed = mmsb.replay_to_lsn(s, s.last_lsn)
    assert {p: replayed.pages[p].size for p in replayed.pages} == {p: 64 for p in range(1, 9)}


def test_a_write_between_creations_ends_the_run() -> None:
    # The one-frame write does not enter the state; its LSN breaks the cursor's gap.
    s = new_state()
    first = [mmsb.create_page(s, 64).id for _ in range(3)]
    mmsb.write_page(s, first[0], 0, b"abc")
    assert _has_cursor(s)  # still there, but no longer valid
    nxt = [mmsb.create_page(s, 64).id for _ in range(3)]
    assert nxt == [4, 5, 6]
    runs = s.log.structs
    assert len(runs) == 2 and runs[1].lsn == 5 and runs[1].first_id == 4
    assert [r.lsn for r in s.log.records] == list(range(1, 8))
    s._check()


def test_reads_keep_the_cursor_and_calls_that_enter_drop_it() -> None:
    s = new_state()
    p = mmsb.create_page(s, 64)
    mmsb.create_page(s, 64)
    assert _has_cursor(s)
    # Reads do not enter: handles, the page map, the table, query_page, get_stats.
    assert (p.size, len(s.pages), s.table.live_count) == (64, 2, 2)
    assert mmsb.query_page(s, p.id) == bytes(64)
    assert mmsb.get_stats(s).total_pages == 2
    assert _has_cursor(s)
    with mmsb.batch(s):  # enters, logs nothing
        pass
    assert not _has_cursor(s)
    mmsb.create_page(s, 64)
    assert _has_cursor(s)
    assert len(s.log.structs) == 1  # the run goes on through create_one
    s._check()


def test_memory_error_in_the_cursor_path_changes_nothing() -> None:
    s = new_state()
    mmsb.create_page(s, 128)
    mmsb.create_page(s, 128)
    cur = s.table.creating
    assert cur is not None
    run = s.log.structs[-1]

    class _NoRoom(list):  # stands for the run's offsets array, out of memory
        def append(self, _value: Any) -> None:
            raise MemoryError

    real = run.offsets
    run.offsets = cur.offsets = _NoRoom(real)  # type: ignore[assignment]
    before = _counts(s)
    row = bytes(s.table.addr[3:4]) + bytes(s.table.size[3:4]) + bytes(s.table.flags[3:4])
    with pytest.raises(MemoryError):
        mmsb.create_page(s, 128)
    assert _counts(s) == before
    assert bytes(s.table.addr[3:4]) + bytes(s.table.size[3:4]) + bytes(s.table.flags[3:4]) == row
    assert s.lock.acquire(blocking=False)  # the lock was given back
    s.lock.release()
    run.offsets = cur.offsets = real
    s._check()
    assert mmsb.create_page(s, 128).id == 3
    assert [r.lsn for r in s.log.records] == [1, 2, 3]
    s._check()


def test_logging_turned_off_between_creations_takes_the_general_path() -> None:
    # The general path sees logging off: the log retains nothing from then on (the
    # LSNs go on). The cursor must not extend the run meanwhile.
    s = new_state()
    mmsb.create_page(s, 64)
    mmsb.create_page(s, 64)
    assert _has_cursor(s)
    s.config.enable_logging = False
    p = mmsb.create_page(s, 64)
    assert p.id == 3
    assert (s.log.record_count, len(s.log.structs), s.last_lsn) == (0, 0, 3)
    mmsb.create_page(s, 64)
    assert (s.log.record_count, s.last_lsn, s.table.live_count) == (0, 4, 4)
    s._check()


def test_closed_state_refuses_even_with_a_cursor() -> None:
    s = new_state()
    mmsb.create_page(s, 64)
    mmsb.create_page(s, 64)
    assert _has_cursor(s)
    mmsb.mmsb_stop(s)
    assert not _has_cursor(s)
    with pytest.raises(mmsb.StateClosedError):
        mmsb.create_page(s, 64)


def test_other_sizes_and_non_ints_take_the_general_path() -> None:
    s = new_state()
    mmsb.create_page(s, 64)
    mmsb.create_page(s, 64)
    before = _counts(s)
    for bad in (64.0, True, "64", -64):
        with pytest.raises((mmsb.InvalidArgumentError, TypeError)):
            mmsb.create_page(s, bad)  # type: ignore[arg-type]
        assert _counts(s) == before
    # A numpy int goes through the general path; an equal int that is another object
    # is the run's size all the same.
    assert mmsb.create_page(s, np.int64(64)).size == 64
    size = int("64")
    assert mmsb.create_page(s, size).size == 64
    assert len(s.log.structs) == 1
    assert mmsb.create_page(s, 32).size == 32
    assert len(s.log.structs) == 2
    s._check()


def test_creations_across_table_growth_and_arena_chunks() -> None:
    # 1 MiB slots: 64 to a chunk, so 150 creations cross two chunk ends and the table
    # grows past its first 64 rows; the cursor stops at each and create_one goes on.
    s = new_state()
    size = 1 << 20
    pages = [mmsb.create_page(s, size) for _ in range(150)]
    assert [p.id for p in pages] == list(range(1, 151))
    addrs = s.table.addr[1:151]
    assert len(set(addrs.tolist())) == 150
    offs = addrs & (CHUNK_SIZE - 1)
    assert bool((offs + size <= CHUNK_SIZE).all())
    assert len(set((addrs >> CHUNK_SHIFT).tolist())) == 3
    mmsb.write_page(s, 150, size - 3, b"end")
    assert mmsb.query_page(s, 149) == bytes(size)
    assert len(s.log.structs) == 1
    s._check()


def test_threads_creating_and_changing_the_state_at_once() -> None:
    s = new_state()
    base = mmsb.create_page(s, 64).id
    made: list[list[int]] = [[] for _ in range(3)]
    start = threading.Barrier(4)

    def creator(k: int) -> None:
        start.wait()
        for _ in range(1500):
            made[k].append(mmsb.create_page(s, 64).id)

    def other(_: int) -> None:
        start.wait()
        for i in range(300):
            mmsb.create_page(s, 64, metadata={"i": i})
            mmsb.write_page(s, base, 0, bytes([i % 250 + 1]))
            mmsb.get_stats(s)

    run_workers(lambda k: creator(k) if k < 3 else other(k), [(k,) for k in range(4)])
    ids = [i for m in made for i in m]
    assert len(set(ids)) == len(ids) == 4500
    for m in made:
        assert m == sorted(m)
    # (The count as readers see it: creations the cursor made last, when a creator
    # finished after the other thread's last call, are counted by the read.)
    assert len(s.pages) == s.table.live_count == 1 + 4500 + 300
    s._check()
    recs = [r for r in s.log.records if isinstance(r, PageCreate)]
    assert [r.first_id for r in recs] == list(range(1, 4802))
    lsns = [r.lsn for r in s.log.records]
    assert lsns == list(range(1, len(lsns) + 1))
    replayed = mmsb.replay_to_lsn(s, s.last_lsn)
    assert len(replayed.pages) == len(s.pages)


def test_the_arena_and_live_counts_are_brought_up_to_date_before_any_reader() -> None:
    s = new_state()
    mmsb.create_page(s, 64)
    mmsb.create_page(s, 64)  # makes the cursor; counted
    a, t = s.arena, s.table
    in_use, live = a.bytes_in_use, t.live_count
    for _ in range(5):
        mmsb.create_page(s, 64)
    # The cursor's five creations are not in the arena's and the table's counts yet...
    assert (a.bytes_in_use, t.live_count) == (in_use, live)
    # ...and every reader counts them first.
    assert len(s.pages) == 7
    assert (a.bytes_in_use, t.live_count) == (in_use + 5 * 64, 7)
    for _ in range(3):
        mmsb.create_page(s, 64)
    assert mmsb.get_stats(s).total_pages == 10
    assert mmsb.get_stats(s).arena_bytes_in_use == 10 * 64
    mmsb.create_page(s, 64)
    assert "pages=11" in repr(s)
    mmsb.create_page(s, 64)
    s._check()
    assert t.live_count == 12
    # A call that enters counts them too, before it uses the arena: the slot of a page
    # created apart follows the cursor's last one.
    mmsb.create_page(s, 64)
    q = mmsb.create_page(s, 64, metadata={"k": 1})
    assert int(t.addr[q.id]) == int(t.addr[q.id - 1]) + 64
    assert (a.bytes_in_use, t.live_count) == (14 * 64, 14)
    s._check()


def test_a_creation_that_makes_no_cursor_drops_the_one_there() -> None:
    # Past 256 sizes the arena caches no more size classes, and create_one makes no
    # cursor for such a size; the creation takes one id and one LSN, as the cursor's
    # do, so the cursor of the run before must not outlive it.
    s = new_state()
    for size in range(1, 301):
        mmsb.create_page(s, size)
    classes = s.arena._classes
    assert len(classes) == 256 and 32 in classes and 5000 not in classes
    a = [mmsb.create_page(s, 32).id for _ in range(3)]
    assert _has_cursor(s)
    odd = [mmsb.create_page(s, 5000).id for _ in range(2)]
    assert not _has_cursor(s)
    b = [mmsb.create_page(s, 32).id for _ in range(3)]
    assert a + odd + b == list(range(301, 309))
    recs = [r for r in s.log.records if r.first_id > 300]
    assert [(r.first_id, r.size) for r in recs] == [
        (pid, 32) for pid in a] + [(pid, 5000) for pid in odd] + [(pid, 32) for pid in b]
    assert [r.lsn for r in s.log.records] == list(range(1, 309))
    s._check()


def test_a_cursor_is_made_when_a_run_is_continued_not_when_it_is_opened() -> None:
    s = new_state()
    mmsb.create_page(s, 64)
    for size in (32, 64, 32, 64):
        mmsb.create_page(s, size)  # each opens a run
        assert not _has_cursor(s)
    mmsb.create_page(s, 64)  # continues the last one
    assert _has_cursor(s)
    assert len(s.log.structs) == 5
    s._check()
