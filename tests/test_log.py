"""The transaction log: ordering, structural records, queries, statistics, compression,
checkpoints and their damage handling."""

from __future__ import annotations

import os
import re
import struct

import numpy as np
import pytest
from crc32c import crc32c

import mmsb
from conftest import (
    Workers,
    assert_unchanged,
    content_view,
    edges,
    log_view,
    new_state,
    page_ids,
    pages_view,
    snapshot,
)
from mmsb._storage.checkpoint import READ_VERSIONS


def _busy_state() -> mmsb.MMSBState:
    """A state with several pages, sources, metadata, edges and a deleted/resized page."""
    s = new_state()
    rng = np.random.default_rng(7)
    a = mmsb.create_page(s, 32, metadata={"name": "a"})
    b = mmsb.create_page(s, 16)
    c = mmsb.create_page(s, 8)
    for i in range(4):
        mmsb.update_page(s, a.id, rng.integers(0, 256, 32, dtype=np.uint8).tobytes(), source="alpha")
        mmsb.write_page(s, b.id, i, bytes([i + 1]), source="beta")
    mmsb.write_page(s, c.id, 0, b"cc", source="alpha")
    mmsb.add_dependency(s, a.id, b.id, mmsb.CONTROL_DEPENDENCY)
    mmsb.set_metadata(s, c.id, "k", [1, 2])
    mmsb.resize_page(s, b.id, 24)
    mmsb.write_page(s, b.id, 20, b"tail")
    d = mmsb.create_page(s, 4)
    mmsb.write_page(s, d.id, 0, b"gone")
    mmsb.delete_page(s, d.id)
    return s


# --------------------------------------------------------------------------- ordering


def test_lsn_strictly_increasing_and_timestamps_monotone() -> None:
    s = _busy_state()
    lsns = [d.lsn for d in s.tlog]
    ts = [d.timestamp for d in s.tlog]
    assert all(a < b for a, b in zip(lsns, lsns[1:], strict=False))
    assert all(a <= b for a, b in zip(ts, ts[1:], strict=False))
    assert all(isinstance(t, int) and t > 0 for t in ts)
    assert s.last_lsn >= lsns[-1]


def test_every_call_advances_last_lsn(state) -> None:
    assert state.last_lsn == 0
    seen = [state.last_lsn]

    def step() -> None:
        assert state.last_lsn > seen[-1]
        seen.append(state.last_lsn)

    p = mmsb.create_page(state, 8)
    step()
    q = mmsb.create_page(state, 8)
    step()
    mmsb.write_page(state, p.id, 0, b"x")
    step()
    assert state.tlog[-1].lsn == state.last_lsn
    mmsb.resize_page(state, p.id, 16)
    step()
    mmsb.set_metadata(state, p.id, "k", 1)
    step()
    mmsb.add_dependency(state, p.id, q.id, mmsb.CONTROL_DEPENDENCY)
    step()
    mmsb.remove_dependency(state.graph, p.id, q.id)
    step()
    mmsb.delete_page(state, q.id)
    step()


def test_structural_records_rebuild_state_by_replay_alone() -> None:
    s = _busy_state()
    r = mmsb.replay_to_lsn(s, s.last_lsn)
    assert pages_view(r) == pages_view(s)
    assert edges(r) == edges(s)
    assert mmsb.verify_state_consistency(s)


# --------------------------------------------------------------------------- queries


def test_query_log_no_filter_is_whole_log() -> None:
    s = _busy_state()
    assert [d.lsn for d in mmsb.query_log(s)] == [d.lsn for d in s.tlog]


def test_query_log_filters_combine() -> None:
    s = _busy_state()
    all_d = list(s.tlog)
    by_page = mmsb.query_log(s, page_id=2)
    assert [d.lsn for d in by_page] == [d.lsn for d in all_d if d.page_id == 2]
    alpha = mmsb.query_log(s, source="alpha")
    assert [d.lsn for d in alpha] == [d.lsn for d in all_d if d.source == "alpha"]
    assert alpha and all(d.source == "alpha" for d in alpha)
    both = mmsb.query_log(s, page_id=1, source="alpha")
    assert [d.lsn for d in both] == [d.lsn for d in all_d if d.page_id == 1 and d.source == "alpha"]
    assert mmsb.query_log(s, page_id=1, source="beta") == []

    t0, t1 = all_d[2].timestamp, all_d[-3].timestamp
    got = {d.lsn for d in mmsb.query_log(s, start_time=t0, end_time=t1)}
    strict = {d.lsn for d in all_d if t0 < d.timestamp < t1}
    loose = {d.lsn for d in all_d if t0 <= d.timestamp <= t1}
    assert strict <= got <= loose
    got = {d.lsn for d in mmsb.query_log(s, start_time=t0, end_time=t1, page_id=1)}
    strict_p = {d.lsn for d in all_d if t0 < d.timestamp < t1 and d.page_id == 1}
    loose_p = {d.lsn for d in all_d if t0 <= d.timestamp <= t1 and d.page_id == 1}
    assert strict_p <= got <= loose_p
    later = mmsb.query_log(s, start_time=all_d[-1].timestamp + 1)
    assert later == []
    earlier = mmsb.query_log(s, end_time=all_d[0].timestamp - 1)
    assert earlier == []


def test_get_deltas_for_page() -> None:
    s = _busy_state()
    ds = mmsb.get_deltas_for_page(s, 1)
    assert [d.epoch for d in ds] == [1, 2, 3, 4]
    assert all(d.page_id == 1 for d in ds)
    assert [d.lsn for d in ds] == sorted(d.lsn for d in ds)


@pytest.mark.parametrize("start,stop", [(0, 3), (2, 5), (0, 0), (5, 5), (3, 10**6), (0, 10**6)])
def test_get_deltas_in_range_is_a_slice(start, stop) -> None:
    s = _busy_state()
    expect = [d.lsn for d in list(s.tlog)[start:stop]]
    assert [d.lsn for d in mmsb.get_deltas_in_range(s, start, stop)] == expect


def test_compute_log_statistics() -> None:
    s = _busy_state()
    stats = mmsb.compute_log_statistics(s)
    assert stats["total_deltas"] == len(s.tlog)
    assert stats["bytes_changed"] == sum(mmsb.delta_byte_count(d) for d in s.tlog)
    expect: dict[str, int] = {}
    for d in s.tlog:
        expect[d.source] = expect.get(d.source, 0) + 1
    assert dict(stats["sources"]) == expect


# --------------------------------------------------------------------------- compression


def test_compress_log() -> None:
    s = new_state()
    ids = [mmsb.create_page(s, 16).id for _ in range(3)]
    rng = np.random.default_rng(1)
    for _ in range(5):
        for pid in ids[:2]:
            mmsb.write_page(s, pid, int(rng.integers(0, 12)), rng.integers(1, 256, 4, dtype=np.uint8).tobytes())
    before_pages = pages_view(s)
    before_lsn = s.last_lsn
    mmsb.compress_log(s)
    assert pages_view(s) == before_pages
    assert len(s.tlog) == 2
    assert sorted(d.page_id for d in s.tlog) == ids[:2]
    for d in s.tlog:
        assert d.source == "compressed"
        assert d.base_epoch == 0
        assert d.epoch == s.pages[d.page_id].epoch == 5
    assert mmsb.verify_state_consistency(s)
    assert s.last_lsn >= before_lsn
    r = mmsb.replay_to_lsn(s, s.last_lsn)
    assert content_view(r) == content_view(s)
    # writing continues normally after compression
    mmsb.write_page(s, ids[2], 0, b"new")
    assert mmsb.verify_state_consistency(s)


def test_replay_into_compressed_history_is_refused() -> None:
    # docs/API.md (compress_log): replay to an LSN before the marker is no longer possible
    s = new_state()
    p = mmsb.create_page(s, 4)
    mmsb.update_page(s, p.id, b"aaaa")
    mid_lsn = s.last_lsn
    mmsb.update_page(s, p.id, b"bbbb")
    mmsb.update_page(s, p.id, b"cccc")
    mmsb.compress_log(s)
    with pytest.raises(mmsb.HistoryUnavailableError):
        mmsb.replay_to_lsn(s, mid_lsn)
    # the compressed state itself stays replayable, exactly
    r = mmsb.replay_to_lsn(s, s.last_lsn)
    assert mmsb.query_page(r, p.id) == b"cccc"
    assert r.pages[p.id].epoch == 3


def test_auto_compress_past_max_tlog_size() -> None:
    s = new_state(max_tlog_size=10)
    a = mmsb.create_page(s, 8)
    b = mmsb.create_page(s, 8)
    for i in range(40):
        pid = a.id if i % 3 else b.id
        mmsb.write_page(s, pid, i % 8, bytes([i + 1]))
        assert len(s.tlog) <= 10, f"log grew to {len(s.tlog)} past max_tlog_size=10"
    assert a.epoch + b.epoch == 40
    # Compaction folded the oldest records into a replay base: history starts there.
    assert s.replay_base is not None and s.log.horizon_lsn > 0
    with pytest.raises(mmsb.HistoryUnavailableError):
        mmsb.replay_to_lsn(s, s.log.horizon_lsn - 1)
    assert mmsb.verify_state_consistency(s)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path) -> None:
    s = _busy_state()
    last = s.last_lsn
    path = tmp_path / "state.ckpt"
    mmsb.checkpoint_log(s, str(path))
    assert path.exists() and path.stat().st_size > 0
    t = new_state()
    mmsb.load_checkpoint(t, str(path))
    assert pages_view(t) == pages_view(s)
    assert edges(t) == edges(s)
    assert log_view(t) == log_view(s)
    assert t.last_lsn >= last
    assert mmsb.verify_state_consistency(t)
    # continuing on the restored state: ids not reused, LSNs keep increasing
    restored_last = t.last_lsn
    n = mmsb.create_page(t, 4)
    assert n.id == 5  # pages 1..4 existed (4 was deleted)
    assert t.last_lsn > restored_last
    mmsb.write_page(t, 1, 0, b"after")
    assert mmsb.verify_state_consistency(t)
    # the source is not affected by the restored copy
    assert 5 not in s.pages


def test_checkpoint_accepts_pathlike(tmp_path) -> None:
    s = _busy_state()
    path = tmp_path / "p.ckpt"
    mmsb.checkpoint_log(s, path)
    t = new_state()
    mmsb.load_checkpoint(t, path)
    assert pages_view(t) == pages_view(s)


def test_checkpoint_does_not_change_source(tmp_path) -> None:
    s = _busy_state()
    before = snapshot(s)
    mmsb.checkpoint_log(s, str(tmp_path / "c.ckpt"))
    assert snapshot(s)[:4] == before[:4]


def test_empty_state_checkpoint(tmp_path) -> None:
    s = new_state()
    path = tmp_path / "empty.ckpt"
    mmsb.checkpoint_log(s, str(path))
    t = new_state()
    mmsb.load_checkpoint(t, str(path))
    assert page_ids(t) == []
    assert len(t.tlog) == 0


def _target() -> tuple[mmsb.MMSBState, tuple]:
    t = new_state()
    p = mmsb.create_page(t, 8, metadata={"target": True})
    mmsb.update_page(t, p.id, b"TARGET!!")
    return t, snapshot(t)


@pytest.fixture(scope="module")
def ckpt_blob(tmp_path_factory) -> bytes:
    s = _busy_state()
    path = tmp_path_factory.mktemp("ck") / "good.ckpt"
    mmsb.checkpoint_log(s, str(path))
    return path.read_bytes()


def _load_damaged(tmp_path, blob: bytes) -> None:
    t, before = _target()
    path = tmp_path / "bad.ckpt"
    path.write_bytes(blob)
    with pytest.raises(mmsb.SerializationError):
        mmsb.load_checkpoint(t, str(path))
    assert_unchanged(t, before)


def test_damaged_bad_magic(tmp_path, ckpt_blob) -> None:
    _load_damaged(tmp_path, b"XXXX" + ckpt_blob[4:])
    _load_damaged(tmp_path, bytes([ckpt_blob[0] ^ 0x20]) + ckpt_blob[1:])


def test_damaged_header_bytes(tmp_path, ckpt_blob) -> None:
    # magic, version and header fields all live near the start: any change is refused
    for i in range(min(48, len(ckpt_blob))):
        blob = bytearray(ckpt_blob)
        blob[i] ^= 0x01
        _load_damaged(tmp_path, bytes(blob))


def test_damaged_truncation(tmp_path, ckpt_blob) -> None:
    n = len(ckpt_blob)
    cuts = set(range(0, min(n, 64))) | set(range(0, n, max(1, n // 150))) | {n - 1, n - 2, n // 2}
    for cut in sorted(c for c in cuts if 0 <= c < n):
        _load_damaged(tmp_path, ckpt_blob[:cut])


def test_damaged_flipped_bytes_anywhere(tmp_path, ckpt_blob) -> None:
    rng = np.random.default_rng(2024)
    n = len(ckpt_blob)
    offsets = set(rng.integers(0, n, size=120).tolist()) | {n - 1, n - 4, n // 2}
    for off in sorted(offsets):
        blob = bytearray(ckpt_blob)
        blob[off] ^= int(rng.integers(1, 256))
        _load_damaged(tmp_path, bytes(blob))


# The checkpoint header (docs/SerializationSpec.md): "MMSBCKPT" | version u16 | ... in
# 40 bytes, then the CRC32C of those 40 bytes.
def _version_of(blob: bytes) -> int:
    return int(struct.unpack_from("<H", blob, 8)[0])


def _with_version(blob: bytes, version: int) -> bytes:
    """The checkpoint with another format version and a header CRC made valid again, so
    that the version check, not the checksum, is what a reader meets."""
    head = bytearray(blob[:40])
    struct.pack_into("<H", head, 8, version)
    return bytes(head) + struct.pack("<I", crc32c(bytes(head))) + blob[44:]


def test_version_rewrite_is_sound(ckpt_blob) -> None:
    # resealing the file's own version gives back the very same bytes
    assert _with_version(ckpt_blob, _version_of(ckpt_blob)) == ckpt_blob


@pytest.mark.parametrize("past_newest", [None, 1, 98, 0xFFFF])
def test_damaged_version(tmp_path, ckpt_blob, past_newest: int | None) -> None:
    # a file of a version this build does not know (0, or from a "future" writer: past
    # the newest it reads) is refused, and the message names both the file's version
    # and the ones this build reads (version 1, older, is still read:
    # tests/test_checkpoint_v2.py)
    ours = _version_of(ckpt_blob)
    newest = max(READ_VERSIONS)
    version = 0 if past_newest is None else min(newest + past_newest, 0xFFFF)
    blob = _with_version(ckpt_blob, version)
    assert blob != ckpt_blob
    t, before = _target()
    path = tmp_path / "other-version.ckpt"
    path.write_bytes(blob)
    with pytest.raises(mmsb.SerializationError, match="version") as info:
        mmsb.load_checkpoint(t, str(path))
    message = str(info.value)
    assert re.search(rf"\b{version}\b", message), message
    assert re.search(rf"\b{ours}\b", message), message
    assert "checksum" not in message.lower() and "crc" not in message.lower(), message
    assert_unchanged(t, before)


def test_not_a_checkpoint_file(tmp_path) -> None:
    _load_damaged(tmp_path, b"")
    _load_damaged(tmp_path, os.urandom(4096))
    _load_damaged(tmp_path, b"hello world\n" * 100)


def test_unencodable_metadata_never_reaches_checkpoint(tmp_path) -> None:
    s = _busy_state()
    before = snapshot(s)
    with pytest.raises(mmsb.MMSBError):
        mmsb.set_metadata(s, 1, "obj", object())
    assert_unchanged(s, before)
    path = tmp_path / "m.ckpt"
    mmsb.checkpoint_log(s, str(path))
    t = new_state()
    mmsb.load_checkpoint(t, str(path))
    assert "obj" not in t.pages[1].metadata


def test_compress_across_structural_changes(tmp_path) -> None:
    s = new_state()
    a = mmsb.create_page(s, 8)
    b = mmsb.create_page(s, 8)
    mmsb.update_page(s, a.id, b"abcdefgh")
    mmsb.resize_page(s, a.id, 12)
    mmsb.write_page(s, a.id, 9, b"xyz")
    mmsb.write_page(s, b.id, 0, b"bb")
    mmsb.resize_page(s, b.id, 4)
    mmsb.write_page(s, b.id, 3, b"!")
    c = mmsb.clone_page(s, a.id)
    mmsb.write_page(s, c.id, 0, b"C")
    d = mmsb.create_page(s, 4)
    mmsb.write_page(s, d.id, 0, b"dd")
    mmsb.delete_page(s, d.id)
    before = pages_view(s)
    mmsb.compress_log(s)
    assert pages_view(s) == before
    assert mmsb.verify_state_consistency(s)
    assert all(dl.source == "compressed" for dl in s.tlog)
    assert len({dl.page_id for dl in s.tlog}) == len(s.tlog)
    r = mmsb.replay_to_lsn(s, s.last_lsn)
    assert pages_view(r) == before
    path = tmp_path / "after-compress.ckpt"
    mmsb.checkpoint_log(s, str(path))
    t = new_state()
    mmsb.load_checkpoint(t, str(path))
    assert pages_view(t) == before
    assert mmsb.verify_state_consistency(t)
    mmsb.write_page(t, a.id, 0, b"Z")
    assert mmsb.verify_state_consistency(t)


def test_auto_compress_with_propagation() -> None:
    s = new_state(max_tlog_size=8)
    a = mmsb.create_page(s, 4)
    b = mmsb.create_page(s, 4)
    mmsb.add_dependency(s, a.id, b.id)
    mmsb.register_passthrough_recompute(s, b.id, a.id)
    for i in range(30):
        mmsb.write_page(s, a.id, i % 4, bytes([i + 1]))
        assert len(s.tlog) <= 8
        assert mmsb.query_page(s, b.id) == mmsb.query_page(s, a.id)
    assert mmsb.verify_state_consistency(s)
    r = mmsb.replay_to_lsn(s, s.last_lsn)
    assert content_view(r) == content_view(s)


def test_checkpoint_while_writing_from_threads(tmp_path) -> None:
    import threading

    s = new_state()
    ids = [p.id for p in mmsb.create_pages(s, 6, 32)]
    stop = threading.Event()

    def writer(k: int) -> None:
        rng = np.random.default_rng(k)
        while not stop.is_set():
            pid = ids[int(rng.integers(0, len(ids)))]
            mmsb.write_page(s, pid, int(rng.integers(0, 28)), rng.integers(0, 256, 4, dtype=np.uint8).tobytes())

    workers = Workers(writer, [(k,) for k in range(4)])
    try:
        for i in range(8):
            path = tmp_path / f"live{i}.ckpt"
            mmsb.checkpoint_log(s, str(path))
            t2 = new_state()
            mmsb.load_checkpoint(t2, str(path))
            assert page_ids(t2) == ids
            assert mmsb.verify_state_consistency(t2), "checkpoint taken mid-write is torn"
    finally:
        stop.set()
        workers.join(timeout=30)
    assert mmsb.verify_state_consistency(s)
