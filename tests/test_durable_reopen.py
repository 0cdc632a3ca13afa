"""Reopening a bus after a process crash writes and syncs nothing at open: the records
replayed from the log stay in their segments (no recovery checkpoint), the next
segment is created by the first write, and the replayed segments are synced before it
so that a later segment is never durable before an earlier one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mmsb
from conftest import frames_end
from mmsb._storage import fsops
from mmsb._storage.bus import bus_files

_CHILD = r"""
import os, signal, sys
import mmsb
path, n = sys.argv[1], int(sys.argv[2])
s = mmsb.mmsb_start(path=path, enable_gpu=False,
                    config=mmsb.MMSBConfig(fsync="none", checkpoint_interval=0, max_tlog_size=700))
ids = [p.id for p in mmsb.create_pages(s, 8, 256)]
mmsb.add_dependency(s, ids[0], ids[1])
for i in range(n):
    mmsb.write_page(s, ids[i % 8], (i * 7) % 248, (i + 1).to_bytes(8, "little"))
print(s.last_lsn, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _cfg() -> mmsb.MMSBConfig:
    return mmsb.MMSBConfig(enable_gpu=False, fsync="batch", checkpoint_interval=0,
                           max_tlog_size=700)


def _killed(root: Path, n: int) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(n)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-500:]
    return int(out.stdout)


def _listing(root: Path) -> dict[str, list[tuple[str, int]]]:
    return {k: [(p.name, p.stat().st_size) for p in v] for k, v in bus_files(root).items()}


def _nothing_written(before: dict[str, list[tuple[str, int]]],
                     after: dict[str, list[tuple[str, int]]]) -> bool:
    """No file created or grown (recovery may remove superseded checkpoints)."""
    return all(set(after[k]) <= set(before[k]) for k in before)


def _snapshot(s: mmsb.MMSBState) -> dict[str, Any]:
    return {
        "lsn": s.last_lsn,
        "pages": {pid: (int(s.pages[pid].epoch), mmsb.query_page(s, pid)) for pid in s.pages},
        "edges": sorted(s.graph.edges()),
        "history": [len(mmsb.get_deltas_for_page(s, pid)) for pid in sorted(s.pages)],
        "at": [mmsb.read_page_at(s, pid, lsn=s.last_lsn // 2) for pid in sorted(s.pages)],
    }


def test_reopen_after_a_kill_writes_nothing_at_open(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    logged = _killed(root, 1000)
    before = _listing(root)
    assert len(before["wal"]) == 1 and before["wal"][0][1] > 1000, "a tail to replay"
    reference = _snapshot(mmsb.open_readonly(root, config=_cfg()))
    s = mmsb.mmsb_start(path=root, config=_cfg())
    try:
        assert _nothing_written(before, _listing(root)), "the open wrote a checkpoint or segment"
        before = _listing(root)
        assert s.last_lsn == logged
        assert _snapshot(s) == reference
        pid = min(s.pages)
        mmsb.write_page(s, pid, 0, b"after")
        after = _listing(root)
        assert after["checkpoints"] == before["checkpoints"]
        assert len(after["wal"]) == 2 and after["wal"][0] == before["wal"][0]
    finally:
        s.bus.records_since_ckpt = 0  # leave the log as a crash would
        s.bus.flush()
        mmsb.mmsb_stop(s)
    again = mmsb.mmsb_start(path=root, config=_cfg())
    try:
        assert again.last_lsn == logged + 1
        assert mmsb.query_page(again, min(again.pages))[:5] == b"after"
        assert _snapshot(again)["history"][1:] == reference["history"][1:]
    finally:
        mmsb.mmsb_stop(again)


def test_the_replayed_segments_are_synced_before_the_next_one_is_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "bus"
    _killed(root, 300)
    old = bus_files(root)["wal"]
    s = mmsb.mmsb_start(path=root, config=_cfg())
    synced: list[str] = []
    real = fsops.fdatasync

    def recording(fd: int, path: Any) -> None:
        synced.append(Path(path).name)
        real(fd, path)

    monkeypatch.setattr(fsops, "fdatasync", recording)
    try:
        mmsb.write_page(s, min(s.pages), 0, b"x")
        new = [p for p in bus_files(root)["wal"] if p not in old]
        assert len(new) == 1
        assert synced.index(old[-1].name) < synced.index(new[0].name)
        synced.clear()
        mmsb.write_page(s, min(s.pages), 1, b"y")
        assert old[-1].name not in synced, "synced once, not at every roll"
    finally:
        mmsb.mmsb_stop(s)


def test_a_failed_sync_of_the_replayed_segments_refuses_the_write_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "bus"
    logged = _killed(root, 300)
    old = bus_files(root)["wal"]
    s = mmsb.mmsb_start(path=root, config=_cfg())
    real = fsops.fdatasync
    pid = min(s.pages)
    page = mmsb.query_page(s, pid)

    def failing(fd: int, path: Any) -> None:
        if Path(path) in old:
            raise OSError(5, "Input/output error")
        real(fd, path)

    monkeypatch.setattr(fsops, "fdatasync", failing)
    try:
        with pytest.raises(mmsb.DurabilityError):
            mmsb.write_page(s, pid, 0, b"refused")
        assert s.last_lsn == logged and mmsb.query_page(s, pid) == page
        assert bus_files(root)["wal"] == old, "no segment after the failed sync"
        monkeypatch.setattr(fsops, "fdatasync", real)
        mmsb.write_page(s, pid, 0, b"taken")
        assert s.last_lsn == logged + 1
    finally:
        mmsb.mmsb_stop(s)
    r = mmsb.open_readonly(root, config=_cfg())
    assert mmsb.query_page(r, pid)[:5] == b"taken"


def test_a_torn_tail_still_becomes_a_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    _killed(root, 300)
    seg = bus_files(root)["wal"][-1]
    with open(seg, "r+b") as f:
        f.truncate(frames_end(seg.read_bytes()) - 3)
    before = _listing(root)
    s = mmsb.mmsb_start(path=root, config=_cfg())
    try:
        assert _listing(root)["checkpoints"] != before["checkpoints"]
        assert s.counters.torn_tails_recovered == 1
    finally:
        mmsb.mmsb_stop(s)


def test_reopen_twice_without_writes_replays_the_same(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    _killed(root, 500)
    first = mmsb.mmsb_start(path=root, config=_cfg())
    snap = _snapshot(first)
    # A second kill before any write: nothing was written by the first open.
    first.bus.records_since_ckpt = 0
    mmsb.mmsb_stop(first)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    second = mmsb.mmsb_start(path=copy, config=_cfg())
    try:
        assert _snapshot(second) == snap
    finally:
        mmsb.mmsb_stop(second)


def test_a_superseded_checkpoint_is_removed_after_the_open_not_by_it(tmp_path: Path) -> None:
    """The open leaves a checkpoint older than the retained chain where it is (it never
    reads it); a crash before anything removed it finds it superseded again, and the
    next automatic checkpoint or the close removes it."""
    root = tmp_path / "bus"
    logged = _killed(root, 1000)
    before = _listing(root)
    oldest = bus_files(root)["checkpoints"][0]
    reference = _snapshot(mmsb.open_readonly(root, config=_cfg()))
    crashed = tmp_path / "crashed"
    shutil.copytree(root, crashed)
    s = mmsb.mmsb_start(path=root, config=_cfg())
    try:
        assert s.bus.superseded == [oldest]
        assert oldest.exists() and _listing(root) == before, "the open removed nothing"
        assert s.last_lsn == logged and _snapshot(s) == reference
    finally:
        mmsb.mmsb_stop(s)
    assert not oldest.exists(), "the close removes it"
    # Opened, then killed before any checkpoint or close: the file is still there, and
    # the next open ignores it as the first did.
    s = mmsb.mmsb_start(path=crashed, config=_cfg())
    try:
        assert _snapshot(s) == reference
        kept = crashed / "checkpoints" / oldest.name
        assert s.bus.superseded == [kept] and kept.exists()
        pid = min(s.pages)
        for i in range(701):  # past max_tlog_size: an automatic checkpoint
            mmsb.write_page(s, pid, 0, (i + 1).to_bytes(8, "little"))
        assert not kept.exists() and s.bus.superseded == [], "the checkpoint removed it"
    finally:
        mmsb.mmsb_stop(s)


def test_a_superseded_checkpoint_that_cannot_be_removed_is_left_and_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "bus"
    logged = _killed(root, 1000)
    oldest = bus_files(root)["checkpoints"][0]

    def refuse(path: Any, *, missing_ok: bool = True) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    s = mmsb.mmsb_start(path=root, config=_cfg())
    monkeypatch.setattr(fsops, "unlink", refuse)
    mmsb.mmsb_stop(s)  # logged, not raised
    monkeypatch.undo()
    assert oldest.exists()
    again = mmsb.mmsb_start(path=root, config=_cfg())
    try:
        assert again.last_lsn == logged and again.bus.superseded == [oldest]
    finally:
        mmsb.mmsb_stop(again)
    assert not oldest.exists()
