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


def _records_of_every_shape() -> list:
    """Stamped records: sparse deltas of one run, of several runs (on pages past 64 KiB
    too), of one byte and of a long source name, dense deltas (full, masked) and
    structural records."""
    import numpy as np

    from mmsb._core.delta import diff_write, make_delta
    from mmsb._core.records import MetadataSet, PageCreate, PageResize

    rng = np.random.default_rng(7)
    out: list = []
    page = rng.integers(0, 256, 70_000).astype(np.uint8)
    new = page.copy()
    new[3] ^= 1
    new[69_000:69_200] ^= 0xFF
    out.append(diff_write(1, 2, 5, page, 0, new, "api"))  # several runs, a big page
    small = np.zeros(256, np.uint8)
    out.append(make_delta(2, 3, 1, 256, np.arange(10, 20), np.arange(1, 11, dtype=np.uint8),
                          "propagation"))  # one run
    out.append(make_delta(3, 3, 2, 256, np.array([7]), np.array([9], np.uint8), "s" * 300))
    out.append(diff_write(4, 4, 0, small, 0, np.full(256, 3, np.uint8), "api"))  # dense
    masked = small.copy()
    masked[::2] = 1
    out.append(diff_write(5, 4, 1, small, 0, masked, "api"))  # dense, masked
    out.append(PageCreate(first_id=9, count=2, size=128, location=0, metadata={"k": "v"}))
    out.append(MetadataSet(page_id=9, metadata={"a": [1, 2]}, source="api"))
    out.append(PageResize(page_id=9, new_size=4096))
    stamped = []
    for i, r in enumerate(out):
        if hasattr(r, "stamped"):
            stamped.append(r.stamped(100 + i, 1_000 + i))
        else:
            r.lsn, r.timestamp = 100 + i, 1_000 + i
            stamped.append(r)
    return stamped


def test_a_batch_frame_holds_the_bytes_of_its_records_grouped():
    from mmsb._storage.codec import encode_record
    from mmsb._storage.wal import decode_frame_body, frame, group_body, records_frame

    records = _records_of_every_shape()
    assert [r.is_sparse for r in records[:5]] == [True, True, True, False, False]
    for k in range(len(records)):
        for group in (records[k:], records[:k + 1], [records[k]], records[k:k + 2]):
            want = (frame(encode_record(group[0])) if len(group) == 1
                    else frame(group_body([encode_record(r) for r in group])))
            got = records_frame(group)
            assert got == want
            back = decode_frame_body(memoryview(got)[12:])
            assert back == group


def test_a_batch_frame_refuses_a_source_name_too_long_to_encode():
    from mmsb._storage.wal import records_frame
    from mmsb.errors import SerializationError

    ok, sparse = _records_of_every_shape()[1:3]
    long = type(sparse)(sparse.id, sparse.page_id, sparse.base_epoch, sparse.epoch,
                        "x" * 70_000, sparse.page_size, sparse._idx, sparse._vals, None, None,
                        lsn=sparse.lsn, timestamp=sparse.timestamp)
    with pytest.raises(SerializationError, match="65535"):
        records_frame([ok, long])
