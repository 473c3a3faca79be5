#!/bin/bash
# Start a single-node SLURM cluster on localhost for the tests: slurmctld + slurmd, no systemd, no cgroups, no
# accounting. Its slurm.conf, state, spool, logs and pid files all live in DIR (a fresh cluster each time, nothing
# written to /etc/slurm); use it with SLURM_CONF=DIR/slurm.conf and stop it with tests/slurm/down.sh DIR.
# Needs root and Debian's slurm-wlm + munge (tested: Debian 12, Slurm 22.05). Recipe: ../shared/reference/slurm.md.
#   usage: tests/slurm/up.sh DIR
set -euo pipefail
DIR=$(realpath "${1:?usage: up.sh DIR}")
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
export SLURM_CONF=$DIR/slurm.conf
# the node as slurmd detects it (nproc would follow OMP_NUM_THREADS); memory with a margin, never above the detected
HW=$(slurmd -C | head -n 1)
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(( $(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$HW") - 512 ))

# munge authenticates the daemons; started here only if not running (down.sh then stops it)
if ! pidof munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/munged.started"
fi
munge -n | unmunge >/dev/null

# cred_expire=10 and sched_interval=2: a requeued job runs again after ~12 s, not ~157 s (slurm.md, pitfalls);
# CR_Core: memory is not consumed, so jobs that ask for none still run side by side
cat > "$SLURM_CONF" <<CONF
ClusterName=ci
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
NodeName=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld   # both fork into the background and write their pid files
slurmd
for _ in $(seq 60); do
  sinfo -h -N -o %t 2>/dev/null | grep -qx idle && exit 0
  sleep 0.5
done
echo "the slurm node did not become idle:" >&2
sinfo -R >&2 || true
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
exit 1
