"""The mapped view of a durable bus: its pages and page table in shared files, for
readers in other processes.

The writer of a bus publishes every committed call into three files under
``DIR/map/`` (mode 0600), mapped with ``MAP_SHARED``:

``HEAD``  (4096 bytes)  identity and the publication counters (layout below)
``table`` (32 B a row)  row ``i`` describes page id ``i``:
                        ``offset i64 | size i64 (-1: no live page) | epoch i64 | lsn i64``
``pages``               page bytes, each page in a slot of its size class at ``offset``
``waiters`` (64 bytes)  ``magic "MMSBWAIT" | version u16 | u16 | u32 | count u32`` at
                        offset 16: how many followers sleep on ``notify`` now. Followers
                        add themselves to it (it is the one file they write); the writer
                        makes the wake system call only when it is not zero.

HEAD::

    0   magic "MMSBMAP\\0" | version u16 | flags u16 | reserved u32
    16  bus id u64 | boot id 16 bytes | created ns u64 | crc32c(bytes 0..48) u32 | u32
    64  seq u64          odd while the writer changes the table or pages (a seqlock)
    72  lsn u64          the LSN the mapped pages show
    80  rows u64         table rows in use (the next page id)
    88  pages_bytes u64  length of the pages file readers may map
    96  table_bytes u64  length of the table file readers may map
    104 timestamp u64    time of the last publication (ns since the Unix epoch)
    112 notify u32       bumped after every publication (the word followers wait on)
    116 status u32       0 no writer, 1 a writer publishes, 2 publication failed
    120 writer pid u64
    128 start u64        bumped whenever a writer (re)starts publishing
    136 log gen u64 | log seq u64 | log end u64 | log lsn u64
                         where the log ends: the segment the last append went to, the
                         offset after it and its last LSN (shared writers catch up from it)
    168 owner u64        token of the writer that published last (its slot allocator)
    176 bump u64         end of the slots carved from the pages file so far

The log stays the truth: the mapped files are rebuilt from the recovered state whenever
a writer opens the bus, and only ever grow (a reader's mapping never loses its backing
file's bytes). A reader copies a page between two reads of ``seq`` and retries when they
differ or are odd, so it never returns a mix of two versions; the writer's stores and
the reader's loads of ``seq`` are ordered by the processor's memory model (x86-64: total
store order). File space is allocated (``posix_fallocate``) before it is mapped, so a
full disk is an error at growth, never a fault in the middle of a copy.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from numba import njit

from .._core.arena import CHUNK_MASK, CHUNK_SHIFT, size_class
from .._core.delta import Delta
from .._core.page_table import LIVE
from .._core.records import AnyRecord, PageClone, PageCreate, PageDelete, PageResize
from ..errors import DurabilityError, PageNotFoundError, SerializationError
from . import fsops, notify
from .codec import crc32c

if TYPE_CHECKING:
    from .._core.engine import MMSBState

__all__ = ["Publisher", "MappedPages", "published_log_end", "MAP_MAGIC", "MAP_VERSION", "boot_id", "ROW_DTYPE"]

log = logging.getLogger("mmsb.bus")
T = TypeVar("T")

MAP_MAGIC = b"MMSBMAP\0"
MAP_VERSION = 2
HEAD_SIZE = 4096
WAIT_MAGIC = b"MMSBWAIT"
WAIT_VERSION = 1
WAIT_SIZE = 64
_WAIT_HEAD = struct.Struct("<8sHHI")
_WAIT_COUNT_OFF = 16
_STATIC = struct.Struct("<8sHHIQ16sQ")  # 48 bytes, then crc u32
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TWO = struct.Struct("<QQ")
_ROW3 = struct.Struct("<qqq")
_ROW = struct.Struct("<qqqq")
_WHOLE = (0, 1 << 62)
"""A touched range that covers any page."""
ROW_DTYPE = np.dtype([("offset", "<i8"), ("size", "<i8"), ("epoch", "<i8"), ("lsn", "<i8")])
ROW_SIZE = ROW_DTYPE.itemsize
# Word indexes (u64) of the dynamic fields.
_SEQ, _LSN, _ROWS, _PAGES_BYTES, _TABLE_BYTES, _TS = 8, 9, 10, 11, 12, 13
_NOTIFY_OFF, _STATUS_OFF, _PID, _START = 112, 116, 15, 16
_LOG_OFF, _OWNER_OFF, _BUMP_OFF, _PROGRESS_OFF = 136, 168, 176, 184
_LOG = struct.Struct("<QQQQ")
_HEAD_FIELDS = _PROGRESS_OFF + 8
"""Bytes of the head that hold fields (the rest of its page is zeros)."""
_U64_MAX = (1 << 64) - 1
STATUS_NONE, STATUS_LIVE, STATUS_FAILED = 0, 1, 2
_MIN_PAGES = 1 << 20
_MIN_ROWS = 1024
_READ_SPINS = 1000
_STALL_LIMIT = 5.0
"""Seconds a reader waits for a publication in progress that makes no progress (its
``progress`` word unchanged) before it gives up."""
_MAX_PAUSE = 0.01
"""Longest sleep between two looks of a reader waiting for a publication (seconds)."""
_PROGRESS_PAGES = 4096
"""Pages a publication of touched pages copies between two steps of ``progress``."""


@njit(cache=True, nogil=True)
def _gather(dst: np.ndarray, dst_offs: np.ndarray, src: np.ndarray, src_offs: np.ndarray,
            sizes: np.ndarray) -> None:  # pragma: no cover - compiled
    """Copy ``sizes[i]`` bytes from ``src[src_offs[i]:]`` to ``dst[dst_offs[i]:]``."""
    for i in range(sizes.shape[0]):
        d = dst_offs[i]
        s = src_offs[i]
        for k in range(sizes[i]):
            dst[d + k] = src[s + k]


_ROW_PROBLEMS = {
    1: "the table has rows past the recovered pages",
    2: "the table's slots overlap or lie outside the pages file",
    3: "the table has pages of an LSN beyond the head's",
}


@njit(cache=True, nogil=True)
def _check_rows(tab: np.ndarray, rows: int, flags: np.ndarray, sizes: np.ndarray,
                epochs: np.ndarray, addrs: np.ndarray, lsn: int, bump: int, cand: np.ndarray,
                touch: np.ndarray) -> tuple[int, int, int, int, int, int]:  # pragma: no cover - compiled
    """Check a mapped table (rows of offset, size, epoch, lsn) against the recovered
    page table (``flags``, ``sizes``, ``epochs``, ``addrs`` of ids below ``rows``).

    Returns ``(problem, n_cand, n_touch, first_chunk, slot_bytes, top)``: problem 0 when the rows are
    sane (1: a row past ``rows`` holds a page; 2: a slot lies outside ``[0, bump)`` or
    overlaps another; 3: a row's LSN is beyond ``lsn``); ``cand[:n_cand]`` the live
    pages whose row has the state's size and epoch (their bytes are compared next),
    ``touch[:n_touch]`` the ids whose row must be written again (a live page without a
    matching row, a row of a page no longer live), ``first_chunk`` the arena chunk of
    the first candidate (-1: none), ``slot_bytes`` the bytes of the rows' slots and
    ``top`` the end of the last of them."""
    m = tab.shape[0]
    lo = np.empty(m, np.int64)
    hi = np.empty(m, np.int64)
    used = 0
    n_cand = 0
    n_touch = 0
    first = -1
    for r in range(m):
        size = tab[r, 1]
        if size >= 0:
            if r >= rows:
                return 1, 0, 0, -1, 0, 0
            if tab[r, 3] > lsn:
                return 3, 0, 0, -1, 0, 0
            c = 16
            if size > 16:
                top = 1
                v = size - 1
                while v > 1:
                    v >>= 1
                    top <<= 1
                step = top >> 2
                c = (size + step - 1) // step * step
            off = tab[r, 0]
            if off < 0 or off > bump - c:
                return 2, 0, 0, -1, 0, 0
            lo[used] = off
            hi[used] = off + c
            used += 1
        if r < rows and flags[r] & 1:
            if size == sizes[r] and tab[r, 2] == epochs[r]:
                cand[n_cand] = r
                n_cand += 1
                if first < 0:
                    first = addrs[r] >> CHUNK_SHIFT
            else:
                touch[n_touch] = r
                n_touch += 1
        elif size >= 0:
            touch[n_touch] = r
            n_touch += 1
    slot_bytes = 0
    top = 0
    for k in range(used):
        slot_bytes += hi[k] - lo[k]
        top = max(top, hi[k])
    if used > 1:
        order = np.argsort(lo[:used])
        for k in range(1, used):
            if lo[order[k]] < hi[order[k - 1]]:
                return 2, 0, 0, -1, 0, 0
    return 0, n_cand, n_touch, first, slot_bytes, top


@njit(cache=True, nogil=True, inline="always")
def _differ(pages: np.ndarray, pages64: np.ndarray, p: int, mem: np.ndarray,
            mem64: np.ndarray, q: int, n: int) -> bool:  # pragma: no cover - compiled
    """Whether ``pages[p:p + n]`` and ``mem[q:q + n]`` differ: eight bytes at a time where
    both sides are aligned (``pages64``, ``mem64``: the same bytes as u64 words), with no
    early exit."""
    k = 0
    diff = False
    if (p | q) & 7 == 0:
        pw = p >> 3
        qw = q >> 3
        wide = np.uint64(0)
        for j in range(n >> 3):
            wide |= pages64[pw + j] ^ mem64[qw + j]
        diff = wide != 0
        k = n & ~7
    for j in range(k, n):
        if pages[p + j] != mem[q + j]:
            diff = True
    return diff


@njit(cache=True, nogil=True)
def _compare_chunk(pages: np.ndarray, pages64: np.ndarray, tab: np.ndarray, cand: np.ndarray,
                   addrs: np.ndarray, sizes: np.ndarray, chunk: int, mem: np.ndarray,
                   mem64: np.ndarray, same: np.ndarray) -> int:  # pragma: no cover - compiled
    """For the candidates whose arena address lies in chunk ``chunk`` (bytes ``mem``;
    ``pages64`` and ``mem64``: the same bytes as u64 words, for the aligned pages):
    ``same[i]`` = whether the mapped bytes of page ``cand[i]`` equal the arena's.
    Returns the smallest chunk index above ``chunk`` that a candidate uses (-1: none)."""
    nxt = -1
    for i in range(cand.shape[0]):
        pid = cand[i]
        a = addrs[pid]
        c = a >> CHUNK_SHIFT
        if c != chunk:
            if c > chunk and (nxt < 0 or c < nxt):
                nxt = c
            continue
        same[i] = not _differ(pages, pages64, tab[pid, 0], mem, mem64, a & CHUNK_MASK,
                              sizes[pid])
    return nxt


@njit(cache=True, nogil=True)
def _adopt_rows(words: np.ndarray, rows: int, flags: np.ndarray, sizes: np.ndarray,
                epochs: np.ndarray, addrs: np.ndarray, lsn: int, bump: int, pages: np.ndarray,
                chunk: int, mem: np.ndarray,
                own: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, int, int, int]:  # pragma: no cover - compiled
    """:func:`_check_rows` and :func:`_compare_chunk` in one call: the rows of the
    mapped table (``words``: its int64 words, four a row) checked, and the bytes of each
    candidate whose arena address lies in chunk ``chunk`` (bytes ``mem``) compared with
    its mapped bytes as they are found (eight bytes at a time where both are aligned).
    ``flags``, ``sizes``, ``epochs`` and ``addrs`` are the recovered page table's whole
    columns (ids below ``rows`` are read).

    Returns ``(problem, touch, other, slot_bytes, top, compared)``: ``problem`` as
    :func:`_check_rows` (0: sane); ``touch`` the ids whose row must be written again or
    whose bytes differ, in ascending order of the rows, then of the pages; ``other``
    the candidates in other chunks (not compared yet); ``compared`` the candidates
    compared. When the rows are sane, ``own`` (two int64s a row: offset, size) gets
    them as the writer's record of its slots (size -1: no page), rows past the table's
    none."""
    tab = words.reshape(-1, 4)
    touch = np.empty(tab.shape[0] + rows, np.int64)
    other = np.empty(max(rows, 1), np.int64)
    problem, n_cand, n_touch, _first, slot_bytes, top = _check_rows(
        tab, rows, flags[:rows], sizes[:rows], epochs[:rows], addrs[:rows], lsn, bump,
        other, touch)
    if problem:
        return problem, touch[:0], other[:0], 0, 0, 0
    for r in range(own.shape[0] // 2):
        if r < tab.shape[0] and tab[r, 1] >= 0:
            own[2 * r] = tab[r, 0]
            own[2 * r + 1] = tab[r, 1]
        else:
            own[2 * r] = 0
            own[2 * r + 1] = -1
    pages64 = pages[: pages.shape[0] & ~7].view(np.uint64)
    mem64 = mem[: mem.shape[0] & ~7].view(np.uint64)
    n_other = 0
    compared = 0
    for i in range(n_cand):
        pid = other[i]
        a = addrs[pid]
        if a >> CHUNK_SHIFT != chunk:
            other[n_other] = pid
            n_other += 1
            continue
        compared += 1
        if _differ(pages, pages64, tab[pid, 0], mem, mem64, a & CHUNK_MASK, sizes[pid]):
            touch[n_touch] = pid
            n_touch += 1
    return 0, touch[:n_touch], other[:n_other], slot_bytes, top, compared


_NO_BYTES = np.zeros(0, np.uint8)
_NO_ROWS = np.zeros(0, ROW_DTYPE)


_BOOT: bytes | None = None


def boot_id() -> bytes:
    """16 bytes naming this boot of the operating system (Linux: the kernel's boot id);
    zeros when unknown. Mapped pages written before another boot are never trusted."""
    global _BOOT
    if _BOOT is None:
        # Read once: a process never outlives the boot it started in.
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _BOOT = uuid.UUID(f.read().strip()).bytes
        except (OSError, ValueError):
            _BOOT = bytes(16)
    return _BOOT


def published_log_end(root: Path) -> tuple[int, int, int, int] | None:
    """Where the bus in ``root`` last said its log ends (the head's log fields:
    generation, segment, offset, LSN), read without mapping anything; None when there is
    no head. A segment's size does not say it: segments are written ahead."""
    try:
        fd = fsops.open_regular(_map_dir(root) / "HEAD", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.pread(fd, _LOG.size, _LOG_OFF)
    finally:
        os.close(fd)
    return _LOG.unpack(raw) if len(raw) == _LOG.size else None


def _map_dir(root: Path) -> Path:
    return root / "map"


def _open_waiters(d: Path | str, create: bool) -> tuple[mmap.mmap, int]:
    """Map ``d/waiters`` writable; (mapping, address of its count). ``create``: the
    writer makes the file (or gives a damaged one a fresh header and a zero count).

    Raises:
        OSError: the file cannot be opened for writing.
        SerializationError: (a follower) the file is not a waiters file of this layout.
    """
    path = f"{d}/waiters"
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd, st = fsops.open_regular_stat(path, flags, create=create)
    try:
        if st.st_size < WAIT_SIZE:
            if not create:
                raise SerializationError("the waiters file is shorter than its layout", path=path)
            _grow(fd, path, WAIT_SIZE)
        mm = mmap.mmap(fd, WAIT_SIZE)
    finally:
        os.close(fd)
    magic, version, _f, _r = _WAIT_HEAD.unpack_from(mm, 0)
    if (magic, version) != (WAIT_MAGIC, WAIT_VERSION):
        if not create:
            mm.close()
            raise SerializationError("the waiters file is damaged or of another version", path=path)
        mm[0:WAIT_SIZE] = bytes(WAIT_SIZE)
        _WAIT_HEAD.pack_into(mm, 0, WAIT_MAGIC, WAIT_VERSION, 0, 0)
    return mm, _address(mm) + _WAIT_COUNT_OFF


def _address(mm: mmap.mmap) -> int:
    """The address of the first byte of the writable mapping ``mm`` (through a ctypes
    view of it let go at once, which costs less than a numpy array's interface dict)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


def _grow(fd: int, path: Path | str, size: int) -> None:
    """Extend the file to ``size`` bytes with its blocks allocated."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


class Publisher:
    """The writer's side: keeps the mapped files equal to the state after each call.

    ``note(records)`` remembers which pages the logged records touch (and which bytes);
    ``publish(state)`` copies those pages into the mapped files under the seqlock, then
    wakes followers. ``publish_all`` rewrites every page (after recovery or a restore).
    """

    def __init__(self, root: Path, bus_id: int) -> None:
        d = f"{root}/map"  # (the path of _map_dir, as a string: opened, never kept)
        fsops.bus_folder(d)
        self.root = root
        self.fds: dict[str, int] = {}
        self.opened_sizes: dict[str, int] = {}
        """The files' sizes when this writer opened them (before it grew any)."""
        try:
            for name in ("HEAD", "table", "pages"):
                fd, st = fsops.open_regular_stat(f"{d}/{name}", os.O_RDWR | os.O_CREAT,
                                                 create=True)
                self.fds[name] = fd
                self.opened_sizes[name] = st.st_size
            head_fd = self.fds["HEAD"]
            if self.opened_sizes["HEAD"] < HEAD_SIZE:
                _grow(head_fd, f"{d}/HEAD", HEAD_SIZE)
            self.head = mmap.mmap(head_fd, HEAD_SIZE)
        except BaseException:
            self.close_files()
            raise
        self.h = np.frombuffer(self.head, "<u8")
        self.head_addr = _address(self.head)
        """Address of the head's mapping (compiled publication: its seqlock word)."""
        self.notify_addr = self.head_addr + _NOTIFY_OFF
        try:
            self.waiters, self.waiters_addr = _open_waiters(d, create=True)
        except BaseException:
            # The head's mapping has views now (it is let go with this object).
            self.close_files()
            raise
        # What the last writer left, read (in one copy of the head's fields) before
        # this one takes the head over: whether its publication can be adopted (see
        # adopt).
        prev = self.head[:_HEAD_FIELDS]
        magic, version, _f, _r, prev_bus, prev_boot, _c = _STATIC.unpack_from(prev, 0)
        self.bus_id = bus_id
        self.prev_ok = (magic == MAP_MAGIC and version == MAP_VERSION
                        and _U32.unpack_from(prev, _STATIC.size)[0] == crc32c(prev[: _STATIC.size]))
        self.prev_bus = prev_bus
        self.prev_boot = prev_boot
        self.prev_seq = _U64.unpack_from(prev, _SEQ * 8)[0]
        self.prev_status = _U32.unpack_from(prev, _STATUS_OFF)[0]
        pages_bytes, table_bytes = _TWO.unpack_from(prev, _PAGES_BYTES * 8)
        started = _U64.unpack_from(prev, _START * 8)[0]
        self.static = _STATIC.pack(MAP_MAGIC, MAP_VERSION, 0, 0, bus_id, boot_id(),
                                   max(0, time.time_ns()))
        """The head's identity as this writer writes it: in its first publication."""
        # The identity, the seq and the status stay as the last writer left them until
        # this writer's first publication: readers go on reading the last publication
        # (or wait, when it was torn, for this writer instead of giving up on a dead
        # one) while the files are checked, however long that takes; a reader attaching
        # meanwhile still sees the last writer's boot id (after an OS crash, it refuses
        # the files instead of reading stores that may be lost). The first publication
        # rewrites what differs under an odd seq, and only then says "live".
        head = self.head
        self.prev_pid = _U64.unpack_from(prev, _PID * 8)[0]
        self.prev_started = started
        _U64.pack_into(head, _PID * 8, os.getpid())
        _U64.pack_into(head, _START * 8, (started + 1) & _U64_MAX)
        self.pages_cap = max(pages_bytes, self.opened_sizes["pages"])
        self.table_rows = max(table_bytes, self.opened_sizes["table"]) // ROW_SIZE
        self.pages_mm: mmap.mmap | None = None
        self.table_mm: mmap.mmap | None = None
        self.pages = _NO_BYTES  # (mapped by the adoption or the first publication)
        self.table = _NO_ROWS
        self.slots = np.zeros(0, np.int64)
        """This writer's own record of each row's slot, two int64s a row (offset, size;
        size -1: no page): what it reads to find a page's slot, never the shared table,
        which any process of the bus's owner could edit (an edited row would otherwise
        steer the writer's stores, in compiled code, outside the pages file). Rows are
        copied in only after they are checked (an adoption, another shared writer's
        publication)."""
        self.bump = 0
        self.free: dict[int, list[int]] = {}
        self.touched: dict[int, tuple[int, int]] = {}
        """page id → (lo, hi) byte range to copy (``_WHOLE``: the whole page)."""
        self.full = True
        self.failed = False
        self.token = int.from_bytes(os.urandom(8), "little") | 1
        """Names this publisher in the head's owner field: another writer of a shared
        bus that published since means the slot allocator must be rebuilt."""
        self.opening = True
        """The first publication is still to come (the head's seq and status are still
        the last writer's: what it left is judged by the adoption, not by publish)."""
        self.rebuilt_because: str | None = "the files have not been checked"
        """Why the first publication rewrites every page (None: the files the last
        writer left were adopted, see adopt)."""

    # -- the log's end (shared writers) ----------------------------------------------------
    def log_end(self) -> tuple[int, int, int, int]:
        """(generation, segment, offset, LSN) after the last append to the log."""
        return _LOG.unpack_from(self.head, _LOG_OFF)

    def note_append(self, gen: int, seq: int, end: int, lsn: int) -> None:
        _LOG.pack_into(self.head, _LOG_OFF, gen, seq, end, lsn)

    def _take_over(self, state: MMSBState) -> None:
        """Another writer published last: map the files at their current length and
        take the slot allocator's end from the head (free slots it left are not reused
        until the next full publication), and its rows as this writer's record of its
        slots once they check out against ``state`` (caught up with that writer's
        records)."""
        plen = int(self.h[_PAGES_BYTES])
        if plen > self.pages.shape[0]:
            self.pages_cap = plen
            self._remap_pages(plen)
        trows = int(self.h[_TABLE_BYTES]) // ROW_SIZE
        if trows > self.table.shape[0]:
            self.table_rows = trows
            self._remap_table(trows)
        self.bump = int(_U64.unpack_from(self.head, _BUMP_OFF)[0])
        self.free.clear()
        # Its rows, checked as an adoption checks them before this writer takes them as
        # its own: a slot outside the pages file or over another, a page past the
        # state's (a damaged or edited table) has every page written again instead.
        tab = np.frombuffer(self.table_mm, "<i8").reshape(-1, 4)  # type: ignore[arg-type]
        t = state.table
        rows = t.next_id
        problem = not 0 <= self.bump <= self.pages.shape[0] or _check_rows(
            tab, rows, t.flags[:rows], t.size[:rows], t.epoch[:rows], t.addr[:rows],
            state.log.last_lsn, self.bump, np.empty(max(rows, 1), np.int64),
            np.empty(tab.shape[0] + rows, np.int64))[0]
        if problem:
            self.full = True
        else:
            self.slots[:] = tab[:, :2].reshape(-1)

    # -- files -------------------------------------------------------------------------
    def close_files(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _remap_pages(self, need: int) -> None:
        cap = max(_MIN_PAGES, self.pages_cap)
        while cap < need:
            cap *= 2
        if cap > os.fstat(self.fds["pages"]).st_size:
            _grow(self.fds["pages"], _map_dir(self.root) / "pages", cap)
        self.pages = np.zeros(0, np.uint8)
        self.pages_mm = mmap.mmap(self.fds["pages"], cap)
        self.pages = np.frombuffer(self.pages_mm, np.uint8)
        self.pages_cap = cap
        self.h[_PAGES_BYTES] = cap
        self._progress()  # (growing a file of gigabytes may take a while)

    def _remap_table(self, rows: int) -> None:
        cap = max(_MIN_ROWS, self.table_rows)
        while cap < rows:
            cap *= 2
        nbytes = cap * ROW_SIZE
        if nbytes > os.fstat(self.fds["table"]).st_size:
            _grow(self.fds["table"], _map_dir(self.root) / "table", nbytes)
        self.table = np.zeros(0, ROW_DTYPE)
        self.table_mm = mmap.mmap(self.fds["table"], nbytes)
        self.table = np.frombuffer(self.table_mm, ROW_DTYPE)
        self.table_rows = cap
        self.h[_TABLE_BYTES] = nbytes
        self._size_slots(cap)
        self._progress()

    def _size_slots(self, rows: int) -> None:
        """Grow :attr:`slots` to ``rows`` rows (the new ones: no page)."""
        old = self.slots
        if old.size < 2 * rows:
            new = np.zeros(2 * rows, np.int64)
            new[1::2] = -1
            new[:old.size] = old
            self.slots = new

    # -- slots -------------------------------------------------------------------------
    def _alloc(self, size: int) -> int:
        cls = size_class(max(size, 1))
        free = self.free.get(cls)
        if free:
            return free.pop()
        off = self.bump
        if off + cls > self.pages.shape[0]:
            self._remap_pages(off + cls)
        self.bump = off + cls
        return off

    def _release(self, off: int, size: int) -> None:
        self.free.setdefault(size_class(max(size, 1)), []).append(off)

    # -- what the log touched ------------------------------------------------------------
    def note(self, records: list[AnyRecord]) -> None:
        """Remember the pages ``records`` change (called as they are logged)."""
        touched = self.touched
        for r in records:
            if type(r) is Delta:
                pid = r.page_id
                lo, hi = r.span
                old = touched.get(pid)
                if old is not None:
                    lo, hi = min(lo, old[0]), max(hi, old[1])
                touched[pid] = (lo, hi)
            elif isinstance(r, PageCreate):
                if r.count > 4096:
                    self.full = True
                else:
                    for pid in range(r.first_id, r.first_id + r.count):
                        touched[pid] = _WHOLE
            elif isinstance(r, PageDelete | PageResize | PageClone):
                touched[r.page_id] = _WHOLE
            elif isinstance(r, Delta):
                touched[r.page_id] = _WHOLE
            elif not hasattr(r, "page_id") and not hasattr(r, "parent_id"):
                self.full = True  # a record that rewrites the state (compaction)

    def note_pages(self, page_ids: list[int]) -> None:
        """Remember that these pages changed, anywhere in them (deltas applied in bulk,
        whose spans are not at hand)."""
        touched = self.touched
        for pid in set(page_ids):
            touched[pid] = _WHOLE

    # -- reopening -----------------------------------------------------------------------
    def adopt(self, state: MMSBState) -> bool:
        """Take over the files the last writer of this bus published, instead of
        rewriting every page, when they check out against the recovered ``state`` (its
        lock held; before the first publication). The recovered state stays the truth:
        the files are only ever compared with it, never read into it.

        They are adopted when the last writer ran on this boot of the machine (same boot
        id: its stores are in the page cache, whatever became of the process), for this
        bus (same bus id), finished its last publication (seq even, status not failed),
        showed no LSN beyond the recovered log's end, and left a table whose rows are
        sane: every slot inside the part of the pages file carved so far, no two slots
        overlapping, no row past the recovered page ids. Then each live page whose row
        (size, epoch) and bytes equal the state's is kept as it is, and only the others
        (pages changed by records the dead writer logged but did not publish, pages
        deleted since) are published. Anything else (another boot, a torn or failed
        publication, a damaged or edited file) rebuilds the files from ``state`` as every
        open did before. O(rows + page bytes) either way; the adopted case only reads
        the files. Returns whether they were adopted (``rebuilt_because`` says why not).
        """
        why = self._adoption_problem(state)
        self.rebuilt_because = why
        if why is not None:
            log.info("reopening %s: the mapped pages are rebuilt (%s)", self.root, why)
            self.full = True
            return False
        self.full = False
        return True

    def _adoption_problem(self, state: MMSBState) -> str | None:
        """Why the files the last writer left cannot be adopted; None when they can
        (and then they are mapped, the slot allocator set from them and the pages that
        differ from ``state`` noted for the first publication)."""
        if not self.prev_ok:
            return "the head is missing, damaged or of another version"
        if self.prev_bus != self.bus_id:
            return "the head names another bus"
        mine = boot_id()
        if self.prev_boot != mine or mine == bytes(16):
            return "they were written before the machine restarted (another boot id)"
        if self.prev_seq & 1:
            return "the last writer stopped in the middle of a publication"
        if self.prev_status not in (STATUS_NONE, STATUS_LIVE):
            return "the last writer's publication failed"
        head = self.head
        (lsn,) = _U64.unpack_from(head, _LSN * 8)
        if lsn > state.log.last_lsn:
            return f"they show LSN {lsn}, beyond the recovered log's end {state.log.last_lsn}"
        plen, tlen = _TWO.unpack_from(head, _PAGES_BYTES * 8)
        (bump,) = _U64.unpack_from(head, _BUMP_OFF)
        t = state.table
        rows = t.next_id
        # (The files' sizes when opened: this writer holds the bus's lock and has not
        # grown them yet.)
        sizes = self.opened_sizes
        if (tlen % ROW_SIZE or plen % 8 or tlen > sizes["table"]
                or plen > sizes["pages"] or bump > plen
                or tlen // ROW_SIZE < max(rows, 1) or plen < _MIN_PAGES or tlen < _MIN_ROWS * ROW_SIZE):
            return "the head's file lengths do not match the files"
        # Mapped at the head's lengths, which the files' sizes were just checked to
        # cover (as _remap_pages and _remap_table would map them, without their fstat).
        self.pages_cap = plen
        self.table_rows = tlen // ROW_SIZE
        self.pages_mm = mmap.mmap(self.fds["pages"], plen)
        self.pages = np.frombuffer(self.pages_mm, np.uint8)
        self.table_mm = mmap.mmap(self.fds["table"], tlen)
        self.table = np.frombuffer(self.table_mm, ROW_DTYPE)
        self.slots = np.empty(2 * self.table_rows, np.int64)  # (filled by _adopt_rows)
        words = np.frombuffer(self.table_mm, "<i8")
        # The arena's first chunk (where a restored state's pages usually all lie) is
        # compared in the same call as the rows are checked; others after it.
        try:
            mem = state.arena.chunk(0)
        except IndexError:
            mem = None  # (no chunk yet: no page either)
        chunk = -1 if mem is None else 0
        pages = self.pages
        code, touch, other, slot_bytes, top, _compared = _adopt_rows(
            words, rows, t.flags, t.size, t.epoch, t.addr, lsn, bump, pages, chunk,
            _NO_BYTES if mem is None else mem, self.slots)
        if code:
            return _ROW_PROBLEMS[code]  # (the files are rebuilt, every row made anew)
        if top - slot_bytes > max(slot_bytes, _MIN_PAGES):
            # Slots freed by earlier writers are not learnt from the files (they would be
            # lost to this one): past this much of them the pages are packed again.
            return "more of the pages file is freed slots than pages (packed again)"

        # The rows are sane: keep each live page whose row and bytes equal the state's.
        touched = self.touched
        touched.clear()
        for pid in touch.tolist():
            touched[pid] = _WHOLE
        if other.size:
            tab = words.reshape(-1, 4)
            cand = other
            same = np.ones(other.size, np.bool_)
            nxt = int(t.addr[cand].min()) >> CHUNK_SHIFT
            while nxt >= 0:
                mem = state.arena.chunk(nxt)
                assert mem is not None
                wide = mem[: mem.shape[0] & ~7].view(np.uint64)
                nxt = _compare_chunk(pages, pages.view(np.uint64), tab, cand, t.addr, t.size,
                                     nxt, mem, wide, same)
            for pid in cand[~same].tolist():
                touched[pid] = _WHOLE
        self.bump = top  # nothing live lies past the last slot in use
        self.free.clear()
        _U64.pack_into(self.head, _OWNER_OFF, self.token)
        return None

    # -- publishing --------------------------------------------------------------------
    def publish(self, state: MMSBState) -> None:
        """Make the mapped files show ``state`` (its lock held), then wake followers.
        A failure (no room to grow the files) is logged and marks the head failed, so
        readers raise instead of reading stale pages; the next call retries in full."""
        head = self.head
        (seq,) = _U64.unpack_from(head, 64)
        opening = self.opening
        self.opening = False
        if opening:
            pass  # the files were judged when this writer opened (self.full says how)
        elif seq & 1 or _U32.unpack_from(head, _STATUS_OFF)[0] == STATUS_FAILED:
            # The last publisher died in the middle (writers publish one at a time), or
            # could not finish: what it was copying may be torn, so all is written again.
            self.full = True
        elif not self.touched and not self.full:
            return
        _U64.pack_into(head, 64, seq | 1)
        if opening:
            # (Under the odd seq: a failed writer's pages, or those of another boot, are
            # not shown as live before they are written again.)
            static = self.static
            head[0 : _STATIC.size] = static
            _U32.pack_into(head, _STATIC.size, crc32c(static))
            _U32.pack_into(head, _STATUS_OFF, STATUS_LIVE)
        if _U64.unpack_from(head, _OWNER_OFF)[0] != self.token:
            if self.pages_mm is not None:
                self._take_over(state)
            _U64.pack_into(head, _OWNER_OFF, self.token)
        try:
            if self.full or self.failed:
                self._publish_all(state)
            else:
                self._publish_touched(state)
        except OSError as exc:
            self.failed = True
            self.touched.clear()
            _U32.pack_into(head, _STATUS_OFF, STATUS_FAILED)
            log.error("publishing the mapped pages of %s failed: %s; readers are told so "
                      "until a later call succeeds", self.root, exc)
        else:
            if self.failed:
                _U32.pack_into(head, _STATUS_OFF, STATUS_LIVE)
            self.failed = False
            self.full = False
            self.touched.clear()
        _TWO.pack_into(head, 72, state.log.last_lsn, state.table.next_id)
        _U64.pack_into(head, _BUMP_OFF, self.bump)
        _U64.pack_into(head, _TS * 8, max(0, state.log.last_timestamp))
        _U64.pack_into(head, 64, (seq | 1) + 1)
        notify.bump(self.notify_addr, self.waiters_addr)

    def _progress(self) -> None:
        """Step the head's ``progress`` word: a publication is copying or growing the
        files, so readers waiting on its odd ``seq`` keep waiting (a long one, such as a
        rebuild of gigabytes, is not taken for a stalled writer). A step outside a
        publication (the files grown as another shared writer's are taken over) is read
        by nobody: readers look at the word only while ``seq`` is odd."""
        h = self.h
        h[_PROGRESS_OFF // 8] = (int(h[_PROGRESS_OFF // 8]) + 1) & _U64_MAX

    def _ensure_rows(self, rows: int) -> None:
        if rows > self.table.shape[0]:
            old = self.table.shape[0]
            self._remap_table(rows)
            self.table[old:]["size"] = -1

    def _publish_all(self, state: MMSBState) -> None:
        """Every live page, packed from offset 0: slots and rows computed with numpy,
        bytes gathered per arena chunk in one compiled pass. O(pages + page bytes)."""
        t = state.table
        rows = t.next_id
        self._ensure_rows(rows)
        if self.pages_mm is None:
            self._remap_pages(0)
        self.free.clear()
        self.table["size"] = -1
        self.slots[0::2] = 0
        self.slots[1::2] = -1
        ids = t.live_ids()
        lsn = state.log.last_lsn
        if ids.size == 0:
            self.bump = 0
            return
        sizes = t.size[ids].astype(np.int64)
        uniq, inv = np.unique(np.maximum(sizes, 1), return_inverse=True)
        cls = np.array([size_class(int(x)) for x in uniq], np.int64)[inv]
        offs = np.zeros(ids.size, np.int64)
        np.cumsum(cls[:-1], out=offs[1:])
        need = int(offs[-1] + cls[-1])
        if need > self.pages.shape[0]:
            self._remap_pages(need)
        addrs = t.addr[ids].astype(np.int64)
        chunks = addrs >> CHUNK_SHIFT
        within = addrs & CHUNK_MASK
        for c in np.unique(chunks).tolist():
            sel = np.flatnonzero(chunks == c)
            src = state.arena.chunk(c)
            assert src is not None
            _gather(self.pages, offs[sel], src, within[sel], sizes[sel])
            self._progress()  # (one arena chunk, at most 64 MiB, at a time)
        tab = self.table
        tab["offset"][ids] = offs
        tab["size"][ids] = sizes
        tab["epoch"][ids] = t.epoch[ids]
        tab["lsn"][ids] = lsn
        self.slots[2 * ids] = offs
        self.slots[2 * ids + 1] = sizes
        self.bump = need

    def _publish_touched(self, state: MMSBState) -> None:
        t = state.table
        if t.next_id > self.table_rows:
            self._ensure_rows(t.next_id)
        lsn = state.log.last_lsn
        flags = t.flags
        # (Only a publication of many pages steps the progress word, every so many.)
        step = _PROGRESS_PAGES if len(self.touched) > _PROGRESS_PAGES else 0
        copied = 0
        for pid, (lo, hi) in self.touched.items():
            if step:
                copied += 1
                if copied == step:
                    copied = 0
                    self._progress()
            if pid >= t.next_id:
                continue
            if flags[pid] & LIVE:
                self._write_page(state, pid, lsn, lo, hi, fresh=False)
            else:
                own = self.slots
                off, size = int(own[2 * pid]), int(own[2 * pid + 1])
                if size >= 0:
                    self._release(off, size)
                    own[2 * pid + 1] = -1
                _ROW.pack_into(self.table_mm, pid * ROW_SIZE, off, -1, 0, lsn)  # type: ignore[arg-type]

    def _write_page(self, state: MMSBState, pid: int, lsn: int, lo: int, hi: int,
                    fresh: bool) -> None:
        t = state.table
        size = int(t.size[pid])
        own = self.slots
        if fresh:
            old_off, old_size = 0, -1
        else:
            old_off, old_size = int(own[2 * pid]), int(own[2 * pid + 1])
        if old_size == size:
            off = old_off
        else:
            if old_size >= 0 and size_class(max(old_size, 1)) == size_class(max(size, 1)):
                off = old_off
            else:
                if old_size >= 0:
                    self._release(old_off, old_size)
                off = self._alloc(size)
            lo, hi = 0, -1
        view = state.page_view(pid)
        pages = self.pages_mm
        assert pages is not None
        if hi < 0 or (lo == 0 and hi >= size):
            pages[off : off + size] = view  # type: ignore[call-overload]
        elif lo < size:
            hi = min(hi, size)
            pages[off + lo : off + hi] = view[lo:hi]  # type: ignore[call-overload]
        _ROW.pack_into(self.table_mm, pid * ROW_SIZE, off, size, int(t.epoch[pid]), lsn)  # type: ignore[arg-type]
        own[2 * pid] = off
        own[2 * pid + 1] = size

    def abandon(self) -> None:
        """The open this publisher was made for failed: before its first publication
        the head is left as the last writer left it (its pid and the count of opens
        put back), after it as a close without a state leaves it; the files are closed
        either way."""
        if not self.fds:
            return
        if not self.opening:
            self.close(None)
            return
        _U64.pack_into(self.head, _PID * 8, self.prev_pid)
        _U64.pack_into(self.head, _START * 8, self.prev_started)
        self._let_go()

    def close(self, state: MMSBState | None) -> None:
        """Last publication and ``status`` = no writer; the files stay for readers."""
        if not self.fds:
            return
        try:
            if state is not None:
                self.publish(state)
            _U32.pack_into(self.head, _STATUS_OFF, STATUS_NONE)
            self.h[_PID] = 0
            notify.bump(self.notify_addr, self.waiters_addr)
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """Drop the views of the mappings (they go with their last view) and close the
        files."""
        self.h = np.zeros(0, "<u8")
        self.pages = np.zeros(0, np.uint8)
        self.table = np.zeros(0, ROW_DTYPE)
        self.notify_addr = self.waiters_addr = self.head_addr = 0
        self.close_files()


_Maps = tuple["mmap.mmap | None", int, "mmap.mmap | None", int]
"""A reader's mappings: (pages, its length, table, its length)."""
_NO_MAPS: _Maps = (None, 0, None, 0)


def _close_all(fds: dict[str, int]) -> None:
    """Close the descriptors in ``fds`` and empty it (a reader's, at its close or when it
    is collected: whichever comes first does it)."""
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class MappedPages:
    """A reader's read-only mapping of a bus's pages (see the module's docstring)."""

    def __init__(self, root: Path, bus_id: int) -> None:
        d = _map_dir(root)
        self.root = root
        self.fds: dict[str, int] = {}
        # A reader dropped without close() closes its descriptors when it is collected
        # (its mappings go with their objects), as a file object does: a process that
        # attaches over and over never runs out of descriptors.
        self._release = weakref.finalize(self, _close_all, self.fds)
        try:
            for name in ("HEAD", "table", "pages"):
                self.fds[name] = fsops.open_regular(d / name, os.O_RDONLY)
            if os.fstat(self.fds["HEAD"]).st_size < HEAD_SIZE:
                raise SerializationError("the mapped head is shorter than its layout",
                                         path=d / "HEAD")
            self.head = mmap.mmap(self.fds["HEAD"], HEAD_SIZE, prot=mmap.PROT_READ)
        except BaseException:
            self._close_fds()
            raise
        for _ in range(50):
            # (A writer's first publication rewrites these bytes under its odd seq: a
            # read that overlaps it is taken again.)
            raw = self.head[: _STATIC.size]
            (crc,) = _U32.unpack_from(self.head, _STATIC.size)
            if crc == crc32c(raw):
                break
            time.sleep(0.001)
        magic, version, _flags, _r, head_bus, self.boot, _created = _STATIC.unpack(raw)
        if magic != MAP_MAGIC or crc != crc32c(raw):
            self.close()
            if not any(raw) and not crc:
                raise SerializationError("the bus's first writer has not published its pages "
                                         "yet; attach once its open has returned",
                                         path=d / "HEAD")
            raise SerializationError("the mapped head is damaged or not an MMSB map", path=d / "HEAD")
        if version != MAP_VERSION:
            self.close()
            raise SerializationError(f"unsupported map version {version} (this build reads "
                                     f"{MAP_VERSION})", path=d / "HEAD")
        if head_bus != bus_id:
            self.close()
            raise SerializationError(f"the mapped pages belong to bus {head_bus:016x}, not "
                                     f"{bus_id:016x}", path=d / "HEAD")
        self.h = np.frombuffer(self.head, "<u8")
        self.notify_addr = int(np.frombuffer(self.head, np.uint8).ctypes.data) + _NOTIFY_OFF
        self.waiters: mmap.mmap | None = None
        self.waiters_addr = 0
        try:
            self.waiters, self.waiters_addr = _open_waiters(d, create=False)
        except (OSError, SerializationError):
            pass  # not writable here (a read-only mount, another owner), or not there:
            # this follower sleeps in short steps instead of being counted
        self.maps: _Maps = _NO_MAPS
        """(pages mapping, its length, table mapping, its length): replaced whole, never
        edited, so that a thread reads one mapping with its own length while another
        remaps (the mappings are None while their lengths are 0)."""
        self._remapping = threading.Lock()
        try:
            self._remap()
        except BaseException:
            self.close()
            raise

    def _close_fds(self) -> None:
        self._release()

    def close(self) -> None:
        self.maps = _NO_MAPS
        self.h = np.zeros(0, "<u8")
        self._close_fds()

    def _remap(self) -> None:
        """Map ``pages`` and ``table`` again at the lengths the head gives now (a
        writer grows a file before it says so there, and never shrinks one). Threads
        sharing this reader remap one at a time, each at the head's lengths as it reads
        them then: a remap made from lengths read earlier never replaces a newer one.

        Raises:
            SerializationError: a file is shorter than the head says (cut, or the head
                edited), or cannot be mapped at that length; the mappings are as before.
        """
        with self._remapping:
            plen = int(self.h[_PAGES_BYTES])
            tlen = int(self.h[_TABLE_BYTES])
            pages_mm, old_plen, table_mm, old_tlen = self.maps
            if plen != old_plen:
                pages_mm = self._map("pages", plen)
            if tlen != old_tlen:
                table_mm = self._map("table", tlen)
            self.maps = (pages_mm, plen, table_mm, tlen)

    def _map(self, name: str, length: int) -> mmap.mmap | None:
        """File ``name`` mapped read-only at ``length`` bytes (None for 0).

        Raises:
            SerializationError: the file is shorter (Python's mmap refuses a length past
                the file's end, which reading would otherwise turn into SIGBUS), or
                cannot be mapped at that length.
        """
        if not length:
            return None
        try:
            return mmap.mmap(self.fds[name], length, prot=mmap.PROT_READ)
        except (ValueError, OverflowError, OSError) as exc:
            try:
                size = f"{os.fstat(self.fds[name]).st_size} bytes"
            except OSError:
                size = "of unknown size"
            raise SerializationError(
                f"the mapped head gives {name} {length} bytes, but the file is {size} "
                f"({exc}): the mapped files were cut or edited; a writer's next open "
                "rebuilds them, and open_readonly reads the bus from its log meanwhile",
                path=_map_dir(self.root) / name) from None

    # -- counters --------------------------------------------------------------------
    @property
    def lsn(self) -> int:
        return int(_U64.unpack_from(self.head, _LSN * 8)[0])

    @property
    def notify_value(self) -> int:
        return int(_U32.unpack_from(self.head, _NOTIFY_OFF)[0])

    @property
    def status(self) -> int:
        return int(_U32.unpack_from(self.head, _STATUS_OFF)[0])

    @property
    def writer_pid(self) -> int:
        return int(self.h[_PID])

    def wait(self, expected: int, timeout: float | None) -> None:
        notify.wait(self.notify_addr, expected, timeout, lambda: self.notify_value,
                    self.waiters_addr)

    # -- reading ---------------------------------------------------------------------
    def _stable_seq(self) -> int:
        head = self.head
        (s,) = _U64.unpack_from(head, 64)
        if not s & 1:
            return int(s)
        for _ in range(_READ_SPINS):
            (s,) = _U64.unpack_from(head, 64)
            if not s & 1:
                return int(s)
        # A live writer's publication is waited for as long as it makes progress: the
        # limit counts from the last step of its progress word.
        (progress,) = _U64.unpack_from(head, _PROGRESS_OFF)
        deadline = time.monotonic() + _STALL_LIMIT
        pause = 0.0002
        while True:
            # (The pause doubles up to 10 ms: a wait through a long publication costs
            # a hundred wakes a second, not thousands.)
            time.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE)
            (s,) = _U64.unpack_from(head, 64)
            if not s & 1:
                return int(s)
            if not fsops.process_alive(self.writer_pid):
                break
            (now_progress,) = _U64.unpack_from(head, _PROGRESS_OFF)
            now = time.monotonic()
            if now_progress != progress:
                progress = now_progress
                deadline = now + _STALL_LIMIT
            elif now >= deadline:
                break
        raise DurabilityError(f"the writer of {self.root} stopped in the middle of publishing "
                              f"its pages (it died, or made no progress for {_STALL_LIMIT:g} "
                              "s); the pages show again once a writer reopens the bus")

    def _check_status(self) -> None:
        if self.status == STATUS_FAILED:
            raise DurabilityError(f"the writer of {self.root} could not publish its pages "
                                  "(no room to grow the mapped files); read with open_readonly")

    def read(self, pid: int) -> tuple[bytes, int, int]:
        """(bytes, epoch, lsn of the publication) of page ``pid``, consistent.

        Raises:
            PageNotFoundError: no live page ``pid`` at that publication.
            DurabilityError: the writer could not publish, or stalls while publishing.
        """
        head = self.head
        while True:
            (s1,) = _U64.unpack_from(head, 64)
            if s1 & 1:
                s1 = self._stable_seq()
            plen, tlen = _TWO.unpack_from(head, _PAGES_BYTES * 8)
            pages_mm, mapped_plen, table_mm, mapped_tlen = self.maps
            if plen != mapped_plen or tlen != mapped_tlen:
                self._remap()
                continue
            data = None
            epoch = 0
            if 0 < pid and (pid + 1) * ROW_SIZE <= tlen:
                off, size, epoch = _ROW3.unpack_from(table_mm, pid * ROW_SIZE)  # type: ignore[arg-type]
                if size >= 0 and 0 <= off <= plen - size:
                    data = pages_mm[off : off + size]  # type: ignore[index]
            s2, lsn = _TWO.unpack_from(head, 64)
            if s1 != s2:
                continue
            if data is None:
                self._check_status()
                raise PageNotFoundError(pid, "read from the mapped pages")
            if _U32.unpack_from(head, _STATUS_OFF)[0] == STATUS_FAILED:
                self._check_status()
            return data, epoch, lsn

    def _consistent(self, fn: Callable[[_Maps], T]) -> tuple[T, int]:
        """``fn(maps)`` run inside one publication (retried until no publication
        overlaps it) on mappings of that publication's lengths, and its LSN."""
        head = self.head
        while True:
            s1 = self._stable_seq()
            plen, tlen = _TWO.unpack_from(head, _PAGES_BYTES * 8)
            maps = self.maps
            if plen != maps[1] or tlen != maps[3]:
                self._remap()
                continue
            out = fn(maps)
            s2, lsn = _TWO.unpack_from(head, 64)
            if s1 == s2:
                self._check_status()
                return out, int(lsn)

    def snapshot(self, pids: list[int]) -> tuple[dict[int, bytes], int]:
        """Pages ``pids`` as of one publication, and its LSN.

        Raises:
            PageNotFoundError: one of them is not live at that publication.
        """
        def copy(maps: _Maps) -> tuple[dict[int, bytes], int | None]:
            out: dict[int, bytes] = {}
            pages_mm, plen, table_mm, tlen = maps
            for pid in pids:
                if pid < 1 or (pid + 1) * ROW_SIZE > tlen or pages_mm is None:
                    return out, pid
                off, size, _epoch = _ROW3.unpack_from(table_mm, pid * ROW_SIZE)  # type: ignore[arg-type]
                if size < 0 or not 0 <= off <= plen - size:
                    return out, pid
                out[pid] = pages_mm[off : off + size]
            return out, None

        (pages, missing), lsn = self._consistent(copy)
        if missing is not None:
            raise PageNotFoundError(missing, "snapshot of the mapped pages")
        return pages, lsn

    def live_ids(self) -> tuple[list[int], int]:
        """Ids of the live pages at one publication, and its LSN."""
        def ids(maps: _Maps) -> list[int]:
            table_mm, tlen = maps[2], maps[3]
            rows = min(int(_U64.unpack_from(self.head, _ROWS * 8)[0]), tlen // ROW_SIZE)
            if table_mm is None or rows <= 1:
                return []
            table = np.frombuffer(table_mm, ROW_DTYPE, rows)
            return (np.flatnonzero(table["size"][1:] >= 0) + 1).tolist()

        return self._consistent(ids)
