"""The cell home: where a cell keeps its state DB, artifacts, runners and locks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from jobcell.errors import ConfigError

SUBDIRS = ("artifacts", "runners", "staging", "publish", "locks")


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--home``, else ``JOBCELL_HOME``, else the user data dir."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get("JOBCELL_HOME")
    if env:
        return Path(env).expanduser().absolute()
    return Path(platformdirs.user_data_dir("jobcell", appauthor=False)).absolute()


@dataclass(frozen=True)
class CellHome:
    """Paths inside one cell home."""

    root: Path

    @property
    def cell_id(self) -> str:
        """A short, stable name for this cell in backend job names (from its path)."""
        import hashlib

        return hashlib.blake2b(str(self.root.resolve()).encode(), digest_size=4).hexdigest()

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def runners(self) -> Path:
        return self.root / "runners"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def uploads(self) -> Path:
        """Uploaded input files, content-addressed: ``uploads/<aa>/<blake3 digest>``."""
        return self.root / "staging" / "uploads"

    def upload_path(self, digest: str) -> Path:
        return self.uploads / digest[:2] / digest

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def config_file(self) -> Path:
        return self.root / "jobcell.toml"

    @property
    def worker_log(self) -> Path:
        return self.root / "worker.log"

    @property
    def wrapper_script(self) -> Path:
        return self.root / "wrapper.sh"

    @property
    def wake_pipe(self) -> Path:
        """The named pipe submitters poke to wake the worker (see jobcell.wakeup)."""
        return self.locks / "wake.fifo"

    def job_dir(self, job_id: str) -> Path:
        return self.artifacts / job_id

    def step_dir(self, job_id: str, step_id: str) -> Path:
        return self.artifacts / job_id / step_id

    def attempt_dir(self, job_id: str, step_id: str, attempt: int) -> Path:
        return self.artifacts / job_id / step_id / f"attempt-{attempt}"


def open_home(explicit: str | os.PathLike[str] | None = None) -> CellHome:
    """Resolve the home and create its layout (idempotent)."""
    home = CellHome(resolve_home(explicit))
    try:
        home.root.mkdir(parents=True, exist_ok=True)
        for name in SUBDIRS:
            (home.root / name).mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the cell home {home.root}: {exc.strerror}") from None
    if not os.access(home.root, os.W_OK | os.X_OK):
        raise ConfigError(f"the cell home {home.root} is not writable by this user")
    return home
