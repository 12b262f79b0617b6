#!/usr/bin/env bash
# A real two-node Slurm cluster on one machine, for testing slurm/ scripts end to end.
#
#   tests/slurm/cluster.sh install        apt-get install slurm-wlm + munge (root; needs the Debian registry)
#   tests/slurm/cluster.sh up   ROOT      start munged, slurmctld and two slurmd (node1, node2) under ROOT
#   tests/slurm/cluster.sh env  ROOT      print `export SLURM_CONF=...` for clients
#   tests/slurm/cluster.sh down ROOT      cancel jobs, wait for an empty queue, stop only our daemons,
#                                         remove the /etc/hosts line and ROOT
#
# Debian's slurm-wlm is built with multiple-slurmd support, so two `slurmd -N nodeX` on 127.0.0.1 act as
# two nodes: `sbatch --nodes=2 --ntasks-per-node=1` gives SLURM_NODEID 0 and 1.
set -euo pipefail

cmd=${1:?usage: cluster.sh install|up|env|down ROOT}
ROOT=${2:-}
HOSTS_LINE="127.0.0.1 node1 node2 # vmla-slurm-test"
NODES=(node1 node2)

need_root() { [ -n "$ROOT" ] || { echo "cluster.sh $cmd: ROOT folder argument missing" >&2; exit 2; }; }

write_conf() {
  mkdir -p "$ROOT"/{state,spool,run,log}
  for n in "${NODES[@]}"; do mkdir -p "$ROOT/spool/$n"; done
  cat >"$ROOT/slurm.conf" <<EOF
ClusterName=vmlaci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it starts again (120 s by default)
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
SlurmctldPort=6817
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pidfile
SlurmdPidFile=$ROOT/run/slurmd-%n.pidfile
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=300
MessageTimeout=10
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || \
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  setsid su -s /bin/sh munge -c "munged -F" >"$ROOT/log/munged.log" 2>&1 &
  echo $! >"$ROOT/run/munged.launcher.pid"
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  echo "cluster.sh: munged did not come up (see $ROOT/log/munged.log)" >&2; exit 1
}

case "$cmd" in
  install)
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    ;;
  up)
    need_root
    command -v slurmctld >/dev/null || { echo "cluster.sh: slurmctld not installed (run 'cluster.sh install')" >&2; exit 1; }
    write_conf
    grep -q "vmla-slurm-test" /etc/hosts || echo "$HOSTS_LINE" >>/etc/hosts
    start_munge
    export SLURM_CONF="$ROOT/slurm.conf"
    setsid slurmctld -D -c -f "$SLURM_CONF" >"$ROOT/log/slurmctld.out" 2>&1 &
    echo $! >"$ROOT/run/slurmctld.pid"
    for n in "${NODES[@]}"; do
      setsid slurmd -D -N "$n" -f "$SLURM_CONF" >"$ROOT/log/slurmd-$n.out" 2>&1 &
      echo $! >"$ROOT/run/slurmd-$n.pid"
    done
    for _ in $(seq 150); do
      idle=$(sinfo -h -N -t idle -o "%N" 2>/dev/null | sort -u | wc -l)
      [ "$idle" -ge "${#NODES[@]}" ] && { echo "slurm cluster up: ${NODES[*]} idle (SLURM_CONF=$SLURM_CONF)"; exit 0; }
      sleep 0.2
    done
    echo "cluster.sh: nodes did not become idle; logs in $ROOT/log" >&2
    sinfo -N >&2 || true
    exit 1
    ;;
  env)
    need_root
    echo "export SLURM_CONF=$ROOT/slurm.conf"
    ;;
  down)
    need_root
    export SLURM_CONF="$ROOT/slurm.conf"
    if [ -f "$SLURM_CONF" ]; then
      scancel --user="$(id -un)" >/dev/null 2>&1 || true
      for _ in $(seq 100); do
        [ -z "$(squeue -h 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
    for f in "$ROOT"/run/slurmd-*.pid "$ROOT"/run/slurmctld.pid; do
      [ -f "$f" ] || continue
      pid=$(cat "$f"); kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    done
    sed -i '/vmla-slurm-test/d' /etc/hosts 2>/dev/null || true
    rm -rf "$ROOT"
    ;;
  *)
    echo "usage: cluster.sh install|up|env|down ROOT" >&2; exit 2 ;;
esac
