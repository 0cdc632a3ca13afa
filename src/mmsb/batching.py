"""The batch write path: many writes under one lock, checked first, applied in order,
one propagation pass and one event burst at the end."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .delta import as_bytes_array
from .errors import InvalidArgumentError, InvalidDeltaError
from .state import MMSBState

__all__ = ["run_batch"]


def _prepare(state: MMSBState, writes: Iterable[tuple[int, int, Any]]) -> list[tuple[int, int, np.ndarray]]:
    """Check every write (page, range, bytes) before anything is applied."""
    t = state._table
    out: list[tuple[int, int, np.ndarray]] = []
    for k, w in enumerate(writes):
        try:
            page_id, offset, data = w
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"batch write #{k} must be a (page_id, offset, bytes) tuple, not {w!r:.80}") from None
        pid = state._require(page_id, f"apply_batch (write #{k})")
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer):
            raise InvalidDeltaError(f"batch write #{k}: offset must be an int, not {offset!r}", page_id=pid)
        arr = as_bytes_array(data, f"batch write #{k} data")
        size = int(t.size[pid])
        if offset < 0 or offset + len(arr) > size:
            raise InvalidDeltaError(
                f"batch write #{k} of {len(arr)} bytes at offset {offset} runs outside the page "
                f"(size {size})", page_id=pid)
        out.append((pid, int(offset), arr))
    return out


def run_batch(state: MMSBState, writes: Iterable[tuple[int, int, Any]], source: str = "api") -> int:
    """Apply ``writes`` as one group (see :func:`mmsb.apply_batch`). Returns the number of
    deltas logged."""
    if not isinstance(source, str):
        raise InvalidArgumentError(f"source must be a str, not {type(source).__name__}")
    state._enter()
    try:
        prepared = _prepare(state, writes)
        state._begin_batch()
        ok = False
        try:
            logged = 0
            for pid, off, arr in prepared:
                logged += state._write(pid, off, arr, source, False)
            ok = True
        finally:
            state._end_batch(ok)
        return logged
    finally:
        state._leave()
