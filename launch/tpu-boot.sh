#!/usr/bin/env bash
# The TPU VM startup script of `launch/tpu-vm.sh --resume-on-boot`: tpu-vm.sh
# replaces the settings block below with the run's own and passes the result to
# `queued-resources create --metadata-from-file=startup-script=FILE`, so that
# every worker, on every boot, starts training again and it resumes from the gs://
# workdir (as MaxText's multihost_job.py does from its queued resource's startup
# script).
#
#   (as root, at boot)  tpu-boot.sh       keep a copy in /usr/local/lib/lenet-dist/,
#                                         then run `tpu-boot.sh run` detached, as
#                                         the user whose ~/lenet-dist/venv `setup` made
#   (as that user)      tpu-boot.sh run   the restart loop: `lenet-dist train` in its
#                                         own process group, PID in ~/lenet-dist/train.pid,
#                                         output appended to ~/lenet-dist/logs/RUN.log
#
# The loop restarts lenet-dist after exit 42 (a retry can succeed) and 127-255 (a
# death by signal: 134, 137, 143; lenet_dist/errors.py's one restart rule), after 10 s, 20 s, ... (60 s at most), LENET_MAX_RESTARTS
# times in a row at most (10); it stops on any other code (0 done, 1 failed, 2 a
# usage error) and when ~/lenet-dist/stopped exists (`tpu-vm.sh stop` writes it,
# `start` removes it), on boot too. Every attempt gets the same LENET_DIST_JOB_ID,
# so it takes over the previous attempt's workdir lease at once.
set -euo pipefail

# >>> settings (tpu-vm.sh writes these)
workdir=${LENET_WORKDIR:-}
run_name=${LENET_RUN:-lenet}
job_id=${LENET_DIST_JOB_ID:-tpu-lenet-dist}
train_args=()
# <<< settings

installed=/usr/local/lib/lenet-dist/boot.sh
max_restarts=${LENET_MAX_RESTARTS:-10}
backoff=${LENET_RESTART_BACKOFF:-10}  # seconds, times the restarts in a row

# The PID in pid_file if it is a lenet-dist training process.
training() {  # $1: pid file
  local pid cmd
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[1-9][0-9]*$ ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ "$cmd" == *"lenet-dist train"* ]] || return 1
  printf '%s\n' "$pid"
}

run_loop() {
  local dir="$HOME/lenet-dist" pid="" rc restarts=0 delay stopping=0
  local log="$dir/logs/$run_name.log" pid_file="$dir/train.pid" stop_file="$dir/stopped"
  [[ "$workdir" == gs://?* ]] || { echo "tpu-boot.sh: workdir must be gs://..., not '$workdir'" >&2; return 2; }
  mkdir -p "$dir/logs"
  exec 9>>"$dir/loop.lock"  # one loop per user: a second one (start, a boot) leaves
  if ! flock -n 9; then echo "tpu-boot.sh: a restart loop runs already"; return 0; fi
  if pid=$(training "$pid_file"); then echo "tpu-boot.sh: lenet-dist runs already (PID $pid)"; return 0; fi
  pid=""
  export PATH="$dir/venv/bin:$PATH" LENET_DIST_JOB_ID="$job_id" PYTHONUNBUFFERED=1
  # A TERM to this loop (shutdown) goes to training, which checkpoints; no restart.
  trap 'stopping=1; if [[ -n "$pid" ]]; then kill -TERM -- "-$pid" 2>/dev/null || true; fi' TERM INT HUP
  while [[ ! -e "$stop_file" && "$stopping" == 0 ]]; do
    echo "=== start $(date -u +%FT%TZ) job $job_id, restart $restarts" >>"$log"
    # Not a process group leader here, so setsid execs without a fork: $! is
    # lenet-dist's PID, and its process group is lenet-dist and its children.
    setsid lenet-dist train --distributed auto --workdir "$workdir" \
      ${train_args[@]+"${train_args[@]}"} >>"$log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$pid_file"
    rc=0
    wait "$pid" || rc=$?
    while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done  # a trap ran
    rm -f "$pid_file"
    pid=""
    echo "=== exit $rc $(date -u +%FT%TZ)" >>"$log"
    if [[ "$rc" != 42 && "$rc" -lt 127 ]]; then return "$rc"; fi
    if [[ "$stopping" == 1 || -e "$stop_file" ]]; then return "$rc"; fi
    restarts=$((restarts + 1))
    if [[ "$restarts" -gt "$max_restarts" ]]; then
      echo "=== exit $rc: $max_restarts restarts in a row, giving up" >>"$log"
      return "$rc"
    fi
    delay=$((backoff * restarts))
    if [[ "$delay" -gt 60 ]]; then delay=60; fi
    sleep "$delay" &
    wait $! || true
  done
}

boot() {  # as root: the startup script itself
  local self bin owner home
  self=$(readlink -f "${BASH_SOURCE[0]}")
  if [[ "$self" != "$installed" ]]; then install -D -m 0755 "$self" "$installed"; fi
  bin=$(compgen -G '/home/*/lenet-dist/venv/bin/lenet-dist' | head -n 1) || true
  if [[ -z "$bin" ]]; then
    echo "lenet-dist: not set up yet (launch/tpu-vm.sh setup, then start)"
    return 0
  fi
  owner=$(stat -c %U "$bin")
  home=$(getent passwd "$owner" | cut -d: -f6)
  if [[ -e "$home/lenet-dist/stopped" ]]; then
    echo "lenet-dist: stopped by tpu-vm.sh stop; not started (tpu-vm.sh start starts it)"
    return 0
  fi
  echo "lenet-dist: starting as $owner, log $home/lenet-dist/logs/$run_name.log"
  setsid runuser -u "$owner" -- env HOME="$home" bash "$installed" run \
    >>/var/log/lenet-dist-boot.log 2>&1 </dev/null &
}

case "${1:-boot}" in
  run) run_loop ;;
  boot) boot ;;
  *) echo "usage: tpu-boot.sh [boot|run]" >&2; exit 2 ;;
esac
