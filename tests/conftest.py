"""Shared fixtures and helpers for the MMSB test suite.

``snapshot(state)`` captures everything a caller can observe of a state (page bytes,
epochs, sizes, locations, metadata, edges, the retained log and the newest LSN), so that
``assert_unchanged(state, before)`` can check the core rule "a refused call changes
nothing".
"""

from __future__ import annotations

import functools
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest

import mmsb
from mmsb._storage import checkpoint as _ckpt
from mmsb._storage.codec import crc32c as _crc32c

# --------------------------------------------------------------------------- CI
#
# Under CI (CI=true, as CI services set it) a test skipped because a Python package is
# missing is a failure: the test extra installs everything the suite needs, and a skip
# would hide a test that never ran. Skips for the environment (no CUDA device) stay skips.

_MISSING_PACKAGE = re.compile(
    r"could not import|No module named|is not installed|not importable", re.IGNORECASE)


# CuPy and the CUDA stack come with a GPU machine, not with the test extra: their
# absence is the environment's, like the missing device itself.
_DEVICE_STACK = re.compile(r"\bCuPy\b|\bCUDA\b|\bGPU\b|unified memory", re.IGNORECASE)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_missing_package_skip(report: Any) -> None:
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if _MISSING_PACKAGE.search(reason) and not _DEVICE_STACK.search(reason):
            report.outcome = "failed"
            report.longrepr = (f"skipped for a missing Python package under CI ({reason}); "
                               "install the test extra: pip install -e '.[test]'")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    _fail_missing_package_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    outcome = yield
    _fail_missing_package_skip(outcome.get_result())


# --------------------------------------------------------------------------- bytecode
#
# Many tests start Python processes that import mmsb afresh (the CLI, killed writers,
# readers, the examples). Where the environment tells Python not to write bytecode
# (PYTHONDONTWRITEBYTECODE), each of those processes would compile every module of the
# package from its source again (import mmsb took 1.0-1.3 s so, 0.7-1.1 s without, on
# a 2-core machine). The variable stops only the writing: compiled files made once,
# here, before the tests, are loaded by every process after (each is checked against
# its source's time stamp and size, so an edited module is compiled again).


def pytest_configure(config: pytest.Config) -> None:
    if not sys.dont_write_bytecode or hasattr(config, "workerinput"):
        return  # (bytecode is written as modules are imported; or an xdist worker,
        # whose controller has compiled them)
    import compileall

    # (quiet=2: a package where this user cannot write, such as a system install,
    # already has its compiled files, or its processes compile as before.)
    compileall.compile_dir(os.path.dirname(mmsb.__file__), quiet=2)


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when some CUDA device is usable (then GPU refusal tests do not apply)."""
    return _torch_cuda() or _cupy_cuda()


def _torch_cuda() -> bool:
    try:
        import torch  # type: ignore[import-not-found]

        return bool(torch.cuda.is_available())
    except Exception:  # any import or driver failure means "no CUDA"
        return False


def _cupy_cuda() -> bool:
    try:
        import cupy  # type: ignore[import-not-found]

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False


needs_no_cuda = pytest.mark.skipif(
    cuda_available(), reason="a CUDA device is present; the no-CUDA path is not reachable"
)


def new_state(**config: Any) -> mmsb.MMSBState:
    """A fresh in-memory CPU-only state; keyword arguments go to MMSBConfig."""
    config.setdefault("enable_gpu", False)
    return mmsb.MMSBState(mmsb.MMSBConfig(**config))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """time.time_ns as a counter, so that two runs stamp their records alike."""
    now = [1_700_000_000_000_000_000]
    real = time.time_ns

    def tick() -> int:
        now[0] += 1000
        return now[0]

    monkeypatch.setattr(time, "time_ns", tick)
    yield
    monkeypatch.setattr(time, "time_ns", real)


@pytest.fixture
def state() -> mmsb.MMSBState:
    return mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))


# --------------------------------------------------------------------------- helpers


def page_ids(state: mmsb.MMSBState) -> list[int]:
    return sorted(int(k) for k in state.pages.keys())


def as_bool(mask: Any) -> np.ndarray:
    return np.asarray(mask, dtype=bool).reshape(-1)


def as_u8(data: Any) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def delta_key(d: Any) -> tuple:
    """What a delta means: page, epochs, which bytes and their new values."""
    m = as_bool(d.mask)
    dense = as_u8(d.dense_data())
    return (
        int(d.page_id),
        int(d.base_epoch),
        int(d.epoch),
        tuple(np.flatnonzero(m).tolist()),
        bytes(dense[m].tobytes()),
    )


def edges(state: mmsb.MMSBState) -> list[tuple[int, int, Any]]:
    out = []
    for pid in page_ids(state):
        for child, etype in mmsb.get_children(state.graph, pid):
            out.append((pid, int(child), etype))
    return sorted(out, key=lambda e: (e[0], e[1], str(e[2])))


def pages_view(state: mmsb.MMSBState) -> dict[int, tuple]:
    """{id: (bytes, epoch, size, location, metadata)} of every live page."""
    view = {}
    for pid in page_ids(state):
        p = state.pages[pid]
        view[pid] = (
            mmsb.query_page(state, pid),
            int(p.epoch),
            int(p.size),
            p.location,
            dict(p.metadata),
        )
    return view


def content_view(state: mmsb.MMSBState) -> dict[int, tuple[bytes, int]]:
    """{id: (bytes, epoch)} of every live page."""
    return {pid: (mmsb.query_page(state, pid), int(state.pages[pid].epoch)) for pid in page_ids(state)}


def checkpoint_sections(raw: bytes) -> dict[bytes, tuple[int, int]]:
    """A checkpoint file's sections, from its bytes: tag → (offset of the section's
    data, its stored length)."""
    out = {}
    pos = 48
    while pos + 32 <= len(raw) - 24:
        tag = bytes(raw[pos:pos + 4])
        (stored,) = struct.unpack_from("<Q", raw, pos + 16)
        out[tag] = (pos + 32, stored)
        pos += 32 + stored
    return out


def flip_in_log_section(path: Any) -> int:
    """Invert a byte in the middle of a checkpoint file's log section (TLOG); returns
    the section's data offset."""
    raw = bytearray(path.read_bytes())
    at, stored = checkpoint_sections(bytes(raw))[b"TLOG"]
    assert stored > 8
    raw[at + stored // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return at


def copy_beside(img: Any, name: str) -> Any:
    """A fresh copy of the directory ``img`` beside it, named ``name`` (an earlier copy
    of that name is replaced)."""
    import shutil

    dst = img.with_name(name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(img, dst)
    return dst


def log_view(state: mmsb.MMSBState) -> list[tuple[int, int, int]]:
    return [(int(d.lsn), int(d.page_id), int(d.epoch)) for d in state.tlog]


def snapshot(state: mmsb.MMSBState) -> tuple:
    """Everything observable of a state, as a comparable value."""
    return (
        pages_view(state),
        edges(state),
        len(state.tlog),
        log_view(state),
        int(state.last_lsn),
    )


def assert_unchanged(state: mmsb.MMSBState, before: tuple) -> None:
    after = snapshot(state)
    names = ("pages", "edges", "len(tlog)", "tlog (lsn, page_id, epoch)", "last_lsn")
    for name, b, a in zip(names, before, after, strict=True):
        assert a == b, f"refused call changed {name}: before={b!r} after={a!r}"


def rand_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def frames_end(data: bytes) -> int:
    """Where a log segment's frames end, read from the format (docs/SerializationSpec.md:
    a 36-byte header, then ``length u64 | crc u32 | body`` frames; in a version-2 segment
    zeros after them are space allocated ahead), not from the implementation's scanner."""
    pos = 36
    while pos + 12 <= len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        if n == 0 or pos + 12 + n > len(data):
            break
        pos += 12 + n
    return pos


# --------------------------------------------------------------------------- threads


class Workers:
    """Threads running ``target(*args)`` for each ``args``, whose exceptions are kept.

    ``join`` waits for all of them, fails if one is still running after ``timeout``
    seconds (a hang or deadlock), and raises every exception any worker raised, as one
    exception group, so that no failure in a thread goes unnoticed.
    """

    def __init__(self, target: Callable[..., Any], args: Iterable[Sequence[Any]]) -> None:
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

        def run(*a: Any) -> None:
            try:
                target(*a)
            except BaseException as exc:  # every kind: a failed assert, a bug, an exit
                with self._lock:
                    self.errors.append(exc)

        self.threads = [threading.Thread(target=run, args=tuple(a), daemon=True) for a in args]
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 120.0) -> None:
        for t in self.threads:
            t.join(timeout=timeout)
        hung = sum(t.is_alive() for t in self.threads)
        if self.errors:
            raise BaseExceptionGroup(
                f"{len(self.errors)} of {len(self.threads)} worker threads raised", self.errors)
        assert not hung, f"{hung} worker thread(s) still running after {timeout}s (deadlock?)"


def run_workers(target: Callable[..., Any], args: Iterable[Sequence[Any]],
                timeout: float = 120.0) -> None:
    """Run ``target(*a)`` for each ``a`` in its own thread; see ``Workers.join``."""
    Workers(target, args).join(timeout)


def set_boot_id(root: Any, boot: bytes) -> None:
    """Give a bus's mapped head another boot identity (its checksum made to match), as
    if the files were written before the operating system restarted."""
    from mmsb._storage.codec import crc32c
    from mmsb._storage.mapped import HEAD_SIZE

    path = root / "map" / "HEAD"
    head = bytearray(path.read_bytes())
    assert len(head) == HEAD_SIZE
    head[24:40] = boot
    head[48:52] = struct.pack("<I", crc32c(bytes(head[:48])))
    path.write_bytes(bytes(head))


def split_checkpoint(raw: bytes) -> tuple[tuple, list[tuple[bytes, int, int, bytes]]]:
    """(header fields, [(tag, codec, raw_len, stored bytes)]) of a checkpoint file."""
    head = _ckpt._HEADER.unpack_from(raw, 0)
    pos = 48
    secs = []
    for _ in range(head[3]):
        tag, codec, raw_len, stored_len, _crc = _ckpt._SECTION.unpack_from(raw, pos)
        secs.append((tag, codec, raw_len, raw[pos + 32: pos + 32 + stored_len]))
        pos += 32 + stored_len
    return head, secs


def join_checkpoint(head: tuple, secs: list[tuple[bytes, int, int, bytes]]) -> bytes:
    """A checkpoint file from parts, with every checksum and length made valid."""
    h = _ckpt._HEADER.pack(*head)
    out = [h, struct.pack("<II", _crc32c(h), 0)]
    for tag, codec, raw_len, stored in secs:
        s = struct.pack("<4sB3xQQI", tag, codec, raw_len, len(stored), _crc32c(stored))
        out += [s, struct.pack("<I", _crc32c(s)), stored]
    body = b"".join(out)
    f = struct.pack("<8sQ", b"MMSBEND\0", len(body))
    return body + f + struct.pack("<II", _crc32c(f), 0)
