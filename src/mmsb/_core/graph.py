"""The dependency graph between pages: typed edges parent → child, kept acyclic."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import GraphCycleError, InvalidArgumentError
from ..types import EdgeType

__all__ = ["ShadowPageGraph", "as_page_id", "compute_closure", "detect_cycles",
           "reverse_postorder"]


def as_page_id(page_id: Any, fn: str) -> int:
    """A page id given to call ``fn``: an int (numpy ints and other integers too) as an
    int; a bool, a float or anything else (which a lookup would find nothing under, or
    fail on as unhashable) is InvalidArgumentError."""
    if type(page_id) is int:
        return page_id
    if isinstance(page_id, bool) or not hasattr(page_id, "__index__"):
        raise InvalidArgumentError(f"{fn}(): a page id must be an int, not "
                                   f"{type(page_id).__name__}")
    return int(page_id)


class ShadowPageGraph:
    """Typed, acyclic edges between page ids.

    ``children[p]`` and ``parents[c]`` map to ``{other_id: EdgeType}``. Adding an edge
    checks reachability from the child to the parent (O(edges reachable from the
    child)), never a whole-graph scan.
    """

    def __init__(self) -> None:
        self.children: dict[int, dict[int, EdgeType]] = {}
        self.parents: dict[int, dict[int, EdgeType]] = {}
        self._owner: Callable[[], Any] | None = None

    @property
    def owner(self) -> Any:
        """The state this graph belongs to (None for a free-standing graph)."""
        return None if self._owner is None else self._owner()

    # -- queries ---------------------------------------------------------------------
    @property
    def edge_count(self) -> int:
        return sum(len(c) for c in self.children.values())

    @property
    def nodes(self) -> set[int]:
        """Ids that have at least one edge."""
        return set(self.children) | set(self.parents)

    def edges(self) -> list[tuple[int, int, EdgeType]]:
        """Every edge as ``(parent, child, type)``, sorted."""
        return sorted((p, c, t) for p, cs in self.children.items() for c, t in cs.items())

    def has_edge(self, parent: int, child: int) -> bool:
        return as_page_id(child, "has_edge") in self.children.get(as_page_id(parent, "has_edge"), {})

    def get_children(self, page_id: int) -> list[tuple[int, EdgeType]]:
        """``(child_id, edge_type)`` pairs, by child id."""
        return sorted(self.children.get(as_page_id(page_id, "get_children"), {}).items())

    def get_parents(self, page_id: int) -> list[tuple[int, EdgeType]]:
        """``(parent_id, edge_type)`` pairs, by parent id."""
        return sorted(self.parents.get(as_page_id(page_id, "get_parents"), {}).items())

    def path(self, start: int, goal: int) -> list[int] | None:
        """A path start → … → goal along edges, or None. Iterative BFS."""
        start, goal = as_page_id(start, "path"), as_page_id(goal, "path")
        if start == goal:
            return [start]
        prev: dict[int, int] = {start: start}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in self.children.get(node, ()):
                if nxt in prev:
                    continue
                prev[nxt] = node
                if nxt == goal:
                    out = [goal]
                    while out[-1] != start:
                        out.append(prev[out[-1]])
                    return out[::-1]
                queue.append(nxt)
        return None

    def find_descendants(self, page_id: int) -> set[int]:
        """Every id reachable from ``page_id`` (not itself). Iterative."""
        return self._reach(as_page_id(page_id, "find_descendants"), self.children)

    def find_ancestors(self, page_id: int) -> set[int]:
        """Every id from which ``page_id`` is reachable (not itself). Iterative."""
        return self._reach(as_page_id(page_id, "find_ancestors"), self.parents)

    @staticmethod
    def _reach(start: int, adj: dict[int, dict[int, EdgeType]]) -> set[int]:
        seen: set[int] = set()
        stack = list(adj.get(start, ()))
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            stack.extend(adj.get(node, ()))
        seen.discard(start)
        return seen

    def has_cycle(self) -> bool:
        """True if the edges hold a cycle (never, unless built around the checks)."""
        return len(self.topological_sort()) < len(self.nodes)

    def topological_sort(self, subset: Iterable[int] | None = None) -> list[int]:
        """Ids in an order where every parent comes before its children (Kahn's algorithm,
        smallest id first among the ready ones, so the order is deterministic). With
        ``subset``, only those ids and the edges among them. O(V log V + E)."""
        if subset is None:
            nodes = self.nodes
        elif isinstance(subset, str | bytes) or not isinstance(subset, Iterable):
            raise InvalidArgumentError("topological_sort(): subset must be an iterable of "
                                       f"page ids or None, not {type(subset).__name__}")
        else:
            nodes = {as_page_id(n, "topological_sort") for n in subset}
        indeg = {n: 0 for n in nodes}
        for n in nodes:
            for c in self.children.get(n, ()):
                if c in indeg:
                    indeg[c] += 1
        ready = [n for n, d in indeg.items() if d == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            n = heapq.heappop(ready)
            order.append(n)
            for c in self.children.get(n, ()):
                if c in indeg:
                    indeg[c] -= 1
                    if indeg[c] == 0:
                        heapq.heappush(ready, c)
        return order

    # -- changes (the state logs them; these only mutate) ----------------------------
    def check_edge(self, parent: int, child: int) -> None:
        """Raise GraphCycleError if ``parent → child`` would close a cycle."""
        if parent == child:
            raise GraphCycleError(parent, child, [parent])
        back = self.path(child, parent)
        if back is not None:
            raise GraphCycleError(parent, child, back)

    def add_edge(self, parent: int, child: int, edge_type: EdgeType) -> None:
        self.children.setdefault(parent, {})[child] = edge_type
        self.parents.setdefault(child, {})[parent] = edge_type

    def remove_edge(self, parent: int, child: int) -> None:
        cs = self.children.get(parent)
        if cs is not None:
            cs.pop(child, None)
            if not cs:
                del self.children[parent]
        ps = self.parents.get(child)
        if ps is not None:
            ps.pop(parent, None)
            if not ps:
                del self.parents[child]

    def edges_of(self, page_id: int) -> list[tuple[int, int]]:
        """Every edge touching ``page_id`` as ``(parent, child)``."""
        out = [(page_id, c) for c in self.children.get(page_id, ())]
        out += [(p, page_id) for p in self.parents.get(page_id, ())]
        return out

    def max_depth(self) -> int:
        """Length in edges of the longest path. O(V + E)."""
        depth: dict[int, int] = {}
        best = 0
        for n in self.topological_sort():
            d = depth.get(n, 0)
            for c in self.children.get(n, ()):
                if depth.get(c, 0) < d + 1:
                    depth[c] = d + 1
                    best = max(best, d + 1)
        return best

    def copy(self) -> ShadowPageGraph:
        g = ShadowPageGraph()
        g.children = {p: dict(cs) for p, cs in self.children.items()}
        g.parents = {c: dict(ps) for c, ps in self.parents.items()}
        return g

    def _check(self) -> None:
        """Assert the two adjacency maps mirror each other and no cycle exists."""
        fwd = {(p, c, t) for p, cs in self.children.items() for c, t in cs.items()}
        back = {(p, c, t) for c, ps in self.parents.items() for p, t in ps.items()}
        assert fwd == back, "children and parents maps disagree"
        assert all(self.children.values()) and all(self.parents.values()), "empty adjacency kept"
        assert not self.has_cycle(), "the graph holds a cycle"


# -- whole-graph helpers ---------------------------------------------------------------

def compute_closure(graph: ShadowPageGraph, ids: Iterable[int]) -> set[int]:
    """Every id reachable from ``ids`` along edges, ``ids`` themselves included: the
    pages a change to ``ids`` can reach. Iterative.

    Args:
        graph: the graph to walk.
        ids: starting ids (integers; duplicates are fine).

    Cost: O(ids + edges reachable from them).
    """
    adj = graph.children
    seen: set[int] = set()
    stack = list(ids)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        nxt = adj.get(node)
        if nxt:
            stack.extend(c for c in nxt if c not in seen)
    return seen


def detect_cycles(graph: ShadowPageGraph) -> list[list[int]]:
    """The cycles of ``graph``, one per strongly connected group of ids that holds one.

    Each cycle is the shortest one through the smallest id of its group, as the ids in
    edge order starting there: ``[2, 5, 7]`` stands for 2 → 5 → 7 → 2, ``[4]`` for a
    self-edge 4 → 4. The list is sorted by first id and is empty for an acyclic graph
    (always, for a graph changed only through the checked calls). Only ``children`` is
    read, so a graph whose edges were set by hand is judged by its forward edges.
    Iterative (Tarjan's algorithm with an explicit stack), so chains of any length work.

    Args:
        graph: the graph to examine.

    Cost: O(V + E).
    """
    adj = graph.children
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    comp_stack: list[int] = []
    groups: list[list[int]] = []
    counter = 0
    for root in sorted(graph.nodes):
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        comp_stack.append(root)
        on_stack.add(root)
        work: list[tuple[int, Iterator[int]]] = [(root, iter(sorted(adj.get(root, ()))))]
        while work:
            node, it = work[-1]
            advanced = False
            for child in it:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    comp_stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adj.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack and index[child] < low[node]:
                    low[node] = index[child]
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                if low[node] < low[parent]:
                    low[parent] = low[node]
            if low[node] == index[node]:
                group: list[int] = []
                while True:
                    member = comp_stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in adj.get(node, {}):
                    groups.append(group)
    cycles = [_shortest_cycle(adj, set(g), min(g)) for g in groups]
    cycles.sort(key=lambda c: c[0])
    return cycles


def _shortest_cycle(adj: dict[int, dict[int, EdgeType]], members: set[int],
                    start: int) -> list[int]:
    """The shortest cycle through ``start`` inside one strongly connected group (BFS)."""
    if start in adj.get(start, {}):
        return [start]
    prev: dict[int, int] = {start: start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(adj.get(node, ())):
            if nxt == start:
                out = [node]
                while out[-1] != start:
                    out.append(prev[out[-1]])
                return out[::-1]
            if nxt in members and nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"page {start} is in a strongly connected group but on no cycle")


def reverse_postorder(graph: ShadowPageGraph) -> list[int]:
    """The ids that have edges, in reverse postorder of a depth-first search that starts
    from the ids without parents (then from any id not yet reached, for cycles), smallest
    id first, and visits children by id. On an acyclic graph every parent comes before
    its children (a topological order, in general not the one of topological_sort).
    Iterative: chains of any length work.

    Args:
        graph: the graph to order.

    Cost: O(V log V + E log E) (children are visited sorted).
    """
    adj = graph.children
    nodes = graph.nodes
    parents = graph.parents
    roots = sorted(n for n in nodes if not parents.get(n))
    seen: set[int] = set()
    post: list[int] = []
    for root in roots + sorted(nodes):
        if root in seen:
            continue
        seen.add(root)
        work: list[tuple[int, Iterator[int]]] = [(root, iter(sorted(adj.get(root, ()))))]
        while work:
            node, it = work[-1]
            for child in it:
                if child not in seen:
                    seen.add(child)
                    work.append((child, iter(sorted(adj.get(child, ())))))
                    break
            else:
                work.pop()
                post.append(node)
    post.reverse()
    return post
