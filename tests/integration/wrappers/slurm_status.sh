#!/bin/bash
# External status wrapper for jobcell, built on Slurm: usage slurm_status.sh JOB_ID.
# Prints RUNNING, PENDING, SUCCEEDED [code], FAILED [code] or CANCELLED [code]; exits
# non-zero when Slurm cannot tell (controller down, job forgotten): jobcell then keeps the
# step running as unknown.
set -uo pipefail
id="$1"
if ! line=$("${SCONTROL:-scontrol}" -o show job "$id" 2>&1); then
  printf 'scontrol failed for job %s: %s\n' "$id" "$line" >&2
  exit 3
fi
state=$(printf '%s\n' "$line" | grep -o 'JobState=[A-Z_]*' | head -n1 | cut -d= -f2)
exit_field=$(printf '%s\n' "$line" | grep -o ' ExitCode=[0-9]*:[0-9]*' | head -n1 | cut -d= -f2)
code=${exit_field%%:*}
sig=${exit_field##*:}
if [ -n "$sig" ] && [ "$sig" != 0 ]; then code=$((128 + sig)); fi
case "$state" in
  PENDING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|RESV_DEL_HOLD|SPECIAL_EXIT) echo PENDING ;;
  RUNNING|CONFIGURING|COMPLETING|SUSPENDED|STAGE_OUT|SIGNALING|RESIZING) echo RUNNING ;;
  COMPLETED) echo "SUCCEEDED ${code:-0}" ;;
  CANCELLED) echo "CANCELLED${code:+ $code}" ;;
  OUT_OF_MEMORY) echo "FAILED 137" ;;
  FAILED|TIMEOUT|NODE_FAIL|BOOT_FAIL|DEADLINE|PREEMPTED) echo "FAILED${code:+ $code}" ;;
  *) printf 'unexpected Slurm state %q for job %s\n' "$state" "$id" >&2; exit 4 ;;
esac
