"""Regressions: calls refused inside a batch, checkpoint failures that must not damage
history, retention of one checkpoint, typed errors for malformed arguments."""

import errno
import os
import threading
from unittest import mock

import numpy as np
import pytest

import mmsb
from conftest import Workers


def _kill(state):
    """Leave a durable bus as a killed process would: no stop, lock released."""
    state.bus._stop.set()
    os.close(state.bus.lock_fd)


@pytest.mark.parametrize("call", ["compress_log", "checkpoint_log", "load_checkpoint",
                                  "mmsb_stop", "verify", "replay_to_lsn"])
def test_whole_log_calls_are_refused_inside_a_batch(tmp_path, call):
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    p = mmsb.create_page(s, 8).id
    ck = tmp_path / "c.mmsbckpt"
    mmsb.checkpoint_log(s, ck)
    calls = {
        "compress_log": lambda: mmsb.compress_log(s),
        "checkpoint_log": lambda: mmsb.checkpoint_log(s, tmp_path / "x"),
        "load_checkpoint": lambda: mmsb.load_checkpoint(s, ck),
        "mmsb_stop": lambda: mmsb.mmsb_stop(s),
        "verify": lambda: mmsb.verify_state_consistency(s),
        "replay_to_lsn": lambda: mmsb.replay_to_lsn(s, 0),
    }
    with pytest.raises(mmsb.InvalidArgumentError):
        with mmsb.batch(s):
            mmsb.write_page(s, p, 0, b"abc")
            calls[call]()
    assert mmsb.query_page(s, p) == bytes(8) and len(s.tlog) == 0 and not s.closed
    assert not (tmp_path / "x").exists()
    assert mmsb.verify_state_consistency(s)


@pytest.mark.parametrize("crash", [False, True])
def test_retaining_one_checkpoint_keeps_replay_working_after_reopen(tmp_path, crash):
    cfg = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=3, retain_checkpoints=1)
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    p = mmsb.create_page(s, 16).id
    for i in range(7):
        mmsb.write_page(s, p, i, b"x")
    expected = mmsb.query_page(s, p)
    _kill(s) if crash else mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    try:
        assert mmsb.query_page(s, p) == expected
        assert mmsb.verify_state_consistency(s)
        assert mmsb.query_page(mmsb.replay_to_lsn(s, s.last_lsn), p) == expected
    finally:
        mmsb.mmsb_stop(s)


def test_a_failed_automatic_checkpoint_keeps_history_whole(tmp_path):
    cfg = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=5, retain_checkpoints=1)
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    p = mmsb.create_page(s, 16).id
    for i in range(12):
        mmsb.write_page(s, p, i, b"a")
    with mock.patch("mmsb._storage.bus.write_checkpoint", side_effect=OSError(errno.ENOSPC, "full")):
        for i in range(8):
            mmsb.write_page(s, p, 8 + i, b"b")
    assert mmsb.verify_state_consistency(s)
    assert mmsb.query_page(mmsb.replay_to_lsn(s, s.last_lsn), p) == b"a" * 8 + b"b" * 8
    mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    assert mmsb.query_page(s, p) == b"a" * 8 + b"b" * 8
    mmsb.mmsb_stop(s)


def test_compress_on_a_bus_whose_checkpoint_fails_changes_nothing(tmp_path):
    cfg = mmsb.MMSBConfig(enable_gpu=False, fsync="always")
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    p = mmsb.create_page(s, 16).id
    for i in range(5):
        mmsb.write_page(s, p, i, b"c")
    before = ([(d.lsn, d.source) for d in s.tlog], s.last_lsn)
    with mock.patch("mmsb._storage.bus.write_checkpoint", side_effect=OSError(errno.ENOSPC, "full")):
        with pytest.raises(mmsb.DurabilityError):
            mmsb.compress_log(s)
    assert ([(d.lsn, d.source) for d in s.tlog], s.last_lsn) == before
    mmsb.write_page(s, p, 10, b"z")
    expected, lsn = mmsb.query_page(s, p), s.last_lsn
    _kill(s)
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    try:
        assert (mmsb.query_page(s, p), s.last_lsn) == (expected, lsn)
        assert mmsb.verify_state_consistency(s)
    finally:
        mmsb.mmsb_stop(s)


def test_load_checkpoint_into_a_bus_whose_checkpoint_fails_changes_nothing(tmp_path):
    other = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    mmsb.update_page(other, mmsb.create_page(other, 4).id, b"load")
    ck = tmp_path / "other.mmsbckpt"
    mmsb.checkpoint_log(other, ck)
    s = mmsb.mmsb_start(path=tmp_path / "bus", config=mmsb.MMSBConfig(enable_gpu=False))
    p = mmsb.create_page(s, 8).id
    mmsb.write_page(s, p, 0, b"mine")
    with mock.patch("mmsb._storage.bus.write_checkpoint", side_effect=OSError(errno.ENOSPC, "full")):
        with pytest.raises(mmsb.DurabilityError):
            mmsb.load_checkpoint(s, ck)
    assert mmsb.query_page(s, p) == b"mine\x00\x00\x00\x00"
    assert mmsb.verify_state_consistency(s)
    mmsb.mmsb_stop(s)


def test_incremental_replay_defers_propagation_to_the_end():
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    a, b = mmsb.create_page(s, 4).id, mmsb.create_page(s, 4).id
    mmsb.add_dependency(s, a, b)
    mmsb.register_passthrough_recompute(s, b, a)
    da = mmsb.create_delta(s, a, np.ones(4, bool), b"abcd")
    db = mmsb.create_delta(s, b, np.ones(4, bool), b"wxyz")
    mmsb.incremental_replay(s, [da, db])
    assert mmsb.query_page(s, a) == b"abcd" and mmsb.query_page(s, b) == b"abcd"
    assert mmsb.verify_state_consistency(s)


@pytest.mark.parametrize("source", ["\udc80", "x" * 70_000, 5], ids=["surrogate", "too-long", "int"])
def test_sources_that_cannot_be_stored_are_refused(source):
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    p = mmsb.create_page(s, 8).id
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.write_page(s, p, 0, b"a", source=source)
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.create_delta(s, p, np.ones(8, bool), bytes(8), source)
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.apply_batch(s, [(p, 0, b"a")], source=source)
    assert len(s.tlog) == 0 and mmsb.query_page(s, p) == bytes(8)


def test_compute_diff_in_both_directions_at_once_does_not_deadlock():
    a = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    b = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    for st in (a, b):
        mmsb.create_pages(st, 4, 64)
    mmsb.update_page(b, 1, bytes(range(64)))
    stop = threading.Event()

    def loop(x, y):
        while not stop.is_set():
            mmsb.compute_diff(x, y)

    workers = Workers(loop, [(a, b), (b, a)])
    threading.Event().wait(0.5)
    stop.set()
    workers.join(timeout=5)  # fails on a deadlock and on any exception in a loop


def test_malformed_arguments_get_typed_errors():
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    p = mmsb.create_page(s, 8).id
    calls = [
        lambda: mmsb.propagate_change(s, 1.5),
        lambda: mmsb.propagate_change(s, None),
        lambda: mmsb.query_log(s, page_id=[1]),
        lambda: mmsb.get_deltas_for_page(s, [1]),
        lambda: mmsb.replay_page_history(s, [1]),
        lambda: mmsb.write_page(s, p, 0, np.array([object()])),
        lambda: mmsb.apply_batch(s, 5),
        lambda: mmsb.incremental_replay(s, 5),
        lambda: mmsb.load_checkpoint(s, None),
        lambda: mmsb.compute_diff(s, 5),
        lambda: mmsb.verify_state_consistency(5),
        lambda: mmsb.replay_with_predicate(s, 5),
        lambda: mmsb.track_delta_latency(s, float("nan")),
        lambda: mmsb.track_delta_latency(s, float("inf")),
    ]
    for call in calls:
        with pytest.raises(mmsb.MMSBError):
            call()
    assert len(s.tlog) == 0 and mmsb.query_page(s, p) == bytes(8)


def test_events_of_a_handlers_own_write_follow_the_current_burst():
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    a, b = mmsb.create_page(s, 4).id, mmsb.create_page(s, 4).id
    seen = []

    def handler(st, et, pid, epoch, delta_id):
        seen.append((et.name, pid))
        if pid == a and et is mmsb.EventType.DELTA_APPLIED:
            mmsb.write_page(st, b, 0, b"b")

    mmsb.subscribe(s, mmsb.EventType.DELTA_APPLIED, lambda st, et, pid, e, d, lsn: handler(st, et, pid, e, d))
    mmsb.subscribe(s, mmsb.EventType.PAGE_CHANGED, handler)
    mmsb.write_page(s, a, 0, b"a")
    assert seen == [("DELTA_APPLIED", a), ("PAGE_CHANGED", a), ("DELTA_APPLIED", b), ("PAGE_CHANGED", b)]
