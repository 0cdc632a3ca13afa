"""``load_checkpoint`` reads the file into a buffer of its own and, where the layout
allows (page bytes and log payload stored raw, every page size its own size class), keeps
the pages and the log payload there instead of copying them. The restored state is the
saved one; its pages are its own (a write reaches neither the log's history, nor another
state loaded from the same file, nor the state it was saved from); layouts that do not
allow it are copied as before; damaged files are refused before anything changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mmsb
from mmsb._core.engine import MMSBState
from mmsb._storage import checkpoint as ckpt_mod
from mmsb._storage import fsops
from mmsb.errors import SerializationError
from test_timetravel import CFG, _same_state


def _state(sizes: list[int], seed: int = 7) -> MMSBState:
    rng = np.random.default_rng(seed)
    s = MMSBState(CFG)
    for size in sizes:
        page = mmsb.create_page(s, size)
        mmsb.update_page(s, page.id, rng.integers(1, 256, size, dtype=np.uint8).tobytes())
    for pid in range(1, len(sizes) + 1, 3):
        mmsb.write_page(s, pid, 1, b"ab")
    return s


def _load(path: Path) -> MMSBState:
    t = MMSBState(CFG)
    mmsb.load_checkpoint(t, path)
    return t


def _adopted(s: MMSBState) -> bool:
    chunk = s.arena.chunk(0)
    return chunk is not None and not chunk.flags.owndata


def test_adopted_pages_and_payload_are_the_saved_state(tmp_path: Path) -> None:
    s = _state([1024] * 20 + [64] * 7 + [4096] * 3)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    t = _load(path)
    assert _adopted(t)
    assert all(c is None or c.readonly for c in t.log.chunks)
    _same_state(t, s)
    # Written again from the adopted memory, then written to: the history still reads.
    again = tmp_path / "again.ckpt"
    mmsb.checkpoint_log(t, again)
    _same_state(_load(again), s)
    lsn = t.log.last_lsn
    mmsb.write_page(t, 2, 0, b"new bytes")
    assert mmsb.query_page(mmsb.replay_to_lsn(t, lsn), 2) == mmsb.query_page(s, 2)


def test_adopted_pages_are_private(tmp_path: Path) -> None:
    s = _state([1024] * 12)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    a, b = _load(path), _load(path)
    assert _adopted(a) and _adopted(b)
    lsn = a.log.last_lsn
    before = {pid: mmsb.query_page(a, pid) for pid in a.pages}
    for pid in a.pages:
        mmsb.update_page(a, pid, bytes([pid]) * 1024)
    for pid, old in before.items():
        assert mmsb.query_page(b, pid) == old
        assert mmsb.query_page(s, pid) == old
    past = mmsb.replay_to_lsn(a, lsn)
    assert {pid: mmsb.query_page(past, pid) for pid in past.pages} == before
    a._check()


def test_a_freed_adopted_slot_is_reused_at_its_width(tmp_path: Path) -> None:
    s = _state([256] * 9)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    t = _load(path)
    assert _adopted(t)
    neighbours = {pid: mmsb.query_page(t, pid) for pid in (4, 6)}
    mmsb.delete_page(t, 5)
    page = mmsb.create_page(t, 256)
    assert mmsb.query_page(t, page.id) == bytes(256)
    mmsb.update_page(t, page.id, b"\xff" * 256)
    assert {pid: mmsb.query_page(t, pid) for pid in (4, 6)} == neighbours
    t._check()


@pytest.mark.parametrize("sizes", [[300] * 5, [1024, 1000, 64], [70_000, 64]])
def test_layouts_that_cannot_be_adopted_are_copied(tmp_path: Path, sizes: list[int]) -> None:
    s = _state(sizes)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    t = _load(path)
    assert not _adopted(t)
    _same_state(t, s)


def test_a_snapshot_is_adopted_once(tmp_path: Path) -> None:
    s = _state([512] * 6)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    snap = ckpt_mod.read_checkpoint(path, private=True)
    assert snap.owned
    a, b = MMSBState(CFG), MMSBState(CFG)
    with a.lock:
        a.restore(snap)
    assert not snap.owned
    with b.lock:
        b.restore(snap)
    assert _adopted(a) and not _adopted(b)
    mmsb.update_page(a, 1, bytes(512))
    assert mmsb.query_page(b, 1) == mmsb.query_page(s, 1)
    assert not ckpt_mod.read_checkpoint(path).owned
    assert not ckpt_mod.read_checkpoint(path.read_bytes()).owned


def test_a_file_mostly_of_other_bytes_is_not_adopted(tmp_path: Path) -> None:
    s = _state([64] * 4)
    mmsb.create_page(s, 64, metadata={"blob": np.random.default_rng(5).bytes(200_000).hex()})
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    assert not ckpt_mod.read_checkpoint(path, private=True).owned
    t = _load(path)
    assert not _adopted(t)
    _same_state(t, s)


def test_private_read_of_a_damaged_file_changes_nothing(tmp_path: Path) -> None:
    s = _state([1024] * 8)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    good = path.read_bytes()
    t = _state([64] * 2, seed=3)
    pages = {pid: mmsb.query_page(t, pid) for pid in t.pages}
    for cut in (len(good) // 2, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(SerializationError):
            mmsb.load_checkpoint(t, path)
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(SerializationError, match="checksum"):
        mmsb.load_checkpoint(t, path)
    assert {pid: mmsb.query_page(t, pid) for pid in t.pages} == pages
    t._check()


def test_read_private_reads_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    for size in (0, 1, 65_537, 300_001):
        data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(data)
        buf = fsops.read_private(path)
        assert buf.flags.writeable and buf.tobytes() == data


@pytest.mark.parametrize("small", [[1024] * 3, []])
def test_adopt_cuts_a_large_buffer_into_chunks(small: list[int]) -> None:
    from mmsb._core.arena import CHUNK_SHIFT, CHUNK_SIZE, Arena

    size = 16 << 20
    sizes = np.array([size] * 5 + small, np.int64)
    data = np.zeros(int(sizes.sum()), np.uint8)  # mapped lazily: nothing is touched
    arena = Arena()
    addrs = arena.adopt(data, sizes)
    assert addrs is not None
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    for addr, start, n in zip(addrs.tolist(), starts.tolist(), sizes.tolist(), strict=True):
        assert addr & (CHUNK_SIZE - 1) < CHUNK_SIZE
        view = arena.view(addr, n)
        assert view.__array_interface__["data"][0] == data[start:].__array_interface__["data"][0]
    assert len({a >> CHUNK_SHIFT for a in addrs.tolist()}) == 2
    arena._check(list(zip(addrs.tolist(), sizes.tolist(), strict=True)))
    assert arena.adopt(data[: 3 * size], np.array([size, size, size - 1], np.int64)) is None
    assert arena.adopt(np.zeros(0, np.uint8), sizes[:0]) is None
    frozen = np.zeros(1024, np.uint8)
    frozen.flags.writeable = False
    assert arena.adopt(frozen, np.array([1024], np.int64)) is None


def _index_of(s: MMSBState) -> dict[int, list[int]]:
    return {pid: rows.tolist() for pid, rows in s.log.index.items()}


def test_a_restored_log_makes_its_row_indexes_when_first_read(tmp_path: Path) -> None:
    s = _state([1024] * 12 + [64] * 5)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    want = _index_of(s)
    # Read first: the indexes are the saved log's.
    t = _load(path)
    assert "index" not in vars(t.log)
    assert _index_of(t) == want
    # Written first: the new row joins its page's rows.
    t = _load(path)
    mmsb.write_page(t, 3, 0, b"xyz")
    assert _index_of(t) == {**want, 3: [*want[3], t.log.n - 1]}
    assert mmsb.verify_state_consistency(t)
    # A saved history (made before a rewrite that may fail) holds them, so that putting
    # it back restores them.
    t = _load(path)
    with t.lock:
        saved = t.history_snapshot()
        t.log.replace_all([])
        assert t.log.index == {}
        t.history_restore(saved)
    assert _index_of(t) == want
    assert list(t.log.records) == list(s.log.records)
    # A frozen copy shares them.
    t = _load(path)
    with t.lock:
        frozen = t.log.frozen()
    assert frozen.index is t.log.index and _index_of(t) == want


def test_states_read_from_a_large_file_are_independent_of_it(tmp_path: Path) -> None:
    # 100 pages of 1 KiB and their log: a file larger than a C library's small blocks.
    s = _state([1024] * 100)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    assert path.stat().st_size > 64 << 10
    a, b = _load(path), _load(path)
    assert _adopted(a) and _adopted(b)
    saved = path.read_bytes()
    # The file changed in place, then cut short, under the loaded states.
    with open(path, "r+b") as f:
        f.write(b"\xff" * len(saved))
        f.flush()
        f.truncate(100)
    _same_state(a, s)
    _same_state(b, s)
    # Writes to one state reach neither the other state nor the file.
    lsn = a.log.last_lsn
    for pid in list(a.pages)[:50]:
        mmsb.update_page(a, pid, bytes([pid]) * 1024)
    _same_state(b, s)
    assert path.read_bytes() == b"\xff" * 100
    past = mmsb.replay_to_lsn(a, lsn)
    assert {pid: mmsb.query_page(past, pid) for pid in past.pages} == {
        pid: mmsb.query_page(s, pid) for pid in s.pages}


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("load", [False, True])
def test_a_restore_that_fails_late_changes_nothing(tmp_path: Path, fresh: bool, load: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore that fails after the pages were taken over (here: the log cannot be
    built) leaves the state as it was: through load_checkpoint, and as a bus's recovery
    restores (``fresh``: a state that never held a page, whose page table is filled in
    place, last), into a state without pages and into one with pages of its own. Only a
    fresh restore into a state that never held a page keeps its table object."""
    s = _state([1024] * 8 + [64] * 3)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    t = MMSBState(CFG)
    if not fresh:
        mmsb.write_page(t, mmsb.create_page(t, 32).id, 0, b"mine")
    before = ({pid: mmsb.query_page(t, pid) for pid in t.pages}, t.table.next_id,
              t.table.live_count, int(t.last_lsn), t.table.flags.tobytes())

    def restore() -> None:
        if load:
            mmsb.load_checkpoint(t, path)
        else:
            with t.lock:
                t.restore(ckpt_mod.read_checkpoint(path, private=True), fresh=True)

    def no_log(*_a: object, **_k: object) -> None:
        raise MemoryError

    from mmsb._core.log import TransactionLog
    monkeypatch.setattr(TransactionLog, "from_columns", staticmethod(no_log))
    with pytest.raises((SerializationError, MemoryError)):
        restore()
    assert ({pid: mmsb.query_page(t, pid) for pid in t.pages}, t.table.next_id,
            t.table.live_count, int(t.last_lsn), t.table.flags.tobytes()) == before
    monkeypatch.undo()
    table = t.table
    restore()  # and then it restores
    _same_state(t, s)
    assert (t.table is table) == (fresh and not load)


@pytest.mark.parametrize("fresh", [True, False])
def test_a_load_the_bus_cannot_follow_changes_nothing(tmp_path: Path, fresh: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """load_checkpoint into a durable bus whose checkpoint of the loaded state fails
    (a full disk, here a DurabilityError from the checkpoint) is refused and puts the
    state back as it was: a bus that never held a page as well as one with pages."""
    s = _state([1024] * 8 + [64] * 3)
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    bus = mmsb.mmsb_start(path=str(tmp_path / "bus"), config=mmsb.MMSBConfig(enable_gpu=False))
    try:
        if not fresh:
            mmsb.write_page(bus, mmsb.create_page(bus, 32).id, 0, b"mine")
        before = ({pid: mmsb.query_page(bus, pid) for pid in bus.pages}, bus.table.next_id,
                  bus.table.live_count, int(bus.last_lsn), bus.table.flags.tobytes())

        def full(*_a: object, **_k: object) -> None:
            raise mmsb.DurabilityError("no room left on the device (test)")

        monkeypatch.setattr(type(bus.bus), "checkpoint", full)
        with pytest.raises(mmsb.DurabilityError):
            mmsb.load_checkpoint(bus, path)
        assert ({pid: mmsb.query_page(bus, pid) for pid in bus.pages}, bus.table.next_id,
                bus.table.live_count, int(bus.last_lsn), bus.table.flags.tobytes()) == before
        monkeypatch.undo()
    finally:
        mmsb.mmsb_stop(bus)
