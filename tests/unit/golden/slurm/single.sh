#!/bin/bash
# jobcell batch script: all sbatch options are on its command line
set -u
module load python  # site line, verbatim
ulimit -c 0
export A='1 $(x)'
export B=2
/bin/bash /cell/wrapper.sh /cell/artifacts/job1/step1/attempt-1 /bin/sh -c 'echo 1 > output/x'
jobcell_status=$?
echo after >&2
exit "$jobcell_status"
