"""Cases for the engine's own budgets: write latency tails under the default config,
``with batch()`` throughput, and memory per logged write and per created page, each
measured where nothing else skews it (memory in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from ._harness import Measurement, summarize
from ._registry import CaseOutcome, CaseSkipped, RunContext, case, expect
from .cases_core import KIB
from .cases_io import _batch_setup, _rng
from .cases_memory import _child_env

_RSS = r"""
def rss():
    # Freed memory the C library still holds is given back first, so that only what
    # is in use counts (the log's columns grow by doubling and free the old copy).
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
"""

# A durable bus of 64 pages of 1 KiB (no checkpoint comes: the whole history in its
# log) and the draws of its 8-byte writes, cycled (the writes still change bytes:
# offsets and pages vary), so that the payloads do not weigh on the measure.
_HISTORY_WORKLOAD = r"""
config = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 60, fsync="none")
state = mmsb.mmsb_start(path=path, config=config)
ids = [p.id for p in mmsb.create_pages(state, 64, 1024)]
rng = np.random.default_rng(5)
k = 1 << 16
offs = rng.integers(0, 1016, k).tolist()
pids = [ids[i] for i in rng.integers(0, 64, k).tolist()]
pay = [row.tobytes() for row in rng.integers(1, 256, (k, 8), dtype=np.uint8)]
skew = rng.integers(0, 1016, 64).tolist()
"""

_WRITE_BUDGET_CHILD = r"""
import gc, json, os, sys, time
import numpy as np
n = int(sys.argv[1])

""" + _RSS + r"""
import mmsb

config = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 60, fsync="none")
# With a directory: a durable bus (no checkpoint comes: full history in its log).
path = sys.argv[2] if len(sys.argv) > 2 else ""
state = mmsb.mmsb_start(path=path, config=config) if path else mmsb.MMSBState(config=config)
ids = [p.id for p in mmsb.create_pages(state, 64, 1024)]
rng = np.random.default_rng(3)
warm = 2000
offs = rng.integers(0, 1016, n + warm).tolist()
pids = rng.integers(0, 64, n + warm).tolist()
block = rng.integers(1, 256, (n + warm, 8), dtype=np.uint8)
pay = [row.tobytes() for row in block]
del block
# Warm up the kernels and the first payload chunk, so only the log's growth is counted
# (with writes of their own: repeating one would change nothing and log nothing).
for i in range(warm):
    mmsb.write_page(state, ids[pids[i]], offs[i], pay[i])
gc.collect()
before = rss()
logged0 = len(state.tlog)
write = mmsb.write_page
for i in range(warm, warm + n):
    write(state, ids[pids[i]], offs[i], pay[i] if i & 1 else pay[i][::-1])
gc.collect()
after = rss()
logged = len(state.tlog) - logged0
print(json.dumps({"n": n, "logged": logged, "rss_growth": after - before}))
"""

_DURABLE_HISTORY_CHILD = r"""
import gc, json, os, sys, time
import numpy as np
n = int(sys.argv[1])
path = sys.argv[2]

""" + _RSS + r"""
import mmsb

""" + _HISTORY_WORKLOAD + r"""for i in range(2000):  # the kernels and the first chunks, as on any bus in use
    mmsb.write_page(state, pids[i], offs[i], pay[i])
gc.collect()
before = rss()
logged0 = len(state.tlog)
write = mmsb.write_page
t0 = time.perf_counter()
for i in range(n):
    j = i & (k - 1)
    write(state, pids[j], (offs[j] + skew[(i >> 16) & 63]) % 1016, pay[j])
secs = time.perf_counter() - t0
gc.collect()
after = rss()
logged = len(state.tlog) - logged0
probe = mmsb.read_page_at(state, ids[0], lsn=state.last_lsn // 2)
print(json.dumps({"n": n, "logged": logged, "rss_growth": after - before, "secs": secs,
                  "probe": len(probe)}))
"""

_KILLED_HISTORY_CHILD = r"""
import os, signal, sys
import numpy as np
n = int(sys.argv[1])
path = sys.argv[2]
import mmsb

""" + _HISTORY_WORKLOAD + r"""write = mmsb.write_page
for i in range(n):
    j = i & (k - 1)
    write(state, pids[j], (offs[j] + skew[(i >> 16) & 63]) % 1016, pay[j])
print(state.last_lsn, flush=True)
# Left as a killed writer leaves it: no final checkpoint, the history in the segments.
os.kill(os.getpid(), signal.SIGKILL)
"""

_REOPEN_HISTORY_CHILD = r"""
import gc, json, os, shutil, signal, sys, time
import numpy as np
path, warm_path = sys.argv[1], sys.argv[2]

""" + _RSS + r"""
import mmsb

config = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 60, fsync="none")
# The kernels of writing, of recovery and of history reads, loaded by a small bus
# reopened after the same kind of writes, so that only the history is counted.
warm = mmsb.mmsb_start(path=warm_path, config=config)
wids = [p.id for p in mmsb.create_pages(warm, 8, 1024)]
for i in range(20000):
    mmsb.write_page(warm, wids[i & 7], (i * 37) % 1016, (i + 1).to_bytes(8, "little"))
warm.bus.abandon("warm-up")
mmsb.mmsb_stop(warm)
warm = mmsb.mmsb_start(path=warm_path, config=config)
mmsb.read_page_at(warm, wids[0], lsn=warm.last_lsn // 2)
mmsb.mmsb_stop(warm)
del warm
shutil.rmtree(warm_path, ignore_errors=True)
gc.collect()
before = rss()
t0 = time.perf_counter()
state = mmsb.mmsb_start(path=path, config=config)
secs = time.perf_counter() - t0
gc.collect()
after = rss()
logged = len(state.tlog)
# A read of the history after the measure, as durable_history_2m reads it: a read
# through the mappings brings the segments' pages it touches into the page cache,
# which counts in this process's RSS while they stay mapped (the kernel can drop them).
probe = mmsb.read_page_at(state, sorted(state.pages)[0], lsn=state.last_lsn // 2)
print(json.dumps({"logged": logged, "rss_growth": after - before, "open_s": secs,
                  "probe": len(probe)}))
os.kill(os.getpid(), signal.SIGKILL)
"""

_CREATE_LOOP_CHILD = r"""
import gc, json, os, sys, time
n = int(sys.argv[1])

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

import mmsb

config = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 60)
warm = mmsb.MMSBState(config=config)
for _ in range(1000):
    mmsb.create_page(warm, 64)
del warm
state = mmsb.MMSBState(config=config)
gc.collect()
before = rss()
create = mmsb.create_page
t0 = time.perf_counter_ns()
for _ in range(n):
    create(state, 64)
ns = time.perf_counter_ns() - t0
gc.collect()
after = rss()
print(json.dumps({"n": n, "pages": len(state.pages), "rss_growth": after - before, "ns": ns}))
"""


def _child(ctx: RunContext, script: str, *args: int | str) -> dict[str, Any]:
    if not os.path.exists("/proc/self/statm"):
        raise CaseSkipped("resident memory is read from /proc/self/statm, which this system lacks")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, timeout=ctx.pick(600, 120), env=_child_env(), check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory child process failed (rc {proc.returncode}): {tail[0]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _per_write_case(ctx: RunContext, *durable_path: str) -> CaseOutcome:
    """RSS growth per logged 8-byte write in a fresh process (in memory, or on a durable
    bus at ``durable_path``), beyond nothing and beyond its changed bytes."""
    n = ctx.pick(200_000 if durable_path else 1_000_000, 5_000 if durable_path else 20_000)
    out = _child(ctx, _WRITE_BUDGET_CHILD, n, *durable_path)
    expect(out["logged"] > 0.95 * n, f"only {out['logged']} of {n} writes were logged")
    per_write = out["rss_growth"] / out["logged"]
    m = Measurement(stats=summarize([per_write], 1), samples_ns=(per_write,))
    return CaseOutcome(m, {"writes": out["logged"], "rss_growth_bytes": out["rss_growth"],
                           "bytes_per_write": per_write,
                           "bytes_per_write_beyond_changed": per_write - 8})


@case("memory", "log_per_small_write",
      "RSS growth per logged 8-byte write_page with full history, beyond its changed bytes")
def memory_per_write(ctx: RunContext) -> CaseOutcome:
    return _per_write_case(ctx)


@case("memory", "durable_log_per_small_write",
      "as log_per_small_write, on a durable bus (fsync='none', no checkpoint: the whole "
      "history in its log)")
def memory_per_durable_write(ctx: RunContext) -> CaseOutcome:
    return _per_write_case(ctx, str(ctx.path("durable_budget")))


@case("memory", "durable_history_2m",
      "RSS growth of a durable bus over 2,000,000 8-byte writes with the whole history "
      "in its log (fsync='none', no checkpoint), beyond the bus before them")
def memory_durable_history(ctx: RunContext) -> CaseOutcome:
    n = ctx.pick(2_000_000, 20_000)
    out = _child(ctx, _DURABLE_HISTORY_CHILD, n, str(ctx.path("durable_history")))
    expect(out["logged"] > 0.95 * n, f"only {out['logged']} of {n} writes were logged")
    expect(out["probe"] == 1024, "read_page_at of the history failed")
    per_write = out["rss_growth"] / out["logged"]
    m = Measurement(stats=summarize([per_write], 1), samples_ns=(per_write,))
    return CaseOutcome(m, {"writes": out["logged"], "rss_growth_bytes": out["rss_growth"],
                           "bytes_per_write": per_write,
                           "rss_growth_mb_per_2m": per_write * 2_000_000 / 1e6,
                           "write_s": out["secs"]})


@case("memory", "durable_history_reopen_2m",
      "RSS growth of reopening a durable bus after 2,000,000 8-byte writes with the whole "
      "history in its log, left as a kill -9 leaves it (fsync='none', no checkpoint): "
      "the history a reopen keeps, against durable_history_2m's live figure")
def memory_durable_history_reopen(ctx: RunContext) -> CaseOutcome:
    n = ctx.pick(2_000_000, 20_000)
    if not os.path.exists("/proc/self/statm"):
        raise CaseSkipped("resident memory is read from /proc/self/statm, which this system lacks")
    path = str(ctx.path("durable_history_reopen"))
    proc = subprocess.run([sys.executable, "-c", _KILLED_HISTORY_CHILD, str(n), path],
                          capture_output=True, text=True, timeout=ctx.pick(900, 120),
                          env=_child_env(), check=False)
    expect(proc.returncode == -9 and proc.stdout.strip().isdigit(),
           f"the writing child did not end as killed (rc {proc.returncode})")
    out = _child_killed(ctx, _REOPEN_HISTORY_CHILD, path,
                        str(ctx.path("durable_history_reopen_warm")))
    expect(out["logged"] > 0.95 * n, f"only {out['logged']} of {n} records were recovered")
    expect(out["probe"] == 1024, "read_page_at of the history failed")
    per_record = out["rss_growth"] / out["logged"]
    m = Measurement(stats=summarize([per_record], 1), samples_ns=(per_record,))
    return CaseOutcome(m, {"records": out["logged"], "rss_growth_bytes": out["rss_growth"],
                           "bytes_per_record": per_record,
                           "rss_growth_mb_per_2m": per_record * 2_000_000 / 1e6,
                           "open_s": out["open_s"]})


def _child_killed(ctx: RunContext, script: str, *args: str) -> dict[str, Any]:
    """:func:`_child` for a child that prints its result and then kills itself (so that
    its bus is left as a crash leaves it)."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=ctx.pick(900, 120), env=_child_env(), check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != -9 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory child process failed (rc {proc.returncode}): {tail[0]}")
    out: dict[str, Any] = json.loads(lines[-1])
    return out


@case("memory", "create_page_loop_1m",
      "RSS growth of 1,000,000 create_page(state, 64) calls in a loop, fresh process")
def memory_create_loop(ctx: RunContext) -> CaseOutcome:
    n = ctx.pick(1_000_000, 20_000)
    out = _child(ctx, _CREATE_LOOP_CHILD, n)
    expect(out["pages"] == n, f"{out['pages']} pages after {n} create_page calls")
    per_page_ns = out["ns"] / n
    m = Measurement(stats=summarize([per_page_ns], n), samples_ns=(per_page_ns,))
    return CaseOutcome(m, {"pages": n, "rss_growth_bytes": out["rss_growth"],
                           "rss_growth_mb": out["rss_growth"] / 1e6,
                           "rss_growth_mb_per_million": out["rss_growth"] / 1e6 * 1_000_000 / n,
                           "rss_bytes_per_page": out["rss_growth"] / n})


@case("stress", "write_tail_200k",
      "200,000 write_page calls of 8 bytes over 64 pages of 1 KiB with the default config "
      "(automatic compaction on; its kernels loaded by a warm-up first): latency "
      "percentiles of single calls")
def stress_write_tail(ctx: RunContext) -> CaseOutcome:
    import mmsb

    n = ctx.pick(200_000, 5_000)
    rng = _rng(ctx, 11)
    # Warm-up: the compiled kernels a compaction uses are loaded once per process.
    warm = mmsb.MMSBState(mmsb.MMSBConfig(max_tlog_size=512))
    wids = [p.id for p in mmsb.create_pages(warm, 8, KIB)]
    for i in range(2_000):
        mmsb.write_page(warm, wids[i & 7], (i * 37) % (KIB - 8), bytes([i & 255 or 1]) * 8)
    state = mmsb.MMSBState()  # the default config, compaction included
    ids = [p.id for p in mmsb.create_pages(state, 64, KIB)]
    offs = rng.integers(0, KIB - 8, n).tolist()
    pids = rng.integers(0, 64, n).tolist()
    pay = [bytes(rng.integers(1, 256, 8, dtype=np.uint8)) for _ in range(256)]
    lat = np.empty(n, np.int64)
    write = mmsb.write_page
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        write(state, ids[pids[i]], offs[i], pay[i & 255])
        lat[i] = clock() - t0
    expect(mmsb.verify_state_consistency(state), "the state differs from the replay of its log")
    p50, p99, p999 = (float(x) for x in np.percentile(lat, [50, 99, 99.9]))
    m = Measurement(stats=summarize([p50], n), samples_ns=(p50,))
    return CaseOutcome(m, {"writes": n, "p50_ns": p50, "p99_ns": p99, "p999_ns": p999,
                           "max_ns": int(lat.max()), "over_1ms": int((lat > 1_000_000).sum())})


@case("batch", "with_batch_small",
      "with batch(state): write_page of 8 bytes, over 1,000 pages of 1 KiB")
def batch_with_small(ctx: RunContext) -> CaseOutcome:
    import mmsb

    n_pages = ctx.pick(1_000, 50)
    setup = _batch_setup(ctx, _rng(ctx, 13), n_pages)

    def batch(obj: tuple[Any, list[tuple[int, int, bytes]]], n: int) -> None:
        state, writes = obj
        write = mmsb.write_page
        with mmsb.batch(state):
            for pid, off, data in writes:
                write(state, pid, off, data)

    m = ctx.measure(batch, setup=setup, inner=ctx.pick(20_000, 500))
    return CaseOutcome(m, {"writes_per_batch": m.stats.ops_per_sample, "write_bytes": 8,
                           "deltas_per_s": 1e9 / m.stats.median_ns})
