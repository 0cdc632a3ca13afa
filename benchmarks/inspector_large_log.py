"""How long the inspector's answers take on a large log (docs/Inspector.md, "Speed").

Builds a log of about 800,000 records (sparse batch writes from two sources, single
writes, a few dense writes of a 70 KB page, metadata, edges added and removed, a page
deleted), checkpoints it, opens it as ``mmsb ui`` does, and times:

* the first answer of each endpoint on a fresh inspector (nothing cached yet);
* the per-request work old and new, interleaved (A/B/A/B): the statistics the page
  table, summary and stats need, one Delta object per row (the former way) against the
  log's columns; a past graph through ``replay_to_lsn`` (the former way) against the
  graph rebuilt from the structural records. Medians of the per-round ratios.

Run: ``PYTHONPATH=src python benchmarks/inspector_large_log.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import mmsb
from mmsb._history.graph_at import graph_at_lsn
from mmsb._history.stats import log_statistics, page_statistics, row_columns
from mmsb.ui._data import Inspected


def build(rounds: int = 82, per: int = 10_000, pages: int = 2000) -> mmsb.MMSBState:
    state = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=10**8))
    ids = [p.id for p in mmsb.create_pages(state, pages, 64)]
    big = mmsb.create_page(state, 70_000).id
    rng = np.random.default_rng(1)
    for k in range(40):
        mmsb.add_dependency(state, ids[k], ids[k + 40], mmsb.CONTROL_DEPENDENCY)
    for b in range(rounds):
        mmsb.apply_batch(state, [(int(ids[k]), int(o), bytes([b % 256, 7])) for k, o in zip(
            rng.integers(0, pages - 1, per), rng.integers(0, 62, per), strict=True)],
            source="batch" if b % 2 else "api")
        for k in range(200):
            mmsb.write_page(state, ids[k], k % 60, bytes([b, k % 256, 1]))
        mmsb.write_page(state, big, 1000 * (b % 60), bytes(range(200)))
        mmsb.set_metadata(state, ids[b], "step", b)
        if b % 10 == 3:
            mmsb.add_dependency(state, ids[100 + b], ids[300 + b], mmsb.DATA_DEPENDENCY)
        if b % 10 == 7 and b < 40:
            mmsb.remove_dependency(state, ids[b % 40], ids[b % 40 + 40])
        if b == 50:
            mmsb.delete_page(state, ids[-1])
            mmsb.update_page(state, big, bytes(range(256)) * 273 + bytes(70_000 - 256 * 273))
    return state


def _slow_statistics(state: mmsb.MMSBState) -> tuple[int, dict[int, tuple[int, int, int]]]:
    """Bytes changed and per-page statistics, one Delta object per row."""
    changed = 0
    pages: dict[int, tuple[int, int, int]] = {}
    for d in state.tlog:
        changed += d.count
        n, b, _lsn = pages.get(d.page_id, (0, 0, 0))
        pages[d.page_id] = (n + 1, b + d.count, d.lsn)
    return changed, pages


def _fast_statistics(state: mmsb.MMSBState) -> tuple[int, dict[int, tuple[int, int, int]]]:
    cols = row_columns(state.log)
    return log_statistics(state.log, cols)["bytes_changed"], page_statistics(state.log, cols)


def _slow_graph(state: mmsb.MMSBState, lsn: int) -> Any:
    view = mmsb.replay_to_lsn(state, lsn)
    return ({p: page.epoch for p, page in view.pages.items()}, view.graph.edges())


def _fast_graph(state: mmsb.MMSBState, lsn: int) -> Any:
    g = graph_at_lsn(state, lsn)
    return (g.epochs, g.edges)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    args = ap.parse_args()
    state = build()
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "large.ckpt"
        mmsb.checkpoint_log(state, ck)
        ins = Inspected(ck)
        st = ins.state()
        print(f"log: {len(st.log.records):,} records, {st.log.n:,} deltas, "
              f"{len(st.pages):,} pages")
        mid = st.last_lsn // 2
        print("first answer of each endpoint (fresh inspector, ms):")
        for name, fn in [("pages", lambda: ins.pages()), ("summary", lambda: ins.summary()),
                         ("stats", lambda: ins.stats()),
                         ("timeline (LSN, 2000 bins)", lambda: ins.timeline(bins=2000)),
                         ("timeline (time, 2000 bins)",
                          lambda: ins.timeline(bins=2000, axis="time")),
                         ("graph at LSN/2", lambda: ins.graph(mid)),
                         ("graph at LSN/3", lambda: ins.graph(st.last_lsn // 3)),
                         ("heat across 256 pages", lambda: ins.heat_all(limit=256))]:
            print(f"  {name:28s} {_timed(fn)[0] * 1000:8.1f}")
        ins.close()
        loaded = st
    for what, slow, fast in [
            ("statistics (page table, summary, stats)", lambda: _slow_statistics(loaded),
             lambda: _fast_statistics(loaded)),
            ("graph at a past LSN", lambda: _slow_graph(loaded, mid),
             lambda: _fast_graph(loaded, mid))]:
        ratios, olds, news = [], [], []
        for _ in range(args.rounds):
            t_old, a = _timed(slow)
            t_new, b = _timed(fast)
            assert a == b, what  # same answer both ways
            olds.append(t_old)
            news.append(t_new)
            ratios.append(t_old / t_new)
        print(f"{what}: former {statistics.median(olds) * 1000:.0f} ms, now "
              f"{statistics.median(news) * 1000:.1f} ms, median ratio "
              f"{statistics.median(ratios):.0f}x")


if __name__ == "__main__":
    main()
