"""Hypothesis fuzzing of every decoder of the durable formats: only
SerializationError may escape.

* ``mmsb._storage.codec.decode_record`` — log record bodies;
* ``mmsb.deserialize_delta`` — standalone deltas (``MMSD`` blobs);
* ``mmsb._storage.checkpoint.read_checkpoint`` — checkpoint files given as bytes;
* ``mmsb._storage.wal.scan_segment`` — WAL segment files; it reports damage in its result
  and never raises.

Inputs are random bytes and, mostly, mutations of valid encodings of every record kind
and delta encoding: byte flips, truncation, insertion, deletion, splicing and integers
overwritten with extreme values. Where a checksum would stop the mutation at the door,
the fuzzer recomputes it (frames, MMSD blobs, checkpoint sections and headers), so the
mutated bytes reach the inner decoders.

``MMSB_FUZZ_EXAMPLES`` (default 300) sets the examples per test, for a longer hunt.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mmsb
from mmsb._core.records import Compacted, EdgeRemove, PageMigrate
from mmsb._storage import checkpoint as ckpt_mod
from mmsb._storage.codec import crc32c, decode_record, encode_record
from mmsb._storage.wal import SEG_HEADER_SIZE, frame, scan_segment, segment_header

FUZZ = settings(max_examples=int(os.environ.get("MMSB_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- corpus


def _corpus_state() -> mmsb.MMSBState:
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    a = mmsb.create_page(s, 64, metadata={"role": "src", "n": [1, 2.5, None, True]})
    b = mmsb.create_page(s, 40)
    c, d = mmsb.create_pages(s, 2, 16)
    mmsb.update_page(s, a.id, bytes(range(64)))  # dense, full
    mmsb.write_page(s, b.id, 3, b"one run")  # sparse, one run
    mask = np.zeros(40, bool)
    mask[[1, 2, 9, 30, 31]] = True
    mmsb.route_delta(s, mmsb.create_delta(s, b.id, mask, bytes(range(40))))  # sparse, runs
    big = np.zeros(16, bool)
    big[:12] = True
    mmsb.route_delta(s, mmsb.create_delta(s, c.id, big, b"\x09" * 16))  # dense, masked
    mmsb.set_metadata(s, b.id, "label", "bee")
    mmsb.update_metadata(s, c.id, {"blob": b"\x00\xff", "deep": {"k": [1, {"x": 2}]}})
    mmsb.resize_page(s, d.id, 24)
    mmsb.clone_page(s, a.id)
    mmsb.add_dependency(s, a.id, b.id, mmsb.CONTROL_DEPENDENCY)
    mmsb.add_dependency(s, b.id, c.id)
    mmsb.remove_dependency(s, b.id, c.id)
    mmsb.write_page(s, a.id, 0, b"xx")
    mmsb.delete_page(s, d.id)
    with mmsb.batch(s):
        mmsb.write_page(s, a.id, 10, b"batched")
        mmsb.write_page(s, b.id, 0, b"\x01")
    return s


def _records() -> list[bytes]:
    s = _corpus_state()
    recs = [encode_record(r) for r in s.log.records]
    extra = [PageMigrate(1, 0, lsn=900, timestamp=1), EdgeRemove(1, 2, lsn=901, timestamp=2),
             Compacted(77, lsn=902, timestamp=3)]
    recs += [encode_record(r) for r in extra]
    c = _corpus_state()
    mmsb.compress_log(c)
    recs += [encode_record(r) for r in c.log.records]
    return recs


RECORDS = _records()
DELTA_BLOBS = [mmsb.serialize_delta(d) for d in _corpus_state().tlog]
_KINDS = {r[0] for r in RECORDS}
_DELTA_ENCODINGS = {mmsb.deserialize_delta(b).is_sparse for b in DELTA_BLOBS}


def _checkpoints() -> list[bytes]:
    out = [ckpt_mod.checkpoint_bytes(mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False)))]
    s = _corpus_state()
    with s.lock:
        out.append(ckpt_mod.checkpoint_bytes(s))
    # A durable bus's checkpoint: META with a bus identity, a log slice, a nested BASE.
    with tempfile.TemporaryDirectory() as d:
        b = mmsb.mmsb_start(path=d, config=mmsb.MMSBConfig(enable_gpu=False, fsync="none",
                                                         retain_checkpoints=2, max_tlog_size=4))
        p = mmsb.create_page(b, 8, metadata={"x": 1})
        for i in range(13):
            mmsb.write_page(b, p.id, i % 8, bytes([i + 1]))
        with b.lock:
            out.append(ckpt_mod.checkpoint_bytes(b))
        mmsb.mmsb_stop(b)
        # Its files name their pages in the bus's page store: made self-contained here
        # (the records as written are fuzzed on their own below).
        store = Path(d) / "checkpoints" / "pages"
        for f in sorted((Path(d) / "checkpoints").glob("ckpt-*")):
            REF_CHECKPOINTS.append(f.read_bytes())
            out.append(ckpt_mod.inline_pages(f.read_bytes(), f.name, store))
    return out


REF_CHECKPOINTS: list[bytes] = []
"""A durable bus's checkpoint records as written (format version 4: PREF, no pages)."""
CHECKPOINTS = _checkpoints()


def test_corpus_covers_every_kind_and_encoding() -> None:
    assert _KINDS == set(range(1, 11)), _KINDS
    encodings = set()
    for r in RECORDS:
        if r[0] == 1:
            (slen,) = struct.unpack_from("<H", r, 57)
            encodings.add(r[59 + slen])
    assert encodings == {0, 1, 2, 3}, encodings  # sparse runs, dense full, masked, exact
    assert any(ckpt_mod.read_checkpoint(c).base for c in CHECKPOINTS)
    assert any(ckpt_mod.read_checkpoint(c).bus for c in CHECKPOINTS)


# --------------------------------------------------------------------------- mutations


def _extreme(width: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    return st.one_of(st.sampled_from([0, 1, 2, top, top >> 1, (top >> 1) + 1, top - 1]),
                     st.integers(0, top))


@st.composite
def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """A few random edits of ``data``."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "int", "int", "truncate", "insert",
                                   "delete", "extend"]))
        n = len(out)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            out[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif op == "int" and n:
            w = draw(st.sampled_from([1, 2, 4, 8]))
            i = draw(st.integers(0, max(0, n - w)))
            out[i:i + w] = draw(_extreme(w)).to_bytes(w, "little")[: n - i]
        elif op == "truncate":
            out = out[: draw(st.integers(0, n))]
        elif op == "insert":
            i = draw(st.integers(0, n))
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del out[i: i + draw(st.integers(1, 16))]
        elif op == "extend":
            out += draw(st.binary(min_size=1, max_size=32))
    return bytes(out)


def record_inputs() -> st.SearchStrategy[bytes]:
    valid = st.sampled_from(RECORDS)
    return st.one_of(st.binary(max_size=200), valid, valid.flatmap(mutate),
                     st.tuples(valid, valid, st.integers(0, 100)).map(
                         lambda t: t[0][: t[2]] + t[1][t[2]:]))


def _only_serialization_error(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except mmsb.SerializationError:
        return None


# --------------------------------------------------------------------------- records


def test_every_valid_record_round_trips() -> None:
    for body in RECORDS:
        rec = decode_record(body)
        assert encode_record(rec) == body


@FUZZ
@given(record_inputs())
def test_decode_record_raises_only_serialization_error(body: bytes) -> None:
    rec = _only_serialization_error(decode_record, body)
    if rec is None:
        return
    # Whatever decodes is a usable record: it encodes again, and that decodes to the same.
    again = encode_record(rec)
    assert encode_record(decode_record(again)) == again  # (bytes: NaN metadata is not == itself)
    if isinstance(rec, mmsb.Delta):
        d2 = decode_record(again)
        assert bytes(d2.dense_data()) == bytes(rec.dense_data())
        assert np.array_equal(np.asarray(d2.mask, bool), np.asarray(rec.mask, bool))
        assert len(np.asarray(rec.mask, bool)) == rec.page_size


# --------------------------------------------------------------------------- deltas


def _reseal(blob: bytes) -> bytes:
    """A standalone delta with its checksum made valid again (when it has a header)."""
    if len(blob) < 10:
        return blob
    body = blob[10:]
    return blob[:6] + struct.pack("<I", crc32c(body)) + body


@FUZZ
@given(st.one_of(
    st.binary(max_size=120),
    st.sampled_from(DELTA_BLOBS).flatmap(mutate),
    st.sampled_from(DELTA_BLOBS).flatmap(mutate).map(_reseal),
    st.sampled_from(RECORDS).map(lambda b: b"MMSD\x01\x00" + struct.pack("<I", crc32c(b)) + b),
    st.sampled_from(RECORDS).flatmap(mutate).map(
        lambda b: b"MMSD\x01\x00" + struct.pack("<I", crc32c(b)) + b),
))
def test_deserialize_delta_raises_only_serialization_error(blob: bytes) -> None:
    d = _only_serialization_error(mmsb.deserialize_delta, blob)
    if d is not None:
        assert isinstance(d, mmsb.Delta)
        assert mmsb.deserialize_delta(mmsb.serialize_delta(d)).page_size == d.page_size


def test_deserialize_delta_refuses_non_bytes() -> None:
    for bad in (None, 3, "MMSD", [1, 2], object()):
        with pytest.raises(mmsb.SerializationError):
            mmsb.deserialize_delta(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- checkpoints


def _split(raw: bytes) -> tuple[list[Any], list[list[Any]]]:
    head = list(ckpt_mod._HEADER.unpack_from(raw, 0))
    pos = 48
    secs = []
    for _ in range(head[3]):
        tag, codec, raw_len, stored_len, _crc = ckpt_mod._SECTION.unpack_from(raw, pos)
        stored = raw[pos + 32: pos + 32 + stored_len]
        plain = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_len) \
            if codec == 1 else stored
        secs.append([tag, codec, raw_len, plain])
        pos += 32 + stored_len
    return head, secs


def _join(head: list[Any], secs: list[list[Any]], exact_lengths: bool = True) -> bytes:
    h = ckpt_mod._HEADER.pack(*head)
    out = [h, struct.pack("<II", crc32c(h), 0)]
    for tag, codec, raw_len, plain in secs:
        stored = zstandard.ZstdCompressor(level=1).compress(plain) if codec == 1 else plain
        declared = len(plain) if exact_lengths else raw_len
        s = struct.pack("<4sB3xQQI", tag, codec, declared, len(stored), crc32c(stored))
        out += [s, struct.pack("<I", crc32c(s)), stored]
    body = b"".join(out)
    f = struct.pack("<8sQ", b"MMSBEND\0", len(body))
    return body + f + struct.pack("<II", crc32c(f), 0)


def test_checkpoint_crafting_round_trips() -> None:
    for raw in CHECKPOINTS:
        head, secs = _split(raw)
        rebuilt = _join(head, secs)
        a, b = ckpt_mod.read_checkpoint(raw), ckpt_mod.read_checkpoint(rebuilt)
        assert (a.lsn, a.next_page_id, a.ids.tolist(), a.data.tobytes()) == \
            (b.lsn, b.next_page_id, b.ids.tolist(), b.data.tobytes())


@st.composite
def checkpoint_inputs(draw: st.DrawFn) -> bytes:
    raw = draw(st.sampled_from(CHECKPOINTS))
    how = draw(st.sampled_from(["raw", "header", "section", "section", "section", "msgpack"]))
    if how == "raw":
        return draw(mutate(raw))
    head, secs = _split(raw)
    if how == "header":
        field = draw(st.sampled_from([1, 2, 3, 4, 5, 6]))
        width = {1: 2, 2: 2, 3: 4}.get(field, 8)
        head[field] = draw(_extreme(width))
        return _join(head, secs)
    k = draw(st.integers(0, len(secs) - 1))
    if how == "msgpack" and secs[k][0] in (b"META", b"MASK"):
        # Structured edits of the msgpack sections: values of the wrong type or range.
        obj = msgpack.unpackb(secs[k][3], raw=False, strict_map_key=False)
        junk = draw(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                              st.text(max_size=5), st.binary(max_size=5),
                              st.lists(st.integers(-3, 2**40), max_size=5),
                              st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**64 - 1),
                                              max_size=3)))
        if isinstance(obj, dict) and obj:
            key = draw(st.sampled_from(sorted(obj)))
            obj[key] = junk
        elif isinstance(obj, list) and obj:
            row = draw(st.integers(0, len(obj) - 1))
            if isinstance(obj[row], list) and obj[row]:
                obj[row][draw(st.integers(0, len(obj[row]) - 1))] = junk
            else:
                obj[row] = junk
        else:
            obj = junk
        secs[k][3] = msgpack.packb(obj, use_bin_type=True)
        return _join(head, secs)
    secs[k][3] = draw(mutate(secs[k][3])) if secs[k][3] else draw(st.binary(max_size=40))
    if draw(st.booleans()):
        secs[k][1] = draw(st.sampled_from([0, 1, 2]))
    return _join(head, secs, exact_lengths=draw(st.booleans()))


@FUZZ
@given(st.sampled_from(REF_CHECKPOINTS).flatmap(mutate))
def test_read_checkpoint_records_raise_only_serialization_error(blob: bytes) -> None:
    """Records naming their pages in a page store, mutated, read without the store:
    their page references are checked, then the read is refused, typed."""
    ck = _only_serialization_error(ckpt_mod.read_checkpoint, blob)
    assert ck is None or ck.page_refs is None  # a record is never taken without its pages
    ck = _only_serialization_error(lambda b: ckpt_mod.read_checkpoint(b, pages=False), blob)
    if ck is not None and ck.page_refs is not None:
        assert len(ck.page_refs.offsets) == len(ck.ids)


@FUZZ
@given(st.one_of(st.binary(max_size=300), checkpoint_inputs()))
def test_read_checkpoint_raises_only_serialization_error(blob: bytes) -> None:
    ck = _only_serialization_error(ckpt_mod.read_checkpoint, blob)
    if ck is not None:
        assert len(ck.ids) == len(ck.sizes) == len(ck.epochs) == len(ck.locs)
        assert len(ck.data) == int(np.asarray(ck.sizes).sum())


# --------------------------------------------------------------------------- segments

BUS_ID, GEN, SEQ, FIRST_LSN = 0x1234_5678_9ABC_DEF0, 7, 3, 41


def _renumber(body: bytes, lsn: int) -> bytes:
    return body[:1] + struct.pack("<Q", lsn) + body[9:] if len(body) >= 9 else body


@st.composite
def segment_inputs(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["random", "frames", "frames", "raw"]))
    if how == "random":
        return draw(st.binary(max_size=300))
    bodies = draw(st.lists(st.sampled_from(RECORDS), min_size=0, max_size=6))
    bodies = [_renumber(b, FIRST_LSN + i) for i, b in enumerate(bodies)]
    head = segment_header(BUS_ID, GEN, SEQ)
    if how == "frames":
        # Mutate record bodies and seal them in valid frames: the decoder gets them.
        if bodies:
            k = draw(st.integers(0, len(bodies) - 1))
            bodies[k] = draw(mutate(bodies[k]))
        if draw(st.booleans()):
            head = segment_header(draw(st.sampled_from([BUS_ID, 1])), draw(st.sampled_from([GEN, 6, 8])),
                                  draw(st.sampled_from([SEQ, 0])))
        return head + b"".join(frame(b) for b in bodies)
    return draw(mutate(head + b"".join(frame(b) for b in bodies)))


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("segments")


@FUZZ
@given(data=segment_inputs())
# A version-2 header followed by one zero byte: space written ahead, not a torn frame.
@example(data=b"MMSBWAL\x00\x02\x00\x00\x00\xf0\xde\xbc\x9axV4\x12\x07\x00\x00\x00\x00\x00"
              b"\x00\x00\x03\x00\x00\x00Y\x1a~b\x00")
def test_scan_segment_never_raises(seg_dir: Path, data: bytes) -> None:
    path = seg_dir / "wal-0000000000000007-00000003.log"
    path.write_bytes(data)
    scan = scan_segment(path, BUS_ID, GEN, SEQ, FIRST_LSN)  # must not raise
    assert scan.damage is None or isinstance(scan.damage, mmsb.SerializationError)
    assert [r.lsn for r in scan.records] == list(range(FIRST_LSN, FIRST_LSN + len(scan.records)))
    assert scan.valid_end <= len(data)
    if scan.foreign is None and scan.damage is None and not scan.torn:
        # The frames end at the file's end, or (a version-2 segment) where only the
        # zeros written ahead follow them.
        assert scan.valid_end + scan.zeros == len(data)
        assert scan.valid_end >= SEG_HEADER_SIZE
        assert not scan.zeros or (scan.version >= 2 and not any(data[scan.valid_end:]))
    if scan.foreign is not None:
        assert not scan.records


def test_scan_segment_of_a_missing_file_reports_damage(tmp_path: Path) -> None:
    scan = scan_segment(tmp_path / "missing.log", BUS_ID, GEN, SEQ, FIRST_LSN)
    assert isinstance(scan.damage, mmsb.SerializationError) and not scan.records
