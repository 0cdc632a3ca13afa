"""The journal page format of the LangGraph saver (``MLGJ``): exact round trips, and any
damage — a flipped byte, a cut, a crafted body with a valid checksum — is a
``SerializationError`` naming the offset, never another exception. Needs no LangGraph."""

from __future__ import annotations

import struct

import crc32c
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsb.errors import SerializationError
from mmsb.integrations import _journal as jr
from mmsb.integrations._journal import ChannelRef, CheckpointRecord, WriteEntry, WritesRecord

RECORDS: list[jr.Record] = [
    CheckpointRecord("1f0-aa", None, ("msgpack", b"\x81\xa1v\x01"), ("json", b"{}"), None, ()),
    CheckpointRecord("1f0-ab", "1f0-aa", ("msgpack", b"cp"), ("msgpack", b"md"), "run-1", (
        ChannelRef("messages", "00000002.0.5", 3, 7, 1200, "msgpack"),
        ChannelRef("count", 2, 4, 1, 1, "msgpack"),
        ChannelRef("flag", 1.5, 0, 0, 0, "empty"),
    )),
    WritesRecord("1f0-ab", "task-1", "a:b", (
        WriteEntry(0, "messages", "msgpack", b"\x90"),
        WriteEntry(-1, "__error__", "json", b'"boom"'),
    )),
    WritesRecord("1f0-ab", "", "", ()),
]


def page(records: list[jr.Record], slack: int = 32) -> bytes:
    body = jr.encode_header() + b"".join(jr.encode_frame(r) for r in records)
    return body + bytes(slack)


def decoded(buf: bytes) -> list[jr.Record]:
    return [r for _o, _n, r in jr.iter_frames(buf, "test page")]


def test_records_round_trip_exactly() -> None:
    buf = page(RECORDS)
    assert decoded(buf) == RECORDS
    assert jr.used_length(buf, "test page") == len(buf) - 32
    assert decoded(page(RECORDS, slack=0)) == RECORDS  # the page may end right after
    assert decoded(page([])) == []
    offsets = [o for o, _n, _r in jr.iter_frames(buf, "x")]
    assert offsets[0] == jr.HEADER_SIZE


def test_the_header_states() -> None:
    for state in (jr.LIVE, jr.PENDING, jr.DELETED):
        assert jr.header_state(jr.encode_header(state) + bytes(4), "x") == state


@pytest.mark.parametrize("buf, match", [
    (b"MLGX\x01\x00\x00\x00" + bytes(16), "bad magic"),
    (b"MLGJ\x02\x00\x00\x00" + bytes(16), "version 2 is not supported"),
    (b"MLGJ\x01\x07\x00\x00" + bytes(16), "unknown journal state 7"),
    (b"MLGJ\x01\x00\x01\x00" + bytes(16), "reserved"),
    (b"MLGJ\x01", "shorter than the journal header"),
])
def test_a_bad_header_is_refused(buf: bytes, match: str) -> None:
    with pytest.raises(SerializationError, match=match):
        decoded(buf)


def test_every_flipped_byte_is_caught() -> None:
    buf = bytearray(page(RECORDS, slack=8))
    for i in range(len(buf)):
        for bit in (0x01, 0x80):
            buf[i] ^= bit
            try:
                got = decoded(bytes(buf))
            except SerializationError as exc:
                assert exc.offset is not None
            else:
                # The state byte has valid neighbours (live 0 and pending 1): the records
                # read the same and the state tells the saver what to do. Anywhere else
                # nothing decodes: a length turned into 0 ends the page early, and the
                # bytes after it then fail the zero check.
                assert i == 5 and got == RECORDS, f"flip at {i} decoded to {got!r}"
                assert jr.header_state(bytes(buf), "x") == jr.PENDING
            finally:
                buf[i] ^= bit


def test_every_cut_is_caught_or_a_true_prefix() -> None:
    full = page(RECORDS, slack=0)
    ends = [jr.HEADER_SIZE] + [o + n for o, n, _r in jr.iter_frames(full, "x")]
    for cut in range(jr.HEADER_SIZE, len(full)):
        try:
            got = decoded(full[:cut])
        except SerializationError:
            assert cut not in ends
        else:
            assert cut in ends and got == RECORDS[:ends.index(cut)]


def _framed(body: bytes) -> bytes:
    head = struct.pack("<I", len(body))
    return head + struct.pack("<I", crc32c.crc32c(body, crc32c.crc32c(head))) + body


@pytest.mark.parametrize("items", [
    [],
    [3, "x"],
    [True, "id", None, "t", b"", "t", b"", None, []],
    [1, "id", None, "t", b"", "t", b"", None],
    [1, 5, None, "t", b"", "t", b"", None, []],
    [1, "id", 5, "t", b"", "t", b"", None, []],
    [1, "id", None, "t", "not bytes", "t", b"", None, []],
    [1, "id", None, "t", b"", "t", b"", None, [["c", None, 1, 1, 1, "t"]]],
    [1, "id", None, "t", b"", "t", b"", None, [["c", True, 1, 1, 1, "t"]]],
    [1, "id", None, "t", b"", "t", b"", None, [["c", 1, -1, 1, 1, "t"]]],
    [1, "id", None, "t", b"", "t", b"", None, [["c", 1, 1, 1 << 63, 1, "t"]]],
    [1, "id", None, "t", b"", "t", b"", None, [["c", 1, 0, 0, 5, "t"]]],
    [1, "id", None, "t", b"", "t", b"", None, [["c", 1, 1, 1, 1]]],
    [2, "id", "task", "path", [[0, "c", "t"]]],
    [2, "id", "task", "path", [["0", "c", "t", b""]]],
    [2, "id", "task", "path", [[1 << 63, "c", "t", b""]]],
    [2, "id", "task", "path", {"a": 1}],
])
def test_a_crafted_body_with_a_valid_checksum_is_refused(items: list) -> None:
    body = msgpack.packb(items, use_bin_type=True)
    with pytest.raises(SerializationError):
        decoded(jr.encode_header() + _framed(body))


@pytest.mark.parametrize("body", [
    b"\xc1",                                    # never-used msgpack byte
    msgpack.packb({"a": 1}),                    # a map, not an array
    msgpack.packb(msgpack.ExtType(1, b"x")),    # an extension type
    b"\x92\x01",                                # truncated array
    b"\x91" * 100_000 + b"\x01",                # nested past any sane depth
])
def test_a_body_that_is_not_an_array_of_fields_is_refused(body: bytes) -> None:
    with pytest.raises(SerializationError):
        decoded(jr.encode_header() + _framed(body))


def test_a_frame_longer_than_the_page_is_refused() -> None:
    buf = jr.encode_header() + struct.pack("<II", 1 << 31, 0) + bytes(64)
    with pytest.raises(SerializationError, match="runs past"):
        decoded(buf)


def test_the_zero_tail_is_checked() -> None:
    buf = bytearray(page(RECORDS, slack=16))
    buf[-3] = 1
    with pytest.raises(SerializationError, match="non-zero bytes"):
        decoded(bytes(buf))


def test_numpy_pages_read_like_bytes() -> None:
    buf = page(RECORDS)
    assert decoded(np.frombuffer(buf, dtype=np.uint8)) == RECORDS  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_after_a_header_never_raise_anything_else(tail: bytes) -> None:
    try:
        decoded(jr.encode_header() + tail)
    except SerializationError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=8)
                    | st.binary(max_size=8),
                    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
                        st.text(max_size=4), inner, max_size=4), max_leaves=30))
def test_random_msgpack_bodies_with_valid_checksums_are_refused_or_well_formed(obj: object) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    try:
        got = decoded(jr.encode_header() + _framed(body))
    except SerializationError:
        return
    assert len(got) == 1 and jr.encode_frame(got[0])[8:] == body


_text = st.text(max_size=40)
_version = st.one_of(_text, st.integers(0, (1 << 63) - 1), st.floats(allow_nan=False))
_nat = st.integers(0, (1 << 63) - 1)


@settings(max_examples=200, deadline=None)
@given(cid=_text, parent=st.none() | _text, run=st.none() | _text,
       cp=st.tuples(_text, st.binary(max_size=300)), md=st.tuples(_text, st.binary(max_size=300)),
       chans=st.lists(st.tuples(_text, _version, _nat, _nat, _nat, _text), max_size=6))
def test_frame_bound_is_never_below_the_encoded_frame(
        cid: str, parent: str | None, run: str | None, cp: tuple[str, bytes],
        md: tuple[str, bytes], chans: list[tuple[str, object, int, int, int, str]]) -> None:
    # The saver makes room for a record before it knows its epochs: the bound must hold
    # for every page, epoch and length, non-ASCII text and 64-bit numbers included.
    refs = tuple(ChannelRef(n, v, p or 1, e, ln, t) for n, v, p, e, ln, t in chans)  # type: ignore[arg-type]
    record = CheckpointRecord(cid, parent, cp, md, run, refs)
    bound = jr.frame_bound(cid, parent, cp, md, run, [(r.channel, r.version, r.type) for r in refs])
    assert len(jr.encode_frame(record)) <= bound
    assert bound <= 2 * len(jr.encode_frame(record)) + 64 + 40 * len(refs) + 16 * len(
        "".join([cid, parent or "", run or "", cp[0], md[0]] + [r.channel + r.type for r in refs]))
