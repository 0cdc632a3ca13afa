"""GPU pages: allocation, dense delta apply against the device's own copy bandwidth.

Every case skips, with the reason, when torch is not installed, CUDA is not usable, or
this MMSB build refuses GPU pages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._registry import CaseOutcome, CaseSkipped, RunContext, case, expect
from .cases_core import KIB, MIB, dense_pair


def _torch() -> Any:
    """torch with a usable CUDA device and an MMSB that makes GPU pages, or CaseSkipped."""
    reason = _gpu_unavailable()
    if reason is not None:
        raise CaseSkipped(reason)
    import torch

    return torch


_probe: dict[str, str | None] = {}


def _gpu_unavailable() -> str | None:
    if "reason" in _probe:
        return _probe["reason"]
    reason: str | None = None
    try:
        import torch
    except ImportError:
        reason = "torch is not installed (pip install 'mmsb[gpu]')"
    else:
        if not torch.cuda.is_available():
            reason = "CUDA is not available (torch.cuda.is_available() is False)"
        else:
            import mmsb

            try:
                state = mmsb.MMSBState(config=mmsb.MMSBConfig(enable_gpu=True))
                mmsb.create_page(state, KIB, location="gpu")
            except mmsb.MMSBError as exc:
                reason = f"this MMSB build makes no GPU pages: {exc}"
    _probe["reason"] = reason
    return reason


def _gpu_state(ctx: RunContext) -> Any:
    return ctx.new_state(enable_gpu=True)


@case("gpu", "alloc_1kb", "create_page(state, 1024, location='gpu'), one per call")
def gpu_alloc_1kb(ctx: RunContext) -> CaseOutcome:
    torch = _torch()
    import mmsb

    def batch(state: Any, n: int) -> None:
        for _ in range(n):
            mmsb.create_page(state, KIB, location="gpu")
        torch.cuda.synchronize()

    m = ctx.measure(batch, setup=lambda n: _gpu_state(ctx), max_inner=ctx.pick(5_000, 20))
    return CaseOutcome(m, {"page_bytes": KIB})


def _gpu_size(ctx: RunContext) -> int:
    return int(ctx.pick(64 * MIB, MIB))


@case("gpu", "delta_dense_64mb", "update_page of a 64 MiB GPU page, every byte changed; GB/s")
def gpu_delta_dense(ctx: RunContext) -> CaseOutcome:
    torch = _torch()
    import mmsb

    size = _gpu_size(ctx)
    a, b = dense_pair(np.random.default_rng(ctx.seed), size)
    device_payloads = [torch.frombuffer(bytearray(x), dtype=torch.uint8).to("cuda") for x in (a, b)]
    # Prefer payloads already on the device (a delta applied on the GPU); fall back to
    # host bytes, which adds the host-to-device transfer, and say so.
    probe = _gpu_state(ctx)
    pid = mmsb.create_page(probe, size, location="gpu").id
    try:
        mmsb.update_page(probe, pid, device_payloads[0])
        payloads: list[Any] = device_payloads
        source = "device tensor"
    except Exception:  # any refusal of a device payload means: use host bytes
        payloads = [a, b]
        source = "host bytes (includes host-to-device transfer)"
    del probe

    def setup(n: int) -> tuple[Any, int]:
        state = _gpu_state(ctx)
        return state, mmsb.create_page(state, size, location="gpu").id

    def batch(obj: tuple[Any, int], n: int) -> None:
        state, page_id = obj
        for i in range(n):
            mmsb.update_page(state, page_id, payloads[i % 2])
        torch.cuda.synchronize()

    m = ctx.measure(batch, setup=setup, max_inner=ctx.pick(8, 2), repeats=ctx.pick(11, 2))
    state, page_id = setup(1)
    batch((state, page_id), 1)
    expect(mmsb.query_page(state, page_id) == a, "GPU page bytes differ from the update")
    return CaseOutcome(m, {"bytes": size, "gb_per_s": size / m.stats.median_ns, "source": source})


def _copy(ctx: RunContext, kind: str) -> CaseOutcome:
    torch = _torch()
    size = _gpu_size(ctx)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    if kind == "d2d":
        src = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda")
    else:
        src = torch.randint(0, 256, (size,), dtype=torch.uint8).pin_memory()

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    m = ctx.measure(batch, max_inner=ctx.pick(64, 4))
    return CaseOutcome(m, {"bytes": size, "gb_per_s": size / m.stats.median_ns})


@case("gpu", "copy_d2d_64mb", "floor: torch device-to-device copy of 64 MiB; GB/s")
def gpu_copy_d2d(ctx: RunContext) -> CaseOutcome:
    return _copy(ctx, "d2d")


@case("gpu", "copy_h2d_64mb", "reference: torch pinned host-to-device copy of 64 MiB; GB/s")
def gpu_copy_h2d(ctx: RunContext) -> CaseOutcome:
    return _copy(ctx, "h2d")
