"""DAG ordering and cycle detection over node ids."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence


class CycleError(ValueError):
    """The graph has a cycle; ``cycle`` lists it, first node repeated at the end."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__("the pipeline has a cycle: " + " -> ".join(cycle))


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle in ``edges`` (node -> its inputs), or None. Iterative DFS."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(edges, white)
    for root in edges:
        if color[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        color[root] = grey
        while stack:
            node, index = stack[-1]
            deps = edges.get(node, ())
            if index < len(deps):
                stack[-1] = (node, index + 1)
                dep = deps[index]
                if color.get(dep, black) == grey:
                    return [*path[path.index(dep):], dep]
                if color.get(dep, black) == white:
                    color[dep] = grey
                    stack.append((dep, 0))
                    path.append(dep)
            else:
                color[node] = black
                stack.pop()
                path.pop()
    return None


def topological_order(edges: Mapping[str, Sequence[str]]) -> list[str]:
    """Nodes ordered so each comes after all its inputs; stable w.r.t. declaration order.

    Raises :class:`CycleError` when there is no such order.
    """
    cycle = find_cycle(edges)
    if cycle is not None:
        raise CycleError(cycle)
    position = {node: i for i, node in enumerate(edges)}
    waiting = {node: len(set(deps)) for node, deps in edges.items()}
    dependents: dict[str, list[str]] = {node: [] for node in edges}
    for node, deps in edges.items():
        for dep in set(deps):
            dependents[dep].append(node)
    ready = [(position[n], n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, node = heapq.heappop(ready)
        order.append(node)
        for child in dependents[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (position[child], child))
    return order
