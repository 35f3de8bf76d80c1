"""How one step attempt becomes a :class:`~jobcell.executors.base.Launch`.

The attempt directory is prepared locally (inputs staged); the argv and the variables
jobcell sets are built with the paths *the backend* sees (``backend_path``: identity for
embedded, path mappings for Slurm, the staging area for Slurm over SSH).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from jobcell import artifacts
from jobcell.executors.base import Launch, StepResources
from jobcell.model.runner import (
    RunnerDefinition,
    runner_argv,
    runner_environment,
    runner_values,
)
from jobcell.store import StepRow


def map_path(path: str, mappings: Mapping[str, str]) -> str:
    """``path`` with its longest matching local prefix replaced by the backend's prefix."""
    best = ""
    for local in mappings:
        prefix = local.rstrip("/") or "/"
        if (path == prefix or path.startswith(prefix.rstrip("/") + "/")) and \
                len(prefix) > len(best):
            best = prefix
    if not best:
        return path
    backend = mappings.get(best) or mappings.get(best + "/") or ""
    rest = path[len(best):].lstrip("/")
    return backend.rstrip("/") + ("/" + rest if rest else "") if backend.rstrip("/") \
        else "/" + rest


def job_name(cell_id: str, step: StepRow) -> str:
    """The backend job name: cell, job, step and attempt (what recovery searches for)."""
    return f"jobcell-{cell_id}-{step.job_id}-{step.step_id}-{step.attempt}"


def build_launch(*, key: str, step: StepRow, runner: RunnerDefinition, attempt_dir: Path,
                 upstream: Mapping[str, Path], gpu_env: bool, cell_id: str,
                 backend_path: Callable[[Path], str],
                 base_env: Mapping[str, str] | None = None) -> Launch:
    """Prepare the attempt directory and describe how to start it.

    ``gpu_env``: set ``CUDA_VISIBLE_DEVICES`` to exactly the step's leased devices (also
    to none), as on a cell that schedules GPUs itself.
    """
    paths = artifacts.prepare_attempt(attempt_dir, step.params, upstream, step.input_layout,
                                      step_input=runner.python is not None)
    step_dir = backend_path(attempt_dir)
    values = runner_values(runner, step.params, step_dir, step_dir + "/input",
                           step_dir + "/output")
    del paths
    extra = {"JOBCELL_JOB_ID": step.job_id, "JOBCELL_STEP_ID": step.step_id,
             "JOBCELL_ATTEMPT": str(step.attempt), "JOBCELL_STEP_DIR": step_dir}
    if gpu_env:
        # Exactly the leased devices; none at all for a step that leased none.
        extra["CUDA_VISIBLE_DEVICES"] = ",".join(step.gpus or ())
        extra["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # number devices as nvidia-smi does
        extra["JOBCELL_GPU_DEVICES"] = extra["CUDA_VISIBLE_DEVICES"]
    env = runner_environment(runner, os.environ if base_env is None else base_env, extra)
    exports = runner_environment(runner, {}, extra)
    resources = StepResources(cpu_slots=step.cpu_slots, memory_mb=step.memory_mb,
                              gpus=runner.resources.gpus,
                              optional_gpus=runner.resources.optional_gpus,
                              timeout_s=step.timeout_s)
    argv = tuple(runner_argv(runner, values))
    return Launch(key, attempt_dir, argv, env, exports=exports, runner=runner.name,
                  resources=resources, job_name=job_name(cell_id, step),
                  backend_dir=step_dir)
