#!/usr/bin/env bash
# A real SLURM cluster on this one host, for trying launch/slurm.sbatch and for
# tests/test_slurm.py: munged, slurmctld and two slurmd (nodes 127.0.0.1 and
# 127.0.0.2, one CPU each), background processes with no init system, all state,
# logs and pid files in STATE_DIR. Needs root and Debian's slurmctld, slurmd,
# slurm-client and munge (scripts/get-tools.sh).
#
#   scripts/slurm-local.sh up [STATE_DIR]      start; prints the SLURM_CONF to use
#   scripts/slurm-local.sh status [STATE_DIR]  the daemons and sinfo
#   scripts/slurm-local.sh down [STATE_DIR]    cancel every job, stop the daemons by PID
#
#   export SLURM_CONF=STATE_DIR/slurm.conf; sbatch ...; squeue; scancel ...
#
# STATE_DIR defaults to ${TMPDIR:-/tmp}/lenet-slurm. Ports (SLURM_LOCAL_CTLD_PORT,
# default 16817, and SLURM_LOCAL_NODE_PORT, default 17001, for the first node, +1
# for the second) stay off SLURM's defaults (6817/6818), so a site's daemons can
# run beside these.
set -euo pipefail

usage() { echo "usage: $0 up|down|status [STATE_DIR]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
cmd=$1
# Absolute: slurmctld given a relative -f retries for 60 s and ignores SIGTERM.
state=$(realpath -m "${2:-${TMPDIR:-/tmp}/lenet-slurm}")
conf=$state/slurm.conf
ctld_port=${SLURM_LOCAL_CTLD_PORT:-16817}
node_port=${SLURM_LOCAL_NODE_PORT:-17001}
nodes=(127.0.0.1 127.0.0.2)
export SLURM_CONF=$conf
# A port out of range is refused (the daemons would take it mod 65536); nodes use two.
port_ok() { [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] && (( $1 + $2 <= 65535 )); }
port_ok "$ctld_port" 0 || { echo "slurm-local: SLURM_LOCAL_CTLD_PORT=$ctld_port must be 1..65535" >&2; exit 2; }
port_ok "$node_port" 1 || { echo "slurm-local: SLURM_LOCAL_NODE_PORT=$node_port must be 1..65534" >&2; exit 2; }

# pid file -> pid, if that process is alive and is still the daemon named.
alive() {  # alive PIDFILE NAME
  local pid
  [[ -s "$1" ]] || return 1
  pid=$(<"$1")
  [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
  printf '%s' "$pid"
}

stop() {  # stop NAME PIDFILE [NAME PIDFILE ...]: SIGTERM to all, up to 10 s, then SIGKILL
  local pids=() names=() pid i deadline=$((SECONDS + 10))
  while [[ $# -ge 2 ]]; do
    if pid=$(alive "$2" "$1"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); names+=("$1")
    fi
    rm -f "$2"
    shift 2
  done
  for ((i = 0; i < ${#pids[@]}; i++)); do
    pid=${pids[i]}
    while [[ -d "/proc/$pid" && $SECONDS -lt $deadline ]]; do sleep 0.05; done
    if [[ -d "/proc/$pid" ]]; then
      echo "slurm-local: ${names[i]} ($pid) ignored SIGTERM for 10 s; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

wait_for() {  # wait_for SECONDS WHAT LOG COMMAND...: poll every 0.05 s
  local deadline=$((SECONDS + $1)) what=$2 log=$3
  shift 3
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "slurm-local: $what not ready; the end of $log:" >&2
      tail -n 20 "$log" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.05
  done
}

failed() {
  echo "slurm-local: $1 did not start; the end of $state/daemons.out:" >&2
  tail -n 5 "$state/daemons.out" >&2
  exit 1
}

idle_nodes() { [[ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle$')" == "${#nodes[@]}" ]]; }

munge_dir() {  # where munged keeps its socket: in STATE_DIR if the munge user can reach it
  if [[ -s "$state/munge.dir" ]]; then cat "$state/munge.dir"; return; fi
  local dir=$state/munge
  mkdir -p "$dir" && chown munge:munge "$dir" && chmod 0755 "$dir"  # munged wants o+x
  if ! runuser -u munge -- test -w "$dir"; then
    # e.g. under pytest's 0700 tmp directories: a directory of its own in /tmp.
    rmdir "$dir"
    dir=$(mktemp -d "${TMPDIR:-/tmp}/slurm-local-munge.XXXXXX")
    chown munge:munge "$dir" && chmod 0755 "$dir"
  fi
  printf '%s\n' "$dir" >"$state/munge.dir"
  printf '%s' "$dir"
}

write_conf() {
  local host
  host=$(hostname)
  cat >"$conf" <<EOF
# Written by scripts/slurm-local.sh: one host, two nodes, no accounting.
ClusterName=lenet-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again after this many seconds (default 120).
AuthInfo=socket=$1/munge.socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd-%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd-%n.log
# No cgroups here: processes are tracked by parentage, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MailProg=/bin/true
# A job whose begin time passes (a requeued one) waits for the next scheduling pass:
# up to 60 s by default, 1 s here.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Node names are addresses: JAX's SLURM detection makes the first node name of the
# step the coordinator's host, so it must resolve.
NodeName=127.0.0.[1-2] NodeHostname=$host Port=$node_port-$((node_port + 1)) CPUs=1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  local missing=() tool start ms dir node
  for tool in munged slurmctld slurmd sbatch sinfo; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [[ ${#missing[@]} == 0 ]] || { echo "slurm-local: missing ${missing[*]} (scripts/get-tools.sh)" >&2; exit 2; }
  [[ "$(id -u)" == 0 ]] || { echo "slurm-local: needs root (munged as munge, slurmd as root)" >&2; exit 2; }
  start=$(date +%s%3N)
  mkdir -p "$state/ctld"
  dir=$(munge_dir)
  if ! alive "$dir/munged.pid" munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged --socket="$dir/munge.socket" \
      --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
      --seed-file="$dir/munged.seed" </dev/null >>"$state/daemons.out" 2>&1 || failed munged
  fi
  wait_for 10 munged "$dir/munged.log" test -S "$dir/munge.socket"
  write_conf "$dir"
  if ! alive "$state/slurmctld.pid" slurmctld >/dev/null; then
    slurmctld -f "$conf" </dev/null >>"$state/daemons.out" 2>&1 || failed slurmctld
  fi
  wait_for 20 slurmctld "$state/slurmctld.log" scontrol ping
  for node in "${nodes[@]}"; do
    if ! alive "$state/slurmd-$node.pid" slurmd >/dev/null; then
      slurmd -f "$conf" -N "$node" </dev/null >>"$state/daemons.out" 2>&1 || failed "slurmd $node"
    fi
  done
  wait_for 30 "${#nodes[@]} idle nodes" "$state/slurmd-${nodes[0]}.log" idle_nodes
  ms=$(($(date +%s%3N) - start))
  printf 'slurm-local: up in %d.%03d s; export SLURM_CONF=%s\n' "$((ms / 1000))" "$((ms % 1000))" "$conf"
}

down() {
  local i dir jobs=()
  if [[ -f "$conf" ]] && alive "$state/slurmctld.pid" slurmctld >/dev/null; then
    # Jobs first, so that no slurmstepd or task outlives its slurmd. SIGKILL to
    # every step and the batch shell; the tasks of a step whose srun died still get
    # SIGTERM and, KillWait (10 s) later, SIGKILL. Then the pending jobs go.
    mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
    if [[ ${#jobs[@]} -gt 0 ]]; then
      scancel --full --signal=KILL "${jobs[@]}" 2>/dev/null || true
      scancel --state=PENDING "${jobs[@]}" 2>/dev/null || true
      for ((i = 0; i < 150; i++)); do
        [[ -z "$(squeue -h -t RUNNING,COMPLETING,CONFIGURING -o %i 2>/dev/null)" ]] && break
        sleep 0.1
      done
    fi
  fi
  stop slurmd "$state/slurmd-${nodes[0]}.pid" slurmd "$state/slurmd-${nodes[1]}.pid" \
    slurmctld "$state/slurmctld.pid"
  if [[ -s "$state/munge.dir" ]]; then
    dir=$(<"$state/munge.dir")
    stop munged "$dir/munged.pid"
    # A directory of its own in /tmp goes with it; one in STATE_DIR stays with the logs.
    [[ "$dir" == "$state/munge" ]] || rm -rf -- "$dir"
    rm -f "$state/munge.dir"
  fi
  echo "slurm-local: down"
}

status() {
  local dir="" rc=0 node
  [[ -s "$state/munge.dir" ]] && dir=$(<"$state/munge.dir")
  report() {  # report NAME PIDFILE
    local pid
    if pid=$(alive "$2" "$1"); then echo "$1 $3: running, pid $pid"
    else echo "$1 $3: stopped"; rc=1; fi
  }
  report munged "${dir:-$state/munge}/munged.pid" ""
  report slurmctld "$state/slurmctld.pid" ""
  for node in "${nodes[@]}"; do report slurmd "$state/slurmd-$node.pid" "$node"; done
  if [[ "$rc" == 0 ]]; then sinfo -N -o '%N %T %c' || rc=1; fi
  return "$rc"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) usage ;;
esac
