"""Replay from the log's rows (no Delta objects) against the record-by-record replay
through Delta objects: same pages, bytes, epochs, masks, ids, log and horizon; damaged
rows refused with a typed error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from mmsb._core.delta import Delta
from mmsb._core.engine import MMSBState
from mmsb._history.replay import _origin, replay_into, replay_records_to_lsn
from test_timetravel import CFG, _run, _same_state, ops


def _object_replay(s: MMSBState, lsn: int) -> MMSBState:
    """The replay this module's fast path must equal: each retained record up to
    ``lsn`` built as an object and adopted in turn."""
    with s.lock:
        records = s.log.records[: s.log.index_after_lsn(lsn)]
        origin = _origin(s)
    return replay_into(origin, records)


def _compare_at_every_lsn(s: MMSBState) -> None:
    lo = s.log.horizon_lsn
    for lsn in range(lo, s.last_lsn + 1):
        _same_state(replay_records_to_lsn(s, lsn), _object_replay(s, lsn))
    assert mmsb.verify_state_consistency(s)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_row_replay_equals_object_replay(steps):
    s = MMSBState(CFG)
    ids = [p.id for p in mmsb.create_pages(s, 2, 32)]
    _run(s, steps, ids)
    _compare_at_every_lsn(s)


@settings(max_examples=20, deadline=None)
@given(ops, ops)
def test_row_replay_after_compress_and_load_checkpoint(tmp_path_factory, first, then):
    s = MMSBState(CFG)
    ids = [p.id for p in mmsb.create_pages(s, 2, 32)]
    _run(s, first, ids)
    mmsb.compress_log(s)
    _run(s, then, ids)
    _compare_at_every_lsn(s)
    path = tmp_path_factory.mktemp("ck") / "state.ckpt"
    mmsb.checkpoint_log(s, path)
    other = MMSBState(CFG)
    mmsb.load_checkpoint(other, path)
    _compare_at_every_lsn(other)
    _run(other, then, list(ids))
    _compare_at_every_lsn(other)


def _every_encoding(size: int) -> MMSBState:
    """A state whose log holds rows of every payload encoding, on pages of ``size``."""
    s = MMSBState(CFG)
    pid = mmsb.create_page(s, size).id
    rng = np.random.default_rng(size)
    mask = rng.integers(0, 2, size).astype(bool)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    for k, exact in enumerate((False, True)):
        d = Delta(s.new_delta_id(), pid, 2 * k, 2 * k + 1, "t", size, None, None,
                  data ^ np.uint8(k + 1), mask, exact=exact)
        s.route(d)
        mmsb.write_page(s, pid, size // 3, b"\x07\x08\x09")            # one run
    cur = bytearray(mmsb.query_page(s, pid))
    cur[1] ^= 1
    cur[size - 2] ^= 1
    mmsb.write_page(s, pid, 0, bytes(cur))                              # positions
    cur = np.frombuffer(mmsb.query_page(s, pid), np.uint8)
    mmsb.update_page(s, pid, (cur ^ np.uint8(1)).tobytes())              # dense, all bytes
    return s


@pytest.mark.parametrize("size", [40, 70_000])
def test_every_encoding_replays_as_its_delta_object(size):
    s = _every_encoding(size)
    encs = set(s.log.rows["enc"][: s.log.n].tolist())
    run = 6 if size <= 65536 else 0  # a run's start: u16 on pages of at most 64 KiB
    assert {run, 3, 4, 5} <= encs and encs & {1, 2}, encs
    _compare_at_every_lsn(s)


@pytest.mark.parametrize("damage", ["page", "size", "run", "positions", "dense"])
def test_a_damaged_row_is_refused_typed(damage):
    s = MMSBState(CFG)
    a, b = (p.id for p in mmsb.create_pages(s, 2, 64))
    mmsb.write_page(s, a, 3, b"abc")                          # a run
    mmsb.apply_batch(s, [(b, 1, b"x"), (b, 9, b"y")])         # positions
    mmsb.update_page(s, a, bytes(range(64)))                  # dense
    rows = s.log.rows
    log = s.log
    if damage == "page":
        rows["page"][0] = 99
    elif damage == "size":
        rows["psize"][1] = 65
    else:
        row = {"run": 0, "positions": 1, "dense": 2}[damage]
        chunk = log.chunks[int(rows["poff"][row]) >> 32]
        off = int(rows["poff"][row]) & 0xFFFFFFFF
        if damage == "dense":
            rows["plen"][row] = 63
        else:
            chunk[off:off + 2] = b"\xff\x00"                  # a position past the page
    before = {pid: mmsb.query_page(s, pid) for pid in (a, b)}
    with pytest.raises(mmsb.SerializationError):
        replay_records_to_lsn(s, s.last_lsn)
    assert not mmsb.verify_state_consistency(s)
    assert {pid: mmsb.query_page(s, pid) for pid in (a, b)} == before


def _one_by_one(state: MMSBState, records: list) -> tuple[int, str | None]:
    """Recovery's reference: check, apply and keep each record in turn."""
    for k, rec in enumerate(records):
        why = state.check_record(rec)
        if why is not None:
            return k, why
        state.apply_record(rec)
        state.log.adopt(rec)
    return len(records), None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 30), st.binary(min_size=1, max_size=3),
                          st.sampled_from(["ok"] * 12 + ["base", "size", "page"])),
                min_size=1, max_size=40))
def test_recovery_checks_a_run_of_deltas_as_one_by_one(tmp_path_factory, steps):
    from mmsb._storage.bus import _apply_checked
    from mmsb._storage.wal import SegmentScan

    a, b = MMSBState(CFG), MMSBState(CFG)
    mmsb.create_pages(a, 4, 32)
    b.restore(a.snapshot())
    epochs = {pid: 0 for pid in range(1, 5)}
    records, lsn, ts = [], a.last_lsn, a.log.last_timestamp
    for k, (pid, off, data, fault) in enumerate(steps):
        pid = pid or 99 if fault == "page" else max(pid, 1)
        base = epochs.get(pid, 0) + (1 if fault == "base" else 0)
        size = 33 if fault == "size" else 32
        off = min(off, 32 - len(data))
        idx = np.arange(off, off + len(data))
        lsn += 1
        records.append(Delta(k + 1, pid, base, base + 1, "t", size, idx,
                             np.frombuffer(data, np.uint8).copy(), None, None, lsn=lsn,
                             timestamp=ts + lsn))
        epochs[pid] = base + 1
    path = tmp_path_factory.mktemp("seg") / "wal.log"
    scan = SegmentScan(path, records=list(records), offsets=list(range(len(records))))
    good = _apply_checked(a, scan, path)
    want, why = _one_by_one(b, records)
    assert good == want
    if why is None:
        assert scan.refused is None
    else:
        assert scan.refused is not None and why in str(scan.refused)
        assert scan.refused.offset == want
    _same_state(a, b)
