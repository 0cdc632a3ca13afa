"""Graph closure, cycles and reverse postorder; standalone page images; compact deltas;
subscription counting, clearing, and the logging and debug subscribers."""

from __future__ import annotations

import io
import logging
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmsb
from conftest import assert_unchanged, new_state, snapshot
from mmsb._core.delta import Delta, apply_delta, sparse_enough
from mmsb._storage.codec import MAX_PAGE_ID, MAX_PAGE_SIZE, crc32c

PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DATA = mmsb.EdgeType.DATA


def hand_graph(edges: list[tuple[int, int]]) -> mmsb.ShadowPageGraph:
    """A free-standing graph with exactly these edges, cycles allowed."""
    g = mmsb.ShadowPageGraph()
    for p, c in edges:
        g.add_edge(p, c, DATA)
    return g


def reachable(g: mmsb.ShadowPageGraph, start: int) -> set[int]:
    """Brute force: ids reachable from ``start`` by one or more edges."""
    seen: set[int] = set()
    todo = list(g.children.get(start, ()))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(g.children.get(n, ()))
    return seen


edge_lists = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), max_size=40)


# ------------------------------------------------------------------- compute_closure


def test_closure_includes_the_starting_ids_and_everything_below() -> None:
    s = new_state()
    mmsb.create_pages(s, 7, 16)
    for p, c in [(1, 2), (1, 3), (2, 4), (3, 4), (4, 5), (6, 7)]:
        mmsb.add_dependency(s, p, c)
    assert mmsb.compute_closure(s, 1) == {1, 2, 3, 4, 5}
    assert mmsb.compute_closure(s, [3, 6]) == {3, 4, 5, 6, 7}
    assert mmsb.compute_closure(s.graph, [s.pages[5]]) == {5}
    assert mmsb.compute_closure(s, []) == set()
    assert mmsb.compute_closure(s, [2, 2, 4]) == {2, 4, 5}


@PROPS
@given(edges=edge_lists, starts=st.sets(st.integers(1, 12), max_size=4))
def test_closure_is_starts_plus_their_reachable_ids(edges: list[tuple[int, int]], starts: set[int]) -> None:
    g = hand_graph(edges)
    want = set(starts)
    for s in starts:
        want |= reachable(g, s)
    assert mmsb.compute_closure(g, starts) == want


def test_closure_refusals_name_the_problem() -> None:
    s = new_state()
    mmsb.create_pages(s, 2, 8)
    mmsb.add_dependency(s, 1, 2)
    before = snapshot(s)
    with pytest.raises(mmsb.PageNotFoundError, match="page 9 does not exist in compute_closure"):
        mmsb.compute_closure(s, [1, 9])
    with pytest.raises(mmsb.InvalidArgumentError, match="must be an int, not str"):
        mmsb.compute_closure(s, ["1"])
    with pytest.raises(mmsb.InvalidArgumentError, match="must be an int, not bool"):
        mmsb.compute_closure(s, [True])
    with pytest.raises(mmsb.InvalidArgumentError, match="iterable of ids, not str"):
        mmsb.compute_closure(s, "12")
    with pytest.raises(mmsb.InvalidArgumentError, match="takes a state or a ShadowPageGraph"):
        mmsb.compute_closure({1: [2]}, [1])
    assert_unchanged(s, before)
    # A free-standing graph has no pages to check against: any int is a node.
    assert mmsb.compute_closure(hand_graph([(10, 11)]), [10, 99]) == {10, 11, 99}


# --------------------------------------------------------------------- detect_cycles


def test_detect_cycles_is_empty_for_every_graph_the_api_builds() -> None:
    s = new_state()
    mmsb.create_pages(s, 5, 8)
    for p, c in [(1, 2), (2, 3), (1, 3), (3, 4)]:
        mmsb.add_dependency(s, p, c)
    with pytest.raises(mmsb.GraphCycleError):
        mmsb.add_dependency(s, 4, 1)
    assert mmsb.detect_cycles(s) == []
    assert mmsb.detect_cycles(s.graph) == []
    assert mmsb.detect_cycles(mmsb.ShadowPageGraph()) == []


def test_detect_cycles_reports_one_shortest_cycle_per_group() -> None:
    g = hand_graph([(5, 6), (6, 7), (7, 5), (6, 5),       # group {5,6,7}: 5 → 6 → 5 is shortest
                    (9, 9),                                # a self-edge
                    (1, 2), (2, 3), (3, 4), (4, 1),        # a ring of four
                    (4, 20), (20, 21)])                    # acyclic tail
    assert mmsb.detect_cycles(g) == [[1, 2, 3, 4], [5, 6], [9]]
    assert mmsb.has_cycle(g)


@PROPS
@given(edges=edge_lists)
def test_detect_cycles_matches_brute_force(edges: list[tuple[int, int]]) -> None:
    g = hand_graph(edges)
    cycles = mmsb.detect_cycles(g)
    on_cycle = {n for n in g.nodes if n in reachable(g, n)}
    # Each report is a real cycle, in edge order, starting at the smallest id of its group.
    for cyc in cycles:
        assert len(set(cyc)) == len(cyc)
        for a, b in zip(cyc, cyc[1:] + cyc[:1], strict=True):
            assert g.has_edge(a, b)
        group = {n for n in on_cycle if n == cyc[0] or (n in reachable(g, cyc[0]) and cyc[0] in reachable(g, n))}
        assert cyc[0] == min(group)
    # Exactly one report per strongly connected group that holds a cycle.
    firsts = [c[0] for c in cycles]
    assert firsts == sorted(firsts)
    groups = {frozenset(m for m in on_cycle if m == n or (m in reachable(g, n) and n in reachable(g, m)))
              for n in on_cycle}
    assert len(cycles) == len(groups)
    assert {c[0] for c in cycles} == {min(grp) for grp in groups}
    assert bool(cycles) == g.has_cycle()


def test_detect_cycles_refuses_what_is_not_a_graph() -> None:
    with pytest.raises(mmsb.InvalidArgumentError, match="not list"):
        mmsb.detect_cycles([(1, 2)])


# ----------------------------------------------------------------- reverse_postorder


def test_reverse_postorder_of_a_diamond() -> None:
    s = new_state()
    mmsb.create_pages(s, 5, 8)
    for p, c in [(1, 2), (1, 3), (2, 4), (3, 4)]:
        mmsb.add_dependency(s, p, c)
    # DFS from 1: 2, 4 (done), 2 (done), 3 (done), 1 (done) → postorder 4 2 3 1.
    assert mmsb.reverse_postorder(s) == [1, 3, 2, 4]
    assert mmsb.reverse_postorder(s.graph) == [1, 3, 2, 4]
    assert mmsb.reverse_postorder(mmsb.ShadowPageGraph()) == []


@PROPS
@given(edges=st.lists(st.tuples(st.integers(1, 15), st.integers(1, 15)), max_size=50))
def test_reverse_postorder_is_a_topological_order_of_a_dag(edges: list[tuple[int, int]]) -> None:
    g = hand_graph([(min(a, b), max(a, b)) for a, b in edges if a != b])   # acyclic by construction
    order = mmsb.reverse_postorder(g)
    assert sorted(order) == sorted(g.nodes)
    pos = {n: i for i, n in enumerate(order)}
    for p, c, _t in g.edges():
        assert pos[p] < pos[c]


@PROPS
@given(edges=edge_lists)
def test_reverse_postorder_covers_every_node_once_even_with_cycles(edges: list[tuple[int, int]]) -> None:
    g = hand_graph(edges)
    order = mmsb.reverse_postorder(g)
    assert sorted(order) == sorted(g.nodes)
    assert order == mmsb.reverse_postorder(g.copy())   # deterministic


def test_long_chains_need_no_recursion() -> None:
    n = 100_000
    g = mmsb.ShadowPageGraph()
    for i in range(1, n):
        g.add_edge(i, i + 1, DATA)
    assert mmsb.reverse_postorder(g) == list(range(1, n + 1))
    assert len(mmsb.compute_closure(g, [1])) == n
    assert mmsb.detect_cycles(g) == []
    g.add_edge(n, 1, DATA)   # close the ring, around the checks
    (ring,) = mmsb.detect_cycles(g)
    assert ring == list(range(1, n + 1))
    assert len(mmsb.reverse_postorder(g)) == n


def test_graph_helpers_on_a_state_graph_with_a_long_chain() -> None:
    s = new_state()
    n = 3000
    mmsb.create_pages(s, n, 8)
    for i in range(1, n):
        mmsb.add_dependency(s, i, i + 1)
    assert mmsb.reverse_postorder(s) == list(range(1, n + 1))
    assert mmsb.compute_closure(s, n - 1) == {n - 1, n}


# -------------------------------------------------------------------- page images


def _page_with_history(s: mmsb.MMSBState, size: int = 256) -> mmsb.Page:
    p = mmsb.create_page(s, size, metadata={"name": "p", "tags": [1, 2], "raw": b"\x00\x01"})
    mmsb.write_page(s, p.id, 10, b"hello")
    mmsb.write_page(s, p.id, size * 3 // 4 + 8, b"\x00\x00\x07")
    return p


def test_page_round_trip_keeps_every_field() -> None:
    s = new_state()
    p = _page_with_history(s)
    img = mmsb.deserialize_page(mmsb.serialize_page(p))
    assert isinstance(img, mmsb.PageImage)
    assert (img.id, img.page_id, img.size, img.epoch) == (p.id, p.id, p.size, p.epoch)
    assert img.location == p.location == mmsb.PageLocation.CPU
    assert dict(img.metadata) == dict(p.metadata) == {"name": "p", "tags": [1, 2], "raw": b"\x00\x01"}
    assert img.data == mmsb.query_page(s, p.id)
    assert np.array_equal(img.mask, p.mask)
    # Only bytes that changed count as written: the two zero bytes at 200 did not.
    assert img.mask[202] and img.mask[10] and not img.mask[200] and not img.mask[0]
    # Serializing the image again gives the same bytes.
    assert mmsb.serialize_page(img) == mmsb.serialize_page(p)


def test_page_image_is_detached_and_read_only() -> None:
    s = new_state()
    p = _page_with_history(s)
    blob = mmsb.serialize_page(p)
    img = mmsb.deserialize_page(blob)
    mmsb.write_page(s, p.id, 0, b"later")
    mmsb.set_metadata(s, p.id, "name", "changed")
    mmsb.delete_page(s, p.id)
    assert img.data[10:15] == b"hello" and img.data[:5] == bytes(5)
    assert img.metadata["name"] == "p"
    with pytest.raises(AttributeError, match="read-only"):
        img.epoch = 7  # type: ignore[misc]
    with pytest.raises(TypeError):
        img.metadata["name"] = "x"  # type: ignore[index]
    with pytest.raises(ValueError):
        img.mask[0] = True
    assert isinstance(img.data, bytes)
    assert mmsb.deserialize_page(blob) == img


def test_mask_forms_and_locations_round_trip() -> None:
    s = new_state()
    fresh = mmsb.create_page(s, 40)                       # nothing written
    full = mmsb.create_page(s, 40)
    mmsb.update_page(s, full.id, bytes(range(1, 41)))     # every byte written
    part = mmsb.create_page(s, 40)
    mmsb.write_page(s, part.id, 3, b"ab")                 # some bytes written
    for page, form in ((fresh, 0), (full, 1), (part, 2)):
        blob = mmsb.serialize_page(page)
        assert blob[37] == form
        img = mmsb.deserialize_page(blob)
        assert np.array_equal(img.mask, page.mask) and img.data == mmsb.query_page(s, page.id)
    unified = mmsb.PageImage(3, 4, "unified", None, b"xyz", [True, False, True])
    assert mmsb.deserialize_page(mmsb.serialize_page(unified)) == unified


def test_payload_is_compressed_only_when_it_pays() -> None:
    s = new_state()
    big = mmsb.create_page(s, 1 << 20)
    mmsb.write_page(s, big.id, 5000, b"abc" * 1000)
    blob = mmsb.serialize_page(big)
    assert blob[38] == 1 and len(blob) < 4096
    assert mmsb.deserialize_page(blob).data == mmsb.query_page(s, big.id)
    noisy = mmsb.create_page(s, 1 << 16)
    mmsb.update_page(s, noisy.id, np.random.default_rng(3).integers(0, 256, 1 << 16, dtype=np.uint8))
    blob = mmsb.serialize_page(noisy)
    assert blob[38] == 0 and len(blob) >= 52 + (1 << 16)   # random bytes: stored raw
    assert mmsb.deserialize_page(blob).data == mmsb.query_page(s, noisy.id)
    tiny = mmsb.create_page(s, 8)
    assert mmsb.serialize_page(tiny)[38] == 0


@PROPS
@given(pid=st.integers(1, MAX_PAGE_ID), epoch=st.integers(0, (1 << 63) - 1),
       loc=st.sampled_from(list(mmsb.PageLocation)), data=st.binary(min_size=1, max_size=600),
       meta=st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.integers(-9, 9),
                                                           st.text(max_size=4), st.binary(max_size=4)),
                            max_size=3),
       seed=st.integers(0, 2**32 - 1), zeros=st.booleans())
def test_any_page_image_round_trips(pid: int, epoch: int, loc: mmsb.PageLocation, data: bytes,
                                    meta: dict[str, Any], seed: int, zeros: bool) -> None:
    if zeros:
        data = bytes(len(data) * 4)
    mask = np.random.default_rng(seed).random(len(data)) < 0.5
    img = mmsb.PageImage(pid, epoch, loc, meta, data, mask)
    back = mmsb.deserialize_page(mmsb.serialize_page(img))
    assert back == img
    assert (back.id, back.epoch, back.location, back.data) == (pid, epoch, loc, data)


def test_serialize_page_refusals() -> None:
    s = new_state()
    p = _page_with_history(s)
    mmsb.delete_page(s, p.id)
    before = snapshot(s)
    with pytest.raises(mmsb.PageNotFoundError, match="serialize_page"):
        mmsb.serialize_page(p)
    with pytest.raises(mmsb.InvalidArgumentError, match="takes a Page or a PageImage, not int"):
        mmsb.serialize_page(1)  # type: ignore[arg-type]
    with pytest.raises(mmsb.InvalidArgumentError, match="takes bytes, not str"):
        mmsb.deserialize_page("MMSP")  # type: ignore[arg-type]
    assert_unchanged(s, before)


@pytest.mark.parametrize("args, match", [
    ((0, 0, "cpu", None, b"x"), "id 0 is out of range"),
    ((MAX_PAGE_ID + 1, 0, "cpu", None, b"x"), "out of range"),
    ((True, 0, "cpu", None, b"x"), "id must be an int, not bool"),
    ((1, -1, "cpu", None, b"x"), "epoch -1 is out of range"),
    ((1, 0, "cpu", None, b""), "a page holds 1.."),
    ((1, 0, "cpu", None, "text"), "must be bytes-like, not str"),
    ((1, 0, "cpu", None, b"xy", [True]), "one bool per byte"),
    ((1, 0, "cpu", None, b"xy", [2, 0]), "bools"),
])
def test_page_image_refuses_fields_it_cannot_store(args: tuple, match: str) -> None:
    with pytest.raises(mmsb.InvalidArgumentError, match=match):
        mmsb.PageImage(*args)


def test_page_image_refuses_bad_location_and_metadata() -> None:
    with pytest.raises(mmsb.UnsupportedLocationError):
        mmsb.PageImage(1, 0, "disk", None, b"x")
    with pytest.raises(mmsb.MetadataError, match="keys must be str"):
        mmsb.PageImage(1, 0, "cpu", {1: 2}, b"x")
    with pytest.raises(mmsb.MetadataError, match="cannot encode"):
        mmsb.PageImage(1, 0, "cpu", {"f": object()}, b"x")


# Hostile bytes. ``forge`` builds a blob field by field with a correct CRC, so the
# reader's range checks (not its checksum) must catch each bad value.

HEAD = struct.Struct("<4sHHIQQQBBBBIQ")


def forge(*, magic: bytes = b"MMSP", version: int = 1, zero16: int = 0, pid: int = 1,
          size: int = 4, epoch: int = 0, loc: int = 0, form: int = 0, codec: int = 0,
          zero8: int = 0, meta: bytes = b"", payload: bytes = b"abcd",
          stored_len: int | None = None, meta_len: int | None = None) -> bytes:
    n_stored = len(payload) if stored_len is None else stored_len
    n_meta = len(meta) if meta_len is None else meta_len
    head = HEAD.pack(magic, version, zero16, 0, pid, size, epoch, loc, form, codec, zero8,
                     n_meta, n_stored)
    crc = crc32c(head[12:] + meta + payload)
    return head[:8] + struct.pack("<I", crc) + head[12:] + meta + payload


def test_forge_matches_the_writer() -> None:
    img = mmsb.PageImage(1, 0, "cpu", None, b"abcd")
    assert forge() == mmsb.serialize_page(img)


def test_the_specification_example_is_what_the_writer_produces() -> None:
    s = new_state()
    p = mmsb.create_page(s, 16)
    mmsb.write_page(s, p.id, 4, b"hi")
    want = bytes.fromhex(
        "4d4d5350 0100 0000 f6ce1150"
        "0100000000000000 1000000000000000 0100000000000000"
        "00 02 00 00 00000000 1200000000000000"
        "0c00 00000000686900000000000000000000")
    assert mmsb.serialize_page(p) == want
    assert crc32c(want[12:]) == 0x5011CEF6


@pytest.mark.parametrize("fields, match", [
    ({"magic": b"MMSD"}, "bad magic"),
    ({"version": 2}, "unsupported page format version 2 \\(this build reads 1\\)"),
    ({"zero16": 1}, "reserved fields are not zero"),
    ({"zero8": 1}, "reserved fields are not zero"),
    ({"pid": 0}, "page id 0 is out of range"),
    ({"pid": MAX_PAGE_ID + 1}, "page id .* is out of range"),
    ({"size": 0, "payload": b""}, "page size 0 is out of range"),
    ({"size": MAX_PAGE_SIZE + 1}, "page size .* is out of range"),
    ({"epoch": 1 << 63}, "epoch .* is out of range"),
    ({"loc": 3}, "unknown location 3"),
    ({"form": 3}, "unknown mask form 3"),
    ({"codec": 2}, "unknown payload codec 2"),
    ({"size": 5}, "raw payload is 4 bytes where size and mask imply 5"),
    ({"size": MAX_PAGE_SIZE}, "raw payload is 4 bytes where size and mask imply"),
    ({"form": 2}, "raw payload is 4 bytes where size and mask imply 5"),
    ({"meta": b"\x93\x01\x02\x03"}, "page metadata must be a map with str keys"),
    ({"meta": b"\x81\x01\x02"}, "page metadata must be a map with str keys"),
    ({"meta": b"\xc1"}, "page metadata is not valid msgpack"),
    ({"meta": b"\x81\xa1k\xc7\x01\x05x"}, "page metadata is not valid msgpack"),
    ({"codec": 1, "size": MAX_PAGE_SIZE, "payload": b"\x28\xb5\x2f\xfd" + bytes(20)},
     "would inflate to .* more than this format allows"),
    ({"codec": 1, "payload": b"not zstd at all"}, "the compressed payload does not decompress"),
    ({"codec": 1, "payload": zstandard.ZstdCompressor().compress(b"abc")},
     "the compressed payload decompresses to 3 bytes, not the declared 4"),
    ({"codec": 1, "payload": zstandard.ZstdCompressor().compress(b"abcde")},
     "the compressed payload decompresses to more than its declared 4 bytes"),
    ({"codec": 1, "payload": zstandard.ZstdCompressor().compress(b"abcd" * 40)[:-3]},
     "compressed payload"),
])
def test_hostile_fields_are_refused_by_name(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(mmsb.SerializationError, match=match):
        mmsb.deserialize_page(forge(**fields))


def test_declared_lengths_must_match_the_bytes_given() -> None:
    good = forge(meta=b"\x80")
    with pytest.raises(mmsb.SerializationError, match="trailing bytes"):
        mmsb.deserialize_page(good + b"\x00")
    with pytest.raises(mmsb.SerializationError, match="declares .*truncated"):
        mmsb.deserialize_page(forge(stored_len=1 << 40))
    with pytest.raises(mmsb.SerializationError, match="declares .*truncated"):
        mmsb.deserialize_page(forge(meta_len=(1 << 32) - 1))


def test_every_truncation_and_every_byte_flip_is_refused() -> None:
    s = new_state()
    blob = mmsb.serialize_page(_page_with_history(s, size=64))
    for n in range(len(blob)):
        with pytest.raises(mmsb.SerializationError):
            mmsb.deserialize_page(blob[:n])
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            with pytest.raises(mmsb.SerializationError):
                mmsb.deserialize_page(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), splice=st.integers(0, 60))
def test_random_and_spliced_bytes_raise_only_serialization_error(raw: bytes, splice: int) -> None:
    for blob in (raw, forge()[:splice] + raw, b"MMSP\x01\x00" + raw):
        try:
            mmsb.deserialize_page(blob)
        except mmsb.SerializationError:
            pass


def test_hostile_sizes_allocate_little() -> None:
    blobs = [forge(size=MAX_PAGE_SIZE, form=2),
             forge(codec=1, size=MAX_PAGE_SIZE, payload=zstandard.ZstdCompressor().compress(bytes(1 << 16)))]
    tracemalloc.start()
    try:
        for blob in blobs:
            with pytest.raises(mmsb.SerializationError):
                mmsb.deserialize_page(blob)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


# -------------------------------------------------------------------- compress_delta


def _snapshot_delta(d: Delta) -> tuple:
    arrays = tuple(None if a is None else (a.dtype.str, a.tobytes())
                   for a in (d._idx, d._vals, d._data, d._mask))
    return (d.id, d.page_id, d.base_epoch, d.epoch, d.lsn, d.timestamp, d.source, d.page_size,
            d._exact, arrays)


def _check_compact(d: Delta, c: Delta) -> None:
    """``c`` follows the representation rule and holds no array of ``d``."""
    n = c.count
    assert c.is_sparse == bool(sparse_enough(n, c.page_size))
    if c.is_sparse:
        assert (np.diff(c.indices) > 0).all()
    else:
        assert (c._mask is None) == (n == c.page_size)
        assert not c._exact
        if c._mask is not None:
            assert not c._data[~c._mask].any()
    for a in (c._idx, c._vals, c._data, c._mask):
        for b in (d._idx, d._vals, d._data, d._mask):
            if a is not None and b is not None:
                assert not np.shares_memory(a, b)
    assert (c.id, c.page_id, c.base_epoch, c.epoch, c.lsn, c.timestamp, c.source, c.page_size) == \
        (d.id, d.page_id, d.base_epoch, d.epoch, d.lsn, d.timestamp, d.source, d.page_size)


@st.composite
def page_and_delta(draw: Any) -> tuple[np.ndarray, Delta]:
    size = draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    page = rng.integers(0, 256, size, dtype=np.uint8)
    kind = draw(st.sampled_from(["sparse", "unsorted", "full", "masked", "exact"]))
    frac = draw(st.floats(0.0, 1.0))
    mask = rng.random(size) < frac
    vals = rng.integers(0, 256, size, dtype=np.uint8)
    if kind == "sparse":
        idx = np.flatnonzero(mask)
        d = Delta(4, 2, 6, 7, "api", size, idx, vals[idx].copy(), None, None, lsn=9, timestamp=11)
    elif kind == "unsorted":
        idx = rng.integers(0, size, draw(st.integers(0, 2 * size)))
        d = Delta(4, 2, 6, 7, "api", size, idx, rng.integers(0, 256, idx.size, dtype=np.uint8),
                  None, None)
    elif kind == "full":
        d = Delta(4, 2, 6, 7, "api", size, None, None, vals, None)
    elif kind == "masked":
        d = Delta(4, 2, 6, 7, "api", size, None, None, np.where(mask, vals, 0).astype(np.uint8),
                  mask)
    else:   # the page's whole new content, unchanged bytes included
        d = Delta(4, 2, 6, 7, "api", size, None, None, np.where(mask, vals, page).astype(np.uint8),
                  mask, exact=True)
    return page, d


@PROPS
@given(pd=page_and_delta())
def test_compressed_delta_has_the_same_effect(pd: tuple[np.ndarray, Delta]) -> None:
    page, d = pd
    before = _snapshot_delta(d)
    c = mmsb.compress_delta(d)
    assert _snapshot_delta(d) == before            # the input is untouched
    _check_compact(d, c)
    want, got = page.copy(), page.copy()
    apply_delta(want, d)
    apply_delta(got, c)
    assert np.array_equal(want, got)
    again = mmsb.compress_delta(c)
    assert again == c and again.is_sparse == c.is_sparse


def test_compress_delta_shrinks_a_dense_delta_of_few_bytes() -> None:
    mask = np.zeros(4096, dtype=bool)
    mask[100:110] = True
    data = np.zeros(4096, dtype=np.uint8)
    data[100:110] = 7
    d = Delta(1, 1, 0, 1, "api", 4096, None, None, data, mask)
    c = mmsb.compress_delta(d)
    assert c.is_sparse and c.nbytes < d.nbytes // 50
    assert len(mmsb.serialize_delta(c)) < len(mmsb.serialize_delta(d)) // 40


def test_compressed_delta_routes_like_the_original() -> None:
    s = new_state()
    other = new_state()
    for st_ in (s, other):
        mmsb.create_page(st_, 64)
    mask = np.zeros(64, dtype=bool)
    mask[[1, 2, 3, 40]] = True
    data = np.arange(64, dtype=np.uint8)
    mmsb.route_delta(s, mmsb.create_delta(s, 1, mask, data))
    mmsb.route_delta(other, mmsb.compress_delta(mmsb.create_delta(other, 1, mask, data)))
    assert mmsb.query_page(s, 1) == mmsb.query_page(other, 1)
    assert mmsb.verify_state_consistency(other)


@pytest.mark.parametrize("make, match", [
    (lambda: Delta(1, 1, 0, 1, "api", 8, np.array([8]), np.array([1], np.uint8), None, None),
     "position lies outside the page's 8 bytes"),
    (lambda: Delta(1, 1, 0, 1, "api", 8, np.array([-1]), np.array([1], np.uint8), None, None),
     "position lies outside"),
    (lambda: Delta(1, 1, 0, 1, "api", 8, np.array([1, 2]), np.array([1], np.uint8), None, None),
     "as many values as positions"),
    (lambda: Delta(1, 1, 0, 1, "api", 8, np.array([1]), np.array([300]), None, None),
     "values must be uint8"),
    (lambda: Delta(1, 1, 0, 1, "api", 8, np.array([1.5]), np.array([1], np.uint8), None, None),
     "positions must be integers"),
    (lambda: Delta(1, 1, 0, 1, "api", 8, None, None, np.zeros(7, np.uint8), None),
     "needs 8 uint8 bytes"),
    (lambda: Delta(1, 1, 0, 1, "api", 8, None, None, np.zeros(8, np.uint8), np.ones(7, bool)),
     "mask needs 8 bools"),
    (lambda: Delta(1, 1, 0, 1, "api", 0, None, None, np.zeros(0, np.uint8), None),
     "page_size must be a positive int"),
])
def test_compress_delta_refuses_inconsistent_deltas(make: Any, match: str) -> None:
    d = make()
    before = _snapshot_delta(d)
    with pytest.raises(mmsb.InvalidDeltaError, match=match):
        mmsb.compress_delta(d)
    assert _snapshot_delta(d) == before


def test_compress_delta_refuses_what_is_not_a_delta() -> None:
    with pytest.raises(mmsb.InvalidDeltaError, match="takes a Delta, not bytes"):
        mmsb.compress_delta(b"delta")  # type: ignore[arg-type]


# ---------------------------------------------------------------- subscriptions


def test_count_and_clear_subscriptions() -> None:
    s = new_state()
    seen: list[Any] = []
    a = mmsb.subscribe(s, mmsb.EventType.PAGE_CREATED, lambda *e: seen.append(e))
    b = mmsb.subscribe(s, mmsb.EventType.PAGE_CHANGED, lambda *e: seen.append(e))
    mmsb.subscribe(s, mmsb.EventType.PAGE_CHANGED, lambda *e: seen.append(e))
    assert mmsb.get_subscription_count(s) == 3
    assert mmsb.get_subscription_count(s, mmsb.EventType.PAGE_CHANGED) == 2
    assert mmsb.get_subscription_count(s, mmsb.EventType.PAGE_DELETED) == 0
    assert mmsb.clear_subscriptions(s, mmsb.EventType.PAGE_CHANGED) == 2
    assert not b.active and a.active
    assert mmsb.get_subscription_count(s) == 1
    mmsb.create_page(s, 8)
    mmsb.write_page(s, 1, 0, b"x")
    assert [e[1] for e in seen] == [mmsb.EventType.PAGE_CREATED]
    assert mmsb.clear_subscriptions(s) == 1 and not a.active
    assert mmsb.get_subscription_count(s) == 0
    assert mmsb.clear_subscriptions(s) == 0
    mmsb.create_page(s, 8)
    assert len(seen) == 1
    assert not mmsb.unsubscribe(s, a)


def test_subscription_helpers_refuse_bad_arguments() -> None:
    s = new_state()
    mmsb.subscribe(s, mmsb.EventType.PAGE_CREATED, lambda *e: None)
    for call in (lambda: mmsb.get_subscription_count(s, "PAGE_CREATED"),
                 lambda: mmsb.get_subscription_count(s, 99),
                 lambda: mmsb.clear_subscriptions(s, True),
                 lambda: mmsb.clear_subscriptions(s, 99)):
        with pytest.raises(mmsb.InvalidArgumentError, match="must be an EventType or None"):
            call()
    with pytest.raises(mmsb.InvalidArgumentError, match="takes an MMSBState"):
        mmsb.clear_subscriptions(s.graph)  # type: ignore[arg-type]
    with pytest.raises(mmsb.InvalidArgumentError, match="takes an MMSBState"):
        mmsb.get_subscription_count(None)  # type: ignore[arg-type]
    assert mmsb.get_subscription_count(s) == 1


def test_logging_subscriber_logs_each_event(caplog: pytest.LogCaptureFixture) -> None:
    s = new_state()
    subs = mmsb.create_logging_subscriber(s)
    assert len(subs) == len(mmsb.EventType) == mmsb.get_subscription_count(s)
    with caplog.at_level(logging.DEBUG, logger="mmsb.events"):
        p = mmsb.create_page(s, 16)
        mmsb.write_page(s, p.id, 2, b"ab")
        mmsb.resize_page(s, p.id, 32)
    lines = [r.getMessage() for r in caplog.records if r.name == "mmsb.events"]
    assert lines == [
        "mmsb event PAGE_CREATED page=1",
        f"mmsb event DELTA_APPLIED page=1 epoch=1 delta=1 lsn={s.tlog[-1].lsn}",
        "mmsb event PAGE_CHANGED page=1 epoch=1 delta=1",
        "mmsb event PAGE_RESIZED page=1 old_size=16 new_size=32",
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "mmsb.events")
    for sub in subs:
        assert mmsb.unsubscribe(s, sub)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mmsb.events"):
        mmsb.create_page(s, 16)
    assert not caplog.records


def test_logging_subscriber_logger_level_and_types(caplog: pytest.LogCaptureFixture) -> None:
    s = new_state()
    mmsb.create_logging_subscriber(s, "app.bus", "info", event_types=mmsb.EventType.PAGE_DELETED)
    adapter = logging.LoggerAdapter(logging.getLogger("app.adapted"), {})
    mmsb.create_logging_subscriber(s, adapter, logging.WARNING,
                                   [mmsb.EventType.PAGE_CREATED, mmsb.EventType.PAGE_CREATED])
    assert mmsb.get_subscription_count(s) == 2
    with caplog.at_level(logging.DEBUG):
        mmsb.create_page(s, 4)
        mmsb.delete_page(s, 1)
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("app.")]
    assert got == [("app.adapted", logging.WARNING, "mmsb event PAGE_CREATED page=1"),
                   ("app.bus", logging.INFO, "mmsb event PAGE_DELETED page=1")]
    caplog.clear()
    with caplog.at_level(logging.ERROR):          # below the logger's level: nothing logged
        mmsb.create_page(s, 4)
    assert not [r for r in caplog.records if r.name.startswith("app.")]


def test_debug_subscriber_prints_readable_lines(capsys: pytest.CaptureFixture[str]) -> None:
    s = new_state()
    buf = io.StringIO()
    subs = mmsb.create_debug_subscriber(s, buf, event_types=[mmsb.EventType.PAGE_CHANGED,
                                                            mmsb.EventType.PAGE_STALE])
    mmsb.create_debug_subscriber(s, event_types=mmsb.EventType.PAGE_CREATED)
    mmsb.create_pages(s, 2, 8)
    mmsb.add_dependency(s, 1, 2, mmsb.CONTROL_DEPENDENCY)
    mmsb.write_page(s, 1, 0, b"q")
    assert buf.getvalue().splitlines() == ["mmsb: PAGE_CHANGED page=1 epoch=1 delta=1",
                                           "mmsb: PAGE_STALE page=2 parent=1"]
    assert capsys.readouterr().out.splitlines() == ["mmsb: PAGE_CREATED page=1",
                                                    "mmsb: PAGE_CREATED page=2"]
    assert mmsb.clear_subscriptions(s) == 3
    assert all(not sub.active for sub in subs)


def test_debug_subscriber_on_a_broken_stream_never_breaks_a_write() -> None:
    s = new_state()
    buf = io.StringIO()
    (sub,) = mmsb.create_debug_subscriber(s, buf, mmsb.EventType.PAGE_CREATED)
    buf.close()
    p = mmsb.create_page(s, 8)
    assert p.id in s.pages
    assert sub.errors == 1 and mmsb.get_stats(s).handler_errors == 1


@pytest.mark.parametrize("call, match", [
    (lambda s: mmsb.create_logging_subscriber(s, logger=42), "logger must be a logging.Logger"),
    (lambda s: mmsb.create_logging_subscriber(s, level="LOUD"), "unknown logging level 'LOUD'"),
    (lambda s: mmsb.create_logging_subscriber(s, level=-1), "level must be an int ≥ 0"),
    (lambda s: mmsb.create_logging_subscriber(s, level=True), "level must be an int ≥ 0"),
    (lambda s: mmsb.create_logging_subscriber(s, event_types=[]), "event_types is empty"),
    (lambda s: mmsb.create_logging_subscriber(s, event_types=[mmsb.EventType.PAGE_CREATED, 99]),
     "99 is not an EventType"),
    (lambda s: mmsb.create_logging_subscriber(s, event_types="PAGE_CREATED"), "not str"),
    (lambda s: mmsb.create_debug_subscriber(s, file="out.txt"), "file must be a text stream"),
    (lambda s: mmsb.create_debug_subscriber(s, event_types=[True]), "True is not an EventType"),
    (lambda s: mmsb.create_debug_subscriber(s.graph), "takes an MMSBState"),
])
def test_subscriber_refusals_subscribe_nothing(call: Any, match: str) -> None:
    s = new_state()
    mmsb.create_page(s, 8)
    mmsb.subscribe(s, mmsb.EventType.PAGE_CREATED, lambda *e: None)
    before = snapshot(s)
    with pytest.raises(mmsb.InvalidArgumentError, match=match):
        call(s)
    assert mmsb.get_subscription_count(s) == 1
    assert_unchanged(s, before)
