"""Faults a durable bus must survive: hostile configuration, metadata the reader could
not read back, allocation failures, odd files where bus files belong, full and
read-only disks, and readers beside a busy writer. Each test pins one failure mode to a
typed error or to a state that is exact (or a true earlier state)."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mmsb
from mmsb._storage import fsops


def cfg(**kw: Any) -> mmsb.MMSBConfig:
    kw.setdefault("enable_gpu", False)
    return mmsb.MMSBConfig(**kw)


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("fsync_batch_ms", math.inf), ("fsync_batch_ms", 1e300), ("fsync_batch_ms", math.nan),
    ("fsync_batch_ms", -1.0), ("checkpoint_interval", math.inf),
    ("checkpoint_interval", math.nan), ("checkpoint_interval", -math.inf),
    ("page_size_default", 1 << 32), ("page_size_default", 0), ("page_size_default", 4.0),
    ("max_tlog_size", 1 << 63), ("max_tlog_size", True), ("segment_bytes", 1 << 41),
    ("segment_bytes", "64"), ("retain_checkpoints", 1 << 21), ("retain_checkpoints", 0),
    ("retain_checkpoints", 2.0), ("fsync", ["always"]), ("recovery", None),
    ("propagation_mode", object()), ("enable_logging", 1),
])
def test_config_field_out_of_range_is_refused(field: str, value: Any, tmp_path: Any) -> None:
    c = cfg(**{field: value})
    with pytest.raises(mmsb.InvalidArgumentError, match=field):
        mmsb.MMSBState(c)
    with pytest.raises(mmsb.InvalidArgumentError, match=field):
        mmsb.mmsb_start(config=c, path=tmp_path / "bus")


def test_config_bounds_match_the_engine() -> None:
    from mmsb._core.limits import MAX_PAGE_SIZE

    mmsb.MMSBState(cfg(page_size_default=MAX_PAGE_SIZE, fsync_batch_ms=0,
                       checkpoint_interval=0))
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.MMSBState(cfg(page_size_default=MAX_PAGE_SIZE + 1))


# --------------------------------------------------------------------------- helpers

def start(root: Any, **kw: Any) -> mmsb.MMSBState:
    kw.setdefault("fsync", "always")
    return mmsb.mmsb_start(config=cfg(**kw), path=root)


def view(s: mmsb.MMSBState) -> dict[int, tuple[bytes, int]]:
    return {pid: (mmsb.query_page(s, pid), int(s.pages[pid].epoch)) for pid in sorted(s.pages)}


def child_env() -> dict[str, str]:
    src = str(Path(mmsb.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Crash(BaseException):
    """A simulated kill: raised at a file step, and at every step after it."""


@contextlib.contextmanager
def fault_at(match: Callable[[str, str], bool], error: BaseException | None = None,
             *, once: bool = True) -> Iterator[dict[str, Any]]:
    """Raise ``error`` at the first file step for which ``match(step, path)`` is true
    (and, unless ``once``, at every later one that matches). Without ``error``: a Crash
    there and at every later step, whatever it is."""
    info: dict[str, Any] = {"hit": None}

    def hook(step: str, path: str) -> None:
        if info["hit"] is not None and (error is None or not once):
            if error is None:
                raise Crash(step)
            if match(step, path):
                raise error
            return
        if info["hit"] is None and match(step, path):
            info["hit"] = (step, path)
            raise error if error is not None else Crash(step)

    prev = fsops.set_fault_hook(hook)
    try:
        yield info
    finally:
        fsops.set_fault_hook(prev)


def abandon(s: mmsb.MMSBState) -> None:
    """What a kill leaves: the descriptors of a state that never closed are gone."""
    bus = s.bus
    if bus.writer is not None and bus.writer.fd >= 0:
        os.close(bus.writer.fd)
        bus.writer.fd = -1
    os.close(bus.lock_fd)
    bus.closed = True
    s.closed = True
    mmsb._api._active.set(None)


# --------------------------------------------------------------------------- retention

@pytest.mark.parametrize("retain", [1, 2])
def test_kill_between_checkpoint_rename_and_removal_leaves_an_openable_bus(
        tmp_path: Path, retain: int) -> None:
    root = tmp_path / "bus"
    s = start(root, retain_checkpoints=retain, max_tlog_size=1 << 30)
    p = mmsb.create_page(s, 32)
    for i in range(3):
        mmsb.write_page(s, p.id, i, b"abc")
        s.bus.checkpoint(s)
    mmsb.write_page(s, p.id, 10, b"last")
    expect = view(s)
    # The new checkpoint is renamed into place; the kill comes at the first removal.
    with fault_at(lambda step, path: step == "unlink" and "ckpt-" in path) as hit, \
            pytest.raises(Crash):
        s.bus.checkpoint(s)
    assert hit["hit"] is not None
    abandon(s)
    assert len(list((root / "checkpoints").glob("ckpt-*.mmsb"))) > retain
    r = mmsb.open_readonly(root)
    assert view(r) == expect and mmsb.verify_state_consistency(r)
    s = start(root, retain_checkpoints=retain)
    try:
        assert view(s) == expect and mmsb.verify_state_consistency(s)
        # The checkpoints older than the retained chain are left to the next checkpoint
        # or the close (recovery never reads them), and only those.
        left = set((root / "checkpoints").glob("ckpt-*.mmsb"))
        superseded = set(s.bus.superseded)
        assert superseded <= left and len(left - superseded) <= retain
        assert all(q.name < min(k.name for k in left - superseded) for q in superseded)
        mmsb.write_page(s, p.id, 0, b"again")
    finally:
        mmsb.mmsb_stop(s)
    assert not any(q.exists() for q in superseded)
    for cmd in ("verify", "inspect"):
        r = subprocess.run([sys.executable, "-m", "mmsb", cmd, str(root)], capture_output=True,
                           text=True, env=child_env(), timeout=60)
        assert r.returncode == 0, r.stderr


def test_removals_are_followed_by_a_directory_fsync(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root, retain_checkpoints=1)
    p = mmsb.create_page(s, 8)
    mmsb.write_page(s, p.id, 0, b"x")
    s.bus.checkpoint(s)
    steps: list[tuple[str, str]] = []
    prev = fsops.set_fault_hook(lambda step, path: steps.append((step, path)))
    try:
        mmsb.write_page(s, p.id, 0, b"y")
        s.bus.checkpoint(s)
    finally:
        fsops.set_fault_hook(prev)
        mmsb.mmsb_stop(s)
    last_unlink = max(i for i, (step, _) in enumerate(steps) if step == "unlink")
    assert any(step == "fsync_dir" for step, _ in steps[last_unlink + 1:])


# --------------------------------------------------------------------------- odd files

def _made_bus(root: Path) -> dict[str, tuple[bytes, int]]:
    s = start(root, retain_checkpoints=2)
    p = mmsb.create_page(s, 16)
    mmsb.write_page(s, p.id, 0, b"kept")
    s.bus.checkpoint(s)
    mmsb.write_page(s, p.id, 4, b"more")
    out = view(s)
    abandon(s)  # leaves segments with records
    return out


def _readers(root: Path) -> list[Callable[[], Any]]:
    return [lambda: mmsb.open_readonly(root), lambda: mmsb.mmsb_stop(start(root))]


@pytest.mark.parametrize("which", ["checkpoint", "segment", "BUS"])
@pytest.mark.parametrize("kind", ["fifo", "symlink-dev-zero", "symlink-dangling", "directory"])
def test_special_files_where_bus_files_belong_are_refused(tmp_path: Path, which: str,
                                                          kind: str) -> None:
    root = tmp_path / "bus"
    _made_bus(root)
    target = {"checkpoint": lambda: sorted((root / "checkpoints").glob("ckpt-*"))[-1],
              "segment": lambda: sorted((root / "wal").glob("wal-*"))[-1],
              "BUS": lambda: root / "BUS"}[which]()
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink-dev-zero":
        os.symlink("/dev/zero", target)
    elif kind == "symlink-dangling":
        os.symlink(tmp_path / "nowhere", target)
    else:
        target.mkdir()
    fds = open_fds()
    for call in _readers(root):
        done = threading.Event()
        box: dict[str, BaseException] = {}

        def run(call: Callable[[], Any] = call, box: dict[str, BaseException] = box,
                done: threading.Event = done) -> None:
            try:
                call()
            except BaseException as exc:
                box["exc"] = exc
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()
        assert done.wait(30), f"hung on a {kind} where the {which} file belongs"
        assert isinstance(box.get("exc"), mmsb.MMSBError), box.get("exc")
    assert open_fds() == fds


def test_lock_symlink_is_never_written_through(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, root / "LOCK")
    with pytest.raises(mmsb.DurabilityError, match="symlink"):
        start(root)
    assert victim.read_bytes() == b"precious"


def test_identity_temp_symlink_is_never_written_through(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, root / ".BUS.tmp")
    s = start(root)
    mmsb.mmsb_stop(s)
    assert victim.read_bytes() == b"precious"
    assert (root / "BUS").is_file() and not (root / "BUS").is_symlink()


# --------------------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_every_bus_file_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "bus"
    old = os.umask(umask)
    seen: list[str] = []
    prev = fsops.set_fault_hook(
        lambda step, path: seen.append(path) if step == "create" else None)
    try:
        s = start(root, segment_bytes=64)
        p = mmsb.create_page(s, 64)
        for i in range(5):
            mmsb.write_page(s, p.id, 0, bytes([i]) * 64)
        s.bus.checkpoint(s)
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in root.rglob("*") if f.is_file()}
        mmsb.mmsb_stop(s)
    finally:
        fsops.set_fault_hook(prev)
        os.umask(old)
    assert any(".tmp" in p for p in seen)  # temp files go through the same creation
    assert {"LOCK", "BUS"} <= set(modes)
    assert any(n.startswith("wal-") for n in modes) and any(n.startswith("ckpt-") for n in modes)
    assert all(m == 0o600 for m in modes.values()), modes


def test_an_existing_lock_file_is_narrowed_to_0600(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    mmsb.mmsb_stop(start(root))
    os.chmod(root / "LOCK", 0o644)
    mmsb.mmsb_stop(start(root))
    assert stat.S_IMODE((root / "LOCK").stat().st_mode) == 0o600


# --------------------------------------------------------------------------- full disks

def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected)")


def _header_step(step: str, path: str) -> bool:
    """The first write of a new segment (its header): the checkpoint before it fitted."""
    return step == "write" and "/wal/wal-" in path and not os.path.getsize(path)


@pytest.mark.parametrize("how", ["compress_log", "auto", "checkpoint"])
def test_full_disk_at_the_new_segment_header(tmp_path: Path, how: str) -> None:
    root = tmp_path / "bus"
    s = start(root, max_tlog_size=1 << 30 if how != "auto" else 4)
    p = mmsb.create_page(s, 16)
    mmsb.write_page(s, p.id, 0, b"a")
    fds = open_fds()
    with fault_at(_header_step, _enospc(), once=how != "compress_log") as hit:
        if how == "compress_log":
            # The compressed checkpoint is written and in force: compress_log stands,
            # and the segment is created by the next write.
            mmsb.compress_log(s)
            with pytest.raises(mmsb.DurabilityError, match="not applied"):
                mmsb.write_page(s, p.id, 3, b"z")
        elif how == "checkpoint":
            with pytest.raises(mmsb.DurabilityError):
                s.bus.checkpoint(s)
        else:
            for i in range(4):  # the automatic checkpoint fails quietly, and is retried
                mmsb.write_page(s, p.id, 1, bytes([i + 1]))
    assert hit["hit"] is not None
    assert open_fds() <= fds  # the new segment's descriptor is not leaked
    # Space is back: the bus takes writes again, and keeps them.
    for i in range(3):
        mmsb.write_page(s, p.id, 2, bytes([i + 7]))
    expect = view(s)
    mmsb.mmsb_stop(s)
    s = start(root)
    try:
        assert view(s) == expect and mmsb.verify_state_consistency(s)
    finally:
        mmsb.mmsb_stop(s)


def test_full_disk_at_the_final_checkpoint_still_closes(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = start(root)
    p = mmsb.create_page(s, 16)
    mmsb.write_page(s, p.id, 0, b"a")
    expect = view(s)
    fds = open_fds()
    with fault_at(lambda step, path: step == "write" and ".tmp" in path, _enospc()):
        with pytest.raises(mmsb.DurabilityError):
            mmsb.mmsb_stop(s)
    assert s.closed and s.bus.closed
    assert open_fds() < fds  # segment and lock descriptors are released
    with pytest.raises(mmsb.StateClosedError):
        mmsb.write_page(s, p.id, 0, b"b")
    s = start(root)  # the lock is free, and the log had everything
    try:
        assert view(s) == expect
    finally:
        mmsb.mmsb_stop(s)


def test_read_only_file_system_is_a_typed_error(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    mmsb.mmsb_stop(start(root))
    erofs = OSError(errno.EROFS, "Read-only file system (injected)")
    with fault_at(lambda step, path: True, erofs, once=False):
        with pytest.raises(mmsb.DurabilityError, match="read-only"):
            start(root)
    with fault_at(lambda step, path: step != "open", erofs, once=False):
        mmsb.open_readonly(root)  # reading needs no write
    s = start(root)
    mmsb.mmsb_stop(s)


def test_clock_before_1970_is_handled(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: -5_000_000_000)
    s = start(tmp_path / "bus")
    p = mmsb.create_page(s, 8)
    mmsb.write_page(s, p.id, 0, b"old")
    mmsb.mmsb_stop(s)
    monkeypatch.undo()
    s = start(tmp_path / "bus")
    try:
        assert mmsb.query_page(s, p.id)[:3] == b"old"
    finally:
        mmsb.mmsb_stop(s)


# --------------------------------------------------------------------------- metadata

DEEP: Any = []
for _ in range(1000):
    DEEP = [DEEP]


@pytest.mark.parametrize("value", [
    b"\0" * (17 << 20), list(range((1 << 20) + 1)), DEEP, {"k": DEEP},
], ids=["17MiB-bytes", "2^20+1-items", "1000-deep", "1000-deep-map"])
def test_metadata_no_reader_could_decode_is_refused_before_logging(tmp_path: Path,
                                                                   value: Any) -> None:
    root = tmp_path / "bus"
    s = start(root)
    p = mmsb.create_page(s, 8)
    lsn = s.last_lsn
    with pytest.raises(mmsb.MetadataError):
        mmsb.set_metadata(s, p.id, "big", value)
    with pytest.raises(mmsb.MetadataError):
        mmsb.update_metadata(s, p.id, {"big": value})
    with pytest.raises(mmsb.MetadataError):
        mmsb.create_page(s, 8, metadata={"big": value})
    assert s.last_lsn == lsn and s.table.next_id == p.id + 1
    mmsb.mmsb_stop(s)
    s = start(root)  # nothing unreadable reached the log or a checkpoint
    mmsb.mmsb_stop(s)
    mmsb.load_checkpoint(mmsb.MMSBState(cfg()), sorted((root / "checkpoints").glob("ckpt-*"))[-1])


def test_metadata_merged_past_the_bound_is_refused(tmp_path: Path) -> None:
    s = mmsb.MMSBState(cfg())
    p = mmsb.create_page(s, 8)
    mmsb.set_metadata(s, p.id, "a", b"\0" * (9 << 20))
    with pytest.raises(mmsb.MetadataError):
        mmsb.set_metadata(s, p.id, "b", b"\0" * (9 << 20))
    assert set(s.pages[p.id].metadata) == {"a"}


def test_metadata_decoders_raise_typed_errors_on_deep_nesting() -> None:
    import msgpack

    from mmsb._storage.codec import decode_metadata

    with pytest.raises(mmsb.SerializationError):
        decode_metadata(msgpack.packb({"k": DEEP[0][0][0]}))


# --------------------------------------------------------------------------- allocation

_ALLOC_CHILD = r"""
import resource, sys
import mmsb
root, what = sys.argv[1], sys.argv[2]
s = mmsb.mmsb_start(config=mmsb.MMSBConfig(enable_gpu=False, fsync="always"), path=root)
p = mmsb.create_page(s, 64)
mmsb.write_page(s, p.id, 0, b"kept")
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
lsn = s.last_lsn
try:
    if what == "create":
        mmsb.create_page(s, 2**32 - 1)
    elif what == "create_pages":
        mmsb.create_pages(s, 64, 64 << 20)
    else:
        mmsb.resize_page(s, p.id, 2**32 - 1)
except mmsb.MMSBError as exc:
    print("typed", type(exc).__name__, exc)
else:
    print("allocated")
assert s.last_lsn == lsn, "a refused allocation was logged"
q = mmsb.create_page(s, 8)
print("next", q.id)
mmsb.mmsb_stop(s)
"""


@pytest.mark.parametrize("what", ["create", "create_pages", "resize"])
def test_failed_allocation_is_typed_and_logs_nothing(tmp_path: Path, what: str) -> None:
    root = tmp_path / "bus"
    r = subprocess.run([sys.executable, "-c", _ALLOC_CHILD, str(root), what],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "typed InvalidArgumentError" in r.stdout, r.stdout
    assert "next 2" in r.stdout  # the refused creation did not take an id
    s = start(root)
    try:
        assert sorted(s.pages) == [1, 2] and mmsb.query_page(s, 1)[:4] == b"kept"
        assert mmsb.verify_state_consistency(s)
    finally:
        mmsb.mmsb_stop(s)


def test_strided_memoryview_is_written_as_its_bytes() -> None:
    s = mmsb.MMSBState(cfg())
    p = mmsb.create_page(s, 64)
    mv = memoryview(bytes(range(128)))[::2]
    mmsb.update_page(s, p.id, mv)
    assert mmsb.query_page(s, p.id) == bytes(range(0, 128, 2))
    mmsb.write_page(s, p.id, 0, memoryview(b"xyxyxy")[::2])
    assert mmsb.query_page(s, p.id)[:3] == b"xxx"
