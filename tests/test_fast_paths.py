"""The fast paths against the general ones: one-page creation that extends the open
creation run without a record object, and the propagation pass for its common cases.
Each fast path must leave the same state, log and replays as the general path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from conftest import assert_unchanged, new_state, snapshot
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
    st.tuples(st.just("write"), st.integers(0, 40), st.binary(min_size=1, max_size=16)),
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
    fast, general = new_state(page_size_default=64), new_state(page_size_default=64)
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

    # The first creation of a run is appended as a record, the next ones extend the run.
    monkeypatch.setattr(s.log, "append" if first else "extend_creation", fail)
    if first:
        # A run is only continued by creations of its own size.
        monkeypatch.setattr(s.log, "extend_creation", lambda *a: 0)
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


def test_fast_create_reuses_freed_slots_zeroed() -> None:
    s = new_state()
    a = mmsb.create_page(s, 512)
    mmsb.update_page(s, a.id, b"\xff" * 512)
    mmsb.delete_page(s, a.id)
    b = mmsb.create_page(s, 512)
    assert b.query() == bytes(512)
    s._check()
