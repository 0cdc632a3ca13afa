"""What the ``mmsb`` command shows, as plain data (dicts and lists that ``--json``
prints as they are and the tables render): opening a bus or a checkpoint without
writing, times, the log, a page's history, blame, the bus's files, verification.

Nothing here prints; :mod:`mmsb.cli` does.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import mmsb

from .._core.records import PageClone
from .._history.replay import replay_records_to_lsn, state_differences
from .._history.timetravel import CLONE, RESIZE, history_index
from .._instrument.provenance import provenance_index
from .._storage.bus import _CKPT_RE as _CKPT_NAME
from .._storage.bus import _WAL_RE as _WAL_NAME
from .._storage.bus import bus_files
from ..errors import MMSBError, SerializationError

__all__ = [
    "UserError", "Source", "open_source", "parse_time", "format_time", "parse_range",
    "page_rows", "edge_rows", "log_summary", "delta_row", "history_rows", "blame",
    "bus_files_info", "count_bus_files", "checkpoint_file_info", "verify", "jsonable",
    "require_page_history",
]

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_FRACTION = re.compile(r"(\d{2}:\d{2}(?::\d{2})?)[.,](\d+)")
_BUS_HEAD = struct.Struct("<8sHHQQ")
PREVIEW_BYTES = 16


class UserError(MMSBError):
    """A request the command cannot serve, said in one line (exit status 2)."""


# -- opening --------------------------------------------------------------------------

@dataclass
class Source:
    """What PATH named: a durable bus directory (recovered read-only) or a checkpoint
    file (loaded into a fresh state)."""

    path: Path
    kind: str
    """"bus" or "checkpoint"."""
    state: mmsb.MMSBState
    notes: list[str] = field(default_factory=list)
    replayable: bool = True
    """False when the log cannot rebuild the state alone (one checkpoint of a bus)."""

    def require_replayable(self, what: str) -> None:
        if not self.replayable:
            raise UserError(f"cannot {what} {self.path} alone: {self.notes[0]}")


def open_source(path: str | os.PathLike[str]) -> Source:
    """Open PATH without writing anything: a bus directory with
    :func:`mmsb.open_readonly` (safe beside a live writer), a file with
    :func:`mmsb.load_checkpoint` into a fresh state.

    Raises:
        UserError: PATH is missing, or a directory that is not a bus.
        SerializationError: the files are damaged.
    """
    p = Path(path)
    if p.is_dir():
        if os.path.lexists(p / "BUS") and not (p / "BUS").is_file():
            raise UserError(f"{p}/BUS is not a regular file (a FIFO, a device, a folder or a "
                            "link stands where a bus keeps its identity); a bus directory "
                            "holds its own files only")
        if not (p / "BUS").is_file():
            raise UserError(f"{p} is a directory but not an MMSB bus (it has no BUS file); "
                            "give a bus directory (mmsb demo --path DIR makes one) or a "
                            "checkpoint file")
        state = mmsb.open_readonly(p)
        return Source(p, "bus", state, list(state.recovery_notes))
    if not p.exists():
        raise UserError(f"{p} does not exist; give a bus directory or a checkpoint file")
    if not p.is_file():
        raise UserError(f"{p} is neither a directory nor a regular file")
    state = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    # Read as written: gpu and unified pages keep their locations (no device is used).
    mmsb.load_checkpoint(state, p, keep_device_locations=True)
    notes = []
    horizon = state.log.horizon_lsn
    if not _log_is_anchored(state):
        notes.append("its log does not start from an empty state or from a replay base "
                     "(the file is one checkpoint of a bus, whose earlier history is in "
                     "the bus's other files); open the bus directory to replay or verify")
        return Source(p, "checkpoint", state, notes, replayable=False)
    if horizon:
        notes.append(f"history before LSN {horizon} is not in this file (compressed or "
                     "trimmed)")
    return Source(p, "checkpoint", state, notes)


def _log_is_anchored(state: mmsb.MMSBState) -> bool:
    """True when replaying the retained log rebuilds the state: it starts from the
    replay base, or from nothing at LSN 1, or is a compressed log (whose records before
    its Compacted marker rebuild everything)."""
    log = state.log
    if state.replay_base is not None:
        return True
    if not log.records:
        return log.last_lsn == 0 or not len(state.pages)
    first = log.records[0].lsn
    return first == 1 or (log.horizon_lsn > 0 and first <= log.horizon_lsn)


# -- times ----------------------------------------------------------------------------

def parse_time(text: str) -> int:
    """Nanoseconds since the Unix epoch from an integer (ns) or ISO 8601 text
    (``2025-01-31``, ``2025-01-31T12:00:00.123456789Z``, ``…+02:00``). Text without a
    zone is UTC, as the command prints times. Up to 9 fraction digits are kept.

    Raises:
        ValueError: neither form, or before 1970.
    """
    t = text.strip()
    if re.fullmatch(r"[+-]?\d+", t):
        ns = int(t)
    else:
        frac_ns = 0
        m = _FRACTION.search(t)
        if m:
            digits = m.group(2)
            if len(digits) > 9:
                raise ValueError(f"{text!r} has more than 9 fraction digits")
            frac_ns = int(digits.ljust(9, "0"))
            t = t[: m.start()] + m.group(1) + t[m.end():]
        try:
            when = _dt.datetime.fromisoformat(t)
        except ValueError:
            raise ValueError(f"{text!r} is neither ISO 8601 (2025-01-31T12:00:00Z) nor an "
                             "integer of nanoseconds") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.UTC)
        span = when - _EPOCH
        ns = (span.days * 86_400 + span.seconds) * 1_000_000_000 + span.microseconds * 1000 + frac_ns
    if ns < 0:
        raise ValueError(f"{text!r} is before 1970")
    return ns


def format_time(ns: int) -> str | None:
    """``2025-01-31T12:00:00.123456789Z`` (UTC, nanoseconds); None for 0 (never logged)."""
    if not ns:
        return None
    secs, rest = divmod(int(ns), 1_000_000_000)
    when = _EPOCH + _dt.timedelta(seconds=secs)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{rest:09d}Z"


def parse_range(text: str) -> tuple[int | None, int | None]:
    """``A:B``, ``A:`` or ``:B`` (half-open byte offsets, like a slice).

    Raises:
        ValueError: any other shape.
    """
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a byte range A:B (half-open, like 0:16, 8: or :32)")
    a, b = m.group(1), m.group(2)
    return (int(a) if a else None, int(b) if b else None)


# -- pages and log --------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """Metadata as JSON can hold it: bytes become ``{"hex": ...}``."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"hex": bytes(value).hex()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def page_rows(state: mmsb.MMSBState) -> list[dict[str, Any]]:
    """One row per live page: id, size, epoch, location, retained deltas, metadata."""
    per_page = mmsb.compute_log_statistics(state)["pages"]
    rows = []
    for pid, page in state.pages.items():
        rows.append({
            "id": pid, "size": page.size, "epoch": page.epoch, "location": str(page.location),
            "deltas": int(per_page.get(pid, 0)), "metadata": jsonable(dict(page.metadata)),
        })
    return rows


def edge_rows(state: mmsb.MMSBState) -> list[dict[str, Any]]:
    return [{"parent": p, "child": c, "type": mmsb.EdgeType(et).name}
            for p, c, et in state.graph.edges()]


def log_summary(state: mmsb.MMSBState) -> dict[str, Any]:
    """Records, deltas, bytes, LSN range, horizon, times and sources of the retained log."""
    st = mmsb.compute_log_statistics(state)
    log = state.log
    first_ts = log.records[0].timestamp if log.records else 0
    return {
        "records": st["records"], "deltas": st["total_deltas"],
        "sparse_deltas": st["sparse_deltas"], "bytes_changed": st["bytes_changed"],
        "payload_bytes": st["payload_bytes"], "first_lsn": st["first_lsn"],
        "last_lsn": st["last_lsn"], "horizon_lsn": log.horizon_lsn,
        "first_time": format_time(first_ts), "last_time": format_time(log.last_timestamp),
        "sources": st["sources"], "replay_base": state.replay_base is not None,
    }


def delta_row(d: mmsb.Delta) -> dict[str, Any]:
    return {
        "lsn": d.lsn, "timestamp_ns": d.timestamp, "time": format_time(d.timestamp),
        "page": d.page_id, "delta_id": d.id, "base_epoch": d.base_epoch, "epoch": d.epoch,
        "source": d.source, "bytes": d.count, "kind": "sparse" if d.is_sparse else "dense",
    }


def require_page_history(state: mmsb.MMSBState, page_id: int, path: Path) -> None:
    """A page the command can talk about: live, or with deltas in the retained log."""
    if page_id in state.pages or mmsb.get_deltas_for_page(state, page_id):
        return
    ids = list(state.pages)
    have = f"its pages are {_id_span(ids)}" if ids else "it has no pages"
    raise UserError(f"page {page_id} does not exist in {path} and has no history there; {have}")


def _id_span(ids: list[int]) -> str:
    if len(ids) <= 8:
        return ", ".join(map(str, ids))
    return f"{ids[0]} … {ids[-1]} ({len(ids)} pages)"


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops (half-open) of the runs of consecutive sorted positions."""
    if idx.size == 0:
        return idx, idx
    brk = np.flatnonzero(np.diff(idx.astype(np.int64)) != 1) + 1
    starts = idx[np.concatenate(([0], brk))].astype(np.int64)
    stops = idx[np.concatenate((brk - 1, [idx.size - 1]))].astype(np.int64) + 1
    return starts, stops


def history_rows(state: mmsb.MMSBState, page_id: int) -> list[dict[str, Any]]:
    """One row per retained delta of the page, oldest first: epochs, LSN, time, source,
    bytes changed, the changed ranges and a hex preview of their new values."""
    rows = []
    index = provenance_index(state)
    for d in mmsb.get_deltas_for_page(state, page_id):
        idx = d.indices
        starts, stops = _runs(idx)
        vals = d.values[:PREVIEW_BYTES]
        row = delta_row(d)
        row["ranges"] = [[int(a), int(b)] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
        row["preview_hex"] = vals.tobytes().hex()
        row["preview"] = _preview(starts, stops, vals)
        row["code"] = index.of(d)
        rows.append(row)
    return rows


def _preview(starts: np.ndarray, stops: np.ndarray, vals: np.ndarray) -> str:
    """``@0: d7 00 c9 | @6: 86 01`` for the first PREVIEW_BYTES changed bytes."""
    parts = []
    left = int(vals.size)
    pos = 0
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        if left == 0:
            break
        n = min(b - a, left)
        parts.append(f"@{a}: " + vals[pos : pos + n].tobytes().hex(" "))
        pos += n
        left -= n
    text = " | ".join(parts)
    shown = int(vals.size)
    total = int(stops.sum() - starts.sum()) if starts.size else 0
    return text + (" …" if total > shown else "")


# -- blame ----------------------------------------------------------------------------

BEFORE_HISTORY = -1
NEVER_WRITTEN = -2
_RESET = -3


def blame(state: mmsb.MMSBState, page_id: int, lo: int | None = None,
          hi: int | None = None) -> dict[str, Any]:
    """For each maximal byte range of the page's current content in ``[lo, hi)``, the
    retained delta that last wrote it (LSN, epoch, time, source), or why none did:
    written before the retained history (or copied by a clone), or never written.

    One numpy assignment per delta (O(total changed bytes)), then the runs of equal
    owners by one vectorised compare.

    Raises:
        UserError: the page is not live, or the range is outside it.
    """
    if page_id not in state.pages:
        raise UserError(f"page {page_id} is not a live page; blame describes current bytes "
                        "(use 'mmsb history' for a deleted page's deltas)")
    page = state.pages[page_id]
    size = page.size
    start = 0 if lo is None else lo
    stop = size if hi is None else hi
    if not 0 <= start < stop <= size:
        raise UserError(f"byte range {start}:{stop} is not inside page {page_id} "
                        f"(0:{size}, half-open)")
    deltas = mmsb.get_deltas_for_page(state, page_id)
    # Resizes drop (shrink) or zero-fill (grow) bytes; a clone starts the page from
    # another page's bytes. Both are structural records of this page in the log.
    # The page's own events come from the history index: O(its events), not O(log).
    events: list[tuple[int, int, Any]] = [(d.lsn, 1, k) for k, d in enumerate(deltas)]
    clone: PageClone | None = None
    with state.lock:
        line = history_index(state).line(page_id)
    if line is not None:
        for kind, rec in line.structural():
            if kind == RESIZE:
                events.append((rec.lsn, 0, rec.new_size))
            elif kind == CLONE:
                clone = rec
    events.sort(key=lambda e: e[0])
    width = max([size, *(d.page_size for d in deltas),
                 *(e[2] for e in events if e[1] == 0)])
    owner = np.full(width, BEFORE_HISTORY, np.int64)
    for _lsn, kind, value in events:
        if kind == 0:
            owner[value:] = _RESET
            continue
        d = deltas[value]
        if d.is_sparse:
            owner[d.indices] = value
        else:
            m = d.mask
            owner[: m.size][m] = value
    owner = owner[:size]
    written = page.mask
    owner[(owner == BEFORE_HISTORY) & ~written] = NEVER_WRITTEN
    owner[owner == _RESET] = NEVER_WRITTEN
    cut = owner[start:stop]
    brk = np.flatnonzero(cut[1:] != cut[:-1]) + 1
    starts = (np.concatenate(([0], brk)) + start).tolist()
    stops = (np.concatenate((brk, [cut.size])) + start).tolist()
    data = state.pages[page_id].data
    horizon = state.log.horizon_lsn
    ranges = []
    index = provenance_index(state)
    for a, b in zip(starts, stops, strict=True):
        code = int(owner[a])
        row: dict[str, Any] = {"start": a, "stop": b, "length": b - a,
                               "preview_hex": data[a : min(b, a + 8)].tobytes().hex()}
        if code >= 0:
            d = deltas[code]
            row.update(status="delta", lsn=d.lsn, delta_id=d.id, epoch=d.epoch,
                       base_epoch=d.base_epoch, timestamp_ns=d.timestamp,
                       time=format_time(d.timestamp), source=d.source, code=index.of(d))
        elif code == BEFORE_HISTORY:
            if clone is not None:
                row.update(status="cloned", lsn=clone.lsn, source_page=clone.source_id,
                           timestamp_ns=clone.timestamp, time=format_time(clone.timestamp))
            else:
                row.update(status="before_history", horizon_lsn=horizon)
        else:
            row.update(status="never_written")
        ranges.append(row)
    return {"page": page_id, "size": size, "epoch": page.epoch, "start": start, "stop": stop,
            "ranges": ranges}


# -- bus files ------------------------------------------------------------------------

def count_bus_files(root: Path) -> int:
    files = bus_files(root)
    return len(files["checkpoints"]) + len(files["wal"])


def checkpoint_file_info(path: Path) -> dict[str, Any]:
    """What a checkpoint file holds (it is read and checked in full)."""
    from .._storage.checkpoint import read_checkpoint

    info: dict[str, Any] = {"file": str(path), "name": path.name}
    m = _CKPT_NAME.match(path.name)
    if m:
        info["generation"] = int(m.group(1), 16)
    try:
        info["bytes"] = path.stat().st_size
        ck = read_checkpoint(path)
    except FileNotFoundError:
        info["status"] = "removed while reading (the writer dropped it)"
        return info
    except SerializationError as exc:
        if not os.path.lexists(path):
            # Dropped by the writer while it was read: the page-store slots it named may
            # have been reused already (they are freed once the file is removed), so
            # what did not check out is not damage.
            info["status"] = "removed while reading (the writer dropped it)"
            return info
        info["status"] = "damaged"
        info["error"] = str(exc)
        return info
    info.update(status="ok", lsn=ck.lsn, log_from_lsn=ck.log_from_lsn, horizon_lsn=ck.horizon_lsn,
                pages=int(ck.ids.size), records=len(ck.records),
                written=format_time(int(ck.info.get("written_ns", 0) or 0)),
                has_base=bool(ck.base))
    if ck.bus is not None:
        info["bus_id"] = ck.bus.get("bus_id")
    return info


def bus_files_info(root: Path, step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The bus identity, every checkpoint file and every log segment of a bus
    directory, read (not changed): generation, LSNs, sizes, what recovery does with
    each segment, and damage found. ``step(name)`` is called before each file (for a
    progress bar); ``count_bus_files`` says how many there are."""
    from .._storage.bus import _identity
    from .._storage.wal import scan_segment

    bus_id = _identity(root, True)
    raw = (root / "BUS").read_bytes()
    created = _BUS_HEAD.unpack_from(raw, 0)[4]
    files = bus_files(root)
    ckpts = []
    for p in files["checkpoints"]:
        if step is not None:
            step(p.name)
        ckpts.append(checkpoint_file_info(p))
    good = [c for c in ckpts if c.get("status") == "ok" and "generation" in c]
    gen = max((c["generation"] for c in good), default=0)
    next_lsn = next((c["lsn"] for c in good if c["generation"] == gen), 0) + 1
    wal = []
    for p in files["wal"]:
        m = _WAL_NAME.match(p.name)
        assert m is not None  # bus_files lists only matching names
        g, seq = int(m.group(1), 16), int(m.group(2), 16)
        if step is not None:
            step(p.name)
        row: dict[str, Any] = {"file": str(p), "name": p.name, "generation": g, "seq": seq}
        try:
            row["bytes"] = p.stat().st_size
        except FileNotFoundError:
            row["status"] = "removed while reading"
            wal.append(row)
            continue
        if g < gen:
            row["status"] = "superseded (a newer checkpoint covers it)"
        elif g > gen:
            row["status"] = "not replayed (no checkpoint of its generation)"
        else:
            scan = scan_segment(p, bus_id, g, seq, next_lsn)
            row["records"] = len(scan.records)
            if scan.records:
                row["first_lsn"] = scan.records[0].lsn
                row["last_lsn"] = scan.records[-1].lsn
                next_lsn = scan.records[-1].lsn + 1
            if scan.foreign is not None:
                row["status"] = "foreign"
                row["error"] = scan.foreign
            elif scan.damage is not None:
                row["status"] = "damaged"
                row["error"] = str(scan.damage)
            elif scan.torn:
                row["status"] = f"torn tail at byte {scan.valid_end} (being written, or cut)"
            else:
                row["status"] = "ok"
            if scan.zeros:
                # The file is written ahead of its frames (a syncing writer's segment).
                row["frames_end"] = scan.valid_end
        wal.append(row)
    return {"bus_id": f"{bus_id:016x}", "created": format_time(created), "generation": gen,
            "checkpoints": ckpts, "wal": wal}


# -- verify ---------------------------------------------------------------------------

def verify(src: Source, step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Live state against the replay of its log (:func:`mmsb.verify_state_consistency`,
    with the differences listed), plus, for a bus, every file checked."""
    src.require_replayable("verify")
    state = src.state
    consistent = mmsb.verify_state_consistency(state)
    differences: list[str] = []
    if not consistent:
        replayed = replay_records_to_lsn(state, state.last_lsn)
        differences = state_differences(state, replayed, limit=50)
        if not differences:
            differences = ["the replay differs (no detail available)"]
    problems: list[str] = []
    warnings = list(src.notes)
    if src.kind == "bus":
        info = bus_files_info(src.path, step)
        for c in info["checkpoints"]:
            if c.get("status") == "damaged":
                problems.append(f"{c['name']}: {c['error']}")
        for w in info["wal"]:
            status = w.get("status", "")
            if status in ("damaged", "foreign"):
                problems.append(f"{w['name']}: {w['error']}")
            elif status.startswith("torn"):
                warnings.append(f"{w['name']}: {status}")
    ok = consistent and not problems
    return {
        "ok": ok, "consistent": consistent, "differences": differences, "problems": problems,
        "warnings": sorted(set(warnings)), "records": len(state.log.records),
        "pages": len(state.pages), "last_lsn": state.last_lsn,
    }


def code_label(code: dict[str, Any] | None) -> str:
    """``pipe:double #1c2493 (ir page 8 @2)`` for a provenance record; "" for none."""
    if not code:
        return ""
    text = str(code.get("name", ""))
    digest = str(code.get("hash", ""))
    if digest:
        text += f" #{digest[:6]}"
    if "ir_page" in code:
        text += f" (ir page {code['ir_page']} @{code.get('ir_epoch')})"
    return text
