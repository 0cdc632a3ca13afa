"""A batch reaches the write-ahead log as one frame: whole after a crash, or absent."""

import os
import shutil
from pathlib import Path
from unittest import mock

import pytest

import mmsb
from mmsb._storage.bus import bus_files


def _copy_while_open(state, src: Path, dst: Path) -> Path:
    state.bus.flush()
    shutil.copytree(src, dst)
    return dst


def _segment(root: Path) -> Path:
    return bus_files(root)["wal"][-1]


def test_a_torn_batch_is_absent_whole(tmp_path):
    cfg = mmsb.MMSBConfig(enable_gpu=False, fsync="none", checkpoint_interval=0)
    s = mmsb.mmsb_start(path=tmp_path / "bus", config=cfg)
    p = mmsb.create_page(s, 64).id
    mmsb.write_page(s, p, 0, b"before")
    size_before = s.bus.writer.size  # where the frames end
    mmsb.apply_batch(s, [(p, 10 + i, bytes([i + 1])) for i in range(20)])
    size_after = s.bus.writer.size
    image = _copy_while_open(s, tmp_path / "bus", tmp_path / "img")
    mmsb.mmsb_stop(s)
    img_seg = _segment(image)
    for cut in (size_before + 1, (size_before + size_after) // 2, size_after - 1):
        case = tmp_path / f"cut{cut}"
        shutil.copytree(image, case)
        with open(_segment(case), "r+b") as f:
            f.truncate(cut)
        r = mmsb.mmsb_start(path=case, config=cfg)
        try:
            assert mmsb.query_page(r, p)[:6] == b"before"
            assert mmsb.query_page(r, p)[10:30] == bytes(20), "part of a batch was replayed"
            assert r.pages[p].epoch == 1
        finally:
            mmsb.mmsb_stop(r)
    assert img_seg.exists()


def test_a_write_failing_in_the_middle_of_a_batch_leaves_nothing_after_reopen(tmp_path):
    cfg = mmsb.MMSBConfig(enable_gpu=False, fsync="always")
    s = mmsb.mmsb_start(path=tmp_path, config=cfg)
    p = mmsb.create_page(s, 64).id
    real_pwrite = os.pwrite

    def short_pwrite(fd, data, pos):
        return real_pwrite(fd, bytes(data)[:150] if len(data) > 150 else data, pos)

    def failing_pwrite(fd, data, pos):
        n = short_pwrite(fd, data, pos)
        if n < len(data):
            raise OSError(28, "No space left on device")
        return n

    with mock.patch("mmsb._storage.fsops.os.pwrite", side_effect=failing_pwrite):
        with pytest.raises(mmsb.DurabilityError):
            mmsb.apply_batch(s, [(p, i, bytes([i + 1])) for i in range(10)])
    assert mmsb.query_page(s, p) == bytes(64)
    s.bus._stop.set()
    os.close(s.bus.lock_fd)
    r = mmsb.mmsb_start(path=tmp_path, config=cfg)
    try:
        assert mmsb.query_page(r, p) == bytes(64)
        assert r.pages[p].epoch == 0
    finally:
        mmsb.mmsb_stop(r)


def test_damage_inside_a_group_with_records_after_it_is_an_error(tmp_path):
    cfg = mmsb.MMSBConfig(enable_gpu=False, fsync="none", checkpoint_interval=0)
    s = mmsb.mmsb_start(path=tmp_path / "bus", config=cfg)
    p = mmsb.create_page(s, 64).id
    start = s.bus.writer.size
    mmsb.apply_batch(s, [(p, i, bytes([i + 1])) for i in range(20)])
    for i in range(5):
        mmsb.write_page(s, p, 40 + i, b"z")
    image = _copy_while_open(s, tmp_path / "bus", tmp_path / "img")
    mmsb.mmsb_stop(s)
    with open(_segment(image), "r+b") as f:
        f.seek(start + 40)  # inside the group frame's body
        byte = f.read(1)
        f.seek(start + 40)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(mmsb.SerializationError):
        mmsb.mmsb_start(path=image, config=cfg)
