#!/bin/bash
# Stop the test cluster started by start.sh DIR (munged is left running; it is harmless and shared).
DIR="${1:?state dir}"
for pid in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
  [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
done
sleep 1
true
