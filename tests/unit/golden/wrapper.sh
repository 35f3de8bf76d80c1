#!/bin/bash
# jobcell step wrapper v1: runs one runner attempt and records how it ended.
# usage: wrapper.sh ATTEMPT_DIR COMMAND [ARG...]
set -u
cd "$1" || exit 97
shift
child=
finish() {
  printf '%s\n' "$1" > exit_code.tmp && mv -f exit_code.tmp exit_code
  exit "$1"
}
# A trap only forwards the signal; the loop below records how the runner really ended.
on_signal() {
  if [ -z "$child" ]; then finish "$2"; fi
  kill -s "$1" "$child" 2>/dev/null
}
trap 'on_signal TERM 143' TERM
# Background commands ignore INT when job control is off, so INT is forwarded as TERM.
trap 'on_signal TERM 130' INT
trap 'on_signal HUP 129' HUP
"$@" > stdout.log 2> stderr.log < /dev/null &
child=$!
printf '%s\n' "$child" > child.pid
while :; do
  wait "$child"
  code=$?
  # A trapped signal interrupts wait (status > 128) while the runner may still be running.
  # (Never call wait from inside a trap: bash 5.2 can then report -1 or hang.)
  kill -0 "$child" 2>/dev/null || break
done
finish "$code"
