"""Pages: creation, writes, queries, deletion, resize, clone, handles, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

import mmsb
from conftest import assert_unchanged, needs_no_cuda, new_state, page_ids, snapshot

CPU_LOCATIONS = (mmsb.PageLocation.CPU, "cpu")


# --------------------------------------------------------------------------- create


def test_create_page_positional_size(state) -> None:
    p = mmsb.create_page(state, 1024)
    assert isinstance(p, mmsb.Page)
    assert p.size == 1024
    assert p.epoch == 0
    assert mmsb.query_page(state, p.id) == bytes(1024)
    assert bytes(p.data) == bytes(1024)
    assert p.location in CPU_LOCATIONS


def test_create_page_keyword_size(state) -> None:
    p = mmsb.create_page(state, size=16)
    assert p.size == 16


def test_default_size_from_config() -> None:
    s = new_state(page_size_default=128)
    p = mmsb.create_page(s)
    assert p.size == 128
    assert mmsb.query_page(s, p.id) == bytes(128)


def test_default_size_is_4096(state) -> None:
    assert mmsb.MMSBConfig().page_size_default == 4096
    assert mmsb.create_page(state).size == 4096


def test_ids_start_at_one_and_increase(state) -> None:
    ids = [mmsb.create_page(state, 8).id for _ in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert all(isinstance(i, int) for i in ids)


def test_ids_never_reused_after_delete(state) -> None:
    a = mmsb.create_page(state, 8)
    b = mmsb.create_page(state, 8)
    mmsb.delete_page(state, b.id)
    mmsb.delete_page(state, a.id)
    c = mmsb.create_page(state, 8)
    assert c.id == 3
    assert c.id not in (a.id, b.id)


def test_create_with_location_forms(state) -> None:
    a = mmsb.create_page(state, 8, location="cpu")
    b = mmsb.create_page(state, 8, location=mmsb.PageLocation.CPU)
    assert a.location in CPU_LOCATIONS and b.location in CPU_LOCATIONS


def test_create_with_metadata(state) -> None:
    p = mmsb.create_page(state, 8, metadata={"name": "x", "n": 3, "tags": [1, 2]})
    assert p.metadata["name"] == "x"
    assert p.metadata["n"] == 3
    assert list(p.metadata["tags"]) == [1, 2]


def test_create_pages_bulk(state) -> None:
    first = mmsb.create_page(state, 4)
    pages = mmsb.create_pages(state, 5, 64)
    assert len(pages) == 5
    ids = [p.id for p in pages]
    assert ids == list(range(first.id + 1, first.id + 6))
    for p in pages:
        assert p.size == 64 and p.epoch == 0
        assert mmsb.query_page(state, p.id) == bytes(64)
    assert page_ids(state) == [first.id, *ids]
    assert mmsb.verify_state_consistency(state)
    # replay of the log alone rebuilds the bulk-created pages
    r = mmsb.replay_to_lsn(state, state.last_lsn)
    assert page_ids(r) == page_ids(state)


def test_create_pages_default_size() -> None:
    s = new_state(page_size_default=32)
    pages = mmsb.create_pages(s, 3)
    assert [p.size for p in pages] == [32, 32, 32]


@pytest.mark.parametrize("bad", [0, -1, "x", 1.5, b"8"])
def test_create_page_bad_size(state, bad) -> None:
    mmsb.create_page(state, 8)
    before = snapshot(state)
    with pytest.raises(ValueError) as ei:
        mmsb.create_page(state, bad)
    assert isinstance(ei.value, mmsb.MMSBError)
    assert_unchanged(state, before)


@pytest.mark.parametrize("bad_n", [-1, "3", 2.5])
def test_create_pages_bad_count(state, bad_n) -> None:
    before = snapshot(state)
    with pytest.raises(ValueError) as ei:
        mmsb.create_pages(state, bad_n, 8)
    assert isinstance(ei.value, mmsb.MMSBError)
    assert_unchanged(state, before)


@pytest.mark.parametrize("bad", [0, -8, "big"])
def test_create_pages_bad_size(state, bad) -> None:
    before = snapshot(state)
    with pytest.raises(ValueError):
        mmsb.create_pages(state, 3, bad)
    assert_unchanged(state, before)


@pytest.mark.parametrize("loc", ["tpu", "CPUX", "", 42])
def test_unknown_location_refused(state, loc) -> None:
    mmsb.create_page(state, 8)
    before = snapshot(state)
    with pytest.raises(mmsb.UnsupportedLocationError):
        mmsb.create_page(state, 8, location=loc)
    assert_unchanged(state, before)
    # the id was not consumed either
    assert mmsb.create_page(state, 8).id == 2


@needs_no_cuda
@pytest.mark.parametrize("loc", ["gpu", "unified", mmsb.PageLocation.GPU, mmsb.PageLocation.UNIFIED])
def test_gpu_location_without_cuda_refused(state, loc) -> None:
    mmsb.create_page(state, 8)
    before = snapshot(state)
    with pytest.raises(mmsb.GPUMemoryError):
        mmsb.create_page(state, 8, location=loc)
    assert_unchanged(state, before)
    with pytest.raises(mmsb.GPUMemoryError):
        mmsb.create_pages(state, 2, 8, location=loc)
    assert_unchanged(state, before)


@needs_no_cuda
def test_migrate_to_gpu_without_cuda_refused(state) -> None:
    p = mmsb.create_page(state, 8)
    mmsb.update_page(state, p.id, b"abcdefgh")
    before = snapshot(state)
    for loc in ("gpu", "unified"):
        with pytest.raises(mmsb.GPUMemoryError):
            mmsb.migrate_page(state, p.id, loc)
        assert_unchanged(state, before)


def test_migrate_bad_location_and_unknown_page(state) -> None:
    p = mmsb.create_page(state, 8)
    before = snapshot(state)
    with pytest.raises(mmsb.UnsupportedLocationError):
        mmsb.migrate_page(state, p.id, "tape")
    assert_unchanged(state, before)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.migrate_page(state, 77, "cpu")
    assert_unchanged(state, before)


def test_migrate_cpu_to_cpu_keeps_page(state) -> None:
    p = mmsb.create_page(state, 8)
    mmsb.update_page(state, p.id, b"12345678")
    q = mmsb.migrate_page(state, p.id, "cpu")
    assert q.id == p.id
    assert mmsb.query_page(state, p.id) == b"12345678"
    assert q.location in CPU_LOCATIONS


# --------------------------------------------------------------------------- update / write


def test_update_page_state_form(state) -> None:
    p = mmsb.create_page(state, 8)
    r = mmsb.update_page(state, p.id, b"abcdefgh")
    assert isinstance(r, mmsb.Page) and r.id == p.id
    assert mmsb.query_page(state, p.id) == b"abcdefgh"
    assert p.epoch == 1
    assert len(state.tlog) == 1


def test_update_page_handle_form(state) -> None:
    p = mmsb.create_page(state, 4)
    r = mmsb.update_page(p, b"wxyz")
    assert r.id == p.id
    assert mmsb.query_page(state, p.id) == b"wxyz"
    assert p.epoch == 1
    mmsb.update_page(p, b"wxyQ", source="tool")
    assert p.epoch == 2
    assert state.tlog[-1].source == "tool"


@pytest.mark.parametrize("conv", [bytes, bytearray, memoryview,
                                  lambda b: np.frombuffer(b, dtype=np.uint8)])
def test_update_page_accepts_bytes_like(state, conv) -> None:
    p = mmsb.create_page(state, 6)
    mmsb.update_page(state, p.id, conv(b"qwerty"))
    assert mmsb.query_page(state, p.id) == b"qwerty"


def test_update_records_only_changed_bytes(state) -> None:
    p = mmsb.create_page(state, 100)
    data = bytearray(100)
    data[3] = 7
    data[50] = 9
    mmsb.update_page(state, p.id, bytes(data))
    d = state.tlog[-1]
    assert np.flatnonzero(np.asarray(d.mask, dtype=bool)).tolist() == [3, 50]
    assert mmsb.delta_byte_count(d) == 2
    assert d.page_id == p.id and d.base_epoch == 0 and d.epoch == 1
    assert d.source == "api"


def test_unchanged_update_records_nothing(state) -> None:
    p = mmsb.create_page(state, 8)
    mmsb.update_page(state, p.id, b"abcdefgh")
    before = snapshot(state)
    mmsb.update_page(state, p.id, b"abcdefgh")
    assert_unchanged(state, before)
    assert p.epoch == 1
    # zero bytes onto a zero page: also nothing
    q = mmsb.create_page(state, 8)
    before = snapshot(state)
    mmsb.update_page(state, q.id, bytes(8))
    assert_unchanged(state, before)
    assert q.epoch == 0


def test_update_wrong_length_refused(state) -> None:
    p = mmsb.create_page(state, 8)
    mmsb.update_page(state, p.id, b"abcdefgh")
    before = snapshot(state)
    for bad in (b"", b"short", b"x" * 9, b"x" * 800):
        with pytest.raises(mmsb.InvalidDeltaError):
            mmsb.update_page(state, p.id, bad)
        assert_unchanged(state, before)


def test_update_unknown_page_refused(state) -> None:
    mmsb.create_page(state, 8)
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.update_page(state, 99, b"abcdefgh")
    assert_unchanged(state, before)


def test_update_via_stale_handle_of_deleted_page(state) -> None:
    p = mmsb.create_page(state, 4)
    q = mmsb.create_page(state, 4)
    mmsb.delete_page(state, p.id)
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.update_page(p, b"abcd")
    assert_unchanged(state, before)
    assert q.id in state.pages


def test_write_page(state) -> None:
    p = mmsb.create_page(state, 10)
    r = mmsb.write_page(state, p.id, 3, b"abc")
    assert r.id == p.id
    assert mmsb.query_page(state, p.id) == b"\x00\x00\x00abc\x00\x00\x00\x00"
    assert p.epoch == 1
    d = state.tlog[-1]
    assert np.flatnonzero(np.asarray(d.mask, dtype=bool)).tolist() == [3, 4, 5]
    mmsb.write_page(state, p.id, 7, b"XYZ")  # exactly up to the end
    assert mmsb.query_page(state, p.id) == b"\x00\x00\x00abc\x00XYZ"
    assert p.epoch == 2


def test_write_page_records_only_differing_bytes(state) -> None:
    p = mmsb.create_page(state, 10)
    mmsb.write_page(state, p.id, 0, b"abcd")
    mmsb.write_page(state, p.id, 0, b"abXd")
    d = state.tlog[-1]
    assert np.flatnonzero(np.asarray(d.mask, dtype=bool)).tolist() == [2]
    before = snapshot(state)
    mmsb.write_page(state, p.id, 0, b"abXd")  # no change: nothing logged
    assert_unchanged(state, before)
    assert p.epoch == 2


@pytest.mark.parametrize("offset,data", [(8, b"abc"), (10, b"a"), (11, b""), (0, b"x" * 11),
                                         (2**40, b"a")])
def test_write_page_out_of_range_refused(state, offset, data) -> None:
    p = mmsb.create_page(state, 10)
    mmsb.write_page(state, p.id, 0, b"seed")
    before = snapshot(state)
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.write_page(state, p.id, offset, data)
    assert_unchanged(state, before)


def test_write_page_negative_offset_refused(state) -> None:
    p = mmsb.create_page(state, 10)
    before = snapshot(state)
    with pytest.raises((mmsb.InvalidDeltaError, mmsb.InvalidArgumentError)):
        mmsb.write_page(state, p.id, -1, b"ab")
    assert_unchanged(state, before)


def test_write_page_unknown_page_refused(state) -> None:
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.write_page(state, 1, 0, b"ab")
    assert_unchanged(state, before)


def test_query_page_returns_copy(state) -> None:
    p = mmsb.create_page(state, 4)
    mmsb.update_page(state, p.id, b"abcd")
    got = mmsb.query_page(state, p.id)
    assert isinstance(got, bytes)
    mmsb.update_page(state, p.id, b"zzzz")
    assert got == b"abcd"
    assert mmsb.query_page(state, p.id) == b"zzzz"


def test_query_unknown_page(state) -> None:
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.query_page(state, 1)


# --------------------------------------------------------------------------- delete


def test_delete_page(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.update_page(state, a.id, b"aaaa")
    mmsb.delete_page(state, a.id)
    assert a.id not in state.pages
    assert page_ids(state) == [b.id]
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.query_page(state, a.id)
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.delete_page(state, a.id)
    assert_unchanged(state, before)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.delete_page(state, 1234)
    assert_unchanged(state, before)
    assert mmsb.verify_state_consistency(state)


# --------------------------------------------------------------------------- resize


def test_resize_grow_keeps_prefix_zero_fills(state) -> None:
    p = mmsb.create_page(state, 4)
    mmsb.update_page(state, p.id, b"abcd")
    r = mmsb.resize_page(state, p.id, 10)
    assert r.id == p.id
    assert p.size == 10 and r.size == 10
    assert mmsb.query_page(state, p.id) == b"abcd" + bytes(6)
    assert mmsb.verify_state_consistency(state)


def test_resize_shrink_keeps_prefix(state) -> None:
    p = mmsb.create_page(state, 8)
    mmsb.update_page(state, p.id, b"abcdefgh")
    mmsb.resize_page(state, p.id, 3)
    assert mmsb.query_page(state, p.id) == b"abc"
    assert p.size == 3
    mmsb.resize_page(state, p.id, 6)  # regrow: the dropped tail does not come back
    assert mmsb.query_page(state, p.id) == b"abc\x00\x00\x00"
    assert mmsb.verify_state_consistency(state)


def test_resize_then_write(state) -> None:
    p = mmsb.create_page(state, 4)
    mmsb.resize_page(state, p.id, 8)
    e = p.epoch
    mmsb.write_page(state, p.id, 6, b"zz")
    assert mmsb.query_page(state, p.id) == bytes(6) + b"zz"
    assert p.epoch == e + 1
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.update_page(state, p.id, b"abcd")  # old size no longer fits


@pytest.mark.parametrize("bad", [0, -1, "x", 1.5])
def test_resize_bad_size_refused(state, bad) -> None:
    p = mmsb.create_page(state, 4)
    mmsb.update_page(state, p.id, b"abcd")
    before = snapshot(state)
    with pytest.raises(ValueError) as ei:
        mmsb.resize_page(state, p.id, bad)
    assert isinstance(ei.value, mmsb.MMSBError)
    assert_unchanged(state, before)


def test_resize_unknown_page_refused(state) -> None:
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.resize_page(state, 5, 10)
    assert_unchanged(state, before)


# --------------------------------------------------------------------------- clone


def test_clone_page(state) -> None:
    p = mmsb.create_page(state, 6, metadata={"k": "v"})
    mmsb.update_page(state, p.id, b"abcdef")
    mmsb.write_page(state, p.id, 0, b"Z")
    c = mmsb.clone_page(state, p.id)
    assert c.id != p.id and c.id > p.id
    assert mmsb.query_page(state, c.id) == b"Zbcdef"
    assert c.epoch == p.epoch == 2
    assert c.size == 6
    assert dict(c.metadata) == dict(p.metadata) == {"k": "v"}
    # independent afterwards
    mmsb.write_page(state, c.id, 0, b"Q")
    assert mmsb.query_page(state, p.id) == b"Zbcdef"
    assert p.epoch == 2
    assert mmsb.verify_state_consistency(state)


def test_clone_unknown_refused(state) -> None:
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.clone_page(state, 3)
    assert_unchanged(state, before)


# --------------------------------------------------------------------------- handles


def test_page_data_is_read_only(state) -> None:
    p = mmsb.create_page(state, 8)
    mmsb.update_page(state, p.id, b"abcdefgh")
    before = snapshot(state)
    with pytest.raises(ValueError):
        p.data[0] = 1
    with pytest.raises(ValueError):
        view = p.data
        view[2:4] = b"zz"
    assert_unchanged(state, before)
    assert mmsb.query_page(state, p.id) == b"abcdefgh"


def test_page_data_live_after_updates_and_resize(state) -> None:
    p = mmsb.create_page(state, 4)
    assert bytes(p.data) == bytes(4)
    mmsb.update_page(state, p.id, b"abcd")
    assert bytes(p.data) == b"abcd"
    mmsb.write_page(state, p.id, 1, b"X")
    assert bytes(p.data) == b"aXcd"
    mmsb.resize_page(state, p.id, 7)
    assert bytes(p.data) == b"aXcd\x00\x00\x00"
    assert len(p.data) == 7
    mmsb.write_page(state, p.id, 6, b"!")
    assert bytes(p.data) == b"aXcd\x00\x00!"
    # a handle obtained from state.pages sees the same bytes
    assert bytes(state.pages[p.id].data) == bytes(p.data)


def test_page_mask_tracks_written_bytes(state) -> None:
    p = mmsb.create_page(state, 12)
    m = np.asarray(p.mask, dtype=bool)
    assert m.shape == (12,) and not m.any()
    mmsb.write_page(state, p.id, 2, b"ab")
    mmsb.write_page(state, p.id, 9, b"c")
    m = np.asarray(p.mask, dtype=bool)
    assert np.flatnonzero(m).tolist() == [2, 3, 9]


def test_page_metadata_read_only_and_set_metadata(state) -> None:
    p = mmsb.create_page(state, 4, metadata={"a": 1})
    before = snapshot(state)
    with pytest.raises(TypeError):
        p.metadata["b"] = 2  # type: ignore[index]
    assert_unchanged(state, before)
    mmsb.set_metadata(state, p.id, "b", [1, "two", None])
    assert p.metadata["b"] == [1, "two", None]
    mmsb.update_metadata(state, p.id, {"c": 3.5})
    assert dict(p.metadata) == {"a": 1, "b": [1, "two", None], "c": 3.5}
    mmsb.update_metadata(state, p.id, {"only": True}, replace=True)
    assert dict(p.metadata) == {"only": True}
    assert mmsb.verify_state_consistency(state)
    r = mmsb.replay_to_lsn(state, state.last_lsn)
    assert dict(r.pages[p.id].metadata) == {"only": True}


@pytest.mark.parametrize("bad", [object(), {1, 2}, lambda: 0, complex(1, 2)])
def test_unencodable_metadata_refused(state, bad) -> None:
    p = mmsb.create_page(state, 4, metadata={"ok": 1})
    before = snapshot(state)
    with pytest.raises(mmsb.MMSBError):
        mmsb.set_metadata(state, p.id, "bad", bad)
    assert_unchanged(state, before)
    with pytest.raises(mmsb.MMSBError):
        mmsb.update_metadata(state, p.id, {"fine": 1, "bad": bad})
    assert_unchanged(state, before)
    with pytest.raises(mmsb.MMSBError):
        mmsb.create_page(state, 4, metadata={"bad": bad})
    assert_unchanged(state, before)


def test_set_metadata_unknown_page(state) -> None:
    before = snapshot(state)
    with pytest.raises(mmsb.PageNotFoundError):
        mmsb.set_metadata(state, 9, "k", 1)
    assert_unchanged(state, before)


def test_state_pages_mapping(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 8)
    assert len(state.pages) == 2
    assert a.id in state.pages and b.id in state.pages
    assert 999 not in state.pages
    assert sorted(state.pages) == [a.id, b.id]
    assert state.pages[b.id].id == b.id
    assert state.pages[b.id].size == 8
    with pytest.raises(KeyError):
        state.pages[999]
    got = dict(state.pages.items())
    assert set(got) == {a.id, b.id}
    mmsb.delete_page(state, a.id)
    assert len(state.pages) == 1 and a.id not in state.pages


def test_query_page_reads_through_kept_buffer_views_dropped_with_their_buffer() -> None:
    """query_page copies out through a memoryview of the page's buffer, kept while the
    buffer is: a large page's own buffer, freed by its deletion, takes its view with it,
    and the pages made after it read their own bytes."""
    from mmsb._core.arena import CHUNK_SHIFT

    s = mmsb.MMSBState()
    small = mmsb.create_page(s, 16)
    big = mmsb.create_page(s, 1 << 25)  # past a quarter buffer: a buffer of its own
    mmsb.write_page(s, small.id, 0, b"small")
    mmsb.write_page(s, big.id, 5, b"big")
    assert mmsb.query_page(s, small.id)[:5] == b"small"
    assert mmsb.query_page(s, big.id)[5:8] == b"big"
    index = int(s.table.addr[big.id]) >> CHUNK_SHIFT
    assert index in s.arena.byte_views
    mmsb.delete_page(s, big.id)
    assert index not in s.arena.byte_views and s.arena.chunk(index) is None
    again = mmsb.create_page(s, 1 << 25)
    mmsb.write_page(s, again.id, 0, b"again")
    assert mmsb.query_page(s, again.id)[:5] == b"again"
    assert mmsb.query_page(s, small.id)[:5] == b"small"
