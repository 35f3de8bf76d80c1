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

case "${1:-}" in
  demo)
    install_python demo
    shift
    exec "$VENV/bin/jobcell" demo "$@"
    ;;
  test)
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
