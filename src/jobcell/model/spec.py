"""Job specs (ordered steps or a DAG pipeline) and their compilation to durable steps."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobcell.errors import SpecError
from jobcell.model.canonical import canonical_json, hash_value
from jobcell.model.dag import CycleError, topological_order
from jobcell.model.params import validate_params
from jobcell.model.profiles import apply_profile
from jobcell.model.runner import (
    ProfileResources,
    Resources,
    RunnerDefinition,
    check_name,
    check_relative_path,
)
from jobcell.model.validation import describe_validation_error

MAX_SPEC_BYTES = 1_048_576
MAX_STEPS = 10_000
SPEC_HASH_VERSION = 1
MAX_FILES_PER_NODE = 1000
DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
# The size of an upload the submitting owner made (by its BLAKE3 digest), or None.
UploadSize = Callable[[str], "int | None"]


class NodeSpec(BaseModel):
    """One node of a pipeline, or one ordered step (where ``id`` may be omitted)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    runner: str
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict)
    cache: bool | None = None
    # Per-step provisioning: replaces the named parts of the runner's (or its chosen
    # profile's) resources. Not part of the step-cache key.
    resources: ProfileResources | None = None

    @field_validator("files")
    @classmethod
    def _files(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_FILES_PER_NODE:
            raise ValueError(f"at most {MAX_FILES_PER_NODE} files per node, got {len(value)}")
        for name, digest in value.items():
            check_relative_path(name, "file name")
            if len(name) > 1000 or "\x00" in name or "\\" in name:
                raise ValueError(f"file name {name[:40]!r} is too long or has a NUL "
                                 "character or a backslash")
            if "." in name.split("/"):
                raise ValueError(f"file name {name!r} must not have '.' segments")
            if not isinstance(digest, str) or not DIGEST_PATTERN.fullmatch(digest):
                raise ValueError(f"file {name!r}: {str(digest)[:80]!r} is not the BLAKE3 hex "
                                 "digest of an upload (64 lowercase hex digits)")
        for name in value:
            parts = name.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder in value:
                    raise ValueError(f"file {folder!r} cannot also be the folder of {name!r}")
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "node id")


class JobSpec(BaseModel):
    """What a user submits: a label, tags, priority and steps or a pipeline."""

    model_config = ConfigDict(extra="forbid")

    label: str
    tags: list[str] = Field(default_factory=list)
    priority: int = Field(default=0, ge=-1_000_000_000, le=1_000_000_000)
    cache: bool = True
    steps: list[NodeSpec] | None = None
    pipeline: list[NodeSpec] | None = None

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("label must be a non-empty string naming the submitting domain")
        if len(value) > 200 or any(ord(c) < 32 for c in value):
            raise ValueError("label must be at most 200 printable characters")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not tag or len(tag) > 200 or any(ord(c) < 32 for c in tag):
                raise ValueError(f"tag {tag!r} must be 1-200 printable characters")
        return sorted(set(value))


@dataclass(frozen=True)
class CompiledStep:
    """One step in the durable step model, with everything resolved at submit."""

    step_id: str
    index: int
    runner: RunnerDefinition
    runner_hash: str
    params: dict[str, Any]
    inputs: tuple[str, ...]
    input_layout: Literal["nested", "flat"]
    cache: bool
    files: dict[str, str] = field(default_factory=dict)
    profile: str | None = None

    @property
    def resources(self) -> Resources:
        return self.runner.resources


@dataclass(frozen=True)
class CompiledJob:
    """A validated job: its canonical spec, ``spec_hash`` and ordered steps."""

    label: str
    tags: tuple[str, ...]
    priority: int
    cache: bool
    spec: dict[str, Any]
    spec_hash: str
    steps: tuple[CompiledStep, ...]


def parse_spec(data: Any) -> JobSpec:
    """Validate raw spec data (a dict, or a JobSpec) into a :class:`JobSpec`."""
    if isinstance(data, JobSpec):
        data = data.model_dump(exclude_none=True)
    if not isinstance(data, dict):
        raise SpecError(f"a job spec must be a mapping, got {type(data).__name__}")
    try:
        size = len(canonical_json(data).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"the job spec is not JSON-serialisable: {exc}") from None
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"the job spec is {size} bytes; the limit is {MAX_SPEC_BYTES}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc, "job spec")) from None
    if (spec.steps is None) == (spec.pipeline is None):
        raise SpecError("a job spec needs exactly one of 'steps' (ordered) or 'pipeline' (DAG)")
    nodes = spec.steps if spec.steps is not None else spec.pipeline
    if not nodes:
        raise SpecError("a job spec needs at least one step")
    if len(nodes) > MAX_STEPS:
        raise SpecError(f"a job spec may have at most {MAX_STEPS} steps, got {len(nodes)}")
    return spec


def _ordered_nodes(spec: JobSpec) -> tuple[list[NodeSpec], Literal["nested", "flat"]]:
    """Nodes with ids and inputs filled in; ordered steps chain to their predecessor."""
    if spec.pipeline is not None:
        for i, node in enumerate(spec.pipeline):
            if node.id is None:
                raise SpecError(f"pipeline[{i}]: every pipeline node needs an 'id'")
        return list(spec.pipeline), "nested"
    assert spec.steps is not None
    nodes: list[NodeSpec] = []
    for i, step in enumerate(spec.steps):
        if step.inputs:
            raise SpecError(f"steps[{i}]: ordered steps take no 'inputs' (use 'pipeline')")
        node_id = step.id or f"{i}-{step.runner}"
        inputs = [nodes[-1].id] if nodes else []
        nodes.append(step.model_copy(update={"id": node_id, "inputs": inputs}))
    return nodes, "flat"


def _check_graph(nodes: list[NodeSpec]) -> list[str]:
    ids: dict[str, int] = {}
    for i, node in enumerate(nodes):
        assert node.id is not None
        if node.id in ids:
            raise SpecError(f"duplicate node id {node.id!r} (nodes {ids[node.id]} and {i})")
        ids[node.id] = i
    for node in nodes:
        for ref in node.inputs:
            if ref not in ids:
                raise SpecError(f"node {node.id!r}: input {ref!r} is not a node of this job")
        if len(set(node.inputs)) != len(node.inputs):
            raise SpecError(f"node {node.id!r}: an input is listed twice")
    try:
        return topological_order({n.id: list(n.inputs) for n in nodes if n.id})
    except CycleError as exc:
        raise SpecError(str(exc)) from None


def _input_bytes(node: NodeSpec, layout: str, upload_size: UploadSize | None) -> int:
    """Total bytes of a node's uploaded files (each must be an upload of the submitter)."""
    total = 0
    for name, digest in node.files.items():
        if layout == "nested" and name.split("/")[0] in node.inputs:
            raise SpecError(f"node {node.id!r}: file {name!r} would be staged where the "
                            f"outputs of input {name.split('/')[0]!r} go")
        size = upload_size(digest) if upload_size is not None else None
        if size is None:
            raise SpecError(f"node {node.id!r}: file {name!r} refers to {digest}, which is "
                            "not an upload of yours (upload the file first)")
        total += size
    return total


def compile_spec(data: Any, runners: Mapping[str, RunnerDefinition],
                 upload_size: UploadSize | None = None) -> CompiledJob:
    """Validate a spec against the registered runners and compile it to ordered steps.

    ``upload_size`` resolves the nodes' ``files`` (upload digests); without it a spec
    that names files is refused. A runner's resource profile is chosen here, from the
    total bytes of the node's files and its params, and recorded on the step.
    """
    spec = parse_spec(data)
    nodes, layout = _ordered_nodes(spec)
    order = _check_graph(nodes)
    by_id = {node.id: node for node in nodes}
    steps: list[CompiledStep] = []
    for index, node_id in enumerate(order):
        node = by_id[node_id]
        runner = runners.get(node.runner)
        if runner is None:
            raise SpecError(f"node {node_id!r}: unknown runner {node.runner!r}")
        try:
            params = validate_params(runner.params, node.params, f"node {node_id!r}")
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        cache = spec.cache and node.cache is not False and runner.cacheable
        input_bytes = _input_bytes(node, layout, upload_size)
        runner, profile = apply_profile(runner, input_bytes, params)
        if node.resources is not None:
            override = node.resources.model_dump(exclude_none=True)
            if override:
                runner = runner.model_copy(update={"resources": Resources(
                    **{**runner.resources.model_dump(), **override})})
        steps.append(CompiledStep(
            step_id=node_id, index=index, runner=runner, runner_hash=runner.definition_hash(),
            params=params, inputs=tuple(node.inputs), input_layout=layout, cache=cache,
            files=dict(node.files), profile=profile))
    canonical = spec.model_dump(mode="json", exclude_none=True)
    for key in ("steps", "pipeline"):
        for entry in canonical.get(key) or ():
            if not entry.get("files"):
                entry.pop("files", None)   # specs without files keep their form
    return CompiledJob(
        label=spec.label, tags=tuple(spec.tags), priority=spec.priority, cache=spec.cache,
        spec=canonical, spec_hash=spec_hash(spec.label, steps), steps=tuple(steps))


def spec_hash(label: str, steps: list[CompiledStep]) -> str:
    """The identity of a job's work: label and resolved steps; not owner, tags or priority."""
    return hash_value({
        "v": SPEC_HASH_VERSION,
        "label": label,
        "steps": [
            {"id": s.step_id, "runner": s.runner.name, "runner_hash": s.runner_hash,
             "params": s.params, "inputs": list(s.inputs), "layout": s.input_layout,
             **({"files": s.files} if s.files else {})}
            for s in steps
        ],
    })
