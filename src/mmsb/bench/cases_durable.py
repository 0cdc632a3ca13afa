"""The durable bus: append throughput per fsync mode, and recovery time."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._registry import CaseOutcome, RunContext, case, expect

_RECORD_BYTES = 64


def _open(ctx: RunContext, name: str, fsync: str) -> Any:
    import mmsb

    cfg = ctx.mmsb_config(fsync=fsync, checkpoint_interval=0)
    state = mmsb.mmsb_start(enable_gpu=False, config=cfg, path=ctx.path(name))
    ctx.on_close(lambda: mmsb.mmsb_stop(state))
    return state


def _append_case(ctx: RunContext, fsync: str) -> CaseOutcome:
    """write_page of 64 changed bytes per call on a durable bus."""
    import mmsb

    state = _open(ctx, f"append-{fsync}", fsync)
    page = mmsb.create_page(state, 4096).id
    rng = np.random.default_rng(ctx.seed)
    payloads = [rng.integers(1, 256, _RECORD_BYTES, dtype=np.uint8).tobytes() for _ in range(64)]
    counter = [0]

    def batch(_obj: None, n: int) -> None:
        write = mmsb.write_page
        k = counter[0]
        for i in range(n):
            write(state, page, ((k + i) * _RECORD_BYTES) % 4032, payloads[(k + i) & 63])
        counter[0] = k + n

    m = ctx.measure(batch, max_inner=ctx.pick(2000 if fsync == "always" else 200_000, 50))
    per_op_s = m.stats.median_ns / 1e9
    return CaseOutcome(m, {
        "fsync": fsync,
        "records_per_s": 1 / per_op_s,
        "mb_per_s": _RECORD_BYTES / per_op_s / 1e6,
    })


@case("durable", "append_always", "write_page (64 B) on a durable bus, fsync=\"always\"")
def append_always(ctx: RunContext) -> CaseOutcome:
    return _append_case(ctx, "always")


@case("durable", "append_batch", "write_page (64 B) on a durable bus, fsync=\"batch\" (group commit)")
def append_batch(ctx: RunContext) -> CaseOutcome:
    return _append_case(ctx, "batch")


@case("durable", "append_none", "write_page (64 B) on a durable bus, fsync=\"none\"")
def append_none(ctx: RunContext) -> CaseOutcome:
    return _append_case(ctx, "none")


@case("durable", "recovery_100k", "recover a bus whose log holds 100k records after its checkpoint")
def recovery_100k(ctx: RunContext) -> CaseOutcome:
    import mmsb

    n_records = ctx.pick(100_000, 2_000)
    path = ctx.path("recovery")
    cfg = ctx.mmsb_config(fsync="none", checkpoint_interval=0)
    state = mmsb.mmsb_start(enable_gpu=False, config=cfg, path=path)
    pages = [p.id for p in mmsb.create_pages(state, 100, 1024)]
    rng = np.random.default_rng(ctx.seed + 1)
    offsets = rng.integers(0, 1016, n_records).tolist()
    values = rng.integers(1, 256, (n_records, 8), dtype=np.uint8)
    writes = [(pages[i % 100], offsets[i], values[i].tobytes()) for i in range(n_records)]
    for start in range(0, n_records, 10_000):
        mmsb.apply_batch(state, writes[start : start + 10_000])
    logged = state.last_lsn
    # Leave the records in the log, as a crash would: no checkpoint at stop.
    assert state.bus is not None
    state.bus.flush()
    state.bus.records_since_ckpt = 0
    mmsb.mmsb_stop(state)

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            recovered = mmsb.open_readonly(path, config=cfg)
            expect(recovered.last_lsn == logged, "recovery lost records")

    m = ctx.measure(batch, inner=1, repeats=ctx.pick(5, 2))
    return CaseOutcome(m, {
        "records": n_records,
        "records_per_s": n_records / (m.stats.median_ns / 1e9),
    })
