#!/bin/bash
# External submit wrapper for jobcell, built on Slurm (an example an admin can adapt).
# Submits $JOBCELL_STEP_SCRIPT with sbatch and prints the Slurm job id alone.
# Slurm commands are found on PATH (or $SBATCH) and read $SLURM_CONF from the environment.
set -euo pipefail
dir=$(dirname "$JOBCELL_STEP_SCRIPT")
minutes=$(( (${JOBCELL_TIMEOUT_S:-3600} + 59) / 60 ))
args=(--parsable --job-name="${JOBCELL_JOB_NAME:-jobcell-$JOBCELL_JOB_ID-$JOBCELL_STEP_INDEX}"
      --chdir="$dir" --output="$dir/backend.out"
      --cpus-per-task="$JOBCELL_CPU_SLOTS" --mem="$JOBCELL_MEMORY_MB"
      --time="$minutes")
if [ "${JOBCELL_GPUS_REQUESTED:-0}" -gt 0 ]; then
  args+=(--gres="gpu:$JOBCELL_GPUS_REQUESTED")
fi
out=$("${SBATCH:-sbatch}" "${args[@]}" "$JOBCELL_STEP_SCRIPT")
# --parsable prints "id" or "id;cluster".
printf '%s\n' "${out%%;*}"
