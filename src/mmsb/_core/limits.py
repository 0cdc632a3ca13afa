"""Bounds that every layer agrees on: what the engine accepts is what the file formats
can describe and decode."""

from __future__ import annotations

__all__ = ["MAX_PAGE_SIZE", "MAX_PAGE_ID"]

MAX_PAGE_SIZE = (1 << 32) - 1
"""Largest page a record may describe (sparse positions are 32-bit)."""
MAX_PAGE_ID = (1 << 31) - 1
"""Largest page id: the page table is indexed by id, so ids stay in a range its
columns can cover."""
