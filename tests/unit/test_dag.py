"""DAG ordering and cycle detection, directly and through compile_spec (with hypothesis)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobcell.errors import SpecError
from jobcell.model.dag import CycleError, find_cycle, topological_order
from jobcell.model.spec import compile_spec

from .helpers import standard_runners

Graph = dict[str, list[str]]  # node -> its inputs, in declaration order
RUNNERS = standard_runners()
CYCLE_IN_MESSAGE = re.compile(r"cycle: (.+)$")


def assert_respects_edges(order: list[str], graph: Graph) -> None:
    assert sorted(order) == sorted(graph), "every node appears exactly once"
    position = {name: i for i, name in enumerate(order)}
    for name, inputs in graph.items():
        for dep in inputs:
            assert position[dep] < position[name], f"{dep} must come before {name}"


def assert_real_cycle(cycle: list[str], graph: Graph) -> None:
    assert len(cycle) >= 2
    assert cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1, "a simple cycle visits each node once"
    for node, dep in itertools.pairwise(cycle):
        assert dep in graph[node], f"{node} -> {dep} is not an edge of the graph"


def compile_graph(graph: Graph) -> list[str]:
    spec = {"label": "dag", "pipeline": [
        {"id": name, "runner": "noop", "inputs": inputs} for name, inputs in graph.items()]}
    return [step.step_id for step in compile_spec(spec, RUNNERS).steps]


@st.composite
def dags(draw: st.DrawFn, min_nodes: int = 1, max_nodes: int = 14) -> Graph:
    """Random DAGs: edges only to earlier nodes, then declared in a shuffled order."""
    count = draw(st.integers(min_nodes, max_nodes))
    # Names are a shuffle of n0..nK, so name order says nothing about edge direction.
    names = [f"n{i}" for i in draw(st.permutations(range(count)))]
    inputs = [draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=4)) if i else []
              for i in range(count)]
    order = draw(st.permutations(range(count)))
    return {names[i]: inputs[i] for i in order}


@st.composite
def cyclic_graphs(draw: st.DrawFn) -> Graph:
    """A random DAG with at least one cycle injected among some of its nodes."""
    graph = draw(dags(min_nodes=1))
    names = list(graph)
    members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names),
                            unique=True))
    for node, dep in zip(members, members[1:] + members[:1], strict=True):
        if dep not in graph[node]:
            graph[node] = [*graph[node], dep]
    return graph


def has_cycle_oracle(graph: Graph) -> bool:
    """Independent check: Kahn's algorithm leaves nodes behind exactly when there is a cycle."""
    remaining = {name: set(inputs) for name, inputs in graph.items()}
    while True:
        ready = [name for name, deps in remaining.items() if not deps]
        if not ready:
            return bool(remaining)
        for name in ready:
            del remaining[name]
        for deps in remaining.values():
            deps.difference_update(ready)


# --- examples ----------------------------------------------------------------------------


def test_order_is_stable_with_respect_to_declaration_order() -> None:
    graph = {"c": [], "a": [], "b": ["c"], "d": ["a", "b"]}
    assert topological_order(graph) == ["c", "a", "b", "d"]


def test_independent_nodes_keep_declaration_order() -> None:
    assert topological_order({"z": [], "y": [], "x": []}) == ["z", "y", "x"]


def test_diamond() -> None:
    graph = {"join": ["left", "right"], "left": ["top"], "right": ["top"], "top": []}
    assert topological_order(graph) == ["top", "left", "right", "join"]


def test_find_cycle_returns_none_for_a_dag_and_the_cycle_otherwise() -> None:
    assert find_cycle({"a": [], "b": ["a"]}) is None
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["a"]}) == ["a", "a"]


def test_cycle_error_carries_the_cycle_and_names_it() -> None:
    with pytest.raises(CycleError) as info:
        topological_order({"a": ["b"], "b": ["a"]})
    assert info.value.cycle == ["a", "b", "a"]
    assert str(info.value) == "the pipeline has a cycle: a -> b -> a"


def test_deep_chain_does_not_hit_the_recursion_limit() -> None:
    count = 5000
    graph = {f"n{i}": [f"n{i - 1}"] if i else [] for i in range(count)}
    assert topological_order(dict(reversed(graph.items()))) == [f"n{i}" for i in range(count)]
    graph["n0"] = [f"n{count - 1}"]
    cycle = find_cycle(graph)
    assert cycle is not None
    assert len(cycle) == count + 1


# --- properties --------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(dags())
def test_topological_order_respects_every_edge(graph: Graph) -> None:
    assert find_cycle(graph) is None
    assert_respects_edges(topological_order(graph), graph)


@settings(max_examples=60, deadline=None)
@given(dags())
def test_compiled_step_order_respects_every_edge(graph: Graph) -> None:
    assert_respects_edges(compile_graph(graph), graph)


@settings(max_examples=100, deadline=None)
@given(cyclic_graphs())
def test_every_injected_cycle_is_found_and_is_a_real_cycle(graph: Graph) -> None:
    cycle = find_cycle(graph)
    assert cycle is not None
    assert_real_cycle(cycle, graph)
    with pytest.raises(CycleError) as info:
        topological_order(graph)
    assert_real_cycle(info.value.cycle, graph)


@settings(max_examples=60, deadline=None)
@given(cyclic_graphs())
def test_compile_rejects_every_cyclic_pipeline_naming_a_real_cycle(graph: Graph) -> None:
    with pytest.raises(SpecError) as info:
        compile_graph(graph)
    match = CYCLE_IN_MESSAGE.search(str(info.value))
    assert match is not None, str(info.value)
    assert_real_cycle(match.group(1).split(" -> "), graph)


@st.composite
def any_graphs(draw: st.DrawFn) -> Graph:
    """Arbitrary graphs over a few nodes (cyclic or not)."""
    names = draw(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=8, unique=True))
    return {name: draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
            for name in names}


@settings(max_examples=200, deadline=None)
@given(any_graphs())
def test_find_cycle_agrees_with_an_independent_oracle(graph: Graph) -> None:
    cycle = find_cycle(graph)
    assert (cycle is not None) == has_cycle_oracle(graph)
    if cycle is None:
        assert_respects_edges(topological_order(graph), graph)
    else:
        assert_real_cycle(cycle, graph)
