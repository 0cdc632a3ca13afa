"""Subscriptions and event delivery, per state.

Events are collected while a write holds the state's lock and delivered after the
write is complete and the lock released. A handler that raises is logged and counted;
it never undoes or blocks the write.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from ..types import EventType, PageLocation

__all__ = ["Subscription", "EventBus", "Handler", "EVENT_FIELDS", "describe_event", "Event"]

log = logging.getLogger("mmsb.events")

Handler = Callable[..., Any]
_ids = itertools.count(1)


@dataclass(eq=False)
class Subscription:
    """A handler registered for one event type on one state."""

    event_type: EventType
    handler: Handler
    filter: Callable[..., bool] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    active: bool = True
    owner: int = 0
    """id() of the state it belongs to."""
    delivered: int = 0
    errors: int = 0

    def matches(self, event_type: EventType, data: tuple[Any, ...]) -> bool:
        return self.filter is None or bool(self.filter(event_type, *data))


def make_filter(spec: Any) -> Callable[..., bool] | None:
    """Turn a filter spec (None, a page id, ids, or a callable) into a predicate."""
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise InvalidArgumentError("filter must be a page id, an iterable of ids or a callable")
    if isinstance(spec, int):
        pid = spec
        return lambda _et, *data: bool(data) and data[0] == pid
    if callable(spec):
        return spec
    if isinstance(spec, Iterable):
        ids = frozenset(spec)
        if not all(isinstance(i, int) for i in ids):
            raise InvalidArgumentError("a filter of ids must hold integers only")
        return lambda _et, *data: bool(data) and data[0] in ids
    raise InvalidArgumentError(
        f"filter must be None, a page id, an iterable of ids or a callable, not {type(spec).__name__}")


class EventBus:
    """Holds a state's subscriptions and delivers events to them in order."""

    def __init__(self) -> None:
        self._subs: dict[EventType, list[Subscription]] = {}
        self.active = False
        """True when any subscription exists (lets writers skip building events)."""
        self.emitted = 0
        self.handler_errors = 0

    def add(self, sub: Subscription) -> None:
        self._subs.setdefault(sub.event_type, []).append(sub)
        self.active = True

    def remove(self, sub: Subscription) -> bool:
        lst = self._subs.get(sub.event_type, [])
        if sub in lst:
            lst.remove(sub)
            sub.active = False
            self.active = any(self._subs.values())
            return True
        return False

    def wants(self, event_type: EventType) -> bool:
        return bool(self._subs.get(event_type))

    def deliver(self, state: Any, events: list[tuple[EventType, tuple[Any, ...]]]) -> None:
        """Call the handlers of each event, in order. Never raises for a handler's error."""
        for event_type, data in events:
            subs = self._subs.get(event_type)
            self.emitted += 1
            if not subs:
                continue
            for sub in list(subs):
                if not sub.active:
                    continue
                try:
                    if not sub.matches(event_type, data):
                        continue
                    sub.delivered += 1
                    sub.handler(state, event_type, *data)
                except Exception:
                    sub.errors += 1
                    self.handler_errors += 1
                    log.exception("event handler %r for %s failed", sub.handler,
                                  event_type.name)

    def subscriptions(self) -> list[Subscription]:
        return [s for lst in self._subs.values() for s in lst]

    def clear(self, event_type: EventType | None = None) -> int:
        """Remove every subscription (or those of one event type); they become
        inactive. Returns how many were removed. O(subscriptions removed)."""
        if event_type is None:
            removed = [s for lst in self._subs.values() for s in lst]
            self._subs.clear()
        else:
            removed = self._subs.pop(event_type, [])
        for sub in removed:
            sub.active = False
        self.active = any(self._subs.values())
        return len(removed)

    def count(self, event_type: EventType | None = None) -> int:
        """Number of subscriptions (of one event type, when given). O(event types)."""
        if event_type is None:
            return sum(len(lst) for lst in self._subs.values())
        return len(self._subs.get(event_type, ()))


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a bus's change feed: what a logged record did, with the record's LSN
    and time. Several events may share an LSN (a record that creates many pages)."""

    type: EventType
    timestamp: int
    """Nanoseconds since the Unix epoch (the record's time)."""
    lsn: int
    page_id: int
    """The page the event is about (0 when it is about no page)."""
    payload: dict[str, Any] = field(default_factory=dict)
    """Event-specific fields (str keys; ints, strs, bools, floats, lists, dicts, None)."""


EVENT_FIELDS: dict[EventType, tuple[str, ...]] = {
    EventType.PAGE_CREATED: ("page",),
    EventType.PAGE_DELETED: ("page",),
    EventType.PAGE_CHANGED: ("page", "epoch", "delta"),
    EventType.PAGE_INVALIDATED: ("page", "parent"),
    EventType.PAGE_STALE: ("page", "parent"),
    EventType.COMPILE_START: ("page", "name"),
    EventType.COMPILE_COMPLETE: ("page", "name", "world_age", "changed"),
    EventType.DELTA_APPLIED: ("page", "epoch", "delta", "lsn"),
    EventType.GPU_SYNC_NEEDED: ("page", "parent"),
    EventType.GPU_SYNC_COMPLETE: ("page",),
    EventType.IR_INVALIDATED: ("page", "parent"),
    EventType.PAGE_RESIZED: ("page", "old_size", "new_size"),
    EventType.PAGE_MIGRATED: ("page", "old_location", "new_location"),
    EventType.METADATA_CHANGED: ("page",),
    EventType.EDGE_ADDED: ("page",),
    EventType.EDGE_REMOVED: ("page",),
    EventType.LOG_COMPACTED: ("page",),
}
"""The name of each position of an event's data, as EventType documents it."""


def describe_event(event_type: EventType, data: tuple[Any, ...]) -> str:
    """One readable line for an event: ``PAGE_CHANGED page=3 epoch=2 delta=7``. Data
    beyond the named positions is shown by position (``arg4=…``). O(len(data))."""
    names = EVENT_FIELDS.get(event_type, ())
    parts = [event_type.name]
    for i, value in enumerate(data):
        name = names[i] if i < len(names) else f"arg{i}"
        if isinstance(value, enum.Enum):
            value = str(value) if isinstance(value, PageLocation) else value.name
        parts.append(f"{name}={value}")
    return " ".join(parts)
