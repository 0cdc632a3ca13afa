"""Persistence, replay, the stress workload, and the batch write path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._registry import CaseOutcome, RunContext, case, expect
from .cases_core import KIB, MIB, alternating, dense_pair


def _rng(ctx: RunContext, salt: int) -> np.random.Generator:
    return np.random.default_rng(ctx.seed + 100 + salt)


def random_pages_state(ctx: RunContext, n_pages: int, size: int, salt: int) -> Any:
    """A state of ``n_pages`` pages of ``size`` bytes, each updated once with random bytes."""
    import mmsb

    rng = _rng(ctx, salt)
    state = ctx.new_state()
    for page in mmsb.create_pages(state, n_pages, size):
        mmsb.update_page(state, page.id, rng.integers(1, 256, size, dtype=np.uint8).tobytes())
    return state


def raw_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` the way a durable checkpoint must: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _same_pages(a: Any, b: Any) -> bool:
    import mmsb

    if sorted(a.pages) != sorted(b.pages):
        return False
    return all(mmsb.query_page(a, pid) == mmsb.query_page(b, pid) for pid in a.pages)


# persistence --------------------------------------------------------------------------


def _state_100(ctx: RunContext) -> Any:
    if "state_100" not in ctx.cache:
        ctx.cache["state_100"] = random_pages_state(ctx, 100, KIB, 1)
    return ctx.cache["state_100"]


@case("persistence", "checkpoint_100pages", "checkpoint_log of 100 pages of 1 KiB (+ their log)")
def checkpoint_100(ctx: RunContext) -> CaseOutcome:
    import mmsb

    state = _state_100(ctx)
    path = ctx.path("ckpt100.mmsbckpt")

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            mmsb.checkpoint_log(state, str(path))

    m = ctx.measure(batch, max_inner=ctx.pick(500, 5))
    return CaseOutcome(m, {"pages": 100, "file_bytes": path.stat().st_size})


@case("persistence", "restore_100pages", "load_checkpoint of 100 pages of 1 KiB into a fresh state")
def restore_100(ctx: RunContext) -> CaseOutcome:
    import mmsb

    state = _state_100(ctx)
    path = ctx.path("restore100.mmsbckpt")
    mmsb.checkpoint_log(state, str(path))

    def batch(targets: list[Any], n: int) -> None:
        load = mmsb.load_checkpoint
        p = str(path)
        for target in targets:
            load(target, p)

    m = ctx.measure(
        batch,
        setup=lambda n: [ctx.new_state() for _ in range(n)],
        max_inner=ctx.pick(500, 5),
    )
    restored = ctx.new_state()
    mmsb.load_checkpoint(restored, str(path))
    expect(_same_pages(state, restored), "restored pages differ from the checkpointed ones")
    return CaseOutcome(m, {"pages": 100, "file_bytes": path.stat().st_size})


def _big_state(ctx: RunContext) -> tuple[Any, int]:
    if "state_big" not in ctx.cache:
        n_pages, size = ctx.pick((64, MIB), (4, 64 * KIB))
        ctx.cache["state_big"] = (random_pages_state(ctx, n_pages, size, 2), n_pages * size)
    state, nbytes = ctx.cache["state_big"]
    return state, nbytes


@case(
    "persistence",
    "checkpoint_64mb",
    "checkpoint_log of a 64 MiB state (64 random 1 MiB pages, each written once)",
)
def checkpoint_64mb(ctx: RunContext) -> CaseOutcome:
    import mmsb

    state, state_bytes = _big_state(ctx)
    path = ctx.path("big.mmsbckpt")
    mmsb.checkpoint_log(state, str(path))
    raw = memoryview(path.read_bytes())
    raw_path = ctx.path("raw.bin")

    def checkpoint(_obj: None, n: int) -> None:
        for _ in range(n):
            mmsb.checkpoint_log(state, str(path))

    def write_raw(_obj: None, n: int) -> None:
        for _ in range(n):
            raw_write(raw_path, raw)

    # Interleaved (checkpoint, raw, checkpoint, raw …) so that both see the same disk.
    m, m_raw = ctx.measure_paired([checkpoint, write_raw], repeats=ctx.pick(11, 2))
    file_bytes = len(raw)
    ctx.cache["raw_write_64mb"] = CaseOutcome(
        m_raw,
        {
            "file_bytes": file_bytes,
            "file_mb_per_s": file_bytes / m_raw.stats.median_ns * 1e3,
            "fsync": True,
            "interleaved_with": "persistence/checkpoint_64mb",
        },
    )
    return CaseOutcome(
        m,
        {
            "state_bytes": state_bytes,
            "file_bytes": file_bytes,
            "state_mb_per_s": state_bytes / m.stats.median_ns * 1e3,
            "file_mb_per_s": file_bytes / m.stats.median_ns * 1e3,
            "raw_over_checkpoint": m_raw.stats.median_ns / m.stats.median_ns,
        },
    )


@case(
    "persistence",
    "raw_write_64mb",
    "peer: the checkpoint file's bytes written raw (temp file, fsync, os.replace)",
)
def raw_write_64mb(ctx: RunContext) -> CaseOutcome:
    done = ctx.cache.pop("raw_write_64mb", None)
    if isinstance(done, CaseOutcome):
        return done
    import mmsb

    state, _ = _big_state(ctx)
    tmp = ctx.path("big-for-raw.mmsbckpt")
    mmsb.checkpoint_log(state, str(tmp))
    data = memoryview(tmp.read_bytes())
    path = ctx.path("raw.bin")

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            raw_write(path, data)

    m = ctx.measure(batch, inner=1, repeats=ctx.pick(11, 2))
    return CaseOutcome(
        m,
        {
            "file_bytes": len(data),
            "file_mb_per_s": len(data) / m.stats.median_ns * 1e3,
            "fsync": True,
        },
    )


@case(
    "persistence",
    "raw_write_state_64mb",
    "reference: the 64 MiB of page bytes alone written raw (temp file, fsync, os.replace)",
)
def raw_write_state_64mb(ctx: RunContext) -> CaseOutcome:
    import mmsb

    state, state_bytes = _big_state(ctx)
    data = b"".join(mmsb.query_page(state, pid) for pid in sorted(state.pages))
    path = ctx.path("raw-state.bin")

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            raw_write(path, data)

    m = ctx.measure(batch, inner=1, repeats=ctx.pick(7, 2))
    return CaseOutcome(
        m, {"state_bytes": state_bytes, "state_mb_per_s": state_bytes / m.stats.median_ns * 1e3}
    )


@case("persistence", "restore_64mb", "load_checkpoint of the 64 MiB state into a fresh state")
def restore_64mb(ctx: RunContext) -> CaseOutcome:
    import mmsb

    state, state_bytes = _big_state(ctx)
    path = ctx.path("big-restore.mmsbckpt")
    mmsb.checkpoint_log(state, str(path))

    def batch(targets: list[Any], n: int) -> None:
        for target in targets:
            mmsb.load_checkpoint(target, str(path))

    m = ctx.measure(
        batch, setup=lambda n: [ctx.new_state() for _ in range(n)], inner=1, repeats=ctx.pick(7, 2)
    )
    return CaseOutcome(
        m, {"state_bytes": state_bytes, "state_mb_per_s": state_bytes / m.stats.median_ns * 1e3}
    )


# replay -------------------------------------------------------------------------------


def _history_state(ctx: RunContext, n_updates: int) -> tuple[Any, int]:
    import mmsb

    rng = _rng(ctx, 3)
    state = ctx.new_state()
    pid = mmsb.create_page(state, KIB).id
    for _ in range(n_updates):
        mmsb.update_page(state, pid, rng.integers(1, 256, KIB, dtype=np.uint8).tobytes())
    return state, pid


@case("replay", "epochs_100", "replay_to_epoch(state, 100) of one 1 KiB page with 100 deltas")
def replay_epochs_100(ctx: RunContext) -> CaseOutcome:
    import mmsb

    state, pid = _history_state(ctx, 100)

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            mmsb.replay_to_epoch(state, 100)

    m = ctx.measure(batch, max_inner=ctx.pick(2_000, 10))
    replayed = mmsb.replay_to_epoch(state, 100)
    expect(
        mmsb.query_page(replayed, pid) == mmsb.query_page(state, pid),
        "replay_to_epoch(100) differs from the live page",
    )
    return CaseOutcome(m, {"deltas": 100})


@case("replay", "page_history_100", "replay_page_history of one 1 KiB page with 100 deltas")
def replay_page_history_100(ctx: RunContext) -> CaseOutcome:
    import mmsb

    state, pid = _history_state(ctx, 100)

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            mmsb.replay_page_history(state, pid)

    m = ctx.measure(batch, max_inner=ctx.pick(2_000, 10))
    history = mmsb.replay_page_history(state, pid)
    expect(len(history) == 100, f"replay_page_history gave {len(history)} snapshots, not 100")
    expect(bytes(history[-1].data) == mmsb.query_page(state, pid), "last snapshot is not live")
    return CaseOutcome(m, {"deltas": 100})


@case("replay", "to_lsn_1mb_dense",
      "replay_records_to_lsn(last) of a log of dense 1 MiB deltas, every record applied "
      "in order (replay_to_lsn answers from keyframes instead); GB/s")
def replay_lsn_1mb(ctx: RunContext) -> CaseOutcome:
    import mmsb
    from mmsb._history.replay import replay_records_to_lsn

    n_deltas = ctx.pick(64, 4)
    state = ctx.new_state()
    pid = mmsb.create_page(state, MIB).id
    for data in alternating(dense_pair(_rng(ctx, 4), MIB), n_deltas):
        mmsb.update_page(state, pid, data)
    lsn = state.last_lsn

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            replay_records_to_lsn(state, lsn)

    m = ctx.measure(batch, inner=1, repeats=ctx.pick(11, 2))
    replayed = replay_records_to_lsn(state, lsn)
    expect(mmsb.query_page(replayed, pid) == mmsb.query_page(state, pid), "replay differs")
    delta_bytes = n_deltas * MIB
    return CaseOutcome(
        m,
        {
            "deltas": n_deltas,
            "delta_bytes": delta_bytes,
            "gb_per_s": delta_bytes / m.stats.median_ns,
        },
    )


def small_writes(
    rng: np.random.Generator, page_ids: list[int], n: int, size: int, width: int = 8
) -> list[tuple[int, int, bytes]]:
    """``n`` writes of ``width`` random non-zero bytes at random offsets of random pages."""
    pids = rng.choice(np.asarray(page_ids), n)
    offs = rng.integers(0, size - width + 1, n)
    vals = rng.integers(1, 256, (n, width), dtype=np.uint8)
    return [(int(p), int(o), v.tobytes()) for p, o, v in zip(pids, offs, vals, strict=True)]


@case(
    "replay",
    "to_lsn_small_deltas",
    "replay_records_to_lsn(last) of ~100k 8-byte deltas over 1,000 pages of 1 KiB, every "
    "record applied in order (replay_to_lsn answers from keyframes instead); deltas/s",
)
def replay_lsn_small(ctx: RunContext) -> CaseOutcome:
    import mmsb
    from mmsb._history.replay import replay_records_to_lsn

    n_pages, n_deltas = ctx.pick((1_000, 100_000), (50, 1_000))
    rng = _rng(ctx, 5)
    state = ctx.new_state()
    ids = [p.id for p in mmsb.create_pages(state, n_pages, KIB)]
    writes = small_writes(rng, ids, n_deltas, KIB)
    chunk = 10_000
    for i in range(0, n_deltas, chunk):
        mmsb.apply_batch(state, writes[i : i + chunk])
    lsn = state.last_lsn

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            replay_records_to_lsn(state, lsn)

    m = ctx.measure(batch, inner=1, repeats=ctx.pick(7, 2))
    replayed = replay_records_to_lsn(state, lsn)
    expect(_same_pages(state, replayed), "replay of small deltas differs from the live state")
    return CaseOutcome(
        m,
        {
            "deltas": n_deltas,
            "pages": n_pages,
            "deltas_per_s": n_deltas / m.stats.median_ns * 1e9,
        },
    )


# stress -------------------------------------------------------------------------------


@case(
    "stress",
    "typical_workload",
    "the seed's workload: start, 50 pages, 10 DATA edges, 200 random updates, 1 checkpoint, stop",
)
def stress_typical(ctx: RunContext) -> CaseOutcome:
    import mmsb

    rng = _rng(ctx, 6)
    path = ctx.path("stress.mmsbckpt")

    def plan(_: int) -> tuple[list[tuple[int, int]], list[int], list[bytes]]:
        children = rng.choice(np.arange(25, 50), 10, replace=False)
        edges = [(int(rng.integers(0, 25)), int(c)) for c in children]
        targets = [int(t) for t in rng.integers(0, 50, 200)]
        payloads = rng.integers(0, 256, (200, KIB), dtype=np.uint8)
        return edges, targets, [row.tobytes() for row in payloads]

    def batch(obj: tuple[list[tuple[int, int]], list[int], list[bytes]], n: int) -> None:
        edges, targets, payloads = obj
        for _ in range(n):
            state = mmsb.mmsb_start(config=ctx.mmsb_config())
            pages = [mmsb.create_page(state, KIB) for _ in range(50)]
            for parent, child in edges:
                mmsb.add_dependency(state, pages[parent].id, pages[child].id, mmsb.DATA_DEPENDENCY)
                mmsb.register_passthrough_recompute(state, pages[child].id, pages[parent].id)
            for target, data in zip(targets, payloads, strict=True):
                mmsb.update_page(state, pages[target].id, data)
            mmsb.checkpoint_log(state, str(path))
            mmsb.mmsb_stop(state)

    m = ctx.measure(batch, setup=plan, inner=1, repeats=ctx.pick(15, 2))
    return CaseOutcome(m, {"pages": 50, "edges": 10, "updates": 200, "checkpoints": 1})


# batch --------------------------------------------------------------------------------


def _batch_setup(ctx: RunContext, rng: np.random.Generator, n_pages: int) -> Any:
    import mmsb

    def setup(n: int) -> tuple[Any, list[tuple[int, int, bytes]]]:
        state = ctx.new_state()
        ids = [p.id for p in mmsb.create_pages(state, n_pages, KIB)]
        return state, small_writes(rng, ids, n, KIB)

    return setup


@case("batch", "apply_batch_small", "apply_batch of 8-byte writes over 1,000 pages of 1 KiB")
def batch_apply_small(ctx: RunContext) -> CaseOutcome:
    import mmsb

    n_pages = ctx.pick(1_000, 50)
    setup = _batch_setup(ctx, _rng(ctx, 7), n_pages)

    def batch(obj: tuple[Any, list[tuple[int, int, bytes]]], n: int) -> None:
        state, writes = obj
        mmsb.apply_batch(state, writes)

    m = ctx.measure(
        batch, setup=setup, inner=ctx.pick(20_000, 500), trace_alloc=True, trace_inner=2_000
    )
    state, writes = setup(200)
    mmsb.apply_batch(state, writes)
    model: dict[int, bytearray] = {pid: bytearray(KIB) for pid in state.pages}
    for pid, off, data in writes:
        model[pid][off : off + len(data)] = data
    expect(
        all(mmsb.query_page(state, pid) == bytes(buf) for pid, buf in model.items()),
        "apply_batch result differs from the writes applied in order",
    )
    return CaseOutcome(
        m,
        {
            "writes_per_batch": m.stats.ops_per_sample,
            "write_bytes": 8,
            "deltas_per_s": 1e9 / m.stats.median_ns,
        },
    )


@case("batch", "write_page_small", "reference: the same 8-byte writes one write_page call each")
def batch_write_small(ctx: RunContext) -> CaseOutcome:
    import mmsb

    n_pages = ctx.pick(1_000, 50)
    setup = _batch_setup(ctx, _rng(ctx, 8), n_pages)

    def batch(obj: tuple[Any, list[tuple[int, int, bytes]]], n: int) -> None:
        state, writes = obj
        write = mmsb.write_page
        for pid, off, data in writes:
            write(state, pid, off, data)

    m = ctx.measure(batch, setup=setup, max_inner=ctx.pick(20_000, 500))
    return CaseOutcome(m, {"write_bytes": 8, "deltas_per_s": 1e9 / m.stats.median_ns})
