"""What a reopen reads, and how: the identity file in one read, the newest checkpoint
without its log section's bytes (its section heads through a window; the log section is
checked when the history is read), LOCK's pid rewritten whole. Each refusal changes
nothing on disk, and the state a reopen builds equals checkpoint + full log replay
(``open_readonly``) either way."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

import mmsb
from conftest import copy_beside, edges, flip_in_log_section, pages_view
from mmsb._core.log import DeferredLog
from mmsb._storage import bus as bus_mod
from mmsb._storage import checkpoint as ckpt_mod


def _cfg() -> mmsb.MMSBConfig:
    return mmsb.MMSBConfig(enable_gpu=False, fsync="none", checkpoint_interval=0,
                           max_tlog_size=24)


def _image(tmp: Path) -> Path:
    """A crash image (the directory copied while its writer is open) whose newest
    checkpoint has records in its log section, and a few records after it."""
    root = tmp / "live"
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    ids = [p.id for p in mmsb.create_pages(s, 4, 128)]
    for i in range(70):
        mmsb.write_page(s, ids[i % 4], (i * 3) % 120, bytes([i % 250 + 1]) * 8)
    s.bus.flush()
    img = tmp / "image"
    shutil.copytree(root, img)
    mmsb.mmsb_stop(s)
    return img


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _view(s: mmsb.MMSBState) -> tuple:
    return (pages_view(s), edges(s), int(s.last_lsn), int(s.next_page_id), s.next_delta_id,
            [(d.lsn, d.page_id, d.epoch) for d in s.tlog])


def _reference(root: Path) -> tuple:
    return _view(mmsb.open_readonly(root, config=_cfg()))


def _newest(root: Path) -> Path:
    return sorted((root / "checkpoints").glob("ckpt-*.mmsb"))[-1]


@pytest.mark.parametrize("window", [4096, 32, 100])
def test_the_newest_checkpoint_reads_the_same_through_any_window(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    """The newest checkpoint's section heads found through windows of any size (one
    head a read, heads across a window's end, the part before the log section taken
    from the window or read again): the reopened state and its history are the full
    replay's either way."""
    img = _image(tmp_path)
    want = _reference(img)
    monkeypatch.setattr(ckpt_mod, "_HEAD_WINDOW", window)
    for k in range(2):
        root = copy_beside(img, f"bus-{k}")
        s = mmsb.mmsb_start(path=str(root), config=_cfg())
        try:
            assert _view(s) == want
        finally:
            mmsb.mmsb_stop(s)


@pytest.mark.parametrize("defer", [True, False])
def test_damage_in_the_newest_log_section_is_refused_when_the_history_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defer: bool) -> None:
    """The newest checkpoint's log section is history: an open that defers the history
    neither reads nor checks its bytes, and the first call that needs the history
    refuses the damage with SerializationError naming the file and the section,
    changing nothing (the state, the log, the files); an open that reads the history at
    once refuses it at open, writing nothing."""
    img = _image(tmp_path)
    want = _reference(img)
    root = copy_beside(img, "bus")
    newest = _newest(root)
    flip_in_log_section(newest)
    monkeypatch.setattr(bus_mod, "DEFER_HISTORY", defer)
    before = _files(root)
    if not defer:
        with pytest.raises(mmsb.SerializationError) as info:
            mmsb.mmsb_start(path=str(root), config=_cfg())
        assert newest.name in str(info.value) and "TLOG" in str(info.value)
        after = _files(root)
        after.pop("LOCK", None)
        before.pop("LOCK", None)
        assert after == before
        return
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        assert type(s.log) is DeferredLog
        assert (pages_view(s), edges(s), int(s.last_lsn)) == want[:3]
        pid = sorted(s.pages)[0]
        kept = (pages_view(s), edges(s), int(s.last_lsn), s.next_delta_id)
        on_disk = {k: v for k, v in _files(root).items() if not k.startswith("map/")}
        for call in (lambda: mmsb.read_page_at(s, pid, lsn=int(s.last_lsn) - 1),
                     lambda: len(s.tlog)):
            with pytest.raises(mmsb.SerializationError) as info:
                call()
            assert newest.name in str(info.value) and "TLOG" in str(info.value)
            assert type(s.log) is DeferredLog
            assert (pages_view(s), edges(s), int(s.last_lsn), s.next_delta_id) == kept
            assert {k: v for k, v in _files(root).items() if not k.startswith("map/")} == on_disk
    finally:
        mmsb.mmsb_stop(s)  # its final checkpoint writes the log's tail: no history needed
    # The damaged file is history now, and still found when the history is read.
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        assert (pages_view(s), edges(s), int(s.last_lsn)) == want[:3]
        with pytest.raises(mmsb.SerializationError) as info:
            mmsb.read_page_at(s, pid, lsn=int(s.last_lsn) - 1)
        assert newest.name in str(info.value) and "TLOG" in str(info.value)
    finally:
        mmsb.mmsb_stop(s)


def test_an_identity_file_one_byte_longer_is_refused(tmp_path: Path) -> None:
    """BUS is read with one byte more than it may hold: a longer file is refused,
    naming its length, and nothing changes."""
    root = copy_beside(_image(tmp_path), "bus")
    with open(root / "BUS", "ab") as f:
        f.write(b"\0")
    before = _files(root)
    with pytest.raises(mmsb.SerializationError, match="33 bytes, not 32"):
        mmsb.mmsb_start(path=str(root), config=_cfg())
    assert _files(root) == before


def test_an_identity_file_one_byte_shorter_is_refused(tmp_path: Path) -> None:
    root = copy_beside(_image(tmp_path), "bus")
    raw = (root / "BUS").read_bytes()
    (root / "BUS").write_bytes(raw[:-1])
    before = _files(root)
    with pytest.raises(mmsb.SerializationError, match="31 bytes, not 32"):
        mmsb.mmsb_start(path=str(root), config=_cfg())
    assert _files(root) == before


def test_a_missing_identity_file_beside_data_is_refused(tmp_path: Path) -> None:
    """Checkpoints and segments without BUS: refused (never guessed), nothing made."""
    root = copy_beside(_image(tmp_path), "bus")
    (root / "BUS").unlink()
    before = _files(root)
    with pytest.raises(mmsb.SerializationError, match="BUS is missing"):
        mmsb.mmsb_start(path=str(root), config=_cfg())
    assert _files(root) == before


def test_an_identity_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    root = copy_beside(_image(tmp_path), "bus")
    real = tmp_path / "elsewhere"
    (root / "BUS").rename(real)
    os.symlink(real, root / "BUS")
    with pytest.raises(mmsb.SerializationError, match="cannot read the identity file"):
        mmsb.mmsb_start(path=str(root), config=_cfg())
    assert (root / "BUS").is_symlink()


@pytest.mark.parametrize("old", [b"7\n", b"1234567890123\n", b""])
def test_lock_holds_exactly_this_process_id_after_the_open(tmp_path: Path, old: bytes) -> None:
    """Whatever the last writer left in LOCK (a shorter or longer pid, nothing), the
    open leaves exactly its own pid there."""
    root = copy_beside(_image(tmp_path), "bus")
    (root / "LOCK").write_bytes(old)
    s = mmsb.mmsb_start(path=str(root), config=_cfg())
    try:
        assert (root / "LOCK").read_bytes() == f"{os.getpid()}\n".encode()
    finally:
        mmsb.mmsb_stop(s)


def test_a_read_of_a_whole_file_goes_on_after_a_short_read_before_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-file read takes a short read past the file's size as its end, but one
    before it (the kernel returns at most about 2 GiB a call) as a reason to read on."""
    from mmsb._storage import fsops

    path = tmp_path / "f"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    real = os.pread
    calls: list[int] = []

    def short(fd: int, n: int, at: int) -> bytes:
        calls.append(at)
        return real(fd, min(n, 70_000), at)

    monkeypatch.setattr(fsops.os, "pread", short)
    assert fsops.read_all(path) == data
    assert len(calls) == 4  # 70,000 × 3, then the last 46,000 bytes (a short read: the end)
    calls.clear()
    path.write_bytes(data[:1000])
    assert fsops.read_all(path) == data[:1000]
    assert calls == [0]  # one read: short past the size


@pytest.mark.parametrize("window", [4096, 32])
@pytest.mark.parametrize("tag", [b"META", b"PAGES", b"GRPH", b"TLOG"])
def test_a_damaged_section_head_is_refused_at_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: bytes, window: int) -> None:
    """A damaged byte in a section head (found through the window of heads, or one head
    a read) is refused with SerializationError naming the file and the section; nothing
    on disk changes. PAGES: the pages' section, PDAT (the bytes) or, in a record whose
    pages are in the page store, PREF (their slots)."""
    monkeypatch.setattr(ckpt_mod, "_HEAD_WINDOW", window)
    root = copy_beside(_image(tmp_path), "bus")
    newest = _newest(root)
    raw = bytearray(newest.read_bytes())
    if tag == b"PAGES":
        version = struct.unpack_from("<H", raw, 8)[0]
        tag = b"PREF" if version == ckpt_mod.REFS_VERSION else b"PDAT"
    pos = 48
    while bytes(raw[pos:pos + 4]) != tag:
        pos += 32 + struct.unpack_from("<Q", raw, pos + 16)[0]
    raw[pos + 17] ^= 0xFF  # the stored length
    newest.write_bytes(bytes(raw))
    before = _files(root)
    with pytest.raises(mmsb.SerializationError) as info:
        mmsb.mmsb_start(path=str(root), config=_cfg())
    assert newest.name in str(info.value)
    assert tag.decode() in str(info.value)
    after = _files(root)
    after.pop("LOCK", None)
    before.pop("LOCK", None)
    assert after == before
