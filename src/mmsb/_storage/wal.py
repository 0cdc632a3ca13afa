"""Write-ahead log segments.

A segment file starts with a 36-byte header — ``"MMSBWAL\\0" | version u16 | flags u16 |
bus_id u64 | generation u64 | seq u32 | crc32c u32`` — followed by frames
``length u64 | crc32c u32 | body``, where the CRC covers the 8 length bytes and the body
(the record encoding of :mod:`mmsb._storage.codec`, which holds the record's kind and LSN).

Segments are written as version 2. A bus that syncs every write (``fsync="always"``)
writes the file ahead of its frames with zeros (:data:`ALLOC_STEP` at a time), so that an append overwrites blocks
the file already has and a synced append's ``fdatasync`` commits neither a new file
size nor the allocation of a block (see :func:`~mmsb._storage.fsops.allocate`). The
log in a version-2 segment ends where its frames stop: at the first place from which
every byte to the end of the file is zero (a frame's length is never 0, so zeros never
read as a frame). A segment that is sealed (its successor started, or
the bus closed) is cut to that end. Version-1 segments (no space written ahead) are
still read: there the file's end is the log's end, and zeros at the end are a torn
append, as they always were.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._core.log import LogColumns
from .._core.records import AnyRecord
from ..errors import SerializationError
from . import fsops
from .codec import KIND_DELTA, body_parts, crc32c, decode_record, encode_record
from .fsops import fsync_dir
from .walbulk import BulkRows

__all__ = ["fsync_dir", "group_body", "KIND_GROUP", "SEG_MAGIC", "SEG_VERSION", "SEG_HEADER_SIZE", "frame", "segment_header",
           "SegmentWriter", "SegmentScan", "scan_segment", "MAX_RECORD", "FRAME_HEAD",
           "decode_frame_body", "records_frame", "SEG_VERSIONS", "ALLOC_STEP", "frames_end"]

SEG_MAGIC = b"MMSBWAL\0"
SEG_VERSION = 2
"""The version segments are written in: they may be written ahead, and end where the
frames stop."""
SEG_VERSIONS = (1, 2)
"""The versions read (1: the file's end is the log's end)."""
ALLOC_STEP = 1 << 20
"""Bytes a segment is written ahead at a time (at most up to ``segment_bytes``, where
it rolls): one ``fdatasync`` in this many bytes of frames writes them and commits the
new file size."""
_SEG_HEAD = struct.Struct("<8sHHQQI")
SEG_HEADER_SIZE = _SEG_HEAD.size + 4
_LEN = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_GROUP_HEAD = struct.Struct("<BI")
KIND_GROUP = 11
"""Frame body kind of a record group (not a record kind: groups exist only in segments)."""
FRAME_HEAD = 12
MAX_RECORD = 1 << 34
"""Largest record body a frame may declare (a 4 GiB dense delta and its fields)."""


def frame(body: bytes) -> bytes:
    """``length u64 | crc32c(length bytes + body) u32 | body``."""
    head = _LEN.pack(len(body))
    return head + _U32.pack(crc32c(body, crc32c(head))) + body


def segment_header(bus_id: int, generation: int, seq: int, version: int = SEG_VERSION) -> bytes:
    head = _SEG_HEAD.pack(SEG_MAGIC, version, 0, bus_id, generation, seq)
    return head + _U32.pack(crc32c(head))


class SegmentWriter:
    """Writes frames to one segment file at the position it keeps (``pwrite``,
    unbuffered), so a record is in the kernel (safe from a process crash) when
    ``append`` returns; ``sync`` makes it durable (``fdatasync``). The file is written
    ahead of the frames with zeros (see the module's docstring; ``ahead=False``: plain
    appends, for a bus that does not sync each write); ``size`` is where the frames end,
    ``allocated`` the file's size. The file is created 0600, exclusively, never through a
    link; if its header cannot be written and synced, the file is removed again and the
    descriptor closed before the error is raised."""

    intact = True
    """False once a failed append could not be cut back (the file's end is unknown)."""

    def __init__(self, path: Path, bus_id: int, generation: int, seq: int,
                 roll_at: int = 0, ahead: bool = True) -> None:
        self.path = path
        self.ahead = ahead
        self.generation = generation
        self.seq = seq
        self.size = 0
        self.allocated = 0
        self.roll_at = roll_at
        """The bus's ``segment_bytes``: space is never allocated past it (the segment
        rolls there); 0: no bound beyond one :data:`ALLOC_STEP`."""
        self.version = SEG_VERSION
        self.dirty = False
        self.fd = fsops.create_exclusive(path, readable=True)
        try:
            # The header alone is not written ahead: the first frame writes ahead.
            head = segment_header(bus_id, generation, seq)
            fsops.pwrite_all(self.fd, head, 0, path)
            self.size = self.allocated = len(head)
            self.dirty = True
            self.sync()
            fsync_dir(path.parent)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            try:
                fsops.unlink(path)
            except OSError:
                pass
            raise

    @classmethod
    def reopen(cls, path: Path, bus_id: int, generation: int, seq: int, roll_at: int = 0,
               end: int | None = None, ahead: bool = True) -> SegmentWriter:
        """Write on in an existing segment (another writer of a shared bus started it),
        after checking its header. ``end``: where its frames end, when the caller has
        read them; otherwise it is found (:meth:`find_end`).

        Raises:
            FileNotFoundError: no such segment.
            SerializationError: its header is not the one its name calls for.
        """
        self = cls.__new__(cls)
        self.path = path
        self.generation = generation
        self.seq = seq
        self.roll_at = roll_at
        self.dirty = False
        self.fd = fsops.open_regular(path, os.O_RDWR)
        try:
            head = os.pread(self.fd, SEG_HEADER_SIZE, 0)
            self.version = next((v for v in SEG_VERSIONS
                                 if head == segment_header(bus_id, generation, seq, v)), 0)
            if not self.version:
                raise SerializationError("the segment's header is not the one its name calls "
                                         "for", path=path, offset=0)
            self.ahead = ahead and self.version >= 2
            self.allocated = os.fstat(self.fd).st_size
            if end is None:
                self.find_end()
            else:
                self.size = end
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        return self

    def find_end(self) -> None:
        """Set ``size`` to where the file's frames end: its size in a version-1 segment,
        the end of its last whole frame (length and CRC checked) in a version-2 one."""
        if self.version < 2:
            self.size = self.allocated = os.fstat(self.fd).st_size
            return
        data = fsops.read_fd(self.fd)
        self.allocated = len(data)
        self.size = frames_end(data)

    def _allocate(self, need: int) -> None:
        """Write the file ahead with zeros so that ``need`` more bytes fit: to the next
        multiple of :data:`ALLOC_STEP`, not past ``roll_at``. A refusal (a full disk)
        cuts the zeros written back and leaves the write to a plain append, which fails
        on its own if there is no room (the next append tries again)."""
        end = self.size + need
        target = -(-end // ALLOC_STEP) * ALLOC_STEP
        if self.roll_at:
            target = min(target, max(self.roll_at, end))
        try:
            fsops.allocate(self.fd, self.allocated, target - self.allocated, self.path)
        except OSError:
            try:
                fsops.truncate(self.fd, self.allocated, self.path)
            except OSError:
                pass  # zeros past the frames read as their end all the same
            return
        self.allocated = target

    def append(self, data: bytes | memoryview) -> None:
        """Append ``data`` whole. On failure the file is cut back to where the frames
        ended, so nothing partial stays; if even that fails, ``intact`` becomes False.

        Raises:
            OSError: the write failed (ENOSPC, EIO …).
        """
        before = self.size
        n = len(memoryview(data).cast("B")) if not isinstance(data, bytes) else len(data)
        if self.ahead and before + n > self.allocated:
            self._allocate(n)
        try:
            fsops.pwrite_all(self.fd, data, before, self.path)
        except OSError:
            self.cut(before)
            raise
        self.size = before + n
        if self.size > self.allocated:
            self.allocated = self.size
        self.dirty = True

    def cut(self, end: int) -> None:
        """Cut the file back to ``end`` (a failed append's start): nothing after the
        frames stays, the space written ahead included. ``intact`` becomes False if the
        cut fails."""
        try:
            fsops.truncate(self.fd, end, self.path)
        except OSError:
            self.intact = False
            return
        self.size = end
        self.allocated = end

    def clear_after(self) -> bool:
        """True when nothing but zeros (or nothing) follows the frames' end in the file:
        no record another writer appended, whole or torn. (An append writes its bytes in
        order, so a writer that died in one left its first bytes.)"""
        return not os.pread(self.fd, FRAME_HEAD, self.size).strip(b"\0")

    def sync(self) -> None:
        if self.dirty:
            fsops.fdatasync(self.fd, self.path)
            self.dirty = False

    def close(self, seal: bool = False) -> None:
        """Sync and close. ``seal``: the caller knows ``size`` is the log's end in this
        segment (no other writer appended since) and nothing more is written to it: the
        space written ahead is cut off first, so a sealed segment ends at its last
        frame."""
        if self.fd >= 0:
            try:
                if seal and self.allocated > self.size and self.intact:
                    try:
                        fsops.truncate(self.fd, self.size, self.path)
                    except OSError:
                        pass  # the zeros after the frames still read as the segment's end
                    else:
                        self.allocated = self.size
                        self.dirty = True
                self.sync()
            finally:
                os.close(self.fd)
                self.fd = -1


@dataclass
class SegmentScan:
    """What one segment holds: its records, where valid data ends, and any damage."""

    path: Path
    records: list[AnyRecord] = field(default_factory=list)
    valid_end: int = 0
    """Offset just past the last good frame."""
    torn: bool = False
    """The file ends inside a frame (or with a bad checksum on the very last frame)."""
    zeros: int = 0
    """Bytes of zeros after the last frame of a version-2 segment: space written ahead,
    the log's end (not a torn frame)."""
    version: int = 0
    """The segment's format version (0 until its header is read)."""
    damage: SerializationError | None = None
    """The first damage before the tail, if any (records after it are not read)."""
    foreign: str | None = None
    """Why the header says this segment belongs to another bus or generation."""
    offsets: list[int] = field(default_factory=list)
    """File offset of each record's frame."""
    refused: SerializationError | None = None
    """A record that decoded but could not follow the state (set by recovery)."""
    missing: bool = False
    """The file vanished before it could be read (a writer's retention removed it)."""
    parts: list[tuple[Any, int]] = field(default_factory=list)
    """Scanned with ``columns``: in log order, ``(r0, r1)`` for the bulk rows ``r0 …
    r1-1`` of ``bulk``, or ``(record, frame offset)`` for a record read frame by frame."""
    bulk: BulkRows | None = None

    @property
    def count(self) -> int:
        """Records read (rows and records alike)."""
        if self.bulk is None:
            return len(self.records)
        return sum(b - a if isinstance(a, int) else 1 for a, b in self.parts)

    def items(self) -> Iterator[tuple[LogColumns, np.ndarray] | tuple[AnyRecord, int]]:
        """The scan's contents in log order: ``(columns, frame offsets)`` for each run
        of bulk-decoded deltas, ``(record, frame offset)`` for each other record."""
        if self.bulk is None:
            yield from zip(self.records, self.offsets, strict=True)
            return
        for a, b in self.parts:
            if isinstance(a, int):
                yield self.bulk.columns(a, b)
            else:
                yield a, b


def _valid_frame_after(buf: memoryview, start: int, expected: int) -> bool:
    """True if a checksum-valid frame starts somewhere at or after ``start``: the mark of
    damage in the middle of a log rather than a torn last append (nothing valid can
    follow a torn append). Any later frame carries an LSN between ``expected`` and
    ``expected`` + the records that could fit; those eight bytes are found with numpy at
    every offset (eight aligned views), and only the few candidates get a CRC check."""
    end = len(buf)
    span = end - start
    if span < FRAME_HEAD + 9:
        return False
    raw = buf.obj if isinstance(buf.obj, bytes) else bytes(buf)
    lo, hi = expected, expected + span // (FRAME_HEAD + 9) + 2
    leads = (FRAME_HEAD + 1, FRAME_HEAD + _GROUP_HEAD.size + 4 + 1)  # plain, group
    for align in range(8):
        first = start + align
        count = (end - first) // 8
        if count <= 0:
            continue
        words = np.frombuffer(raw, "<u8", count, first)
        for k in np.flatnonzero((words >= lo) & (words < hi)).tolist():
            at = first + 8 * k
            for lead in leads:
                frame_at = at - lead
                if frame_at < start or end - frame_at < FRAME_HEAD:
                    continue
                (length,) = _LEN.unpack_from(buf, frame_at)
                (fcrc,) = _U32.unpack_from(buf, frame_at + 8)
                body_end = frame_at + FRAME_HEAD + length
                if length <= MAX_RECORD and body_end <= end and crc32c(
                        buf[frame_at + FRAME_HEAD : body_end],
                        crc32c(buf[frame_at : frame_at + 8])) == fcrc:
                    return True
    return False


def scan_segment(path: Path, bus_id: int, generation: int, seq: int, first_lsn: int,
                 data: bytes | None = None, columns: bool = False,
                 zero_end: bool = True) -> SegmentScan:
    """Read a segment (or check its bytes ``data``, already read), checking every frame.
    Records must carry LSNs ``first_lsn``, ``first_lsn + 1`` … in order. Never raises
    for bad content: damage is reported in the result, with its offset; a path that is
    not a regular file is damage too (it is never followed or waited on). In a
    version-2 segment, zeros from some frame boundary to the end of the file are space
    written ahead: the log ends there (``zeros``), it is not torn (``zero_end=False``:
    they are a torn frame, as in version 1; for frames received from elsewhere).

    ``columns``: deltas are decoded in bulk into rows (:mod:`~mmsb._storage.walbulk`)
    and the result's ``parts`` hold them (see :meth:`SegmentScan.items`); other records
    and every damaged or doubtful frame go through the frame-by-frame reader, so the
    records, the damage and its offset are the same either way. O(frames + bytes)."""
    out = SegmentScan(path)
    if data is None:
        try:
            data = fsops.read_all(path)
        except OSError as exc:
            out.damage = SerializationError(f"cannot read the segment ({exc.strerror or exc})",
                                            path=path)
            out.missing = isinstance(exc, FileNotFoundError)
            return out
    buf = memoryview(data)
    end = len(buf)
    if end < SEG_HEADER_SIZE:
        out.torn = True
        return out
    magic, version, _flags, seg_bus, seg_gen, seg_seq = _SEG_HEAD.unpack_from(buf, 0)
    (crc,) = _U32.unpack_from(buf, _SEG_HEAD.size)
    if magic != SEG_MAGIC or crc32c(buf[: _SEG_HEAD.size]) != crc:
        out.damage = SerializationError("segment header is damaged or not a segment", path=path, offset=0)
        return out
    if version not in SEG_VERSIONS:
        out.damage = SerializationError(
            f"unsupported segment version {version} (this build reads versions "
            f"{', '.join(map(str, SEG_VERSIONS))})", path=path, offset=8)
        return out
    out.version = version
    if seg_bus != bus_id:
        out.foreign = f"it belongs to bus {seg_bus:016x}, not {bus_id:016x}"
        return out
    if seg_gen != generation or seg_seq != seq:
        out.foreign = (f"its header says generation {seg_gen} segment {seg_seq}, but it stands "
                       f"where generation {generation} segment {seq} belongs")
        return out
    pos = SEG_HEADER_SIZE
    out.valid_end = pos
    expected = first_lsn
    bulk = BulkRows(np.frombuffer(data, np.uint8), end - pos) if columns else None
    while pos < end:
        if bulk is not None:
            r0 = bulk.rows
            pos, got = bulk.run(pos, end, expected, KIND_DELTA, KIND_GROUP)
            if got:
                out.parts.append((r0, bulk.rows))
                expected += got
                out.valid_end = pos
            if pos >= end:
                break
        if zero_end and version >= 2 and _zeros_to_end(buf, pos, end):
            out.zeros = end - pos
            break
        step = _frame_at(buf, pos, end, expected, out, path)
        if step is None:
            break
        recs, body_end = step
        if bulk is not None:
            out.parts.extend((rec, pos) for rec in recs)
        else:
            out.records.extend(recs)
            out.offsets.extend([pos] * len(recs))
        expected += len(recs)
        pos = body_end
        out.valid_end = pos
    out.bulk = bulk
    return out


def _zeros_to_end(buf: memoryview, pos: int, end: int) -> bool:
    """Whether every byte from ``pos`` to ``end`` is zero (looked at whole only when the
    frame length there is 0, which no frame has)."""
    if end - pos >= 8 and _LEN.unpack_from(buf, pos)[0] != 0:
        return False
    return not np.frombuffer(buf, np.uint8, end - pos, pos).any()


def _frame_at(buf: memoryview, pos: int, end: int, expected: int, out: SegmentScan,
              path: Path) -> tuple[list[AnyRecord], int] | None:
    """Read the frame at ``pos`` (its records must start at LSN ``expected``): its
    records and where it ends, or None with the torn tail or the damage set in ``out``."""
    if end - pos < FRAME_HEAD:
        out.torn = True
        return None
    (length,) = _LEN.unpack_from(buf, pos)
    (fcrc,) = _U32.unpack_from(buf, pos + 8)
    body_end = pos + FRAME_HEAD + length
    if length > MAX_RECORD or body_end > end:
        # A torn append leaves nothing valid after it; a damaged length does.
        if _valid_frame_after(buf, pos + 1, expected):
            out.damage = SerializationError(
                "a record length is damaged (intact records follow it)", path=path, offset=pos)
        else:
            out.torn = True
        return None
    body = buf[pos + FRAME_HEAD : body_end]
    if crc32c(body, crc32c(buf[pos : pos + 8])) != fcrc:
        if body_end == end or not _valid_frame_after(buf, pos + 1, expected):
            out.torn = True
        else:
            out.damage = SerializationError("record checksum mismatch before the end of the log",
                                            path=path, offset=pos)
        return None
    try:
        recs = decode_frame_body(body)
    except SerializationError as exc:
        out.damage = SerializationError(f"record does not decode ({exc.reason})", path=path, offset=pos)
        return None
    bad = next((r for k, r in enumerate(recs) if r.lsn != expected + k), None)
    if bad is not None:
        out.damage = SerializationError(
            f"record has LSN {bad.lsn} where LSN {expected + recs.index(bad)} belongs (a "
            "stale or foreign record)", path=path, offset=pos)
        return None
    return recs, body_end


def frames_end(data: bytes) -> int:
    """Where the whole frames of a segment's bytes end: after the header, the end of the
    last frame whose length and CRC are good before the first that is not (zeros, a
    torn append, damage). The records are not decoded. O(frames)."""
    buf = memoryview(data)
    end = len(buf)
    pos = SEG_HEADER_SIZE
    if end < pos:
        return end
    while end - pos >= FRAME_HEAD:
        (length,) = _LEN.unpack_from(buf, pos)
        body_end = pos + FRAME_HEAD + length
        if length == 0 or length > MAX_RECORD or body_end > end:
            break
        (fcrc,) = _U32.unpack_from(buf, pos + 8)
        if crc32c(buf[pos + FRAME_HEAD : body_end], crc32c(buf[pos : pos + 8])) != fcrc:
            break
        pos = body_end
    return pos


def group_body(bodies: list[bytes]) -> bytes:
    """One frame body holding several records, so that they reach the log all or none:
    ``11 u8 | count u32 | (length u32 | record body) × count``."""
    parts = [_GROUP_HEAD.pack(KIND_GROUP, len(bodies))]
    for b in bodies:
        parts.append(_U32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def records_frame(records: list[AnyRecord]) -> bytes:
    """The frame of ``records``: one record's, or their group's (the bytes
    ``frame(group_body([encode_record(r) for r in records]))`` makes), the group's body
    joined once from the records' parts. O(bytes).

    Raises:
        SerializationError: a record cannot be encoded.
    """
    if len(records) == 1:
        return frame(encode_record(records[0]))
    parts: list[Any] = [_GROUP_HEAD.pack(KIND_GROUP, len(records))]
    pack = _U32.pack
    for rec in records:
        rp, n = body_parts(rec)
        parts.append(pack(n))
        parts += rp
    return frame(b"".join(parts))


def decode_frame_body(body: memoryview) -> list[AnyRecord]:
    """The records of one frame: one record, or a group (see :func:`group_body`)."""
    if len(body) == 0 or body[0] != KIND_GROUP:
        return [decode_record(body, "log record")]
    if len(body) < _GROUP_HEAD.size:
        raise SerializationError("a record group ends inside its header")
    _kind, count = _GROUP_HEAD.unpack_from(body, 0)
    if count < 1 or count > (len(body) - _GROUP_HEAD.size) // 4:
        raise SerializationError(f"a record group declares {count} records")
    out: list[AnyRecord] = []
    pos, end = _GROUP_HEAD.size, len(body)
    for _ in range(count):
        if end - pos < 4:
            raise SerializationError("a record group ends inside a record length")
        (n,) = _U32.unpack_from(body, pos)
        pos += 4
        if n > end - pos:
            raise SerializationError("a record in a group runs past the group's end")
        out.append(decode_record(body[pos : pos + n], "log record"))
        pos += n
    if pos != end:
        raise SerializationError("unexpected bytes after a record group")
    return out
