"""Smoke tests of the real test services: the Slurm cluster, sshd and the podman image.

Some of these pin Slurm 22.05 behaviours that the Slurm backend relies on (what
``squeue``/``scontrol`` answer for unknown ids, what ``sacct`` does without accounting).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from .podman_image import PodmanImage
from .slurm_cluster import SlurmCluster
from .sshd import SSHServer

UNKNOWN_JOB = "987654"


def wait_until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---- Slurm ---------------------------------------------------------------------------


@pytest.mark.slurm
def test_cluster_commands_answer(slurm_cluster: SlurmCluster) -> None:
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %t")
    assert nodes.returncode == 0, nodes.stderr
    # Other tests share the session cluster: nodes may be busy, jobs may be queued.
    states = dict(line.split() for line in nodes.stdout.splitlines())
    assert sorted(states) == ["jc1", "jc2", "jc3"]
    assert set(states.values()) <= {"idle", "mix", "alloc", "comp"}, states
    queue = slurm_cluster.run("squeue", "-h")
    assert queue.returncode == 0, queue
    ping = slurm_cluster.run("scontrol", "ping")
    assert ping.returncode == 0 and "UP" in ping.stdout, ping
    config = slurm_cluster.run("scontrol", "show", "config")
    assert "auth/none" in config.stdout
    assert Path(slurm_cluster.env["SLURM_CONF"]) == slurm_cluster.conf_path
    assert os.path.isabs(slurm_cluster.bin("sbatch"))


@pytest.mark.slurm
def test_unknown_job_ids_and_sacct_without_accounting(slurm_cluster: SlurmCluster) -> None:
    """Pinned Slurm 22.05 answers: an id the controller does not know (never existed or
    purged after MinJobAge) is an error for squeue and scontrol; sacct refuses to run."""
    for argv in (("squeue", "-h", "-j", UNKNOWN_JOB), ("scontrol", "show", "job", UNKNOWN_JOB)):
        res = slurm_cluster.run(*argv)
        assert res.returncode == 1, res
        assert res.stdout == ""
        assert res.stderr == "slurm_load_jobs error: Invalid job id specified\n"
    sacct = slurm_cluster.run("sacct", "-j", "1", "-n", "-P", "-o", "JobID,State,ExitCode")
    assert sacct.returncode == 1, sacct
    assert sacct.stdout == ""
    assert sacct.stderr == "Slurm accounting storage is disabled\n"


@pytest.mark.slurm
def test_sbatch_job_runs_and_writes_a_file(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch(
        "-o", str(tmp_path / "slurm-%j.out"),
        "--wrap", f"echo hello from $SLURMD_NODENAME > {shlex.quote(str(out))}",
    )  # fmt: skip
    assert slurm_cluster.wait_job(job) == ["COMPLETED"]
    assert out.read_text().startswith("hello from jc")
    # A finished job leaves the default squeue listing (rc 0, no lines) but stays
    # visible with --states=all and to scontrol until MinJobAge (300 s) passes.
    gone = slurm_cluster.run("squeue", "-h", "-j", job)
    assert (gone.returncode, gone.stdout) == (0, "")
    listed = slurm_cluster.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%i %T")
    assert listed.stdout == f"{job} COMPLETED\n"
    shown = slurm_cluster.run("scontrol", "show", "job", job)
    assert "JobState=COMPLETED" in shown.stdout and "ExitCode=0:0" in shown.stdout


@pytest.mark.slurm
def test_failed_job_reports_its_exit_code(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.sbatch("-o", str(tmp_path / "o"), "--wrap", "exit 3")
    assert slurm_cluster.wait_job(job) == ["FAILED"]
    assert "ExitCode=3:0" in slurm_cluster.run("scontrol", "show", "job", job).stdout


@pytest.mark.slurm
def test_array_job_spreads_over_the_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.sbatch(
        "--array=0-5", "-o", str(tmp_path / "task-%a.out"),
        "--wrap", "echo $SLURMD_NODENAME $SLURM_ARRAY_TASK_ID; sleep 2",
    )  # fmt: skip
    assert slurm_cluster.wait_job(job, timeout=40) == ["COMPLETED"] * 6
    lines = [(tmp_path / f"task-{i}.out").read_text().split() for i in range(6)]
    assert sorted(int(task) for _, task in lines) == list(range(6))
    assert len({node for node, _ in lines}) >= 2, lines


@pytest.mark.slurm
def test_gpu_gres_job_lands_on_jc3(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    gres = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %G")
    assert sorted(gres.stdout.splitlines()) == ["jc1 (null)", "jc2 (null)", "jc3 gpu:2"]
    out = tmp_path / "gpu.out"
    job = slurm_cluster.sbatch(
        "--gres=gpu:1", "-o", str(out), "--wrap", "echo $SLURMD_NODENAME $CUDA_VISIBLE_DEVICES"
    )
    assert slurm_cluster.wait_job(job) == ["COMPLETED"]
    node, device = out.read_text().split()
    assert node == "jc3" and device in {"0", "1"}


@pytest.mark.slurm
def test_controller_restart_keeps_running_jobs(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    gate, done = tmp_path / "gate", tmp_path / "done"
    job = slurm_cluster.sbatch(
        "-o", str(tmp_path / "o"),
        "--wrap",
        f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.1; done;"
        f" echo done > {shlex.quote(str(done))}",
    )  # fmt: skip
    wait_until(lambda: slurm_cluster.job_states(job) == ["RUNNING"], 20, "the job to run")
    slurm_cluster.stop_controller()
    try:
        down = slurm_cluster.run("squeue", "-h")
        assert down.returncode == 1
        assert "Unable to contact slurm controller" in down.stderr
        gate.touch()
        wait_until(done.exists, 10, "the job to finish while the controller is down")
    finally:
        slurm_cluster.start_controller()
    assert slurm_cluster.run("squeue", "-h").returncode == 0
    assert slurm_cluster.wait_job(job, timeout=60) == ["COMPLETED"]


# ---- sshd ----------------------------------------------------------------------------


@pytest.mark.ssh
@pytest.mark.slurm
def test_ssh_login_runs_sinfo(sshd_server: SSHServer, slurm_cluster: SlurmCluster) -> None:
    remote = ["env", f"SLURM_CONF={shlex.quote(str(slurm_cluster.conf_path))}",
              "sinfo", "-h", "-N", "-o", "%N"]
    res = subprocess.run(sshd_server.ssh_argv(*remote), capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["jc1", "jc2", "jc3"]


@pytest.mark.ssh
def test_sshd_restart_keeps_port_and_host_key(sshd_server: SSHServer) -> None:
    port, known = sshd_server.port, sshd_server.known_hosts.read_text()
    assert known.startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")
    sshd_server.restart()
    assert sshd_server.port == port and sshd_server.known_hosts.read_text() == known
    res = subprocess.run(sshd_server.ssh_argv("echo", "ok"), capture_output=True, text=True,
                         timeout=30)
    assert (res.returncode, res.stdout) == (0, "ok\n"), res.stderr


@pytest.mark.ssh
def test_many_channels_over_one_asyncssh_connection(sshd_server: SSHServer) -> None:
    async def main() -> list[str]:
        async with asyncssh.connect(
            sshd_server.host, port=sshd_server.port, username=sshd_server.user,
            client_keys=[str(sshd_server.key_path)],
            known_hosts=str(sshd_server.known_hosts),
        ) as conn:  # fmt: skip
            results = await asyncio.gather(
                *(conn.run(f"sleep 0.5; echo {i}", check=True) for i in range(20))
            )
        return [str(r.stdout).strip() for r in results]

    assert asyncio.run(main()) == [str(i) for i in range(20)]


# ---- podman --------------------------------------------------------------------------


@pytest.mark.podman
def test_podman_runs_busybox_offline_with_a_read_only_mount(
    podman_image: PodmanImage, tmp_path: Path
) -> None:
    assert podman_image.image == "localhost/jobcell-busybox:1"
    assert os.environ["CONTAINERS_CONF"] == podman_image.env["CONTAINERS_CONF"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("hello\n")
    script = (
        "cat /data/in.txt; ls /sys/class/net;"
        " if echo x > /data/new 2>/dev/null; then echo writable; else echo read-only; fi"
    )
    res = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", "-v", f"{data}:/data:ro",
         podman_image.image, "/bin/sh", "-c", script],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["hello", "lo", "read-only"]
    assert not (data / "new").exists()
