"""Crash safety of the durable bus: a SIGKILL loop, torn tails cut at every
byte, every byte of every file flipped, and hostile lengths and counts.

* Crash loop: tests/crash_writer.py writes with fsync="always" and acknowledges each
  write on stdout after the call returns; the test kills it with SIGKILL at random
  moments, reopens the bus and checks that every acknowledged write is there with its
  exact bytes and epoch, and that the one write that may have been in flight is wholly
  there or wholly absent.
* Torn tail: a crash image (a copy of the directory taken while the bus is open, so the
  records are still in the WAL) whose segment is cut at every byte offset.
* Damage: every byte of every file of a crash image (BUS, checkpoint, WAL segments) and
  of a checkpoint_log file flipped; each case ends in the exact state, a true earlier
  state (only for the WAL's tail) or a SerializationError — never anything else.
* Hostile input: frames, records and checkpoint sections crafted with valid checksums
  and impossible lengths, counts or contents; only SerializationError, no big allocation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

import mmsb
from conftest import edges, join_checkpoint, pages_view, split_checkpoint
from crash_writer import apply as apply_write
from crash_writer import digest, plan
from mmsb._storage import checkpoint as ckpt_mod
from mmsb._storage import wal as wal_mod
from mmsb._storage.bus import bus_files
from mmsb._storage.codec import crc32c, decode_record
from mmsb._storage.wal import SEG_HEADER_SIZE, frame, scan_segment, segment_header

WRITER = Path(__file__).with_name("crash_writer.py")
MB = 1 << 20


# --------------------------------------------------------------------------- helpers


def cfg(**kw: Any) -> mmsb.MMSBConfig:
    kw.setdefault("enable_gpu", False)
    return mmsb.MMSBConfig(**kw)


def state_view(state: mmsb.MMSBState) -> tuple:
    return (pages_view(state), edges(state), int(state.next_page_id))


def frame_ends(seg: bytes) -> list[int]:
    """Offsets where a frame ends (the header's end first), read from the format
    (docs/SerializationSpec.md), not from the implementation's scanner."""
    ends = [SEG_HEADER_SIZE]
    pos = SEG_HEADER_SIZE
    while pos < len(seg):
        (n,) = struct.unpack_from("<Q", seg, pos)
        pos += 12 + n
        assert pos <= len(seg)
        ends.append(pos)
    return ends


@contextlib.contextmanager
def memory_cap(extra: int = 1 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size + ``extra`` while the block
    runs, so that a huge allocation fails fast instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + extra if hard == resource.RLIM_INFINITY else min(hard, vm + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def traced_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(what ``fn`` returned or raised, peak traced allocation in bytes)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        try:
            out: Any = fn()
        except BaseException as exc:  # noqa: BLE001 - the caller classifies it
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def write_image(dst: Path, files: dict[str, bytes]) -> Path:
    """Make ``dst`` a bus directory holding exactly ``files`` (relative path → bytes),
    reusing it (and its sub-directories) when it exists."""
    for sub in ("checkpoints", "wal", "map"):
        d = dst / sub
        if d.is_dir():
            for p in d.iterdir():
                p.unlink()
        else:
            d.mkdir(parents=True)
    for p in dst.iterdir():
        if p.is_file():
            p.unlink()
    for rel, data in files.items():
        (dst / rel).write_bytes(data)
    return dst


@pytest.fixture(scope="module")
def fast_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scratch directory on tmpfs when there is one (file creation and unlinking are
    several times faster there), else under pytest's tmp path."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="mmsb-test-", dir=shm))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fast")


@pytest.fixture
def fast_io(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For the loops that open a bus thousands of times: fsync is a no-op (what recovery
    reads does not depend on it) and recovery's warnings are not collected."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    bus_log = logging.getLogger("mmsb.bus")
    level = bus_log.level
    bus_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bus_log.setLevel(level)


def read_image(root: Path) -> dict[str, bytes]:
    """The data files of a bus directory: not the LOCK file (it holds only a pid), nor
    the mapped pages under map/ (derived from the log, rebuilt by every writer's open;
    tests/test_attach.py covers them)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "LOCK" and p.relative_to(root).parts[0] != "map"}


# --------------------------------------------------------------------------- crash loop


CRASH_ROUNDS = 120
CRASH_CFG: dict[str, Any] = dict(fsync="always", segment_bytes=4096, max_tlog_size=64,
                                 retain_checkpoints=3)


class _Zygote:
    """tests/crash_writer.py in fork-server mode: mmsb is imported once, and each round's
    writer is a fresh fork that opens the bus itself and is killed with SIGKILL."""

    def __init__(self, root: Path) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), "--zygote", str(root), CRASH_CFG["fsync"],
             str(CRASH_CFG["segment_bytes"]), str(CRASH_CFG["max_tlog_size"]),
             str(CRASH_CFG["retain_checkpoints"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.lines: list[bytes] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for(b"ready", 0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.lines.append(b"EOF")
            self.cond.notify_all()

    def wait_for(self, word: bytes, start: int, timeout: float = 60) -> bool:
        """Wait until a line from index ``start`` on begins with ``word``."""
        def seen() -> bool:
            return any(ln.startswith(word) or ln == b"EOF" for ln in self.lines[start:])
        with self.cond:
            ok = self.cond.wait_for(seen, timeout)
            assert b"EOF" not in self.lines, "the fork server died"
            return ok

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("quit")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_crash_loop_loses_no_acknowledged_write(tmp_path: Path) -> None:
    rng = random.Random(0x3B05)
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=cfg(**CRASH_CFG))
    for n in (64, 200, 1000, 4096):
        mmsb.create_page(s, n)
    model = {pid: (mmsb.query_page(s, pid), 0) for pid in s.pages}
    mmsb.mmsb_stop(s)
    sizes = {pid: len(b) for pid, (b, _) in model.items()}

    zyg = _Zygote(root)
    rounds_with_acks = total_acks = in_flight_kept = 0
    try:
        for r in range(CRASH_ROUNDS):
            start = len(zyg.lines)
            zyg.send(f"go {r}")
            if rng.random() < 0.2:
                zyg.wait_for(b"child", start)
                time.sleep(rng.uniform(0.0, 0.02))  # may hit opening, recovery, checkpoint
            else:
                assert zyg.wait_for(b"open", start), f"round {r}: the writer never opened the bus"
                time.sleep(rng.uniform(0.02, 0.08))
            zyg.send("kill")
            assert zyg.wait_for(b"dead", start), f"round {r}: the writer was not reaped"
            lines = [ln.decode() for ln in zyg.lines[start:] if ln.endswith(b"\n")]

            # Acknowledged writes, in order, checked against the deterministic plan.
            opened = any(ln.startswith("open ") for ln in lines)
            acks = [ln.split() for ln in lines if ln.startswith("ack ")]
            for k, (_, i, pid, epoch, h) in enumerate(acks):
                kind, wpid, off, data = plan(r, int(i), sizes)
                assert (int(i), int(pid)) == (k, wpid)
                new = apply_write(kind, model[wpid][0], off, data)
                model[wpid] = (new, model[wpid][1] + 1)
                assert (digest(new), model[wpid][1]) == (h, int(epoch)), f"round {r} ack {i}"
            total_acks += len(acks)
            rounds_with_acks += bool(acks)
            # The one write that may have been in flight when the kill came.
            candidate = None
            if opened:
                kind, cpid, off, data = plan(r, len(acks), sizes)
                candidate = (cpid, apply_write(kind, model[cpid][0], off, data),
                             model[cpid][1] + 1)

            s = mmsb.mmsb_start(path=str(root), config=cfg(**CRASH_CFG))
            try:
                got = {pid: (mmsb.query_page(s, pid), int(p.epoch)) for pid, p in s.pages.items()}
                assert set(got) == set(model), f"round {r}: pages {sorted(got)}"
                for pid, now in got.items():
                    if now == model[pid]:
                        continue
                    assert candidate is not None and pid == candidate[0] and \
                        now == candidate[1:], (
                            f"round {r}: page {pid} has epoch {now[1]} (acknowledged: "
                            f"{model[pid][1]}) and bytes that are neither the acknowledged "
                            "ones nor the whole in-flight write")
                    model[pid] = now
                    in_flight_kept += 1
                if r % 10 == 0:
                    assert mmsb.verify_state_consistency(s)
            finally:
                mmsb.mmsb_stop(s)
    finally:
        zyg.close()
    # The kills must land among writes (not only before the first): enough rounds with
    # acknowledged writes, and writes in them. How many fit in a round depends on the
    # machine's load, so the bounds are loose.
    assert rounds_with_acks >= CRASH_ROUNDS * 0.5, (rounds_with_acks, total_acks)
    assert total_acks > 2 * CRASH_ROUNDS


@pytest.mark.slow
def test_crash_of_a_freshly_started_interpreter(tmp_path: Path) -> None:
    """The same check with a few writers started as new interpreters (no fork)."""
    rng = random.Random(7)
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="always"))
    for n in (64, 200):
        mmsb.create_page(s, n)
    model = {pid: (mmsb.query_page(s, pid), 0) for pid in s.pages}
    mmsb.mmsb_stop(s)
    sizes = {pid: len(b) for pid, (b, _) in model.items()}
    for r in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(root), str(r), "always", "-", "4096", "64"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith(b"open ")
        time.sleep(rng.uniform(0.02, 0.06))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lines = [ln.decode() for ln in proc.stdout.read().splitlines(keepends=True)
                 if ln.endswith(b"\n")]
        proc.stdin.close()
        proc.stdout.close()
        acks = [ln.split() for ln in lines if ln.startswith("ack ")]
        for _, i, pid, epoch, h in acks:
            kind, wpid, off, data = plan(r, int(i), sizes)
            assert wpid == int(pid)
            model[wpid] = (apply_write(kind, model[wpid][0], off, data), model[wpid][1] + 1)
            assert (digest(model[wpid][0]), model[wpid][1]) == (h, int(epoch))
        kind, cpid, off, data = plan(r, len(acks), sizes)
        candidate = (apply_write(kind, model[cpid][0], off, data), model[cpid][1] + 1)
        s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="always"))
        try:
            for pid, p in s.pages.items():
                now = (mmsb.query_page(s, pid), int(p.epoch))
                assert now == model[pid] or (pid == cpid and now == candidate), f"round {r}"
                model[pid] = now
        finally:
            mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- torn tail


@pytest.fixture(scope="module")
def torn_image(fast_base: Path) -> dict[str, Any]:
    """A crash image of a bus with ~50 records in one WAL segment, and the state after
    each LSN (from the live state's replay and from views taken after each call)."""
    base = fast_base / "torn"
    root = base / "bus"
    s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
    after: dict[int, tuple] = {0: state_view(s)}
    a, b, c = (p.id for p in mmsb.create_pages(s, 3, 24))
    after[s.last_lsn] = state_view(s)
    for i in range(50):
        if i % 9 == 4:
            mmsb.set_metadata(s, (a, b, c)[i % 3], "i", i)
        elif i == 30:
            mmsb.add_dependency(s, a, c, mmsb.CONTROL_DEPENDENCY)  # writes to a log a stale mark
        elif i % 7 == 6:
            mmsb.update_page(s, b, bytes([i]) * 24)  # dense
        else:
            mmsb.write_page(s, (a, b, c)[i % 3], i % 20, bytes([i, i + 1]))
        after[s.last_lsn] = state_view(s)
    s.bus.flush()
    image = read_image(root)
    last = s.last_lsn
    ref = {lsn: state_view(mmsb.replay_to_lsn(s, lsn)) for lsn in range(last + 1)}
    mmsb.mmsb_stop(s)
    for lsn, view in after.items():
        assert ref[lsn] == view
    segs = [k for k in image if k.startswith("wal/")]
    assert len(segs) == 1 and len([k for k in image if k.startswith("checkpoints/ckpt-")]) == 1
    seg = image[segs[0]]
    ends = frame_ends(seg)
    assert len(ends) - 1 == last >= 50
    return {"image": image, "seg": segs[0], "ends": ends, "ref": ref, "base": base}


def _cut_image(torn: dict[str, Any], cut: int, name: str) -> Path:
    files = dict(torn["image"])
    files[torn["seg"]] = files[torn["seg"]][:cut]
    return write_image(torn["base"] / name, files)


def _complete_before(ends: list[int], cut: int) -> int:
    """Records wholly before ``cut`` (the checkpoint is at LSN 0)."""
    return max(0, sum(1 for e in ends[1:] if e <= cut))


@pytest.mark.slow
@pytest.mark.parametrize("recovery", ["tolerate_tail", "point_in_time"])
def test_torn_tail_recovers_exactly_the_complete_records(torn_image: dict[str, Any],
                                                         recovery: str, fast_io: None) -> None:
    ends, ref = torn_image["ends"], torn_image["ref"]
    size = ends[-1]
    # tolerate_tail: every offset; point_in_time takes the same path for a tail, so
    # every third offset and every offset next to a frame boundary.
    near = {e + d for e in ends for d in (-1, 0, 1)}
    cuts = [c for c in range(size + 1)
            if recovery == "tolerate_tail" or c % 3 == 0 or c in near or c < SEG_HEADER_SIZE]
    for cut in cuts:
        root = _cut_image(torn_image, cut, f"cut-{recovery}")
        s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none", recovery=recovery))
        try:
            k = _complete_before(ends, cut)
            torn = cut not in ends
            assert s.last_lsn == k, f"cut at byte {cut}: LSN {s.last_lsn}, expected {k}"
            assert state_view(s) == ref[k], f"cut at byte {cut}"
            assert mmsb.get_stats(s).torn_tails_recovered == int(torn), f"cut at byte {cut}"
            assert bool(s.recovery_notes) == torn, f"cut at byte {cut}: {s.recovery_notes}"
            if cut % 11 == 0:
                assert mmsb.verify_state_consistency(s)
        finally:
            mmsb.mmsb_stop(s)
        if cut % 13 == 0:  # the cut tail is gone for good: a second reopen is clean
            s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none", recovery="strict"))
            try:
                assert s.last_lsn == k and state_view(s) == ref[k] and not s.recovery_notes
            finally:
                mmsb.mmsb_stop(s)


@pytest.mark.slow
def test_torn_tail_in_strict_mode_raises_unless_on_a_record_boundary(
        torn_image: dict[str, Any], fast_io: None) -> None:
    ends, ref = torn_image["ends"], torn_image["ref"]
    for cut in range(ends[-1] + 1):
        root = _cut_image(torn_image, cut, "cut-strict")
        config = cfg(fsync="none", recovery="strict")
        if cut in ends:
            s = mmsb.mmsb_start(path=str(root), config=config)
            try:
                k = ends.index(cut)
                assert s.last_lsn == k and state_view(s) == ref[k]
            finally:
                mmsb.mmsb_stop(s)
        else:
            with pytest.raises(mmsb.SerializationError) as exc:
                mmsb.mmsb_start(path=str(root), config=config)
            assert exc.value.path is not None and "wal-" in exc.value.path


def test_torn_tail_readonly_sees_the_complete_records(torn_image: dict[str, Any]) -> None:
    ends, ref = torn_image["ends"], torn_image["ref"]
    for cut in range(0, ends[-1] + 1, 5):
        root = _cut_image(torn_image, cut, "cut-ro")
        before = read_image(root)
        ro = mmsb.open_readonly(root, cfg(recovery="strict"))
        k = _complete_before(ends, cut)
        assert ro.last_lsn == k and state_view(ro) == ref[k]
        assert read_image(root) == before


# --------------------------------------------------------------------------- damage


@pytest.fixture(scope="module")
def damage_image(fast_base: Path) -> dict[str, Any]:
    """A small crash image with a checkpoint that holds data and a WAL tail after it:
    BUS, checkpoints/ckpt-2, wal/wal-2-0 (header only), wal/wal-2-1 (records)."""
    base = fast_base / "damage"
    root = base / "bus"
    s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
    a = mmsb.create_page(s, 16, metadata={"m": 1})
    b = mmsb.create_page(s, 24)
    mmsb.write_page(s, a.id, 2, b"abc")
    mmsb.update_page(s, b.id, bytes(range(24)))
    mmsb.add_dependency(s, a.id, b.id, mmsb.GPU_SYNC_DEPENDENCY)
    mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
    # The open leaves the superseded ckpt-1 for the close or the next checkpoint to
    # remove; removed now, so that the image holds only files recovery reads.
    s.bus.drop_superseded()
    ckpt_lsn = s.last_lsn
    for i in range(6):
        mmsb.write_page(s, (a.id, b.id)[i % 2], i, bytes([0xF0 + i]))
    mmsb.set_metadata(s, b.id, "k", "v")
    s.bus.flush()
    image = read_image(root)
    last = s.last_lsn
    ref = {lsn: state_view(mmsb.replay_to_lsn(s, lsn)) for lsn in range(last + 1)}
    mmsb.mmsb_stop(s)
    names = sorted(image)
    assert len(names) == 5, names  # with the checkpoints' page store
    # The bytes of the page store that matter: its header and the pages the checkpoint
    # names (other slots are free space).
    refs = ckpt_mod.read_checkpoint(root / next(n for n in names if "ckpt-" in n)).page_refs
    assert refs is not None
    store = image["checkpoints/pages"]
    named = np.zeros(len(store), bool)
    named[:64] = True
    for off, size in zip(refs.offsets.tolist(), refs.sizes.tolist(), strict=True):
        named[off:off + size] = True
    return {"image": image, "ref": ref, "last": last, "ckpt_lsn": ckpt_lsn, "base": base,
            "last_seg": max(n for n in names if n.startswith("wal/")), "named": named}


def _classify(open_fn: Callable[[Path], mmsb.MMSBState], root: Path, dmg: dict[str, Any],
              rel: str, offset: int, earlier_from_any_segment: bool) -> str:
    """Open a damaged image and read its history: "exact", "earlier" or "error"; anything
    else fails. An earlier state may come from damage in the last segment (a tail), or in
    any segment with ``earlier_from_any_segment`` (point_in_time). Damage in the history
    that a writer's open leaves on disk (the checkpoints' log sections) is refused when
    the history is read: "error" too (the stop, whose checkpoint writes only the log's
    tail, may then succeed, or be refused where it reads the history)."""
    where = f"{rel} byte {offset}"
    try:
        s = open_fn(root)
    except mmsb.SerializationError:
        return "error"
    except BaseException as exc:  # noqa: BLE001
        pytest.fail(f"{where}: {type(exc).__name__}: {exc}")
    history_refused = False
    try:
        try:
            len(s.tlog)  # the retained history, read now where the open deferred it
        except mmsb.SerializationError:
            history_refused = True
            return "error"
        lsn = int(s.last_lsn)
        view = state_view(s)
        if lsn == dmg["last"] and view == dmg["ref"][lsn]:
            return "exact"
        from_wal = rel.startswith("wal/") if earlier_from_any_segment else rel == dmg["last_seg"]
        assert from_wal and dmg["ckpt_lsn"] <= lsn < dmg["last"], (
            f"{where}: recovered LSN {lsn} from damage outside the WAL tail")
        assert view == dmg["ref"][lsn], f"{where}: recovered a state that never was (LSN {lsn})"
        return "earlier"
    finally:
        try:
            mmsb.mmsb_stop(s)
        except mmsb.SerializationError:
            if not history_refused:
                raise


@pytest.mark.slow
@pytest.mark.parametrize("recovery", ["tolerate_tail", "strict", "point_in_time", "readonly"])
def test_every_flipped_byte_of_every_bus_file(damage_image: dict[str, Any],
                                              recovery: str, fast_io: None) -> None:
    dmg = damage_image
    if recovery == "readonly":
        def open_fn(root: Path) -> mmsb.MMSBState:
            return mmsb.open_readonly(root, cfg())
    else:
        def open_fn(root: Path) -> mmsb.MMSBState:
            return mmsb.mmsb_start(path=str(root), config=cfg(fsync="none", recovery=recovery))
    outcomes: dict[str, dict[str, int]] = {}
    for rel, data in dmg["image"].items():
        if recovery in ("strict", "point_in_time") and not rel.startswith("wal/"):
            continue  # BUS and checkpoint damage does not depend on the mode
        counts = outcomes.setdefault(rel, {"exact": 0, "earlier": 0, "error": 0})
        for offset in range(len(data)):
            files = dict(dmg["image"])
            flipped = bytearray(data)
            flipped[offset] ^= 0xFF
            files[rel] = bytes(flipped)
            root = write_image(dmg["base"] / f"flip-{recovery}", files)
            before = read_image(root) if recovery == "readonly" else None
            outcome = _classify(open_fn, root, dmg, rel, offset, recovery == "point_in_time")
            counts[outcome] += 1
            if rel == "checkpoints/pages":
                # A checkpoint names each page's slot with its CRC32C: damage there is
                # refused; a byte of a free slot changes nothing.
                want = "error" if dmg["named"][offset] else "exact"
                assert outcome == want, f"{rel} byte {offset}: {outcome}"
            if recovery == "strict":
                assert outcome != "earlier", f"{rel} byte {offset}: strict mode cut the log"
            if recovery == "point_in_time":
                assert outcome != "error", f"{rel} byte {offset}: point_in_time refused"
            if before is not None:
                assert read_image(root) == before, f"{rel} byte {offset}: read-only wrote"
    # Every byte of BUS and of the checkpoint is checksummed: never silently accepted.
    for rel, counts in outcomes.items():
        if not rel.startswith("wal/") and rel != "checkpoints/pages":
            assert counts["error"] == len(dmg["image"][rel]), (rel, counts)


def test_every_flipped_byte_of_a_checkpoint_log_file(tmp_path: Path) -> None:
    src = mmsb.MMSBState(cfg())
    a = mmsb.create_page(src, 16, metadata={"x": [1, 2]})
    b = mmsb.create_page(src, 8)
    mmsb.write_page(src, a.id, 3, b"hello")
    mmsb.update_page(src, b.id, b"12345678")
    mmsb.add_dependency(src, a.id, b.id, mmsb.CONTROL_DEPENDENCY)
    mmsb.write_page(src, a.id, 0, b"!")
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(src, path)
    good = path.read_bytes()
    want = state_view(src)

    target = mmsb.MMSBState(cfg())
    t = mmsb.create_page(target, 4)
    mmsb.update_page(target, t.id, b"keep")
    before = (state_view(target), int(target.last_lsn), len(target.tlog))
    bad = tmp_path / "bad.mmsb"
    errors = 0
    for offset in range(len(good)):
        flipped = bytearray(good)
        flipped[offset] ^= 0xFF
        bad.write_bytes(flipped)
        try:
            mmsb.load_checkpoint(target, bad)
        except mmsb.SerializationError as exc:
            errors += 1
            assert str(bad) in str(exc)
            assert (state_view(target), int(target.last_lsn), len(target.tlog)) == before, offset
            continue
        except BaseException as exc:  # noqa: BLE001
            pytest.fail(f"byte {offset}: {type(exc).__name__}: {exc}")
        assert state_view(target) == want, f"byte {offset}: loaded a state that never was"
        target = mmsb.MMSBState(cfg())
        t = mmsb.create_page(target, 4)
        mmsb.update_page(target, t.id, b"keep")
    assert errors == len(good)  # every byte is covered by a checksum or a check


# --------------------------------------------------------------------------- damage before the tail


def _segment_image(tmp_path: Path, n: int = 50) -> tuple[dict[str, Any], str, list[int], dict]:
    root = tmp_path / "src"
    s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
    p = mmsb.create_page(s, 32)
    for i in range(n - 1):
        mmsb.write_page(s, p.id, i % 30, bytes([i + 1]))
    s.bus.flush()
    image = read_image(root)
    ref = {lsn: state_view(mmsb.replay_to_lsn(s, lsn)) for lsn in range(s.last_lsn + 1)}
    mmsb.mmsb_stop(s)
    seg = next(k for k in image if k.startswith("wal/"))
    return image, seg, frame_ends(image[seg]), ref


def test_damaged_frame_length_before_the_tail_is_an_error(tmp_path: Path) -> None:
    """Issue 3: only a torn *last* record is cut; damage before the tail is a
    SerializationError naming the file and offset. A flipped byte in the length field of
    a frame that 40 intact frames follow is damage before the tail."""
    image, seg, ends, ref = _segment_image(tmp_path)
    silently_cut = []
    for k in range(0, 10):
        for byte in range(8):
            files = dict(image)
            data = bytearray(image[seg])
            data[ends[k] + byte] ^= 0xFF
            files[seg] = bytes(data)
            root = write_image(tmp_path / f"len-{k}-{byte}", files)
            try:
                s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
            except mmsb.SerializationError as exc:
                assert exc.path is not None
                continue
            silently_cut.append((k, byte, int(s.last_lsn)))
            mmsb.mmsb_stop(s)
    assert not silently_cut, f"(frame, length byte, LSN kept) cut as a torn tail: {silently_cut}"


def test_damaged_body_before_the_tail_is_an_error_naming_file_and_offset(tmp_path: Path) -> None:
    image, seg, ends, ref = _segment_image(tmp_path, 20)
    for k in (0, 5, 18):
        files = dict(image)
        data = bytearray(image[seg])
        data[ends[k] + 20] ^= 0x01  # inside frame k's body
        files[seg] = bytes(data)
        root = write_image(tmp_path / f"body-{k}", files)
        with pytest.raises(mmsb.SerializationError) as exc:
            mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
        assert exc.value.offset == ends[k] and exc.value.path is not None
        assert exc.value.path.endswith(Path(seg).name)
        s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none", recovery="point_in_time"))
        try:
            assert s.last_lsn == k and state_view(s) == ref[k]
        finally:
            mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- hostile input


def _bus_parts(tmp_path: Path) -> dict[str, Any]:
    """A stopped bus with one 8-byte page (id 1) at epoch 1; its generation, id, last
    LSN and the name of the segment the next open replays after."""
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
    p = mmsb.create_page(s, 8)
    mmsb.write_page(s, p.id, 0, b"x")
    mmsb.mmsb_stop(s)
    image = read_image(root)
    ck = ckpt_mod.read_checkpoint(root / max(k for k in image if k.startswith("checkpoints/ckpt-")))
    gen = int(ck.bus["generation"])
    bus_id = int(ck.bus["bus_id"], 16)
    seq = max(int(k[-12:-4], 16) for k in image if k.startswith(f"wal/wal-{gen:016x}")) + 1
    return {"image": image, "gen": gen, "bus_id": bus_id, "lsn": int(ck.lsn), "seq": seq,
            "tmp": tmp_path}


def _with_segment(parts: dict[str, Any], frames: bytes, name: str) -> Path:
    files = dict(parts["image"])
    gen, seq = parts["gen"], parts["seq"]
    files[f"wal/wal-{gen:016x}-{seq:08x}.log"] = segment_header(parts["bus_id"], gen, seq) + frames
    return write_image(parts["tmp"] / name, files)


def _head(kind: int, lsn: int) -> bytes:
    return struct.pack("<BQq", kind, lsn, time.time_ns())


def _delta(lsn: int, pid: int, base: int, epoch: int, size: int, payload: bytes,
           did: int = 1000) -> bytes:
    return (_head(1, lsn) + struct.pack("<QQQQQ", did, pid, base, epoch, size)
            + struct.pack("<H", 3) + b"api" + payload)


def test_frame_lengths_past_the_end(tmp_path: Path) -> None:
    parts = _bus_parts(tmp_path)
    lsn = parts["lsn"] + 1
    good = frame(_delta(lsn, 1, 1, 2, 8, b"\x01" + b"y" * 8))
    for n, declared in enumerate((1 << 33, wal_mod.MAX_RECORD + 1, (1 << 64) - 1, 1 << 20)):
        bad = struct.pack("<Q", declared) + good[8:]
        root = _with_segment(parts, bad, f"len-{n}")
        seg = bus_files(root)["wal"][-1]
        scan, peak = traced_peak(lambda seg=seg: scan_segment(
            seg, parts["bus_id"], parts["gen"], parts["seq"], lsn))
        assert peak < 50 * MB
        assert scan.torn and not scan.records and scan.valid_end == SEG_HEADER_SIZE
        with pytest.raises(mmsb.SerializationError):
            mmsb.mmsb_start(path=str(root), config=cfg(fsync="none", recovery="strict"))
        s = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))  # a torn tail: cut
        try:
            assert int(s.pages[1].epoch) == 1 and s.recovery_notes
        finally:
            mmsb.mmsb_stop(s)


HOSTILE_BODIES: dict[str, Callable[[int], bytes]] = {
    "sparse delta, 2**32-1 runs": lambda lsn: _delta(lsn, 1, 1, 2, 8, b"\x00" + struct.pack("<I", 2**32 - 1)),
    "sparse delta, run past the page": lambda lsn: _delta(
        lsn, 1, 1, 2, 8, b"\x00" + struct.pack("<I", 1) + struct.pack("<II", 4, 2**31) + b"z"),
    "dense delta, 4 GiB page, 1 byte": lambda lsn: _delta(lsn, 1, 1, 2, 2**32 - 1, b"\x01z"),
    "masked delta, 4 GiB page": lambda lsn: _delta(lsn, 1, 1, 2, 2**32 - 1, b"\x02" + b"\xff" * 9),
    "create, metadata length 2**32-1": lambda lsn: _head(2, lsn) + struct.pack("<QQQB", 2, 1, 8, 0)
    + struct.pack("<I", 2**32 - 1) + b"\x80",
    "metadata record, name past the end": lambda lsn: _head(7, lsn) + struct.pack("<Q", 1)
    + struct.pack("<H", 65535) + b"api",
    "metadata record, msgpack bomb": lambda lsn: _head(7, lsn) + struct.pack("<Q", 1)
    + struct.pack("<H", 3) + b"api" + struct.pack("<I", 6) + b"\xdf\xff\xff\xff\xff\x00",
    "unknown record kind": lambda lsn: _head(200, lsn) + b"\0" * 8,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_hostile_record_bodies_are_typed_errors(tmp_path: Path, case: str) -> None:
    parts = _bus_parts(tmp_path)
    lsn = parts["lsn"] + 1
    body = HOSTILE_BODIES[case](lsn)
    # The decoder alone.
    out, peak = traced_peak(lambda: decode_record(body))
    assert isinstance(out, mmsb.SerializationError), repr(out)
    assert peak < 50 * MB
    # Framed with a valid checksum, then a good record after it: damage, not a tail.
    frames = frame(body) + frame(_delta(lsn + 1, 1, 1, 2, 8, b"\x01" + b"y" * 8))
    root = _with_segment(parts, frames, "bus2")
    seg = bus_files(root)["wal"][-1]
    scan, peak = traced_peak(lambda: scan_segment(seg, parts["bus_id"], parts["gen"],
                                                  parts["seq"], lsn))
    assert peak < 50 * MB
    assert isinstance(scan.damage, mmsb.SerializationError) and not scan.records
    with memory_cap():
        with pytest.raises(mmsb.SerializationError):
            mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
    # A standalone delta with the same body.
    if body[0] == 1:
        blob = struct.pack("<4sHI", b"MMSD", 1, crc32c(body)) + body
        out, peak = traced_peak(lambda: mmsb.deserialize_delta(blob))
        assert isinstance(out, mmsb.SerializationError) and peak < 50 * MB


# Records that decode, with valid checksums and LSNs, but that no real log can hold:
# page 1 exists (8 bytes, epoch 1); page 77 does not.
IMPOSSIBLE_RECORDS: dict[str, Callable[[int], bytes]] = {
    "delta on a missing page": lambda lsn: _delta(lsn, 77, 0, 1, 8, b"\x01" + b"y" * 8),
    "delta of the wrong page size": lambda lsn: _delta(lsn, 1, 1, 2, 100, b"\x01" + b"y" * 100),
    "delta on the wrong base epoch": lambda lsn: _delta(lsn, 1, 5, 6, 8, b"\x01" + b"y" * 8),
    "create 2**40 pages": lambda lsn: _head(2, lsn) + struct.pack("<QQQB", 2, 1 << 40, 1, 0)
    + struct.pack("<I", 0),
    "create page id 2**40": lambda lsn: _head(2, lsn) + struct.pack("<QQQB", 1 << 40, 1, 8, 0)
    + struct.pack("<I", 0),
    "create over a live page": lambda lsn: _head(2, lsn) + struct.pack("<QQQB", 1, 1, 8, 0)
    + struct.pack("<I", 0),
    "delete a missing page": lambda lsn: _head(3, lsn) + struct.pack("<Q", 77),
    "resize a missing page": lambda lsn: _head(4, lsn) + struct.pack("<QQ", 77, 8),
    "migrate a missing page": lambda lsn: _head(5, lsn) + struct.pack("<QB", 77, 0),
    "clone a missing page": lambda lsn: _head(6, lsn) + struct.pack("<QQ", 2, 77),
    "clone into id 2**40": lambda lsn: _head(6, lsn) + struct.pack("<QQ", 1 << 40, 1),
    "metadata of a missing page": lambda lsn: _head(7, lsn) + struct.pack("<Q", 77)
    + struct.pack("<H", 3) + b"api" + struct.pack("<I", 0),
    "edge to a missing page": lambda lsn: _head(8, lsn) + struct.pack("<QQB", 1, 77, 0),
    "self edge": lambda lsn: _head(8, lsn) + struct.pack("<QQB", 1, 1, 0),
    "remove a missing edge": lambda lsn: _head(9, lsn) + struct.pack("<QQ", 1, 77),
    "compacted, next id 2**40": lambda lsn: _head(10, lsn) + struct.pack("<Q", 1 << 40),
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE_RECORDS))
def test_impossible_records_in_the_log_are_refused(tmp_path: Path, case: str) -> None:
    """A crafted WAL record with a valid checksum and LSN that contradicts the state it
    is replayed onto: the open fails with SerializationError (never IndexError,
    MemoryError …, never a silently wrong state), without a big allocation."""
    parts = _bus_parts(tmp_path)
    lsn = parts["lsn"] + 1
    root = _with_segment(parts, frame(IMPOSSIBLE_RECORDS[case](lsn)), "bus2")
    baseline, base_peak = traced_peak(
        lambda: mmsb.mmsb_stop(mmsb.mmsb_start(path=str(_with_segment(parts, b"", "ok")),
                                               config=cfg(fsync="none"))))
    with memory_cap():
        out, peak = traced_peak(lambda: mmsb.mmsb_start(path=str(root), config=cfg(fsync="none")))
    if isinstance(out, mmsb.MMSBState):
        view = state_view(out)
        mmsb.mmsb_stop(out)
        pytest.fail(f"opened: {view}")
    assert isinstance(out, mmsb.SerializationError), f"{type(out).__name__}: {out}"
    assert peak < base_peak + 50 * MB


def test_a_large_but_possible_resize_in_the_log_is_never_an_untyped_error(tmp_path: Path) -> None:
    """A resize to the largest page size is a request a real writer can make: recovery
    either grows the page or, where memory runs out, refuses with SerializationError."""
    parts = _bus_parts(tmp_path)
    record = _head(4, parts["lsn"] + 1) + struct.pack("<QQ", 1, 2**32 - 1)
    root = _with_segment(parts, frame(record), "bus2")
    with memory_cap():
        try:
            state = mmsb.mmsb_start(path=str(root), config=cfg(fsync="none"))
        except mmsb.SerializationError:
            return
    try:
        assert state.pages[1].size == 2**32 - 1
    finally:
        mmsb.mmsb_stop(state)


# ---- crafted checkpoints (valid checksums, impossible sizes)


def _small_checkpoint() -> bytes:
    s = mmsb.MMSBState(cfg())
    p = mmsb.create_page(s, 16)
    mmsb.write_page(s, p.id, 0, b"abc")
    q = mmsb.create_page(s, 8)
    mmsb.add_dependency(s, p.id, q.id)
    return ckpt_mod.checkpoint_bytes(s)


def _zstd(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(raw)


def _replace(secs: list, tag: bytes, raw: bytes, raw_len: int | None = None,
             stored: bytes | None = None) -> list:
    return [(t, 1, len(raw) if raw_len is None else raw_len, _zstd(raw) if stored is None else stored)
            if t == tag else (t, c, r, st) for t, c, r, st in secs]


def _raw_of(secs: list, tag: bytes) -> bytes:
    t, c, r, st = next(x for x in secs if x[0] == tag)
    return zstandard.ZstdDecompressor().decompress(st, max_output_size=r) if c == 1 else st


def _hostile_checkpoints() -> dict[str, bytes]:
    raw = _small_checkpoint()
    head, secs = split_checkpoint(raw)
    assert join_checkpoint(head, secs) == raw  # the crafting round-trips
    import msgpack

    meta = msgpack.unpackb(_raw_of(secs, b"META"), raw=False, strict_map_key=False)
    out: dict[str, bytes] = {}
    out["section stored length 2**60"] = raw[:48] + struct.pack(
        "<4sB3xQQI", b"META", 1, 10, 1 << 60, 0) + raw[48 + 28:]  # (header CRC left wrong too)
    big = struct.pack("<4sB3xQQI", b"META", 1, 10, 1 << 60, 0)
    out["section stored length 2**60, valid header CRC"] = (
        raw[:48] + big + struct.pack("<I", crc32c(big)) + raw[48 + 32:])
    out["raw length 2**41, tiny stream"] = join_checkpoint(head, _replace(secs, b"PTBL", _raw_of(secs, b"PTBL"), 1 << 41))
    out["raw length past _MAX_SECTION"] = join_checkpoint(head, _replace(secs, b"PTBL", _raw_of(secs, b"PTBL"), 1 << 50))
    m2 = dict(meta, pages=10**12)
    out["10**12 pages"] = join_checkpoint(head, _replace(secs, b"META", msgpack.packb(m2)))
    out["graph of 2**32-1 edges"] = join_checkpoint(head, _replace(secs, b"GRPH", struct.pack("<I", 2**32 - 1)))
    # Version 1 (log records one by one), still read.
    v1 = (head[0], 1, *head[2:])
    out["v1 log record of 2**32-1 bytes"] = join_checkpoint(v1, _replace(secs, b"TLOG", struct.pack("<I", 2**32 - 1) + b"\0" * 20))
    rec = _delta(1, 1, 0, 1, 16, b"\x00" + struct.pack("<I", 2**32 - 1))
    out["v1 log record with 2**32-1 runs"] = join_checkpoint(v1, _replace(
        secs, b"TLOG", struct.pack("<I", len(rec)) + rec))
    # Version 2 (columns): counts that the section's bytes cannot hold.
    tlog = _raw_of(secs, b"TLOG")
    for k, name, big in ((0, "rows", 2**60), (1, "structural records", 2**32 - 1),
                         (2, "payload bytes", 2**63), (3, "base epochs", 2**40),
                         (4, "sources", 2**32 - 1)):
        t = bytearray(tlog)
        struct.pack_into("<I" if k == 4 else "<Q", t, 8 * k, big)
        out[f"log section of {big} {name}"] = join_checkpoint(head, _replace(secs, b"TLOG", bytes(t)))
    out["log section of 2**40 raw bytes declared"] = join_checkpoint(head, _replace(
        secs, b"TLOG", tlog, 1 << 40))
    out["mask row of a 2**40-byte page"] = join_checkpoint(head, _replace(
        secs, b"MASK", msgpack.packb([[1, 0, 1 << 40, b"\xff"]])))
    out["msgpack map of 2**32-1 entries"] = join_checkpoint(head, _replace(
        secs, b"META", b"\xdf\xff\xff\xff\xff"))
    out["section count 2**32-1"] = join_checkpoint((*head[:3], 2**32 - 1, *head[4:]), secs)
    out["base of 2**40 bytes declared"] = join_checkpoint(head, [
        (t, c, (1 << 40) if t == b"BASE" else r, st) for t, c, r, st in secs])
    return out


@pytest.mark.parametrize("case", sorted(_hostile_checkpoints()))
def test_hostile_checkpoint_lengths(tmp_path: Path, case: str) -> None:
    blob = _hostile_checkpoints()[case]
    out, peak = traced_peak(lambda: ckpt_mod.read_checkpoint(blob))
    assert isinstance(out, mmsb.SerializationError), f"{type(out).__name__}: {out}"
    assert peak < 50 * MB
    path = tmp_path / "h.mmsb"
    path.write_bytes(blob)
    target = mmsb.MMSBState(cfg())
    with pytest.raises(mmsb.SerializationError):
        mmsb.load_checkpoint(target, path)
    assert len(target.pages) == 0


def test_decompression_bomb_in_page_data_is_refused_small(tmp_path: Path) -> None:
    """PTBL says 24 bytes of pages; PDAT declares 64 MiB and holds a ~2 KiB zstd stream of
    zeros. The contradiction must be found before 64 MiB is inflated."""
    head, secs = split_checkpoint(_small_checkpoint())
    n = 64 * MB
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(n))
    assert len(bomb) < 16 * 1024
    blob = join_checkpoint(head, _replace(secs, b"PDAT", b"", n, bomb))
    out, peak = traced_peak(lambda: ckpt_mod.read_checkpoint(blob))
    assert isinstance(out, mmsb.SerializationError), f"{type(out).__name__}: {out}"
    assert peak < 50 * MB, f"peak {peak / MB:.0f} MiB for a {len(blob)}-byte file"


@pytest.mark.parametrize("next_id", [1 << 40, 1 << 32])
def test_checkpoint_with_a_huge_next_page_id_is_refused_or_cheap(tmp_path: Path,
                                                                 next_id: int) -> None:
    head, secs = split_checkpoint(_small_checkpoint())
    blob = join_checkpoint((*head[:5], next_id, head[6]), secs)
    path = tmp_path / "h.mmsb"
    path.write_bytes(blob)
    target = mmsb.MMSBState(cfg())
    with memory_cap():
        out, peak = traced_peak(lambda: mmsb.load_checkpoint(target, path))
    assert isinstance(out, mmsb.SerializationError | mmsb.MMSBState), f"{type(out).__name__}: {out}"
    assert peak < 50 * MB, f"peak {peak / MB:.0f} MiB for a {len(blob)}-byte file"
    if isinstance(out, mmsb.MMSBState):
        assert mmsb.create_page(target, 8).id == next_id
