"""The writer's latency counters, published for other processes: ``DIR/map/stats``.

Latency samples live in the writing process (:class:`~mmsb._core.monitor.Counters`), so
a reader of the bus (``mmsb ui``, ``attach``) has none of its own. The writer copies
them into this small file: at each checkpoint, and from the writer's background thread
(the group commit's, or its own without one) at most once per :data:`PUBLISH_EVERY`
seconds when they changed. Never from a write call: a
small write costs what it cost before.

The file is replaced whole (written beside it, then renamed over it), so a reader sees
one complete publication or the previous one; it is not fsynced (a crash may lose the
newest copy, never the bus's data). Layout (little-endian), 1,292 bytes::

    0    magic "MMSBSTAT" | version u16 (1) | kinds u16 (4) | bins u16 (64) | reserved u16
    16   written ns u64 (Unix epoch; 0 for a clock before 1970) | last LSN u64 |
         writer pid u32 | reserved u32
    40   four kind blocks of 312 bytes, in the order of KINDS:
           count u64 | total ns u64 | max ns u64 | samples u32 | reserved u32
           p50 ns f64 | p90 ns f64 | p99 ns f64
           64 bins u32: bin 0 holds samples of 0 ns, bin k (1…63) samples of
           2**(k-1) … 2**k - 1 ns (the last bin also holds anything longer)
    1288 CRC-32 (zlib) of bytes 0 … 1287

``count``/``total``/``max`` are exact since the writer started (or its last
``reset_stats``); percentiles and bins describe the samples its rings keep (the last
4,096 of each kind).
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .._core.monitor import Counters, LatencyRing
from ..errors import SerializationError
from .fsops import process_alive

__all__ = ["KINDS", "PUBLISH_EVERY", "STATS_NAME", "encode_stats", "publish_stats",
           "read_stats", "decode_stats"]

MAGIC = b"MMSBSTAT"
VERSION = 1
KINDS = ("delta_apply", "propagation", "log_append", "checkpoint")
BINS = 64
STATS_NAME = "stats"
"""The file's name in ``DIR/map``."""
PUBLISH_EVERY = 1.0
"""Fewest seconds between two publications from the writer's background thread."""

_HEAD = struct.Struct("<8sHHHHQQII")
_KIND = struct.Struct("<QQQIIddd")
_BINS = struct.Struct(f"<{BINS}I")
SIZE = _HEAD.size + len(KINDS) * (_KIND.size + _BINS.size) + 4


_EDGES = np.array([0, *(1 << k for k in range(BINS - 1))], np.int64)
"""Lower bound of each bin: 0, 1, 2, 4, … 2**62."""


def _kind_block(ring: LatencyRing) -> bytes:
    """One kind's block: exact totals, and percentiles and power-of-two bins of the
    samples its ring keeps (one sort of at most 4,096 samples)."""
    n = min(ring.count, len(ring.samples))
    samples = np.sort(np.frombuffer(bytes(ring.samples), np.int64)[:n])  # copied at once
    qs = [0.0, 0.0, 0.0]
    if n:
        # Linear interpolation between closest ranks (numpy's default percentile).
        for k, q in enumerate((0.50, 0.90, 0.99)):
            at = q * (n - 1)
            lo = int(at)
            hi = min(lo + 1, n - 1)
            qs[k] = float(samples[lo] + (samples[hi] - samples[lo]) * (at - lo))
    starts = np.searchsorted(samples, _EDGES, "left")
    counts = np.diff(np.append(starts, n))
    counts[0] += int(starts[0])  # negative samples (a clock that went back) count as 0 ns
    return _KIND.pack(ring.count, max(0, ring.total_ns), max(0, ring.max_ns), n, 0, *qs) + \
        np.minimum(counts, 0xFFFFFFFF).astype("<u4").tobytes()


def encode_stats(counters: Counters, last_lsn: int, written_ns: int | None = None,
                 pid: int | None = None) -> bytes:
    """The file's bytes for ``counters``. O(samples kept), vectorised."""
    when = time.time_ns() if written_ns is None else written_ns
    body = _HEAD.pack(MAGIC, VERSION, len(KINDS), BINS, 0, max(0, when), last_lsn,
                      os.getpid() if pid is None else pid, 0)
    body += b"".join(_kind_block(getattr(counters, k)) for k in KINDS)
    return body + struct.pack("<I", zlib.crc32(body))


_PUBLISHING = threading.Lock()
"""One publication at a time in a process: a checkpoint and the writer's background
thread both publish."""
_TEMP = re.compile(rf"{STATS_NAME}\.([0-9]{{1,10}})\.tmp")
"""The temporary file of the publisher whose pid it names."""
_SWEPT: set[str] = set()
"""The map folders whose dead publishers' temporary files this process has removed."""


def _sweep(map_dir: Path) -> None:
    """Remove the temporary files that publishers which no longer run left in
    ``map_dir`` (killed between a write and its rename); a live process's stays."""
    for name in os.listdir(map_dir):
        m = _TEMP.fullmatch(name)
        if m is not None and not process_alive(int(m.group(1))):
            try:
                os.unlink(map_dir / name)
            except OSError:
                pass  # (removed first by another process, or not a file: left as it is)


def publish_stats(map_dir: Path, counters: Counters, last_lsn: int) -> None:
    """Replace ``map_dir/stats`` with the current counters (written beside it under a
    name of this process's, ``stats.PID.tmp``, then renamed over it; mode 0600). Two
    publishers never write one temporary file: the threads of a process take turns,
    and each process (a shared writer) has its own, so a rename never finds its file
    gone or half another's. A process's first publication to a folder removes the
    temporary files of publishers no longer running. Raises OSError."""
    data = encode_stats(counters, last_lsn)
    tmp = map_dir / f"{STATS_NAME}.{os.getpid()}.tmp"
    with _PUBLISHING:
        if str(map_dir) not in _SWEPT:
            # Once a process and folder: what killed publishers left goes.
            _SWEPT.add(str(map_dir))
            _sweep(map_dir)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, map_dir / STATS_NAME)


def decode_stats(data: bytes, what: str = "the stats file") -> dict[str, Any]:
    """The publication in ``data``: ``written_ns``, ``last_lsn``, ``pid`` and per kind
    ``count``, ``total_ns``, ``max_ns``, ``samples``, ``p50_ns``, ``p90_ns``,
    ``p99_ns``, ``bins`` (64 counts).

    Raises:
        SerializationError: wrong size, magic, version, shape or checksum.
    """
    if len(data) != SIZE:
        raise SerializationError(f"{what} holds {len(data)} bytes, not {SIZE}")
    magic, version, kinds, bins, _r, written, lsn, pid, _r2 = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise SerializationError(f"{what} does not start with {MAGIC!r}")
    if version != VERSION:
        raise SerializationError(f"{what} has version {version}; this mmsb reads {VERSION}")
    if (kinds, bins) != (len(KINDS), BINS):
        raise SerializationError(f"{what} holds {kinds} kinds of {bins} bins, not "
                                 f"{len(KINDS)} of {BINS}")
    (crc,) = struct.unpack_from("<I", data, SIZE - 4)
    if crc != zlib.crc32(data[:SIZE - 4]):
        raise SerializationError(f"{what} fails its checksum (torn or damaged)")
    out: dict[str, Any] = {"written_ns": written, "last_lsn": lsn, "pid": pid, "kinds": {}}
    at = _HEAD.size
    for name in KINDS:
        count, total, mx, samples, _r3, p50, p90, p99 = _KIND.unpack_from(data, at)
        at += _KIND.size
        out["kinds"][name] = {"count": count, "total_ns": total, "max_ns": mx,
                              "samples": samples, "p50_ns": p50, "p90_ns": p90,
                              "p99_ns": p99, "bins": list(_BINS.unpack_from(data, at))}
        at += _BINS.size
    return out


def read_stats(root: Path) -> dict[str, Any] | None:
    """The writer's publication in the bus directory ``root`` (None when there is
    none yet).

    Raises:
        SerializationError: the file is damaged (see :func:`decode_stats`).
    """
    path = root / "map" / STATS_NAME
    try:
        with open(path, "rb") as f:
            data = f.read(SIZE + 1)
    except FileNotFoundError:
        return None
    return decode_stats(data, str(path))
