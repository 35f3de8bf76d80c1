"""Fair order: round-robin across owners by running steps, priority only within an owner."""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Hashable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobcell.scheduler.fairness import Queued, fair_order


def jobs(owner: str, count: int, first_seq: int = 0, priority: int = 0) -> list[Queued]:
    """``count`` queued steps of ``owner`` keyed ``owner:index``, submitted in order."""
    return [Queued(f"{owner}:{i}", owner, priority, first_seq + i) for i in range(count)]


def test_one_owners_flood_does_not_starve_another_owners_single_step() -> None:
    queued = [*jobs("A", 10_000), *jobs("B", 1, first_seq=10_000)]
    order = fair_order(queued, {})
    assert "B:0" in order[:2]
    assert order[0] == "A:0", "with nobody running, the older first step goes first"


def test_an_owner_with_running_steps_waits_for_one_with_none() -> None:
    queued = [*jobs("A", 50), *jobs("B", 1, first_seq=50)]
    order = fair_order(queued, {"A": 3, "B": 0})
    assert order[0] == "B:0"
    assert order[1:] == [f"A:{i}" for i in range(50)]


def test_owners_take_turns_counting_their_running_steps() -> None:
    queued = [*jobs("A", 4), *jobs("B", 4, first_seq=4)]
    assert fair_order(queued, {"A": 2}) == ["B:0", "B:1", "A:0", "B:2", "A:1", "B:3",
                                            "A:2", "A:3"]


def test_running_steps_of_owners_with_nothing_queued_are_ignored() -> None:
    queued = jobs("A", 2)
    assert fair_order(queued, {"Z": 7, "A": 1}) == ["A:0", "A:1"]


def test_priority_orders_an_owners_own_steps_only() -> None:
    low = jobs("A", 3)
    urgent = Queued("A:urgent", "A", 10, 3)
    b_step = Queued("B:0", "B", 0, 4)
    order = fair_order([*low, urgent, b_step], {"A": 1})
    assert order == ["B:0", "A:urgent", "A:0", "A:1", "A:2"]
    # B's low priority does not put it behind A's urgent step either.
    order = fair_order([*low, urgent, Queued("B:0", "B", -5, 4)], {"A": 1})
    assert order[0] == "B:0"


def test_priority_within_an_owner_then_submission_order() -> None:
    queued = [Queued("a", "A", 0, 1), Queued("b", "A", 5, 2), Queued("c", "A", 5, 3),
              Queued("d", "A", -1, 0)]
    assert fair_order(queued, {}) == ["b", "c", "a", "d"]


def test_ties_go_to_the_owner_with_the_oldest_waiting_step() -> None:
    queued = [Queued("late", "A", 0, 20), Queued("early", "B", 0, 10),
              Queued("later", "C", 0, 30)]
    assert fair_order(queued, {}) == ["early", "late", "later"]
    # The oldest *waiting* step counts, even when priority moved a newer one first.
    queued = [Queued("A:new", "A", 9, 40), Queued("A:old", "A", 0, 5),
              Queued("B:0", "B", 0, 10)]
    assert fair_order(queued, {}) == ["A:new", "B:0", "A:old"]


def test_the_order_is_deterministic_whatever_the_input_order() -> None:
    queued = [*jobs("A", 5), *jobs("B", 5, first_seq=5), *jobs("C", 3, first_seq=10)]
    running = {"A": 1, "C": 2}
    expected = fair_order(queued, running)
    assert fair_order(list(reversed(queued)), running) == expected
    assert fair_order(queued[::2] + queued[1::2], dict(reversed(running.items()))) == expected


def test_empty_queue() -> None:
    assert fair_order([], {"A": 3}) == []


# --- properties --------------------------------------------------------------------------

OWNERS = ("A", "B", "C")
queues = st.lists(st.tuples(st.sampled_from(OWNERS), st.integers(-3, 3)), max_size=40).map(
    lambda items: [Queued(f"q{seq}", owner, priority, seq)
                   for seq, (owner, priority) in enumerate(items)])
running_counts = st.dictionaries(st.sampled_from(OWNERS), st.integers(0, 10))


@settings(max_examples=200, deadline=None)
@given(queues, running_counts, st.randoms())
def test_a_permutation_keeping_each_owners_own_order(
        queued: list[Queued], running: dict[str, int], shuffler: random.Random) -> None:
    order = fair_order(queued, running)
    assert sorted(map(str, order)) == sorted(str(q.key) for q in queued)
    assert len(order) == len(queued)
    by_key = {q.key: q for q in queued}
    for owner in OWNERS:
        own = [by_key[key] for key in order if by_key[key].owner == owner]
        assert own == sorted(own, key=lambda q: (-q.priority, q.seq))
    shuffled = list(queued)
    shuffler.shuffle(shuffled)
    assert fair_order(shuffled, running) == order, "input order must not matter"


@settings(max_examples=200, deadline=None)
@given(queues, running_counts)
def test_each_next_step_belongs_to_an_owner_with_the_fewest_turns(
        queued: list[Queued], running: dict[str, int]) -> None:
    """An owner's k-th step comes at its turn running + k, so reading the order front to
    back, the next step is always of an owner whose turn count is lowest among the owners
    that still have steps waiting."""
    order = fair_order(queued, running)
    owner_of = {q.key: q.owner for q in queued}
    waiting = Counter(q.owner for q in queued)
    turns = {owner: running.get(owner, 0) for owner in waiting}
    for key in order:
        owner = owner_of[key]
        others = [turns[o] for o in waiting if o != owner and waiting[o]]
        assert all(turns[owner] <= other for other in others), (key, turns)
        turns[owner] += 1
        waiting[owner] -= 1


# --- simulation --------------------------------------------------------------------------


def serve(queued: Sequence[Queued], slots: int, rounds: int) -> list[Hashable]:
    """Admit the first step of the fair order each round; once ``slots`` steps are
    running, the oldest completes at the end of the round. The keys in serving order."""
    waiting = {q.key: q for q in queued}
    running: deque[str] = deque()
    served = []
    last_served: dict[str, int] = {}
    for turn in range(rounds):
        if not waiting:
            break
        key = fair_order(list(waiting.values()), Counter(running), last_served)[0]
        owner = waiting.pop(key).owner
        running.append(owner)
        last_served[owner] = turn
        served.append(key)
        if len(running) >= slots:
            running.popleft()
    return served


@pytest.mark.parametrize("slots", [2, 3, 4, 8])
def test_a_small_owner_is_served_early_behind_a_large_one(slots: int) -> None:
    queued = [*jobs("A", 1000), *jobs("B", 5, first_seq=1000)]
    served = serve(queued, slots, rounds=20)
    assert {f"B:{i}" for i in range(5)} <= set(served[:15])
    assert served.index("B:0") <= 1
    b_rounds = [i for i, key in enumerate(served) if str(key).startswith("B")]
    assert b_rounds == sorted(b_rounds) and len(b_rounds) == 5


def test_a_small_owner_is_served_early_on_a_one_slot_cell() -> None:
    queued = [*jobs("A", 1000), *jobs("B", 5, first_seq=1000)]
    served = serve(queued, slots=1, rounds=20)
    assert {f"B:{i}" for i in range(5)} <= set(served[:10])
