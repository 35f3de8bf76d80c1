"""Which executor runs a step, and building one from the cell's options."""

from __future__ import annotations

from jobcell.errors import ConfigError
from jobcell.executors.base import Executor
from jobcell.home import CellHome
from jobcell.model.runner import RunnerDefinition
from jobcell.settings import Settings


def backend_of(runner: RunnerDefinition, settings: Settings) -> str:
    """The runner's own ``executor``, else the cell's ``executor_backend``."""
    return runner.executor or settings.executor_backend


def make_executor(name: str, home: CellHome, settings: Settings) -> Executor:
    """A new executor for backend ``name``; :class:`ConfigError` says what is missing."""
    if name == "embedded":
        from jobcell.executors.embedded import EmbeddedExecutor

        return EmbeddedExecutor(home.wrapper_script)
    if name == "slurm":
        from jobcell.executors.slurm import SlurmExecutor
        from jobcell.executors.transport import LocalTransport, Transport

        transport: Transport
        if settings.slurm_login_host:
            if not settings.slurm_tmp_io:
                raise ConfigError("Slurm over SSH (slurm_login_host) needs slurm_tmp_io: a "
                                  "directory the login and compute nodes both see")
            from jobcell.executors.ssh import SSHTransport

            transport = SSHTransport.from_settings(settings)
        else:
            transport = LocalTransport()
        return SlurmExecutor(settings, transport=transport, wrapper_path=home.wrapper_script,
                             artifacts_root=home.artifacts, cell_id=home.cell_id)
    if name == "external":
        from jobcell.executors.external import ExternalExecutor

        missing = [option for option in ("external_submit_cmd", "external_status_cmd")
                   if not getattr(settings, option)]
        if missing:
            raise ConfigError("executor 'external' needs the option(s) " + ", ".join(missing))
        return ExternalExecutor(settings, wrapper_path=home.wrapper_script,
                                artifacts_root=home.artifacts)
    raise ConfigError(f"unknown executor backend {name!r} (known: embedded, slurm, external)")
