"""The ``mmsb demo`` story: a small sensor pipeline on a bus, told step by step."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import mmsb

__all__ = ["run_demo"]


def _celsius(raw: bytes) -> bytes:
    """Derived page: the raw readings (tenths of a degree, int16) as float32 °C."""
    tenths = np.frombuffer(raw, dtype="<i2")
    return (tenths.astype("<f4") / 10.0).tobytes()


def run_demo(path: str | os.PathLike[str] | None = None, console: Console | None = None) -> mmsb.MMSBState:
    """Run the demo; with ``path``, on a durable bus in that directory (left open for
    the caller to inspect, then stopped). Returns the (stopped) state."""
    out = console or Console()
    where = f"a durable bus in {path}" if path else "an in-memory bus"
    out.rule("[bold]MMSB demo")
    out.print(f"Starting {where}.")
    state = mmsb.mmsb_start(enable_gpu=False, path=path)
    try:
        _story(state, out)
    finally:
        mmsb.mmsb_stop(state)
    out.rule("[bold]done")
    return state


def _story(state: mmsb.MMSBState, out: Console) -> None:
    n = 8
    raw = mmsb.create_page(state, 2 * n, metadata={"name": "sensor.raw", "unit": "0.1 degC"})
    temps = mmsb.create_page(state, 4 * n, metadata={"name": "sensor.celsius"})
    alarm = mmsb.create_page(state, 1, metadata={"name": "alarm.config"})
    out.print(f"1. Created pages {raw.id} (raw readings), {temps.id} (°C, derived) and "
              f"{alarm.id} (alarm config).")

    mmsb.add_dependency(state, raw.id, temps.id, mmsb.DATA_DEPENDENCY)
    mmsb.register_passthrough_recompute(state, temps.id, raw.id, _celsius)
    mmsb.add_dependency(state, raw.id, alarm.id, mmsb.CONTROL_DEPENDENCY)
    events: list[str] = []
    mmsb.subscribe(state, mmsb.EventType.PAGE_CHANGED,
                   lambda _s, _et, pid, epoch, _did: events.append(f"page {pid} → epoch {epoch}"))
    mmsb.subscribe(state, mmsb.EventType.PAGE_STALE,
                   lambda _s, _et, pid, parent: events.append(f"page {pid} stale (parent {parent})"))
    out.print(f"2. Wired {raw.id} → {temps.id} (DATA, recomputed as °C) and {raw.id} → "
              f"{alarm.id} (CONTROL, marked stale).")

    readings = [np.array([200 + i for i in range(n)], "<i2"),
                np.array([215, 201, 202, 203, 204, 205, 206, 207], "<i2"),
                np.array([215, 201, 202, 390, 204, 205, 206, 207], "<i2")]
    for k, r in enumerate(readings, 1):
        mmsb.update_page(state, raw.id, r.tobytes())
        c = np.frombuffer(mmsb.query_page(state, temps.id), "<f4")
        out.print(f"3.{k} Wrote readings {r.tolist()} → page {temps.id} now "
                  f"{[round(float(x), 1) for x in c]} °C")
    out.print(f"   Events: {'; '.join(events[:6])}{' …' if len(events) > 6 else ''}")
    out.print(f"   Page {alarm.id} metadata after propagation: {dict(alarm.metadata)}")

    table = Table(title="the transaction log (deltas)")
    for col in ("lsn", "page", "epoch", "source", "bytes", "kind"):
        table.add_column(col)
    for d in state.tlog:
        table.add_row(str(d.lsn), str(d.page_id), f"{d.base_epoch}→{d.epoch}", d.source,
                      str(d.count), "sparse" if d.is_sparse else "dense")
    out.print(table)

    past = mmsb.replay_to_epoch(state, 1)
    first = np.frombuffer(mmsb.query_page(past, raw.id), "<i2").tolist()
    out.print(f"4. Replayed to epoch 1 (a detached state): page {raw.id} was {first}.")
    hist = mmsb.replay_page_history(state, temps.id)
    out.print(f"   Page {temps.id} history: " + ", ".join(
        f"epoch {h.epoch}: {round(float(np.frombuffer(h.data, '<f4')[3]), 1)} °C at slot 3" for h in hist))
    out.print(f"   Live state equals the replay of its log: "
              f"{mmsb.verify_state_consistency(state)}")

    with tempfile.TemporaryDirectory() as tmp:
        ck = os.path.join(tmp, "demo.mmsbckpt")
        size = mmsb.checkpoint_log(state, ck)
        restored = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
        mmsb.load_checkpoint(restored, ck)
        same = all(mmsb.query_page(restored, pid) == mmsb.query_page(state, pid) for pid in state.pages)
        out.print(f"5. Checkpointed to a {size:,}-byte file and restored it: pages identical: "
                  f"{same}, epochs {[restored.pages[p].epoch for p in restored.pages]}.")
        _ = restored

    stats = mmsb.get_stats(state)
    summary: dict[str, Any] = {
        "pages": stats.total_pages, "deltas": stats.total_deltas,
        "bytes changed": stats.total_delta_bytes, "edges": stats.graph_edges,
        "writes": stats.delta_apply_count,
        "median write": f"{stats.delta_apply_p50_ns / 1000:.1f} µs",
        "propagations": stats.propagation_count,
    }
    out.print("6. Stats: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
