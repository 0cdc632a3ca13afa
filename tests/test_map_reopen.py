"""Reopening a bus keeps the mapped pages its last writer published when they check out
against the recovered state, and rebuilds them otherwise. The recovered state never
comes from the mapped files: after a kill at any point (in the middle of a publication
too), after an operating-system crash, and with the files damaged or edited, the
reopened state equals checkpoint + full log replay (``open_readonly``), and readers see
exactly its pages."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmsb
from conftest import checkpoint_sections, copy_beside, edges, pages_view
from mmsb._core.arena import CHUNK_SHIFT
from mmsb._storage import bus as bus_mod
from mmsb._storage import mapped
from mmsb._storage.codec import crc32c

SRC = str(Path(mmsb.__file__).resolve().parent.parent)
ROW = 32


def _cfg() -> mmsb.MMSBConfig:
    return mmsb.MMSBConfig(enable_gpu=False, fsync="none", checkpoint_interval=0,
                           max_tlog_size=40)


def _workload(s: mmsb.MMSBState, rounds: int) -> None:
    """Every kind of record, over several automatic checkpoints."""
    a, b, c = (p.id for p in mmsb.create_pages(s, 3, 64))
    d = mmsb.create_page(s, 300, metadata={"name": "d"}).id
    mmsb.add_dependency(s, a, b, mmsb.CONTROL_DEPENDENCY)
    for i in range(rounds):
        mmsb.write_page(s, (a, b, c, d)[i % 4], (i * 5) % 56, bytes([i % 250 + 1]) * 8)
    mmsb.apply_batch(s, [(a, 0, b"batch"), (d, 290, b"tail!")])
    mmsb.resize_page(s, c, 100)
    e = mmsb.clone_page(s, d).id
    mmsb.set_metadata(s, a, "k", [1, 2])
    mmsb.delete_page(s, b)
    for i in range(rounds // 2):
        mmsb.write_page(s, (a, c, d, e)[i % 4], i % 50, (i * 3 + 7).to_bytes(4, "little"))


def _image(tmp: Path, rounds: int = 60) -> Path:
    """A crash image: the directory of a bus copied while its writer is open (what a
    kill leaves, its log written and its last call published)."""
    root = tmp / "live"
    s = mmsb.mmsb_start(path=root, config=_cfg())
    _workload(s, rounds)
    s.bus.flush()
    img = tmp / "image"
    shutil.copytree(root, img)
    mmsb.mmsb_stop(s)
    return img


def _view(s: mmsb.MMSBState) -> tuple:
    """What a user sees of a state: pages (bytes, epoch, size, location, metadata),
    graph, counters, masks and history."""
    ids = sorted(s.pages)
    masks = {pid: np.asarray(s.pages[pid].mask).tobytes() for pid in ids}
    history = {pid: [(d.lsn, d.epoch) for d in mmsb.get_deltas_for_page(s, pid)] for pid in ids}
    at: dict[int, Any] = {}
    for pid in ids[:3]:
        try:
            at[pid] = mmsb.read_page_at(s, pid, lsn=s.last_lsn // 2)
        except mmsb.MMSBError as exc:
            at[pid] = type(exc).__name__
    return (pages_view(s), edges(s), int(s.last_lsn), int(s.next_page_id), s.next_delta_id,
            masks, history, at, len(s.tlog))


def _reference(root: Path) -> tuple:
    """Checkpoint + full log replay of the bus in ``root`` (nothing written)."""
    return _view(mmsb.open_readonly(root, config=_cfg()))


def _reader_sees(root: Path, s: mmsb.MMSBState) -> None:
    """A reader attached now reads exactly the state's pages, and no other page."""
    with mmsb.attach(root) as r:
        assert r.last_lsn == s.last_lsn
        assert r.page_ids() == sorted(s.pages)
        for pid in s.pages:
            assert r.read_page(pid) == mmsb.query_page(s, pid)
            assert r.page_epoch(pid) == int(s.pages[pid].epoch)


def _reopen(root: Path) -> tuple[mmsb.MMSBState, str | None]:
    s = mmsb.mmsb_start(path=root, config=_cfg())
    assert s.bus is not None and s.bus.publisher is not None
    return s, s.bus.publisher.rebuilt_because


def _check(root: Path, want: tuple, adopted: bool | None, why: str = "") -> mmsb.MMSBState:
    """Reopen ``root``: the state must equal ``want`` and readers must see its pages;
    ``adopted``: whether the mapped files had to be kept (None: either)."""
    s, because = _reopen(root)
    try:
        if adopted is True:
            assert because is None
        elif adopted is False:
            assert because is not None and why in because, because
        _reader_sees(root, s)
        assert _view(s) == want
    except BaseException:
        mmsb.mmsb_stop(s)
        raise
    return s


def _head_words(root: Path) -> np.ndarray:
    return np.frombuffer(bytearray((root / "map" / "HEAD").read_bytes()), "<u8").copy()


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip(path: Path, offset: int) -> None:
    """Invert one byte: a change whatever the byte held (a fixed value would be no
    change when the byte already held it, as a checksum byte does one time in 256)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))


def _set_head_u64(root: Path, word: int, value: int) -> None:
    _patch(root / "map" / "HEAD", word * 8, struct.pack("<Q", value))


def _set_static(root: Path, at: int, data: bytes) -> None:
    """Change the head's identity bytes and make its checksum match again."""
    path = root / "map" / "HEAD"
    head = bytearray(path.read_bytes()[:52])
    head[at:at + len(data)] = data
    head[48:52] = struct.pack("<I", crc32c(bytes(head[:48])))
    _patch(path, 0, bytes(head))  # in place: a reader may have the file mapped


def _rows(root: Path) -> np.ndarray:
    return np.frombuffer((root / "map" / "table").read_bytes(), mapped.ROW_DTYPE).copy()


def _set_row(root: Path, pid: int, offset: int, size: int, epoch: int, lsn: int) -> None:
    _patch(root / "map" / "table", pid * ROW, struct.pack("<qqqq", offset, size, epoch, lsn))


# --------------------------------------------------------------------------- adoption


def test_a_reopen_after_a_kill_adopts_the_mapped_pages(tmp_path: Path) -> None:
    img = _image(tmp_path)
    want = _reference(img)
    root = copy_beside(img, "bus")
    pages_before = (root / "map" / "pages").read_bytes()
    s = _check(root, want, adopted=True)
    try:
        # Nothing was rewritten: every page stayed in its slot.
        assert (root / "map" / "pages").read_bytes() == pages_before
        pid = sorted(s.pages)[0]
        mmsb.write_page(s, pid, 0, b"after")
        _reader_sees(root, s)
    finally:
        mmsb.mmsb_stop(s)
    # A clean stop and reopen adopts them too.
    s = _check(root, _reference(root), adopted=True)
    mmsb.mmsb_stop(s)


def test_records_logged_but_not_published_are_published_at_reopen(tmp_path: Path) -> None:
    """A writer killed after its append and before its publication: the head shows an
    older LSN; the pages those records changed are published again, the others kept."""
    img = _image(tmp_path)
    want = _reference(img)
    root = copy_beside(img, "bus")
    rows = _rows(root)
    head = _head_words(root)
    # The page the last call changed: the one row published at the head's LSN.
    (last,) = np.flatnonzero(rows["lsn"] == int(head[9]))
    pid = int(last)
    off, size, epoch = int(rows[pid]["offset"]), int(rows[pid]["size"]), int(rows[pid]["epoch"])
    # The page as it was one record earlier: other bytes, an older epoch, an older LSN.
    _patch(root / "map" / "pages", off, b"\xee" * size)
    _set_row(root, pid, off, size, epoch - 1, int(head[9]) - 1)
    _set_head_u64(root, 9, int(head[9]) - 1)
    s = _check(root, want, adopted=True)
    mmsb.mmsb_stop(s)


def test_pages_in_several_arena_chunks_are_compared_in_each(tmp_path: Path) -> None:
    """A page large enough for an arena chunk of its own (the others share the first):
    the open compares the first chunk's pages in the pass that checks the rows and the
    others after it; a damaged mapped copy in either is published again, the rest kept."""
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=_cfg())
    small = [p.id for p in mmsb.create_pages(s, 4, 512)]
    big = mmsb.create_page(s, (16 << 20) + 4096).id
    for k, pid in enumerate(small):
        mmsb.write_page(s, pid, k, bytes([k + 1]) * 8)
    mmsb.write_page(s, big, (16 << 20) - 3, b"far end!")
    s.bus.flush()
    img = tmp_path / "image"
    shutil.copytree(root, img)
    mmsb.mmsb_stop(s)
    want = _reference(img)
    rows = _rows(img)
    for pid in (small[2], big):
        work = copy_beside(img, f"bus-{pid}")
        off, size = int(rows[pid]["offset"]), int(rows[pid]["size"])
        _flip(work / "map" / "pages", off + size - 1)
        pages_before = (work / "map" / "pages").read_bytes()
        s = _check(work, want, adopted=True)
        try:
            addrs = s.table.addr
            assert addrs[big] >> CHUNK_SHIFT != addrs[small[0]] >> CHUNK_SHIFT  # two chunks
            after = (work / "map" / "pages").read_bytes()
            # The damaged page was published again; no other byte changed.
            changed = np.flatnonzero(np.frombuffer(after, np.uint8)
                                     != np.frombuffer(pages_before, np.uint8))
            assert changed.tolist() == [off + size - 1]
        finally:
            mmsb.mmsb_stop(s)


def test_a_reopen_does_the_same_work_after_10k_and_100k_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mapped files adopted after 10,000 and after 100,000 writes: the open reads
    the same files and bytes, and compares the same pages (the state's, not the
    history's)."""
    compared: list[int] = []
    real = mapped._adopt_rows
    real_other = mapped._compare_chunk

    def count(*args: Any) -> Any:
        out = real(*args)
        compared.append(out[5])
        return out

    def count_other(*args: Any) -> int:
        compared.append(len(args[3]))
        return real_other(*args)

    monkeypatch.setattr(mapped, "_adopt_rows", count)
    monkeypatch.setattr(mapped, "_compare_chunk", count_other)
    reads: list[tuple[str, int]] = []
    real_read = bus_mod.DurableBus.read_bytes

    def read_bytes(self: bus_mod.DurableBus, path: Path) -> bytes:
        out = real_read(self, path)
        reads.append((path.parent.name, len(out)))
        return out

    monkeypatch.setattr(bus_mod.DurableBus, "read_bytes", read_bytes)
    real_front = bus_mod.read_checkpoint_front

    def front(path: Path, store: Any = None) -> Any:
        # The newest checkpoint, read without its log section: counted as the whole
        # file (more than is read).
        reads.append((path.parent.name, path.stat().st_size))
        return real_front(path, store)

    monkeypatch.setattr(bus_mod, "read_checkpoint_front", front)
    work = {}
    for n in (10_000, 100_000):
        root = tmp_path / f"bus-{n}"
        last = _killed_after(root, n)
        reads.clear()
        compared.clear()
        s = mmsb.mmsb_start(path=root, config=mmsb.MMSBConfig(enable_gpu=False))
        try:
            assert int(s.last_lsn) == last
            assert s.bus.publisher.rebuilt_because is None
            work[n] = (sorted(name for name, _ in reads), sum(size for _, size in reads),
                       list(compared))
        finally:
            mmsb.mmsb_stop(s)
    assert work[10_000][0] == work[100_000][0] == ["checkpoints", "wal"]
    assert work[100_000][1] < 1.1 * work[10_000][1]
    assert work[10_000][2] == work[100_000][2] == [16]


_KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {src!r})
    import mmsb
    s = mmsb.mmsb_start(path={path!r}, enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="none", checkpoint_interval=0))
    ids = [p.id for p in mmsb.create_pages(s, 16, 256)]
    for i in range({n}):
        mmsb.write_page(s, ids[i % 16], (i * 8) % 248, i.to_bytes(8, "little"))
    print(s.last_lsn, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed_after(root: Path, n: int) -> int:
    code = _KILLED.format(src=SRC, path=str(root), n=n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-500:]
    return int(out.stdout)


# --------------------------------------------------------------------------- kills


_WRITER = textwrap.dedent("""
    import random, signal, sys
    sys.path.insert(0, {src!r})
    import mmsb
    s = mmsb.mmsb_start(path={path!r}, enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="none", checkpoint_interval=0,
                                               max_tlog_size=50))
    rng = random.Random({seed})
    ids = sorted(s.pages) or [p.id for p in mmsb.create_pages(s, 4, 128)]
    pause = []  # SIGUSR1: stop between two calls and say so
    signal.signal(signal.SIGUSR1, lambda *_: pause.append(1))
    print("ready", flush=True)
    while True:
      if pause:
        print("paused", flush=True)
        while True:
          signal.pause()
      try:
        k = rng.random()
        live = sorted(s.pages)
        pid = rng.choice(live)
        size = len(mmsb.query_page(s, pid))
        if k < 0.6:
            off = rng.randrange(size)
            mmsb.write_page(s, pid, off, bytes([rng.randrange(1, 256)]) * min(8, size - off))
        elif k < 0.7:
            mmsb.apply_batch(s, [(q, 0, bytes([rng.randrange(256)]) * 4) for q in live[:3]])
        elif k < 0.78:
            mmsb.resize_page(s, pid, rng.choice([16, 100, 128, 300]))
        elif k < 0.85 and len(live) < 12:
            mmsb.create_page(s, rng.choice([32, 128]), metadata={{"n": rng.randrange(9)}})
        elif k < 0.9 and len(live) > 3:
            mmsb.delete_page(s, pid)
        elif k < 0.95:
            other = rng.choice(live)
            if other != pid and not mmsb.get_children(s.graph, other):
                try:
                    mmsb.add_dependency(s, pid, other)
                except mmsb.MMSBError:
                    pass
        else:
            mmsb.set_metadata(s, pid, "k", rng.randrange(100))
      except mmsb.MMSBError:
        pass
""")


def test_kill_at_random_points_reopens_to_the_replayed_state(tmp_path: Path) -> None:
    """A writer killed (SIGKILL) at random points of a random workload, six times
    over one bus: every reopen equals checkpoint + log replay, and readers see it."""
    root = tmp_path / "bus"
    rng = random.Random(7)
    adopted = 0
    for k in range(6):
        code = _WRITER.format(src=SRC, path=str(root), seed=k)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            proc.kill()
            proc.wait(timeout=30)
        want = _reference(root)
        s = _check(root, want, adopted=None)
        adopted += s.bus.publisher.rebuilt_because is None
        mmsb.mmsb_stop(s)
    assert adopted >= 1


@pytest.mark.parametrize("torn", [False, True], ids=["published", "torn"])
def test_readers_read_the_last_publication_while_a_writer_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: bool) -> None:
    """Between a writer's open of the mapped files and its first publication (however
    long its checks take) readers read the last writer's pages, without waiting on the
    new writer; a reader of a torn publication waits for it rather than giving up."""
    root = copy_beside(_image(tmp_path), "bus")
    if torn:
        _set_head_u64(root, 8, int(_head_words(root)[8]) | 1)
    reader = mmsb.attach(root)
    before = None if torn else {q: reader.read_page(q) for q in reader.page_ids()}
    seen: dict[str, Any] = {}
    real = mapped.Publisher.adopt

    def read_all() -> None:
        seen.setdefault("out", []).append({q: reader.read_page(q) for q in reader.page_ids()})

    def adopt(self: mapped.Publisher, state: mmsb.MMSBState) -> bool:
        seen["pid"] = reader.writer_pid
        if torn:
            # The publication torn, its writer gone: a reader waits for the writer that
            # opens now (it was told its pid), and reads what it publishes.
            seen["thread"] = threading.Thread(target=read_all)
            seen["thread"].start()
        else:
            # (In the open's own thread: had the open made readers wait, this read
            # would raise once the stall limit passed, instead of returning.)
            read_all()
            with mmsb.attach(root) as late:
                seen["late"] = {q: late.read_page(q) for q in late.page_ids()}
        return real(self, state)

    monkeypatch.setattr(mapped.Publisher, "adopt", adopt)
    try:
        s, because = _reopen(root)
        monkeypatch.setattr(mapped.Publisher, "adopt", real)
        if torn:
            seen["thread"].join(timeout=30)
            assert seen["out"] == [{q: mmsb.query_page(s, q) for q in s.pages}]
            assert because is not None and "middle of a publication" in because
        else:
            assert because is None
            assert seen["out"] == [before] and seen["late"] == before
        assert seen["pid"] == os.getpid()
        mmsb.mmsb_stop(s)
    finally:
        reader.close()


def test_a_reader_attaching_while_a_writer_rebuilds_after_a_restart_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an OS restart (another boot id) the files are not shown to a reader that
    attaches while the new writer's open checks them: the head still names the old
    boot until the rebuild is published."""
    root = copy_beside(_image(tmp_path), "bus")
    _set_static(root, 24, bytes(range(16)))
    with pytest.raises(mmsb.HistoryUnavailableError):
        mmsb.attach(root)
    seen: list[type] = []
    real = mapped.Publisher.adopt

    def adopt(self: mapped.Publisher, state: mmsb.MMSBState) -> bool:
        try:
            mmsb.attach(root).close()
        except mmsb.MMSBError as exc:
            seen.append(type(exc))
        return real(self, state)

    monkeypatch.setattr(mapped.Publisher, "adopt", adopt)
    s, because = _reopen(root)
    assert seen == [mmsb.HistoryUnavailableError]
    assert because is not None and "another boot id" in because
    _reader_sees(root, s)
    mmsb.mmsb_stop(s)


def test_a_reader_attaching_before_the_first_writer_published_is_told_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new bus's head is all zeros until its first publication: an attach then says
    the writer has not published yet, not that the head is damaged."""
    root = tmp_path / "bus"
    seen: list[str] = []
    real = mapped.Publisher.publish

    def publish(self: mapped.Publisher, state: mmsb.MMSBState) -> None:
        if self.opening:
            with pytest.raises(mmsb.SerializationError) as err:
                mmsb.attach(root)
            seen.append(str(err.value))
        real(self, state)

    monkeypatch.setattr(mapped.Publisher, "publish", publish)
    s = mmsb.mmsb_start(path=root, config=_cfg())
    monkeypatch.setattr(mapped.Publisher, "publish", real)
    assert len(seen) == 1 and "has not published its pages yet" in seen[0]
    _reader_sees(root, s)
    mmsb.mmsb_stop(s)


@pytest.mark.parametrize("where", ["adopt", "note_append"])
def test_an_open_that_fails_after_the_mapped_files_leaves_them_as_they_were(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """An open that fails after it opened the mapped files (before its first
    publication, or after it) closes them and leaves the head as readers can go on
    with: the last writer's pid put back, or the status of a closed bus; nothing else
    changes, and the next open goes on."""
    root = copy_beside(_image(tmp_path), "bus")
    want = _reference(root)
    words = _head_words(root)
    reader = mmsb.attach(root)
    before = {q: reader.read_page(q) for q in reader.page_ids()}
    fds = len(os.listdir("/proc/self/fd"))

    def fail(*_a: Any) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(mapped.Publisher, where, fail)
    with pytest.raises(mmsb.DurabilityError, match="injected"):
        mmsb.mmsb_start(path=root, config=_cfg())
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == fds
    after = _head_words(root)
    if where == "adopt":
        # Not published: the head is the last writer's, word for word.
        assert after.tobytes() == words.tobytes()
        assert {q: reader.read_page(q) for q in reader.page_ids()} == before
    else:
        assert reader.writer_pid is None and reader.read_page(sorted(before)[0]) == before[
            sorted(before)[0]]
    s = _check(root, want, adopted=None)
    mmsb.mmsb_stop(s)
    reader.close()


def test_a_writer_killed_in_the_middle_of_a_publication(tmp_path: Path) -> None:
    """The head's seq odd and a page half copied: the files are rebuilt from the log."""
    img = _image(tmp_path)
    want = _reference(img)
    root = copy_beside(img, "bus")
    head = _head_words(root)
    rows = _rows(root)
    pid = sorted(want[0])[0]
    _patch(root / "map" / "pages", int(rows[pid]["offset"]), b"torn")
    _set_head_u64(root, 8, int(head[8]) | 1)
    s = _check(root, want, adopted=False, why="middle of a publication")
    mmsb.mmsb_stop(s)


@pytest.mark.parametrize("torn", [False, True], ids=["between-calls", "mid-publication"])
def test_a_reader_attached_across_the_reopen_keeps_working(tmp_path: Path,
                                                            torn: bool) -> None:
    """A reader attached to a writer that is killed keeps reading its last pages (or,
    when the kill landed inside a publication, says it cannot), then follows the next
    writer (adopting or rebuilding the files) without attaching again."""
    root = tmp_path / "bus"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(src=SRC, path=str(root),
                                                                  seed=11)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # killed between two calls, not inside one
        assert proc.stdout.readline().strip() == "paused"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    if torn:  # as if killed inside its publication: the sequence left odd
        _set_head_u64(root, 8, int(_head_words(root)[8]) | 1)
    reader = mmsb.attach(root)
    try:
        if torn:
            with pytest.raises(mmsb.DurabilityError, match="middle of publishing"):
                reader.page_ids()
        else:
            assert all(reader.read_page(pid) for pid in reader.page_ids())
        errors: list[BaseException] = []
        stop = threading.Event()
        reopened = threading.Event()

        def read_on() -> None:
            try:
                while not stop.is_set():
                    after_reopen = reopened.is_set()
                    try:
                        for pid in reader.page_ids():
                            try:
                                reader.read_page(pid)
                            except mmsb.PageNotFoundError:
                                pass  # deleted by the new writer meanwhile
                    except mmsb.DurabilityError as exc:
                        if not torn or after_reopen or "middle of publishing" not in str(exc):
                            raise
                        time.sleep(0.001)  # the killed publication, until a writer reopens
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=read_on)
        t.start()
        for rebuild in (False, True):
            if rebuild:
                _set_static(root, 24, bytes(range(16)))  # another boot
            s, because = _reopen(root)
            reopened.set()
            try:
                if torn and not rebuild:
                    assert because is not None and "middle of a publication" in because
                else:
                    assert (because is None) is not rebuild, because
                pid = sorted(s.pages)[0]
                mmsb.write_page(s, pid, 0, b"new!")
                assert reader.wait_for(s.last_lsn, timeout=10)
                assert reader.read_page(pid) == mmsb.query_page(s, pid)
                assert reader.writer_pid == os.getpid()
                assert {q: reader.read_page(q) for q in reader.page_ids()} == {
                    q: mmsb.query_page(s, q) for q in s.pages}
            finally:
                mmsb.mmsb_stop(s)
        stop.set()
        t.join(timeout=30)
        assert not errors, errors
    finally:
        reader.close()


# --------------------------------------------------------------------------- damage


def _damages(want: tuple, rows: np.ndarray, head: np.ndarray) -> list[tuple[str, bool, str,
                                                                          Callable[[Path], None]]]:
    """(name, adopted, why, edit) for each damage: ``adopted`` whether the files can
    still be kept (the pages that differ published again), ``why`` what the rebuild
    says."""
    live = sorted(want[0])
    a, b = live[0], live[1]
    ra, rb = rows[a], rows[b]
    bump = int(head[22])
    by_size: dict[int, list[int]] = {}
    for p in live:
        by_size.setdefault(int(rows[p]["size"]), []).append(p)
    (x, y) = next(ps for ps in by_size.values() if len(ps) > 1)[:2]

    def swap_rows(root: Path) -> None:
        # Two pages of one size trade slots: a valid layout, the wrong bytes for each.
        rx, ry = rows[x], rows[y]
        _set_row(root, x, int(ry["offset"]), int(rx["size"]), int(rx["epoch"]), int(rx["lsn"]))
        _set_row(root, y, int(rx["offset"]), int(ry["size"]), int(ry["epoch"]), int(ry["lsn"]))

    return [
        ("page bytes edited", True, "",
         lambda r: _patch(r / "map" / "pages", int(ra["offset"]), b"\x99" * 4)),
        ("an epoch edited", True, "",
         lambda r: _set_row(r, a, int(ra["offset"]), int(ra["size"]), int(ra["epoch"]) + 7,
                            int(ra["lsn"]))),
        ("rows swapped", True, "", swap_rows),
        ("another boot", False, "restarted", lambda r: _set_static(r, 24, bytes(range(16)))),
        ("another bus", False, "another bus", lambda r: _set_static(r, 16, b"\x01" * 8)),
        ("head checksum", False, "damaged", lambda r: _flip(r / "map" / "HEAD", 49)),
        ("head cut short", False, "damaged",
         lambda r: (r / "map" / "HEAD").write_bytes((r / "map" / "HEAD").read_bytes()[:40])),
        ("a failed publication", False, "failed",
         lambda r: _patch(r / "map" / "HEAD", 116, struct.pack("<I", 2))),
        ("LSN ahead of the log", False, "beyond",
         lambda r: _set_head_u64(r, 9, int(head[9]) + 5)),
        ("a row's LSN ahead", False, "LSN beyond",
         lambda r: _set_row(r, a, int(ra["offset"]), int(ra["size"]), int(ra["epoch"]),
                            int(head[9]) + 1)),
        ("a row outside the pages", False, "outside",
         lambda r: _set_row(r, a, 1 << 40, int(ra["size"]), int(ra["epoch"]), int(ra["lsn"]))),
        ("a row past the carved end", False, "outside",
         lambda r: _set_row(r, a, bump, int(ra["size"]), int(ra["epoch"]), int(ra["lsn"]))),
        ("a negative offset", False, "outside",
         lambda r: _set_row(r, a, -64, int(ra["size"]), int(ra["epoch"]), int(ra["lsn"]))),
        ("overlapping slots", False, "overlap",
         lambda r: _set_row(r, a, int(rb["offset"]) + 8, int(ra["size"]), int(ra["epoch"]),
                            int(ra["lsn"]))),
        ("a row past the pages", False, "past the recovered",
         lambda r: _set_row(r, int(want[3]) + 3, 0, 16, 1, 1)),
        ("pages file cut", False, "lengths",
         lambda r: os.truncate(r / "map" / "pages", 4096)),
        ("table file cut", False, "lengths",
         lambda r: os.truncate(r / "map" / "table", ROW * 8)),
        ("table length not whole rows", False, "lengths",
         lambda r: _set_head_u64(r, 12, int(head[12]) - 3)),
        ("carved end beyond the pages", False, "lengths",
         lambda r: _patch(r / "map" / "HEAD", 176, struct.pack("<Q", int(head[11]) + 4096))),
    ]


def test_damaged_or_hostile_mapped_files_never_change_the_state(tmp_path: Path) -> None:
    img = _image(tmp_path)
    want = _reference(img)
    rows = _rows(img)
    head = _head_words(img)
    for k, (name, adopted, why, edit) in enumerate(_damages(want, rows, head)):
        root = copy_beside(img, f"bus-{k}")
        edit(root)
        try:
            s = _check(root, want, adopted=adopted, why=why)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        mmsb.mmsb_stop(s)
        shutil.rmtree(root)


def test_a_deleted_page_left_in_the_table_is_released(tmp_path: Path) -> None:
    """The table shows a page the log deleted (a writer killed before publishing the
    deletion): the reopen publishes the deletion, and readers no longer see the page."""
    root = tmp_path / "live"
    s = mmsb.mmsb_start(path=root, config=_cfg())
    a, b = (p.id for p in mmsb.create_pages(s, 2, 64))
    mmsb.write_page(s, b, 0, b"bee")
    s.bus.flush()
    before = tmp_path / "before"
    shutil.copytree(root, before)
    mmsb.delete_page(s, b)
    s.bus.flush()
    img = tmp_path / "image"
    shutil.copytree(root, img)
    mmsb.mmsb_stop(s)
    # The image's log holds the deletion; its mapped files are those before it.
    shutil.rmtree(img / "map")
    shutil.copytree(before / "map", img / "map")
    want = _reference(img)
    s = _check(img, want, adopted=True)
    try:
        with mmsb.attach(img) as r:
            with pytest.raises(mmsb.PageNotFoundError):
                r.read_page(b)
    finally:
        mmsb.mmsb_stop(s)


def test_an_open_that_reads_only_starts_no_thread(tmp_path: Path) -> None:
    """The background thread (group commit, latency counters) starts with the first
    segment a write needs, not at the open."""
    img = _image(tmp_path)
    root = copy_beside(img, "bus")

    def ours() -> int:
        return sum(t.name in ("mmsb-group-commit", "mmsb-stats") for t in threading.enumerate())

    base = ours()
    s = mmsb.mmsb_start(path=root, config=mmsb.MMSBConfig(enable_gpu=False, fsync="batch"))
    try:
        assert ours() == base
        mmsb.query_page(s, sorted(s.pages)[0])
        assert ours() == base
        mmsb.write_page(s, sorted(s.pages)[0], 0, b"w")
        assert ours() == base + 1
    finally:
        mmsb.mmsb_stop(s)
    assert ours() == base
    s = mmsb.mmsb_start(path=root, config=mmsb.MMSBConfig(enable_gpu=False, fsync="batch"))
    try:
        mmsb.write_page(s, sorted(s.pages)[0], 0, b"v")
    finally:
        mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=root, config=mmsb.MMSBConfig(enable_gpu=False, fsync="batch"))
    try:
        assert mmsb.query_page(s, sorted(s.pages)[0])[:1] == b"v"
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- the newest checkpoint


def _snap_view(snap: Any) -> tuple:
    return (snap.lsn, snap.next_page_id, snap.next_delta_id, snap.ids.tobytes(),
            snap.sizes.tobytes(), snap.epochs.tobytes(), snap.locs.tobytes(),
            bytes(np.asarray(snap.data)), snap.metadata,
            {k: (np.asarray(m).tobytes(), at) for k, (m, at) in snap.masks.items()},
            snap.edges, list(snap.records), snap.horizon_lsn, snap.last_timestamp, snap.info,
            snap.log_from_lsn, snap.bus)


def test_the_newest_checkpoint_is_read_without_its_log_section(tmp_path: Path) -> None:
    """``read_checkpoint_front`` gives what a read without the log gives and hands the
    page bytes over (``owned``); damage anywhere in the file but the log section's
    bytes is refused with SerializationError at the file's offset. The log section's
    bytes it neither reads nor checks: damage there is refused by the whole read that
    the history's read makes."""
    from mmsb._storage.checkpoint import read_checkpoint, read_checkpoint_front

    img = _image(tmp_path)
    path = sorted((img / "checkpoints").glob("ckpt-*.mmsb"))[-1]
    raw = path.read_bytes()
    front = read_checkpoint_front(path)
    whole = read_checkpoint(path, with_log=False)
    assert _snap_view(front) == _snap_view(whole)
    assert front.owned and front.records == []
    log_at, log_len = checkpoint_sections(raw)[b"TLOG"]
    assert log_len > 0
    bad = tmp_path / "bad.mmsb"
    rng = random.Random(3)
    spots = sorted({0, 9, 40, 49, 60, log_at - 33, log_at - 5, log_at, log_at + log_len // 2,
                    log_at + log_len - 1, log_at + log_len,
                    len(raw) - 30, len(raw) - 20, len(raw) - 1,
                    *(rng.randrange(len(raw)) for _ in range(40))})
    for at in spots:
        damaged = bytearray(raw)
        damaged[at] ^= 0x21
        bad.write_bytes(bytes(damaged))
        if log_at <= at < log_at + log_len:
            store = path.parent / "pages"  # (the page store beside the file it was)
            assert _snap_view(read_checkpoint_front(bad, store)) == _snap_view(whole)
            with pytest.raises(mmsb.SerializationError, match="TLOG") as info:
                read_checkpoint(bad, store=store)
            assert info.value.offset == log_at
            continue
        with pytest.raises(mmsb.SerializationError) as info:
            read_checkpoint_front(bad)
        assert info.value.path == str(bad)
        if info.value.offset is not None:
            assert 0 <= info.value.offset < len(raw)
    for cut in (0, 20, 47, 60, log_at - 10, log_at + 3, log_at + log_len, len(raw) - 1):
        bad.write_bytes(raw[:cut])
        with pytest.raises(mmsb.SerializationError):
            read_checkpoint_front(bad)
    bad.write_bytes(raw + b"\0")
    with pytest.raises(mmsb.SerializationError):
        read_checkpoint_front(bad)


def test_damage_in_the_newest_log_section_is_refused_when_the_history_is_read(
        tmp_path: Path) -> None:
    """The open neither keeps nor checks the newest checkpoint's log section (it is
    history): the open goes on, and the first read of the history refuses the damage
    (SerializationError naming the file, at the section's offset), changing nothing."""
    img = _image(tmp_path)
    root = copy_beside(img, "bus")
    path = sorted((root / "checkpoints").glob("ckpt-*.mmsb"))[-1]
    raw = bytearray(path.read_bytes())
    log_at, log_len = checkpoint_sections(bytes(raw))[b"TLOG"]
    raw[log_at + log_len // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    s = mmsb.mmsb_start(path=root, config=_cfg())
    try:
        pid = sorted(s.pages)[0]
        kept = (pages_view(s), int(s.last_lsn))
        with pytest.raises(mmsb.SerializationError) as info:
            mmsb.read_page_at(s, pid, lsn=int(s.last_lsn) - 1)
        assert path.name in str(info.value)
        assert info.value.offset == log_at
        assert (pages_view(s), int(s.last_lsn)) == kept
    finally:
        mmsb.mmsb_stop(s)  # its final checkpoint writes the log's tail: no history needed


def test_slots_freed_over_many_sessions_are_packed_again(tmp_path: Path) -> None:
    """An adopting open does not learn the slots earlier writers freed; once they
    outweigh the pages, the open packs the files again, so churn over many sessions
    does not grow the pages file without bound."""
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=_cfg())
    keep = mmsb.create_page(s, 64).id
    mmsb.mmsb_stop(s)
    reasons = []
    for k in range(12):
        s, because = _reopen(root)
        reasons.append(because)
        try:
            # A slot freed below one still in use: a gap the next open cannot learn.
            big = mmsb.create_page(s, 256 << 10).id
            mmsb.write_page(s, big, 7, b"big")
            mmsb.write_page(s, mmsb.create_page(s, 64).id, 0, bytes([k + 1]))
            mmsb.write_page(s, keep, 0, bytes([k + 1]))
            mmsb.delete_page(s, big)
            _reader_sees(root, s)
        finally:
            mmsb.mmsb_stop(s)
    assert reasons[0] is None
    assert any(r is not None and "packed" in r for r in reasons)
    assert (root / "map" / "pages").stat().st_size <= 4 << 20
    s = _check(root, _reference(root), adopted=None)
    mmsb.mmsb_stop(s)


def test_an_open_that_fails_after_recovery_leaves_no_thread(tmp_path: Path) -> None:
    """Recovery of a torn tail writes a checkpoint (and its first segment) before the
    mapped files are opened; an open that then fails (a symlink where the map folder
    belongs) leaves no background thread behind."""
    img = _image(tmp_path)
    root = copy_beside(img, "bus")
    seg = sorted((root / "wal").glob("wal-*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x40\0\0\0\0\0\0\0\1\2")  # a torn frame: recovery cuts it, checkpoints
    shutil.rmtree(root / "map")
    (root / "map").symlink_to(tmp_path)

    def ours() -> int:
        return sum(t.name in ("mmsb-group-commit", "mmsb-stats") for t in threading.enumerate())

    base = ours()
    with pytest.raises(mmsb.DurabilityError):
        mmsb.mmsb_start(path=root, config=mmsb.MMSBConfig(enable_gpu=False))
    assert ours() == base
    (root / "map").unlink()
    s = mmsb.mmsb_start(path=root, config=mmsb.MMSBConfig(enable_gpu=False))
    try:
        _reader_sees(root, s)
        mmsb.write_page(s, sorted(s.pages)[0], 0, b"w")
        assert ours() == base + 1
    finally:
        mmsb.mmsb_stop(s)


_KILLED_PUBLISHING = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {src!r})
    import mmsb
    from mmsb._storage import mapped
    s = mmsb.mmsb_start(path={path!r}, enable_gpu=False,
                        config=mmsb.MMSBConfig(fsync="none", checkpoint_interval=0,
                                               max_tlog_size=30))
    ids = [p.id for p in mmsb.create_pages(s, 6, 200)]
    mmsb.add_dependency(s, ids[0], ids[1])
    for i in range({before}):
        mmsb.write_page(s, ids[i % 6], (i * 3) % 190, bytes([i % 200 + 1]) * 10)
    real = mapped.Publisher._publish_touched

    def torn(self, state):
        # Half of the first touched page copied, then killed: seq stays odd.
        pid = next(iter(self.touched))
        off = int(self.table[pid]["offset"])
        self.pages_mm[off:off + 100] = b"\\xab" * 100
        os.kill(os.getpid(), signal.SIGKILL)

    mapped.Publisher._publish_touched = torn
    # A subscriber keeps the batch on the general path, whose publication runs through
    # Publisher.publish (the staged batch publishes in its compiled commit).
    mmsb.subscribe(s, mmsb.EventType.PAGE_CHANGED, lambda *a: None)
    mmsb.apply_batch(s, [(ids[2], 5, b"never published")])  # published by publish()
""")


@pytest.mark.parametrize("before", [3, 31, 77])
def test_a_writer_killed_inside_a_publication(tmp_path: Path, before: int) -> None:
    """A real SIGKILL in the middle of a publication (after its record is in the log,
    `seq` odd, a page half copied): the reopen rebuilds the files and equals the
    replayed state, the record of that call included."""
    root = tmp_path / "bus"
    code = _KILLED_PUBLISHING.format(src=SRC, path=str(root), before=before)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-500:]
    assert _head_words(root)[8] & 1, "the kill was not inside a publication"
    want = _reference(root)
    s = _check(root, want, adopted=False, why="middle of a publication")
    try:
        assert mmsb.query_page(s, 3)[5:20] == b"never published"
    finally:
        mmsb.mmsb_stop(s)
