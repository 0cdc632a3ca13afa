"""Recovery decodes the deltas of log segments in bulk (mmsb._storage.walbulk): it must
give exactly what reading every frame into records gives — the same state, the same
log, and the same damage at the same offset for any frame it is handed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest

import mmsb
from mmsb._core.delta import Delta
from mmsb._core.log import TransactionLog
from mmsb._storage import bus as busmod
from mmsb._storage.bus import bus_files, bus_identity
from mmsb._storage.codec import encode_record
from mmsb._storage.wal import FRAME_HEAD, SEG_HEADER_SIZE, frame, group_body, scan_segment
from mmsb._storage.walbulk import CRC_TABLES, crc32c_np

_WAL_RE = busmod._WAL_RE


def _cfg() -> mmsb.MMSBConfig:
    return mmsb.MMSBConfig(enable_gpu=False, fsync="none", checkpoint_interval=0,
                           max_tlog_size=1 << 60)


def _stop_leaving_the_log(s: mmsb.MMSBState) -> None:
    """Stop without the final checkpoint: the records stay only in the segments."""
    assert s.bus is not None
    s.bus.flush()
    s.bus.records_since_ckpt = 0
    mmsb.mmsb_stop(s)


def _workload(root: Path) -> dict[str, Any]:
    """A bus whose last generation's segment holds every kind of delta encoding,
    batches, several sources and structural records between them."""
    s = mmsb.mmsb_start(path=root, config=_cfg())
    small = [p.id for p in mmsb.create_pages(s, 6, 1024)]
    big = mmsb.create_page(s, 70_000).id  # > 64 KiB: 32-bit positions and run starts
    rng = np.random.default_rng(3)
    for i in range(300):
        pid = small[i % len(small)]
        mmsb.write_page(s, pid, int(rng.integers(0, 1000)), rng.integers(1, 256, 8,
                                                                         dtype=np.uint8).tobytes(),
                        source="api" if i % 7 else "other")
    for _ in range(5):
        data = bytearray(mmsb.query_page(s, small[0]))
        for off in rng.choice(1024, 40, replace=False).tolist():  # scattered: positions
            data[off] = (data[off] + 1) % 256 or 1
        mmsb.update_page(s, small[0], bytes(data))
        mmsb.update_page(s, small[1], rng.integers(1, 256, 1024, dtype=np.uint8).tobytes())
        mmsb.write_page(s, big, int(rng.integers(65_600, 69_000)), b"\x01\x02\x03")
        data = bytearray(mmsb.query_page(s, big))
        for off in rng.choice(70_000, 30, replace=False).tolist():
            data[off] = (data[off] + 1) % 256 or 1
        mmsb.update_page(s, big, bytes(data))
    extra = mmsb.create_page(s, 256, metadata={"k": 1}).id
    mmsb.apply_batch(s, [(small[i % 6], 8 * i, bytes([i + 1]) * 4) for i in range(50)])
    mmsb.resize_page(s, small[5], 2048)
    mmsb.write_page(s, small[5], 2000, b"resized")
    mmsb.set_metadata(s, small[4], "name", "four")
    mmsb.delete_page(s, small[3])
    mmsb.apply_batch(s, [(extra, i, b"\x09") for i in range(0, 200, 3)], source="batch")
    mmsb.add_dependency(s, small[2], small[4])
    mask = np.zeros(256, bool)
    mask[10:200:2] = True
    d = mmsb.create_delta(s, extra, mask, np.full(256, 7, np.uint8))
    mmsb.route_delta(s, d)
    _stop_leaving_the_log(s)
    return {"small": small, "big": big, "extra": extra}


def _craft(root: Path) -> None:
    """Append hand-made frames the API does not write: masked, exact and full dense
    deltas, a merged delta (base epoch below epoch − 1), an empty sparse delta, a group
    of deltas, and a long source name."""
    s = mmsb.open_readonly(root, config=_cfg())
    pid = max(p for p in s.pages if s.pages[p].size == 1024)
    epoch = int(s.pages[pid].epoch)
    lsn = s.last_lsn + 1
    did = s.next_delta_id
    ts = s.log.last_timestamp + 1
    size = 1024
    rng = np.random.default_rng(9)
    mask = rng.random(size) < 0.3
    data = np.where(mask, rng.integers(1, 256, size), 0).astype(np.uint8)
    full = rng.integers(0, 256, size, dtype=np.uint8)
    recs = [
        Delta(did, pid, epoch, epoch + 1, "api", size, None, None, data, mask, lsn, ts),
        Delta(did + 1, pid, epoch + 1, epoch + 2, "api", size, None, None, full, mask, lsn + 1,
              ts, exact=True),
        Delta(did + 2, pid, epoch + 2, epoch + 5, "merged", size, np.arange(3, 9),
              np.arange(1, 7, dtype=np.uint8), None, None, lsn + 2, ts + 5),
        Delta(did + 3, pid, epoch + 5, epoch + 6, "x" * 300, size, np.empty(0, np.intp),
              np.empty(0, np.uint8), None, None, lsn + 3, ts + 5),
    ]
    recs.append(Delta(did + 4, pid, epoch + 6, epoch + 7, "api", size, None, None,
                      full[::-1].copy(), None, lsn + 4, ts + 6))
    grouped = [Delta(did + 5 + k, pid, epoch + 7 + k, epoch + 8 + k, "g", size,
                     np.array([k, k + 5, k + 6]), np.array([1, 2, 3], np.uint8), None, None,
                     lsn + 5 + k, ts + 6) for k in range(4)]
    seg = bus_files(root)["wal"][-1]
    with open(seg, "ab") as f:
        for r in recs:
            f.write(frame(encode_record(r)))
        f.write(frame(group_body([encode_record(r) for r in grouped])))


def _recover(root: Path, bulk: bool, monkeypatch: pytest.MonkeyPatch) -> mmsb.MMSBState:
    monkeypatch.setattr(busmod, "BULK_SCAN", bulk)
    try:
        return mmsb.open_readonly(root, config=_cfg())
    finally:
        monkeypatch.setattr(busmod, "BULK_SCAN", True)


def _assert_same_state(a: mmsb.MMSBState, b: mmsb.MMSBState) -> None:
    assert a.last_lsn == b.last_lsn
    assert a.next_delta_id == b.next_delta_id
    assert sorted(a.pages) == sorted(b.pages)
    for pid in a.pages:
        assert a.pages[pid].epoch == b.pages[pid].epoch, pid
        assert a.pages[pid].size == b.pages[pid].size, pid
        assert mmsb.query_page(a, pid) == mmsb.query_page(b, pid), pid
    assert sorted(a.graph.edges()) == sorted(b.graph.edges())
    ca, cb = a.log.columns(), b.log.columns()
    for name in ("lsn", "ids", "epoch", "ts", "page", "psize", "plen", "enc", "payload",
                 "base_rows", "base_epochs"):
        assert np.array_equal(getattr(ca, name), getattr(cb, name)), name
    assert [ca.sources[i] for i in ca.src.tolist()] == [cb.sources[i] for i in cb.src.tolist()]
    assert [encode_record(r) for r in ca.structs] == [encode_record(r) for r in cb.structs]
    assert [encode_record(r) for r in a.log.records] == [encode_record(r) for r in b.log.records]


def test_crc32c_kernel_matches_the_library() -> None:
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000):
        buf = rng.integers(0, 256, n, dtype=np.uint8)
        for start in (0, 1, 0xFFFFFFFF, 0x12345678):
            assert crc32c_np(CRC_TABLES, buf, start) == crc32c.crc32c(buf.tobytes(), start)


def test_bulk_recovery_equals_record_by_record(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "bus"
    _workload(root)
    _craft(root)
    seg = bus_files(root)["wal"][-1]
    assert seg.stat().st_size > 20_000
    ref = _recover(root, False, monkeypatch)
    new = _recover(root, True, monkeypatch)
    assert new.log.record_count > 400
    _assert_same_state(ref, new)
    # The writer's own recovery (which checkpoints what it recovered) agrees too.
    state = mmsb.mmsb_start(path=root, config=_cfg())
    try:
        _assert_same_state(ref, state)
        assert mmsb.read_page_at(state, ref.pages and min(ref.pages),
                                 lsn=ref.last_lsn // 2) == mmsb.read_page_at(
            ref, min(ref.pages), lsn=ref.last_lsn // 2)
    finally:
        mmsb.mmsb_stop(state)


def _scan(seg: Path, root: Path, first_lsn: int, columns: bool) -> Any:
    m = _WAL_RE.match(seg.name)
    assert m is not None
    return scan_segment(seg, bus_identity(root), int(m.group(1), 16), int(m.group(2), 16),
                        first_lsn, columns=columns)


def _records(scan: Any) -> list[tuple[bytes, int]]:
    """Each record's encoding and frame offset, from either kind of scan."""
    out: list[tuple[bytes, int]] = []
    for a, b in scan.items():
        if isinstance(b, np.ndarray):
            log = TransactionLog.from_columns(a)
            out.extend((encode_record(r), int(o)) for r, o in zip(log.records, b.tolist(),
                                                                   strict=True))
        else:
            out.append((encode_record(a), b))
    return out


def _same_scan(seg: Path, root: Path, first: int) -> None:
    old = _scan(seg, root, first, False)
    new = _scan(seg, root, first, True)
    assert (new.valid_end, new.torn, new.foreign) == (old.valid_end, old.torn, old.foreign)
    assert str(new.damage) == str(old.damage)
    assert (new.damage is None) or new.damage.offset == old.damage.offset
    assert new.count == old.count == len(old.records)
    assert _records(new) == _records(old)


def _frames(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], SEG_HEADER_SIZE
    while pos + FRAME_HEAD <= len(data):
        n = int.from_bytes(data[pos:pos + 8], "little")
        out.append((pos, n))
        pos += FRAME_HEAD + n
    return out


def test_mutated_bodies_with_valid_checksums_read_the_same(tmp_path: Path) -> None:
    """Every byte of a sample of frame bodies changed (checksum made right again): the
    bulk scan reports the same records, damage and offset as the frame reader."""
    root = tmp_path / "bus"
    _workload(root)
    _craft(root)
    seg = bus_files(root)["wal"][-1]
    original = seg.read_bytes()
    first = _first_lsn(root)
    frames = _frames(original)
    rng = np.random.default_rng(4)
    picks = sorted({0, 1, len(frames) // 2, len(frames) - 5, len(frames) - 3,
                    len(frames) - 2, len(frames) - 1,
                    *rng.choice(len(frames), 6, replace=False).tolist()})
    checked = 0
    for k in picks:
        pos, n = frames[k]
        body_at = pos + FRAME_HEAD
        for i in range(min(n, 90)):
            for value in ((original[body_at + i] ^ 0xFF), 0, 1):
                data = bytearray(original)
                data[body_at + i] = value
                body = bytes(data[body_at:body_at + n])
                crc = crc32c.crc32c(body, crc32c.crc32c(bytes(data[pos:pos + 8])))
                data[pos + 8:pos + 12] = crc.to_bytes(4, "little")
                seg.write_bytes(bytes(data))
                _same_scan(seg, root, first)
                checked += 1
    seg.write_bytes(original)
    assert checked > 1000


def _first_lsn(root: Path) -> int:
    """LSN of the first record of the newest generation's segments."""
    # The newest checkpoint's LSN is where the segments go on: read it through a
    # read-only open of a copy without segments.
    bare = root.parent / (root.name + "-bare")
    shutil.rmtree(bare, ignore_errors=True)
    shutil.copytree(root, bare)
    for p in bus_files(bare)["wal"]:
        os.unlink(p)
    return int(mmsb.open_readonly(bare, config=_cfg()).last_lsn) + 1


def test_flipped_bytes_and_cuts_read_the_same(tmp_path: Path) -> None:
    """A flipped byte anywhere in the frames (checksum left wrong) and a cut at any
    point: torn tail or damage, at the same offset, with the same records before it."""
    root = tmp_path / "bus"
    _workload(root)
    seg = bus_files(root)["wal"][-1]
    original = seg.read_bytes()
    first = _first_lsn(root)
    rng = np.random.default_rng(5)
    spots = sorted(set(rng.choice(np.arange(SEG_HEADER_SIZE, len(original)), 300,
                                  replace=False).tolist()))
    for at in spots:
        data = bytearray(original)
        data[at] ^= 0x40
        seg.write_bytes(bytes(data))
        _same_scan(seg, root, first)
    for cut in spots[::5]:
        seg.write_bytes(original[:cut])
        _same_scan(seg, root, first)
    seg.write_bytes(original)
    _same_scan(seg, root, first)


def test_bulk_recovery_of_100k_records_is_fast_and_exact(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 small writes only in the log: the bulk reader recovers the same state as
    the record reader, in well under the record reader's time."""
    import time

    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=_cfg())
    pages = [p.id for p in mmsb.create_pages(s, 100, 1024)]
    rng = np.random.default_rng(1)
    n = 100_000
    offsets = rng.integers(0, 1016, n).tolist()
    values = rng.integers(1, 256, (n, 8), dtype=np.uint8)
    writes = [(pages[i % 100], offsets[i], values[i].tobytes()) for i in range(n)]
    for start in range(0, n, 10_000):
        mmsb.apply_batch(s, writes[start:start + 10_000])
    _stop_leaving_the_log(s)
    _recover(root, True, monkeypatch)  # compiled kernels loaded
    times = {}
    states = {}
    for bulk in (False, True):
        t0 = time.perf_counter()
        states[bulk] = _recover(root, bulk, monkeypatch)
        times[bulk] = time.perf_counter() - t0
    _assert_same_state(states[False], states[True])
    assert states[True].last_lsn == n + 1
    assert times[True] < times[False] / 3, times


def _sparse_body(lsn: int, pid: int, base: int, epoch: int, size: int, starts: list[int],
                 lengths: list[int], vals: bytes, src: bytes = b"api", enc: int = 0,
                 did: int = 1, ts: int = 1, tail: bytes = b"") -> bytes:
    """A delta body laid out by hand (codec.py's layout), so that it can say what the
    encoder never writes."""
    head = (bytes([1]) + lsn.to_bytes(8, "little") + ts.to_bytes(8, "little", signed=True)
            + b"".join(v.to_bytes(8, "little") for v in (did, pid, base, epoch, size))
            + len(src).to_bytes(2, "little") + src + bytes([enc]))
    if enc != 0:
        return head + vals + tail
    return (head + len(starts).to_bytes(4, "little")
            + b"".join(v.to_bytes(4, "little") for v in starts)
            + b"".join(v.to_bytes(4, "little") for v in lengths) + vals + tail)


def _hostile_cases(lsn: int, pid: int, epoch: int) -> dict[str, bytes]:
    e = epoch
    ok = _sparse_body(lsn, pid, e, e + 1, 1024, [3], [2], b"\x01\x02")
    bits = np.packbits(np.arange(1024) % 2 == 0).tobytes()
    return {
        "valid": ok,
        "adjacent runs (valid)": _sparse_body(lsn, pid, e, e + 1, 1024, [3, 5], [2, 2],
                                              b"\x01\x02\x03\x04"),
        "zero-length run": _sparse_body(lsn, pid, e, e + 1, 1024, [3], [0], b""),
        "overlapping runs": _sparse_body(lsn, pid, e, e + 1, 1024, [3, 5], [4, 2], b"\x01" * 6),
        "unsorted runs": _sparse_body(lsn, pid, e, e + 1, 1024, [10, 3], [2, 2], b"\x01" * 4),
        "run past the page": _sparse_body(lsn, pid, e, e + 1, 1024, [1020], [8], b"\x01" * 8),
        "trailing byte": _sparse_body(lsn, pid, e, e + 1, 1024, [3], [2], b"\x01\x02",
                                      tail=b"\x00"),
        "missing value": _sparse_body(lsn, pid, e, e + 1, 1024, [3], [2], b"\x01"),
        "epoch not after base": _sparse_body(lsn, pid, e, e, 1024, [3], [2], b"\x01\x02"),
        "epoch out of range": _sparse_body(lsn, pid, e, 1 << 62, 1024, [3], [2], b"\x01\x02"),
        "id out of range": _sparse_body(lsn, pid, e, e + 1, 1024, [3], [2], b"\x01\x02",
                                        did=1 << 62),
        "LSN out of step": _sparse_body(lsn + 1, pid, e, e + 1, 1024, [3], [2], b"\x01\x02"),
        "source not UTF-8": _sparse_body(lsn, pid, e, e + 1, 1024, [3], [2], b"\x01\x02",
                                         src=b"\xff\xfe"),
        "unknown encoding": _sparse_body(lsn, pid, e, e + 1, 1024, [], [], b"\x00" * 1024,
                                         enc=9),
        "page size zero": _sparse_body(lsn, pid, e, e + 1, 0, [], [], b""),
        "page size too large": _sparse_body(lsn, pid, e, e + 1, 1 << 32, [3], [2], b"\x01\x02"),
        "dense of the wrong length": _sparse_body(lsn, pid, e, e + 1, 1024, [], [],
                                                  b"\x01" * 1023, enc=1),
        "masked with bytes outside the mask": _sparse_body(
            lsn, pid, e, e + 1, 1024, [], [], bits + b"\x05" * 1024, enc=2),
        "masked, nonzero pad bits (valid)": _sparse_body(
            lsn, pid, e, e + 1, 1020, [], [], np.packbits(np.ones(1024, bool)).tobytes()[:128]
            + b"\x05" * 1020, enc=2),
        "page of another size": _sparse_body(lsn, pid, e, e + 1, 2048, [3], [2], b"\x01\x02"),
        "unknown page": _sparse_body(lsn, 999, e, e + 1, 1024, [3], [2], b"\x01\x02"),
        "stale base epoch": _sparse_body(lsn, pid, e + 3, e + 4, 1024, [3], [2], b"\x01\x02"),
        "huge page id": _sparse_body(lsn, (1 << 63) + 5, e, e + 1, 1024, [3], [2], b"\x01\x02"),
        "group with a bad member": group_body([ok, _sparse_body(lsn + 1, pid, e + 1, e + 2, 1024,
                                                                [3], [0], b"")]),
        "group of two (valid)": group_body([ok, _sparse_body(lsn + 1, pid, e + 1, e + 2, 1024,
                                                             [9], [1], b"\x07")]),
        "group with trailing bytes": group_body([ok]) + b"\x00",
        "group of zero": bytes([11]) + (0).to_bytes(4, "little"),
    }


@pytest.mark.parametrize("case", list(_hostile_cases(1, 1, 0)))
def test_hostile_deltas_read_as_the_record_reader_reads_them(
        tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame with a right checksum around a body the record decoder refuses (or
    accepts only in its checked path) reads the same through the bulk scan: the same
    records before it, the same damage and offset, and recovery refuses or applies
    the same."""
    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=root, config=_cfg())
    pid = mmsb.create_page(s, 1024).id
    for i in range(20):
        mmsb.write_page(s, pid, i, bytes([i + 1]))
    lsn, epoch = s.last_lsn + 1, int(s.pages[pid].epoch)
    _stop_leaving_the_log(s)
    first = _first_lsn(root)
    seg = bus_files(root)["wal"][-1]
    body = _hostile_cases(lsn, pid, epoch)[case]
    after = _sparse_body(lsn + (2 if "group of two" in case else 1), pid, epoch + 1, epoch + 2,
                         1024, [40], [1], b"\x09")
    with open(seg, "ab") as f:
        f.write(frame(body))
        f.write(frame(after))
    _same_scan(seg, root, first)
    outcomes = []
    for bulk in (False, True):
        try:
            st = _recover(root, bulk, monkeypatch)
        except mmsb.MMSBError as exc:
            outcomes.append(("refused", str(exc)))
        else:
            outcomes.append(("recovered", st.last_lsn, mmsb.query_page(st, pid),
                             int(st.pages[pid].epoch)))
    assert outcomes[0] == outcomes[1]
