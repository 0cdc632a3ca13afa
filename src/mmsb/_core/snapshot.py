"""Snapshots: a whole state as plain arrays and records, the form in which storage hands
a decoded checkpoint to the engine (``MMSBState.restore``) and the engine hands a copy
of itself to history (``MMSBState.snapshot``). Storage never builds a state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..types import EdgeType
from .records import AnyRecord

__all__ = ["Snapshot", "ReplayBase"]


class ReplayBase(ABC):
    """The state at a log's horizon, where replays of a trimmed log start. The engine
    only keeps it; the storage layer that made it knows how to decode it."""

    @abstractmethod
    def raw(self) -> bytes:
        """The encoded base, to nest inside a checkpoint that must stand alone."""

    @abstractmethod
    def snapshot(self) -> Snapshot:
        """The base decoded and validated."""

    def detached(self) -> ReplayBase:
        """A base that no longer depends on files another process may remove."""
        return self


@dataclass
class Snapshot:
    """A decoded, validated state image (nothing of any live state touched yet)."""

    lsn: int
    """LSN of the newest record the image includes."""
    next_page_id: int
    next_delta_id: int
    ids: np.ndarray
    """Live page ids, ascending (int64)."""
    sizes: np.ndarray
    epochs: np.ndarray
    locs: np.ndarray
    data: np.ndarray
    """The pages' bytes, concatenated in id order (uint8)."""
    metadata: dict[int, dict[str, Any]]
    masks: dict[int, tuple[np.ndarray, int]]
    """page id → (written-bytes mask, LSN it is valid as of), for pages whose retained
    log does not show every write."""
    edges: list[tuple[int, int, EdgeType]]
    records: Sequence[AnyRecord]
    """The retained log, oldest first: a list, or the records view of a log that holds
    them as columns (a decoded checkpoint's; restoring copies its rows in one go)."""
    horizon_lsn: int = 0
    last_timestamp: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    base: ReplayBase | None = None
    """Where replays of ``records`` start (None: they rebuild the state from nothing)."""
    log_from_lsn: int = 0
    """The log holds the records after this LSN (0: the whole retained log)."""
    bus: dict[str, Any] | None = None
    """Durable bus identity: ``bus_id`` (hex), ``generation``; None for plain files."""
    owned: bool = False
    """``data`` and the log columns' payload lie in writable memory that nothing else
    refers to (a buffer a file was read into for this snapshot alone): the next restore
    may take them as the state's pages and log payload instead of copying them, and
    clears this flag."""
    page_refs: Any = None
    """Where the pages lie in the bus's checkpoint page store, for a checkpoint that
    keeps them there (format versions 3 and 4; ``data`` holds them, read and checked); None
    for a self-contained checkpoint."""
