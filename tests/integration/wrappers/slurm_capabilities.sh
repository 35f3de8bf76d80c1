#!/bin/bash
# Capabilities wrapper for jobcell, built on Slurm's sinfo: prints key=value lines.
set -euo pipefail
nodes=$("${SINFO:-sinfo}" -h -N -o '%N %c %m %G')
partitions=$("${SINFO:-sinfo}" -h -o '%R' | sort -u | paste -sd, -)
printf '%s\n' "$nodes" | sort -u | awk -v parts="$partitions" '
  NF >= 3 {
    n++; cpus += $2; mem += $3
    # GRES such as gpu:2, gpu:tesla:2 or gpu:tesla:2(S:0); (null) when none.
    split($4, list, ",")
    for (i in list) {
      g = list[i]; sub(/\(.*/, "", g)
      if (g ~ /^gpu:/) { k = split(g, f, ":"); gpus += f[k] + 0 }
    }
  }
  END {
    printf "gpus=%d\nnodes=%d\ncpus=%d\nmemory_mb=%d\npartitions=%s\ngpu_source=slurm gres\n",
      gpus, n, cpus, mem, parts
  }'
