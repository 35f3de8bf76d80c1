"""A real Slurm 22.05 cluster on this host: one slurmctld and three slurmd nodes.

Everything lives under ``root``: ``slurm.conf`` and ``gres.conf`` in ``root/etc``,
controller state in ``root/state``, per-node spool in ``root/spool/<node>``, pid
files in ``root/run`` and logs in ``root/log``. Ports are chosen free at
:meth:`SlurmCluster.start`, so several clusters can coexist on one machine.

Nodes ``jc1``, ``jc2`` and ``jc3`` each declare ``CPUs=2`` and
``RealMemory=4000`` (``SlurmdParameters=config_overrides``, so a smaller machine
does not drain them). Jobs get ``DefMemPerCPU=100`` MB unless they ask, so
several jobs share a node. Node ``jc3`` carries a fake GPU GRES (``gpu:2``):
``gres.conf`` has ``AutoDetect=off`` and ``File=root/dev/nvidia[01]``, two
symlinks to ``/dev/null`` (slurmd rejects plain files with "is not a valid
character or block device" and then sets no ``CUDA_VISIBLE_DEVICES``). With
``TaskPlugin=task/none`` no device cgroup is involved; ``sbatch --gres=gpu:1``
runs on jc3 with ``CUDA_VISIBLE_DEVICES=0`` (or 1) and ``SLURM_JOB_GPUS`` set.

Accounting is disabled (``sacct`` cannot tell job states); ``MinJobAge`` is the
default 300 s, so ``scontrol show job <id>`` works for five minutes after a job
ends.

Daemons run as root in their own sessions and carry the environment variable
``JC_TEST_SLURM_ROOT=<root>``, which ``slurmstepd`` inherits; :meth:`stop` kills
the daemons, every ``slurmstepd`` that carries the marker, and all their
descendants (the job processes). An ``atexit`` hook does the same if the test
session exits without calling :meth:`stop`, and a small guard process
(``tests.services.Reaper``) kills everything carrying the marker if the test
process is killed outright (SIGKILL, ``os._exit``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from . import Reaper, ServiceError, free_ports, log_tail, wait_gone

NODES = ("jc1", "jc2", "jc3")
GPU_NODE = "jc3"
MARKER = "JC_TEST_SLURM_ROOT"
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
     "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)  # fmt: skip


def short_hostname() -> str:
    try:
        out = subprocess.run(
            ["hostname", "-s"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or os.uname().nodename.split(".")[0]


class SlurmCluster:
    """One slurmctld plus slurmd nodes ``jc1``, ``jc2``, ``jc3`` under ``root``."""

    def __init__(self, root: Path, *, start_timeout: float = 60.0) -> None:
        self.root = Path(root).resolve()
        self.start_timeout = start_timeout
        self.hostname = short_hostname()
        self.nodes = NODES
        self.gpu_node = GPU_NODE
        self.conf_path = self.root / "etc" / "slurm.conf"
        self.gres_conf_path = self.root / "etc" / "gres.conf"
        self.log_dir = self.root / "log"
        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}
        self._ctld: subprocess.Popen[bytes] | None = None
        self._slurmd: dict[str, subprocess.Popen[bytes]] = {}
        self._reaper: Reaper | None = None
        self._atexit_registered = False

    # ---- public API -------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment entries a Slurm client needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf_path)}

    @staticmethod
    def bin(name: str) -> str:
        """Absolute path of a Slurm command (``sbatch``, ``squeue``, ...)."""
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
        if path is None:
            raise ServiceError(f"Slurm command {name!r} not found (apt-get install slurm-wlm)")
        return path

    def run(
        self, *argv: str, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against this cluster; output captured as text, never raises
        on a non-zero exit."""
        if not argv:
            raise ValueError("run() needs a command")
        return subprocess.run(
            [self.bin(argv[0]), *argv[1:]],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )

    def start(self) -> SlurmCluster:
        """Write the configuration, start every daemon and wait until all nodes are idle."""
        if self._ctld is not None:
            raise ServiceError("cluster already started")
        for name in ("slurmctld", "slurmd"):
            self.bin(name)
        self._write_config()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        self._reaper = Reaper(marker=f"{MARKER}={self.root}")
        try:
            self._spawn_controller()
            for node in self.nodes:
                self._spawn_slurmd(node)
            self._wait_nodes_idle(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every daemon this cluster started, their job steps and job processes."""
        # Controller first: killing job steps under a live slurmctld keeps it busy with
        # completion RPCs and makes it ignore SIGTERM for many seconds. slurmd's SIGTERM
        # leaves running slurmstepd alone, so those (and the job processes below them)
        # are killed last, found by the marker in their environment.
        daemons = [p for p in [self._ctld, *self._slurmd.values()] if p is not None]
        self._ctld = None
        self._slurmd = {}
        for proc in daemons:
            _signal(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in daemons:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._kill_steps()
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.close()

    def stop_controller(self, *, hard: bool = False) -> None:
        """Stop slurmctld only (SIGTERM, or SIGKILL when ``hard``); nodes and jobs go on."""
        proc = self._ctld
        if proc is None:
            raise ServiceError("slurmctld is not running")
        self._ctld = None
        _signal(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def start_controller(self, timeout: float = 30.0) -> None:
        """Start slurmctld again on the same state directory (it recovers its jobs)."""
        if self._ctld is not None:
            raise ServiceError("slurmctld is already running")
        self._spawn_controller()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.run("squeue", "-h", timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise ServiceError("slurmctld did not answer after restart\n" + self.logs())

    def sbatch(self, *args: str) -> str:
        """Submit with ``sbatch --parsable <args>``; returns the job id (raises on error)."""
        res = self.run("sbatch", "--parsable", *args)
        if res.returncode != 0:
            raise ServiceError(f"sbatch {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def job_states(self, job_id: str) -> list[str]:
        """``JobState`` of every record ``scontrol show job <id>`` prints (one per array
        task); empty when the controller does not know the id (or is down)."""
        res = self.run("scontrol", "-o", "show", "job", str(job_id))
        if res.returncode != 0:
            return []
        return [
            field.split("=", 1)[1]
            for line in res.stdout.splitlines()
            for field in line.split()
            if field.startswith("JobState=")
        ]

    def wait_job(self, job_id: str, timeout: float = 30.0) -> list[str]:
        """Wait until every record of the job is in a final state; returns the states."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            states = self.job_states(job_id)
            if states and all(s in FINAL_STATES for s in states):
                return states
            time.sleep(0.2)
        raise ServiceError(f"job {job_id} not finished after {timeout:.0f} s: {states}")

    def logs(self, lines: int = 30) -> str:
        """Tails of every daemon log, for error messages."""
        paths = sorted(self.log_dir.glob("*.log")) + sorted(self.log_dir.glob("*.out"))
        return "\n".join(log_tail(p, lines) for p in paths)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals --------------------------------------------------------------

    def _write_config(self) -> None:
        for sub in ("etc", "state", "run", "log", "dev", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ports = free_ports(1 + len(self.nodes))
        self.ctld_port = ports[0]
        self.node_ports = dict(zip(self.nodes, ports[1:], strict=True))
        # slurmd insists that a GRES File= is a character or block device; a symlink to
        # /dev/null passes (it stats through the link) and needs no mknod privilege.
        gpu_files = [self.root / "dev" / f"nvidia{i}" for i in range(2)]
        for path in gpu_files:
            if path.is_symlink() or path.exists():
                path.unlink()
            path.symlink_to("/dev/null")
        r = self.root
        lines = [
            "ClusterName=jobcell",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",
            "DefMemPerCPU=100",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "MinJobAge=300",
            "MessageTimeout=5",
            "TCPTimeout=2",
            "SlurmdTimeout=30",
            "SlurmctldTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "GresTypes=gpu",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for node in self.nodes:
            gres = " Gres=gpu:2" if node == self.gpu_node else ""
            lines.append(
                f"NodeName={node} NodeHostname={self.hostname} NodeAddr=127.0.0.1"
                f" Port={self.node_ports[node]} CPUs=2 RealMemory=4000{gres} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES"
            " MaxTime=INFINITE State=UP"
        )
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.gres_conf_path.write_text(
            "AutoDetect=off\n"
            + "".join(f"NodeName={self.gpu_node} Name=gpu File={p}\n" for p in gpu_files)
        )

    def _daemon_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, MARKER: str(self.root)}

    def _spawn(self, argv: list[str], out_name: str) -> subprocess.Popen[bytes]:
        with open(self.log_dir / out_name, "ab") as out:
            return subprocess.Popen(
                argv,
                env=self._daemon_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )

    def _spawn_controller(self) -> None:
        self._ctld = self._spawn(
            [self.bin("slurmctld"), "-D", "-f", str(self.conf_path)], "slurmctld.out"
        )

    def _spawn_slurmd(self, node: str) -> None:
        self._slurmd[node] = self._spawn(
            [self.bin("slurmd"), "-D", "-N", node, "-f", str(self.conf_path)],
            f"slurmd-{node}.out",
        )

    def _check_alive(self) -> None:
        procs = {"slurmctld": self._ctld, **{f"slurmd -N {n}": p for n, p in self._slurmd.items()}}
        for name, proc in procs.items():
            if proc is not None and proc.poll() is not None:
                raise ServiceError(
                    f"{name} exited with status {proc.returncode} during start\n" + self.logs()
                )

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            res = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=10)
            last = (res.stdout + res.stderr).strip()
            if res.returncode == 0:
                states = dict(line.split(None, 1) for line in res.stdout.splitlines() if line)
                if all(states.get(n) == "idle" for n in self.nodes):
                    return
            time.sleep(0.2)
        raise ServiceError(
            f"Slurm nodes not idle after {timeout:.0f} s; last sinfo:\n{last}\n" + self.logs()
        )

    def _kill_steps(self) -> None:
        """SIGKILL every process carrying this cluster's marker that is not a daemon we
        track (slurmstepd), plus all descendants of those and of the slurmd daemons."""
        me = os.getpid()
        victims: dict[int, psutil.Process] = {}
        marker = f"{MARKER}={self.root}".encode()
        for proc in psutil.process_iter(["name"]):
            if proc.pid == me:
                continue
            try:
                with open(f"/proc/{proc.pid}/environ", "rb") as fh:
                    environ = fh.read().split(b"\0")
            except OSError:
                continue
            if marker not in environ:
                continue
            try:
                children = proc.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                victims[child.pid] = child
            name = proc.info.get("name") or ""
            if name.startswith("slurmstepd"):
                victims[proc.pid] = proc
        victims.pop(me, None)
        for proc in victims.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        wait_gone(list(victims.values()), timeout=5)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
