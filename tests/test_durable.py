"""The durable bus: open / create / reopen, the single-writer lock, the fsync
policies, failed writes, retention and time travel across checkpoints, read-only
opening beside a live writer, and stale or foreign log segments.

The crash loop, torn tails, byte damage and hostile lengths are in tests/test_crash.py;
decoder fuzzing in tests/test_fuzz_decoders.py.

Notes for readers:

* Recompute functions are code, not data: they are never written to disk. After a
  reopen the graph edges are back, but a DATA child is recomputed only once its
  function is registered again (``test_recompute_functions_must_be_registered_again``).
* ``full_view`` compares the retained log record by record through its binary encoding
  (``encode_record``), which includes every record's LSN and timestamp.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mmsb
import mmsb._storage.wal as wal_mod
from conftest import edges, frames_end, pages_view
from crash_writer import apply as apply_write
from crash_writer import digest, plan
from mmsb import open_readonly
from mmsb._storage.bus import bus_files
from mmsb._storage.codec import encode_record

WRITER = Path(__file__).with_name("crash_writer.py")


# --------------------------------------------------------------------------- helpers


def cfg(**kw: Any) -> mmsb.MMSBConfig:
    kw.setdefault("enable_gpu", False)
    return mmsb.MMSBConfig(**kw)


def start(path: Path, **kw: Any) -> mmsb.MMSBState:
    return mmsb.mmsb_start(path=str(path), config=cfg(**kw))


def log_records(state: mmsb.MMSBState) -> list[bytes]:
    """The retained log, each record as its exact binary encoding."""
    return [encode_record(r) for r in state.log.records]


def full_view(state: mmsb.MMSBState) -> tuple:
    """Pages (bytes, epoch, size, location, metadata), edges, the next page id, the last
    LSN, the history horizon and the retained log."""
    return (pages_view(state), edges(state), int(state.next_page_id), int(state.last_lsn),
            int(state.log.horizon_lsn), log_records(state))


def state_view(state: mmsb.MMSBState) -> tuple:
    """What a replay must reproduce: pages, edges and the next page id."""
    return (pages_view(state), edges(state), int(state.next_page_id))


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path → (size, mtime in ns)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def populate(s: mmsb.MMSBState) -> None:
    """A state with every kind of record: creates (bulk and single, with metadata),
    deltas (sparse and dense), metadata, resize, clone, delete, all four edge types."""
    a = mmsb.create_page(s, 64, metadata={"role": "source", "n": 1})
    b = mmsb.create_page(s, 32)
    c, d, e = mmsb.create_pages(s, 3, 16)
    mmsb.update_page(s, a.id, bytes(range(64)))  # dense
    mmsb.write_page(s, b.id, 3, b"xyz")  # sparse
    mmsb.write_page(s, c.id, 0, b"\x01" * 16)
    mmsb.set_metadata(s, b.id, "label", "bee")
    mmsb.update_metadata(s, c.id, {"list": [1, 2, 3], "blob": b"\x00\xff", "f": 1.5})
    mmsb.resize_page(s, d.id, 40)
    mmsb.write_page(s, d.id, 30, b"grown")
    f = mmsb.clone_page(s, a.id)
    mmsb.add_dependency(s, a.id, b.id, mmsb.CONTROL_DEPENDENCY)
    mmsb.add_dependency(s, b.id, c.id, mmsb.GPU_SYNC_DEPENDENCY)
    mmsb.add_dependency(s, a.id, f.id, mmsb.COMPILER_DEPENDENCY)
    mmsb.add_dependency(s, e.id, f.id, mmsb.DATA_DEPENDENCY)
    mmsb.write_page(s, a.id, 10, b"changed")  # CONTROL/COMPILER effects: logged metadata
    mmsb.delete_page(s, e.id)


# --------------------------------------------------------------------------- open / reopen


def test_create_makes_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    try:
        assert (root / "BUS").is_file() and (root / "LOCK").is_file()
        files = bus_files(root)
        assert len(files["checkpoints"]) == 1 and len(files["wal"]) == 1
        assert s.bus is not None and len(s.pages) == 0
    finally:
        mmsb.mmsb_stop(s)


def test_reopen_keeps_pages_edges_ids_and_log(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    populate(s)
    before = full_view(s)
    assert mmsb.verify_state_consistency(s)
    mmsb.mmsb_stop(s)

    s2 = start(root)
    try:
        assert full_view(s2) == before
        assert mmsb.verify_state_consistency(s2)
        # New ids continue after the highest ever used (the deleted page's id included).
        highest = max(sorted(before[0]))
        assert s2.next_page_id == before[2] > highest
        new = mmsb.create_page(s2, 8)
        assert new.id == before[2]
        # The log continues: LSNs go on from the last one.
        assert s2.last_lsn == before[3] + 1
    finally:
        mmsb.mmsb_stop(s2)


def test_reopen_after_a_crash_image_keeps_everything(tmp_path: Path) -> None:
    """No mmsb_stop: the directory is copied while the bus is open (what a kill leaves)."""
    root = tmp_path / "bus"
    s = start(root, fsync="none")
    populate(s)
    s.bus.flush()
    before = full_view(s)
    shutil.copytree(root, tmp_path / "image")
    mmsb.mmsb_stop(s)
    s2 = start(tmp_path / "image")
    try:
        assert full_view(s2) == before
        assert mmsb.verify_state_consistency(s2)
        assert s2.recovery_notes == []
    finally:
        mmsb.mmsb_stop(s2)


def test_ids_continue_after_deleting_the_highest_page(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    pages = [mmsb.create_page(s, 8) for _ in range(3)]
    mmsb.delete_page(s, pages[-1].id)
    mmsb.delete_page(s, pages[-2].id)
    mmsb.mmsb_stop(s)
    for expected in (4, 5):  # twice: a reopen right after a reopen too
        s = start(root)
        assert mmsb.create_page(s, 8).id == expected
        mmsb.mmsb_stop(s)


def test_ids_continue_after_a_crash_that_follows_a_delete(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root, fsync="none")
    a = mmsb.create_page(s, 8)
    b = mmsb.create_page(s, 8)
    mmsb.delete_page(s, b.id)
    s.bus.flush()
    shutil.copytree(root, tmp_path / "image")
    mmsb.mmsb_stop(s)
    s2 = start(tmp_path / "image")
    try:
        assert sorted(s2.pages) == [a.id]
        assert mmsb.create_page(s2, 8).id == b.id + 1
    finally:
        mmsb.mmsb_stop(s2)


def test_reopen_without_writes_changes_nothing(tmp_path: Path) -> None:
    """A reopen that replays nothing writes no checkpoint and keeps the history."""
    root = tmp_path / "bus"
    s = start(root, retain_checkpoints=2, max_tlog_size=5)
    populate(s)
    mmsb.mmsb_stop(s)
    s = start(root, retain_checkpoints=2, max_tlog_size=5)
    view = full_view(s)
    ckpts = bus_files(root)["checkpoints"]
    mmsb.mmsb_stop(s)
    for _ in range(3):
        s = start(root, retain_checkpoints=2, max_tlog_size=5)
        assert full_view(s) == view
        mmsb.mmsb_stop(s)
        assert bus_files(root)["checkpoints"] == ckpts


def test_context_manager_stops_and_releases_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    with mmsb.mmsb_start(path=str(root), config=cfg()) as s:
        p = mmsb.create_page(s, 4)
        mmsb.update_page(s, p.id, b"abcd")
    assert s.closed
    with mmsb.mmsb_start(path=str(root), config=cfg()) as s2:
        assert mmsb.query_page(s2, p.id) == b"abcd"


def test_recompute_functions_must_be_registered_again(tmp_path: Path) -> None:
    """Edges survive a reopen; recompute functions (code) do not: the user registers
    them again, and until then a DATA child is not recomputed."""
    root = tmp_path / "bus"
    s = start(root)
    src = mmsb.create_page(s, 4)
    dst = mmsb.create_page(s, 4)
    mmsb.add_dependency(s, src.id, dst.id)
    mmsb.register_passthrough_recompute(s, dst.id, src.id)
    mmsb.update_page(s, src.id, b"abcd")
    assert mmsb.query_page(s, dst.id) == b"abcd"
    mmsb.mmsb_stop(s)

    s = start(root)
    try:
        assert mmsb.get_children(s.graph, src.id) == [(dst.id, mmsb.EdgeType.DATA)]
        mmsb.update_page(s, src.id, b"wxyz")
        assert mmsb.query_page(s, dst.id) == b"abcd"  # no function registered: not recomputed
        mmsb.register_passthrough_recompute(s, dst.id, src.id)
        mmsb.update_page(s, src.id, b"WXYZ")
        assert mmsb.query_page(s, dst.id) == b"WXYZ"
        assert mmsb.verify_state_consistency(s)
    finally:
        mmsb.mmsb_stop(s)


def test_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"not a directory")
    with pytest.raises(mmsb.MMSBError):
        start(f)


def test_the_bus_directory_is_made_or_refused_before_its_folders(tmp_path: Path) -> None:
    """The open makes its folders in the directory, making the directory (and its
    parents) when missing; a file where the directory belongs is refused, unchanged,
    whether it stands at the path itself or above it."""
    f = tmp_path / "file"
    f.write_bytes(b"not a directory")
    for where in (f, f / "bus"):
        with pytest.raises(mmsb.MMSBError) as info:
            start(where)
        assert "not a directory" in str(info.value).lower()
        assert f.read_bytes() == b"not a directory"
    deep = tmp_path / "a" / "b" / "bus"
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (deep, empty):
        s = start(root)
        try:
            mmsb.create_page(s, 4)
        finally:
            mmsb.mmsb_stop(s)
        assert (root / "checkpoints").is_dir() and (root / "wal").is_dir()
        again = start(root)
        try:
            assert len(again.pages) == 1
        finally:
            mmsb.mmsb_stop(again)


def test_missing_identity_file_with_data_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    mmsb.create_page(s, 4)
    mmsb.mmsb_stop(s)
    (root / "BUS").unlink()
    with pytest.raises(mmsb.SerializationError):
        start(root)
    # ... and the refused open released the lock.
    (root / "BUS").write_bytes(b"")
    with pytest.raises(mmsb.SerializationError):
        start(root)


# --------------------------------------------------------------------------- one writer


def test_second_open_in_the_same_process_is_locked(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    try:
        with pytest.raises(mmsb.BusLockedError) as exc:
            start(root)
        assert isinstance(exc.value, mmsb.MMSBError)
        assert str(os.getpid()) in str(exc.value)
        assert not s.closed
        mmsb.create_page(s, 4)  # the first writer is unaffected
    finally:
        mmsb.mmsb_stop(s)
    mmsb.mmsb_stop(start(root))  # free again after the stop


def _spawn_writer(root: Path, round_no: int, fsync: str, max_writes: int | str = "-",
                  segment_bytes: int = 4096, max_tlog: int = 64) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(root), str(round_no), fsync, str(max_writes),
         str(segment_bytes), str(max_tlog)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(proc: subprocess.Popen[str], word: str, timeout: float = 30) -> list[str]:
    """Lines of the child's stdout up to and including the first one starting with
    ``word`` (in a thread, so that a stuck child fails the test instead of hanging it)."""
    lines: list[str] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(word):
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout):
        proc.kill()
        pytest.fail(f"the writer did not print {word!r} in {timeout}s; stderr: "
                    f"{proc.stderr.read() if proc.stderr else ''}")
    if not lines or not lines[-1].startswith(word):
        err = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"the writer ended before {word!r}: {lines[-3:]} {err}")
    return lines


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def _make_pages(root: Path, sizes: tuple[int, ...] = (64, 200, 1000, 4096)) -> dict[int, bytes]:
    s = start(root)
    for n in sizes:
        mmsb.create_page(s, n)
    model = {pid: mmsb.query_page(s, pid) for pid in s.pages}
    mmsb.mmsb_stop(s)
    return model


def test_open_from_another_process_is_locked(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    try:
        code = ("import sys, mmsb\n"
                "try:\n"
                "    mmsb.mmsb_start(path=sys.argv[1], config=mmsb.MMSBConfig(enable_gpu=False))\n"
                "    print('opened')\n"
                "except mmsb.BusLockedError as e:\n"
                "    print('locked', isinstance(e, mmsb.MMSBError), e)\n")
        out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.stdout.startswith("locked True"), out.stdout + out.stderr
        assert str(os.getpid()) in out.stdout
    finally:
        mmsb.mmsb_stop(s)


def test_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    _make_pages(root)
    proc = _spawn_writer(root, 0, "batch", max_writes=3)
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    _read_until(proc, "done")
    with pytest.raises(mmsb.BusLockedError) as exc:
        start(root)
    assert str(proc.pid) in str(exc.value)
    _kill(proc)
    s = start(root)  # the kernel dropped the dead holder's flock
    try:
        assert all(int(p.epoch) >= 0 for p in s.pages.values())
        assert sum(int(p.epoch) for p in s.pages.values()) == 3
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- fsync policies


@pytest.mark.parametrize("fsync", ["always", "batch", "none"])
def test_policy_reopens_after_a_clean_stop(tmp_path: Path, fsync: str) -> None:
    root = tmp_path / "bus"
    s = start(root, fsync=fsync)
    populate(s)
    before = full_view(s)
    mmsb.mmsb_stop(s)
    s = start(root, fsync=fsync)
    try:
        assert full_view(s) == before
    finally:
        mmsb.mmsb_stop(s)


@pytest.mark.parametrize("fsync", ["always", "batch", "none"])
def test_policy_keeps_every_acknowledged_write_after_a_kill(tmp_path: Path, fsync: str) -> None:
    """Every policy writes a record with os.write before the call returns, so a process
    crash (SIGKILL) loses no acknowledged write, whatever the fsync policy."""
    root = tmp_path / "bus"
    model = _make_pages(root)
    sizes = {pid: len(b) for pid, b in model.items()}
    epochs = dict.fromkeys(model, 0)
    n = 60
    proc = _spawn_writer(root, 7, fsync, max_writes=n, segment_bytes=2048, max_tlog=25)
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    lines = _read_until(proc, "done")
    _kill(proc)
    acks = [ln.split() for ln in lines if ln.startswith("ack ")]
    assert len(acks) == n
    for _, i, pid, epoch, h in acks:
        kind, wpid, off, data = plan(7, int(i), sizes)
        assert wpid == int(pid)
        model[wpid] = apply_write(kind, model[wpid], off, data)
        epochs[wpid] += 1
        assert digest(model[wpid]) == h and epochs[wpid] == int(epoch)
    s = start(root, fsync=fsync)
    try:
        assert {pid: (mmsb.query_page(s, pid), int(s.pages[pid].epoch)) for pid in s.pages} == \
            {pid: (model[pid], epochs[pid]) for pid in model}
        assert mmsb.verify_state_consistency(s)
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- failed writes


def _same_file(fd: int, other: int) -> bool:
    """``fd`` is ``other`` or a duplicate of it (the group commit syncs a duplicate)."""
    if fd == other:
        return True
    try:
        a, b = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _fd_raiser(real: Any, fd_of: Any, err: int) -> Any:
    def fn(fd: int, *args: Any) -> Any:
        if _same_file(fd, fd_of()):
            raise OSError(err, f"injected {errno.errorcode[err]}")
        return real(fd, *args)
    return fn


def _refused_calls(s: mmsb.MMSBState, pid: int) -> None:
    """Every kind of write is refused with DurabilityError."""
    for call in (lambda: mmsb.write_page(s, pid, 0, b"zz"),
                 lambda: mmsb.update_page(s, pid, b"q" * 16),
                 lambda: mmsb.create_page(s, 8),
                 lambda: mmsb.set_metadata(s, pid, "k", 1),
                 lambda: mmsb.apply_batch(s, [(pid, 0, b"b")])):
        with pytest.raises(mmsb.DurabilityError):
            call()


@pytest.mark.parametrize("what", ["fdatasync", "pwrite"])
def test_failed_write_or_fsync_refuses_every_later_write(tmp_path: Path, monkeypatch: Any,
                                                         what: str) -> None:
    root = tmp_path / "bus"
    s = start(root, fsync="always")
    p = mmsb.create_page(s, 16)
    mmsb.write_page(s, p.id, 0, b"ok")
    before = full_view(s)
    fd_of = lambda: s.bus.writer.fd if s.bus.writer is not None else -2  # noqa: E731
    monkeypatch.setattr(wal_mod.os, what, _fd_raiser(getattr(os, what), fd_of,
                                                     errno.EIO if what == "fdatasync" else errno.ENOSPC))
    with pytest.raises(mmsb.DurabilityError) as exc:
        mmsb.write_page(s, p.id, 4, b"lost?")
    assert isinstance(exc.value, mmsb.MMSBError) and isinstance(exc.value, OSError)
    assert full_view(s) == before  # the failed call changed nothing in memory
    monkeypatch.undo()
    if what == "fdatasync":
        # The disk works again, but what the failed fsync covered is unknown: the bus
        # still refuses (never retry and pretend).
        _refused_calls(s, p.id)
        assert full_view(s) == before
    else:
        # The failed append was cut back, so nothing of it is in the log: once the disk
        # has room again the bus goes on.
        mmsb.write_page(s, p.id, 0, b"ok")
        assert full_view(s) == before
    mmsb.mmsb_stop(s)
    # After a restart the failed write is wholly there or wholly absent.
    s = start(root)
    try:
        data = mmsb.query_page(s, p.id)
        epoch = int(s.pages[p.id].epoch)
        if what == "pwrite":  # nothing reached the file
            assert (data, epoch) == (b"ok" + bytes(14), 1)
        else:  # the record was written, only its fsync failed: outcome unknown
            assert (data, epoch) in {(b"ok" + bytes(14), 1), (b"ok\0\0lost?" + bytes(7), 2)}
        mmsb.write_page(s, p.id, 0, b"again")
    finally:
        mmsb.mmsb_stop(s)


def test_partial_write_leaves_a_torn_tail_that_recovery_cuts(tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    """A failed append whose partial bytes cannot even be cut back (ftruncate fails too)
    leaves a torn tail: the bus refuses writes, and recovery cuts the tail."""
    root = tmp_path / "bus"
    s = start(root, fsync="always")
    p = mmsb.create_page(s, 4096)
    mmsb.write_page(s, p.id, 0, b"kept")
    before = state_view(s)
    real = os.pwrite
    calls = {"n": 0}

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "injected EIO")

    monkeypatch.setattr(os, "ftruncate", no_truncate)

    def half_then_fail(fd: int, data: Any, pos: int) -> int:
        if s.bus.writer is not None and fd == s.bus.writer.fd:
            calls["n"] += 1
            if calls["n"] == 1:
                return real(fd, bytes(data)[: len(data) // 2], pos)
            raise OSError(errno.ENOSPC, "injected ENOSPC")
        return real(fd, data, pos)

    monkeypatch.setattr(wal_mod.os, "pwrite", half_then_fail)
    with pytest.raises(mmsb.DurabilityError):
        mmsb.update_page(s, p.id, b"\x07" * 4096)
    monkeypatch.undo()
    assert state_view(s) == before
    with pytest.raises(mmsb.DurabilityError):
        mmsb.write_page(s, p.id, 0, b"later")
    mmsb.mmsb_stop(s)
    s = start(root)
    try:
        assert state_view(s) == before
        assert mmsb.get_stats(s).torn_tails_recovered == 1
        assert any("torn" in n for n in s.recovery_notes)
    finally:
        mmsb.mmsb_stop(s)


def test_failed_group_commit_refuses_later_writes(tmp_path: Path, monkeypatch: Any) -> None:
    root = tmp_path / "bus"
    s = start(root, fsync="batch", fsync_batch_ms=1)
    p = mmsb.create_page(s, 16)
    s.bus.flush()
    fd_of = lambda: s.bus.writer.fd if s.bus.writer is not None else -2  # noqa: E731
    monkeypatch.setattr(wal_mod.os, "fdatasync", _fd_raiser(os.fdatasync, fd_of, errno.EIO))
    mmsb.write_page(s, p.id, 0, b"acked")  # in the kernel: acknowledged
    deadline = time.monotonic() + 10
    while s.bus.failed is None and time.monotonic() < deadline:
        time.sleep(0.005)
    monkeypatch.undo()
    assert s.bus.failed is not None, "the group-commit thread never saw the failed fsync"
    view = full_view(s)
    _refused_calls(s, p.id)
    assert full_view(s) == view
    mmsb.mmsb_stop(s)
    s = start(root)
    try:
        assert mmsb.query_page(s, p.id)[:5] == b"acked"  # a process crash loses nothing
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- retention


def _history_bus(root: Path, keep: int | None, n: int = 45) -> tuple[mmsb.MMSBState, dict, dict]:
    """A bus with checkpoints every 10 records; returns the state, the view after each
    LSN and each LSN's timestamp."""
    s = start(root, fsync="none", retain_checkpoints=keep, max_tlog_size=10)
    views: dict[int, tuple] = {0: state_view(s)}
    stamps: dict[int, int] = {}

    def note_stamp() -> None:
        # A checkpoint with retain_checkpoints=1 may trim the newest record at once.
        recs = s.log.records
        if recs and recs[-1].lsn == s.last_lsn:
            stamps[s.last_lsn] = recs[-1].timestamp

    a = mmsb.create_page(s, 8)
    views[s.last_lsn] = state_view(s)
    note_stamp()
    b = mmsb.create_page(s, 4)
    views[s.last_lsn] = state_view(s)
    note_stamp()
    for i in range(n):
        if i % 11 == 5:
            mmsb.set_metadata(s, b.id, "i", i)
        else:
            mmsb.write_page(s, (a.id, b.id)[i % 2], i % 4, bytes([i + 1]))
        views[s.last_lsn] = state_view(s)
        note_stamp()
    assert sorted(views) == list(range(s.last_lsn + 1))
    return s, views, stamps


def _check_time_travel(s: mmsb.MMSBState, views: dict[int, tuple], horizon: int,
                       stamps: dict[int, int]) -> None:
    for lsn, view in views.items():
        if lsn < horizon:
            with pytest.raises(mmsb.HistoryUnavailableError):
                mmsb.replay_to_lsn(s, lsn)
        else:
            assert state_view(mmsb.replay_to_lsn(s, lsn)) == view, f"replay_to_lsn({lsn})"
    for lsn, ts in stamps.items():
        if lsn > horizon:  # at the horizon itself: test_replay_to_timestamp_at_the_horizon
            r = mmsb.replay_to_timestamp(s, ts)
            assert r.last_lsn >= lsn
            assert state_view(r) == views[r.last_lsn]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_retention_keeps_n_checkpoints_of_history(tmp_path: Path, keep: int) -> None:
    root = tmp_path / "bus"
    s, views, stamps = _history_bus(root, keep)
    try:
        ckpts = bus_files(root)["checkpoints"]
        assert len(ckpts) == keep
        horizon = s.log.horizon_lsn
        # Checkpoints fall every 10 records: the oldest kept one is the horizon.
        assert horizon == 40 - 10 * (keep - 1)
        _check_time_travel(s, views, horizon, stamps)
        with pytest.raises(mmsb.HistoryUnavailableError):
            mmsb.replay_to_lsn(s, horizon - 1)
        if stamps[horizon - 1] < stamps.get(horizon, stamps[horizon - 1] + 1):
            with pytest.raises(mmsb.HistoryUnavailableError):
                mmsb.replay_to_timestamp(s, stamps[horizon - 1])
    finally:
        mmsb.mmsb_stop(s)


def test_replay_to_timestamp_at_the_horizon(tmp_path: Path) -> None:
    """The moment of the oldest retained checkpoint's record (the horizon) is inside the
    retained history: replay_to_lsn(horizon) answers it, so replay_to_timestamp of that
    moment must answer it too (the replay base), not raise."""
    root = tmp_path / "bus"
    s, views, stamps = _history_bus(root, 2)
    try:
        horizon = s.log.horizon_lsn
        assert state_view(mmsb.replay_to_lsn(s, horizon)) == views[horizon]
        r = mmsb.replay_to_timestamp(s, stamps[horizon])
        assert r.last_lsn == horizon and state_view(r) == views[horizon]
    finally:
        mmsb.mmsb_stop(s)


def test_keep_all_keeps_the_whole_history_across_reopens(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s, views, stamps = _history_bus(root, None)
    assert s.log.horizon_lsn == 0
    _check_time_travel(s, views, 0, stamps)
    mmsb.mmsb_stop(s)
    s = start(root, fsync="none", max_tlog_size=10)
    try:
        assert s.log.horizon_lsn == 0
        assert len(bus_files(root)["checkpoints"]) >= 5
        _check_time_travel(s, views, 0, stamps)
    finally:
        mmsb.mmsb_stop(s)


@pytest.mark.parametrize("keep", [2, None])
@pytest.mark.parametrize("how", ["stop", "crash"])
def test_reopen_keeps_the_same_retained_history(tmp_path: Path, keep: int | None,
                                                how: str) -> None:
    """Issue 3: the reopened state has the same retained log history, after a clean stop
    and after a crash (here: a copy of the directory taken while the bus is open)."""
    root = tmp_path / "bus"
    s, views, stamps = _history_bus(root, keep)
    s.bus.flush()
    live = full_view(s)
    if how == "crash":
        shutil.copytree(root, tmp_path / "image")
        root = tmp_path / "image"
    mmsb.mmsb_stop(s)
    s = start(root, fsync="none", retain_checkpoints=keep, max_tlog_size=10)
    try:
        assert full_view(s)[:4] == live[:4]  # pages, edges, next id, last LSN
        assert full_view(s)[4:] == live[4:], "the retained history changed (horizon, log)"
        _check_time_travel(s, views, live[4], stamps)
    finally:
        mmsb.mmsb_stop(s)


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_retention_resumes_after_a_reopen(tmp_path: Path, how: str) -> None:
    """The checkpoint of a stop or of recovery does not evict (the reopened history is
    the same), reopening again without writes changes nothing, and the next automatic
    checkpoint evicts down to retain_checkpoints again."""
    root = tmp_path / "bus"
    s, views, stamps = _history_bus(root, 2)
    s.bus.flush()
    if how == "crash":
        shutil.copytree(root, tmp_path / "image")
        root = tmp_path / "image"
    mmsb.mmsb_stop(s)
    config = dict(fsync="none", retain_checkpoints=2, max_tlog_size=10)
    s = start(root, **config)
    first = full_view(s)
    try:
        assert s.log.horizon_lsn == 30
    finally:
        mmsb.mmsb_stop(s)
    s = start(root, **config)
    try:
        assert full_view(s) == first
        last = s.last_lsn  # 47: where the stop or recovery checkpoint stands
        pid = sorted(s.pages)[0]
        for i in range(10):
            mmsb.write_page(s, pid, i % 8, bytes([0x80 + i]))
        assert len(bus_files(root)["checkpoints"]) == 2
        assert s.log.horizon_lsn == last
        with pytest.raises(mmsb.HistoryUnavailableError):
            mmsb.replay_to_lsn(s, last - 1)
        assert state_view(mmsb.replay_to_lsn(s, last)) == views[last]
    finally:
        mmsb.mmsb_stop(s)


def test_replay_to_epoch_within_retained_history(tmp_path: Path) -> None:
    """The per-page epoch cut, against an in-memory state that made the same writes
    and keeps its whole log: equal wherever the bus's retained history reaches, and
    HistoryUnavailableError (never a wrong answer) where it does not."""
    root = tmp_path / "bus"
    s = start(root, fsync="none", retain_checkpoints=2, max_tlog_size=10)
    ref = mmsb.MMSBState(cfg())
    for st in (s, ref):
        a = mmsb.create_page(st, 8)
        b = mmsb.create_page(st, 8)
        for i in range(45):
            mmsb.write_page(st, (a.id, b.id)[i % 2], i % 8, bytes([i + 1]))
    try:
        assert s.log.horizon_lsn > 0
        for e in range(0, 26):
            want = pages_view(mmsb.replay_to_epoch(ref, e))
            try:
                got = pages_view(mmsb.replay_to_epoch(s, e))
            except mmsb.HistoryUnavailableError:
                continue
            assert got == want, f"replay_to_epoch({e})"
        # The newest epochs are inside the retained history: they must be answered.
        assert pages_view(mmsb.replay_to_epoch(s, 23)) == pages_view(mmsb.replay_to_epoch(ref, 23))
    finally:
        mmsb.mmsb_stop(s)


def test_replay_to_epoch_with_the_whole_history_across_reopen(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root, fsync="none", max_tlog_size=10)
    ref = mmsb.MMSBState(cfg())
    for st in (s, ref):
        a = mmsb.create_page(st, 8)
        b = mmsb.create_page(st, 8)
        for i in range(45):
            mmsb.write_page(st, (a.id, b.id)[i % 2], i % 8, bytes([i + 1]))
    mmsb.mmsb_stop(s)
    s = start(root, fsync="none", max_tlog_size=10)
    try:
        for e in range(0, 25):
            assert pages_view(mmsb.replay_to_epoch(s, e)) == pages_view(mmsb.replay_to_epoch(ref, e))
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- read-only


def test_open_readonly_beside_a_live_writer(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root, fsync="batch")
    try:
        populate(s)
        s.bus.flush()
        files = listing(root)
        time.sleep(0.01)  # so that any write would show in the mtimes
        ro = open_readonly(root)
        assert listing(root) == files
        assert state_view(ro) == state_view(s)
        assert ro.last_lsn == s.last_lsn
        assert mmsb.verify_state_consistency(ro)
        # Writes to the read-only state stay in memory.
        pid = sorted(ro.pages)[0]
        mmsb.write_page(ro, pid, 0, b"memory only")
        mmsb.create_page(ro, 8)
        mmsb.mmsb_stop(ro)
        assert listing(root) == files
        # It took no lock: the writer goes on, and another writer is still refused.
        mmsb.write_page(s, pid, 0, b"writer")
        with pytest.raises(mmsb.BusLockedError):
            start(root)
        s.bus.flush()
        files = listing(root)
        ro2 = open_readonly(root)
        assert listing(root) == files
        assert mmsb.query_page(ro2, pid)[:6] == b"writer"
        assert state_view(ro2) == state_view(s)
    finally:
        mmsb.mmsb_stop(s)


def test_open_readonly_of_a_torn_image_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root, fsync="none")
    p = mmsb.create_page(s, 32)
    for i in range(5):
        mmsb.write_page(s, p.id, i, b"w")
    s.bus.flush()
    image = tmp_path / "image"
    shutil.copytree(root, image)
    mmsb.mmsb_stop(s)
    seg = bus_files(image)["wal"][-1]
    with open(seg, "r+b") as f:
        f.truncate(frames_end(seg.read_bytes()) - 3)
    files = listing(image)
    ro = open_readonly(image)
    assert listing(image) == files
    assert int(ro.pages[p.id].epoch) == 4
    assert ro.recovery_notes


def test_open_readonly_of_no_bus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(mmsb.SerializationError):
        open_readonly(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- stale segments


def _bus_with_old_segment(tmp_path: Path) -> tuple[Path, bytes, tuple]:
    """A bus whose generation moved on; returns its root, the bytes of one of its own
    older-generation segments (full of records), and its state view."""
    root = tmp_path / "bus"
    s = start(root, fsync="none")
    p = mmsb.create_page(s, 16)
    for i in range(8):
        mmsb.write_page(s, p.id, i, bytes([0xA0 + i]))
    s.bus.flush()
    old = bus_files(root)["wal"][-1].read_bytes()
    mmsb.mmsb_stop(s)
    s = start(root, fsync="none")
    mmsb.write_page(s, p.id, 0, b"new")
    mmsb.mmsb_stop(s)
    s = start(root, fsync="none")
    view = full_view(s)
    mmsb.mmsb_stop(s)
    return root, old, view


def _current(root: Path) -> tuple[int, int]:
    """(generation, next segment seq) of a stopped bus."""
    names = [p.name for p in bus_files(root)["wal"]]
    gen = max(int(n[4:20], 16) for n in names)
    seq = max(int(n[21:29], 16) for n in names if int(n[4:20], 16) == gen) + 1
    return gen, seq


def test_stale_segment_of_an_older_generation_is_never_replayed(tmp_path: Path) -> None:
    root, old, view = _bus_with_old_segment(tmp_path)
    gen, _ = _current(root)
    for g in range(1, gen):
        (root / "wal" / f"wal-{g:016x}-00000000.log").write_bytes(old)
        (root / "wal" / f"wal-{g:016x}-00000001.log").write_bytes(old)
    s = start(root, fsync="none")
    try:
        assert full_view(s) == view
    finally:
        mmsb.mmsb_stop(s)


@pytest.mark.parametrize("recovery", ["tolerate_tail", "strict", "point_in_time"])
@pytest.mark.parametrize("source", ["older generation", "foreign bus"])
def test_segment_renamed_into_the_current_generation_is_never_replayed(
        tmp_path: Path, recovery: str, source: str) -> None:
    root, old, view = _bus_with_old_segment(tmp_path)
    if source == "foreign bus":
        other = tmp_path / "other"
        s = start(other, fsync="none")
        q = mmsb.create_page(s, 16)
        for i in range(8):
            mmsb.write_page(s, q.id, i, b"F")
        s.bus.flush()
        old = bus_files(other)["wal"][-1].read_bytes()
        mmsb.mmsb_stop(s)
    gen, seq = _current(root)
    (root / "wal" / f"wal-{gen:016x}-{seq:08x}.log").write_bytes(old)
    try:
        s = start(root, fsync="none", recovery=recovery)
    except mmsb.SerializationError as exc:
        assert recovery != "point_in_time" and "not this bus" in str(exc)
        return
    try:
        assert recovery == "point_in_time"
        assert full_view(s) == view
        assert s.recovery_notes
    finally:
        mmsb.mmsb_stop(s)


def test_segment_of_a_newer_generation_is_never_replayed_and_the_bus_goes_on(
        tmp_path: Path) -> None:
    root, old, view = _bus_with_old_segment(tmp_path)
    gen, _ = _current(root)
    stray = root / "wal" / f"wal-{gen + 1:016x}-00000000.log"
    stray.write_bytes(old)
    s = start(root, fsync="none")
    try:
        assert full_view(s) == view
        assert any("newer" in n for n in s.recovery_notes)
        p = sorted(s.pages)[0]
        mmsb.write_page(s, p, 0, b"go on")
        view2 = state_view(s)
    finally:
        mmsb.mmsb_stop(s)  # checkpoint of generation gen+1
    s = start(root, fsync="none")
    try:
        assert state_view(s) == view2
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- format versions

# A segment header (docs/SerializationSpec.md): "MMSBWAL\0" | version u16 | ... in 32
# bytes, then the CRC32C of those 32 bytes.
@pytest.mark.parametrize("theirs", [0, 3, 0xFFFF])
def test_segment_of_another_version_is_refused_naming_both(tmp_path: Path, theirs: int) -> None:
    from crc32c import crc32c

    path = tmp_path / "bus"
    with start(path) as s:
        mmsb.create_page(s, 8)
        mmsb.write_page(s, 1, 0, b"abc")
    segments = sorted((path / "wal").iterdir())
    assert segments
    assert int.from_bytes(segments[0].read_bytes()[8:10], "little") == 2
    for seg in segments:
        data = bytearray(seg.read_bytes())
        data[8:10] = theirs.to_bytes(2, "little")
        data[32:36] = crc32c(bytes(data[:32])).to_bytes(4, "little")
        seg.write_bytes(bytes(data))
    with pytest.raises(mmsb.SerializationError, match="version") as info:
        start(path)
    message = str(info.value)
    assert f"version {theirs}" in message, message
    assert "reads versions 1, 2" in message, message


def test_an_export_into_a_bus_directorys_own_files_is_refused(tmp_path: Path) -> None:
    """checkpoint_log (and mmsb_stop's checkpoint_path) onto a bus directory's BUS, LOCK
    or WRITE, or into its checkpoints, wal or map folder (also through a link to one,
    and another bus's as well as this state's own): InvalidArgumentError naming the bus,
    and nothing is written: the file wrote over BUS and the bus could not open again.
    An export beside them, or elsewhere, is written."""
    root = tmp_path / "bus"
    other = tmp_path / "other"
    mmsb.mmsb_stop(mmsb.mmsb_start(path=other, enable_gpu=False))
    s = mmsb.mmsb_start(path=root, enable_gpu=False)
    p = mmsb.create_page(s, 64)
    mmsb.write_page(s, p.id, 0, b"kept")
    (tmp_path / "ck-link").symlink_to(root / "checkpoints")
    targets = [root / "BUS", root / "LOCK", root / "WRITE", root / "checkpoints" / "x.mmsb",
               root / "checkpoints" / "ckpt-00000000000000ff.mmsb", root / "wal" / "x",
               root / "map" / "pages", tmp_path / "ck-link" / "y.mmsb", other / "BUS",
               other / "wal" / "z.mmsb"]

    def files() -> dict[str, bytes]:
        return {str(f): f.read_bytes() for d in (root, other) for f in sorted(d.rglob("*"))
                if f.is_file() and f.name not in ("LOCK", "stats")}

    before, lsn = files(), s.last_lsn
    for target in targets:
        with pytest.raises(mmsb.InvalidArgumentError, match="which would break that bus"):
            mmsb.checkpoint_log(s, target)
    with pytest.raises(mmsb.InvalidArgumentError, match="which would break that bus"):
        mmsb.mmsb_stop(s, checkpoint_path=root / "BUS")
    assert not s.closed and s.last_lsn == lsn and files() == before
    assert mmsb.checkpoint_log(s, root / "export.mmsb") > 0
    assert mmsb.checkpoint_log(s, tmp_path / "export.mmsb") > 0
    mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=root, enable_gpu=False)
    try:
        assert mmsb.query_page(s, p.id)[:4] == b"kept"
    finally:
        mmsb.mmsb_stop(s)
    t = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    mmsb.load_checkpoint(t, root / "export.mmsb")
    assert mmsb.query_page(t, p.id)[:4] == b"kept"
