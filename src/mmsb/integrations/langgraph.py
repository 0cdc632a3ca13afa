"""MMSB as a LangGraph checkpointer: :class:`MMSBSaver`.

LangGraph's savers store every new version of a channel in full. Here each channel of
a thread lives on one page whose successive versions are deltas, so a conversation that
grows by one message a step costs about one message of history per step. The mapping
(docs/LangGraph.md has the details):

- **one page per (thread, namespace, channel)**: a new version of the channel is
  written over the page (only the bytes that differ are logged); a version is read
  back with ``read_page_at(epoch=...)``. A page only grows; the checkpoint record says
  how many of its bytes are the value.
- **one journal page per (thread, namespace)**: every ``put`` appends a checkpoint
  record (the checkpoint without its values, its metadata, its parent, and where each
  channel value lives: page, epoch, length, type), every ``put_writes`` a writes record
  (layout in ``_journal.py`` and docs/SerializationSpec.md).
- a ``put`` is one ``batch``: the channel writes and the record are logged together,
  so a crash keeps the checkpoint whole or not at all.
- ``copy_thread`` clones the journal and shares the channel pages (a fork writes its
  own page from then on, starting as a clone of the one it forked from).

What LangGraph serializes stays LangGraph's: the saver stores the ``(type, bytes)``
pairs its serializer makes and hands them back to it; MMSB decodes only its own
records (msgpack without extensions, checksummed).
"""

from __future__ import annotations

import bisect
import builtins
import dataclasses
import os
import random
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from .. import (
    MMSBConfig,
    MMSBState,
    batch,
    clone_page,
    create_page,
    delete_page,
    get_deltas_for_page,
    mmsb_start,
    mmsb_stop,
    resize_page,
    update_metadata,
    write_page,
)
from .._history.timetravel import read_page_prefix_at, read_page_prefixes_at
from ..errors import (
    InvalidArgumentError,
    MissingDependencyError,
    MMSBError,
    SerializationError,
)
from . import _journal as jr
from ._journal import ChannelRef, CheckpointRecord, WriteEntry, WritesRecord

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        PendingWrite,
        get_checkpoint_metadata,
        writes_sort_key,
    )
    from langgraph.checkpoint.serde.base import SerializerProtocol
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise MissingDependencyError(
        "mmsb.integrations.langgraph needs LangGraph's checkpoint package "
        f"({exc.name or exc}); install it with: pip install 'mmsb[langgraph]'"
    ) from exc

__all__ = [
    "BlameRange",
    "ChannelDiff",
    "ChannelRef",
    "ChannelVersion",
    "MMSBSaver",
    "ThreadEvent",
    "thread_changes",
]

_TAG = "mmsb.langgraph"
"""Page metadata key that marks the saver's pages; its value is the page's kind."""
_JOURNAL = "journal"
_CHANNEL = "channel"
_SOURCE = "langgraph"
"""The ``source`` of every delta the saver logs."""
_MAX_PAGE = (1 << 32) - 1
_JOURNAL_START = 1024
_STATE_AT = 5
"""Offset of the journal header's state byte."""
_STRATEGIES = ("keep_latest", "delete")
_CACHE_RECORDS = 4096
"""Decoded journal records kept (they are immutable, so sharing them is safe)."""
_LIST_AHEAD = 8
"""Checkpoints ``list`` reads at a time: the history index's keyframe interval, so
the versions between two keyframes are rebuilt in one pass."""
_EMPTY = ("empty", b"")
"""The typed value of a channel that a put versions without a value."""
_VERSION_TYPES = (str, int, float)

Version = str | int | float


# ----------------------------------------------------------------------- result types


@dataclass(frozen=True, slots=True)
class ChannelDiff:
    """How one channel's serialized value differs between two checkpoints."""

    channel: str
    status: str
    """``"added"``, ``"removed"`` or ``"changed"``."""
    old_version: Version | None
    new_version: Version | None
    old: bytes | None
    """The older checkpoint's serialized value (``None``: the channel had none)."""
    new: bytes | None
    """The newer checkpoint's serialized value (``None``: the channel had none)."""
    ranges: tuple[tuple[int, int], ...]
    """Half-open byte ranges where the two differ; bytes past the end of the shorter
    value count as different."""

    @property
    def changed_bytes(self) -> int:
        """How many byte positions differ."""
        return sum(b - a for a, b in self.ranges)


@dataclass(frozen=True, slots=True)
class ChannelVersion:
    """One version of a channel along a checkpoint's ancestry (``MMSBSaver.history``)."""

    checkpoint_id: str
    """The checkpoint that first held this version."""
    step: int | None
    """That checkpoint's ``metadata["step"]``."""
    source: str | None
    """That checkpoint's ``metadata["source"]`` (``"input"``, ``"loop"``, ``"update"``,
    ``"fork"``)."""
    version: Version
    """LangGraph's channel version."""
    size: int
    """Bytes of the serialized value."""
    changed_bytes: int
    """Byte positions that differ from the previous version (all of them for the
    first)."""
    page_id: int
    epoch: int
    lsn: int | None
    """LSN of the delta that wrote this version (``None`` when writing it changed no
    byte of the page, or the page started there as a clone)."""
    timestamp: int | None
    """Time of that delta, ns since the epoch."""


@dataclass(frozen=True, slots=True)
class BlameRange:
    """A maximal byte range of a channel's value last changed by one checkpoint."""

    start: int
    stop: int
    """Half-open: bytes ``start`` … ``stop - 1``."""
    checkpoint_id: str
    step: int | None
    source: str | None
    version: Version


# ----------------------------------------------------------------------- the index


@dataclass(slots=True)
class _Entry:
    """Where a checkpoint's live record sits in its journal, and what it references."""

    offset: int
    length: int
    parent_id: str | None
    run_id: str | None
    pages: tuple[int, ...]


@dataclass(slots=True)
class _Writes:
    keys: set[tuple[str, int]]
    frames: builtins.list[tuple[int, int]]


class _Journal:
    """The in-memory index of one (thread, namespace) journal page."""

    __slots__ = ("thread", "ns", "page_id", "end", "entries", "order", "writes", "blobs",
                 "last", "generation")

    def __init__(self, thread: str, ns: str, page_id: int) -> None:
        self.thread = thread
        self.ns = ns
        self.page_id = page_id
        self.end = 0
        """Offset past the last record; 0 while not even the header is written."""
        self.entries: dict[str, _Entry] = {}
        self.order: builtins.list[str] = []
        """Checkpoint ids, ascending (ids sort by creation time)."""
        self.writes: dict[str, _Writes] = {}
        self.blobs: dict[tuple[str, Any], ChannelRef] = {}
        """(channel, version) → where the latest put of that version lives."""
        self.last: tuple[str, dict[str, ChannelRef]] | None = None
        """The last record indexed: its id and channel refs (the usual parent)."""
        self.generation = 0
        """Bumped when the page's records move (a rewrite), so cached records of the
        old layout are never read again."""


def _check_versions(versions: Mapping[Any, Any]) -> None:
    """Refuse a channel name that is not a str or a version that is not a str, int or
    float (exact types checked first, the common case)."""
    for ch, ver in versions.items():
        if type(ch) is not str or type(ver) not in _VERSION_TYPES:
            if not isinstance(ch, str) or isinstance(ver, bool) or \
                    not isinstance(ver, str | int | float):
                raise InvalidArgumentError(
                    f"MMSBSaver.put: channel {ch!r} has version {ver!r}; channel names are "
                    "str and versions str, int or float")


def _ranges(mask: np.ndarray) -> builtins.list[tuple[int, int]]:
    """Half-open ranges of the True runs of a bool array (vectorised)."""
    if mask.size == 0:
        return []
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def _diff_mask(old: bytes, new: bytes) -> np.ndarray:
    """One bool per byte of the longer value: True where the two differ."""
    a = np.frombuffer(old, dtype=np.uint8)
    b = np.frombuffer(new, dtype=np.uint8)
    common = min(a.size, b.size)
    out = np.ones(max(a.size, b.size), dtype=bool)
    np.not_equal(a[:common], b[:common], out=out[:common])
    return out


class MMSBSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer whose history is MMSB byte deltas.

    ``MMSBSaver()`` keeps everything in an in-memory bus; ``MMSBSaver(path)`` in a
    durable bus at ``path`` (a directory, created or reopened and recovered: every
    thread, checkpoint and pending write is back after a crash or a restart). Use it as
    a context manager, or call :meth:`close`. Every method of
    ``BaseCheckpointSaver`` is implemented, sync and async, including ``copy_thread``,
    ``delete_for_runs`` and ``prune``; :meth:`diff`, :meth:`history`, :meth:`blame` and
    :meth:`locate` give MMSB's byte-level view of a thread.

    Args:
        path: ``None`` for an in-memory bus, or a directory for a durable one. One
            process writes a durable bus at a time (a second saver on the same
            directory raises ``BusLockedError``).
        serde: LangGraph's serializer (default: its ``JsonPlusSerializer``). The saver
            stores the ``(type, bytes)`` pairs it makes and never decodes them itself.
        config: the bus's ``MMSBConfig``. Default, durable: ``fsync="batch"``, an
            automatic checkpoint every 2^20 records and none by time. In memory, automatic
            log compression is always off, since it would drop the history past
            checkpoints are read from. Refused (``InvalidArgumentError``):
            ``enable_logging=False`` and ``retain_checkpoints`` other than ``None``,
            for the same reason.

    The bus becomes the active state (``mmsb.active_state()``), as with ``mmsb_start``;
    :attr:`state` gives it for MMSB's own tools. Calls are thread-safe (one lock); the
    async methods run the sync ones inline, since none of them waits on a network.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 serde: SerializerProtocol | None = None,
                 config: MMSBConfig | None = None) -> None:
        super().__init__(serde=serde)
        cfg = self._bus_config(path, config)
        self._lock = threading.RLock()
        self._journals: dict[str, dict[str, _Journal]] = {}
        self._owned: dict[tuple[str, str, str], int] = {}
        self._owner: dict[int, tuple[str, str, str]] = {}
        self._owned_by: dict[tuple[str, str], set[int]] = {}
        self._refs: Counter[int] = Counter()
        self._sizes: dict[int, int] = {}
        """Page id → its size when last grown: only the saver resizes its pages, and
        only ``_rewrite`` shrinks one (it updates this), so a put needs no lookup."""
        self._cache: OrderedDict[tuple[int, int, int], jr.Record] = OrderedDict()
        self._path = None if path is None else os.fspath(path)
        self._state = mmsb_start(enable_gpu=False, config=cfg, path=path)
        try:
            self._load()
        except BaseException:
            mmsb_stop(self._state)
            raise

    @staticmethod
    def _bus_config(path: Any, config: MMSBConfig | None) -> MMSBConfig:
        if config is None:
            if path is None:
                return MMSBConfig(enable_gpu=False, max_tlog_size=1 << 62)
            return MMSBConfig(enable_gpu=False, max_tlog_size=1 << 20, checkpoint_interval=0)
        if not isinstance(config, MMSBConfig):
            raise InvalidArgumentError(
                f"MMSBSaver: config must be an MMSBConfig, not {type(config).__name__}")
        if not config.enable_logging:
            raise InvalidArgumentError(
                "MMSBSaver: config.enable_logging=False keeps no history, and past "
                "checkpoints are read from the history; leave it True")
        if config.retain_checkpoints is not None:
            raise InvalidArgumentError(
                "MMSBSaver: config.retain_checkpoints would drop history that past "
                "checkpoints are read from; leave it None (delete threads, or prune them, "
                "to drop checkpoints)")
        if path is None:
            return dataclasses.replace(config, max_tlog_size=1 << 62)
        return dataclasses.replace(config)

    # ------------------------------------------------------------------- lifecycle

    @property
    def state(self) -> MMSBState:
        """The bus the saver writes (for ``read_page_at``, ``mmsb.get_stats`` …).
        Write its pages only through the saver."""
        return self._state

    @property
    def path(self) -> str | None:
        """The durable bus's directory, or ``None`` in memory."""
        return self._path

    def close(self) -> None:
        """Stop the bus (a durable bus is checkpointed, synced and unlocked). Reads
        still work afterwards; writes raise ``StateClosedError``. Closing twice does
        nothing."""
        with self._lock:
            mmsb_stop(self._state)

    def __enter__(self) -> MMSBSaver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> MMSBSaver:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------- loading

    def _load(self) -> None:
        """Rebuild the index from the bus's pages: journals from their records,
        channel pages from their metadata; finish what a crash interrupted."""
        state = self._state
        journals: dict[tuple[str, str], builtins.list[int]] = {}
        channels: builtins.list[tuple[int, str, str, str]] = []
        for pid in builtins.list(state.pages.keys()):
            meta = state.pages[pid].metadata
            kind = meta.get(_TAG)
            if kind is None:
                continue
            thread, ns = meta.get("thread"), meta.get("ns")
            if not isinstance(thread, str) or not isinstance(ns, str):
                raise SerializationError(
                    f"page {pid} is marked as a LangGraph {kind!r} page but its thread or "
                    "namespace is not a str; it was not written by MMSBSaver")
            if kind == _JOURNAL:
                journals.setdefault((thread, ns), []).append(int(pid))
            elif kind == _CHANNEL:
                channel = meta.get("channel")
                if not isinstance(channel, str):
                    raise SerializationError(
                        f"page {pid} is marked as a LangGraph channel page without a str "
                        "channel name; it was not written by MMSBSaver")
                channels.append((int(pid), thread, ns, channel))
            else:
                raise SerializationError(f"page {pid} has an unknown LangGraph page kind "
                                         f"{kind!r}; it was not written by MMSBSaver")
        for (thread, ns), pids in sorted(journals.items()):
            pids.sort()
            # A copy interrupted before it was relabelled shares its source's label;
            # the source is the older (lower) page.
            for extra in pids[1:]:
                delete_page(state, extra)
            pid = pids[0]
            data = state.pages[pid].data
            where = f"journal page {pid} (thread {thread!r}, namespace {ns!r})"
            if not np.any(data[:jr.HEADER_SIZE]):
                if np.any(data):
                    raise SerializationError(f"{where}: no header but data after it", offset=0)
                self._add_journal(_Journal(thread, ns, pid))
                continue
            if jr.header_state(data, where) != jr.LIVE:
                delete_page(state, pid)
                continue
            j = _Journal(thread, ns, pid)
            self._index_frames(j, data, where)
            self._add_journal(j)
        for pid, thread, ns, channel in sorted(channels):
            key = (thread, ns, channel)
            if key not in self._owned:
                self._own(key, pid)
            elif self._refs.get(pid, 0) == 0:
                # A clone interrupted before it was relabelled (its source is older).
                delete_page(state, pid)
        for pid in builtins.list(self._refs):
            if pid not in state.pages:
                raise SerializationError(f"a checkpoint refers to page {pid}, which the bus "
                                         "does not hold")
        self._collect(builtins.list(self._owner))

    def _add_journal(self, j: _Journal) -> None:
        self._journals.setdefault(j.thread, {})[j.ns] = j

    def _index_frames(self, j: _Journal, data: Any, where: str, start: int = 0) -> None:
        """Index the records of ``data`` (the page's bytes from offset ``start``)."""
        end = j.end
        if start == 0:
            frames = jr.iter_frames(data, where)
            end = jr.HEADER_SIZE
        else:
            frames = self._frames_from(data, start, where)
        for offset, length, record in frames:
            self._index_record(j, offset, length, record)
            end = offset + length
        j.end = end

    @staticmethod
    def _frames_from(data: bytes, start: int,
                     where: str) -> Iterator[tuple[int, int, jr.Record]]:
        pos = 0
        while pos < len(data):
            length = int.from_bytes(data[pos:pos + 4], "little")
            n = jr.FRAME_OVERHEAD + length
            yield start + pos, n, jr.decode_frame(data[pos:pos + n], where, start + pos)
            pos += n

    def _index_record(self, j: _Journal, offset: int, length: int, record: jr.Record,
                      refs: dict[str, ChannelRef] | None = None) -> None:
        """Index one record; ``refs``: a checkpoint record's channel refs by channel, in
        the record's order, when the caller has them at hand."""
        if isinstance(record, WritesRecord):
            w = j.writes.get(record.checkpoint_id)
            if w is None:
                w = j.writes[record.checkpoint_id] = _Writes(set(), [])
            w.keys.update((record.task_id, e.idx) for e in record.writes)
            w.frames.append((offset, length))
            return
        cid = record.checkpoint_id
        counts = self._refs
        old = j.entries.get(cid)
        if old is None:
            order = j.order
            if not order or order[-1] < cid:
                order.append(cid)  # the usual case: ids grow with time
            else:
                bisect.insort(order, cid)
        else:
            counts.subtract(old.pages)
        if refs is None:
            refs = {c.channel: c for c in record.channels}
        blobs = j.blobs
        found = []
        for c in record.channels:
            blobs[(c.channel, c.version)] = c
            if c.page_id:
                found.append(c.page_id)
        pages = tuple(sorted(set(found))) if len(found) > 1 else tuple(found)
        for pid in pages:
            counts[pid] += 1
        j.entries[cid] = _Entry(offset, length, record.parent_id, record.run_id, pages)
        j.last = (cid, refs)

    def _unindex(self, j: _Journal) -> set[int]:
        """Forget a journal's records; return the pages they referred to."""
        pages: set[int] = set()
        for e in j.entries.values():
            self._refs.subtract(e.pages)
            pages.update(e.pages)
        j.entries.clear()
        j.order.clear()
        j.writes.clear()
        j.blobs.clear()
        j.last = None
        j.generation += 1
        return pages

    def _own(self, key: tuple[str, str, str], pid: int) -> None:
        self._owned[key] = pid
        self._owner[pid] = key
        self._owned_by.setdefault(key[:2], set()).add(pid)

    def _collect(self, candidates: Iterable[int]) -> None:
        """Delete those of ``candidates`` that are channel pages no live checkpoint
        refers to and whose owning thread and namespace have no journal any more."""
        state = self._state
        for pid in sorted(candidates):
            owner = self._owner.get(pid)
            if owner is None or self._refs.get(pid, 0) > 0:
                continue
            if owner[1] in self._journals.get(owner[0], {}):
                continue
            delete_page(state, pid)
            self._sizes.pop(pid, None)
            del self._owner[pid]
            del self._owned[owner]
            pids = self._owned_by.get(owner[:2])
            if pids is not None:
                pids.discard(pid)
                if not pids:
                    del self._owned_by[owner[:2]]
            self._refs.pop(pid, None)

    # ------------------------------------------------------------------- helpers

    @staticmethod
    def _ids(config: Any, fn: str, *, need_id: bool = False) -> tuple[str, str, str | None]:
        if type(config) is dict:
            conf = config.get("configurable")
            if type(conf) is dict:
                # The usual shape, checked with exact types; anything else takes the
                # general path below, which names what is wrong.
                thread, ns, cid = (conf.get("thread_id"), conf.get("checkpoint_ns") or "",
                                   conf.get("checkpoint_id"))
                if (type(thread) is str and type(ns) is str
                        and (cid is None or type(cid) is str) and (cid or not need_id)):
                    return thread, ns, cid
        if not isinstance(config, Mapping) or not isinstance(config.get("configurable"),
                                                              Mapping):
            raise InvalidArgumentError(
                f"MMSBSaver.{fn}: config must be a dict with a 'configurable' dict, such as "
                "{'configurable': {'thread_id': '1'}}")
        conf = config["configurable"]
        thread = conf.get("thread_id")
        if thread is None:
            raise InvalidArgumentError(f"MMSBSaver.{fn}: config['configurable'] has no "
                                       "'thread_id'")
        ns = conf.get("checkpoint_ns") or ""
        if not isinstance(ns, str):
            raise InvalidArgumentError(f"MMSBSaver.{fn}: checkpoint_ns must be a str, not "
                                       f"{type(ns).__name__}")
        cid = conf.get("checkpoint_id")
        if cid is not None and not isinstance(cid, str):
            raise InvalidArgumentError(f"MMSBSaver.{fn}: checkpoint_id must be a str, not "
                                       f"{type(cid).__name__}")
        if need_id and not cid:
            raise InvalidArgumentError(f"MMSBSaver.{fn}: config['configurable'] has no "
                                       "'checkpoint_id'")
        return str(thread), ns, cid

    @staticmethod
    def _config(thread: str, ns: str, cid: str) -> RunnableConfig:
        return {"configurable": {"thread_id": thread, "checkpoint_ns": ns,
                                 "checkpoint_id": cid}}

    def _journal(self, thread: str, ns: str) -> _Journal | None:
        return self._journals.get(thread, {}).get(ns)

    def _new_journal(self, thread: str, ns: str) -> _Journal:
        page = create_page(self._state, _JOURNAL_START,
                           metadata={_TAG: _JOURNAL, "thread": thread, "ns": ns})
        j = _Journal(thread, ns, page.id)
        self._add_journal(j)
        return j

    def _grow(self, pid: int, needed: int) -> None:
        """Make page ``pid`` at least ``needed`` bytes (doubling, so a page that grows a
        little each step is resized O(log n) times)."""
        if needed <= self._sizes.get(pid, -1):
            return
        size = self._state.pages[pid].size
        if needed > size:
            size = min(_MAX_PAGE, max(needed, 2 * size))
            resize_page(self._state, pid, size)
        self._sizes[pid] = size

    def _read(self, pid: int, offset: int, length: int) -> bytes:
        data: bytes = self._state.pages[pid].data[offset:offset + length].tobytes()
        return data

    def _record(self, j: _Journal, entry: _Entry | tuple[int, int]) -> jr.Record:
        """The decoded record at ``entry`` (cached: records never change in place)."""
        offset, length = (entry.offset, entry.length) if isinstance(entry, _Entry) else entry
        key = (j.page_id, j.generation, offset)
        cache = self._cache
        record = cache.get(key)
        if record is not None:
            cache.move_to_end(key)
            return record
        where = f"journal page {j.page_id} (thread {j.thread!r}, namespace {j.ns!r})"
        record = jr.decode_frame(self._read(j.page_id, offset, length), where, offset)
        cache[key] = record
        if len(cache) > _CACHE_RECORDS:
            cache.popitem(last=False)
        return record

    def _checkpoint(self, j: _Journal, cid: str) -> CheckpointRecord:
        record = self._record(j, j.entries[cid])
        assert isinstance(record, CheckpointRecord)
        return record

    def _refs_of(self, j: _Journal, cid: str | None) -> dict[str, ChannelRef]:
        if cid is None or cid not in j.entries:
            return {}
        if j.last is not None and j.last[0] == cid:
            return j.last[1]
        return {c.channel: c for c in self._checkpoint(j, cid).channels}

    def _value(self, ref: ChannelRef) -> bytes:
        """The serialized bytes of one channel value, read at its epoch: one call, which
        copies them from the page when it is still at that epoch, else rebuilds only
        the value's bytes from the history (not the whole page, which may be up to
        twice the value's size)."""
        if ref.page_id == 0:
            return b""
        return read_page_prefix_at(self._state, ref.page_id, epoch=ref.epoch,
                                   length=ref.length)

    def _writes(self, j: _Journal, cid: str) -> builtins.list[tuple[str, str, str, bytes, str, int]]:
        """``(task_id, channel, type, value, task_path, idx)`` of a checkpoint's pending
        writes, a later put of the same (task, index) replacing an earlier one."""
        w = j.writes.get(cid)
        if w is None:
            return []
        found: dict[tuple[str, int], tuple[str, str, str, bytes, str, int]] = {}
        for frame in w.frames:
            record = self._record(j, frame)
            assert isinstance(record, WritesRecord)
            for e in record.writes:
                found[(record.task_id, e.idx)] = (record.task_id, e.channel, e.type, e.value,
                                                  record.task_path, e.idx)
        return builtins.list(found.values())

    def _raw(self, j: _Journal, cid: str) -> tuple[CheckpointRecord, dict[str, tuple[str, bytes]],
                                                   builtins.list[tuple[str, str, str, bytes, str, int]]]:
        record = self._checkpoint(j, cid)
        values = {c.channel: (c.type, self._value(c)) for c in record.channels
                  if c.type != "empty"}
        return record, values, self._writes(j, cid)

    def _tuple(self, j: _Journal, cid: str, config: RunnableConfig | None,
               raw: tuple[CheckpointRecord, dict[str, tuple[str, bytes]],
                          builtins.list[tuple[str, str, str, bytes, str, int]]],
               metadata: CheckpointMetadata | None = None) -> CheckpointTuple:
        record, values, writes = raw
        loads = self.serde.loads_typed
        checkpoint: Checkpoint = loads(record.checkpoint)
        # As LangGraph's savers do: a value whose channel the checkpoint does not
        # version (a put whose new_versions named it anyway) is not one of its values.
        versions = checkpoint.get("channel_versions") or {}
        checkpoint["channel_values"] = {k: loads(v) for k, v in values.items()
                                        if k in versions}
        if len(writes) > 1:
            writes.sort(key=lambda w: writes_sort_key(w[4], w[0], w[5]))
        pending: builtins.list[PendingWrite] = [(w[0], w[1], loads((w[2], w[3])))
                                                 for w in writes]
        # CheckpointTuple's fields in order: config, checkpoint, metadata, parent_config,
        # pending_writes.
        return CheckpointTuple(
            config if config is not None else self._config(j.thread, j.ns, cid),
            checkpoint,
            metadata if metadata is not None else loads(record.metadata),
            (self._config(j.thread, j.ns, record.parent_id) if record.parent_id else None),
            pending,
        )

    # ------------------------------------------------------------------- reading

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names (its ``checkpoint_id``), or the thread's
        latest in that namespace; ``None`` if there is none. Cost: one record, one read
        per channel (``read_page_prefix_at``: the value's bytes copied from the page,
        or for a past version its prefix rebuilt from a keyframe and at most 8
        deltas), then LangGraph's decoding."""
        thread, ns, cid = self._ids(config, "get_tuple")
        with self._lock:
            j = self._journal(thread, ns)
            if j is None or not j.order:
                return None
            if cid is None:
                cid = j.order[-1]
                config = None  # type: ignore[assignment]
            elif cid not in j.entries:
                return None
            raw = self._raw(j, cid)
        return self._tuple(j, cid, config, raw)

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None,
             limit: int | None = None) -> Iterator[CheckpointTuple]:
        """Checkpoints, newest first (by id): of ``config``'s thread (and namespace, when
        it names one; and only its ``checkpoint_id``, when it names one), or of every
        thread when ``config`` is ``None``; with every ``filter`` key equal in the
        metadata, ids before ``before``'s, at most ``limit``. Items are read a few at a
        time (up to 8, never more than ``limit`` leaves), under the lock, the values of
        one page's versions together; a checkpoint deleted before it is yielded is
        skipped."""
        if filter is not None and not isinstance(filter, Mapping):
            raise InvalidArgumentError(f"MMSBSaver.list: filter must be a dict, not "
                                       f"{type(filter).__name__}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise InvalidArgumentError(f"MMSBSaver.list: limit must be an int, not "
                                       f"{type(limit).__name__}")
        before_id = None
        if before is not None:
            conf = before.get("configurable") if isinstance(before, Mapping) else None
            before_id = conf.get("checkpoint_id") if isinstance(conf, Mapping) else None
            if before_id is not None and not isinstance(before_id, str):
                raise InvalidArgumentError("MMSBSaver.list: before's checkpoint_id must be "
                                           f"a str, not {type(before_id).__name__}")
        only_ns: str | None = None
        only_id: str | None = None
        threads: Iterable[str]
        if config is not None:
            thread, _ns, only_id = self._ids(config, "list")
            raw_ns = config["configurable"].get("checkpoint_ns")
            only_ns = None if raw_ns is None else _ns
            threads = (thread,)
        else:
            threads = ()
        return self._list(config is None, threads, only_ns, only_id, filter or {},
                          before_id, limit)

    def _list(self, every: bool, threads: Iterable[str], only_ns: str | None,
              only_id: str | None, filter: Mapping[str, Any], before_id: str | None,
              limit: int | None) -> Iterator[CheckpointTuple]:
        if limit is not None and limit <= 0:
            return
        with self._lock:
            picked: builtins.list[tuple[str, str, str]] = []
            for thread in (builtins.list(self._journals) if every else threads):
                for ns, j in self._journals.get(thread, {}).items():
                    if only_ns is not None and ns != only_ns:
                        continue
                    ids = j.order
                    if before_id is not None:
                        ids = ids[:bisect.bisect_left(ids, before_id)]
                    if only_id is not None:
                        ids = [only_id] if only_id in ids else []
                    picked.extend((cid, thread, ns) for cid in ids)
        picked.sort(key=lambda t: t[0], reverse=True)
        loads = self.serde.loads_typed
        left = limit
        at = 0
        while at < len(picked):
            # A few checkpoints at a time (no more than are still to be yielded): their
            # records and metadata under the lock, then their values read together, so
            # the versions of a page that share a keyframe are rebuilt in one pass.
            want = _LIST_AHEAD if left is None else min(_LIST_AHEAD, left)
            chunk: builtins.list[tuple[_Journal, str, CheckpointRecord, Any,
                                       builtins.list[tuple[str, str, str, bytes, str, int]]]] = []
            with self._lock:
                while at < len(picked) and len(chunk) < want:
                    cid, thread, ns = picked[at]
                    at += 1
                    found = self._journals.get(thread, {}).get(ns)
                    if found is None:
                        continue
                    entry = found.entries.get(cid)
                    if entry is None:
                        continue
                    record = self._record(found, entry)
                    assert isinstance(record, CheckpointRecord)
                    metadata = loads(record.metadata)
                    if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                        continue
                    chunk.append((found, cid, record, metadata, self._writes(found, cid)))
                values = self._values([item[2] for item in chunk])
            for (j, cid, record, metadata, writes), vals in zip(chunk, values, strict=True):
                with self._lock:
                    found = self._journals.get(j.thread, {}).get(j.ns)
                    if found is None or cid not in found.entries:
                        continue  # deleted (or pruned) since it was read
                yield self._tuple(j, cid, None, (record, vals, writes), metadata)
                if left is not None:
                    left -= 1
                    if left <= 0:
                        return

    def _values(self, records: Sequence[CheckpointRecord]
                ) -> builtins.list[dict[str, tuple[str, bytes]]]:
        """Each record's typed channel values (``_raw``'s second item), the versions of
        one page read with one call (``read_page_prefixes_at``). Caller holds the
        lock."""
        reads: dict[int, builtins.list[tuple[int, int]]] = {}
        for record in records:
            for c in record.channels:
                if c.page_id and c.type != "empty":
                    reads.setdefault(c.page_id, []).append((c.epoch, c.length))
        got = {pid: iter(read_page_prefixes_at(self._state, pid, want))
               for pid, want in reads.items()}
        return [{c.channel: (c.type, next(got[c.page_id]) if c.page_id else b"")
                 for c in record.channels if c.type != "empty"} for record in records]

    # ------------------------------------------------------------------- writing

    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        """Store a checkpoint: each channel in ``new_versions`` is written over its page
        (only changed bytes are logged), then the checkpoint record is appended to the
        thread's journal, all in one batch. Returns the stored checkpoint's config.
        Cost: O(size of the new values) to compare, O(changed bytes) logged."""
        thread, ns, parent_id = self._ids(config, "put")
        if type(checkpoint) is not dict and not isinstance(checkpoint, Mapping):
            raise InvalidArgumentError("MMSBSaver.put: checkpoint must be a Checkpoint dict "
                                       "with a str 'id'")
        cid = checkpoint.get("id")
        if not isinstance(cid, str):
            raise InvalidArgumentError("MMSBSaver.put: checkpoint must be a Checkpoint dict "
                                       "with a str 'id'")
        versions = checkpoint.get("channel_versions", {})
        if ((type(versions) is not dict and not isinstance(versions, Mapping))
                or (type(new_versions) is not dict and not isinstance(new_versions, Mapping))):
            raise InvalidArgumentError("MMSBSaver.put: channel_versions and new_versions "
                                       "must be dicts")
        if type(metadata) is not dict and not isinstance(metadata, Mapping):
            raise InvalidArgumentError("MMSBSaver.put: metadata must be a dict")
        _check_versions(versions)
        _check_versions(new_versions)
        c: dict[str, Any] = dict(checkpoint)
        values: Mapping[str, Any] = c.pop("channel_values", None) or {}
        dumps = self.serde.dumps_typed
        cp_typed = dumps(c)
        md = get_checkpoint_metadata(config, metadata)
        md_typed = dumps(md)
        run = self._opt_str(md.get("run_id"))
        blobs: dict[str, tuple[str, bytes]] = {
            ch: dumps(values[ch]) if ch in values else _EMPTY for ch in new_versions}
        for ch, (_t, data) in blobs.items():
            if len(data) > _MAX_PAGE:
                raise InvalidArgumentError(
                    f"MMSBSaver.put: channel {ch!r} serializes to {len(data)} bytes, over "
                    f"the {_MAX_PAGE}-byte page limit")
        with self._lock:
            j = self._journal(thread, ns) or self._new_journal(thread, ns)
            parent_refs = self._refs_of(j, parent_id)
            refs: dict[str, ChannelRef] = {}
            for ch, ver in versions.items():
                if ch in blobs:
                    continue
                ref = parent_refs.get(ch)
                if ref is None or ref.version != ver:
                    ref = j.blobs.get((ch, ver))
                if ref is not None:
                    if ref.version != ver or type(ref.version) is not type(ver):
                        ref = ChannelRef(ch, ver, ref.page_id, ref.epoch, ref.length, ref.type)
                    refs[ch] = ref
            writes: builtins.list[tuple[str, int, bytes]] = []
            for ch, (_typ, data) in blobs.items():
                if data:
                    writes.append((ch, self._channel_page(thread, ns, ch, len(data),
                                                          parent_refs.get(ch)), data))
            # The journal must have room for the record before the batch (a resize is
            # refused inside one); its epochs are known only after the writes, so room
            # for an upper bound of its size is made, computed without encoding it.
            bound = jr.frame_bound(cid, parent_id, cp_typed, md_typed, run,
                                   [(r.channel, r.version, r.type) for r in refs.values()]
                                   + [(ch, new_versions[ch], typed[0])
                                      for ch, typed in blobs.items()])
            at = j.end
            self._grow(j.page_id, (at or jr.HEADER_SIZE) + bound)
            if writes:
                record, frame = self._commit(j, writes, blobs, refs, cid, parent_id,
                                             cp_typed, md_typed, run, new_versions)
            else:
                # No value to write: the record alone, one write (atomic by itself).
                for ch, (typ, _data) in blobs.items():
                    refs[ch] = ChannelRef(ch, new_versions[ch], 0, 0, 0, typ)
                record = CheckpointRecord(cid, parent_id, cp_typed, md_typed, run,
                                          tuple(refs.values()))
                frame = jr.encode_frame(record)
                write_page(self._state, j.page_id, at,
                           frame if at else jr.encode_header() + frame, source=_SOURCE)
            offset = at or jr.HEADER_SIZE
            j.end = offset + len(frame)
            self._index_record(j, offset, len(frame), record, refs)
        return {"configurable": {"thread_id": thread, "checkpoint_ns": ns,
                                 "checkpoint_id": cid}}

    def _commit(self, j: _Journal, writes: builtins.list[tuple[str, int, bytes]],
                blobs: dict[str, tuple[str, bytes]], refs: dict[str, ChannelRef], cid: str,
                parent_id: str | None, cp_typed: tuple[str, bytes],
                md_typed: tuple[str, bytes], run: str | None,
                new_versions: Mapping[str, Any]) -> tuple[CheckpointRecord, bytes]:
        """Write the channel values, then the checkpoint record that names the epochs
        they were written at, as one batch (what ``mmsb.batch`` does, run here without
        its context manager, each write through ``batch_write``: on a durable bus it is
        staged for the batch's one compiled commit, which writes the batch's frame and
        publishes its pages). Caller holds the saver's lock, and the journal has room
        for the record. Returns the record and its frame."""
        state = self._state
        state.enter()
        try:
            state.begin_batch()
            ok = False
            try:
                # The page table's epochs, taken under the state's lock: a batch refuses
                # structural changes, so the array stays the table's until it ends.
                epochs = state.table.epoch
                written = {}
                for ch, pid, data in writes:
                    state.batch_write(pid, 0, data, _SOURCE)
                    written[ch] = (pid, epochs.item(pid))
                for ch, (typ, data) in blobs.items():
                    w = written.get(ch)
                    refs[ch] = (ChannelRef(ch, new_versions[ch], w[0], w[1], len(data), typ)
                                if w is not None else ChannelRef(ch, new_versions[ch], 0, 0, 0,
                                                                 typ))
                record = CheckpointRecord(cid, parent_id, cp_typed, md_typed, run,
                                          tuple(refs.values()))
                frame = jr.encode_frame(record)
                at = j.end
                state.batch_write(j.page_id, at, frame if at else jr.encode_header() + frame,
                                  _SOURCE)
                ok = True
            finally:
                state.end_batch(ok)
        finally:
            state.leave()
        return record, frame

    @staticmethod
    def _opt_str(value: Any) -> str | None:
        return None if value is None else str(value)

    def _channel_page(self, thread: str, ns: str, channel: str, needed: int,
                      seed: ChannelRef | None) -> int:
        """The page of (thread, ns, channel), made if missing (a clone of ``seed``'s
        page when the channel's last value lives on another thread's page, so the
        first write is a small delta), and at least ``needed`` bytes."""
        key = (thread, ns, channel)
        pid = self._owned.get(key)
        if pid is None:
            meta = {_TAG: _CHANNEL, "thread": thread, "ns": ns, "channel": channel}
            if seed is not None and seed.page_id and seed.page_id in self._state.pages:
                pid = clone_page(self._state, seed.page_id).id
                update_metadata(self._state, pid, meta, replace=True)
            else:
                pid = create_page(self._state, max(needed, 64), metadata=meta).id
            self._own(key, pid)
        self._grow(pid, needed)
        return pid

    def _append(self, j: _Journal, frame: bytes, b: Any = None) -> tuple[int, int]:
        """Write ``frame`` at the end of the journal (with the header, if it is the
        first). Returns the frame's offset and the journal's new end, which the caller
        sets once the write is committed. The page must already be large enough."""
        data = frame if j.end else jr.encode_header() + frame
        at = j.end
        if b is not None:
            b.write(j.page_id, at, data, source=_SOURCE)
        else:
            write_page(self._state, j.page_id, at, data, source=_SOURCE)
        return at + len(data) - len(frame), at + len(data)

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        """Store a task's pending writes against the checkpoint ``config`` names, as one
        record in the thread's journal. A (task, index) already stored is kept (writes
        of LangGraph's special channels, with negative indexes, replace theirs)."""
        thread, ns, cid = self._ids(config, "put_writes", need_id=True)
        assert cid is not None
        if not isinstance(task_id, str) or not isinstance(task_path, str):
            raise InvalidArgumentError("MMSBSaver.put_writes: task_id and task_path must be str")
        items = builtins.list(writes)
        for w in items:
            if not isinstance(w, tuple | builtins.list) or len(w) != 2 or not isinstance(w[0], str):
                raise InvalidArgumentError(
                    f"MMSBSaver.put_writes: each write must be a (channel, value) pair with a "
                    f"str channel, not {w!r:.80}")
        dumps = self.serde.dumps_typed
        entries = [(WRITES_IDX_MAP.get(ch, idx), ch, dumps(v))
                   for idx, (ch, v) in enumerate(items)]
        with self._lock:
            j = self._journal(thread, ns)
            known = j.writes.get(cid) if j is not None else None
            fresh = tuple(WriteEntry(idx, ch, t, data) for idx, ch, (t, data) in entries
                          if idx < 0 or known is None or (task_id, idx) not in known.keys)
            if not fresh:
                return
            record = WritesRecord(cid, task_id, task_path, fresh)
            frame = jr.encode_frame(record)
            if j is None:
                j = self._new_journal(thread, ns)
            self._grow(j.page_id, (j.end or jr.HEADER_SIZE) + len(frame))
            offset, j.end = self._append(j, frame)
            self._index_record(j, offset, len(frame), record)

    # ------------------------------------------------------------------- deleting

    def delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and pending write of a thread, in every namespace
        (one batch marks its journals deleted, then their pages and the channel pages
        no other thread refers to are deleted). A thread that does not exist is a
        no-op. The bytes stay in the bus's history, which is append-only."""
        thread = str(thread_id)
        with self._lock:
            js = self._journals.get(thread)
            if not js:
                return
            with batch(self._state) as b:
                for j in js.values():
                    if j.end:
                        b.write(j.page_id, _STATE_AT, bytes([jr.DELETED]), source=_SOURCE)
            self._drop_journals(builtins.list(js.values()))

    def _drop_journals(self, js: builtins.list[_Journal]) -> None:
        """Forget journals and delete their pages, then the channel pages that only
        they kept alive."""
        candidates: set[int] = set()
        for j in js:
            candidates |= self._unindex(j)
            candidates |= self._owned_by.pop((j.thread, j.ns), set())
            threads = self._journals.get(j.thread, {})
            threads.pop(j.ns, None)
            if not threads:
                self._journals.pop(j.thread, None)
        for j in js:
            delete_page(self._state, j.page_id)
            self._sizes.pop(j.page_id, None)
        self._collect(candidates)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete every checkpoint whose metadata's ``run_id`` is one of ``run_ids``,
        with its pending writes, in every thread (the journals concerned are rewritten
        in one batch)."""
        if isinstance(run_ids, str | bytes) or not isinstance(run_ids, Iterable):
            raise InvalidArgumentError("MMSBSaver.delete_for_runs: run_ids must be a "
                                       "sequence of run ids, not a single value")
        runs = {str(r) for r in run_ids}
        if not runs:
            return
        with self._lock:
            plan: dict[_Journal, set[str]] = {}
            for threads in self._journals.values():
                for j in threads.values():
                    drop = {cid for cid, e in j.entries.items() if e.run_id in runs}
                    if drop:
                        plan[j] = set(j.entries) - drop
            self._rewrite(plan)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and pending write of one thread to another, in every
        namespace: the journal pages are cloned (or, where the target already has the
        namespace, the source's records are appended to it) and the channel pages are
        shared, not copied. All or nothing, also across a crash. A source that does
        not exist is a no-op."""
        src, dst = str(source_thread_id), str(target_thread_id)
        if src == dst:
            raise InvalidArgumentError("MMSBSaver.copy_thread: the source and target "
                                       f"thread are the same ({src!r})")
        state = self._state
        with self._lock:
            sources = {ns: j for ns, j in self._journals.get(src, {}).items() if j.end}
            if not sources:
                return
            targets = self._journals.get(dst, {})
            clones: dict[str, int] = {}
            appends: dict[str, bytes] = {}
            spans: dict[str, tuple[int, int]] = {}
            try:
                for ns, j in sorted(sources.items()):
                    if ns in targets and targets[ns].end:
                        appends[ns] = self._read(j.page_id, jr.HEADER_SIZE,
                                                 j.end - jr.HEADER_SIZE)
                        continue
                    pid = clone_page(state, j.page_id).id
                    # Pending before relabelled: a crash leaves a duplicate label or a
                    # pending journal, and the next open deletes either.
                    write_page(state, pid, _STATE_AT, bytes([jr.PENDING]), source=_SOURCE)
                    update_metadata(state, pid, {_TAG: _JOURNAL, "thread": dst, "ns": ns},
                                    replace=True)
                    clones[ns] = pid
                for ns, data in appends.items():
                    self._grow(targets[ns].page_id, targets[ns].end + len(data))
                with batch(state) as b:
                    for pid in clones.values():
                        b.write(pid, _STATE_AT, bytes([jr.LIVE]), source=_SOURCE)
                    for ns, data in appends.items():
                        spans[ns] = self._append(targets[ns], data, b)
            except BaseException:
                for pid in clones.values():
                    try:
                        delete_page(state, pid)
                    except MMSBError:
                        pass  # a pending journal: the next open deletes it
                raise
            for ns, pid in clones.items():
                empty = targets.get(ns)
                if empty is not None:  # a journal page without a header yet: replace it
                    self._drop_journals([empty])
                j = _Journal(dst, ns, pid)
                where = f"journal page {pid} (thread {dst!r}, namespace {ns!r})"
                self._index_frames(j, state.pages[pid].data, where)
                self._add_journal(j)
            for ns, data in appends.items():
                t = targets[ns]
                start, t.end = spans[ns]
                where = f"journal page {t.page_id} (thread {dst!r}, namespace {ns!r})"
                for offset, length, record in self._frames_from(data, start, where):
                    self._index_record(t, offset, length, record)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Drop checkpoints of the given threads: ``"keep_latest"`` keeps the newest
        checkpoint of each namespace with its pending writes (the journals are rewritten
        in one batch); ``"delete"`` deletes the threads. Unknown threads are skipped.

        Graphs that use LangGraph's ``DeltaChannel`` rebuild values from ancestors'
        writes: pruning them cuts that chain, as with every saver."""
        if strategy not in _STRATEGIES:
            raise InvalidArgumentError(f"MMSBSaver.prune: unknown strategy {strategy!r} "
                                       f"(known: {', '.join(_STRATEGIES)})")
        if isinstance(thread_ids, str | bytes) or not isinstance(thread_ids, Iterable):
            raise InvalidArgumentError("MMSBSaver.prune: thread_ids must be a sequence of "
                                       "thread ids, not a single value")
        threads = [str(t) for t in thread_ids]
        if strategy == "delete":
            for t in threads:
                self.delete_thread(t)
            return
        with self._lock:
            plan: dict[_Journal, set[str]] = {}
            for t in threads:
                for j in self._journals.get(t, {}).values():
                    keep = {j.order[-1]} if j.order else set()
                    if jr.HEADER_SIZE + sum(n for _o, n in self._spans(j, keep)) < j.end:
                        plan[j] = keep
            self._rewrite(plan)

    @staticmethod
    def _spans(j: _Journal, keep: set[str]) -> builtins.list[tuple[int, int]]:
        """(offset, length) of the live records of the checkpoints ``keep`` and of their
        writes, in journal order."""
        spans = [(e.offset, e.length) for cid, e in j.entries.items() if cid in keep]
        for cid in keep:
            w = j.writes.get(cid)
            if w is not None:
                spans.extend(w.frames)
        spans.sort()
        return spans

    def _rewrite(self, plan: Mapping[_Journal, set[str]]) -> None:
        """Rewrite journals to hold only the given checkpoints (their live records and
        writes, in their order), all in one batch; then shrink the pages and delete
        channel pages nothing refers to any more."""
        if not plan:
            return
        contents = {j: jr.encode_header() + b"".join(
            self._read(j.page_id, o, n) for o, n in self._spans(j, keep))
            for j, keep in plan.items()}
        with batch(self._state) as b:
            for j, content in contents.items():
                b.write(j.page_id, 0, content + bytes(max(0, j.end - len(content))),
                        source=_SOURCE)
        candidates: set[int] = set()
        for j, content in contents.items():
            candidates |= self._unindex(j)
            j.end = 0
            where = f"journal page {j.page_id} (thread {j.thread!r}, namespace {j.ns!r})"
            self._index_frames(j, np.frombuffer(content, dtype=np.uint8), where)
            size = self._state.pages[j.page_id].size
            target = max(_JOURNAL_START, len(content))
            if size >= 2 * target:
                resize_page(self._state, j.page_id, target)
                self._sizes[j.page_id] = target
        self._collect(candidates)

    # ------------------------------------------------------------------- async

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """``get_tuple``, run inline."""
        return self.get_tuple(config)

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        """``list``, run inline one item at a time."""
        for item in self.list(config, filter=filter, before=before, limit=limit):
            yield item

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        """``put``, run inline."""
        return self.put(config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        """``put_writes``, run inline."""
        self.put_writes(config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        """``delete_thread``, run inline."""
        self.delete_thread(thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """``delete_for_runs``, run inline."""
        self.delete_for_runs(run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """``copy_thread``, run inline."""
        self.copy_thread(source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *,
                     strategy: str = "keep_latest") -> None:
        """``prune``, run inline."""
        self.prune(thread_ids, strategy=strategy)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """The next channel version: a zero-padded counter and a random fraction, the
        form LangGraph's own savers use (versions sort as strings)."""
        if current is None:
            n = 0
        elif isinstance(current, int):
            n = current
        else:
            n = int(current.split(".")[0])
        return f"{n + 1:032}.{random.random():016}"  # noqa: S311 - a tie-breaker, not a secret

    # ------------------------------------------------------------------- MMSB's view

    def _locate(self, config: RunnableConfig, fn: str) -> tuple[_Journal, str]:
        thread, ns, cid = self._ids(config, fn)
        j = self._journal(thread, ns)
        if j is None or not j.order:
            raise InvalidArgumentError(f"MMSBSaver.{fn}: thread {thread!r} has no checkpoint "
                                       f"in namespace {ns!r}")
        if cid is None:
            cid = j.order[-1]
        elif cid not in j.entries:
            raise InvalidArgumentError(f"MMSBSaver.{fn}: thread {thread!r} has no checkpoint "
                                       f"{cid!r} in namespace {ns!r}")
        return j, cid

    def locate(self, config: RunnableConfig, channel: str) -> ChannelRef:
        """Where a channel's value of a checkpoint (the thread's latest, unless
        ``config`` names one) lives: its page, the epoch to read it at, its length and
        type. ``mmsb history DIR PAGE`` and ``mmsb blame DIR PAGE`` show that page's
        deltas; ``read_page_at(saver.state, page, epoch=epoch)[:length]`` is the value's
        bytes. Raises ``InvalidArgumentError`` for an unknown checkpoint or a channel it
        has no value of."""
        with self._lock:
            j, cid = self._locate(config, "locate")
            for ref in self._checkpoint(j, cid).channels:
                if ref.channel == channel and ref.type != "empty":
                    return ref
        raise InvalidArgumentError(f"MMSBSaver.locate: checkpoint {cid!r} has no value of "
                                   f"channel {channel!r}")

    def diff(self, old: RunnableConfig, new: RunnableConfig) -> builtins.list[ChannelDiff]:
        """The byte-level difference between two checkpoints' serialized channel values:
        one ``ChannelDiff`` per channel whose bytes differ (added, removed or changed),
        by channel name. Each config names a checkpoint (or its thread's latest); they
        may be of different threads. Raises ``InvalidArgumentError`` for an unknown
        checkpoint. Cost: a read of each value and one vectorised compare per channel."""
        with self._lock:
            j_old, c_old = self._locate(old, "diff")
            j_new, c_new = self._locate(new, "diff")
            a = {r.channel: r for r in self._checkpoint(j_old, c_old).channels
                 if r.type != "empty"}
            b = {r.channel: r for r in self._checkpoint(j_new, c_new).channels
                 if r.type != "empty"}
            values = {}
            for ch in sorted(set(a) | set(b)):
                ra, rb = a.get(ch), b.get(ch)
                if ra is not None and rb is not None and (ra.page_id, ra.epoch, ra.length,
                                                          ra.type) == (rb.page_id, rb.epoch,
                                                                       rb.length, rb.type):
                    continue
                values[ch] = (ra, rb, None if ra is None else self._value(ra),
                              None if rb is None else self._value(rb))
        out = []
        for ch, (ra, rb, va, vb) in values.items():
            if va is not None and vb is not None:
                ranges = _ranges(_diff_mask(va, vb))
                if not ranges and ra is not None and rb is not None and ra.type == rb.type:
                    continue
                status = "changed"
            else:
                ranges = [(0, len(vb if vb is not None else va or b""))]
                ranges = [r for r in ranges if r[1] > 0]
                status = "added" if va is None else "removed"
            out.append(ChannelDiff(ch, status, None if ra is None else ra.version,
                                   None if rb is None else rb.version, va, vb, tuple(ranges)))
        return out

    def _lineage(self, config: RunnableConfig, channel: str,
                 fn: str) -> builtins.list[tuple[str, Any, ChannelRef]]:
        """(checkpoint id, decoded metadata, channel ref) of every checkpoint along the
        parent chain of ``config``'s that holds a new version of ``channel``, oldest
        first."""
        with self._lock:
            j, cid = self._locate(config, fn)
            chain: builtins.list[tuple[str, CheckpointRecord]] = []
            seen: set[str] = set()
            at: str | None = cid
            while at is not None and at in j.entries and at not in seen:
                seen.add(at)
                record = self._checkpoint(j, at)
                chain.append((at, record))
                at = record.parent_id
        chain.reverse()
        out = []
        last: Version | None = None
        for at, record in chain:
            ref = next((r for r in record.channels if r.channel == channel), None)
            if ref is None or ref.type == "empty" or ref.version == last:
                continue
            last = ref.version
            out.append((at, self.serde.loads_typed(record.metadata), ref))
        return out

    @staticmethod
    def _step(metadata: Any) -> tuple[int | None, str | None]:
        if not isinstance(metadata, Mapping):
            return None, None
        step, source = metadata.get("step"), metadata.get("source")
        return (step if isinstance(step, int) else None,
                source if isinstance(source, str) else None)

    def history(self, config: RunnableConfig, channel: str) -> builtins.list[ChannelVersion]:
        """Every version of ``channel`` along the ancestry of a checkpoint (the thread's
        latest, unless ``config`` names one), oldest first: which checkpoint made it, its
        size, how many bytes changed, and the page, epoch, LSN and time of the delta that
        wrote it — ``mmsb history`` mapped onto LangGraph's steps. Raises
        ``InvalidArgumentError`` for an unknown checkpoint."""
        with self._lock:
            lineage = self._lineage(config, channel, "history")
            stamps: dict[int, dict[int, tuple[int, int]]] = {}
            values = []
            for _cid, _md, ref in lineage:
                if ref.page_id not in stamps:
                    stamps[ref.page_id] = ({d.epoch: (d.lsn, d.timestamp) for d in
                                            get_deltas_for_page(self._state, ref.page_id)}
                                           if ref.page_id else {})
                values.append(self._value(ref))
        out = []
        prev: bytes | None = None
        for (cid, md, ref), value in zip(lineage, values, strict=True):
            changed = len(value) if prev is None else int(_diff_mask(prev, value).sum())
            lsn, ts = stamps[ref.page_id].get(ref.epoch, (None, None))
            step, source = self._step(md)
            out.append(ChannelVersion(cid, step, source, ref.version, len(value), changed,
                                      ref.page_id, ref.epoch, lsn, ts))
            prev = value
        return out

    def blame(self, config: RunnableConfig, channel: str) -> builtins.list[BlameRange]:
        """For each maximal byte range of a channel's serialized value at a checkpoint
        (the thread's latest, unless ``config`` names one), the checkpoint along its
        ancestry that last changed those bytes — ``mmsb blame`` mapped onto LangGraph's
        steps. Raises ``InvalidArgumentError`` for an unknown checkpoint. Cost: one read
        and one vectorised compare per version of the channel."""
        with self._lock:
            lineage = self._lineage(config, channel, "blame")
            values = [self._value(ref) for _cid, _md, ref in lineage]
        owner = np.zeros(0, dtype=np.int64)
        prev = b""
        for k, value in enumerate(values):
            changed = _diff_mask(prev, value)[:len(value)]
            new_owner = np.full(len(value), k, dtype=np.int64)
            keep = min(len(prev), len(value))
            np.copyto(new_owner[:keep], owner[:keep], where=~changed[:keep])
            owner, prev = new_owner, value
        out = []
        if owner.size:
            cuts = np.flatnonzero(np.diff(owner)) + 1
            starts = np.concatenate(([0], cuts))
            stops = np.concatenate((cuts, [owner.size]))
            for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                cid, md, ref = lineage[int(owner[a])]
                step, source = self._step(md)
                out.append(BlameRange(a, b, cid, step, source, ref.version))
        return out


# --------------------------------------------------------------------------- change feed

@dataclass(frozen=True)
class ThreadEvent:
    """One change of a thread, from :func:`thread_changes`."""

    lsn: int
    timestamp: int
    """Nanoseconds since the Unix epoch (the record's time)."""
    kind: str
    """``"journal"`` (a ``put`` or ``put_writes`` appended a record to the journal of
    ``ns``), ``"channel"`` (a new value of ``channel`` was written), ``"created"`` or
    ``"deleted"`` (a page of the thread)."""
    ns: str
    channel: str | None
    page_id: int
    epoch: int | None
    """The page's epoch after the change (``"journal"`` and ``"channel"``)."""
    byte_range: tuple[int, int] | None
    """Half-open range of the page the change wrote (``"journal"``: the new record)."""


def _page_role(meta: Any) -> tuple[str, str, str | None] | None:
    """(thread, ns, channel or None for a journal) of a saver's page, from its metadata."""
    if not isinstance(meta, Mapping) or meta.get(_TAG) not in (_JOURNAL, _CHANNEL):
        return None
    thread, ns = meta.get("thread"), meta.get("ns")
    if not isinstance(thread, str) or not isinstance(ns, str):
        return None
    channel = meta.get("channel") if meta.get(_TAG) == _CHANNEL else None
    return thread, ns, channel if isinstance(channel, str) else None


def thread_changes(path: str | os.PathLike[str], thread_id: str, *, since: int = 0,
                   follow: bool = False, timeout: float | None = None) -> Iterator[ThreadEvent]:
    """The changes of one thread of the saver whose durable bus is at ``path``, as they
    are logged, from any process (for a UI beside a running graph): the bus's change
    feed (``mmsb.attach(path).changes``) narrowed to the thread's journal and channel
    pages. ``since``, ``follow`` and ``timeout`` are those of ``changes``; resume with
    the last LSN seen.

    Raises:
        InvalidArgumentError: thread_id is not a str (or a bad since/timeout).
        SerializationError: no bus at ``path``.
        HistoryUnavailableError: ``since`` is older than the history the bus retains.
    """
    from .. import EventType, attach

    if not isinstance(thread_id, str):
        raise InvalidArgumentError(f"thread_id must be a str, not {type(thread_id).__name__}")
    reader = attach(path)
    try:
        feed = reader.changes(since, follow=follow, timeout=timeout)
        # Pages as they are now; pages made later announce themselves in the feed.
        roles: dict[int, tuple[str, str, str | None]] = {}
        hist = reader.history(since)
        for pid in hist.pages:
            role = _page_role(hist.table.meta.get(pid))
            if role is not None:
                roles[pid] = role
    except BaseException:
        reader.close()
        raise
    return _thread_events(reader, feed, roles, thread_id, EventType)


def _thread_events(reader: Any, feed: Iterator[Any], roles: dict[int, tuple[str, str, str | None]],
                   thread_id: str, event_type: Any) -> Iterator[ThreadEvent]:
    try:
        for ev in feed:
            pid = ev.page_id
            if ev.type in (event_type.PAGE_CREATED, event_type.METADATA_CHANGED):
                role = _page_role(ev.payload.get("metadata"))
                if role is not None:
                    roles[pid] = role
                elif ev.type == event_type.METADATA_CHANGED:
                    roles.pop(pid, None)  # no longer one of the saver's pages
            role = roles.get(pid)
            if role is None or role[0] != thread_id:
                continue
            _thread, ns, channel = role
            if ev.type == event_type.PAGE_CHANGED:
                kind = "channel" if channel is not None else "journal"
                yield ThreadEvent(ev.lsn, ev.timestamp, kind, ns, channel, pid,
                                  ev.payload.get("epoch"),
                                  (ev.payload.get("lo", 0), ev.payload.get("hi", 0)))
            elif ev.type == event_type.PAGE_CREATED:
                yield ThreadEvent(ev.lsn, ev.timestamp, "created", ns, channel, pid, 0, None)
            elif ev.type == event_type.PAGE_DELETED:
                roles.pop(pid, None)
                yield ThreadEvent(ev.lsn, ev.timestamp, "deleted", ns, channel, pid, None, None)
    finally:
        reader.close()
