"""The conformance kit every device backend passes: checks against a numpy model.

Each check takes ``make``, a function returning a fresh backend (with a small
``chunk_size`` so that chunks fill up and large slots get chunks of their own), and
raises AssertionError on a departure from the model. :data:`CHECKS` lists them by name
for a test runner to parametrise over; :func:`check_model_property` and
:func:`check_arena_property` are Hypothesis properties. Needs ``hypothesis`` (a test
dependency); the device checks need CuPy only when given a CUDA backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .._core.delta import apply_delta, diff_write, make_delta
from ..errors import GPUMemoryError, InvalidArgumentError, InvalidDeltaError, MMSBError
from .arena import slot_class
from .backend import Changes, DeltaBatch, DeviceBackend

__all__ = ["CHECKS", "check_model_property", "check_arena_property", "device_array"]

Make = Callable[[], DeviceBackend]


def device_array(backend: DeviceBackend, host: np.ndarray) -> Any:
    """``host`` as an array on the backend's device (numpy for the host backend)."""
    if backend.location == "cpu":
        return host
    import cupy as cp

    return cp.asarray(host)


def _rng(seed: int = 7) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rand(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


def _snapshot(b: DeviceBackend) -> tuple[dict[int, bytes], Any]:
    # Read through the primitive, so that taking the snapshot moves no counter.
    return {s: bytes(b._copy_out(b._array(s)[0], None)) for s in b.live_slots()}, b.stats()


def _same(b: DeviceBackend, model: dict[int, np.ndarray]) -> None:
    assert set(b.live_slots()) == set(model), "live slots differ from the model"
    for s, want in model.items():
        got = b.copy_out(s)
        assert np.array_equal(got, want), f"slot {s:#x} differs from the model"


# -- checks ------------------------------------------------------------------------------

def check_alloc_zeroed_and_reused(make: Make) -> None:
    """New slots are zero-filled and of their size; a freed slot comes back zeroed;
    large slots get their own chunk and release it."""
    b = make()
    chunk = b._arena.chunk_size
    sizes = [1, 15, 16, 17, 100, 1000, chunk // 4, chunk // 4 + 1, chunk, 3 * chunk]
    slots = [b.alloc(n) for n in sizes]
    for s, n in zip(slots, sizes, strict=True):
        assert b.size_of(s) == n
        assert not b.copy_out(s).any(), "a new slot is not zero-filled"
        b.copy_in(s, np.full(n, 0xAB, dtype=np.uint8))
    b._check()
    reserved = b.stats().bytes_reserved
    b.free(slots[4])
    again = b.alloc(100)
    assert again == slots[4], "a freed slot of the same class was not reused first"
    assert not b.copy_out(again).any(), "a reused slot was not zeroed"
    assert b.stats().bytes_reserved == reserved
    big = slots[-1]
    b.free(big)
    assert b.stats().bytes_reserved == reserved - slot_class(3 * chunk)
    assert b.stats().slots_in_use == len(sizes) - 1
    b._check()


def check_copy_roundtrip(make: Make) -> None:
    """copy_in (whole, at an offset, any dtype, device arrays) and copy_out agree."""
    b = make()
    rng = _rng()
    s = b.alloc(777)
    data = _rand(rng, 777)
    b.copy_in(s, data)
    assert np.array_equal(b.copy_out(s), data)
    b.copy_in(s, bytes(range(10)), offset=500)
    data[500:510] = np.arange(10)
    assert np.array_equal(b.copy_out(s), data)
    words = np.arange(8, dtype=np.uint32)
    b.copy_in(s, words, offset=0)
    data[:32] = words.view(np.uint8)
    assert np.array_equal(b.copy_out(s), data)
    patch = _rand(rng, 100)
    b.copy_in(s, device_array(b, patch), offset=677)
    data[677:] = patch
    out = np.empty(777, dtype=np.uint8)
    assert b.copy_out(s, out=out) is out and np.array_equal(out, data)
    assert np.array_equal(np.asarray(b.copy_out_async(s).wait()), data)
    b.copy_in_async(s, np.zeros(777, dtype=np.uint8)).wait()
    assert not b.copy_out(s).any()
    st_ = b.stats()
    assert st_.bytes_d2h >= 3 * 777 and st_.bytes_h2d >= 777 + 10 + 32


def check_sparse_runs_dense(make: Make) -> None:
    """Sparse, run and dense (plain and masked) deltas write what the model writes,
    from host or device inputs, and each counts as one applied delta."""
    b = make()
    rng = _rng(1)
    n = 5000
    s = b.alloc(n)
    model = np.zeros(n, dtype=np.uint8)
    pos = np.sort(rng.choice(n, 400, replace=False)).astype(np.int32)
    vals = _rand(rng, 400)
    b.apply_sparse(s, pos, vals)
    model[pos] = vals
    pos2 = np.sort(rng.choice(n, 50, replace=False))
    vals2 = _rand(rng, 50)
    b.apply_sparse(s, device_array(b, pos2), device_array(b, vals2))
    model[pos2] = vals2
    starts, lengths = np.array([0, 10, 4990]), np.array([5, 100, 10])
    rv = _rand(rng, 115)
    b.apply_runs(s, starts, lengths, rv)
    model[0:5], model[10:110], model[4990:5000] = rv[:5], rv[5:105], rv[105:]
    dense = _rand(rng, n)
    mask = rng.random(n) < 0.5
    b.apply_dense(s, dense, mask)
    model[mask] = dense[mask]
    assert np.array_equal(b.copy_out(s), model)
    dense2 = _rand(rng, n)
    b.apply_dense(s, device_array(b, dense2), device_array(b, mask))
    model[mask] = dense2[mask]
    b.apply_dense(s, device_array(b, dense2))
    model[:] = dense2
    assert np.array_equal(b.copy_out(s), model)
    b.apply_sparse(s, np.empty(0, dtype=np.int64), b"")
    assert b.stats().deltas_applied == 7


def check_apply_engine_deltas(make: Make) -> None:
    """Deltas built by the CPU engine's kernels (sparse, dense, masked dense) apply to a
    slot exactly as :func:`mmsb._core.delta.apply_delta` applies them to numpy bytes."""
    b = make()
    rng = _rng(2)
    n = 4096
    s = b.alloc(n)
    model = np.zeros(n, dtype=np.uint8)
    for k, count in enumerate([10, 1024, 1025, 3000, n]):
        idx = np.sort(rng.choice(n, count, replace=False))
        d = make_delta(k + 1, 1, k, n, idx, _rand(rng, count), "api")
        b.apply_delta(s, d)
        apply_delta(model, d)
        assert np.array_equal(b.copy_out(s), model), f"delta of {count} bytes differs"
    new = model.copy()
    new[100:200] ^= 0xFF
    written = diff_write(9, 1, 5, model, 0, new, "api")
    assert written is not None
    b.apply_delta(s, written)
    apply_delta(model, written)
    assert np.array_equal(b.copy_out(s), model)


def check_batch(make: Make) -> None:
    """One batch over many slots (sparse and dense, in several chunks) writes what the
    deltas one by one write, and counts one launch."""
    b = make()
    rng = _rng(3)
    sizes = [64, 1000, 3000, 17, b._arena.chunk_size]
    slots = [b.alloc(n) for n in sizes]
    model = {s: np.zeros(n, dtype=np.uint8) for s, n in zip(slots, sizes, strict=True)}
    items: list[tuple[int, Any, Any]] = []
    for i, (s, n) in enumerate(zip(slots, sizes, strict=True)):
        if i % 2:
            v = _rand(rng, n)
            items.append((s, None, v))
            model[s][:] = v
        else:
            p = np.sort(rng.choice(n, max(1, n // 5), replace=False))
            v = _rand(rng, len(p))
            items.append((s, p, v))
            model[s][p] = v
    batch = DeltaBatch.from_items(items)
    before = b.stats()
    b.apply_batch_async(batch).wait()
    after = b.stats()
    assert after.batches_applied == before.batches_applied + 1
    assert after.deltas_applied == before.deltas_applied + len(slots)
    _same(b, model)
    if b.location != "cpu":
        dev = DeltaBatch(batch.slots, batch.counts, device_array(b, batch.positions),
                         device_array(b, np.zeros_like(batch.values)), batch.dense)
        b.apply_batch(dev)
        for s, p, _ in items:
            model[s][slice(None) if p is None else p] = 0
        _same(b, model)
    b.apply_batch(DeltaBatch.from_items([]))


def check_diff(make: Make) -> None:
    """Diffs find exactly the changed bytes, sparse or dense by the 25 % rule, at an
    offset, from host or device contents, with and without applying them; their deltas
    equal those of :func:`mmsb._core.delta.diff_write`."""
    b = make()
    rng = _rng(4)
    n = 2048
    s = b.alloc(n)
    base = _rand(rng, n)
    b.copy_in(s, base)
    assert b.diff(s, base) is None
    assert b.diff(s, base[100:300], offset=100) is None
    for count, offset, length in [(1, 0, n), (300, 0, n), (512, 0, n), (513, 0, n),
                                  (n, 0, n), (40, 1000, 200), (200, 1000, 800)]:
        new = b.copy_out(s)
        seg = new[offset : offset + length].copy()
        idx = rng.choice(length, count if count <= length else length, replace=False)
        seg[idx] ^= rng.integers(1, 256, len(idx), dtype=np.uint8)
        for on_device in (False, True):
            src = device_array(b, seg) if on_device else seg
            ch = b.diff(s, src, offset)
            assert isinstance(ch, Changes)
            want = diff_write(1, 1, 0, new, offset, seg, "api")
            assert want is not None
            got = ch.to_delta(1, 1, 0, "api")
            assert ch.is_sparse == want.is_sparse, (count, ch, want)
            assert ch.count == want.count == len(idx)
            assert np.array_equal(got.indices, want.indices)
            assert np.array_equal(got.values, want.values)
            assert got.dense_data() == want.dense_data()
        ch = b.diff(s, device_array(b, seg), offset, apply=True)
        new[offset : offset + length] = seg
        assert np.array_equal(b.copy_out(s), new), "diff(apply=True) did not write"
    seg = _rand(rng, 64)
    ch = b.diff(s, seg, 10, apply=True)
    assert ch is not None
    assert np.array_equal(b.copy_out(s)[10:74], seg)
    assert b.stats().diffs == 2 + 7 * 3 + 1


def check_view(make: Make) -> None:
    """A view shows the slot's current bytes without a copy, refuses writes, and (on a
    device) exports through DLPack and the CUDA array interface, read-only, until the
    slot is freed."""
    b = make()
    s = b.alloc(300)
    data = _rand(_rng(5), 300)
    b.copy_in(s, data)
    v = b.view(s)
    if b.location == "cpu":
        assert isinstance(v, np.ndarray) and not v.flags.writeable
        assert np.array_equal(v, data)
        try:
            v[0] = 1
        except ValueError:
            pass
        else:
            raise AssertionError("the host view is writable")
        return
    import cupy as cp

    assert v.__cuda_array_interface__["data"][1] is True, "the view is not marked read-only"
    assert np.array_equal(cp.from_dlpack(v).get(), data)
    assert np.array_equal(cp.asarray(v).get(), data)
    assert np.array_equal(v.get(), data)
    b.apply_sparse(s, [0], b"\x01")
    assert int(cp.from_dlpack(v)[0]) == 1, "the view does not follow the slot"
    b.free(s)
    for export in (lambda: v.__cuda_array_interface__, lambda: v.__dlpack__()):
        try:
            export()
        except InvalidArgumentError:
            pass
        else:
            raise AssertionError("a view of a freed slot was exported")


def _refusals(b: DeviceBackend, s: int, dead: int) -> list[tuple[str, type[MMSBError],
                                                                 Callable[[], Any]]]:
    n = b.size_of(s)
    other = b.alloc(16)
    return [
        ("alloc 0", InvalidArgumentError, lambda: b.alloc(0)),
        ("alloc -1", InvalidArgumentError, lambda: b.alloc(-1)),
        ("alloc float", InvalidArgumentError, lambda: b.alloc(1.5)),  # type: ignore[arg-type]
        ("alloc bool", InvalidArgumentError, lambda: b.alloc(True)),
        ("free dead", InvalidArgumentError, lambda: b.free(dead)),
        ("free junk", InvalidArgumentError, lambda: b.free("x")),  # type: ignore[arg-type]
        ("copy_in dead", InvalidArgumentError, lambda: b.copy_in(dead, b"ab")),
        ("copy_in too long", InvalidDeltaError, lambda: b.copy_in(s, bytes(n + 1))),
        ("copy_in past end", InvalidDeltaError, lambda: b.copy_in(s, b"ab", offset=n - 1)),
        ("copy_in bad offset", InvalidArgumentError, lambda: b.copy_in(s, b"a", offset=-1)),
        ("copy_in str", InvalidDeltaError, lambda: b.copy_in(s, "text")),
        ("copy_in objects", InvalidDeltaError,
         lambda: b.copy_in(s, np.array([object()], dtype=object))),
        ("copy_out dead", InvalidArgumentError, lambda: b.copy_out(dead)),
        ("copy_out bad out", InvalidArgumentError,
         lambda: b.copy_out(s, out=np.empty(n, dtype=np.int16))),
        ("view dead", InvalidArgumentError, lambda: b.view(dead)),
        ("sparse dead", InvalidArgumentError, lambda: b.apply_sparse(dead, [0], b"a")),
        ("sparse out of range", InvalidDeltaError, lambda: b.apply_sparse(s, [0, n], b"ab")),
        ("sparse negative", InvalidDeltaError, lambda: b.apply_sparse(s, [-1, 2], b"ab")),
        ("sparse unsorted", InvalidDeltaError, lambda: b.apply_sparse(s, [3, 2], b"ab")),
        ("sparse repeated", InvalidDeltaError, lambda: b.apply_sparse(s, [2, 2], b"ab")),
        ("sparse float positions", InvalidDeltaError,
         lambda: b.apply_sparse(s, np.array([0.0, 1.0]), b"ab")),
        ("sparse bool positions", InvalidDeltaError,
         lambda: b.apply_sparse(s, np.array([True, False]), b"ab")),
        ("sparse 2-d positions", InvalidDeltaError,
         lambda: b.apply_sparse(s, np.zeros((1, 2), dtype=np.int64), b"ab")),
        ("sparse lengths", InvalidDeltaError, lambda: b.apply_sparse(s, [0, 1], b"abc")),
        ("sparse device out of range", InvalidDeltaError,
         lambda: b.apply_sparse(s, device_array(b, np.array([1, n + 5])),
                                device_array(b, np.zeros(2, dtype=np.uint8)))),
        ("runs lengths", InvalidDeltaError, lambda: b.apply_runs(s, [0], [2], b"abc")),
        ("runs overlap", InvalidDeltaError, lambda: b.apply_runs(s, [0, 1], [2, 2], b"abcd")),
        ("runs empty run", InvalidDeltaError, lambda: b.apply_runs(s, [0, 4], [0, 2], b"ab")),
        ("runs past end", InvalidDeltaError, lambda: b.apply_runs(s, [n - 1], [2], b"ab")),
        ("runs mismatched", InvalidDeltaError, lambda: b.apply_runs(s, [0, 3], [1], b"a")),
        ("dense short", InvalidDeltaError, lambda: b.apply_dense(s, bytes(n - 1))),
        ("dense mask length", InvalidDeltaError,
         lambda: b.apply_dense(s, bytes(n), np.ones(n - 1, dtype=bool))),
        ("dense mask dtype", InvalidDeltaError,
         lambda: b.apply_dense(s, bytes(n), np.ones(n, dtype=np.uint8))),
        ("delta wrong size", InvalidDeltaError,
         lambda: b.apply_delta(s, make_delta(1, 1, 0, n + 1, np.array([0]),
                                             np.array([7], dtype=np.uint8), "api"))),
        ("delta not a delta", InvalidArgumentError, lambda: b.apply_delta(s, b"x")),  # type: ignore[arg-type]
        ("batch not a batch", InvalidArgumentError, lambda: b.apply_batch([])),  # type: ignore[arg-type]
        ("batch dead slot", InvalidArgumentError,
         lambda: b.apply_batch(DeltaBatch.from_items([(s, [0], b"a"), (dead, [0], b"a")]))),
        ("batch repeated slot", InvalidDeltaError,
         lambda: b.apply_batch(DeltaBatch.from_items([(s, [0], b"a"), (s, [1], b"a")]))),
        ("batch out of range", InvalidDeltaError,
         lambda: b.apply_batch(DeltaBatch.from_items([(s, [0], b"a"), (other, [16], b"a")]))),
        ("batch unsorted", InvalidDeltaError,
         lambda: b.apply_batch(DeltaBatch.from_items([(s, [5, 1], b"ab")]))),
        ("batch short dense", InvalidDeltaError,
         lambda: b.apply_batch(DeltaBatch.from_items([(other, None, bytes(15))]))),
        ("batch counts", InvalidDeltaError,
         lambda: b.apply_batch(DeltaBatch([s], [3], np.array([0, 1, 2]), b"ab"))),
        ("batch positions", InvalidDeltaError,
         lambda: b.apply_batch(DeltaBatch([s], [2], np.array([0, 1, 2]), b"ab"))),
        ("diff dead", InvalidArgumentError, lambda: b.diff(dead, b"a")),
        ("diff too long", InvalidDeltaError, lambda: b.diff(s, bytes(n + 1))),
        ("diff past end", InvalidDeltaError, lambda: b.diff(s, b"ab", offset=n - 1)),
        ("diff bad offset", InvalidArgumentError, lambda: b.diff(s, b"a", offset=1.0)),  # type: ignore[arg-type]
    ]


def check_refusals(make: Make) -> None:
    """Every refused call raises its typed error and changes no byte and no counter."""
    b = make()
    s = b.alloc(64)
    b.copy_in(s, _rand(_rng(6), 64))
    dead = b.alloc(64)
    b.free(dead)
    for name, err, call in _refusals(b, s, dead):
        before = _snapshot(b)
        try:
            call()
        except err as exc:
            assert isinstance(exc, MMSBError), name
            assert str(exc), f"{name}: empty message"
        else:
            raise AssertionError(f"{name}: no {err.__name__} raised")
        after = _snapshot(b)
        assert after[0] == before[0], f"{name}: a refused call changed bytes"
        assert after[1] == before[1], f"{name}: a refused call changed counters"
        b._check()


def check_stats_and_sync(make: Make) -> None:
    """Counters are a frozen snapshot; synchronize and waits are counted."""
    b = make()
    s0 = b.stats()
    try:
        s0.syncs = 5  # type: ignore[misc]
    except AttributeError:
        pass
    else:
        raise AssertionError("DeviceStats is not frozen")
    b.synchronize()
    s = b.alloc(32)
    ticket = b.copy_in_async(s, bytes(range(32)))
    ticket.wait()
    assert ticket.done()
    st_ = b.stats()
    assert st_.syncs >= 1 and st_.location == b.location and st_.slots_in_use == 1
    assert st_.bytes_in_use == slot_class(32) and st_.chunks == 1


def check_unified_hints(make: Make) -> None:
    """Unified backends take prefetch and advice hints, refuse bad hints, and refuse
    more managed memory than the device has free, changing nothing."""
    b = make()
    if b.location != "unified":
        return
    import cupy as cp

    s = b.alloc(5000)
    data = _rand(_rng(8), 5000)
    b.copy_in(s, data)
    b.advise(s, preferred="gpu", read_mostly=True)  # type: ignore[attr-defined]
    b.prefetch(s, "gpu").wait()  # type: ignore[attr-defined]
    assert np.array_equal(b.copy_out(s), data)
    b.advise(s, preferred="none", read_mostly=False)  # type: ignore[attr-defined]
    b.prefetch(s, "cpu").wait()  # type: ignore[attr-defined]
    assert np.array_equal(b.copy_out(s), data)
    assert b.stats().bytes_prefetched == 10000
    big = b.alloc(300_000)  # a slot with a chunk of its own, written by the CPU
    bulk = _rand(_rng(9), 300_000)
    b.copy_in(big, bulk)
    b.apply_sparse(big, [0, 299_999], b"\x01\x02")
    bulk[0], bulk[299_999] = 1, 2
    assert np.array_equal(b.copy_out(big), bulk)
    b.free(big)
    free, _ = cp.cuda.runtime.memGetInfo()
    before = _snapshot(b)
    for bad in (lambda: b.prefetch(s, "disk"),  # type: ignore[attr-defined]
                lambda: b.advise(s, preferred="tape")):  # type: ignore[attr-defined]
        try:
            bad()
        except InvalidArgumentError:
            pass
        else:
            raise AssertionError("a bad hint was accepted")
    try:
        b.alloc(int(free) + (1 << 30))
    except GPUMemoryError:
        pass
    else:
        raise AssertionError("managed memory beyond the device's free memory was given")
    assert _snapshot(b) == before
    b._check()


CHECKS: dict[str, Callable[[Make], None]] = {
    "alloc_zeroed_and_reused": check_alloc_zeroed_and_reused,
    "copy_roundtrip": check_copy_roundtrip,
    "sparse_runs_dense": check_sparse_runs_dense,
    "apply_engine_deltas": check_apply_engine_deltas,
    "batch": check_batch,
    "diff": check_diff,
    "view": check_view,
    "refusals": check_refusals,
    "stats_and_sync": check_stats_and_sync,
    "unified_hints": check_unified_hints,
}
"""Every deterministic check, by name."""


# -- properties --------------------------------------------------------------------------

_sizes = st.one_of(st.integers(1, 80), st.integers(81, 1500), st.sampled_from([2048, 5000]))


@st.composite
def _ops(draw: Any) -> list[tuple[Any, ...]]:
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(
            ["alloc", "alloc", "free", "sparse", "runs", "dense", "masked", "batch", "diff",
             "diff_apply", "copy_in"]))
        ops.append((kind, draw(_sizes), draw(st.integers(0, 2**32 - 1))))
    return ops


def _run_ops(b: DeviceBackend, ops: list[tuple[Any, ...]]) -> None:
    model: dict[int, np.ndarray] = {}
    order: list[int] = []
    for kind, size, seed in ops:
        rng = np.random.default_rng(seed)
        if kind == "alloc" or not order:
            s = b.alloc(size)
            assert s not in model, "a live slot was handed out twice"
            model[s] = np.zeros(size, dtype=np.uint8)
            order.append(s)
            b._check()
            continue
        s = order[int(rng.integers(len(order)))]
        page = model[s]
        n = len(page)
        if kind == "free":
            b.free(s)
            del model[s]
            order.remove(s)
        elif kind == "sparse":
            k = int(rng.integers(0, n + 1))
            p = np.sort(rng.choice(n, k, replace=False))
            v = _rand(rng, k)
            b.apply_sparse(s, p, v)
            page[p] = v
        elif kind == "runs":
            cuts = np.sort(rng.choice(n + 1, min(n + 1, 2 * int(rng.integers(1, 5))),
                                      replace=False))
            starts, ends = cuts[0::2], cuts[1::2]
            keep = ends[: len(starts)] > starts[: len(ends)]
            starts, ends = starts[: len(ends)][keep], ends[: len(starts)][keep]
            v = _rand(rng, int((ends - starts).sum()))
            b.apply_runs(s, starts, ends - starts, v)
            page[np.concatenate([np.arange(a, e) for a, e in zip(starts, ends, strict=True)])
                 if len(starts) else np.empty(0, dtype=np.int64)] = v
        elif kind == "dense":
            v = _rand(rng, n)
            b.apply_dense(s, v)
            page[:] = v
        elif kind == "masked":
            v, m = _rand(rng, n), rng.random(n) < rng.random()
            b.apply_dense(s, v, m)
            page[m] = v[m]
        elif kind == "batch":
            chosen = [x for x in order if rng.random() < 0.6] or [s]
            items: list[tuple[int, Any, Any]] = []
            for x in chosen:
                xs = len(model[x])
                if rng.random() < 0.3:
                    v = _rand(rng, xs)
                    items.append((x, None, v))
                    model[x][:] = v
                else:
                    p = np.sort(rng.choice(xs, int(rng.integers(0, xs + 1)), replace=False))
                    v = _rand(rng, len(p))
                    items.append((x, p, v))
                    model[x][p] = v
            b.apply_batch(DeltaBatch.from_items(items))
        elif kind in ("diff", "diff_apply"):
            off = int(rng.integers(0, n))
            ln = int(rng.integers(0, n - off + 1))
            new = page[off : off + ln].copy()
            flip = rng.random(ln) < rng.random()
            new[flip] ^= rng.integers(1, 256, int(flip.sum()), dtype=np.uint8)
            ch = b.diff(s, device_array(b, new) if rng.random() < 0.5 else new, off,
                        apply=kind == "diff_apply")
            rel = np.flatnonzero(flip)
            if not len(rel):
                assert ch is None
            else:
                assert ch is not None
                assert np.array_equal(ch.positions, rel + off)
                assert np.array_equal(ch.values, new[rel])
                if not ch.is_sparse:
                    after = page.copy()
                    after[off : off + ln] = new
                    assert ch.data is not None and np.array_equal(ch.data, after)
            if kind == "diff_apply":
                page[off : off + ln] = new
        elif kind == "copy_in":
            off = int(rng.integers(0, n))
            v = _rand(rng, int(rng.integers(0, n - off + 1)))
            b.copy_in(s, v, off)
            page[off : off + len(v)] = v
    _same(b, model)
    b._check()


def check_model_property(make: Make, max_examples: int = 60) -> None:
    """Random sequences of allocs, frees, sparse/run/dense/masked/batched deltas,
    copies and diffs leave the backend byte-for-byte equal to a numpy model."""

    @settings(max_examples=max_examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_ops())
    def prop(ops: list[tuple[Any, ...]]) -> None:
        _run_ops(make(), ops)

    prop()


def check_arena_property(make: Make, max_examples: int = 80) -> None:
    """Random allocs and frees keep the arena's invariants; a free then an alloc of the
    same size class reuses a freed slot and does not grow the arena."""

    @settings(max_examples=max_examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.booleans(), _sizes, st.integers(0, 10**6)),
                    min_size=1, max_size=60))
    def prop(steps: list[tuple[bool, int, int]]) -> None:
        b = make()
        live: list[int] = []
        for is_alloc, size, pick in steps:
            if is_alloc or not live:
                live.append(b.alloc(size))
            else:
                s = live.pop(pick % len(live))
                cls = slot_class(b.size_of(s))
                reserved = b.stats().bytes_reserved
                b.free(s)
                if cls <= b._arena.chunk_size // 4:
                    again = b.alloc(cls)
                    assert again == s, "a freed slot of the class was not reused"
                    assert b.stats().bytes_reserved == reserved
                    live.append(again)
            b._check()
        for s in live:
            b.free(s)
        b._check()
        assert b.stats().bytes_in_use == 0 and b.stats().slots_in_use == 0

    prop()
