"""Shared fixtures: every test is isolated from the user's jobcell environment."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.podman_image import PodmanImage, ensure_image
from services.slurm_cluster import SlurmCluster
from services.sshd import SSHServer


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("JOBCELL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("JOBCELL_HOME", str(tmp_path / "default-home"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A path for a cell home (created on first use by the code under test)."""
    return tmp_path / "cell"


# ---- real test services (session-scoped; a service that cannot start makes the
# tests that need it ERROR with the reason, never skip) ----------------------------


def _service_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    path = tmp_path_factory.mktemp(name)
    if len(str(path)) > 60:  # slurmd puts unix sockets (max 107 bytes) in its spool
        path = Path(tempfile.mkdtemp(prefix=f"jc-{name}-", dir="/tmp"))
    return path


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A started Slurm cluster (slurmctld + nodes jc1, jc2, jc3; jc3 has gpu:2)."""
    cluster = SlurmCluster(_service_dir(tmp_path_factory, "slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A started sshd on 127.0.0.1 that accepts ``key_path`` for the current user."""
    server = SSHServer(_service_dir(tmp_path_factory, "sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def podman_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanImage]:
    """The local busybox image; sets CONTAINERS_CONF in os.environ for the session."""
    image = ensure_image(_service_dir(tmp_path_factory, "podman"))
    old = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = image.env["CONTAINERS_CONF"]
    try:
        yield image
    finally:
        if old is None:
            os.environ.pop("CONTAINERS_CONF", None)
        else:
            os.environ["CONTAINERS_CONF"] = old
