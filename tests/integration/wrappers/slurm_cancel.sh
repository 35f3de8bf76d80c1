#!/bin/bash
# External cancel wrapper for jobcell, built on Slurm: usage slurm_cancel.sh JOB_ID.
# JOBCELL_CANCEL_SIGNAL is TERM (scancel: TERM, then KILL after KillWait) or KILL.
set -euo pipefail
if [ "${JOBCELL_CANCEL_SIGNAL:-TERM}" = KILL ]; then
  exec "${SCANCEL:-scancel}" --full --signal=KILL "$1"
fi
exec "${SCANCEL:-scancel}" "$1"
