"""The compiled CRC32C (``crc_update``): the table version and, where the CPU has SSE4.2,
the hardware version agree with the ``crc32c`` package over every short length, large
buffers, odd start offsets and a register continued over pieces; the kernels that call
it (``crc32c_np``, the page store's checked gather) give the same results; and
``MMSB_CRC_TABLES=1`` or a named numba CPU choose the table version (run in a
subprocess, with its own numba cache so that every kernel there compiles afresh)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
from llvmlite import binding as llvm_binding

from mmsb._core import kernels
from mmsb._storage import pagestore, walbulk

TAB = kernels.CRC_TABLES


def _host_has_sse42() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return "+sse4.2" in llvm_binding.get_host_cpu_features().flatten().split(",")


def _versions() -> list[Any]:
    out = [kernels.crc_update_tables]
    if _host_has_sse42() and not os.environ.get("NUMBA_CPU_NAME"):
        out.append(kernels.crc_update_hardware)
    return out


VERSIONS = pytest.mark.parametrize("crc", _versions(), ids=lambda f: f.__name__)


def _want(data: np.ndarray, value: int = 0) -> int:
    return int(crc32c.crc32c(data.tobytes(), value))


def _got(crc: Any, buf: np.ndarray, p: int, n: int, value: int = 0) -> int:
    return int(crc(TAB, value ^ 0xFFFFFFFF, buf, p, n)) ^ 0xFFFFFFFF


def test_chosen_version_is_reported() -> None:
    forced = os.environ.get("MMSB_CRC_TABLES", "") not in ("", "0")
    named_cpu = os.environ.get("NUMBA_CPU_NAME", "host") != "host"
    assert isinstance(kernels.CRC_HARDWARE, bool)
    assert kernels.CRC_HARDWARE == (_host_has_sse42() and not forced and not named_cpu)
    want = kernels.crc_update_hardware if kernels.CRC_HARDWARE else kernels.crc_update_tables
    assert kernels.crc_update is want
    assert walbulk._crc is want
    assert pagestore.crc_update is want


@VERSIONS
def test_every_short_length_at_odd_offsets(crc: Any) -> None:
    rng = np.random.default_rng(7)
    buf = rng.integers(0, 256, 320, dtype=np.uint8)
    for n in range(301):
        for p in (0, 1, 3, 5, 7, 19 - n % 8):
            assert _got(crc, buf, p, n) == _want(buf[p:p + n]), (p, n)


@VERSIONS
def test_large_buffers(crc: Any) -> None:
    rng = np.random.default_rng(8)
    for size, p in ((1 << 16, 0), ((1 << 16) + 13, 3), ((1 << 20) + 5, 1), (3_000_001, 7)):
        buf = rng.integers(0, 256, size + p + 5, dtype=np.uint8)
        assert _got(crc, buf, p, size) == _want(buf[p:p + size]), (size, p)


@VERSIONS
def test_register_continued_over_pieces(crc: Any) -> None:
    rng = np.random.default_rng(9)
    buf = rng.integers(0, 256, 20_000, dtype=np.uint8)
    for _ in range(40):
        start = int(rng.integers(0, 64))
        cuts = np.sort(rng.integers(start, buf.shape[0], int(rng.integers(1, 30))))
        c = 0xFFFFFFFF
        at = start
        for cut in [*cuts.tolist(), buf.shape[0]]:
            c = int(crc(TAB, c, buf, at, cut - at))
            at = cut
        assert c ^ 0xFFFFFFFF == _want(buf[start:])
        # A value carried in from an earlier CRC, as crc32c(data, value) takes it.
        head = _want(buf[:start])
        assert _got(crc, buf, start, buf.shape[0] - start, head) == _want(buf[start:], head)


@VERSIONS
def test_all_zero_and_all_ones_bytes(crc: Any) -> None:
    for fill in (0, 0xFF):
        buf = np.full(1031, fill, np.uint8)
        for n in (0, 1, 4, 8, 9, 1024, 1030):
            assert _got(crc, buf, 1, n) == _want(buf[1:1 + n])


@VERSIONS
def test_read_only_and_sliced_buffers(crc: Any) -> None:
    rng = np.random.default_rng(10)
    base = rng.integers(0, 256, 4099, dtype=np.uint8)
    ro = base.copy()
    ro.setflags(write=False)
    assert _got(crc, ro, 3, 4090) == _want(base[3:4093])
    view = base[5:]
    assert _got(crc, view, 0, view.shape[0]) == _want(view)
    strided = base[1::3]
    assert not strided.flags.c_contiguous
    for n in (0, 3, 8, 13, 1000):
        assert _got(crc, strided, 2, n) == _want(strided[2:2 + n]), n


def test_callers_match_the_package() -> None:
    rng = np.random.default_rng(11)
    for n in (0, 1, 7, 8, 63, 1000, 70_001):
        buf = rng.integers(0, 256, n, dtype=np.uint8)
        assert int(walbulk.crc32c_np(TAB, buf, 0)) == _want(buf)
        assert int(walbulk.crc32c_np(TAB, buf, 0x1234567)) == _want(buf, 0x1234567)
    sizes = np.array([1024, 1, 4096, 777], np.int64)
    offs = np.array([3, 1100, 1201, 5400], np.int64)
    src = rng.integers(0, 256, 6200, dtype=np.uint8)
    crcs = np.array([_want(src[o:o + s]) for o, s in zip(offs, sizes, strict=True)], np.int64)
    dst = np.zeros(int(sizes.sum()), np.uint8)
    assert pagestore._gather_checked(dst, src, offs, sizes, crcs, TAB) == -1
    assert dst.tobytes() == b"".join(src[o:o + s].tobytes() for o, s in zip(offs, sizes, strict=True))
    bad = src.copy()
    bad[offs[2] + 2000] ^= 0x10
    assert pagestore._gather_checked(dst, bad, offs, sizes, crcs, TAB) == 2


def _run_here(env: dict[str, str], tmp_path: Path) -> None:
    """This file's other tests in one new process (``-n0``: no worker processes) with
    ``env`` added, numba's cache in ``tmp_path`` (so the kernels that call
    ``crc_update`` compile in that process)."""
    full = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), **env)
    root = Path(__file__).resolve().parent.parent
    full["PYTHONPATH"] = os.pathsep.join([str(root / "src"), full.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n0", __file__,
         "-k", "not subprocess"],
        cwd=root, env=full, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_tables_forced_in_subprocess(tmp_path: Path) -> None:
    if os.environ.get("MMSB_CRC_TABLES"):
        pytest.skip("already the forced run")
    _run_here({"MMSB_CRC_TABLES": "1"}, tmp_path)


def test_named_numba_cpu_takes_tables_in_subprocess(tmp_path: Path) -> None:
    if os.environ.get("NUMBA_CPU_NAME"):
        pytest.skip("already the named CPU run")
    _run_here({"NUMBA_CPU_NAME": "generic"}, tmp_path)


_ASM_CHECK = """
import re
import numpy as np
from mmsb._core import kernels
from mmsb._storage import walbulk
walbulk.crc32c_np(kernels.CRC_TABLES, np.zeros(9, np.uint8), 0)
asm = "".join(walbulk.crc32c_np.inspect_asm().values())
print(kernels.CRC_HARDWARE, bool(re.search(r"\\bcrc32[bwlq]\\b", asm)))
"""


@pytest.mark.parametrize("forced", ["", "1"])
def test_a_calling_kernel_compiles_the_chosen_version_subprocess(tmp_path: Path, forced: str) -> None:
    """``crc32c_np``, compiled afresh, holds the ``crc32`` instruction exactly when the
    hardware version is chosen."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), MMSB_CRC_TABLES=forced)
    env.pop("NUMBA_CPU_NAME", None)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _ASM_CHECK], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hardware = _host_has_sse42() and not forced
    assert proc.stdout.split() == [str(hardware), str(hardware)]
