"""The arena: large zero-initialised buffers carved into page slots by size class.

A slot is addressed by one integer ``addr``: the chunk index in the high bits and the
offset inside the chunk in the low ``CHUNK_SHIFT`` bits. Chunks come from ``np.zeros``,
which the C library serves from lazily-mapped anonymous memory, so untouched bytes cost
no resident memory. Slots never straddle chunks; a slot larger than a quarter chunk
gets a dedicated buffer.

*Managed* chunks hold the bytes of unified pages: they come from a source bound with
:meth:`Arena.bind_managed` (the unified device backend's managed-memory allocator, which
hands back a numpy array over memory the CPU and the GPU both address), and are carved
by a bump cursor and free lists of their own, so an ordinary slot never lands in managed
memory nor a managed slot in an ordinary chunk. They share the chunk list, and so the
addressing: every path that reads or writes a page through its address works on them
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .kernels import uniform_starts

__all__ = ["Arena", "size_class", "CHUNK_SHIFT", "CHUNK_SIZE"]

CHUNK_SHIFT = 26
CHUNK_SIZE = 1 << CHUNK_SHIFT
CHUNK_MASK = CHUNK_SIZE - 1
_OFFSET_MASK = CHUNK_MASK
_LARGE = CHUNK_SIZE // 4
_MIN_CLASS = 16


def size_class(size: int) -> int:
    """The slot size for a page of ``size`` bytes: at most 25 % larger than ``size``.

    Classes are 16 and then four evenly spaced sizes per power of two (16, 20, 24, 28,
    32, 40, 48, 56, 64, 80 …), so powers of two are exact. O(1).
    """
    if size <= _MIN_CLASS:
        return _MIN_CLASS
    top = 1 << ((size - 1).bit_length() - 1)
    step = top >> 2
    return (size + step - 1) // step * step


class Arena:
    """Buffers of page bytes, carved into slots by a size-class allocator.

    Free slots are kept in one list per size class and reused first (zeroed again), so
    a churn of creates and deletes of one size does not grow the arena.
    """

    def __init__(self) -> None:
        self._chunks: list[np.ndarray | None] = []
        self.byte_views: dict[int, memoryview] = {}
        """Memoryviews of buffers by index, made by :meth:`chunk_bytes` (dropped with
        their buffer): a page read looks its buffer up here first, without a call."""
        self._cur = -1
        self._bump = CHUNK_SIZE
        self._free: dict[int, list[int]] = {}
        self.bytes_in_use = 0
        self.bytes_free_listed = 0
        self.bytes_tail_waste = 0
        self._spare: list[np.ndarray] = []
        """Bump chunks allocated ahead by reserve(), used before any new one."""
        self._reserved: dict[int, list[np.ndarray]] = {}
        """Dedicated buffers of large slots allocated ahead by reserve(), per class."""
        self._classes: dict[int, int] = {}
        """size → size_class(size), for the sizes seen whose slots come from the bump
        chunks (a class of at most a quarter chunk; at most 256 sizes): a size not
        here is a large or a new one."""
        self._managed_source: Callable[[int], np.ndarray] | None = None
        """``source(nbytes)``: a zero-filled writable uint8 array of managed memory."""
        self._managed: set[int] = set()
        """Indices of the managed chunks."""
        self._mcur = -1
        self._mbump = CHUNK_SIZE
        self._mfree: dict[int, list[int]] = {}
        self.bytes_managed = 0
        """Bytes of the live managed slots, counted by size class (in bytes_in_use too)."""

    # -- reading ---------------------------------------------------------------------
    def view(self, addr: int, size: int) -> np.ndarray:
        """A writable uint8 view of ``size`` bytes at ``addr``. O(1)."""
        off = addr & _OFFSET_MASK
        chunk = self._chunks[addr >> CHUNK_SHIFT]
        assert chunk is not None
        return chunk[off : off + size]

    def chunk(self, index: int) -> np.ndarray | None:
        return self._chunks[index]

    def chunk_bytes(self, index: int) -> memoryview:
        """A memoryview of buffer ``index`` (which must be live), made once and kept
        while the buffer is: a slice of it copies out as ``bytes`` about twice as fast
        as a numpy slice's ``tobytes``."""
        view = self.byte_views.get(index)
        if view is None:
            chunk = self._chunks[index]
            assert chunk is not None
            view = self.byte_views[index] = chunk.data
        return view

    @property
    def bytes_reserved(self) -> int:
        """Bytes of all buffers the arena holds (virtual; untouched pages are not resident)."""
        return sum(c.nbytes for c in self._chunks if c is not None)

    # -- allocation ------------------------------------------------------------------
    def reserve(self, count: int, size: int) -> None:
        """Allocate ahead whatever the next ``count`` allocations of ``size`` bytes need
        beyond free slots and the current chunk, so that they cannot fail for memory:
        callers reserve before they log a record, and apply it after. O(new buffers).

        Raises:
            MemoryError: the memory is not there; nothing is kept.
        """
        cls = size_class(size)
        try:
            if cls > _LARGE:
                have = self._reserved.setdefault(cls, [])
                while len(have) < count - len(self._free.get(cls, ())):
                    have.append(np.zeros(cls, dtype=np.uint8))
                return
            room = len(self._free.get(cls, ()))
            if self._cur >= 0:
                room += (CHUNK_SIZE - self._bump) // cls
            per_chunk = CHUNK_SIZE // cls
            while room + len(self._spare) * per_chunk < count:
                self._spare.append(np.zeros(CHUNK_SIZE, dtype=np.uint8))
        except MemoryError:
            self._spare.clear()
            self._reserved.clear()
            raise

    def _new_chunk(self, nbytes: int) -> int:
        index = len(self._chunks)
        ahead = self._reserved.get(nbytes) if nbytes > _LARGE else None
        if ahead:
            self._chunks.append(ahead.pop())
        elif nbytes == CHUNK_SIZE and self._spare:
            self._chunks.append(self._spare.pop())
        else:
            self._chunks.append(np.zeros(nbytes, dtype=np.uint8))
        span = max(1, -(-nbytes // CHUNK_SIZE))
        self._chunks.extend([None] * (span - 1))
        return index

    def alloc(self, size: int) -> int:
        """A zero-filled slot for ``size`` bytes; returns its address. Amortised O(1)."""
        cls = size_class(size)
        free = self._free.get(cls)
        if free:
            addr = free.pop()
            self.bytes_free_listed -= cls
            self.view(addr, cls)[:] = 0
        elif cls > _LARGE:
            addr = self._new_chunk(cls) << CHUNK_SHIFT
        else:
            if self._bump + cls > CHUNK_SIZE:
                self._start_bump_chunk()
            addr = (self._cur << CHUNK_SHIFT) | self._bump
            self._bump += cls
        self.bytes_in_use += cls
        return addr

    def alloc_ready(self, size: int) -> int:
        """alloc() when it needs no new buffer: a free-listed slot (zeroed again) or room
        in the current chunk. Returns the address, or -1 when a buffer would have to be
        allocated (nothing changed). Cannot raise MemoryError. O(1), O(size) to zero a
        reused slot."""
        cls = self._classes.get(size)
        if cls is None:
            cls = size_class(size)
            if cls <= _LARGE and len(self._classes) < 256:
                self._classes[size] = cls
        free = self._free.get(cls)
        if free:
            addr = free.pop()
            self.bytes_free_listed -= cls
            self.view(addr, cls)[:] = 0
        else:
            # _bump is CHUNK_SIZE until the first chunk: no room before it.
            bump = self._bump + cls
            if bump > CHUNK_SIZE or cls > _LARGE:
                return -1
            addr = (self._cur << CHUNK_SHIFT) | self._bump
            self._bump = bump
        self.bytes_in_use += cls
        return addr

    def _start_bump_chunk(self) -> None:
        if self._cur >= 0:
            self.bytes_tail_waste += CHUNK_SIZE - self._bump
        self._cur = self._new_chunk(CHUNK_SIZE)
        self._bump = 0

    def alloc_many(self, n: int, size: int) -> np.ndarray:
        """``n`` zero-filled slots of ``size`` bytes; returns their addresses (int64).

        Reuses free slots first, then carves the rest contiguously. O(n) in numpy.
        """
        cls = size_class(size)
        parts: list[np.ndarray] = []
        free = self._free.get(cls)
        if free:
            take = min(n, len(free))
            reused = np.array(free[len(free) - take :], dtype=np.int64)[::-1]
            del free[len(free) - take :]
            self.bytes_free_listed -= take * cls
            for addr in reused.tolist():
                self.view(addr, cls)[:] = 0
            parts.append(reused)
            self.bytes_in_use += take * cls
            n -= take
        if cls > _LARGE:
            parts.append(np.array([self.alloc(size) for _ in range(n)], dtype=np.int64))
            n = 0
        while n > 0:
            if self._bump + cls > CHUNK_SIZE:
                self._start_bump_chunk()
            fit = min(n, (CHUNK_SIZE - self._bump) // cls)
            base = (self._cur << CHUNK_SHIFT) | self._bump
            parts.append(base + np.arange(fit, dtype=np.int64) * cls)
            self._bump += fit * cls
            self.bytes_in_use += fit * cls
            n -= fit
        if not parts:
            return np.empty(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def adopt(self, data: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
        """Take ``data``, pages of ``sizes`` bytes back to back (a writable uint8 buffer
        nobody else refers to), as slots of the arena without copying it; returns the
        pages' addresses (int64), or None, with nothing changed, unless every size is
        its own size class and at most a quarter chunk (so that a freed slot is reused
        at exactly its width, and none is a dedicated buffer). The buffer becomes one
        chunk per 64 MiB of page starts. O(pages) in numpy.
        """
        n = len(sizes)
        if not n or not data.flags.writeable:
            return None
        index = len(self._chunks)
        # The usual case (one size) in one compiled call: the addresses the pages get
        # when the buffer becomes the next chunk (empty: the sizes differ).
        back_to_back = uniform_starts(sizes, index << CHUNK_SHIFT)
        uniform = back_to_back.shape[0] == n
        first = int(sizes[0])
        for size in [first] if uniform else np.unique(sizes).tolist():
            if not 0 < size <= _LARGE or size_class(size) != size:
                return None
        if uniform:
            total = n * first
            if total != data.nbytes:
                return None
            if total <= CHUNK_SIZE:
                self._chunks.append(data)
                self.bytes_in_use += total
                return back_to_back
            starts = np.arange(0, total, first, dtype=np.int64)
        else:
            starts = np.zeros(n, np.int64)
            np.cumsum(sizes[:-1], out=starts[1:])
            total = int(starts[-1]) + int(sizes[-1])
            if total != data.nbytes:
                return None
        # Pages starting in one 64 MiB window of the buffer share a chunk that begins at
        # the first of them, so every offset inside a chunk stays below CHUNK_SIZE.
        if starts[-1] < CHUNK_SIZE:
            firsts = [0]
        else:
            firsts = np.flatnonzero(np.diff(starts >> CHUNK_SHIFT, prepend=-1)).tolist()
        addrs = np.empty(n, np.int64)
        for k, a in enumerate(firsts):
            b = firsts[k + 1] if k + 1 < len(firsts) else n
            lo = int(starts[a])
            hi = int(starts[b]) if b < n else total
            index = len(self._chunks)
            self._chunks.append(data[lo:hi])
            self._chunks.extend([None] * (-(-(hi - lo) // CHUNK_SIZE) - 1))
            np.add(starts[a:b], (index << CHUNK_SHIFT) - lo, out=addrs[a:b])
        self.bytes_in_use += total
        return addrs

    def free(self, addr: int, size: int) -> None:
        """Return the slot at ``addr`` (made for ``size`` bytes) to the allocator (the
        free lists of its kind, ordinary or managed). O(1)."""
        cls = size_class(size)
        self.bytes_in_use -= cls
        index = addr >> CHUNK_SHIFT
        managed = index in self._managed
        if managed:
            self.bytes_managed -= cls
        if cls > _LARGE:
            self._chunks[index] = None
            self.byte_views.pop(index, None)
            self._managed.discard(index)
            return
        (self._mfree if managed else self._free).setdefault(cls, []).append(addr)
        self.bytes_free_listed += cls

    # -- managed memory ----------------------------------------------------------------
    def bind_managed(self, source: Callable[[int], np.ndarray] | None) -> None:
        """Use ``source(nbytes)`` for the managed chunks made from now on (None: no
        managed memory; the chunks already made stay)."""
        self._managed_source = source

    @property
    def has_managed(self) -> bool:
        """True when a managed-memory source is bound."""
        return self._managed_source is not None

    def is_managed(self, addr: int) -> bool:
        """True when the slot at ``addr`` lies in a managed chunk. O(1)."""
        return (addr >> CHUNK_SHIFT) in self._managed

    def alloc_managed(self, size: int) -> int:
        """A zero-filled slot for ``size`` bytes in managed memory; returns its address.
        A freed managed slot of the class is reused first (zeroed again), then the
        current managed chunk; a new chunk (or, above a quarter chunk, a dedicated
        buffer) comes from the bound source. Amortised O(1).

        Raises:
            whatever the source raises when it has no memory (GPUMemoryError from the
            unified backend); nothing is changed then.
        """
        source = self._managed_source
        if source is None:
            raise RuntimeError("no managed-memory source is bound to this arena")
        cls = size_class(size)
        free = self._mfree.get(cls)
        if free:
            addr = free.pop()
            self.bytes_free_listed -= cls
            self.view(addr, cls)[:] = 0
        elif cls > _LARGE:
            buf = self._managed_buffer(source, cls)
            index = len(self._chunks)
            self._chunks.append(buf)
            self._chunks.extend([None] * (max(1, -(-cls // CHUNK_SIZE)) - 1))
            self._managed.add(index)
            addr = index << CHUNK_SHIFT
        else:
            if self._mbump + cls > CHUNK_SIZE:
                buf = self._managed_buffer(source, CHUNK_SIZE)
                if self._mcur >= 0:
                    self.bytes_tail_waste += CHUNK_SIZE - self._mbump
                self._mcur = len(self._chunks)
                self._chunks.append(buf)
                self._managed.add(self._mcur)
                self._mbump = 0
            addr = (self._mcur << CHUNK_SHIFT) | self._mbump
            self._mbump += cls
        self.bytes_in_use += cls
        self.bytes_managed += cls
        return addr

    @staticmethod
    def _managed_buffer(source: Callable[[int], np.ndarray], nbytes: int) -> np.ndarray:
        buf = source(nbytes)
        if (not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.shape != (nbytes,)
                or not buf.flags.writeable or not buf.flags.c_contiguous):
            raise TypeError(f"a managed-memory source must return a writable, contiguous "
                            f"uint8 array of {nbytes} bytes")
        return buf

    # -- invariants ------------------------------------------------------------------
    def _check(self, live: list[tuple[int, int]]) -> None:
        """Assert the allocator's invariants against the live ``(addr, size)`` slots.

        No two slots (live or free) overlap, every slot lies inside an existing chunk,
        and the byte counters match the slots.
        """
        spans = [(a, size_class(s)) for a, s in live]
        in_use = sum(c for _, c in spans)
        assert in_use == self.bytes_in_use, (in_use, self.bytes_in_use)
        managed = sum(c for a, c in spans if (a >> CHUNK_SHIFT) in self._managed)
        assert managed == self.bytes_managed, (managed, self.bytes_managed)
        free_total = 0
        for kind, lists in ((False, self._free), (True, self._mfree)):
            for cls, addrs in lists.items():
                assert len(set(addrs)) == len(addrs), "a free slot is listed twice"
                for a in addrs:
                    assert ((a >> CHUNK_SHIFT) in self._managed) is kind, \
                        f"free slot at {a:#x} is listed with the other kind of memory"
                    spans.append((a, cls))
                    free_total += cls
        assert self._cur not in self._managed, "the ordinary bump chunk is managed"
        assert self._mcur < 0 or self._mcur in self._managed, "the managed bump chunk is not"
        assert free_total == self.bytes_free_listed, (free_total, self.bytes_free_listed)
        spans.sort()
        prev_end = -1
        for a, c in spans:
            assert a >= prev_end, f"slot at {a:#x} overlaps the previous slot"
            chunk = self._chunks[a >> CHUNK_SHIFT]
            assert chunk is not None, f"slot at {a:#x} lies in a released chunk"
            assert (a & _OFFSET_MASK) + c <= chunk.nbytes, f"slot at {a:#x} runs past its chunk"
            prev_end = a + c
