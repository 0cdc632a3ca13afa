"""Device pages in the engine: gpu and unified pages (a host mirror and a device copy)
give the same bytes as cpu pages through every operation, or are refused with a typed
error that changes nothing.

The engine's device paths run here on a host stand-in (a HostBackend given to the
state through its testing hook). The tests at the end use the real CUDA backends and
skip, with the probe's reason, where no device is usable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmsb
from mmsb._core import devices as core_devices
from mmsb._device import HostBackend, unavailable_reason
from mmsb._device.backend import DeviceBackend
from mmsb.errors import (
    GPUMemoryError,
    InvalidArgumentError,
    InvalidDeltaError,
    MetadataError,
    PageNotFoundError,
    UnsupportedLocationError,
)
from mmsb.types import PageLocation

CHUNK = 1 << 16
BIG = 8192  # larger than the compiled small-write limit (4096): the general write path


def stand_in_state(**config: Any) -> mmsb.MMSBState:
    """An in-memory state whose gpu and unified locations use host backends."""
    s = mmsb.MMSBState(mmsb.MMSBConfig(**config))
    s._use_backend_for_tests("gpu", HostBackend(chunk_size=CHUNK))
    s._use_backend_for_tests("unified", HostBackend(chunk_size=CHUNK))
    return s


@pytest.fixture
def state() -> mmsb.MMSBState:
    return stand_in_state()


class DLPackArray:
    """An array that offers only DLPack and nbytes, as a device array does (its memory
    is the host's here)."""

    def __init__(self, arr: np.ndarray) -> None:
        self._a = arr
        self.nbytes = arr.nbytes

    def __dlpack__(self, **kw: Any) -> Any:
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self) -> Any:
        return self._a.__dlpack_device__()


class FailingBackend(HostBackend):
    """A host backend that runs out of memory after ``slots`` allocations, or whose copies
    in fail once ``fail_copies`` is set."""

    def __init__(self, slots: int = 1 << 30) -> None:
        super().__init__(chunk_size=CHUNK)
        self.left = slots
        self.fail_copies = False

    def alloc(self, size: int) -> int:
        if self.left <= 0:
            raise GPUMemoryError("out of device memory (test backend)", requested_bytes=size)
        self.left -= 1
        return super().alloc(size)

    def copy_in(self, slot: int, data: Any, offset: int = 0) -> None:
        if self.fail_copies:
            raise GPUMemoryError("device copy failed (test backend)")
        super().copy_in(slot, data, offset)

    def copy_in_many(self, items: Any) -> Any:
        if self.fail_copies:
            raise GPUMemoryError("device copy failed (test backend)")
        return super().copy_in_many(items)


def fingerprint(s: mmsb.MMSBState) -> tuple[Any, ...]:
    """What a refused call must leave as it was."""
    pages = tuple((pid, p.size, p.epoch, p.location, mmsb.query_page(s, pid))
                  for pid, p in s.pages.items())
    return (s.last_lsn, s.next_page_id, len(s.tlog), pages)


def device_bytes(page: mmsb.Page) -> bytes:
    return np.asarray(page.device_array()).tobytes()


def record(s: mmsb.MMSBState, *types: mmsb.EventType) -> list[tuple[Any, tuple[Any, ...]]]:
    """Every event of ``types``, in order, as (type, data)."""
    got: list[tuple[Any, tuple[Any, ...]]] = []
    for t in types:
        mmsb.subscribe(s, t, lambda _s, et, *data: got.append((et, data)))
    return got


def slots_in_use(s: mmsb.MMSBState, location: str) -> int:
    return mmsb.get_device_stats(s)[location].slots_in_use


# -- creation, reads, stats ------------------------------------------------------------------

@pytest.mark.parametrize("location", ["gpu", "unified", PageLocation.GPU])
def test_create_device_page(state: mmsb.MMSBState, location: Any) -> None:
    p = mmsb.create_page(state, 100, location=location)
    assert p.location in (PageLocation.GPU, PageLocation.UNIFIED)
    assert p.epoch == 0 and p.size == 100
    assert mmsb.query_page(state, p.id) == bytes(100)
    assert device_bytes(p) == bytes(100)
    assert not p.device_array().flags.writeable
    state._check()


def test_gpu_flag_spelling(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 64, gpu=True)
    assert p.location is PageLocation.GPU
    pages = mmsb.create_pages(state, 3, 32, gpu=True)
    assert [q.location for q in pages] == [PageLocation.GPU] * 3
    assert mmsb.create_page(state, 8, gpu=False).location is PageLocation.CPU
    assert mmsb.create_page(state, 8, location="gpu", gpu=True).location is PageLocation.GPU


def test_gpu_flag_refusals(state: mmsb.MMSBState) -> None:
    before = fingerprint(state)
    with pytest.raises(InvalidArgumentError, match="gpu=True asks for location 'gpu'"):
        mmsb.create_page(state, 8, location="unified", gpu=True)
    with pytest.raises(InvalidArgumentError, match="gpu must be True or False"):
        mmsb.create_page(state, 8, gpu="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="gpu must be True or False"):
        mmsb.create_pages(state, 2, 8, gpu=1)  # type: ignore[arg-type]
    assert fingerprint(state) == before


def test_create_pages_on_device_and_stats(state: mmsb.MMSBState) -> None:
    mmsb.create_pages(state, 4, 100, location="gpu")
    mmsb.create_pages(state, 2, 50, location="unified")
    mmsb.create_pages(state, 3, 10)
    st_ = mmsb.get_stats(state)
    assert (st_.cpu_pages, st_.gpu_pages, st_.unified_pages) == (3, 4, 2)
    assert (st_.cpu_page_bytes, st_.gpu_page_bytes, st_.unified_page_bytes) == (30, 400, 100)
    assert st_.device_stale_pages == 0
    dev = mmsb.get_device_stats(state)
    assert set(dev) == {"gpu", "unified"}
    assert dev["gpu"].slots_in_use == 4 and dev["unified"].slots_in_use == 2
    # The stand-in says what it is: host memory.
    assert dev["gpu"].device == "host memory" and dev["gpu"].location == "cpu"
    assert st_.device_bytes_in_use == dev["gpu"].bytes_in_use + dev["unified"].bytes_in_use
    state._check()


def test_no_device_stats_without_device_pages() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    mmsb.create_page(s, 16)
    assert mmsb.get_device_stats(s) == {}
    assert mmsb.get_stats(s).device_bytes_in_use == 0


# -- writes: same bytes as a cpu page ----------------------------------------------------------

def _writes(size: int) -> list[tuple[str, Any]]:
    rng = np.random.default_rng(7)
    whole = rng.integers(0, 256, size, dtype=np.uint8)
    part = rng.integers(0, 256, size // 3, dtype=np.uint8)
    return [
        ("write", (3, b"abc")),
        ("update", whole.tobytes()),
        ("write", (size // 4, part.tobytes())),
        ("write_dev", (size // 2, part[: size // 4].copy())),
        ("update_dev", np.flip(whole).copy()),
        ("write_dev", (0, np.zeros(16, np.uint8))),
        ("update", whole.tobytes()),
        ("route", None),
    ]


def _apply(s: mmsb.MMSBState, pid: int, op: str, arg: Any, dev: bool) -> None:
    if op == "write":
        mmsb.write_page(s, pid, arg[0], arg[1])
    elif op == "update":
        mmsb.update_page(s, pid, arg)
    elif op == "write_dev":
        mmsb.write_page(s, pid, arg[0], DLPackArray(arg[1]) if dev else arg[1])
    elif op == "update_dev":
        mmsb.update_page(s, pid, DLPackArray(arg) if dev else arg)
    elif op == "route":
        size = s.pages[pid].size
        mask = np.zeros(size, bool)
        mask[::5] = True
        mmsb.route_delta(s, mmsb.create_delta(s, pid, mask, np.full(size, 9, np.uint8)))


@pytest.mark.parametrize("size", [64, BIG, 3 * BIG + 5])
@pytest.mark.parametrize("location", ["gpu", "unified"])
def test_writes_give_cpu_bytes(state: mmsb.MMSBState, size: int, location: str) -> None:
    cpu = mmsb.create_page(state, size)
    dev = mmsb.create_page(state, size, location=location)
    for op, arg in _writes(size):
        _apply(state, cpu.id, op, arg, dev=False)
        _apply(state, dev.id, op, arg, dev=True)
        assert mmsb.query_page(state, dev.id) == mmsb.query_page(state, cpu.id), op
        assert dev.data.tobytes() == cpu.data.tobytes()
        assert dev.epoch == cpu.epoch
        assert device_bytes(dev) == mmsb.query_page(state, dev.id), op
        state._check()
    assert mmsb.verify_state_consistency(state)
    got = [(d.page_id, d.epoch, bytes(d.values)) for d in mmsb.get_deltas_for_page(state, dev.id)]
    want = [(dev.id, d.epoch, bytes(d.values)) for d in mmsb.get_deltas_for_page(state, cpu.id)]
    assert got == want


def test_large_write_follows_on_device_in_one_launch(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, BIG, location="gpu")
    before = mmsb.get_device_stats(state)["gpu"]
    data = bytes(range(256)) * (BIG // 256)
    mmsb.update_page(state, p.id, data)
    after = mmsb.get_device_stats(state)["gpu"]
    assert after.deltas_applied == before.deltas_applied + 1
    assert after.bytes_h2d > before.bytes_h2d
    assert mmsb.get_stats(state).device_stale_pages == 0  # followed in the same call
    assert device_bytes(p) == data
    assert mmsb.get_device_stats(state)["gpu"].bytes_h2d == after.bytes_h2d  # no re-copy


def test_small_write_leaves_copy_stale_until_next_use(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 64, location="gpu")
    mmsb.write_page(state, p.id, 0, b"xy")
    assert mmsb.get_stats(state).device_stale_pages == 1
    assert mmsb.sync_page_to_gpu(state, p.id) is True
    assert mmsb.get_stats(state).device_stale_pages == 0
    assert mmsb.sync_page_to_gpu(state, p) is False
    assert device_bytes(p)[:2] == b"xy"


def test_device_array_write_is_diffed_on_the_backend(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, BIG, location="gpu")
    new = np.zeros(BIG, np.uint8)
    new[10:20] = 5
    diffs = mmsb.get_device_stats(state)["gpu"].diffs
    lsn = state.last_lsn
    mmsb.update_page(state, p.id, DLPackArray(new))
    assert mmsb.get_device_stats(state)["gpu"].diffs == diffs + 1
    assert state.last_lsn == lsn + 1 and p.epoch == 1
    (d,) = mmsb.get_deltas_for_page(state, p.id)
    assert d.is_sparse and d.indices.tolist() == list(range(10, 20))
    assert mmsb.get_stats(state).device_stale_pages == 0
    # The same bytes again: nothing logged, epoch unchanged.
    mmsb.update_page(state, p.id, DLPackArray(new.copy()))
    assert state.last_lsn == lsn + 1 and p.epoch == 1


def test_device_array_write_refusals_change_nothing(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 64, location="gpu")
    mmsb.write_page(state, p.id, 0, b"abc")
    before = fingerprint(state)
    with pytest.raises(InvalidDeltaError, match="update_page replaces the whole page"):
        mmsb.update_page(state, p.id, DLPackArray(np.zeros(10, np.uint8)))
    with pytest.raises(InvalidDeltaError, match="runs outside the page"):
        mmsb.write_page(state, p.id, 60, DLPackArray(np.zeros(10, np.uint8)))
    with pytest.raises(InvalidDeltaError, match="offset must be an int"):
        mmsb.write_page(state, p.id, 1.5, DLPackArray(np.zeros(1, np.uint8)))

    class NoLength:
        def __dlpack__(self, **kw: Any) -> Any:
            return np.zeros(4, np.uint8).__dlpack__(**kw)

    with pytest.raises(InvalidDeltaError, match="does not say its length"):
        mmsb.write_page(state, p.id, 0, NoLength())

    class Unreadable:
        nbytes = 4

        def __dlpack__(self, **kw: Any) -> Any:
            raise BufferError("not readable here")

    assert device_bytes(p)[:3] == b"abc"  # the copy is current
    with pytest.raises(InvalidDeltaError, match="DLPack"):
        mmsb.write_page(state, p.id, 0, Unreadable())
    assert mmsb.get_stats(state).device_stale_pages == 0  # refused before any write
    with pytest.raises(PageNotFoundError):
        mmsb.write_page(state, 999, 0, DLPackArray(np.zeros(1, np.uint8)))
    assert fingerprint(state) == before
    assert device_bytes(p)[:3] == b"abc"
    state._check()


class Unexportable:
    """A device array that says its length but cannot be read."""

    nbytes = 4

    def __dlpack__(self, **kw: Any) -> Any:
        raise BufferError("not readable here")

    def __dlpack_device__(self) -> Any:
        return (1, 0)


def test_unreadable_device_array_is_refused_before_any_device_work(tmp_path: Any) -> None:
    s, b = managed_state()
    g = mmsb.create_page(s, 64, location="gpu")
    u = mmsb.create_page(s, 64, location="unified")
    mmsb.write_page(s, g.id, 0, b"g")  # the gpu page's copy is stale
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(s, path)
    mmsb.load_checkpoint(s, path)  # the unified page in ordinary memory, no copies
    before = fingerprint(s), _memory_counters(s), mmsb.get_stats(s).device_stale_pages
    lying = DLPackArray(np.ones(40, np.uint8))
    lying.nbytes = 4  # fits at offset 30 by what it says, not by what it holds
    for pid in (g.id, u.id):
        with pytest.raises(InvalidDeltaError, match="DLPack"):
            mmsb.write_page(s, pid, 0, Unexportable())
        with pytest.raises(InvalidDeltaError, match="says it holds 4 bytes"):
            mmsb.write_page(s, pid, 30, lying)
    assert (fingerprint(s), _memory_counters(s), mmsb.get_stats(s).device_stale_pages) == before
    assert not b.owns(s.pages[u.id].data)  # not moved into managed memory
    assert mmsb.get_stats(s).device_pages_synced == 0
    s._check()


def test_dlpack_input_on_a_cpu_page(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 16)
    mmsb.write_page(state, p.id, 2, DLPackArray(np.arange(4, dtype=np.uint8)))
    assert mmsb.query_page(state, p.id)[2:6] == bytes([0, 1, 2, 3])

    class Broken:
        nbytes = 4

        def __dlpack__(self, **kw: Any) -> Any:
            raise BufferError("lives on a device")

    before = fingerprint(state)
    with pytest.raises(InvalidDeltaError, match="a cpu page takes host bytes"):
        mmsb.write_page(state, p.id, 0, Broken())
    assert fingerprint(state) == before


# -- device views, syncs and their refusals -----------------------------------------------------

def test_device_array_and_sync_refuse_cpu_pages(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 16)
    before = fingerprint(state)
    with pytest.raises(InvalidArgumentError, match="is on the cpu"):
        p.device_array()
    with pytest.raises(InvalidArgumentError, match="is on the cpu"):
        mmsb.sync_page_to_gpu(state, p.id)
    with pytest.raises(PageNotFoundError):
        mmsb.sync_page_to_gpu(state, 12345)
    assert fingerprint(state) == before


def test_ensure_page_on_device(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 64)
    mmsb.write_page(state, p.id, 0, b"host")
    lsn = state.last_lsn
    assert mmsb.ensure_page_on_device(state, p.id) == p
    assert p.location is PageLocation.GPU and state.last_lsn == lsn + 1
    mmsb.write_page(state, p.id, 4, b"!")  # leaves the copy behind
    mmsb.ensure_page_on_device(state, p.id, "gpu")
    assert state.last_lsn == lsn + 2  # the write only: no migration
    assert mmsb.get_stats(state).device_stale_pages == 0
    assert device_bytes(p)[:5] == b"host!"
    mmsb.ensure_page_on_device(state, p, "unified")
    assert p.location is PageLocation.UNIFIED and device_bytes(p)[:5] == b"host!"
    mmsb.ensure_page_on_device(state, p.id)  # a device page stays where it is
    assert p.location is PageLocation.UNIFIED
    before = fingerprint(state)
    with pytest.raises(InvalidArgumentError, match="puts a page on a device"):
        mmsb.ensure_page_on_device(state, p.id, "cpu")
    with pytest.raises(UnsupportedLocationError):
        mmsb.ensure_page_on_device(state, p.id, "tape")
    with pytest.raises(PageNotFoundError):
        mmsb.ensure_page_on_device(state, 999)
    assert fingerprint(state) == before
    state._check()


def test_ensure_page_on_device_refused_without_a_device() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    s._use_backend_for_tests("gpu", FailingBackend(slots=0))
    p = mmsb.create_page(s, 16)
    before = fingerprint(s)
    with pytest.raises(GPUMemoryError):
        mmsb.ensure_page_on_device(s, p.id)
    assert fingerprint(s) == before


def test_device_array_has_dlpack(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 32, location="unified")
    mmsb.update_page(state, p.id, bytes(range(32)))
    view = p.device_array()
    assert hasattr(view, "__dlpack__")
    assert np.from_dlpack(view).tobytes() == bytes(range(32))


def test_stopped_state_refuses_device_calls(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 16, location="gpu")
    state.close()
    with pytest.raises(mmsb.StateClosedError):
        p.device_array()
    with pytest.raises(mmsb.StateClosedError):
        mmsb.sync_page_to_gpu(state, p.id)


def test_stopping_a_state_releases_its_device_copies() -> None:
    s, managed = managed_state()
    gpu = s.devices.backends[int(PageLocation.GPU)]  # type: ignore[union-attr]
    g = mmsb.create_page(s, 64, location="gpu")
    u = mmsb.create_page(s, 64, location="unified")
    mmsb.update_page(s, g.id, b"\x01" * 64)
    mmsb.update_page(s, u.id, b"\x02" * 64)
    assert device_bytes(g) == b"\x01" * 64 and gpu.stats().slots_in_use == 1
    s.close()
    assert gpu.stats().slots_in_use == 0 and mmsb.get_device_stats(s) == {}
    assert not s.arena.has_managed  # the unified backend's source is let go too
    # The bytes stay readable, the managed ones included.
    assert mmsb.query_page(s, g.id) == b"\x01" * 64
    assert mmsb.query_page(s, u.id) == b"\x02" * 64 and managed.owns(u.data)
    with pytest.raises(mmsb.StateClosedError):
        g.device_array()
    s._check()


# -- structural changes -------------------------------------------------------------------------

def test_delete_frees_the_device_slot(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 64, location="gpu")
    q = mmsb.create_page(state, 64, location="gpu")
    assert slots_in_use(state, "gpu") == 2
    mmsb.delete_page(state, p.id)
    assert slots_in_use(state, "gpu") == 1
    assert device_bytes(q) == bytes(64)
    state._check()


def test_clone_keeps_location_and_bytes(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, BIG, location="gpu")
    mmsb.update_page(state, p.id, b"\x07" * BIG)
    c = mmsb.clone_page(state, p.id)
    assert c.location is PageLocation.GPU and c.epoch == p.epoch
    assert device_bytes(c) == b"\x07" * BIG
    mmsb.write_page(state, c.id, 0, b"zz")
    assert device_bytes(p)[:2] == b"\x07\x07"
    assert mmsb.verify_state_consistency(state)
    state._check()


def test_resize_device_page(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 64, location="gpu")
    mmsb.update_page(state, p.id, bytes(range(64)))
    assert device_bytes(p) == bytes(range(64))
    mmsb.resize_page(state, p.id, 100)
    assert device_bytes(p) == bytes(range(64)) + bytes(36)
    mmsb.resize_page(state, p.id, 10)
    assert device_bytes(p) == bytes(range(10))
    assert slots_in_use(state, "gpu") == 1
    assert mmsb.verify_state_consistency(state)
    state._check()


def test_migrate_round_trip_is_logged_and_replayed(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, BIG)
    data = bytes(range(256)) * (BIG // 256)
    mmsb.update_page(state, p.id, data)
    epoch = p.epoch
    lsns = []
    for loc in ("gpu", "unified", "cpu", "unified", "gpu"):
        mmsb.migrate_page(state, p.id, loc)
        lsns.append((state.last_lsn, loc))
        assert p.location is PageLocation[loc.upper()] and p.epoch == epoch
        assert mmsb.query_page(state, p.id) == data
        if loc != "cpu":
            assert device_bytes(p) == data
        state._check()
    assert slots_in_use(state, "gpu") == 1 and slots_in_use(state, "unified") == 0
    mmsb.write_page(state, p.id, 0, b"after")
    assert mmsb.verify_state_consistency(state)
    for lsn, loc in lsns:
        past = mmsb.replay_to_lsn(state, lsn)
        assert past.pages[p.id].location is PageLocation[loc.upper()]
        assert mmsb.query_page(past, p.id) == data
    kinds = [type(r).__name__ for r in state.log.records]
    assert kinds.count("PageMigrate") == 5


def test_migrate_to_the_same_place_logs_nothing(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 16, location="gpu")
    before = fingerprint(state)
    mmsb.migrate_page(state, p.id, "gpu")
    assert fingerprint(state) == before


def test_create_events(state: mmsb.MMSBState) -> None:
    got = record(state, mmsb.EventType.PAGE_CREATED)
    p = mmsb.create_page(state, 16, location="gpu")
    qs = mmsb.create_pages(state, 2, 16, location="unified")
    c = mmsb.clone_page(state, p.id)
    assert got == [(mmsb.EventType.PAGE_CREATED, (pid,)) for pid in (p.id, qs[0].id, qs[1].id, c.id)]


def test_migrate_events(state: mmsb.MMSBState) -> None:
    got = record(state, mmsb.EventType.PAGE_MIGRATED)
    p = mmsb.create_page(state, 16)
    mmsb.migrate_page(state, p.id, "gpu")
    assert got == [(mmsb.EventType.PAGE_MIGRATED, (p.id, PageLocation.CPU, PageLocation.GPU))]


# -- refusals: no device, no memory, durable buses ---------------------------------------------

@pytest.mark.skipif(unavailable_reason("gpu") is None, reason="a CUDA device is usable here")
@pytest.mark.parametrize("location", ["gpu", "unified"])
def test_unusable_location_refused_with_the_probe_reason(location: str) -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    p = mmsb.create_page(s, 16)
    before = fingerprint(s)
    reason = unavailable_reason(location)
    assert reason is not None
    with pytest.raises(GPUMemoryError) as exc:
        mmsb.create_page(s, 16, location=location)
    assert reason in str(exc.value)
    with pytest.raises(GPUMemoryError):
        mmsb.create_pages(s, 4, 16, location=location)
    with pytest.raises(GPUMemoryError):
        mmsb.migrate_page(s, p.id, location)
    assert fingerprint(s) == before
    assert s.devices is None or not s.devices.backends


@pytest.mark.skipif(unavailable_reason("gpu") is None, reason="a CUDA device is usable here")
def test_mmsb_start_enable_gpu_without_a_device_warns_and_refuses() -> None:
    with pytest.warns(RuntimeWarning, match="no CUDA device is usable"):
        s = mmsb.mmsb_start(enable_gpu=True)
    try:
        assert s.config.enable_gpu is False
        with pytest.raises(GPUMemoryError, match="enable_gpu=True"):
            mmsb.create_page(s, 8, gpu=True)
        assert s.last_lsn == 0
    finally:
        mmsb.mmsb_stop(s)


def test_enable_gpu_off_refuses_even_with_a_backend(state: mmsb.MMSBState) -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    s._use_backend_for_tests("gpu", HostBackend(chunk_size=CHUNK))
    before = fingerprint(s)
    with pytest.raises(GPUMemoryError, match="enable_gpu=True"):
        mmsb.create_page(s, 16, location="gpu")
    assert fingerprint(s) == before


def test_unknown_location_refused(state: mmsb.MMSBState) -> None:
    before = fingerprint(state)
    with pytest.raises(UnsupportedLocationError):
        mmsb.create_page(state, 16, location="tpu")
    p = mmsb.create_page(state, 16)
    before = fingerprint(state)
    with pytest.raises(UnsupportedLocationError):
        mmsb.migrate_page(state, p.id, "disk")
    assert fingerprint(state) == before


def test_refused_creation_makes_no_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    def factory(name: str) -> DeviceBackend:
        made.append(name)
        return HostBackend(chunk_size=CHUNK)
    monkeypatch.setattr(core_devices, "_FACTORY", [(factory, DeviceBackend)])
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    with pytest.raises(MetadataError):
        mmsb.create_page(s, 8, location="gpu", metadata={"k": object()})
    with pytest.raises(MetadataError):
        mmsb.create_pages(s, 2, 8, location="unified", metadata={1: 2})
    assert made == [] and mmsb.get_device_stats(s) == {} and s.last_lsn == 0
    mmsb.create_page(s, 8, location="gpu", metadata={"k": 1})
    assert made == ["gpu"]


def test_out_of_device_memory_logs_nothing() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    b = FailingBackend(slots=2)
    s._use_backend_for_tests("gpu", b)
    mmsb.create_page(s, 64, location="gpu")
    p = mmsb.create_page(s, 64)
    before = fingerprint(s)
    with pytest.raises(GPUMemoryError, match="out of device memory"):
        mmsb.create_pages(s, 3, 64, location="gpu")
    assert fingerprint(s) == before
    assert b.stats().slots_in_use == 1  # the slots taken before the failure went back
    b.left = 0
    with pytest.raises(GPUMemoryError):
        mmsb.migrate_page(s, p.id, "gpu")
    assert fingerprint(s) == before and p.location is PageLocation.CPU
    b.left = 1
    b.fail_copies = True
    with pytest.raises(GPUMemoryError, match="device copy failed"):
        mmsb.migrate_page(s, p.id, "gpu")
    assert fingerprint(s) == before and b.stats().slots_in_use == 1
    s._check()


class CompareOOMBackend(HostBackend):
    """A host backend whose next ``compares`` device compares run out of memory inside
    the array library, as CuPy's OutOfMemoryError would, before anything is written."""

    def __init__(self) -> None:
        super().__init__(chunk_size=CHUNK)
        self.compares = 0

    def _diff(self, page: Any, new: Any, on_device: bool, offset: int,
              apply: bool) -> Any:
        if self.compares:
            self.compares -= 1
            raise MemoryError("Unable to allocate 8 KiB for the compare")
        return super()._diff(page, new, on_device, offset, apply)


@pytest.mark.parametrize("location", ["gpu", "unified"])
def test_out_of_memory_inside_a_device_compare_is_refused(location: str) -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    b = CompareOOMBackend()
    s._use_backend_for_tests(location, b)
    p = mmsb.create_page(s, BIG, location=location)
    mmsb.write_page(s, p.id, 0, b"abc")
    mmsb.sync_page_to_gpu(s, p.id)
    new = np.zeros(BIG, np.uint8)
    new[100:104] = 7
    before = fingerprint(s)
    stats = mmsb.get_device_stats(s)[location]
    b.compares = 1
    with pytest.raises(GPUMemoryError, match="ran out of memory comparing 8192 bytes") as info:
        mmsb.update_page(s, p.id, DLPackArray(new))
    assert info.value.requested_bytes == BIG
    assert isinstance(info.value.__cause__, MemoryError)
    assert fingerprint(s) == before
    assert device_bytes(p)[:4] == b"abc\0"  # the device copy was not written either
    assert mmsb.get_device_stats(s)[location].diffs == stats.diffs
    s._check()
    # Memory back: the same write goes through.
    mmsb.update_page(s, p.id, DLPackArray(new))
    assert mmsb.query_page(s, p.id) == new.tobytes() and device_bytes(p) == new.tobytes()
    s._check()


def test_durable_bus_refuses_device_pages(tmp_path: Any) -> None:
    s = mmsb.mmsb_start(path=tmp_path / "bus", config=mmsb.MMSBConfig(fsync="none"))
    try:
        s._use_backend_for_tests("gpu", HostBackend(chunk_size=CHUNK))
        p = mmsb.create_page(s, 16)
        before = fingerprint(s)
        with pytest.raises(GPUMemoryError, match="durable bus"):
            mmsb.create_page(s, 16, location="gpu")
        with pytest.raises(GPUMemoryError, match="durable bus"):
            mmsb.create_pages(s, 2, 16, gpu=True)
        with pytest.raises(GPUMemoryError, match="durable bus"):
            mmsb.migrate_page(s, p.id, "gpu")
        assert fingerprint(s) == before
    finally:
        mmsb.mmsb_stop(s)


def test_testing_hook_refusals() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    with pytest.raises(InvalidArgumentError, match="host arena"):
        s._use_backend_for_tests("cpu", HostBackend())
    with pytest.raises(InvalidArgumentError, match="DeviceBackend"):
        s._use_backend_for_tests("gpu", object())
    s._use_backend_for_tests("gpu", HostBackend())
    with pytest.raises(InvalidArgumentError, match="already has a backend"):
        s._use_backend_for_tests("gpu", HostBackend())
    assert isinstance(s.devices.backends[1], DeviceBackend)  # type: ignore[union-attr]


def test_config_cannot_name_a_stand_in() -> None:
    fields = set(mmsb.MMSBConfig.__dataclass_fields__)
    assert not any("backend" in f for f in fields)
    with pytest.raises(InvalidArgumentError):
        mmsb.MMSBConfig(restore_device_pages_on_cpu="yes").validate()  # type: ignore[arg-type]


# -- batches --------------------------------------------------------------------------------

def test_batch_with_device_pages(state: mmsb.MMSBState) -> None:
    cpu = mmsb.create_page(state, 256)
    dev = mmsb.create_page(state, 256, location="gpu")
    with mmsb.batch(state):
        for pid in (cpu.id, dev.id):
            mmsb.write_page(state, pid, 0, b"one")
            mmsb.write_page(state, pid, 100, b"two")
            mmsb.update_page(state, pid, bytes(range(256)))
    mmsb.write_page(state, dev.id, 5, DLPackArray(np.full(3, 1, np.uint8)))
    mmsb.write_page(state, cpu.id, 5, b"\x01\x01\x01")
    assert mmsb.query_page(state, dev.id) == mmsb.query_page(state, cpu.id)
    assert device_bytes(dev) == mmsb.query_page(state, cpu.id)
    n = mmsb.apply_batch(state, [(dev.id, 0, b"vec"), (cpu.id, 0, b"vec")])
    assert n == 2
    assert device_bytes(dev) == mmsb.query_page(state, cpu.id)
    assert mmsb.verify_state_consistency(state)


def test_held_writes_to_a_page_with_a_current_copy() -> None:
    s = stand_in_state()
    g = mmsb.create_page(s, 256, location="gpu")
    mmsb.update_page(s, g.id, bytes(range(256)))
    assert device_bytes(g) == bytes(range(256))  # current at epoch 1
    with mmsb.batch(s):
        mmsb.write_page(s, g.id, 0, b"held")  # in the page's bytes, not yet in its epoch
        s._check()
        assert device_bytes(g)[:4] == b"held"  # a device use logs it first, then copies
        assert g.epoch == 2
        mmsb.write_page(s, g.id, 8, b"again")
        s._check()
    assert device_bytes(g) == mmsb.query_page(s, g.id)
    s._check()


def _memory_counters(s: mmsb.MMSBState) -> tuple[Any, ...]:
    """The arena's and the backends' counters, which a refused call leaves as they were."""
    st_ = mmsb.get_stats(s)
    return (st_.arena_bytes_in_use, st_.arena_bytes_free, st_.arena_bytes_reserved,
            st_.unified_managed_bytes, mmsb.get_device_stats(s))


@pytest.mark.parametrize("managed", [False, True])
def test_device_creations_and_migrations_in_a_batch_take_nothing(managed: bool) -> None:
    s = managed_state()[0] if managed else stand_in_state()
    c = mmsb.create_page(s, 64)
    g = mmsb.create_page(s, 64, location="gpu")
    u = mmsb.create_page(s, 64, location="unified")
    before = (fingerprint(s), _memory_counters(s))
    calls = [lambda: mmsb.create_page(s, 64, location="gpu"),
             lambda: mmsb.create_pages(s, 3, 64, location="unified"),
             lambda: mmsb.migrate_page(s, c.id, "gpu"),
             lambda: mmsb.migrate_page(s, c.id, "unified"),
             lambda: mmsb.migrate_page(s, u.id, "cpu"),
             lambda: mmsb.migrate_page(s, g.id, "unified"),
             lambda: mmsb.ensure_page_on_device(s, c.id)]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="structural change"), mmsb.batch(s):
            call()
        assert (fingerprint(s), _memory_counters(s)) == before
    s._check()


def test_failed_batch_restores_device_copies(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, BIG, location="gpu")
    mmsb.update_page(state, p.id, b"\x01" * BIG)
    assert device_bytes(p) == b"\x01" * BIG  # current at epoch 1
    with pytest.raises(RuntimeError), mmsb.batch(state):
        mmsb.update_page(state, p.id, b"\x02" * BIG)
        mmsb.write_page(state, p.id, 0, DLPackArray(np.full(8, 3, np.uint8)))
        assert device_bytes(p)[:9] == b"\x03" * 8 + b"\x02"
        raise RuntimeError("abandon the batch")
    assert device_bytes(p) == b"\x01" * BIG
    with pytest.raises(RuntimeError), mmsb.batch(state):
        # One write, which the device copy follows: it holds epoch 2 when the batch fails.
        mmsb.write_page(state, p.id, 0, DLPackArray(np.full(8, 3, np.uint8)))
        assert device_bytes(p)[:9] == b"\x03" * 8 + b"\x01"
        raise RuntimeError("abandon the batch")
    assert p.epoch == 1
    assert mmsb.query_page(state, p.id) == b"\x01" * BIG
    # Epoch 2 again (no device use in between), with other bytes: the device copy must not pass for current.
    mmsb.update_page(state, p.id, b"\x04" * BIG)
    assert p.epoch == 2
    assert device_bytes(p) == b"\x04" * BIG
    state._check()


def test_failed_batch_keeps_the_copies_that_did_not_follow_it(state: mmsb.MMSBState) -> None:
    a = mmsb.create_page(state, BIG, location="gpu")
    b = mmsb.create_page(state, BIG, location="gpu")
    u = mmsb.create_page(state, 64, location="unified")
    for p in (a, b, u):
        mmsb.write_page(state, p.id, 0, b"before")
    assert sorted(mmsb.sync_pages_to_gpu(state, [a.id, b.id, u.id])) == [a.id, b.id, u.id]
    # A refused apply_batch (checked before anything is applied) changes no copy.
    with pytest.raises(PageNotFoundError):
        mmsb.apply_batch(state, [(a.id, 0, b"x"), (999, 0, b"y")])
    assert mmsb.get_stats(state).device_stale_pages == 0
    with pytest.raises(RuntimeError), mmsb.batch(state):
        mmsb.update_page(state, a.id, b"\x02" * BIG)  # a's copy follows this write
        mmsb.write_page(state, u.id, 1, b"held")  # u's copy does not
        mmsb.apply_batch(state, [(b.id, k, b"v") for k in range(16)])  # nor b's
        raise RuntimeError("abandon the batch")
    state._check()
    assert mmsb.get_stats(state).device_stale_pages == 1  # a's only
    assert mmsb.sync_pages_to_gpu(state, [a.id, b.id, u.id]) == [a.id]
    for p in (a, b, u):
        assert device_bytes(p) == mmsb.query_page(state, p.id)
    # Their epochs again, with other bytes: no copy passes for current.
    mmsb.update_page(state, a.id, b"\x03" * BIG)
    mmsb.write_page(state, u.id, 1, b"next")
    mmsb.apply_batch(state, [(b.id, 0, b"w")])
    for p in (a, b, u):
        assert device_bytes(p) == mmsb.query_page(state, p.id)
    state._check()


# -- propagation ------------------------------------------------------------------------------

def test_gpu_sync_edge_syncs_and_completes(state: mmsb.MMSBState) -> None:
    src = mmsb.create_page(state, 64)
    dev = mmsb.create_page(state, 64, location="gpu")
    cpu = mmsb.create_page(state, 64)
    mmsb.add_dependency(state, src.id, dev.id, mmsb.DATA_DEPENDENCY)
    mmsb.register_passthrough_recompute(state, dev.id, src.id)
    mid = mmsb.create_page(state, 64, location="unified")
    mmsb.add_dependency(state, dev.id, mid.id, mmsb.GPU_SYNC_DEPENDENCY)
    mmsb.add_dependency(state, src.id, cpu.id, mmsb.GPU_SYNC_DEPENDENCY)
    got = record(state, mmsb.EventType.GPU_SYNC_NEEDED, mmsb.EventType.GPU_SYNC_COMPLETE)
    mmsb.write_page(state, mid.id, 0, b"mid")  # leaves mid's device copy behind
    assert mmsb.get_stats(state).device_stale_pages >= 1
    mmsb.update_page(state, src.id, b"\x05" * 64)
    assert (mmsb.EventType.GPU_SYNC_NEEDED, (mid.id, dev.id)) in got
    assert (mmsb.EventType.GPU_SYNC_COMPLETE, (mid.id,)) in got
    assert (mmsb.EventType.GPU_SYNC_NEEDED, (cpu.id, src.id)) in got
    assert (mmsb.EventType.GPU_SYNC_COMPLETE, (cpu.id,)) not in got  # nothing to sync
    needed = got.index((mmsb.EventType.GPU_SYNC_NEEDED, (mid.id, dev.id)))
    assert got.index((mmsb.EventType.GPU_SYNC_COMPLETE, (mid.id,))) > needed
    # mid's copy landed during the pass, without a call to sync it.
    stale = state.devices.epochs[mid.id] != mid.epoch  # type: ignore[union-attr]
    assert not stale
    assert device_bytes(dev) == b"\x05" * 64


def test_gpu_sync_failure_is_reported_and_writes_stand() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    b = FailingBackend()
    s._use_backend_for_tests("gpu", b)
    src = mmsb.create_page(s, 16)
    child = mmsb.create_page(s, 16, location="gpu")
    mmsb.add_dependency(s, src.id, child.id, mmsb.GPU_SYNC_DEPENDENCY)
    mmsb.write_page(s, child.id, 0, b"c")  # stale: the sync must copy
    got = record(s, mmsb.EventType.GPU_SYNC_COMPLETE)
    b.fail_copies = True
    with pytest.raises(GPUMemoryError, match="device copy failed"):
        mmsb.write_page(s, src.id, 0, b"s")
    assert mmsb.query_page(s, src.id)[:1] == b"s"  # the write stands
    assert got == []
    b.fail_copies = False
    assert device_bytes(child)[:1] == b"c"
    s._check()


class ApplyFailingBackend(HostBackend):
    """A host backend whose applies of deltas fail while ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__(chunk_size=CHUNK)
        self.fail = False

    def apply_delta(self, slot: int, delta: Any) -> None:
        if self.fail:
            raise GPUMemoryError("delta apply failed (test backend)")
        super().apply_delta(slot, delta)

    def apply_dense(self, slot: int, data: Any, mask: Any = None) -> None:
        if self.fail:
            raise GPUMemoryError("delta apply failed (test backend)")
        super().apply_dense(slot, data, mask)


def test_failed_device_apply_leaves_the_copy_stale_and_the_write_whole() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    b = ApplyFailingBackend()
    s._use_backend_for_tests("gpu", b)
    g = mmsb.create_page(s, BIG, location="gpu")
    child = mmsb.create_page(s, BIG)
    mmsb.add_dependency(s, g.id, child.id, mmsb.DATA_DEPENDENCY)
    mmsb.register_passthrough_recompute(s, child.id, g.id)
    got = record(s, mmsb.EventType.PAGE_CHANGED)
    b.fail = True
    # The general write path: the device copy would follow in the same call.
    mmsb.update_page(s, g.id, np.full(BIG, 7, np.uint8))
    assert g.epoch == 1 and mmsb.query_page(s, g.id) == b"\x07" * BIG
    assert mmsb.query_page(s, child.id) == b"\x07" * BIG  # propagation ran
    assert (mmsb.EventType.PAGE_CHANGED, (g.id, 1, 1)) in got
    assert mmsb.get_stats(s).device_stale_pages == 1
    s._check()
    b.fail = False
    assert device_bytes(g) == b"\x07" * BIG  # copied in from the mirror on its next use
    assert mmsb.verify_state_consistency(s)
    s._check()


# -- history: replay, time travel, checkpoints, compaction ------------------------------------

def test_replay_and_time_travel_match_cpu(state: mmsb.MMSBState) -> None:
    cpu = mmsb.create_page(state, BIG)
    dev = mmsb.create_page(state, BIG, location="gpu")
    marks = []
    for k, (op, arg) in enumerate(_writes(BIG)):
        _apply(state, cpu.id, op, arg, dev=False)
        _apply(state, dev.id, op, arg, dev=True)
        marks.append((state.last_lsn, dev.epoch, mmsb.query_page(state, dev.id)))
        if k == 3:
            mmsb.migrate_page(state, dev.id, "unified")
    for lsn, epoch, data in marks:
        assert mmsb.read_page_at(state, dev.id, lsn=lsn) == data
        assert mmsb.read_page_at(state, dev.id, epoch=epoch) == data
        assert mmsb.read_page_at(state, cpu.id, epoch=epoch) == data
        past = mmsb.replay_to_lsn(state, lsn)
        assert mmsb.query_page(past, dev.id) == data
    assert mmsb.verify_state_consistency(state)


@pytest.mark.skipif(unavailable_reason("gpu") is None, reason="a CUDA device is usable here")
def test_replayed_state_reads_bytes_but_refuses_device_use(state: mmsb.MMSBState) -> None:
    p = mmsb.create_page(state, 32, location="gpu")
    mmsb.update_page(state, p.id, bytes(range(32)))
    past = mmsb.replay_to_lsn(state, state.last_lsn)
    assert mmsb.query_page(past, p.id) == bytes(range(32))
    assert past.pages[p.id].location is PageLocation.GPU
    with pytest.raises(GPUMemoryError, match="CuPy|CUDA|device"):
        past.pages[p.id].device_array()


def test_compaction_keeps_device_pages_right() -> None:
    s = stand_in_state(max_tlog_size=64)
    cpu = mmsb.create_page(s, 512)
    dev = mmsb.create_page(s, 512, location="gpu")
    rng = np.random.default_rng(3)
    for _ in range(300):
        off = int(rng.integers(0, 500))
        data = rng.integers(0, 256, 12, dtype=np.uint8).tobytes()
        mmsb.write_page(s, cpu.id, off, data)
        mmsb.write_page(s, dev.id, off, data)
    assert mmsb.query_page(s, dev.id) == mmsb.query_page(s, cpu.id)
    assert device_bytes(dev) == mmsb.query_page(s, cpu.id)
    assert mmsb.verify_state_consistency(s)
    s._check()


def test_checkpoint_round_trip_with_device_pages(state: mmsb.MMSBState, tmp_path: Any) -> None:
    g = mmsb.create_page(state, 300, location="gpu")
    u = mmsb.create_page(state, 40, location="unified")
    c = mmsb.create_page(state, 20)
    mmsb.update_page(state, g.id, b"\x09" * 300)
    mmsb.write_page(state, u.id, 1, b"uni")
    mmsb.write_page(state, c.id, 1, b"cpu")
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(state, path)
    other = stand_in_state()
    mmsb.load_checkpoint(other, path)
    for p in (g, u, c):
        q = other.pages[p.id]
        assert q.location is p.location and q.epoch == p.epoch
        assert mmsb.query_page(other, p.id) == mmsb.query_page(state, p.id)
    assert mmsb.get_stats(other).device_stale_pages == 2  # copies made on next use
    assert device_bytes(other.pages[g.id]) == b"\x09" * 300
    assert mmsb.verify_state_consistency(other)
    other._check()
    # Loading into the same state drops its old device copies.
    mmsb.load_checkpoint(state, path)
    assert slots_in_use(state, "gpu") == 0
    assert device_bytes(state.pages[g.id]) == b"\x09" * 300
    state._check()


@pytest.mark.skipif(unavailable_reason("gpu") is None, reason="a CUDA device is usable here")
def test_checkpoint_with_device_pages_where_no_device(state: mmsb.MMSBState, tmp_path: Any) -> None:
    g = mmsb.create_page(state, 64, location="gpu")
    mmsb.update_page(state, g.id, b"\x03" * 64)
    c = mmsb.create_page(state, 8)
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(state, path)

    target = mmsb.MMSBState(mmsb.MMSBConfig())
    mmsb.create_page(target, 5)
    before = fingerprint(target)
    with pytest.raises(GPUMemoryError, match="restore_device_pages_on_cpu"):
        mmsb.load_checkpoint(target, path)
    assert fingerprint(target) == before
    with pytest.raises(GPUMemoryError, match="restore_device_pages_on_cpu"):
        mmsb.replay_from_checkpoint(path)

    kept = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    mmsb.load_checkpoint(kept, path, keep_device_locations=True)
    assert kept.pages[g.id].location is PageLocation.GPU and kept.last_lsn == state.last_lsn
    assert mmsb.query_page(kept, g.id) == b"\x03" * 64
    assert mmsb.verify_state_consistency(kept)
    with pytest.raises(GPUMemoryError):
        kept.pages[g.id].device_array()
    with pytest.raises(InvalidArgumentError, match="keep_device_locations"):
        mmsb.load_checkpoint(target, path, keep_device_locations="yes")  # type: ignore[arg-type]
    assert fingerprint(target) == before

    moved = mmsb.replay_from_checkpoint(path, config=mmsb.MMSBConfig(restore_device_pages_on_cpu=True))
    assert moved.pages[g.id].location is PageLocation.CPU
    assert mmsb.query_page(moved, g.id) == b"\x03" * 64
    assert mmsb.query_page(moved, c.id) == bytes(8)
    assert moved.last_lsn == state.last_lsn + 1
    assert type(moved.log.records[-1]).__name__ == "PageMigrate"
    assert mmsb.verify_state_consistency(moved)


def test_refused_load_makes_no_backend(state: mmsb.MMSBState, tmp_path: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mmsb.create_page(state, 16, location="gpu")
    mmsb.create_page(state, 16, location="unified")
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(state, path)
    made: list[str] = []

    def factory(name: str) -> DeviceBackend:
        if name == "unified":
            raise GPUMemoryError("no managed memory here (test factory)")
        made.append(name)
        return HostBackend(chunk_size=CHUNK)
    monkeypatch.setattr(core_devices, "_FACTORY", [(factory, DeviceBackend)])
    fresh = mmsb.MMSBState(mmsb.MMSBConfig())
    with pytest.raises(GPUMemoryError, match="1 unified page"):
        mmsb.load_checkpoint(fresh, path)
    assert made == ["gpu"]  # made to check the location, then forgotten
    assert fresh.devices is None and mmsb.get_device_stats(fresh) == {}
    other = mmsb.MMSBState(mmsb.MMSBConfig())
    mmsb.create_page(other, 16, location="gpu")  # a backend made before the load
    held = mmsb.get_device_stats(other)
    with pytest.raises(GPUMemoryError, match="1 unified page"):
        mmsb.load_checkpoint(other, path)
    assert mmsb.get_device_stats(other) == held
    other._check()


def test_cli_reads_a_checkpoint_with_device_pages(state: mmsb.MMSBState, tmp_path: Any) -> None:
    g = mmsb.create_page(state, 64, location="gpu")
    mmsb.update_page(state, g.id, b"\x02" * 64)
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(state, path)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(mmsb.__file__).parent.parent)
    r = subprocess.run([sys.executable, "-m", "mmsb", "verify", str(path)],  # noqa: S603
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_checkpoint_with_device_pages_refused_on_a_durable_bus(state: mmsb.MMSBState,
                                                               tmp_path: Any) -> None:
    mmsb.create_page(state, 64, location="gpu")
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(state, path)
    s = mmsb.mmsb_start(path=tmp_path / "bus", config=mmsb.MMSBConfig(
        fsync="none", restore_device_pages_on_cpu=True))
    try:
        mmsb.create_page(s, 8)
        before = fingerprint(s)
        with pytest.raises(GPUMemoryError, match="durable bus"):
            mmsb.load_checkpoint(s, path)
        with pytest.raises(GPUMemoryError, match="durable bus"):
            mmsb.load_checkpoint(s, path, keep_device_locations=True)
        assert fingerprint(s) == before
    finally:
        mmsb.mmsb_stop(s)


# -- unified pages in managed memory (a stand-in managed allocator) ---------------------------

class ManagedStandIn(HostBackend):
    """A host backend that lends "managed" memory to the host arena as the CUDA unified
    backend does: zero-filled buffers it records (plain host memory here), refused with
    GPUMemoryError past ``budget`` bytes."""

    location = "unified"

    def __init__(self, budget: int | None = None) -> None:
        super().__init__(chunk_size=CHUNK)
        self.budget = budget
        self.buffers: list[np.ndarray] = []

    def managed_source(self) -> Any:
        return self._chunk

    def _chunk(self, nbytes: int) -> np.ndarray:
        if self.budget is not None:
            if nbytes > self.budget:
                raise GPUMemoryError("out of managed memory (test backend)", requested_bytes=nbytes)
            self.budget -= nbytes
        buf = np.zeros(nbytes, np.uint8)
        self.buffers.append(buf)
        self._managed_host += nbytes
        return buf

    def owns(self, arr: np.ndarray) -> bool:
        return any(np.shares_memory(arr, b) for b in self.buffers)


class CountingBackend(HostBackend):
    """A host backend that counts its batched copies."""

    def __init__(self) -> None:
        super().__init__(chunk_size=CHUNK)
        self.batches = 0

    def copy_in_many(self, items: Any) -> Any:
        self.batches += 1
        return super().copy_in_many(items)


def managed_state(budget: int | None = None) -> tuple[mmsb.MMSBState, ManagedStandIn]:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    s._use_backend_for_tests("gpu", HostBackend(chunk_size=CHUNK))
    b = ManagedStandIn(budget)
    s._use_backend_for_tests("unified", b)
    return s, b


def test_unified_page_bytes_are_managed_memory() -> None:
    s, b = managed_state()
    u = mmsb.create_page(s, 64, location="unified")
    c = mmsb.create_page(s, 64)
    assert b.owns(u.data) and not b.owns(c.data)
    view = u.device_array()
    assert np.shares_memory(np.asarray(view), u.data)  # the device reads the page's own bytes
    assert not np.asarray(view).flags.writeable
    mmsb.write_page(s, u.id, 3, b"abc")  # the compiled small-write path
    assert np.asarray(view)[3:6].tobytes() == b"abc"  # no copy, never stale
    mmsb.update_page(s, u.id, DLPackArray(np.full(64, 7, np.uint8)))  # a device-array write
    assert u.epoch == 2 and mmsb.query_page(s, u.id) == b"\x07" * 64
    assert mmsb.sync_page_to_gpu(s, u.id) is False
    stats = mmsb.get_stats(s)
    assert stats.unified_managed_bytes == 64 and stats.device_stale_pages == 0
    assert slots_in_use(s, "unified") == 0  # no device copy
    assert mmsb.get_device_stats(s)["unified"].bytes_managed_host == 1 << 26
    assert mmsb.verify_state_consistency(s)
    s._check()


@pytest.mark.parametrize("count", [1, 5])
def test_unified_creation_takes_no_ordinary_memory(count: int) -> None:
    # A fresh state: creating unified pages in managed memory neither carves nor
    # free-lists ordinary arena slots (nor maps an ordinary chunk on the way).
    s, b = managed_state()
    arena = s.arena
    chunks = len(arena._chunks)
    pages = mmsb.create_pages(s, count, 100, location="unified", metadata={"k": 1})
    assert all(b.owns(p.data) for p in pages)
    assert arena.bytes_free_listed == 0
    assert arena.bytes_in_use == arena.bytes_managed == count * 112  # size class of 100
    assert len(arena._chunks) == chunks + 1 and len(arena._managed) == 1  # the managed one
    assert all(dict(p.metadata) == {"k": 1} for p in pages)
    assert mmsb.verify_state_consistency(s)
    s._check()


def test_managed_slots_are_reused_and_large_pages_get_their_own() -> None:
    s, b = managed_state()
    pages = mmsb.create_pages(s, 3, 100, location="unified")
    addr = int(s.table.addr[pages[1].id])
    mmsb.delete_page(s, pages[1].id)
    again = mmsb.create_page(s, 100, location="unified")
    assert int(s.table.addr[again.id]) == addr and mmsb.query_page(s, again.id) == b"\0" * 100
    big = mmsb.create_page(s, (1 << 24) + 1, location="unified")
    assert b.owns(big.data) and len(b.buffers) == 2
    mmsb.write_page(s, big.id, 1 << 24, b"z")
    mmsb.delete_page(s, big.id)
    assert mmsb.get_stats(s).unified_managed_bytes == 3 * 112  # size class of 100
    s._check()


def test_migrations_move_bytes_between_ordinary_and_managed_memory() -> None:
    s, b = managed_state()
    p = mmsb.create_page(s, 48)
    mmsb.write_page(s, p.id, 0, b"hello")
    mmsb.migrate_page(s, p.id, "unified")
    assert b.owns(p.data) and mmsb.query_page(s, p.id)[:5] == b"hello"
    mmsb.migrate_page(s, p.id, "gpu")
    assert not b.owns(p.data) and device_bytes(p)[:5] == b"hello"
    mmsb.migrate_page(s, p.id, "unified")
    assert b.owns(p.data) and slots_in_use(s, "gpu") == 0
    mmsb.migrate_page(s, p.id, "cpu")
    assert not b.owns(p.data) and mmsb.query_page(s, p.id)[:5] == b"hello"
    assert mmsb.get_stats(s).unified_managed_bytes == 0
    assert p.epoch == 1
    assert mmsb.verify_state_consistency(s)
    replayed = mmsb.replay_to_lsn(s, s.last_lsn)
    assert mmsb.query_page(replayed, p.id) == mmsb.query_page(s, p.id)
    s._check()


def test_out_of_managed_memory_changes_nothing() -> None:
    s, _b = managed_state(budget=0)
    c = mmsb.create_page(s, 32)
    before = fingerprint(s)
    with pytest.raises(GPUMemoryError, match="managed memory"):
        mmsb.create_page(s, 32, location="unified")
    with pytest.raises(GPUMemoryError, match="managed memory"):
        mmsb.create_pages(s, 4, 32, location="unified")
    with pytest.raises(GPUMemoryError, match="managed memory"):
        mmsb.migrate_page(s, c.id, "unified")
    assert fingerprint(s) == before
    assert c.location is PageLocation.CPU
    s._check()


def test_resize_and_clone_of_a_unified_page_stay_in_managed_memory() -> None:
    s, b = managed_state()
    u = mmsb.create_page(s, 40, location="unified")
    mmsb.write_page(s, u.id, 0, b"abcdef")
    mmsb.resize_page(s, u.id, 500)
    assert b.owns(u.data) and mmsb.query_page(s, u.id)[:6] == b"abcdef"
    k = mmsb.clone_page(s, u.id)
    assert k.location is PageLocation.UNIFIED and b.owns(k.data)
    assert not np.shares_memory(k.data, u.data) and mmsb.query_page(s, k.id) == mmsb.query_page(s, u.id)
    s._check()


def test_restored_unified_pages_move_into_managed_memory_on_device_use(tmp_path: Any) -> None:
    s, b = managed_state()
    u = mmsb.create_page(s, 40, location="unified")
    mmsb.write_page(s, u.id, 2, b"xyz")
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(s, path)
    mmsb.load_checkpoint(s, path)
    u = s.pages[u.id]
    assert not b.owns(u.data)  # a new arena: ordinary memory until the next device use
    assert np.asarray(u.device_array()).tobytes()[2:5] == b"xyz"
    assert b.owns(u.data) and slots_in_use(s, "unified") == 0
    assert mmsb.verify_state_consistency(s)
    s._check()


def test_batches_on_managed_pages_roll_back() -> None:
    s, b = managed_state()
    u = mmsb.create_page(s, BIG, location="unified")
    mmsb.update_page(s, u.id, b"\x01" * BIG)
    view = np.asarray(u.device_array())
    with pytest.raises(RuntimeError), mmsb.batch(s):
        mmsb.write_page(s, u.id, 0, b"\x02\x02")
        mmsb.update_page(s, u.id, b"\x03" * BIG)
        mmsb.write_page(s, u.id, 5, DLPackArray(np.full(4, 9, np.uint8)))
        assert view[:10].tobytes() == b"\x03" * 5 + b"\x09" * 4 + b"\x03"
        raise RuntimeError("abandon the batch")
    assert view.tobytes() == b"\x01" * BIG and u.epoch == 1
    s._check()


def test_device_use_inside_a_batch_does_not_move_pages(tmp_path: Any) -> None:
    s, b = managed_state()
    u = mmsb.create_page(s, 32, location="unified")
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(s, path)
    mmsb.load_checkpoint(s, path)
    with mmsb.batch(s):
        mmsb.write_page(s, u.id, 0, b"in")
        assert device_bytes(s.pages[u.id])[:2] == b"in"  # a device copy, for now
        with pytest.raises(GPUMemoryError, match="inside a batch"):
            mmsb.prefetch_to_gpu(s, u.id)
    assert not b.owns(s.pages[u.id].data)
    with pytest.raises(InvalidArgumentError, match="stream"):
        mmsb.prefetch_to_gpu(s, u.id, stream=1.5)
    assert not b.owns(s.pages[u.id].data)  # refused before the page was looked at
    mmsb.prefetch_to_gpu(s, u.id).wait()
    assert b.owns(s.pages[u.id].data) and slots_in_use(s, "unified") == 0
    s._check()


def test_unified_hints_are_checked_and_counted() -> None:
    s, _b = managed_state()
    u = mmsb.create_page(s, 4096, location="unified")
    ticket = mmsb.prefetch_to_gpu(s, u.id)
    assert ticket.done() and ticket.wait() is None
    mmsb.prefetch_to_cpu(s, u.id, stream=0).wait()
    mmsb.set_preferred_location(s, u.id, "gpu")
    mmsb.set_preferred_location(s, u.id, None)
    mmsb.set_read_mostly(s, u.id, True)
    stats = mmsb.get_stats(s)
    assert (stats.unified_prefetches, stats.unified_bytes_prefetched, stats.unified_advices) == (
        2, 8192, 3)


def test_unified_hint_refusals_change_nothing() -> None:
    s, _b = managed_state()
    u = mmsb.create_page(s, 64, location="unified")
    g = mmsb.create_page(s, 64, location="gpu")
    c = mmsb.create_page(s, 64)
    before = fingerprint(s)
    for pid in (g.id, c.id):
        with pytest.raises(InvalidArgumentError, match="unified pages"):
            mmsb.prefetch_to_gpu(s, pid)
        with pytest.raises(InvalidArgumentError, match="unified pages"):
            mmsb.set_read_mostly(s, pid, True)
    with pytest.raises(PageNotFoundError):
        mmsb.prefetch_to_cpu(s, 999)
    with pytest.raises(InvalidArgumentError, match="stream"):
        mmsb.prefetch_to_gpu(s, u.id, stream="fast")
    with pytest.raises(InvalidArgumentError, match="stream"):
        mmsb.prefetch_to_gpu(s, u.id, stream=-1)
    with pytest.raises(InvalidArgumentError, match="'gpu', 'cpu' or None"):
        mmsb.set_preferred_location(s, u.id, "disk")
    with pytest.raises(InvalidArgumentError, match="True or False"):
        mmsb.set_read_mostly(s, u.id, 1)  # type: ignore[arg-type]
    assert fingerprint(s) == before
    stats = mmsb.get_stats(s)
    assert stats.unified_prefetches == 0 and stats.unified_advices == 0


def test_unified_hints_need_managed_memory(state: mmsb.MMSBState) -> None:
    u = mmsb.create_page(state, 64, location="unified")  # a stand-in without managed memory
    before = fingerprint(state)
    with pytest.raises(GPUMemoryError, match="no managed memory"):
        mmsb.prefetch_to_gpu(state, u.id)
    with pytest.raises(GPUMemoryError, match="no managed memory"):
        mmsb.set_preferred_location(state, u.id, "cpu")
    assert fingerprint(state) == before
    plain = mmsb.MMSBState(mmsb.MMSBConfig())
    plain.create(1, 16, "cpu", None)
    assert mmsb.is_unified_memory_available() is (unavailable_reason("unified") is None)


# -- batched and async syncs --------------------------------------------------------------------

def test_sync_pages_to_gpu_copies_stale_copies_in_one_batch() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    b = CountingBackend()
    s._use_backend_for_tests("gpu", b)
    pages = mmsb.create_pages(s, 5, 64, location="gpu")
    for k, p in enumerate(pages[:4]):
        mmsb.write_page(s, p.id, k, b"w")  # the compiled path: copies left stale
    assert mmsb.get_stats(s).device_stale_pages == 4
    copied = mmsb.sync_pages_to_gpu(s, [p.id for p in pages] + [pages[0].id])
    assert sorted(copied) == [p.id for p in pages[:4]] and b.batches == 1
    for p in pages:
        assert device_bytes(p) == mmsb.query_page(s, p.id)
    stats = mmsb.get_stats(s)
    assert stats.device_stale_pages == 0 and stats.device_syncs == 1
    assert stats.device_pages_synced == 4 and stats.device_bytes_synced == 4 * 64
    assert mmsb.sync_pages_to_gpu(s, [p.id for p in pages]) == [] and b.batches == 1
    s._check()


def test_async_sync_returns_a_handle() -> None:
    s, _b = managed_state()
    g = mmsb.create_page(s, 64, location="gpu")
    u = mmsb.create_page(s, 64, location="unified")
    mmsb.write_page(s, g.id, 0, b"g")
    mmsb.write_page(s, u.id, 0, b"u")
    h = mmsb.sync_pages_to_gpu_async(s, [g.id, u.id])
    assert h.done() and h.wait() == [g.id]  # the unified page needs no copy
    assert device_bytes(g)[:1] == b"g" and device_bytes(u)[:1] == b"u"
    mmsb.write_page(s, g.id, 1, b"h")
    h = mmsb.sync_page_to_gpu_async(s, g.id)
    assert h.wait() == [g.id] and "1 page(s) copied, done" in repr(h)
    assert mmsb.get_stats(s).device_async_syncs == 2
    s._check()


def test_sync_refusals_change_nothing(state: mmsb.MMSBState) -> None:
    g = mmsb.create_page(state, 64, location="gpu")
    c = mmsb.create_page(state, 64)
    mmsb.write_page(state, g.id, 0, b"g")
    stale = mmsb.get_stats(state).device_stale_pages
    for call in (mmsb.sync_pages_to_gpu, mmsb.sync_pages_to_gpu_async):
        with pytest.raises(InvalidArgumentError, match="cpu"):
            call(state, [g.id, c.id])
        with pytest.raises(PageNotFoundError):
            call(state, [g.id, 999])
        with pytest.raises(InvalidArgumentError, match="iterable"):
            call(state, g.id)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="cpu"):
        mmsb.sync_page_to_gpu_async(state, c.id)
    stats = mmsb.get_stats(state)
    assert stats.device_stale_pages == stale and stats.device_syncs == 0


def test_failed_batched_sync_gives_its_new_slots_back() -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    b = FailingBackend()
    s._use_backend_for_tests("gpu", b)
    pages = mmsb.create_pages(s, 3, 64, location="gpu")
    mmsb.resize_page(s, pages[0].id, 80)  # its device copy goes; a new one is made on sync
    mmsb.write_page(s, pages[1].id, 0, b"x")
    held = slots_in_use(s, "gpu")
    b.fail_copies = True
    with pytest.raises(GPUMemoryError, match="device copy failed"):
        mmsb.sync_pages_to_gpu(s, [p.id for p in pages])
    assert slots_in_use(s, "gpu") == held
    b.fail_copies = False
    assert sorted(mmsb.sync_pages_to_gpu(s, [p.id for p in pages])) == [pages[0].id, pages[1].id]
    s._check()


def test_refused_syncs_are_not_counted(tmp_path: Any) -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig())
    b = FailingBackend()
    s._use_backend_for_tests("gpu", b)
    g = mmsb.create_page(s, 64, location="gpu")
    mmsb.write_page(s, g.id, 0, b"x")
    b.fail_copies = True
    for call in (mmsb.sync_page_to_gpu, mmsb.sync_page_to_gpu_async):
        with pytest.raises(GPUMemoryError, match="device copy failed"):
            call(s, g.id)
    stats = mmsb.get_stats(s)
    assert (stats.device_syncs, stats.device_async_syncs, stats.device_pages_synced) == (0, 0, 0)
    b.fail_copies = False
    assert mmsb.sync_page_to_gpu(s, g.id) is True
    assert mmsb.get_stats(s).device_syncs == 1
    # A location not usable here: a state loaded to be read, with enable_gpu off.
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(s, path)
    kept = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    mmsb.load_checkpoint(kept, path, keep_device_locations=True)
    with pytest.raises(GPUMemoryError, match="enable_gpu=True"):
        mmsb.sync_pages_to_gpu_async(kept, [g.id])
    stats = mmsb.get_stats(kept)
    assert (stats.device_syncs, stats.device_async_syncs) == (0, 0)


def test_gpu_sync_edge_to_a_managed_unified_page_completes_without_a_copy() -> None:
    s, _b = managed_state()
    src = mmsb.create_page(s, 16)
    child = mmsb.create_page(s, 16, location="unified")
    mmsb.add_dependency(s, src.id, child.id, mmsb.GPU_SYNC_DEPENDENCY)
    mmsb.write_page(s, child.id, 0, b"c")
    got = record(s, mmsb.EventType.GPU_SYNC_COMPLETE)
    mmsb.update_page(s, src.id, b"\x01" * 16)
    assert got == [(mmsb.EventType.GPU_SYNC_COMPLETE, (child.id,))]
    stats = mmsb.get_stats(s)
    assert stats.device_syncs == 1 and stats.device_pages_synced == 0
    assert device_bytes(child)[:1] == b"c"
    s._check()


def test_arena_keeps_managed_and_ordinary_slots_apart() -> None:
    from mmsb._core.arena import CHUNK_SIZE, Arena

    a = Arena()
    with pytest.raises(RuntimeError, match="no managed-memory source"):
        a.alloc_managed(16)
    made: list[np.ndarray] = []

    def source(n: int) -> np.ndarray:
        made.append(np.zeros(n, np.uint8))
        return made[-1]
    a.bind_managed(source)
    o = a.alloc(64)
    m = a.alloc_managed(64)
    assert a.is_managed(m) and not a.is_managed(o)
    a.free(m, 64)
    o2 = a.alloc(64)  # a freed managed slot never serves an ordinary allocation
    assert not a.is_managed(o2)
    m2 = a.alloc_managed(64)
    assert m2 == m and a.bytes_managed == 64
    a.view(m2, 64)[:] = 5
    a.free(m2, 64)
    assert a.view(a.alloc_managed(64), 64).sum() == 0  # reused slots are zeroed
    big = a.alloc_managed(CHUNK_SIZE + 1)
    assert a.is_managed(big)
    a._check([(o, 64), (o2, 64), (m, 64), (big, CHUNK_SIZE + 1)])
    a.free(big, CHUNK_SIZE + 1)
    assert not a.is_managed(big)
    a.bind_managed(lambda n: np.zeros(n, np.int16))
    with pytest.raises(TypeError, match="uint8"):
        a.alloc_managed(1 << 25)


# -- a property: cpu and device pages under the same random operations --------------------------

_OPS = st.lists(st.tuples(
    st.sampled_from(["write", "write_dev", "update", "migrate", "resize", "sync", "sync_many",
                     "batch", "batch_fail", "apply_batch", "route", "clone", "delete",
                     "compress", "reload"]),
    st.integers(0, 1 << 16), st.binary(min_size=1, max_size=48),
    st.sampled_from(["cpu", "gpu", "unified"])), min_size=1, max_size=30)


class _Abandon(Exception):
    """Raised to make a batch fail."""


def _is_device(s: mmsb.MMSBState, pid: int) -> bool:
    return s.pages[pid].location is not PageLocation.CPU


@pytest.mark.parametrize("managed", [False, True])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_property_device_pages_match_a_cpu_twin(managed: bool,
                                                ops: list[tuple[str, int, bytes, str]],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    s = managed_state()[0] if managed else stand_in_state()
    path = tmp_path_factory.mktemp("ck") / "state.mmsb"
    twins = [(mmsb.create_page(s, 96, location=loc).id, mmsb.create_page(s, 96).id)
             for loc in ("gpu", "unified", "cpu")]
    for op, n, data, loc in ops:
        dev, cpu = twins[n % len(twins)]
        size = s.pages[dev].size
        off = n % size
        data = data[: size - off]
        if op == "write":
            for pid in (dev, cpu):
                mmsb.write_page(s, pid, off, data)
        elif op == "write_dev":
            mmsb.write_page(s, dev, off, DLPackArray(np.frombuffer(data, np.uint8).copy()))
            mmsb.write_page(s, cpu, off, data)
        elif op == "update":
            whole = (data * (size // len(data) + 1))[:size]
            for pid in (dev, cpu):
                mmsb.update_page(s, pid, whole)
        elif op == "migrate":
            mmsb.migrate_page(s, dev, loc)
        elif op == "resize":
            for pid in (dev, cpu):
                mmsb.resize_page(s, pid, 16 + n % 200)
        elif op == "sync" and _is_device(s, dev):
            mmsb.sync_page_to_gpu(s, dev)
        elif op == "sync_many":
            ids = [d for d, _ in twins if _is_device(s, d)]
            mmsb.sync_pages_to_gpu_async(s, ids).wait()
        elif op == "batch":
            with mmsb.batch(s):
                for pid in (dev, cpu):
                    mmsb.write_page(s, pid, off, data)  # small writes are held
                s._check()
                if _is_device(s, dev):
                    assert device_bytes(s.pages[dev]) == mmsb.query_page(s, cpu)
        elif op == "batch_fail":
            # Held, general and device-array writes, and a device use, all undone.
            with pytest.raises(_Abandon), mmsb.batch(s):
                mmsb.write_page(s, dev, off, data)
                mmsb.update_page(s, dev, np.full(size, n % 251, np.uint8))
                mmsb.write_page(s, dev, off, DLPackArray(np.frombuffer(data, np.uint8).copy()))
                if _is_device(s, dev):
                    device_bytes(s.pages[dev])
                raise _Abandon
        elif op == "apply_batch":
            # Sixteen writes or more take the vectorised pass.
            writes = [(pid, (off + 7 * k) % (size - len(data) + 1), data)
                      for k in range(8) for pid in (dev, cpu)]
            mmsb.apply_batch(s, writes)
        elif op == "route":
            mask = np.zeros(size, bool)
            mask[off:off + len(data)] = True
            fill = np.full(size, n % 256, np.uint8)
            for pid in (dev, cpu):
                mmsb.route_delta(s, mmsb.create_delta(s, pid, mask, fill))
        elif op == "clone" and len(twins) < 6:
            twins.append((mmsb.clone_page(s, dev).id, mmsb.clone_page(s, cpu).id))
        elif op == "delete" and len(twins) > 1:
            twins.remove((dev, cpu))
            for pid in (dev, cpu):
                mmsb.delete_page(s, pid)
            continue
        elif op == "compress":
            mmsb.compress_log(s)
        elif op == "reload":
            mmsb.checkpoint_log(s, path)
            mmsb.load_checkpoint(s, path)
        assert mmsb.query_page(s, dev) == mmsb.query_page(s, cpu)
        s._check()
    for dev, cpu in twins:
        if _is_device(s, dev):
            assert device_bytes(s.pages[dev]) == mmsb.query_page(s, cpu)
    assert mmsb.verify_state_consistency(s)
    s._check()
    # Every device slot a backend holds is a device copy of a live page: none leaked.
    copies = s.devices
    assert copies is not None
    for loc, b in copies.backends.items():
        held = sum(1 for where in copies.locs.values() if where == loc)
        assert b.stats().slots_in_use == held


# -- real CUDA backends (skipped where none is usable) ------------------------------------------

def _cuda_state(location: str) -> mmsb.MMSBState:
    reason = unavailable_reason(location)
    if reason is not None:
        pytest.skip(f"{location} pages unavailable: {reason}")
    return mmsb.MMSBState(mmsb.MMSBConfig())


@pytest.mark.parametrize("location", ["gpu", "unified"])
def test_cuda_device_pages_end_to_end(location: str, tmp_path: Any) -> None:
    s = _cuda_state(location)
    import cupy as cp  # type: ignore[import-not-found]

    cpu = mmsb.create_page(s, 1 << 16)
    dev = mmsb.create_page(s, 1 << 16, location=location)
    host = np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8)
    mmsb.update_page(s, cpu.id, host.tobytes())
    mmsb.update_page(s, dev.id, cp.asarray(host))  # diffed on the device
    assert mmsb.query_page(s, dev.id) == mmsb.query_page(s, cpu.id)
    part = cp.arange(100, dtype=cp.uint8)
    mmsb.write_page(s, dev.id, 500, part)
    mmsb.write_page(s, cpu.id, 500, cp.asnumpy(part).tobytes())
    mmsb.write_page(s, dev.id, 7, b"small")
    mmsb.write_page(s, cpu.id, 7, b"small")
    view = dev.device_array()
    assert cp.asnumpy(cp.from_dlpack(view)).tobytes() == mmsb.query_page(s, cpu.id)
    mmsb.migrate_page(s, dev.id, "cpu")
    mmsb.migrate_page(s, dev.id, location)
    assert cp.asnumpy(cp.from_dlpack(dev.device_array())).tobytes() == mmsb.query_page(s, cpu.id)
    assert mmsb.verify_state_consistency(s)
    path = tmp_path / "ck.mmsb"
    mmsb.checkpoint_log(s, path)
    back = mmsb.replay_from_checkpoint(path)
    assert back.pages[dev.id].location is PageLocation[location.upper()]
    assert cp.asnumpy(cp.from_dlpack(back.pages[dev.id].device_array())).tobytes() == \
        mmsb.query_page(s, cpu.id)
    stats = mmsb.get_device_stats(s)[location]
    assert stats.device != "host memory" and stats.diffs >= 1
    s._check()


def test_cuda_gpu_sync_edge() -> None:
    s = _cuda_state("gpu")
    import cupy as cp  # type: ignore[import-not-found]

    src = mmsb.create_page(s, 256)
    child = mmsb.create_page(s, 256, location="gpu")
    mmsb.add_dependency(s, src.id, child.id, mmsb.GPU_SYNC_DEPENDENCY)
    mmsb.write_page(s, child.id, 0, b"\x08" * 256)  # a small write: the copy falls behind
    assert mmsb.get_stats(s).device_stale_pages == 1
    got = record(s, mmsb.EventType.GPU_SYNC_COMPLETE)
    mmsb.update_page(s, src.id, b"\x01" * 256)
    assert got == [(mmsb.EventType.GPU_SYNC_COMPLETE, (child.id,))]
    assert mmsb.get_stats(s).device_stale_pages == 0  # synced by the edge
    assert cp.asnumpy(cp.from_dlpack(child.device_array())).tobytes() == b"\x08" * 256
    s._check()


def test_cuda_unified_page_is_managed_memory() -> None:
    s = _cuda_state("unified")
    import cupy as cp  # type: ignore[import-not-found]

    u = mmsb.create_page(s, 1 << 20, location="unified")
    view = u.device_array()
    # One memory, one address on both sides (unified addressing), and it is managed.
    assert view.ptr == u.data.ctypes.data
    attrs = cp.cuda.runtime.pointerGetAttributes(view.ptr)
    assert getattr(attrs, "type", 3) == 3  # cudaMemoryTypeManaged
    dev = cp.from_dlpack(view)
    mmsb.write_page(s, u.id, 10, b"cpu wrote")  # the compiled path: a CPU write, no copy
    assert cp.asnumpy(dev[10:19]).tobytes() == b"cpu wrote"
    host = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8)
    mmsb.update_page(s, u.id, host.tobytes())
    assert bool((dev == cp.asarray(host)).all())
    mmsb.write_page(s, u.id, 0, cp.full(16, 5, dtype=cp.uint8))  # diffed on the device
    assert mmsb.query_page(s, u.id)[:16] == b"\x05" * 16
    assert mmsb.sync_page_to_gpu(s, u.id) is False
    mmsb.set_preferred_location(s, u.id, "gpu")
    mmsb.set_read_mostly(s, u.id, True)
    mmsb.prefetch_to_gpu(s, u.id).wait()
    stream = cp.cuda.Stream(non_blocking=True)
    mmsb.prefetch_to_cpu(s, u.id, stream=stream).wait()
    mmsb.set_read_mostly(s, u.id, False)
    mmsb.set_preferred_location(s, u.id, None)
    assert mmsb.query_page(s, u.id)[:16] == b"\x05" * 16
    stats = mmsb.get_stats(s)
    assert stats.unified_managed_bytes >= 1 << 20 and stats.unified_prefetches == 2
    assert mmsb.get_device_stats(s)["unified"].slots_in_use == 0
    mmsb.resize_page(s, u.id, 1 << 19)
    with pytest.raises(InvalidArgumentError, match="deleted, resized or moved"):
        view.__cuda_array_interface__  # noqa: B018 (the export is what is refused)
    assert u.device_array().ptr == u.data.ctypes.data
    assert mmsb.verify_state_consistency(s)
    s._check()


def test_cuda_batched_and_async_syncs() -> None:
    s = _cuda_state("gpu")
    import cupy as cp  # type: ignore[import-not-found]

    pages = mmsb.create_pages(s, 64, 1024, location="gpu")
    for k, p in enumerate(pages):
        mmsb.write_page(s, p.id, k, bytes([k + 1]))  # small writes: copies fall behind
    assert sorted(mmsb.sync_pages_to_gpu(s, [p.id for p in pages[:32]])) == \
        [p.id for p in pages[:32]]
    handle = mmsb.sync_pages_to_gpu_async(s, [p.id for p in pages[32:]])
    assert sorted(handle.wait()) == [p.id for p in pages[32:]] and handle.done()
    for p in pages:
        assert cp.asnumpy(cp.from_dlpack(p.device_array())).tobytes() == mmsb.query_page(s, p.id)
    stats = mmsb.get_stats(s)
    assert stats.device_stale_pages == 0 and stats.device_pages_synced == 64
    s._check()
