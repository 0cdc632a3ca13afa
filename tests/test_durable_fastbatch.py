"""The durable bus's compiled batch (``_storage/fastbatch.py``: writes staged, then one
frame written and published in one call) against the general batch path it stands in
for: the same segment bytes, pages, epochs, log, events, mapped pages and refusals,
after batches of any mix of writes, other records, failures and rollbacks."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmsb
from test_durable_fastwrite import _fail_append, _fail_sync, _frames_only, _observe

_SIZES = (64, 4096, 70_000, 300_000)


@pytest.fixture(scope="module")
def base_bus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bus with pages of four sizes (small, 4 KiB, past 64 KiB, past the log's
    large-payload limit), stopped: each run opens a copy."""
    path = tmp_path_factory.mktemp("fastbatch") / "base"
    s = mmsb.mmsb_start(path=path, enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="none", checkpoint_interval=0))
    for size in _SIZES:
        mmsb.create_page(s, size)
    mmsb.mmsb_stop(s)
    return path


def _open(base: Path, dst: Path, fast: bool,
          fsync: str = "batch") -> tuple[mmsb.MMSBState, list[int]]:
    shutil.copytree(base, dst)
    s = mmsb.mmsb_start(path=dst, enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync=fsync, checkpoint_interval=0,
                                               segment_bytes=64 << 10))
    committed = [0]
    bus = s.bus
    assert bus is not None
    mmsb.write_page(s, sorted(s.pages)[0], 0, b"\xff")  # opens the segment
    if fast:
        real = bus.commit_staged

        def counted(*args: Any) -> bool:
            try:
                out = real(*args)
            except mmsb.MMSBError:
                committed[0] += 1
                raise
            committed[0] += out
            return out

        bus.commit_staged = counted  # type: ignore[method-assign]
    else:
        bus.stage_write = lambda *args: None  # type: ignore[method-assign]
    return s, committed


class _Abort(Exception):
    pass


_write = st.tuples(st.sampled_from(["write", "grow", "same", "dense", "source", "meta",
                                    "bad", "nested", "apply", "direct", "direct_bad"]),
                   st.integers(0, 3), st.integers(0, 70_000),
                   st.binary(min_size=1, max_size=300))
_ops = st.lists(st.tuples(st.lists(_write, min_size=1, max_size=6),
                          st.sampled_from(["commit", "commit", "commit", "abort"])),
                min_size=1, max_size=12)


def _one(s: mmsb.MMSBState, pid: int, size: int, op: str, a: int, data: bytes) -> None:
    if op == "write":
        mmsb.write_page(s, pid, a % (size - len(data) + 1) if len(data) <= size else 0,
                        data[:size])
    elif op == "grow":
        # A growing value whose head changes: two runs far apart.
        cur = mmsb.query_page(s, pid)
        n = min(size - 8, 16 + a % max(1, size // 2))
        head = (n & 0xFFFF).to_bytes(2, "little")
        mmsb.write_page(s, pid, 0, head + bytes(cur[2:n]) + data[:8])
    elif op == "same":
        mmsb.write_page(s, pid, 0, bytes(mmsb.query_page(s, pid)[:min(size, 500)]))
    elif op == "dense":
        mmsb.write_page(s, pid, 0, (data * size)[:size])
    elif op == "source":
        mmsb.write_page(s, pid, 0, data[:min(size, 16)], source=f"src-{a % 3}")
    elif op == "meta":
        mmsb.update_metadata(s, pid, {"k": a})
    elif op == "bad":
        mmsb.write_page(s, pid, size, data)  # runs outside the page: refused
    elif op == "direct":
        # MMSBState.batch_write, the saver's entry (the batch's caller has entered).
        s.batch_write(pid, a % (size - len(data) + 1) if len(data) <= size else 0, data[:size],
                      "api")
    elif op == "direct_bad":
        s.batch_write(pid, size - 1, data + b"!", "api")  # runs outside the page: refused
    elif op == "nested":
        with mmsb.batch(s):
            mmsb.write_page(s, pid, a % (size - 4), data[:4])
    else:
        mmsb.apply_batch(s, [(pid, (a + 3 * i) % (size - 1), data[:1]) for i in range(17)])


def _run(s: mmsb.MMSBState, ops: list[Any]) -> tuple[list[str], list[Any]]:
    ids = sorted(s.pages)
    events: list[Any] = []
    outcomes = []
    for writes, end in ops:
        try:
            with mmsb.batch(s):
                for op, k, a, data in writes:
                    _one(s, ids[k], _SIZES[k], op, a, data)
                if end == "abort":
                    raise _Abort
            outcomes.append("ok")
        except _Abort:
            outcomes.append("aborted")
        except mmsb.MMSBError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        if any(op == "meta" for op, *_ in writes) and not events:
            # Events from here on (the staged path leaves such writes to the general one).
            for et in (mmsb.EventType.DELTA_APPLIED, mmsb.EventType.PAGE_CHANGED):
                mmsb.subscribe(s, et, lambda _st, t, *data: events.append((t, data)))
    return outcomes, events


def _compare(base: Path, where: Path, ops: list[Any], fsync: str = "batch") -> int:
    runs = []
    for fast in (True, False):
        s, committed = _open(base, where / str(fast), fast, fsync)
        try:
            outcomes, events = _run(s, ops)
            seen = _observe(s, where / str(fast))
        finally:
            mmsb.mmsb_stop(s)
        reopened = mmsb.open_readonly(where / str(fast))
        seen["reopened"] = {pid: (reopened.pages[pid].epoch, mmsb.query_page(reopened, pid))
                            for pid in sorted(reopened.pages)}
        runs.append((outcomes, events, seen, committed[0]))
    (fo, fe, fs, committed), (go, ge, gs, _) = runs
    assert fo == go
    assert fe == ge
    assert fs == gs
    assert fs["reopened"] == fs["pages"]
    return committed


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_staged_and_general_batches_write_the_same_bytes(ops: list[Any], base_bus: Path,
                                                         tmp_path: Path, clock: None) -> None:
    _compare(base_bus, tmp_path / f"r{time.perf_counter_ns()}", ops)


def test_a_growing_value_and_its_record_take_the_staged_path(base_bus: Path, tmp_path: Path,
                                                              clock: None) -> None:
    # The shape of a LangGraph put: a value that grows (its head changes too) and a
    # record appended to a journal, in one batch, many times over (segments roll,
    # the space written ahead is extended, log chunks fill).
    ops = [([("grow", 2, 40 * i, bytes([i % 251]) * 8), ("write", 3, 1000 * i,
                                                        bytes([i % 7 + 1]) * 300)], "commit")
           for i in range(300)]
    committed = _compare(base_bus, tmp_path, ops, fsync="always")
    assert committed >= 250, "the staged commit rarely ran"


def test_holding_another_record_makes_the_staged_writes_held_records(
        base_bus: Path, tmp_path: Path, clock: None) -> None:
    ops = [([("write", 1, 7, b"kl"), ("dense", 0, 0, b"\x05"), ("write", 2, 4, b"m")],
            "commit"),
           ([("write", 1, 7, b"no"), ("apply", 2, 11, b"p")], "commit"),
           ([("write", 1, 70, b"qr"), ("write", 3, 70, b"st")], "abort"),
           ([("write", 1, 80, b"uv"), ("bad", 2, 0, b"w")], "commit"),
           ([("write", 2, 90, b"xy"), ("nested", 3, 5, b"z123")], "commit"),
           ([("direct", 1, 90, b"xy"), ("direct_bad", 3, 5, b"z123")], "commit"),
           ([("direct", 1, 93, b"xyz"), ("direct", 2, 5, b"z123")], "commit"),
           ([("write", 1, 5, b"abc"), ("write", 2, 9, b"defg"), ("meta", 1, 3, b"x"),
             ("write", 1, 50, b"hij")], "commit"),
           ([("write", 1, 9, b"after")], "commit")]
    assert _compare(base_bus, tmp_path, ops) >= 1


def _without(seen: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in seen.items() if k not in keys}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux file-size limit")
@pytest.mark.parametrize("fsync,fail,goes_on", [("batch", _fail_append, True),
                                                ("always", _fail_append, True),
                                                ("always", _fail_sync, False)])
def test_a_failed_staged_frame_changes_nothing_as_on_the_general_path(
        base_bus: Path, tmp_path: Path, clock: None, fsync: str,
        fail: Callable[[mmsb.MMSBState], Callable[[], None]], goes_on: bool) -> None:
    results = []
    for fast in (True, False):
        s, committed = _open(base_bus, tmp_path / str(fast), fast, fsync)
        ids = sorted(s.pages)
        try:
            with mmsb.batch(s):
                mmsb.write_page(s, ids[1], 0, b"\x01\x02")
                mmsb.write_page(s, ids[2], 10, b"\x03")
            before = _observe(s, tmp_path / str(fast))
            reader = mmsb.attach(tmp_path / str(fast))
            undo = fail(s)
            try:
                with pytest.raises(mmsb.DurabilityError) as info, mmsb.batch(s):
                    mmsb.write_page(s, ids[1], 100, b"\x09" * 9)
                    mmsb.write_page(s, ids[2], 60_000, b"\x08" * 5)
            finally:
                undo()
            after = _observe(s, tmp_path / str(fast))
            # The counters count a batch's writes as they are made, kept or not (on
            # both paths alike: compared below).
            counted = ("logged", "payload", "samples")
            if goes_on:
                assert _frames_only(_without(after, counted)) == \
                    _frames_only(_without(before, counted))
            else:
                assert _without(after, ("segments", *counted)) == \
                    _without(before, ("segments", *counted))
            assert reader.read_page(ids[1])[100:109] == bytes(9)
            assert reader.read_page(ids[2])[60_000:60_005] == bytes(5)
            reader.close()
            try:
                mmsb.write_page(s, ids[1], 200, b"\x03")
                went_on = True
            except mmsb.DurabilityError:
                went_on = False
            results.append((str(info.value), went_on, after, committed[0]))
        finally:
            try:
                mmsb.mmsb_stop(s)
            except mmsb.DurabilityError:
                pass
    (fmsg, fon, fafter, fcommitted), (gmsg, gon, gafter, _) = results
    assert fmsg.replace("/True", "/X") == gmsg.replace("/False", "/X")
    assert fon == gon == goes_on
    assert _without(fafter, ("segments",)) == _without(gafter, ("segments",))
    assert fcommitted == 2  # the first batch and the failed one took the staged commit


def test_staged_writes_keep_their_positions_when_the_log_grows(tmp_path: Path) -> None:
    # Many staged writes in one batch: the log's rows array and chunks grow under them.
    s = mmsb.mmsb_start(path=tmp_path / "b", enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="none", checkpoint_interval=0))
    try:
        pid = mmsb.create_page(s, 1 << 20).id
        rng = np.random.default_rng(5)
        want = bytearray(1 << 20)
        with mmsb.batch(s):
            for _i in range(3000):
                at = int(rng.integers(0, (1 << 20) - 200))
                data = bytes(rng.integers(1, 256, 150, dtype=np.uint8))
                want[at:at + 150] = data
                mmsb.write_page(s, pid, at, data)
        assert mmsb.query_page(s, pid) == bytes(want)
        assert mmsb.verify_state_consistency(s)
        replayed = mmsb.replay_to_lsn(s, s.last_lsn)
        assert mmsb.query_page(replayed, pid) == bytes(want)
    finally:
        mmsb.mmsb_stop(s)
    again = mmsb.open_readonly(tmp_path / "b")
    assert mmsb.query_page(again, pid) == bytes(want)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1), changes=st.integers(0, 40),
       limit=st.integers(0, 800), shift=st.integers(0, 7))
def test_the_block_scan_finds_what_diff_scan_finds(size: int, seed: int, changes: int,
                                                  limit: int, shift: int) -> None:
    from mmsb._core.kernels import diff_scan
    from mmsb._storage.fastbatch import _changed

    rng = np.random.default_rng(seed)
    buf = np.zeros(size + 8, np.uint8)
    a = buf[shift:shift + size]
    a[:] = rng.integers(0, 256, size, dtype=np.uint8)
    b = a.copy()
    if size:
        at = rng.integers(0, size, changes)
        b[at] ^= rng.integers(1, 256, changes, dtype=np.uint8)
    n, got = _changed(a, b, limit, np.empty(max(size, 1), np.intp))
    want_n, want = diff_scan(a, b, limit)
    if want_n <= limit:
        assert (n, got.tolist()) == (want_n, want.tolist())
    else:
        assert n > limit and got.size == 0
