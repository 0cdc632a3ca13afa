"""Which code produced each propagated delta, read back from the log.

While instrumentation is enabled (``provenance=True``), the engine's recompute hook
keeps a recomputed page's ``produced_by`` metadata naming the code of its recompute
function — a logged metadata change whenever that code changes. So the code behind a
propagated delta of page P at LSN L is the ``produced_by`` of the last metadata record
of P before L: it lives in the log, the WAL and checkpoints like any metadata, and
replay rebuilds it, with no format change.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._core.records import MetadataSet, PageCreate
from ..errors import SerializationError
from .ir import code_of, deserialize_code_ir, ir_code_hash
from .manager import PRODUCED_BY, _function_name, _hash_of, manager_of

if TYPE_CHECKING:
    from .._core.delta import Delta
    from .._core.engine import MMSBState

__all__ = ["ProvenanceIndex", "provenance_index", "CodeDifference", "code_differences",
           "describe_code", "PROPAGATION_SOURCE"]

PROPAGATION_SOURCE = "propagation"


class ProvenanceIndex:
    """Per page, the ``produced_by`` value from each of its metadata records, by LSN."""

    def __init__(self, state: MMSBState) -> None:
        self.lsns: dict[int, list[int]] = {}
        self.values: dict[int, list[dict[str, Any] | None]] = {}
        with state.lock:
            for rec in state.log.iter_structs():
                if isinstance(rec, MetadataSet):
                    self._add(rec.page_id, rec.lsn, rec.metadata)
                elif isinstance(rec, PageCreate) and rec.metadata:
                    for pid in range(rec.first_id, rec.first_id + rec.count):
                        self._add(pid, rec.lsn, rec.metadata)

    def _add(self, pid: int, lsn: int, meta: dict[str, Any] | None) -> None:
        value = None if not meta else meta.get(PRODUCED_BY)
        self.lsns.setdefault(pid, []).append(lsn)
        self.values.setdefault(pid, []).append(value if isinstance(value, dict) else None)

    def at(self, page_id: int, lsn: int) -> dict[str, Any] | None:
        """``produced_by`` of page ``page_id`` as it stood just before LSN ``lsn``."""
        lsns = self.lsns.get(page_id)
        if not lsns:
            return None
        k = bisect.bisect_left(lsns, lsn)
        return None if k == 0 else self.values[page_id][k - 1]

    def of(self, delta: Delta) -> dict[str, Any] | None:
        """The code that produced a propagated delta (None for other deltas, or when the
        log holds no record of it)."""
        if delta.source != PROPAGATION_SOURCE:
            return None
        return self.at(delta.page_id, delta.lsn)


def provenance_index(state: MMSBState) -> ProvenanceIndex:
    """A :class:`ProvenanceIndex` of the state's retained log. O(structural records)."""
    return ProvenanceIndex(state)


def describe_code(state: MMSBState, fn: Any) -> dict[str, Any]:
    """The provenance record of a recompute function, as the hook would write it."""
    mgr = manager_of(state)
    if mgr is not None:
        return mgr.describe(fn)
    from .._core.propagation import Passthrough

    if isinstance(fn, Passthrough):
        if fn.transform is None:
            return {"name": "passthrough", "hash": "", "source_page": fn.source}
        out = describe_code(state, fn.transform)
        out["source_page"] = fn.source
        return out
    code = code_of(fn)
    if code is None:
        return {"name": getattr(fn, "__qualname__", type(fn).__qualname__), "hash": ""}
    return {"name": _function_name(fn, code), "hash": _hash_of(code)}


@dataclass(frozen=True, slots=True)
class CodeDifference:
    """A retained propagated delta whose code is not the code there now."""

    page_id: int
    lsn: int
    """The first such delta of the page (LSN)."""
    deltas: int
    """How many retained deltas of the page that code produced."""
    produced_by: dict[str, Any] | None
    current: dict[str, Any] | None
    status: str
    """``"changed"``: the code registered now (or on its IR page) differs;
    ``"unknown"``: no code to compare with (nothing registered, no IR page, or the log
    does not say which code produced the delta)."""
    reason: str


def _current_code(state: MMSBState, pid: int, produced: dict[str, Any] | None
                  ) -> tuple[dict[str, Any] | None, str]:
    fn = state.recompute_fns.get(pid)
    if fn is not None:
        return describe_code(state, fn), "the recompute function registered now"
    ir = produced.get("ir_page") if produced else None
    if isinstance(ir, int) and ir in state.pages:
        with state.lock:
            data = state.page_view(ir).tobytes()
        try:
            return {"name": produced.get("name", "") if produced else "",
                    "hash": ir_code_hash(deserialize_code_ir(data)), "ir_page": ir,
                    "ir_epoch": int(state.table.epoch[ir])}, f"the code on IR page {ir}"
        except SerializationError:
            return None, f"IR page {ir} does not hold code IR"
    return None, "no recompute function is registered and no IR page names the code"


def code_differences(state: MMSBState) -> list[CodeDifference]:
    """For each page with retained propagated deltas, each code that produced some of
    them and differs from the code there now (or cannot be compared). O(log)."""
    index = provenance_index(state)
    groups: dict[tuple[int, str], list[Any]] = {}
    with state.lock:
        deltas = [d for d in state.tlog if d.source == PROPAGATION_SOURCE]
    for d in deltas:
        produced = index.of(d)
        key = (d.page_id, "" if produced is None else str(produced.get("hash", "")))
        g = groups.get(key)
        if g is None:
            groups[key] = [d.lsn, 1, produced]
        else:
            g[1] += 1
    out: list[CodeDifference] = []
    for (pid, digest), (lsn, count, produced) in sorted(groups.items(), key=lambda kv: kv[1][0]):
        current, where = _current_code(state, pid, produced)
        if produced is None:
            out.append(CodeDifference(pid, lsn, count, None, current, "unknown",
                                      "the log does not say which code produced these deltas "
                                      "(recorded while instrumentation was off)"))
        elif current is None:
            out.append(CodeDifference(pid, lsn, count, produced, None, "unknown", where))
        elif str(current.get("hash", "")) != digest:
            out.append(CodeDifference(
                pid, lsn, count, produced, current, "changed",
                f"{produced.get('name')} (hash {digest[:12] or 'none'}) produced them; "
                f"{where} is {current.get('name')} (hash "
                f"{str(current.get('hash', ''))[:12] or 'none'})"))
    return out
