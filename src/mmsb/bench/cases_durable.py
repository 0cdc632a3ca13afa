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


def _recovery_case(ctx: RunContext, name: str, every: int | None) -> CaseOutcome:
    """Recover a bus of 100 pages after 100k 8-byte writes (ten apply_batch calls),
    all still in the write-ahead log (``every`` None), or checkpointed every ``every``
    records so that recovery reads a chain of checkpoints' log sections."""
    import mmsb

    n_records = ctx.pick(100_000, 2_000)
    path = ctx.path(name)
    extra = {} if every is None else {"max_tlog_size": ctx.pick(every, 500)}
    cfg = ctx.mmsb_config(fsync="none", checkpoint_interval=0, **extra)
    state = mmsb.mmsb_start(enable_gpu=False, config=cfg, path=path)
    pages = [p.id for p in mmsb.create_pages(state, 100, 1024)]
    rng = np.random.default_rng(ctx.seed + 1)
    offsets = rng.integers(0, 1016, n_records).tolist()
    values = rng.integers(1, 256, (n_records, 8), dtype=np.uint8)
    writes = [(pages[i % 100], offsets[i], values[i].tobytes()) for i in range(n_records)]
    step = ctx.pick(10_000, 200)
    for start in range(0, n_records, step):
        mmsb.apply_batch(state, writes[start : start + step])
    logged = state.last_lsn
    # Leave what followed the last checkpoint in the log, as a crash would: no
    # checkpoint at stop.
    assert state.bus is not None
    state.bus.flush()
    state.bus.records_since_ckpt = 0
    mmsb.mmsb_stop(state)
    checkpoints = len(list((path / "checkpoints").iterdir()))

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            recovered = mmsb.open_readonly(path, config=cfg)
            expect(recovered.last_lsn == logged, "recovery lost records")
            expect(len(recovered.log.records) == logged, "recovery lost history")

    m = ctx.measure(batch, inner=1, repeats=ctx.pick(5, 2))
    return CaseOutcome(m, {
        "records": n_records,
        "checkpoints": checkpoints,
        "records_per_s": n_records / (m.stats.median_ns / 1e9),
    })


@case("durable", "recovery_100k", "recover a bus whose log holds 100k records after its checkpoint")
def recovery_100k(ctx: RunContext) -> CaseOutcome:
    return _recovery_case(ctx, "recovery", None)


@case("durable", "recovery_100k_chain",
      "recover a bus whose 100k records lie in a chain of checkpoints (one per 10k records)")
def recovery_100k_chain(ctx: RunContext) -> CaseOutcome:
    return _recovery_case(ctx, "recovery-chain", 10_000)
