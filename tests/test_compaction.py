"""Incremental compaction of in-memory logs: each call does a bounded slice of work, and
after every call the state, its masks, its replays and its refusals are exactly those of
a twin state that never compacts."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from mmsb._core import compaction
from mmsb._core.compaction import FoldJob, StateBase
from mmsb._core.engine import MMSBState
from mmsb._history.replay import replay_records_to_lsn, state_differences
from mmsb.errors import HistoryUnavailableError, PageNotFoundError
from test_timetravel import _check_everything, _run, ops

NEVER = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 30)


def cfg(limit: int) -> mmsb.MMSBConfig:
    return mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=limit)


TINY: dict[str, Any] = {
    "STEP_NS": 0, "SLICE_ROWS": 2, "SLICE_PAGES": 1, "SLICE_MASKS": 1,
    # Start at half the limit: room for jobs that span many calls, with other calls
    # (structural changes, batches, compress_log, replays) in between.
    "START_EIGHTHS": 4,
}


@contextlib.contextmanager
def tiny() -> Iterator[None]:
    """Every call does one smallest slice, so a job spans many calls."""
    saved = {name: getattr(compaction, name) for name in TINY}
    for name, value in TINY.items():
        setattr(compaction, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(compaction, name, value)


@pytest.fixture
def tiny_steps() -> Iterator[None]:
    with tiny():
        yield


def _same_now(s: MMSBState, twin: MMSBState) -> None:
    """The live state equals its never-compacting twin, masks and counters included."""
    assert state_differences(s, twin, limit=5) == []
    for pid in twin.table.live_ids().tolist():
        assert np.array_equal(s.page_mask(pid), twin.page_mask(pid)), f"mask of page {pid}"
    assert s.last_lsn == twin.last_lsn
    assert s.next_delta_id == twin.next_delta_id
    assert s.table.next_id == twin.table.next_id
    s._check()


def _same_history(s: MMSBState, twin: MMSBState) -> None:
    """Replays of ``s``'s retained log equal the twin's at every retained LSN; earlier
    LSNs are refused with HistoryUnavailableError and change nothing."""
    horizon = s.log.horizon_lsn
    assert mmsb.verify_state_consistency(s)
    full = replay_records_to_lsn(s, s.last_lsn)
    for pid in s.table.live_ids().tolist():
        assert np.array_equal(full.page_mask(pid), s.page_mask(pid))
    for lsn in range(horizon, s.last_lsn + 1):
        a, b = mmsb.replay_to_lsn(s, lsn), mmsb.replay_to_lsn(twin, lsn)
        assert state_differences(a, b, limit=5) == [], lsn
        for pid in b.table.live_ids().tolist():
            assert np.array_equal(a.page_mask(pid), b.page_mask(pid)), (lsn, pid)
            assert mmsb.read_page_at(s, pid, lsn=lsn) == mmsb.read_page_at(twin, pid, lsn=lsn)
    if horizon:
        before = (s.last_lsn, len(s.log.records), s.log.horizon_lsn)
        with pytest.raises(HistoryUnavailableError):
            mmsb.replay_to_lsn(s, horizon - 1)
        for pid in s.table.live_ids().tolist():
            with pytest.raises(HistoryUnavailableError):
                mmsb.read_page_at(s, pid, lsn=horizon - 1)
        assert (s.last_lsn, len(s.log.records), s.log.horizon_lsn) == before


def _twin_run(s: MMSBState, twin: MMSBState, steps: list[Any], ids_s: list[int],
              ids_t: list[int], every: bool) -> None:
    for step in steps:
        _run(s, [step], ids_s)
        _run(twin, [step], ids_t)
        assert ids_s == ids_t
        if every:
            _same_now(s, twin)


@settings(max_examples=50, deadline=None)
@given(ops, st.integers(1, 24), st.sampled_from([0, 64, 1 << 30]))
def test_compacting_state_equals_its_twin_after_every_call(steps: list[Any], limit: int,
                                                           copy_per_row: int) -> None:
    # copy_per_row 0: the next fold replays the side log's rows; 1 << 30: it copies
    # the pages they changed from the current base.
    saved = compaction.COPY_PER_ROW
    compaction.COPY_PER_ROW = copy_per_row
    try:
        with tiny():
            _twins_after_every_call(steps, limit)
    finally:
        compaction.COPY_PER_ROW = saved


def _twins_after_every_call(steps: list[Any], limit: int) -> None:
    s, twin = MMSBState(cfg(limit)), MMSBState(NEVER)
    ids_s = [p.id for p in mmsb.create_pages(s, 2, 32)]
    ids_t = [p.id for p in mmsb.create_pages(twin, 2, 32)]
    for _ in range(3):
        _twin_run(s, twin, steps, ids_s, ids_t, every=True)
    _same_history(s, twin)


@settings(max_examples=25, deadline=None)
@given(ops, st.integers(1, 16))
def test_history_index_of_a_compacting_state(steps: list[Any], limit: int) -> None:
    with tiny():
        s = MMSBState(cfg(limit))
        ids = [p.id for p in mmsb.create_pages(s, 2, 32)]
        for _ in range(3):
            _run(s, steps, ids)
        _check_everything(s, ids)


@settings(max_examples=15, deadline=None)
@given(ops, ops)
def test_checkpoint_of_a_compacted_state_round_trips(tmp_path_factory: Any, first: list[Any],
                                                     then: list[Any]) -> None:
    s, twin = MMSBState(cfg(4)), MMSBState(NEVER)
    ids_s = [p.id for p in mmsb.create_pages(s, 2, 32)]
    ids_t = [p.id for p in mmsb.create_pages(twin, 2, 32)]
    _twin_run(s, twin, first * 3, ids_s, ids_t, every=False)
    path = tmp_path_factory.mktemp("ck") / "state.ckpt"
    mmsb.checkpoint_log(s, path)
    other = MMSBState(cfg(4))
    mmsb.load_checkpoint(other, path)
    _same_now(other, twin)
    _same_history(other, twin)
    # A loaded base is decoded once by the next compaction; later ones fold on.
    ids_o = list(ids_t)
    _twin_run(other, twin, then * 3, ids_o, ids_t, every=True)
    _same_history(other, twin)


def _writes(s: MMSBState, twin: MMSBState | None, n: int, seed: int, pages: list[int]) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        pid = pages[int(rng.integers(0, len(pages)))]
        off = int(rng.integers(0, 56))
        data = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        mmsb.write_page(s, pid, off, data)
        if twin is not None:
            mmsb.write_page(twin, pid, off, data)


def test_every_call_does_one_slice_and_the_log_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # One slice per call (of at most 64 rows or 1 page's mask): a job over ~2 × 350
    # rows takes ~25 calls, while the log has room for 50 more before it must finish.
    for name, value in {"STEP_NS": 0, "SLICE_ROWS": 64, "SLICE_MASKS": 1}.items():
        monkeypatch.setattr(compaction, name, value)
    limit = 400
    s, twin = MMSBState(cfg(limit)), MMSBState(NEVER)
    pages = [p.id for p in mmsb.create_pages(s, 8, 64)]
    mmsb.create_pages(twin, 8, 64)
    jobs: list[FoldJob] = []
    slices = 0
    real_slice = FoldJob.slice

    def counted(job: FoldJob, state: MMSBState) -> bool:
        nonlocal slices
        slices += 1
        return real_slice(job, state)

    monkeypatch.setattr(FoldJob, "slice", counted)
    for k in range(6000):
        before = slices
        _writes(s, twin, 1, k, pages)
        assert slices - before <= 1, "a call did more than one slice with STEP_NS = 0"
        assert s.log.n <= limit
        if s.compaction is not None and (not jobs or jobs[-1] is not s.compaction):
            jobs.append(s.compaction)
    assert len(jobs) >= 10, "many compactions ran, each over many calls"
    assert isinstance(s.replay_base, StateBase) and s.log.horizon_lsn > 0
    _same_now(s, twin)
    _same_history(s, twin)


def test_a_log_at_its_limit_finishes_the_job_at_once(tiny_steps: None) -> None:
    s, twin = MMSBState(cfg(20)), MMSBState(NEVER)
    pages = [p.id for p in mmsb.create_pages(s, 8, 64)]
    mmsb.create_pages(twin, 8, 64)
    for k in range(400):
        _writes(s, twin, 1, k, pages)
        assert s.log.n <= 20
    _same_now(s, twin)
    _same_history(s, twin)


def test_default_steps_finish_a_job_in_a_few_calls() -> None:
    s = MMSBState(cfg(2000))
    pages = [p.id for p in mmsb.create_pages(s, 64, 64)]
    calls_with_job = 0
    for k in range(6000):
        _writes(s, None, 1, k, pages)
        calls_with_job += s.compaction is not None
    assert s.log.horizon_lsn > 0 and s.log.n <= 2000
    # Each job (at least 5 here) finished within a few dozen calls.
    assert calls_with_job < 6000 // 4
    assert mmsb.verify_state_consistency(s)


def test_explicit_compress_and_load_during_a_job(tiny_steps: None, tmp_path: Any) -> None:
    s, twin = MMSBState(cfg(80)), MMSBState(NEVER)
    pages = [p.id for p in mmsb.create_pages(s, 4, 64)]
    mmsb.create_pages(twin, 4, 64)
    _writes(s, twin, 50, 1, pages)
    assert s.compaction is not None
    mmsb.compress_log(s)
    mmsb.compress_log(twin)
    assert s.compaction is None and s.replay_base is None
    _same_now(s, twin)
    _writes(s, twin, 50, 2, pages)
    _same_now(s, twin)
    assert s.compaction is not None
    _same_history(s, twin)
    path = tmp_path / "twin.ckpt"
    mmsb.checkpoint_log(twin, path)
    mmsb.load_checkpoint(s, path)
    assert s.compaction is None
    _writes(s, twin, 40, 3, pages)
    _same_now(s, twin)
    _same_history(s, twin)


def test_batches_fold_what_they_log(tiny_steps: None) -> None:
    s, twin = MMSBState(cfg(50)), MMSBState(NEVER)
    pages = [p.id for p in mmsb.create_pages(s, 16, 64)]
    mmsb.create_pages(twin, 16, 64)
    rng = np.random.default_rng(5)
    for _ in range(20):
        writes = [(pages[int(rng.integers(0, 16))], int(rng.integers(0, 56)),
                   rng.integers(0, 256, 8, dtype=np.uint8).tobytes()) for _ in range(100)]
        mmsb.apply_batch(s, writes)
        mmsb.apply_batch(twin, writes)
        with mmsb.batch(s):
            for pid, off, data in writes[:30]:
                mmsb.write_page(s, pid, off, data[::-1])
        with mmsb.batch(twin):
            for pid, off, data in writes[:30]:
                mmsb.write_page(twin, pid, off, data[::-1])
        # A batch's end folds at least twice the rows it logged, and no call leaves
        # more than max_tlog_size rows behind.
        assert s.log.n <= 50
    _same_now(s, twin)
    _same_history(s, twin)


def test_a_failed_batch_during_a_job_changes_nothing(tiny_steps: None) -> None:
    s, twin = MMSBState(cfg(80)), MMSBState(NEVER)
    pages = [p.id for p in mmsb.create_pages(s, 4, 64)]
    mmsb.create_pages(twin, 4, 64)
    _writes(s, twin, 50, 7, pages)
    assert s.compaction is not None
    job = s.compaction
    with pytest.raises(PageNotFoundError), mmsb.batch(s):
        mmsb.write_page(s, pages[0], 0, b"zzzz")
        mmsb.write_page(s, 999, 0, b"x")
    assert s.compaction is job
    _same_now(s, twin)
    _writes(s, twin, 25, 8, pages)
    _same_now(s, twin)
    _same_history(s, twin)


def test_a_retired_base_refuses_to_be_read(tiny_steps: None) -> None:
    s = MMSBState(cfg(6))
    pages = [p.id for p in mmsb.create_pages(s, 2, 64)]
    first = None
    for k in range(200):
        _writes(s, None, 1, k, pages)
        if first is None and isinstance(s.replay_base, StateBase):
            first = s.replay_base
    assert first is not None and first is not s.replay_base and first.retired
    with pytest.raises(HistoryUnavailableError):
        first.snapshot()
    with pytest.raises(HistoryUnavailableError):
        first.raw()
    assert mmsb.verify_state_consistency(s)


def test_propagation_and_deletion_under_compaction(tiny_steps: None) -> None:
    def build(config: mmsb.MMSBConfig) -> MMSBState:
        st_ = MMSBState(config)
        a, b, c = (mmsb.create_page(st_, 16).id for _ in range(3))
        mmsb.add_dependency(st_, a, b)
        mmsb.register_passthrough_recompute(st_, b, a)
        mmsb.set_metadata(st_, c, "k", 1)
        return st_

    s, twin = build(cfg(5)), build(NEVER)
    for i in range(60):
        for st_ in (s, twin):
            mmsb.write_page(st_, 1, i % 16, bytes([i + 1]))
            if i == 20:
                mmsb.resize_page(st_, 3, 40)
            if i == 30:
                mmsb.clone_page(st_, 3)
            if i == 40:
                mmsb.delete_page(st_, 3)
        _same_now(s, twin)
    _same_history(s, twin)


def test_a_replay_of_a_compacting_state_compacts_on_its_own(tiny_steps: None) -> None:
    s = MMSBState(cfg(8))
    pages = [p.id for p in mmsb.create_pages(s, 3, 64)]
    _writes(s, None, 50, 9, pages)
    copy = mmsb.replay_to_lsn(s, s.last_lsn)
    twin = mmsb.replay_to_lsn(s, s.last_lsn)
    twin.config = dataclasses.replace(twin.config, max_tlog_size=1 << 30)
    twin.compact_at = 1 << 30
    _writes(copy, twin, 50, 10, pages)
    _same_now(copy, twin)
    assert mmsb.verify_state_consistency(copy)
