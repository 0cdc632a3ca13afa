"""The table of record kinds: every kind has its apply, check, encoder and decoder; an
unknown kind is refused with a typed error and changes nothing; a kind added through the
table goes through logging, replay, checkpoints and recovery with no other change."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import mmsb
from mmsb._core.delta import Delta, make_delta
from mmsb._core.engine import MMSBState
from mmsb._core.records import (
    KIND_CODES,
    KINDS,
    RESERVED_CODES,
    Compacted,
    EdgeAdd,
    EdgeRemove,
    MetadataSet,
    PageClone,
    PageCreate,
    PageDelete,
    PageMigrate,
    PageResize,
    Record,
    bind_codec,
    bind_engine,
    define_kind,
    kind_of,
    missing_entries,
)
from mmsb._storage.codec import decode_record, encode_record, record_parts
from mmsb.errors import InvalidArgumentError, MMSBError, SerializationError


def _samples() -> list[Any]:
    d = make_delta(7, 3, 0, 64, np.array([1, 2, 9]), np.array([5, 6, 7], np.uint8), "api",
                   epoch=1)
    return [
        d.stamped(11, 1_000),
        PageCreate(1, 4, 64, 0, {"k": [1, "x"]}, lsn=1, timestamp=5),
        PageCreate(5, 1, 64, 0, None, lsn=2, timestamp=6),
        PageDelete(2, lsn=3, timestamp=7),
        PageResize(3, 128, lsn=4, timestamp=8),
        PageMigrate(3, 0, lsn=5, timestamp=9),
        PageClone(6, 3, lsn=6, timestamp=10),
        MetadataSet(3, {"a": 1}, "api", lsn=7, timestamp=11),
        EdgeAdd(1, 3, 2, lsn=8, timestamp=12),
        EdgeRemove(1, 3, lsn=9, timestamp=13),
        Compacted(12, lsn=10, timestamp=14),
    ]


def test_every_kind_has_its_four_entries() -> None:
    assert missing_entries() == []
    assert set(KINDS) == {Delta, PageCreate, PageDelete, PageResize, PageMigrate, PageClone,
                          MetadataSet, EdgeAdd, EdgeRemove, Compacted}
    for kind in KINDS.values():
        assert KIND_CODES[kind.code] is kind
        for entry in ("apply", "check", "encode", "decode"):
            assert callable(getattr(kind, entry)), f"{kind.name}.{entry}"


@pytest.mark.parametrize("rec", _samples(), ids=lambda r: type(r).__name__)
def test_each_kind_round_trips_through_its_codec(rec: Any) -> None:
    body = encode_record(rec)
    assert body[0] == kind_of(rec).code
    back = decode_record(body)
    assert type(back) is type(rec)
    assert encode_record(back) == body
    if not isinstance(rec, Delta):
        assert back == rec


class _Stranger:
    lsn = 0
    timestamp = 0
    page_id = 1


def test_an_unknown_kind_is_refused_and_changes_nothing() -> None:
    s = MMSBState()
    p = mmsb.create_page(s, 16)
    mmsb.write_page(s, p.id, 0, b"abc")
    before = (s.last_lsn, len(s.log.records), mmsb.query_page(s, p.id), int(s.table.next_id))
    for call in (s.apply_record, s.check_record, s.reserve_for):
        with pytest.raises(InvalidArgumentError, match="not a record kind"):
            call(_Stranger())  # type: ignore[arg-type]
    s.enter()
    try:
        with pytest.raises(InvalidArgumentError, match="not a record kind"):
            s.commit(_Stranger())  # type: ignore[arg-type]
    finally:
        s.leave()
    with pytest.raises(InvalidArgumentError):
        kind_of(Record())  # the base class is no kind
    assert (s.last_lsn, len(s.log.records), mmsb.query_page(s, p.id), int(s.table.next_id)) == before
    assert mmsb.verify_state_consistency(s)
    with pytest.raises(SerializationError, match="not a record kind"):
        encode_record(_Stranger())  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="not a record kind"):
        record_parts(_Stranger())  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [0, 11, 12, 99, 255])
def test_an_unknown_code_is_refused_by_the_decoder(code: int) -> None:
    body = struct.pack("<BQq", code, 1, 1) + b"\0" * 8
    with pytest.raises(SerializationError, match=f"unknown record kind {code}|empty"):
        decode_record(body)
    with pytest.raises(SerializationError):
        decode_record(b"")


def test_the_table_refuses_clashing_and_reserved_codes() -> None:
    class Other(Record):
        pass

    for code in (*RESERVED_CODES, 1, 10, 256, -1, "3"):
        with pytest.raises(InvalidArgumentError):
            define_kind(Other, code, lambda r: ())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="clashes"):
        define_kind(PageDelete, 200, lambda r: ())
    with pytest.raises(InvalidArgumentError, match="define_kind"):
        bind_engine(Other, lambda s, r: None, lambda s, r: None)
    with pytest.raises(InvalidArgumentError, match="define_kind"):
        bind_codec(Other, lambda r: [], lambda b, w: None)
    assert Other not in KINDS and missing_entries() == []


# -- a kind added through the table ------------------------------------------------------

@dataclass(slots=True, eq=True)
class Tag(Record):
    """Test kind: sets the page's metadata key ``"tag"`` to ``label``."""

    page_id: int
    label: str


_TAG_CODE = 201
_TAG = struct.Struct("<BQqQH")


def _apply_tag(state: MMSBState, rec: Tag) -> None:
    meta = dict(state.table.meta.get(rec.page_id, {}))
    meta["tag"] = rec.label
    state.table.meta[rec.page_id] = meta


def _check_tag(state: MMSBState, rec: Tag) -> str | None:
    return None if state.table.is_live(rec.page_id) else f"a tag of missing page {rec.page_id}"


def _encode_tag(rec: Tag) -> list[Any]:
    raw = rec.label.encode()
    return [_TAG.pack(_TAG_CODE, rec.lsn, rec.timestamp, rec.page_id, len(raw)), raw]


def _decode_tag(buf: memoryview, what: str) -> Tag:
    if len(buf) < _TAG.size:
        raise SerializationError(f"{what}: a tag record is truncated")
    _code, lsn, ts, pid, n = _TAG.unpack_from(buf, 0)
    if len(buf) != _TAG.size + n:
        raise SerializationError(f"{what}: a tag record has the wrong length")
    return Tag(pid, bytes(buf[_TAG.size:]).decode(), lsn=lsn, timestamp=ts)


@pytest.fixture
def tag_kind() -> Iterator[None]:
    define_kind(Tag, _TAG_CODE, lambda r: (r.page_id,))
    bind_engine(Tag, _apply_tag, _check_tag)
    bind_codec(Tag, _encode_tag, _decode_tag)
    assert missing_entries() == []
    try:
        yield
    finally:
        del KINDS[Tag], KIND_CODES[_TAG_CODE]


def _tag(state: MMSBState, pid: int, label: str) -> None:
    state.enter()
    try:
        state.commit(Tag(pid, label))
    finally:
        state.leave()


def test_a_new_kind_goes_through_log_replay_checkpoint_and_recovery(tag_kind: None,
                                                                      tmp_path: Any) -> None:
    s = mmsb.mmsb_start(path=tmp_path / "bus")
    p = mmsb.create_page(s, 32)
    mmsb.write_page(s, p.id, 0, b"hello")
    _tag(s, p.id, "first")
    mmsb.write_page(s, p.id, 4, b"!")
    assert s.pages[p.id].metadata["tag"] == "first"
    assert mmsb.verify_state_consistency(s)
    lsn_tag = next(r.lsn for r in s.log.records if isinstance(r, Tag))
    before = mmsb.replay_to_lsn(s, lsn_tag - 1)
    assert "tag" not in before.pages[p.id].metadata
    assert mmsb.replay_to_lsn(s, lsn_tag).pages[p.id].metadata["tag"] == "first"
    # Recovery from the write-ahead log (a reader beside the live writer) …
    ro = mmsb.open_readonly(tmp_path / "bus")
    assert ro.pages[p.id].metadata["tag"] == "first"
    tags = [r for r in ro.log.records if isinstance(r, Tag)]
    assert [(r.page_id, r.label, r.lsn) for r in tags] == [(p.id, "first", lsn_tag)]
    ro.close()
    # … and from a checkpoint's log section.
    mmsb.mmsb_stop(s)
    again = mmsb.mmsb_start(path=tmp_path / "bus")
    assert again.pages[p.id].metadata["tag"] == "first"
    assert any(isinstance(r, Tag) and r.label == "first" for r in again.log.records)
    assert mmsb.query_page(again, p.id)[:6] == b"hell!\0"
    assert mmsb.verify_state_consistency(again)
    mmsb.mmsb_stop(again)


def test_a_new_kind_is_checked_before_recovery_applies_it(tag_kind: None, tmp_path: Any) -> None:
    s = MMSBState()
    mmsb.create_page(s, 8)
    assert s.check_record(Tag(1, "x")) is None
    assert s.check_record(Tag(9, "x")) == "a tag of missing page 9"
    with pytest.raises(MMSBError):
        kind_of(object())
