"""Propagation: after pages change, bring their dependents up to date, in topological
order, each affected page once, after all of its changed parents (glitch-free).

DATA edges recompute the child with its registered function (the result is logged as
a delta with source ``"propagation"``, so replay never calls user code); a recompute
that yields identical bytes stops the change there (cutoff). CONTROL edges mark the
child stale, COMPILER edges mark its compiled artifacts invalid (both as logged
metadata changes), GPU_SYNC edges schedule a device sync: GPU_SYNC_NEEDED for every child, and for a gpu or
unified child its device copy is brought up to date from its host mirror after the
pass, then GPU_SYNC_COMPLETE once the copy has landed. Iterative: no recursion limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import InvalidDeltaError, MMSBError, PropagationError
from ..types import EdgeType, EventType
from .delta import as_bytes_array
from .page_table import LIVE

if TYPE_CHECKING:
    from .engine import MMSBState, Page

__all__ = ["run_propagation", "affected_order", "Passthrough"]

log = logging.getLogger("mmsb.propagation")


# Edge types that mark the child through a logged metadata flag, and the event they emit.
# Enum members as module constants: reading one through its class costs about 0.1 µs
# in 3.11, several times per page of every pass.
_DATA = EdgeType.DATA
_GPU_SYNC = EdgeType.GPU_SYNC
_MARKS = (
    (EdgeType.CONTROL, "stale", True, EventType.PAGE_STALE),
    (EdgeType.COMPILER, "ir_valid", False, EventType.IR_INVALIDATED),
)


class Passthrough:
    """The recompute function of ``register_passthrough_recompute``: the bytes of page
    ``source``, through ``transform`` when there is one. A propagation pass recognises
    it and, without a transform, copies the source's bytes with no call and no page
    handle."""

    __slots__ = ("source", "transform")

    def __init__(self, source: int, transform: Callable[[bytes], Any] | None) -> None:
        self.source = source
        self.transform = transform

    def __call__(self, state: MMSBState, page: Page) -> Any:
        view = state.page_view(state.require_page(self.source, "passthrough source"))
        return view if self.transform is None else self.transform(view.tobytes())


def affected_order(state: MMSBState, sources: set[int], forced: frozenset[int] = frozenset()) -> list[int]:
    """The sources' descendants, and the forced pages and theirs, in topological order.

    One breadth-first walk finds them; when no page is reached twice (chains, trees —
    the common case) that walk's order is already topological. Otherwise Kahn's
    algorithm runs on the affected subgraph only, ties broken by id. O(affected edges).
    """
    children = state.graph.children
    if not forced and len(sources) == 1:
        # A chain below one source (the common case): follow it while each page has
        # one child; a branch starts the general walk.
        (node,) = sources
        chain: list[int] = []
        kids = children.get(node)
        while kids:
            if len(kids) != 1:
                break
            (node,) = kids
            chain.append(node)
            kids = children.get(node)
        else:
            return chain
    order: list[int] = list(forced)
    seen: dict[int, int] = dict.fromkeys(order, 0)
    queue = [s for s in sources if s not in seen] + order
    tree = True
    i = 0
    while i < len(queue):
        node = queue[i]
        i += 1
        kids = children.get(node)
        if not kids:
            continue
        for c in kids:
            if c in seen:
                tree = False
            else:
                seen[c] = 1
                order.append(c)
                queue.append(c)
    if tree or not order:
        return order
    affected = set(order)
    return [n for n in state.graph.topological_sort(affected | sources) if n in affected]


def run_propagation(state: MMSBState, sources: set[int], forced: frozenset[int] = frozenset()) -> None:
    """Propagate changes of ``sources`` (caller holds the state's lock); pages in
    ``forced`` are recomputed whether or not a parent changed (queue_recomputation).

    Raises:
        InvalidDeltaError: a recompute function returned bytes of the wrong length.
        PropagationError: a recompute function raised; also when it tried to change the
            state (write, create, delete, metadata …), which is refused inside it with
            InvalidArgumentError (the ``__cause__``).
        In both cases the sources' writes stand, the rest of the pass still runs, and
        that child (and what depends on it only through it) is left as it was.

        GPUMemoryError: the device sync a GPU_SYNC edge scheduled failed (the device
            is not usable here, or out of memory): the pass's writes stand and no
            GPU_SYNC_COMPLETE is emitted.
    """
    changed = set(sources)
    parents = state.graph.parents
    table = state.table
    first_error: Exception | None = None
    # PageTable.is_live, inlined (rows below next_id exist; rows past it are never live):
    # a call per page is about 2 % of a single hop.
    flags = table.views[3]
    syncs: list[int] = []
    for node in affected_order(state, sources, forced):
        if not flags[node] & LIVE:
            continue
        kinds: dict[EdgeType, int] = {}
        for parent, et in parents.get(node, {}).items():
            if parent in changed and et not in kinds:
                kinds[et] = parent
        if node in forced and _DATA not in kinds:
            kinds[_DATA] = node
        if not kinds:
            continue
        if _DATA in kinds:
            fn = state.recompute_fns.get(node)
            if fn is None:
                state.emit(EventType.PAGE_INVALIDATED, node, kinds[_DATA])
            else:
                try:
                    if state.recompute_hook is not None:
                        # Instrumentation: note which code produces this page's delta.
                        state.recompute_hook(state, node, fn)
                    src = fn.source if type(fn) is Passthrough and fn.transform is None else 0
                    # PageTable.is_live, inlined.
                    if 0 < src < table.next_id and flags[src] & LIVE:
                        # What the call would return, without the call.
                        arr = state.page_view(src)
                    else:
                        # A recompute function returns its page's bytes; it may read any
                        # page but change none (state.enter refuses): a write from inside
                        # it would reach pages whose dependants this pass has passed by.
                        state.recomputing = node
                        try:
                            result = fn(state, state.page_handle(node))
                        finally:
                            state.recomputing = None
                        arr = as_bytes_array(result, "recompute result")
                    size = table.views[1][node]
                    if len(arr) != size:
                        raise InvalidDeltaError(
                            f"recompute function returned {len(arr)} bytes but the page has "
                            f"{size}; it must return the page's full new content", page_id=node)
                    if state.write_recomputed(node, arr):
                        changed.add(node)
                except InvalidDeltaError as exc:
                    state.emit(EventType.PAGE_INVALIDATED, node, kinds[_DATA])
                    if first_error is None:
                        first_error = exc
                except Exception as exc:
                    # User code failed: keep propagating the other branches, report after.
                    log.warning("recompute function of page %d raised %r", node, exc)
                    state.emit(EventType.PAGE_INVALIDATED, node, kinds[_DATA])
                    if first_error is None:
                        first_error = PropagationError(node, exc)
                        first_error.__cause__ = exc
        if len(kinds) == 1 and _DATA in kinds:
            continue  # the common case: no edge of another kind to this page changed
        for edge, key, value, event in _MARKS:
            if edge in kinds:
                meta = dict(table.meta.get(node, {}))
                if meta.get(key) is not value:
                    meta[key] = value
                    state.commit_metadata(node, meta, "propagation")
                state.emit(event, node, kinds[edge])
        if _GPU_SYNC in kinds:
            state.emit(EventType.GPU_SYNC_NEEDED, node, kinds[_GPU_SYNC])
            if table.loc[node]:
                syncs.append(node)
    if syncs:
        # After the pass, so a child recomputed in it is synced with its new bytes.
        try:
            state.sync_device_pages(syncs)
        except MMSBError as exc:
            if first_error is None:
                first_error = exc
        else:
            for node in syncs:
                state.emit(EventType.GPU_SYNC_COMPLETE, node)
    if first_error is not None:
        raise first_error
