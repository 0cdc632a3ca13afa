"""Crash points and I/O errors walked over every file-system step of a durable bus.

The storage layer takes every file step (create, open, write, fsync, truncate, rename,
unlink, fsync of a directory) through one seam (``mmsb._storage.fsops``), whose hook
runs before the step. A workload that checkpoints, rotates segments, evicts old
checkpoints (each ``retain_checkpoints`` setting), compresses and stops is run once to
count its steps, then once per step N:

* **crash at N**: the hook raises a ``Crash`` at step N and at every later step, so no
  step after N reaches the disk (what a kill leaves, with the buffers a kill loses never
  written); the process's descriptors are dropped as a kill drops them, and the bus is
  reopened: every acknowledged call's effect is there, the one in flight wholly or not
  at all, and the bus takes writes again;
* **ENOSPC / EIO / EROFS at N**: the hook raises that error once at step N; the call
  raises a typed MMSBError (never a raw OSError) or succeeds, the workload goes on once
  the fault is gone, every acknowledged write survives a reopen, and no descriptor
  leaks.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mmsb
from mmsb._storage import fsops

SIZE = 48


class Crash(BaseException):
    """A simulated kill."""


def _cfg(retain: int | None) -> mmsb.MMSBConfig:
    return mmsb.MMSBConfig(enable_gpu=False, fsync="always", retain_checkpoints=retain,
                           max_tlog_size=3, segment_bytes=200, checkpoint_interval=0)


def _view(s: mmsb.MMSBState) -> dict[int, tuple[bytes, int]]:
    return {pid: (mmsb.query_page(s, pid), int(s.pages[pid].epoch)) for pid in sorted(s.pages)}


def _steps() -> list[Callable[[mmsb.MMSBState], Any]]:
    """The workload: creations, writes past several automatic checkpoints and segment
    rotations, metadata, an explicit compress_log, and more writes."""
    out: list[Callable[[mmsb.MMSBState], Any]] = [
        lambda s: mmsb.create_page(s, SIZE), lambda s: mmsb.create_page(s, SIZE)]
    for i in range(7):
        out.append(lambda s, i=i: mmsb.write_page(s, 1 + i % 2, i, bytes([i + 1]) * 9))
    out.append(lambda s: mmsb.set_metadata(s, 1, "k", "v"))
    out.append(lambda s: mmsb.compress_log(s))
    for i in range(4):
        out.append(lambda s, i=i: mmsb.write_page(s, 2 - i % 2, 20 + i, bytes([i + 50]) * 5))
    return out


def _expected(retain: int | None, root: Path,
              steps: list[Callable[[mmsb.MMSBState], Any]] | None = None) -> tuple[list[dict], int]:
    """The view after each step of a fault-free run of ``steps`` (the workload by
    default) on the bus at ``root``, and the number of file steps."""
    count = [0]

    def hook(step: str, path: str) -> None:
        count[0] += 1

    views = []
    prev = fsops.set_fault_hook(hook)
    try:
        s = mmsb.mmsb_start(config=_cfg(retain), path=root)
        views.append(_view(s))
        for step in _steps() if steps is None else steps:
            step(s)
            views.append(_view(s))
        mmsb.mmsb_stop(s)
    finally:
        fsops.set_fault_hook(prev)
    return views, count[0]


def _drop(s: mmsb.MMSBState | None) -> None:
    """What a kill does to a process's open bus: its descriptors close, nothing else."""
    if s is None or s.bus is None or s.bus.closed:
        return
    w = s.bus.writer
    if w is not None and w.fd >= 0:
        os.close(w.fd)
        w.fd = -1
    os.close(s.bus.lock_fd)
    s.bus.closed = True
    s.closed = True
    mmsb._api._active.set(None)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _run(root: Path, retain: int | None, hook: Callable[[str, str], None],
         steps: list[Callable[[mmsb.MMSBState], Any]] | None = None) -> tuple[int, Any]:
    """Run ``steps`` (the workload by default) under ``hook``; returns (steps
    acknowledged, what ended it)."""
    done = 0
    s = None
    prev = fsops.set_fault_hook(hook)
    try:
        s = mmsb.mmsb_start(config=_cfg(retain), path=root)
        for step in _steps() if steps is None else steps:
            step(s)
            done += 1
        mmsb.mmsb_stop(s)
        done += 1
        return done, None
    except Crash as exc:
        _drop(s)
        return done, exc
    finally:
        fsops.set_fault_hook(prev)


def _crash_from(n: int) -> Callable[[str, str], None]:
    """A hook that kills at the ``n``-th file step and every one after it."""
    seen = [0]

    def hook(step: str, path: str) -> None:
        seen[0] += 1
        if seen[0] >= n:
            raise Crash(f"{step} {path}")

    return hook


RETAIN = [None, 1, 2]


@pytest.mark.parametrize("retain", RETAIN)
def test_a_kill_at_every_file_step_loses_no_acknowledged_write(tmp_path: Path,
                                                               retain: int | None) -> None:
    views, total = _expected(retain, tmp_path / "clean")
    assert total > 40
    n_steps = len(_steps())
    for n in range(1, total + 1):
        root = tmp_path / f"k{n}"
        done, crash = _run(root, retain, _crash_from(n))
        assert crash is not None or done == n_steps + 1
        if not root.exists() or not (root / "BUS").exists():
            continue  # killed before the bus existed
        fds = _fds()
        s = mmsb.mmsb_start(config=_cfg(retain), path=root)
        try:
            got = _view(s)
            # done counts finished calls; views[k] is the view after k workload steps.
            k = min(done, n_steps)
            allowed = [views[k]] + ([views[k + 1]] if k + 1 < len(views) else [])
            assert got in allowed, (n, crash, done)
            assert mmsb.verify_state_consistency(s)
            mmsb.create_page(s, 8)  # usable again
        finally:
            mmsb.mmsb_stop(s)
        assert _fds() == fds


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS])
@pytest.mark.parametrize("retain", RETAIN)
def test_an_io_error_at_every_file_step_is_typed_and_recoverable(
        tmp_path: Path, retain: int | None, err: int) -> None:
    views, total = _expected(retain, tmp_path / "clean")
    final = views[-1]
    for n in range(1, total + 1, 2 if err != errno.ENOSPC else 1):
        root = tmp_path / f"e{n}"
        fds = _fds()
        seen = [0]

        def hook(step: str, path: str, n: int = n, seen: list[int] = seen) -> None:
            seen[0] += 1
            if seen[0] == n:
                raise OSError(err, f"injected {errno.errorcode[err]}", path)

        s = None
        acked = None
        prev = fsops.set_fault_hook(hook)
        try:
            for attempt in range(3):  # the fault happens once: a retry meets a working disk
                try:
                    s = mmsb.mmsb_start(config=_cfg(retain), path=root)
                    break
                except mmsb.MMSBError:
                    assert attempt < 2
            assert s is not None
            for k, step in enumerate(_steps()):
                try:
                    step(s)
                except mmsb.DurabilityError:
                    assert _view(s) == views[k], n  # the refused call changed nothing
                    if s.bus.failed is not None:
                        # An fsync (or an append that could not be cut back) failed: the
                        # bus refuses writes until reopened. The record may be in the log
                        # or not (that is what a failed fsync means): after the reopen the
                        # step is there wholly, or not at all and is done again.
                        try:
                            mmsb.mmsb_stop(s)
                        except mmsb.DurabilityError:
                            assert s.closed
                        s = mmsb.mmsb_start(config=_cfg(retain), path=root)
                        if _view(s) == views[k + 1]:
                            continue
                    assert _view(s) == views[k], n
                    step(s)
                assert _view(s) == views[k + 1], (n, k)
            acked = _view(s)
            try:
                mmsb.mmsb_stop(s)
            except mmsb.DurabilityError:
                assert s.closed
        finally:
            fsops.set_fault_hook(prev)
            if s is not None and not s.closed:
                _drop(s)
        assert acked == final, n
        s = mmsb.mmsb_start(config=_cfg(retain), path=root)
        try:
            assert _view(s) == final, n
            assert mmsb.verify_state_consistency(s)
        finally:
            mmsb.mmsb_stop(s)
        assert _fds() == fds, n


def _killed_child(root: Path, retain: int | None, n: int) -> int:
    """Fork a process that runs the workload and dies by ``os._exit`` at file step
    ``n`` (a real kill: its buffers and descriptors go with it); returns how many calls
    it acknowledged (written to a pipe after each one returned)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        seen = [0]

        def hook(step: str, path: str) -> None:
            seen[0] += 1
            if seen[0] >= n:
                os._exit(137)

        try:
            fsops.set_fault_hook(hook)
            s = mmsb.mmsb_start(config=_cfg(retain), path=root)
            for step in _steps():
                step(s)
                os.write(w, b"+")
            mmsb.mmsb_stop(s)
            os.write(w, b"+")
        finally:
            os._exit(0)
    os.close(w)
    acked = b""
    while chunk := os.read(r, 64):
        acked += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 137), status
    return len(acked)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a real process")
@pytest.mark.parametrize("retain", RETAIN)
def test_a_real_kill_at_file_steps_loses_no_acknowledged_write(tmp_path: Path,
                                                               retain: int | None) -> None:
    """The same as the simulated crash, with a real process killed at every step."""
    views, total = _expected(retain, tmp_path / "clean")
    n_steps = len(_steps())
    killed = 0
    for n in range(1, total + 1):
        root = tmp_path / f"r{n}"
        done = _killed_child(root, retain, n)
        if done < n_steps + 1:
            killed += 1
        if not (root / "BUS").exists():
            continue  # killed before the bus existed
        s = mmsb.mmsb_start(config=_cfg(retain), path=root)
        try:
            k = min(done, n_steps)
            allowed = [views[k]] + ([views[k + 1]] if k + 1 < len(views) else [])
            assert _view(s) in allowed, (n, done)
            assert mmsb.verify_state_consistency(s)
            mmsb.create_page(s, 8)  # usable again
        finally:
            mmsb.mmsb_stop(s)
    assert killed >= total - 1


def _after_reopen() -> list[Callable[[mmsb.MMSBState], Any]]:
    """Writes on a reopened bus whose history is still on disk, past automatic
    checkpoints (each of which keeps its history, or drops some with retention)."""
    return [lambda s, i=i: mmsb.write_page(s, 1 + i % 2, 30 + i % 10, bytes([i + 90]) * 3)
            for i in range(8)]


@pytest.mark.parametrize("retain", [None, 2])
def test_a_kill_at_every_file_step_after_a_reopen_loses_no_acknowledged_write(
        tmp_path: Path, retain: int | None) -> None:
    """The checkpoints of a reopened bus that leave its history on disk (written from
    the log's tail) and the close's, killed at each of their file steps: every
    acknowledged write survives, the whole history replays to the state."""
    base = tmp_path / "base"
    s = mmsb.mmsb_start(config=_cfg(retain), path=base)
    for step in _steps():
        step(s)
    mmsb.mmsb_stop(s)
    shutil.copytree(base, tmp_path / "probe")
    s = mmsb.mmsb_start(config=_cfg(retain), path=tmp_path / "probe")
    try:
        assert type(s.log).__name__ == "DeferredLog"  # the history is still on disk
    finally:
        mmsb.mmsb_stop(s)
    shutil.copytree(base, tmp_path / "clean")
    views, total = _expected(retain, tmp_path / "clean", _after_reopen())
    assert total > 20
    n_steps = len(_after_reopen())
    for n in range(1, total + 1):
        root = tmp_path / f"k{n}"
        shutil.copytree(base, root)
        done, _crash = _run(root, retain, _crash_from(n), _after_reopen())
        s = mmsb.mmsb_start(config=_cfg(retain), path=root)
        try:
            k = min(done, n_steps)
            allowed = [views[k]] + ([views[k + 1]] if k + 1 < len(views) else [])
            assert _view(s) in allowed, (n, done)
            assert mmsb.verify_state_consistency(s)  # the whole history replays to it
        finally:
            mmsb.mmsb_stop(s)
