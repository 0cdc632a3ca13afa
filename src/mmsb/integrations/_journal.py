"""The journal page of a LangGraph thread: its byte layout (``MLGJ``, version 1).

One journal page holds the checkpoint records and the pending writes of one (thread,
namespace), in the order they were made. It has no LangGraph import: the payloads it
carries are the ``(type, bytes)`` pairs LangGraph's serializer made, stored as they are
and never decoded here.

Layout (little-endian), specified in docs/SerializationSpec.md::

    header  magic "MLGJ" | version u8 = 1 | state u8 | reserved u16 = 0
    frame   length u32 (>= 1) | crc32c u32 over the length bytes and the body | body
    ...
    end     the first length of 0 (the zero-filled rest of the page) or the page's end

A body is one msgpack array: ``[1, checkpoint_id, parent_id, cp_type, cp_bytes,
md_type, md_bytes, run_id, channels]`` for a checkpoint, ``[2, checkpoint_id, task_id,
task_path, writes]`` for a put of pending writes. Decoding never runs code: msgpack
without extension types, every field checked for type and range.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
import msgpack
import numpy as np

from ..errors import SerializationError

__all__ = [
    "CHECKPOINT",
    "DELETED",
    "HEADER_SIZE",
    "LIVE",
    "MAX_FRAME",
    "PENDING",
    "VERSION",
    "WRITES",
    "ChannelRef",
    "CheckpointRecord",
    "WriteEntry",
    "WritesRecord",
    "encode_frame",
    "encode_header",
    "frame_bound",
    "header_state",
    "iter_frames",
]

MAGIC = b"MLGJ"
VERSION = 1
_HEADER = struct.Struct("<4sBBH")
HEADER_SIZE = _HEADER.size
_LEN = struct.Struct("<I")
_FRAME = struct.Struct("<II")
FRAME_OVERHEAD = _FRAME.size
MAX_FRAME = (1 << 32) - 1
"""Largest body a frame can carry (its length is a u32)."""

LIVE = 0
"""Header state: the journal is in use."""
PENDING = 1
"""Header state: the journal is a copy (``copy_thread``) not yet committed; a reopen
deletes it."""
DELETED = 2
"""Header state: the journal's thread was deleted; a reopen finishes the deletion."""
_STATES = (LIVE, PENDING, DELETED)

CHECKPOINT = 1
WRITES = 2

Version = str | int | float


@dataclass(frozen=True, slots=True)
class ChannelRef:
    """Where one channel's value of a checkpoint lives."""

    channel: str
    """The channel's name."""
    version: Version
    """LangGraph's version of the channel for this value."""
    page_id: int
    """The page holding the value's bytes; 0 when the value has no bytes."""
    epoch: int
    """The page's epoch at which it holds them (read with ``read_page_at(epoch=)``)."""
    length: int
    """How many bytes, from offset 0, are the value (the rest of the page is not)."""
    type: str
    """The serializer's type tag (``"empty"``: the channel had no value)."""


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """One ``put``: the checkpoint without its channel values, its metadata, and where
    each channel value it had lives."""

    checkpoint_id: str
    parent_id: str | None
    checkpoint: tuple[str, bytes]
    """The serialized checkpoint, ``channel_values`` left out."""
    metadata: tuple[str, bytes]
    """The serialized metadata."""
    run_id: str | None
    """The metadata's ``run_id``, kept apart so ``delete_for_runs`` needs no decoding."""
    channels: tuple[ChannelRef, ...]


@dataclass(frozen=True, slots=True)
class WriteEntry:
    """One pending write of a task."""

    idx: int
    """Its index in the task's writes, or LangGraph's negative index of a special
    channel (error, interrupt, ...)."""
    channel: str
    type: str
    value: bytes


@dataclass(frozen=True, slots=True)
class WritesRecord:
    """One ``put_writes``: the writes of a task against a checkpoint."""

    checkpoint_id: str
    task_id: str
    task_path: str
    writes: tuple[WriteEntry, ...]


Record = CheckpointRecord | WritesRecord


def encode_header(state: int = LIVE) -> bytes:
    """The 8-byte header of a journal page in ``state``."""
    return _HEADER.pack(MAGIC, VERSION, state, 0)


def header_state(buf: Any, where: str) -> int:
    """The state byte of the journal header at the start of ``buf``, checked."""
    data = bytes(buf[:HEADER_SIZE])
    if len(data) < HEADER_SIZE:
        raise SerializationError(f"{where}: {len(data)} bytes, shorter than the journal header",
                                 offset=0)
    magic, version, state, reserved = _HEADER.unpack(data)
    if magic != MAGIC:
        raise SerializationError(f"{where}: bad magic {magic!r} (expected {MAGIC!r})", offset=0)
    if version != VERSION:
        raise SerializationError(
            f"{where}: journal version {version} is not supported (this build reads {VERSION})",
            offset=4)
    if state not in _STATES:
        raise SerializationError(f"{where}: unknown journal state {state}", offset=5)
    if reserved != 0:
        raise SerializationError(f"{where}: reserved header field is {reserved}, not 0",
                                 offset=6)
    return int(state)


def _body(record: Record) -> list[Any]:
    if isinstance(record, CheckpointRecord):
        return [CHECKPOINT, record.checkpoint_id, record.parent_id,
                record.checkpoint[0], record.checkpoint[1],
                record.metadata[0], record.metadata[1], record.run_id,
                [[c.channel, c.version, c.page_id, c.epoch, c.length, c.type]
                 for c in record.channels]]
    return [WRITES, record.checkpoint_id, record.task_id, record.task_path,
            [[w.idx, w.channel, w.type, w.value] for w in record.writes]]


_PACKER = msgpack.Packer(use_bin_type=True)
"""Shared by every encode: a packer's ``pack`` runs in C without giving up the GIL (a
body holds only lists, str, bytes, ints, floats and None, so no Python code runs in
it), so calls never interleave, and it empties its buffer after each, failed or not.
Making a packer per call is most of ``packb``'s cost on a body of a few hundred
bytes."""


def encode_frame(record: Record) -> bytes:
    """One framed record: length, CRC32C, msgpack body."""
    body = _PACKER.pack(_body(record))
    if len(body) > MAX_FRAME:
        raise SerializationError(f"a journal record of {len(body)} bytes is over the "
                                 f"{MAX_FRAME}-byte frame limit")
    head = _LEN.pack(len(body))
    return head + _LEN.pack(_crc32c.crc32c(body, _crc32c.crc32c(head))) + body


def _str_bound(v: str | None) -> int:
    """Most bytes msgpack takes for ``v`` (UTF-8 is at most 4 bytes a code point)."""
    return 1 if v is None else 5 + 4 * len(v)


def frame_bound(checkpoint_id: str, parent_id: str | None, checkpoint: tuple[str, bytes],
                metadata: tuple[str, bytes], run_id: str | None,
                channels: Iterable[tuple[str, Version, str]]) -> int:
    """An upper bound of ``len(encode_frame(...))`` for a checkpoint record with these
    fields and one channel entry per ``(name, version, type)``, whatever their page,
    epoch and length (each int takes at most 9 bytes). O(fields), nothing encoded."""
    n = (FRAME_OVERHEAD + 5 + 1 + _str_bound(checkpoint_id) + _str_bound(parent_id)
         + _str_bound(checkpoint[0]) + 5 + len(checkpoint[1])
         + _str_bound(metadata[0]) + 5 + len(metadata[1]) + _str_bound(run_id) + 5)
    for name, version, typ in channels:
        # An array header, the name, the version, three ints and the type (each str as
        # _str_bound counts it), added up inline: this runs on every put.
        n += (38 + 4 * (len(name) + len(typ))
              + (5 + 4 * len(version) if isinstance(version, str) else 9))
    return n


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_version(v: Any) -> bool:
    return isinstance(v, str | float) or _is_int(v)


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{what} is a {type(v).__name__}, not a str")
    return v


def _opt_str(v: Any, what: str) -> str | None:
    return None if v is None else _str(v, what)


def _nat(v: Any, what: str) -> int:
    if not _is_int(v) or v < 0 or v > (1 << 63) - 1:
        raise ValueError(f"{what} is {v!r}, not an int in 0 … 2^63 - 1")
    return int(v)


def _bin(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise ValueError(f"{what} is a {type(v).__name__}, not bytes")
    return v


def _array(v: Any, n: int | None, what: str) -> list[Any]:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        size = f" of {n} items" if n is not None else ""
        raise ValueError(f"{what} is not an array{size}")
    return v


_I63 = (1 << 63) - 1
_VERSION_TYPES = (str, int, float)


def _decode_body(body: bytes) -> Record:
    """The record of one frame body. The checks are a fast pass over exact types
    (msgpack yields exactly these); a body that fails it goes through
    :func:`_explain`, which names the field."""
    try:
        items = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:
        raise ValueError(f"the body is not valid msgpack ({exc})") from None
    if type(items) is not list or not items:
        raise ValueError("the body is not a non-empty array")
    kind = items[0]
    if kind == CHECKPOINT and type(kind) is int and len(items) == 9:
        _k, cid, parent, ctype, cbytes, mtype, mbytes, run, chans = items
        if (type(cid) is str and (parent is None or type(parent) is str)
                and type(ctype) is str and type(cbytes) is bytes and type(mtype) is str
                and type(mbytes) is bytes and (run is None or type(run) is str)
                and type(chans) is list):
            refs = []
            for c in chans:
                if type(c) is not list or len(c) != 6:
                    break
                name, ver, page, epoch, length, typ = c
                if (type(name) is not str or type(ver) not in _VERSION_TYPES
                        or type(page) is not int or type(epoch) is not int
                        or type(length) is not int or type(typ) is not str
                        or not 0 <= page <= _I63 or not 0 <= epoch <= _I63
                        or not 0 <= length <= _I63 or (page == 0 and length != 0)):
                    break
                refs.append(ChannelRef(name, ver, page, epoch, length, typ))
            else:
                return CheckpointRecord(cid, parent, (ctype, cbytes), (mtype, mbytes), run,
                                        tuple(refs))
    elif kind == WRITES and type(kind) is int and len(items) == 5:
        _k, cid, task, path, raw = items
        if type(cid) is str and type(task) is str and type(path) is str and type(raw) is list:
            writes = []
            for w in raw:
                if type(w) is not list or len(w) != 4:
                    break
                idx, channel, typ, value = w
                if (type(idx) is not int or not -(1 << 63) <= idx <= _I63
                        or type(channel) is not str or type(typ) is not str
                        or type(value) is not bytes):
                    break
                writes.append(WriteEntry(idx, channel, typ, value))
            else:
                return WritesRecord(cid, task, path, tuple(writes))
    _explain(items)
    raise ValueError("the body is not a well-formed record")  # pragma: no cover


def _explain(items: list[Any]) -> None:
    """Raise ``ValueError`` naming what is wrong in a record that failed the fast
    checks of :func:`_decode_body`."""
    kind = items[0]
    if kind == CHECKPOINT and _is_int(kind):
        _array(items, 9, "a checkpoint record")
        _str(items[1], "checkpoint id")
        _opt_str(items[2], "parent id")
        _str(items[3], "checkpoint type")
        _bin(items[4], "checkpoint bytes")
        _str(items[5], "metadata type")
        _bin(items[6], "metadata bytes")
        _opt_str(items[7], "run id")
        for i, raw in enumerate(_array(items[8], None, "the channel list")):
            c = _array(raw, 6, f"channel entry {i}")
            _str(c[0], f"channel entry {i}: name")
            if not _is_version(c[1]):
                raise ValueError(f"channel entry {i}: version {c[1]!r} is not a str, int or float")
            page = _nat(c[2], f"channel entry {i}: page")
            _nat(c[3], f"channel entry {i}: epoch")
            length = _nat(c[4], f"channel entry {i}: length")
            _str(c[5], f"channel entry {i}: type")
            if page == 0 and length != 0:
                raise ValueError(f"channel entry {i}: {length} bytes on no page")
    elif kind == WRITES and _is_int(kind):
        _array(items, 5, "a writes record")
        _str(items[1], "checkpoint id")
        _str(items[2], "task id")
        _str(items[3], "task path")
        for i, raw in enumerate(_array(items[4], None, "the write list")):
            w = _array(raw, 4, f"write {i}")
            if not _is_int(w[0]) or not -(1 << 63) <= w[0] < (1 << 63):
                raise ValueError(f"write {i}: index {w[0]!r} is not a 64-bit int")
            _str(w[1], f"write {i}: channel")
            _str(w[2], f"write {i}: type")
            _bin(w[3], f"write {i}: value")
    else:
        raise ValueError(f"unknown record kind {kind!r}")


def decode_frame(frame: bytes, where: str, offset: int) -> Record:
    """The record of one whole frame (header included), checked."""
    length, crc = _FRAME.unpack_from(frame, 0)
    body = frame[FRAME_OVERHEAD:]
    if len(body) != length:
        raise SerializationError(f"{where}: frame of {len(body)} body bytes, its length "
                                 f"says {length}", offset=offset)
    if _crc32c.crc32c(body, _crc32c.crc32c(frame[:4])) != crc:
        raise SerializationError(f"{where}: frame checksum mismatch", offset=offset)
    try:
        return _decode_body(body)
    except ValueError as exc:
        raise SerializationError(f"{where}: {exc}", offset=offset) from None


def iter_frames(buf: Any, where: str) -> Iterator[tuple[int, int, Record]]:
    """``(offset, frame length, record)`` of every record of a journal page's bytes.

    ``buf`` is the whole page (bytes or a uint8 array). Stops at the first length of 0
    or at the page's end; the bytes after that must all be zero. Raises
    ``SerializationError`` naming ``where`` and the offset for a bad header, a frame
    that runs past the page, a checksum mismatch or a body that does not decode.
    Cost: O(page size).
    """
    data = buf if isinstance(buf, bytes) else np.asarray(buf, dtype=np.uint8).tobytes()
    header_state(data, where)
    size = len(data)
    pos = HEADER_SIZE
    while pos + 4 <= size:
        length = _LEN.unpack_from(data, pos)[0]
        if length == 0:
            break
        end = pos + FRAME_OVERHEAD + length
        if end > size:
            raise SerializationError(f"{where}: a frame of {length} bytes runs past the "
                                     f"page's {size} bytes", offset=pos)
        yield pos, end - pos, decode_frame(data[pos:end], where, pos)
        pos = end
    if pos < size and data.count(0, pos) != size - pos:
        raise SerializationError(f"{where}: non-zero bytes after the last record", offset=pos)


def used_length(buf: Any, where: str) -> int:
    """Offset just past the last record of a journal page's bytes (checked as
    :func:`iter_frames` does)."""
    end = HEADER_SIZE
    for offset, length, _record in iter_frames(buf, where):
        end = offset + length
    return end
