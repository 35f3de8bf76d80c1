"""A tiny local container image for podman tests, built without any registry.

The image ``localhost/jobcell-busybox:1`` is a rootfs holding Debian's static
busybox (package ``busybox-static``) as ``/bin/busybox`` plus applet symlinks,
imported with ``podman import``. It is built once per machine and reused.

podman must run with ``runtime = "runc"`` (crun fails on this cgroup v1 hybrid
host over RLIMIT_NOFILE), ``default_ulimits = []`` and the cgroupfs manager; a
``containers.conf`` with those settings is written under ``root`` and named by
``PodmanImage.env['CONTAINERS_CONF']``. :func:`ensure_image` checks that
``podman run --rm --init --network none`` works (``--init`` needs ``catatonit``,
only a Recommends of Debian's podman) and raises :class:`ServiceError` with
podman's own message if not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from . import ServiceError

IMAGE = "localhost/jobcell-busybox:1"
APPLETS = (
    "sh", "echo", "cat", "ls", "sleep", "cp", "mkdir", "wc", "id", "env", "sha256sum",
    "true", "false", "test", "printf", "tr", "head", "tail", "dd",
)  # fmt: skip
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


@dataclass(frozen=True)
class PodmanImage:
    image: str
    containers_conf: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``podman <args>`` with this image's containers.conf; never raises on failure."""
        return subprocess.run(
            [_podman(), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _podman() -> str:
    path = shutil.which("podman")
    if path is None:
        raise ServiceError("podman not found (apt-get install podman runc)")
    return path


def _find_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(candidate):
            return Path(candidate)
    raise ServiceError("busybox not found (apt-get install busybox-static)")


def _check_static(busybox: Path) -> None:
    """The image has no libc: a dynamically linked busybox (Debian ``busybox``) fails."""
    try:
        out = subprocess.run(["ldd", str(busybox)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return
    if out.returncode == 0 and "=>" in out.stdout:
        raise ServiceError(
            f"{busybox} is dynamically linked; the image needs busybox-static "
            "(apt-get install busybox-static)"
        )


def ensure_image(root: Path) -> PodmanImage:
    """Write the containers.conf under ``root``, import the image if podman lacks it,
    and check that it runs; raises :class:`ServiceError` with podman's output if not."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    img = PodmanImage(image=IMAGE, containers_conf=conf, env={"CONTAINERS_CONF": str(conf)})
    if shutil.which("runc") is None and not os.path.exists("/usr/sbin/runc"):
        raise ServiceError("runc not found (apt-get install runc)")

    if img.run("image", "exists", IMAGE).returncode != 0:
        _build(img, root)
    # --init as jobcell's container runner uses it: needs catatonit on the host.
    res = img.run(
        "run", "--rm", "--init", "--network", "none", "--pull=never", IMAGE,
        "/bin/sh", "-c", "echo hi",
    )  # fmt: skip
    if res.returncode != 0 or res.stdout.strip() != "hi":
        raise ServiceError(
            f"podman cannot run {IMAGE} (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return img


def _build(img: PodmanImage, root: Path) -> None:
    busybox = _find_busybox()
    _check_static(busybox)
    rootfs = root / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    for sub in ("bin", "tmp", "etc", "proc", "sys", "dev", "root", "work"):
        (rootfs / sub).mkdir(parents=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "busybox").chmod(0o755)
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    tar_path = root / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(rootfs, arcname=".")
    res = img.run(
        "import",
        "--change", "ENV=PATH=/bin",
        "--change", 'CMD ["/bin/sh"]',
        str(tar_path),
        IMAGE,
        timeout=120,
    )  # fmt: skip
    if res.returncode != 0:
        # Another test session may have imported it meanwhile.
        if img.run("image", "exists", IMAGE).returncode == 0:
            return
        raise ServiceError(f"podman import failed (rc={res.returncode}):\n{res.stderr}")
