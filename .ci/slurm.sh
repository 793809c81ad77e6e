#!/usr/bin/env bash
# A real one-node SLURM on localhost for CI: `bash .ci/slurm.sh up` installs Debian's slurm and
# munge if needed, writes slurm.conf, starts munged, slurmctld and slurmd and records their
# PIDs; `bash .ci/slurm.sh down` stops exactly those PIDs. Needs root. The node declares one
# fake GPU (gres) so that GPU requests can be submitted and inspected.
set -euo pipefail
STATE=${LRF_SLURM_STATE:-/tmp/lrf-slurm}
PIDS=$STATE/pids
cmd=${1:-up}

wait_for() {  # wait_for SECONDS COMMAND...
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}

if [ "$cmd" = down ]; then
  [ -f "$PIDS" ] || exit 0
  while read -r name pid; do
    kill "$pid" 2>/dev/null && echo "slurm.sh: stopped $name ($pid)" || true
  done < "$PIDS"
  rm -f "$PIDS"
  exit 0
fi

if command -v sinfo >/dev/null && timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "slurm.sh: a SLURM is already up here; using it (nothing to stop later)"
  mkdir -p "$STATE"; : > "$PIDS"
  exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
mkdir -p "$STATE"/{spool,ctld,log} /run/munge /etc/slurm
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
host=$(hostname -s)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
cpus=$(nproc)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=lrf
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
ReturnToService=2
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
# One fake GPU whose device file is /dev/null: enough for SLURM to accept and account a GPU
# request (--gpus=1 -> TRES gres/gpu=1), while the job itself finds no CUDA device, as a job
# whose GPU went missing would (tests/test_slurm.py: such a job must fail, not run on the CPU).
cat > /etc/slurm/gres.conf <<CONF
NodeName=$host Name=gpu File=/dev/null
CONF
: > "$PIDS"
rm -f "$STATE/slurmctld.pid" "$STATE/slurmd.pid" /run/munge/lrf-munged.pid  # stale ones from a killed run
rm -rf "$STATE"/ctld/*  # a node drained by an earlier configuration stays drained in the saved state
runuser -u munge -- munged --force --pid-file=/run/munge/lrf-munged.pid  # --force: clear a stale socket
wait_for 10 test -s /run/munge/lrf-munged.pid
echo "munged $(cat /run/munge/lrf-munged.pid)" >> "$PIDS"
slurmctld
wait_for 30 test -s "$STATE/slurmctld.pid"
echo "slurmctld $(cat "$STATE/slurmctld.pid")" >> "$PIDS"
slurmd
wait_for 30 test -s "$STATE/slurmd.pid"
echo "slurmd $(cat "$STATE/slurmd.pid")" >> "$PIDS"
wait_for 90 sh -c "sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)'" || { echo "slurm.sh: node never became idle"; sinfo; tail -20 "$STATE"/log/*.log; exit 1; }
echo "slurm.sh: up ($(sinfo -h -o '%P %D %T'))"
