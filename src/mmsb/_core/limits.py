"""Bounds that every layer agrees on: what the engine accepts is what the file formats
can describe and decode."""

from __future__ import annotations

__all__ = ["MAX_PAGE_SIZE", "MAX_PAGE_ID", "MAX_METADATA_BYTES", "MAX_METADATA_ITEMS",
           "MAX_METADATA_DEPTH", "metadata_bounds_problem", "MAX_COUNTER"]

MAX_PAGE_SIZE = (1 << 32) - 1
"""Largest page a record may describe (sparse positions are 32-bit)."""
MAX_PAGE_ID = (1 << 31) - 1
"""Largest page id: the page table is indexed by id, so ids stay in a range its
columns can cover."""

MAX_METADATA_BYTES = 16 << 20
"""Largest encoded (msgpack) metadata of one page; every decoder reads this much."""
MAX_METADATA_ITEMS = 1 << 20
"""Most items of one list or map inside metadata."""
MAX_METADATA_DEPTH = 64
"""Deepest nesting of lists and maps inside metadata (the top-level map is depth 1)."""


def metadata_bounds_problem(meta: object) -> str | None:
    """What puts ``meta`` (decoded metadata: dicts, lists and scalars) beyond the bounds
    every reader accepts, or None. Iterative, so any nesting is measured without
    recursion. O(items)."""
    stack: list[tuple[object, int]] = [(meta, 1)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, dict | list | tuple):
            if depth > MAX_METADATA_DEPTH:
                return f"lists and maps nested more than {MAX_METADATA_DEPTH} deep"
            if len(obj) > MAX_METADATA_ITEMS:
                return f"a list or map of {len(obj)} items (at most {MAX_METADATA_ITEMS})"
            items = obj.values() if isinstance(obj, dict) else obj
            stack.extend((v, depth + 1) for v in items if isinstance(v, dict | list | tuple))
    return None

MAX_COUNTER = 1 << 62
"""LSNs, delta ids and epochs stay below this bound: a file that claims more is refused,
and what is accepted leaves room for 2**62 more of each before any 64-bit field
overflows."""
