"""Reopening a durable bus defers its retained history: the newest checkpoint is read
without its log section and the log is built the first time something needs it
(``DeferredLog``). The reference is the open that reads everything at once
(``bus.DEFER_HISTORY = False``): after a crash at any point, both give the same pages,
epochs, masks, graph, counters and, once loaded, the same log, and every history call
sees the whole retained history."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mmsb
from conftest import edges, flip_in_log_section, pages_view, set_boot_id
from mmsb._core.log import DeferredLog, TransactionLog
from mmsb._storage import bus as bus_mod
from mmsb._storage import checkpoint as ckpt_mod
from mmsb.cli.views import blame, history_rows


def _cfg(**kw: Any) -> mmsb.MMSBConfig:
    kw.setdefault("enable_gpu", False)
    kw.setdefault("fsync", "none")
    kw.setdefault("checkpoint_interval", 0)
    kw.setdefault("max_tlog_size", 24)
    return mmsb.MMSBConfig(**kw)


def _workload(s: mmsb.MMSBState) -> Iterator[None]:
    """Every kind of record, over several automatic checkpoints; yields after each
    call (a point where a crash image is taken)."""
    a, b, c = (p.id for p in mmsb.create_pages(s, 3, 64))
    yield
    d = mmsb.create_page(s, 300, metadata={"name": "d"}).id
    yield
    mmsb.add_dependency(s, a, b, mmsb.CONTROL_DEPENDENCY)
    yield
    for i in range(40):
        mmsb.write_page(s, (a, b, c, d)[i % 4], (i * 5) % 56, bytes([i + 1]) * 8)
        if i % 9 == 0:
            yield
    mmsb.update_page(s, c, bytes(range(64)))
    yield
    mmsb.apply_batch(s, [(a, 0, b"batch"), (d, 290, b"tail!"), (b, 10, b"x" * 20)])
    yield
    mmsb.resize_page(s, c, 100)
    yield
    e = mmsb.clone_page(s, d).id
    yield
    mmsb.set_metadata(s, a, "k", [1, 2])
    yield
    mmsb.delete_page(s, b)
    yield
    for i in range(30):
        mmsb.write_page(s, (a, c, d, e)[i % 4], i % 50, (i * 3 + 7).to_bytes(4, "little"))
        if i % 7 == 0:
            yield
    mmsb.add_dependency(s, d, e)
    yield


def _images(tmp: Path, **kw: Any) -> list[Path]:
    """Crash images of a bus at many points of the workload: the directory copied while
    its writer is still open (what a SIGKILL leaves, after the log was written)."""
    root = tmp / "live"
    s = mmsb.mmsb_start(path=str(root), config=_cfg(**kw))
    out = []
    for k, _ in enumerate(_workload(s)):
        s.bus.flush()
        dst = tmp / f"img-{k}"
        shutil.copytree(root, dst)
        out.append(dst)
    mmsb.mmsb_stop(s)
    return out


def _open(root: Path, defer: bool, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> mmsb.MMSBState:
    """Open a copy of ``root`` (each open may clean up superseded files)."""
    dst = root.with_name(root.name + ("-deferred" if defer else "-eager"))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root, dst)
    monkeypatch.setattr(bus_mod, "DEFER_HISTORY", defer)
    return mmsb.mmsb_start(path=str(dst), config=_cfg(**kw))


def _state_view(s: mmsb.MMSBState) -> tuple:
    """What an open restores, without touching the log."""
    t = s.table
    masks = {pid: np.asarray(m).tobytes() for pid, (m, _lsn) in sorted(s.mask_base.items())}
    bus = s.bus
    assert bus is not None
    return (pages_view(s), edges(s), int(s.next_page_id), int(s.last_lsn), s.next_delta_id,
            s.log.horizon_lsn, s.log.horizon_timestamp, s.log.last_timestamp, masks,
            t.next_id, s.orphan_from, s.base_bytes(),
            [(c.generation, c.lsn, c.log_from_lsn, c.path.name) for c in bus.retained],
            bus.generation, bus.ckpt_lsn, bus.records_since_ckpt, bus.next_seq)


def _log_view(s: mmsb.MMSBState, times: bool = True) -> tuple:
    """The whole log, as columns (loads a deferred log); ``times=False``: without the
    timestamps (compress_log stamps its records with the time it runs)."""
    cols = s.log.columns()
    arrays = tuple(np.asarray(getattr(cols, f)).tobytes() for f in
                   ("lsn", "ids", "epoch", "ts", "page", "psize", "plen", "src", "enc",
                    "base_rows", "base_epochs", "payload") if times or f != "ts")
    structs = tuple((type(r).__name__, r.lsn, r.timestamp if times else 0) for r in cols.structs)
    masks = tuple(np.asarray(s.pages[pid].mask).tobytes() for pid in sorted(s.pages))
    return arrays, structs, tuple(cols.sources), s.log.record_count, masks


@pytest.mark.parametrize("retain", [None, 2])
def test_deferred_open_equals_the_full_recovery_after_a_crash_at_every_point(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retain: int | None) -> None:
    images = _images(tmp_path, retain_checkpoints=retain)
    assert len(images) >= 20
    deferred = 0
    for root in images:
        ref = _open(root, False, monkeypatch, retain_checkpoints=retain)
        got = _open(root, True, monkeypatch, retain_checkpoints=retain)
        try:
            assert type(ref.log) is TransactionLog
            assert _state_view(got) == _state_view(ref), root.name
            # The pages, graph and counters need no history; a resize or a clone in the
            # log after the newest checkpoint does (it carries the page's written mask).
            deferred += type(got.log) is DeferredLog
            assert _log_view(got) == _log_view(ref), root.name
            assert type(got.log) is TransactionLog
            assert mmsb.verify_state_consistency(got)
        finally:
            mmsb.mmsb_stop(ref)
            mmsb.mmsb_stop(got)
    assert deferred >= len(images) // 2


def _history_of(s: mmsb.MMSBState) -> tuple:
    last = int(s.last_lsn)
    at = []
    for pid in sorted(s.pages):
        for lsn in range(max(1, s.log.horizon_lsn), last + 1, 5):
            try:
                at.append(mmsb.read_page_at(s, pid, lsn=lsn))
            except (mmsb.PageNotFoundError, mmsb.InvalidArgumentError) as exc:
                at.append(type(exc).__name__)
    replays = [pages_view(mmsb.replay_to_lsn(s, lsn))
               for lsn in range(max(1, s.log.horizon_lsn), last + 1, 11)]
    hist = [history_rows(s, pid) for pid in sorted(s.pages)]
    who = [blame(s, pid) for pid in sorted(s.pages)]
    return at, replays, _untimed(hist), _untimed(who), len(s.tlog), [d.lsn for d in mmsb.query_log(s)]


def _untimed(x: Any) -> Any:
    """``x`` without the fields that hold a time (compress_log stamps with its own)."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if "time" not in k}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


@pytest.mark.parametrize("first", ["read_page_at", "replay_to_lsn", "history", "checkpoint_log",
                                   "compress_log", "write", "load_checkpoint"])
def test_every_history_call_sees_the_whole_history_after_a_deferred_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    root = _images(tmp_path)[-1]
    ref = _open(root, False, monkeypatch)
    got = _open(root, True, monkeypatch)
    try:
        assert type(got.log) is DeferredLog
        pid = sorted(got.pages)[0]
        src = mmsb.MMSBState(_cfg())
        for size in (16, 40):
            mmsb.write_page(src, mmsb.create_page(src, size).id, 3, b"other")
        other = tmp_path / "other.mmsb"
        mmsb.checkpoint_log(src, other)
        calls: dict[str, Callable[[mmsb.MMSBState], Any]] = {
            "read_page_at": lambda s: mmsb.read_page_at(s, pid, lsn=int(s.log.horizon_lsn) + 3),
            "replay_to_lsn": lambda s: pages_view(mmsb.replay_to_lsn(s, int(s.last_lsn) - 9)),
            "history": lambda s: len(history_rows(s, pid)),
            "checkpoint_log": lambda s: pages_view(_exported(s, tmp_path)),
            "compress_log": lambda s: mmsb.compress_log(s),
            "write": lambda s: mmsb.write_page(s, pid, 1, b"after").epoch,
            "load_checkpoint": lambda s: pages_view(_loaded(s, other)),
        }
        assert calls[first](got) == calls[first](ref)
        # Every call but a write of bytes read the history.
        assert type(got.log) is (DeferredLog if first == "write" else TransactionLog)
        assert _history_of(got) == _history_of(ref)
        # Writes and compress_log stamp their records with the time they run.
        times = first not in ("compress_log", "write")
        if first == "load_checkpoint":
            assert len(got.tlog) == len(src.tlog)
        assert _log_view(got, times) == _log_view(ref, times)
    finally:
        mmsb.mmsb_stop(ref)
        mmsb.mmsb_stop(got)
    # And the bus written on after that reopens to the same state again.
    again = mmsb.mmsb_start(path=str(root.with_name(root.name + "-deferred")), config=_cfg())
    ref2 = mmsb.mmsb_start(path=str(root.with_name(root.name + "-eager")), config=_cfg())
    try:
        assert pages_view(again) == pages_view(ref2)
        assert _history_of(again) == _history_of(ref2)
    finally:
        mmsb.mmsb_stop(again)
        mmsb.mmsb_stop(ref2)


def _loaded(s: mmsb.MMSBState, path: Path) -> mmsb.MMSBState:
    mmsb.load_checkpoint(s, path)
    return s


def _exported(s: mmsb.MMSBState, tmp: Path) -> mmsb.MMSBState:
    path = tmp / f"export-{id(s)}.mmsb"
    mmsb.checkpoint_log(s, path)
    out = mmsb.MMSBState(_cfg())
    mmsb.load_checkpoint(out, path)
    return out


_KILLED = r"""
import os, signal, sys
import mmsb
path, n = sys.argv[1], int(sys.argv[2])
s = mmsb.mmsb_start(path=path, enable_gpu=False, config=mmsb.MMSBConfig(
    fsync="none", checkpoint_interval=0, max_tlog_size=1000))
ids = [p.id for p in mmsb.create_pages(s, 16, 128)]
writes = [(ids[i % 16], (i * 13) % 120, (i + 1).to_bytes(8, "little")) for i in range(n)]
for k in range(0, n, 500):
    for w in writes[k:k + 500]:
        mmsb.write_page(s, *w)
print(s.last_lsn, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed(root: Path, n: int) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src")
    out = subprocess.run([sys.executable, "-c", _KILLED, str(root), str(n)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == -signal.SIGKILL, out.stderr[-500:]
    return int(out.stdout)


@pytest.mark.slow
def test_the_work_of_a_reopen_after_kill_does_not_grow_with_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After 10,000 and 100,000 writes (a checkpoint every 1,000 records, all kept) a
    reopen reads the same files and the same number of bytes of them, and applies
    the same number of records: the newest checkpoint and the log after it."""
    reads: list[tuple[str, int]] = []
    real_read = bus_mod.DurableBus.read_bytes
    real_head = bus_mod.read_checkpoint_head

    def read_bytes(self: bus_mod.DurableBus, path: Path) -> bytes:
        out = real_read(self, path)
        reads.append((path.parent.name, len(out)))
        return out

    def head(path: Path) -> Any:
        reads.append(("head", 1))
        return real_head(path)

    monkeypatch.setattr(bus_mod.DurableBus, "read_bytes", read_bytes)
    real_front = bus_mod.read_checkpoint_front

    def front(path: Path, store: Any = None) -> Any:
        # The newest checkpoint, read without its log section: counted as the whole
        # file (more than is read).
        reads.append((path.parent.name, path.stat().st_size))
        return real_front(path, store)

    monkeypatch.setattr(bus_mod, "read_checkpoint_front", front)
    monkeypatch.setattr(bus_mod, "read_checkpoint_head", head)
    work = {}
    for n in (10_000, 100_000):
        root = tmp_path / f"bus-{n}"
        last = _killed(root, n)
        reads.clear()
        s = mmsb.mmsb_start(path=str(root), config=mmsb.MMSBConfig(enable_gpu=False))
        try:
            assert int(s.last_lsn) == last and type(s.log) is DeferredLog
            files = sorted(reads)
            mmsb.write_page(s, 1, 0, b"plain")
            assert type(s.log) is DeferredLog  # a write of bytes needs no history
            work[n] = ([name for name, _ in files], s.bus.records_since_ckpt,
                       sum(size for _, size in files), s.bus.generation)
            assert len(s.tlog) == n + 1  # the whole history is still there, loaded now
        finally:
            mmsb.mmsb_stop(s)
    names10, tail10, bytes10, gens10 = work[10_000]
    names100, tail100, bytes100, gens100 = work[100_000]
    # The newest checkpoint whole and the log segment after it: whether the chain's
    # first checkpoint nests a replay base is in the newest one's record of its chain.
    assert names10 == names100 == ["checkpoints", "wal"]
    assert tail10 == tail100
    # The newest checkpoint records its chain and the page-store slots the chain pins,
    # each a row of 32 bytes per older checkpoint (read as arrays, no loop per row), and
    # its compressed log section varies a little with the values written.
    assert gens100 > 5 * gens10
    assert bytes100 - bytes10 < 64 * (gens100 - gens10) + 0.1 * bytes10


def test_after_an_operating_system_crash_the_bus_recovers_from_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mapped files are never the source of the reopened state: with a head of
    another boot (an OS crash) and page bytes that differ from the log, the reopened
    pages are the log's, and the mapped files are rewritten from them."""
    root = _images(tmp_path)[-1]
    ref = _open(root, False, monkeypatch)
    want = pages_view(ref)
    mmsb.mmsb_stop(ref)
    set_boot_id(root, bytes(range(16)))
    pages = root / "map" / "pages"
    pages.write_bytes(bytes(0x5A for _ in range(pages.stat().st_size)))
    got = _open(root, True, monkeypatch)
    try:
        assert pages_view(got) == want
    finally:
        mmsb.mmsb_stop(got)
    with mmsb.attach(root.with_name(root.name + "-deferred")) as reader:
        for pid, view in want.items():
            assert reader.read_page(pid) == view[0]


def test_a_damaged_older_checkpoint_is_refused_when_the_history_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Damage inside an older checkpoint's log section is found when the history is
    read: the call that needed it raises SerializationError naming the file and
    changes nothing, and the log stays deferred (the next touch tries again). Writes
    of bytes need no history and go on; they are in the log."""
    root = _images(tmp_path)[-1]
    older = sorted((root / "checkpoints").glob("ckpt-*.mmsb"))[-2]
    flip_in_log_section(older)
    with pytest.raises(mmsb.SerializationError):
        _open(root, False, monkeypatch)  # the full recovery refuses it at open
    s = _open(root, True, monkeypatch)
    pid = sorted(s.pages)[0]
    mmsb.write_page(s, pid, 0, b"taken")
    mmsb.apply_batch(s, [(pid, 8, b"too")])
    assert type(s.log) is DeferredLog
    before = (pages_view(s), edges(s), int(s.last_lsn), s.next_delta_id, int(s.next_page_id))
    for call in (lambda: mmsb.read_page_at(s, pid, lsn=int(s.last_lsn)),
                 lambda: mmsb.create_page(s, 8),
                 lambda: mmsb.resize_page(s, pid, 128),
                 lambda: mmsb.add_dependency(s, pid, sorted(s.pages)[1]),
                 lambda: len(s.tlog)):
        with pytest.raises(mmsb.SerializationError) as info:
            call()
        assert older.name in str(info.value)
        assert type(s.log) is DeferredLog
        assert (pages_view(s), edges(s), int(s.last_lsn), s.next_delta_id,
                int(s.next_page_id)) == before
    # Stopping checkpoints the records since the last checkpoint, which the log's tail
    # holds: it needs no history, and succeeds. The damage stays where it was, found
    # by the next read of the history.
    mmsb.mmsb_stop(s)
    again = root.with_name(root.name + "-deferred")
    monkeypatch.setattr(bus_mod, "DEFER_HISTORY", True)
    s = mmsb.mmsb_start(path=str(again), config=_cfg())
    try:
        assert (pages_view(s), edges(s), int(s.last_lsn), s.next_delta_id,
                int(s.next_page_id)) == before
        page = mmsb.query_page(s, pid)
        assert page[:5] == b"taken" and page[8:11] == b"too"
        with pytest.raises(mmsb.SerializationError) as info:
            mmsb.read_page_at(s, pid, lsn=int(s.last_lsn) - 1)
        assert older.name in str(info.value)
    finally:
        mmsb.mmsb_stop(s)


def test_writes_after_a_deferred_open_need_no_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte writes (write_page, update_page, apply_batch, with batch) go to the log
    after the history without reading it; the log read later holds the history and
    then the writes, as the full recovery's log does after the same writes."""
    for root in _images(tmp_path)[-3:]:
        ref = _open(root, False, monkeypatch)
        got = _open(root, True, monkeypatch)
        try:
            deferred = type(got.log) is DeferredLog
            for s in (ref, got):
                ids = sorted(s.pages)
                mmsb.write_page(s, ids[0], 2, b"one")
                mmsb.update_page(s, ids[1], bytes(range(s.pages[ids[1]].size % 256)) *
                                 (s.pages[ids[1]].size // 256) +
                                 bytes(s.pages[ids[1]].size % 256))
                mmsb.apply_batch(s, [(ids[0], 10, b"b1"), (ids[-1], 0, b"b2")])
                with mmsb.batch(s):
                    mmsb.write_page(s, ids[-1], 5, b"w1")
                    mmsb.write_page(s, ids[0], 20, b"w2")
            assert type(got.log) is DeferredLog or not deferred
            view_got, view_ref = _state_view(got), _state_view(ref)
            # Index 7 is the newest timestamp: each side wrote at its own time.
            assert view_got[:7] + view_got[8:] == view_ref[:7] + view_ref[8:]
            assert _history_of(got) == _history_of(ref)
            assert _log_view(got, times=False) == _log_view(ref, times=False)
        finally:
            mmsb.mmsb_stop(ref)
            mmsb.mmsb_stop(got)
        # Reopened, both hold the same.
        for name in ("-deferred", "-eager"):
            s = mmsb.mmsb_start(path=str(root.with_name(root.name + name)), config=_cfg())
            try:
                if name == "-deferred":
                    want = (pages_view(s), _history_of(s))
                else:
                    assert (pages_view(s), _history_of(s)) == want
            finally:
                mmsb.mmsb_stop(s)


def test_checkpoints_without_a_recorded_chain_are_read_by_their_heads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint files that do not name their chain (written before they did) are
    walked by reading each older file's head; the result is the same."""
    monkeypatch.setattr(bus_mod, "_recorded_chain", lambda *a: None)
    for root in _images(tmp_path)[::6]:
        ref = _open(root, False, monkeypatch)
        got = _open(root, True, monkeypatch)
        try:
            assert _state_view(got) == _state_view(ref)
            assert _log_view(got) == _log_view(ref)
        finally:
            mmsb.mmsb_stop(ref)
            mmsb.mmsb_stop(got)


def test_checkpoint_head_refuses_damage_where_it_reads(tmp_path: Path) -> None:
    s = mmsb.MMSBState(_cfg())
    p = mmsb.create_page(s, 32)
    mmsb.write_page(s, p.id, 3, b"abc")
    path = tmp_path / "c.mmsb"
    mmsb.checkpoint_log(s, path)
    good = path.read_bytes()
    head = ckpt_mod.read_checkpoint_head(path)
    assert (head.lsn, head.log_from_lsn, head.base_len) == (int(s.last_lsn), 0, 0)
    # Every byte of the header, the META section, the section headers and the footer.
    sections = []
    pos = 48
    for _ in range(7):
        (stored,) = struct.unpack_from("<Q", good, pos + 16)
        sections.append((pos, stored))
        pos += 32 + stored
    checked = set(range(48)) | set(range(len(good) - 24, len(good)))
    for k, (at, stored) in enumerate(sections):
        checked |= set(range(at, at + 32 + (stored if k == 0 else 0)))
    for offset in sorted(checked):
        flipped = bytearray(good)
        flipped[offset] ^= 0xFF
        path.write_bytes(bytes(flipped))
        with pytest.raises(mmsb.SerializationError):
            ckpt_mod.read_checkpoint_head(path)
    path.write_bytes(good[:-1])
    with pytest.raises(mmsb.SerializationError):
        ckpt_mod.read_checkpoint_head(path)
    bad_version = bytearray(good)
    bad_version[8:10] = struct.pack("<H", 9)
    bad_version[40:44] = struct.pack("<I", ckpt_mod.crc32c(bytes(bad_version[:40])))
    path.write_bytes(bytes(bad_version))
    with pytest.raises(mmsb.SerializationError, match="version 9"):
        ckpt_mod.read_checkpoint_head(path)


class DeferredReopenMachine(RuleBasedStateMachine):
    """Random calls on a durable bus, crashed (its directory copied while it is open)
    and reopened at random points: the deferred open goes on as the live bus, and at
    each crash two more copies are opened, one that reads everything at once and one
    deferred, which must agree on the state and, once read, the log. The live bus
    keeps writing while its history may still be deferred."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="mmsb-deferred-"))
        self.k = 0
        self.live = mmsb.mmsb_start(path=str(self._next()), config=_cfg(max_tlog_size=9))
        self.model: dict[int, bytes] = {}

    def _next(self) -> Path:
        self.k += 1
        return self.tmp / f"bus-{self.k}"

    def teardown(self) -> None:
        bus_mod.DEFER_HISTORY = True
        try:
            mmsb.mmsb_stop(self.live)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _pid(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.model)))

    @rule(size=st.integers(1, 40))
    def create(self, size: int) -> None:
        pid = mmsb.create_page(self.live, size).id
        self.model[pid] = bytes(size)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        pid = self._pid(data)
        size = len(self.model[pid])
        off = data.draw(st.integers(0, size - 1))
        new = data.draw(st.binary(min_size=1, max_size=size - off))
        mmsb.write_page(self.live, pid, off, new)
        m = self.model[pid]
        self.model[pid] = m[:off] + new + m[off + len(new):]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def batch(self, data: st.DataObject) -> None:
        writes = []
        for _ in range(data.draw(st.integers(1, 4))):
            pid = self._pid(data)
            off = data.draw(st.integers(0, len(self.model[pid]) - 1))
            writes.append((pid, off, bytes([data.draw(st.integers(0, 255))])))
        mmsb.apply_batch(self.live, writes)
        for pid, off, b in writes:
            m = self.model[pid]
            self.model[pid] = m[:off] + b + m[off + 1:]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), new_size=st.integers(1, 40))
    def resize(self, data: st.DataObject, new_size: int) -> None:
        pid = self._pid(data)
        mmsb.resize_page(self.live, pid, new_size)
        m = self.model[pid]
        self.model[pid] = m[:new_size] + bytes(max(0, new_size - len(m)))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        pid = self._pid(data)
        self.model[mmsb.clone_page(self.live, pid).id] = self.model[pid]

    @precondition(lambda self: len(self.model) > 2)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        pid = self._pid(data)
        mmsb.delete_page(self.live, pid)
        del self.model[pid]

    @rule()
    def crash_and_reopen(self) -> None:
        assert self.live.bus is not None
        self.live.bus.flush()
        image = self._next()
        shutil.copytree(self.live.bus.root, image)
        mmsb.mmsb_stop(self.live)
        views = []
        for defer in (False, True):
            copy = self._next()
            shutil.copytree(image, copy)
            bus_mod.DEFER_HISTORY = defer
            s = mmsb.mmsb_start(path=str(copy), config=_cfg(max_tlog_size=9))
            try:
                views.append((_state_view(s), _log_view(s)))
            finally:
                mmsb.mmsb_stop(s)
        assert views[0] == views[1]
        bus_mod.DEFER_HISTORY = True
        self.live = mmsb.mmsb_start(path=str(image), config=_cfg(max_tlog_size=9))

    @invariant()
    def pages_are_the_model(self) -> None:
        assert {pid: mmsb.query_page(self.live, pid) for pid in self.live.pages} == self.model


DeferredReopenMachine.TestCase.settings = settings(
    max_examples=12, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_deferred_reopen_machine = DeferredReopenMachine.TestCase


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("recorded_chain", [True, False])
def test_a_checkpoint_from_another_timeline_of_the_bus_breaks_the_chain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded_chain: bool) -> None:
    """Two copies of one bus directory that went on separately each write a checkpoint
    of the same generation at different LSNs. Put one copy's file into the other: every
    checksum holds and the bus id and generation match, but that checkpoint no longer
    ends where the next one's log starts. Opening refuses it with SerializationError
    naming the file (the full recovery at open; the deferred open when the history is
    first read, or at open when the chain is walked by the files' heads) and changes no
    file."""
    if not recorded_chain:
        monkeypatch.setattr(bus_mod, "_recorded_chain", lambda *a: None)
    cfg = _cfg()
    root, alt = tmp_path / "bus", tmp_path / "alt"
    s = mmsb.mmsb_start(path=str(root), config=cfg)
    pid = mmsb.create_page(s, 64).id
    mmsb.mmsb_stop(s)
    shutil.copytree(root, alt)

    def go_on(where: Path, n: int, value: int) -> None:
        s = mmsb.mmsb_start(path=str(where), config=cfg)
        for i in range(n):
            mmsb.write_page(s, pid, i % 60, bytes([value]))
        mmsb.mmsb_stop(s)

    go_on(root, 30, 1)
    go_on(alt, 45, 2)
    go_on(root, 30, 3)
    ours = {p.name: p for p in (root / "checkpoints").glob("ckpt-*.mmsb")}
    theirs = {p.name: p for p in (alt / "checkpoints").glob("ckpt-*.mmsb")}
    newest = max(ours)
    # A generation both copies wrote, at different LSNs, that is not the newest here.
    swapped = max(name for name in set(ours) & set(theirs) if name != newest
                  and ckpt_mod.read_checkpoint_head(ours[name]).lsn
                  != ckpt_mod.read_checkpoint_head(theirs[name]).lsn)
    shutil.copyfile(theirs[swapped], ours[swapped])
    before = _tree_bytes(root)

    monkeypatch.setattr(bus_mod, "DEFER_HISTORY", False)
    # (The full recovery walks the chain as the deferred open does: by the newest
    # file's record, against which the swapped file is found changed; or by the heads,
    # where it does not link to the next.)
    why = "the file was replaced" if recorded_chain else "next one's log starts at"
    with pytest.raises(mmsb.SerializationError, match=why) as info:
        mmsb.mmsb_start(path=str(root), config=cfg)
    assert swapped in str(info.value)
    assert _tree_bytes(root) == before

    monkeypatch.setattr(bus_mod, "DEFER_HISTORY", True)
    if not recorded_chain:
        with pytest.raises(mmsb.SerializationError, match="next one's log starts at"):
            mmsb.mmsb_start(path=str(root), config=cfg)
        assert _tree_bytes(root) == before
        return
    s = mmsb.mmsb_start(path=str(root), config=cfg)
    try:
        state_before = (pages_view(s), int(s.last_lsn))
        # The newest checkpoint recorded the chain as it was written: the swapped file
        # is found not to be the one it recorded.
        with pytest.raises(mmsb.SerializationError, match="the file was replaced") as info:
            mmsb.read_page_at(s, pid, lsn=1)
        assert swapped in str(info.value)
        assert type(s.log) is DeferredLog
        assert (pages_view(s), int(s.last_lsn)) == state_before
    finally:
        mmsb.mmsb_stop(s)  # nothing written since the open: no checkpoint, no history


@pytest.mark.parametrize("record", ["kept", "lying"])
def test_a_chain_that_starts_with_a_replay_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: str) -> None:
    """A chain whose first checkpoint nests a replay base (one that load_checkpoint of a
    compacted state's export started) is read whole at open: the newest checkpoint's
    record of its chain says so (the bytes of that base), so no file but the newest is
    read to learn it. A record that says the first file nests none (a hostile file
    whose checksums hold) is found out when the history is read: SerializationError
    naming the file, nothing changed."""
    mem = mmsb.MMSBState(_cfg())
    pid = mmsb.create_page(mem, 64).id
    for i in range(200):  # compacted as it goes: the history keeps a replay base
        mmsb.write_page(mem, pid, i % 60, bytes([i % 250 + 1]))
    assert mem.replay_base is not None
    export = tmp_path / "export.mmsb"
    mmsb.checkpoint_log(mem, export)
    root = tmp_path / "live"
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    mmsb.load_checkpoint(s, export)
    for i in range(60):  # several automatic checkpoints after the chain's start
        mmsb.write_page(s, pid, (i * 7) % 60, bytes([i + 100]))
    s.bus.flush()
    img = tmp_path / "img"
    shutil.copytree(root, img)
    mmsb.mmsb_stop(s)
    files = sorted((img / "checkpoints").glob("ckpt-*.mmsb"))
    assert len(files) >= 3
    first = ckpt_mod.read_checkpoint_head(files[0])
    assert first.log_from_lsn == 0 and first.base_len > 0
    newest = ckpt_mod.read_checkpoint(files[-1], with_log=False, pages=False)
    rows = np.frombuffer(newest.bus["chain_rows"], "<i8").reshape(-1, 4).tolist()
    assert rows[0][:3] == [int(files[0].name[5:21], 16), first.lsn, 0]
    assert rows[0][3] == first.base_len  # the writer knew it, and recorded it
    heads: list[Path] = []
    real_head = bus_mod.read_checkpoint_head

    def head(path: Path) -> Any:
        heads.append(path)
        return real_head(path)

    monkeypatch.setattr(bus_mod, "read_checkpoint_head", head)
    ref = _open(img, False, monkeypatch)
    if record == "kept":
        got = _open(img, True, monkeypatch)
        try:
            assert heads == []
            assert type(got.log) is not DeferredLog  # read whole: it nests a base
            assert _state_view(got) == _state_view(ref)
            assert _log_view(got) == _log_view(ref)
        finally:
            mmsb.mmsb_stop(ref)
            mmsb.mmsb_stop(got)
        return
    mmsb.mmsb_stop(ref)
    real_chain = bus_mod._recorded_chain

    def lying(*args: Any) -> np.ndarray:
        rows = real_chain(*args).copy()
        rows[:, 3] = 0  # every file said to nest no replay base
        return rows

    monkeypatch.setattr(bus_mod, "_recorded_chain", lying)
    got = _open(img, True, monkeypatch)
    try:
        assert type(got.log) is DeferredLog
        before = (pages_view(got), int(got.last_lsn))
        with pytest.raises(mmsb.SerializationError, match="the file was replaced") as info:
            mmsb.read_page_at(got, pid, lsn=int(got.last_lsn) - 1)
        assert files[0].name in str(info.value)
        assert type(got.log) is DeferredLog
        assert (pages_view(got), int(got.last_lsn)) == before
    finally:
        mmsb.mmsb_stop(got)  # its final checkpoint writes the log's tail: no history needed


def test_a_recorded_chain_is_read_packed_or_as_lists_and_refused_when_it_does_not_hold() -> None:
    """The newest checkpoint's record of its chain: packed int64 rows (``chain_rows``,
    as this build writes) or lists of three or four ints (``chain``, as earlier builds
    wrote) read to the same rows; a record that does not hold together is not used
    (the heads are read)."""
    rows = [[3, 100, 0, 0], [4, 180, 100, 0], [5, 260, 180, -1]]
    packed = np.array(rows, "<i8").tobytes()
    ckpts = [bus_mod._Ckpt(g, at, start, Path("x"), base) for g, at, start, base in rows]
    assert bus_mod._chain_record(ckpts) == packed
    info = {"chain_rows": packed}
    assert bus_mod._recorded_chain(info, 5, 260, 180).tolist() == rows
    lists = {"chain": [[3, 100, 0, 0], [4, 180, 100], [5, 260, 180]]}
    assert bus_mod._recorded_chain(lists, 5, 260, 180).tolist() == [
        [3, 100, 0, 0], [4, 180, 100, -1], [5, 260, 180, -1]]
    for bad in (
        {"chain_rows": packed[:-8]},  # not whole rows
        {"chain_rows": b""},
        {"chain_rows": np.array([[3, 100, 0, 0], [3, 180, 100, 0], [5, 260, 180, 0]],
                                "<i8").tobytes()},  # generations not ascending
        {"chain_rows": np.array([[4, 300, 0, 0], [5, 260, 180, 0]], "<i8").tobytes()},  # LSN back
        {"chain_rows": np.array([[5, 260, 270, 0]], "<i8").tobytes()},  # log starts past its end
        {"chain_rows": np.array([[5, 260, 180, -2]], "<i8").tobytes()},  # base bytes below -1
        {"chain": [[3, 100, 0, 0], [4, 180]]},
        {"chain": [[3, 100, 0, 0, 1]]},
        {"chain": [[3, 100, 0, True]]},
        {"chain": "rows"},
        {},
    ):
        assert bus_mod._recorded_chain(bad, 5, 260, 180) is None
    assert bus_mod._recorded_chain(info, 5, 261, 180) is None  # not this file's row
    assert bus_mod._recorded_chain(None, 5, 260, 180) is None


def test_names_in_the_bus_folders_that_only_look_like_its_files_are_ignored(
        tmp_path: Path) -> None:
    """A name that a checkpoint's or a segment's name is only part of (one that ends
    in a newline, or one in upper case) is not the bus's: the open neither reads nor
    removes it."""
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    pid = mmsb.create_page(s, 64).id
    mmsb.write_page(s, pid, 0, b"kept")
    mmsb.mmsb_stop(s)
    newest = sorted((root / "checkpoints").glob("ckpt-*.mmsb"))[-1]
    gen = int(newest.name[5:21], 16)
    odd = [root / "checkpoints" / f"ckpt-{gen + 1:016x}.mmsb\n",
           root / "checkpoints" / f"ckpt-{gen + 0xabc:016X}.mmsb",
           root / "wal" / f"wal-{gen + 1:016x}-00000000.log\n"]
    for p in odd:
        p.write_bytes(b"not a bus file")
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        assert bytes(mmsb.query_page(s, pid)[:4]) == b"kept"
        assert s.bus.generation == gen and not s.recovery_notes
    finally:
        mmsb.mmsb_stop(s)
    assert all(p.read_bytes() == b"not a bus file" for p in odd)


@pytest.mark.parametrize("retain", [None, 1, 3])
def test_checkpoints_after_a_reopen_read_the_history_only_when_they_trim_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retain: int | None) -> None:
    """A checkpoint that keeps all the history (every one with every checkpoint kept,
    and the close's, which evicts nothing) writes the records since the last one from
    the deferred log's tail: the history stays on disk. One that drops history
    (retention evicting a checkpoint) reads it first. Either way the files it leaves
    reopen to the state and the whole log of a bus that read everything at open."""
    live = tmp_path / "live"
    s = mmsb.mmsb_start(path=str(live), config=_cfg(retain_checkpoints=retain))
    pids = [p.id for p in mmsb.create_pages(s, 4, 64)]
    for i in range(130):  # several automatic checkpoints, then a tail of writes
        mmsb.write_page(s, pids[i % 4], (i * 3) % 56, bytes([i % 250 + 1]) * 8)
    s.bus.flush()
    img = tmp_path / "img"
    shutil.copytree(live, img)  # what a kill leaves
    mmsb.mmsb_stop(s)
    loads: list[int] = []
    real = bus_mod._restore_deferred

    def counted(*args: Any) -> Any:
        loader = real(*args)
        if loader is None:
            return None

        def load(tail: Any) -> Any:
            loads.append(1)
            return loader(tail)

        return load

    monkeypatch.setattr(bus_mod, "_restore_deferred", counted)
    views = []
    for defer in (False, True):
        s = _open(img, defer, monkeypatch, retain_checkpoints=retain)
        try:
            if defer:
                assert type(s.log) is DeferredLog
            pids = sorted(s.pages)
            for i in range(60):  # two automatic checkpoints (max_tlog_size=24)
                mmsb.write_page(s, pids[i % len(pids)], i % 40, bytes([i + 1]) * 4)
            if defer:
                # Retention that evicts drops history: read for that, not before.
                assert (type(s.log) is DeferredLog) == (retain is None)
                assert len(loads) == (0 if retain is None else 1)
        finally:
            mmsb.mmsb_stop(s)
        if defer and retain is None:
            assert loads == []  # closed without reading the history
        root = img.with_name(img.name + ("-deferred" if defer else "-eager"))
        monkeypatch.setattr(bus_mod, "DEFER_HISTORY", False)
        s = mmsb.mmsb_start(path=str(root), config=_cfg(retain_checkpoints=retain))
        try:
            # Not the clock's readings (the writes after the reopen are not timed alike):
            # the horizon's and the last timestamps, and the replay base but its pages.
            state = [x for k, x in enumerate(_state_view(s)) if k not in (6, 7, 11)]
            base = s.replay_base
            state.append(None if base is None else base.snapshot().data.tobytes())
            views.append((state, _log_view(s, times=False)))
        finally:
            mmsb.mmsb_stop(s)
    assert views[0] == views[1]


def test_compress_log_after_a_reopen_reads_the_history_and_undoes_itself_when_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compress_log rewrites the history: it reads a reopened bus's history first, so
    that a compression the bus cannot checkpoint is undone to the whole log, not to the
    tail alone."""
    img = _images(tmp_path)[-1]
    ref = _open(img, False, monkeypatch)
    try:
        want = (_state_view(ref), _log_view(ref))
    finally:
        mmsb.mmsb_stop(ref)
    s = _open(img, True, monkeypatch)
    try:
        assert type(s.log) is DeferredLog

        def refuse(state: Any) -> None:
            raise mmsb.DurabilityError("no room for the checkpoint")

        monkeypatch.setattr(s.bus, "after_compress", refuse)
        with pytest.raises(mmsb.DurabilityError, match="no room"):
            mmsb.compress_log(s)
        monkeypatch.undo()
        assert type(s.log) is not DeferredLog
        assert _log_view(s) == want[1]
        assert pages_view(s) == want[0][0]
    finally:
        mmsb.mmsb_stop(s)


def test_the_recorded_chain_is_walked_as_the_heads_would_be() -> None:
    """The compiled walk over a recorded chain stops where the walk over the files'
    heads stops: at a chain start, at the newest file's horizon, or after a file that
    is gone; it gives way to the heads (-1) where the record does not reach or its
    generations skip one, and names the row where two checkpoints do not link."""
    rows = np.array([[3, 100, 0, 0], [4, 180, 100, 0], [5, 260, 180, 0], [6, 300, 260, 0]],
                    np.int64)
    every = np.array([1, 2, 3, 4, 5, 6], np.int64)
    walk = bus_mod._chain_walk
    assert walk(rows, 0, every) == 0  # back to the chain's start (log from 0)
    assert walk(rows, 180, every) == 1  # the file at the horizon is the replay base
    assert walk(rows, 300, every) == 3  # the newest file alone
    assert walk(rows, 0, np.array([1, 2, 3, 5, 6], np.int64)) == 2  # generation 4 gone
    trimmed = rows[1:].copy()
    assert walk(trimmed, 0, every) == -1  # row 4 starts after 100: the record ends first
    skipping = rows.copy()
    skipping[1, 0] = 2  # generations 2, then 5
    assert walk(skipping, 0, every) == -1
    broken = rows.copy()
    broken[1, 1] = 170  # generation 4 ends at 170, generation 5 starts after 180
    assert walk(broken, 0, every) == -2 - 1


def test_a_checkpoint_that_evicts_a_file_of_the_history_reads_it_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bus's first checkpoint is at LSN 0, so the next one's log also starts from
    nothing: evicting the first (retention of 2) drops no record from memory, but it
    removes a file the deferred history would be read from. Such a checkpoint reads the
    history before it removes the file; the history is whole afterwards."""
    root = tmp_path / "bus"
    cfg = dict(retain_checkpoints=2, max_tlog_size=6)
    s = mmsb.mmsb_start(path=str(root), config=_cfg(**cfg))
    pid = mmsb.create_page(s, 64).id
    for i in range(3):  # fewer than a checkpoint's worth: the log holds them
        mmsb.write_page(s, pid, i, bytes([i + 1]))
    s.bus.flush()
    img = tmp_path / "img"
    shutil.copytree(root, img)  # what a kill leaves: checkpoint 1 at LSN 0, a segment
    mmsb.mmsb_stop(s)
    views = []
    for defer in (False, True):
        copy = tmp_path / f"img-{defer}"
        shutil.copytree(img, copy)
        monkeypatch.setattr(bus_mod, "DEFER_HISTORY", defer)
        s = mmsb.mmsb_start(path=str(copy), config=_cfg(**cfg))
        try:
            assert (type(s.log) is DeferredLog) == defer
            assert [(c.lsn, c.log_from_lsn) for c in s.bus.retained] == [(0, 0)]
            for i in range(20):  # checkpoints 2 (its log from LSN 0), 3 (evicts 1), 4
                mmsb.write_page(s, pid, 10 + i, bytes([i + 50]))
            assert s.bus.generation >= 4
            mmsb.set_metadata(s, pid, "k", "v")  # a structural record: reads the history
            assert mmsb.verify_state_consistency(s)
            views.append((pages_view(s), _log_view(s, times=False)))
        finally:
            mmsb.mmsb_stop(s)
    assert views[0] == views[1]
