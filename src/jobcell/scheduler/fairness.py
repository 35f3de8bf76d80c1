"""Fair order of the queue across owners. Pure.

Policy (fair share by running steps, round-robin between owners):

* Each owner's own queued steps keep their order: higher ``priority`` first, then
  submission order. ``priority`` therefore orders an owner's *own* work; it never
  lets one owner jump ahead of another.
* Across owners the scheduler takes turns. An owner's ``k``-th queued step is served
  at turn ``running(owner) + k``: an owner that already has steps running waits for
  those who have fewer. Ties go to the owner served least recently (``last_served``,
  kept by the worker), then to the owner whose first waiting step is oldest. The
  first tie-break is what keeps turns on a cell where nothing runs when the next
  step is chosen (one slot, or steps that each fill the cell).

So one owner's 10,000 queued jobs never starve another owner's single job: that job
is served at the next free slot after the owners with fewer running steps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Queued:
    """A queued step as the fairness policy sees it."""

    key: Hashable
    owner: str
    priority: int
    seq: int


def fair_order(queued: Sequence[Queued], running: Mapping[str, int],
               last_served: Mapping[str, int] | None = None) -> list[Hashable]:
    """Keys of ``queued`` in the order they should be offered to admission.

    ``last_served`` maps an owner to a number that grows each time one of its steps
    is started (owners never served count as least recent).
    """
    last_served = last_served or {}
    by_owner: dict[str, list[Queued]] = defaultdict(list)
    for item in queued:
        by_owner[item.owner].append(item)
    ranked: list[tuple[int, int, int, str, int, Hashable]] = []
    for owner, items in by_owner.items():
        items.sort(key=lambda q: (-q.priority, q.seq))
        oldest = min(q.seq for q in items)
        base = running.get(owner, 0)
        served = last_served.get(owner, -1)
        for k, item in enumerate(items):
            ranked.append((base + k, served, oldest, owner, k, item.key))
    ranked.sort(key=lambda r: r[:5])
    return [r[5] for r in ranked]
