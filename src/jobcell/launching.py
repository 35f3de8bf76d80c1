"""How one step attempt becomes a :class:`~jobcell.executors.base.Launch`.

The attempt directory is prepared locally (inputs staged); the argv and the variables
jobcell sets are built with the paths *the backend* sees (``backend_path``: identity for
embedded, path mappings for Slurm, the staging area for Slurm over SSH).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from jobcell import artifacts
from jobcell.executors import container as containers
from jobcell.executors.base import Launch, StepResources
from jobcell.executors.container import ContainerOptions
from jobcell.model.runner import (
    RunnerDefinition,
    container_command,
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
                 base_env: Mapping[str, str] | None = None,
                 container_options: ContainerOptions | None = None,
                 which: Callable[[str], str | None] = shutil.which,
                 files: Mapping[str, Path] | None = None) -> Launch:
    """Prepare the attempt directory and describe how to start it.

    ``gpu_env``: set ``CUDA_VISIBLE_DEVICES`` to exactly the step's leased devices (also
    to none), as on a cell that schedules GPUs itself.

    For a runner with a ``container``, the argv is the container command line (see
    :mod:`jobcell.executors.container`): the wrapper still runs on the host, and the
    runtime mounts only this attempt's directory. ``container_options`` carries the cell
    options ``container_*`` and the backend's GPU count (default: the option defaults);
    ``which`` finds the runtime.
    """
    paths = artifacts.prepare_attempt(attempt_dir, step.params, upstream, step.input_layout,
                                      step_input=runner.python is not None, files=files)
    step_dir = backend_path(attempt_dir)
    values = runner_values(runner, step.params, step_dir, step_dir + "/input",
                           step_dir + "/output")
    del paths
    extra = {"JOBCELL_JOB_ID": step.job_id, "JOBCELL_STEP_ID": step.step_id,
             "JOBCELL_ATTEMPT": str(step.attempt), "JOBCELL_STEP_DIR": step_dir,
             "JOBCELL_STEP_INDEX": str(step.index)}
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
    if runner.container is not None:
        options = container_options or ContainerOptions(force_gpu=containers.force_gpu_requested(
            os.environ if base_env is None else base_env))
        command = _container_launch(runner, step, step_dir, extra, options, which,
                                    job_name(cell_id, step))
        argv = command.argv
        for name in command.unset:
            env.pop(name, None)
        env.update(command.env)
        exports.update(command.env)
    else:
        argv = tuple(runner_argv(runner, values))
    return Launch(key, attempt_dir, argv, env, exports=exports, runner=runner.name,
                  resources=resources, job_name=job_name(cell_id, step),
                  backend_dir=step_dir)


def _container_launch(runner: RunnerDefinition, step: StepRow, step_dir: str,
                      extra: Mapping[str, str], options: ContainerOptions,
                      which: Callable[[str], str | None], label: str
                      ) -> containers.ContainerCommand:
    """The container command line of one attempt; ``step_dir`` is the attempt directory as
    the backend sees it (what the runtime mounts)."""
    spec = runner.container
    assert spec is not None
    preferred = spec.runtime or options.runtime
    try:
        runtime, executable = containers.resolve_runtime(preferred, which)
    except containers.ContainerError:
        if options.probe_local or preferred == "auto":
            raise
        runtime, executable = preferred, preferred  # found on the backend's PATH
    inside = containers.STEP_DIR
    values = runner_values(runner, step.params, inside, containers.INPUT_DIR,
                           containers.OUTPUT_DIR)
    mounts = [containers.Mount(step_dir + "/input", containers.INPUT_DIR),
              containers.Mount(step_dir + "/inputs.json", inside + "/inputs.json"),
              containers.Mount(step_dir + "/output", containers.OUTPUT_DIR, read_only=False)]
    if runner.python is not None:
        mounts.append(containers.Mount(step_dir + "/input.json", inside + "/input.json"))
    gpus = containers.gpu_request(runner.resources.gpus, runner.resources.optional_gpus,
                                  tuple(step.gpus or ()), options.backend_gpus,
                                  options.force_gpu, scheduled="CUDA_VISIBLE_DEVICES" in extra)
    env = containers.container_env({**runner.env, **extra, "JOBCELL_STEP_DIR": inside},
                                   runtime, gpus)
    return containers.container_argv(
        spec, runtime, executable, command=container_command(runner, values),
        mounts=mounts, env=env, network=options.network, pull=spec.pull or options.pull,
        uid=os.getuid() if options.uid is None else options.uid,
        gid=os.getgid() if options.gid is None else options.gid, gpus=gpus,
        label=label)
