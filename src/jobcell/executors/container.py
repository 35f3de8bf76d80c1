"""Container command lines: pure builders for podman, docker, apptainer and singularity.

A container runner's step still runs through the step wrapper on the host: the wrapper
writes ``child.pid``, ``stdout.log``/``stderr.log`` and ``exit_code``, and the runner argv
it runs is the container command line built here. Only the attempt directory is mounted,
at fixed paths inside the container::

    <attempt>/input       -> /jobcell/step/input        read-only
    <attempt>/inputs.json -> /jobcell/step/inputs.json  read-only (the staged-input manifest)
    <attempt>/input.json  -> /jobcell/step/input.json   read-only (Python runners)
    <attempt>/output      -> /jobcell/step/output       read-write

The network is off by default (cell option ``container_network``), the container runs as
the invoking user where the runtime allows it, and every value (path, variable, param)
is its own argv item: nothing here is ever parsed by a shell.

Runtimes:

- podman/docker: ``run --rm --init`` (an init forwards the wrapper's TERM to the command),
  ``--pull=<policy>``, ``--network``, no capabilities, ``no-new-privileges``, one
  ``--env K=V`` per variable. Podman as root and docker use ``--user UID:GID``;
  rootless podman uses ``--userns=keep-id``. GPUs: docker ``--gpus "device=0,1"`` (or
  ``--gpus N`` when the devices are not known), podman CDI
  ``--device nvidia.com/gpu=<id>`` per device (``=all`` when not known); inside, the
  devices are renumbered from 0, so ``CUDA_VISIBLE_DEVICES`` is ``0,...,n-1``.
- apptainer/singularity: ``exec --containall --cleanenv --no-home --no-mount
  bind-paths,cwd`` (no home, no current directory, none of the site's bind paths),
  ``--net --network none`` unless ``container_network`` names another network, ``--nv``
  for GPUs (all host GPUs are visible, ``CUDA_VISIBLE_DEVICES`` selects them). They run
  as the invoking user. Their ``--env`` option parses its value as CSV (a comma or a
  quote in a value would change it), so variables go in the runtime's own environment as
  ``APPTAINERENV_K``/``SINGULARITYENV_K``, which the runtime passes even with
  ``--cleanenv``. Host ``APPTAINER_BIND``-like variables are removed. Pull: images
  given by a URI (``docker://``, ``library://``, ...) are pulled into the runtime's cache
  when missing (``missing``); ``always`` adds ``--disable-cache`` (a fresh pull every
  time); ``never`` accepts only local images (a ``.sif`` file or a sandbox folder).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobcell.model.runner import ContainerSpec

RUNTIMES = ("podman", "docker", "apptainer", "singularity")
RUNTIME_CHOICES = ("auto", *RUNTIMES)
PULL_POLICIES = ("missing", "always", "never")
#: The step directory inside the container, and the paths under it.
STEP_DIR = "/jobcell/step"
INPUT_DIR = STEP_DIR + "/input"
OUTPUT_DIR = STEP_DIR + "/output"
#: ``JOBCELL_FORCE_CONTAINER_GPU=1`` gives optional GPUs to a container even when the
#: backend does not report any.
FORCE_GPU_VARIABLE = "JOBCELL_FORCE_CONTAINER_GPU"
#: The label every podman/docker container of a step carries (value: the attempt's name),
#: so that a container left behind by a killed runtime process can be found and removed.
ATTEMPT_LABEL = "io.jobcell.attempt"
ENV_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"
_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)
_GPU_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_URI_RE = re.compile(r"[a-z][a-z0-9+.-]*://")
#: Host variables that would add bind mounts to an apptainer/singularity container.
_BIND_VARIABLES = ("APPTAINER_BIND", "APPTAINER_BINDPATH", "SINGULARITY_BIND",
                   "SINGULARITY_BINDPATH", "APPTAINER_CONTAINLIBS", "SINGULARITY_CONTAINLIBS")


class ContainerError(ValueError):
    """A container definition or command line is not allowed (one clear sentence)."""


def family(runtime: str) -> str:
    """``oci`` for podman/docker, ``apptainer`` for apptainer/singularity."""
    if runtime in ("podman", "docker"):
        return "oci"
    if runtime in ("apptainer", "singularity"):
        return "apptainer"
    raise ContainerError(f"unknown container runtime {runtime!r}; expected one of "
                         f"{', '.join(RUNTIME_CHOICES)}")


# -- runtime resolution --------------------------------------------------------------------

def resolve_runtime(preferred: str, which: Callable[[str], str | None] = shutil.which
                    ) -> tuple[str, str]:
    """The runtime to use and its executable: ``(name, path)``.

    ``auto`` takes the first of podman, docker, apptainer, singularity found by ``which``.
    """
    if preferred not in RUNTIME_CHOICES:
        raise ContainerError(f"unknown container runtime {preferred!r}; expected one of "
                             f"{', '.join(RUNTIME_CHOICES)}")
    candidates = RUNTIMES if preferred == "auto" else (preferred,)
    for name in candidates:
        path = which(name)
        if path:
            return name, path
    if preferred == "auto":
        raise ContainerError("no container runtime was found: looked for "
                             f"{', '.join(candidates)} on PATH (set the cell option "
                             "'container_runtime' or the runner's 'container.runtime')")
    raise ContainerError(f"container runtime {preferred!r} was not found on PATH "
                         f"(looked for {preferred!r})")


# -- validation ----------------------------------------------------------------------------

def check_image(image: str) -> str:
    """An image reference: non-empty, one word, not an option."""
    if not image or image != image.strip() or any(c.isspace() or ord(c) < 32 for c in image):
        raise ContainerError(f"container image {image!r} must be one word without spaces "
                             "or control characters")
    if image.startswith("-"):
        raise ContainerError(f"container image {image!r} must not start with '-'")
    if len(image) > 1000:
        raise ContainerError(f"container image {image[:20]!r}... is longer than 1000 "
                             "characters")
    return image


def check_container_path(path: str, what: str) -> str:
    """A path inside the container: absolute, without ``..``, NUL or line breaks."""
    if not path.startswith("/") or any(c in path for c in "\x00\n\r") or \
            ".." in path.split("/"):
        raise ContainerError(f"{what} {path!r} must be an absolute path inside the "
                             "container, without '..' or line breaks")
    return path


def check_env_name(name: str) -> str:
    """A variable passed into a container must be a portable name (``[A-Za-z_][A-Za-z0-9_]*``):
    podman reads a trailing ``*`` as a pattern of host variables to copy."""
    if not _ENV_NAME_RE.fullmatch(name):
        raise ContainerError(f"variable {name!r} cannot be passed into a container: names "
                             f"must match {ENV_NAME_PATTERN}")
    return name


def check_mount_source(path: str, runtime: str) -> str:
    """A host path to mount: absolute, and free of the runtime's separators."""
    bad = ":\x00" if family(runtime) == "oci" else ":,\x00"
    if not path.startswith("/") or any(c in path for c in bad):
        shown = " or ".join(repr(c) for c in bad if c != "\x00")
        raise ContainerError(f"the step directory {path!r} cannot be mounted by {runtime}: "
                             f"it must be absolute and contain no {shown} (move the cell "
                             "home or the backend path mapping)")
    return path


@dataclass(frozen=True)
class _Option:
    takes_value: bool
    check: Callable[[str], str | None] | None = None  # the value -> None, or why not


def _tmpfs_only(value: str) -> str | None:
    fields = [f.strip().lower() for f in value.split(",")]
    if "type=tmpfs" in fields and not any(f.split("=", 1)[0] in ("src", "source")
                                          for f in fields):
        return None
    return "only 'type=tmpfs' mounts are allowed: only the step directory is mounted"


def _no_host_path(value: str) -> str | None:
    return "the destination must be inside the container" if ":" in value and \
        not value.startswith("/") else None


_OCI_ALLOWED: dict[str, _Option] = {
    **{name: _Option(True) for name in (
        "--memory", "--memory-swap", "--memory-reservation", "--memory-swappiness",
        "--cpus", "--cpu-shares", "--cpu-period", "--cpu-quota", "--cpuset-cpus",
        "--cpuset-mems", "--shm-size", "--ulimit", "--pids-limit", "--label", "--hostname",
        "--platform", "--arch", "--os", "--variant", "--stop-signal", "--stop-timeout",
        "--entrypoint", "--tz", "--umask", "--cap-drop", "--blkio-weight", "--timeout")},
    "--tmpfs": _Option(True, _no_host_path),
    "--mount": _Option(True, _tmpfs_only),
    **{name: _Option(False) for name in ("--read-only", "--read-only-tmpfs",
                                         "--no-healthcheck", "--init", "--rm")},
}
_APPTAINER_ALLOWED: dict[str, _Option] = {
    **{name: _Option(True) for name in (
        "--hostname", "--memory", "--memory-reservation", "--memory-swap", "--cpus",
        "--cpu-shares", "--cpuset-cpus", "--cpuset-mems", "--pids-limit", "--blkio-weight",
        "--drop-caps", "--app", "--no-mount")},
    **{name: _Option(False) for name in (
        "--cleanenv", "--contain", "--containall", "--writable-tmpfs", "--no-init",
        "--no-umask", "--no-eval", "--compat", "--unsquash", "--no-privs", "--no-home")},
}
_MOUNTS = "only the step directory is mounted"
_NETWORK = "the network is set by the cell option 'container_network'"
_USER = "steps run as the invoking user"
_ENV = "pass variables with the runner's 'env'"
_WORKDIR = "set 'container.workdir'"
_PULL = "set 'container.pull' or the cell option 'container_pull'"
_GPUS = "GPUs are given from the runner's declared resources"
_ISOLATION = "it would weaken the container's isolation"
_FOREGROUND = "the step wrapper runs the container in the foreground and removes it"
_HOST_FILES = "it reads or writes host files or runtime internals"
_DENIED_COMMON: dict[str, str] = {
    "--privileged": "a privileged container is never allowed",
    **dict.fromkeys(("-v", "--volume", "--volumes-from", "-B", "--bind", "--fusemount",
                     "--overlay", "--home", "-H", "--scratch", "-S", "--rootfs",
                     "--image-volume"), _MOUNTS),
    **dict.fromkeys(("--network", "--net", "-n", "--network-args", "--netns-path", "--dns",
                     "--dns-option", "--dns-search", "--add-host", "--network-alias",
                     "--ip", "--ip6", "--mac-address", "-p", "--publish", "-P",
                     "--publish-all", "--expose"), _NETWORK),
    **dict.fromkeys(("-u", "--user", "--userns", "--uidmap", "--gidmap", "--group-add",
                     "--subuidname", "--subgidname", "-f", "--fakeroot", "--keep-privs",
                     "--allow-setuid"), _USER),
    **dict.fromkeys(("-e", "--env", "--env-file", "--env-host", "--env-merge",
                     "--unsetenv", "--unsetenv-all"), _ENV),
    **dict.fromkeys(("--pwd", "--cwd"), _WORKDIR),
    **dict.fromkeys(("--pull", "--disable-cache"), _PULL),
    **dict.fromkeys(("--gpus", "--device", "--nv", "--nvccli", "--rocm"), _GPUS),
    **dict.fromkeys(("--cap-add", "--add-caps", "--security-opt", "--security",
                     "--seccomp-policy", "--pid", "--ipc", "--uts", "--cgroupns",
                     "--cgroup-parent", "--cgroups", "--cgroup-conf", "--pod", "--sysctl",
                     "--oom-kill-disable", "--oom-score-adj", "--sig-proxy",
                     "--device-cgroup-rule", "--privileges"), _ISOLATION),
    **dict.fromkeys(("-d", "--detach", "-i", "--interactive", "-t", "--tty", "--restart",
                     "--name", "--replace", "--attach", "-a"), _FOREGROUND),
    **dict.fromkeys(("--cidfile", "--conmon-pidfile", "--pidfile", "--log-driver",
                     "--log-opt", "--annotation", "--init-path", "--preserve-fds",
                     "--hooks-dir", "--runtime", "--secret", "--authfile",
                     "--decryption-key", "--apply-cgroups", "--writable", "-w",
                     "--workdir", "-W"), _HOST_FILES),
}


def _denied_reason(name: str, kind: str) -> str | None:
    if name in ("-w", "--workdir") and kind == "oci":
        return _WORKDIR
    if name in ("-w", "--workdir", "-W") and kind == "apptainer":
        return _MOUNTS
    return _DENIED_COMMON.get(name)


def _check_for(args: Sequence[str], kind: str) -> None:
    allowed = _OCI_ALLOWED if kind == "oci" else _APPTAINER_ALLOWED
    index = 0
    while index < len(args):
        arg = args[index]
        if "\x00" in arg:
            raise ContainerError(f"container.extra_args item {arg!r} contains a NUL "
                                 "character")
        if not arg.startswith("-") or arg in ("-", "--"):
            raise ContainerError(f"container.extra_args: {arg!r} is not an option (the "
                                 "image and the command are set by 'container.image' and "
                                 "'container.command')")
        if arg.startswith("--"):
            name, has_value, value = arg.partition("=")
        else:
            name, value = arg[:2], arg[2:].removeprefix("=")
            has_value = "=" if value else ""
        reason = _denied_reason(name, kind)
        if reason is None and not arg.startswith("--"):
            # Short options may be bundled (-it): each letter counts.
            for letter in arg[1:]:
                reason = _denied_reason("-" + letter, kind)
                if reason is not None:
                    break
        if reason is not None:
            raise ContainerError(f"container.extra_args: {arg!r} is not allowed: {reason}")
        option = allowed.get(name)
        if option is None or not arg.startswith("--"):
            raise ContainerError(
                f"container.extra_args: {arg!r} is not an allowed option (long forms "
                f"only; allowed: {', '.join(sorted(allowed))})")
        if option.takes_value and not has_value:
            index += 1
            if index >= len(args):
                raise ContainerError(f"container.extra_args: {name!r} needs a value")
            value = args[index]
        if option.check is not None and option.takes_value:
            problem = option.check(value)
            if problem is not None:
                raise ContainerError(f"container.extra_args: {name!r} {value!r} is not "
                                     f"allowed: {problem}")
        index += 1


def check_extra_args(args: Sequence[str], runtime: str | None = None) -> list[str]:
    """Validate extra runtime arguments; raise :class:`ContainerError` naming the first
    argument that is not allowed.

    Only known-safe long options are accepted (resource limits, labels, ``--tmpfs``,
    ``--read-only``, ...). With no runtime (or ``auto``), arguments valid for either
    family (podman/docker or apptainer/singularity) pass here; the command line is
    checked again for the runtime that runs it.
    """
    if runtime not in (None, "auto"):
        _check_for(args, family(runtime))
        return list(args)
    try:
        _check_for(args, "oci")
    except ContainerError as first:
        try:
            _check_for(args, "apptainer")
        except ContainerError:
            raise first from None
    return list(args)


# -- command lines ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Mount:
    """A host path bound into the container."""

    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class GpuRequest:
    """GPUs for a container: the leased device ids when known, else only a count."""

    devices: tuple[str, ...] = ()
    count: int = 0


@dataclass(frozen=True)
class ContainerCommand:
    """What a step wrapper runs: the runtime's argv, plus variables to set (``env``) and
    to remove (``unset``) in the runtime's own environment."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerOptions:
    """What the cell decides for every container step (the ``container_*`` cell options)
    and what the backend reported.

    ``backend_gpus``: GPUs the backend reports (``None`` = unknown); with none, optional
    GPUs are not requested unless ``force_gpu`` (``JOBCELL_FORCE_CONTAINER_GPU=1``).
    ``probe_local``: resolve the runtime here with ``which``; a delegated backend (Slurm)
    runs it elsewhere, so an explicit runtime is then used by name when not found here.
    ``uid``/``gid``: the user the container runs as (default: this process's).
    """

    runtime: str = "auto"
    pull: str = "missing"
    network: str = "none"
    backend_gpus: int | None = None
    force_gpu: bool = False
    probe_local: bool = True
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def from_settings(cls, settings: Any, backend_gpus: int | None = None,
                      environ: Mapping[str, str] | None = None, probe_local: bool = True
                      ) -> ContainerOptions:
        """Options from a cell's settings (``container_runtime``, ``container_pull``,
        ``container_network``) and ``JOBCELL_FORCE_CONTAINER_GPU`` in ``environ``."""
        force = force_gpu_requested(environ or {})
        return cls(runtime=str(settings.container_runtime),
                   pull=str(settings.container_pull),
                   network=str(settings.container_network),
                   backend_gpus=backend_gpus, force_gpu=force, probe_local=probe_local)


def force_gpu_requested(environ: Mapping[str, str]) -> bool:
    """Whether ``JOBCELL_FORCE_CONTAINER_GPU`` asks for optional GPUs in containers."""
    return environ.get(FORCE_GPU_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def gpu_request(required: int, optional: int, devices: Sequence[str],
                backend_gpus: int | None, force: bool, scheduled: bool = False
                ) -> GpuRequest | None:
    """The GPUs a container gets: the leased devices (or the required count) when the step
    requires GPUs; for optional GPUs only when devices were leased, or, where the cell
    does not lease GPUs itself (``scheduled`` false: a delegated backend, a cell that saw
    none), when the backend reports GPUs or ``force``."""
    if required > 0:
        return GpuRequest(tuple(devices), required)
    if optional <= 0:
        return None
    if devices:
        return GpuRequest(tuple(devices), optional)
    if not scheduled and ((backend_gpus or 0) > 0 or force):
        return GpuRequest((), optional)
    return None


def container_env(env: Mapping[str, str], runtime: str, gpus: GpuRequest | None
                  ) -> dict[str, str]:
    """The variables seen inside: podman/docker renumber the devices they are given from
    0, so ``CUDA_VISIBLE_DEVICES`` becomes ``0,...,n-1`` there."""
    result = dict(env)
    if gpus is not None and gpus.devices and family(runtime) == "oci" and \
            "CUDA_VISIBLE_DEVICES" in result:
        result["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus.devices)))
    return result


def container_argv(spec: ContainerSpec, runtime: str, executable: str, *,
                   command: Sequence[str], mounts: Sequence[Mount], env: Mapping[str, str],
                   network: str = "none", pull: str = "missing", uid: int = 0, gid: int = 0,
                   gpus: GpuRequest | None = None, label: str | None = None
                   ) -> ContainerCommand:
    """The command line that runs ``command`` in ``spec.image`` with ``runtime``.

    ``pull`` and ``runtime`` are the effective ones (the spec's or the cell's); ``env``
    holds the variables to set inside; ``uid``/``gid`` the invoking user.
    """
    kind = family(runtime)
    check_image(spec.image)
    if pull not in PULL_POLICIES:
        raise ContainerError(f"unknown pull policy {pull!r}; expected one of "
                             f"{', '.join(PULL_POLICIES)}")
    if not network or any(c.isspace() or ord(c) < 32 for c in network) or \
            network.startswith("-"):
        raise ContainerError(f"container network {network!r} must be one word")
    check_extra_args(spec.extra_args, runtime)
    workdir = check_container_path(spec.workdir or STEP_DIR, "container.workdir")
    for mount in mounts:
        check_mount_source(mount.source, runtime)
        check_container_path(mount.target, "mount target")
    for name in env:
        check_env_name(name)
    if not command:
        raise ContainerError("a container step needs a command")
    if kind == "oci":
        return ContainerCommand(_oci_argv(spec, runtime, executable, command, mounts, env,
                                          network, pull, uid, gid, gpus, label, workdir))
    return _apptainer_command(spec, runtime, executable, command, mounts, env, network,
                              pull, gpus, workdir)


def _oci_argv(spec: ContainerSpec, runtime: str, executable: str, command: Sequence[str],
              mounts: Sequence[Mount], env: Mapping[str, str], network: str, pull: str,
              uid: int, gid: int, gpus: GpuRequest | None, label: str | None,
              workdir: str) -> tuple[str, ...]:
    argv = [executable, "run", "--rm", "--init", f"--pull={pull}", "--network", network,
            "--cap-drop=all", "--security-opt=no-new-privileges"]
    if runtime == "podman" and uid != 0:
        argv.append("--userns=keep-id")  # rootless: the same user inside
    else:
        argv += ["--user", f"{uid}:{gid}"]
    if label:
        argv += ["--label", f"{ATTEMPT_LABEL}={label}"]
    for mount in mounts:
        argv += ["--volume", f"{mount.source}:{mount.target}:{'ro' if mount.read_only else 'rw'}"]
    argv += ["--workdir", workdir]
    if gpus is not None:
        for device in gpus.devices:
            if not _GPU_ID_RE.fullmatch(device):
                raise ContainerError(f"GPU device id {device!r} cannot be given to {runtime}")
        if runtime == "docker":
            argv += ["--gpus", '"device=' + ",".join(gpus.devices) + '"' if gpus.devices
                     else str(max(gpus.count, 1))]
        else:
            for device in gpus.devices or ("all",):
                argv += ["--device", f"nvidia.com/gpu={device}"]
    for name, value in sorted(env.items()):
        argv += ["--env", f"{name}={value}"]
    argv += list(spec.extra_args)
    argv += [spec.image, *command]
    return tuple(argv)


def _apptainer_command(spec: ContainerSpec, runtime: str, executable: str,
                       command: Sequence[str], mounts: Sequence[Mount],
                       env: Mapping[str, str], network: str, pull: str,
                       gpus: GpuRequest | None, workdir: str) -> ContainerCommand:
    remote = bool(_URI_RE.match(spec.image))
    if pull == "never" and remote:
        raise ContainerError(f"container image {spec.image!r} is a remote URI but the pull "
                             f"policy is 'never': with {runtime}, give a local .sif file "
                             "or sandbox folder")
    argv = [executable, "exec", "--containall", "--cleanenv", "--no-home",
            "--no-mount", "bind-paths,cwd", "--net", "--network", network]
    if pull == "always" and remote:
        argv.append("--disable-cache")
    if gpus is not None:
        argv.append("--nv")
    for mount in mounts:
        argv += ["--bind", f"{mount.source}:{mount.target}:{'ro' if mount.read_only else 'rw'}"]
    argv += ["--pwd", workdir]
    argv += list(spec.extra_args)
    argv += [spec.image, *command]
    prefix = "APPTAINERENV_" if runtime == "apptainer" else "SINGULARITYENV_"
    return ContainerCommand(tuple(argv), {prefix + k: v for k, v in sorted(env.items())},
                            _BIND_VARIABLES)


def cleanup_argv(runtime: str, executable: str, label: str) -> list[str] | None:
    """The command that lists the containers of an attempt still there (podman/docker:
    ``ps -aq --filter label=...``); remove each with ``[executable, "rm", "-f", id]``.

    A container can outlive its runtime process when that process is SIGKILLed (podman's
    conmon keeps it running); apptainer containers end with their process (None)."""
    if family(runtime) != "oci":
        return None
    return [executable, "ps", "-aq", "--filter", f"label={ATTEMPT_LABEL}={label}"]
