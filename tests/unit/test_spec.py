"""Job spec validation, compilation to durable steps, and spec_hash."""

from __future__ import annotations

from typing import Any

import pytest

from jobcell.errors import SpecError
from jobcell.model.spec import (
    MAX_SPEC_BYTES,
    MAX_STEPS,
    CompiledJob,
    JobSpec,
    compile_spec,
    parse_spec,
)

from .helpers import make_runner, node, pipeline, standard_runners

RUNNERS = standard_runners()


def compile_ok(spec: dict[str, Any]) -> CompiledJob:
    return compile_spec(spec, RUNNERS)


def compile_error(spec: Any) -> str:
    with pytest.raises(SpecError) as info:
        compile_spec(spec, RUNNERS)
    return str(info.value)


# --- valid specs -------------------------------------------------------------------------


def test_pipeline_compiles_in_dependency_order_with_nested_layout() -> None:
    job = compile_ok(pipeline(
        node("report", "noop", ["count", "make"]),
        node("count", "word_count", ["make"]),
        node("make", "make_text", params={"lines": 100}),
    ))
    assert [s.step_id for s in job.steps] == ["make", "count", "report"]
    assert [s.index for s in job.steps] == [0, 1, 2]
    assert {s.input_layout for s in job.steps} == {"nested"}
    by_id = {s.step_id: s for s in job.steps}
    assert by_id["report"].inputs == ("count", "make")
    assert by_id["make"].params == {"lines": 100}
    assert by_id["count"].params == {"min_length": 1, "mode": "words"}
    assert by_id["count"].runner_hash == RUNNERS["word_count"].definition_hash()
    assert job.label == "demo"


def test_ordered_steps_compile_to_a_chain_with_flat_layout() -> None:
    job = compile_ok({"label": "demo", "steps": [
        {"runner": "make_text"}, {"runner": "word_count"}, {"id": "last", "runner": "noop"}]})
    assert [s.step_id for s in job.steps] == ["0-make_text", "1-word_count", "last"]
    assert [s.inputs for s in job.steps] == [(), ("0-make_text",), ("1-word_count",)]
    assert {s.input_layout for s in job.steps} == {"flat"}


def test_parse_spec_accepts_a_jobspec_object_and_normalises_label_and_tags() -> None:
    spec = JobSpec.model_validate(
        {"label": "  demo ", "tags": ["b", "a", "b"], "steps": [{"runner": "noop"}]})
    parsed = parse_spec(spec)
    assert parsed.label == "demo"
    assert parsed.tags == ["a", "b"]
    assert compile_ok(parsed.model_dump(exclude_none=True)).tags == ("a", "b")


def test_cache_flags_combine_spec_node_and_runner() -> None:
    runners = {**RUNNERS, "volatile": make_runner("volatile", cacheable=False)}
    job = compile_spec(pipeline(node("a"), node("b", cache=False), node("c", "volatile")),
                       runners)
    assert [s.cache for s in job.steps] == [True, False, False]
    job = compile_spec(pipeline(node("a"), cache=False), runners)
    assert job.cache is False
    assert [s.cache for s in job.steps] == [False]


def test_canonical_spec_omits_unset_fields() -> None:
    job = compile_ok(pipeline(node("a")))
    assert job.spec == {"label": "demo", "tags": [], "priority": 0, "cache": True,
                        "pipeline": [{"id": "a", "runner": "noop", "params": {},
                                      "inputs": []}]}


# --- invalid specs -----------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    (pipeline(node("a", "nope")), "unknown runner 'nope'"),
    (pipeline(node("a", "make_text", params={"colour": 1})), "unknown param 'colour'"),
    (pipeline(node("a", "make_text", params={"lines": "ten"})),
     "param 'lines' expected integer"),
    (pipeline(node("a", "make_text", params={"lines": True})),
     "param 'lines' expected integer"),
    (pipeline(node("a", "make_text", params={"lines": 0})), "must be >= 1"),
    (pipeline(node("a", "word_count", params={"mode": "lines"})), "must be one of"),
    (pipeline(node("a", "greet")), "missing required param 'name'"),
    (pipeline(node("a"), node("a")), "duplicate node id 'a'"),
    (pipeline(node("a", inputs=["ghost"])), "input 'ghost' is not a node of this job"),
    (pipeline(node("a"), node("b", inputs=["a", "a"])), "an input is listed twice"),
    ({"label": "x", "steps": [{"runner": "noop"}], "pipeline": [node("a")]},
     "exactly one of 'steps'"),
    ({"label": "x"}, "exactly one of 'steps'"),
    ({"label": "x", "pipeline": []}, "at least one step"),
    ({"label": "x", "steps": []}, "at least one step"),
    ({"label": "", "steps": [{"runner": "noop"}]}, "label must be a non-empty string"),
    ({"label": "   ", "steps": [{"runner": "noop"}]}, "label must be a non-empty string"),
    ({"steps": [{"runner": "noop"}]}, "field 'label'"),
    ({"label": "a\x00b", "steps": [{"runner": "noop"}]}, "printable"),
    ({"label": "x", "tags": [""], "steps": [{"runner": "noop"}]}, "tag ''"),
    ({"label": "x", "steps": [{"runner": "noop"}], "owner": "eve"}, "field 'owner': unknown"),
    (pipeline({"id": "a", "runner": "noop", "command": "rm -rf /"}),
     "field 'pipeline.0.command': unknown field"),
    (pipeline({"runner": "noop"}), "every pipeline node needs an 'id'"),
    ({"label": "x", "steps": [{"runner": "noop"}, {"runner": "noop", "inputs": ["0-noop"]}]},
     "ordered steps take no 'inputs'"),
    ({"label": "x", "steps": [{"id": "s", "runner": "noop"}, {"id": "s", "runner": "noop"}]},
     "duplicate node id 's'"),
    ("label: x", "must be a mapping"),
    (["label"], "must be a mapping"),
    ({"label": "x", "steps": [{"runner": "noop", "params": {"v": {1, 2}}}]},
     "not JSON-serialisable"),
    ({"label": "x", "priority": "high", "steps": [{"runner": "noop"}]}, "field 'priority'"),
    ({"label": "x", "priority": 10**23, "steps": [{"runner": "noop"}]}, "field 'priority'"),
    ({"label": "x", "priority": -(10**23), "steps": [{"runner": "noop"}]}, "field 'priority'"),
    ({"label": "x", "priority": 1e23, "steps": [{"runner": "noop"}]}, "field 'priority'"),
    ({"label": "x", "priority": 2**63, "steps": [{"runner": "noop"}]}, "field 'priority'"),
])
def test_invalid_specs_are_rejected_with_a_clear_message(spec: Any, expected: str) -> None:
    assert expected in compile_error(spec)


@pytest.mark.parametrize("priority", [1_000_000_000, -1_000_000_000, 0, 7])
def test_priority_within_bounds_is_kept(priority: int) -> None:
    assert compile_ok({"label": "x", "priority": priority,
                       "steps": [{"runner": "noop"}]}).priority == priority


def test_label_with_trailing_newline_is_stripped_not_rejected() -> None:
    assert parse_spec({"label": "x\n", "steps": [{"runner": "noop"}]}).label == "x"


@pytest.mark.parametrize("bad_id", ["..", ".", "a/b", "../etc", "a\\b", "", "a b", "/abs",
                                    "a\nb", "é"])
def test_node_ids_that_could_escape_their_directory_are_rejected(bad_id: str) -> None:
    message = compile_error(pipeline(node(bad_id)))
    assert "node id" in message
    assert "pipeline.0.id" in message


@pytest.mark.parametrize("bad_id", ["..", "a/b"])
def test_ordered_step_ids_are_checked_too(bad_id: str) -> None:
    assert "steps.0.id" in compile_error({"label": "x", "steps": [{"id": bad_id,
                                                                   "runner": "noop"}]})


def test_cycle_is_named_in_the_error() -> None:
    message = compile_error(pipeline(node("a", inputs=["b"]), node("b", inputs=["a"])))
    assert "cycle" in message
    assert "a -> b -> a" in message


def test_self_loop_is_a_cycle() -> None:
    assert "a -> a" in compile_error(pipeline(node("a", inputs=["a"])))


def test_longer_cycle_behind_a_valid_prefix_is_named() -> None:
    message = compile_error(pipeline(
        node("start"), node("x", inputs=["start", "z"]), node("y", inputs=["x"]),
        node("z", inputs=["y"])))
    assert "x -> z -> y -> x" in message


def test_spec_size_limit() -> None:
    big = "x" * (MAX_SPEC_BYTES + 1)
    message = compile_error({"label": "x", "steps": [{"runner": "greet",
                                                      "params": {"name": big}}]})
    assert f"the limit is {MAX_SPEC_BYTES}" in message
    # Just under the limit is fine (the size check is not the thing that fails).
    fits = "x" * (MAX_SPEC_BYTES - 200)
    assert compile_ok({"label": "x", "steps": [{"runner": "greet",
                                                "params": {"name": fits}}]})


def test_step_count_limit() -> None:
    message = compile_error({"label": "x", "steps": [{"runner": "noop"}] * (MAX_STEPS + 1)})
    assert f"at most {MAX_STEPS} steps" in message


def test_first_validation_problem_is_reported_with_a_count_of_the_rest() -> None:
    message = compile_error({"label": "", "priority": "p", "steps": [{"runner": "noop"}]})
    assert "(and 1 more problem(s))" in message


# --- spec_hash ---------------------------------------------------------------------------


def spec_hash_of(spec: dict[str, Any], runners: dict[str, Any] | None = None) -> str:
    return compile_spec(spec, runners or RUNNERS).spec_hash


BASE = pipeline(node("make", "make_text", params={"lines": 5}),
                node("count", "word_count", ["make"]))


def test_same_work_gives_the_same_hash() -> None:
    assert spec_hash_of(BASE) == spec_hash_of(dict(BASE))
    # Declaration order of nodes and key order of dicts are not part of the work.
    reordered = pipeline(node("count", "word_count", ["make"]),
                         {"params": {"lines": 5}, "runner": "make_text", "id": "make"})
    assert spec_hash_of(reordered) == spec_hash_of(BASE)


def test_tags_priority_and_cache_do_not_change_the_hash() -> None:
    varied = {**BASE, "tags": ["x", "y"], "priority": 7, "cache": False}
    assert spec_hash_of(varied) == spec_hash_of(BASE)


def test_owner_is_not_part_of_a_spec_or_its_hash() -> None:
    # Owner is set by the service, never by the spec; a spec that tries is rejected.
    assert "owner" in compile_error({**BASE, "owner": "eve"})


def test_params_equal_to_defaults_hash_the_same_explicit_or_omitted() -> None:
    explicit = pipeline(node("make", "make_text", params={"lines": 5}),
                        node("count", "word_count", ["make"],
                             params={"min_length": 1, "mode": "words"}))
    assert spec_hash_of(explicit) == spec_hash_of(BASE)


@pytest.mark.parametrize("changed", [
    pipeline(node("make", "make_text", params={"lines": 6}),
             node("count", "word_count", ["make"])),
    pipeline(node("make", "make_text", params={"lines": 5}),
             node("count", "word_count", ["make"], params={"mode": "chars"})),
    pipeline(node("make", "make_text", params={"lines": 5}), node("count", "word_count")),
    pipeline(node("make2", "make_text", params={"lines": 5}),
             node("count", "word_count", ["make2"])),
    {**BASE, "label": "other"},
])
def test_different_work_gives_a_different_hash(changed: dict[str, Any]) -> None:
    assert spec_hash_of(changed) != spec_hash_of(BASE)


def test_changed_runner_definition_changes_the_hash() -> None:
    upgraded = {**RUNNERS, "make_text": RUNNERS["make_text"].model_copy(
        update={"version": "2"})}
    assert spec_hash_of(BASE, upgraded) != spec_hash_of(BASE)
    other_args = {**RUNNERS, "make_text": RUNNERS["make_text"].model_copy(
        update={"args_template": ["--fast"]})}
    assert spec_hash_of(BASE, other_args) != spec_hash_of(BASE)


def test_ordered_steps_and_pipeline_differ_because_inputs_are_staged_differently() -> None:
    steps = {"label": "demo", "steps": [{"id": "a", "runner": "noop"},
                                        {"id": "b", "runner": "noop"}]}
    dag = pipeline(node("a"), node("b", inputs=["a"]))
    assert spec_hash_of(steps) != spec_hash_of(dag)


def test_overlong_node_id_is_refused() -> None:
    from jobcell.errors import SpecError
    from jobcell.model.spec import parse_spec

    with pytest.raises(SpecError, match="limit is 100"):
        parse_spec({"label": "x", "pipeline": [{"id": "a" * 101, "runner": "r"}]})
