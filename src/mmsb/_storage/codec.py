"""Binary encoding of log records and of standalone deltas.

Every integer is little-endian. A record body is ``kind u8 | lsn u64 | timestamp i64``
followed by the kind's payload (see docs/SerializationSpec.md). Decoders check every
length and count against the bytes that remain before allocating anything, and raise
only :class:`SerializationError` on bad input. Nothing is unpickled or evaluated;
metadata is msgpack.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import crc32c as _crc32c
import msgpack
import numpy as np

from .._core.delta import Delta
from .._core.kernels import runs_of
from .._core.limits import (
    MAX_COUNTER,
    MAX_METADATA_BYTES,
    MAX_PAGE_ID,
    MAX_PAGE_SIZE,
    metadata_bounds_problem,
)
from .._core.records import (
    KIND_CODES,
    KINDS,
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
    bind_codec,
)
from ..errors import SerializationError

__all__ = [
    "crc32c",
    "encode_record",
    "record_parts",
    "body_parts",
    "decode_record",
    "encode_metadata",
    "decode_metadata",
    "serialize_delta",
    "deserialize_delta",
    "KIND_DELTA",
]

MAX_METADATA = MAX_METADATA_BYTES

# Kind bytes, as the kind table declares them.
KIND_DELTA = KINDS[Delta].code
KIND_CREATE = KINDS[PageCreate].code
KIND_DELETE = KINDS[PageDelete].code
KIND_RESIZE = KINDS[PageResize].code
KIND_MIGRATE = KINDS[PageMigrate].code
KIND_CLONE = KINDS[PageClone].code
KIND_METADATA = KINDS[MetadataSet].code
KIND_EDGE_ADD = KINDS[EdgeAdd].code
KIND_EDGE_REMOVE = KINDS[EdgeRemove].code
KIND_COMPACTED = KINDS[Compacted].code

ENC_SPARSE_RUNS = 0
ENC_DENSE_FULL = 1
ENC_DENSE_MASKED = 2
ENC_DENSE_EXACT = 3

_HEAD = struct.Struct("<BQq")
_DELTA = struct.Struct("<QQQQQ")
_CREATE = struct.Struct("<QQQB")
_Q = struct.Struct("<Q")
_QQ = struct.Struct("<QQ")
_QB = struct.Struct("<QB")
_QQB = struct.Struct("<QQB")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ONE_RUN = struct.Struct("<BIII")
_RUNS_HEAD = struct.Struct("<BI")
_DELTA_FIXED = struct.Struct("<BQqQQQQQH")
"""A delta record's head, its payload's fixed fields and its source's length, in one."""
_TWO_U32 = struct.Struct("<II")

_DELTA_MAGIC = b"MMSD"
_DELTA_VERSION = 1
_DELTA_HEAD = struct.Struct("<4sHI")


crc32c: Callable[..., int] = _crc32c.crc32c
"""``crc32c(data, value=0)``: CRC32C (Castagnoli) of the bytes of ``data`` (any buffer),
continuing from ``value``; an int. The package's C function itself: a check costs one C
call, without a Python frame around it."""


def encode_metadata(meta: dict[str, Any] | None) -> bytes:
    return b"" if not meta else msgpack.packb(meta, use_bin_type=True)


def decode_metadata(raw: bytes | memoryview, what: str = "metadata") -> dict[str, Any]:
    if len(raw) == 0:
        return {}
    try:
        out = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=False,
                              max_bin_len=MAX_METADATA, max_str_len=MAX_METADATA,
                              max_array_len=1 << 20, max_map_len=1 << 20, max_ext_len=0)
    except Exception as exc:
        raise SerializationError(f"{what} is not valid msgpack ({exc})") from None
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
        raise SerializationError(f"{what} must be a map with str keys")
    problem = metadata_bounds_problem(out)
    if problem is not None:
        raise SerializationError(f"{what} is out of bounds: {problem}")
    return out


# -- encoding --------------------------------------------------------------------------

def _delta_parts(d: Delta) -> tuple[list[Any], int]:
    """A delta's body (``kind | lsn | timestamp | id | page | base epoch | epoch | page
    size | source``, then its payload) as buffers to write one after another, and their
    length in bytes.

    Raises:
        SerializationError: a source name over 65535 bytes.
    """
    src = d.source.encode("utf-8")
    if len(src) > 0xFFFF:
        raise SerializationError("delta source name longer than 65535 bytes")
    head = _DELTA_FIXED.pack(KIND_DELTA, d.lsn, d.timestamp, d.id, d.page_id, d.base_epoch,
                             d.epoch, d.page_size, len(src))
    fixed = _DELTA_FIXED.size + len(src)
    if d._idx is not None:
        idx = d._idx
        n = len(idx)
        vals = np.ascontiguousarray(d._vals).data
        if n and int(idx[-1]) - int(idx[0]) + 1 == n:
            # One contiguous run, the common shape of a small write.
            return ([head, src, _ONE_RUN.pack(ENC_SPARSE_RUNS, 1, int(idx[0]), n), vals],
                    fixed + _ONE_RUN.size + n)
        starts, lengths = runs_of(idx)
        k = len(starts)
        return ([head, src, _RUNS_HEAD.pack(ENC_SPARSE_RUNS, k), starts.data, lengths.data,
                 vals], fixed + _RUNS_HEAD.size + 8 * k + n)
    assert d._data is not None
    data = np.ascontiguousarray(d._data).data
    if d._mask is None:
        return [head, src, bytes([ENC_DENSE_FULL]), data], fixed + 1 + data.nbytes
    enc = ENC_DENSE_EXACT if d._exact else ENC_DENSE_MASKED
    bits = np.packbits(d._mask).data
    return [head, src, bytes([enc]), bits, data], fixed + 1 + bits.nbytes + data.nbytes


def record_parts(rec: AnyRecord) -> list[Any]:
    """The body of one record as buffers to write one after another (no joined copy of
    large payloads), from its kind's encoder.

    Raises:
        SerializationError: ``rec`` is of no record kind.
    """
    kind = KINDS.get(type(rec))
    if kind is None or kind.encode is None:
        raise SerializationError(f"cannot encode a {type(rec).__name__}: it is not a record kind")
    return kind.encode(rec)


def body_parts(rec: AnyRecord) -> tuple[list[Any], int]:
    """``(parts, n)``: the buffers of :func:`record_parts` and their ``n`` bytes in all
    (a delta's length is known without measuring its buffers).

    Raises:
        SerializationError: as :func:`record_parts`.
    """
    if type(rec) is Delta:
        return _delta_parts(rec)
    parts = record_parts(rec)
    return parts, sum(p.nbytes if type(p) is memoryview else len(p) for p in parts)


def encode_record(rec: AnyRecord) -> bytes:
    """The body of one record: ``kind u8 | lsn u64 | timestamp i64 | payload``."""
    parts = record_parts(rec)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _head(rec: AnyRecord, code: int) -> bytes:
    return _HEAD.pack(code, rec.lsn, rec.timestamp)


def _encode_delta(rec: Delta) -> list[Any]:
    return _delta_parts(rec)[0]


def _encode_create(rec: PageCreate) -> list[Any]:
    meta = encode_metadata(rec.metadata)
    return [_head(rec, KIND_CREATE) + _CREATE.pack(rec.first_id, rec.count, rec.size, rec.location)
            + _U32.pack(len(meta)) + meta]


def _encode_metadata_set(rec: MetadataSet) -> list[Any]:
    meta = encode_metadata(rec.metadata)
    src = rec.source.encode("utf-8")
    return [_head(rec, KIND_METADATA) + _Q.pack(rec.page_id) + _U16.pack(len(src)) + src
            + _U32.pack(len(meta)) + meta]


def _fixed(code: int, st: struct.Struct, *fields: str) -> Any:
    """The encoder of a kind whose payload is the fixed struct ``st`` of ``fields``."""
    def encode(rec: AnyRecord) -> list[Any]:
        return [_head(rec, code) + st.pack(*(getattr(rec, f) for f in fields))]
    return encode


# -- decoding --------------------------------------------------------------------------

class _Reader:
    """Bounds-checked reads from a buffer; every failure is a SerializationError."""

    __slots__ = ("buf", "pos", "end", "what")

    def __init__(self, buf: bytes | memoryview, what: str) -> None:
        self.buf = memoryview(buf)
        self.pos = 0
        self.end = len(self.buf)
        self.what = what

    def fail(self, reason: str) -> SerializationError:
        return SerializationError(f"{self.what}: {reason}", offset=self.pos)

    def need(self, n: int) -> None:
        if n < 0 or self.end - self.pos < n:
            raise self.fail(f"needs {n} more bytes but only {self.end - self.pos} remain (truncated)")

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        self.need(st.size)
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def take(self, n: int) -> memoryview:
        self.need(n)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self) -> str:
        (n,) = self.unpack(_U16)
        raw = self.take(n)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a name is not valid UTF-8") from None

    def done(self) -> None:
        if self.pos != self.end:
            raise self.fail(f"{self.end - self.pos} unexpected bytes after the record")


def _check_page_size(r: _Reader, size: int) -> None:
    if not 0 < size <= MAX_PAGE_SIZE:
        raise r.fail(f"page size {size} is out of range")


def _decode_delta(r: _Reader, lsn: int, ts: int) -> Delta:
    did, pid, base, epoch, size = r.unpack(_DELTA)
    _check_page_size(r, size)
    if epoch <= base:
        raise r.fail(f"delta epoch {epoch} is not after its base epoch {base}")
    if epoch >= MAX_COUNTER or lsn >= MAX_COUNTER or did >= MAX_COUNTER:
        raise r.fail(f"delta id {did}, epoch {epoch} or LSN {lsn} is out of range (below "
                     f"{MAX_COUNTER})")
    source = r.text()
    (enc,) = r.unpack(struct.Struct("<B"))
    idx = vals = data = mask = None
    if enc == ENC_SPARSE_RUNS:
        (nruns,) = r.unpack(_U32)
        r.need(nruns * 8)
        starts = np.frombuffer(r.take(nruns * 4), dtype="<u4").astype(np.int64)
        lengths = np.frombuffer(r.take(nruns * 4), dtype="<u4").astype(np.int64)
        if nruns:
            ends = starts + lengths
            if (lengths == 0).any() or (ends[:-1] > starts[1:]).any() or ends[-1] > size:
                raise r.fail("sparse runs are empty, overlapping, unsorted or past the page end")
        total = int(lengths.sum())
        vals = np.frombuffer(r.take(total), dtype=np.uint8).copy()
        if total:
            offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
            idx = np.arange(total, dtype=np.intp) + offsets
        else:
            idx = np.empty(0, np.intp)
    elif enc == ENC_DENSE_FULL:
        data = np.frombuffer(r.take(size), dtype=np.uint8).copy()
    elif enc in (ENC_DENSE_MASKED, ENC_DENSE_EXACT):
        packed = np.frombuffer(r.take((size + 7) // 8), dtype=np.uint8)
        mask = np.unpackbits(packed, count=size).view(bool)
        data = np.frombuffer(r.take(size), dtype=np.uint8).copy()
        if enc == ENC_DENSE_MASKED and (data[~mask] != 0).any():
            raise r.fail("a masked delta has bytes outside its mask")
    else:
        raise r.fail(f"unknown delta encoding {enc}")
    r.done()
    return Delta(did, pid, base, epoch, source, size, idx, vals, data, mask, lsn=lsn, timestamp=ts,
                 exact=enc == ENC_DENSE_EXACT)


_SOURCES: dict[bytes, str] = {}


def _fast_delta(buf: memoryview) -> Delta | None:
    """Decode a well-formed delta body with few Python steps; None on any doubt (the
    checked decoder then reports exactly what is wrong)."""
    end = len(buf)
    if end < _DELTA_FIXED.size + 1:
        return None
    kind, lsn, ts, did, pid, base, epoch, size, slen = _DELTA_FIXED.unpack_from(buf, 0)
    p = _DELTA_FIXED.size + slen
    if (kind != KIND_DELTA or not 0 < size <= MAX_PAGE_SIZE or epoch <= base or p + 1 > end
            or epoch >= MAX_COUNTER or lsn >= MAX_COUNTER or did >= MAX_COUNTER):
        return None
    raw = bytes(buf[_DELTA_FIXED.size : p])
    source = _SOURCES.get(raw)
    if source is None:
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if len(_SOURCES) < 1024:
            _SOURCES[raw] = source
    enc = buf[p]
    p += 1
    if enc == ENC_DENSE_FULL:
        if end - p != size:
            return None
        data = np.frombuffer(buf, np.uint8, size, p).copy()
        return Delta(did, pid, base, epoch, source, size, None, None, data, None, lsn, ts)
    if enc == ENC_SPARSE_RUNS:
        if end - p < 4:
            return None
        (nruns,) = _U32.unpack_from(buf, p)
        p += 4
        if end - p < nruns * 8:
            return None
        if nruns == 1:
            start, length = _TWO_U32.unpack_from(buf, p)
            p += 8
            if length == 0 or start + length > size or end - p != length:
                return None
            vals = np.frombuffer(buf, np.uint8, length, p).copy()
            idx = np.arange(start, start + length, dtype=np.intp)
            return Delta(did, pid, base, epoch, source, size, idx, vals, None, None, lsn, ts)
        starts = np.frombuffer(buf, "<u4", nruns, p).astype(np.int64)
        lengths = np.frombuffer(buf, "<u4", nruns, p + 4 * nruns).astype(np.int64)
        p += 8 * nruns
        total = int(lengths.sum())
        if end - p != total:
            return None
        if nruns:
            ends = starts + lengths
            if (lengths == 0).any() or (ends[:-1] > starts[1:]).any() or ends[-1] > size:
                return None
        vals = np.frombuffer(buf, np.uint8, total, p).copy()
        offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        idx = np.arange(total, dtype=np.intp) + offsets
        return Delta(did, pid, base, epoch, source, size, idx, vals, None, None, lsn, ts)
    if enc == ENC_DENSE_MASKED or enc == ENC_DENSE_EXACT:
        nbits = (size + 7) // 8
        if end - p != nbits + size:
            return None
        mask = np.unpackbits(np.frombuffer(buf, np.uint8, nbits, p), count=size).view(bool)
        data = np.frombuffer(buf, np.uint8, size, p + nbits).copy()
        if enc == ENC_DENSE_MASKED and (data[~mask] != 0).any():
            return None
        return Delta(did, pid, base, epoch, source, size, None, None, data, mask, lsn, ts,
                     exact=enc == ENC_DENSE_EXACT)
    return None


_CREATE_FIXED = struct.Struct("<BQqQQQBI")


def _fast_create(buf: memoryview) -> PageCreate | None:
    """Decode a well-formed page-creation body without metadata; None on any doubt."""
    if len(buf) != _CREATE_FIXED.size:
        return None
    _kind, lsn, ts, first, count, size, loc, n = _CREATE_FIXED.unpack_from(buf, 0)
    if (n or first < 1 or count < 1 or first + count - 1 > MAX_PAGE_ID
            or not 0 < size <= MAX_PAGE_SIZE or loc > 2):
        return None
    return PageCreate(first, count, size, loc, None, lsn=lsn, timestamp=ts)


def decode_record(buf: bytes | memoryview, what: str = "record") -> AnyRecord:
    """Decode one record body (the inverse of :func:`encode_record`), with the decoder
    of the kind its first byte names.

    Raises:
        SerializationError: an unknown kind or anything malformed, with the offset.
    """
    if not isinstance(buf, memoryview):
        buf = memoryview(buf)
    if not len(buf):
        raise SerializationError(f"{what}: an empty record body", offset=0)
    kind = KIND_CODES.get(buf[0])
    if kind is None or kind.decode is None:
        raise SerializationError(f"{what}: unknown record kind {buf[0]}", offset=0)
    rec: AnyRecord = kind.decode(buf, what)
    return rec


def _stamped(rec: AnyRecord, r: _Reader, lsn: int, ts: int) -> AnyRecord:
    r.done()
    rec.lsn = lsn
    rec.timestamp = ts
    return rec


def _decode_delta_body(buf: memoryview, what: str) -> Delta:
    fast = _fast_delta(buf)
    if fast is not None:
        return fast
    r = _Reader(buf, what)
    _kind, lsn, ts = r.unpack(_HEAD)
    return _decode_delta(r, lsn, ts)


def _decode_create(buf: memoryview, what: str) -> AnyRecord:
    fast = _fast_create(buf)
    if fast is not None:
        return fast
    r = _Reader(buf, what)
    _kind, lsn, ts = r.unpack(_HEAD)
    first, count, size, loc = r.unpack(_CREATE)
    _check_page_size(r, size)
    if first < 1 or count < 1 or first + count - 1 > MAX_PAGE_ID or loc > 2:
        raise r.fail("page creation with an impossible id, count or location")
    (n,) = r.unpack(_U32)
    meta = decode_metadata(r.take(n), f"{what} metadata") if n else None
    return _stamped(PageCreate(first, count, size, loc, meta or None), r, lsn, ts)


def _decode_resize(buf: memoryview, what: str) -> AnyRecord:
    r = _Reader(buf, what)
    _kind, lsn, ts = r.unpack(_HEAD)
    pid, new_size = r.unpack(_QQ)
    _check_page_size(r, new_size)
    return _stamped(PageResize(pid, new_size), r, lsn, ts)


def _decode_migrate(buf: memoryview, what: str) -> AnyRecord:
    r = _Reader(buf, what)
    _kind, lsn, ts = r.unpack(_HEAD)
    pid, loc = r.unpack(_QB)
    if loc > 2:
        raise r.fail(f"unknown location {loc}")
    return _stamped(PageMigrate(pid, loc), r, lsn, ts)


def _decode_metadata_set(buf: memoryview, what: str) -> AnyRecord:
    r = _Reader(buf, what)
    _kind, lsn, ts = r.unpack(_HEAD)
    (pid,) = r.unpack(_Q)
    source = r.text()
    (n,) = r.unpack(_U32)
    return _stamped(MetadataSet(pid, decode_metadata(r.take(n), f"{what} metadata"), source),
                    r, lsn, ts)


def _decode_edge_add(buf: memoryview, what: str) -> AnyRecord:
    r = _Reader(buf, what)
    _kind, lsn, ts = r.unpack(_HEAD)
    parent, child, et = r.unpack(_QQB)
    if et > 3:
        raise r.fail(f"unknown edge type {et}")
    return _stamped(EdgeAdd(parent, child, et), r, lsn, ts)


def _plain(cls: type, st: struct.Struct) -> Any:
    """The decoder of a kind whose payload is the fixed struct ``st`` of its fields."""
    def decode(buf: memoryview, what: str) -> AnyRecord:
        r = _Reader(buf, what)
        _kind, lsn, ts = r.unpack(_HEAD)
        rec: AnyRecord = cls(*r.unpack(st))
        return _stamped(rec, r, lsn, ts)
    return decode


bind_codec(Delta, _encode_delta, _decode_delta_body)
bind_codec(PageCreate, _encode_create, _decode_create)
bind_codec(PageDelete, _fixed(KIND_DELETE, _Q, "page_id"), _plain(PageDelete, _Q))
bind_codec(PageResize, _fixed(KIND_RESIZE, _QQ, "page_id", "new_size"), _decode_resize)
bind_codec(PageMigrate, _fixed(KIND_MIGRATE, _QB, "page_id", "location"), _decode_migrate)
bind_codec(PageClone, _fixed(KIND_CLONE, _QQ, "page_id", "source_id"), _plain(PageClone, _QQ))
bind_codec(MetadataSet, _encode_metadata_set, _decode_metadata_set)
bind_codec(EdgeAdd, _fixed(KIND_EDGE_ADD, _QQB, "parent_id", "child_id", "edge_type"),
           _decode_edge_add)
bind_codec(EdgeRemove, _fixed(KIND_EDGE_REMOVE, _QQ, "parent_id", "child_id"),
           _plain(EdgeRemove, _QQ))
bind_codec(Compacted, _fixed(KIND_COMPACTED, _Q, "next_id"), _plain(Compacted, _Q))


# -- standalone deltas -----------------------------------------------------------------

def serialize_delta(delta: Delta) -> bytes:
    """Bytes of one delta: ``"MMSD" | version u16 | crc32c u32 | record body``. A sparse
    delta's size grows with its changed bytes (stored as runs), not with the page."""
    if not isinstance(delta, Delta):
        raise SerializationError(f"serialize_delta takes a Delta, not {type(delta).__name__}")
    body = encode_record(delta)
    return _DELTA_HEAD.pack(_DELTA_MAGIC, _DELTA_VERSION, crc32c(body)) + body


def deserialize_delta(data: bytes | bytearray | memoryview) -> Delta:
    """The inverse of :func:`serialize_delta`.

    Raises:
        SerializationError: bad magic, unsupported version, checksum mismatch, truncation,
            or a body that is not one well-formed delta.
    """
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise SerializationError(
            f"deserialize_delta takes bytes, not {type(data).__name__}") from None
    if len(buf) < _DELTA_HEAD.size:
        raise SerializationError(f"delta bytes truncated: {len(buf)} bytes, the header alone is "
                                 f"{_DELTA_HEAD.size}")
    magic, version, crc = _DELTA_HEAD.unpack_from(buf, 0)
    if magic != _DELTA_MAGIC:
        raise SerializationError(f"bad magic {bytes(magic)!r}: not a serialized delta", offset=0)
    if version != _DELTA_VERSION:
        raise SerializationError(f"unsupported delta format version {version} (this build reads "
                                 f"{_DELTA_VERSION})", offset=4)
    body = buf[_DELTA_HEAD.size :]
    if crc32c(body) != crc:
        raise SerializationError("checksum mismatch: the delta bytes are damaged", offset=6)
    rec = decode_record(body, "delta")
    if not isinstance(rec, Delta):
        raise SerializationError("the bytes hold a log record that is not a delta")
    return rec
