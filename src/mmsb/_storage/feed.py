"""The change feed of a durable bus: the events of its logged records, read from its
files in LSN order, resumable at any retained LSN, and followed as they are written.

An event's binary form (:func:`serialize_event`) is::

    "MMEV" | version u8 | type u8 | flags u16 (0) | timestamp u64 | lsn u64 |
    page_id u64 | payload_len u32 | payload (msgpack map, str keys) | crc32c u32

little-endian; the CRC32C covers every byte before it.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from .._core.delta import Delta
from .._core.events import Event
from .._core.log import TransactionLog
from .._core.records import (
    AnyRecord,
    Compacted,
    EdgeAdd,
    EdgeRemove,
    MetadataSet,
    PageClone,
    PageCreate,
    PageDelete,
    PageMigrate,
    PageResize,
)
from ..errors import HistoryUnavailableError, InvalidArgumentError, SerializationError
from ..types import EventType
from . import fsops
from .codec import crc32c
from .wal import (
    FRAME_HEAD,
    MAX_RECORD,
    SEG_HEADER_SIZE,
    SEG_VERSIONS,
    decode_frame_body,
    segment_header,
)

__all__ = ["serialize_event", "deserialize_event", "record_events", "ChangeFeed",
           "EVENT_MAGIC", "EVENT_VERSION"]

EVENT_MAGIC = b"MMEV"
EVENT_VERSION = 1
_EV_HEAD = struct.Struct("<4sBBHQQQI")
_U32 = struct.Struct("<I")
_LEN = struct.Struct("<Q")
MAX_EVENT_PAYLOAD = 1 << 24
_WAL_RE = re.compile(r"^wal-([0-9a-f]{16})-([0-9a-f]{8})\.log\Z")
_READ_STEP = 1 << 20
_FIRST_STEP = 1 << 16
"""A poll reads this much first, then twice as much each time it needs more."""
TICK_NS = 50_000_000
"""Longer than the kernel's file-time granularity (a scheduler tick, at most 10 ms)."""


# -- events of records ---------------------------------------------------------------

def record_events(rec: AnyRecord) -> list[Event]:
    """The events a logged record stands for, in order (records that change nothing a
    subscriber sees give none)."""
    ts, lsn = rec.timestamp, rec.lsn
    if isinstance(rec, Delta):
        lo, hi = rec.span
        return [Event(EventType.PAGE_CHANGED, ts, lsn, rec.page_id, {
            "epoch": rec.epoch, "base_epoch": rec.base_epoch, "delta_id": rec.id,
            "source": rec.source, "bytes": rec.count, "lo": lo, "hi": hi})]
    if isinstance(rec, PageCreate):
        payload: dict[str, Any] = {"size": rec.size, "location": rec.location}
        if rec.metadata:
            payload["metadata"] = dict(rec.metadata)
        return [Event(EventType.PAGE_CREATED, ts, lsn, pid, dict(payload))
                for pid in range(rec.first_id, rec.first_id + rec.count)]
    if isinstance(rec, PageDelete):
        return [Event(EventType.PAGE_DELETED, ts, lsn, rec.page_id, {})]
    if isinstance(rec, PageResize):
        return [Event(EventType.PAGE_RESIZED, ts, lsn, rec.page_id, {"new_size": rec.new_size})]
    if isinstance(rec, PageMigrate):
        return [Event(EventType.PAGE_MIGRATED, ts, lsn, rec.page_id, {"location": rec.location})]
    if isinstance(rec, PageClone):
        return [Event(EventType.PAGE_CREATED, ts, lsn, rec.page_id, {"source_id": rec.source_id})]
    if isinstance(rec, MetadataSet):
        return [Event(EventType.METADATA_CHANGED, ts, lsn, rec.page_id,
                      {"metadata": dict(rec.metadata), "source": rec.source})]
    if isinstance(rec, EdgeAdd):
        return [Event(EventType.EDGE_ADDED, ts, lsn, rec.child_id,
                      {"parent_id": rec.parent_id, "edge_type": rec.edge_type})]
    if isinstance(rec, EdgeRemove):
        return [Event(EventType.EDGE_REMOVED, ts, lsn, rec.child_id, {"parent_id": rec.parent_id})]
    if isinstance(rec, Compacted):
        return [Event(EventType.LOG_COMPACTED, ts, lsn, 0, {"next_id": rec.next_id})]
    return []


# -- the binary form -------------------------------------------------------------------

def serialize_event(event: Event) -> bytes:
    """The event's binary form (see the module's docstring).

    Raises:
        InvalidArgumentError: not an Event, a field out of range, or a payload msgpack
            cannot encode (or larger than 16 MiB).
    """
    if not isinstance(event, Event):
        raise InvalidArgumentError(f"serialize_event takes an Event, not {type(event).__name__}")
    try:
        et = EventType(event.type)
    except ValueError:
        raise InvalidArgumentError(f"unknown event type {event.type!r}") from None
    for name in ("timestamp", "lsn", "page_id"):
        v = getattr(event, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
            raise InvalidArgumentError(f"event {name} must be an int in [0, 2**64), not {v!r}")
    if not isinstance(event.payload, dict) or not all(isinstance(k, str) for k in event.payload):
        raise InvalidArgumentError("an event's payload must be a dict with str keys")
    try:
        payload = msgpack.packb(event.payload, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"the event's payload cannot be encoded ({exc})") from None
    if len(payload) > MAX_EVENT_PAYLOAD:
        raise InvalidArgumentError(f"the event's payload is {len(payload)} bytes (at most "
                                   f"{MAX_EVENT_PAYLOAD})")
    head = _EV_HEAD.pack(EVENT_MAGIC, EVENT_VERSION, int(et), 0, event.timestamp, event.lsn,
                         event.page_id, len(payload))
    return head + payload + _U32.pack(crc32c(payload, crc32c(head)))


def deserialize_event(data: bytes | bytearray | memoryview) -> Event:
    """The Event of :func:`serialize_event`'s bytes (exactly one event, nothing after it).

    Raises:
        SerializationError: too short, wrong magic or version, checksum mismatch, an
            unknown type, a payload that is not a msgpack map with str keys, or trailing
            bytes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SerializationError(f"an event is bytes, not {type(data).__name__}")
    buf = memoryview(data).cast("B")
    if len(buf) < _EV_HEAD.size + 4:
        raise SerializationError(f"an event is at least {_EV_HEAD.size + 4} bytes; got {len(buf)}")
    magic, version, etype, flags, ts, lsn, pid, plen = _EV_HEAD.unpack_from(buf, 0)
    if magic != EVENT_MAGIC:
        raise SerializationError("not an MMSB event (bad magic)", offset=0)
    if version != EVENT_VERSION:
        raise SerializationError(f"unsupported event version {version} (this build reads "
                                 f"{EVENT_VERSION})", offset=4)
    end = _EV_HEAD.size + plen
    if plen > MAX_EVENT_PAYLOAD or end + 4 != len(buf):
        raise SerializationError(f"the event declares a payload of {plen} bytes but holds "
                                 f"{len(buf) - _EV_HEAD.size - 4}", offset=_EV_HEAD.size - 4)
    (crc,) = _U32.unpack_from(buf, end)
    if crc32c(buf[_EV_HEAD.size:end], crc32c(buf[: _EV_HEAD.size])) != crc:
        raise SerializationError("event checksum mismatch", offset=end)
    if flags != 0:
        raise SerializationError(f"unknown event flags {flags:#x}", offset=6)
    try:
        et = EventType(etype)
    except ValueError:
        raise SerializationError(f"unknown event type {etype}", offset=5) from None
    try:
        payload = msgpack.unpackb(bytes(buf[_EV_HEAD.size:end]), raw=False, strict_map_key=False,
                                  max_ext_len=0)
    except Exception as exc:
        raise SerializationError(f"the event's payload is not valid msgpack ({exc})") from None
    if not isinstance(payload, dict) or not all(isinstance(k, str) for k in payload):
        raise SerializationError("the event's payload must be a map with str keys")
    return Event(et, ts, lsn, pid, payload)


# -- reading the log -------------------------------------------------------------------

def _nonzero(b: bytes | memoryview) -> bool:
    """Whether a few bytes (a header or frame head at most) are not all zeros."""
    return bool(bytes(b).strip(b"\0"))


class _Segment:
    """An open segment and how far it has been read (``pos``: the end of the last whole
    frame read). Nothing after ``pos`` is kept between reads: in a segment allocated
    ahead, the bytes after the frames are zeros that later frames overwrite."""

    def __init__(self, path: Path, gen: int, seq: int, bus_id: int) -> None:
        self.path = path
        self.gen = gen
        self.seq = seq
        self.fd = fsops.open_regular(path, os.O_RDONLY)
        self.pos = 0
        self.headers = tuple(segment_header(bus_id, gen, seq, v) for v in SEG_VERSIONS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _read(self, n: int, at: int) -> bytes:
        """Up to ``n`` bytes at ``at`` (fewer only at the end of the file)."""
        parts = []
        while n > 0:
            chunk = os.pread(self.fd, n, at)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
            at += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_frames(self) -> tuple[list[AnyRecord], bool]:
        """Records of the whole frames written since the last call, and whether the
        segment ends (for now) in the middle of a frame. Reading stops at the first
        frame that is not whole: zeros (space written ahead, where the next frame will
        be written), a frame being written, or a torn one (a later segment decides).
        Reads a step at a time, so that a segment written ahead is read about as far
        as its frames go. O(bytes of the new frames).

        Raises:
            SerializationError: the header is another bus's or generation's.
        """
        out: list[AnyRecord] = []
        if self.pos == 0:
            head = self._read(SEG_HEADER_SIZE, 0)
            if len(head) < SEG_HEADER_SIZE:
                return out, _nonzero(head)
            if head not in self.headers:
                raise SerializationError("the segment's header is not the one its name calls for",
                                         path=self.path, offset=0)
            self.pos = SEG_HEADER_SIZE
        step = _FIRST_STEP
        data = self._read(step, self.pos)
        buf = memoryview(data)
        at = 0  # in buf, which starts at self.pos
        partial = False
        while True:
            if len(buf) - at < FRAME_HEAD or _LEN.unpack_from(buf, at)[0] + FRAME_HEAD > len(buf) - at:
                # Read on: the rest of this frame (when its length is known) and a step.
                need = FRAME_HEAD
                if len(buf) - at >= FRAME_HEAD:
                    need += min(_LEN.unpack_from(buf, at)[0], MAX_RECORD)
                step = min(step * 2, _READ_STEP)
                more = self._read(max(need - (len(buf) - at), 0) + step,
                                  self.pos + len(buf))
                if more:
                    data = bytes(buf[at:]) + more
                    self.pos += at
                    buf = memoryview(data)
                    at = 0
                if len(buf) - at < FRAME_HEAD:
                    partial = _nonzero(buf[at:])
                    break
            (length,) = _LEN.unpack_from(buf, at)
            if length == 0:
                # Zeros: the end of the frames for now (no frame is empty).
                partial = _nonzero(buf[at : at + FRAME_HEAD])
                break
            (fcrc,) = _U32.unpack_from(buf, at + 8)
            end = at + FRAME_HEAD + length
            if length > MAX_RECORD or end > len(buf):
                partial = True
                break
            body = buf[at + FRAME_HEAD : end]
            if crc32c(body, crc32c(buf[at : at + 8])) != fcrc:
                partial = True  # being written, or torn: a later segment decides
                break
            out.extend(decode_frame_body(body))
            at = end
        self.pos += at
        return out, partial


class ChangeFeed:
    """Records of a bus directory with LSN > ``since``, in order, as they appear.

    ``poll()`` returns what is there now. Where the records wanted are no longer in the
    log segments (a checkpoint folded them), they are read from the retained history by
    ``recover`` (a callable giving ``(records with LSN > since, last LSN)``), which is
    the slow path; a feed that keeps up reads segments only.
    """

    def __init__(self, root: Path, bus_id: int, since: int,
                 recover: Callable[[], TransactionLog],
                 published: Callable[[], int]) -> None:
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise InvalidArgumentError(f"since must be an LSN (an int >= 0), not {since!r}")
        self.root = root
        self.bus_id = bus_id
        self.next_lsn = since + 1
        self.recover = recover
        self.published = published
        """The LSN the writer has published: every record up to it is in the files."""
        self.seg: _Segment | None = None
        self._listing: list[tuple[int, int, Path]] | None = None
        self._listed_at = -1
        self._listed_when = -1

    def close(self) -> None:
        if self.seg is not None:
            self.seg.close()
            self.seg = None

    def _segments(self) -> list[tuple[int, int, Path]]:
        """The bus's segments, oldest first (listed again only when the folder changed)."""
        wal = self.root / "wal"
        st = fsops.read_bus_folder(wal)
        if st is None:
            return []
        stamp = st.st_mtime_ns
        # A folder's time is the kernel's coarse clock: a listing taken within a tick of
        # the last change could miss a change made in that same tick, so it is trusted
        # only when taken well after the change.
        if (stamp == self._listed_at and self._listing is not None
                and self._listed_when - stamp > TICK_NS):
            return self._listing
        when = time.time_ns()
        out = []
        for name in os.listdir(wal):
            m = _WAL_RE.match(name)
            if m:
                out.append((int(m.group(1), 16), int(m.group(2), 16), wal / name))
        out.sort()
        self._listing, self._listed_at, self._listed_when = out, stamp, when
        return out

    def _open(self, gen: int, seq: int, path: Path) -> bool:
        try:
            self.seg = _Segment(path, gen, seq, self.bus_id)
        except FileNotFoundError:
            return False
        return True

    def _take(self, recs: list[AnyRecord], out: list[AnyRecord]) -> bool:
        """Append the records at or after next_lsn; False on a gap (records missing)."""
        for r in recs:
            if r.lsn < self.next_lsn:
                continue
            if r.lsn != self.next_lsn:
                return False
            out.append(r)
            self.next_lsn += 1
        return True

    def _catch_up(self, out: list[AnyRecord]) -> None:
        """Take the records wanted from the bus's retained history (``recover()``, the
        log of a read-only recovery), when they are no longer in the segments."""
        self.close()
        log = self.recover()
        since = self.next_lsn - 1
        if since < log.horizon_lsn:
            raise HistoryUnavailableError(
                f"the change feed of {self.root} cannot resume after LSN {since}: the bus "
                f"retains history after LSN {log.horizon_lsn} only")
        self._take(list(log.iter_records(since)), out)

    def poll(self) -> list[AnyRecord]:
        """The records written since the last call (possibly none).

        Raises:
            HistoryUnavailableError: the LSN to resume from is older than the history
                the bus retains.
            SerializationError: damage in the log.
        """
        out: list[AnyRecord] = []
        target = self.published()
        caught_up = False
        for _round in range(8):
            if self.seg is None:
                segs = self._segments()
                if not segs:
                    break
                # The segment whose records reach next_lsn: the last one starting at or
                # before it. Without knowing where each starts, begin with the newest
                # generation's first segment and skip forward by LSN.
                gen = segs[-1][0]
                first = [s for s in segs if s[0] == gen][0]
                if not self._open(*first):
                    continue
            assert self.seg is not None
            recs, _partial = self.seg.read_frames()
            if not self._take(recs, out):
                self._catch_up(out)
                caught_up = True
                continue
            # At the end of this segment for now: move on only if a later one exists
            # (the writer never appends to a segment once it has started the next).
            segs = self._segments()
            cur = (self.seg.gen, self.seg.seq)
            later = [s for s in segs if (s[0], s[1]) > cur]
            if not later:
                break
            recs, _partial = self.seg.read_frames()
            if not self._take(recs, out):
                self._catch_up(out)
                caught_up = True
                continue
            self.seg.close()
            nxt = later[0]
            self.seg = None
            if not self._open(*nxt):
                # Removed already (a checkpoint moved on): find the way back in.
                continue
        if self.next_lsn <= target and not caught_up:
            # Records published before this look are not in the segments: a checkpoint
            # folded them in.
            self._catch_up(out)
        return out

    def follow(self, token: Callable[[], int], wait: Callable[[int, float], None],
               timeout: float | None, stop_at_end: bool) -> Iterator[AnyRecord]:
        """Records as they appear. ``stop_at_end``: stop once nothing more is there;
        otherwise wait for more, until ``timeout`` seconds pass without a record
        (``None``: for ever). ``token()`` reads the writer's notification counter before
        each look at the files and ``wait(token, seconds)`` sleeps until it changes, so
        a record written between the look and the sleep is never missed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                seen = token()
                recs = self.poll()
                yield from recs
                if recs:
                    if deadline is not None:
                        deadline = time.monotonic() + timeout  # type: ignore[operator]
                    continue
                if stop_at_end:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                wait(seen, 0.25 if left is None else min(left, 0.25))
        finally:
            self.close()


def events_of(records: list[AnyRecord]) -> list[Event]:
    out: list[Event] = []
    for r in records:
        out.extend(record_events(r))
    return out
