"""Readers of a durable bus in other processes: ``mmsb.attach(path)``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _api
from ._core.engine import MMSBState, check_path, check_timeout
from ._core.events import Event
from ._core.graph import ShadowPageGraph
from ._core.records import AnyRecord
from ._history.timetravel import read_page_at
from ._storage.bus import bus_identity
from ._storage.feed import ChangeFeed, record_events
from ._storage.mapped import MappedPages, boot_id
from .errors import (
    HistoryUnavailableError,
    InvalidArgumentError,
    PageNotFoundError,
    SerializationError,
    StateClosedError,
)

__all__ = ["BusReader", "ReaderSnapshot", "attach"]


@dataclass(frozen=True)
class ReaderSnapshot:
    """Pages read together, as they all were at one LSN."""

    lsn: int
    pages: dict[int, bytes]


class BusReader:
    """A read-only view of a durable bus that another process writes (see :func:`attach`).

    Page reads come from the writer's mapped pages at memory speed and are never torn;
    history (``read_page_at``, ``graph``) is rebuilt from the bus's files on first use
    and again when a later LSN is asked for; ``changes`` reads the log.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        if not os.path.lexists(root / "BUS"):
            raise SerializationError("no MMSB bus here (the identity file BUS is missing)", path=root)
        self.path = root
        self.bus_id = bus_identity(root)
        if not os.path.lexists(root / "map" / "HEAD"):
            raise SerializationError(
                "this bus has no mapped pages yet: open it once for writing with "
                "mmsb_start(path=...) (readers attach to what a writer publishes)", path=root)
        try:
            self._map = MappedPages(root, self.bus_id)
        except OSError as exc:
            raise SerializationError(f"cannot map the bus's pages ({exc.strerror or exc})",
                                     path=root / "map") from None
        if self._map.boot != boot_id() and self._map.boot != bytes(16):
            self._map.close()
            raise HistoryUnavailableError(
                f"the mapped pages of {root} were written before the machine restarted and "
                "may be incomplete; open the bus for writing once (recovery rebuilds them) "
                "or read it with open_readonly")
        self._history: MMSBState | None = None
        self.closed = False

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the pages and drop the cached history. Idempotent."""
        if not self.closed:
            self._map.close()
            self._history = None
            self.closed = True

    def __enter__(self) -> BusReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<BusReader {self.path} closed>"
        return f"<BusReader {self.path} lsn={self.last_lsn}>"

    def _live(self) -> MappedPages:
        if self.closed:
            raise StateClosedError("this reader was closed; attach again")
        return self._map

    # -- the present -----------------------------------------------------------------
    @property
    def last_lsn(self) -> int:
        """The LSN the mapped pages show (the writer publishes after every call)."""
        return self._live().lsn

    @property
    def writer_pid(self) -> int | None:
        """Process id of the writer publishing now, or None when no writer has it open."""
        m = self._live()
        return m.writer_pid if m.status != 0 else None

    def read_page(self, page_id: int) -> bytes:
        """Page ``page_id``'s bytes as the writer last published them; never a mix of
        two versions. O(page size).

        Raises:
            PageNotFoundError: no live page with that id.
            DurabilityError: the writer could not publish (a full disk), or died while
                publishing (until a writer reopens the bus).
            SerializationError: the head gives the mapped files lengths they do not
                reach (a file cut, or the head edited).
        """
        if self.closed:
            raise StateClosedError("this reader was closed; attach again")
        if type(page_id) is not int:
            page_id = _page_id(page_id)
        return self._map.read(page_id)[0]

    def page_epoch(self, page_id: int) -> int:
        """Page ``page_id``'s epoch as last published.

        Raises:
            PageNotFoundError: no live page with that id.
            SerializationError: as :meth:`read_page`.
        """
        return self._live().read(_page_id(page_id))[1]

    def page_ids(self) -> list[int]:
        """Ids of the live pages, ascending, as last published."""
        return self._live().live_ids()[0]

    def snapshot(self, page_ids: Any = None) -> ReaderSnapshot:
        """Several pages as they all were at one LSN (``None``: every live page).

        Raises:
            PageNotFoundError: one of the pages is not live at that LSN.
            SerializationError: as :meth:`read_page`.
        """
        m = self._live()
        if page_ids is not None:
            pages, at = m.snapshot([_page_id(p) for p in _iterable(page_ids)])
            return ReaderSnapshot(at, pages)
        while True:
            ids, lsn = m.live_ids()
            try:
                pages, at = m.snapshot(ids)
            except PageNotFoundError:
                continue  # deleted between the listing and the copy: list again
            if at == lsn:
                return ReaderSnapshot(at, pages)

    def wait_for(self, lsn: int, timeout: float | None = None) -> bool:
        """Wait until the published LSN reaches ``lsn``; True when it did, False after
        ``timeout`` seconds (``None``: no limit). Sleeps in the kernel, no polling.

        Raises:
            InvalidArgumentError: lsn is not an int >= 0, or timeout is not None nor
                a number >= 0 (NaN included).
        """
        if isinstance(lsn, bool) or not isinstance(lsn, int) or lsn < 0:
            raise InvalidArgumentError(f"lsn must be an int >= 0, not {lsn!r}")
        timeout = check_timeout(timeout)
        m = self._live()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            token = m.notify_value
            if m.lsn >= lsn:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            m.wait(token, 0.5 if left is None else min(left, 0.5))

    # -- the log -----------------------------------------------------------------------
    def changes(self, since: int = 0, *, follow: bool = False,
                timeout: float | None = None) -> Iterator[Event]:
        """The events of every record with LSN > ``since``, in LSN order, read from the
        bus's log. ``follow=False`` stops at the end of what is written; ``follow=True``
        waits for more (woken by the writer, no polling) and stops only after ``timeout``
        seconds without a record (``None``: never). Resume after a restart by passing the
        last LSN seen: every event comes once, in order.

        Raises:
            InvalidArgumentError: since is not an int >= 0, or timeout is not None nor a
                number >= 0.
            HistoryUnavailableError: ``since`` is older than the history the bus retains.
            SerializationError: damage in the log.
        """
        m = self._live()
        timeout = check_timeout(timeout)
        feed = ChangeFeed(self.path, self.bus_id, since,
                          lambda: _api.open_readonly(self.path).log, lambda: m.lsn)
        return _events(feed.follow(lambda: m.notify_value, m.wait, timeout, not follow))

    def history(self, at_least: int = 0) -> MMSBState:
        """A detached state rebuilt from the bus's files (checkpoints and log), cached
        and rebuilt when its last LSN is below ``at_least``. Its reads and history are
        those of :func:`mmsb.open_readonly`; writes to it stay in this process."""
        self._live()
        if self._history is None or self._history.last_lsn < at_least:
            self._history = _api.open_readonly(self.path)
        return self._history

    def read_page_at(self, page_id: int, *, lsn: int | None = None, epoch: int | None = None,
                     timestamp: int | None = None) -> bytes:
        """:func:`mmsb.read_page_at` on the bus's history (rebuilt when the LSN asked for
        is newer than the cached copy)."""
        want = lsn if isinstance(lsn, int) and not isinstance(lsn, bool) else 0
        if timestamp is not None or epoch is not None:
            want = self.last_lsn
        return read_page_at(self.history(want), page_id, lsn=lsn, epoch=epoch,
                                 timestamp=timestamp)

    @property
    def graph(self) -> ShadowPageGraph:
        """The dependency graph as of the history rebuilt last (see :meth:`history`),
        rebuilt when the writer has published since."""
        return self.history(self.last_lsn).graph


def _events(records: Iterator[AnyRecord]) -> Iterator[Event]:
    for rec in records:
        yield from record_events(rec)


def _page_id(page_id: Any) -> int:
    if isinstance(page_id, bool) or not isinstance(page_id, int):
        raise PageNotFoundError(page_id, "read from an attached bus")
    return page_id


def _iterable(ids: Any) -> list[Any]:
    if isinstance(ids, int) and not isinstance(ids, bool):
        return [ids]
    if isinstance(ids, str | bytes | bytearray | memoryview):
        # (Iterable, but of characters or bytes, never of page ids.)
        raise InvalidArgumentError(f"page_ids must be a page id, an iterable of ids or None, "
                                   f"not {type(ids).__name__}")
    try:
        return list(ids)
    except TypeError:
        raise InvalidArgumentError("page_ids must be a page id, an iterable of ids or None") from None


def attach(path: str | os.PathLike[str]) -> BusReader:
    """Attach to the durable bus in ``path`` as a reader beside its writer (in another
    process, or this one): pages at memory speed from the writer's mapped files, never
    torn; several pages consistent at one LSN (``snapshot``); ``last_lsn``, ``wait_for``;
    the change feed (``changes``); ``read_page_at`` and ``graph`` from the bus's history.
    Nothing on disk is changed and no lock is taken.

    Raises:
        SerializationError: no bus there, or no mapped pages yet (no writer has opened it
            since it was created by an older version), or damaged mapped files.
        HistoryUnavailableError: the mapped pages were written before the machine last
            restarted (open the bus for writing once to rebuild them).
    """
    check_path(path, "attach")
    return BusReader(path)
