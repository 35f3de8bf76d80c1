#!/bin/bash
# jobcell batch script: all sbatch options are on its command line
set -u
module load python  # site line, verbatim
ulimit -c 0
export HOSTILE_0='a'"'"'; echo foo'
export HOSTILE_1='a
0'
export HOSTILE_10=''
export HOSTILE_11='üñí€'
export HOSTILE_12=''"'"''
export HOSTILE_13='\'
export HOSTILE_14='!bang #hash ~tilde'
export HOSTILE_15='%j %A %% percent'
export HOSTILE_2='$(touch pwned)'
export HOSTILE_3='`touch pwned`'
export HOSTILE_4='semi;colon && true || false'
export HOSTILE_5='two  spaces	and tab'
export HOSTILE_6='double "quotes" \ backslash'
export HOSTILE_7='$HOME ${PATH} $1 $@ $*'
export HOSTILE_8='glob * ? [a]'
export HOSTILE_9=-dash
export JOBCELL_STEP_DIR='/cell/artifacts/d'"'"'ir "x" $(touch pwned) `id`;q
nl/attempt-1'
/bin/bash /cell/wrapper.sh '/cell/artifacts/d'"'"'ir "x" $(touch pwned) `id`;q
nl/attempt-1' /bin/echo 'a'"'"'; echo foo' 'a
0' '$(touch pwned)' '`touch pwned`' 'semi;colon && true || false' 'two  spaces	and tab' 'double "quotes" \ backslash' '$HOME ${PATH} $1 $@ $*' 'glob * ? [a]' -dash '' 'üñí€' ''"'"'' '\' '!bang #hash ~tilde' '%j %A %% percent'
jobcell_status=$?
echo after >&2
exit "$jobcell_status"
