"""Resident memory per page, measured in a fresh interpreter so nothing else skews it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._harness import Measurement, summarize
from ._registry import CaseOutcome, CaseSkipped, RunContext, case, expect

# Runs in a child interpreter: prints one JSON line. RSS comes from /proc/self/statm
# (resident pages x page size); where there is no /proc it falls back to the peak RSS
# of getrusage, which only grows, so the growth it shows is an upper bound.
_CHILD = r"""
import gc, json, os, sys, time
import numpy as np
n, size, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "statm"
    except OSError:
        import resource
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"

import mmsb

config = mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=1 << 60)
warm = mmsb.MMSBState(config=config)
mmsb.apply_batch(warm, [(p.id, 0, b"\x01" * size) for p in mmsb.create_pages(warm, 16, size)])
del warm
state = mmsb.MMSBState(config=config)
gc.collect()
before, source = rss()
t0 = time.perf_counter_ns()
pages = mmsb.create_pages(state, n, size)
create_ns = time.perf_counter_ns() - t0
count = len(pages)
ids = np.fromiter((p.id for p in pages), dtype=np.int64, count=count)
with_handles, _ = rss()
del pages
gc.collect()
after, _ = rss()

# Then every page written once (all its bytes), so the arena is really resident; the
# log now holds one delta per page, which is part of what a written bus keeps.
rng = np.random.default_rng(7)
write_ns = 0
for start in range(0, n, chunk):
    block = rng.integers(1, 256, (min(chunk, n - start), size), dtype=np.uint8)
    writes = [(int(i), 0, row.tobytes()) for i, row in zip(ids[start:start + chunk], block)]
    t0 = time.perf_counter_ns()
    mmsb.apply_batch(state, writes)
    write_ns += time.perf_counter_ns() - t0
    del writes, block
gc.collect()
written, _ = rss()
print(json.dumps({
    "n": n, "size": size, "count": count, "create_ns": create_ns, "write_ns": write_ns,
    "source": source, "rss_before": before, "rss_with_handles": with_handles,
    "rss_after": after, "rss_written": written, "total_pages": len(state.pages),
}))
"""


def _child_env() -> dict[str, str]:
    import mmsb

    env = dict(os.environ)
    src = str(Path(mmsb.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def start_child(ctx: RunContext, script: str, args: list[str], what: str,
                quit_text: str = "\n") -> Any:
    """A case's helper process: ``python -c script *args``, started once it prints
    ``ready``; at the end of the run it is sent ``quit_text`` on stdin (and killed if it
    does not exit within 30 s)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_child_env())

    def stop() -> None:
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(quit_text)
                proc.stdin.flush()
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a stuck child is killed
                proc.kill()
                proc.wait()

    ctx.on_close(stop)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    expect(line.startswith("ready"), f"the {what} process did not start: {line!r}")
    return proc


@case(
    "memory",
    "pages_1m_64b",
    "RSS growth of create_pages(state, 1,000,000, 64) in a fresh process; then each page written once",
)
def memory_pages(ctx: RunContext) -> CaseOutcome:
    n, size = ctx.pick(1_000_000, 10_000), 64
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), str(size), str(20_000)],
        capture_output=True,
        text=True,
        timeout=ctx.pick(300, 60),
        env=_child_env(),
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory child process failed (rc {proc.returncode}): {tail[0]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise CaseSkipped("memory child printed nothing")
    out = json.loads(lines[-1])
    expect(out["count"] == n, f"create_pages returned {out['count']} pages, not {n}")
    growth = out["rss_after"] - out["rss_before"]
    growth_with_handles = out["rss_with_handles"] - out["rss_before"]
    payload = n * size
    per_page_ns = out["create_ns"] / n
    m = Measurement(stats=summarize([per_page_ns], n), samples_ns=(per_page_ns,))
    return CaseOutcome(
        m,
        {
            "pages": n,
            "page_bytes": size,
            "payload_bytes": payload,
            "rss_growth_bytes": growth,
            "rss_bytes_per_page": growth / n,
            "rss_ratio": growth / payload,
            "rss_growth_with_handles_bytes": growth_with_handles,
            "rss_ratio_with_handles": growth_with_handles / payload,
            "rss_written_bytes": out["rss_written"] - out["rss_before"],
            "rss_ratio_written": (out["rss_written"] - out["rss_before"]) / payload,
            "write_ns_per_page": out["write_ns"] / n,
            "rss_source": out["source"],
        },
    )
