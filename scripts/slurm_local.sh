#!/usr/bin/env bash
# A one-node SLURM cluster on this machine: to try `hydra/launcher=slurm` and your resources before the real
# cluster; the test suite uses it (tests/test_cluster.py). Needs root on Debian or Ubuntu: the first time it installs
# slurmd, slurmctld, slurm-client and munge (about a minute). It writes /etc/slurm/slurm.conf (never over one it did
# not write) and starts munged, slurmctld and slurmd.
#   scripts/slurm_local.sh        bring it up (returns at once if it is up)
#   scripts/slurm_local.sh down   stop the daemons
# Partition `debug` has all the CPUs and memory and two count-only "GPUs" (a GRES on placeholder files), so that
# jobs asking for GPUs are scheduled and run on the CPU. No accounting database (sacct answers nothing), as on
# many small clusters.
set -euo pipefail

GPUS=2
CONF=/etc/slurm/slurm.conf
MARK="# written by scripts/slurm_local.sh"

stop() { pkill -x slurmd || true; pkill -x slurmctld || true; }

node_up() {  # the controller answers and the node takes jobs
  scontrol ping 2>/dev/null | grep -q UP && [[ $(sinfo -h -N -o %T 2>/dev/null) =~ ^(idle|mixed|allocated)$ ]]
}

case ${1:-up} in
  down) stop; pkill -x munged || true; exit 0 ;;
  up) ;;
  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac
if node_up; then exit 0; fi
if [[ $(id -u) != 0 ]]; then echo "$0: needs root (it installs packages and starts daemons)" >&2; exit 1; fi
if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
  echo "$0: $CONF exists and is not ours: this machine has its own SLURM setup, left as it is" >&2; exit 1
fi
missing=0
for tool in slurmctld slurmd sinfo munged; do command -v $tool >/dev/null || missing=1; done
if (( missing )); then
  if ! command -v apt-get >/dev/null; then
    echo "$0: install slurmd, slurmctld, slurm-client and munge (no apt-get here)" >&2; exit 1
  fi
  echo "installing slurmd slurmctld slurm-client munge..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmd slurmctld slurm-client munge \
    >/dev/null
fi

host=$(hostname -s)
# nproc honours OMP_NUM_THREADS, which the test suite's workers set to their share of the cores: the node has them all
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # a tenth left to the system
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat > "$CONF" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
KillWait=5
GresTypes=gpu
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# A GRES needs files; a count-only line leaves the node INVALID. slurmd logs that these are not devices.
for i in $(seq 0 $((GPUS - 1))); do touch "/dev/fakegpu$i"; done
echo "NodeName=$host Name=gpu File=/dev/fakegpu[0-$((GPUS - 1))]" > /etc/slurm/gres.conf

if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

stop
slurmctld
slurmd
for _ in $(seq 60); do
  if node_up; then sinfo; exit 0; fi
  sleep 1
done
echo "$0: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo -N -l >&2 || true
exit 1
