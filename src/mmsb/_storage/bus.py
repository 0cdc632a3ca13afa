"""The durable bus: a state whose every record is in a write-ahead log on disk before
the call that made it returns, with checkpoints and crash recovery.

Directory layout::

    DIR/LOCK                         flock()ed by the one writer process
    DIR/BUS                          identity: magic, version, bus id, creation time, CRC
    DIR/checkpoints/ckpt-<gen>.mmsb  checkpoint of generation <gen> (16 hex digits)
    DIR/checkpoints/pages            the checkpoints' page store (pagestore.py): an
                                     exclusive writer's checkpoint writes only the pages
                                     changed since the last one there, and names them
    DIR/wal/wal-<gen>-<seq>.log      log segments written after checkpoint <gen>
    DIR/map/HEAD, table, pages       the mapped pages readers attach to (mapped.py)
    DIR/map/stats                    the writer's latency counters (stats_file.py)

Recovery = the newest checkpoint + the segments of its generation, in order. Older
generations' segments hold only records that a checkpoint already covers; segments of
another bus or generation are never replayed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

from .._core.delta import Delta
from .._core.log import (
    ColumnRecords,
    DeferredLog,
    LogColumns,
    TransactionLog,
    join_records,
    load_history,
)
from .._core.page_table import LIVE
from .._core.records import AnyRecord, Compacted, PageClone, PageResize, kind_of
from .._core.snapshot import ReplayBase
from ..config import MMSBConfig
from ..errors import (
    BusLockedError,
    DurabilityError,
    HistoryUnavailableError,
    InvalidArgumentError,
    MMSBError,
    NotLeaderError,
    SerializationError,
)
from . import fsops
from .checkpoint import (
    REFS_VERSIONS,
    CheckpointBase,
    read_checkpoint,
    read_checkpoint_front,
    read_checkpoint_head,
    write_checkpoint,
)
from .codec import crc32c
from .fastbatch import commit_staged, stage_write, unstage
from .fastwrite import FastWriter, durable_write_small
from .feed import _WAL_RE, TICK_NS, ChangeFeed
from .fsops import fsync_dir
from .histmap import MappedSegment, map_replayed
from .mapped import Publisher
from .pagestore import STORE_NAME, PageRefs, PageStore
from .stats_file import PUBLISH_EVERY, publish_stats
from .wal import (
    SEG_HEADER_SIZE,
    SegmentScan,
    SegmentWriter,
    records_frame,
    scan_segment,
    segment_header,
)
from .walbulk import F_PAGE, base_epochs, slice_columns

if TYPE_CHECKING:
    from .._core.engine import MMSBState

__all__ = ["DurableBus", "open_bus", "recover_readonly", "BUS_MAGIC", "bus_files",
           "BusChangedError", "bus_identity", "apply_frames"]

log = logging.getLogger("mmsb.bus")

BUS_MAGIC = b"MMSBBUS\0"
BUS_VERSION = 1
_BUS = struct.Struct("<8sHHQQ")
_U32 = struct.Struct("<I")
_CKPT_RE = re.compile(r"^ckpt-([0-9a-f]{16})\.mmsb\Z")
_CKPT_LINES = re.compile(r"^ckpt-([0-9a-f]{16})\.mmsb$", re.MULTILINE)
""":data:`_CKPT_RE` over names joined by newlines."""
_SMALL_SEGMENT = 4096
"""A segment of at most this many bytes (a few dozen records: what a reopen after a
kill usually finds after the newest checkpoint) is read frame by frame: decoding and
applying columns costs a fixed 0.2–0.3 ms of numpy calls that so few records never
win back."""
_SHORT_RUN = 16
"""Runs of fewer deltas are checked and applied one by one (as a shared writer's
catch-up applies a few records), not vectorised."""
_SEEN = 1 << 16
"""Bytes a read-only open keeps of what it saw where it found a segment damaged."""
BULK_SCAN = True
"""Recovery decodes runs of deltas in the log segments in bulk, into columns
(:mod:`~mmsb._storage.walbulk`); False reads every frame into record objects (the
reference the bulk reader is tested against)."""
MAP_HISTORY = True
"""Opening a bus for exclusive use keeps the rows of the one-run deltas it replays
from the current generation's segments pointing at their frames there, through a
read-only mapping of each segment (histmap.py), as the live bus keeps the rows of its
one-run small writes; False copies every payload into memory (the reference the
mapped rows are tested against)."""
MAP_MIN_BYTES = 1 << 18
"""A replayed segment whose frames take fewer bytes keeps its payloads in RAM: mapping
it and pointing its rows there costs about 0.2 ms of the open (a file opened, mapped
and checked, a dozen vectorised passes), which the few kilobytes of payload of the
short tail a kill leaves after the newest checkpoint never win back (a reopen after a
kill is timed against SQLite's open)."""
DEFER_HISTORY = True
"""Opening a bus for exclusive use reads the retained history in its checkpoints the
first time something needs it (:class:`~mmsb._core.log.DeferredLog`); False reads it
at open (the reference the deferred log is tested against). Shared writers and
read-only opens always read it at open: another writer's checkpoint may remove the
files before they would be read."""


def _ckpt_name(gen: int) -> str:
    return f"ckpt-{gen:016x}.mmsb"


def _wal_name(gen: int, seq: int) -> str:
    return f"wal-{gen:016x}-{seq:08x}.log"


@dataclass
class _Ckpt:
    generation: int
    lsn: int
    log_from_lsn: int
    path: Path
    base_len: int = -1
    """Bytes of the replay base the file nests (0: none; -1: not known here). Recorded in
    the chain rows of later checkpoints, so that an open learns whether the chain's
    start nests one without reading that file."""


def bus_files(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """The checkpoint and segment files of a bus directory, oldest first."""
    r = Path(root)
    return {"checkpoints": _names(r / "checkpoints", _CKPT_RE), "wal": _names(r / "wal", _WAL_RE)}


def _names(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    """The files in ``folder`` whose names match ``pattern``, sorted (one listing)."""
    try:
        # (iterdir makes each child's path without parsing its name again, as ``/`` does.)
        found = [p for p in folder.iterdir() if pattern.match(p.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found.sort(key=_name_of)
    return found


_BUS_ENTRIES = frozenset({"BUS", "LOCK", "WRITE", "checkpoints", "wal", "map"})
"""What a bus directory holds of its own (its identity, its locks, its folders)."""


def bus_part_at(path: str | os.PathLike[str]) -> str | None:
    """What of a bus ``path`` would replace, where it lies in a bus directory's own
    entries (its identity or lock files, or anything in its checkpoints, wal or map
    folder; links in the folders above it resolved): a description naming the bus
    directory, else None. A file written there (an export) would break that bus."""
    target = Path(os.path.realpath(os.path.dirname(os.path.abspath(path))))
    name = os.path.basename(os.fspath(path))
    if name in _BUS_ENTRIES and os.path.lexists(target / "BUS"):
        return f"in place of the {name} of the bus directory {target}"
    if target.name in ("checkpoints", "wal", "map") and os.path.lexists(target.parent / "BUS"):
        return f"inside the {target.name} folder of the bus directory {target.parent}"
    return None


def _name_of(p: Path) -> str:
    return p.name


class _Listed:
    """The checkpoints of a bus folder by generation, from one listing of its names.
    A path is made only when asked for: an open needs two or three of them, whatever
    the number of checkpoints."""

    __slots__ = ("folder", "names", "_paths", "_gens")

    def __init__(self, folder: Path, names: list[str]) -> None:
        self.folder = folder
        joined = "\n".join(names)
        if joined.count("\n") + 1 == len(names):
            # One match over all the names (none holds a newline): a listing of many
            # checkpoints costs a scan, not a match per name.
            found = _CKPT_LINES.findall(joined)
        else:
            found = [m.group(1) for n in names if (m := _CKPT_RE.match(n))]
        self.names = {int(h, 16): f"ckpt-{h}.mmsb" for h in found}
        self._paths: dict[int, Path] = {}
        self._gens: np.ndarray | None = None

    def __contains__(self, gen: int) -> bool:
        return gen in self.names

    def __getitem__(self, gen: int) -> Path:
        path = self._paths.get(gen)
        if path is None:
            path = self._paths[gen] = self.folder / self.names[gen]
        return path

    def generations(self) -> np.ndarray:
        """The listed generations, ascending (int64)."""
        if self._gens is None:
            self._gens = np.array(sorted(self.names), np.int64)
        return self._gens

    def __len__(self) -> int:
        return len(self.names)

    def older_than(self, gen: int) -> list[Path]:
        """The paths of the checkpoints before generation ``gen``."""
        if not self.names or min(self.names) >= gen:
            return []
        return [self[g] for g in self.names if g < gen]


class DurableBus:
    """The disk side of one state: the segment writer, group commit, checkpoints."""

    def __init__(self, root: Path, bus_id: int, config: MMSBConfig, lock_fd: int) -> None:
        self.root = root
        self.bus_id = bus_id
        self.config = config
        self.lock_fd = lock_fd
        self.generation = 0
        self.ckpt_lsn = 0
        self._retained: list[_Ckpt] | None = []
        self._chain: tuple[np.ndarray, _Listed] | None = None
        """The retained chain as an open found it (rows of generation, LSN, log start,
        nested base bytes; and the listing naming the files), until :attr:`retained`
        is first asked for."""
        self.writer: SegmentWriter | None = None
        self.failed: BaseException | None = None
        self.io_lock = threading.Lock()
        self.records_since_ckpt = 0
        self.last_ckpt_time = time.monotonic()
        self.reset_chain = False
        self.next_seq = 0
        """Sequence number of the next segment of this generation (when none is open)."""
        self._retry_after = 0
        self.unsynced: list[Path] = []
        """Segments recovery replayed without a checkpoint, not known to be on stable
        storage: synced before the next segment is created, or by a flush."""
        self.recovery_notes: list[str] = []
        self.torn_tails = 0
        self.closed = False
        self.closing = False
        """close() has begun: its final checkpoint starts no background thread."""
        self.opened = False
        """The open succeeded: before, a checkpoint of recovery starts no background
        thread (an open that fails after it would leave the thread behind)."""
        self.read_only = False
        """Recovery only: nothing on disk is changed (open_readonly)."""
        self._stop: threading.Event | None = None
        """Set to end the background thread (made when the thread is started)."""
        self._syncer: threading.Thread | None = None
        self.fds = {}
        self.ship: Callable[[int, int, bytes], None] | None = None
        """The replication shipper's queue (first LSN, last LSN, frames), called with
        each append once it is in the log; None when the bus does not replicate."""
        self.not_leader: str | None = None
        """Why writes are refused (a follower, or a leader fenced off); None: a leader."""
        self.entered_at = 0
        """The log's last LSN when the current outermost call began (set by the state)."""
        self.replication: Any = None
        """The replication role attached to this bus (leader or follower), told of
        checkpoints (``after_checkpoint``), of call ends (``after_call``) and of close
        (``close``)."""
        self.damage_seen: dict[Path, tuple[int, bytes]] = {}
        """Read-only opens: the bytes seen where a segment was found damaged."""
        self.raw_seen: dict[Path, bytes] = {}
        """Read-only opens: the bytes of each checkpoint read (a replay base is kept as
        bytes, since the writer may remove its file)."""
        self.vanished = False
        """A file listed for recovery was gone when read (read-only opens retry)."""
        self.publisher: Publisher | None = None
        """Keeps the mapped pages (DIR/map) equal to the state, for attached readers."""
        self.shared = False
        """Other processes may write this bus too: each call takes DIR/WRITE and catches
        up with their records first."""
        self.write_fd = -1
        self.held = False
        """This process holds DIR/WRITE (a call of a shared writer is in progress)."""
        self.feed: ChangeFeed | None = None
        """Reads the records other writers appended (shared writers)."""
        self.dir_stamps: tuple[int, int] | None = None
        """The folders' modification times when this writer last released DIR/WRITE."""
        self.stats_of: Callable[[], MMSBState | None] | None = None
        """The state whose latency counters go to DIR/map/stats (a weak reference)."""
        self._stats_seen: tuple[int, ...] = ()
        self._superseded: list[Path] | tuple[_Listed, int] = []
        """:attr:`superseded`, or the listing and generation it is made from when
        first asked for (an open that finds them lists their names, makes no path)."""
        self.map_history = False
        """Recovery points the rows of one-run deltas at their frames in the segments
        it replays (see :data:`MAP_HISTORY`); set by an exclusive open."""
        self.use_store = False
        """Checkpoints keep their pages in the page store (DIR/checkpoints/pages) and
        write only the pages changed since the last one: an exclusive writer's. Shared
        writers (whose processes would each need the store's free space) write
        self-contained checkpoints."""
        self.store: PageStore | None = None
        """The page store, opened by the first checkpoint that uses it."""
        self.open_refs: PageRefs | None = None
        """The page references of the newest checkpoint found at open (None: it holds
        its pages itself)."""

    @property
    def superseded(self) -> list[Path]:
        """Checkpoints older than the retained chain that recovery found (a crash left
        them before retention removed them): ignored by every recovery, and removed by
        the next automatic checkpoint or the close (see :meth:`drop_superseded`), not
        by the open."""
        found = self._superseded
        if isinstance(found, tuple):
            listed, oldest = found
            found = self._superseded = listed.older_than(oldest)
        return found

    @superseded.setter
    def superseded(self, paths: list[Path]) -> None:
        self._superseded = paths

    @property
    def retained(self) -> list[_Ckpt]:
        """The retained chain of checkpoints, oldest first (made from the rows an open
        found when first asked for: the open itself never needs it)."""
        if self._retained is None:
            assert self._chain is not None
            rows, by_gen = self._chain
            self._retained = [_Ckpt(g, at, start, by_gen[g], base)
                              for g, at, start, base in rows.tolist()]
            self._chain = None
        return self._retained

    @retained.setter
    def retained(self, chain: list[_Ckpt]) -> None:
        self._retained = chain
        self._chain = None

    def _take_chain(self, rows: np.ndarray, by_gen: _Listed) -> None:
        self._retained = None
        self._chain = (rows, by_gen)

    def oldest_generation(self) -> int:
        """The generation of the oldest retained checkpoint (0: none)."""
        if self._retained is None:
            assert self._chain is not None
            return int(self._chain[0][0, 0])
        return self._retained[0].generation if self._retained else 0

    @cached_property
    def ckpt_dir(self) -> Path:
        """DIR/checkpoints (made when first used: an open lists it by its name)."""
        return self.root / "checkpoints"

    @cached_property
    def wal_dir(self) -> Path:
        """DIR/wal (made when first used)."""
        return self.root / "wal"

    @cached_property
    def fast(self) -> FastWriter:
        """What the one-frame small write keeps between calls (see fastwrite.py): made
        by the first call that uses it (an open that writes nothing makes none)."""
        return FastWriter(self.config.fsync == "always", self.config.segment_bytes)

    # -- reading (recovery) ----------------------------------------------------------
    fds: dict[Path, int]
    """Files opened ahead of recovery (read-only opens), read from these descriptors so
    that a writer's retention removing them meanwhile does not matter."""

    def read_bytes(self, path: Path) -> bytes:
        """A bus file's bytes: from its descriptor opened ahead, else opened no-follow."""
        # (A writer's open has no descriptors opened ahead: its paths are not hashed.)
        fd = self.fds.get(path) if self.fds else None
        return fsops.read_fd(fd) if fd is not None else fsops.read_all(path)

    def read_checkpoint(self, path: Path, with_log: bool = True, pages: bool = True) -> Any:
        """Read and check one checkpoint of this bus (``with_log=False``: its log section
        neither decoded nor kept; a writer's open neither reads nor checks its bytes, and
        reads the page bytes into memory the restore then takes as its own, see
        ``read_checkpoint_front``).
        ``pages=False``: a checkpoint whose pages are in the page store is read without
        them (for its log alone).

        Raises:
            SerializationError: unreadable (gone, not a regular file) or damaged.
        """
        if not with_log and not self.read_only and not (self.fds and path in self.fds):
            # Its page store is the one beside it, in this bus's checkpoints folder.
            return read_checkpoint_front(path, f"{self.root}/checkpoints/{STORE_NAME}")
        try:
            raw = self.read_bytes(path)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                self.vanished = True
            raise SerializationError(f"cannot read the checkpoint ({exc.strerror or exc})",
                                     path=path) from None
        if self.read_only:
            self.raw_seen[path] = raw
        return read_checkpoint(raw, path_label=str(path), with_log=with_log,
                               store=self.ckpt_dir / STORE_NAME, pages=pages)

    def scan_segment(self, path: Path, seq: int, first_lsn: int) -> SegmentScan:
        """Read and check one segment of the current generation (see scan_segment)."""
        try:
            data = self.read_bytes(path)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                self.vanished = True
            out = SegmentScan(path)
            out.damage = SerializationError(f"cannot read the segment ({exc.strerror or exc})",
                                            path=path)
            return out
        scan = scan_segment(path, self.bus_id, self.generation, seq, first_lsn, data,
                            columns=BULK_SCAN and len(data) > _SMALL_SEGMENT)
        damage = scan.damage
        if self.read_only and damage is not None and damage.offset and scan.version >= 2:
            # A live writer may have been writing into the space written ahead while
            # the file was read (a read copies it page by page, so it can see a later
            # frame but not an earlier one still being written): keep what was seen at
            # the damage, to tell the two apart (see moved_under).
            self.damage_seen[path] = (damage.offset, data[damage.offset:damage.offset + _SEEN])
        return scan

    def moved_under(self) -> bool:
        """Whether a segment found damaged by this read-only open holds other bytes now
        where the damage was: a writer was writing there while it was read, so the
        damage was the read's, not the file's."""
        for path, (off, seen) in self.damage_seen.items():
            fd = self.fds.get(path)
            try:
                now = os.pread(fd, len(seen), off) if fd is not None else b""
            except OSError:
                return True
            if now != seen:
                return True
        return False

    # -- appending ---------------------------------------------------------------------
    write_small = durable_write_small
    """``state.write_small_bytes`` on this bus: the one-frame path of a small write, or
    None when the general path must take the call (see fastwrite.py)."""
    stage_write = stage_write
    unstage = unstage
    commit_staged = commit_staged
    """A batch's writes staged, and written and published in one call at its end, or
    made held records for the general path (see fastbatch.py)."""

    def sink(self, rec: AnyRecord) -> None:
        self.sink_many([rec])

    def sink_many(self, records: list[AnyRecord]) -> None:
        """Append records to the log before they take effect. With ``fsync="always"``
        they are on stable storage when this returns; otherwise in the kernel.

        Raises:
            DurabilityError: the bus failed earlier, or this write or fsync failed (then
                it refuses every later write).
            NotLeaderError: the bus is a follower, or a leader a newer term fenced off.
        """
        if self.not_leader is not None:
            raise NotLeaderError(self.not_leader)
        # A batch is one frame: after a crash it is in the log whole, or not at all.
        data = records_frame(records)
        if self.publisher is not None:
            self.publisher.note(records)
        self.append_frames(data, records[0].lsn, records[-1].lsn, self.config.fsync == "always")

    def append_frames(self, data: bytes | memoryview, first: int, last: int, sync: bool) -> None:
        """Append ``data`` (whole frames holding the records ``first`` … ``last``, in LSN
        order) to the log; ``sync``: on stable storage when this returns. A follower
        appends its leader's frames here byte for byte. The replication shipper, when
        there is one, gets the frames once they are in the log. (The caller tells the
        publisher which pages the records change.)

        Raises:
            DurabilityError: as :meth:`sink_many`.
        """
        if self.failed is not None:
            raise DurabilityError(
                f"the bus at {self.root} refuses writes: an earlier write or fsync failed "
                f"({self.failed}); stop it and reopen it to recover")
        with self.io_lock:
            stage = "segment"
            try:
                if self.writer is None or self.writer.size >= self.config.segment_bytes:
                    self._roll()
                assert self.writer is not None
                stage = "append"
                before = self.writer.size
                self.writer.append(data)
                feed = self.feed
                if feed is not None and feed.seg is not None:
                    seg = feed.seg
                    if ((seg.gen, seg.seq) == (self.writer.generation, self.writer.seq)
                            and seg.pos == before):
                        # A shared writer's own records: its feed need not read them back.
                        seg.pos = self.writer.size
                        feed.next_lsn = last + 1
                if sync:
                    stage = "fsync"
                    self.writer.sync()
                if self.publisher is not None:
                    self.publisher.note_append(self.generation, self.writer.seq,
                                               self.writer.size, last)
                if self.ship is not None:
                    # In LSN order (under io_lock); the shipper only queues them.
                    self.ship(first, last, bytes(data))
            except OSError as exc:
                if self.failed is None and (stage == "segment" or (
                        stage == "append" and self.writer is not None and self.writer.intact)):
                    # Nothing of this write is in the log (a new segment is removed again,
                    # a partial append cut back): refuse it alone, and go on once the
                    # cause (a full disk, say) is gone.
                    raise DurabilityError(
                        f"writing the log at {self.root} failed ({exc.strerror or exc}); this "
                        "write was not applied or logged, and the bus goes on") from exc
                self.failed = exc
                raise DurabilityError(
                    f"writing the log at {self.root} failed ({exc.strerror or exc}); the bus "
                    "refuses further writes") from exc
        self.records_since_ckpt += last - first + 1

    def _roll(self) -> None:
        """Start the next segment of the current generation (caller holds io_lock)."""
        seq = self.next_seq
        if self.writer is not None:
            seq = self.writer.seq + 1
            old, self.writer = self.writer, None
            self.next_seq = seq
            try:
                # Sealed: cut to its last frame (this writer's size is the log's end: a
                # shared writer caught up before its call), then synced.
                old.close(seal=True)
            except OSError:
                # Its records may not be durable: the power-loss guarantee is gone.
                self.failed_sync(old)
                raise
        self._sync_unsynced()
        self.writer = SegmentWriter(self.wal_dir / _wal_name(self.generation, seq), self.bus_id,
                                    self.generation, seq, self.config.segment_bytes,
                                    self.config.fsync == "always")
        self.next_seq = seq + 1
        self._note_position()
        self.start()

    def _sync_unsynced(self) -> None:
        """Make the segments recovery replayed without a checkpoint durable (caller holds
        io_lock; the page cache of this boot still holds what a killed writer wrote).

        Raises:
            OSError: a sync failed (they stay listed, to be synced again).
        """
        while self.unsynced:
            path = self.unsynced[0]
            try:
                fd = fsops.open_regular(path, os.O_RDONLY)
            except FileNotFoundError:
                self.unsynced.pop(0)  # a checkpoint replaced it
                continue
            try:
                fsops.fdatasync(fd, path)
            finally:
                os.close(fd)
            self.unsynced.pop(0)

    def _note_position(self) -> None:
        """Tell the head (and so the other writers of a shared bus) which segment the
        log continues in, after a roll or a checkpoint."""
        if self.publisher is not None:
            lsn = self.publisher.log_end()[3]
            w = self.writer
            self.publisher.note_append(self.generation, w.seq if w else self.next_seq,
                                       w.size if w else 0, lsn)

    def abandon(self, why: str) -> None:
        """Close without the final checkpoint: the state in memory is not to be kept
        (an open refused after recovery, a follower's copy that is recovered again).
        What the log holds stays as it is."""
        if self.failed is None:
            self.failed = OSError(why)

    def failed_sync(self, writer: SegmentWriter) -> None:
        self.failed = OSError(f"fsync of {writer.path.name} failed")

    def publish_stats(self) -> None:
        """Copy the writer's latency counters to DIR/map/stats (see stats_file.py) when
        they changed since the last copy. Called at checkpoints and from the writer's
        background thread, never from a write call. Raises OSError."""
        state = self.stats_of() if self.stats_of is not None else None
        if state is None or self.read_only or self.closed:
            return
        c = state.counters
        seen = (id(c), c.delta_apply.count, c.propagation.count, c.log_append.count,
                c.checkpoint.count)
        if seen != self._stats_seen:
            publish_stats(self.root / "map", c, state.log.last_lsn)
            self._stats_seen = seen

    def _sync_loop(self) -> None:
        """The writer's background thread: the group commit (``fsync="batch"``) and, in
        every mode, the latency counters to DIR/map/stats at most once a second."""
        syncing = self.config.fsync == "batch"
        interval = max(self.config.fsync_batch_ms, 0.1) / 1000.0 if syncing else PUBLISH_EVERY
        next_stats = time.monotonic() + PUBLISH_EVERY
        stop = self._stop
        assert stop is not None  # (made before the thread was started)
        while not stop.wait(interval):
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + PUBLISH_EVERY
                try:
                    self.publish_stats()
                except Exception as exc:  # the group commit must go on whatever happens here
                    log.warning("publishing the latency counters of %s failed: %s",
                                self.root, exc)
            if not syncing:
                continue
            with self.io_lock:
                w = self.writer
                if w is None or not w.dirty or self.failed is not None:
                    continue
                # Sync a duplicate of the descriptor outside the lock, so that writers
                # keep appending during the fsync (appends after this point mark the
                # segment dirty again; a segment closed meanwhile is synced by its close).
                try:
                    fd = os.dup(w.fd)
                except OSError as exc:
                    self.failed = exc
                    log.error("group commit could not sync %s: %s; the bus refuses writes",
                              self.root, exc)
                    continue
                w.dirty = False
                path = w.path
            try:
                fsops.fdatasync(fd, path)
            except OSError as exc:
                with self.io_lock:
                    self.failed = exc
                log.error("group commit fsync failed at %s: %s; the bus refuses writes",
                          self.root, exc)
            finally:
                os.close(fd)

    def start(self) -> None:
        """Start the background thread (group commit, latency counters) if it is not
        running: when the log has a segment to sync, so that opening a bus that is then
        only read starts no thread. A bus not (yet) open, or closing, starts none."""
        if self._syncer is None and self.opened and not self.closing:
            name = "mmsb-group-commit" if self.config.fsync == "batch" else "mmsb-stats"
            self._stop = threading.Event()
            self._syncer = threading.Thread(target=self._sync_loop, name=name, daemon=True)
            self._syncer.start()

    def flush(self) -> None:
        """Make every appended record durable now.

        Raises:
            DurabilityError: the bus failed earlier, or this fsync failed.
        """
        if self.failed is not None:
            raise DurabilityError(f"the bus at {self.root} failed earlier ({self.failed}); "
                                  "nothing more can be made durable")
        with self.io_lock:
            try:
                self._sync_unsynced()
                if self.writer is not None:
                    self.writer.sync()
            except OSError as exc:
                self.failed = exc
                raise DurabilityError(f"fsync of the log at {self.root} failed ({exc})") from exc

    # -- around each call ----------------------------------------------------------------
    def before_call(self, state: MMSBState) -> set[int]:
        """Start of a changing call of a shared writer: take DIR/WRITE (waiting for the
        other writers' calls) and apply the records they appended since this process
        last looked. Returns the pages those records changed.

        Raises:
            DurabilityError: the other writers' records could not be read or applied
                (the lock is released again; nothing changed here).
        """
        fcntl.flock(self.write_fd, fcntl.LOCK_EX)
        self.held = True
        try:
            return self._catch_up(state)
        except BaseException:
            self.end_call()
            raise

    def end_call(self) -> None:
        """Release DIR/WRITE (the end of a shared writer's call)."""
        if self.held:
            self.held = False
            try:
                stamps = self._dir_stamps()
            except OSError:
                stamps = None
            # Folder times are coarse: trust them only when the last change is well past
            # (a change in the same tick would not move them).
            now = time.time_ns()
            self.dir_stamps = stamps if stamps and now - max(stamps) > TICK_NS else None
            fcntl.flock(self.write_fd, fcntl.LOCK_UN)

    def _dir_stamps(self) -> tuple[int, int]:
        """Modification times of the segment and checkpoint folders: a roll or a
        checkpoint by another writer (even one that died before telling the head)
        changes them."""
        return (os.stat(self.wal_dir).st_mtime_ns, os.stat(self.ckpt_dir).st_mtime_ns)

    def after_call(self, state: MMSBState) -> None:
        """End of a call that held the state's lock: show its changes to attached
        readers (and wake followers), then checkpoint if one is due."""
        if self.publisher is not None:
            self.publisher.publish(state)
        self.maybe_checkpoint(state)
        if self.replication is not None:
            self.replication.after_call(state)

    def after_unlock(self, lsn: int) -> None:
        """A call that ended at LSN ``lsn`` gave the state's lock back: the replication
        leader waits here for its acknowledgements, so that other threads' calls go on
        meanwhile (and their acknowledgements arrive together).

        Raises:
            DurabilityError: not acknowledged in time; NotLeaderError: fenced off.
        """
        if self.replication is not None:
            self.replication.wait_acks(lsn)

    def _catch_up(self, state: MMSBState) -> set[int]:
        """Apply what other writers appended (caller holds DIR/WRITE), point this
        writer's segment at the log's end and cut a record a dead writer left torn."""
        assert self.publisher is not None
        gen, seq, end, lsn = self.publisher.log_end()
        w = self.writer
        mine = state.log.last_lsn
        dirs = self._dir_stamps()
        if (lsn == mine and w is not None and (gen, seq) == (w.generation, w.seq)
                and w.size == end and dirs == self.dir_stamps and w.clear_after()):
            return set()
        if self.feed is not None and self.feed.next_lsn <= mine + 1:
            # It skips this writer's own records (at most one segment's worth) by LSN.
            self.feed.next_lsn = mine + 1
        else:
            if self.feed is not None:
                self.feed.close()
            self.feed = ChangeFeed(self.root, self.bus_id, mine,
                                   lambda: self._recovered_log(state),
                                   lambda: self.publisher.log_end()[3] if self.publisher else 0)
        try:
            recs = self.feed.poll()
        except (SerializationError, HistoryUnavailableError, OSError) as exc:
            raise DurabilityError(f"reading what other writers of {self.root} appended failed "
                                  f"({exc}); nothing was changed here") from exc
        changed: set[int] = set()
        if len(recs) > 16:
            scan = SegmentScan(self.root / "wal")
            scan.records = recs
            scan.offsets = [0] * len(recs)
            good = _apply_checked(state, scan, self.root / "wal")
            if good < len(recs):
                raise DurabilityError(f"a record another writer of {self.root} appended does "
                                      f"not follow this process's state ({scan.refused}); "
                                      "stop this writer and reopen the bus")
        else:
            # A few records (writers taking turns): one by one, as recovery checks them.
            for rec in recs:
                why = state.check_record(rec)
                if why is not None:
                    raise DurabilityError(f"a record another writer of {self.root} appended "
                                          f"does not follow this process's state (the log "
                                          f"holds {why}); stop this writer and reopen the bus")
                state.apply_record(rec)
                state.log.adopt(rec)
        if recs:
            for r in recs:
                pid = getattr(r, "page_id", None)
                if pid is not None:
                    changed.add(pid)
            self.records_since_ckpt += len(recs)
            # A writer that died after appending may never have published these.
            self.publisher.note(recs)
        if state.log.last_lsn < lsn:
            raise DurabilityError(f"the log of {self.root} ends at LSN {lsn} but only LSN "
                                  f"{state.log.last_lsn} could be read; nothing was changed here")
        seg = self.feed.seg
        if seg is not None:
            gen, seq = seg.gen, seg.seq
        newest = 0
        if self.dir_stamps is None or dirs[1] != self.dir_stamps[1]:
            newest = max((int(m.group(1), 16) for name in os.listdir(self.ckpt_dir)
                          if (m := _CKPT_RE.match(name))), default=0)
        if newest > gen:
            # A writer died after its checkpoint was in place but before the checkpoint's
            # first segment existed (or before it told the head): the log goes on in
            # that generation, not after the records the checkpoint holds.
            gen, seq = newest, 0
        if gen != self.generation:
            self._refresh_chain(gen)
        with self.io_lock:
            if self.writer is None or (self.writer.generation, self.writer.seq) != (gen, seq):
                if self.writer is not None:
                    try:
                        self.writer.close()
                    except OSError as exc:
                        self.failed = exc
                        raise DurabilityError(f"closing a log segment of {self.root} failed "
                                              f"({exc})") from exc
                    self.writer = None
                path = self.wal_dir / _wal_name(gen, seq)
                known = seg.pos if seg is not None and (seg.gen, seg.seq) == (gen, seq) else None
                try:
                    self.writer = SegmentWriter.reopen(path, self.bus_id, gen, seq,
                                                       self.config.segment_bytes, known,
                                                       self.config.fsync == "always")
                except FileNotFoundError:
                    self.writer = None
                    self.next_seq = seq
                else:
                    self.next_seq = seq + 1
            w = self.writer
            if w is not None:
                if seg is not None and (seg.gen, seg.seq) == (gen, seq):
                    w.size = seg.pos
                else:
                    w.find_end()
                valid = w.size
                if not w.clear_after():
                    # A writer died in the middle of an append: cut its torn record (and
                    # the space written ahead after it; the next append writes ahead again).
                    fsops.truncate(w.fd, valid, w.path)
                    w.allocated = valid
                    self.recovery_notes.append(f"{w.path.name}: a torn record another writer "
                                               f"left at byte {valid} was cut off")
                self.publisher.note_append(gen, seq, valid, state.log.last_lsn)
        return changed

    def _recovered_log(self, state: MMSBState) -> Any:
        """The retained history on disk (checkpoints and log), read as a read-only open
        reads it, for a shared writer that fell behind a checkpoint of another."""
        fresh = type(state)(state.config)
        recover_readonly(fresh, self.root)
        return fresh.log

    def _refresh_chain(self, gen: int) -> None:
        """Another writer checkpointed: learn the chain of checkpoints now on disk."""
        by_gen = _Listed(self.ckpt_dir, _listdir(self.ckpt_dir))
        if gen not in by_gen:
            raise DurabilityError(f"the log of {self.root} is at generation {gen}, whose "
                                  "checkpoint is missing")
        chain = _read_chain(self, by_gen, gen)
        self.generation = gen
        self.ckpt_lsn = chain[-1][1].lsn
        self.retained = [_Ckpt(g, ck.lsn, ck.log_from_lsn, by_gen[g], _nested_len(ck))
                         for g, ck in chain]
        self.records_since_ckpt = 0

    # -- checkpoints -------------------------------------------------------------------
    def maybe_checkpoint(self, state: MMSBState) -> None:
        """Checkpoint when ``max_tlog_size`` records or ``checkpoint_interval`` seconds
        have passed since the last one. A failed automatic checkpoint is logged and
        retried later; the log still holds everything."""
        n = self.records_since_ckpt
        if n == 0 or self.failed is not None:
            return
        interval = self.config.checkpoint_interval
        due = n >= self.config.max_tlog_size + self._retry_after or (
            interval > 0 and time.monotonic() - self.last_ckpt_time >= interval)
        if not due:
            return
        self.drop_superseded()
        try:
            self.checkpoint(state)
        except (OSError, MMSBError) as exc:
            # Retry after another max_tlog_size records or checkpoint_interval seconds.
            self.last_ckpt_time = time.monotonic()
            self._retry_after = n
            log.warning("automatic checkpoint of %s failed: %s", self.root, exc)
        else:
            self._retry_after = 0

    def checkpoint(self, state: MMSBState, *, evict: bool = True, need_segment: bool = True) -> Path:
        """Write checkpoint generation+1 (caller holds the state's lock), start its log
        segment, then drop what it makes redundant: older generations' segments and
        checkpoints beyond ``retain_checkpoints``. ``evict=False`` (the checkpoints of
        stop and recovery) keeps every retained checkpoint, so closing and reopening a
        bus never shortens its history; the next regular checkpoint evicts.
        ``need_segment=False`` (stop, compress_log, load_checkpoint): a first segment that
        cannot be created is left to the next write or open, without an error.

        Raises:
            DurabilityError: the checkpoint could not be written (nothing changed), or
                it was written and is in force but its first log segment could not be
                created (the next write creates it; until then the disk must have room).
        """
        if self.failed is not None:
            raise DurabilityError(f"the bus at {self.root} failed earlier ({self.failed}); "
                                  "no checkpoint is written")
        t0 = time.perf_counter_ns()
        gen = self.generation + 1
        lsn = state.log.last_lsn
        full = self.reset_chain or self.generation == 0
        keep = self.config.retain_checkpoints
        path = self.ckpt_dir / _ckpt_name(gen)
        new = _Ckpt(gen, lsn, 0 if full else self.ckpt_lsn, path)
        kept = [] if full else list(self.retained)
        kept.append(new)
        if keep is not None and len(kept) > keep and evict:
            kept = kept[-keep:]
        # Pages the records since the last checkpoint change (read before history is
        # trimmed): those the page store must write again.
        changed = self._changed_pages(state) if self.use_store and not full else None
        oldest = kept[0]
        # A history still on disk (a reopened bus's) is read for this checkpoint only
        # where it rewrites the log (history older than the oldest kept checkpoint
        # leaves memory) or removes a file the history would be read from (an evicted
        # checkpoint, even one whose records a newer slice also holds).
        rebased = oldest is not new and not self._chain_starts_at(kept)
        alone = oldest is new and not full
        trims = (rebased and oldest.lsn > state.log.horizon_lsn) or alone
        evicts = len(kept) <= len(self.retained)
        saved = state.history_snapshot(rewrites=trims or evicts or full)
        refs: PageRefs | None = None
        try:
            # History older than the oldest kept checkpoint leaves memory first, so that
            # the new file's masks and log describe exactly what recovery will rebuild.
            if rebased:
                if trims:
                    state.trim_log(oldest.lsn)
                state.replay_base = CheckpointBase(oldest.path)
            elif alone:
                # The new checkpoint is the only one kept: it is its own replay base.
                state.trim_log(lsn)
                new.log_from_lsn = lsn
            base = state.base_bytes() if full else b""
            new.base_len = len(base)
            # The chain it closes, oldest first, so that an open learns it from this file
            # alone (the older files are read when the history is): with the length of
            # the replay base each file nests, where this writer knows it.
            info = {"bus_id": f"{self.bus_id:016x}", "generation": gen,
                    "chain_rows": _chain_record(kept)}
            refs = None
            if self.use_store:
                # The pages changed since the last checkpoint go to the page store, synced
                # before the record that names them is written.
                try:
                    refs = self._store_pages(state, gen, kept[0].generation, full, changed)
                except SerializationError as exc:
                    raise DurabilityError(
                        f"checkpoint {path.name} cannot use the page store ({exc}); the "
                        "log still holds every record, and the bus goes on") from exc
            write_checkpoint(state, path, from_lsn=new.log_from_lsn, bus=info, base=base,
                             refs=refs)
        except BaseException as exc:
            state.history_restore(saved)
            if refs is not None and self.store is not None:
                self.store.hold(refs)
            if isinstance(exc, OSError) and os.path.lexists(path):
                # Renamed into place, but its folder's sync failed: after a crash it may
                # be in force, and records appended to this generation's segments after
                # it would then be taken as covered by it. Refuse further writes until
                # the bus is reopened (as after a failed fsync of the log).
                self.failed = exc
                raise DurabilityError(
                    f"checkpoint {path.name} was written but its folder could not be synced "
                    f"({exc.strerror or exc}); the bus refuses further writes until it is "
                    "reopened, and the log holds every record") from exc
            if isinstance(exc, OSError):
                raise DurabilityError(
                    f"writing checkpoint {path.name} failed ({exc.strerror or exc}); the log "
                    "still holds every record, and the bus goes on") from exc
            raise
        if refs is not None and self.store is not None:
            self.store.commit(refs)
        if oldest is new and not full:
            state.replay_base = CheckpointBase(path)
        segment_error: OSError | None = None
        with self.io_lock:
            old_writer = self.writer
            self.generation = gen
            self.writer = None
            self.next_seq = 0
            if old_writer is not None:
                try:
                    old_writer.close()
                except OSError:
                    pass  # the checkpoint, fsynced, holds every record of that segment
            try:
                self.writer = SegmentWriter(self.wal_dir / _wal_name(gen, 0), self.bus_id, gen, 0,
                                            self.config.segment_bytes,
                                            self.config.fsync == "always")
                self.next_seq = 1
            except OSError as exc:
                if need_segment:
                    segment_error = exc
            self._note_position()
        if self.writer is not None:
            self.start()
        self.ckpt_lsn = lsn
        self.reset_chain = False
        self.unsynced = []  # the checkpoint, synced, holds their records
        self.records_since_ckpt = 0
        self.last_ckpt_time = time.monotonic()
        removed = False
        released = True
        try:
            for p in bus_files(self.root)["wal"]:
                m = _WAL_RE.match(p.name)
                if m and int(m.group(1), 16) < gen:
                    _unlink(p)
                    removed = True
            kept_paths = {c.path for c in kept}
            for c in [*self.retained, *([] if not full else self._all_ckpts())]:
                if c.path not in kept_paths:
                    _unlink(c.path)
                    removed = True
            if removed:
                fsync_dir(self.wal_dir, strict=False)
                fsync_dir(self.ckpt_dir, strict=False)
        except OSError as exc:
            # What stays is superseded: recovery ignores (and later removes) it.
            released = False
            log.warning("removing superseded files of %s failed: %s", self.root, exc)
        self.retained = kept
        if refs is not None and self.store is not None:
            # Slots only the evicted checkpoints named are free once their files are gone.
            self.store.release(released)
        state.counters.checkpoint.add(time.perf_counter_ns() - t0)
        if self.replication is not None:
            self.replication.after_checkpoint(state)
        try:
            self.publish_stats()
        except Exception as exc:  # advisory: never fails the checkpoint
            log.warning("publishing the latency counters of %s failed: %s", self.root, exc)
        if segment_error is not None:
            raise DurabilityError(
                f"checkpoint {path.name} is written and in force, but its log segment could "
                f"not be created ({segment_error.strerror or segment_error}); the next write "
                "creates it once the disk has room") from segment_error
        return path

    def _changed_pages(self, state: MMSBState) -> np.ndarray:
        """Ids of the pages the records after the newest checkpoint name (int64).
        O(records since)."""
        cols = state.log.columns(self.ckpt_lsn, gather=False)
        parts = [cols.page.astype(np.int64)]
        if cols.structs:
            parts.append(np.array([p for rec in cols.structs for p in kind_of(rec).pages(rec)],
                                  np.int64))
        return np.unique(np.concatenate(parts))

    def _store_pages(self, state: MMSBState, gen: int, oldest_gen: int, full: bool,
                     changed: np.ndarray | None) -> PageRefs:
        """Write checkpoint ``gen``'s changed pages to the page store (see
        :meth:`PageStore.write`); the pins of generations before ``oldest_gen`` go.

        Raises:
            OSError: the store could not be written or synced.
            SerializationError: the store or an older checkpoint naming it is damaged.
        """
        store = self.store
        if store is None:
            store = PageStore(self.ckpt_dir, self.bus_id)
            refs = self.open_refs
            store.reusable = refs is not None
            if refs is None and not full:
                refs = self._older_refs()
            store.adopt(refs, self.retained[0].generation if self.retained else 0)
            self.store = store
        reuse = store.reusable and not full and changed is not None
        return store.write(state, gen, changed if reuse else None, oldest_gen, fresh=full)

    def _older_refs(self) -> PageRefs | None:
        """The page references of the newest retained checkpoint that has any (the
        newest one holds its pages itself: a shared writer wrote it), for the pins of
        the older checkpoints that still name the page store."""
        for c in reversed(self.retained):
            if read_checkpoint_head(c.path).version in REFS_VERSIONS:
                ck = read_checkpoint(c.path, with_log=False, pages=False)
                _check_owner(ck.bus, self.bus_id, c.generation, c.path)
                return ck.page_refs
        return None

    def drop_superseded(self) -> None:
        """Remove the superseded checkpoints recovery found (not synced: a removal a
        crash undoes finds the file superseded again). A failure is logged; what stays
        is ignored by recovery."""
        gone, self.superseded = self.superseded, []
        for p in gone:
            try:
                _unlink(p)
            except OSError as exc:
                log.warning("removing superseded checkpoint %s failed: %s", p, exc)

    def _all_ckpts(self) -> list[_Ckpt]:
        out = []
        for p in bus_files(self.root)["checkpoints"]:
            m = _CKPT_RE.match(p.name)
            if m:
                out.append(_Ckpt(int(m.group(1), 16), 0, 0, p))
        return out

    @staticmethod
    def _chain_starts_at(kept: list[_Ckpt]) -> bool:
        """True when the oldest kept checkpoint's log starts from nothing (no base needed)."""
        return kept[0].log_from_lsn == 0

    # -- hooks called by the state ---------------------------------------------------
    def _checkpoint_new_chain(self, state: MMSBState) -> None:
        """Checkpoint ``state``'s whole log as a new chain start (after compress_log or
        load_checkpoint replaced history). On failure nothing of the bus changes; the
        caller restores its state."""
        self.reset_chain = True
        try:
            # The checkpoint is what the caller's change rests on: once it is written the
            # change stands, and a first segment that cannot be created yet is left to
            # the next write (which reports the full disk, if it still is).
            self.checkpoint(state, need_segment=False)
        except BaseException:
            self.reset_chain = False
            raise

    def _refuse_shared(self, what: str) -> None:
        if self.shared:
            raise InvalidArgumentError(
                f"{what} rewrites the history other writers of {self.root} share; open the "
                "bus with exclusive use (mmsb_start(path=..., shared=False)) to do it")

    def after_compress(self, state: MMSBState) -> None:
        """compress_log rewrote history."""
        self._refuse_shared("compress_log")
        if self.publisher is not None:
            self.publisher.full = True
        self._checkpoint_new_chain(state)

    def before_restore(self, state: MMSBState) -> None:
        self._refuse_shared("load_checkpoint")
        self.flush()

    def after_restore(self, state: MMSBState) -> None:
        """load_checkpoint replaced the state (and its log object)."""
        state.log.sink = self.sink
        state.log.sink_many = self.sink_many
        if self.publisher is not None:
            self.publisher.full = True
        self._checkpoint_new_chain(state)

    def close(self, state: MMSBState) -> None:
        """Final checkpoint (when anything was logged since the last), then release the
        segment, the background (group-commit) thread and the lock."""
        if self.closed:
            return
        self.closing = True
        try:
            self.drop_superseded()
            if self.shared and self.failed is None:
                # The final checkpoint must hold the other writers' records too.
                self.before_call(state)
            if self.failed is None and (self.records_since_ckpt or self.generation == 0):
                try:
                    self.checkpoint(state, evict=False, need_segment=False)
                except DurabilityError as exc:
                    raise DurabilityError(
                        f"the final checkpoint of the bus at {self.root} failed ({exc}); the bus "
                        "is closed all the same, its log holds every record, and reopening it "
                        "recovers them") from exc
                except SerializationError as exc:
                    # A checkpoint that had to read the history (see DeferredLog) found
                    # it damaged.
                    raise SerializationError(
                        f"the final checkpoint needs the retained history, which cannot be "
                        f"read ({exc.reason}); the bus is closed all the same and its log "
                        "holds every record", path=exc.path) from exc
        finally:
            if self.replication is not None:
                try:
                    self.replication.close(state)
                except Exception as exc:  # closing the bus goes on whatever happens here
                    log.error("stopping replication of %s failed: %s", self.root, exc)
                self.replication = None
                self.ship = None
            if self.publisher is not None:
                try:
                    self.publisher.close(state)
                except OSError as exc:
                    log.error("closing the mapped pages of %s failed: %s", self.root, exc)
                self.publisher = None
            fast = self.__dict__.get("fast")
            if fast is not None:
                fast.forget()
            if self._stop is not None:
                self._stop.set()
            if self._syncer is not None:
                self._syncer.join(timeout=5)
            with self.io_lock:
                if self.writer is not None:
                    try:
                        # Sealed when this writer knows the log's end: exclusive, or a
                        # shared writer inside its call (caught up).
                        self.writer.close(seal=self.failed is None
                                          and (not self.shared or self.held))
                    except OSError as exc:
                        log.error("closing the log at %s failed: %s", self.root, exc)
                    self.writer = None
            if self.feed is not None:
                self.feed.close()
                self.feed = None
            if self.write_fd >= 0:
                self.end_call()
                os.close(self.write_fd)
                self.write_fd = -1
            if self.store is not None:
                self.store.close()
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self.lock_fd)
            self.closed = True


def _unlink(path: Path) -> None:
    fsops.unlink(path)


# -- opening and recovery ----------------------------------------------------------------

def _lock(root: Path, shared: bool = False) -> int:
    """Take DIR/LOCK for the writer's lifetime: exclusive, or shared with the other
    shared writers (either kind keeps the other out)."""
    fd, st = fsops.open_regular_stat(f"{root}/LOCK", os.O_RDWR | os.O_CREAT, create=True)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            pass
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" by process {holder}" if holder else ""
            if shared:
                raise BusLockedError(
                    f"the bus at {root} is open for exclusive writing{who}; stop that writer "
                    "first (mmsb_stop)") from None
            raise BusLockedError(
                f"the bus at {root} is already open for writing{who}; stop that writer first "
                "(mmsb_stop), or open both with shared=True") from None
        raise
    if shared:
        return fd
    try:
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        if st.st_size > len(pid):  # (its size when opened: only this process writes it now)
            os.ftruncate(fd, len(pid))  # what is left of a longer pid goes
    except OSError:
        os.close(fd)
        raise
    return fd


def _identity(root: Path, has_data: bool, want: int | None = None) -> int:
    """The bus id in DIR/BUS, created (with ``want``, else a random id) when the
    directory holds no bus yet.

    Raises:
        SerializationError: the file is missing beside data, damaged, or (with
            ``want``) names another bus.
    """
    path = f"{root}/BUS"
    if not has_data and not os.path.lexists(path):
        bus_id = want if want is not None else secrets.randbits(64) or 1
        # A clock before 1970 records creation time 0.
        head = _BUS.pack(BUS_MAGIC, BUS_VERSION, 0, bus_id, max(0, time.time_ns()))
        fsops.replace_small_file(root, "BUS", head + _U32.pack(crc32c(head)))
        return bus_id
    try:
        # One read, one byte longer than the file must be: a short read tells a file of
        # the right length from a longer one.
        fd, st = fsops.open_regular_stat(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, _BUS.size + 5, 0)
        finally:
            os.close(fd)
    except FileNotFoundError:
        # (Only where checkpoints or segments exist: a new bus's is made above.)
        raise SerializationError("the bus identity file BUS is missing, but checkpoints or "
                                 "log segments exist; refusing to guess", path=path) from None
    except OSError as exc:
        raise SerializationError(f"cannot read the identity file ({exc.strerror or exc})",
                                 path=path) from None
    if len(raw) != _BUS.size + 4:
        size = max(len(raw), st.st_size)
        raise SerializationError(f"the identity file is {size} bytes, not {_BUS.size + 4}", path=path)
    magic, version, _flags, bus_id, _created = _BUS.unpack_from(raw, 0)
    if magic != BUS_MAGIC or crc32c(raw[: _BUS.size]) != _U32.unpack_from(raw, _BUS.size)[0]:
        raise SerializationError("the identity file is damaged or not an MMSB bus", path=path, offset=0)
    if version != BUS_VERSION:
        raise SerializationError(f"unsupported bus format version {version}", path=path, offset=8)
    if want is not None and bus_id != want:
        raise SerializationError(f"this directory holds bus {bus_id:016x}, not {want:016x}",
                                 path=path)
    return int(bus_id)


def bus_identity(root: Path) -> int:
    """The id of the bus in ``root`` (its BUS file), read only.

    Raises:
        SerializationError: no bus there, or its identity file is damaged.
    """
    if not os.path.lexists(root / "BUS"):
        raise SerializationError("no MMSB bus here (the identity file BUS is missing)", path=root)
    return _identity(root, True)


class BusChangedError(SerializationError):
    """The bus's files changed while a read-only open read them (a live writer
    checkpointed and removed what was listed); reading again gives a consistent view."""


def _listdir(folder: Path) -> list[str]:
    """The names in ``folder`` (none when it is missing)."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _listing(root: Path) -> tuple[list[Path], list[Path]]:
    """Segments, then checkpoints. In this order a checkpoint that replaces the listed
    segments is listed with them, so the two lists always cover every record that was
    in the log when the listing began.

    Raises:
        SerializationError: ``wal`` or ``checkpoints`` is there but is no folder (a
            file, a FIFO, a symlink): a listing through it would show no records, or
            another folder's, as the bus's.
    """
    fsops.read_bus_folder(root / "wal")
    fsops.read_bus_folder(root / "checkpoints")
    wal = _names(root / "wal", _WAL_RE)
    ck = _names(root / "checkpoints", _CKPT_RE)
    return wal, ck


def recover_readonly(state: MMSBState, path: str | os.PathLike[str]) -> None:
    """Recover the durable bus in ``path`` into the fresh, in-memory ``state`` without
    writing anything: no lock is taken, nothing is checkpointed or cut, and a torn tail
    is only skipped. Safe beside a live writer: the files are listed (segments first)
    and the newest checkpoint and every segment opened at once, and read through those
    descriptors, so the state includes every record acknowledged before the call.

    Raises:
        BusChangedError: a listed file was removed before it could be opened or read, or
            the listing changed while damage was found (read again: the writer moved on).
        SerializationError: no bus there, its ``wal`` or ``checkpoints`` is no folder, or
            damage the recovery mode does not tolerate.
    """
    cfg = state.config
    root = Path(path)
    if not os.path.lexists(root / "BUS"):
        raise SerializationError("no MMSB bus here (the identity file BUS is missing)", path=root)
    bus_id = _identity(root, True)
    wal, ck = _listing(root)
    bus = DurableBus(root, bus_id, cfg, -1)
    bus.read_only = True
    try:
        try:
            for p in ([ck[-1]] if ck else []) + wal:
                bus.fds[p] = fsops.open_regular(p, os.O_RDONLY)
        except FileNotFoundError:
            raise BusChangedError("a bus file was removed while it was being opened (a "
                                  "writer's checkpoint moved on)", path=root) from None
        except OSError as exc:
            raise SerializationError(f"cannot open a bus file ({exc.strerror or exc})",
                                     path=exc.filename) from None
        try:
            _recover(bus, state, _Listed(root / "checkpoints", [p.name for p in ck]), wal)
            if state.replay_base is not None:
                # The writer may drop the file later: keep its bytes.
                state.replay_base = state.replay_base.detached()
        except SerializationError as exc:
            if bus.vanished or _listing(root) != (wal, ck) or bus.moved_under():
                raise BusChangedError(f"the bus changed while it was read ({exc.reason})",
                                      path=root) from exc
            raise
    finally:
        for fd in bus.fds.values():
            os.close(fd)
        bus.fds.clear()
    state.detached = True
    state.counters.torn_tails_recovered = bus.torn_tails
    state.recovery_notes = list(bus.recovery_notes)


_PATH_TYPE = type(Path())


def open_bus(state: MMSBState, path: str | os.PathLike[str], shared: bool = False,
             bus_id: int | None = None) -> None:
    """Make the fresh ``state`` a durable bus in ``path``: create one there, or reopen
    and recover the one there into ``state``. ``shared``: other processes may write it
    too (each call takes DIR/WRITE and catches up with their records first).
    ``bus_id``: the id a new bus gets, and the one an existing bus must have (a
    follower's copy of its leader's bus).

    Raises:
        BusLockedError: another process has it open for writing (exclusively, or shared
            when this open asks for exclusive use).
        SerializationError: damage that the recovery mode does not tolerate, naming the
            file and offset.
    """
    config = state.config  # (checked when the state was built)
    # A Path given is kept as it is (immutable): not parsed again, and its string, when
    # it was already made, not joined again.
    root = path if type(path) is _PATH_TYPE else Path(path)
    try:
        where = str(root)
        try:
            # (The usual case, a bus folder there: no stat of the directory first.)
            fsops.bus_folder(where + "/checkpoints")
        except (FileNotFoundError, NotADirectoryError):
            try:
                if not stat.S_ISDIR(os.stat(root).st_mode):
                    raise MMSBError(f"{root} exists and is not a directory; a bus needs a "
                                    "directory") from None
            except FileNotFoundError:
                root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsops.bus_folder(where + "/checkpoints")
        fsops.bus_folder(where + "/wal")
        lock_fd = _lock(root, shared)
    except OSError as exc:
        raise _durability(root, "open", exc) from exc
    write_fd = -1
    bus: DurableBus | None = None
    try:
        if shared:
            write_fd = fsops.open_regular(root / "WRITE", os.O_RDWR | os.O_CREAT, create=True)
            fcntl.flock(write_fd, fcntl.LOCK_EX)  # recovery runs between other writers' calls
        ckpt_dir = root / "checkpoints"
        # One listing of names: the checkpoints and what a crash left (a path is made
        # only for the few files the open reads).
        in_ckpt = os.listdir(ckpt_dir)
        listed = _Listed(ckpt_dir, in_ckpt)
        wal = _names(root / "wal", _WAL_RE)
        bus_id = _identity(root, bool(listed or wal), bus_id)
        for name in in_ckpt:
            if name.startswith(_TEMP_PREFIXES) and name.endswith(".tmp"):
                _unlink(ckpt_dir / name)
        bus = DurableBus(root, bus_id, config, lock_fd)
        bus.map_history = MAP_HISTORY and not shared
        bus.use_store = not shared
        _recover(bus, state, listed, wal, defer=DEFER_HISTORY and not shared)
        bus.publisher = Publisher(root, bus_id)
        if not shared:
            # The pages the last writer published, when they check out against the
            # recovered state, are kept; otherwise (and for shared writers) rebuilt.
            bus.publisher.adopt(state)
        bus.publisher.publish(state)
        w = bus.writer
        bus.publisher.note_append(bus.generation, w.seq if w else bus.next_seq,
                                  w.size if w else 0, state.log.last_lsn)
        bus.shared = shared
        bus.write_fd = write_fd
    except BaseException as exc:
        if write_fd >= 0:
            os.close(write_fd)
        if bus is not None:
            if bus.publisher is not None:
                bus.publisher.abandon()
                bus.publisher = None
            if bus.writer is not None:
                try:
                    bus.writer.close()
                except OSError:
                    pass  # the recovered state is in its checkpoint; nothing more to keep
            if bus.store is not None:
                bus.store.close()
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
        if isinstance(exc, OSError) and not isinstance(exc, MMSBError):
            raise _durability(root, "recover", exc) from exc
        raise
    if write_fd >= 0:
        fcntl.flock(write_fd, fcntl.LOCK_UN)
    state.bus = bus
    state.log.sink = bus.sink
    state.log.sink_many = bus.sink_many
    state.counters.torn_tails_recovered = bus.torn_tails
    state.recovery_notes = list(bus.recovery_notes)
    bus.stats_of = weakref.ref(state)
    bus.opened = True
    if bus.writer is not None or shared:
        bus.start()


_TEMP_PREFIXES = (".ckpt-", f".{STORE_NAME}.")
"""How the temporary files of a checkpoint or of the page store being written begin
(what a crash leaves of them is removed by the next writer's open)."""


def _durability(root: Path, what: str, exc: OSError) -> DurabilityError:
    """The typed error for a file-system failure while opening a bus."""
    why = exc.strerror or str(exc)
    if exc.filename is not None:
        why = f"{exc.filename}: {why}"
    if exc.errno == errno.ELOOP or isinstance(exc, fsops.NotRegularFileError):
        why = (f"{exc.filename} is a symlink or not a regular file; bus files are never "
               "followed through links or read from special files")
    elif exc.errno == errno.EROFS:
        why = "the file system is read-only (use open_readonly to read this bus)"
    return DurabilityError(f"cannot {what} the bus at {root}: {why}")


def _recover(bus: DurableBus, state: MMSBState, by_gen: _Listed, wal: list[Path],
             defer: bool = False) -> None:
    """Rebuild ``state`` from the bus's files: the newest checkpoint (and the chain of
    checkpoints that holds the retained history), then the current generation's
    segments. ``defer``: the history in the checkpoints is read the first time
    something needs it (see :func:`_restore_deferred`), so that the time to open does
    not grow with it.
    """
    cfg = bus.config
    loader: Callable[[TransactionLog], TransactionLog] | None = None
    if by_gen:
        gen = max(by_gen.names)
        if defer and not bus.read_only:
            loader = _restore_deferred(bus, state, by_gen, gen)
        if loader is None:
            _restore_chain(bus, state, by_gen, gen)
        if not bus.read_only:
            # Removed after the open (drop_superseded), which never reads them.
            bus._superseded = (by_gen, bus.oldest_generation())
    # Replay the current generation's segments.
    segs: list[tuple[int, Path]] = []
    for p in wal:
        m = _WAL_RE.match(p.name)
        assert m is not None
        g, seq = int(m.group(1), 16), int(m.group(2), 16)
        if g < bus.generation:
            if not bus.read_only:
                _unlink(p)  # covered by a checkpoint already
        elif g > bus.generation:
            note = f"{p.name}: generation {g} is newer than the newest checkpoint; not replayed"
            if not bus.read_only:
                # Set aside under a name no generation uses, so it can never be replayed
                # or collide with a segment this bus writes later.
                aside = p.with_name(p.name + ".stale")
                fsops.replace(p, aside)
                note += f" (kept as {aside.name})"
            bus.recovery_notes.append(note)
            log.warning("recovery of %s: %s", bus.root, note)
        else:
            segs.append((seq, p))
    segs.sort()
    expected_lsn = state.log.last_lsn + 1
    replayed = 0
    damaged = False
    for k, (seq, p) in enumerate(segs):
        last = k == len(segs) - 1
        if seq != k:
            err = SerializationError(f"log segment {k} of generation {bus.generation} is missing",
                                     path=p)
            if cfg.recovery == "point_in_time":
                damaged = True
                bus.recovery_notes.append(str(err))
                break
            raise err
        scan: SegmentScan = bus.scan_segment(p, seq, expected_lsn)
        if scan.foreign is not None:
            err = SerializationError(f"log segment is not this bus's: {scan.foreign}", path=p)
            if cfg.recovery == "point_in_time":
                damaged = True
                bus.recovery_notes.append(str(err))
                break
            raise err
        if loader is not None and _reads_history(scan):
            # A resize, a clone or a compaction marker derives from the pages' written
            # masks, which the whole history holds: read it before going on.
            _defer_log(state, loader, bus.ckpt_lsn)
            load_history(state.log)
            loader = None
        seg = None
        if (bus.map_history and not bus.read_only and scan.bulk is not None
                and scan.bulk.rows and scan.valid_end >= MAP_MIN_BYTES):
            seg = map_replayed(p, scan.valid_end)
        good = _apply_checked(state, scan, p, seg)
        replayed += good
        expected_lsn += good
        if good < scan.count and scan.damage is None:
            scan.damage = scan.refused
        if scan.damage is not None:
            if cfg.recovery != "point_in_time":
                raise scan.damage
            damaged = True
            bus.recovery_notes.append(str(scan.damage))
            break
        if scan.torn:
            if bus.read_only and last:
                bus.recovery_notes.append(f"{p.name}: ends inside a record at byte "
                                          f"{scan.valid_end} (being written, or torn)")
                break
            if cfg.recovery == "strict" or (not last and cfg.recovery == "tolerate_tail"):
                raise SerializationError("the log ends inside a record (a torn write)" +
                                         ("" if last else " before its last segment"),
                                         path=p, offset=scan.valid_end)
            bus.torn_tails += 1
            damaged = True
            note = f"{p.name}: torn record at byte {scan.valid_end} cut off"
            bus.recovery_notes.append(note)
            log.warning("recovery of %s: %s", bus.root, note)
            break
    if loader is not None:
        _defer_log(state, loader, bus.ckpt_lsn)
    if bus.read_only:
        return
    if damaged or bus.generation == 0:
        # Start a clean generation: what was recovered becomes a checkpoint, and the
        # segments it covers (a cut tail included) are dropped.
        if bus.generation == 0 and not replayed and not damaged:
            bus.reset_chain = True
        bus.records_since_ckpt = replayed
        bus.checkpoint(state, evict=False)
    else:
        # The segments read whole stay the log of this generation (the next automatic
        # checkpoint covers their records), and the log goes on in a new segment after
        # them, created by the first write: opening writes and syncs nothing (a segment
        # a killed writer written ahead keeps its zeros after its frames: they read
        # as its end, as when it was written). Segments
        # a killed writer left may not be on stable storage yet; they are synced before
        # the new segment is created, so a later segment is never durable before them.
        bus.records_since_ckpt = replayed
        with bus.io_lock:
            bus.next_seq = len(segs)
            bus.writer = None
            if replayed:
                bus.unsynced = [p for _seq, p in segs]



def _restore_chain(bus: DurableBus, state: MMSBState, by_gen: _Listed, gen: int) -> None:
    """Restore the newest checkpoint into ``state`` with the whole retained history:
    the log sections of the chain of checkpoints joined into its log."""
    newest = bus.read_checkpoint(by_gen[gen])
    _check_owner(newest.bus, bus.bus_id, gen, by_gen[gen])
    chain = _read_chain(bus, by_gen, gen, newest)
    first_gen, first = chain[0]
    if first.log_from_lsn == 0:
        start_slices = chain
        base: ReplayBase | Path | None = first.base
    else:
        # The oldest retained checkpoint is the replay base; its own slice is older.
        start_slices = chain[1:]
        base = by_gen[first_gen]
    newest.records = join_records([ck.records for _g, ck in start_slices])
    try:
        state.restore(newest, fresh=True)
    except MemoryError:
        raise SerializationError("the checkpoint describes a state larger than the memory "
                                 "this process may use", path=by_gen[gen]) from None
    # The newest file's horizon was written after its history was trimmed, so it
    # already names where the rebuilt log begins; the chain gives its base.
    if isinstance(base, Path):
        state.replay_base = CheckpointBase(bus.raw_seen.get(base, base),
                                           bus.ckpt_dir / STORE_NAME)
    else:
        state.replay_base = base
    state.orphan_from = 0
    bus.open_refs = newest.page_refs
    bus.generation = gen
    bus.ckpt_lsn = newest.lsn
    bus.retained = [_Ckpt(g, ck.lsn, ck.log_from_lsn, by_gen[g], _nested_len(ck))
                    for g, ck in chain]


def _restore_deferred(bus: DurableBus, state: MMSBState, by_gen: _Listed,
                      gen: int) -> Callable[[TransactionLog], TransactionLog] | None:
    """Restore the newest checkpoint into ``state`` without its history: its pages,
    masks, graph and counters are read and checked, its log section left on disk (read
    and checked with the rest of the history), and the older checkpoints of the chain
    are known from the newest file's record of its chain (``bus.chain_rows``), checked
    there as a whole without a loop over its rows in Python; files whose record lacks
    one have their heads read (:func:`read_checkpoint_head`: ownership and where its
    log starts and ends, in a few small reads). The state's log is left empty at the
    checkpoint's LSN, for the segments after it. O(pages + page bytes), and a few
    bytes per retained checkpoint, whatever the history.

    Returns the loader that builds the complete log later, from the chain's log
    sections (each file then read whole and checked against the chain's rows by
    :func:`_chain_files`, as an eager open checks them) followed by the records the log
    holds by then; None (nothing changed) where the chain starts at a checkpoint that
    nests a replay base, which only a whole read restores.

    Raises:
        SerializationError: a checkpoint is damaged, another bus's, or out of its chain.
    """
    newest = bus.read_checkpoint(by_gen[gen], with_log=False)
    _check_owner(newest.bus, bus.bus_id, gen, by_gen[gen])
    rows = _chain_of(bus, newest, gen, by_gen)
    first_gen, first_lsn, first_from, first_base = rows[0].tolist()
    if first_from == 0 and first_gen != gen:
        if first_base < 0:
            head = read_checkpoint_head(by_gen[first_gen])
            _check_owner(head.bus, bus.bus_id, first_gen, by_gen[first_gen])
            if (head.lsn, head.log_from_lsn) != (first_lsn, first_from):
                return None
            first_base = rows[0, 3] = head.base_len
        if first_base:
            return None
    try:
        state.restore(newest, fresh=True)
    except MemoryError:
        raise SerializationError("the checkpoint describes a state larger than the memory "
                                 "this process may use", path=by_gen[gen]) from None
    if first_from == 0:
        start = 0
        state.replay_base = newest.base if first_gen == gen else None
    else:
        start = 1
        state.replay_base = CheckpointBase(by_gen[first_gen])
    state.orphan_from = 0
    bus.open_refs = newest.page_refs
    bus.generation = gen
    bus.ckpt_lsn = newest.lsn
    bus._take_chain(rows, by_gen)
    ckpt_lsn = newest.lsn

    def load(tail: TransactionLog) -> TransactionLog:
        records = join_records([ck.records for _g, ck in _chain_files(bus, rows[start:], by_gen)])
        if isinstance(records, ColumnRecords):
            full = TransactionLog.from_columns(records.cols)
        else:
            full = TransactionLog()
            full.replace_all(records)
        full.extend_from(tail, ckpt_lsn, tail.last_lsn)
        return full

    return load


@njit(cache=True, nogil=True)
def _chain_problem(rows: np.ndarray, gen: int, lsn: int,
                   log_from: int) -> bool:  # pragma: no cover - compiled
    """Whether recorded chain rows (generation, LSN, log start, base bytes) do not hold
    together: a negative field (base bytes below -1), a log start past its LSN,
    generations not ascending, LSNs going back, or a last row that is not (``gen``,
    ``lsn``, ``log_from``)."""
    k = rows.shape[0]
    if k == 0:
        return True
    for i in range(k):
        if (rows[i, 0] < 0 or rows[i, 1] < 0 or rows[i, 2] < 0 or rows[i, 3] < -1
                or rows[i, 2] > rows[i, 1]):
            return True
        if i and (rows[i, 0] <= rows[i - 1, 0] or rows[i, 1] < rows[i - 1, 1]):
            return True
    return not (rows[k - 1, 0] == gen and rows[k - 1, 1] == lsn and rows[k - 1, 2] == log_from)


@njit(cache=True, nogil=True)
def _chain_walk(rows: np.ndarray, horizon: int, listed: np.ndarray) -> int:  # pragma: no cover - compiled
    """The walk of :func:`_walk_heads` on recorded rows (sound, ending at the newest
    file): from the last row back to the one before it while the current one's log
    does not start from nothing, it is newer than ``horizon`` and the previous
    generation's file is listed (``listed``: the listed generations, ascending).
    Returns the index of the chain's first row; -1 where the walk would go on before
    the first row or the generations do not follow one by one (the record cannot say:
    the heads are read); -2 - i where row ``i`` ends at another LSN than row ``i + 1``'s
    log starts (the chain does not link there)."""
    i = rows.shape[0] - 1
    while rows[i, 2] != 0 and rows[i, 1] > horizon:
        prev = rows[i, 0] - 1
        lo, hi = 0, listed.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if listed[mid] < prev:
                lo = mid + 1
            else:
                hi = mid
        if lo == listed.shape[0] or listed[lo] != prev:
            return i  # its file is gone: the chain starts here
        if i == 0 or rows[i - 1, 0] != prev:
            return -1
        if rows[i - 1, 1] != rows[i, 2]:
            return -2 - (i - 1)
        i -= 1
    return i


def _walk_recorded(newest: Any, gen: int, by_gen: _Listed) -> np.ndarray | None:
    """The chain ending at generation ``gen`` (the checkpoint ``newest``) as rows of
    (generation, LSN, log start, nested base bytes or -1), oldest first, from the
    newest file's record of its chain: the walk :func:`_walk_heads` makes, in one
    compiled pass over the record (:func:`_chain_walk`). None where the file records
    no chain, or one that does not reach where the walk ends (the heads are read then).

    Raises:
        SerializationError: two checkpoints of the chain do not link.
    """
    rows = _recorded_chain(newest.bus, gen, newest.lsn, newest.log_from_lsn)
    if rows is None:
        return None
    first = int(_chain_walk(rows, newest.horizon_lsn, by_gen.generations()))
    if first == -1:
        return None
    if first < -1:
        i = -2 - first
        _check_link(int(rows[i, 0]), int(rows[i, 1]), int(rows[i + 1, 2]),
                    by_gen[int(rows[i, 0])])
    return rows[first:]


def _walk_heads(bus: DurableBus, newest: Any, gen: int, by_gen: _Listed) -> np.ndarray:
    """The chain ending at generation ``gen`` as :func:`_walk_recorded` gives it, from
    the heads of the older files: walk back while the files are there, down to the
    newest file's horizon (its replay base) or the chain's start.

    Raises:
        SerializationError: a checkpoint is damaged, another bus's, or does not end
            where the next one's log starts.
    """
    heads = [(gen, newest.lsn, newest.log_from_lsn, _nested_len(newest))]
    horizon = newest.horizon_lsn
    while heads[-1][2] != 0 and heads[-1][1] > horizon:
        g_prev = heads[-1][0] - 1
        if g_prev not in by_gen:
            break
        head = read_checkpoint_head(by_gen[g_prev])
        _check_owner(head.bus, bus.bus_id, g_prev, by_gen[g_prev])
        _check_link(g_prev, head.lsn, heads[-1][2], by_gen[g_prev])
        heads.append((g_prev, head.lsn, head.log_from_lsn, head.base_len))
    heads.reverse()
    return np.array(heads, np.int64)


def _nested_len(ck: Any) -> int:
    """Bytes of the replay base a decoded checkpoint nests (0: none; -1: not known)."""
    if ck.base is None:
        return 0
    source = ck.base.source
    return len(source) if isinstance(source, bytes) else -1


def _chain_record(kept: list[_Ckpt]) -> bytes:
    """The ``chain_rows`` a checkpoint records: a row per retained checkpoint, oldest first
    (generation, LSN, log start, bytes of the replay base it nests or -1 where not
    known), packed as little-endian int64s."""
    return np.array([[c.generation, c.lsn, c.log_from_lsn, c.base_len] for c in kept],
                    "<i8").tobytes()


def _recorded_chain(info: dict[str, Any] | None, gen: int, lsn: int,
                    log_from: int) -> np.ndarray | None:
    """The chain of checkpoints a checkpoint records in its bus identity (``chain_rows``:
    rows of generation, LSN, log start and the bytes of the replay base the file nests,
    oldest first, ending with itself, packed as :func:`_chain_record` packs them; or,
    as earlier builds recorded it, ``chain``: a list of ``[generation, lsn,
    log_from_lsn]`` lists with that fourth int where the writer knew it) as C-ordered
    int64 rows (-1: base bytes not known); None when it records none or the record
    does not hold together (:func:`_chain_problem`), so that the files' heads are read
    instead."""
    raw = None
    if info is not None:
        raw = info.get("chain_rows")
        if raw is None:
            raw = info.get("chain")  # (as earlier builds recorded it: a list of lists)
    if isinstance(raw, bytes):
        if not raw or len(raw) % 32:
            return None
        rows = np.frombuffer(raw, "<i8").reshape(-1, 4).astype(np.int64)
    elif isinstance(raw, list) and raw:
        listed = []
        for row in raw:
            if type(row) is not list or not 3 <= len(row) <= 4:
                return None
            for x in row:
                if type(x) is not int or not 0 <= x < 1 << 63:
                    return None
            listed.append(row if len(row) == 4 else [*row, -1])
        rows = np.array(listed, np.int64)
    else:
        return None
    return None if _chain_problem(rows, gen, lsn, log_from) else rows


def _read_chain(bus: DurableBus, by_gen: _Listed, gen: int,
                newest: Any = None) -> list[tuple[int, Any]]:
    """The chain of checkpoints ending at generation ``gen``, oldest first, each read
    whole (the older ones without their pages): the chain found as a deferred open
    finds it (:func:`_chain_of`), then each file checked against it. An older
    checkpoint that a crash left behind before retention removed it is superseded,
    never part of the chain.

    Raises:
        SerializationError: a checkpoint is damaged, another bus's, or does not end
            where the next one's log starts.
    """
    if newest is None:
        newest = bus.read_checkpoint(by_gen[gen])
        _check_owner(newest.bus, bus.bus_id, gen, by_gen[gen])
    rows = _chain_of(bus, newest, gen, by_gen)
    return [*_chain_files(bus, rows[:-1], by_gen), (gen, newest)]


def _chain_of(bus: DurableBus, newest: Any, gen: int, by_gen: _Listed) -> np.ndarray:
    """The chain ending at generation ``gen`` (the checkpoint ``newest``) as rows of
    (generation, LSN, log start, nested base bytes or -1), oldest first: from the
    newest file's record of its chain where it holds (:func:`_walk_recorded`),
    otherwise from the older files' heads (:func:`_walk_heads`).

    Raises:
        SerializationError: two checkpoints of the chain do not link, or a head read is
            damaged or another bus's.
    """
    rows = _walk_recorded(newest, gen, by_gen)
    return _walk_heads(bus, newest, gen, by_gen) if rows is None else rows


def _chain_files(bus: DurableBus, rows: np.ndarray, by_gen: _Listed) -> list[tuple[int, Any]]:
    """The checkpoints of chain ``rows`` (see :func:`_chain_of`), each read whole but
    for its pages, checked as this bus's and against its row: its LSN, where its log
    starts and whether it nests a replay base (so that the links the rows were
    checked for hold for the files).

    Raises:
        SerializationError: a file is damaged, another bus's, or not what its row says
            (replaced or changed since the row was written or read).
    """
    out = []
    for g, at, log_from, base_len in rows.tolist():
        path = by_gen[g]
        ck = bus.read_checkpoint(path, pages=False)
        _check_owner(ck.bus, bus.bus_id, g, path)
        if ((ck.lsn, ck.log_from_lsn) != (at, log_from)
                or (base_len >= 0 and (ck.base is not None) != (base_len > 0))):
            raise SerializationError(
                f"this checkpoint is at LSN {ck.lsn} with its log from LSN "
                f"{ck.log_from_lsn} ({'with' if ck.base is not None else 'without'} a "
                f"replay base), but its chain says LSN {at} from {log_from} (the newer "
                "checkpoint's record of it, or the file as it was when the chain was "
                "walked): the file was replaced or changed; its history cannot be read",
                path=path)
        out.append((g, ck))
    return out


def _defer_log(state: MMSBState, loader: Callable[[TransactionLog], TransactionLog],
               upto: int) -> None:
    """Make the state's log (the records after the newest checkpoint, at LSN ``upto``)
    the tail of a deferred log whose history ``loader`` reads."""
    state.log = DeferredLog(state.log, loader, upto)


def _reads_history(scan: SegmentScan) -> bool:
    """Whether applying the scanned records reads the retained history (the written
    masks of pages: a resize or a clone carries the mask over; a compaction marker
    folds the log)."""
    recs = scan.records if scan.bulk is None else [a for a, _ in scan.parts if not isinstance(a, int)]
    return any(isinstance(r, PageResize | PageClone | Compacted) for r in recs)


def _apply_checked(state: MMSBState, scan: SegmentScan, path: Path,
                   seg: MappedSegment | None = None) -> int:
    """Apply a segment's records in order, each checked against the state first (see
    ``MMSBState.check_record``). Returns how many were applied; on the first
    refusal the reason goes to ``scan.refused`` and the rest is not applied.

    Runs of deltas decoded in bulk (a scan with ``columns``) are checked vectorised and
    appended to the log as columns (:func:`_apply_columns`); the records read frame by
    frame go through :func:`_apply_records`. ``seg``: the segment's read-only mapping,
    into which the log's rows of one-run deltas decoded in bulk then point instead of
    holding their payloads (see :func:`_apply_columns`). O(records + payload bytes).
    """
    if scan.bulk is None:
        return _apply_records(state, scan.records, scan.offsets, scan, path)
    done = 0
    recs: list[AnyRecord] = []
    offs: list[int] = []
    bulk = scan.bulk
    for a, b in scan.parts:
        if isinstance(a, int):
            if recs:
                good = _apply_records(state, recs, offs, scan, path)
                done += good
                if good < len(recs):
                    return done
                recs, offs = [], []
            cols, frames = bulk.columns(a, b)
            runs = bulk.one_runs(a, b) if seg is not None else None
            good = _apply_columns(state, cols, frames, scan, path, seg, runs)
            done += good
            if good < len(cols):
                return done
        else:
            recs.append(a)
            offs.append(b)
    if recs:
        done += _apply_records(state, recs, offs, scan, path)
    return done


def _apply_columns(state: MMSBState, cols: LogColumns, offsets: np.ndarray, scan: SegmentScan,
                   path: Path, seg: MappedSegment | None = None,
                   runs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> int:
    """Apply a run of deltas held as columns: checked together as
    :func:`_deltas_that_follow` checks them, kept by the log in one go (built from the
    columns, then appended with :meth:`TransactionLog.extend_from`) and written into the
    pages in compiled passes (``TransactionLog.write_rows``). The first delta the
    vectorised check refuses is checked alone by ``check_record``, so a refusal reads as
    it always did. Returns how many rows were applied. O(rows + payload bytes).

    ``seg`` and ``runs`` (:meth:`BulkRows.one_runs` of the columns' rows): once written
    into the pages (from the bytes read), the rows of one-run deltas (alone in their
    frame or in a record group) are pointed at their bytes in the segment's mapping
    (:meth:`TransactionLog.point_at_segment`), so the log keeps no copy of their
    payloads, as on a live bus."""
    log_ = state.log
    m = len(cols)
    bases = base_epochs(cols)
    k = 0
    while k < m:
        good = _follow(state, cols.page[k:], cols.psize[k:], bases[k:], cols.epoch[k:])
        if good:
            part = slice_columns(cols, k, k + good)
            tmp = TransactionLog.from_columns(part)
            r0 = log_.n
            log_.extend_from(tmp, int(part.lsn[0]) - 1, int(part.lsn[-1]))
            log_.write_rows(r0, log_.n, state.table, state.arena)
            if seg is not None and runs is not None and log_.n - r0 == good:
                which, at, crcs = runs
                log_.point_at_segment(r0, log_.n, which[k:k + good], at[k:k + good],
                                      crcs[k:k + good], seg.view, seg)
            top = int(part.ids.max())
            if top >= state.next_delta_id:
                state.next_delta_id = top + 1
            k += good
            if k == m:
                break
        rec = TransactionLog.from_columns(slice_columns(cols, k, k + 1)).delta_at(0)
        why = _check_and_apply(state, rec)
        if why is not None:
            scan.refused = SerializationError(f"the log holds {why}", path=path,
                                              offset=int(offsets[k]))
            return k
        log_.adopt(rec)
        k += 1
    return m


def apply_frames(state: MMSBState, frames: bytes, first_lsn: int,
                 path: Path) -> tuple[int, SerializationError | None, bool]:
    """Apply log frames received from elsewhere (a follower's leader), holding records
    ``first_lsn``, ``first_lsn + 1`` …, exactly as recovery applies a segment's: every
    frame's length and CRC, the LSN order, and each record against the state (runs of
    deltas decoded and checked in bulk). The frames applied are appended to this bus's
    log, synced. Caller holds the state's lock.

    Returns ``(records applied, problem, discard)``: ``problem`` names a damaged frame
    (those before it are applied and logged) or a refused record; with ``discard`` the
    state holds records its log does not (a refusal inside a record group) and must be
    recovered from the directory again.

    Raises:
        DurabilityError: the log could not be written (the state must be discarded).
    """
    bus = state.bus
    assert bus is not None
    data = segment_header(bus.bus_id, 0, 0) + frames
    # Received frames are whole: zeros after them are a cut frame, not space ahead.
    scan = scan_segment(path, bus.bus_id, 0, 0, first_lsn, data, columns=True, zero_end=False)
    good = _apply_checked(state, scan, path)
    if scan.refused is not None:
        return good, scan.refused, True
    problem = scan.damage
    if problem is None and scan.torn:
        problem = SerializationError("the last frame is cut short", path=path,
                                     offset=scan.valid_end)
    if good:
        if bus.publisher is not None:
            pages: list[int] = []
            structs: list[AnyRecord] = []
            for a, b in scan.parts:
                if isinstance(a, int):
                    assert scan.bulk is not None
                    pages.extend(scan.bulk.meta[a:b, F_PAGE].tolist())
                else:
                    structs.append(a)
            bus.publisher.note(structs or scan.records)
            bus.publisher.note_pages(pages)
        bus.append_frames(memoryview(data)[SEG_HEADER_SIZE:scan.valid_end], first_lsn,
                          first_lsn + good - 1, True)
    return good, problem, False


def _check_and_apply(state: MMSBState, rec: AnyRecord) -> str | None:
    """Apply one recovered record after ``check_record``; why it was refused, or None."""
    why = state.check_record(rec)
    if why is None:
        try:
            state.apply_record(rec)
        except MemoryError:
            why = "a record needing more memory than this machine can give"
    return why


def _apply_records(state: MMSBState, recs: list[AnyRecord], offsets: list[int],
                   scan: SegmentScan, path: Path) -> int:
    """Apply records in order, each checked against the state first (see
    ``MMSBState.check_record``). Returns how many were applied; on the first
    refusal the reason goes to ``scan.refused`` and the rest is not applied.

    A run of deltas is checked vectorised (:func:`_deltas_that_follow`) and its rows
    written into the pages in one compiled pass (``TransactionLog.write_rows``); the
    first delta refused, and every structural record, take the one-by-one path, so a
    refusal reads exactly as ``check_record`` words it. O(records + payload bytes).
    """
    log_ = state.log
    k, n = 0, len(recs)
    while k < n:
        if type(recs[k]) is Delta:
            j = k + 1
            while j < n and type(recs[j]) is Delta:
                j += 1
        if type(recs[k]) is Delta and j - k >= _SHORT_RUN:
            run = recs[k:j]
            good = _deltas_that_follow(state, run)  # type: ignore[arg-type]
            if good:
                r0 = log_.n
                for rec in run[:good]:
                    log_.adopt(rec)
                log_.write_rows(r0, log_.n, state.table, state.arena)
                top = max(rec.id for rec in run[:good])  # type: ignore[union-attr]
                if top >= state.next_delta_id:
                    state.next_delta_id = top + 1
                k += good
                if good == len(run):
                    continue
        rec = recs[k]
        why = _check_and_apply(state, rec)
        if why is not None:
            scan.refused = SerializationError(f"the log holds {why}", path=path,
                                              offset=offsets[k])
            return k
        log_.adopt(rec)
        k += 1
    return n


def _deltas_that_follow(state: MMSBState, run: list[Delta]) -> int:
    """How many deltas at the start of ``run`` pass ``check_record`` in turn (see
    :func:`_follow`)."""
    m = len(run)
    try:
        pids = np.fromiter((d.page_id for d in run), np.int64, m)
        sizes = np.fromiter((d.page_size for d in run), np.int64, m)
        bases = np.fromiter((d.base_epoch for d in run), np.int64, m)
        epochs = np.fromiter((d.epoch for d in run), np.int64, m)
    except OverflowError:
        # A field past int64 (a crafted record) is refused one by one; those before it
        # are still checked together.
        big = next(i for i, d in enumerate(run)
                   if max(d.page_id, d.page_size, d.base_epoch, d.epoch) >= 1 << 63)
        return _deltas_that_follow(state, run[:big]) if big else 0
    return _follow(state, pids, sizes, bases, epochs)


def _follow(state: MMSBState, pids: np.ndarray, sizes: np.ndarray, bases: np.ndarray,
            epochs: np.ndarray) -> int:
    """How many deltas at the start of a run (given as columns: page, page size, base
    epoch, epoch) pass ``check_record`` in turn (page live, size as logged, base epoch
    the page's epoch after the deltas before it), checked together: per page, the first
    delta must build on the page's epoch and each next one on the epoch of the one
    before. O(deltas log deltas), vectorised."""
    t = state.table
    m = len(pids)
    top = min(t.next_id, len(t.flags))
    ok = (pids > 0) & (pids < top)
    safe = np.where(ok, pids, 0)
    ok &= (t.flags[safe] & LIVE).astype(bool)
    ok &= t.size[safe] == sizes
    order = np.argsort(safe, kind="stable")
    sp = safe[order]
    first = np.ones(m, bool)
    first[1:] = sp[1:] != sp[:-1]
    expected = np.empty(m, np.int64)
    expected[first] = t.epoch[sp[first]]
    later = np.flatnonzero(~first)
    expected[later] = epochs[order][later - 1]
    follows = np.empty(m, bool)
    follows[order] = bases[order] == expected
    ok &= follows
    return m if ok.all() else int(np.argmin(ok))


def _check_link(gen: int, lsn: int, next_from: int, path: Path) -> None:
    """Checkpoint ``gen`` (at ``lsn``) must end where the next one's log starts."""
    if lsn != next_from:
        raise SerializationError(
            f"checkpoint {gen} is at LSN {lsn}, but the next one's log starts at "
            f"{next_from}", path=path)


def _check_owner(info: dict[str, object] | None, bus_id: int, gen: int, path: Path) -> None:
    if info is None or info.get("bus_id") != f"{bus_id:016x}" or info.get("generation") != gen:
        raise SerializationError("this checkpoint belongs to another bus or generation; it is "
                                 "never loaded into this one", path=path)
