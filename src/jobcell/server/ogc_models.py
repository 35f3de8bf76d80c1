"""OGC API - Processes - Part 1: Core (1.0): the documents, and how jobcell fills them.

Pure: every builder takes the service's dicts (runner definitions, status JSON) and
the server's base URL, so the same documents serve the routes and the callbacks.

Exceptions jobcell answers, all as ``application/problem+json`` (the OGC exception
schema is RFC 7807's), by ``type``:

- OGC ``.../no-such-process`` (404): no runner of that name;
- OGC ``.../no-such-job`` (404): no job of that id owned by the caller;
- OGC ``.../result-not-ready`` (404): results of a job still queued or running;
- ``urn:jobcell:ogc:sync-not-supported`` (400): a synchronous execution of an
  artifact-plane (async-only) runner; the detail starts "The synchronous mode is not
  supported by this type of service" (the wording of the ZOO-Project's HPC services);
- ``urn:jobcell:ogc:invalid-input`` (400): inputs, outputs or subscriber are invalid
  (the detail is the service's);
- ``urn:jobcell:ogc:job-failed`` (424 Failed Dependency): results of a failed job, or
  a failed synchronous (session-plane) execution (with ``exit_code`` and ``stderr``);
- ``urn:jobcell:ogc:job-dismissed`` (410 Gone): results of a dismissed job.
"""

from __future__ import annotations

import mimetypes
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobcell.model.params import params_json_schema
from jobcell.model.runner import RunnerDefinition

OGC_CONF = "http://www.opengis.net/spec/ogcapi-processes-1/1.0/conf/"
CONFORMANCE = [OGC_CONF + name for name in (
    "core", "ogc-process-description", "json", "job-list", "dismiss", "callback", "oas30")]
REL_PROCESSES = "http://www.opengis.net/def/rel/ogc/1.0/processes"
REL_JOB_LIST = "http://www.opengis.net/def/rel/ogc/1.0/job-list"
REL_RESULTS = "http://www.opengis.net/def/rel/ogc/1.0/results"
REL_EXECUTE = "http://www.opengis.net/def/rel/ogc/1.0/execute"
REL_CONFORMANCE = "http://www.opengis.net/def/rel/ogc/1.0/conformance"

_OGC_EXC = "http://www.opengis.net/def/exceptions/ogcapi-processes-1/1.0/"
NO_SUCH_PROCESS = _OGC_EXC + "no-such-process"
NO_SUCH_JOB = _OGC_EXC + "no-such-job"
RESULT_NOT_READY = _OGC_EXC + "result-not-ready"
SYNC_NOT_SUPPORTED = "urn:jobcell:ogc:sync-not-supported"
INVALID_INPUT = "urn:jobcell:ogc:invalid-input"
JOB_FAILED = "urn:jobcell:ogc:job-failed"
JOB_DISMISSED = "urn:jobcell:ogc:job-dismissed"
SYNC_REFUSAL = "The synchronous mode is not supported by this type of service"

VALUE_OUTPUT = "result"      # the step's JSON value (output.json)
FILES_INPUT = "files"        # uploaded files staged into the step (name -> digest)
VALUE_FILE = "output.json"
JSON = "application/json"

OgcStatus = Literal["accepted", "running", "successful", "failed", "dismissed"]
OGC_STATUS: dict[str, OgcStatus] = {"queued": "accepted", "running": "running",
                                    "succeeded": "successful", "failed": "failed",
                                    "cancelled": "dismissed"}
# OGC status -> jobcell job state, for the job list's ``status`` filter.
JOB_STATE: dict[str, str] = {ogc: state for state, ogc in OGC_STATUS.items()}


class Link(BaseModel):
    """A link: ``href`` with its relation and media type."""

    href: str
    rel: str | None = None
    type: str | None = None
    title: str | None = None


class LandingPage(BaseModel):
    title: str
    description: str
    links: list[Link]


class Conformance(BaseModel):
    conformsTo: list[str]


class ProcessSummary(BaseModel):
    """A runner as a process: artifact-plane runners are async-only, session-plane
    runners sync-only."""

    id: str
    title: str
    description: str
    version: str
    jobControlOptions: list[Literal["sync-execute", "async-execute", "dismiss"]]
    outputTransmission: list[Literal["value", "reference"]]
    links: list[Link]


class ProcessList(BaseModel):
    processes: list[ProcessSummary]
    links: list[Link]


class InputDescription(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    title: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    minOccurs: int = 1
    maxOccurs: int = 1


class OutputDescription(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    title: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")


class Process(ProcessSummary):
    """A process description: inputs from the runner's params (plus ``files`` for
    uploads), outputs ``result`` (the JSON value) and each declared output file."""

    inputs: dict[str, InputDescription]
    outputs: dict[str, OutputDescription]


class Subscriber(BaseModel):
    """Callback URLs: POSTed the statusInfo when the job starts running
    (``inProgressUri``), the results document when it succeeds (``successUri``), the
    statusInfo when it fails or is dismissed (``failedUri``)."""

    model_config = ConfigDict(extra="forbid")

    successUri: str
    inProgressUri: str | None = None
    failedUri: str | None = None

    def by_kind(self) -> dict[str, str | None]:
        return {"success": self.successUri, "inProgress": self.inProgressUri,
                "failed": self.failedUri}


class OutputRequest(BaseModel):
    """How the client wants one output (accepted; jobcell sends the JSON value inline
    and files by reference)."""

    model_config = ConfigDict(extra="allow")

    format: dict[str, Any] | None = None
    transmissionMode: Literal["value", "reference"] | None = None


class ExecuteRequest(BaseModel):
    """An execute request: ``inputs`` (param values; ``files``: uploads by digest),
    optional ``outputs`` to select, ``response`` (``document`` or, for synchronous
    executions, ``raw``), ``subscriber`` callbacks and the pre-1.0 ``mode``."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, OutputRequest] | None = None
    response: Literal["document", "raw"] = "document"
    subscriber: Subscriber | None = None
    mode: Literal["sync", "async", "auto"] | None = None

    @field_validator("inputs")
    @classmethod
    def _input_ids(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > 1000:
            raise ValueError("at most 1000 inputs")
        return value


class StatusInfo(BaseModel):
    """A job's status: ``accepted`` (queued), ``running``, ``successful``, ``failed``
    or ``dismissed`` (cancelled); ``progress`` is the percentage of steps done."""

    processID: str | None = None
    type: Literal["process"] = "process"
    jobID: str
    status: OgcStatus
    message: str | None = None
    created: str | None = None
    started: str | None = None
    finished: str | None = None
    updated: str | None = None
    progress: int = Field(ge=0, le=100)
    links: list[Link]


class JobList(BaseModel):
    jobs: list[StatusInfo]
    links: list[Link]


# -- builders
def media_type(name: str) -> str:
    """The media type of an output file by its name (``application/octet-stream``)."""
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


def file_output_id(name: str) -> str:
    """The output id of a file: its name, unless that is the value output's id."""
    return f"{name}.file" if name == VALUE_OUTPUT else name


def job_control(runner: RunnerDefinition) -> list[Literal["sync-execute", "async-execute",
                                                           "dismiss"]]:
    return ["async-execute", "dismiss"] if runner.plane == "artifact" else ["sync-execute"]


def process_summary(runner: RunnerDefinition, base: str) -> ProcessSummary:
    data = _summary_fields(runner, base)
    return ProcessSummary(**data)


def _summary_fields(runner: RunnerDefinition, base: str) -> dict[str, Any]:
    href = f"{base}/processes/{runner.name}"
    transmission: list[Literal["value", "reference"]] = (
        ["value", "reference"] if runner.plane == "artifact" and runner.outputs else ["value"])
    return {"id": runner.name, "title": runner.name,
            "description": runner.description or f"the jobcell runner {runner.name!r} "
                                                  f"({runner.plane} plane)",
            "version": runner.version, "jobControlOptions": job_control(runner),
            "outputTransmission": transmission,
            "links": [Link(href=href, rel="self", type=JSON, title="process description"),
                      Link(href=f"{href}/execution", rel=REL_EXECUTE, type=JSON,
                           title="execute")]}


def describe_process(runner: RunnerDefinition, base: str) -> Process:
    """The process description of a runner."""
    schema = params_json_schema(runner.params)["properties"]
    inputs = {name: InputDescription(
        title=name, description=spec.description, schema=schema[name],
        minOccurs=1 if spec.is_required and spec.default is None else 0)
        for name, spec in runner.params.items()}
    if runner.plane == "artifact" and FILES_INPUT not in runner.params:
        inputs[FILES_INPUT] = InputDescription(
            title="uploaded files",
            description="Files staged into the step's input directory: name -> the "
                        "BLAKE3 digest of one of your uploads (POST /api/v1/uploads).",
            schema={"type": "object", "additionalProperties": {
                "type": "string", "pattern": "^[0-9a-f]{64}$"}},
            minOccurs=0)
    outputs = {VALUE_OUTPUT: OutputDescription(
        title="result", description="The step's JSON value (output.json; null when the "
                                    "runner writes none).", schema={})}
    if runner.plane == "artifact":
        for name in runner.outputs:
            outputs[file_output_id(name)] = OutputDescription(
                title=name, description=f"The output file {name!r}, by reference.",
                schema={"type": "string", "contentEncoding": "binary",
                        "contentMediaType": media_type(name)})
    return Process(**_summary_fields(runner, base), inputs=inputs, outputs=outputs)


def process_id_of(status: dict[str, Any]) -> str | None:
    """The process of a job: its ``process:<id>`` tag, else the runner of its only step."""
    for tag in status.get("tags") or ():
        if tag.startswith("process:"):
            return str(tag[len("process:"):])
    steps = status.get("steps") or []
    return str(steps[0]["runner"]) if len(steps) == 1 else None


def _message(status: dict[str, Any], ogc: str) -> str:
    if ogc == "accepted":
        return ("dismissal requested" if status.get("cancel_requested")
                else "queued, waiting for its turn and resources")
    if ogc == "running":
        running = [s for s in status.get("steps") or () if s["state"] == "running"]
        if status.get("cancel_requested"):
            return "dismissal requested; stopping"
        return (f"running (attempt {running[0]['attempt']})" if running else "running")
    if ogc == "successful":
        return "finished successfully"
    if ogc == "dismissed":
        return status.get("error") or "dismissed"
    return status.get("error") or "failed"


def status_info(status: dict[str, Any], base: str) -> StatusInfo:
    """The statusInfo of a job from its status JSON (``Cell.status``)."""
    job_id = status["job_id"]
    ogc = OGC_STATUS[status["state"]]
    progress = status.get("progress") or {}
    total = progress.get("total") or 0
    percent = 100 if ogc == "successful" else (
        int(100 * (progress.get("done") or 0) / total) if total else 0)
    starts = [s["started_at"] for s in status.get("steps") or () if s.get("started_at")]
    href = f"{base}/jobs/{job_id}"
    links = [Link(href=href, rel="self", type=JSON, title="job status")]
    if ogc == "successful":
        links.append(Link(href=f"{href}/results", rel=REL_RESULTS, type=JSON,
                          title="job results"))
    return StatusInfo(processID=process_id_of(status), jobID=job_id, status=ogc,
                      message=_message(status, ogc), created=status.get("created_at"),
                      started=min(starts) if starts else None,
                      finished=status.get("finished_at"), updated=status.get("updated_at"),
                      progress=percent, links=links)


def results_document(result: dict[str, Any], links: list[dict[str, Any]],
                     single_step: bool) -> dict[str, Any]:
    """The results of a successful job: ``result`` (the JSON value of its final step)
    and each output file by reference (a signed, expiring ``href``).

    ``links`` are the service's outputs with their signed URLs; files of a one-step job
    are named by file name, those of a pipeline by ``step/name``.
    """
    document: dict[str, Any] = {VALUE_OUTPUT: result.get("result")}
    for out in links:
        if out["name"] == VALUE_FILE:
            continue
        key = file_output_id(out["name"]) if single_step else f"{out['step']}/{out['name']}"
        document[key] = {"href": out["href"], "type": media_type(out["name"]),
                         "title": out["name"]}
    return document
