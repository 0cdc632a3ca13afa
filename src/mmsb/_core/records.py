"""Typed log records and the table of record kinds.

Every change of state is one record, with an LSN and a time. Deltas
(:class:`mmsb._core.delta.Delta`) are records too. Records are immutable by contract:
the live state, replayed states and checkpoints share the same objects.

**The kind table.** Each record class is one :class:`RecordKind` in :data:`KINDS`: its
code (the kind byte of the encoding), the pages it names, whether it moves page slots,
and the four operations every place that handles records goes through: ``apply`` and
``check`` (bound by the engine, :mod:`mmsb._core.engine`), ``encode`` and ``decode``
(bound by the storage layer's codec, so the core imports no storage). A record whose
class is not in the table is refused by :func:`kind_of` with InvalidArgumentError, an
unknown code by the codec with SerializationError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from .delta import Delta

__all__ = [
    "Record", "PageCreate", "PageDelete", "PageResize", "PageMigrate", "PageClone",
    "MetadataSet", "EdgeAdd", "EdgeRemove", "Compacted", "AnyRecord",
    "RecordKind", "KINDS", "KIND_CODES", "RESERVED_CODES", "define_kind", "kind_of",
    "bind_engine", "bind_codec", "missing_entries",
]


@dataclass(slots=True, eq=True)
class Record:
    """Common fields: ``lsn`` (global, strictly increasing) and ``timestamp`` (ns)."""

    lsn: int = field(default=0, kw_only=True)
    """Log sequence number; 0 until the record is logged."""
    timestamp: int = field(default=0, kw_only=True)
    """Nanoseconds since the Unix epoch when logged; never decreases along the log."""


@dataclass(slots=True, eq=True)
class PageCreate(Record):
    """``count`` pages with ids ``first_id …`` of ``size`` bytes, zero-filled, epoch 0."""

    first_id: int
    count: int
    size: int
    location: int
    metadata: dict[str, Any] | None = None
    """Metadata of every created page (``None``: empty)."""


@dataclass(slots=True, eq=True)
class PageDelete(Record):
    """Page ``page_id`` and its edges removed."""

    page_id: int


@dataclass(slots=True, eq=True)
class PageResize(Record):
    """Page resized to ``new_size``: common prefix kept, growth zero-filled, epoch kept."""

    page_id: int
    new_size: int


@dataclass(slots=True, eq=True)
class PageMigrate(Record):
    """Page moved to ``location`` (a PageLocation value); bytes and epoch kept."""

    page_id: int
    location: int


@dataclass(slots=True, eq=True)
class PageClone(Record):
    """New page ``page_id`` with the bytes, epoch, metadata, mask and location that page
    ``source_id`` has at this point of the log."""

    page_id: int
    source_id: int


@dataclass(slots=True, eq=True)
class MetadataSet(Record):
    """The metadata of ``page_id`` becomes ``metadata`` (the whole mapping)."""

    page_id: int
    metadata: dict[str, Any]
    source: str = "api"


@dataclass(slots=True, eq=True)
class EdgeAdd(Record):
    """Dependency edge ``parent_id`` → ``child_id`` of type ``edge_type`` (an EdgeType value)."""

    parent_id: int
    child_id: int
    edge_type: int


@dataclass(slots=True, eq=True)
class EdgeRemove(Record):
    """Dependency edge ``parent_id`` → ``child_id`` removed."""

    parent_id: int
    child_id: int


@dataclass(slots=True, eq=True)
class Compacted(Record):
    """Ends a compressed prefix of the log: replay to an LSN before it is not possible.
    ``next_id`` is the id the next created page gets."""

    next_id: int


AnyRecord = Record | Delta


# -- the kind table ----------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class RecordKind:
    """One record kind: what it is on disk, what it names, and how it is handled."""

    code: int
    """The kind byte of its encoding (1–255; see docs/SerializationSpec.md)."""
    cls: type
    """The record class (a record's kind is looked up by ``type(rec)``)."""
    pages: Callable[[Any], tuple[int, ...]]
    """The page ids a record of this kind names (readers check them against the page
    table; a creation names its last page)."""
    moves_bytes: bool = False
    """It creates, frees, resizes or copies page slots: deltas logged before it must be
    in the pages before it is applied."""
    reads_masks: bool = False
    """Its apply reads the written-byte masks from the log (resize, clone): the log must
    hold every record before it when it is applied."""
    apply: Callable[[Any, Any], None] | None = None
    """``apply(state, rec)``: change the store and graph; no validation, no events."""
    check: Callable[[Any, Any], str | None] | None = None
    """``check(state, rec)``: why ``rec`` cannot be the next record of ``state`` (None
    when it can): the checks the live call makes, for records read from disk."""
    reserve: Callable[[Any, Any], None] | None = None
    """``reserve(state, rec)``: take ahead the memory applying it needs (may raise
    MemoryError); None for kinds that need none."""
    encode: Callable[[Any], list[Any]] | None = None
    """``encode(rec)``: the record's body as buffers (head and payload)."""
    decode: Callable[[memoryview, str], Any] | None = None
    """``decode(body, what)``: the record from its body; raises SerializationError."""

    @property
    def name(self) -> str:
        return self.cls.__name__


KINDS: dict[type, RecordKind] = {}
"""Record class → its kind."""
KIND_CODES: dict[int, RecordKind] = {}
"""Kind byte → its kind."""
RESERVED_CODES = {0: "no record (an empty body)", 11: "a WAL record group"}
"""Kind bytes no record kind may take."""


def define_kind(cls: type, code: int, pages: Callable[[Any], tuple[int, ...]], *,
                moves_bytes: bool = False, reads_masks: bool = False) -> RecordKind:
    """Add ``cls`` to the table as kind ``code``. Its operations are bound later
    (:func:`bind_engine`, :func:`bind_codec`).

    Raises:
        InvalidArgumentError: the class or the code is taken, or the code is reserved
            or not a byte.
    """
    if not isinstance(code, int) or not 0 < code < 256 or code in RESERVED_CODES:
        why = RESERVED_CODES.get(code, "not a byte from 1 to 255") if isinstance(code, int) \
            else "not an int"
        raise InvalidArgumentError(f"record kind code {code!r} cannot be used: {why}")
    if cls in KINDS or code in KIND_CODES:
        taken = KINDS.get(cls) or KIND_CODES[code]
        raise InvalidArgumentError(
            f"record kind {cls.__name__} (code {code}) clashes with {taken.name} (code "
            f"{taken.code})")
    kind = RecordKind(code, cls, pages, moves_bytes, reads_masks)
    KINDS[cls] = kind
    KIND_CODES[code] = kind
    return kind


def kind_of(rec: object) -> RecordKind:
    """The kind of ``rec``. O(1).

    Raises:
        InvalidArgumentError: ``rec`` is of no record kind in the table.
    """
    kind = KINDS.get(type(rec))
    if kind is None:
        known = ", ".join(k.name for k in KINDS.values())
        raise InvalidArgumentError(
            f"{type(rec).__name__} is not a record kind (the log holds {known})")
    return kind


def bind_engine(cls: type, apply: Callable[[Any, Any], None],
                check: Callable[[Any, Any], str | None],
                reserve: Callable[[Any, Any], None] | None = None) -> None:
    """Give kind ``cls`` its apply, check and (optional) reserve."""
    kind = _class_kind(cls)
    kind.apply, kind.check, kind.reserve = apply, check, reserve


def bind_codec(cls: type, encode: Callable[[Any], list[Any]],
               decode: Callable[[memoryview, str], Any]) -> None:
    """Give kind ``cls`` its encoder and decoder."""
    kind = _class_kind(cls)
    kind.encode, kind.decode = encode, decode


def _class_kind(cls: type) -> RecordKind:
    kind = KINDS.get(cls)
    if kind is None:
        raise InvalidArgumentError(f"{cls.__name__} is not a record kind; define_kind() it first")
    return kind


def missing_entries() -> list[str]:
    """``"Kind.entry"`` for each of the four operations a kind still lacks (empty once
    the engine and the codec are imported)."""
    return [f"{k.name}.{entry}" for k in KINDS.values()
            for entry in ("apply", "check", "encode", "decode") if getattr(k, entry) is None]


def _one_page(rec: Any) -> tuple[int, ...]:
    return (rec.page_id,)


def _edge_pages(rec: Any) -> tuple[int, ...]:
    return (rec.parent_id, rec.child_id)


define_kind(Delta, 1, _one_page)
define_kind(PageCreate, 2, lambda r: (r.first_id + r.count - 1,), moves_bytes=True)
define_kind(PageDelete, 3, _one_page, moves_bytes=True)
define_kind(PageResize, 4, _one_page, moves_bytes=True, reads_masks=True)
define_kind(PageMigrate, 5, _one_page)
define_kind(PageClone, 6, lambda r: (r.page_id, r.source_id), moves_bytes=True,
            reads_masks=True)
define_kind(MetadataSet, 7, _one_page)
define_kind(EdgeAdd, 8, _edge_pages)
define_kind(EdgeRemove, 9, _edge_pages)
define_kind(Compacted, 10, lambda r: ())
