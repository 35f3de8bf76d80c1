"""Task client configuration (``from jobcell.config import global_config, scoped_config,
LocalBackend``): a re-export of :mod:`jobcell.client`. Cell options are in
:mod:`jobcell.settings`."""

from __future__ import annotations

from jobcell.client.backends import LocalBackend
from jobcell.client.config import (
    CacheConfiguration,
    CacheConfigurationChained,
    CacheConfigurationShelve,
    CacheConfigurationSQLite,
    CacheMode,
    TaskConfig,
    current_config,
    global_config,
    scoped_config,
)
from jobcell.client.rest import RestBackend
from jobcell.client.slurm import SlurmBackend

__all__ = [
    "CacheConfiguration", "CacheConfigurationChained", "CacheConfigurationSQLite",
    "CacheConfigurationShelve", "CacheMode", "LocalBackend", "RestBackend",
    "SlurmBackend", "TaskConfig",
    "current_config", "global_config", "scoped_config",
]
