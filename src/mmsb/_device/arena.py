"""The slot arena of a device backend: large allocations carved into page slots.

The arena does the bookkeeping only; the backend supplies the memory. A chunk is one
allocation (a numpy buffer, a ``cudaMalloc`` block, a managed-memory block) made by the
backend's ``new_chunk`` hook. Slots are carved from the current chunk by a bump pointer,
in size classes, and freed slots go to one free list per class and are reused first, so
a churn of creates and deletes of one size does not grow the arena. A slot larger than a
quarter of a chunk gets a chunk of its own, released when the slot is freed. The arena
grows by adding chunks; it never moves a live slot.

A slot is named by one integer: the chunk index shifted left by :data:`SLOT_SHIFT`,
plus the byte offset inside the chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import GPUMemoryError, InvalidArgumentError

__all__ = ["SlotArena", "slot_class", "SLOT_SHIFT"]

SLOT_SHIFT = 40
_OFFSET_MASK = (1 << SLOT_SHIFT) - 1
_ALIGN = 16


def slot_class(size: int) -> int:
    """The slot size for a page of ``size`` bytes: a multiple of 16, at most 25 % larger.

    Sizes up to 64 round up to 16 bytes; above that there are four evenly spaced classes
    per power of two (80, 96, 112, 128, 160 …), so powers of two are exact and every
    slot offset stays 16-byte aligned. O(1).
    """
    if size <= 64:
        return max(_ALIGN, -(-size // _ALIGN) * _ALIGN)
    top = 1 << ((size - 1).bit_length() - 1)
    step = top >> 2
    return (size + step - 1) // step * step


class SlotArena:
    """Slot bookkeeping over backend-provided chunks.

    Args:
        chunk_size: bytes of one shared chunk (a multiple of 16, at least 1 KiB).
        new_chunk: ``new_chunk(nbytes)`` returns a zero-filled allocation; it may raise
            :class:`GPUMemoryError`, in which case the arena is left as it was.
        zero: ``zero(chunk, offset, nbytes)`` zero-fills part of a chunk (a reused slot).
    """

    def __init__(self, chunk_size: int, new_chunk: Callable[[int], Any],
                 zero: Callable[[Any, int, int], None]) -> None:
        if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                or chunk_size < 1024 or chunk_size % _ALIGN):
            raise InvalidArgumentError(
                f"chunk_size must be an int of at least 1024 and a multiple of 16, "
                f"not {chunk_size!r}")
        self.chunk_size = chunk_size
        self._large = chunk_size // 4
        self._new_chunk_fn = new_chunk
        self._zero = zero
        self._chunks: list[Any] = []
        self._chunk_bytes: list[int] = []
        self._cur = -1
        self._bump = chunk_size
        self._free: dict[int, list[int]] = {}
        self._live: dict[int, int] = {}
        self._gen: dict[int, int] = {}
        self._next_gen = 1
        self.bytes_in_use = 0
        self.bytes_free_listed = 0
        self.allocations = 0
        self.frees = 0

    # -- reading ---------------------------------------------------------------------
    def locate(self, slot: Any) -> tuple[Any, int, int]:
        """``(chunk, offset, size)`` of a live slot. O(1).

        Raises:
            InvalidArgumentError: ``slot`` is not a live slot of this arena.
        """
        size = self._live.get(slot) if isinstance(slot, int) and not isinstance(slot, bool) else None
        if size is None:
            raise InvalidArgumentError(
                f"slot {slot!r} is not allocated in this backend (freed, never allocated, "
                "or from another backend)")
        return self._chunks[slot >> SLOT_SHIFT], slot & _OFFSET_MASK, size

    def size_of(self, slot: Any) -> int:
        """Bytes of a live slot (the size it was allocated for). O(1)."""
        return self.locate(slot)[2]

    def generation(self, slot: int) -> int:
        """A number that changes each time the slot's address is handed out again, so a
        view taken of a slot can tell that the slot was freed under it."""
        return self._gen.get(slot, 0)

    def is_live(self, slot: Any) -> bool:
        """True when ``slot`` is allocated."""
        return isinstance(slot, int) and slot in self._live

    @property
    def live_slots(self) -> dict[int, int]:
        """A copy of the live slots: slot → size."""
        return dict(self._live)

    @property
    def bytes_reserved(self) -> int:
        """Bytes of all chunks the arena holds."""
        return sum(self._chunk_bytes[i] for i, c in enumerate(self._chunks) if c is not None)

    @property
    def chunk_count(self) -> int:
        """Number of chunks held (shared and dedicated)."""
        return sum(1 for c in self._chunks if c is not None)

    def chunks(self) -> list[tuple[int, Any]]:
        """``(index, chunk)`` of every chunk held."""
        return [(i, c) for i, c in enumerate(self._chunks) if c is not None]

    # -- allocation ------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """A zero-filled slot for ``size`` bytes; returns its address. Amortised O(1)
        bookkeeping, plus one zero-fill of the slot when it reuses a freed one.

        Raises:
            InvalidArgumentError: ``size`` is not a positive int.
            GPUMemoryError: the backend could not provide a new chunk.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"slot size must be a positive int, not {size!r}")
        cls = slot_class(size)
        free = self._free.get(cls)
        if free:
            slot = free[-1]
            self._zero(self._chunks[slot >> SLOT_SHIFT], slot & _OFFSET_MASK, cls)
            free.pop()
            self.bytes_free_listed -= cls
        elif cls > self._large:
            slot = self._add_chunk(cls) << SLOT_SHIFT
        else:
            if self._bump + cls > self.chunk_size:
                index = self._add_chunk(self.chunk_size)
                self._cur, self._bump = index, 0
            slot = (self._cur << SLOT_SHIFT) | self._bump
            self._bump += cls
        self._live[slot] = size
        self._gen[slot] = self._next_gen
        self._next_gen += 1
        self.bytes_in_use += cls
        self.allocations += 1
        return slot

    def _add_chunk(self, nbytes: int) -> int:
        chunk = self._new_chunk_fn(nbytes)
        if chunk is None:
            raise GPUMemoryError("the backend returned no memory", requested_bytes=nbytes)
        self._chunks.append(chunk)
        self._chunk_bytes.append(nbytes)
        return len(self._chunks) - 1

    def free(self, slot: Any) -> None:
        """Return a live slot to the allocator; a dedicated chunk is released. O(1).

        Raises:
            InvalidArgumentError: ``slot`` is not live (a second free is refused).
        """
        _, _, size = self.locate(slot)
        cls = slot_class(size)
        del self._live[slot]
        self._gen.pop(slot, None)
        self.bytes_in_use -= cls
        self.frees += 1
        if cls > self._large:
            index = slot >> SLOT_SHIFT
            self._chunks[index] = None
            return
        self._free.setdefault(cls, []).append(slot)
        self.bytes_free_listed += cls

    # -- invariants ------------------------------------------------------------------
    def _check(self) -> None:
        """Assert the allocator's invariants.

        No two slots (live or free) overlap, every slot lies inside a chunk it belongs
        to, offsets are 16-byte aligned, a slot is never both live and free, and the
        byte counters match the slots.
        """
        spans: list[tuple[int, int, bool]] = []
        in_use = 0
        for slot, size in self._live.items():
            cls = slot_class(size)
            spans.append((slot, cls, True))
            in_use += cls
        assert in_use == self.bytes_in_use, (in_use, self.bytes_in_use)
        free_total = 0
        for cls, slots in self._free.items():
            assert len(set(slots)) == len(slots), "a free slot is listed twice"
            for s in slots:
                assert s not in self._live, f"slot {s:#x} is both live and free"
                spans.append((s, cls, False))
                free_total += cls
        assert free_total == self.bytes_free_listed, (free_total, self.bytes_free_listed)
        spans.sort()
        prev_end = -1
        for s, cls, _ in spans:
            index, off = s >> SLOT_SHIFT, s & _OFFSET_MASK
            assert s >= prev_end, f"slot at {s:#x} overlaps the previous slot"
            assert off % _ALIGN == 0, f"slot at {s:#x} is not 16-byte aligned"
            assert self._chunks[index] is not None, f"slot at {s:#x} lies in a released chunk"
            assert off + cls <= self._chunk_bytes[index], f"slot at {s:#x} runs past its chunk"
            if cls > self._large:
                assert off == 0, f"large slot at {s:#x} does not own its chunk"
            prev_end = s + cls
        if self._cur >= 0:
            assert self._bump <= self.chunk_size
        assert self.allocations - self.frees == len(self._live)
