"""The durable bus's one-frame small write (``_storage/fastwrite.py``) against the
general path it stands in for: the same segment bytes, pages, epochs, log, events,
mapped pages and refusals, and the same state after a failed write."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
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
from conftest import frames_end
from mmsb._core.monitor import TOTAL_MAX
from mmsb._storage import fsops

_SIZES = (64, 4096, 70_000)


def _records(state: mmsb.MMSBState) -> list[tuple[Any, ...]]:
    out = []
    for rec in state.log.records:
        if isinstance(rec, mmsb.Delta):
            out.append(("delta", rec.lsn, rec.timestamp, rec.page_id, rec.base_epoch, rec.epoch,
                        rec.source, rec.page_size, bytes(rec.indices.astype(np.int64)),
                        bytes(rec.values)))
        else:
            out.append((type(rec).__name__, rec.lsn))
    return out


def _segments(state: mmsb.MMSBState) -> dict[str, bytes]:
    assert state.bus is not None
    if state.bus.failed is None:
        state.bus.flush()
    return {p.name: p.read_bytes() for p in sorted(state.bus.wal_dir.iterdir())}


def _frames(data: bytes) -> bytes:
    """A segment's header and whole frames, read from the format (length u64, crc u32,
    body); what follows them must be zeros (space written ahead: how much there is
    depends on the allocation, not on what was written)."""
    pos = frames_end(data)
    assert not data[pos:].strip(b"\0"), "bytes other than zeros after the frames"
    return data[:pos]


def _frames_only(seen: dict[str, Any]) -> dict[str, Any]:
    return {**seen, "segments": {k: _frames(v) for k, v in seen["segments"].items()}}


@pytest.fixture(scope="module")
def base_bus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bus with three pages (a small, a 4 KiB and one past 64 KiB), stopped: each run
    opens a copy, so both runs have the same bus id and history."""
    path = tmp_path_factory.mktemp("fastwrite") / "base"
    s = mmsb.mmsb_start(path=path, enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="none", checkpoint_interval=0))
    for size in _SIZES:
        mmsb.create_page(s, size)
    mmsb.mmsb_stop(s)
    return path


def _open(base: Path, dst: Path, fast: bool, fsync: str = "batch") -> tuple[mmsb.MMSBState, list[int]]:
    shutil.copytree(base, dst)
    s = mmsb.mmsb_start(path=dst, enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync=fsync, checkpoint_interval=0,
                                               segment_bytes=16 << 10))
    taken = [0]
    assert s.bus is not None
    mmsb.write_page(s, sorted(s.pages)[0], 0, b"\xff")  # opens the segment
    if fast:
        real = s.bus.write_small

        def counted(*args: Any) -> bool | None:
            try:
                out = real(*args)
            except mmsb.MMSBError:
                taken[0] += 1  # a refusal of this path (its frame could not be written)
                raise
            taken[0] += out is not None
            return out

        s.bus.write_small = counted  # type: ignore[method-assign]
    else:
        s.bus.write_small = lambda *args: None  # type: ignore[method-assign]
    return s, taken


_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.integers(-2, 70_010),
              st.binary(min_size=0, max_size=48)),
    st.tuples(st.just("pattern"), st.integers(0, 2), st.integers(0, 60),
              st.sampled_from([b"\x01\x00\x01", b"\x05" * 20, b"\x07\x00\x00\x07\x00\x07"])),
    st.tuples(st.just("dense"), st.integers(0, 0), st.integers(0, 0), st.binary(min_size=1)),
    st.tuples(st.just("source"), st.integers(0, 2), st.sampled_from(["api", "x", "", 7]),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("update"), st.integers(0, 0), st.integers(0, 0),
              st.binary(min_size=64, max_size=64)),
    st.tuples(st.just("batch"), st.integers(0, 2), st.integers(0, 60),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("big"), st.integers(1, 2), st.integers(0, 0),
              st.binary(min_size=4097, max_size=4200)),
), min_size=1, max_size=40)


def _run(s: mmsb.MMSBState, ops: list[Any]) -> tuple[list[str], list[Any]]:
    ids = sorted(s.pages)
    events: list[Any] = []
    outcomes = []
    for op, k, a, data in ops:
        pid = ids[k]
        try:
            if op in ("write", "pattern"):
                mmsb.write_page(s, pid, a % (_SIZES[k] + 2) - 1 if op == "write" else a, data)
            elif op == "dense":
                mmsb.write_page(s, pid, 0, (data * 64)[:64])
            elif op == "source":
                mmsb.write_page(s, pid, 3, data, source=a)
            elif op == "update":
                mmsb.update_page(s, pid, data)
            elif op == "batch":
                with mmsb.batch(s):
                    mmsb.write_page(s, pid, a, data)
            else:
                mmsb.write_page(s, pid, 0, data)
            outcomes.append("ok")
        except mmsb.MMSBError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        if op == "source" and not events:
            # Events from here on (the path hands such calls to the general tail).
            for et in (mmsb.EventType.DELTA_APPLIED, mmsb.EventType.PAGE_CHANGED):
                mmsb.subscribe(s, et, lambda _st, t, *data: events.append((t, data)))
    return outcomes, events


def _observe(s: mmsb.MMSBState, path: Path) -> dict[str, Any]:
    ids = sorted(s.pages)
    reader = mmsb.attach(path)
    try:
        mapped = {pid: reader.read_page(pid) for pid in ids}
    finally:
        reader.close()
    replayed = mmsb.replay_to_lsn(s, s.last_lsn)
    assert {pid: mmsb.query_page(replayed, pid) for pid in ids} == \
        {pid: mmsb.query_page(s, pid) for pid in ids}
    assert mmsb.verify_state_consistency(s)
    return {
        "segments": _segments(s),
        "pages": {pid: (s.pages[pid].epoch, mmsb.query_page(s, pid)) for pid in ids},
        "mapped": mapped,
        "records": _records(s),
        "last_lsn": s.last_lsn,
        "logged": s.counters.records_logged,
        "payload": s.counters.payload_bytes_logged,
        "samples": {name: (ring.count, min(ring.count, len(ring.samples)),
                           ring.count == 0 or 0 < ring.max_ns <= ring.total_ns)
                    for name in ("log_append", "delta_apply")
                    for ring in [getattr(s.counters, name)]},
    }


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_fast_and_general_paths_write_the_same_bytes(ops: list[Any], base_bus: Path,
                                                     tmp_path: Path, clock: None) -> None:
    runs = []
    run_dir = tmp_path / f"r{time.perf_counter_ns()}"
    for fast in (True, False):
        s, taken = _open(base_bus, run_dir / str(fast), fast)
        try:
            outcomes, events = _run(s, ops)
            seen = _observe(s, run_dir / str(fast))
        finally:
            mmsb.mmsb_stop(s)
        reopened = mmsb.open_readonly(run_dir / str(fast))
        seen["reopened"] = {pid: (reopened.pages[pid].epoch, mmsb.query_page(reopened, pid))
                            for pid in sorted(reopened.pages)}
        runs.append((outcomes, events, seen, taken[0]))
    (fo, fe, fs, taken), (go, ge, gs, _) = runs
    assert fo == go
    assert fe == ge
    assert fs == gs
    assert fs["reopened"] == fs["pages"]
    if any(op == "pattern" and k for op, k, _a, _d in ops):
        assert taken, "the one-frame path never ran"


def test_long_runs_of_fast_writes_match_the_general_path(base_bus: Path, tmp_path: Path,
                                                        clock: None) -> None:
    """Enough writes that the log's rows grow and its payload chunk fills (the compiled
    call declines both, the caller makes room and calls again) and segments roll: the
    same bytes, log and samples as the general path's."""
    runs = []
    rng = np.random.default_rng(7)
    payloads = [rng.integers(1, 256, 64, dtype=np.uint8).tobytes() for _ in range(16)]
    for fast in (True, False):
        s, taken = _open(base_bus, tmp_path / str(fast), fast)
        try:
            pid = sorted(s.pages)[1]
            chunks = len(s.log.chunks)
            capacity = len(s.log.rows)
            for i in range(4200):
                mmsb.write_page(s, pid, (i * 64) % 4032, payloads[i % 16])
            assert len(s.log.chunks) > chunks and len(s.log.rows) > capacity
            seen = _observe(s, tmp_path / str(fast))
        finally:
            mmsb.mmsb_stop(s)
        runs.append((seen, taken[0]))
    (fs, taken), (gs, _) = runs
    assert fs == gs
    assert fs["samples"]["log_append"][0] >= 4200
    assert taken >= 4000, "the one-frame path did not take the writes"


def test_fast_path_takes_the_common_write(tmp_path: Path) -> None:
    s = mmsb.mmsb_start(path=tmp_path / "b", enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="batch", checkpoint_interval=0))
    try:
        pid = mmsb.create_page(s, 4096).id
        mmsb.write_page(s, pid, 0, b"first")  # starts the segment (general path)
        assert s.bus is not None
        calls = [0]
        general = s.log.sink

        def counting(rec: Any) -> None:
            calls[0] += 1
            assert general is not None
            general(rec)

        s.log.sink = counting
        for i in range(50):
            mmsb.write_page(s, pid, 64 + i, bytes([i + 1]) * 8)
        assert calls[0] == 0, "the common write went the general way"
        assert s.last_lsn == 52
        assert mmsb.query_page(s, pid)[64:72] == bytes(range(1, 9))
    finally:
        mmsb.mmsb_stop(s)
    r = mmsb.open_readonly(tmp_path / "b")
    assert r.last_lsn == 52
    assert mmsb.query_page(r, pid)[64:121] == bytes(range(1, 51)) + bytes([50]) * 7


def test_fast_writes_count_into_the_counters_after_a_reset(tmp_path: Path) -> None:
    """The compiled call writes the samples and counts through the addresses of the
    state's counters: after reset_stats replaces them, into the new ones only."""
    s = mmsb.mmsb_start(path=tmp_path / "b", enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="batch", checkpoint_interval=0))
    try:
        pid = mmsb.create_page(s, 4096).id
        for i in range(5):
            mmsb.write_page(s, pid, 8 * i, bytes([i + 1]) * 8)
        old = s.counters
        assert (old.records_logged, old.payload_bytes_logged) >= (5, 40)
        assert old.log_append.count >= 5 and old.delta_apply.count >= 5
        seen = (old.records_logged, old.payload_bytes_logged, old.log_append.count,
                old.delta_apply.count, old.log_append.total_ns)
        mmsb.reset_stats(s)
        general = s.log.sink
        s.log.sink = lambda rec: pytest.fail("a write went the general way")
        for i in range(3):
            mmsb.write_page(s, pid, 100 + 4 * i, b"\x09" * 3)
        s.log.sink = general
        c = s.counters
        assert c is not old
        assert (c.records_logged, c.payload_bytes_logged) == (3, 9)
        assert c.log_append.count == 3 and c.delta_apply.count == 3
        assert 0 < c.log_append.max_ns <= c.log_append.total_ns
        assert list(c.log_append.samples[:3]) != [0, 0, 0]
        assert c.log_append.pos == 3 and c.delta_apply.pos == 3
        assert (old.records_logged, old.payload_bytes_logged, old.log_append.count,
                old.delta_apply.count, old.log_append.total_ns) == seen
        stats = mmsb.get_stats(s)
        assert stats.delta_apply_count == 3 and stats.log_append_count == 3
    finally:
        mmsb.mmsb_stop(s)


def test_fast_writes_latency_totals_stop_at_their_maximum(tmp_path: Path) -> None:
    s = mmsb.mmsb_start(path=tmp_path / "b", enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="batch", checkpoint_interval=0))
    try:
        pid = mmsb.create_page(s, 4096).id
        mmsb.write_page(s, pid, 0, b"\x01")
        c = s.counters
        c.log_append.total_ns = c.delta_apply.total_ns = TOTAL_MAX - 1
        general = s.log.sink
        s.log.sink = lambda rec: pytest.fail("a write went the general way")
        mmsb.write_page(s, pid, 0, b"\x02")
        s.log.sink = general
        assert c.log_append.total_ns == TOTAL_MAX and c.delta_apply.total_ns == TOTAL_MAX
    finally:
        mmsb.mmsb_stop(s)


def _fail_append(s: mmsb.MMSBState) -> Callable[[], None]:
    """Make the next append to the segment fail (EFBIG: the process's file size limit
    set to the segment's size), the cut back still possible; returns the undo."""
    assert s.bus is not None and s.bus.writer is not None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (s.bus.writer.size, limit[1]))
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit)


def _fail_sync(s: mmsb.MMSBState) -> Callable[[], None]:
    """Make the next fdatasync of the segment fail (EINVAL): its descriptor becomes a
    pipe's (appends go there); returns the undo (nothing: the bus refuses writes)."""
    assert s.bus is not None and s.bus.writer is not None
    r, w = os.pipe()
    os.dup2(w, s.bus.writer.fd)
    os.close(w)
    return lambda: os.close(r)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux file-size limit")
@pytest.mark.parametrize("fsync,fail,goes_on", [("batch", _fail_append, True),
                                                ("always", _fail_append, True),
                                                ("always", _fail_sync, False)])
def test_a_failed_frame_changes_nothing_as_on_the_general_path(
        base_bus: Path, tmp_path: Path, clock: None, fsync: str,
        fail: Callable[[mmsb.MMSBState], Callable[[], None]], goes_on: bool) -> None:
    results = []
    for fast in (True, False):
        s, taken = _open(base_bus, tmp_path / str(fast), fast, fsync)
        pid = sorted(s.pages)[1]
        try:
            mmsb.write_page(s, pid, 0, b"\x01\x02")
            before = _observe(s, tmp_path / str(fast))
            reader = mmsb.attach(tmp_path / str(fast))
            undo = fail(s)
            try:
                with pytest.raises(mmsb.DurabilityError) as info:
                    mmsb.write_page(s, pid, 100, b"\x09" * 9)
            finally:
                undo()
            after = _observe(s, tmp_path / str(fast))
            if goes_on:
                # The state, the log and the segment's frames as they were (the failed
                # append is cut off with the space written ahead after it).
                assert _frames_only(after) == _frames_only(before)
            else:
                assert {k: v for k, v in after.items() if k != "segments"} == \
                    {k: v for k, v in before.items() if k != "segments"}
            assert reader.read_page(pid)[100:109] == bytes(9)
            reader.close()
            try:
                mmsb.write_page(s, pid, 200, b"\x03")
                went_on = True
            except mmsb.DurabilityError:
                went_on = False
            results.append((str(info.value), went_on, after, taken[0]))
        finally:
            try:
                mmsb.mmsb_stop(s)
            except mmsb.DurabilityError:
                pass
    (fmsg, fon, fafter, ftaken), (gmsg, gon, gafter, _) = results
    assert fmsg.replace("/True", "/X") == gmsg.replace("/False", "/X")
    assert fon == gon == goes_on
    assert fafter["pages"] == gafter["pages"] and fafter["records"] == gafter["records"]
    assert ftaken >= 2  # the first write and the failed one took the one-frame path


def test_a_fault_hook_sends_writes_the_general_way(tmp_path: Path) -> None:
    # The fault-injection loops count the general path's file steps.
    s = mmsb.mmsb_start(path=tmp_path / "b", enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="batch", checkpoint_interval=0))
    try:
        pid = mmsb.create_page(s, 4096).id
        mmsb.write_page(s, pid, 0, b"first")
        steps: list[str] = []
        previous = fsops.set_fault_hook(lambda step, path: steps.append(step))
        try:
            mmsb.write_page(s, pid, 8, b"second")
        finally:
            fsops.set_fault_hook(previous)
        assert steps == ["write"]
    finally:
        mmsb.mmsb_stop(s)


_SPAN_WRITER = r"""
import sys
import mmsb
from mmsb._storage import fastwrite
path, writes = sys.argv[1], int(sys.argv[2])
s = mmsb.mmsb_start(path=path, enable_gpu=False,
                    config=mmsb.MMSBConfig(fsync="batch", checkpoint_interval=0))
pid = mmsb.create_page(s, 4096).id
mmsb.write_page(s, pid, 0, b"\0")
print("open", flush=True)
sys.stdin.readline()
page = bytearray(1100)
for k in range(1, writes + 1):
    # Two runs of one call, far apart: a reader must see both or neither.
    page[0:8] = page[1092:1100] = k.to_bytes(8, "little")
    mmsb.write_page(s, pid, 0, bytes(page))
print("fast" if s.bus.fast.kernel is not fastwrite._write_frame else "general", flush=True)
sys.stdin.readline()
mmsb.mmsb_stop(s)
"""


def test_readers_never_see_half_of_a_one_frame_write(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    proc = subprocess.Popen([sys.executable, "-c", _SPAN_WRITER, str(path), "20000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("open")
        reader = mmsb.attach(path)
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            seen = set()
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline and len(seen) < 2000:
                data = reader.read_page(1)
                assert data[0:8] == data[1092:1100], "half of a write"
                seen.add(data[0:8])
            line = proc.stdout.readline()
            assert line.strip() == "fast", line
            data = reader.read_page(1)
            assert data[0:8] == data[1092:1100] == (20000).to_bytes(8, "little")
            assert len(seen) > 10
        finally:
            reader.close()
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
