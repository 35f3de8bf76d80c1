"""Runner definitions: the allowlist of what may run, with declared resources."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobcell.executors.container import (
    ContainerError,
    check_container_path,
    check_env_name,
    check_extra_args,
    check_image,
)
from jobcell.model.canonical import hash_value
from jobcell.model.params import ParamSpec
from jobcell.model.templating import BUILTIN_PLACEHOLDERS, placeholders

NAME_PATTERN = r"[A-Za-z0-9_.-]+"
MAX_NAME_LENGTH = 100
_NAME_RE = re.compile(NAME_PATTERN)
_CALLABLE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# Fields that change how a step is run, never what it computes.
CACHE_NEUTRAL_FIELDS = frozenset({"source", "description", "resources", "profiles", "executor",
                                  "concurrency_group",
                                  "max_concurrent", "retries", "cacheable", "cache_scope"})
# Container fields that only provision (where and how the image is fetched and run).
CONTAINER_CACHE_NEUTRAL_FIELDS = frozenset({"runtime", "pull"})


def check_name(value: str, what: str) -> str:
    """Validate a runner or node name: ``[A-Za-z0-9_.-]+``, not ``.``/``..``, at most 100 long.

    Names become directory names, so they must never escape or overflow one.
    """
    if not _NAME_RE.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} must match {NAME_PATTERN} and not be '.' or '..'")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} {value[:20]!r}... is {len(value)} characters long; "
                         f"the limit is {MAX_NAME_LENGTH}")
    return value


def check_relative_path(value: str, what: str) -> str:
    """Validate a path that must stay inside its directory."""
    parts = value.replace("\\", "/").split("/")
    if not value or value.startswith("/") or any(p in ("..", "") for p in parts):
        raise ValueError(f"{what} {value!r} must be a relative path inside its directory")
    return value


class Resources(BaseModel):
    """What one step of a runner needs while it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: int = Field(default=256, ge=0, le=2**40)
    cpu_slots: int = Field(default=1, ge=0, le=1_000_000)
    timeout_s: float = Field(default=3600, gt=0, le=366 * 86400, allow_inf_nan=False)
    gpus: int = Field(default=0, ge=0, le=1024)
    optional_gpus: int = Field(default=0, ge=0, le=1024)


class ProfileResources(BaseModel):
    """The resources a profile changes; what it leaves out comes from the runner's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: int | None = Field(default=None, ge=0, le=2**40)
    cpu_slots: int | None = Field(default=None, ge=0, le=1_000_000)
    timeout_s: float | None = Field(default=None, gt=0, le=366 * 86400, allow_inf_nan=False)
    gpus: int | None = Field(default=None, ge=0, le=1024)
    optional_gpus: int | None = Field(default=None, ge=0, le=1024)


class ResourceProfile(BaseModel):
    """A named set of resources chosen at submit by the size of a step's input.

    A profile applies when every threshold it declares holds: the total bytes of the
    step's uploaded files is at most ``max_input_bytes``, and the param ``count_param``
    is at most ``max_count``. A profile without thresholds always applies (a fallback).
    The first profile that applies wins (see :mod:`jobcell.model.profiles`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    max_input_bytes: int | None = Field(default=None, ge=0)
    count_param: str | None = None
    max_count: float | None = Field(default=None, allow_inf_nan=False)
    resources: ProfileResources = Field(default_factory=ProfileResources)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "profile name")

    @model_validator(mode="after")
    def _count_pair(self) -> ResourceProfile:
        if (self.count_param is None) != (self.max_count is None):
            raise ValueError(f"profile {self.name!r}: 'count_param' and 'max_count' go "
                             "together")
        return self


class ContainerSpec(BaseModel):
    """How a runner runs in a container: the image and the program inside it.

    Only the step directory is mounted (at ``/jobcell/step``; ``{input_dir}``,
    ``{output_dir}`` and ``{step_dir}`` render to the paths inside). ``runtime`` and
    ``pull`` default to the cell options ``container_runtime`` and ``container_pull``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str
    runtime: Literal["auto", "podman", "docker", "apptainer", "singularity"] | None = None
    pull: Literal["missing", "always", "never"] | None = None
    command: str | None = None
    args_template: list[str] | None = None
    workdir: str | None = None
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return _container_check(check_image, value)

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\x00" in value):
            raise ValueError("container.command must be a non-empty program name or path")
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        return None if value is None else _container_check(check_container_path, value,
                                                           "container.workdir")

    @field_validator("args_template")
    @classmethod
    def _template_syntax(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            placeholders(item)  # raises on unbalanced braces
        return value

    @model_validator(mode="after")
    def _extra_args(self) -> ContainerSpec:
        _container_check(check_extra_args, self.extra_args, self.runtime)
        return self


def _container_check(check: Any, *args: Any) -> Any:
    try:
        return check(*args)
    except ContainerError as exc:
        raise ValueError(str(exc)) from None


class RunnerDefinition(BaseModel):
    """One allowlisted, versioned, resource-declared runner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str = "0"
    plane: Literal["artifact", "session"] = "artifact"
    description: str | None = None
    command: str | None = None
    python: str | None = None
    python_path: list[str] = Field(default_factory=list)
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    args_template: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    profiles: list[ResourceProfile] = Field(default_factory=list)
    executor: Literal["embedded", "slurm", "external"] | None = None
    container: ContainerSpec | None = None
    concurrency_group: str | None = None
    max_concurrent: int | None = Field(default=None, ge=1)
    cacheable: bool = True
    cache_scope: Literal["label", "cell"] = "label"
    retries: int = Field(default=0, ge=0, le=100)
    outputs: list[str] = Field(default_factory=list)
    # Set by the registry, not by the author:
    runner_dir: str | None = None
    command_path: str | None = None
    source: str | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "runner name")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not key or "=" in key or "\x00" in key or "\x00" in text:
                raise ValueError(f"variable {key!r}: names must be non-empty without '=' and "
                                 "neither names nor values may contain a NUL character")
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: list[str]) -> list[str]:
        return [check_relative_path(v, "declared output") for v in value]

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"param name {name!r} must be an identifier")
            if name in BUILTIN_PLACEHOLDERS:
                raise ValueError(f"param name {name!r} is reserved for a built-in placeholder")
        return value

    @model_validator(mode="after")
    def _profiles(self) -> RunnerDefinition:
        seen: set[str] = set()
        for profile in self.profiles:
            if profile.name in seen:
                raise ValueError(f"profile {profile.name!r} is declared twice")
            seen.add(profile.name)
            if profile.count_param is not None:
                spec = self.params.get(profile.count_param)
                if spec is None or spec.type not in ("integer", "number"):
                    raise ValueError(f"profile {profile.name!r}: count_param "
                                     f"{profile.count_param!r} must name an integer or number "
                                     "param of this runner")
            Resources(**{**self.resources.model_dump(),
                         **profile.resources.model_dump(exclude_none=True)})
        return self

    @model_validator(mode="after")
    def _command_or_python(self) -> RunnerDefinition:
        if self.container is not None:
            return self._container_rules(self.container)
        if (self.command is None) == (self.python is None):
            raise ValueError("exactly one of 'command' or 'python' must be given")
        if self.python is not None:
            if not _CALLABLE_RE.fullmatch(self.python):
                raise ValueError(f"python {self.python!r} must look like 'package.module:function'")
            if self.args_template:
                raise ValueError("'args_template' is not used with 'python' runners")
        return self

    def _container_rules(self, container: ContainerSpec) -> RunnerDefinition:
        if self.plane != "artifact":
            raise ValueError("a container runner runs on the 'artifact' plane (its steps go "
                             "through the step wrapper and an executor)")
        if self.command is not None and self.python is not None:
            raise ValueError("exactly one of 'command' or 'python' must be given")
        if self.python is not None:
            if not _CALLABLE_RE.fullmatch(self.python):
                raise ValueError(f"python {self.python!r} must look like 'package.module:function'")
            if self.args_template or container.args_template:
                raise ValueError("'args_template' is not used with 'python' runners")
            if self.python_path:
                raise ValueError("'python_path' is not used in a container: the image must "
                                 "provide the module")
        elif self.command is None and container.command is None:
            raise ValueError("a container runner needs 'container.command' or 'command' "
                             "(the program inside the container), or 'python'")
        template = container.args_template if container.args_template is not None \
            else self.args_template
        allowed = (BUILTIN_PLACEHOLDERS - {"runner_dir"}) | set(self.params)
        for item in template:
            used = placeholders(item)
            if "runner_dir" in used:
                raise ValueError(f"item {item!r}: {{runner_dir}} is not available in a "
                                 "container (only the step directory is mounted)")
            unknown = used - allowed
            if unknown:
                raise ValueError(f"container.args_template item {item!r} uses unknown "
                                 f"placeholder {{{sorted(unknown)[0]}}} (write {{{{ and "
                                 "}}}} for braces)")
        for name in self.env:
            _container_check(check_env_name, name)
        return self

    @field_validator("args_template")
    @classmethod
    def _template(cls, value: list[str], info: ValidationInfo) -> list[str]:
        allowed = BUILTIN_PLACEHOLDERS | set(info.data.get("params") or {})
        for item in value:
            unknown = placeholders(item) - allowed
            if unknown:
                raise ValueError(f"item {item!r} uses unknown placeholder "
                                 f"{{{sorted(unknown)[0]}}} (write {{{{ and }}}} for braces)")
        return value

    @property
    def group(self) -> str:
        """The concurrency group: the declared one, else the runner's name."""
        return self.concurrency_group or self.name

    def definition_hash(self) -> str:
        """Hash of everything that determines what this runner does."""
        payload = self.model_dump(mode="json", exclude={"source", "description"})
        if payload.get("container") is None:
            payload.pop("container", None)  # runners without one keep their hashes
        if not payload.get("profiles"):
            payload.pop("profiles", None)   # likewise runners without profiles
        return hash_value(payload)

    def cache_hash(self) -> str:
        """Hash of what determines the runner's *results*: the definition without
        provisioning and scheduling (resources, concurrency, retries, cache flags, and
        the container's runtime and pull policy; its image, command and arguments count).
        Re-provisioning a runner keeps its step-cache keys."""
        payload = self.model_dump(mode="json", exclude=CACHE_NEUTRAL_FIELDS)
        if payload.get("container") is None:
            payload.pop("container", None)
        else:
            for name in CONTAINER_CACHE_NEUTRAL_FIELDS:
                payload["container"].pop(name, None)
        return hash_value(payload)


def runner_argv(runner: RunnerDefinition, values: dict[str, Any]) -> list[str]:
    """The full argv of one step: the resolved command, then the rendered template.

    ``values`` holds the step's params and the built-in placeholders.
    """
    from jobcell.model.templating import render_args

    if runner.container is not None:
        raise ValueError(f"runner {runner.name!r} runs in a container: its command line is "
                         "built by jobcell.launching.build_launch")
    command = runner.command_path or runner.command
    if runner.python is not None:
        return [command or "python3", "-m", "jobcell.pyrunner", runner.python,
                str(values["step_dir"])]
    assert command is not None
    return [command, *render_args(runner.args_template, values)]


def container_command(runner: RunnerDefinition, values: dict[str, Any]) -> list[str]:
    """The argv *inside* the container of a container runner (``values`` hold the paths
    inside): ``container.command`` (else ``command``), then ``container.args_template``
    (else ``args_template``) rendered; a Python runner runs ``jobcell.pyrunner`` with
    ``container.command`` (default ``python3``) from the image."""
    from jobcell.model.templating import render_args

    container = runner.container
    if container is None:
        raise ValueError(f"runner {runner.name!r} has no container")
    if runner.python is not None:
        return [container.command or "python3", "-m", "jobcell.pyrunner", runner.python,
                str(values["step_dir"])]
    command = container.command or runner.command
    assert command is not None
    template = container.args_template if container.args_template is not None \
        else runner.args_template
    return [command, *render_args(template, values)]


def runner_values(runner: RunnerDefinition, params: dict[str, Any], step_dir: str,
                  input_dir: str, output_dir: str) -> dict[str, Any]:
    """The values the args template may use: params plus the built-in placeholders."""
    return {**params, "input_dir": input_dir, "output_dir": output_dir, "step_dir": step_dir,
            "runner_dir": runner.runner_dir or ""}


def runner_environment(runner: RunnerDefinition, base: Mapping[str, str],
                       extra: Mapping[str, str]) -> dict[str, str]:
    """A step's environment: ``base`` without jobcell's own settings (the admin key among
    them), then the runner's ``env``, its ``python_path``, and ``extra`` (step ids)."""
    env = {k: v for k, v in base.items() if not k.startswith("JOBCELL_")}
    env.update(runner.env)
    if runner.python_path:
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join([*runner.python_path, *([existing] if existing
                                                                    else [])])
    env.update(extra)
    return env
