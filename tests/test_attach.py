"""Readers beside a writer: ``mmsb.attach`` (mapped pages, snapshots, wait_for) and the
change feed (``changes``, ``serialize_event``, ``mmsb tail``)."""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from conftest import set_boot_id
from mmsb._storage import mapped
from mmsb._storage.feed import record_events
from mmsb._storage.mapped import HEAD_SIZE, MAP_MAGIC

SRC = str(Path(mmsb.__file__).resolve().parent.parent)


def _bus(path: Path, **cfg: object) -> mmsb.MMSBState:
    return mmsb.mmsb_start(path=path, config=mmsb.MMSBConfig(**cfg), enable_gpu=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "LOCK"}


def _log_events(path: Path, since: int = 0) -> list[mmsb.Event]:
    st = mmsb.open_readonly(path)
    return [e for r in st.log.iter_records(since) for e in record_events(r)]


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[tuple[Path, mmsb.MMSBState]]:
    s = _bus(tmp_path / "bus")
    yield tmp_path / "bus", s
    if not s.closed:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- reading

def test_a_reader_sees_every_call_of_the_writer(bus: tuple[Path, mmsb.MMSBState]) -> None:
    path, s = bus
    p = mmsb.create_page(s, 1024)
    with mmsb.attach(path) as r:
        assert r.page_ids() == [p.id]
        assert r.read_page(p.id) == bytes(1024)
        mmsb.write_page(s, p.id, 10, b"abc")
        assert r.read_page(p.id) == mmsb.query_page(s, p.id)
        assert r.page_epoch(p.id) == p.epoch == 1
        assert r.last_lsn == s.last_lsn
        assert r.writer_pid == os.getpid()
        mmsb.resize_page(s, p.id, 3000)
        assert r.read_page(p.id) == mmsb.query_page(s, p.id)
        q = mmsb.create_page(s, 16)
        mmsb.delete_page(s, p.id)
        assert r.page_ids() == [q.id]
        with pytest.raises(mmsb.PageNotFoundError):
            r.read_page(p.id)
        with mmsb.batch(s) as b:
            b.write(q.id, 0, b"x" * 16)
        assert r.read_page(q.id) == b"x" * 16
    assert r.closed


def test_files_grow_and_readers_remap(bus: tuple[Path, mmsb.MMSBState]) -> None:
    path, s = bus
    r = mmsb.attach(path)
    ids = [mmsb.create_page(s, 4096).id for _ in range(600)]  # 2.4 MiB > the first 1 MiB
    many = mmsb.create_pages(s, 3000, 8)  # more rows than the first table holds
    for i in ids[::37]:
        mmsb.write_page(s, i, 0, i.to_bytes(4, "little"))
    for i in ids[::37]:
        assert r.read_page(i)[:4] == i.to_bytes(4, "little")
    assert len(r.page_ids()) == 3600
    assert r.read_page(many[-1].id) == bytes(8)
    snap = r.snapshot()
    assert snap.lsn == s.last_lsn and len(snap.pages) == 3600
    assert snap.pages[ids[37]][:4] == ids[37].to_bytes(4, "little")
    r.close()


def test_the_mapped_files_are_private_and_rebuilt_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    s = _bus(path)
    p = mmsb.create_page(s, 64)
    mmsb.write_page(s, p.id, 0, b"one")
    mmsb.mmsb_stop(s)
    for name in ("HEAD", "table", "pages"):
        mode = stat.S_IMODE((path / "map" / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    # A reader of a stopped bus still reads its last published pages.
    with mmsb.attach(path) as r:
        assert r.read_page(p.id)[:3] == b"one"
        assert r.writer_pid is None
    # Wrong bytes in the pages file are replaced by the log's truth at the next open.
    with open(path / "map" / "pages", "r+b") as f:
        f.write(b"\xff" * 64)
    s = _bus(path)
    with mmsb.attach(path) as r:
        assert r.read_page(p.id) == mmsb.query_page(s, p.id)
    mmsb.mmsb_stop(s)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd (Linux)")
def test_a_reader_dropped_without_close_releases_its_descriptors(
        bus: tuple[Path, mmsb.MMSBState]) -> None:
    """Readers attached and dropped, never closed, give their descriptors back when they
    are collected (they kept three each until the process ran out); a closed one is not
    closed twice."""
    import gc

    path, s = bus
    p = mmsb.create_page(s, 64)
    mmsb.write_page(s, p.id, 0, b"x")

    def count() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    mmsb.attach(path).close()  # (whatever a first attach keeps for the process)
    before = count()
    for _ in range(40):
        r = mmsb.attach(path)
        assert r.read_page(p.id)[:1] == b"x"
        assert [e.lsn for e in r.changes(0)][-1] == s.last_lsn
        del r
    assert count() <= before
    r = mmsb.attach(path)
    r.close()
    del r
    assert count() <= before


def test_a_remap_from_older_lengths_never_replaces_a_newer_one(
        bus: tuple[Path, mmsb.MMSBState], monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads sharing a reader remap one at a time. Thread B starts remapping to the
    lengths the head gives after one growth and is held inside mmap; the files grow
    again, and thread C remaps. C must not map before B is done (each stored its
    mappings and lengths as separate attributes, so a thread could pair a length with
    a mapping shorter than it: "buffer is smaller than requested size"), and B must not
    then store its older mappings over C's: the reader ends mapped at the head's
    newest lengths, and every page reads."""
    path, s = bus
    first = mmsb.create_page(s, 64)
    r = mmsb.attach(path)
    m = r._map
    real_mmap = mapped.mmap.mmap
    inside, release = threading.Event(), threading.Event()
    held: list[threading.Thread] = []

    def held_mmap(*args: object, **kwargs: object) -> mmap.mmap:
        if held and threading.current_thread() is held[0] and not release.is_set():
            inside.set()
            release.wait(10)
        return real_mmap(*args, **kwargs)

    def head_lengths() -> tuple[int, int]:
        return int(m.h[mapped._PAGES_BYTES]), int(m.h[mapped._TABLE_BYTES])

    monkeypatch.setattr(mapped.mmap, "mmap", held_mmap)
    try:
        mmsb.create_pages(s, 40, 1 << 16)  # the files grow: B's lengths
        b = threading.Thread(target=m._remap)
        held.append(b)
        b.start()
        assert inside.wait(10)
        ids = [p.id for p in mmsb.create_pages(s, 40, 1 << 17)]  # they grow again
        newest = head_lengths()
        c = threading.Thread(target=m._remap)
        c.start()
        c.join(0.3)
        assert c.is_alive()  # C waits for B
        release.set()
        b.join(10)
        c.join(10)
    finally:
        release.set()
        monkeypatch.undo()
    assert (m.maps[1], m.maps[3]) == newest == head_lengths()
    assert r.read_page(first.id) == bytes(64)
    assert r.read_page(ids[-1]) == bytes(1 << 17)
    assert sorted(r.snapshot().pages) == sorted(s.pages)
    r.close()


def test_snapshot_is_consistent_at_one_lsn(bus: tuple[Path, mmsb.MMSBState]) -> None:
    path, s = bus
    a, b = mmsb.create_page(s, 32), mmsb.create_page(s, 32)
    with mmsb.attach(path) as r:
        for i in range(50):
            mmsb.apply_batch(s, [(a.id, 0, bytes([i]) * 32), (b.id, 0, bytes([i]) * 32)])
            snap = r.snapshot([a.id, b.id])
            assert snap.pages[a.id] == snap.pages[b.id] == bytes([i]) * 32
            assert snap.lsn == s.last_lsn
        with pytest.raises(mmsb.PageNotFoundError):
            r.snapshot([a.id, 999])
        assert r.snapshot(a.id).pages == {a.id: bytes([49]) * 32}


def test_wait_for(bus: tuple[Path, mmsb.MMSBState]) -> None:
    path, s = bus
    p = mmsb.create_page(s, 8)
    with mmsb.attach(path) as r:
        assert r.wait_for(s.last_lsn, timeout=0)
        assert not r.wait_for(s.last_lsn + 1, timeout=0.05)
        mmsb.write_page(s, p.id, 0, b"1")
        assert r.wait_for(s.last_lsn, timeout=1)


# --------------------------------------------------------------------------- refusals

def _waiting(path: Path) -> int:
    return struct.unpack_from("<I", (path / "map" / "waiters").read_bytes(), 16)[0]


def test_a_follower_is_counted_while_it_sleeps_and_woken(bus: tuple[Path, mmsb.MMSBState]) -> None:
    import threading

    path, s = bus
    p = mmsb.create_page(s, 8)
    assert (path / "map" / "waiters").read_bytes()[:8] == b"MMSBWAIT"
    with mmsb.attach(path) as r:
        target = s.last_lsn + 1
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(r.wait_for(target, timeout=30)))
        t.start()
        deadline = time.monotonic() + 10
        while _waiting(path) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert _waiting(path) == 1  # the writer now knows it must wake somebody
        started = time.monotonic()
        mmsb.write_page(s, p.id, 0, b"wake")
        t.join(10)
        assert got == [True] and time.monotonic() - started < 5
        assert _waiting(path) == 0
        # Nobody waits: publications leave the count at zero.
        mmsb.write_page(s, p.id, 0, b"more")
        assert _waiting(path) == 0


def test_a_follower_that_cannot_write_the_count_still_follows(bus: tuple[Path, mmsb.MMSBState]) -> None:
    import threading

    path, s = bus
    p = mmsb.create_page(s, 8)
    os.chmod(path / "map" / "waiters", 0o400)
    try:
        r = mmsb.attach(path)
    finally:
        os.chmod(path / "map" / "waiters", 0o600)
    if os.geteuid() == 0:  # root opens a 0400 file for writing anyway: remove it instead
        r.close()
        (path / "map" / "waiters").unlink()
        r = mmsb.attach(path)
    with r:
        assert r._map.waiters_addr == 0  # sleeps in short steps, uncounted
        target = s.last_lsn + 1
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(r.wait_for(target, timeout=30)))
        t.start()
        time.sleep(0.05)
        mmsb.write_page(s, p.id, 0, b"x")
        t.join(10)
        assert got == [True]
        assert r.read_page(p.id)[:1] == b"x"


def test_a_damaged_waiters_file_is_renewed_by_the_writer(tmp_path: Path) -> None:
    from mmsb._storage.mapped import _open_waiters

    path = tmp_path / "bus"
    mmsb.mmsb_stop(_bus(path))
    (path / "map" / "waiters").write_bytes(b"junk")
    with pytest.raises(mmsb.SerializationError, match="waiters"):
        _open_waiters(path / "map", create=False)
    with mmsb.attach(path) as r:  # a follower that cannot be counted still reads
        assert r.last_lsn >= 0 and not r.wait_for(r.last_lsn + 1, timeout=0.01)
    assert (path / "map" / "waiters").read_bytes() == b"junk"  # followers never repair it
    s = _bus(path)
    try:
        data = (path / "map" / "waiters").read_bytes()
        assert data[:8] == b"MMSBWAIT" and len(data) == 64 and _waiting(path) == 0
    finally:
        mmsb.mmsb_stop(s)


def test_refused_reader_calls_change_nothing(bus: tuple[Path, mmsb.MMSBState],
                                            tmp_path: Path) -> None:
    path, s = bus
    p = mmsb.create_page(s, 8)
    mmsb.write_page(s, p.id, 0, b"1")
    before = _files(path)
    lsn = s.last_lsn
    with pytest.raises(mmsb.SerializationError, match="no MMSB bus"):
        mmsb.attach(tmp_path / "nothing")
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.attach(42)  # type: ignore[arg-type]
    r = mmsb.attach(path)
    for bad in (0, -1, 999, "1", True, 1.0):
        with pytest.raises(mmsb.PageNotFoundError):
            r.read_page(bad)  # type: ignore[arg-type]
    for bad_lsn in (-1, "3", None, True):
        with pytest.raises(mmsb.InvalidArgumentError):
            r.wait_for(bad_lsn, timeout=0)  # type: ignore[arg-type]
    for bad_timeout in (-1, True, "1", float("nan"), -float("inf")):
        with pytest.raises(mmsb.InvalidArgumentError, match="timeout must be a number"):
            r.wait_for(1, timeout=bad_timeout)  # type: ignore[arg-type]
        with pytest.raises(mmsb.InvalidArgumentError, match="timeout must be a number"):
            r.changes(0, follow=True, timeout=bad_timeout)  # type: ignore[arg-type]
    for bad_since in (-1, "0", 1.5, True):
        with pytest.raises(mmsb.InvalidArgumentError):
            r.changes(bad_since)  # type: ignore[arg-type]
    for bad_ids in (object(), "12", b"\x01"):
        with pytest.raises(mmsb.InvalidArgumentError, match="page_ids must be"):
            r.snapshot(bad_ids)
    r.close()
    with pytest.raises(mmsb.StateClosedError):
        r.read_page(p.id)
    with pytest.raises(mmsb.StateClosedError):
        r.snapshot()
    assert _files(path) == before and s.last_lsn == lsn


def test_a_bus_no_writer_has_published_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    mmsb.mmsb_stop(_bus(path))
    for name in ("HEAD", "table", "pages"):
        (path / "map" / name).unlink()
    with pytest.raises(mmsb.SerializationError, match="no mapped pages"):
        mmsb.attach(path)


def test_pages_from_before_a_restart_of_the_machine_are_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    s = _bus(path)
    p = mmsb.create_page(s, 8)
    mmsb.write_page(s, p.id, 0, b"x")
    mmsb.mmsb_stop(s)
    head = bytearray((path / "map" / "HEAD").read_bytes())
    head[24:40] = bytes(range(1, 17))  # another boot's id, checksum made valid
    from mmsb._storage.codec import crc32c
    head[48:52] = struct.pack("<I", crc32c(bytes(head[:48])))
    (path / "map" / "HEAD").write_bytes(bytes(head))
    with pytest.raises(mmsb.HistoryUnavailableError, match="restarted"):
        mmsb.attach(path)
    s = _bus(path)  # the writer's open rebuilds them from the log
    with mmsb.attach(path) as r:
        assert r.read_page(p.id) == b"x" + bytes(7)
    mmsb.mmsb_stop(s)


def test_damaged_or_hostile_mapped_files(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    s = _bus(path)
    p = mmsb.create_page(s, 8)
    mmsb.mmsb_stop(s)
    head = (path / "map" / "HEAD").read_bytes()
    assert head[:8] == MAP_MAGIC and len(head) == HEAD_SIZE
    for at in (0, 9, 17, 30, 44, 49):  # the identity's bytes, covered by the checksum
        bad = bytearray(head)
        bad[at] ^= 0x40
        (path / "map" / "HEAD").write_bytes(bytes(bad))
        with pytest.raises(mmsb.SerializationError):
            mmsb.attach(path)
    (path / "map" / "HEAD").write_bytes(head[:100])
    with pytest.raises(mmsb.SerializationError, match="shorter"):
        mmsb.attach(path)
    (path / "map" / "HEAD").write_bytes(head)
    # A table row pointing past the pages file reads as no page, never out of bounds.
    with open(path / "map" / "table", "r+b") as f:
        f.seek(p.id * 32)
        f.write(struct.pack("<qq", 1 << 40, 8))
    with mmsb.attach(path) as r:
        with pytest.raises(mmsb.PageNotFoundError):
            r.read_page(p.id)
    # A symbolic link where a mapped file belongs is never followed.
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 4096)
    (path / "map" / "HEAD").unlink()
    (path / "map" / "HEAD").symlink_to(target)
    with pytest.raises(mmsb.SerializationError):
        mmsb.attach(path)
    with pytest.raises(mmsb.DurabilityError):
        _bus(path)
    assert target.read_bytes() == b"\0" * 4096
    (path / "map" / "HEAD").unlink()
    # Nor where the waiters file belongs, and a FIFO there never blocks an open.
    waiters = path / "map" / "waiters"
    waiters.unlink()
    waiters.symlink_to(target)
    with pytest.raises(mmsb.DurabilityError):
        _bus(path)
    assert target.read_bytes() == b"\0" * 4096
    waiters.unlink()
    os.mkfifo(waiters)
    with pytest.raises(mmsb.DurabilityError):
        _bus(path)
    waiters.unlink()
    s = _bus(path)  # with the file gone, the next open makes it again
    try:
        assert waiters.read_bytes()[:8] == b"MMSBWAIT"
    finally:
        mmsb.mmsb_stop(s)


def test_mapped_files_shorter_than_their_head_says_are_refused(tmp_path: Path) -> None:
    """A head whose lengths go past its files (a file cut, or the lengths edited): an
    attach, and a reader already attached at its next read, get SerializationError
    naming the file, never a ValueError from mmap or SIGBUS, and nothing changes: the
    files stay as they were, and an attached reader reads again once the head is put
    back."""
    path = tmp_path / "bus"
    s = _bus(path)
    p = mmsb.create_page(s, 1024)
    mmsb.write_page(s, p.id, 0, b"kept")
    mmsb.mmsb_stop(s)
    head_path = path / "map" / "HEAD"
    head = head_path.read_bytes()
    plen, tlen = struct.unpack_from("<QQ", head, mapped._PAGES_BYTES * 8)
    for name, length in (("pages", plen), ("table", tlen)):
        f = path / "map" / name
        whole = f.read_bytes()
        assert len(whole) == length
        os.truncate(f, 64)
        cut = _files(path)
        with pytest.raises(mmsb.SerializationError, match=f"gives {name} {length} bytes, "
                           "but the file is 64 bytes") as err:
            mmsb.attach(path)
        assert err.value.path == str(f)
        assert _files(path) == cut
        f.write_bytes(whole)
    r = mmsb.attach(path)
    try:
        assert r.read_page(p.id)[:4] == b"kept"
        before = _files(path)
        for delta in (4096, 1 << 40, (1 << 63) - plen):
            bad = bytearray(head)
            struct.pack_into("<Q", bad, mapped._PAGES_BYTES * 8, plen + delta)
            head_path.write_bytes(bytes(bad))
            with pytest.raises(mmsb.SerializationError, match="mapped files were cut or edited"):
                r.read_page(p.id)
            with pytest.raises(mmsb.SerializationError, match="mapped files were cut or edited"):
                mmsb.attach(path)
        head_path.write_bytes(head)
        assert _files(path) == before
        assert r.read_page(p.id)[:4] == b"kept"
    finally:
        r.close()


@pytest.mark.parametrize("kind", ["file", "fifo", "symlink"])
@pytest.mark.parametrize("folder", ["wal", "checkpoints"])
def test_a_folder_of_the_bus_replaced_is_refused_by_readers(tmp_path: Path, folder: str,
                                                           kind: str) -> None:
    """Something else at DIR/wal or DIR/checkpoints (a file, a FIFO, or a symlink to a
    copy of the very folder): a read-only open, a reader's change feed and a writer's
    open are refused with a typed error naming it, never a listing through it (which
    showed an empty or a foreign bus as this one) nor a NotADirectoryError, and
    nothing changes; with the folder back, all of them read the bus again."""
    path = tmp_path / "bus"
    s = _bus(path, checkpoint_interval=0)
    p = mmsb.create_page(s, 8)
    mmsb.write_page(s, p.id, 0, b"one")
    mmsb.write_page(s, p.id, 0, b"two")
    lsn = s.last_lsn
    r = mmsb.attach(path)
    try:
        assert [e.lsn for e in r.changes(0)][-1] == lsn
        real = path / folder
        aside = tmp_path / f"{folder}-aside"
        os.rename(real, aside)
        if kind == "file":
            real.write_bytes(b"x")
        elif kind == "fifo":
            os.mkfifo(real)
        else:
            os.symlink(aside, real)  # the same files, through a link
        before = _files(path)
        with pytest.raises(mmsb.SerializationError, match=f"{folder} is not a folder of the bus"):
            mmsb.open_readonly(path)
        if folder == "wal":
            with pytest.raises(mmsb.SerializationError, match="wal is not a folder of the bus"):
                list(r.changes(0))
        assert _files(path) == before and s.last_lsn == lsn
        real.unlink()
        os.rename(aside, real)
        assert mmsb.query_page(mmsb.open_readonly(path), p.id)[:3] == b"two"
        assert [e.lsn for e in r.changes(0)][-1] == lsn
    finally:
        r.close()
        mmsb.mmsb_stop(s)
    os.rename(real, aside)
    os.symlink(aside, real)
    with pytest.raises(mmsb.DurabilityError, match="symlink or not a regular file"):
        _bus(path)


def test_a_writer_that_died_while_publishing_is_reported(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bus"
    s = _bus(path)
    p = mmsb.create_page(s, 8)
    mmsb.mmsb_stop(s)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path / "map" / "HEAD", "r+b") as f:
        f.seek(64)
        (seq,) = struct.unpack("<Q", f.read(8))
        f.seek(64)
        f.write(struct.pack("<Q", seq | 1))
        f.seek(120)
        f.write(struct.pack("<Q", dead.pid))
    with mmsb.attach(path) as r:
        t0 = time.monotonic()
        with pytest.raises(mmsb.DurabilityError, match="middle of publishing"):
            r.read_page(p.id)
        assert time.monotonic() - t0 < 3
    s = _bus(path)
    with mmsb.attach(path) as r:
        assert r.read_page(p.id) == bytes(8)
    mmsb.mmsb_stop(s)


def test_a_long_publication_is_waited_for_while_it_makes_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live writer's publication that lasts longer than the stall limit is waited for
    as long as its progress word moves (a rebuild of gigabytes is not a stall); one
    whose word stands still for the limit is given up on, and a later publication reads
    again."""
    monkeypatch.setattr(mapped, "_STALL_LIMIT", 0.3)
    path = tmp_path / "bus"
    s = _bus(path)
    try:
        p = mmsb.create_page(s, 8)
        mmsb.write_page(s, p.id, 0, b"\x05" * 8)
        head = s.bus.publisher.head
        (seq,) = struct.unpack_from("<Q", head, 64)
        with mmsb.attach(path) as r:
            # This process is the writer (alive); its publication is made to last four
            # times the limit, stepping its progress word every 50 ms.
            struct.pack_into("<Q", head, 64, seq | 1)

            def publishing() -> None:
                end = time.monotonic() + 1.2
                step = 0
                while time.monotonic() < end:
                    step += 1
                    struct.pack_into("<Q", head, mapped._PROGRESS_OFF, step)
                    time.sleep(0.05)
                struct.pack_into("<Q", head, 64, (seq | 1) + 1)

            t = threading.Thread(target=publishing)
            t.start()
            try:
                # Returns only once seq is even again: after the whole publication.
                assert r.read_page(p.id) == b"\x05" * 8
            finally:
                t.join()
            # The same publication with its word standing still: given up on.
            struct.pack_into("<Q", head, 64, seq + 3)
            with pytest.raises(mmsb.DurabilityError, match="no progress for 0.3 s"):
                r.read_page(p.id)
            struct.pack_into("<Q", head, 64, seq + 4)
            mmsb.write_page(s, p.id, 0, b"\x06" * 8)
            assert r.read_page(p.id) == b"\x06" * 8
    finally:
        mmsb.mmsb_stop(s)


def test_publications_step_their_progress_word(tmp_path: Path) -> None:
    """A partial publication steps it once per _PROGRESS_PAGES pages, one of a few pages
    not at all unless it grows the files; a full one (the rebuild of files of another
    boot) once per arena chunk it copies, and as it grows the files."""
    path = tmp_path / "bus"

    def progress() -> int:
        return struct.unpack_from("<Q", (path / "map" / "HEAD").read_bytes(),
                                  mapped._PROGRESS_OFF)[0]

    s = _bus(path)
    try:
        ids = [pg.id for pg in mmsb.create_pages(s, 2 * mapped._PROGRESS_PAGES + 10, 8)]
        before = progress()
        with mmsb.batch(s):
            for pid in ids:
                mmsb.write_page(s, pid, 0, b"\x01")
        assert progress() == before + 2
        mmsb.write_page(s, ids[0], 0, b"\x02")
        assert progress() == before + 2
        # A few pages that do not fit the pages file: its growth steps the word.
        grown = progress()
        mmsb.create_pages(s, 3, 1 << 20)
        assert progress() > grown
    finally:
        mmsb.mmsb_stop(s)
    set_boot_id(path, bytes(range(16)))
    before = progress()
    s = _bus(path)
    try:
        assert progress() > before
        with mmsb.attach(path) as r:
            assert r.read_page(ids[0]) == b"\x02" + bytes(7)
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- other processes

_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {src!r})
    import mmsb
    s = mmsb.mmsb_start(path={path!r}, config=mmsb.MMSBConfig(max_tlog_size={tlog}), enable_gpu=False)
    ids = [p for p in sorted(s.pages)] or [mmsb.create_page(s, {size}).id for _ in range({pages})]
    for q in ids:
        if len(mmsb.query_page(s, q)) != {size}:
            mmsb.resize_page(s, q, {size})
    print("open", s.last_lsn, flush=True)
    i = int.from_bytes(mmsb.query_page(s, ids[0])[:1], "little")
    n = 0
    while n < {writes}:
        i = (i + 1) % 256
        pid = ids[n % len(ids)]
        if n % 7 == 3:
            mmsb.apply_batch(s, [(q, 0, bytes([i]) * {size}) for q in ids[:2]])
        else:
            mmsb.update_page(s, pid, bytes([i]) * {size})
        n += 1
        print("ack", s.last_lsn, flush=True)
    print("done", flush=True)
    time.sleep(60)
""")


def _start_writer(path: Path, *, writes: int, pages: int = 4, size: int = 1024,
                  tlog: int = 10000) -> subprocess.Popen[str]:
    code = _WRITER.format(src=SRC, path=str(path), writes=writes, pages=pages, size=size,
                          tlog=tlog)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("open"), line
    return proc


def test_a_reader_in_this_process_never_sees_a_torn_page(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    w = _start_writer(path, writes=3000)
    try:
        r = mmsb.attach(path)
        ids = r.page_ids()
        reads = 0
        deadline = time.monotonic() + 20
        while w.poll() is None and time.monotonic() < deadline:
            for pid in ids:
                data = r.read_page(pid)
                assert data == data[:1] * len(data), "a torn page"
                reads += 1
            snap = r.snapshot(ids)
            for data in snap.pages.values():
                assert data == data[:1] * len(data), "a torn page in a snapshot"
            if reads > 20000:
                break
        assert reads > 100
        r.close()
    finally:
        w.kill()
        w.wait()


def test_changes_follow_a_writer_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    w = _start_writer(path, writes=400, tlog=50)  # checkpoints every 50 records
    try:
        with mmsb.attach(path) as r:
            seen = []
            for ev in r.changes(0, follow=True, timeout=10):
                seen.append(ev)
                if ev.lsn >= 4 + 400 + 400 // 7:  # creates, writes, batches' extra records
                    break
        assert w.stdout is not None
        lsns = [e.lsn for e in seen]
        assert lsns == sorted(lsns)
        assert seen == _log_events(path)[: len(seen)]
    finally:
        w.kill()
        w.wait()


def test_changes_resume_across_kills_of_both_sides(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    tail_cmd = [sys.executable, "-m", "mmsb", "tail", str(path), "--follow", "--json",
                "--timeout", "10"]
    env = dict(os.environ, PYTHONPATH=SRC)
    got: list[str] = []
    last = 0
    for rnd in range(3):
        w = _start_writer(path, writes=150, tlog=40)
        follower = subprocess.Popen([*tail_cmd, "--since", str(last)], stdout=subprocess.PIPE,
                                    text=True, env=env)
        assert follower.stdout is not None and w.stdout is not None
        # The writer is killed mid-run; the follower is killed after some lines.
        for _ in range(60 + 20 * rnd):
            w.stdout.readline()
        w.send_signal(signal.SIGKILL)
        w.wait()
        for _ in range(40):
            line = follower.stdout.readline()
            if not line:
                break
            got.append(line)
            last = int(line.split('"lsn": ')[1].split(",")[0])
        follower.send_signal(signal.SIGKILL)
        follower.wait()
    # Drain what is left, then compare with the log.
    out = subprocess.run([sys.executable, "-m", "mmsb", "tail", str(path), "--json", "--since",
                          str(last)], capture_output=True, text=True, env=env, check=True)
    got.extend(out.stdout.splitlines(keepends=True))
    import json

    lsns = [json.loads(g)["lsn"] for g in got]
    expected = _log_events(path)
    assert [e.lsn for e in expected] == lsns, "each event exactly once, in order"
    assert [json.loads(g)["type"] for g in got] == [e.type.name for e in expected]


def test_changes_read_back_from_checkpoints_and_refuse_lost_history(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    s = _bus(path, max_tlog_size=20, retain_checkpoints=2)
    p = mmsb.create_page(s, 16)
    for i in range(200):
        mmsb.write_page(s, p.id, i % 16, bytes([i % 256]))
    with mmsb.attach(path) as r:
        horizon = mmsb.open_readonly(path).log.horizon_lsn
        assert horizon > 0
        evs = list(r.changes(horizon))
        assert evs == _log_events(path, horizon)
        assert evs[0].lsn == horizon + 1 and evs[-1].lsn == s.last_lsn
        with pytest.raises(mmsb.HistoryUnavailableError):
            list(r.changes(0))
        assert list(r.changes(s.last_lsn)) == []
    mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- events

_payload = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=20)
    | st.binary(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(etype=st.sampled_from(list(mmsb.EventType)), ts=st.integers(0, (1 << 64) - 1),
       lsn=st.integers(0, (1 << 64) - 1), pid=st.integers(0, (1 << 64) - 1),
       payload=st.dictionaries(st.text(max_size=10), _payload, max_size=5))
def test_events_round_trip(etype: mmsb.EventType, ts: int, lsn: int, pid: int,
                           payload: dict[str, object]) -> None:
    ev = mmsb.Event(etype, ts, lsn, pid, payload)
    data = mmsb.serialize_event(ev)
    back = mmsb.deserialize_event(data)
    assert back == ev and mmsb.serialize_event(back) == data


def test_every_damaged_event_is_refused() -> None:
    ev = mmsb.Event(mmsb.EventType.PAGE_CHANGED, 123, 7, 3, {"epoch": 2, "source": "api"})
    data = mmsb.serialize_event(ev)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            with pytest.raises(mmsb.SerializationError):
                mmsb.deserialize_event(bytes(bad))
    for cut in range(len(data)):
        with pytest.raises(mmsb.SerializationError):
            mmsb.deserialize_event(data[:cut])
    with pytest.raises(mmsb.SerializationError):
        mmsb.deserialize_event(data + b"\0")
    with pytest.raises(mmsb.SerializationError):
        mmsb.deserialize_event("text")  # type: ignore[arg-type]


def test_events_that_cannot_be_serialized_are_refused() -> None:
    E, T = mmsb.Event, mmsb.EventType.PAGE_CREATED
    for bad in (E(T, -1, 0, 0), E(T, 0, 1 << 64, 0), E(T, 0, 0, 0, {1: 2}),  # type: ignore[dict-item]
                E(T, 0, 0, 0, {"x": object()}), E(99, 0, 0, 0), "event"):  # type: ignore[arg-type]
        with pytest.raises(mmsb.InvalidArgumentError):
            mmsb.serialize_event(bad)  # type: ignore[arg-type]


def test_every_record_kind_has_its_events(bus: tuple[Path, mmsb.MMSBState]) -> None:
    path, s = bus
    a = mmsb.create_page(s, 8)
    mmsb.create_pages(s, 3, 4)
    b = mmsb.clone_page(s, a.id)
    mmsb.write_page(s, a.id, 0, b"zz")
    mmsb.resize_page(s, a.id, 16)
    mmsb.set_metadata(s, a.id, "k", 1)
    mmsb.add_dependency(s, a.id, b.id, mmsb.DATA_DEPENDENCY)
    mmsb.remove_dependency(s, a.id, b.id)
    mmsb.delete_page(s, b.id)
    with mmsb.attach(path) as r:
        evs = list(r.changes())
    types = [e.type.name for e in evs]
    assert types == ["PAGE_CREATED"] * 4 + ["PAGE_CREATED", "PAGE_CHANGED", "PAGE_RESIZED",
                                            "METADATA_CHANGED", "EDGE_ADDED", "EDGE_REMOVED",
                                            "PAGE_DELETED"]
    assert evs[4].payload == {"source_id": a.id}
    assert evs[5].payload["bytes"] == 2 and evs[5].payload["epoch"] == 1
    assert all(mmsb.deserialize_event(mmsb.serialize_event(e)) == e for e in evs)
    assert [e.lsn for e in evs] == [1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9]


def test_tail_command(bus: tuple[Path, mmsb.MMSBState]) -> None:
    path, s = bus
    p = mmsb.create_page(s, 8)
    mmsb.write_page(s, p.id, 0, b"1")
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-m", "mmsb", "tail", str(path)], capture_output=True,
                         text=True, env=env, check=True).stdout.splitlines()
    assert len(out) == 2 and "PAGE_CREATED" in out[0] and "PAGE_CHANGED" in out[1]
    bad = subprocess.run([sys.executable, "-m", "mmsb", "tail", str(path / "nope")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("mmsb: error:")


# --------------------------------------------------------------------------- torture

_READER = textwrap.dedent("""
    import hashlib, json, random, sys, time
    sys.path.insert(0, {src!r})
    import mmsb
    import os
    path, out, stop, seed = {path!r}, {out!r}, {stop!r}, {seed}
    rng = random.Random(seed)
    r = None
    seen = []
    end = time.monotonic() + 120
    while time.monotonic() < end and not os.path.exists(stop):
        try:
            if r is None:
                r = mmsb.attach(path)
            snap = r.snapshot()
            pids = sorted(snap.pages)
            if not pids:
                continue
            pid = rng.choice(pids)
            seen.append((snap.lsn, pid, hashlib.blake2b(snap.pages[pid]).hexdigest()))
            data, epoch, lsn = r._map.read(pid)
            seen.append((lsn, pid, hashlib.blake2b(data).hexdigest()))
        except mmsb.PageNotFoundError:
            pass
        except mmsb.DurabilityError:
            time.sleep(0.01)  # the writer died while publishing: wait for the next one
    with open(out, "w") as f:
        json.dump(seen, f)
""")


def test_torture_readers_beside_a_writer_killed_and_restarted(tmp_path: Path) -> None:
    """Four reader processes read a bus for a bounded time while its writer is killed
    with SIGKILL at random moments and restarted; every page any reader saw equals that
    page at the LSN it was published at, in the final log's history."""
    import json
    import random

    path = tmp_path / "bus"
    stop = tmp_path / "stop"
    rng = random.Random(7)
    mmsb.mmsb_stop(_bus(path))
    readers = []
    for k in range(4):
        code = _READER.format(src=SRC, path=str(path), out=str(tmp_path / f"r{k}.json"),
                              stop=str(stop), seed=k)
        readers.append(subprocess.Popen([sys.executable, "-c", code]))
    for rnd in range(4):
        w = _start_writer(path, writes=100_000, pages=6, size=256 + 64 * rnd, tlog=300)
        time.sleep(rng.uniform(0.3, 1.0))
        w.send_signal(signal.SIGKILL)
        w.wait()
    stop.touch()
    for p in readers:
        assert p.wait(timeout=60) == 0
    s = _bus(path)  # recover what the last writer left
    final = mmsb.open_readonly(path)
    samples = []
    for k in range(4):
        samples.extend(json.loads((tmp_path / f"r{k}.json").read_text()))
    assert len(samples) > 200
    checked = 0
    for lsn, pid, digest in samples[:: max(1, len(samples) // 400)]:
        want = mmsb.read_page_at(final, pid, lsn=lsn)
        assert hashlib.blake2b(want).hexdigest() == digest, (lsn, pid)
        checked += 1
    assert checked > 100
    assert mmsb.verify_state_consistency(s)
    mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- shared writers

def test_shared_writers_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    cfg = mmsb.MMSBConfig(max_tlog_size=20, segment_bytes=2048)
    a = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False, config=cfg)
    b = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False, config=cfg)
    with pytest.raises(mmsb.BusLockedError, match="shared=True"):
        mmsb.mmsb_start(path=path, enable_gpu=False)
    p = mmsb.create_page(a, 64)
    mmsb.write_page(b, p.id, 0, b"from b")  # b catches up with a's create first
    mmsb.write_page(a, p.id, 6, b"+a")
    assert mmsb.query_page(a, p.id)[:8] == b"from b+a"
    q = mmsb.create_page(b, 8)
    assert q.id == p.id + 1  # page ids continue across writers
    # Checkpoints by either writer (every 20 records), segment rolls (2 KiB).
    for i in range(300):
        mmsb.write_page(a if i % 3 else b, p.id, i % 60, bytes([i % 250 + 1]) * 4)
    assert a.bus.generation > 3
    # A delta built on an epoch another writer has moved past is refused, and refused
    # deltas change nothing.
    stale = mmsb.create_delta(a, p.id, np.ones(64, bool), bytes(64))
    mmsb.write_page(b, p.id, 0, b"newer")
    lsn = b.last_lsn
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.route_delta(a, stale)
    assert a.last_lsn == lsn and mmsb.query_page(a, p.id)[:5] == b"newer"
    # History-rewriting calls need exclusive use; refused, nothing changes.
    before = mmsb.query_page(a, p.id)
    with pytest.raises(mmsb.InvalidArgumentError, match="exclusive"):
        mmsb.compress_log(a)
    assert mmsb.query_page(a, p.id) == before and a.last_lsn == lsn
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.mmsb_start(path=path, shared=1)  # type: ignore[arg-type]
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.mmsb_start(shared=True)
    mmsb.mmsb_stop(a)
    mmsb.write_page(b, p.id, 0, b"last")
    mmsb.mmsb_stop(b)
    c = _bus(path)
    assert mmsb.query_page(c, p.id)[:4] == b"last"
    assert mmsb.verify_state_consistency(c)
    with pytest.raises(mmsb.BusLockedError, match="exclusive"):
        mmsb.mmsb_start(path=path, shared=True, enable_gpu=False)
    mmsb.mmsb_stop(c)


def test_a_shared_writer_repairs_what_a_dead_writer_left(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    a = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False)
    b = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False)
    p, q = mmsb.create_page(a, 16), mmsb.create_page(a, 16)
    mmsb.write_page(a, p.id, 0, b"p")
    # b's last look was before a's records; then a "dies" in the middle of publishing
    # (seq left odd) after appending a record it never published.
    assert b.bus is not None and a.bus is not None
    pub = a.bus.publisher
    assert pub is not None
    mmsb.write_page(b, q.id, 0, b"q")
    head = pub.head
    (seq,) = struct.unpack_from("<Q", head, 64)
    pub.publish = lambda state: None  # type: ignore[method-assign]  # a's next record is never published
    mmsb.write_page(a, p.id, 1, b"!")
    del pub.publish
    struct.pack_into("<Q", head, 64, seq | 1)
    with open(path / "map" / "pages", "r+b") as f:
        f.write(b"\xee" * 64)  # what a torn copy could leave
    with mmsb.attach(path) as r:
        mmsb.set_metadata(b, q.id, "k", 1)  # b catches up and publishes in full
        assert r.read_page(p.id) == b"p!" + bytes(14)
        assert r.read_page(q.id) == b"q" + bytes(15)
    mmsb.mmsb_stop(a)
    mmsb.mmsb_stop(b)


def test_recompute_runs_in_the_process_that_registered_it(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    a = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False)
    b = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False)
    src, dst = mmsb.create_page(a, 4), mmsb.create_page(a, 4)
    mmsb.add_dependency(a, src.id, dst.id, mmsb.DATA_DEPENDENCY)
    # b computes dst from src; a has no recompute function for it.
    mmsb.write_page(b, src.id, 0, b"\0")  # b catches up with the pages and the edge
    mmsb.register_recompute_fn(b, dst.id, lambda st, page: bytes(x ^ 0xFF for x in
                                                                 mmsb.query_page(st, src.id)))
    mmsb.write_page(a, src.id, 0, b"abcd")
    mmsb.set_metadata(b, src.id, "seen", True)  # b's next call follows a's write
    assert mmsb.query_page(b, dst.id) == bytes(x ^ 0xFF for x in b"abcd")
    mmsb.write_page(a, src.id, 0, b"wxyz")  # a does not see b's recompute until its next call
    mmsb.mmsb_stop(a)
    mmsb.mmsb_stop(b)
    c = _bus(path)
    assert mmsb.query_page(c, dst.id) == bytes(x ^ 0xFF for x in b"wxyz")
    mmsb.mmsb_stop(c)


_SHARED_WRITER = textwrap.dedent("""
    import random, sys
    sys.path.insert(0, {src!r})
    import mmsb
    rng = random.Random({seed})
    s = mmsb.mmsb_start(path={path!r}, shared=True, enable_gpu=False,
                        config=mmsb.MMSBConfig(max_tlog_size=150, segment_bytes=8192, fsync="none"))
    print("open", flush=True)
    while True:
        ids = sorted(s.pages)
        try:
            op = rng.random()
            if len(ids) < 4 or op < 0.03:
                p = mmsb.create_page(s, rng.choice([64, 128, 256]))
                print("create", s.last_lsn, p.id, flush=True)
                continue
            pid = rng.choice(ids)
            size = len(mmsb.query_page(s, pid))
            if op < 0.06:
                mmsb.resize_page(s, pid, rng.choice([64, 128, 256]))
                continue
            if op < 0.2:
                writes = []
                for q in rng.sample(ids, 2):
                    n = len(mmsb.query_page(s, q))
                    off = rng.randrange(n - 8)
                    writes.append((q, off, bytes(rng.randrange(256) for _ in range(8))))
                mmsb.apply_batch(s, writes)
            else:
                off = rng.randrange(size - 8)
                writes = [(pid, off, bytes(rng.randrange(256) for _ in range(8)))]
                mmsb.write_page(s, pid, off, writes[0][2])
            lsn = s.last_lsn
            for q, off, data in writes:
                print("ack", lsn, q, off, data.hex(), flush=True)
        except mmsb.MMSBError:
            pass  # another writer resized or changed what this one saw: try again
""")


def test_torture_shared_writers_and_readers_killed_and_restarted(tmp_path: Path) -> None:
    """Four writer processes share one bus while two readers read it; writers are killed
    with SIGKILL at random and restarted. Every acknowledged write is in the final log at
    the LSN it was acknowledged at; every page a reader saw is that page at its LSN; the
    final state equals the replay of its log."""
    import json
    import random
    import threading

    path = tmp_path / "bus"
    stop = tmp_path / "stop"
    rng = random.Random(11)
    mmsb.mmsb_stop(_bus(path))
    readers = []
    for k in range(2):
        code = _READER.format(src=SRC, path=str(path), out=str(tmp_path / f"r{k}.json"),
                              stop=str(stop), seed=k)
        readers.append(subprocess.Popen([sys.executable, "-c", code]))
    acks: list[str] = []
    lock = threading.Lock()

    def start(seed: int) -> subprocess.Popen[str]:
        code = _SHARED_WRITER.format(src=SRC, path=str(path), seed=seed)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                with lock:
                    acks.append(line)

        threading.Thread(target=pump, daemon=True).start()
        return proc

    def acked() -> int:
        with lock:
            return sum(1 for ln in acks if ln.startswith("ack"))

    def wait_for_acks(n: int) -> None:
        deadline = time.monotonic() + 30
        while acked() < n and time.monotonic() < deadline:
            time.sleep(0.05)

    writers = [start(k) for k in range(4)]
    seed = 100
    for rnd in range(6):
        wait_for_acks(30 * (rnd + 1))  # progress between kills, however slow the machine
        time.sleep(rng.uniform(0.0, 0.5))
        k = rng.randrange(4)
        writers[k].send_signal(signal.SIGKILL)
        writers[k].wait()
        seed += 1
        writers[k] = start(seed)
    wait_for_acks(250)
    for w in writers:
        w.send_signal(signal.SIGKILL)
        w.wait()
    stop.touch()
    for p in readers:
        assert p.wait(timeout=60) == 0
    s = _bus(path)
    assert mmsb.verify_state_consistency(s)
    final = mmsb.open_readonly(path)
    with lock:
        # A writer killed in the middle of a print leaves a line without its end.
        lines = [ln.split() for ln in acks if ln.startswith("ack") and ln.endswith("\n")]
    assert len(lines) > 100, len(lines)
    for _, lsn, pid, off, hexdata in lines:
        page = mmsb.read_page_at(final, int(pid), lsn=int(lsn))
        data = bytes.fromhex(hexdata)
        assert page[int(off):int(off) + len(data)] == data, (lsn, pid)
    samples = []
    for k in range(2):
        samples.extend(json.loads((tmp_path / f"r{k}.json").read_text()))
    assert len(samples) > 50
    for lsn, pid, digest in samples[:: max(1, len(samples) // 300)]:
        want = mmsb.read_page_at(final, pid, lsn=lsn)
        assert hashlib.blake2b(want).hexdigest() == digest, (lsn, pid)
    mmsb.mmsb_stop(s)


def test_a_writer_that_died_inside_a_checkpoint_loses_nothing(tmp_path: Path) -> None:
    """A shared writer killed after its checkpoint file is in place but before the new
    generation's first segment exists (and before the head says so): the next writer
    continues in the new generation, so recovery finds every record."""
    path = tmp_path / "bus"
    a = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False)
    b = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False)
    p = mmsb.create_page(a, 16)
    mmsb.write_page(b, p.id, 0, b"before")
    assert a.bus is not None and b.bus is not None
    # a checkpoints, then "dies": its new segment and the head's note are undone.
    mmsb.write_page(a, p.id, 0, b"ckpt")
    a.enter()
    try:
        saved_head = a.bus.publisher.log_end()  # type: ignore[union-attr]
        a.bus.checkpoint(a)
        gen = a.bus.generation
        seg = path / "wal" / f"wal-{gen:016x}-00000000.log"
        assert a.bus.writer is not None
        os.close(a.bus.writer.fd)
        a.bus.writer.fd = -1
        a.bus.writer = None
        seg.unlink()
        a.bus.publisher.note_append(*saved_head)  # type: ignore[union-attr]
    finally:
        a.bus.shared = False  # leave without touching the bus again
        a.leave()
    # Its locks go with the process.
    os.close(a.bus.lock_fd)
    os.close(a.bus.write_fd)
    a.bus.publisher.close(None)  # type: ignore[union-attr]
    a.bus.publisher = None
    mmsb.write_page(b, p.id, 0, b"after!")
    # b is killed too (no final checkpoint): the record must be in the log.
    assert b.bus is not None and b.bus.writer is not None
    os.close(b.bus.writer.fd)
    os.close(b.bus.lock_fd)
    os.close(b.bus.write_fd)
    c = _bus(path)
    assert mmsb.query_page(c, p.id)[:6] == b"after!"
    assert mmsb.verify_state_consistency(c)
    mmsb.mmsb_stop(c)


_EDIT_TABLE = r"""
import mmap, os, sys
import numpy as np
import mmsb
from mmsb._storage.mapped import ROW_DTYPE
root = sys.argv[1]
s = mmsb.mmsb_start(path=root, config=mmsb.MMSBConfig(enable_gpu=False, fsync="none"))
ids = [p.id for p in mmsb.create_pages(s, 6, 256)]
for pid in ids:
    mmsb.write_page(s, pid, 0, bytes([pid]) * 16)
fd = os.open(os.path.join(root, "map", "table"), os.O_RDWR)
mm = mmap.mmap(fd, os.fstat(fd).st_size)
tab = np.frombuffer(mm, ROW_DTYPE)
a, b, c, d, e, f = ids
tab["offset"][a] = 1 << 40  # far past the pages file
tab["offset"][b] = -4096  # before it
tab["size"][c] = 4096  # another size
tab["offset"][d] = tab["offset"][e]  # another page's slot
tab["size"][f] = -7
mmsb.write_page(s, a, 3, b"\x01\x02")  # the compiled one-write path
mmsb.apply_batch(s, [(b, 5, b"xy"), (d, 7, b"zz")])  # the staged batch
mmsb.write_page(s, c, 0, bytes(range(200)))  # the general path (a dense write)
mmsb.write_page(s, f, 1, b"q")
mmsb.write_page(s, e, 2, b"e")
r = mmsb.attach(root)
for pid in ids:
    assert r.read_page(pid) == bytes(mmsb.query_page(s, pid)), pid
    row = tab[pid]
    assert row["size"] == 256 and 0 <= row["offset"] < (1 << 30), (pid, row)
r.close()
mmsb.mmsb_stop(s)
print("ok")
"""


def test_a_table_edited_beside_the_writer_never_steers_its_stores(tmp_path: Path) -> None:
    """The mapped table is shared with every process of the bus's owner; the writer
    keeps its own record of where each page's slot lies and never reads a row back to
    find it. Rows edited under a running writer (slots past or before the pages file,
    another size, another page's slot, a negative size) neither crash it nor make it
    write outside the pages file or over another page: each page it writes next is
    published at its own slot and its row put right, so a reader sees the writer's
    pages. (Run in a child: a store outside the mapping would kill the process.)"""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src")
    out = subprocess.run([sys.executable, "-c", _EDIT_TABLE, str(tmp_path / "bus")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_shared_writer_checks_the_rows_another_writer_left(tmp_path: Path) -> None:
    """A shared writer takes over the slots another writer published only after
    checking them: rows edited to lie outside the pages file, or over one another,
    have it write every page again, and readers see every writer's pages."""
    from mmsb._storage.mapped import ROW_DTYPE

    path = tmp_path / "bus"
    cfg = mmsb.MMSBConfig(fsync="none")
    a = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False, config=cfg)
    b = mmsb.mmsb_start(path=path, shared=True, enable_gpu=False, config=cfg)
    try:
        ids = [p.id for p in mmsb.create_pages(a, 4, 128)]
        for pid in ids:
            mmsb.write_page(a, pid, 0, bytes([pid]) * 8)
        for edit in ("past", "overlap"):
            with open(path / "map" / "table", "r+b") as f:
                tab = np.frombuffer(bytearray(f.read()), ROW_DTYPE).copy()
                if edit == "past":
                    tab["offset"][ids[0]] = 1 << 40
                else:
                    tab["offset"][ids[1]] = tab["offset"][ids[2]]
                f.seek(0)
                f.write(tab.tobytes())
            writer = b if edit == "past" else a
            other = a if writer is b else b
            mmsb.write_page(writer, ids[3], 1, edit.encode())  # takes over from the other
            mmsb.write_page(other, ids[1], 2, b"!")
            r = mmsb.attach(path)
            try:
                for pid in ids:  # (``other`` wrote last: it holds every record)
                    assert r.read_page(pid) == bytes(mmsb.query_page(other, pid)), (edit, pid)
                assert r.read_page(ids[3])[1:1 + len(edit)] == edit.encode()
            finally:
                r.close()
    finally:
        mmsb.mmsb_stop(a)
        mmsb.mmsb_stop(b)


def test_a_reader_never_takes_bytes_from_an_edited_row(tmp_path: Path) -> None:
    """A row edited to a negative offset (a slice of a mapping from its end in Python)
    or past the pages file is not read: the page is reported missing
    (PageNotFoundError), by a read and by a snapshot."""
    from mmsb._storage.mapped import ROW_DTYPE

    path = tmp_path / "bus"
    s = _bus(path)
    try:
        pid = mmsb.create_page(s, 64).id
        mmsb.write_page(s, pid, 0, b"mine")
        r = mmsb.attach(path)
        try:
            assert r.read_page(pid)[:4] == b"mine"
            for off in (-64, 1 << 40):
                with open(path / "map" / "table", "r+b") as f:
                    f.seek(pid * ROW_DTYPE.itemsize)
                    f.write(struct.pack("<q", off))
                with pytest.raises(mmsb.PageNotFoundError):
                    r.read_page(pid)
                with pytest.raises(mmsb.PageNotFoundError):
                    r.snapshot([pid])
        finally:
            r.close()
    finally:
        mmsb.mmsb_stop(s)
