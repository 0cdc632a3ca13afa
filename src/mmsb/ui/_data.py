"""What the inspector's endpoints answer, as plain data (dicts and lists ready for
JSON): the log aggregated over LSN bins, pages, byte heat maps, page versions, blame,
the dependency graph now or at an LSN, statistics.

Every answer is bounded: bins, rows, bytes and graph nodes have caps, so a request
never ships a whole log or a whole large page. Nothing here writes to the bus.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

import mmsb

from .._history.graph_at import graph_at_lsn
from .._history.heat import pages_heat
from .._history.stats import (
    RecordColumns,
    RowColumns,
    page_statistics,
    record_columns,
    row_columns,
)
from .._storage.stats_file import read_stats
from ..cli.views import (
    Source,
    blame,
    delta_row,
    format_time,
    history_rows,
    jsonable,
    log_summary,
    open_source,
)
from ..errors import InvalidArgumentError, MMSBError, PageNotFoundError

__all__ = ["Inspected", "error_body", "MAX_BINS", "MAX_ROWS", "MAX_BYTES", "MAX_NODES", "MAX_HEAT",
           "MAX_HEAT_PAGES", "MAX_HEAT_COLS"]

MAX_BINS = 2000
"""Most LSN bins one timeline answer holds."""
MAX_ROWS = 500
"""Most rows (log records, pages, versions) one answer holds."""
MAX_BYTES = 4096
"""Most page bytes one version answer holds."""
MAX_NODES = 2000
"""Most graph nodes one graph answer holds."""
MAX_HEAT = 4096
"""Most heat-map cells of one page (bytes are pooled into cells beyond this)."""
MAX_HEAT_PAGES = 256
"""Most pages one heat map across pages holds …"""
MAX_HEAT_COLS = 256
"""… and most cells per page there."""
_INT_MAX = 2**62
"""Largest integer a query parameter may hold (ids and LSNs fit int64 columns)."""
STRUCTURAL = "structural"
"""The timeline's name for page creations, deletions, edges and other structure."""


def _int_arg(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """An integer query parameter in ``[lo, hi]``, or InvalidArgumentError."""
    try:
        n = int(str(value), 10)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be an integer, not {str(value)[:40]!r}") from None
    if n < lo or n > (_INT_MAX if hi is None else hi):
        span = f"{lo} … {_INT_MAX if hi is None else hi}"
        raise InvalidArgumentError(f"{name} must be in {span}, not {n}")
    return n


class Inspected:
    """The bus directory or checkpoint file the inspector shows, opened read-only and
    reopened when a live writer has published past what is open (checked through the
    bus's published LSN, one memory read, not the files)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()
        self.src: Source = open_source(self.path)
        self.reader: Any = mmsb.attach(self.path) if self.src.kind == "bus" else None
        self._memo: dict[tuple[Any, ...], Any] = {}
        """Answers that cost O(log) to build (page table, stats, past graphs), kept
        until the writer moves on."""

    @property
    def is_bus(self) -> bool:
        return self.src.kind == "bus"

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def state(self) -> mmsb.MMSBState:
        """The open state, reopened first when the writer has published newer records."""
        with self.lock:
            if self.reader is not None and self.reader.last_lsn != self.src.state.last_lsn:
                try:
                    self.src = open_source(self.path)
                except (MMSBError, OSError):
                    # The writer may have rolled a file between the listing and the read.
                    self.src = open_source(self.path)
                self._memo.clear()
            return self.src.state

    def _memoized(self, key: tuple[Any, ...], build: Any) -> Any:
        with self.lock:
            if key in self._memo:
                return self._memo[key]
        value = build()
        with self.lock:
            if len(self._memo) > 32:
                self._memo.clear()
            self._memo[key] = value
        return value

    # -- summary and timeline -------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        state = self.state()
        return {"path": str(self.path), "kind": self.src.kind, "notes": list(self.src.notes),
                "pages": len(state.pages), "last_lsn": state.last_lsn,
                "live": self.is_bus,
                "log": self._memoized(("summary", state.last_lsn), lambda: log_summary(state))}

    def _columns(self, state: mmsb.MMSBState) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray, list[str]]:
        """LSN, page, timestamp and source index of every retained delta (numpy), and
        the source names the index refers to (structural records last)."""
        c = self._rows(state)
        return c.lsn, c.page, c.ts, c.src, list(c.sources)

    def _rows(self, state: mmsb.MMSBState) -> RowColumns:
        """The log's delta rows as columns, built once per LSN (one vectorised pass)."""
        def build() -> RowColumns:
            with state.lock:
                return row_columns(state.log)
        cols: RowColumns = self._memoized(("rows", state.last_lsn), build)
        return cols

    def _records(self, state: mmsb.MMSBState) -> RecordColumns:
        """Every retained record (deltas and structural ones) as columns, built once per
        LSN."""
        cols = self._rows(state)

        def build() -> RecordColumns:
            with state.lock:
                return record_columns(state.log, cols, STRUCTURAL)
        recs: RecordColumns = self._memoized(("records", state.last_lsn), build)
        return recs

    def timeline(self, *, lo: Any = None, hi: Any = None, bins: Any = 200, page: Any = None,
                 source: Any = None, axis: Any = "lsn") -> dict[str, Any]:
        """Records per bin and source over ``[lo, hi]``, counted server-side with numpy
        (O(retained records)); structural records form their own series. With
        ``axis="lsn"`` bins are LSN ranges; with ``axis="time"`` they are ranges of
        wall-clock time and ``lo`` / ``hi`` / ``edges`` are microseconds since the Unix
        epoch (exact as JSON numbers). Each bin also gets the time of its first record
        and the LSN range its records span."""
        if axis in (None, ""):
            axis = "lsn"
        if axis not in ("lsn", "time"):
            raise InvalidArgumentError(f"axis must be 'lsn' or 'time', not {str(axis)[:40]!r}")
        state = self.state()
        last = state.last_lsn
        first = max(1, state.log.horizon_lsn)
        nb = _int_arg("bins", bins, 1, MAX_BINS)
        recs = self._records(state)
        x_all = recs.lsn if axis == "lsn" else recs.ts // 1000
        if axis == "lsn":
            lo_d, hi_d = first, last
        else:
            lo_d = int(x_all[0]) if x_all.size else 0
            hi_d = int(x_all[-1]) if x_all.size else 0
        lo_n = lo_d if lo in (None, "") else _int_arg("lo", lo, 0)
        hi_n = hi_d if hi in (None, "") else _int_arg("hi", hi, 0)
        if hi_n < lo_n:
            raise InvalidArgumentError(f"hi ({hi_n}) must be >= lo ({lo_n})")
        keep = (x_all >= lo_n) & (x_all <= hi_n)
        if page not in (None, ""):
            keep &= recs.page == _int_arg("page", page, 1)
        names = recs.sources
        if source not in (None, ""):
            keep &= recs.src == (names.index(source) if source in names else -1)
        span = hi_n - lo_n + 1
        nb = min(nb, span)
        edges = lo_n + (np.arange(nb + 1, dtype=np.int64) * span) // nb
        xs, ss, ls, ts = x_all[keep], recs.src[keep], recs.lsn[keep], recs.ts[keep]
        if axis == "time" and xs.size > 1 and (np.diff(xs) < 0).any():
            order = np.argsort(xs, kind="stable")  # a log keeps times in order; be sure
            xs, ss, ls, ts = xs[order], ss[order], ls[order], ts[order]
        k = len(names)
        b = np.searchsorted(edges, xs, "right") - 1
        grid = np.bincount(b * k + ss, minlength=nb * k).reshape(nb, k)
        series = {names[j]: grid[:, j].tolist() for j in range(k) if grid[:, j].any()}
        at = np.searchsorted(xs, edges[:-1], "left")
        end = np.searchsorted(xs, edges[1:], "left") - 1
        times: list[str | None] = [None] * nb
        ranges: list[list[int] | None] = [None] * nb
        for j in np.flatnonzero(at <= end).tolist():
            times[j] = format_time(int(ts[at[j]]))
            ranges[j] = [int(ls[at[j]]), int(ls[end[j]])]
        return {"axis": axis, "lo": lo_n, "hi": hi_n, "first": lo_d, "last": hi_d,
                "first_lsn": first, "last_lsn": last, "edges": edges.tolist(),
                "series": series, "times": times, "ranges": ranges, "sources": names}

    def log_rows(self, *, lo: Any = None, hi: Any = None, page: Any = None,
                 source: Any = None, limit: Any = 100) -> dict[str, Any]:
        """The deltas with LSN in ``[lo, hi]`` (filtered), oldest first, at most
        ``limit`` (≤ MAX_ROWS); the filter runs on numpy columns, only shown rows are
        built."""
        state = self.state()
        lsns, pages, _ts, src, names = self._columns(state)
        lo_n = 0 if lo in (None, "") else _int_arg("lo", lo, 0)
        hi_n = state.last_lsn if hi in (None, "") else _int_arg("hi", hi, 0)
        lim = _int_arg("limit", limit, 1, MAX_ROWS)
        keep = (lsns >= lo_n) & (lsns <= hi_n)
        if page not in (None, ""):
            keep &= pages == _int_arg("page", page, 1)
        if source not in (None, ""):
            keep &= src == (names.index(source) if source in names else -1)
        picked = np.flatnonzero(keep)
        total = int(picked.size)
        rows = []
        for r in picked[:lim].tolist():
            rows.append(delta_row(state.log.delta_at(r)))
        return {"total": total, "truncated": total > lim, "rows": rows}

    # -- pages ----------------------------------------------------------------------
    def _page(self, state: mmsb.MMSBState, page_id: Any) -> int:
        pid = _int_arg("page id", page_id, 1)
        if pid not in state.pages:
            raise PageNotFoundError(pid, f"{self.path} ({len(state.pages)} live pages)")
        return pid

    def pages(self, *, offset: Any = 0, limit: Any = 200) -> dict[str, Any]:
        state = self.state()
        off = _int_arg("offset", offset, 0)
        lim = _int_arg("limit", limit, 1, MAX_ROWS)
        rows = self._memoized(("pages", state.last_lsn), lambda: self._page_rows(state))
        return {"total": len(rows), "offset": off, "rows": rows[off : off + lim]}

    def _page_rows(self, state: mmsb.MMSBState) -> list[dict[str, Any]]:
        """One row per live page: id, size, epoch, location, metadata, and from the log's
        columns its retained deltas, the bytes they wrote and the newest one's LSN."""
        cols = self._rows(state)
        with state.lock:
            per_page = page_statistics(state.log, cols)
        rows = []
        for pid, page in state.pages.items():
            deltas, nbytes, last = per_page.get(pid, (0, 0, None))
            rows.append({"id": pid, "size": page.size, "epoch": page.epoch,
                         "location": str(page.location), "deltas": deltas,
                         "bytes_written": nbytes, "last_lsn": last,
                         "metadata": jsonable(dict(page.metadata))})
        return rows

    def heat(self, page_id: Any, mode: str = "count") -> dict[str, Any]:
        """Per byte of the page, how often it was written (``count``) or the LSN that
        wrote it last (``recency``), pooled (max) into at most MAX_HEAT cells. One
        compiled pass over the page's retained payloads (a cell per byte)."""
        if mode not in ("count", "recency"):
            raise InvalidArgumentError(f"mode must be 'count' or 'recency', not {mode[:40]!r}")
        state = self.state()
        pid = self._page(state, page_id)
        size = state.pages[pid].size
        rows = self._rows(state)
        with state.lock:
            h = pages_heat(state.log, np.array([pid]), np.array([size]), size, rows.lsn)
        out = h.counts if mode == "count" else h.last
        cell = max(1, -(-size // MAX_HEAT))
        ncell = -(-size // cell)
        padded = np.zeros(ncell * cell, np.int64)
        padded[:size] = out
        cells = padded.reshape(ncell, cell).max(axis=1)
        return {"page": pid, "size": size, "mode": mode, "cell_bytes": cell,
                "cells": cells.tolist(), "max": int(cells.max()) if ncell else 0}

    def heat_all(self, *, mode: Any = "count", offset: Any = 0, limit: Any = 100,
                 cols: Any = 64) -> dict[str, Any]:
        """The heat of many pages at once: live pages ``offset …`` (at most ``limit`` ≤
        MAX_HEAT_PAGES, by id), each cut into ``min(cols, size)`` cells (``cols`` ≤
        MAX_HEAT_COLS) of its bytes; per cell the retained deltas that wrote any of its
        bytes (``count``) or the newest LSN that did (``recency``). One compiled pass
        over those pages' payloads."""
        if mode not in ("count", "recency"):
            raise InvalidArgumentError(f"mode must be 'count' or 'recency', not {str(mode)[:40]!r}")
        off = _int_arg("offset", offset, 0)
        lim = _int_arg("limit", limit, 1, MAX_HEAT_PAGES)
        ncol = _int_arg("cols", cols, 1, MAX_HEAT_COLS)
        state = self.state()
        rows = self._rows(state)
        with state.lock:
            live = state.table.live_ids()
            ids = live[off : off + lim]
            h = pages_heat(state.log, ids, state.table.size[ids], ncol, rows.lsn)
        values = h.counts if mode == "count" else h.last
        out = [{"page": pid, "size": size, "cells": values[b : b + n].tolist()}
               for pid, size, b, n in zip(h.ids.tolist(), h.sizes.tolist(), h.bases.tolist(),
                                          h.ncells.tolist(), strict=True)]
        return {"mode": mode, "offset": off, "total": int(live.size), "cols": ncol,
                "max": int(values.max()) if values.size else 0, "rows": out}

    def history(self, page_id: Any) -> dict[str, Any]:
        """The page's retained versions (newest MAX_ROWS), with LSN, time, source and
        changed ranges."""
        state = self.state()
        pid = self._page(state, page_id)
        rows = history_rows(state, pid)
        return {"page": pid, "total": len(rows), "rows": jsonable(rows[-MAX_ROWS:])}

    def version(self, page_id: Any, *, lsn: Any = None, offset: Any = 0,
                length: Any = 512) -> dict[str, Any]:
        """The page's bytes right after ``lsn`` (now by default) in ``[offset,
        offset + length)``, and which of them that LSN's delta changed (against the
        page's previous version)."""
        state = self.state()
        pid = self._page(state, page_id)
        at = state.last_lsn if lsn in (None, "") else _int_arg("lsn", lsn, 1, state.last_lsn)
        off = _int_arg("offset", offset, 0)
        n = _int_arg("length", length, 1, MAX_BYTES)
        data = np.frombuffer(mmsb.read_page_at(state, pid, lsn=at), np.uint8)
        lsns = [d.lsn for d in mmsb.get_deltas_for_page(state, pid)]
        upto = [x for x in lsns if x <= at]
        prev = upto[-2] if len(upto) >= 2 else None
        this = upto[-1] if upto else None
        changed = np.zeros(data.size, bool)
        if this is not None:
            if prev is None:
                changed = data != 0
            else:
                before = np.frombuffer(mmsb.read_page_at(state, pid, lsn=prev), np.uint8)
                m = min(before.size, data.size)
                changed[:m] = data[:m] != before[:m]
                changed[m:] = True
        window = data[off : off + n]
        marks = np.flatnonzero(changed[off : off + n])
        return {"page": pid, "lsn": at, "version_lsn": this, "previous_lsn": prev,
                "size": int(data.size), "offset": off, "hex": window.tobytes().hex(),
                "changed": marks.tolist(), "versions": lsns[-MAX_ROWS:]}

    def blame(self, page_id: Any) -> dict[str, Any]:
        state = self.state()
        pid = self._page(state, page_id)
        out = blame(state, pid)
        out["truncated"] = len(out["ranges"]) > MAX_ROWS
        out["ranges"] = jsonable(out["ranges"][:MAX_ROWS])
        return out

    # -- graph and stats ------------------------------------------------------------
    def graph(self, lsn: Any = None) -> dict[str, Any]:
        """Pages with their edges, types and stale / invalidated flags, now or right
        after ``lsn`` (the graph rebuilt from the log's structural records, kept per
        LSN)."""
        state = self.state()
        at = state.last_lsn if lsn in (None, "") else _int_arg(
            "lsn", lsn, max(0, state.log.horizon_lsn), state.last_lsn)
        return dict(self._memoized(("graph", state.last_lsn, at),
                                   lambda: self._graph(state, at)))

    def _graph(self, state: mmsb.MMSBState, at: int) -> dict[str, Any]:
        if at == state.last_lsn:
            epochs = {pid: page.epoch for pid, page in state.pages.items()}
            meta = {pid: dict(page.metadata) for pid, page in state.pages.items()}
            all_edges = state.graph.edges()
        else:
            # Only the graph is rebuilt (structural records and per-page epochs), no
            # page bytes.
            with state.lock:
                past = graph_at_lsn(state, at)
            epochs, meta, all_edges = past.epochs, past.metadata, past.edges
        ends: set[int] = {p for p, _c, _t in all_edges} | {c for _p, c, _t in all_edges}
        edges: list[dict[str, Any]] = [
            {"parent": p, "child": c, "type": mmsb.EdgeType(t).name} for p, c, t in all_edges]
        ids = sorted(ends | set(list(epochs)[:MAX_NODES]))
        nodes = []
        for pid in ids[:MAX_NODES]:
            m = meta.get(pid, {})
            nodes.append({"id": pid, "epoch": epochs.get(pid),
                          "name": str(m.get("name", "")),
                          "stale": bool(m.get("stale", False)),
                          "invalidated": m.get("ir_valid", True) is False,
                          "live": pid in epochs})
        shown = {n["id"] for n in nodes}
        edges = [e for e in edges if e["parent"] in shown and e["child"] in shown]
        return {"lsn": at, "last_lsn": state.last_lsn, "nodes": nodes, "edges": edges,
                "truncated": len(ids) > MAX_NODES}

    def stats(self) -> dict[str, Any]:
        state = self.state()
        s = self._memoized(("stats", state.last_lsn),
                           lambda: dataclasses.asdict(mmsb.get_stats(state)))
        hist = {}
        for kind in ("delta_apply", "propagation", "log_append", "checkpoint"):
            hist[kind] = {"count": s.get(f"{kind}_count", 0),
                          **{q: s.get(f"{kind}_{q}_ns", 0) for q in ("p50", "p90", "p99", "max")}}
        # Payload bytes per retained delta, in power-of-two bins: measured from the log
        # itself, so it describes the writer's work, unlike the latency counters above.
        plen = state.log.rows["plen"][: state.log.n].astype(np.int64)
        top = int(plen.max()).bit_length() if plen.size else 0
        counts = np.bincount(np.where(plen > 0, np.log2(np.maximum(plen, 1)).astype(np.int64) + 1,
                                      0), minlength=top + 1)
        sizes = {"labels": ["0", *(f"{1 << (k - 1)}–{(1 << k) - 1}" for k in range(1, counts.size))],
                 "counts": counts.tolist()}
        return {"stats": s, "latency": hist, "delta_payload_bytes": sizes,
                **self._writer_latency()}

    def _writer_latency(self) -> dict[str, Any]:
        """The latency counters the bus's writer published in DIR/map/stats, with each
        kind's power-of-two histogram cut to its non-empty bins; ``writer`` is None (and
        ``writer_note`` says why) when there are none to show."""
        if not self.is_bus:
            return {"writer": None, "writer_note": "a checkpoint file holds no writer counters"}
        try:
            pub = read_stats(self.path)
        except (MMSBError, OSError) as exc:
            return {"writer": None, "writer_note": " ".join(str(exc).split())}
        if pub is None:
            return {"writer": None, "writer_note": "the writer has not published its counters "
                                                   "yet (it does at checkpoints and about once "
                                                   "a second)"}
        kinds = {}
        for name, k in pub["kinds"].items():
            bins = k.pop("bins")
            used = [j for j, v in enumerate(bins) if v]
            lo, hi = (used[0], used[-1]) if used else (0, -1)
            k["hist"] = {"labels": [_ns_bin(j) for j in range(lo, hi + 1)],
                         "counts": bins[lo : hi + 1]}
            kinds[name] = k
        return {"writer": {"written_ns": pub["written_ns"], "time": format_time(pub["written_ns"]),
                           "last_lsn": pub["last_lsn"], "pid": pub["pid"], "kinds": kinds},
                "writer_note": None}


def _ns_bin(j: int) -> str:
    """Label of power-of-two bin ``j`` of the published histograms (its lower bound)."""
    if j == 0:
        return "0"
    ns = 1 << (j - 1)
    for unit, div in (("s", 10**9), ("ms", 10**6), ("µs", 10**3)):
        if ns >= div:
            return f"≥{ns / div:.3g} {unit}"
    return f"≥{ns} ns"


def error_body(exc: MMSBError) -> dict[str, Any]:
    """The typed JSON error every endpoint answers a refused request with."""
    return {"error": {"type": type(exc).__name__, "message": " ".join(str(exc).split())}}
