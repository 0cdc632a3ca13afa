"""Checkpoint format version 2: the log section as columns. Round trips give the same
log as before (records, masks, sources, merged deltas); version-1 files are still read;
every field the columns' checks guard is refused with a typed error that changes
nothing; bus recovery joins the chain's sections as columns."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings

import mmsb
from conftest import join_checkpoint, split_checkpoint
from mmsb._core.engine import MMSBState
from mmsb._core.log import ColumnRecords, LogColumns, TransactionLog, check_columns, join_records
from mmsb._storage import checkpoint as ckpt_mod
from mmsb._storage.codec import encode_record
from test_timetravel import CFG, _run, _same_state, ops


def _busy() -> MMSBState:
    s = MMSBState(CFG)
    a = mmsb.create_page(s, 64, metadata={"k": 1})
    b = mmsb.create_page(s, 300)
    big = mmsb.create_page(s, 70_000)  # u32 positions
    mmsb.write_page(s, a.id, 3, b"abc")
    mmsb.write_page(s, a.id, 10, b"x", source="elsewhere")
    mmsb.update_page(s, b.id, bytes(range(256)) + bytes(44))
    d = mmsb.create_delta(s, a.id, np.arange(64) % 7 == 0, bytes(range(64)))
    mmsb.route_delta(s, d)
    mmsb.write_page(s, big.id, 0, b"\x01\x00\x01")  # positions, not one run
    mmsb.write_page(s, big.id, 69_990, b"\x07\x00\x00\x07")
    mmsb.write_page(s, big.id, 100, b"abc")  # a run with a u32 start
    mmsb.resize_page(s, b.id, 100)
    mmsb.clone_page(s, a.id)
    mmsb.add_dependency(s, a.id, b.id)
    mmsb.write_page(s, b.id, 0, bytes(100))
    return s


def _log_of(s: MMSBState) -> list[Any]:
    return list(s.log.records)


def test_round_trip_keeps_every_record_and_mask(tmp_path: Path) -> None:
    s = _busy()
    mmsb.compress_log(s)  # merged "compressed" deltas: base epochs kept beside the rows
    mmsb.write_page(s, 1, 0, b"after")
    path = tmp_path / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    assert ckpt_mod.read_checkpoint(path.read_bytes()).records.__class__ is ColumnRecords
    t = MMSBState(CFG)
    mmsb.load_checkpoint(t, path)
    _same_state(t, s)
    assert _log_of(t) == _log_of(s)
    assert [d.source for d in t.tlog] == [d.source for d in s.tlog]
    assert mmsb.verify_state_consistency(t)
    mmsb.write_page(t, 1, 0, b"more")
    assert mmsb.verify_state_consistency(t)


@settings(max_examples=40, deadline=None)
@given(ops)
def test_random_histories_round_trip(tmp_path_factory: Any, steps: list[Any]) -> None:
    s = MMSBState(CFG)
    ids = [p.id for p in mmsb.create_pages(s, 2, 32)]
    _run(s, steps, ids)
    path = tmp_path_factory.mktemp("v2") / "s.ckpt"
    mmsb.checkpoint_log(s, path)
    t = MMSBState(CFG)
    mmsb.load_checkpoint(t, path)
    _same_state(t, s)
    if not t.orphan_from:
        assert mmsb.verify_state_consistency(t)
    # The columns a snapshot carries restore to the same log too.
    with s.lock:
        snap = s.snapshot()
    u = MMSBState(CFG)
    with u.lock:
        u.restore(snap)
        u.restore(snap)  # a snapshot can be restored again: its columns are only read
    _same_state(u, s)


def _v1_blob(s: MMSBState) -> bytes:
    """The state's checkpoint in format version 1: its log section as records one by
    one (``len u32 | body``)."""
    with s.lock:
        raw = ckpt_mod.checkpoint_bytes(s)
        records = list(s.log.records)
    head, secs = split_checkpoint(raw)
    tlog = b"".join(struct.pack("<I", len(b)) + b for b in (encode_record(r) for r in records))
    secs = [(t, 0, len(tlog), tlog) if t == b"TLOG" else x for x in secs for t in [x[0]]]
    return join_checkpoint((head[0], 1, *head[2:]), secs)


def test_version_1_files_are_still_read(tmp_path: Path) -> None:
    s = _busy()
    path = tmp_path / "v1.ckpt"
    path.write_bytes(_v1_blob(s))
    ck = ckpt_mod.read_checkpoint(path.read_bytes())
    assert isinstance(ck.records, list)
    t = MMSBState(CFG)
    mmsb.load_checkpoint(t, path)
    _same_state(t, s)
    assert mmsb.verify_state_consistency(t)
    # Written again, it is version 2.
    mmsb.checkpoint_log(t, path)
    assert struct.unpack_from("<H", path.read_bytes(), 8)[0] == ckpt_mod.VERSION == 2


def _cols(s: MMSBState) -> LogColumns:
    with s.lock:
        return s.log.columns()


def _field(cols: LogColumns, **changes: Any) -> LogColumns:
    out = LogColumns(**{k: getattr(cols, k) for k in cols.__dataclass_fields__})
    for name, value in changes.items():
        setattr(out, name, value)
    return out


def _set(a: np.ndarray, i: int, v: Any) -> np.ndarray:
    b = a.copy()
    b[i] = v
    return b


def test_check_columns_refuses_what_the_log_could_not_hold() -> None:
    s = _busy()
    cols = _cols(s)
    nxt = s.table.next_id
    assert check_columns(cols, nxt) is None
    enc = cols.enc.tolist()
    run, run16 = enc.index(0), enc.index(6)
    pos16, pos32, exact = enc.index(1), enc.index(2), enc.index(4)
    off = np.concatenate(([0], np.cumsum(cols.plen)))
    payload = cols.payload

    def with_payload(i: int, k: int, v: int) -> LogColumns:
        p = payload.copy()
        p[off[i] + k] = v
        return _field(cols, payload=p)

    bad = {
        "page past next id": _field(cols, page=_set(cols.page, 0, nxt)),
        "page 0": _field(cols, page=_set(cols.page, 0, 0)),
        "size 0": _field(cols, psize=_set(cols.psize, 0, 0)),
        "epoch 0": _field(cols, epoch=_set(cols.epoch, 0, 0)),
        "LSN repeated": _field(cols, lsn=_set(cols.lsn, 1, cols.lsn[0])),
        "time backwards": _field(cols, ts=_set(cols.ts, 1, cols.ts[0] - 1)),
        "unknown source": _field(cols, src=_set(cols.src, 0, len(cols.sources))),
        "unknown encoding": _field(cols, enc=_set(cols.enc, 0, 7)),
        "payload short": _field(cols, payload=payload[:-1]),
        "run past the page": with_payload(run, 3, 0x7F),
        "u16 run past the page": with_payload(run16, 1, 0xFF),
        "u16 run on a page past 64 KiB": _field(cols, enc=_set(cols.enc, run, 6)),
        "u16 positions unsorted": with_payload(pos16, 1, 0xFF),
        "u32 position past the page": with_payload(pos32, 3, 0x7F),
        "dense length": _field(cols, plen=_set(cols.plen, exact, cols.plen[exact] - 1)),
        "base epoch not below": _field(cols, base_rows=np.array([0]),
                                       base_epochs=np.array([cols.epoch[0]])),
        "base rows unsorted": _field(cols, base_rows=np.array([1, 0]),
                                     base_epochs=np.array([0, 0])),
        "a delta among the structs": _field(cols, structs=[*cols.structs, s.tlog[0]]),
        "struct LSN of a row": _field(cols, structs=[
            type(cols.structs[0])(**{**{k: getattr(cols.structs[0], k) for k in ("first_id", "count", "size", "location", "metadata")}, "lsn": int(cols.lsn[0]), "timestamp": cols.structs[0].timestamp})]),
    }
    for name, c in bad.items():
        assert check_columns(c, nxt) is not None, name


def test_masked_payload_with_bytes_outside_its_mask_is_refused() -> None:
    s = MMSBState(CFG)
    p = mmsb.create_page(s, 16)
    mask = np.zeros(16, bool)
    mask[:9] = True
    d = mmsb.create_delta(s, p.id, mask, bytes(range(1, 17)))
    mmsb.route_delta(s, d)
    cols = _cols(s)
    assert cols.enc.tolist() == [5] and check_columns(cols, s.table.next_id) is None
    payload = cols.payload.copy()
    payload[12] = 1  # a byte outside the mask
    assert "could not have written" in check_columns(_field(cols, payload=payload), 2)


def test_hostile_columns_in_a_file_are_typed_errors_that_change_nothing(tmp_path: Path) -> None:
    s = _busy()
    raw = ckpt_mod.checkpoint_bytes(s)
    head, secs = split_checkpoint(raw)
    tlog = next(st for t, c, r, st in secs if t == b"TLOG")
    n = struct.unpack_from("<Q", tlog, 0)[0]
    cases = {}
    for name, off, fmt, v in (("lsn", 40, "<q", 0), ("id", 40 + 8 * n, "<q", -1),
                              ("page", 40 + 32 * n, "<I", 2**31), ("psize", 40 + 36 * n, "<I", 0),
                              ("plen", 40 + 40 * n, "<I", 2**32 - 1), ("enc", 40 + 48 * n, "<B", 7)):
        t = bytearray(tlog)
        struct.pack_into(fmt, t, off, v)
        cases[name] = bytes(t)
    target = MMSBState(CFG)
    mmsb.create_page(target, 8)
    before = (target.last_lsn, mmsb.query_page(target, 1), len(target.log.records))
    for name, t in cases.items():
        blob = join_checkpoint(head, [(tg, 0, len(t), t) if tg == b"TLOG" else (tg, c, r, st)
                                      for tg, c, r, st in secs])
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(blob)
        with pytest.raises(mmsb.SerializationError, match="TLOG"):
            mmsb.load_checkpoint(target, path)
        assert (target.last_lsn, mmsb.query_page(target, 1), len(target.log.records)) == before


def test_page_table_refusals_name_the_problem_and_change_nothing(tmp_path: Path) -> None:
    s = _busy()
    head, secs = split_checkpoint(ckpt_mod.checkpoint_bytes(s))
    ptbl = next(st for t, c, r, st in secs if t == b"PTBL")
    n = len(ptbl) // 25
    ids = "page ids are not ascending, positive and below the next id"
    other = "impossible size, epoch or location"
    cases: dict[str, tuple[int, str, int, str]] = {
        "id repeated": (8, "<q", 1, ids), "id 0": (0, "<q", 0, ids),
        "id at the next id": (8 * (n - 1), "<q", head[5], ids),
        "size 0": (8 * n, "<q", 0, other), "size past the limit": (8 * n, "<q", 2**32, other),
        "epoch -1": (16 * n, "<q", -1, other), "epoch 2**62": (16 * n + 8, "<q", 2**62, other),
        "location 3": (24 * n + 1, "<B", 3, other),
    }
    target = MMSBState(CFG)
    mmsb.create_page(target, 8)
    before = (target.last_lsn, mmsb.query_page(target, 1), len(target.log.records))
    for name, (off, fmt, v, why) in cases.items():
        t = bytearray(ptbl)
        struct.pack_into(fmt, t, off, v)
        blob = join_checkpoint(head, [(tg, 0, len(t), bytes(t)) if tg == b"PTBL" else (tg, c, r, st)
                                      for tg, c, r, st in secs])
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(blob)
        with pytest.raises(mmsb.SerializationError, match=why):
            mmsb.load_checkpoint(target, path)
        assert (target.last_lsn, mmsb.query_page(target, 1), len(target.log.records)) == before, name


def test_column_records_read_like_a_list() -> None:
    s = _busy()
    records = list(s.log.records)
    view = ColumnRecords(_cols(s))
    assert len(view) == len(records)
    assert list(view) == records
    assert view[0] == records[0] and view[-1] == records[-1] and view[2:5] == records[2:5]
    assert (view.first_lsn(), view.last_lsn()) == (records[0].lsn, records[-1].lsn)


def test_join_records_concatenates_slices_of_one_log() -> None:
    s = _busy()
    log = s.log
    cut = log.last_lsn // 2
    with s.lock:
        tail = ColumnRecords(log.columns(cut))
    head = ColumnRecords(_head_columns(s, cut))
    joined = join_records([head, tail])
    assert isinstance(joined, ColumnRecords)
    assert list(joined) == list(log.records)
    assert join_records([list(head), list(tail)]) == list(log.records)
    restored = TransactionLog.from_columns(joined.cols)  # type: ignore[attr-defined]
    assert list(restored.records) == list(log.records)


def _same_log_indexes(a: TransactionLog, b: TransactionLog) -> None:
    """Same rows (but for where payloads lie), step maps, per-page row indexes, base
    epochs, sources and records."""
    n = a.n
    assert b.n == n
    fields = [f for f in a.rows.dtype.names if f != "poff"]
    for f in fields:
        assert (a.rows[f][:n] == b.rows[f][:n]).all(), f
    assert a.index == b.index
    assert [a.lsns.at(r) for r in range(n)] == [b.lsns.at(r) for r in range(n)]
    assert [a.ids.at(r) for r in range(n)] == [b.ids.at(r) for r in range(n)]
    assert (a.lsns.last, a.ids.last) == (b.lsns.last, b.ids.last)
    assert a.bases == b.bases and a.sources == b.sources
    assert a.payload_bytes == b.payload_bytes
    assert [a.delta_at(r) for r in range(n)] == [b.delta_at(r) for r in range(n)]
    assert list(a.records) == list(b.records)


def test_log_from_columns_builds_the_indexes_of_the_log_they_came_from() -> None:
    s = _busy()
    mmsb.compress_log(s)  # merged deltas: breaks in the delta ids, base epochs
    mmsb.write_page(s, 1, 0, b"after")
    mmsb.write_page(s, 2, 5, b"later", source="third")
    with s.lock:
        cols = s.log.columns()
    _same_log_indexes(TransactionLog.from_columns(cols), s.log)
    # Page ids far above the number of rows (ordered by sorting, not by counting).
    t = MMSBState(CFG)
    ids = [p.id for p in mmsb.create_pages(t, 3000, 16)]
    for k, pid in enumerate((ids[-1], ids[5], ids[-1], ids[2000], ids[5])):
        mmsb.write_page(t, pid, 0, bytes([k + 1]))
    with t.lock:
        cols = t.log.columns()
    rebuilt = TransactionLog.from_columns(cols)
    _same_log_indexes(rebuilt, t.log)
    assert rebuilt.index[ids[-1]].tolist() == [0, 2]


def test_log_from_columns_refuses_sources_past_its_sources_and_uneven_columns() -> None:
    cols = _cols(_busy())
    for bad in (len(cols.sources), -1):
        with pytest.raises(IndexError):
            TransactionLog.from_columns(_field(cols, src=_set(cols.src, 1, bad)))
    with pytest.raises(ValueError, match="different lengths"):
        TransactionLog.from_columns(_field(cols, epoch=cols.epoch[:-1]))


def _head_columns(s: MMSBState, cut: int) -> LogColumns:
    """The columns of the records with LSN ≤ cut."""
    cols = _cols(s)
    keep = cols.lsn <= cut
    off = np.concatenate(([0], np.cumsum(cols.plen)))
    payload = np.concatenate([cols.payload[off[i]:off[i + 1]] for i in np.flatnonzero(keep)]
                             or [np.zeros(0, np.uint8)])
    base_keep = keep[cols.base_rows] if len(cols.base_rows) else np.zeros(0, bool)
    return LogColumns(cols.lsn[keep], cols.ids[keep], cols.epoch[keep], cols.ts[keep],
                      cols.page[keep], cols.psize[keep], cols.plen[keep], cols.src[keep],
                      cols.enc[keep], cols.sources, cols.base_rows[base_keep],
                      cols.base_epochs[base_keep], payload,
                      [r for r in cols.structs if r.lsn <= cut])


def test_bus_recovery_joins_a_chain_of_column_sections(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    config = mmsb.MMSBConfig(enable_gpu=False, fsync="none", max_tlog_size=40,
                             checkpoint_interval=0)
    s = mmsb.mmsb_start(path=root, config=config)
    ids = [p.id for p in mmsb.create_pages(s, 8, 64)]
    rng = np.random.default_rng(3)
    for k in range(400):
        mmsb.write_page(s, ids[k % 8], int(rng.integers(0, 56)), rng.bytes(8),
                        source=f"w{k % 3}")
        if k == 200:
            mmsb.resize_page(s, ids[0], 80)
    expect = (list(s.log.records), {p: mmsb.query_page(s, p) for p in ids})
    mmsb.mmsb_stop(s)
    assert len(list((root / "checkpoints").iterdir())) > 3
    again = mmsb.mmsb_start(path=root, config=config)
    assert list(again.log.records) == expect[0]
    assert {p: mmsb.query_page(again, p) for p in ids} == expect[1]
    assert mmsb.verify_state_consistency(again)
    mmsb.mmsb_stop(again)
