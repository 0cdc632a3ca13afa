"""Checkpoint files: the page table, page bytes, masks, graph and retained log of a
state at one LSN, in one file with a magic, a version and CRC32C checksums.

Layout (little-endian; docs/SerializationSpec.md has every field)::

    header   48 B   "MMSBCKPT" | version u16 | flags u16 | sections u32 | lsn u64
                    | next_page_id u64 | next_delta_id u64 | crc32c u32 | zero u32
    section  32 B   tag 4s | codec u8 | 3 zero | raw_len u64 | stored_len u64
                    | crc32c(stored) u32 | crc32c(first 28 B) u32, then stored bytes
    ...             sections META, PTBL, PDAT, MASK, GRPH, TLOG, BASE, in that order
                    (versions 3 and 4: PREF in place of PDAT, the pages being in the bus's
                    checkpoint page store, see pagestore.py)
    footer   24 B   "MMSBEND\\0" | bytes before footer u64 | crc32c(first 16 B) u32 | zero u32

Writers go through a temporary file, fsync and rename, so a reader sees the old file
or the new one, never half of one. Readers check everything before touching the
target state.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import crc32c as _crc32c
import msgpack
import numpy as np
import zstandard

from .._core.compaction import bind_base_encoder
from .._core.delta import Delta
from .._core.engine import physical_memory
from .._core.graph import ShadowPageGraph
from .._core.kernels import check_table
from .._core.limits import MAX_COUNTER, MAX_PAGE_ID, MAX_PAGE_SIZE, metadata_bounds_problem
from .._core.log import ColumnRecords, LogColumns, TransactionLog, check_columns
from .._core.records import AnyRecord, kind_of
from .._core.snapshot import ReplayBase, Snapshot
from ..errors import SerializationError
from ..types import EdgeType
from . import fsops
from .codec import (
    KIND_DELTA,
    _fast_delta,
    crc32c,
    decode_metadata,
    decode_record,
    encode_metadata,
    encode_record,
)
from .fsops import fsync_dir
from .pagestore import STORE_NAME, PageRefs, pin_runs, read_pages, runs_problem

if TYPE_CHECKING:
    from .._core.engine import MMSBState

__all__ = ["write_checkpoint", "read_checkpoint", "CheckpointData", "CheckpointBase",
           "inline_pages", "REFS_VERSION", "REFS_VERSIONS",
           "checkpoint_bytes", "MAGIC", "VERSION", "CheckpointHead", "read_checkpoint_head",
           "read_checkpoint_front"]

MAGIC = b"MMSBCKPT"
END_MAGIC = b"MMSBEND\0"
VERSION = 2
"""Written by this build for a self-contained file. Version 2 holds the log section as
columns (TLOG v2)."""
REFS_VERSION = 4
"""Written by a durable bus's exclusive writer: version 2 with the page bytes in the
bus's checkpoint page store, named by a PREF section (page references), whose pins are
runs of slots. Version 3, read too, held the pins slot by slot."""
REFS_VERSIONS = (3, 4)
"""The versions whose pages are in the page store (a PREF section in PDAT's place)."""
READ_VERSIONS = (1, 2, 3, 4)
"""Read by this build: version 1 (log records one by one), 2, 3 and 4."""
_HEADER = struct.Struct("<8sHHIQQQ")  # 40 bytes, then crc u32 + zero u32
_HEADER_SIZE = 48
_HEADER_FULL = struct.Struct("<8sHHIQQQII")  # the header, its crc and its zero
_SECTION = struct.Struct("<4sB3xQQI")  # 28 bytes, then header crc u32
_SECTION_HEAD = struct.Struct("<4sB3xQQII")  # the same and the header crc
_SECTION_SIZE = 32
_FOOTER = struct.Struct("<8sQ")  # 16 bytes, then crc u32 + zero u32
_FOOTER_SIZE = 24
_FOOTER_FULL = struct.Struct("<8sQII")  # the footer, its crc and its zero
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_TAGS = (b"META", b"PTBL", b"PDAT", b"MASK", b"GRPH", b"TLOG", b"BASE")
_TAGS_REFS = (b"META", b"PTBL", b"PREF", b"MASK", b"GRPH", b"TLOG", b"BASE")


def _tags(version: int) -> tuple[bytes, ...]:
    return _TAGS_REFS if version in REFS_VERSIONS else _TAGS


_REFS_HEAD = struct.Struct("<QQQQ")
"""PREF section head: store uid, pages, pins (runs of slots in version 4), zero."""
CODEC_RAW = 0
CODEC_ZSTD = 1
_MAX_SECTION = 1 << 42
_ZSTD_LEVEL = 1
_STREAM_CHUNK = 1 << 20


class CheckpointBase(ReplayBase):
    """A replay base held as a checkpoint: its bytes, or a file of a durable bus.
    ``store``: the page store that a checkpoint of format version 3 or 4 names its pages in
    (by default, for a file, the store beside it)."""

    def __init__(self, source: bytes | Path, store: Path | None = None) -> None:
        self.source = source
        self.store = store

    def raw(self) -> bytes:
        """The checkpoint's bytes, self-contained (a version-3 or -4 checkpoint's pages are
        read from its page store, checked, and written in).

        Raises:
            SerializationError: the file cannot be read (gone, or not a regular file),
                or its pages cannot be read back from the page store.
        """
        if isinstance(self.source, bytes):
            raw = self.source
            label = "replay base"
        else:
            try:
                raw = fsops.read_all(self.source)
            except OSError as exc:
                raise SerializationError(f"cannot read the replay base ({exc.strerror or exc})",
                                         path=self.source) from None
            label = str(self.source)
        if _version_of(raw) in REFS_VERSIONS:
            raw = inline_pages(raw, label, self._store())
        return raw

    def _store(self) -> str | Path | None:
        if self.store is not None:
            return self.store
        return None if isinstance(self.source, bytes) else _sibling_store(self.source)

    def snapshot(self) -> Snapshot:
        if isinstance(self.source, bytes) and _version_of(self.source) not in REFS_VERSIONS:
            return read_checkpoint(self.source, path_label="replay base")
        return read_checkpoint(self.raw(), path_label="replay base")

    def detached(self) -> ReplayBase:
        if isinstance(self.source, bytes) and _version_of(self.source) not in REFS_VERSIONS:
            return self
        return CheckpointBase(self.raw())


def _version_of(raw: bytes) -> int:
    """The format version a checkpoint's bytes declare (0: too short to say)."""
    if len(raw) < _HEADER_SIZE or raw[:8] != MAGIC:
        return 0
    return int(_U16.unpack_from(raw, 8)[0])


def _sibling_store(path: str | os.PathLike[str]) -> str:
    """The page store beside the checkpoint at ``path`` (as a string: opened, not kept)."""
    return os.path.join(os.path.dirname(os.fspath(path)), STORE_NAME)


CheckpointData = Snapshot
"""A decoded checkpoint is a :class:`Snapshot`."""


# -- writing ---------------------------------------------------------------------------

class _CrcWriter:
    """A file wrapper that counts and checksums what passes through."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.crc = 0
        self.n = 0

    def write(self, b: Any) -> int:
        self.crc = crc32c(b, self.crc)
        n = len(memoryview(b).cast("B"))
        self.n += n
        self.f.write(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def _section_header(tag: bytes, codec: int, raw_len: int, stored_len: int, crc: int) -> bytes:
    head = _SECTION.pack(tag, codec, raw_len, stored_len, crc)
    return head + _U32.pack(crc32c(head))


_SAMPLE = 1 << 20
_SMALL_SECTION = 16 << 10
INFLATE_FLOOR = 16 << 20
INFLATE_RATIO = 4096
"""Readers refuse a compressed section whose size is not fixed by the page table and
that would inflate beyond INFLATE_RATIO times its stored size and INFLATE_FLOOR bytes;
writers store such a section raw instead."""


def _write_section(f: BinaryIO, tag: bytes, make_chunks: Callable[[], Iterable[Any]],
                   cctx: zstandard.ZstdCompressor, *, sized_by_table: bool = False) -> None:
    """Stream ``chunks`` (buffers) into one section. The codec is chosen from a sample
    of the first MiB: zstd when it saves at least a fifth, raw otherwise (random bytes
    would only cost compression time); a section under 16 KiB is always raw. The header is written last, in place. A section
    that compresses past the readers' inflation cap is written again, raw, unless its
    size is fixed by the page table (``sized_by_table``: readers check it exactly)."""
    it = iter(make_chunks())
    sample: list[memoryview] = []
    sampled = 0
    for chunk in it:
        view = memoryview(chunk).cast("B")
        sample.append(view)
        sampled += view.nbytes
        if sampled >= _SAMPLE:
            break
    probe_parts = []
    need = _SAMPLE
    for view in sample:
        if need <= 0:
            break
        probe_parts.append(view[:need])
        need -= view.nbytes
    probe = b"".join(probe_parts)
    codec = CODEC_RAW
    # Small sections stay raw: what zstd would save is not worth a reader's time.
    if len(probe) >= _SMALL_SECTION and len(cctx.compress(probe)) < 0.8 * len(probe):
        codec = CODEC_ZSTD
    head_pos = f.tell()
    f.write(b"\0" * _SECTION_SIZE)
    cw: Any = _CrcWriter(f)
    raw_len = 0
    if codec == CODEC_ZSTD:
        with cctx.stream_writer(cw, closefd=False, write_return_read=True) as zw:
            for view in sample:
                raw_len += zw.write(view)
            for chunk in it:
                raw_len += zw.write(chunk)
        if not sized_by_table and raw_len > max(INFLATE_FLOOR, INFLATE_RATIO * cw.n):
            f.seek(head_pos + _SECTION_SIZE)
            f.truncate()
            codec, cw, raw_len = CODEC_RAW, _CrcWriter(f), 0
            for chunk in make_chunks():
                raw_len += cw.write(chunk)
    else:
        for view in sample:
            raw_len += cw.write(view)
        for chunk in it:
            raw_len += cw.write(chunk)
    end_pos = f.tell()
    f.seek(head_pos)
    f.write(_section_header(tag, codec, raw_len, cw.n, cw.crc))
    f.seek(end_pos)


def _page_runs(state: MMSBState, ids: np.ndarray) -> list[tuple[int, int]]:
    """(addr, length) runs covering the pages' bytes in id order, merging neighbours
    that sit back to back in the arena (bulk-created pages do)."""
    if ids.size == 0:
        return []
    t = state.table
    addrs = t.addr[ids]
    sizes = t.size[ids]
    ends = addrs + sizes
    same_chunk = (addrs[1:] >> 26) == (addrs[:-1] >> 26)
    brk = np.flatnonzero((addrs[1:] != ends[:-1]) | ~same_chunk) + 1
    starts = np.concatenate(([0], brk))
    stops = np.concatenate((brk, [ids.size]))
    run_addr = addrs[starts]
    run_len = ends[stops - 1] - run_addr
    return list(zip(run_addr.tolist(), run_len.tolist(), strict=True))


def _write_body(f: BinaryIO, state: MMSBState, from_lsn: int = 0,
                bus: dict[str, Any] | None = None, base: bytes = b"",
                refs: PageRefs | None = None) -> None:
    t = state.table
    log = state.log
    ids = t.live_ids()
    cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    if refs is not None and not np.array_equal(refs.ids, ids):
        raise ValueError("the page references do not list the state's live pages")
    version = VERSION if refs is None else REFS_VERSION
    header = _HEADER.pack(MAGIC, version, 0, len(_TAGS), log.last_lsn, t.next_id,
                          state.next_delta_id)
    f.write(header + _U32.pack(crc32c(header)) + _U32.pack(0))
    meta = {
        "format": "mmsb-checkpoint",
        "pages": int(ids.size),
        "horizon_lsn": log.horizon_lsn,
        "horizon_timestamp": log.horizon_timestamp,
        "last_timestamp": log.last_timestamp,
        "written_ns": time.time_ns(),
        "metadata": {str(pid): t.meta[pid] for pid in ids.tolist() if pid in t.meta},
        "log_from_lsn": from_lsn or state.orphan_from,
    }
    if bus is not None:
        meta["bus"] = bus
    meta_raw = msgpack.packb(meta, use_bin_type=True)
    _write_section(f, b"META", lambda: [meta_raw], cctx)
    table = [ids.astype("<i8").data, t.size[ids].astype("<i8").data,
             t.epoch[ids].astype("<i8").data, t.loc[ids].astype("u1").data]
    _write_section(f, b"PTBL", lambda: table, cctx, sized_by_table=True)
    if refs is not None:
        parts = encode_refs(refs)
        _write_section(f, b"PREF", lambda: parts, cctx)
    else:
        # Page bytes go straight from the arena to the file: no gathered copy.
        runs = _page_runs(state, ids)
        arena = state.arena
        _write_section(f, b"PDAT", lambda: (arena.view(a, n).data for a, n in runs), cctx,
                       sized_by_table=True)
    masks = [[pid, as_of, len(m), np.packbits(m).tobytes()]
             for pid, (m, as_of) in sorted(state.mask_base.items())]
    mask_raw = msgpack.packb(masks, use_bin_type=True)
    _write_section(f, b"MASK", lambda: [mask_raw], cctx)
    edges = state.graph.edges()
    graph = [_U32.pack(len(edges)), np.array([e[0] for e in edges], "<i8").data,
             np.array([e[1] for e in edges], "<i8").data,
             np.array([int(e[2]) for e in edges], "u1").data]
    _write_section(f, b"GRPH", lambda: graph, cctx)
    _write_section(f, b"TLOG", lambda: encode_columns(log, from_lsn), cctx)
    _write_section(f, b"BASE", lambda: [base] if base else [], cctx)
    before_footer = f.tell()
    footer = _FOOTER.pack(END_MAGIC, before_footer)
    f.write(footer + _U32.pack(crc32c(footer)) + _U32.pack(0))


def write_checkpoint(state: MMSBState, path: str | os.PathLike[str], *, fsync: bool = True,
                     from_lsn: int = 0, bus: dict[str, Any] | None = None,
                     base: bytes | None = None, refs: PageRefs | None = None) -> int:
    """Write ``state`` (caller holds its lock) to ``path`` atomically: a temporary file in
    the same directory, fsync, rename, fsync of the directory. Returns the file size.

    ``from_lsn``: keep only the log records after it (a durable bus's slice since its
    previous checkpoint). ``base``: the nested base checkpoint; by default the state's
    own replay base, so the file stands alone. ``refs``: the pages are in the bus's
    page store, already written and synced there (:class:`PageStore.write`): the file
    (format version 4) names them instead of holding them."""
    if base is None:
        base = state.base_bytes() if not from_lsn else b""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    tmp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
    f = fsops.HookedWriter(fsops.create_exclusive(tmp), tmp)
    try:
        _write_body(f, state, from_lsn, bus, base, refs)  # type: ignore[arg-type]
        f.flush()
        if fsync:
            fsops.fsync(f.fd, tmp)
        size = f.tell()
        f.close()
        fsops.replace(tmp, target)
        if fsync:
            fsync_dir(directory, strict=False)
    except BaseException:
        if not f.closed:
            try:
                f.close()
            except OSError:
                pass
        try:
            fsops.unlink(tmp)
        except OSError:
            pass
        raise
    return size


def checkpoint_bytes(state: MMSBState) -> bytes:
    """The checkpoint of ``state`` as bytes (caller holds its lock)."""
    buf = io.BytesIO()
    _write_body(buf, state, 0, None, state.base_bytes())
    return buf.getvalue()


# A replay base that in-memory compaction folded is encoded as a checkpoint of it.
bind_base_encoder(checkpoint_bytes)


def encode_refs(refs: PageRefs) -> list[Any]:
    """The PREF section of ``refs``: head, then offsets and CRCs of the pages in the
    page table's order, then the pins as runs (first offsets, counts, slot lengths,
    generations)."""
    n, r = int(refs.ids.size), int(refs.runs.shape[1])
    return [_REFS_HEAD.pack(refs.uid, n, r, 0), refs.offsets.astype("<i8").data,
            refs.crcs.astype("<u4").data, np.ascontiguousarray(refs.runs, "<i8").reshape(-1).data]


def decode_refs(raw: Any, ids: np.ndarray, sizes: np.ndarray, epochs: np.ndarray,
                generation: int | None, fail: Any, runs: bool = True) -> PageRefs:
    """A PREF section back into :class:`PageRefs`, checked: the page count is the page
    table's, slots lie after the store's header, the pins are ascending and do not
    overlap, and each page's slot is a pin of its size class named by this checkpoint's
    ``generation`` (None: a file outside a bus, whose generation is not known). Pins
    are stored as runs (``runs``: format version 4) or, in version 3, slot by slot.
    O(pages + runs)."""
    buf = memoryview(raw)
    if len(buf) < _REFS_HEAD.size:
        raise fail("section PREF is shorter than its head")
    uid, n, m, zero = _REFS_HEAD.unpack_from(buf, 0)
    if zero or not uid or n != ids.size:
        raise fail(f"section PREF lists {n} pages where the page table lists {ids.size}, or "
                   "its head is malformed")
    cols = 4 if runs else 3
    if len(buf) != _REFS_HEAD.size + 12 * n + 8 * cols * m:
        raise fail(f"section PREF holds {len(buf)} bytes, not the "
                   f"{_REFS_HEAD.size + 12 * n + 8 * cols * m} of {n} pages and {m} pinned "
                   f"{'runs of slots' if runs else 'slots'}")
    pos = _REFS_HEAD.size
    offsets = np.frombuffer(buf, "<i8", n, pos).astype(np.int64)
    crcs = np.frombuffer(buf, "<u4", n, pos + 8 * n).astype(np.uint32)
    pos += 12 * n
    pins = np.frombuffer(buf, "<i8", cols * m, pos).astype(np.int64).reshape(cols, m)
    if not runs:
        pins = pin_runs(pins[0], pins[1], pins[2])
    problem = runs_problem(offsets, sizes, pins, generation)
    if problem == 1:
        raise fail("section PREF pins slots out of order, overlapping or inside the store's "
                   "header")
    if problem:
        raise fail("section PREF names a page slot that it does not pin for this "
                   "checkpoint, of another size or shared by two pages")
    return PageRefs(int(uid), ids, sizes, epochs, offsets, crcs, pins)


def inline_pages(raw: bytes, label: str, store: str | Path | None) -> bytes:
    """A version-3 or -4 checkpoint's bytes made self-contained (version 2): its pages read
    from ``store`` and checked against their CRC32Cs, the other sections kept as they
    are. O(file + page bytes).

    Raises:
        SerializationError: the checkpoint is damaged, or its pages cannot be read back
            from the page store (the message names the store and the slot).
    """
    # Every section is checked against its checksum; the log's is kept as it is, so it
    # is not decoded.
    snap = read_checkpoint(raw, path_label=label, store=store, with_log=False)
    buf = memoryview(raw)
    out = io.BytesIO()
    head = bytearray(buf[:_HEADER_SIZE])
    _U16.pack_into(head, 8, VERSION)
    _U32.pack_into(head, 40, crc32c(bytes(head[:40])))
    out.write(head)
    pos = _HEADER_SIZE
    cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    data = snap.data
    for tag in _TAGS_REFS:
        stored_len = _SECTION.unpack_from(buf, pos)[3]
        end = pos + _SECTION_SIZE + stored_len
        if tag == b"PREF":
            _write_section(out, b"PDAT", lambda: [data.data], cctx,
                           sized_by_table=True)
        else:
            out.write(buf[pos:end])
        pos = end
    before_footer = out.tell()
    footer = _FOOTER.pack(END_MAGIC, before_footer)
    out.write(footer + _U32.pack(crc32c(footer)) + _U32.pack(0))
    return out.getvalue()


# -- reading ---------------------------------------------------------------------------

def _decompress(stored: memoryview, raw_len: int, err: Any) -> bytearray:
    """Stream-decompress, never producing (or allocating for) more than ``raw_len``."""
    dobj = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    pos = 0
    try:
        while pos < len(stored):
            piece = dobj.decompress(stored[pos : pos + _STREAM_CHUNK])
            pos += _STREAM_CHUNK
            out += piece
            if len(out) > raw_len:
                raise err(f"decompresses to more than its declared {raw_len} bytes")
        if not dobj.eof:
            raise err("its compressed stream is incomplete")
    except zstandard.ZstdError as exc:
        raise err(f"does not decompress ({exc})") from None
    if len(out) != raw_len:
        raise err(f"decompresses to {len(out)} bytes, not the declared {raw_len}")
    return out


def read_checkpoint(source: str | os.PathLike[str] | bytes, *, path_label: str | None = None,
                    with_log: bool = True, private: bool = False, store: str | Path | None = None,
                    pages: bool = True) -> CheckpointData:
    """Read and validate a checkpoint file (or its bytes). ``with_log=False``: the log
    section is checked against its checksum but not decoded (the records come back
    empty), for a reader that loads the history later. ``private`` (a file only): the
    file is read into a writable buffer of its own, and when its page bytes and log
    payload are stored raw and the rest of the file is small beside them, the snapshot
    is marked ``owned``: one restore may take that memory as its own instead of copying
    it (the caller must restore it at most once and share it with nothing else).
    ``store``: the page store a version-3 or -4 checkpoint's pages are read from (for a file,
    by default the one beside it). ``pages=False``: a version-3 or -4 checkpoint's pages are
    not read (its ``data`` comes back empty), for a reader of its log alone.

    Raises:
        SerializationError: bad magic, unsupported version, truncation, checksum
            mismatch, or contents that do not describe a consistent state; the message
            names the file and offset.
    """
    raw: Any
    if isinstance(source, bytes | bytearray | memoryview):
        raw = bytes(source)
        label = path_label or "<bytes>"
        private = False
    else:
        label = str(source)
        try:
            raw = fsops.read_private(source).data if private else fsops.read_all(source)
        except OSError as exc:
            raise SerializationError(f"cannot read the file ({exc.strerror or exc})",
                                     path=label) from None
        if store is None:
            store = _sibling_store(Path(source))
    return _parse(memoryview(raw), label, with_log, private, store=store, pages=pages)


def read_checkpoint_front(path: Path, store: str | Path | None = None) -> CheckpointData:
    """A checkpoint file read and checked as ``read_checkpoint(path, with_log=False,
    private=True)`` reads it, but without the bytes of its log section: the header,
    every section header and every other section are read into one private buffer and
    checked; the log section's bytes are neither read nor checked here (they are the
    history: whoever reads it reads the file again, whole, and checks them then, as it
    checks the older checkpoints' log sections). With the log's bytes out of the kept
    buffer, a snapshot whose page bytes are stored raw is ``owned``: a restore takes
    them as its pages without a copy. O(file without its log section).

    Raises:
        SerializationError: as :func:`read_checkpoint` (the file read whole when its
            section headers do not lead to its log section).
    """
    label = str(path)
    try:
        fd, st = fsops.open_regular_stat(path, os.O_RDONLY)
    except OSError as exc:
        raise SerializationError(f"cannot read the file ({exc.strerror or exc})",
                                 path=label) from None
    try:
        total = st.st_size
        pos = _HEADER_SIZE
        hole = -1
        # The section heads are read through a window of _HEAD_WINDOW bytes from the
        # file's start, read again only where a head lies outside it: one read for the
        # usual file (the header and every head before the log section), not one per
        # section.
        win = os.pread(fd, _HEAD_WINDOW, 0)
        win_at = 0
        for tag in _TAGS:
            if not win_at <= pos <= win_at + len(win) - _SECTION_SIZE:
                win = os.pread(fd, _HEAD_WINDOW, pos)
                win_at = pos
                if len(win) < _SECTION_SIZE:
                    break
            sh = win[pos - win_at:pos - win_at + _SECTION_SIZE]
            got, _codec, _raw, stored_len, _log_crc, shcrc = _SECTION_HEAD.unpack_from(sh, 0)
            if (got != tag and not (tag == b"PDAT" and got == b"PREF")) or crc32c(sh[:28]) != shcrc:
                break
            if tag == b"TLOG":
                if pos + _SECTION_SIZE + stored_len <= total - _FOOTER_SIZE:
                    hole = stored_len
                break
            pos += _SECTION_SIZE + stored_len
        if hole >= 0:
            # The file but its log section's bytes, into one buffer: what lies before
            # them (from the window when it holds it all), then what lies after them.
            front = pos + _SECTION_SIZE
            buf = np.empty(total - hole, np.uint8)
            if win_at == 0 and front <= len(win):
                buf[:front] = np.frombuffer(win, np.uint8, front)
                got_front = front
            else:
                got_front = os.preadv(fd, [buf[:front].data], 0)
            got_back = os.preadv(fd, [buf[front:].data], front + hole)
            if got_front != front or got_back != buf.size - front:
                hole = -1  # changed while read: the whole read below says how
    except OSError as exc:
        raise SerializationError(f"cannot read the file ({exc.strerror or exc})",
                                 path=label) from None
    finally:
        os.close(fd)
    if hole < 0:
        # Not a file whose sections lead to a log section: read whole, whose checks
        # name what is wrong.
        return read_checkpoint(path, with_log=False, private=True, store=store)
    return _parse(buf.data, label, False, True, hole,
                  store=store if store is not None else _sibling_store(path))


@dataclass(slots=True)
class CheckpointHead:
    """What a checkpoint says about itself, read without its data sections."""

    lsn: int
    """LSN of the newest record the checkpoint includes."""
    log_from_lsn: int
    """Its log section holds the records after this LSN (0: from the start)."""
    horizon_lsn: int
    """Replays of its history can target LSNs ≥ this."""
    bus: dict[str, Any] | None
    """Durable bus identity (``bus_id`` hex, ``generation``), None for plain files."""
    base_len: int
    """Bytes of its nested replay base (0: none)."""
    version: int = VERSION
    """Its format version (3 and 4: its pages are in the bus's checkpoint page store)."""


def read_checkpoint_head(path: Path) -> CheckpointHead:
    """The header, the META section and the section headers of a checkpoint file, each
    checked against its checksum, read in a few small reads: O(1) in the size of the
    file's log. The data sections are checked when the file is read whole.

    Raises:
        SerializationError: unreadable, not a checkpoint, of an unsupported version, cut
            short, or damaged where it was read.
    """
    label = str(path)

    def fail(reason: str, offset: int | None = None) -> SerializationError:
        return SerializationError(reason, path=label, offset=offset)

    try:
        fd = fsops.open_regular(path, os.O_RDONLY)
    except OSError as exc:
        raise fail(f"cannot read the checkpoint ({exc.strerror or exc})") from None
    try:
        total = os.fstat(fd).st_size
        # The file's first _HEAD_WINDOW bytes in one read: a small checkpoint (the first
        # of a chain, or one of few records) is read in that one call, a larger one's
        # header and leading section heads too.
        win = os.pread(fd, min(total, _HEAD_WINDOW), 0)

        def read(n: int, at: int) -> bytes:
            if at + n <= len(win):
                return win[at:at + n]
            out = os.pread(fd, n, at)
            if len(out) != n:
                raise fail("the file is shorter than its sections (truncated)", at)
            return out

        if total < _HEADER_SIZE + _FOOTER_SIZE:
            raise fail(f"file is {total} bytes, too short for a checkpoint (truncated?)")
        head = read(_HEADER_SIZE, 0)
        magic, version, _flags, nsec, lsn, _next_page, _next_delta = _HEADER.unpack_from(head, 0)
        if magic != MAGIC:
            raise fail(f"bad magic {bytes(magic)!r}: not an MMSB checkpoint", 0)
        if crc32c(head[:40]) != _U32.unpack_from(head, 40)[0]:
            raise fail("header checksum mismatch (the header is damaged)", 0)
        if version not in READ_VERSIONS:
            raise fail(f"unsupported checkpoint format version {version} (this build reads "
                       f"versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}, and writes "
                       f"{VERSION} and {REFS_VERSION})", 8)
        if nsec != len(_TAGS) or _U32.unpack_from(head, 44)[0] != 0:
            raise fail("header fields out of range", 12)
        fpos = total - _FOOTER_SIZE
        foot = read(_FOOTER_SIZE, fpos)
        fmagic, before = _FOOTER.unpack_from(foot, 0)
        if (fmagic != END_MAGIC or crc32c(foot[:16]) != _U32.unpack_from(foot, 16)[0]
                or before != fpos or _U32.unpack_from(foot, 20)[0] != 0):
            raise fail("the end marker is missing or damaged (the file is truncated or cut)", fpos)
        pos = _HEADER_SIZE
        meta: Any = None
        base_len = 0
        for tag_expected in _tags(version):
            if fpos - pos < _SECTION_SIZE:
                raise fail("section header runs past the end (truncated)", pos)
            sh = read(_SECTION_SIZE, pos)
            tag, codec, raw_len, stored_len, crc = _SECTION.unpack_from(sh, 0)
            if crc32c(sh[:28]) != _U32.unpack_from(sh, 28)[0] or tag != tag_expected:
                raise fail(f"section header damaged (expected section {tag_expected.decode()})", pos)
            if codec not in (CODEC_RAW, CODEC_ZSTD) or stored_len > fpos - pos - _SECTION_SIZE:
                raise fail(f"section {tag.decode()} has an unknown codec or runs past the end", pos)
            if tag == b"META":
                stored = read(stored_len, pos + _SECTION_SIZE)
                if crc32c(stored) != crc:
                    raise fail("section META checksum mismatch (its bytes are damaged)",
                               pos + _SECTION_SIZE)
                if codec == CODEC_ZSTD:
                    if raw_len > max(INFLATE_FLOOR, INFLATE_RATIO * stored_len):
                        raise fail("section META declares more bytes than this format allows")
                    raw = bytes(_decompress(memoryview(stored), raw_len,
                                            lambda r: fail(f"section META {r}")))
                else:
                    raw = stored
                try:
                    meta = msgpack.unpackb(raw, raw=False, strict_map_key=False, max_ext_len=0)
                except Exception as exc:
                    raise fail(f"section META is not valid msgpack ({exc})") from None
            elif tag == b"BASE":
                base_len = raw_len
            pos += _SECTION_SIZE + stored_len
        if pos != fpos:
            raise fail(f"{fpos - pos} unexpected bytes before the end marker", pos)
    finally:
        os.close(fd)
    if not isinstance(meta, dict) or meta.get("format") != "mmsb-checkpoint":
        raise fail("section META does not describe an MMSB checkpoint")
    from_lsn, horizon, bus = meta.get("log_from_lsn", 0), meta.get("horizon_lsn", 0), meta.get("bus")
    if not (isinstance(from_lsn, int) and isinstance(horizon, int) and 0 <= from_lsn <= lsn
            and 0 <= horizon <= lsn + 1):
        raise fail("section META has an impossible log start or horizon")
    if bus is not None and not (isinstance(bus, dict) and isinstance(bus.get("bus_id"), str)
                                and isinstance(bus.get("generation"), int)):
        raise fail("section META has a malformed bus identity")
    return CheckpointHead(lsn, from_lsn, horizon, bus, base_len, version)


_HEAD_WINDOW = 32 << 10
"""Bytes read at a time while looking for a checkpoint's section heads (see
:func:`read_checkpoint_front`): enough for the header and every section before the log
section of a bus checkpoint of a few hundred pages (its page references and the runs of
pinned slots included), so that one read holds them, and a copy of a few more KiB costs less
than another system call."""

_ADOPT_SLACK = 64 << 10
"""A private read's snapshot is ``owned`` only when the file's bytes other than the
pages and the log payload (which a restore that adopts them keeps alive with them) are
at most this or an eighth of the file."""


def _parse(buf: memoryview, label: str, with_log: bool = True,
           private: bool = False, hole: int = -1, *, store: str | Path | None = None,
           pages: bool = True) -> CheckpointData:
    """``hole`` ≥ 0 (``with_log`` False): ``buf`` is the file without the bytes of its
    log section, that many (see :func:`read_checkpoint_front`); offsets in errors are
    the file's. ``store``, ``pages``: as :func:`read_checkpoint`."""
    shift = 0

    def fail(reason: str, offset: int | None = None) -> SerializationError:
        return SerializationError(reason, path=label,
                                  offset=None if offset is None else offset + shift)

    total = len(buf)
    if total < _HEADER_SIZE + _FOOTER_SIZE:
        raise fail(f"file is {total} bytes, too short for a checkpoint (truncated?)")
    crc = _crc32c.crc32c  # the C function itself: 16 calls per file
    (magic, version, _flags, nsec, lsn, next_page_id, next_delta_id, hcrc,
     hzero) = _HEADER_FULL.unpack_from(buf, 0)
    if magic != MAGIC:
        raise fail(f"bad magic {bytes(magic)!r}: not an MMSB checkpoint", 0)
    if crc(buf[:40]) != hcrc:
        raise fail("header checksum mismatch (the header is damaged)", 0)
    if version not in READ_VERSIONS:
        raise fail(f"unsupported checkpoint format version {version} (this build reads versions "
                   f"{READ_VERSIONS[0]} to {READ_VERSIONS[-1]}, and writes {VERSION} and "
                   f"{REFS_VERSION})", 8)
    if hzero != 0 or nsec != len(_TAGS):
        raise fail("header fields out of range", 12)
    fpos = total - _FOOTER_SIZE
    fmagic, before, fcrc, fzero = _FOOTER_FULL.unpack_from(buf, fpos)
    if (fmagic != END_MAGIC or crc(buf[fpos : fpos + 16]) != fcrc
            or before != fpos + max(hole, 0) or fzero):
        shift = max(hole, 0)
        raise fail("the end marker is missing or damaged (the file is truncated or cut)", fpos)
    pos = _HEADER_SIZE
    sections: dict[bytes, tuple[int, int, memoryview, int]] = {}
    for tag_expected in _tags(version):
        if hole >= 0 and tag_expected == b"BASE":
            shift = hole  # past the log section left on disk
        if fpos - pos < _SECTION_SIZE:
            raise fail("section header runs past the end (truncated)", pos)
        tag, codec, raw_len, stored_len, data_crc, shcrc = _SECTION_HEAD.unpack_from(buf, pos)
        if crc(buf[pos : pos + 28]) != shcrc:
            raise fail(f"section header checksum mismatch (expected section {tag_expected.decode()})", pos)
        if tag != tag_expected:
            raise fail(f"expected section {tag_expected.decode()}, found {bytes(tag)!r}", pos)
        if codec not in (CODEC_RAW, CODEC_ZSTD) or raw_len > _MAX_SECTION:
            raise fail(f"section {tag.decode()} has an unknown codec or an impossible size", pos)
        data_pos = pos + _SECTION_SIZE
        if hole >= 0 and tag == b"TLOG":
            # Not in the buffer: checked when the history is read (read_checkpoint_front).
            if stored_len != hole or (codec == CODEC_RAW and stored_len != raw_len):
                raise fail("section TLOG changed while the file was read", pos)
            sections[tag] = (codec, raw_len, buf[data_pos:data_pos], data_pos)
            pos = data_pos
            continue
        if stored_len > fpos - data_pos:
            raise fail(f"section {tag.decode()} runs past the end of the file (truncated)", pos)
        stored = buf[data_pos : data_pos + stored_len]
        if crc(stored) != data_crc:
            raise fail(f"section {tag.decode()} checksum mismatch (its bytes are damaged)", data_pos)
        if codec == CODEC_RAW and stored_len != raw_len:
            raise fail(f"section {tag.decode()} has stored and raw lengths that differ for raw "
                       "data", data_pos)
        sections[tag] = (codec, raw_len, stored, data_pos + shift)
        pos = data_pos + stored_len
    if pos != fpos:
        raise fail(f"{fpos - pos} unexpected bytes before the end marker", pos)
    shift = 0  # the sections hold their offsets in the file

    def get(tag: bytes, exact: int | None = None) -> Any:
        """A section's bytes, inflated only after its declared size passed its bound:
        ``exact`` when other sections determine it, else the inflation cap."""
        codec, raw_len, stored, data_pos = sections[tag]

        def sec_err(reason: str) -> SerializationError:
            return fail(f"section {tag.decode()} {reason}", data_pos)

        if exact is not None and raw_len != exact:
            raise sec_err(f"declares {raw_len} bytes where the page table implies {exact}")
        if codec == CODEC_RAW:
            return stored
        if exact is None and raw_len > max(INFLATE_FLOOR, INFLATE_RATIO * len(stored)):
            raise sec_err(f"declares {raw_len} bytes from {len(stored)} compressed: more than "
                          f"this format allows ({INFLATE_RATIO}:1 beyond {INFLATE_FLOOR} bytes)")
        return _decompress(stored, raw_len, sec_err)

    load = None
    if version in REFS_VERSIONS and pages:
        where = store

        def load(refs: PageRefs) -> np.ndarray:
            if where is None:
                raise fail("its pages are in a bus's checkpoint page store, which this read "
                           "was not given (read the file in its bus directory)")
            return read_pages(where, refs, f"checkpoint {label}")

    snap = _decode_sections(get, lsn, next_page_id, next_delta_id, fail, version, with_log,
                            load)
    if version in REFS_VERSIONS:
        # The pages were read into a buffer of their own; with no log in the read
        # buffer, nothing else refers to them.
        snap.owned = private and hole >= 0 and pages
    elif private and sections[b"PDAT"][0] == CODEC_RAW and (
            hole >= 0 or sections[b"TLOG"][0] == CODEC_RAW):
        kept = snap.data.nbytes
        if isinstance(snap.records, ColumnRecords):
            kept += snap.records.cols.payload.nbytes
        snap.owned = total - kept <= max(_ADOPT_SLACK, total >> 3)
    return snap


_ROWS_FIT = 1 << 24
"""Page-table rows of at most this many bytes are not held against the machine's memory
(asked of the system only for a larger table)."""

_META_INTS = (
    *((key, 0, MAX_COUNTER, f"an int from 0 to {MAX_COUNTER - 1}")
      for key in ("horizon_lsn", "log_from_lsn")),
    *((key, -(1 << 63), 1 << 63, "a 64-bit int")
      for key in ("horizon_timestamp", "last_timestamp", "written_ns")),
)
"""The META fields that are ints (0 where absent): name, bounds, what they must be."""


def _decode_sections(get: Any, lsn: int, next_page_id: int, next_delta_id: int,
                     fail: Any, version: int = VERSION, with_log: bool = True,
                     load: Callable[[PageRefs], np.ndarray] | None = None) -> CheckpointData:
    try:
        meta = msgpack.unpackb(get(b"META"), raw=False, strict_map_key=False, max_ext_len=0)
    except Exception as exc:
        raise fail(f"section META is not valid msgpack ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "mmsb-checkpoint":
        raise fail("section META does not describe an MMSB checkpoint")
    n = meta.get("pages")
    if not isinstance(n, int) or not 0 <= n <= MAX_PAGE_ID:
        raise fail("section META has no valid page count")
    for key, lo, hi, what in _META_INTS:
        value = meta.get(key, 0)
        if not isinstance(value, int) or not lo <= value < hi:
            raise fail(f"section META {key} is not {what}")
    if not 0 <= lsn < MAX_COUNTER or not 1 <= next_delta_id < MAX_COUNTER:
        raise fail(f"header LSN {lsn} or next delta id {next_delta_id} is out of range (both "
                   f"stay below {MAX_COUNTER})", 16)
    if next_page_id < 1 or next_page_id > MAX_PAGE_ID + 1:
        raise fail(f"header next page id {next_page_id} is out of range (page ids stop at "
                   f"{MAX_PAGE_ID})")
    table = get(b"PTBL", n * 25)
    if len(table) != n * 25:
        raise fail(f"section PTBL holds {len(table)} bytes, not the {n * 25} that {n} pages need")
    # The three columns of 64-bit ints lie back to back: one conversion.
    ids, sizes, epochs = np.frombuffer(table, "<i8", 3 * n).astype(np.int64).reshape(3, n)
    locs = np.frombuffer(table, "u1", n, 24 * n).astype(np.uint8)
    total = 0
    if n:
        bad, total = check_table(ids, sizes, epochs, locs, next_page_id, MAX_PAGE_SIZE,
                                 MAX_COUNTER)
        if bad == 1:
            raise fail("section PTBL page ids are not ascending, positive and below the next id")
        if bad:
            raise fail("section PTBL has an impossible size, epoch or location")
        rows = (int(ids[-1]) + 1) * 26
        if rows > _ROWS_FIT and rows > physical_memory():
            raise fail(f"section PTBL names page id {int(ids[-1])}, whose page-table rows "
                       f"({rows:,} bytes) are more than this machine's memory")
    refs_raw = None
    if version in REFS_VERSIONS:
        refs_raw = get(b"PREF")
        data = np.zeros(0, np.uint8)
    else:
        data = np.frombuffer(get(b"PDAT", total), np.uint8)
        if len(data) != total:
            raise fail("section PDAT does not hold exactly the pages' bytes")
    metadata: dict[int, dict[str, Any]] = {}
    raw_meta = meta.get("metadata", {})
    if not isinstance(raw_meta, dict):
        raise fail("section META metadata is not a map")
    # The set of ids (and the sizes by id) only where metadata, masks or edges need it.
    id_set: set[int] = set(ids.tolist()) if raw_meta else set()
    for key, value in raw_meta.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10
                and int(key) in id_set and isinstance(value, dict)):
            raise fail(f"section META has metadata for an unknown page {key!r}")
        if not all(isinstance(k, str) for k in value):
            raise fail(f"section META metadata of page {key} has a key that is not a str")
        problem = metadata_bounds_problem(value)
        if problem is not None:
            raise fail(f"section META metadata of page {key} is out of bounds: {problem}")
        try:
            metadata[int(key)] = decode_metadata(encode_metadata(value), "page metadata") if value else {}
        except (ValueError, TypeError, OverflowError) as exc:
            raise fail(f"section META metadata of page {key} does not encode ({exc})") from None
    masks: dict[int, tuple[np.ndarray, int]] = {}
    mask_raw = get(b"MASK")
    if len(mask_raw) == 1 and mask_raw[0] == 0x90:
        mask_rows = []  # msgpack's empty array, the usual case
    else:
        try:
            mask_rows = msgpack.unpackb(bytes(mask_raw), raw=False, strict_map_key=False,
                                        max_ext_len=0)
        except Exception as exc:
            raise fail(f"section MASK is not valid msgpack ({exc})") from None
    if not isinstance(mask_rows, list):
        raise fail("section MASK is not a list")
    size_of: dict[int, int] = {}
    if mask_rows:
        id_set = id_set or set(ids.tolist())
        size_of = dict(zip(ids.tolist(), sizes.tolist(), strict=True))
    for row in mask_rows:
        if not (isinstance(row, list) and len(row) == 4 and all(isinstance(x, int) for x in row[:3])
                and isinstance(row[3], bytes)):
            raise fail("section MASK has a malformed row")
        pid, anchor, length, packed = row
        if pid not in id_set or length != size_of[pid] or anchor < 0 or len(packed) != (length + 7) // 8:
            raise fail(f"section MASK row for page {pid} does not match the page table")
        masks[pid] = (np.unpackbits(np.frombuffer(packed, np.uint8), count=length).astype(bool), anchor)
    graph_raw = get(b"GRPH")
    if len(graph_raw) < 4:
        raise fail("section GRPH is truncated")
    (m,) = _U32.unpack_from(graph_raw, 0)
    if len(graph_raw) != 4 + m * 17:
        raise fail(f"section GRPH holds {len(graph_raw)} bytes, not the {4 + m * 17} of {m} edges")
    edges: list[tuple[int, int, EdgeType]] = []
    if m:
        parents = np.frombuffer(graph_raw, "<i8", m, 4).tolist()
        children = np.frombuffer(graph_raw, "<i8", m, 4 + 8 * m).tolist()
        types = np.frombuffer(graph_raw, "u1", m, 4 + 16 * m).tolist()
        g = ShadowPageGraph()
        id_set = id_set or set(ids.tolist())
        for p, c, et in zip(parents, children, types, strict=True):
            if p not in id_set or c not in id_set or et > 3 or g.has_edge(p, c):
                raise fail(f"section GRPH edge {p} → {c} names a missing page, an unknown type "
                           "or repeats")
            try:
                g.check_edge(p, c)
            except Exception:
                raise fail(f"section GRPH edge {p} → {c} closes a cycle") from None
            g.add_edge(p, c, EdgeType(et))
            edges.append((p, c, EdgeType(et)))
    from_lsn = meta.get("log_from_lsn", 0)
    if not isinstance(from_lsn, int) or not 0 <= from_lsn <= lsn:
        raise fail("section META has an impossible log start")
    records: Sequence[AnyRecord]
    if not with_log:
        records = []
        first = 0
    elif version == 1:
        records = _records_v1(get(b"TLOG"), lsn, next_page_id, next_delta_id, fail)
        first = records[0].lsn if records else 0
    else:
        records = _records_v2(get(b"TLOG"), lsn, next_page_id, next_delta_id, fail)
        first = records.first_lsn()
    if records and first <= from_lsn:
        raise fail("section TLOG starts before the log start META declares")
    horizon = meta.get("horizon_lsn", 0)
    last_ts = meta.get("last_timestamp", 0)
    if not isinstance(horizon, int) or not isinstance(last_ts, int) or horizon < 0 or horizon > lsn + 1:
        raise fail("section META has an impossible horizon or timestamp")
    bus = meta.get("bus")
    if bus is not None and not (isinstance(bus, dict) and isinstance(bus.get("bus_id"), str)
                                and isinstance(bus.get("generation"), int)
                                and 0 <= bus["generation"] < 1 << 64):
        raise fail("section META has a malformed bus identity")
    base = bytes(get(b"BASE"))
    if base and not base.startswith(MAGIC):
        raise fail("section BASE does not hold a checkpoint")
    refs = None
    if refs_raw is not None:
        refs = decode_refs(refs_raw, ids, sizes, epochs,
                           bus["generation"] if bus is not None else None, fail,
                           runs=version == REFS_VERSION)
        if load is not None:
            data = load(refs)
    snap = CheckpointData(lsn, next_page_id, next_delta_id, ids, sizes, epochs, locs, data,
                          metadata, masks, edges, records, horizon, last_ts, meta,
                          CheckpointBase(base) if base else None, from_lsn, bus)
    snap.page_refs = refs
    return snap


def _records_v1(raw: Any, lsn: int, next_page_id: int, next_delta_id: int,
                fail: Any) -> list[AnyRecord]:
    """A version-1 log section: records one by one (:func:`decode_log`), checked."""
    records = decode_log(raw, fail)
    if records and records[-1].lsn > lsn:
        raise fail(f"section TLOG holds LSN {records[-1].lsn}, past the checkpoint LSN {lsn}")
    for rec in records:
        if isinstance(rec, Delta):
            if rec.page_id >= next_page_id or rec.epoch >= MAX_COUNTER:
                raise fail(f"section TLOG delta at LSN {rec.lsn} names page {rec.page_id} or "
                           f"epoch {rec.epoch}, out of range")
        elif max(kind_of(rec).pages(rec), default=0) >= next_page_id:
            raise fail(f"section TLOG record at LSN {rec.lsn} names a page at or past the "
                       f"next page id {next_page_id}")
    max_delta = max((r.id for r in records if isinstance(r, Delta)), default=0)
    if next_delta_id <= max_delta:
        raise fail("header next delta id is not above the log's deltas")
    return records


def _records_v2(raw: Any, lsn: int, next_page_id: int, next_delta_id: int,
                fail: Any) -> ColumnRecords:
    """A version-2 log section (:func:`decode_columns`), checked and kept as a log:
    its records view, built from the columns without a Delta object."""
    cols = decode_columns(raw, fail)
    why = check_columns(cols, next_page_id)
    if why is not None:
        raise fail(f"section TLOG: {why}")
    top = max(int(cols.lsn[-1]) if len(cols) else 0, cols.structs[-1].lsn if cols.structs else 0)
    if top > lsn:
        raise fail(f"section TLOG holds LSN {top}, past the checkpoint LSN {lsn}")
    for rec in cols.structs:
        if max(kind_of(rec).pages(rec), default=0) >= next_page_id:
            raise fail(f"section TLOG record at LSN {rec.lsn} names a page at or past the "
                       f"next page id {next_page_id}")
    if len(cols) and next_delta_id <= int(cols.ids.max()):
        raise fail("header next delta id is not above the log's deltas")
    return ColumnRecords(cols)


_COLS_HEAD = struct.Struct("<QQQQII")
"""Log section v2 head: rows, structural records, payload bytes, base epochs, sources,
zero."""
_I8, _U4, _U8 = np.dtype("<i8"), np.dtype("<u4"), np.dtype("<u8")
_ROW_BYTES = 4 * 8 + 4 * 4 + 1
"""Bytes of columns per row: lsn, id, epoch, ts (i64); page, psize, plen, src (u32); enc
(u8)."""


def encode_columns(log: TransactionLog, start: int) -> Iterator[Any]:
    """The version-2 log section of ``log``'s records after LSN ``start``, as buffers:
    the head, the columns, base epochs, sources, structural records (each ``len u32 |
    body``), then the payloads back to back, passed through from the log's chunks
    without a copy where rows lie back to back there (see docs/SerializationSpec.md)."""
    cols = log.columns(start, gather=False)
    n = len(cols)
    srcs = b"".join(_U16.pack(len(raw)) + raw for raw in (x.encode("utf-8") for x in cols.sources))
    structs = [b"".join((_U32.pack(len(body)), body))
               for body in (encode_record(rec) for rec in cols.structs)]
    payload_len = int(cols.plen.sum())
    yield _COLS_HEAD.pack(n, len(cols.structs), payload_len, len(cols.base_rows),
                          len(cols.sources), 0)
    for col in (cols.lsn, cols.ids, cols.epoch, cols.ts):
        yield col.astype("<i8").data
    for col in (cols.page, cols.psize, cols.plen, cols.src):
        yield col.astype("<u4").data
    yield cols.enc.astype("u1").data
    yield cols.base_rows.astype("<u8").data
    yield cols.base_epochs.astype("<i8").data
    yield srcs
    yield b"".join(structs)
    yield from log.payload_parts(start)


def decode_columns(raw: Any, fail: Any) -> LogColumns:
    """A version-2 log section back into :class:`LogColumns` (fields are checked by
    ``check_columns``); every count is checked against the bytes that remain before
    anything is allocated for it."""
    buf = memoryview(raw)
    end = len(buf)
    if end < _COLS_HEAD.size:
        raise fail("section TLOG is shorter than its head")
    n, n_structs, payload_len, n_bases, n_sources, zero = _COLS_HEAD.unpack_from(buf, 0)
    pos = _COLS_HEAD.size
    if zero:
        raise fail("section TLOG head has a nonzero reserved field")
    need = n * _ROW_BYTES + n_bases * 16 + n_sources * 2 + n_structs * 4 + payload_len
    if need > end - pos:
        raise fail(f"section TLOG declares {n} rows, {n_bases} base epochs, {n_sources} sources, "
                   f"{n_structs} structural records and {payload_len} payload bytes: more "
                   f"than its {end - pos} bytes")

    # Four columns of each width lie back to back: one conversion each (the rows of
    # the results are contiguous views).
    lsn, ids, epoch, ts = np.frombuffer(buf, _I8, 4 * n, pos).astype(np.int64).reshape(4, n)
    pos += 32 * n
    page, psize, plen, src = np.frombuffer(buf, _U4, 4 * n, pos).astype(np.int64).reshape(4, n)
    pos += 16 * n
    enc = np.frombuffer(buf, np.uint8, n, pos).copy()
    pos += n
    if n_bases:
        base_rows = np.frombuffer(buf, _U8, n_bases, pos)
        if int(base_rows.max()) >= n:
            raise fail("section TLOG base epochs name rows past its rows")
        base_rows = base_rows.astype(np.int64)
        base_epochs = np.frombuffer(buf, _I8, n_bases, pos + 8 * n_bases).astype(np.int64)
        pos += 16 * n_bases
    else:
        base_rows, base_epochs = np.zeros(0, np.int64), np.zeros(0, np.int64)
    sources: list[str] = []
    for _ in range(n_sources):
        if end - pos < 2:
            raise fail("section TLOG ends inside its sources")
        (k,) = _U16.unpack_from(buf, pos)
        pos += 2
        if end - pos < k:
            raise fail("section TLOG ends inside its sources")
        try:
            sources.append(str(buf[pos:pos + k], "utf-8"))
        except UnicodeDecodeError:
            raise fail("section TLOG has a source name that is not UTF-8") from None
        pos += k
    structs: list[AnyRecord] = []
    for _ in range(n_structs):
        if end - pos < 4:
            raise fail("section TLOG ends inside its structural records")
        (k,) = _U32.unpack_from(buf, pos)
        pos += 4
        if k > end - pos:
            raise fail(f"section TLOG structural record at byte {pos - 4} runs past the end")
        try:
            structs.append(decode_record(buf[pos:pos + k], "log record"))
        except SerializationError as exc:
            raise fail(f"section TLOG structural record at byte {pos - 4}: {exc.reason}") from None
        pos += k
    if end - pos != payload_len:
        raise fail(f"section TLOG holds {end - pos} payload bytes, not the {payload_len} its "
                   "head declares")
    payload = np.frombuffer(buf, np.uint8, payload_len, pos)
    return LogColumns(lsn, ids, epoch, ts, page, psize, plen, src, enc, sources, base_rows,
                      base_epochs, payload, structs)


def decode_log(raw: bytes, fail: Any) -> list[AnyRecord]:
    """Records framed as ``len u32 | body`` back to back; LSNs must increase and
    timestamps must not decrease."""
    buf = memoryview(raw)
    out: list[AnyRecord] = []
    pos, end = 0, len(buf)
    prev_lsn, prev_ts = 0, -(1 << 63)
    while pos < end:
        if end - pos < 4:
            raise fail("section TLOG ends inside a record length")
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        if n > end - pos:
            raise fail(f"section TLOG record at byte {pos - 4} runs past the section end")
        body = buf[pos : pos + n]
        fast = _fast_delta(body) if n and body[0] == KIND_DELTA else None
        try:
            rec: AnyRecord = fast if fast is not None else decode_record(body, "log record")
        except SerializationError as exc:
            raise fail(f"section TLOG record at byte {pos - 4}: {exc.reason}") from None
        if rec.lsn <= prev_lsn or rec.timestamp < prev_ts:
            raise fail(f"section TLOG record at byte {pos - 4} breaks LSN or time order")
        if rec.lsn >= MAX_COUNTER:
            raise fail(f"section TLOG record at byte {pos - 4} has LSN {rec.lsn}, out of range")
        prev_lsn, prev_ts = rec.lsn, rec.timestamp
        out.append(rec)
        pos += n
    return out
