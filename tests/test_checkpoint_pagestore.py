"""Bus checkpoints that keep their pages in the page store (DIR/checkpoints/pages).

A checkpoint of an exclusive writer writes only the pages changed since the previous
one into free slots of the store, syncs it, then writes a small record (format
version 3) naming every live page's slot and CRC32C. These tests check what it writes,
that a kill at any file step of it and an operating-system crash after it lose
nothing, that damaged slots are refused (never a wrong state), that the store's space
stays bounded by what the retained checkpoints pin, and that every reader of
checkpoint files (replay bases, open_readonly, the CLI's checks, exports, shared
writers, older formats) still reads them.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmsb
from conftest import edges, pages_view, set_boot_id
from mmsb._storage import checkpoint as ckpt_mod
from mmsb._storage import fsops
from mmsb._storage import pagestore as pagestore_mod
from mmsb._storage.pagestore import DATA_START, STORE_NAME

PAGES = 120
SIZE = 1024


def _cfg(retain: int | None = None, **kw: Any) -> mmsb.MMSBConfig:
    base: dict[str, Any] = dict(enable_gpu=False, fsync="batch", retain_checkpoints=retain,
                                max_tlog_size=1 << 30, checkpoint_interval=0)
    base.update(kw)
    return mmsb.MMSBConfig(**base)


def _view(s: mmsb.MMSBState) -> tuple:
    return (pages_view(s), edges(s), int(s.next_page_id), int(s.last_lsn))


def _ckpts(root: Path) -> list[Path]:
    return sorted((root / "checkpoints").glob("ckpt-*.mmsb"))


def _store(root: Path) -> Path:
    return root / "checkpoints" / STORE_NAME


def _build(root: Path, retain: int | None = None) -> mmsb.MMSBState:
    """A bus of PAGES pages of SIZE bytes, each written once, checkpointed."""
    s = mmsb.mmsb_start(path=str(root), config=_cfg(retain))
    for k in range(PAGES):
        p = mmsb.create_page(s, SIZE)
        mmsb.write_page(s, p.id, 0, hashlib.sha256(b"%d" % k).digest() * (SIZE // 32))
    s.bus.checkpoint(s)
    return s


def _write_few(s: mmsb.MMSBState, round_no: int, n: int = 3) -> None:
    for k in range(n):
        pid = 1 + (round_no * 7 + k * 13) % PAGES
        mmsb.write_page(s, pid, (round_no * 31) % (SIZE - 8), bytes([round_no % 256, k]) * 4)


def _os_crash(root: Path) -> None:
    """What an operating-system crash leaves of the mapped files: never trusted (another
    boot), and here their page bytes lost as well."""
    set_boot_id(root, bytes(range(16)))
    pages = root / "map" / "pages"
    pages.write_bytes(b"\x5a" * pages.stat().st_size)


def _assert_reopens_as(root: Path, want: tuple, retain: int | None = None) -> None:
    """Open the bus in ``root`` and find ``want`` (:func:`_view`) there."""
    s = mmsb.mmsb_start(path=str(root), config=_cfg(retain))
    try:
        assert _view(s) == want
    finally:
        mmsb.mmsb_stop(s)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.parts[-2] != "map"
            and p.name != "LOCK"}


def _refs(path: Path) -> Any:
    refs = ckpt_mod.read_checkpoint(path, with_log=False, pages=False).page_refs
    assert refs is not None
    return refs


# -- what a checkpoint writes ------------------------------------------------------------

def test_a_checkpoint_writes_only_the_pages_changed_since_the_last(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = _build(root)
    try:
        store = _store(root)
        first = store.stat().st_size
        assert first >= DATA_START + PAGES * SIZE
        assert ckpt_mod.read_checkpoint_head(_ckpts(root)[-1]).version == ckpt_mod.REFS_VERSION
        _write_few(s, 1, 3)
        s.bus.checkpoint(s)
        # Three new slots (the old ones stay pinned: every checkpoint is kept).
        assert store.stat().st_size == first + 3 * SIZE
        record = _ckpts(root)[-1].stat().st_size
        assert record < PAGES * SIZE // 8
        refs = _refs(_ckpts(root)[-1])
        before = _refs(_ckpts(root)[-2])
        moved = np.flatnonzero(refs.offsets != before.offsets)
        assert moved.size == 3
        # Nothing changed, nothing written but the record.
        s.bus.checkpoint(s)
        assert store.stat().st_size == first + 3 * SIZE
        assert np.array_equal(_refs(_ckpts(root)[-1]).offsets, refs.offsets)
        want = _view(s)
    finally:
        mmsb.mmsb_stop(s)
    _assert_reopens_as(root, want)


def test_changes_that_keep_the_epoch_are_written_again(tmp_path: Path) -> None:
    """A resize keeps a page's epoch: shrinking and growing it back gives the old size
    and epoch with other bytes, which the page store must not take for the old page."""
    root = tmp_path / "bus"
    s = _build(root)
    try:
        pid = 5
        mmsb.resize_page(s, pid, 16)
        mmsb.resize_page(s, pid, SIZE)
        s.bus.checkpoint(s)
        want = _view(s)
        mmsb.create_page(s, 40)  # a page the previous checkpoint did not have
        mmsb.write_page(s, PAGES + 1, 0, b"new")
        s.bus.checkpoint(s)
        want = _view(s)
    finally:
        mmsb.mmsb_stop(s)
    _os_crash(root)
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        assert _view(s) == want
        assert mmsb.query_page(s, 5)[16:] == bytes(SIZE - 16)
    finally:
        mmsb.mmsb_stop(s)


def test_exports_and_replay_bases_stand_alone(tmp_path: Path) -> None:
    """checkpoint_log writes a self-contained file (version 2); the replay base a
    replication leader ships (``base_bytes``) is self-contained too."""
    root = tmp_path / "bus"
    s = _build(root, retain=2)
    try:
        for r in range(4):
            _write_few(s, r)
            s.bus.checkpoint(s)
        out = tmp_path / "export.mmsb"
        mmsb.checkpoint_log(s, out)
        assert ckpt_mod.read_checkpoint_head(out).version == ckpt_mod.VERSION
        base = s.base_bytes()
        assert base[8:10] == struct.pack("<H", ckpt_mod.VERSION)
        snap = ckpt_mod.read_checkpoint(base)  # no page store given: none needed
        assert snap.page_refs is None and snap.data.size == snap.sizes.sum()
        whole = ckpt_mod.checkpoint_bytes(s)
        assert ckpt_mod.read_checkpoint(whole).data.size == PAGES * SIZE
        want = pages_view(s)
    finally:
        mmsb.mmsb_stop(s)
    t = mmsb.mmsb_start(config=_cfg())
    try:
        mmsb.load_checkpoint(t, out)
        assert pages_view(t) == want
    finally:
        mmsb.mmsb_stop(t)
    # A version-3 record read alone (its bytes, no store) is refused, typed.
    with pytest.raises(mmsb.SerializationError, match="page store"):
        ckpt_mod.read_checkpoint(_ckpts(root)[-1].read_bytes())


def test_history_before_the_newest_checkpoint(tmp_path: Path) -> None:
    """Time travel to LSNs before the newest checkpoint reads the oldest retained one
    (its pages from the store) as its replay base: in the writer, after a reopen and in
    open_readonly."""
    root = tmp_path / "bus"
    s = _build(root, retain=3)
    seen: dict[int, bytes] = {}
    try:
        for r in range(6):
            _write_few(s, r)
            seen[int(s.last_lsn)] = mmsb.query_page(s, 1 + (r * 7) % PAGES)
            s.bus.checkpoint(s)
        lsns = sorted(seen)
        oldest = s.bus.retained[0].lsn
        usable = [x for x in lsns if x >= oldest]
        assert len(usable) >= 2
        for lsn in usable:
            r = lsns.index(lsn)
            assert mmsb.read_page_at(s, 1 + (r * 7) % PAGES, lsn=lsn) == seen[lsn]
    finally:
        mmsb.mmsb_stop(s)
    for opener in (lambda: mmsb.mmsb_start(path=str(root), config=_cfg(3)),
                   lambda: mmsb.open_readonly(root)):
        t = opener()
        try:
            for lsn in usable:
                r = lsns.index(lsn)
                assert mmsb.read_page_at(t, 1 + (r * 7) % PAGES, lsn=lsn) == seen[lsn]
        finally:
            mmsb.mmsb_stop(t)


def test_compress_and_load_start_a_chain_with_every_page_written(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = _build(root, retain=2)
    try:
        _write_few(s, 1)
        s.bus.checkpoint(s)
        mmsb.compress_log(s)
        assert len(_ckpts(root)) == 1
        refs = _refs(_ckpts(root)[-1])
        assert refs.pin_offsets.size == PAGES  # the older chain's slots are free again
        _write_few(s, 2)
        out = tmp_path / "x.mmsb"
        mmsb.checkpoint_log(s, out)
        _write_few(s, 3)
        mmsb.load_checkpoint(s, out)
        want = _view(s)
    finally:
        mmsb.mmsb_stop(s)
    _os_crash(root)
    _assert_reopens_as(root, want, 2)


# -- crashes -------------------------------------------------------------------------------

def _checkpoint_in_child(root: Path, retain: int | None, n: int) -> bool:
    """Open the bus in a forked process, write a few pages, and checkpoint with a kill
    (``os._exit``) at its file step ``n``. True when the child reached the end (the
    checkpoint has fewer steps)."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 3
        try:
            s = mmsb.mmsb_start(path=str(root), config=_cfg(retain, fsync="always"))
            _write_few(s, 50)
            seen = [0]

            def hook(step: str, path: str) -> None:
                seen[0] += 1
                if seen[0] >= n:
                    os._exit(137)

            fsops.set_fault_hook(hook)
            s.bus.checkpoint(s)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 137), status
    return os.WEXITSTATUS(status) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a real process")
@pytest.mark.parametrize("retain", [None, 1])
@pytest.mark.parametrize("os_crash", [False, True])
def test_a_kill_at_every_file_step_of_a_checkpoint(tmp_path: Path, retain: int | None,
                                                   os_crash: bool) -> None:
    """Killed at each file step of a checkpoint (before and after each write, fsync,
    rename and removal), the bus reopens to exactly the state written before it, also
    when the mapped files are lost as well (an OS crash right after the kill), and its
    retained checkpoints all read back (their pinned slots intact)."""
    clean = tmp_path / "clean"
    s = _build(clean, retain)
    for r in range(3):
        _write_few(s, r)
        s.bus.checkpoint(s)
    mmsb.mmsb_stop(s)
    image = {str(p.relative_to(clean)): p.read_bytes() for p in clean.rglob("*")
             if p.is_file() and p.name != "LOCK"}

    def fresh(name: str) -> Path:
        root = tmp_path / name
        for rel, data in image.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root

    ref = fresh("ref")
    t = mmsb.mmsb_start(path=str(ref), config=_cfg(retain))
    _write_few(t, 50)
    want = _view(t)
    mmsb.mmsb_stop(t)
    n = 1
    while True:
        root = fresh(f"k{n}")
        finished = _checkpoint_in_child(root, retain, n)
        if os_crash:
            _os_crash(root)
        t = mmsb.mmsb_start(path=str(root), config=_cfg(retain))
        try:
            assert _view(t) == want, n
            for p in _ckpts(root):
                ckpt_mod.read_checkpoint(p)  # every page checked against its CRC
            _write_few(t, 60)
            t.bus.checkpoint(t)
            after = _view(t)
        finally:
            mmsb.mmsb_stop(t)
        _os_crash(root)
        t = mmsb.mmsb_start(path=str(root), config=_cfg(retain))
        try:
            assert _view(t) == after, n
        finally:
            mmsb.mmsb_stop(t)
        if finished:
            break
        n += 1
    assert n > 8  # the checkpoint's steps were walked


@pytest.mark.parametrize("later_writes", [False, True])
def test_an_os_crash_after_a_checkpoint(tmp_path: Path, later_writes: bool) -> None:
    root = tmp_path / "bus"
    s = _build(root, retain=2)
    for r in range(3):
        _write_few(s, r)
        s.bus.checkpoint(s)
    if later_writes:
        _write_few(s, 9, 10)
        mmsb.resize_page(s, 7, 300)
    s.bus.flush()
    want = _view(s)
    # A kill: descriptors go, nothing else is written.
    s.bus.abandon("killed")
    mmsb.mmsb_stop(s)
    _os_crash(root)
    _assert_reopens_as(root, want, 2)


# -- damage ----------------------------------------------------------------------------------

def _damaged(tmp_path: Path) -> tuple[Path, Any, tuple]:
    root = tmp_path / "bus"
    s = _build(root, retain=2)
    for r in range(3):
        _write_few(s, r)
        s.bus.checkpoint(s)
    want = _view(s)
    mmsb.mmsb_stop(s)
    return root, _refs(_ckpts(root)[-1]), want


@pytest.mark.parametrize("direct_runs", [0, 1 << 20])
@pytest.mark.parametrize("where", ["pinned", "header", "truncated", "cut", "missing",
                                   "foreign"])
def test_damaged_page_store_is_refused_naming_it(tmp_path: Path, where: str, direct_runs: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Damage to the slots a checkpoint names (the files otherwise valid) is a typed
    error naming the page store, for a writer's open and open_readonly alike, and the
    refused open changes no file; never a wrong state. The pages read either way: each
    run of slots straight into place, or gathered from one read of their span."""
    monkeypatch.setattr(pagestore_mod, "_DIRECT_RUNS", direct_runs)
    root, refs, _want = _damaged(tmp_path)
    store = _store(root)
    raw = bytearray(store.read_bytes())
    if where == "pinned":
        k = PAGES // 2
        raw[int(refs.offsets[k]) + 100] ^= 0x01
        store.write_bytes(bytes(raw))
    elif where == "header":
        raw[30] ^= 0x01
        store.write_bytes(bytes(raw))
    elif where == "truncated":
        store.write_bytes(bytes(raw[: int(refs.offsets.max()) + 10]))
    elif where == "cut":
        # Cut after its size was taken: the reads come back short of what it said.
        store.write_bytes(bytes(raw[: int(refs.offsets.max()) + 10]))
        real = fsops.open_regular_stat

        def stale_size(path: Any, flags: int, **kw: Any) -> tuple[int, os.stat_result]:
            fd, st = real(path, flags, **kw)
            if Path(path).name == STORE_NAME:
                fields = list(st[:10])
                fields[6] = len(raw)
                st = os.stat_result(fields)
            return fd, st

        monkeypatch.setattr(pagestore_mod.fsops, "open_regular_stat", stale_size)
    elif where == "missing":
        store.unlink()
    else:
        other = tmp_path / "other"
        o = _build(other)
        mmsb.mmsb_stop(o)
        store.write_bytes(_store(other).read_bytes())
    _os_crash(root)
    before = _digest(root)
    with pytest.raises(mmsb.SerializationError) as info:
        mmsb.mmsb_start(path=str(root), config=_cfg(2))
    assert STORE_NAME in str(info.value)
    if where == "cut":
        assert "cut while it was read" in str(info.value)
    assert _digest(root) == before
    with pytest.raises(mmsb.SerializationError):
        mmsb.open_readonly(root)
    assert _digest(root) == before


def test_a_free_slot_damaged_changes_nothing(tmp_path: Path) -> None:
    root, refs, want = _damaged(tmp_path)
    store = _store(root)
    raw = bytearray(store.read_bytes())
    used = np.zeros(len(raw), bool)
    used[:DATA_START] = True
    for off, size in zip(refs.pin_offsets.tolist(), refs.pin_lengths.tolist(), strict=True):
        used[off:off + size] = True
    free = np.flatnonzero(~used)
    assert free.size  # retain=2 left slots of evicted checkpoints free
    raw[int(free[0])] ^= 0xFF
    store.write_bytes(bytes(raw))
    _os_crash(root)
    _assert_reopens_as(root, want, 2)


def test_a_record_naming_slots_it_does_not_pin_is_refused(tmp_path: Path) -> None:
    """The PREF section is checked against itself: a page slot outside the pins (a
    record written by something else, its checksums made to match) is refused."""
    root, refs, _want = _damaged(tmp_path)
    path = _ckpts(root)[-1]
    raw = bytearray(path.read_bytes())
    pos = 48
    for _ in range(3):
        tag = bytes(raw[pos:pos + 4])
        codec, = struct.unpack_from("<B", raw, pos + 4)
        (stored,) = struct.unpack_from("<Q", raw, pos + 16)
        if tag == b"PREF":
            assert codec == ckpt_mod.CODEC_RAW
            body = pos + 32
            # The first page's slot moved onto the second's.
            raw[body + 32:body + 40] = struct.pack("<q", int(refs.offsets[1]))
            struct.pack_into("<I", raw, pos + 24, ckpt_mod.crc32c(bytes(raw[body:body + stored])))
            struct.pack_into("<I", raw, pos + 28, ckpt_mod.crc32c(bytes(raw[pos:pos + 28])))
            path.write_bytes(bytes(raw))
            break
        pos += 32 + stored
    else:
        raise AssertionError("no PREF section")
    with pytest.raises(mmsb.SerializationError, match="PREF"):
        ckpt_mod.read_checkpoint(path)


# -- space -------------------------------------------------------------------------------------

@pytest.mark.parametrize("retain", [None, 1, 3])
def test_the_store_holds_what_the_retained_checkpoints_pin(tmp_path: Path,
                                                           retain: int | None) -> None:
    """Many checkpoints, few pages changed by each: the store's pins are exactly the
    slots the retained checkpoints name, and its size stays within them (plus the
    slots of one checkpoint's changes)."""
    root = tmp_path / "bus"
    s = _build(root, retain)
    changed = 5
    try:
        for r in range(25):
            _write_few(s, r, changed)
            s.bus.checkpoint(s)
            files = _ckpts(root)
            newest = _refs(files[-1])
            named: set[int] = set()
            for p in files:
                named |= set(_refs(p).offsets.tolist())
            assert set(newest.pin_offsets.tolist()) == named
            pinned = int(newest.pin_lengths.sum())
            size = _store(root).stat().st_size - DATA_START
            assert pinned <= size <= pinned + 2 * changed * SIZE, (r, size, pinned)
        if retain is not None:
            assert len(_ckpts(root)) == retain
            assert _store(root).stat().st_size <= DATA_START + (PAGES + 2 * retain * changed) * SIZE
        want = _view(s)
    finally:
        mmsb.mmsb_stop(s)
    _os_crash(root)
    _assert_reopens_as(root, want, retain)


# -- other writers and formats -------------------------------------------------------------

def test_shared_writers_and_older_buses(tmp_path: Path) -> None:
    """A bus of self-contained checkpoints (what shared writers and earlier builds
    write) opens; an exclusive writer then keeps its pages in the store; a shared
    session after it writes self-contained checkpoints again, and the exclusive writer
    that follows never reuses a slot that a retained checkpoint still names."""
    root = tmp_path / "bus"
    cfg = _cfg(None)
    s = mmsb.mmsb_start(path=str(root), config=cfg, shared=True)
    for _ in range(20):
        mmsb.create_page(s, SIZE)
    s.bus.checkpoint(s)
    mmsb.mmsb_stop(s)
    assert not _store(root).exists()
    assert {ckpt_mod.read_checkpoint_head(p).version for p in _ckpts(root)} == {2}
    s = mmsb.mmsb_start(path=str(root), config=cfg)
    for r in range(3):
        mmsb.write_page(s, 1 + r, 0, b"x" * 10)
        s.bus.checkpoint(s)
    mmsb.mmsb_stop(s)
    assert ckpt_mod.read_checkpoint_head(_ckpts(root)[-1]).version == ckpt_mod.REFS_VERSION
    s = mmsb.mmsb_start(path=str(root), config=cfg, shared=True)
    mmsb.write_page(s, 4, 0, b"shared")
    s.bus.checkpoint(s)
    mmsb.mmsb_stop(s)
    assert ckpt_mod.read_checkpoint_head(_ckpts(root)[-1]).version == 2
    s = mmsb.mmsb_start(path=str(root), config=cfg)
    try:
        for r in range(4):
            mmsb.write_page(s, 5 + r, 0, b"y" * 20)
            s.bus.checkpoint(s)
        for p in _ckpts(root):
            ckpt_mod.read_checkpoint(p)  # every version-3 record's pages intact
        want = _view(s)
    finally:
        mmsb.mmsb_stop(s)
    _os_crash(root)
    s = mmsb.mmsb_start(path=str(root), config=cfg)
    try:
        assert _view(s) == want
    finally:
        mmsb.mmsb_stop(s)


def _checkpoint_with_folder_sync_failing(s: mmsb.MMSBState, root: Path) -> str:
    """A checkpoint whose fsync of the checkpoints' folder, after the rename, fails once
    (EIO): it raises DurabilityError, whose message is returned."""
    folder = str(root / "checkpoints")
    armed = [True]

    def hook(step: str, path: Any) -> None:
        if armed[0] and step == "fsync_dir" and str(path) == folder:
            armed[0] = False
            raise OSError(5, "injected EIO", path)

    prev = fsops.set_fault_hook(hook)
    try:
        with pytest.raises(mmsb.DurabilityError) as info:
            s.bus.checkpoint(s)
    finally:
        fsops.set_fault_hook(prev)
    assert not armed[0]
    return str(info.value)


def test_a_failed_checkpoint_s_slots_are_not_reused(tmp_path: Path) -> None:
    """A checkpoint that fails after its record was renamed into place (the folder's
    fsync refused) may be in force after a crash: the next checkpoint writes its pages
    elsewhere, so that record still reads back whole."""
    root = tmp_path / "bus"
    s = _build(root)
    try:
        mmsb.write_page(s, 1, 0, b"first...")
        _checkpoint_with_folder_sync_failing(s, root)
        stale = tmp_path / "stale.mmsb"
        stale.write_bytes(_ckpts(root)[-1].read_bytes())
        # The bus refuses writes now (the record may be in force): checkpoint again, as
        # the final checkpoint of a stop would if the bus had not failed.
        s.bus.failed = None
        mmsb.write_page(s, 1, 0, b"second..")
        s.bus.checkpoint(s)
        again = _refs(_ckpts(root)[-1])
        old = ckpt_mod.read_checkpoint(stale, store=_store(root))  # its slots intact
        assert old.data[:8].tobytes() == b"first..."
        assert again.offsets[0] != old.page_refs.offsets[0]
    finally:
        mmsb.mmsb_stop(s)


def test_the_cli_reads_and_checks_the_records(tmp_path: Path) -> None:
    """The CLI's view of a bus's checkpoint files reads each record with its pages
    from the store: a damaged pinned slot shows as a damaged file naming the store."""
    from mmsb.cli.views import bus_files_info

    root, refs, _want = _damaged(tmp_path)
    info = bus_files_info(root)
    rows = info["checkpoints"]
    assert [r["status"] for r in rows] == ["ok"] * len(rows)
    assert rows[-1]["pages"] == PAGES
    store = _store(root)
    raw = bytearray(store.read_bytes())
    raw[int(refs.offsets[0])] ^= 0x01
    store.write_bytes(bytes(raw))
    rows = bus_files_info(root)["checkpoints"]
    assert rows[-1]["status"] == "damaged" and STORE_NAME in rows[-1]["error"]


def test_an_unused_damaged_store_is_made_anew(tmp_path: Path) -> None:
    """A page store that no retained checkpoint names (a bus whose checkpoints are
    self-contained) is made anew when its header is damaged; one that a retained
    checkpoint names is refused (test_damaged_page_store_is_refused_naming_it)."""
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=_cfg(), shared=True)
    mmsb.create_page(s, 100)
    mmsb.mmsb_stop(s)
    _store(root).write_bytes(b"junk" * 100)
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        mmsb.write_page(s, 1, 0, b"kept")
        s.bus.checkpoint(s)
        want = _view(s)
    finally:
        mmsb.mmsb_stop(s)
    assert _store(root).read_bytes()[:8] == b"MMSBPGST"
    _os_crash(root)
    _assert_reopens_as(root, want)


@pytest.mark.parametrize("direct_runs", [0, 1 << 20])
def test_pages_with_padded_slots(tmp_path: Path, direct_runs: int,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages whose size is not a size class leave padding in their slots, which is
    never written nor read (the pages read run by run into place, or gathered from
    their span)."""
    monkeypatch.setattr(pagestore_mod, "_DIRECT_RUNS", direct_runs)
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        for k, size in enumerate((1, 17, 1000, 5000, 70_000)):
            p = mmsb.create_page(s, size)
            mmsb.write_page(s, p.id, 0, bytes([k + 1]) * size)
        s.bus.checkpoint(s)
        mmsb.write_page(s, 3, 999, b"z")
        s.bus.checkpoint(s)
        want = _view(s)
    finally:
        mmsb.mmsb_stop(s)
    _os_crash(root)
    _assert_reopens_as(root, want)


def test_a_checkpoint_whose_folder_sync_fails_stops_the_writes(tmp_path: Path) -> None:
    """After a checkpoint renamed into place whose folder sync failed, a crash may leave
    it in force, and it would cover this generation's segments: the bus refuses writes
    until reopened, so nothing acknowledged after it can be lost, and the reopened bus
    holds every acknowledged write."""
    root = tmp_path / "bus"
    s = _build(root)
    mmsb.write_page(s, 1, 0, b"acked...")
    want = _view(s)
    assert "reopened" in _checkpoint_with_folder_sync_failing(s, root)
    with pytest.raises(mmsb.DurabilityError):
        mmsb.write_page(s, 1, 0, b"refused.")
    assert _view(s) == want
    s.bus.abandon("killed")
    mmsb.mmsb_stop(s)
    _os_crash(root)
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        assert _view(s) == want
        mmsb.write_page(s, 1, 0, b"again...")
    finally:
        mmsb.mmsb_stop(s)


def test_a_store_being_created_when_killed_is_removed_at_open(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    s = _build(root)
    mmsb.mmsb_stop(s)
    left = root / "checkpoints" / f".{STORE_NAME}.0123456789ab.tmp"
    left.write_bytes(b"MMSBPGST")
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    mmsb.mmsb_stop(s)
    assert not left.exists()


def test_page_references_are_checked_against_their_pins() -> None:
    """Each rule of a PREF section's check, one broken at a time (0: sound; 1: the pins
    themselves are wrong; 2: a page's slot is not a pin of its size and generation)."""
    from mmsb._core.arena import size_class
    from mmsb._storage.pagestore import DATA_START, runs_problem

    sizes = np.array([1000, 16, 5000], np.int64)
    lens = np.array([size_class(int(n)) for n in sizes], np.int64)
    po = np.array([DATA_START, DATA_START + 2048, DATA_START + 4096], np.int64)
    gens = np.array([3, 3, 3], np.int64)
    offs = po.copy()

    def check(offsets=offs, sz=sizes, p=po, pl=lens, pg=gens, gen=3):  # type: ignore[no-untyped-def]
        po = np.asarray(p, np.int64)  # (each pin a run of one slot)
        runs = np.stack((po, np.ones_like(po), np.asarray(pl, np.int64),
                         np.asarray(pg, np.int64)))
        return runs_problem(np.asarray(offsets, np.int64), np.asarray(sz, np.int64), runs, gen)

    assert check() == 0
    assert check(gen=None) == 0
    assert check(offsets=offs[[2, 0, 1]], sz=sizes[[2, 0, 1]]) == 0  # any page order
    assert check(p=[DATA_START - 16, *po[1:]], offsets=[DATA_START - 16, *offs[1:]]) == 1
    assert check(p=po[[1, 0, 2]], offsets=offs[[1, 0, 2]], pl=lens[[1, 0, 2]]) == 1
    assert check(pl=[lens[0], lens[1], 0]) == 1
    assert check(pg=[3, 0, 3]) == 1
    assert check(p=[po[0], po[0] + lens[0] - 16, po[2]],
                 offsets=[po[0], po[0] + lens[0] - 16, po[2]]) == 1  # overlapping pins
    assert check(offsets=[offs[0], offs[1], offs[2] + 16]) == 2  # not a pin's start
    assert check(offsets=[offs[0], offs[0], offs[2]]) == 2  # two pages, one slot
    assert check(pg=[3, 2, 3]) == 2  # pinned for another generation
    assert check(sz=[1000, 16, 2000]) == 2  # a slot of another size class
    assert check(p=np.zeros(0), pl=np.zeros(0), pg=np.zeros(0)) == 2  # no pins at all


def test_pins_are_kept_as_runs_and_checked_as_runs() -> None:
    """Slot-by-slot pins become runs (slots back to back of one length and generation)
    and come back the same; a page's slot is checked against the runs: at a slot's
    start inside a run, of its size class and generation, no two pages at one slot, and
    runs that overlap, sit in the header or reach past 2^62 are refused."""
    from mmsb._storage.pagestore import _pin_slots, pin_runs, runs_problem

    # Two runs of generation 4 (lengths 1024 and 16), one of generation 5 after a gap.
    po = np.array([64, 1088, 2112, 3136, 3152, 8192, 9216], np.int64)
    pl = np.array([1024, 1024, 1024, 16, 16, 1024, 1024], np.int64)
    pg = np.array([4, 4, 4, 4, 4, 5, 5], np.int64)
    runs = pin_runs(po, pl, pg)
    assert runs.tolist() == [[64, 3136, 8192], [3, 2, 2], [1024, 16, 1024], [4, 4, 5]]
    back = _pin_slots(runs)
    assert [a.tolist() for a in back] == [po.tolist(), pl.tolist(), pg.tolist()]
    assert pin_runs(*(np.zeros(0, np.int64),) * 3).shape == (4, 0)

    sizes = np.array([1000, 16, 1000], np.int64)

    def check(offsets: list[int], gen: int | None = 5, r: np.ndarray = runs,
              sz: np.ndarray = sizes) -> int:
        return runs_problem(np.array(offsets, np.int64), sz, r, gen)

    assert check([9216, 3152, 8192], gen=None) == 0
    assert check([1088, 3136, 2112], gen=4) == 0  # slots in the middle of runs
    assert check([1088, 3136, 2112], gen=5) == 2  # pinned for another generation
    assert check([1088 + 16, 3136, 2112], gen=4) == 2  # not at a slot's start
    assert check([64 + 3 * 1024, 3136, 2112], gen=4) == 2  # past its run's slots
    assert check([32, 3136, 2112], gen=None) == 2  # before every run
    assert check([1088, 3136, 1088], gen=4) == 2  # two pages, one slot
    assert check([1088, 1088 + 1024, 2112], gen=4, sz=np.array([1000, 1000, 16])) == 2  # size
    bad = runs.copy()
    bad[0, 1] = 3000  # overlaps the run before it
    assert check([9216, 3152, 8192], r=bad) == 1
    for row, value in ((1, 0), (2, 0), (3, 0)):  # no slots, no length, no generation
        bad = runs.copy()
        bad[row, 0] = value
        assert check([9216, 3152, 8192], r=bad) == 1
    bad = runs.copy()
    bad[0, 0] = 16  # inside the store's header
    assert check([9216, 3152, 8192], r=bad) == 1
    bad = runs.copy()
    bad[1, 2] = 1 << 61  # would reach past 2^62 (and overflow a product)
    assert check([9216, 3152, 8192], r=bad) == 1


def test_a_page_reference_section_of_either_pin_layout_reads_the_same() -> None:
    """PREF stores the pins as runs (format version 4, as this build writes); a
    version-3 section lists them slot by slot (as earlier builds wrote), and reads back
    to the same references; a nonzero reserved word and wrong lengths are refused."""
    from mmsb._storage.pagestore import PageRefs

    ids = np.array([1, 2, 3], np.int64)
    sizes = np.array([1000, 16, 1000], np.int64)
    epochs = np.zeros(3, np.int64)
    offsets = np.array([64, 3136, 1088], np.int64)
    crcs = np.array([7, 8, 9], np.uint32)
    po = np.array([64, 1088, 2112, 3136], np.int64)
    pl = np.array([1024, 1024, 1024, 16], np.int64)
    pg = np.array([2, 2, 1, 2], np.int64)
    refs = PageRefs.from_slots(77, ids, sizes, epochs, offsets, crcs, po, pl, pg)
    as_runs = b"".join(bytes(p) for p in ckpt_mod.encode_refs(refs))
    assert struct.unpack_from("<QQQQ", as_runs) == (77, 3, 3, 0)  # 3 runs, not 4 slots
    slotwise = (struct.pack("<QQQQ", 77, 3, 4, 0) + offsets.astype("<i8").tobytes()
                + crcs.astype("<u4").tobytes() + po.astype("<i8").tobytes()
                + pl.astype("<i8").tobytes() + pg.astype("<i8").tobytes())

    def fail(reason: str) -> mmsb.SerializationError:
        return mmsb.SerializationError(reason)

    for raw, runs in ((as_runs, True), (slotwise, False)):
        got = ckpt_mod.decode_refs(raw, ids, sizes, epochs, 2, fail, runs=runs)
        assert got.offsets.tolist() == offsets.tolist() and got.crcs.tolist() == [7, 8, 9]
        assert [got.pin_offsets.tolist(), got.pin_lengths.tolist(), got.pin_gens.tolist()] \
            == [po.tolist(), pl.tolist(), pg.tolist()]
        assert got.runs.tolist() == refs.runs.tolist()
    with pytest.raises(mmsb.SerializationError, match="head is malformed"):
        ckpt_mod.decode_refs(as_runs[:24] + struct.pack("<Q", 1) + as_runs[32:], ids, sizes,
                             epochs, 2, fail)
    with pytest.raises(mmsb.SerializationError, match="pinned slots"):
        ckpt_mod.decode_refs(as_runs, ids, sizes, epochs, 2, fail, runs=False)  # (4 of 3 B)
    with pytest.raises(mmsb.SerializationError, match="pinned runs of slots"):
        ckpt_mod.decode_refs(as_runs[:-8], ids, sizes, epochs, 2, fail)
    with pytest.raises(mmsb.SerializationError, match="does not pin for this checkpoint"):
        ckpt_mod.decode_refs(as_runs, ids, sizes, epochs, 1, fail)


def test_a_bus_that_never_frees_a_slot_pins_a_run_per_checkpoint(tmp_path: Path) -> None:
    """Every checkpoint kept (the default): the newest record pins every older
    checkpoint's slots, stored as about one run per checkpoint, not a row per slot;
    the next checkpoint after a reopen expands them and writes a sound record."""
    root = tmp_path / "bus"
    cfg = _cfg(max_tlog_size=40)
    s = mmsb.mmsb_start(path=str(root), config=cfg)
    ids = [p.id for p in mmsb.create_pages(s, 24, 512)]
    for i in range(400):
        mmsb.write_page(s, ids[i % 24], (i * 5) % 500, bytes([i % 250 + 1]) * 8)
    gens = s.bus.generation
    mmsb.mmsb_stop(s)
    newest = sorted((root / "checkpoints").glob("ckpt-*.mmsb"))[-1]
    refs = ckpt_mod.read_checkpoint(newest, with_log=False).page_refs
    assert refs.pin_offsets.size >= 24 * (gens - 1)  # every checkpoint's slots
    assert refs.runs.shape[1] <= gens + 1
    s = mmsb.mmsb_start(path=str(root), config=cfg)
    try:
        before = pages_view(s)
        for i in range(60):
            mmsb.write_page(s, ids[i % 24], 0, bytes([i + 1]))
        s.bus.checkpoint(s)
        after = pages_view(s)
    finally:
        mmsb.mmsb_stop(s)
    assert after != before
    s = mmsb.mmsb_start(path=str(root), config=cfg)
    try:
        assert pages_view(s) == after
    finally:
        mmsb.mmsb_stop(s)


def test_pins_of_more_slots_than_memory_holds_are_refused_before_they_are_expanded(
        tmp_path: Path) -> None:
    """A newest record whose checksums hold but whose last run of pins counts 2^40
    slots (the open's check of the runs passes it: the file's own pages lie in it) is
    refused by the first checkpoint, which would make the runs slot by slot: a
    DurabilityError naming the store, no memory asked for, the log keeping every
    record; reopened with the record put right, nothing is lost."""
    from conftest import join_checkpoint, split_checkpoint

    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    ids = [p.id for p in mmsb.create_pages(s, 8, 512)]
    for pid in ids:
        mmsb.write_page(s, pid, 0, bytes([pid]) * 8)
    mmsb.mmsb_stop(s)
    newest = _ckpts(root)[-1]
    good = newest.read_bytes()
    head, secs = split_checkpoint(good)
    (tag, codec, raw_len, pref), = [x for x in secs if x[0] == b"PREF"]
    assert codec == 0  # (a small section is stored raw)
    uid, n, m, zero = struct.unpack_from("<QQQQ", pref)
    assert zero == 0 and m >= 1 and head[1] == ckpt_mod.REFS_VERSION
    counts_at = 32 + 12 * n + 8 * m  # the runs' counts, after their offsets
    bad = bytearray(pref)
    struct.pack_into("<q", bad, counts_at + 8 * (m - 1), 1 << 40)
    newest.write_bytes(join_checkpoint(head, [(t, c, r, bytes(bad) if t == b"PREF" else st)
                                              for t, c, r, st in secs]))
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        mmsb.write_page(s, ids[0], 1, b"after")
        lsn = int(s.last_lsn)
        with pytest.raises(mmsb.DurabilityError, match="more than this machine's memory"):
            s.bus.checkpoint(s)
        assert int(s.last_lsn) == lsn and _ckpts(root)[-1] == newest
    finally:
        with pytest.raises(mmsb.DurabilityError):
            mmsb.mmsb_stop(s)  # its final checkpoint is refused the same way
    newest.write_bytes(good)
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        assert int(s.last_lsn) == lsn
        assert bytes(mmsb.query_page(s, ids[0])[:6]) == bytes([ids[0]]) + b"after"
    finally:
        mmsb.mmsb_stop(s)


def test_pins_that_cannot_be_allocated_refuse_the_checkpoint_and_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins within the machine's memory whose slot-by-slot arrays still cannot be
    allocated (this process's limit) refuse the first checkpoint after the open with a
    DurabilityError naming the store; the state, the log and the files are as they
    were, and the next checkpoint, with memory to spare, goes through."""
    from mmsb._storage import pagestore

    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    ids = [p.id for p in mmsb.create_pages(s, 8, 512)]
    mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        mmsb.write_page(s, ids[0], 1, b"after")
        lsn, view, files = int(s.last_lsn), pages_view(s), _ckpts(root)
        real = pagestore._pin_slots

        def no_memory(*_a: object) -> object:
            raise MemoryError

        monkeypatch.setattr(pagestore, "_pin_slots", no_memory)
        with pytest.raises(mmsb.DurabilityError, match="more than this process may hold"):
            s.bus.checkpoint(s)
        assert (int(s.last_lsn), pages_view(s), _ckpts(root)) == (lsn, view, files)
        monkeypatch.setattr(pagestore, "_pin_slots", real)
        s.bus.checkpoint(s)
        assert len(_ckpts(root)) == len(files) + 1
    finally:
        mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        assert int(s.last_lsn) == lsn and pages_view(s) == view
    finally:
        mmsb.mmsb_stop(s)


def test_a_bus_of_version_3_checkpoints_opens_and_goes_on_in_version_4(
        tmp_path: Path) -> None:
    """A bus whose newest checkpoint an earlier build wrote (format version 3: its pins
    slot by slot, its chain recorded as lists in META ``chain``) opens to the same
    state, deferring its history as before, and its next checkpoint is version 4."""
    import msgpack

    from conftest import join_checkpoint, split_checkpoint
    from mmsb._storage.pagestore import PageRefs

    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=_cfg(max_tlog_size=30))
    ids = [p.id for p in mmsb.create_pages(s, 6, 300)]
    for i in range(100):
        mmsb.write_page(s, ids[i % 6], i % 290, bytes([i + 1]) * 4)
    want = _view(s)
    mmsb.mmsb_stop(s)
    newest = _ckpts(root)[-1]
    assert len(_ckpts(root)) >= 3
    head, secs = split_checkpoint(newest.read_bytes())
    ck = ckpt_mod.read_checkpoint(newest, with_log=False, pages=False)
    refs: PageRefs = ck.page_refs
    parts = []
    for tag, codec, raw_len, stored in secs:
        if tag == b"PREF":
            n, m = refs.ids.size, refs.pin_offsets.size
            stored = (struct.pack("<QQQQ", refs.uid, n, m, 0) + refs.offsets.astype("<i8").tobytes()
                      + refs.crcs.astype("<u4").tobytes()
                      + refs.pin_offsets.astype("<i8").tobytes()
                      + refs.pin_lengths.astype("<i8").tobytes()
                      + refs.pin_gens.astype("<i8").tobytes())
            codec, raw_len = 0, len(stored)
        elif tag == b"META":
            assert codec == 0
            meta = msgpack.unpackb(stored, raw=False, strict_map_key=False)
            rows = np.frombuffer(meta["bus"].pop("chain_rows"), "<i8").reshape(-1, 4)
            meta["bus"]["chain"] = [r[:3] if r[3] < 0 else r for r in rows.tolist()]
            stored = msgpack.packb(meta, use_bin_type=True)
            raw_len = len(stored)
        parts.append((tag, codec, raw_len, stored))
    newest.write_bytes(join_checkpoint((head[0], 3, *head[2:]), parts))
    assert ckpt_mod.read_checkpoint_head(newest).version == 3
    s = mmsb.mmsb_start(path=str(root), config=_cfg(max_tlog_size=30))
    try:
        assert type(s.log).__name__ == "DeferredLog"
        assert _view(s) == want
        got = s.bus.open_refs
        assert got.runs.shape[1] < got.pin_offsets.size  # merged into runs on reading
        assert got.pin_offsets.tolist() == refs.pin_offsets.tolist()
        mmsb.write_page(s, ids[0], 0, b"v4")
        s.bus.checkpoint(s)
        assert ckpt_mod.read_checkpoint_head(_ckpts(root)[-1]).version == 4
        assert mmsb.verify_state_consistency(s)  # the history, through the v3 file
        want = _view(s)
    finally:
        mmsb.mmsb_stop(s)
    s = mmsb.mmsb_start(path=str(root), config=_cfg(max_tlog_size=30))
    try:
        assert _view(s) == want
    finally:
        mmsb.mmsb_stop(s)
