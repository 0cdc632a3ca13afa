"""Typed log records. Every change of state is one of these, with an LSN and a time.

Deltas (:class:`mmsb._core.delta.Delta`) are records too. Records are immutable by contract:
the live state, replayed states and checkpoints share the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .delta import Delta

__all__ = [
    "Record", "PageCreate", "PageDelete", "PageResize", "PageMigrate", "PageClone",
    "MetadataSet", "EdgeAdd", "EdgeRemove", "Compacted", "AnyRecord",
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
