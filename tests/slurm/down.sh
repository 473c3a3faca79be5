#!/bin/bash
# Stop what tests/slurm/up.sh DIR started: its jobs, then its daemons by their pid files (munged only if up.sh started it).
#   usage: tests/slurm/down.sh DIR
DIR=$(realpath "${1:?usage: down.sh DIR}")
pids=()
for f in "$DIR/slurmctld.pid" "$DIR/slurmd.pid"; do
  [ -s "$f" ] && pids+=("$(cat "$f")")
done
[ -e "$DIR/munged.started" ] && [ -s /run/munge/munged.pid ] && pids+=("$(cat /run/munge/munged.pid)")
[ ${#pids[@]} = 0 ] && exit 0
export SLURM_CONF=$DIR/slurm.conf
# jobs first: their processes belong to slurmstepd, which outlives slurmd
scancel --user="$(id -un)" 2>/dev/null
for _ in $(seq 40); do
  [ -z "$(squeue -h 2>/dev/null)" ] && break
  sleep 0.5
done
scontrol shutdown >/dev/null 2>&1   # stops slurmctld and slurmd cleanly
kill "${pids[@]}" 2>/dev/null
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
for _ in $(seq 40); do
  alive || exit 0
  sleep 0.5
done
echo "still running: ${pids[*]}" >&2
exit 1
