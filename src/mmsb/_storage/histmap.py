"""Read-only mappings of write-ahead log segments, for the history a durable bus
retains.

The one-frame small write (fastwrite.py) appends a delta's frame to the open segment
and keeps, in the in-memory log, a row pointing at the run's bytes inside that frame
(:data:`~mmsb._core.log.ENC_SEGRUN`) instead of a copy of them: the log takes the
segment's mapping as one of its payload chunks (:meth:`TransactionLog.map_segment
<mmsb._core.log.TransactionLog.map_segment>`), and history is read from it as from any
chunk. Recovery does the same for the segments it replays at a reopen
(:func:`map_replayed`: mapped up to the end of the frames it read, and the rows of the
one-run deltas it decoded pointed there, see :meth:`TransactionLog.point_at_segment
<mmsb._core.log.TransactionLog.point_at_segment>`).

A segment is mapped once, ``PROT_READ`` and ``MAP_SHARED``, over its whole possible
length (the bus's ``segment_bytes`` and room for one more frame: the frames appended
later are inside the mapping without a new one), through a descriptor of its own (a
``dup`` of the writer's): the mapping and the descriptor stay while any row points
there, so a segment that a checkpoint removes, or whose name is taken by another file
(a FIFO, a link), is still read from the file the frames were written to. The mapping
is let go (``munmap``) when the last view of it is.

Reading a mapping past the end of its file kills the process (SIGBUS), which no
exception can catch. So before rows are read from a segment, the log asks
:meth:`MappedSegment.readable`, which checks (seeking its descriptor's end, the cheapest
call that tells a file's size) that the file still reaches past the last frame the bus
wrote there, and then the log
checks each row's frame against the CRC32C it noted when writing it (see
:meth:`TransactionLog.check_segments <mmsb._core.log.TransactionLog.check_segments>`).
A file cut between that check and the read (by another process, at that instant) is
the one case left: a bus's files are its own (mode 0600, under its lock).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import sys
import weakref
from typing import Any

import numpy as np

from ..errors import SerializationError

__all__ = ["MappedSegment", "map_segment", "map_replayed"]

_PAGE = mmap.PAGESIZE
_MAX_MAPPED = 1 << 32
"""A row's payload offset is 32 bits: larger segments are not mapped (their rows hold
copies, as an in-memory log's)."""


def _libc_mmap() -> tuple[Any, Any] | None:
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        m, u = libc.mmap, libc.munmap
    except (OSError, AttributeError):
        return None
    m.restype = ctypes.c_void_p
    m.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
    u.restype = ctypes.c_int
    u.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return m, u


_CALLS = _libc_mmap()


def _unmap(addr: int, length: int, fd: int) -> None:
    assert _CALLS is not None
    _CALLS[1](addr, length)
    try:
        os.close(fd)
    except OSError:
        pass


class MappedSegment:
    """One segment file mapped read-only (see the module's docstring). ``writer``: the
    :class:`~mmsb._storage.wal.SegmentWriter` that appends to it; its ``size`` (where
    the frames end, kept after it is closed) is how far rows may point."""

    __slots__ = ("path", "fd", "writer", "length", "array", "view", "__weakref__")

    def __init__(self, writer: Any, length: int) -> None:
        assert _CALLS is not None
        self.path = str(writer.path)
        self.writer = writer
        self.length = -(-length // _PAGE) * _PAGE
        self.fd = _own_descriptor(writer.fd)
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise OSError(f"{self.path} is not a regular file")
        except OSError:
            os.close(self.fd)
            raise
        addr = _CALLS[0](None, self.length, mmap.PROT_READ, mmap.MAP_SHARED, self.fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, os.strerror(err))
        raw = (ctypes.c_ubyte * self.length).from_address(addr)
        # The mapping goes when the last array or view over it does (they keep ``raw``).
        weakref.finalize(raw, _unmap, addr, self.length, self.fd)
        arr = np.frombuffer(memoryview(raw).cast("B"), np.uint8)
        arr.flags.writeable = False
        self.array = arr
        """The mapping's bytes, read-only."""
        self.view = arr.data
        """The same, as the log's payload chunk."""

    def readable(self) -> int:
        """Where the frames the log points into end in the file, after checking that
        the file (through this mapping's own descriptor) is still a regular file that
        long.

        Raises:
            SerializationError: the file was cut short of its frames, or cannot be
                checked.
        """
        end = int(self.writer.size)
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as exc:
            raise SerializationError(f"cannot check the log segment ({exc.strerror or exc}); "
                                     "its history cannot be read", path=self.path) from None
        if size < end:
            raise SerializationError(
                f"the log segment was cut to {size} bytes after the bus wrote {end} there; "
                "its history cannot be read", path=self.path, offset=size)
        return end


def _own_descriptor(fd: int) -> int:
    """A read-only descriptor of the file ``fd`` is open on, with an offset of its own
    (``readable`` seeks it), through /proc where there is one, else a ``dup``."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)


def map_segment(writer: Any, segment_bytes: int, frame_room: int) -> MappedSegment | None:
    """A read-only mapping of ``writer``'s segment long enough for every frame the
    one-frame path may append to it (``segment_bytes`` and one frame of at most
    ``frame_room`` bytes); None where it cannot be mapped (no libc ``mmap``, a segment
    past 4 GiB, or the call failed): the rows then hold their payloads in memory."""
    length = segment_bytes + frame_room
    if _CALLS is None or length >= _MAX_MAPPED or writer.fd < 0:
        return None
    try:
        return MappedSegment(writer, length)
    except OSError:
        return None


class _Replayed:
    """A segment recovery replayed, which no writer appends to: where its frames end
    (``size``) is fixed, as :class:`MappedSegment` reads it of a writer."""

    __slots__ = ("path", "fd", "size")

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size


def map_replayed(path: os.PathLike[str] | str, end: int) -> MappedSegment | None:
    """A read-only mapping of a segment that recovery read, for the rows it keeps
    pointing into the segment's frames (see :meth:`TransactionLog.point_at_segment
    <mmsb._core.log.TransactionLog.point_at_segment>`), up to ``end`` (where the frames
    it read end). The file is opened anew, no-follow, and must be a regular file
    reaching ``end``; the rows are checked against the mapping (each frame's CRC32C as
    read) before they are read, so a file replaced or changed since the read is
    refused then. None where it cannot be mapped (see :func:`map_segment`)."""
    if _CALLS is None or end <= 0 or end >= _MAX_MAPPED:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    source = _Replayed(str(path), fd, end)
    try:
        # Checked before the mapping's own descriptor is opened (through /proc, which
        # would wait on a FIFO).
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        seg = MappedSegment(source, end)
        seg.readable()
    except (OSError, SerializationError):
        return None
    finally:
        os.close(fd)
        source.fd = -1  # the mapping reads through a descriptor of its own
    return seg

