"""A durable bus's retained history read from its log segments through read-only
mappings: the rows of one-run small writes point at their frames there
(``ENC_SEGRUN``) instead of holding copies. Reads give the bytes an in-memory history
gives; segments removed by checkpoints stay readable; a segment cut, rewritten (with a
valid checksum of its own) or replaced under the bus is refused with a typed error,
never a crash or wrong bytes; checkpoints and snapshots hold the in-memory encodings."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmsb
from mmsb._core.kernels import SEG_BEFORE_RUN
from mmsb._core.log import ENC_RUN, ENC_RUN16, ENC_SEGRUN, TransactionLog
from mmsb._history.timetravel import read_page_prefix_at
from mmsb._storage.bus import MAP_MIN_BYTES, bus_files
from mmsb._storage.codec import crc32c

PAGE = 256


@pytest.fixture(autouse=True)
def _map_short_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reopens here map replayed segments of any length the bulk reader takes (by
    default only those of MAP_MIN_BYTES or more: see
    test_only_segments_worth_mapping_are_mapped), so that small buses test them."""
    import mmsb._storage.bus as bus_mod

    monkeypatch.setattr(bus_mod, "MAP_MIN_BYTES", 4096)


def start(path: Path, **kw: Any) -> mmsb.MMSBState:
    kw.setdefault("enable_gpu", False)
    kw.setdefault("fsync", "none")
    kw.setdefault("max_tlog_size", 1 << 40)
    return mmsb.mmsb_start(path=str(path), config=mmsb.MMSBConfig(**kw))


def write_some(state: mmsb.MMSBState, n: int, seed: int = 1, pages: int = 4,
               width: int = 8) -> tuple[list[int], dict[int, dict[int, bytes]]]:
    """``n`` small writes of fresh bytes; returns the page ids and, per LSN, every
    page's bytes right after it."""
    ids = [p.id for p in mmsb.create_pages(state, pages, PAGE)]
    rng = np.random.default_rng(seed)
    now = {pid: bytearray(PAGE) for pid in ids}
    seen: dict[int, dict[int, bytes]] = {}
    for _ in range(n):
        pid = ids[int(rng.integers(0, pages))]
        off = int(rng.integers(0, PAGE - width))
        data = rng.integers(1, 256, width, dtype=np.uint8).tobytes()
        mmsb.write_page(state, pid, off, data)
        now[pid][off:off + width] = data
        seen[state.last_lsn] = {p: bytes(b) for p, b in now.items()}
    return ids, seen


def segment_rows(log: TransactionLog) -> np.ndarray:
    return np.flatnonzero(log.rows["enc"][:log.n] == ENC_SEGRUN)


def check_history(state: mmsb.MMSBState, ids: list[int],
                  seen: dict[int, dict[int, bytes]], every: int = 1) -> None:
    for lsn in sorted(seen)[::every]:
        for pid in ids:
            assert mmsb.read_page_at(state, pid, lsn=lsn) == seen[lsn][pid], (pid, lsn)


def frame_of(log: TransactionLog, row: int) -> tuple[str, int, int]:
    """(segment path, frame start, payload start) of a segment row."""
    poff = int(log.rows["poff"][row])
    ci, at = poff >> 32, poff & 0xFFFFFFFF
    src = log.sources[int(log.rows["src"][row])]
    return log.segs[ci].path, at - SEG_BEFORE_RUN - len(src.encode()), at  # type: ignore[attr-defined]


def test_small_writes_are_read_from_the_segment(tmp_path: Path) -> None:
    s = start(tmp_path / "bus")
    try:
        ids, seen = write_some(s, 600)
        log = s.log
        rows = segment_rows(log)
        # Fresh random bytes make one run nearly always: almost every row is mapped.
        assert len(rows) > 500 and log.segs and log.crcs is not None
        check_history(s, ids, seen, every=7)
        lsns = sorted(seen)
        for lsn in lsns[::50]:
            past = mmsb.replay_to_lsn(s, lsn)
            for pid in ids:
                assert mmsb.query_page(past, pid) == seen[lsn][pid]
        for pid in ids:
            hist = mmsb.replay_page_history(s, pid)
            assert hist
        # The deltas read back equal those an in-memory state logs for the same writes.
        mem = mmsb.MMSBState(config=mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 40))
        write_some(mem, 600)
        got = [(d.page_id, d.epoch, d.indices.tolist(), bytes(d.values)) for d in log.deltas]
        want = [(d.page_id, d.epoch, d.indices.tolist(), bytes(d.values))
                for d in mem.log.deltas]
        assert got == want
        assert mmsb.verify_state_consistency(s)
        # The log's payload chunk holds only the rows that are not mapped.
        plen = log.rows["plen"][:log.n].astype(np.int64)
        assert len(log.chunks) == 1 + len(log.segs)
        assert log.tail == int(plen.sum() - plen[rows].sum())
    finally:
        mmsb.mmsb_stop(s)


def test_an_in_memory_state_keeps_its_payloads(tmp_path: Path) -> None:
    mem = mmsb.MMSBState(config=mmsb.MMSBConfig(enable_gpu=False))
    write_some(mem, 200)
    assert not mem.log.segs and mem.log.crcs is None
    assert not len(segment_rows(mem.log))


def test_snapshots_and_checkpoints_hold_memory_encodings(tmp_path: Path) -> None:
    s = start(tmp_path / "bus")
    try:
        ids, seen = write_some(s, 300)
        cols = s.log.columns()
        assert not (cols.enc == ENC_SEGRUN).any()
        assert set(cols.enc.tolist()) <= {ENC_RUN, ENC_RUN16, 1, 2, 3, 4, 5}
        copy = TransactionLog.from_columns(cols)
        assert [d.values.tobytes() for d in copy.deltas] == \
            [d.values.tobytes() for d in s.log.deltas]
        out = tmp_path / "export.mmsb"
        mmsb.checkpoint_log(s, str(out))
        loaded = mmsb.load_checkpoint(
            mmsb.MMSBState(config=mmsb.MMSBConfig(enable_gpu=False)), str(out))
        for pid in ids:
            assert mmsb.query_page(loaded, pid) == seen[max(seen)][pid]
        assert len(loaded.log.deltas) == len(s.log.deltas)
    finally:
        mmsb.mmsb_stop(s)
    # Reopened (from the checkpoint the stop wrote), the history is whole.
    s = start(tmp_path / "bus")
    try:
        check_history(s, ids, seen, every=11)
    finally:
        mmsb.mmsb_stop(s)


def test_segments_removed_by_checkpoints_stay_readable(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root, max_tlog_size=150, segment_bytes=4096, retain_checkpoints=None)
    try:
        first = set(bus_files(root)["wal"])
        ids, seen = write_some(s, 900)
        gone = first - set(bus_files(root)["wal"])
        assert gone, "no segment was removed"
        log = s.log
        assert len(log.segs) > 2
        # Rows point into segments whose files are gone and into several segments.
        assert any(not os.path.exists(src.path) for src in log.segs.values())  # type: ignore[attr-defined]
        check_history(s, ids, seen, every=5)
        assert mmsb.verify_state_consistency(s)
    finally:
        mmsb.mmsb_stop(s)


def test_compaction_folds_mapped_rows(tmp_path: Path) -> None:
    s = start(tmp_path / "bus")
    try:
        ids, seen = write_some(s, 400)
        mmsb.compress_log(s)
        assert mmsb.verify_state_consistency(s)
        for pid in ids:
            assert mmsb.query_page(s, pid) == seen[max(seen)][pid]
        ids2, seen2 = write_some(s, 100, seed=5)
        check_history(s, ids2, seen2, every=3)
    finally:
        mmsb.mmsb_stop(s)


def _state_of(s: mmsb.MMSBState) -> tuple[Any, ...]:
    return (s.log.n, s.last_lsn, {pid: mmsb.query_page(s, pid) for pid in s.pages})


def test_a_segment_cut_under_the_bus_is_refused(tmp_path: Path) -> None:
    s = start(tmp_path / "bus")
    try:
        ids, seen = write_some(s, 300)
        _cut_under_a_row(s, int(segment_rows(s.log)[10]), ids, seen)
    finally:
        s.bus.abandon("the test cut its log")  # type: ignore[attr-defined]
        mmsb.mmsb_stop(s)


def _cut_under_a_row(s: mmsb.MMSBState, row: int, ids: list[int],
                     seen: dict[int, dict[int, bytes]]) -> None:
    """Cut the segment inside the frame ``row`` points into: every read of that history
    is refused with SerializationError and changes nothing; the pages themselves are
    not history and still read."""
    path, frame, _ = frame_of(s.log, row)
    before = _state_of(s)
    os.truncate(path, frame + 4)
    pid = int(s.log.rows["page"][row])
    lsn = s.log.lsns.at(row)
    with pytest.raises(mmsb.SerializationError, match="cut"):
        mmsb.read_page_at(s, pid, lsn=lsn)
    with pytest.raises(mmsb.SerializationError):
        mmsb.replay_to_lsn(s, lsn)
    with pytest.raises(mmsb.SerializationError):
        list(s.log.deltas)
    assert _state_of(s) == before
    assert mmsb.query_page(s, ids[0]) == seen[max(seen)][ids[0]]


def _rewrite_value(path: str, frame: int, at: int) -> None:
    """Change one value byte of the frame at ``frame`` and give the frame a valid CRC
    again: damage no checksum in the file shows."""
    with open(path, "r+b") as f:
        f.seek(frame)
        head = f.read(12)
        length = struct.unpack("<Q", head[:8])[0]
        body = bytearray(f.read(length))
        body[at - frame - 12 + 8] ^= 0x5A
        f.seek(frame + 8)
        f.write(struct.pack("<I", crc32c(bytes(body), crc32c(head[:8]))))
        f.write(body)


def test_a_frame_rewritten_with_a_valid_checksum_is_refused(tmp_path: Path) -> None:
    s = start(tmp_path / "bus")
    try:
        ids, seen = write_some(s, 300)
        row = int(segment_rows(s.log)[-40])
        path, frame, at = frame_of(s.log, row)
        _rewrite_value(path, frame, at)
        before = _state_of(s)
        pid = int(s.log.rows["page"][row])
        lsn = s.log.lsns.at(row)
        with pytest.raises(mmsb.SerializationError, match="no longer holds"):
            mmsb.read_page_at(s, pid, lsn=lsn)
        with pytest.raises(mmsb.SerializationError):
            s.log.delta_at(row)
        with pytest.raises(mmsb.SerializationError):
            mmsb.replay_page_history(s, pid)
        with pytest.raises(mmsb.SerializationError):
            s.log.columns()
        assert _state_of(s) == before
        # Rows of other frames still read.
        other = [p for p in ids if p != pid][0]
        assert mmsb.read_page_at(s, other, lsn=lsn) == seen[lsn][other]
    finally:
        s.bus.abandon("the test damaged its log")  # type: ignore[attr-defined]
        mmsb.mmsb_stop(s)


def test_damage_in_an_older_segment_is_refused(tmp_path: Path) -> None:
    s = start(tmp_path / "bus", segment_bytes=4096)
    try:
        write_some(s, 400)
        log = s.log
        assert len(log.segs) > 2
        rows = segment_rows(log)
        oldest = min(log.segs)
        row = int(rows[(log.rows["poff"][rows] >> 32) == oldest][3])
        path, frame, at = frame_of(log, row)
        _rewrite_value(path, frame, at)
        with pytest.raises(mmsb.SerializationError):
            log.check_segments(r0=0, r1=log.n)
        with pytest.raises(mmsb.SerializationError):
            list(log.records)
    finally:
        s.bus.abandon("the test damaged its log")  # type: ignore[attr-defined]
        mmsb.mmsb_stop(s)


@pytest.mark.parametrize("what", ["fifo", "symlink", "removed"])
def test_a_segment_replaced_by_another_file_is_still_read(tmp_path: Path, what: str) -> None:
    s = start(tmp_path / "bus")
    try:
        ids, seen = write_some(s, 200)
        row = int(segment_rows(s.log)[5])
        path, _, _ = frame_of(s.log, row)
        moved = path + ".moved"
        os.rename(path, moved)
        if what == "fifo":
            os.mkfifo(path)
        elif what == "symlink":
            other = tmp_path / "other"
            other.write_bytes(b"\0" * 100)
            os.symlink(other, path)
        check_history(s, ids, seen, every=3)
        if what != "removed":
            os.unlink(path)
        os.rename(moved, path)
    finally:
        mmsb.mmsb_stop(s)


def test_mapped_segments_are_bounded(tmp_path: Path, monkeypatch: Any) -> None:
    """Past MAX_MAPPED_SEGMENTS, the oldest segment's rows move into memory and its
    mapping (and descriptor) goes; reads are unchanged."""
    import mmsb._core.log as log_mod

    monkeypatch.setattr(log_mod, "MAX_MAPPED_SEGMENTS", 2)
    s = start(tmp_path / "bus", segment_bytes=4096)
    try:
        ids, seen = write_some(s, 400)
        log = s.log
        assert len(log.segs) == 2
        assert sum(c is None for c in log.chunks) >= 1
        check_history(s, ids, seen, every=3)
        assert not (log.columns().enc == ENC_SEGRUN).any()
        assert mmsb.verify_state_consistency(s)
    finally:
        mmsb.mmsb_stop(s)
    s = start(tmp_path / "bus")
    try:
        check_history(s, ids, seen, every=9)
    finally:
        mmsb.mmsb_stop(s)


def test_writes_after_a_reopen_keep_mapped_rows_once_history_loads(tmp_path: Path) -> None:
    """After a reopen the history is deferred: new writes go to the tail log, mapped;
    loading the history appends the tail (its segment chunks with it)."""
    root = tmp_path / "bus"
    s = start(root)
    ids, seen = write_some(s, 200)
    mmsb.mmsb_stop(s)
    s = start(root)
    try:
        rng = np.random.default_rng(9)
        now = {pid: bytearray(seen[max(seen)][pid]) for pid in ids}
        for _ in range(150):
            pid = ids[int(rng.integers(0, len(ids)))]
            off = int(rng.integers(0, PAGE - 8))
            data = rng.integers(1, 256, 8, dtype=np.uint8).tobytes()
            mmsb.write_page(s, pid, off, data)
            now[pid][off:off + 8] = data
            seen[s.last_lsn] = {p: bytes(b) for p, b in now.items()}
        check_history(s, ids, seen, every=4)
        log = s.log
        assert log.segs and len(segment_rows(log)) > 100
        assert mmsb.verify_state_consistency(s)
        twin = log.clone()
        assert [d.values.tobytes() for d in twin.deltas] == \
            [d.values.tobytes() for d in log.deltas]
    finally:
        mmsb.mmsb_stop(s)


def test_segments_too_long_to_map_keep_payloads_in_memory(tmp_path: Path) -> None:
    """A row's payload offset is 32 bits: a bus whose segments may pass 4 GiB maps none
    and keeps its payloads as an in-memory log does."""
    s = start(tmp_path / "bus", segment_bytes=1 << 33)
    try:
        ids, seen = write_some(s, 200)
        assert not s.log.segs and not len(segment_rows(s.log))
        check_history(s, ids, seen, every=5)
    finally:
        mmsb.mmsb_stop(s)


# -- a reopened bus: the rows recovery replays from the current generation's segments --

def crash(s: mmsb.MMSBState) -> None:
    """Stop ``s`` as a killed process leaves its bus: no final checkpoint, the segment
    not sealed (the frames the kernel has are all there is)."""
    s.bus.abandon("the test stands for a crash")  # type: ignore[attr-defined]
    mmsb.mmsb_stop(s)


def more_writes(state: mmsb.MMSBState, ids: list[int], seen: dict[int, dict[int, bytes]],
                n: int, seed: int) -> None:
    """``n`` writes of mixed shapes (one run, several runs, dense, rewrites of the same
    bytes), noted in ``seen`` as write_some notes them."""
    rng = np.random.default_rng(seed)
    now = {pid: bytearray(mmsb.query_page(state, pid)) for pid in ids}
    for _ in range(n):
        pid = ids[int(rng.integers(0, len(ids)))]
        kind = int(rng.integers(0, 5))
        if kind == 0:  # several runs
            data = bytearray(now[pid][:64])
            for k in range(0, 64, 9):
                data[k] ^= 0x33
            off = 0
        elif kind == 1:  # the whole page
            data = bytearray(rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes())
            off = 0
        else:
            width = int(rng.integers(1, 24))
            off = int(rng.integers(0, PAGE - width))
            data = bytearray(rng.integers(1, 256, width, dtype=np.uint8).tobytes())
        mmsb.write_page(state, pid, off, bytes(data))
        now[pid][off:off + len(data)] = data
        seen[state.last_lsn] = {p: bytes(b) for p, b in now.items()}


def deltas_of(log: TransactionLog, stamps: bool = True) -> list[tuple[Any, ...]]:
    return [(d.lsn, d.id, d.page_id, d.base_epoch, d.epoch, d.source,
             d.timestamp if stamps else None,
             None if d.indices is None else d.indices.tolist(),
             None if d.values is None else bytes(d.values),
             None if d.data is None else bytes(d.data),
             None if d.mask is None else d.mask.tolist()) for d in log.deltas]


def test_a_reopen_after_a_crash_reads_the_replayed_segments_through_mappings(
        tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    ids, seen = write_some(s, 3000)
    crash(s)
    s = start(root)
    try:
        log = s.log
        rows = segment_rows(log)
        assert len(rows) > 2900 and log.segs and log.crcs is not None
        # The payload chunks hold only the rows that are not mapped.
        plen = log.rows["plen"][:log.n].astype(np.int64)
        kept = sum(c.nbytes for i, c in enumerate(log.chunks)
                   if c is not None and i not in log.segs)
        assert kept == int(plen.sum() - plen[rows].sum())
        check_history(s, ids, seen, every=7)
        for lsn in sorted(seen)[::300]:
            past = mmsb.replay_to_lsn(s, lsn)
            for pid in ids:
                assert mmsb.query_page(past, pid) == seen[lsn][pid]
        assert mmsb.verify_state_consistency(s)
        # Writes after the reopen, then the whole history again after a second crash.
        more_writes(s, ids, seen, 400, seed=4)
        check_history(s, ids, seen, every=11)
    finally:
        crash(s)
    s = start(root)
    try:
        check_history(s, ids, seen, every=13)
    finally:
        mmsb.mmsb_stop(s)
    # Stopped cleanly, the history is in the checkpoint the stop wrote.
    s = start(root)
    try:
        check_history(s, ids, seen, every=17)
    finally:
        mmsb.mmsb_stop(s)


def _open_both(root: Path, tmp: Path, monkeypatch: Any, **kw: Any) -> list[mmsb.MMSBState]:
    """The bus at ``root`` opened twice from copies: its replayed rows mapped, and every
    payload read into memory (the reference)."""
    import shutil

    import mmsb._storage.bus as bus_mod

    out = []
    for flag in (True, False):
        copy = tmp / f"copy-{flag}-{len(list(tmp.iterdir()))}"
        shutil.copytree(root, copy)
        monkeypatch.setattr(bus_mod, "MAP_HISTORY", flag)
        out.append(start(copy, **kw))
    monkeypatch.setattr(bus_mod, "MAP_HISTORY", True)
    return out


def _read_at(s: mmsb.MMSBState, pid: int, lsn: int) -> bytes | str:
    """read_page_at, or the name of the error it raises (a page not live then)."""
    try:
        return mmsb.read_page_at(s, pid, lsn=lsn)
    except mmsb.MMSBError as exc:
        return type(exc).__name__


def _same_reads(mapped: mmsb.MMSBState, ref: mmsb.MMSBState, ids: list[int],
                stamps: bool = True, step: int = 37) -> None:
    from mmsb.cli import views

    assert mapped.last_lsn == ref.last_lsn
    assert deltas_of(mapped.log, stamps) == deltas_of(ref.log, stamps)
    first = ref.log.horizon_lsn
    for lsn in range(max(first, 1), ref.last_lsn + 1, step):
        for pid in ids:
            assert _read_at(mapped, pid, lsn) == _read_at(ref, pid, lsn)
        a, b = mmsb.replay_to_lsn(mapped, lsn), mmsb.replay_to_lsn(ref, lsn)
        assert {p: mmsb.query_page(a, p) for p in a.pages} == \
            {p: mmsb.query_page(b, p) for p in b.pages}
    for pid in ids:
        if stamps:
            assert views.history_rows(mapped, pid) == views.history_rows(ref, pid)
            assert views.blame(mapped, pid) == views.blame(ref, pid)
    assert (mapped.log.columns().enc == ref.log.columns().enc).all()


@pytest.mark.parametrize("case", ["plain", "rotation", "compressed", "small_segments"])
def test_mapped_rows_read_as_rows_in_memory(tmp_path: Path, monkeypatch: Any, case: str) -> None:
    """Reads of a reopened bus whose replayed rows are mapped give what a reopen that
    reads every payload into memory gives: deltas, read_page_at, replay_to_lsn, and the
    CLI's history and blame; over checkpoint rotation, a compressed log and many
    segments."""
    kw: dict[str, Any] = {}
    if case == "rotation":
        kw = {"max_tlog_size": 800, "retain_checkpoints": 2}
    elif case == "small_segments":
        kw = {"segment_bytes": 8192}
    root = tmp_path / "bus"
    s = start(root, **kw)
    ids, _ = write_some(s, 1500, seed=3)
    seen: dict[int, dict[int, bytes]] = {}
    more_writes(s, ids, seen, 600, seed=6)
    if case == "compressed":
        mmsb.compress_log(s)
        more_writes(s, ids, seen, 900, seed=7)
    crash(s)
    work = tmp_path / "work"
    work.mkdir()
    mapped, ref = _open_both(root, work, monkeypatch, **kw)
    try:
        assert len(segment_rows(mapped.log)) > 100
        assert not len(segment_rows(ref.log))
        _same_reads(mapped, ref, ids)
        # Both go on alike: more writes, a checkpoint, and another reopen.
        for st in (mapped, ref):
            more_writes(st, ids, {}, 200, seed=8)
            with st.lock:
                st.bus.checkpoint(st)  # type: ignore[union-attr]
        # (The writes after the reopen were made at other times in each.)
        _same_reads(mapped, ref, ids, stamps=False)
    finally:
        mmsb.mmsb_stop(mapped)
        mmsb.mmsb_stop(ref)


def test_a_kill_9_reopen_maps_the_segments(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    script = r"""
import os, signal, sys
import mmsb
s = mmsb.mmsb_start(path=sys.argv[1], config=mmsb.MMSBConfig(
    enable_gpu=False, fsync="none", checkpoint_interval=0, max_tlog_size=1 << 40))
ids = [p.id for p in mmsb.create_pages(s, 8, 256)]
for i in range(4000):
    mmsb.write_page(s, ids[i % 8], (i * 13) % 240, (i + 1).to_bytes(8, "little"))
print(s.last_lsn, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    root = tmp_path / "bus"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src")
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-500:]
    s = start(root)
    try:
        assert s.last_lsn == int(out.stdout)
        assert len(segment_rows(s.log)) > 3900
        pages = {pid: bytearray(256) for pid in range(1, 9)}
        lsn0 = s.last_lsn - 4000
        for i in range(4000):
            pid = 1 + i % 8
            at = (i * 13) % 240
            pages[pid][at:at + 8] = (i + 1).to_bytes(8, "little")
            if i % 97 == 0 or i == 3999:
                assert mmsb.read_page_at(s, pid, lsn=lsn0 + i + 1) == bytes(pages[pid])
    finally:
        mmsb.mmsb_stop(s)


def test_a_replayed_segment_cut_after_the_reopen_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    ids, seen = write_some(s, 1500)
    crash(s)
    s = start(root)
    try:
        rows = segment_rows(s.log)
        _cut_under_a_row(s, int(rows[len(rows) // 2]), ids, seen)
    finally:
        crash(s)


def test_a_replayed_frame_rewritten_after_the_reopen_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    ids, seen = write_some(s, 1500)
    crash(s)
    s = start(root)
    try:
        row = int(segment_rows(s.log)[100])
        path, frame, at = frame_of(s.log, row)
        _rewrite_value(path, frame, at)
        before = _state_of(s)
        pid = int(s.log.rows["page"][row])
        lsn = s.log.lsns.at(row)
        with pytest.raises(mmsb.SerializationError, match="no longer holds"):
            mmsb.read_page_at(s, pid, lsn=lsn)
        with pytest.raises(mmsb.SerializationError):
            s.log.columns()
        assert _state_of(s) == before
        other = [p for p in ids if p != pid][0]
        assert mmsb.read_page_at(s, other, lsn=lsn) == seen[lsn][other]
    finally:
        crash(s)


def test_a_torn_tail_at_reopen_keeps_the_whole_records_mapped(tmp_path: Path) -> None:
    """A segment cut inside its last frame: recovery drops the torn record and starts a
    new generation (a checkpoint, which reads the mapped rows); the history before it is
    whole."""
    root = tmp_path / "bus"
    s = start(root)
    ids, seen = write_some(s, 1500)
    crash(s)
    seg = max(bus_files(root)["wal"], key=lambda p: p.stat().st_size)
    data = seg.read_bytes().rstrip(b"\0")
    os.truncate(seg, len(data) - 3)
    s = start(root)
    try:
        assert s.last_lsn == max(seen) - 1
        del seen[max(seen)]
        check_history(s, ids, seen, every=9)
        assert mmsb.verify_state_consistency(s)
    finally:
        mmsb.mmsb_stop(s)


@pytest.mark.parametrize("what", ["fifo", "symlink"])
def test_a_replayed_segment_is_mapped_only_as_a_regular_file(tmp_path: Path, what: str) -> None:
    from mmsb._storage.histmap import map_replayed

    target = tmp_path / "target"
    target.write_bytes(b"\1" * 8192)
    path = tmp_path / "seg"
    if what == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(target, path)
    assert map_replayed(path, 4096) is None
    # Shorter than the frames read: not mapped either.
    assert map_replayed(target, 9000) is None
    seg = map_replayed(target, 8192)
    assert seg is not None and seg.readable() == 8192
    assert bytes(seg.array[:4]) == b"\1" * 4


def _run_ops(s: mmsb.MMSBState, ops: list[tuple[int, int, int]]) -> list[int]:
    """Apply generated operations: writes of several shapes, batches, a new page, a
    resize, a checkpoint, a compression of the log."""
    ids = sorted(s.pages)
    for kind, a, b in ops:
        pid = ids[a % len(ids)]
        size = len(mmsb.query_page(s, pid))
        if kind <= 4:
            width = 1 + b % min(24, size)
            off = (a * 7 + b) % (size - width + 1)
            mmsb.write_page(s, pid, off, bytes((b + k) % 255 + 1 for k in range(width)))
        elif kind == 5:
            with mmsb.batch(s):
                for k in range(1 + b % 5):
                    q = ids[(a + k) % len(ids)]
                    mmsb.write_page(s, q, k, bytes([(b + k) % 255 + 1]) * 4)
        elif kind == 6:
            cur = bytearray(mmsb.query_page(s, pid))
            for k in range(0, len(cur), 5):
                cur[k] ^= (b % 254) + 1
            mmsb.write_page(s, pid, 0, bytes(cur))
        elif kind == 7:
            ids.append(mmsb.create_page(s, 64 + b % 64).id)
        elif kind == 8:
            # The first page keeps its size (the writes after the ops go there too).
            mmsb.resize_page(s, ids[1 + a % (len(ids) - 1)], 32 + b % 200)
        elif kind == 9:
            with s.lock:
                s.bus.checkpoint(s)  # type: ignore[union-attr]
        else:
            mmsb.compress_log(s)
    return ids


def test_reopened_history_matches_the_in_memory_reference(tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    """Property: whatever was done before a crash (writes of every shape, batches,
    structural records that make recovery read the history midway, checkpoints,
    compression) and wherever the last segment was cut, the reopened bus with its
    replayed rows mapped reads as the reopen that keeps every payload in RAM."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    counter = iter(range(10_000))
    op = st.tuples(st.integers(0, 10), st.integers(0, 1 << 16), st.integers(0, 1 << 16))

    @settings(max_examples=20, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow,
                                     HealthCheck.function_scoped_fixture])
    @given(ops=st.lists(op, min_size=0, max_size=12), cut=st.integers(0, 40))
    def prop(ops: list[tuple[int, int, int]], cut: int) -> None:
        base = tmp_path / f"case-{next(counter)}"
        base.mkdir()
        root = base / "bus"
        s = start(root, segment_bytes=1 << 14)
        ids, _ = write_some(s, 300, seed=len(ops) + cut)
        ids = _run_ops(s, ops)
        more_writes(s, [i for i in ids if len(mmsb.query_page(s, i)) == PAGE], {}, 150,
                    seed=cut)
        crash(s)
        if cut:
            seg = max(bus_files(root)["wal"])
            size = seg.stat().st_size
            os.truncate(seg, max(size - cut, 0))
        mapped, ref = _open_both(root, base, monkeypatch)
        try:
            live = sorted(ref.pages)
            assert sorted(mapped.pages) == live
            _same_reads(mapped, ref, live, step=91)
            assert len(segment_rows(mapped.log)) > 50
        finally:
            mmsb.mmsb_stop(mapped)
            mmsb.mmsb_stop(ref)

    prop()


def _batched(s: mmsb.MMSBState, rounds: int, seed: int) -> tuple[list[int], dict[int, dict[int, bytes]]]:
    """``rounds`` batches of four one-run writes (one record group each)."""
    ids = [p.id for p in mmsb.create_pages(s, 4, PAGE)]
    rng = np.random.default_rng(seed)
    now = {p: bytearray(PAGE) for p in ids}
    seen: dict[int, dict[int, bytes]] = {}
    for _ in range(rounds):
        with mmsb.batch(s):
            for pid in ids:
                off = int(rng.integers(0, PAGE - 8))
                data = rng.integers(1, 256, 8, dtype=np.uint8).tobytes()
                mmsb.write_page(s, pid, off, data)
                now[pid][off:off + 8] = data
        seen[s.last_lsn] = {p: bytes(b) for p, b in now.items()}
    return ids, seen


def test_batched_deltas_replayed_at_a_reopen_are_mapped(tmp_path: Path,
                                                        monkeypatch: Any) -> None:
    """The deltas of a batch share one frame (a record group): once replayed by a
    reopen, their rows point into it too, checked over their own span of the group."""
    root = tmp_path / "bus"
    s = start(root)
    ids, seen = _batched(s, 300, seed=2)
    crash(s)
    work = tmp_path / "work"
    work.mkdir()
    mapped, ref = _open_both(root, work, monkeypatch)
    try:
        assert len(segment_rows(mapped.log)) > 1100
        check_history(mapped, ids, seen, every=3)
        _same_reads(mapped, ref, ids)
        assert mmsb.verify_state_consistency(mapped)
        # A value of a delta inside a group changed in the file: refused, nothing
        # changes, and a delta of another page in the same group still reads.
        log = mapped.log
        row = int(segment_rows(log)[500])
        poff = int(log.rows["poff"][row])
        path = log.segs[poff >> 32].path  # type: ignore[attr-defined]
        at = (poff & 0xFFFFFFFF) + 8
        with open(path, "r+b") as f:
            f.seek(at)
            old = f.read(1)
            f.seek(at)
            f.write(bytes([old[0] ^ 0x5A]))
        before = _state_of(mapped)
        pid = int(log.rows["page"][row])
        lsn = log.lsns.at(row)
        with pytest.raises(mmsb.SerializationError, match="no longer holds"):
            mmsb.read_page_at(mapped, pid, lsn=lsn)
        with pytest.raises(mmsb.SerializationError):
            mmsb.get_deltas_for_page(mapped, pid)
        assert _state_of(mapped) == before
        other = [p for p in ids if p != pid][0]
        assert mmsb.read_page_at(mapped, other, lsn=lsn) == \
            mmsb.read_page_at(ref, other, lsn=lsn)
    finally:
        crash(mapped)
        mmsb.mmsb_stop(ref)


def test_only_segments_worth_mapping_are_mapped(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default MAP_MIN_BYTES, the short tail a kill leaves after a checkpoint
    keeps its payloads in RAM (mapping it would cost the open more than it saves); a
    long one is mapped. Reads are the same either way."""
    import mmsb._storage.bus as bus_mod

    monkeypatch.setattr(bus_mod, "MAP_MIN_BYTES", MAP_MIN_BYTES)
    for n, mapped in ((300, False), (3500, True)):
        root = tmp_path / f"bus-{n}"
        s = start(root)
        ids, seen = write_some(s, n)
        crash(s)
        s = start(root)
        try:
            assert bool(len(segment_rows(s.log))) is mapped
            check_history(s, ids, seen, every=29)
        finally:
            mmsb.mmsb_stop(s)


def _scattered(state: mmsb.MMSBState, pid: int, rounds: int) -> dict[int, bytes]:
    """Writes that change a few bytes apart (deltas of several runs, whose payloads the
    log keeps in memory); returns the page's bytes after each, by LSN."""
    now = bytearray(PAGE)
    seen: dict[int, bytes] = {}
    for k in range(rounds):
        for at in (3, 90, 200):
            now[at] = (now[at] + k + 1) % 256 or 1
        mmsb.write_page(state, pid, 0, bytes(now))
        seen[state.last_lsn] = bytes(now)
    return seen


def test_rows_in_memory_are_read_without_the_segments(tmp_path: Path) -> None:
    """A delta whose payload the log holds in memory is applied without looking at the
    segments (nothing outside the process can change it): a cut segment refuses the
    reads of its own rows, not theirs."""
    s = start(tmp_path / "bus")
    try:
        ids, seen = write_some(s, 100)
        pid = mmsb.create_pages(s, 1, PAGE)[0].id
        mine = _scattered(s, pid, 30)
        log = s.log
        rows = np.flatnonzero(log.rows["page"][:log.n] == pid)
        assert len(rows) == 30 and not (log.rows["enc"][rows] == ENC_SEGRUN).any()
        row = int(segment_rows(log)[5])
        path, frame, _ = frame_of(log, row)
        os.truncate(path, frame + 4)
        before = _state_of(s)
        epochs = {lsn: k + 1 for k, lsn in enumerate(sorted(mine))}
        for lsn in sorted(mine)[:-1]:
            assert mmsb.read_page_at(s, pid, lsn=lsn) == mine[lsn]
            assert read_page_prefix_at(s, pid, epoch=epochs[lsn], length=100) == mine[lsn][:100]
        with pytest.raises(mmsb.SerializationError, match="cut"):
            mmsb.read_page_at(s, int(log.rows["page"][row]), lsn=log.lsns.at(row))
        assert _state_of(s) == before
    finally:
        s.bus.abandon("the test cut its log")  # type: ignore[attr-defined]
        mmsb.mmsb_stop(s)


@pytest.mark.parametrize("damage", ["cut", "rewritten"])
def test_every_read_checks_its_segment_rows(tmp_path: Path, damage: str) -> None:
    """A read checks the segment rows it applies each time, not once: a version read
    (and its frames found intact) is refused once its segment is cut, or a frame of it
    rewritten with a valid checksum of its own; the reads before stay right."""
    s = start(tmp_path / "bus")
    try:
        ids, seen = write_some(s, 300)
        log = s.log
        row = int(segment_rows(log)[-40])
        pid = int(log.rows["page"][row])
        lsn = log.lsns.at(row)
        epoch = int(log.rows["epoch"][row])
        assert mmsb.read_page_at(s, pid, lsn=lsn) == seen[lsn][pid]
        assert read_page_prefix_at(s, pid, epoch=epoch, length=PAGE) == seen[lsn][pid]
        path, frame, at = frame_of(log, row)
        if damage == "cut":
            os.truncate(path, frame + 4)
        else:
            _rewrite_value(path, frame, at)
        before = _state_of(s)
        for _ in range(2):
            with pytest.raises(mmsb.SerializationError):
                mmsb.read_page_at(s, pid, lsn=lsn)
            with pytest.raises(mmsb.SerializationError):
                read_page_prefix_at(s, pid, epoch=epoch, length=PAGE)
        assert _state_of(s) == before
    finally:
        s.bus.abandon("the test damaged its log")  # type: ignore[attr-defined]
        mmsb.mmsb_stop(s)
