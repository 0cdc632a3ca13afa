"""The in-memory transaction log: every record in LSN order, with per-page indexes."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast, overload

from .delta import Delta
from .records import AnyRecord, Compacted

__all__ = ["TransactionLog", "DeltaView"]

Sink = Callable[[AnyRecord], None]


class TransactionLog:
    """All records of a state, in log order.

    ``records`` holds every record; ``deltas`` only the deltas (the seed's TLog);
    ``by_page`` maps page id → its deltas in order. Appending is O(1).
    """

    def __init__(self) -> None:
        self.records: list[AnyRecord] = []
        self.deltas: list[Delta] = []
        self.by_page: dict[int, list[Delta]] = {}
        self.next_lsn = 1
        self.last_timestamp = 0
        self.horizon_lsn = 0
        """Replays can target LSNs ≥ this (0: the whole history is here)."""
        self.horizon_timestamp = 0
        """Timestamp of the record at the horizon (when history was trimmed there)."""
        self.sink: Sink | None = None
        """Called with each new record before it is kept (the write-ahead log)."""
        self.sink_many: Callable[[list[AnyRecord]], None] | None = None
        """Called with a batch's records in one go (group commit), when set."""
        self.generation = 0
        """Bumped each time the record lists are replaced (compression, trimming)."""
        self.history_index: object | None = None
        """What the history layer derives from these records (time-travel keyframes);
        it checks ``generation`` and the lists' identity before trusting it."""

    @property
    def last_lsn(self) -> int:
        """LSN of the newest record; 0 when the log is empty."""
        return self.next_lsn - 1

    def stamp(self, rec: AnyRecord) -> None:
        """Give ``rec`` the next LSN and a timestamp that never decreases. O(1)."""
        rec.lsn = self.next_lsn
        ts = time.time_ns()
        if ts < self.last_timestamp:
            ts = self.last_timestamp
        rec.timestamp = ts

    def append(self, rec: AnyRecord) -> None:
        """Stamp ``rec``, hand it to the sink (which may raise: then nothing changes), keep it."""
        self.stamp(rec)
        if self.sink is not None:
            try:
                self.sink(rec)
            except BaseException:
                rec.lsn = 0
                rec.timestamp = 0
                raise
        self.adopt(rec)

    def append_delta(self, d: Delta) -> None:
        """append() for a delta on a log without a sink: stamp and keep it. O(1)."""
        lsn = self.next_lsn
        ts = time.time_ns()
        if ts < self.last_timestamp:
            ts = self.last_timestamp
        d.lsn = lsn
        d.timestamp = ts
        self.records.append(d)
        self.deltas.append(d)
        lst = self.by_page.get(d.page_id)
        if lst is None:
            self.by_page[d.page_id] = [d]
        else:
            lst.append(d)
        self.next_lsn = lsn + 1
        self.last_timestamp = ts

    @property
    def bytes_logged(self) -> int:
        """Payload memory of the retained deltas. O(deltas)."""
        return sum(d.nbytes for d in self.deltas)

    def append_held(self, records: list[AnyRecord]) -> None:
        """Keep records stamped earlier by a batch: the sink sees them in one call
        (and may raise: then none is kept)."""
        if not records:
            return
        if self.sink_many is not None:
            self.sink_many(records)
        elif self.sink is not None:
            for rec in records:
                self.sink(rec)
        if all(type(r) is Delta for r in records):
            deltas = cast(list[Delta], records)
            self.records.extend(deltas)
            self.deltas.extend(deltas)
            self._index(deltas)
            last = records[-1]
            self.next_lsn = last.lsn + 1
            self.last_timestamp = last.timestamp
            return
        for rec in records:
            self.adopt(rec)

    def adopt(self, rec: AnyRecord) -> None:
        """Keep an already-stamped record (replay, recovery). O(1)."""
        self.records.append(rec)
        self.next_lsn = rec.lsn + 1
        self.last_timestamp = rec.timestamp
        if isinstance(rec, Delta):
            self.deltas.append(rec)
            lst = self.by_page.get(rec.page_id)
            if lst is None:
                self.by_page[rec.page_id] = [rec]
            else:
                lst.append(rec)
        elif isinstance(rec, Compacted):
            self.horizon_lsn = rec.lsn

    def _index(self, deltas: list[Delta]) -> None:
        """Add deltas to the per-page index, in order. (append_delta and adopt inline
        the same two lines: they are the hot paths.)"""
        by_page = self.by_page
        for d in deltas:
            lst = by_page.get(d.page_id)
            if lst is None:
                by_page[d.page_id] = [d]
            else:
                lst.append(d)

    def replace_all(self, records: list[AnyRecord]) -> None:
        """Swap in a rewritten log (compression, trimming, restore). LSNs keep
        increasing. O(records)."""
        self.records = list(records)
        self.deltas = [r for r in self.records if type(r) is Delta]
        self.by_page = {}
        self._index(self.deltas)
        if self.records:
            last = self.records[-1]
            self.next_lsn = max(self.next_lsn, last.lsn + 1)
            self.last_timestamp = max(self.last_timestamp, last.timestamp)
        for rec in self.records:
            if type(rec) is Compacted:
                self.horizon_lsn = rec.lsn

    def index_after_lsn(self, lsn: int) -> int:
        """Number of records with LSN ≤ ``lsn``. O(log n)."""
        return bisect.bisect_right(self.records, lsn, key=lambda r: r.lsn)

    def index_after_time(self, ns: int) -> int:
        """Number of records with timestamp ≤ ``ns``. O(log n)."""
        return bisect.bisect_right(self.records, ns, key=lambda r: r.timestamp)

    def _check(self) -> None:
        """Assert LSNs strictly increase, timestamps never decrease, indexes agree."""
        prev_lsn, prev_ts = 0, 0
        for rec in self.records:
            assert rec.lsn > prev_lsn, f"LSN {rec.lsn} does not increase after {prev_lsn}"
            assert rec.timestamp >= prev_ts, f"timestamp decreases at LSN {rec.lsn}"
            prev_lsn, prev_ts = rec.lsn, rec.timestamp
        assert [r for r in self.records if isinstance(r, Delta)] == self.deltas
        assert sum(len(v) for v in self.by_page.values()) == len(self.deltas)


class DeltaView(Sequence[Delta]):
    """``state.tlog``: the retained deltas in log order, as a read-only sequence."""

    def __init__(self, log: TransactionLog) -> None:
        self._log = log

    def __len__(self) -> int:
        return len(self._log.deltas)

    @overload
    def __getitem__(self, i: int) -> Delta: ...
    @overload
    def __getitem__(self, i: slice) -> list[Delta]: ...
    def __getitem__(self, i: int | slice) -> Delta | list[Delta]:
        return self._log.deltas[i]

    def __iter__(self) -> Iterator[Delta]:
        return iter(list(self._log.deltas))

    def __repr__(self) -> str:
        return f"<TLog {len(self)} deltas, last LSN {self._log.last_lsn}>"
