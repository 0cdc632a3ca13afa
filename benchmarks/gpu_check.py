"""Every GPU test and GPU benchmark of the device layer, in one command.

    python benchmarks/gpu_check.py [--out DIR] [--quick]

1. Runs ``tests/test_device_backend.py`` (the conformance kit on the host, gpu and
   unified backends) and ``tests/test_device_engine.py`` (gpu and unified pages in the
   engine: on a host stand-in, and end to end on the CUDA backends); the device ones
   skip, with the reason, where no device is usable.
2. Where a CUDA device is usable, times the device backends: slot allocation; sparse
   (1 % changed) and dense deltas on 1 KiB, 1 MiB and 64 MiB pages; a batch of many
   small deltas; host↔device copies; the diff of a 64 MiB page with 1 % changed; unified
   against explicit sync; and the device's own device-to-device copy of 64 MiB, measured
   in the same run, as the yardstick of the dense-apply target. Then the engine's
   device pages: a unified page's CPU writes read by the GPU with no copy (and that its
   device view addresses the host arena's bytes), a gpu page's write and sync, a
   prefetch, and batched, per-page and async syncs of 1000 small gpu pages.
3. Writes ``gpu_check.json`` and ``gpu_check.md`` (a table with each target's pass or
   fail) into ``--out`` (default: the current directory).

Timing: every case is warmed up, then timed many times and reported as the median.
Wall-clock cases put ``time.perf_counter`` around the call and a synchronize of the
backend's stream, so host-side work (validation, uploads from the host) is included.
Device-only cases (the copy yardstick and the device-resident dense apply) use CUDA
events on the backend's stream, the same method on both sides of that ratio.
The whole run takes well under 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from mmsb._device import DeltaBatch, get_backend, unavailable_reason  # noqa: E402

KIB = 1 << 10
MIB = 1 << 20
SIZES = [("1KiB", KIB), ("1MiB", MIB), ("64MiB", 64 * MIB)]
TEST_TIMEOUT_S = 170


# -- the tests ---------------------------------------------------------------------------

def run_tests(out: Path) -> dict[str, Any]:
    """Run the device backend tests in a child pytest; returns counts and the tail."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_device_backend.py"),
           str(ROOT / "tests" / "test_device_engine.py")]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,  # noqa: S603 (fixed argv)
                              timeout=TEST_TIMEOUT_S)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or "") if isinstance(exc.stdout, str) else ""
        text += f"\npytest ran past {TEST_TIMEOUT_S} s and was stopped"
        rc = -1
    (out / "pytest.txt").write_text(text, encoding="utf-8")
    counts: dict[str, int] = {}
    for line in reversed(text.splitlines()):
        if " in " in line and ("passed" in line or "failed" in line or "error" in line):
            for part in line.strip("= ").split(" in ")[0].split(","):
                bits = part.strip().split(" ")
                if len(bits) == 2 and bits[0].isdigit():
                    counts[bits[1]] = int(bits[0])
            break
    return {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
            "counts": counts, "skip_reasons": sorted({ln.split(": ", 1)[-1] for ln in
                                                      text.splitlines()
                                                      if ln.startswith("SKIPPED")})}


# -- timing ------------------------------------------------------------------------------

def wall(fn: Callable[[], Any], sync: Callable[[], None], reps: int, warmup: int = 3) -> float:
    """Median seconds of ``fn(); sync()`` over ``reps`` runs."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_time(cp: Any, stream: Any, fn: Callable[[], Any], reps: int,
                warmup: int = 3) -> float:
    """Median seconds between CUDA events recorded around ``fn()`` on ``stream``."""
    for _ in range(warmup):
        fn()
    stream.synchronize()
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return statistics.median(times)


class Results:
    """The result rows, and the markdown they become."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, value: float, unit: str, detail: str = "",
            target: str = "", passed: bool | None = None) -> None:
        self.rows.append({"name": name, "value": value, "unit": unit, "detail": detail,
                          "target": target, "passed": passed})
        mark = "" if passed is None else ("  PASS" if passed else "  FAIL")
        print(f"  {name:<44} {value:>12.4g} {unit:<8} {detail}{mark}", flush=True)

    def error(self, name: str, exc: BaseException) -> None:
        self.rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()})
        print(f"  {name}: ERROR {type(exc).__name__}: {exc}", flush=True)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# -- the benchmarks ----------------------------------------------------------------------

def bench_alloc(res: Results, cp: Any, quick: bool) -> None:
    gpu = get_backend("gpu")
    for label, size, count in (("1KiB", KIB, 400 if quick else 4000),
                               ("1MiB", MIB, 60 if quick else 400)):
        times = []
        slots = []
        for _ in range(count):
            t0 = time.perf_counter()
            slots.append(gpu.alloc(size))
            times.append(time.perf_counter() - t0)
        gpu.synchronize()
        res.add(f"alloc_{label}", statistics.median(times) * 1e6, "us",
                f"median of {count} fresh slots; mean {statistics.mean(times) * 1e6:.2f} us "
                f"(chunk growth included)")
        for s in slots:
            gpu.free(s)
        reuse = wall(lambda size=size: gpu.free(gpu.alloc(size)), gpu.synchronize,
                     reps=count // 2)
        res.add(f"alloc_free_reuse_{label}", reuse * 1e6, "us",
                "alloc of a freed slot (zero-fill on the device) + free + sync")
    gpu._check()


def bench_deltas(res: Results, cp: Any, quick: bool) -> dict[str, float]:
    gpu = get_backend("gpu")
    rng = np.random.default_rng(1)
    found: dict[str, float] = {}
    for label, size in SIZES:
        reps = {KIB: 300, MIB: 100, 64 * MIB: 20}[size] // (4 if quick else 1)
        s = gpu.alloc(size)
        k = max(1, size // 100)
        pos = np.sort(rng.choice(size, k, replace=False)).astype(np.int64)
        vals = rng.integers(0, 256, k, dtype=np.uint8)
        t = wall(lambda s=s, pos=pos, vals=vals: gpu.apply_sparse(s, pos, vals),
                 gpu.synchronize, reps)
        found[f"sparse_host_{label}"] = t
        ok = None
        target = ""
        if size == 64 * MIB:
            ok, target = gbps(size, t) >= 10, ">= 10 GB/s of page covered"
        res.add(f"sparse_1pct_{label}_from_host", t * 1e6, "us",
                f"{k} positions+values uploaded, validated, scattered; "
                f"{gbps(size, t):.1f} GB/s of page covered", target, ok)
        dpos, dvals = cp.asarray(pos), cp.asarray(vals)
        t = wall(lambda s=s, dpos=dpos, dvals=dvals: gpu.apply_sparse(s, dpos, dvals),
                 gpu.synchronize, reps)
        found[f"sparse_dev_{label}"] = t
        res.add(f"sparse_1pct_{label}_device_resident", t * 1e6, "us",
                f"positions/values already on the device; {gbps(size, t):.1f} GB/s covered")
        host = rng.integers(0, 256, size, dtype=np.uint8)
        t = wall(lambda s=s, host=host: gpu.apply_dense(s, host), gpu.synchronize, reps)
        res.add(f"dense_{label}_from_host", t * 1e6, "us",
                f"whole page from pageable host memory; {gbps(size, t):.1f} GB/s")
        dev = cp.asarray(host)
        t = wall(lambda s=s, dev=dev: gpu.apply_dense(s, dev), gpu.synchronize, reps)
        res.add(f"dense_{label}_device_resident_wall", t * 1e6, "us",
                f"whole page from a device array, call + sync; {gbps(size, t):.1f} GB/s")
        with gpu.stream:
            t = device_time(cp, gpu.stream, lambda s=s, dev=dev: gpu.apply_dense(s, dev), reps)
        found[f"dense_dev_{label}"] = t
        res.add(f"dense_{label}_device_resident_events", t * 1e6, "us",
                f"same, CUDA events; {gbps(size, t):.1f} GB/s")
        assert np.array_equal(gpu.copy_out(s), host)
        gpu.free(s)
    return found


def bench_copy_yardstick(res: Results, cp: Any, dense64: float | None, quick: bool) -> None:
    gpu = get_backend("gpu")
    size = 64 * MIB
    src = cp.asarray(np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8))
    dst = cp.empty_like(src)
    stream = gpu.stream

    def copy() -> None:
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, size, 3, stream.ptr)

    t = device_time(cp, stream, copy, 10 if quick else 40)
    res.add("d2d_copy_64MiB", gbps(size, t), "GB/s",
            f"cudaMemcpyAsync device→device, CUDA events, {t * 1e6:.1f} us "
            f"({gbps(2 * size, t):.0f} GB/s counting reads + writes)")
    if dense64 is not None:
        ratio = t / dense64
        res.add("dense_apply_64MiB_vs_copy", ratio * 100, "%",
                f"device-resident dense apply {gbps(size, dense64):.0f} GB/s vs copy "
                f"{gbps(size, t):.0f} GB/s", ">= 50 % of the device copy", ratio >= 0.5)


def bench_batch(res: Results, cp: Any, quick: bool) -> None:
    gpu = get_backend("gpu")
    rng = np.random.default_rng(3)
    n = 1000
    slots = [gpu.alloc(KIB) for _ in range(n)]
    items = [(s, np.sort(rng.choice(KIB, 10, replace=False)),
              rng.integers(0, 256, 10, dtype=np.uint8)) for s in slots]
    batch = DeltaBatch.from_items(items)
    reps = 10 if quick else 40
    t = wall(lambda: gpu.apply_batch(batch), gpu.synchronize, reps)
    res.add("batch_1000x1KiB_10B", t * 1e6, "us",
            f"1000 sparse deltas to 1000 slots, one launch; {n / t / 1e6:.2f} M deltas/s")

    def one_by_one() -> None:
        for s, p, v in items:
            gpu.apply_sparse(s, p, v)

    t1 = wall(one_by_one, gpu.synchronize, max(2, reps // 10), warmup=1)
    res.add("batch_1000x1KiB_10B_one_by_one", t1 * 1e6, "us",
            f"the same 1000 deltas as 1000 launches; batch is {t1 / t:.0f}x faster")
    for s in slots:
        gpu.free(s)


def bench_sync(res: Results, cp: Any, quick: bool) -> None:
    gpu = get_backend("gpu")
    size = 64 * MIB
    reps = 5 if quick else 20
    s = gpu.alloc(size)
    host = np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8)
    t_in = wall(lambda: gpu.copy_in(s, host), gpu.synchronize, reps)
    res.add("h2d_copy_in_64MiB_pageable", gbps(size, t_in), "GB/s", f"{t_in * 1e3:.2f} ms")
    pinned_mem = cp.cuda.alloc_pinned_memory(size)
    pinned = np.frombuffer(pinned_mem, dtype=np.uint8, count=size)
    pinned[:] = host
    t = wall(lambda: gpu.copy_in(s, pinned), gpu.synchronize, reps)
    res.add("h2d_copy_in_64MiB_pinned", gbps(size, t), "GB/s", f"{t * 1e3:.2f} ms")
    out = np.empty(size, dtype=np.uint8)
    t = wall(lambda: gpu.copy_out(s, out=out), gpu.synchronize, reps)
    res.add("d2h_copy_out_64MiB_pageable", gbps(size, t), "GB/s", f"{t * 1e3:.2f} ms")
    t = wall(lambda: gpu.copy_out_async(s).wait(), gpu.synchronize, reps)
    res.add("d2h_copy_out_async_64MiB_pinned", gbps(size, t), "GB/s",
            f"{t * 1e3:.2f} ms, pinned buffer allocated per call")
    assert np.array_equal(out, host)
    gpu.free(s)

    uni = get_backend("unified") if unavailable_reason("unified") is None else None
    if uni is None:
        res.add("unified_vs_explicit", float("nan"), "",
                f"skipped: {unavailable_reason('unified')}")
        return
    u = uni.alloc(size)

    def unified_default() -> None:
        uni.copy_in(u, host)  # CPU writes the managed bytes
        uni.prefetch(u, "gpu").wait()  # type: ignore[attr-defined]

    def unified_cpu_first() -> None:
        uni.prefetch(u, "cpu").wait()  # type: ignore[attr-defined]
        uni.copy_in(u, host)
        uni.prefetch(u, "gpu").wait()  # type: ignore[attr-defined]

    t_u = wall(unified_default, uni.synchronize, reps)
    res.add("unified_sync_64MiB_cpu_write_prefetch", gbps(size, t_u), "GB/s",
            f"{t_u * 1e3:.2f} ms: copy_in (a CPU write into managed memory), then "
            "prefetch to the GPU",
            "within 80 % of explicit sync", t_in / t_u >= 0.8)
    t_u2 = wall(unified_cpu_first, uni.synchronize, reps)
    res.add("unified_sync_64MiB_prefetch_cpu_write_prefetch", gbps(size, t_u2), "GB/s",
            f"{t_u2 * 1e3:.2f} ms: prefetch to the CPU, CPU write, prefetch to the GPU")
    res.add("unified_vs_explicit_ratio", t_in / t_u * 100, "%",
            f"explicit copy_in {t_in * 1e3:.2f} ms / unified {t_u * 1e3:.2f} ms",
            ">= 80 %", t_in / t_u >= 0.8)
    managed_ptr = uni.view(u).ptr

    def memcpy_into_managed() -> None:
        cp.cuda.runtime.memcpyAsync(managed_ptr, host.ctypes.data, size, 4, uni.stream.ptr)

    t_m = wall(memcpy_into_managed, uni.synchronize, reps)
    res.add("unified_sync_64MiB_cudaMemcpy", gbps(size, t_m), "GB/s",
            f"{t_m * 1e3:.2f} ms: cudaMemcpy from the host into managed memory, for comparison")
    assert np.array_equal(uni.copy_out(u), host)
    uni.free(u)


def bench_diff(res: Results, cp: Any, quick: bool) -> None:
    gpu = get_backend("gpu")
    size = 64 * MIB
    reps = 5 if quick else 20
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, size, dtype=np.uint8)
    s = gpu.alloc(size)
    gpu.copy_in(s, base)
    new = base.copy()
    idx = rng.choice(size, size // 100, replace=False)
    new[idx] ^= 0x5A
    dnew = cp.asarray(new)
    ch = gpu.diff(s, dnew)
    assert ch is not None and ch.is_sparse and ch.count == len(idx)
    t = wall(lambda: gpu.diff(s, dnew), gpu.synchronize, reps)
    res.add("diff_64MiB_1pct_device_contents", t * 1e3, "ms",
            f"compare + compaction on the device, {len(idx)} positions+values to the host; "
            f"{gbps(size, t):.1f} GB/s of page")
    t = wall(lambda: gpu.diff(s, new), gpu.synchronize, reps)
    res.add("diff_64MiB_1pct_host_contents", t * 1e3, "ms",
            f"the same with the new page uploaded first; {gbps(size, t):.1f} GB/s of page")
    gpu.free(s)


def bench_dlpack(res: Results, cp: Any) -> None:
    gpu = get_backend("gpu")
    s = gpu.alloc(4096)
    gpu.copy_in(s, np.arange(4096, dtype=np.uint32).view(np.uint8)[:4096])
    view = gpu.view(s)
    try:
        import torch
    except ImportError:
        res.add("dlpack_torch_zero_copy", float("nan"), "", "torch is not installed")
        return
    t = torch.from_dlpack(view)
    same = int(t.data_ptr()) == view.ptr and bytes(t.cpu().numpy()) == bytes(gpu.copy_out(s))
    res.add("dlpack_torch_zero_copy", 1.0 if same else 0.0, "bool",
            "torch.from_dlpack(view) shares the slot's memory", "zero-copy", same)


def bench_engine(res: Results, cp: Any, quick: bool) -> None:
    """The engine's device pages: a unified page's CPU writes read by the GPU with no
    copy, against a gpu page's write and sync; batched against per-page syncs; a
    prefetch of a unified page."""
    import mmsb

    s = mmsb.MMSBState(mmsb.MMSBConfig())
    size = 64 * MIB
    reps = 3 if quick else 10
    rng = np.random.default_rng(6)
    pages = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(2)]
    flip = [0]

    def next_bytes() -> bytes:
        flip[0] ^= 1
        return pages[flip[0]]

    if unavailable_reason("unified") is None:
        u = mmsb.create_page(s, size, location="unified")
        view = u.device_array()
        same = view.ptr == u.data.ctypes.data
        res.add("engine_unified_page_zero_copy", 1.0 if same else 0.0, "bool",
                "device_array() of a unified page addresses the host arena's bytes",
                "zero-copy", same)
        dev = cp.from_dlpack(view)

        def unified_write_read() -> None:
            mmsb.update_page(s, u.id, next_bytes())  # logged; the CPU writes managed memory
            int(dev[::4096].sum())  # the GPU reads the same memory

        t = wall(unified_write_read, lambda: None, reps, warmup=1)
        res.add("engine_unified_update_then_gpu_read_64MiB", t * 1e3, "ms",
                "update_page (diff, log, CPU write into managed memory) then a GPU kernel "
                "reading the page; no copy")
        times = []
        for _ in range(reps):
            mmsb.prefetch_to_cpu(s, u.id).wait()  # untimed: the page starts on the host
            t0 = time.perf_counter()
            mmsb.prefetch_to_gpu(s, u.id).wait()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        res.add("engine_unified_prefetch_to_gpu_64MiB", t * 1e3, "ms",
                f"prefetch_to_gpu + wait of a page on the host, about {gbps(size, t):.1f} GB/s")
        mmsb.delete_page(s, u.id)
    else:
        res.add("engine_unified", float("nan"), "", f"skipped: {unavailable_reason('unified')}")
    g = mmsb.create_page(s, size, location="gpu")

    def gpu_write_sync() -> None:
        mmsb.update_page(s, g.id, next_bytes())  # the device copy follows in the same call
        mmsb.sync_page_to_gpu(s, g.id)

    t = wall(gpu_write_sync, lambda: None, reps, warmup=1)
    res.add("engine_gpu_update_then_sync_64MiB", t * 1e3, "ms",
            "update_page on a gpu page (host mirror + one dense copy to the device), then "
            "sync_page_to_gpu (waits)")
    mmsb.delete_page(s, g.id)
    n = 1000
    small = mmsb.create_pages(s, n, KIB, location="gpu")
    ids = [p.id for p in small]

    def dirty() -> None:
        for k, pid in enumerate(ids):
            mmsb.write_page(s, pid, k % KIB, b"x")  # compiled path: the copies fall behind

    def timed(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(reps):
            dirty()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_batch = timed(lambda: mmsb.sync_pages_to_gpu(s, ids))
    res.add("engine_sync_pages_to_gpu_1000x1KiB", t_batch * 1e3, "ms",
            "1000 stale gpu pages in one batch (one upload, one launch), waited")

    def one_by_one() -> None:
        for pid in ids:
            mmsb.sync_page_to_gpu(s, pid)

    t_each = timed(one_by_one)
    res.add("engine_sync_page_to_gpu_1000x1KiB_one_by_one", t_each * 1e3, "ms",
            f"the same as 1000 calls; the batch is {t_each / t_batch:.1f}x faster")
    t_async = timed(lambda: mmsb.sync_pages_to_gpu_async(s, ids))
    res.add("engine_sync_pages_to_gpu_async_1000x1KiB_call", t_async * 1e3, "ms",
            "the batch queued, call only (its wait follows outside the timing)")
    mmsb.sync_pages_to_gpu(s, ids)
    for pid in (ids[0], ids[-1]):
        assert cp.asnumpy(cp.from_dlpack(s.pages[pid].device_array())).tobytes() == \
            mmsb.query_page(s, pid)


# -- main --------------------------------------------------------------------------------

def device_info(cp: Any) -> dict[str, Any]:
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "multiprocessors": int(props["multiProcessorCount"]),
            "memory_bytes": int(props["totalGlobalMem"]),
            "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "driver": cp.cuda.runtime.driverGetVersion()}


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n",
                                        encoding="utf-8")
    lines = [f"# GPU check, {report['date']}", "",
             f"Device: {report['device'].get('name', report['device'])}", "",
             f"Tests: {report['tests']['counts']} (exit {report['tests']['returncode']})", ""]
    for reason in report["tests"]["skip_reasons"]:
        lines.append(f"- skipped: {reason}")
    lines += ["", "| case | value | unit | target | result | detail |",
              "| --- | ---: | --- | --- | --- | --- |"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | ERROR | {r['error']} |")
            continue
        verdict = "" if r["passed"] is None else ("pass" if r["passed"] else "FAIL")
        lines.append(f"| {r['name']} | {r['value']:.4g} | {r['unit']} | {r['target']} | "
                     f"{verdict} | {r['detail']} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-tests", action="store_true", help="benchmarks only")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(), "python": platform.python_version(),
        "numpy": np.__version__, "device": {}, "results": [],
        "tests": {"returncode": None, "counts": {}, "skip_reasons": []}}
    if not args.no_tests:
        print("== tests: tests/test_device_backend.py, tests/test_device_engine.py", flush=True)
        report["tests"] = run_tests(out)
        print(f"   {report['tests']}", flush=True)
    reason = unavailable_reason("gpu")
    res = Results()
    if reason is not None:
        print(f"== benchmarks skipped: {reason}", flush=True)
        report["device"] = {"unavailable": reason}
    else:
        import cupy as cp

        report["device"] = device_info(cp)
        print(f"== benchmarks on {report['device']}", flush=True)
        found: dict[str, float] = {}
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("alloc", lambda: bench_alloc(res, cp, args.quick)),
            ("deltas", lambda: found.update(bench_deltas(res, cp, args.quick) or {})),
            ("copy_yardstick", lambda: bench_copy_yardstick(
                res, cp, found.get("dense_dev_64MiB"), args.quick)),
            ("batch", lambda: bench_batch(res, cp, args.quick)),
            ("sync", lambda: bench_sync(res, cp, args.quick)),
            ("diff", lambda: bench_diff(res, cp, args.quick)),
            ("dlpack", lambda: bench_dlpack(res, cp)),
            ("engine", lambda: bench_engine(res, cp, args.quick)),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                res.error(name, exc)
            cp.get_default_memory_pool().free_all_blocks()
    report["results"] = res.rows
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(out, report)
    print(f"== done in {report['seconds']} s; wrote {out / 'gpu_check.json'} and "
          f"{out / 'gpu_check.md'}", flush=True)
    failed_tests = report["tests"]["returncode"] not in (0, None)
    errors = any("error" in r for r in res.rows)
    return 1 if failed_tests or errors else 0


if __name__ == "__main__":
    sys.exit(main())
