"""Log segments written ahead (segment version 2, docs/SerializationSpec.md section 4):
a bus that syncs every write (``fsync="always"``) extends its current segment with
zeros ahead of its frames, and the log ends where the frames stop (zeros
after them), not at the file's size. Recovery, read-only opens, the change feed and
shared writers must all find that end, never read the zeros as records or as damage,
and see records written later into the allocated space; a torn frame followed by zeros
is still a torn tail, zeros before intact frames still damage, version-1 segments still
open, and a full disk still refuses writes as before (space it cannot write ahead
leaves the write to a plain append)."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mmsb
from conftest import edges, frames_end, pages_view
from crash_writer import apply as apply_write
from crash_writer import digest, plan
from mmsb._storage import fsops
from mmsb._storage import wal as wal_mod
from mmsb._storage.bus import bus_files
from mmsb._storage.codec import crc32c

WRITER = Path(__file__).with_name("crash_writer.py")


def cfg(**kw: Any) -> mmsb.MMSBConfig:
    kw.setdefault("enable_gpu", False)
    kw.setdefault("checkpoint_interval", 0)
    return mmsb.MMSBConfig(**kw)


def view(state: mmsb.MMSBState) -> tuple:
    return (pages_view(state), edges(state), int(state.last_lsn))


def segments(root: Path) -> list[Path]:
    return bus_files(root)["wal"]


def strict_reopen_view(root: Path) -> tuple:
    """:func:`view` of the bus at ``root`` reopened with strict recovery (a torn or
    damaged log refuses the open), stopped again."""
    s = mmsb.mmsb_start(path=root, config=cfg(recovery="strict"))
    try:
        return view(s)
    finally:
        mmsb.mmsb_stop(s)


def version_of(seg: Path) -> int:
    return int.from_bytes(seg.read_bytes()[8:10], "little")


def _fill(s: mmsb.MMSBState, n: int, size: int = 64) -> int:
    pid = mmsb.create_page(s, size).id
    for i in range(n):
        mmsb.write_page(s, pid, i % (size - 4), bytes([i % 250 + 1]) * 3)
    return pid


# --------------------------------------------------------------------------- writing


def test_a_bus_that_syncs_every_write_writes_into_space_written_ahead(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always"))
    try:
        _fill(s, 40)
        s.bus.flush()
        seg = segments(root)[-1]
        data = seg.read_bytes()
        end = frames_end(data)
        assert version_of(seg) == 2
        assert end == s.bus.writer.size
        assert len(data) == wal_mod.ALLOC_STEP > end  # written ahead, one step
        assert not data[end:].strip(b"\0")  # zeros after the frames
        # What the file holds is what the log holds: an open beside it reads it all.
        ro = mmsb.open_readonly(root)
        assert view(ro) == view(s) and not ro.recovery_notes
    finally:
        mmsb.mmsb_stop(s)


@pytest.mark.parametrize("fsync", ["batch", "none"])
def test_a_bus_that_does_not_sync_each_write_appends_plainly(tmp_path: Path,
                                                             fsync: str) -> None:
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync=fsync))
    try:
        _fill(s, 40)
        seg = segments(root)[-1]
        assert version_of(seg) == 2
        assert seg.stat().st_size == frames_end(seg.read_bytes()) == s.bus.writer.size
    finally:
        mmsb.mmsb_stop(s)


def test_rolled_and_stopped_segments_end_at_their_last_frame(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always", segment_bytes=4096))
    try:
        _fill(s, 150)
        segs = segments(root)
        assert len(segs) > 3
        for seg in segs[:-1]:  # sealed by the roll
            assert seg.stat().st_size == frames_end(seg.read_bytes()), seg.name
        last = segs[-1]
        # Never allocated past segment_bytes (the segment rolls there).
        assert frames_end(last.read_bytes()) <= last.stat().st_size <= 4096 + 200
        before = view(s)
    finally:
        mmsb.mmsb_stop(s)
    for seg in segments(root):
        assert seg.stat().st_size == frames_end(seg.read_bytes()), seg.name
    assert strict_reopen_view(root) == before


# --------------------------------------------------------------------------- recovery


def _image(tmp_path: Path, n: int = 30, **kw: Any) -> tuple[Path, Path, dict[int, tuple]]:
    """A copy of a bus that syncs every write, taken while it is open (its last segment
    written ahead), its last segment, and the state after each LSN."""
    root = tmp_path / "src"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always", **kw))
    pid = mmsb.create_page(s, 48).id
    for i in range(n):
        if i % 7 == 3:
            mmsb.apply_batch(s, [(pid, i, b"b"), (pid, 40, bytes([i]))])
        else:
            mmsb.write_page(s, pid, i % 40, bytes([i + 1, i + 2]))
    s.bus.flush()
    image = tmp_path / "image"
    shutil.copytree(root, image)
    ref = {lsn: view(mmsb.replay_to_lsn(s, lsn)) for lsn in range(s.last_lsn + 1)}
    mmsb.mmsb_stop(s)
    return image, segments(image)[-1], ref


def test_a_clean_allocated_tail_is_the_end_not_a_torn_record(tmp_path: Path) -> None:
    image, seg, ref = _image(tmp_path)
    size = seg.stat().st_size
    assert size > frames_end(seg.read_bytes())
    last = max(ref)
    s = mmsb.mmsb_start(path=image, config=cfg(fsync="always", recovery="strict"))
    try:
        assert view(s) == ref[last]
        assert not s.recovery_notes and s.counters.torn_tails_recovered == 0
        assert seg.stat().st_size == size  # opening writes nothing
        mmsb.write_page(s, 1, 0, b"after")  # the log goes on in a new segment
        assert segments(image)[-1] != seg
        after = view(s)
    finally:
        mmsb.mmsb_stop(s)
    assert strict_reopen_view(image) == after


def _frames(data: bytes) -> tuple[list[int], list[int]]:
    """Where each frame of a segment ends (the header's end first) and the LSN of the
    last record of each (a record body holds its LSN at byte 1; a group, kind 11, holds
    a count at byte 1 and its records, each after a u32 length), read from the format."""
    end = frames_end(data)
    ends, lsns = [36], []
    while ends[-1] < end:
        at = ends[-1]
        body = data[at + 12 : at + 12 + int.from_bytes(data[at:at + 8], "little")]
        if body[0] == 11:
            count = int.from_bytes(body[1:5], "little")
            lsns.append(int.from_bytes(body[10:18], "little") + count - 1)
        else:
            lsns.append(int.from_bytes(body[1:9], "little"))
        ends.append(at + 12 + len(body))
    return ends, lsns


def _zeroed_from(data: bytes, cut: int, end: int) -> bytes:
    """``data`` with the bytes from ``cut`` to ``end`` (the frames' end) zero: an append
    into allocated space that reached the disk only up to ``cut``."""
    return data[:cut] + bytes(end - cut) + data[end:]


@pytest.mark.slow
def test_a_torn_frame_followed_by_zeros_at_every_cut(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash points inside the allocated tail: the frames written up to each byte, the
    rest of the file zeros. Recovery keeps exactly the whole frames before the cut, and
    counts a torn tail exactly when a partly written frame is there."""
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    image, seg, ref = _image(tmp_path, 24)
    data = seg.read_bytes()
    end = frames_end(data)
    ends, lsns = _frames(data)
    assert lsns[-1] == max(ref)
    first = lsns[0] - 1  # the LSN before the segment's first record
    near = {e + d for e in ends for d in (-1, 0, 1, 8, 12)}
    cuts = sorted(c for c in range(36, end + 1) if c % 5 == 0 or c in near)
    case = tmp_path / "case"
    checked_torn = 0
    for cut in cuts:
        zeroed = _zeroed_from(data, cut, end)
        # Frames still whole: those ending at or before the cut, or whose bytes after
        # the cut were zeros already.
        whole = [e for e in ends[1:] if e <= cut or not data[cut:e].strip(b"\0")]
        k = lsns[len(whole) - 1] if whole else first
        stop = whole[-1] if whole else 36
        torn = bool(zeroed[stop:].strip(b"\0"))
        for mode in ("tolerate_tail", "strict", "readonly"):
            if case.exists():
                shutil.rmtree(case)
            shutil.copytree(image, case)
            segments(case)[-1].write_bytes(zeroed)
            if mode == "strict" and torn:
                with pytest.raises(mmsb.SerializationError):
                    mmsb.mmsb_start(path=case, config=cfg(recovery="strict"))
                continue
            if mode == "readonly":
                s = mmsb.open_readonly(case, cfg())
                assert view(s) == ref[k], f"cut at byte {cut}"
                assert bool(s.recovery_notes) == torn, f"cut at byte {cut}"
                continue
            s = mmsb.mmsb_start(path=case, config=cfg(recovery=mode))
            try:
                assert view(s) == ref[k], f"cut at byte {cut}"
                assert s.counters.torn_tails_recovered == int(torn), f"cut at byte {cut}"
                mmsb.create_page(s, 8)  # the log goes on after the kept frames
            finally:
                mmsb.mmsb_stop(s)
            s = mmsb.mmsb_start(path=case, config=cfg(recovery="strict"))
            try:
                assert s.last_lsn == k + 1 and view(s)[0] != ref[k][0]
            finally:
                mmsb.mmsb_stop(s)
        checked_torn += torn
    assert checked_torn > len(cuts) // 2


def test_zeros_before_intact_frames_are_damage(tmp_path: Path) -> None:
    image, seg, ref = _image(tmp_path, 20)
    data = seg.read_bytes()
    ends, lsns = _frames(data)
    for k in (1, 5, 15):
        # Frame k zeroed whole (a lost block, not space written ahead): frames follow.
        damaged = data[:ends[k]] + bytes(ends[k + 1] - ends[k]) + data[ends[k + 1]:]
        case = tmp_path / f"zeroed-{k}"
        shutil.copytree(image, case)
        segments(case)[-1].write_bytes(damaged)
        with pytest.raises(mmsb.SerializationError) as exc:
            mmsb.mmsb_start(path=case, config=cfg())
        assert exc.value.offset == ends[k] and exc.value.path is not None
        with pytest.raises(mmsb.SerializationError):
            mmsb.open_readonly(case, cfg())
        s = mmsb.mmsb_start(path=case, config=cfg(recovery="point_in_time"))
        try:
            assert view(s) == ref[lsns[k - 1]]
        finally:
            mmsb.mmsb_stop(s)


def test_damage_in_the_middle_of_a_sealed_segment_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always", segment_bytes=2048))
    _fill(s, 80)
    s.bus.flush()
    image = tmp_path / "image"
    shutil.copytree(root, image)
    mmsb.mmsb_stop(s)
    sealed = segments(image)[0]
    data = bytearray(sealed.read_bytes())
    assert len(data) == frames_end(bytes(data))  # sealed at its last frame
    at = frames_end(bytes(data[:600])) + 30  # inside a frame's body
    data[at] ^= 0x40
    sealed.write_bytes(bytes(data))
    with pytest.raises(mmsb.SerializationError) as exc:
        mmsb.mmsb_start(path=image, config=cfg())
    assert exc.value.path is not None and exc.value.path.endswith(sealed.name)


def test_a_writer_killed_in_allocated_space_loses_no_acknowledged_write(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always"))
    for n in (64, 300):
        mmsb.create_page(s, n)
    model = {pid: (mmsb.query_page(s, pid), 0) for pid in s.pages}
    mmsb.mmsb_stop(s)
    sizes = {pid: len(b) for pid, (b, _) in model.items()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(mmsb.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    tails = 0
    # Each round is killed once the writer has acknowledged a given number of writes
    # (not after a fixed sleep, which a slow machine can spend before the first frame):
    # from the first frame on, the segment holds space written ahead of its frames.
    for r, seen in enumerate((1, 3, 10, 30, 80)):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(root), str(r), "always", "-", str(1 << 26), "100000"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith(b"open ")
        early = [proc.stdout.readline() for _ in range(seen)]
        assert all(ln.startswith(b"ack ") for ln in early), early
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lines = [ln.decode() for ln in early + proc.stdout.read().splitlines(keepends=True)
                 if ln.endswith(b"\n")]
        proc.stdin.close()
        proc.stdout.close()
        last = segments(root)[-1]
        tails += last.stat().st_size > frames_end(last.read_bytes())
        acks = [ln.split() for ln in lines if ln.startswith("ack ")]
        for _, i, pid, epoch, h in acks:
            kind, wpid, off, data = plan(r, int(i), sizes)
            assert wpid == int(pid)
            model[wpid] = (apply_write(kind, model[wpid][0], off, data), model[wpid][1] + 1)
            assert (digest(model[wpid][0]), model[wpid][1]) == (h, int(epoch))
        kind, cpid, off, data = plan(r, len(acks), sizes)
        candidate = (apply_write(kind, model[cpid][0], off, data), model[cpid][1] + 1)
        s = mmsb.mmsb_start(path=root, config=cfg(fsync="always"))
        try:
            assert all("torn" in n for n in s.recovery_notes), s.recovery_notes
            for pid, p in s.pages.items():
                now = (mmsb.query_page(s, pid), int(p.epoch))
                assert now == model[pid] or (pid == cpid and now == candidate), f"round {r}"
                model[pid] = now
        finally:
            mmsb.mmsb_stop(s)
    assert tails == 5, "a writer was killed without space written ahead"


# --------------------------------------------------------------------------- old files


def _as_version_1(seg: Path) -> None:
    """Rewrite a segment as the previous format wrote it: version 1 in its header, the
    file ending at its last frame."""
    data = seg.read_bytes()
    head = bytearray(data[:36])
    head[8:10] = (1).to_bytes(2, "little")
    head[32:36] = crc32c(bytes(head[:32])).to_bytes(4, "little")
    seg.write_bytes(bytes(head) + data[36:frames_end(data)])


def test_version_1_segments_still_open(tmp_path: Path) -> None:
    image, seg, ref = _image(tmp_path, 20)
    for p in segments(image):
        _as_version_1(p)
    assert version_of(seg) == 1
    last = max(ref)
    ro = mmsb.open_readonly(image, cfg(recovery="strict"))
    assert view(ro) == ref[last] and not ro.recovery_notes
    with mmsb.attach(image) as r:
        lsns = [ev.lsn for ev in r.changes(0)]
    assert lsns and lsns[-1] == last
    # In a version-1 segment zeros after the frames are a torn append, as they were.
    case = tmp_path / "zeros"
    shutil.copytree(image, case)
    with open(segments(case)[-1], "ab") as f:
        f.write(bytes(100))
    with pytest.raises(mmsb.SerializationError):
        mmsb.mmsb_start(path=case, config=cfg(recovery="strict"))
    s = mmsb.mmsb_start(path=case, config=cfg())
    try:
        assert view(s) == ref[last] and s.counters.torn_tails_recovered == 1
    finally:
        mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=image, config=cfg(fsync="always", recovery="strict"))
    try:
        assert view(s) == ref[last]
        mmsb.write_page(s, 1, 0, b"v2")  # new segments are version 2
        assert version_of(segments(image)[-1]) == 2
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- readers


def test_a_reader_follows_across_allocated_space_and_rolls(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always", segment_bytes=8192,
                                              max_tlog_size=10_000))
    try:
        pid = mmsb.create_page(s, 256).id
        seen: list[int] = []
        with mmsb.attach(root) as r:
            feed = r.changes(0, follow=True, timeout=5)
            for i in range(400):
                mmsb.write_page(s, pid, i % 250, bytes([i % 200 + 1]) * 4)
                if i % 37 == 0:
                    # Read up to the writer's end, in allocated space.
                    while not seen or seen[-1] < s.last_lsn:
                        seen.append(next(feed).lsn)
            while seen[-1] < s.last_lsn:
                seen.append(next(feed).lsn)
            feed.close()
            assert seen == list(range(1, s.last_lsn + 1))
            assert len(segments(root)) > 3
            # A feed started afresh reads the same, from sealed and allocated segments.
            assert [ev.lsn for ev in r.changes(0)] == seen
            assert r.read_page(pid) == mmsb.query_page(s, pid)
    finally:
        mmsb.mmsb_stop(s)


def test_a_read_that_saw_a_later_frame_before_an_earlier_one_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only open reads a segment page by page while a writer writes into its
    allocated space, so it can see a frame whose predecessor was still zeros: damage in
    what was read, not in the file. The open reads again."""
    from mmsb._storage import bus as bus_mod

    image, seg, ref = _image(tmp_path, 20)
    data = seg.read_bytes()
    end = frames_end(data)
    cut = frames_end(data[:end - 150])  # a frame boundary a few frames before the end
    stale = data[:cut] + bytes(60) + data[cut + 60:]
    real = bus_mod.DurableBus.read_bytes
    reads = {"stale": 0}

    def racy(self: Any, path: Path) -> bytes:
        if path.name == seg.name and reads["stale"] == 0:
            reads["stale"] += 1
            return stale
        return real(self, path)

    monkeypatch.setattr(bus_mod.DurableBus, "read_bytes", racy)
    ro = mmsb.open_readonly(image, cfg())
    assert reads["stale"] == 1 and view(ro) == ref[max(ref)]
    # The same bytes in the file itself are damage, reported as such.
    seg.write_bytes(stale)
    monkeypatch.setattr(bus_mod.DurableBus, "read_bytes", real)
    with pytest.raises(mmsb.SerializationError) as exc:
        mmsb.open_readonly(image, cfg())
    assert not isinstance(exc.value, bus_mod.BusChangedError)


# --------------------------------------------------------------------------- shared writers


def test_shared_writers_catch_up_inside_allocated_space(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    config = cfg(fsync="always", segment_bytes=16384, max_tlog_size=10_000)
    a = mmsb.mmsb_start(path=path, shared=True, config=config)
    b = mmsb.mmsb_start(path=path, shared=True, config=config)
    try:
        p = mmsb.create_page(a, 64)
        for i in range(200):
            w = a if i % 3 else b
            mmsb.write_page(w, p.id, i % 60, bytes([i % 250 + 1]) * 4)
            assert a.bus is not None and b.bus is not None
        mmsb.write_page(a, p.id, 0, b"a-last")
        mmsb.set_metadata(b, p.id, "k", 1)  # b catches up with a's records
        assert mmsb.query_page(b, p.id) == mmsb.query_page(a, p.id)
        assert b.last_lsn == a.last_lsn + 1
        live = segments(path)[-1]
        assert live.stat().st_size > frames_end(live.read_bytes())  # written ahead
        # A writer that dies in the middle of an append into the allocated space leaves
        # its first bytes there, unpublished: the next writer cuts them.
        assert b.bus.writer is not None
        at = b.bus.writer.size
        with open(live, "r+b") as f:
            f.seek(at)
            f.write(b"\x50\x00\x00\x00\x00\x00\x00\x00torn")
        mmsb.write_page(a, p.id, 8, b"after")
        assert any("torn record" in n for n in a.bus.recovery_notes)
        mmsb.set_metadata(b, p.id, "k", 2)
        assert mmsb.query_page(b, p.id)[8:13] == b"after"
        want = view(b)
    finally:
        mmsb.mmsb_stop(a)
        mmsb.mmsb_stop(b)
    assert strict_reopen_view(path) == want


def test_a_roll_seals_space_another_writer_wrote_ahead(tmp_path: Path) -> None:
    """A writer never writes ahead past its own roll size, so its rolls leave no zeros;
    a shared writer with a smaller roll size rolls a segment another writer wrote
    ahead: the roll cuts it to its last frame."""
    path = tmp_path / "bus"
    a = mmsb.mmsb_start(path=path, shared=True, config=cfg(fsync="always"))
    b = mmsb.mmsb_start(path=path, shared=True, config=cfg(fsync="always",
                                                           segment_bytes=4096))
    try:
        pid = mmsb.create_page(a, 64).id
        first = segments(path)[-1]
        assert first.stat().st_size == wal_mod.ALLOC_STEP  # a wrote ahead
        for i in range(60):
            mmsb.write_page(b, pid, i, b"b")
        assert segments(path)[-1] != first  # b rolled
        assert first.stat().st_size == frames_end(first.read_bytes())
        mmsb.write_page(a, pid, 0, b"a")  # a follows b into its segments
        want = view(a)
    finally:
        mmsb.mmsb_stop(a)
        mmsb.mmsb_stop(b)
    assert strict_reopen_view(path)[:2] == want[:2]


# --------------------------------------------------------------------------- full disks


def test_a_refused_allocation_leaves_the_write_to_a_plain_append(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always"))
    try:
        w = s.bus.writer
        assert w is not None and w.allocated == w.size  # the header alone so far
        steps: list[str] = []

        def no_room(step: str, path: str) -> None:
            steps.append(step)
            if step == "allocate":
                raise OSError(errno.ENOSPC, "No space left on device (injected)")

        previous = fsops.set_fault_hook(no_room)
        try:
            pid = mmsb.create_page(s, 64).id
            for i in range(5):
                mmsb.write_page(s, pid, i, b"x")
        finally:
            fsops.set_fault_hook(previous)
        assert steps.count("allocate") == 6 and w.ahead  # tried again at each write
        seg = segments(root)[-1]
        assert seg.stat().st_size == frames_end(seg.read_bytes()) == w.size
        mmsb.write_page(s, pid, 9, b"room again")
        assert seg.stat().st_size > w.size  # written ahead once more
        want = view(s)
    finally:
        mmsb.mmsb_stop(s)
    assert strict_reopen_view(root) == want


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux file-size limit")
def test_a_full_disk_refuses_the_write_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """The process's file-size limit at the frames' end: the allocation and the append
    are both refused; the write is refused alone, nothing of it stays, and once there is
    room the bus goes on."""
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always", segment_bytes=8192))
    try:
        pid = mmsb.create_page(s, 64).id
        mmsb.write_page(s, pid, 0, b"kept")
        w = s.bus.writer
        assert w is not None
        # Use up the space written ahead, so that the next append needs more.
        while w.size + 200 < w.allocated:
            mmsb.write_page(s, pid, 10, os.urandom(40))
        before = view(s)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (w.allocated, limit[1]))
        try:
            with pytest.raises(mmsb.DurabilityError, match="goes on"):
                mmsb.write_page(s, pid, 0, os.urandom(60))
            assert view(s) == before
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        seg = segments(root)[-1]
        assert not seg.read_bytes()[w.size:].strip(b"\0")  # nothing partial stays
        mmsb.write_page(s, pid, 0, b"room")
        want = view(s)
    finally:
        mmsb.mmsb_stop(s)
    assert strict_reopen_view(root) == want


# --------------------------------------------------------------------------- tools


def test_inspect_and_metrics_see_writes_into_allocated_space(tmp_path: Path) -> None:
    from mmsb.cli import _Reloading
    from mmsb.cli.views import bus_files_info

    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=cfg(fsync="always"))
    try:
        pid = _fill(s, 10)
        w = s.bus.writer
        assert w is not None
        row = bus_files_info(root)["wal"][-1]
        assert row["status"] == "ok" and row["frames_end"] == w.size
        assert row["bytes"] == w.allocated > w.size
        reloading = _Reloading(root, None)
        seg = segments(root)[-1]
        st = seg.stat()
        mmsb.write_page(s, pid, 0, b"unseen?")
        # Within the clock's tick a write into allocated space changes neither the
        # segment's size nor its time: the key still changes (the published log end).
        os.utime(seg, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert seg.stat().st_size == st.st_size
        assert reloading._key() != reloading.key
    finally:
        mmsb.mmsb_stop(s)
