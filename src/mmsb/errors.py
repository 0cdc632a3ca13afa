"""Typed errors of MMSB.

Every error is an :class:`MMSBError`; where a standard library base fits, the error
derives from it too (``PageNotFoundError`` is a ``KeyError``), so callers can catch
either. A refused call never changes the state or the log.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MMSBError",
    "PageNotFoundError",
    "InvalidDeltaError",
    "GPUMemoryError",
    "SerializationError",
    "GraphCycleError",
    "UnsupportedLocationError",
    "InvalidArgumentError",
    "MetadataError",
    "HistoryUnavailableError",
    "StateClosedError",
    "BusLockedError",
    "ReplicationError",
    "NotLeaderError",
    "DurabilityError",
    "MissingDependencyError",
    "PropagationError",
]


class MMSBError(Exception):
    """Base class of every error MMSB raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PageNotFoundError(MMSBError, KeyError):
    """A page id that the state does not hold.

    Attributes:
        page_id: the id that was asked for.
        context: the call or step that looked it up.
    """

    def __init__(self, page_id: int, context: str = "") -> None:
        self.page_id = page_id
        self.context = context
        where = f" in {context}" if context else ""
        if not isinstance(page_id, bool) and hasattr(page_id, "__index__"):  # int, numpy ints
            super().__init__(
                f"page {page_id} does not exist{where}; "
                "create it with create_page() or use an id from state.pages"
            )
        else:
            # (Shown as its repr: the string "1" must not read as page 1.)
            super().__init__(
                f"no page has the id {page_id!r}{where}: a page id is an int, not a "
                f"{type(page_id).__name__}; use an id from state.pages"
            )


class InvalidDeltaError(MMSBError, ValueError):
    """A delta or write that cannot be applied (lengths, range, epoch conflict).

    Attributes:
        reason: what was wrong.
        page_id: the page concerned, if known.
        delta_id: the delta concerned, if known.
    """

    def __init__(self, reason: str, *, page_id: int | None = None, delta_id: int | None = None):
        self.reason = reason
        self.page_id = page_id
        self.delta_id = delta_id
        parts = []
        if delta_id is not None:
            parts.append(f"delta {delta_id}")
        if page_id is not None:
            parts.append(f"page {page_id}")
        prefix = " on ".join(parts)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


class GPUMemoryError(MMSBError, RuntimeError):
    """A device page could not be placed or reached: GPU pages off, no usable CUDA device
    (or CuPy), a durable bus (which keeps no device pages), or out of device memory.

    Attributes:
        requested_bytes: the size asked for, if known.
        reason: what was missing.
    """

    def __init__(self, reason: str, *, requested_bytes: int | None = None) -> None:
        self.reason = reason
        self.requested_bytes = requested_bytes
        size = f" ({requested_bytes} bytes requested)" if requested_bytes is not None else ""
        super().__init__(f"GPU memory unavailable{size}: {reason}")


class SerializationError(MMSBError, ValueError):
    """Bytes that do not decode: bad magic, unsupported version, truncation, checksum.

    Attributes:
        reason: what was wrong.
        path: the file, if the bytes came from one.
        offset: the byte offset of the damage, if known.
    """

    def __init__(self, reason: str, *, path: Any = None, offset: int | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.offset = offset
        where = ""
        if self.path is not None:
            where += f" in {self.path}"
        if offset is not None:
            where += f" at byte {offset}"
        super().__init__(f"cannot decode{where}: {reason}")


class GraphCycleError(MMSBError, ValueError):
    """An edge that would close a cycle in the dependency graph.

    Attributes:
        parent_id, child_id: the refused edge.
        path: the existing path child → … → parent that the edge would close.
    """

    def __init__(self, parent_id: int, child_id: int, path: list[int] | None = None) -> None:
        self.parent_id = parent_id
        self.child_id = child_id
        self.path = list(path or [])
        if parent_id == child_id:
            detail = "a page cannot depend on itself"
        else:
            chain = " → ".join(str(p) for p in self.path) or f"{child_id} → … → {parent_id}"
            detail = f"{chain} already exists, so the edge would close a cycle"
        super().__init__(f"edge {parent_id} → {child_id} refused: {detail}")


class UnsupportedLocationError(MMSBError, ValueError):
    """A page location that is not one of ``cpu``, ``gpu``, ``unified``.

    Attributes:
        location: what was given.
    """

    def __init__(self, location: Any) -> None:
        self.location = location
        super().__init__(
            f"unsupported page location {location!r}; use 'cpu', 'gpu', 'unified' "
            "or a PageLocation"
        )


class InvalidArgumentError(MMSBError, ValueError):
    """An argument of the wrong type or out of range (a size, a count, an option)."""


class MetadataError(MMSBError, TypeError):
    """Page metadata that cannot be stored: only msgpack-encodable values are allowed
    (None, bool, int, float, str, bytes, lists and dicts of those)."""


class HistoryUnavailableError(MMSBError, LookupError):
    """A replay target before the oldest retained history (compressed or dropped)."""


class StateClosedError(MMSBError, RuntimeError):
    """A call on a state that was stopped with mmsb_stop()."""


class BusLockedError(MMSBError, RuntimeError):
    """A durable bus directory that another process holds open for writing."""


class DurabilityError(MMSBError, OSError):
    """A write or fsync of the durable log failed; the bus refuses further writes."""


class ReplicationError(MMSBError, RuntimeError):
    """Replication through Redis cannot go on as asked: the server is unreachable or
    holds another leader's lease, this bus was superseded by a newer term, or what the
    stream holds cannot be applied. The message says which and what to do."""


class NotLeaderError(DurabilityError):
    """A write to a bus that is not the leader: a follower (it applies only what its
    leader logged), or a leader that a newer term has fenced off. Nothing was applied
    or logged."""


class MissingDependencyError(MMSBError, ImportError):
    """An optional extra that a feature needs is not installed; the message names it."""


class PropagationError(MMSBError, RuntimeError):
    """A recompute function raised while propagating a write. The write itself was
    applied and logged; the page whose function failed (and what depends on it through
    it) was not updated, and PAGE_INVALIDATED was emitted for it. The function's own
    exception is the ``__cause__``.

    Attributes:
        page_id: the page whose recompute function failed.
    """

    def __init__(self, page_id: int, exc: BaseException) -> None:
        self.page_id = page_id
        super().__init__(
            f"recomputing page {page_id} failed ({type(exc).__name__}: {exc}); the write "
            f"that triggered it was applied, but page {page_id} and what depends on it "
            "through it were not updated")
