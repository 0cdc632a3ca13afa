"""In-memory hot paths: allocation, delta (update), propagation.

Each timed batch runs on a fresh state built by its (untimed) setup, so the log and the
arena of one batch never leak into the next; updates alternate between two payloads so
that every call really changes the page (an update that changes nothing records nothing).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._registry import CaseOutcome, RunContext, case, expect

KIB = 1024
MIB = 1024 * 1024


def _rng(ctx: RunContext, salt: int) -> np.random.Generator:
    return np.random.default_rng(ctx.seed + salt)


def dense_pair(rng: np.random.Generator, size: int) -> tuple[bytes, bytes]:
    """Two payloads that differ from zeros and from each other in every byte."""
    a = rng.integers(1, 256, size, dtype=np.uint8)
    return a.tobytes(), (a ^ 0xFF).tobytes()


def sparse_pair(rng: np.random.Generator, size: int, changed: int) -> tuple[bytes, bytes]:
    """Zeros with ``changed`` scattered non-zero bytes, and zeros: they differ there."""
    a = np.zeros(size, dtype=np.uint8)
    where = rng.choice(size, size=changed, replace=False)
    a[where] = rng.integers(1, 256, changed, dtype=np.uint8)
    return a.tobytes(), bytes(size)


def alternating(pair: tuple[bytes, bytes], n: int) -> list[bytes]:
    a, b = pair
    return [a if i % 2 == 0 else b for i in range(n)]


# allocation ---------------------------------------------------------------------------


class NaiveRegistry:
    """The naive peer of ``create_page``: a dict of numpy arrays and a counter."""

    __slots__ = ("next_id", "pages")

    def __init__(self) -> None:
        self.pages: dict[int, np.ndarray] = {}
        self.next_id = 1


def naive_create(reg: NaiveRegistry, size: int) -> int:
    pid = reg.next_id
    reg.next_id = pid + 1
    reg.pages[pid] = np.zeros(size, dtype=np.uint8)
    return pid


def _create_one_by_one(ctx: RunContext, size: int, max_inner: int) -> CaseOutcome:
    import mmsb

    def batch(state: Any, n: int) -> None:
        create = mmsb.create_page
        for _ in range(n):
            create(state, size)

    def setup(n: int) -> Any:
        # One page first, untimed: the arena's first reservation is not what is measured.
        state = ctx.new_state()
        mmsb.create_page(state, size)
        return state

    m = ctx.measure(batch, setup=setup, max_inner=max_inner, trace_alloc=size <= 4 * KIB)
    state = ctx.new_state()
    page = mmsb.create_page(state, size)
    expect(page.size == size and bytes(page.data) == bytes(size), "new page is not zero-filled")
    return CaseOutcome(m, {"page_bytes": size})


def _naive_one_by_one(ctx: RunContext, size: int, max_inner: int) -> CaseOutcome:
    def batch(reg: NaiveRegistry, n: int) -> None:
        create = naive_create
        for _ in range(n):
            create(reg, size)

    m = ctx.measure(
        batch,
        setup=lambda n: NaiveRegistry(),
        max_inner=max_inner,
        trace_alloc=size <= 4 * KIB,
    )
    return CaseOutcome(m, {"page_bytes": size})


@case("allocation", "cpu_1kb", "create_page(state, 1024), one page per call")
def alloc_cpu_1kb(ctx: RunContext) -> CaseOutcome:
    return _create_one_by_one(ctx, KIB, ctx.pick(20_000, 200))


@case("allocation", "naive_registry_1kb", "peer: dict[id] = np.zeros(1024), one per call")
def alloc_naive_1kb(ctx: RunContext) -> CaseOutcome:
    return _naive_one_by_one(ctx, KIB, ctx.pick(20_000, 200))


@case("allocation", "cpu_1mb", "create_page(state, 1 MiB), one page per call")
def alloc_cpu_1mb(ctx: RunContext) -> CaseOutcome:
    return _create_one_by_one(ctx, MIB, ctx.pick(64, 4))


@case("allocation", "naive_registry_1mb", "peer: dict[id] = np.zeros(1 MiB), one per call")
def alloc_naive_1mb(ctx: RunContext) -> CaseOutcome:
    return _naive_one_by_one(ctx, MIB, ctx.pick(64, 4))


@case("allocation", "bulk_1kb", "create_pages(state, n, 1024); time per page")
def alloc_bulk_1kb(ctx: RunContext) -> CaseOutcome:
    import mmsb

    n_pages = ctx.pick(10_000, 200)

    def batch(state: Any, n: int) -> None:
        mmsb.create_pages(state, n, KIB)

    def setup(n: int) -> Any:
        state = ctx.new_state()
        mmsb.create_page(state, KIB)
        return state

    m = ctx.measure(batch, setup=setup, inner=n_pages)
    state = ctx.new_state()
    pages = mmsb.create_pages(state, 3, KIB)
    expect(
        len(pages) == 3 and all(p.size == KIB for p in pages), "create_pages returned wrong pages"
    )
    return CaseOutcome(m, {"pages_per_call": n_pages, "page_bytes": KIB})


# delta --------------------------------------------------------------------------------


def _update_case(
    ctx: RunContext, size: int, pair: tuple[bytes, bytes], max_inner: int
) -> CaseOutcome:
    import mmsb

    def setup(n: int) -> tuple[Any, int, list[bytes]]:
        state = ctx.new_state()
        page = mmsb.create_page(state, size)
        return state, page.id, alternating(pair, n)

    def batch(obj: tuple[Any, int, list[bytes]], n: int) -> None:
        state, pid, payloads = obj
        update = mmsb.update_page
        for data in payloads:
            update(state, pid, data)

    m = ctx.measure(batch, setup=setup, max_inner=max_inner, trace_alloc=size <= 4 * KIB)
    state, pid, payloads = setup(3)
    batch((state, pid, payloads), 3)
    expect(mmsb.query_page(state, pid) == payloads[-1], "page bytes differ from the update")
    expect(state.pages[pid].epoch == 3, "epoch is not one per changing update")
    changed = int(
        np.count_nonzero(np.frombuffer(pair[0], np.uint8) != np.frombuffer(pair[1], np.uint8))
    )
    return CaseOutcome(
        m,
        {
            "page_bytes": size,
            "changed_bytes": changed,
            "changed_gb_per_s": changed / m.stats.median_ns,
        },
    )


@case("delta", "cpu_sparse_1kb", "update_page, 1 KiB page, 1 % of bytes changed (10, scattered)")
def delta_sparse_1kb(ctx: RunContext) -> CaseOutcome:
    return _update_case(ctx, KIB, sparse_pair(_rng(ctx, 1), KIB, 10), ctx.pick(20_000, 200))


@case("delta", "cpu_dense_1kb", "update_page, 1 KiB page, every byte changed")
def delta_dense_1kb(ctx: RunContext) -> CaseOutcome:
    return _update_case(ctx, KIB, dense_pair(_rng(ctx, 2), KIB), ctx.pick(20_000, 200))


@case("delta", "cpu_sparse_1mb", "update_page, 1 MiB page, 1 % of bytes changed (scattered)")
def delta_sparse_1mb(ctx: RunContext) -> CaseOutcome:
    return _update_case(ctx, MIB, sparse_pair(_rng(ctx, 3), MIB, MIB // 100), ctx.pick(128, 4))


@case("delta", "cpu_dense_1mb", "update_page, 1 MiB page, every byte changed")
def delta_dense_1mb(ctx: RunContext) -> CaseOutcome:
    return _update_case(ctx, MIB, dense_pair(_rng(ctx, 4), MIB), ctx.pick(32, 4))


@case("delta", "cpu_dense_1mb_distinct",
      "update_page, 1 MiB page, every byte changed, a distinct bytes object per update "
      "(made before timing)")
def delta_dense_1mb_distinct(ctx: RunContext) -> CaseOutcome:
    import mmsb

    rng = _rng(ctx, 4)

    def setup(n: int) -> tuple[Any, int, list[bytes]]:
        state = ctx.new_state()
        page = mmsb.create_page(state, MIB)
        a = rng.integers(2, 256, MIB, dtype=np.uint8)
        # a ^ k for k = 1, 2, 3 …: no zero byte (a != 1), and each payload differs from
        # the one before in every byte (consecutive keys differ).
        payloads = [(a ^ ((i % 255) + 1)).tobytes() for i in range(n)]
        return state, page.id, payloads

    def batch(obj: tuple[Any, int, list[bytes]], n: int) -> None:
        state, pid, payloads = obj
        update = mmsb.update_page
        for data in payloads:
            update(state, pid, data)

    m = ctx.measure(batch, setup=setup, max_inner=ctx.pick(32, 4))
    return CaseOutcome(m, {"page_bytes": MIB, "changed_gb_per_s": MIB / m.stats.median_ns})


@case("delta", "write_page_8b", "write_page of 8 bytes at a random offset of a 1 KiB page")
def delta_write_8b(ctx: RunContext) -> CaseOutcome:
    import mmsb

    rng = _rng(ctx, 5)

    def setup(n: int) -> tuple[Any, int, list[tuple[int, bytes]]]:
        state = ctx.new_state()
        page = mmsb.create_page(state, KIB)
        offs = rng.integers(0, KIB - 8, n)
        vals = rng.integers(1, 256, (n, 8), dtype=np.uint8)
        vals[1::2] ^= 0xFF
        return state, page.id, [(int(o), v.tobytes()) for o, v in zip(offs, vals, strict=True)]

    def batch(obj: tuple[Any, int, list[tuple[int, bytes]]], n: int) -> None:
        state, pid, writes = obj
        write = mmsb.write_page
        for off, data in writes:
            write(state, pid, off, data)

    m = ctx.measure(batch, setup=setup, max_inner=ctx.pick(20_000, 200), trace_alloc=True)
    return CaseOutcome(m, {"page_bytes": KIB, "write_bytes": 8})


def _copy_case(ctx: RunContext, size: int) -> CaseOutcome:
    src = _rng(ctx, 6).integers(0, 256, size, dtype=np.uint8)
    dst = np.empty_like(src)

    def batch(_obj: None, n: int) -> None:
        copyto = np.copyto
        for _ in range(n):
            copyto(dst, src)

    m = ctx.measure(batch)
    return CaseOutcome(m, {"bytes": size, "gb_per_s": size / m.stats.median_ns})


@case("delta", "numpy_copy_1kb", "floor: np.copyto of 1 KiB")
def delta_copy_1kb(ctx: RunContext) -> CaseOutcome:
    return _copy_case(ctx, KIB)


@case("delta", "numpy_copy_1mb", "floor: np.copyto of 1 MiB")
def delta_copy_1mb(ctx: RunContext) -> CaseOutcome:
    return _copy_case(ctx, MIB)


# propagation --------------------------------------------------------------------------


def _chain_case(ctx: RunContext, length: int) -> CaseOutcome:
    import mmsb

    pair = dense_pair(_rng(ctx, 7 + length), KIB)

    def setup(n: int) -> tuple[Any, list[int], list[bytes]]:
        state = ctx.new_state()
        ids = [mmsb.create_page(state, KIB).id for _ in range(length)]
        for parent, child in zip(ids, ids[1:], strict=False):
            mmsb.add_dependency(state, parent, child, mmsb.DATA_DEPENDENCY)
            mmsb.register_passthrough_recompute(state, child, parent)
        return state, ids, alternating(pair, n)

    def batch(obj: tuple[Any, list[int], list[bytes]], n: int) -> None:
        state, ids, payloads = obj
        update = mmsb.update_page
        head = ids[0]
        for data in payloads:
            update(state, head, data)

    m = ctx.measure(batch, setup=setup, max_inner=ctx.pick(10_000, 100), trace_alloc=True)
    state, ids, payloads = setup(1)
    batch((state, ids, payloads), 1)
    expect(mmsb.query_page(state, ids[-1]) == payloads[0], "the chain's tail was not recomputed")
    return CaseOutcome(m, {"pages": length, "hops": length - 1})


@case("propagation", "single_hop", "update a 1 KiB parent; its DATA child recomputed (passthrough)")
def prop_single_hop(ctx: RunContext) -> CaseOutcome:
    return _chain_case(ctx, 2)


@case("propagation", "chain_10", "update the head of a 10-page DATA chain; all 9 recomputed")
def prop_chain_10(ctx: RunContext) -> CaseOutcome:
    return _chain_case(ctx, 10)
