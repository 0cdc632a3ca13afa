"""Write-ahead log segments.

A segment file starts with a 36-byte header — ``"MMSBWAL\\0" | version u16 | flags u16 |
bus_id u64 | generation u64 | seq u32 | crc32c u32`` — followed by frames
``length u64 | crc32c u32 | body``, where the CRC covers the 8 length bytes and the body
(the record encoding of :mod:`mmsb._storage.codec`, which holds the record's kind and LSN).
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
from .codec import KIND_DELTA, crc32c, decode_record
from .fsops import fsync_dir
from .walbulk import BulkRows

__all__ = ["fsync_dir", "group_body", "KIND_GROUP", "SEG_MAGIC", "SEG_VERSION", "SEG_HEADER_SIZE", "frame", "segment_header",
           "SegmentWriter", "SegmentScan", "scan_segment", "MAX_RECORD", "FRAME_HEAD",
           "decode_frame_body"]

SEG_MAGIC = b"MMSBWAL\0"
SEG_VERSION = 1
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


def segment_header(bus_id: int, generation: int, seq: int) -> bytes:
    head = _SEG_HEAD.pack(SEG_MAGIC, SEG_VERSION, 0, bus_id, generation, seq)
    return head + _U32.pack(crc32c(head))


class SegmentWriter:
    """Appends frames to one segment file with unbuffered ``os.write``, so a record is
    in the kernel (safe from a process crash) when ``append`` returns; ``sync`` makes it
    durable (``fdatasync``). The file is created 0600, exclusively, never through a
    link; if its header cannot be written and synced, the file is removed again and
    the descriptor closed before the error is raised."""

    intact = True
    """False once a failed append could not be cut back (the file's end is unknown)."""

    def __init__(self, path: Path, bus_id: int, generation: int, seq: int) -> None:
        self.path = path
        self.generation = generation
        self.seq = seq
        self.size = 0
        self.dirty = False
        self.fd = fsops.create_exclusive(path, append=True)
        try:
            self.append(segment_header(bus_id, generation, seq))
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
    def reopen(cls, path: Path, bus_id: int, generation: int, seq: int) -> SegmentWriter:
        """Append to an existing segment (another writer of a shared bus started it),
        after checking its header.

        Raises:
            FileNotFoundError: no such segment.
            SerializationError: its header is not the one its name calls for.
        """
        self = cls.__new__(cls)
        self.path = path
        self.generation = generation
        self.seq = seq
        self.dirty = False
        self.fd = fsops.open_regular(path, os.O_RDWR | os.O_APPEND)
        try:
            head = os.pread(self.fd, SEG_HEADER_SIZE, 0)
            if head != segment_header(bus_id, generation, seq):
                raise SerializationError("the segment's header is not the one its name calls "
                                         "for", path=path, offset=0)
            self.size = os.fstat(self.fd).st_size
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        return self

    def append(self, data: bytes | memoryview) -> None:
        """Append ``data`` whole. On failure the file is cut back to where it was, so
        nothing partial stays; if even that fails, ``intact`` becomes False.

        Raises:
            OSError: the write failed (ENOSPC, EIO …).
        """
        before = self.size
        try:
            fsops.write_all(self.fd, data, self.path)
        except OSError:
            try:
                fsops.truncate(self.fd, before, self.path)
            except OSError:
                self.intact = False
            raise
        self.size = before + len(data)
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            fsops.fdatasync(self.fd, self.path)
            self.dirty = False

    def close(self) -> None:
        if self.fd >= 0:
            try:
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
                 data: bytes | None = None, columns: bool = False) -> SegmentScan:
    """Read a segment (or check its bytes ``data``, already read), checking every frame.
    Records must carry LSNs ``first_lsn``, ``first_lsn + 1`` … in order. Never raises
    for bad content: damage is reported in the result, with its offset; a path that is
    not a regular file is damage too (it is never followed or waited on).

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
    if version != SEG_VERSION:
        out.damage = SerializationError(
            f"unsupported segment version {version} (this build reads {SEG_VERSION})",
            path=path, offset=8)
        return out
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


def group_body(bodies: list[bytes]) -> bytes:
    """One frame body holding several records, so that they reach the log all or none:
    ``11 u8 | count u32 | (length u32 | record body) × count``."""
    parts = [_GROUP_HEAD.pack(KIND_GROUP, len(bodies))]
    for b in bodies:
        parts.append(_U32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


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
