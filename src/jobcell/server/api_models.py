"""Request and response models of the REST API (``/api/v1``): what the OpenAPI promises.

The shapes mirror the service API and the CLI's ``--json`` output, except that no
response carries a server path: outputs come as signed download links instead.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobcell.model.runner import ResourceProfile, Resources
from jobcell.model.states import JobState, StepState


class _Open(BaseModel):
    """A document that may carry more fields than the ones named here."""

    model_config = ConfigDict(extra="allow")


class SubmitAnswer(BaseModel):
    """The submitted job's id; ``deduplicated`` when an identical job was reused."""

    job_id: str
    deduplicated: bool


class JobSummary(BaseModel):
    """The short form of a job, as listed."""

    job_id: str
    state: JobState
    label: str
    owner: str
    tags: list[str]
    priority: int
    created_at: str | None
    finished_at: str | None
    error: str | None


class JobPage(BaseModel):
    """One page of jobs, newest first; ``next_offset`` is null on the last page."""

    jobs: list[JobSummary]
    limit: int
    offset: int
    next_offset: int | None


class Progress(BaseModel):
    """How many steps there are, how many are done, and how many are in each state."""

    total: int
    done: int
    states: dict[str, int]


class StepStatus(BaseModel):
    """One step: its state, latest attempt, exit code, resources and uploaded files."""

    id: str
    runner: str
    state: StepState
    attempt: int
    exit_code: int | None
    error: str | None
    inputs: list[str]
    runner_hash: str
    started_at: str | None
    finished_at: str | None
    backend: str | None
    backend_id: str | None
    profile: str | None
    cpu_slots: int
    memory_mb: int
    files: dict[str, str] = Field(description="Staged file name -> upload digest.")


class JobStatus(JobSummary):
    """The full status of a job (the same document as ``jobcell status --json``)."""

    spec_hash: str
    updated_at: str | None
    cancel_requested: bool
    progress: Progress
    steps: list[StepStatus]


class OutputLink(BaseModel):
    """An output file: its digest and a signed, expiring download URL (``href``)."""

    step: str
    name: str
    size: int
    blake3: str
    href: str = Field(description="Absolute download URL; the signature is the credential.")
    expires_at: str | None = Field(description="When href stops working (ISO 8601 UTC).")


class JobResult(BaseModel):
    """Each finished step's JSON value, the final value, and the outputs as links."""

    job_id: str
    state: JobState
    error: str | None
    result: Any = Field(default=None, description="The final step's value (or a mapping "
                                                   "of the final steps' values) once the "
                                                   "job succeeded, else null.")
    steps: dict[str, Any]
    outputs: list[OutputLink]


class StepLog(BaseModel):
    """The last lines of one step's stdout and stderr (its latest attempt)."""

    step: str
    attempt: int
    stdout: list[str]
    stderr: list[str]


class JobLogs(BaseModel):
    """The log tails of a job's steps."""

    job_id: str
    steps: list[StepLog]


class JobEvent(_Open):
    """One recorded transition; fields beyond these depend on ``kind``."""

    seq: int
    kind: str
    step: str | None
    at: str | None


class CancelAnswer(BaseModel):
    """What a cancel did: the job's state now; ``reason`` when there was nothing to do."""

    job_id: str
    state: JobState
    cancelled: bool = Field(description="True once the job is cancelled; a running job "
                                        "may take a moment after the request.")
    reason: str | None = None


class RunnerInfo(BaseModel):
    """A registered runner as clients see it (never its command, environment or files)."""

    name: str
    version: str
    plane: str
    description: str | None
    params: dict[str, Any] = Field(description="The runner's params as a JSON Schema object.")
    outputs: list[str]
    resources: Resources
    profiles: list[ResourceProfile]
    executor: str | None
    cacheable: bool
    hash: str = Field(description="The runner definition's hash (steps carry it as "
                                  "runner_hash).")


class RunnerList(BaseModel):
    """Every registered runner."""

    runners: list[RunnerInfo]


class GpuInfo(_Open):
    """One GPU the cell leases out."""

    index: int
    memory_mb: int | None = None
    name: str | None = None


class Capabilities(_Open):
    """What the cell offers and where each figure came from."""

    executor_backend: str
    cpu_slots: int
    cpu_source: str
    memory_mb: int
    memory_source: str
    gpu_count: int
    gpu_source: str
    gpus: list[GpuInfo]
    hostname: str
    python: str
    jobcell_version: str
    backend: dict[str, Any] | None = Field(default=None, description="What a delegated "
                                                                      "backend reports.")


class ResourceFigures(BaseModel):
    """CPU slots, memory and GPU indices."""

    cpu_slots: int
    memory_mb: int
    gpus: list[int]


class Lease(BaseModel):
    """What one running step holds."""

    job_id: str
    step: str
    runner: str
    owner: str
    cpu_slots: int
    memory_mb: int
    gpus: list[int]
    attempt: int
    started_at: str | None


class QueueDepth(BaseModel):
    """Queued steps by runner and by owner, and steps waiting on a cache twin."""

    depth: int
    by_runner: dict[str, int]
    by_owner: dict[str, int]
    waiting_cache: int


class Cooldown(BaseModel):
    """A concurrency group held back (then throttled) after an OOM-like exit."""

    group: str
    phase: str
    reason: str | None
    since: str | None
    cooldown_until: str | None
    throttle_until: str | None
    throttle_max: int | None


class WorkerInfo(_Open):
    """The worker serving the cell."""

    alive: bool
    pid: int | None
    hostname: str | None
    heartbeat_age_s: float | None
    started_at: str | None


class SchedulerStatus(BaseModel):
    """Capacity, use, leases, queue, cooldowns and the worker (a plain user sees only
    their own leases and queue entries by owner)."""

    capacity: ResourceFigures
    used: ResourceFigures
    free: ResourceFigures
    leases: list[Lease]
    queue: QueueDepth
    cooldowns: list[Cooldown]
    worker: WorkerInfo


class Me(BaseModel):
    """The signed-in user."""

    user: str


class UploadAnswer(BaseModel):
    """The stored upload: name it by ``digest`` in a step's ``files``."""

    digest: str = Field(description="BLAKE3 hex digest of the content.")
    size: int


class FromOutput(BaseModel):
    """One output file of one of your jobs."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(max_length=64)
    step: str = Field(max_length=200)
    name: str = Field(max_length=4096)


class TagCancel(BaseModel):
    """Cancel every active job with a tag matching a glob."""

    model_config = ConfigDict(extra="forbid")

    tag: str = Field(min_length=1, max_length=200,
                     description="A glob (*, ?, [...]) matched against job tags.")


class TagCancelAnswer(BaseModel):
    """The ids of the active jobs whose cancel was requested."""

    tag: str
    job_ids: list[str]
