"""The page store of a durable bus's checkpoints: ``DIR/checkpoints/pages``.

A bus checkpoint written by an exclusive writer (format version 4, or 3, see
:mod:`~mmsb._storage.checkpoint`) does not hold the page bytes itself: it names, for
each live page, a slot of this file and the CRC32C of the page's bytes there (its
*page references*). A checkpoint writes only the pages changed since the previous
checkpoint, each into a slot no retained checkpoint names, fsyncs this file, and only
then writes its record; a page that did not change keeps the slot the previous
checkpoint names. A slot stays *pinned* while a retained checkpoint names it and is
reused only once none does (after the files of the checkpoints naming it are removed).

Layout (little-endian; docs/SerializationSpec.md)::

    0     magic "MMSBPGST" | version u16 | flags u16 | zero u32 | bus id u64 | uid u64
          | created ns u64 | crc32c(bytes 0..40) u32 | zero u32          (48 bytes)
    48    zero (16 bytes)
    64    slots: a page of ``n`` bytes in a slot of ``size_class(n)`` bytes

Nothing in the file says which slots are in use: every checkpoint record lists all the
slots the retained checkpoints name (its *pins*, with the newest generation naming
each), so that the writer that opens the bus knows which space is free.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from .._core.arena import size_class
from .._core.engine import physical_memory
from .._core.kernels import CRC_TABLES, crc_update
from ..errors import SerializationError
from . import fsops
from .codec import crc32c

__all__ = ["STORE_NAME", "PageRefs", "PageStore", "read_pages", "slot_lengths", "DATA_START"]

STORE_NAME = "pages"
"""The page store's name in ``DIR/checkpoints`` (no checkpoint's name looks like it)."""
STORE_MAGIC = b"MMSBPGST"
STORE_VERSION = 1
DATA_START = 64
"""Where the slots begin: after the header, 16-byte aligned as every slot is."""
_HEAD = struct.Struct("<8sHHIQQQ")  # 40 bytes, then crc u32 + zero u32
_HEAD_FULL = struct.Struct("<8sHHIQQQII")
_IOV = 512
"""Buffers per vectored write."""
_PINS_FIT = 1 << 28
"""Bytes of slot-by-slot pins (about 48 a slot, with the writer's work on them) that are
not held against the machine's memory (asked of the system only past this)."""


def slot_lengths(sizes: np.ndarray) -> np.ndarray:
    """The slot length (size class) of pages of ``sizes`` bytes. O(distinct sizes)."""
    if sizes.size == 0:
        return np.zeros(0, np.int64)
    uniq, inv = np.unique(np.maximum(sizes, 1), return_inverse=True)
    return np.array([size_class(int(x)) for x in uniq], np.int64)[inv]


@njit(cache=True, nogil=True)
def _refs_problem(offsets: np.ndarray, sizes: np.ndarray, ro: np.ndarray, rc: np.ndarray,
                  rl: np.ndarray, rg: np.ndarray, generation: int,
                  start: int) -> int:  # pragma: no cover - compiled
    """Check page references against the pins, given as runs (``ro[j]``: the first
    slot's offset, ``rc[j]`` slots of ``rl[j]`` bytes back to back, named by
    generation ``rg[j]``), in one pass. Returns 0 when sound; 1: the runs are out of
    order, overlap, lie inside the store's header, reach past 2^62, or have a count,
    length or generation below 1; 2: a page's slot is not a pinned slot of its size
    class named by ``generation`` (< 0: any), or two pages share one."""
    m = ro.shape[0]
    for j in range(m):
        if rc[j] <= 0 or rl[j] <= 0 or rg[j] < 1 or (j == 0 and ro[0] < start):
            return 1
        # (No run reaches past 2^62, so the sums below cannot overflow.)
        if ro[j] >= 1 << 62 or rl[j] >= 1 << 40 or rc[j] > ((1 << 62) - ro[j]) // rl[j]:
            return 1
        if j > 0 and ro[j] < ro[j - 1] + rc[j - 1] * rl[j - 1]:
            return 1
    n = offsets.shape[0]
    for i in range(n):
        off = offsets[i]
        lo, hi = 0, m  # the last run starting at or before ``off`` (runs ascend)
        while lo < hi:
            mid = (lo + hi) >> 1
            if ro[mid] <= off:
                lo = mid + 1
            else:
                hi = mid
        j = lo - 1
        if j < 0:
            return 2
        d = off - ro[j]
        if d % rl[j] != 0 or d // rl[j] >= rc[j]:
            return 2
        size = max(sizes[i], 1)
        if size <= 16:
            cls = 16
        else:
            top = 1
            while top * 2 < size:
                top *= 2
            step = top >> 2
            cls = (size + step - 1) // step * step
        if rl[j] != cls or (generation >= 0 and rg[j] != generation):
            return 2
    # Pinned slots never overlap, so two pages share a slot only at one offset.
    order = np.sort(offsets)
    for i in range(1, n):
        if order[i] == order[i - 1]:
            return 2
    return 0


@njit(cache=True, nogil=True)
def _gather_checked(dst: np.ndarray, src: np.ndarray, src_offs: np.ndarray, sizes: np.ndarray,
                    crcs: np.ndarray, tab: np.ndarray) -> int:  # pragma: no cover - compiled
    """Copy the pages ``src[src_offs[i]:][:sizes[i]]`` back to back into ``dst``, each
    checked against its CRC32C ``crcs[i]``. Returns the first page that does not
    match (its bytes are not trusted), else -1."""
    d = 0
    for i in range(sizes.shape[0]):
        s = src_offs[i]
        n = sizes[i]
        if (crc_update(tab, 0xFFFFFFFF, src, s, n) ^ 0xFFFFFFFF) != crcs[i]:
            return i
        dst[d:d + n] = src[s:s + n]
        d += n
    return -1


def runs_problem(offsets: np.ndarray, sizes: np.ndarray, runs: np.ndarray,
                 generation: int | None) -> int:
    """:func:`_refs_problem` (0: sound) for pins given as runs (see :class:`PageRefs`)."""
    return int(_refs_problem(offsets, sizes, runs[0], runs[1], runs[2], runs[3],
                             -1 if generation is None else generation, DATA_START))


def pin_runs(po: np.ndarray, pl: np.ndarray, pg: np.ndarray) -> np.ndarray:
    """Pins given slot by slot (ascending offsets) as runs: each longest sequence of
    slots of one length and one generation, each starting where the one before ends,
    becomes one row (first offset, count, length, generation). A checkpoint writes its
    new slots back to back, so a bus that never frees a slot pins about one run per
    retained checkpoint and size class. O(pins), vectorised."""
    m = po.size
    if m == 0:
        return np.zeros((4, 0), np.int64)
    cut = np.ones(m, bool)
    cut[1:] = (po[1:] != po[:-1] + pl[:-1]) | (pl[1:] != pl[:-1]) | (pg[1:] != pg[:-1])
    first = np.flatnonzero(cut)
    counts = np.diff(np.append(first, m))
    return np.stack((po[first], counts, pl[first], pg[first])).astype(np.int64)


def _pin_slots(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs back to slot-by-slot pins (offsets, lengths, generations). O(pins)."""
    ro, rc, rl, rg = runs
    if rc.size == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    within = np.arange(int(rc.sum()), dtype=np.int64) - np.repeat(np.cumsum(rc) - rc, rc)
    lengths = np.repeat(rl, rc)
    return np.repeat(ro, rc) + within * lengths, lengths, np.repeat(rg, rc)


class PageRefs:
    """Where a checkpoint's pages lie in the page store (its PREF section), with the
    slots every retained checkpoint names (its *pins*). The pins are kept as runs (see
    :func:`pin_runs`), as the section stores them, and slot by slot only once a writer
    asks for them (the first checkpoint after an open): an open reads and checks the
    runs alone, a few per retained checkpoint."""

    __slots__ = ("uid", "ids", "sizes", "epochs", "offsets", "crcs", "runs", "_slots")

    def __init__(self, uid: int, ids: np.ndarray, sizes: np.ndarray, epochs: np.ndarray,
                 offsets: np.ndarray, crcs: np.ndarray, runs: np.ndarray) -> None:
        self.uid = uid
        """The page store's uid (its header): a store made anew never passes for the old."""
        self.ids = ids
        """Live page ids, ascending, as the checkpoint's page table lists them (int64)."""
        self.sizes = sizes
        """Their sizes (int64)."""
        self.epochs = epochs
        """Their epochs (int64): a page whose size and epoch match and that no record
        since changed keeps its slot at the next checkpoint."""
        self.offsets = offsets
        """Slot offset of each page in the store (int64)."""
        self.crcs = crcs
        """CRC32C of each page's bytes (uint32)."""
        self.runs = runs
        """The pins as runs: int64 rows (first offset, count, slot length, generation),
        shape (4, runs), ascending and not overlapping."""
        self._slots: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_slots(cls, uid: int, ids: np.ndarray, sizes: np.ndarray, epochs: np.ndarray,
                   offsets: np.ndarray, crcs: np.ndarray, po: np.ndarray, pl: np.ndarray,
                   pg: np.ndarray) -> PageRefs:
        """References whose pins are given slot by slot (ascending offsets)."""
        refs = cls(uid, ids, sizes, epochs, offsets, crcs, pin_runs(po, pl, pg))
        refs._slots = (po, pl, pg)
        return refs

    def _pins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._slots is None:
            self._slots = _pin_slots(self.runs)
        return self._slots

    @property
    def pin_offsets(self) -> np.ndarray:
        """Every slot a retained checkpoint names, ascending (int64) …"""
        return self._pins()[0]

    @property
    def pin_lengths(self) -> np.ndarray:
        """… its length (int64) …"""
        return self._pins()[1]

    @property
    def pin_gens(self) -> np.ndarray:
        """… and the newest generation that names it (int64)."""
        return self._pins()[2]


def _fail(path: str | Path, reason: str, offset: int | None = None) -> SerializationError:
    return SerializationError(reason, path=path, offset=offset)


def _check_head(raw: bytes, path: str | Path, bus_id: int | None) -> int:
    """The uid of a store whose first 48 bytes are ``raw``.

    Raises:
        SerializationError: not a page store, damaged, of another version or bus.
    """
    if len(raw) < DATA_START:
        raise _fail(path, "the checkpoint page store is shorter than its header (truncated)", 0)
    magic, version, _flags, zero, bus, uid, _created, crc, zero2 = _HEAD_FULL.unpack_from(raw, 0)
    if magic != STORE_MAGIC:
        raise _fail(path, f"bad magic {bytes(magic)!r}: not an MMSB checkpoint page store", 0)
    if crc32c(raw[:_HEAD.size]) != crc or zero or zero2 or any(raw[_HEAD_FULL.size:DATA_START]):
        raise _fail(path, "the checkpoint page store's header is damaged", 0)
    if version != STORE_VERSION:
        raise _fail(path, f"unsupported page store version {version} (this build reads "
                    f"{STORE_VERSION})", 8)
    if bus_id is not None and bus != bus_id:
        raise _fail(path, f"the checkpoint page store belongs to bus {bus:016x}, not "
                    f"{bus_id:016x}", 16)
    return int(uid)


@njit(cache=True, nogil=True)
def _layout(offsets: np.ndarray, sizes: np.ndarray,
            run_first: np.ndarray) -> tuple[int, int, int]:  # pragma: no cover - compiled
    """Where the pages ``offsets``/``sizes`` name lie in the store: (their bytes in
    all, the end of the furthest slot, how many runs). A run is a sequence of pages
    each starting where the one before ends (as a checkpoint that wrote them all in
    one go leaves them); ``run_first`` (n + 1 entries) gets each run's first page,
    then n."""
    n = offsets.shape[0]
    total = 0
    hi = 0
    runs = 0
    for i in range(n):
        total += sizes[i]
        end = offsets[i] + sizes[i]
        if end > hi:
            hi = end
        if i == 0 or offsets[i] != offsets[i - 1] + sizes[i - 1]:
            run_first[runs] = i
            runs += 1
    run_first[runs] = n
    return total, hi, runs


@njit(cache=True, nogil=True)
def _first_unmatched(buf: np.ndarray, sizes: np.ndarray, crcs: np.ndarray,
                     tab: np.ndarray) -> int:  # pragma: no cover - compiled
    """The first of the pages lying back to back in ``buf`` whose bytes do not match
    their CRC32C ``crcs[i]``, else -1."""
    d = 0
    for i in range(sizes.shape[0]):
        n = sizes[i]
        if (crc_update(tab, 0xFFFFFFFF, buf, d, n) ^ 0xFFFFFFFF) != crcs[i]:
            return i
        d += n
    return -1


_DIRECT_RUNS = 4
"""Pages in at most this many runs are read straight into place (a read per run);
more scattered ones are gathered from one read of the span holding them."""


def read_pages(path: str | Path, refs: PageRefs, label: str) -> np.ndarray:
    """The bytes of the pages ``refs`` names, back to back in id order, each checked
    against its CRC32C. O(page bytes).

    Raises:
        SerializationError: the store is missing, not this checkpoint's (another uid),
            shorter than a slot, or a page's bytes do not match their checksum (the
            message names the checkpoint, the page and the store's offset).
    """

    try:
        fd, st = fsops.open_regular_stat(path, os.O_RDONLY)
    except OSError as exc:
        raise _fail(path, f"cannot read the checkpoint page store that {label} needs "
                    f"({exc.strerror or exc})") from None
    n = refs.ids.size
    run_first = np.empty(n + 1, np.int64)
    size, hi, runs = _layout(refs.offsets, refs.sizes, run_first)
    hi = max(hi, DATA_START)
    out = np.empty(size, np.uint8)
    mm: mmap.mmap | None = None
    span: bytes | mmap.mmap = b""
    near = True
    try:
        total = st.st_size
        direct = 0 < runs <= _DIRECT_RUNS and hi <= total
        if direct:
            # The header and each run read straight into place (the header and the
            # first run in one call when the run starts right after it).
            head = bytearray(DATA_START)
            at = 0
            first = True
            for r in range(runs):
                a, b = int(run_first[r]), int(run_first[r + 1])
                off = int(refs.offsets[a])
                length = int(refs.offsets[b - 1] + refs.sizes[b - 1]) - off
                if first and off == DATA_START:
                    got = os.preadv(fd, [head, out[at:at + length].data], 0) - DATA_START
                else:
                    if first and os.preadv(fd, [head], 0) != DATA_START:
                        head = bytearray()
                    got = os.preadv(fd, [out[at:at + length].data], off)
                first = False
                if got != length:
                    raise _fail(path, f"the checkpoint page store that {label} needs was "
                                "cut while it was read", off + max(got, 0))
                at += length
            raw_head: bytes | bytearray | mmap.mmap = head
        else:
            # The slots in use lie near the file's start (as they do once freed space
            # is reused): one read of the header and the span holding them all.
            near = hi <= DATA_START + 2 * size + (1 << 16)
            span = os.pread(fd, hi if near else DATA_START, 0)
            raw_head = span
        uid = _check_head(bytes(raw_head[:DATA_START]), path, None)
        if uid != refs.uid:
            raise _fail(path, f"the checkpoint page store is not the one {label} was written "
                        "to (it was made anew)", 24)
        if n == 0:
            return out
        if hi > total:
            ends = refs.offsets + refs.sizes
            k = int(np.argmax(ends > total))
            raise _fail(path, f"page {int(refs.ids[k])} of {label} lies past the end of the "
                        f"checkpoint page store ({total} bytes; truncated?)",
                        int(refs.offsets[k]))
        if not direct:
            if not near:
                mm = span = mmap.mmap(fd, total, prot=mmap.PROT_READ)
            elif len(span) != hi:
                raise _fail(path, f"the checkpoint page store that {label} needs was cut "
                            "while it was read", len(span))
    except OSError as exc:
        raise _fail(path, f"cannot read the checkpoint page store ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    try:
        if direct:
            bad = int(_first_unmatched(out, refs.sizes, refs.crcs, CRC_TABLES))
        else:
            src = np.frombuffer(span, np.uint8)
            bad = int(_gather_checked(out, src, refs.offsets, refs.sizes,
                                      refs.crcs.astype(np.int64), CRC_TABLES))
            del src
    finally:
        if mm is not None:
            mm.close()
    if bad >= 0:
        raise _fail(path, f"page {int(refs.ids[bad])} of {label} does not match its checksum "
                    "in the checkpoint page store (the slot is damaged)",
                    int(refs.offsets[bad]))
    return out


class PageStore:
    """The writer's side of the page store: its file, its free space and the pins of
    the retained checkpoints (see the module's docstring)."""

    def __init__(self, directory: Path, bus_id: int) -> None:
        self.path = directory / STORE_NAME
        self.bus_id = bus_id
        self.fd = -1
        self.uid = 0
        self.end = DATA_START
        """End of the file's slots (the file is at least this long)."""
        self.pins: PageRefs | None = None
        """The page references of the newest checkpoint written to this store, with the
        pins of every retained one; None: no retained checkpoint uses the store."""
        self.reusable = False
        """``pins`` are the references of the bus's newest checkpoint, so a page that
        did not change since keeps its slot (else every page is written)."""
        self.top = DATA_START
        """End of the last slot in use (see _gaps)."""
        self.held: list[tuple[np.ndarray, np.ndarray]] = []
        """Slots never reused by this writer (the next open frees them): those of
        checkpoints evicted but not known to be removed from the disk, and those a
        failed checkpoint wrote."""
        self.evicted: list[tuple[np.ndarray, np.ndarray]] = []
        """Slots only the checkpoints the last one evicts name, until their files are
        removed (see release)."""

    def open(self) -> None:
        """Open the store, creating it when missing.

        Raises:
            OSError: the file cannot be created or opened.
            SerializationError: it is not this bus's page store, or its header is
                damaged, and a retained checkpoint names its slots (a store no
                retained checkpoint names is made anew).
        """
        if self.fd >= 0:
            return
        try:
            fd = fsops.open_regular(self.path, os.O_RDWR)
        except FileNotFoundError:
            fd = self._create()
        try:
            self.uid = _check_head(os.pread(fd, DATA_START, 0), self.path, self.bus_id)
        except SerializationError:
            os.close(fd)
            if self.pins is not None:
                raise
            # No retained checkpoint names a slot of it: a damaged store is made anew.
            fsops.unlink(self.path)
            fd = self._create()
            self.uid = _check_head(os.pread(fd, DATA_START, 0), self.path, self.bus_id)
        except BaseException:
            os.close(fd)
            raise
        try:
            self.end = max(DATA_START, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _create(self) -> int:
        tmp = self.path.with_name(f".{STORE_NAME}.{secrets.token_hex(6)}.tmp")
        fd = fsops.create_exclusive(tmp, readable=True)
        try:
            head = _HEAD.pack(STORE_MAGIC, STORE_VERSION, 0, 0, self.bus_id,
                              secrets.randbits(64) or 1, max(0, time.time_ns()))
            raw = head + struct.pack("<II", crc32c(head), 0)
            fsops.pwrite_all(fd, raw + bytes(DATA_START - len(raw)), 0, tmp)
            fsops.fsync(fd, tmp)
            fsops.replace(tmp, self.path)
            fsops.fsync_dir(self.path.parent, strict=False)
        except BaseException:
            os.close(fd)
            try:
                fsops.unlink(tmp)
            except OSError:
                pass
            raise
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def adopt(self, refs: PageRefs | None, oldest_gen: int) -> None:
        """Take the page references of the newest checkpoint that uses this store (read
        at open), keeping the pins of the generations from ``oldest_gen`` on, made slot
        by slot from their runs. O(pins kept).

        Raises:
            SerializationError: the runs count more slots than memory can hold.
        """
        if refs is None:
            self.pins = None
            return
        runs = refs.runs[:, refs.runs[3] >= oldest_gen]
        # Made slot by slot next: a record whose checksums hold but whose runs count
        # more slots than this machine could hold is refused before memory is asked for.
        total = sum(runs[1].tolist())
        if 48 * total > _PINS_FIT and 48 * total > physical_memory():
            raise _fail(self.path, f"the newest checkpoint pins {total:,} page-store slots, "
                        "more than this machine's memory can hold (a damaged record?)")
        try:
            slots = _pin_slots(runs)
        except MemoryError:
            raise _fail(self.path, f"the newest checkpoint pins {total:,} page-store slots, "
                        "more than this process may hold in memory") from None
        self.pins = PageRefs.from_slots(refs.uid, refs.ids, refs.sizes, refs.epochs,
                                        refs.offsets, refs.crcs, *slots)

    # -- a checkpoint ------------------------------------------------------------------
    def _gaps(self) -> list[list[int]]:
        """Free ranges ``[start, end]`` below ``end``: what neither a pin nor a held slot
        covers, in offset order."""
        offs = [np.zeros(0, np.int64)]
        lens = [np.zeros(0, np.int64)]
        if self.pins is not None:
            offs.append(self.pins.pin_offsets)
            lens.append(self.pins.pin_lengths)
        for o, n in (*self.held, *self.evicted):
            offs.append(o)
            lens.append(n)
        o = np.concatenate(offs)
        n = np.concatenate(lens)
        if o.size == 0:
            self.top = DATA_START
            return []
        order = np.argsort(o, kind="stable")
        o, e = o[order], (o + n)[order]
        # The end of what is in use before each slot: a gap precedes a slot that
        # starts past it. O(slots log slots), vectorised.
        reach = np.maximum.accumulate(np.concatenate(([DATA_START], e)))
        at = np.flatnonzero(o > reach[:-1])
        self.top = int(reach[-1])
        return [[int(reach[i]), int(o[i])] for i in at.tolist()]

    def write(self, state: Any, gen: int, changed: np.ndarray | None, oldest_gen: int,
              fresh: bool) -> PageRefs:
        """Write the pages of ``state`` (caller holds its lock) that the previous
        checkpoint's references do not hold as they are now into free slots, fsync
        the store, and return the new checkpoint's references (with the pins of the
        generations from ``oldest_gen``, its own ``gen`` included). ``changed``: ids
        of pages the records since that checkpoint change (None: every page is
        written); ``fresh``: a chain that starts anew, so no older pin is kept. Nothing is committed: :meth:`commit`
        takes the references once the checkpoint's record is in place.
        O(pages + bytes of the pages written).

        Raises:
            OSError: a write or the fsync failed (nothing in force changed).
        """
        self.open()
        t = state.table
        ids = t.live_ids().astype(np.int64)
        sizes = t.size[ids].astype(np.int64)
        epochs = t.epoch[ids].astype(np.int64)
        n = ids.size
        offsets = np.zeros(n, np.int64)
        crcs = np.zeros(n, np.uint32)
        reuse = np.zeros(n, bool)
        prev = self.pins
        if (changed is not None and prev is not None and not fresh and prev.uid == self.uid
                and prev.ids.size and n):
            k = np.minimum(np.searchsorted(prev.ids, ids), prev.ids.size - 1)
            reuse = (prev.ids[k] == ids) & (prev.sizes[k] == sizes) & (prev.epochs[k] == epochs)
            if changed.size:
                reuse &= ~np.isin(ids, changed)
            offsets[reuse] = prev.offsets[k[reuse]]
            crcs[reuse] = prev.crcs[k[reuse]]
        new = np.flatnonzero(~reuse)
        lengths = slot_lengths(sizes)
        gaps = self._gaps()
        end = max(self.top, DATA_START)
        # Largest slots first: they fit the gaps that fit anything.
        for i in new[np.argsort(-lengths[new], kind="stable")].tolist():
            need = int(lengths[i])
            for g in gaps:
                if g[1] - g[0] >= need:
                    offsets[i] = g[0]
                    g[0] += need
                    break
            else:
                offsets[i] = end
                end += need
        if new.size:
            self._write_slots(state, ids[new], offsets[new], sizes[new], crcs, new)
            fsops.fdatasync(self.fd, self.path)
        self.end = max(self.end, end)
        if prev is not None and not fresh:
            keep = prev.pin_gens >= oldest_gen
            po, pl, pg = prev.pin_offsets[keep], prev.pin_lengths[keep], prev.pin_gens[keep]
        else:
            po = pl = pg = np.zeros(0, np.int64)
        # This checkpoint's slots are pinned by its generation (a reused slot moves up).
        mine = np.isin(po, offsets)
        po, pl, pg = po[~mine], pl[~mine], pg[~mine]
        po = np.concatenate((po, offsets))
        pl = np.concatenate((pl, lengths))
        pg = np.concatenate((pg, np.full(n, gen, np.int64)))
        order = np.argsort(po, kind="stable")
        return PageRefs.from_slots(self.uid, ids, sizes, epochs, offsets, crcs, po[order],
                                   pl[order], pg[order])

    def _write_slots(self, state: Any, ids: np.ndarray, offs: np.ndarray, sizes: np.ndarray,
                     crcs: np.ndarray, rows: np.ndarray) -> None:
        """Write the pages ``ids`` at ``offs`` (runs of pages back to back in one vectored
        write each) and note their CRC32Cs in ``crcs[rows]``."""
        order = np.argsort(offs, kind="stable")
        lengths = slot_lengths(sizes)
        parts: list[Any] = []
        start = -1
        at = -1

        def flush() -> None:
            if parts:
                pos = start
                for j in range(0, len(parts), _IOV):
                    chunk = parts[j:j + _IOV]
                    want = sum(len(p) for p in chunk)
                    fsops.step("write", self.path)
                    done = os.pwritev(self.fd, chunk, pos)
                    if done != want:
                        fsops.pwrite_all(self.fd, b"".join(bytes(p) for p in chunk)[done:],
                                         pos + done, self.path)
                    pos += want
                parts.clear()

        for j in order.tolist():
            pid, off, size, slot = int(ids[j]), int(offs[j]), int(sizes[j]), int(lengths[j])
            view = memoryview(state.page_view(pid)).cast("B")
            crcs[rows[j]] = crc32c(view)
            if off != at:
                flush()
                start = off
            parts.append(view)
            # A slot's padding is never read: a run of writes ends where one begins.
            at = off + size if slot > size else off + slot

        flush()

    def commit(self, refs: PageRefs) -> None:
        """The record of ``refs`` is in place: its references are the previous ones of
        the next checkpoint. The slots only the older checkpoints it evicts name stay
        in use until :meth:`release` says those files are gone."""
        prev = self.pins
        if prev is not None:
            gone = ~np.isin(prev.pin_offsets, refs.pin_offsets)
            if gone.any():
                self.evicted.append((prev.pin_offsets[gone], prev.pin_lengths[gone]))
        self.pins = refs
        self.reusable = True

    def release(self, removed: bool) -> None:
        """After the evicted checkpoints' files were removed (``removed``: for good, the
        folder synced), their slots are free; otherwise they stay held until the bus is
        opened again. Free space at the file's end is then cut off."""
        if not removed:
            self.held.extend(self.evicted)
        self.evicted = []
        self._shrink()

    def hold(self, refs: PageRefs) -> None:
        """A checkpoint whose record may or may not be in place failed (an error after
        its rename, say): the slots it wrote are never reused by this writer, so that
        record, if it is there, stays readable. The next open frees them."""
        mine = refs.pin_gens == int(refs.pin_gens.max(initial=0))
        if self.pins is not None:
            mine &= ~np.isin(refs.pin_offsets, self.pins.pin_offsets)
        if mine.any():
            self.held.append((refs.pin_offsets[mine], refs.pin_lengths[mine]))

    def _shrink(self) -> None:
        """Cut free space at the end of the file (best effort: it is only space)."""
        self._gaps()
        top = max(self.top, DATA_START)
        if self.fd >= 0 and top + (1 << 20) <= self.end:
            try:
                fsops.truncate(self.fd, top, self.path)
            except OSError:
                return
            self.end = top
