#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (127.0.0.1) for tests: munged, slurmctld, slurmd.
# Idempotent (daemons already running are reconfigured). Needs root. State lives in $SLURM_HOME (default
# /tmp/local-slurm). Prints `export SLURM_CONF=...` on its last line: eval "$(start-local-slurm.sh | tail -n 1)".
# Every client command (sbatch, srun, squeue, scontrol, submitit) needs that SLURM_CONF exported.
#
# Tuned for tests, not for production:
# - a requeued job may start again after AuthInfo=cred_expire seconds (SLURM's default 120 s; here
#   $SLURM_REQUEUE_DELAY_S, default 5) — this is what made a requeue cycle take 60-130 s;
# - the scheduler looks at pending jobs every second (sched_interval, bf_interval) instead of every 30-60 s;
# - a preempted job (add a partition with a higher PriorityTier to try it) gets its --signal first
#   (SlurmctldParameters=preempt_send_user_signal) and is requeued (PreemptMode=REQUEUE), as on clusters that
#   preempt by requeueing.
set -euo pipefail
SLURM_HOME=${SLURM_HOME:-/tmp/local-slurm}
CPUS=${SLURM_CPUS:-$(nproc)}
MEM_MB=${SLURM_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))}
NODE=$(hostname -s)

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
fi
mkdir -p "$SLURM_HOME"/{state,spool,log,run}

# munge: one key, one daemon
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
mkdir -p "$SLURM_HOME/run/munge"
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then
    chown munge:munge "$SLURM_HOME/run/munge"
    su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$SLURM_HOME/run/munge/munged.pid"
  else
    /usr/sbin/munged --force --pid-file="$SLURM_HOME/run/munge/munged.pid"
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi

CONF=$SLURM_HOME/slurm.conf
cat >"$CONF" <<CONF
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=${SLURM_REQUEUE_DELAY_S:-5}
CommunicationParameters=NoCtldInAddrAny
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$SLURM_HOME/state
SlurmdSpoolDir=$SLURM_HOME/spool
SlurmctldPidFile=$SLURM_HOME/run/slurmctld.pid
SlurmdPidFile=$SLURM_HOME/run/slurmd.pid
SlurmctldLogFile=$SLURM_HOME/log/slurmctld.log
SlurmdLogFile=$SLURM_HOME/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$CONF

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$SLURM_HOME/run/slurmctld.pid" && alive "$SLURM_HOME/run/slurmd.pid"; then
  scontrol reconfigure >/dev/null 2>&1 || true  # running daemons take a changed slurm.conf
fi
alive "$SLURM_HOME/run/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
alive "$SLURM_HOME/run/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"

for _ in $(seq 60); do
  state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1 || true)
  case "$state" in idle*|mix*|alloc*) break ;; esac
  sleep 0.5
done
case "${state:-}" in
  idle*|mix*|alloc*) ;;
  *)
    echo "local SLURM did not come up (node state: '${state:-none}'); logs:" >&2
    tail -n 20 "$SLURM_HOME"/log/*.log >&2 || true
    exit 1 ;;
esac
echo "export SLURM_CONF=$CONF"
