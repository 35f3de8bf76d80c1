#!/usr/bin/env bash
# Set up a fresh machine and run jobcell's demo or its test suite.
#   ./dev.sh demo    install into .venv and run the demo on the embedded default
#   ./dev.sh test    install into .venv (plus what the tests use) and run the test suite
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=.venv

install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$1]"
}

# System packages the test suite starts real services from (tests/services/): a Slurm
# cluster, an sshd and podman with runc (crun fails on cgroup v1 hosts), catatonit for
# `podman run --init`, a static busybox for the test image, and Debian's chromium for the
# dashboard's browser tests (driven by Playwright; no browser download). --no-install-recommends
# is enough for all of them when running as root (rootful podman, `--network none`).
SYSTEM_PACKAGES=(slurm-wlm openssh-server podman runc catatonit busybox-static chromium)

missing_system_packages() {
  local PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
  local pair cmd pkg missing=""
  for pair in slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-wlm sshd:openssh-server \
              ssh-keygen:openssh-server podman:podman runc:runc catatonit:catatonit \
              busybox:busybox-static chromium:chromium; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1; then
      case " $missing " in *" $pkg "*) ;; *) missing="$missing $pkg" ;; esac
    fi
  done
  echo "${missing# }"
}

install_system_packages() {
  local missing log
  missing=$(missing_system_packages)
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev.sh: the tests need system packages that are missing here: $missing" >&2
    echo "dev.sh: as root run: apt-get install --no-install-recommends ${SYSTEM_PACKAGES[*]}" >&2
    echo "dev.sh: (not root, so not installing them; the tests that need them will fail)" >&2
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "dev.sh: missing system packages ($missing) and no apt-get to install them" >&2
    exit 1
  fi
  echo "dev.sh: installing system packages for the tests (missing: $missing):" \
       "${SYSTEM_PACKAGES[*]}"
  log=$(mktemp)
  if ! { apt-get -o DPkg::Lock::Timeout=300 update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
           --no-install-recommends "${SYSTEM_PACKAGES[@]}"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    echo "dev.sh: apt-get could not install ${SYSTEM_PACKAGES[*]} (output above)" >&2
    exit 1
  fi
  rm -f "$log"
  missing=$(missing_system_packages)
  if [ -n "$missing" ]; then
    echo "dev.sh: still missing after apt-get install: $missing" >&2
    exit 1
  fi
}

case "${1:-}" in
  demo)
    install_python demo
    shift
    exec "$VENV/bin/jobcell" demo "$@"
    ;;
  test)
    install_system_packages
    install_python dev
    shift
    "$VENV/bin/ruff" check src tests benchmarks
    set +e
    "$VENV/bin/python" -m pytest -q "$@"
    status=$?
    set -e
    if [ "$status" -eq 5 ]; then
      echo "no tests were collected" >&2
      exit 1
    fi
    exit "$status"
    ;;
  *)
    echo "usage: ./dev.sh demo|test [args...]" >&2
    exit 2
    ;;
esac
