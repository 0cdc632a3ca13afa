"""Standalone pages as bytes: one page's id, epoch, location, metadata, written-mask
and bytes, with a magic, a version and a CRC32C.

Layout (little-endian; docs/SerializationSpec.md has every field and its range)::

    header  52 B   "MMSP" | version u16 | zero u16 | crc32c u32 (of bytes 12..end)
                   | page_id u64 | size u64 | epoch u64 | location u8 | mask_form u8
                   | codec u8 | zero u8 | meta_len u32 | stored_len u64
    meta           meta_len bytes of msgpack (a map with str keys; empty: no metadata)
    payload        stored_len bytes: packed mask (mask_form 2 only) then the page
                   bytes, raw (codec 0) or as one zstd frame (codec 1)

The reader checks every length against the bytes given before allocating, bounds
what a zstd payload may inflate to, and raises only SerializationError on bad input.
Nothing is unpickled or evaluated.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import zstandard

from .._core.limits import MAX_PAGE_ID, MAX_PAGE_SIZE, metadata_bounds_problem
from ..errors import InvalidArgumentError, MetadataError, SerializationError
from ..types import PageLocation, coerce_location
from .checkpoint import (
    _ZSTD_LEVEL,
    CODEC_RAW,
    CODEC_ZSTD,
    INFLATE_FLOOR,
    INFLATE_RATIO,
    _decompress,
)
from .codec import (
    MAX_METADATA,
    crc32c,
    decode_metadata,
    encode_metadata,
)

__all__ = ["PageImage", "encode_page", "deserialize_page", "PAGE_MAGIC", "PAGE_VERSION"]

PAGE_MAGIC = b"MMSP"
PAGE_VERSION = 1
_HEAD = struct.Struct("<4sHHIQQQBBBBIQ")  # 52 bytes
_CRC_FROM = 12
MAX_EPOCH = (1 << 63) - 1

MASK_NONE = 0
"""No byte of the page was ever written (the mask is all False); nothing stored."""
MASK_ALL = 1
"""Every byte was written (the mask is all True); nothing stored."""
MASK_BITS = 2
"""The mask is stored as packed bits before the page bytes."""

_PAYS_MIN = 64
"""Payloads shorter than this are stored raw: zstd's frame overhead eats the gain."""
_PROBE = 1 << 20


class PageImage:
    """A detached, read-only copy of one page: its id, epoch, location, metadata,
    bytes and written-mask, as ``serialize_page`` stores them and ``deserialize_page``
    returns them. Nothing in it refers to a state.

    Attributes:
        id: the page id (also as ``page_id``).
        epoch: the number of deltas applied to the page.
        location: a PageLocation.
        metadata: a read-only mapping (its values are this image's own copies).
        data: the page's bytes.
        mask: one bool per byte, True where a delta has written (a read-only array).
    """

    __slots__ = ("_id", "_epoch", "_location", "_metadata", "_data", "_mask")
    _id: int
    _epoch: int
    _location: PageLocation
    _metadata: Mapping[str, Any]
    _data: bytes
    _mask: np.ndarray

    def __init__(self, id: int, epoch: int, location: Any, metadata: Mapping[str, Any] | None,
                 data: Any, mask: Any = None) -> None:
        """Build an image, checking every field against what the layout can hold.

        Args:
            id: page id, 1 ≤ id ≤ 2^31 − 1.
            epoch: 0 ≤ epoch ≤ 2^63 − 1.
            location: a PageLocation or ``"cpu"`` / ``"gpu"`` / ``"unified"``.
            metadata: a mapping with str keys and msgpack-encodable values (or None).
            data: bytes-like, 1 to 2^32 − 1 bytes (copied).
            mask: bools (or 0/1), one per byte of ``data``; None: nothing written.

        Raises:
            InvalidArgumentError: a field of the wrong type or out of range.
            UnsupportedLocationError: an unknown location.
            MetadataError: metadata that cannot be stored.

        Cost: O(size) (one copy of the bytes and of the mask).
        """
        for name, value in (("id", id), ("epoch", epoch)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise InvalidArgumentError(f"PageImage {name} must be an int, not {type(value).__name__}")
        if not 1 <= id <= MAX_PAGE_ID:
            raise InvalidArgumentError(f"PageImage id {id} is out of range 1..{MAX_PAGE_ID}")
        if not 0 <= epoch <= MAX_EPOCH:
            raise InvalidArgumentError(f"PageImage epoch {epoch} is out of range 0..{MAX_EPOCH}")
        loc = coerce_location(location)
        try:
            raw = bytes(memoryview(data).cast("B"))
        except TypeError:
            raise InvalidArgumentError(
                f"PageImage data must be bytes-like, not {type(data).__name__}") from None
        if not 0 < len(raw) <= MAX_PAGE_SIZE:
            raise InvalidArgumentError(
                f"PageImage data is {len(raw)} bytes; a page holds 1..{MAX_PAGE_SIZE} bytes")
        if mask is None:
            m = np.zeros(len(raw), dtype=bool)
        else:
            arr = np.asarray(mask)
            if arr.ndim != 1 or len(arr) != len(raw):
                raise InvalidArgumentError(
                    f"PageImage mask must hold one bool per byte ({len(raw)}), not shape {arr.shape}")
            if arr.dtype != bool and (arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all()):
                raise InvalidArgumentError("PageImage mask must hold bools (or 0/1)")
            m = arr.astype(bool, copy=True)
        meta = _checked_metadata(metadata)
        self._init(int(id), int(epoch), loc, meta, raw, m)

    def _init(self, pid: int, epoch: int, loc: PageLocation, meta: dict[str, Any], data: bytes,
              mask: np.ndarray) -> None:
        mask.flags.writeable = False
        object.__setattr__(self, "_id", pid)
        object.__setattr__(self, "_epoch", epoch)
        object.__setattr__(self, "_location", loc)
        object.__setattr__(self, "_metadata", MappingProxyType(meta))
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_mask", mask)

    @classmethod
    def _trusted(cls, pid: int, epoch: int, loc: PageLocation, meta: dict[str, Any],
                 data: bytes, mask: np.ndarray) -> PageImage:
        """An image from fields already checked (and owned by the caller): no copies."""
        img = object.__new__(cls)
        img._init(pid, epoch, loc, meta, data, mask)
        return img

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a PageImage is read-only (cannot set {name!r})")

    @property
    def id(self) -> int:
        return self._id

    @property
    def page_id(self) -> int:
        """The page id (the name PageSnapshot uses)."""
        return self._id

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def location(self) -> PageLocation:
        return self._location

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self._metadata

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def mask(self) -> np.ndarray:
        return self._mask

    @property
    def size(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageImage):
            return NotImplemented
        return (self._id == other._id and self._epoch == other._epoch
                and self._location == other._location and self._data == other._data
                and dict(self._metadata) == dict(other._metadata)
                and bool(np.array_equal(self._mask, other._mask)))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"PageImage(id={self._id}, size={len(self._data)}, epoch={self._epoch}, "
                f"location={self._location})")


def _checked_metadata(metadata: Any) -> dict[str, Any]:
    """Metadata in its stored form (as it reads back), or a MetadataError."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise MetadataError(f"metadata must be a mapping (dict), not {type(metadata).__name__}")
    if not all(isinstance(k, str) for k in metadata):
        raise MetadataError("metadata keys must be str")
    problem = metadata_bounds_problem(dict(metadata))
    if problem is not None:
        raise MetadataError(f"metadata is beyond what every reader accepts: {problem}")
    try:
        packed = encode_metadata(dict(metadata))
    except (TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(
            f"metadata holds a value msgpack cannot encode ({exc}); use None, bool, int, "
            "float, str, bytes, and lists or dicts of those") from None
    if len(packed) > MAX_METADATA:
        raise MetadataError(f"metadata encodes to {len(packed)} bytes; at most {MAX_METADATA} "
                            "fit in a stored page")
    return decode_metadata(packed)


def _mask_form(mask: np.ndarray) -> int:
    if not mask.any():
        return MASK_NONE
    if mask.all():
        return MASK_ALL
    return MASK_BITS


def encode_page(image: PageImage) -> bytes:
    """The bytes of one page image (the layout in the module docstring). The payload is
    zstd-compressed when that saves at least a fifth of it (judged on a sample of its
    first MiB first) and stays within the readers' inflation cap; raw otherwise.

    Cost: O(size) (a zstd pass at level 1 when the sample compresses).
    """
    mask = image.mask
    form = _mask_form(mask)
    parts: list[Any] = []
    if form == MASK_BITS:
        parts.append(np.packbits(mask).tobytes())
    parts.append(image.data)
    raw = b"".join(parts) if len(parts) > 1 else image.data
    codec, stored = CODEC_RAW, raw
    if len(raw) >= _PAYS_MIN:
        cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        probe = raw[:_PROBE]
        if len(cctx.compress(probe)) < 0.8 * len(probe):
            z = cctx.compress(raw)
            if len(z) < 0.8 * len(raw) and len(raw) <= max(INFLATE_FLOOR, INFLATE_RATIO * len(z)):
                codec, stored = CODEC_ZSTD, z
    meta = encode_metadata(dict(image.metadata))
    head = _HEAD.pack(PAGE_MAGIC, PAGE_VERSION, 0, 0, image.id, image.size, image.epoch,
                      int(image.location), form, codec, 0, len(meta), len(stored))
    crc = crc32c(stored, crc32c(meta, crc32c(memoryview(head)[_CRC_FROM:])))
    return b"".join((head[:8], struct.pack("<I", crc), head[_CRC_FROM:], meta, stored))


def deserialize_page(data: bytes | bytearray | memoryview) -> PageImage:
    """The page image stored by ``serialize_page``: a detached, read-only PageImage.

    Args:
        data: the bytes (bytes, bytearray or memoryview).

    Raises:
        InvalidArgumentError: ``data`` is not bytes-like.
        SerializationError: bad magic, unsupported version, truncation or trailing
            bytes, checksum mismatch, a field out of its range, metadata that is not a
            msgpack map with str keys, or a payload that does not inflate to exactly its
            implied length; the message names the field and its offset.

    Cost: O(len(data) + size). Allocates at most about the page size implied by the
        input: a raw payload must be present in full, and a compressed one may inflate
        to at most max(16 MiB, 4096 × its stored length), checked before inflating.
    """
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise InvalidArgumentError(
            f"deserialize_page takes bytes, not {type(data).__name__}") from None

    def fail(reason: str, offset: int) -> SerializationError:
        return SerializationError(f"page bytes: {reason}", offset=offset)

    total = len(buf)
    if total < _HEAD.size:
        raise fail(f"{total} bytes is shorter than the {_HEAD.size}-byte header (truncated)", 0)
    (magic, version, zero16, crc, pid, size, epoch, loc, form, codec, zero8, meta_len,
     stored_len) = _HEAD.unpack_from(buf, 0)
    if magic != PAGE_MAGIC:
        raise fail(f"bad magic {bytes(magic)!r}: not a serialized page", 0)
    if version != PAGE_VERSION:
        raise fail(f"unsupported page format version {version} (this build reads {PAGE_VERSION})", 4)
    declared = _HEAD.size + meta_len + stored_len
    if declared != total:
        what = "truncated" if declared > total else "trailing bytes after the payload"
        raise fail(f"the header declares {declared} bytes but {total} were given ({what})", 40)
    if crc32c(buf[_CRC_FROM:]) != crc:
        raise fail("checksum mismatch: the bytes are damaged", 8)
    if zero16 or zero8:
        raise fail("reserved fields are not zero", 6 if zero16 else 39)
    if not 1 <= pid <= MAX_PAGE_ID:
        raise fail(f"page id {pid} is out of range 1..{MAX_PAGE_ID}", 12)
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise fail(f"page size {size} is out of range 1..{MAX_PAGE_SIZE}", 20)
    if epoch > MAX_EPOCH:
        raise fail(f"epoch {epoch} is out of range 0..{MAX_EPOCH}", 28)
    if loc > 2:
        raise fail(f"unknown location {loc} (0 cpu, 1 gpu, 2 unified)", 36)
    if form > MASK_BITS:
        raise fail(f"unknown mask form {form} (0 none, 1 all, 2 packed bits)", 37)
    if codec not in (CODEC_RAW, CODEC_ZSTD):
        raise fail(f"unknown payload codec {codec} (0 raw, 1 zstd)", 38)
    if meta_len > MAX_METADATA:
        raise fail(f"metadata length {meta_len} exceeds the limit of {MAX_METADATA}", 40)
    mask_len = (size + 7) // 8 if form == MASK_BITS else 0
    raw_len = mask_len + size
    meta_at = _HEAD.size
    pay_at = meta_at + meta_len
    stored = buf[pay_at:]
    if codec == CODEC_RAW:
        if stored_len != raw_len:
            raise fail(f"raw payload is {stored_len} bytes where size and mask imply {raw_len}", 44)
        raw: Any = stored
    else:
        if raw_len > max(INFLATE_FLOOR, INFLATE_RATIO * stored_len):
            raise fail(f"a {stored_len}-byte compressed payload would inflate to {raw_len} "
                       f"bytes: more than this format allows ({INFLATE_RATIO}:1 beyond "
                       f"{INFLATE_FLOOR} bytes)", 44)

        def payload_err(reason: str) -> SerializationError:
            return fail(f"the compressed payload {reason}", pay_at)

        raw = memoryview(_decompress(stored, raw_len, payload_err))
    try:
        meta = decode_metadata(buf[meta_at:pay_at], "page metadata") if meta_len else {}
    except SerializationError as exc:
        raise fail(exc.reason, meta_at) from None
    if form == MASK_BITS:
        mask = np.unpackbits(np.frombuffer(raw, np.uint8, mask_len), count=size).view(bool)
    elif form == MASK_ALL:
        mask = np.ones(size, dtype=bool)
    else:
        mask = np.zeros(size, dtype=bool)
    page = bytes(raw[mask_len:])
    return PageImage._trusted(pid, epoch, PageLocation(loc), meta, page, mask)
