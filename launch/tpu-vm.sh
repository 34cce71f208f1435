#!/usr/bin/env bash
# Train lenet-dist on a Cloud TPU VM slice (one host or many) with the gcloud CLI.
#
#   launch/tpu-vm.sh [OPTIONS] COMMAND... [-- TRAIN_ARGS...]     (-h: commands and knobs)
#
# Every command that touches the workers uses --worker=all: on a multi-host slice
# every host must run the same program at the same time, and a program started on
# one host alone waits forever in jax.distributed.initialize(). --dry-run prints
# the exact commands ("+ " lines, shell-quoted) and runs nothing, gcloud included.
#
# The remote commands below are single-quoted on purpose: their $variables are
# expanded by the shell on each TPU worker, not here.
# shellcheck disable=SC2016
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu-vm.sh [OPTIONS] COMMAND... [-- TRAIN_ARGS...]

Commands (several run in the order given):
  create    queued resource for one TPU slice; waits until ACTIVE (gives up on
            FAILED, SUSPENDING, SUSPENDED, DELETING or 10 failed describes in a
            row). The name must be free: Ctrl-C before ACTIVE deletes the queued
            resource this command created, never one that was there before.
  setup     on every worker: Python 3.12 venv (uv) + this package with [tpu],
            from a wheel built here (pip wheel) and copied to all workers;
            Fashion-MNIST from apt (waiting for a busy apt's lock; its output in
            ~/lenet-dist/logs/apt.log). Refuses where lenet-dist is training.
  start     on every worker: stop stale lenet-dist runs, kill whatever holds
            /dev/accel* or /dev/vfio/*, remove /tmp/libtpu_lockfile; then start
            `lenet-dist train --distributed auto --workdir gs://...` on all
            workers at once, detached (setsid nohup), its PID in
            ~/lenet-dist/train.pid, one log per worker in
            ~/lenet-dist/logs/RUN.log, copied to WORKDIR/logs/worker-N.log every
            --log-copy seconds and when training ends, so that it outlives the
            VM (a later start on a new VM continues that copy). With
            --resume-on-boot: runs the startup script's restart loop instead.
  status    queued-resource state, and per worker: process count, last log line.
  logs      copy each worker's log to LOG_DIR/<worker>.log; names the workers
            that had none and goes on.
  stop      on every worker: SIGTERM to the process group whose PID is in
            ~/lenet-dist/train.pid, if that PID is still `lenet-dist train`
            (nothing else is killed); all save a checkpoint at the same step and
            exit 143. Writes ~/lenet-dist/stopped: no restart, not even on boot,
            until `start`, which resumes from the workdir.
  delete    delete the queued resource and its TPU VMs (no checkpoint: stop first).
  recreate  delete + create + setup + start, e.g. after a spot preemption; the
            run resumes from its gs:// workdir.
  up        create + setup + start.
  boot-script  print the startup script that --resume-on-boot gives `create`.

Options (environment variable in brackets):
  -p, --project ID            Google Cloud project [TPU_PROJECT]; default: gcloud config
  -z, --zone ZONE             zone [TPU_ZONE]; default: gcloud config
  -n, --name NAME             queued resource and TPU VM name [TPU_NAME] (lenet-dist)
  -a, --accelerator-type T    e.g. v5litepod-16, v4-32, v6e-16 [TPU_ACCELERATOR_TYPE]
                              (v5litepod-16: 4 hosts x 4 chips)
  -r, --runtime-version V     TPU software version [TPU_RUNTIME_VERSION]; default
                              from the type: v4 tpu-ubuntu2204-base, v5litepod
                              v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
      --spot                  spot capacity: cheap, preemptible [TPU_SPOT=1]
      --autocheckpoint        Cloud TPU Autocheckpoint (preview; `gcloud alpha`):
                              a maintenance event sends SIGTERM first, so every
                              worker saves a checkpoint; without it maintenance
                              stops the VM with no signal [TPU_AUTOCHECKPOINT=1]
      --reserved              reserved capacity [TPU_RESERVED=1]
      --resume-on-boot        `create` passes a startup script (launch/tpu-boot.sh
                              with this run's workdir and train flags, written to
                              runs/tpu-boot/NAME.sh) that on every boot of every
                              worker runs training again, restarting it after exit
                              42 or a signal; `start` runs that loop [TPU_RESUME_ON_BOOT=1]
      --valid-until D         give up queueing after duration D, e.g. 6h [TPU_VALID_UNTIL]
      --internal-ip           ssh/scp to the workers' internal IPs [TPU_INTERNAL_IP=1]
  -b, --bucket B              run in gs://B/RUN [LENET_BUCKET]
      --run RUN               run name: workdir gs://B/RUN, log RUN.log [LENET_RUN] (lenet)
  -w, --workdir gs://...      the run's workdir; overrides --bucket [LENET_WORKDIR]
      --workers N             hosts in the slice, for `logs` [TPU_WORKERS];
                              default: asked from gcloud (required with --dry-run)
      --log-dir DIR           where `logs` writes [LENET_LOG_DIR] (runs/tpu-logs/RUN)
      --wheel FILE            install this wheel instead of building one [LENET_WHEEL]
      --python-version V      Python of the workers' venv [LENET_REMOTE_PYTHON] (3.12)
      --poll S                seconds between state checks in `create` [TPU_POLL_SECONDS] (30)
      --grace S               seconds `stop`/`start` wait after SIGTERM [TPU_GRACE_SECONDS] (60)
      --log-copy S            seconds between copies of each worker's log to
                              WORKDIR/logs/ [LENET_LOG_COPY_SECONDS] (60; 0: none)
      --dry-run               print the commands, run nothing [DRY_RUN=1]
  -h, --help                  this text
  -- TRAIN_ARGS...            more `lenet-dist train` flags, e.g. -- --epochs 20
                              [LENET_TRAIN_ARGS, split on whitespace]

Local paths are relative to the directory you run from; the wheel is built in
the repository's dist/. PYTHON picks the local interpreter for `pip wheel` (python3).

Example:
  launch/tpu-vm.sh -p my-proj -z us-central1-a -a v5litepod-16 --spot \
    -b my-bucket --run lenet-v5e up -- --epochs 20
EOF
}

die() { echo "tpu-vm.sh: $*" >&2; exit 2; }
note() { printf '# %s\n' "$*"; }

# Shell-quote one word like Python's shlex.quote, so a printed command can be
# pasted into a shell or parsed back (tests do).
q() {
  if [[ -n "$1" && "$1" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}
# Like q, but writes --flag=value as --flag=<quoted value>.
qword() {
  if [[ "$1" == --*=* && "${1%%=*}" != *[!A-Za-z0-9-]* ]]; then
    printf '%s=' "${1%%=*}"
    q "${1#*=}"
  else
    q "$1"
  fi
}
show() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(qword "$w")"; done
  printf '%s' "$out"
}
# Quote a value for the workers' shell: bare, "double" or 'single' quotes.
rq() {
  if [[ -n "$1" && "$1" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$1"
  elif [[ "$1" != *[\"\$\`\\]* ]]; then
    printf '"%s"' "$1"
  else
    q "$1"
  fi
}

# Print a command, then run it (not with --dry-run).
run() {
  printf '+ %s\n' "$(show "$@")"
  if [[ "$dry_run" != 1 ]]; then "$@"; fi
}
# Same, with stdout into a file.
run_to() {
  local file=$1
  shift
  printf '+ %s > %s\n' "$(show "$@")" "$(q "$file")"
  if [[ "$dry_run" != 1 ]]; then "$@" >"$file"; fi
}

# ---- configuration: environment, then flags --------------------------------
project=${TPU_PROJECT:-}
zone=${TPU_ZONE:-}
name=${TPU_NAME:-lenet-dist}
accel=${TPU_ACCELERATOR_TYPE:-v5litepod-16}
runtime=${TPU_RUNTIME_VERSION:-}
spot=${TPU_SPOT:-0}
autocheckpoint=${TPU_AUTOCHECKPOINT:-0}
reserved=${TPU_RESERVED:-0}
resume_on_boot=${TPU_RESUME_ON_BOOT:-0}
valid_until=${TPU_VALID_UNTIL:-}
internal_ip=${TPU_INTERNAL_IP:-0}
workers=${TPU_WORKERS:-}
poll=${TPU_POLL_SECONDS:-30}
grace=${TPU_GRACE_SECONDS:-60}
log_copy=${LENET_LOG_COPY_SECONDS:-60}
bucket=${LENET_BUCKET:-}
run_name=${LENET_RUN:-lenet}
workdir=${LENET_WORKDIR:-}
log_dir=${LENET_LOG_DIR:-}
wheel=${LENET_WHEEL:-}
remote_python=${LENET_REMOTE_PYTHON:-3.12}
dry_run=${DRY_RUN:-0}
train_args=()
if [[ -n "${LENET_TRAIN_ARGS:-}" ]]; then
  read -r -a train_args <<<"$LENET_TRAIN_ARGS"
fi

commands=()
has_value() { [[ $# -gt 1 ]] || die "$1 needs a value (-h for help)"; }
while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  if [[ "$arg" == --*=* ]]; then  # --flag=value -> --flag value
    set -- "${arg#*=}" "$@"
    arg=${arg%%=*}
  fi
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --autocheckpoint) autocheckpoint=1 ;;
    --reserved) reserved=1 ;;
    --resume-on-boot) resume_on_boot=1 ;;
    --internal-ip) internal_ip=1 ;;
    -p | --project) has_value "$arg" "$@"; project=$1; shift ;;
    -z | --zone) has_value "$arg" "$@"; zone=$1; shift ;;
    -n | --name) has_value "$arg" "$@"; name=$1; shift ;;
    -a | --accelerator-type) has_value "$arg" "$@"; accel=$1; shift ;;
    -r | --runtime-version) has_value "$arg" "$@"; runtime=$1; shift ;;
    --valid-until) has_value "$arg" "$@"; valid_until=$1; shift ;;
    -b | --bucket) has_value "$arg" "$@"; bucket=$1; shift ;;
    --run) has_value "$arg" "$@"; run_name=$1; shift ;;
    -w | --workdir) has_value "$arg" "$@"; workdir=$1; shift ;;
    --workers) has_value "$arg" "$@"; workers=$1; shift ;;
    --log-dir) has_value "$arg" "$@"; log_dir=$1; shift ;;
    --wheel) has_value "$arg" "$@"; wheel=$1; shift ;;
    --python-version) has_value "$arg" "$@"; remote_python=$1; shift ;;
    --poll) has_value "$arg" "$@"; poll=$1; shift ;;
    --grace) has_value "$arg" "$@"; grace=$1; shift ;;
    --log-copy) has_value "$arg" "$@"; log_copy=$1; shift ;;
    --) train_args+=("$@"); break ;;
    create | setup | start | status | logs | stop | delete | recreate | up | boot-script) commands+=("$arg") ;;
    *) die "unknown command or option: $arg (-h for help)" ;;
  esac
done
[[ ${#commands[@]} -gt 0 ]] || { usage >&2; exit 2; }

# ---- checks before anything runs --------------------------------------------
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "TPU name '$name': lowercase letters, digits, hyphens"
[[ "$run_name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "run name '$run_name': letters, digits, . _ -"
[[ -z "$workers" || "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers: a positive integer"
[[ "$poll" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--poll: seconds"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace: whole seconds"
[[ "$log_copy" =~ ^[0-9]+$ ]] || die "--log-copy: whole seconds (0: no copy)"
if [[ -z "$runtime" ]]; then
  case "$accel" in
    v4-*) runtime=tpu-ubuntu2204-base ;;
    v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for '$accel': pass --runtime-version" ;;
  esac
fi
if [[ -z "$workdir" && -n "$bucket" ]]; then workdir="gs://${bucket#gs://}/$run_name"; fi
creates=0
for c in "${commands[@]}"; do
  if [[ "$c" == create || "$c" == up || "$c" == recreate ]]; then creates=1; fi
done
if [[ "$resume_on_boot" == 1 && "$creates" == 0 && ${#train_args[@]} -gt 0 ]]; then
  die "--resume-on-boot: training runs with the flags given to create (its startup script); recreate to change them"
fi
for c in "${commands[@]}"; do
  case "$c/$resume_on_boot" in
    create/1 | start/* | up/* | recreate/* | boot-script/*)
      [[ -n "$workdir" ]] || die "${c/%create/create --resume-on-boot} needs --bucket or --workdir gs://..."
      # Every process must read and write the same checkpoints: a per-host
      # local directory makes Orbax's first save hang.
      [[ "$workdir" == gs://?* ]] || die "workdir must be gs://... (shared by all hosts), not '$workdir'"
      ;;
    logs/*)
      [[ "$dry_run" != 1 || -n "$workers" ]] || die "logs with --dry-run needs --workers N (it would ask gcloud)"
      ;;
  esac
done

loc=()  # where the slice is: last flags of every gcloud command
if [[ -n "$zone" ]]; then loc+=(--zone="$zone"); fi
if [[ -n "$project" ]]; then loc+=(--project="$project"); fi
ssh_opts=()
if [[ "$internal_ip" == 1 ]]; then ssh_opts+=(--internal-ip); fi
remote_dir=lenet-dist                  # in each worker's home directory
remote_log="$remote_dir/logs/$run_name.log"
remote_pid=$remote_dir/train.pid       # the PID of the training this script started
remote_stopped=$remote_dir/stopped     # `stop` was here: no restart, even on boot
remote_boot=/usr/local/lib/lenet-dist/boot.sh  # where the startup script keeps itself
job_id=tpu-$name                       # LENET_DIST_JOB_ID: every attempt on this TPU
boot_file=runs/tpu-boot/$name.sh       # the startup script given to `create`
# Matches the training process (.../bin/lenet-dist train ...) but not a shell
# whose command line holds this pattern.
pattern='[l]enet-dist train'

ssh_all() {  # one shell command on every worker at once
  run gcloud compute tpus tpu-vm ssh "$name" --worker=all --command="$1" \
    ${ssh_opts[@]+"${ssh_opts[@]}"} ${loc[@]+"${loc[@]}"}
}

# ---- remote scripts (POSIX sh, one line each) --------------------------------
remote_setup() {  # $1: wheel file name, copied to the home directory
  local whl=$remote_dir/$1 venv=$remote_dir/venv
  # A fresh VM upgrades itself at boot and holds apt's locks for minutes:
  # `apt-get install` waits for the dpkg lock (DPkg::Lock::Timeout), but
  # `apt-get update` does not wait for its lists lock (apt 2.6, tried), so it
  # is retried while its error is the lock, 10 min at most.
  printf '%s' 'set -e; cd; mkdir -p '"$remote_dir"'/logs;' \
    ' if pgrep -f "'"$pattern"'" >/dev/null; then echo "$(hostname): lenet-dist is training, perhaps from '"$venv"': not replacing it (stop first)" >&2; exit 1; fi;' \
    ' mv -f '"$(rq "$1")"' '"$remote_dir"'/;' \
    ' export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH";' \
    ' command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh;' \
    ' rm -rf '"$venv"'; uv venv --seed --python '"$(rq "$remote_python")"' '"$venv"';' \
    ' '"$venv"'/bin/python -m pip install -q '"$(rq "${whl}[tpu]")"';' \
    ' alog='"$remote_dir"'/logs/apt.log; : >"$alog"; ok=0; i=0;' \
    ' while [ "$i" -lt 60 ]; do if sudo apt-get -q update >>"$alog" 2>&1; then ok=1; break; fi;' \
    ' tail -n 2 "$alog" | grep -q "Could not get lock" || break;' \
    ' [ "$i" -gt 0 ] || echo "$(hostname): apt is busy (a new VM updates itself); waiting for its lock, 10 min at most";' \
    ' i=$((i + 1)); sleep 10; done;' \
    ' if [ "$ok" = 1 ] && sudo apt-get -q -o DPkg::Lock::Timeout=600 install -y dataset-fashion-mnist >>"$alog" 2>&1;' \
    ' then echo "$(hostname): Fashion-MNIST from the dataset-fashion-mnist package";' \
    ' else echo "$(hostname): apt did not install dataset-fashion-mnist ($(tail -n 1 "$alog"); all of it in ~/$alog); adding the [tfds] extra to download Fashion-MNIST";' \
    ' '"$venv"'/bin/python -m pip install -q '"$(rq "${whl}[tpu,tfds]")"'; fi;' \
    ' '"$venv"'/bin/lenet-dist --help >/dev/null;' \
    ' echo "$(hostname): lenet-dist ready, $('"$venv"'/bin/python -V)"'
}

remote_free_tpu() {
  printf '%s' 'cd; pat="'"$pattern"'"; mkdir -p '"$remote_dir"'; touch '"$remote_stopped"';' \
    ' if pgrep -f "$pat" >/dev/null; then echo "$(hostname): stopping a stale lenet-dist";' \
    ' sudo pkill -TERM -f "$pat"; i=0;' \
    ' while [ "$i" -lt '"$grace"' ] && pgrep -f "$pat" >/dev/null; do sleep 1; i=$((i + 1)); done;' \
    ' sudo pkill -KILL -f "$pat" || true; fi;' \
    ' command -v lsof >/dev/null || echo "$(hostname): no lsof, cannot look for other TPU users";' \
    ' pids=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | tr "\n" " ");' \
    ' if [ -n "$pids" ]; then echo "$(hostname): killing processes holding the TPU: $pids";' \
    ' sudo kill -9 $pids; sleep 2; fi;' \
    ' sudo rm -f /tmp/libtpu_lockfile; echo "$(hostname): TPU free"'
}

remote_start() {
  local cmd a copy=""
  cmd='"$bin" train --distributed auto --workdir '"$(rq "$workdir")"
  for a in ${train_args[@]+"${train_args[@]}"}; do cmd+=" $(rq "$a")"; done
  if [[ "$log_copy" != 0 ]]; then
    # The log's copy in the workdir outlives a preempted or recreated VM. Named
    # by the worker number TPU VMs publish (JAX reads the same key), else the
    # hostname. A new VM first fetches the copy, so the log goes on from it.
    # A loop beside the trainer copies it every $log_copy s and once it ends.
    copy=' copy='"$(rq "$workdir/logs")"'/worker-$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname).log;'
    copy+=' [ -s "$log" ] || gcloud storage cp "$copy" "$log" >/dev/null 2>&1 || true;'
  fi
  printf '%s' 'cd; log='"$remote_log"'; bin='"$remote_dir"'/venv/bin/lenet-dist; mkdir -p '"$remote_dir"'/logs;' \
    ' if [ ! -x "$bin" ]; then echo "$(hostname): no $bin, run setup first" >&2; exit 1; fi;' \
    ' rm -f '"$remote_stopped"';' \
    ' if pgrep -f "'"$pattern"'" >/dev/null; then echo "$(hostname): already running, not started twice"; exit 0; fi;' \
    "$copy" \
    ' echo "=== start $(date -u +%FT%TZ)" >>"$log";' \
    ' LENET_DIST_JOB_ID='"$(rq "$job_id")"' PYTHONUNBUFFERED=1 setsid nohup '"$cmd"' >>"$log" 2>&1 </dev/null &' \
    ' pid=$!; echo "$pid" >'"$remote_pid"';'
  if [[ "$log_copy" != 0 ]]; then
    printf '%s' ' setsid nohup sh -c "while kill -0 $pid 2>/dev/null; do sleep '"$log_copy"';' \
      ' gcloud storage cp \"\$1\" \"\$2\"; done; gcloud storage cp \"\$1\" \"\$2\""' \
      ' copy-log "$log" "$copy" >'"$remote_dir"'/logs/copy.log 2>&1 </dev/null &'
  fi
  printf '%s' ' sleep 3; if pgrep -f "'"$pattern"'" >/dev/null; then echo "$(hostname): training, log ~/$log'"${copy:+, copied to \$copy}"'";' \
    ' else echo "$(hostname): lenet-dist exited at once:" >&2; tail -n 20 "$log" >&2; exit 1; fi'
}

remote_status() {
  printf '%s' 'cd; n=$(pgrep -fc "'"$pattern"'" || true);' \
    ' echo "$(hostname): $n lenet-dist process(es); log: $(tail -n 1 '"$remote_log"' 2>/dev/null || echo none)"'
}

# The restart loop of the startup script, run as at boot (`start --resume-on-boot`).
remote_start_boot() {
  printf '%s' 'cd; log='"$remote_log"'; bin='"$remote_dir"'/venv/bin/lenet-dist; boot='"$remote_boot"';' \
    ' if [ ! -x "$bin" ]; then echo "$(hostname): no $bin, run setup first" >&2; exit 1; fi;' \
    ' if [ ! -r "$boot" ]; then echo "$(hostname): no $boot: this TPU was created without --resume-on-boot" >&2; exit 1; fi;' \
    ' rm -f '"$remote_stopped"'; sudo bash "$boot"; sleep 3;' \
    ' if pid=$(cat '"$remote_pid"' 2>/dev/null) && [ -d "/proc/$pid" ]; then echo "$(hostname): training (PID $pid, restarted on boot, exit 42 or a signal), log ~/$log";' \
    ' else echo "$(hostname): lenet-dist did not start:" >&2; tail -n 20 "$log" >&2; exit 1; fi'
}

# SIGTERM to the process group in the pid file, only while that PID is still
# `lenet-dist train` (a PID can be reused); a zombie's empty cmdline is not.
remote_stop() {
  printf '%s' 'cd; pidf='"$remote_pid"'; mkdir -p '"$remote_dir"'; touch '"$remote_stopped"';' \
    ' alive() { tr "\0" " " <"/proc/$1/cmdline" 2>/dev/null | grep -q "lenet-dist train"; };' \
    ' pid=$(cat "$pidf" 2>/dev/null || true); case "$pid" in "" | *[!0-9]*) pid=0 ;; esac;' \
    ' if [ "$pid" = 0 ] || ! alive "$pid"; then echo "$(hostname): not running (no lenet-dist train at the PID in ~/$pidf)"; exit 0; fi;' \
    ' kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid"; i=0;' \
    ' while [ "$i" -lt '"$grace"' ] && alive "$pid"; do sleep 1; i=$((i + 1)); done;' \
    ' if alive "$pid"; then echo "$(hostname): still running after '"$grace"' s" >&2; exit 1; fi;' \
    ' echo "$(hostname): stopped"; tail -n 3 '"$remote_log"
}

# The startup script: launch/tpu-boot.sh with this run's settings.
boot_script() {
  local template="$repo/launch/tpu-boot.sh" a args=""
  for a in ${train_args[@]+"${train_args[@]}"}; do args+="${args:+ }$(q "$a")"; done
  sed -n '1,/^# >>> settings/p' "$template"
  printf 'workdir=%s\nrun_name=%s\njob_id=%s\ntrain_args=(%s)\n' \
    "$(q "$workdir")" "$(q "$run_name")" "$(q "$job_id")" "$args"
  sed -n '/^# <<< settings/,$p' "$template"
}

# ---- commands ----------------------------------------------------------------
cleanup=(gcloud compute tpus queued-resources delete "$name" --force --quiet ${loc[@]+"${loc[@]}"})

on_interrupt() {
  trap - INT TERM HUP
  if [[ -n "$err_file" ]]; then rm -f "$err_file"; fi
  echo "tpu-vm.sh: interrupted before $name was ACTIVE: deleting the queued resource it created" >&2
  run "${cleanup[@]}" || echo "tpu-vm.sh: delete failed; see: gcloud compute tpus queued-resources list" >&2
  exit 130
}

# The state of the queued resource; stderr into $err_file.
describe=(gcloud compute tpus queued-resources describe "$name" --format='value(state.state)'
  ${loc[@]+"${loc[@]}"})
err_file=""
trap 'if [[ -n "$err_file" ]]; then rm -f "$err_file"; fi' EXIT
describe_state() { "${describe[@]}" 2>"$err_file"; }

# `create` deletes on Ctrl-C only what it created: the name must be free first.
must_be_free() {
  local state
  note "$name must not exist yet: Ctrl-C deletes only a queued resource this run created"
  printf '+ %s\n' "$(show "${describe[@]}")"
  [[ "$dry_run" != 1 ]] || return 0
  err_file=$(mktemp)
  if state=$(describe_state); then
    rm -f "$err_file"
    die "queued resource $name exists already (${state:-state unknown}): pick another --name, or remove it: $0 -n $name delete"
  fi
  if ! grep -q -e NOT_FOUND -e 'not found' "$err_file"; then
    state=$(tail -n 1 "$err_file")
    rm -f "$err_file"
    echo "tpu-vm.sh: cannot tell whether $name exists: $state" >&2
    exit 1
  fi
  rm -f "$err_file"
}

describe_tries=10  # failed describes in a row before `create` gives up
wait_active() {
  local state fails=0
  printf '+ %s\n' "$(show "${describe[@]}")"
  note "repeated every ${poll}s until the state is ACTIVE (FAILED, SUSPENDING, SUSPENDED, DELETING, or $describe_tries failures in a row: give up)"
  [[ "$dry_run" != 1 ]] || return 0
  err_file=$(mktemp)
  while :; do
    if state=$(describe_state); then
      fails=0
      echo "$(date +%T) $name: ${state:-UNKNOWN}"
      case "$state" in
        ACTIVE) rm -f "$err_file"; return 0 ;;
        FAILED | SUSPENDING | SUSPENDED | DELETING)
          rm -f "$err_file"
          echo "tpu-vm.sh: queued resource $name is $state; see: gcloud compute tpus queued-resources describe $name; remove it with: $0 -n $name delete" >&2
          return 1 ;;
      esac
    else
      fails=$((fails + 1))
      echo "$(date +%T) $name: describe failed ($fails of $describe_tries): $(tail -n 1 "$err_file")"
      if [[ "$fails" -ge "$describe_tries" ]]; then
        echo "tpu-vm.sh: gave up waiting for $name after $describe_tries failed describes in a row: $(tail -n 1 "$err_file"); it may still exist: gcloud compute tpus queued-resources list" >&2
        rm -f "$err_file"
        return 1
      fi
    fi
    sleep "$poll"
  done
}

cmd_create() {
  local create=(gcloud)
  # --autocheckpoint-enabled exists only in `gcloud alpha` (gcloud 528).
  if [[ "$autocheckpoint" == 1 ]]; then create+=(alpha); fi
  create+=(compute tpus queued-resources create "$name" --node-id="$name"
    --accelerator-type="$accel" --runtime-version="$runtime")
  if [[ "$spot" == 1 ]]; then create+=(--spot); fi
  if [[ "$reserved" == 1 ]]; then create+=(--reserved); fi
  if [[ -n "$valid_until" ]]; then create+=(--valid-until-duration="$valid_until"); fi
  if [[ "$autocheckpoint" == 1 ]]; then create+=(--autocheckpoint-enabled); fi
  if [[ "$resume_on_boot" == 1 ]]; then
    note "startup script: launch/tpu-boot.sh with this run's settings, in $boot_file (boot-script prints it)"
    if [[ "$dry_run" != 1 ]]; then
      mkdir -p "$(dirname "$boot_file")"
      boot_script >"$boot_file"
    fi
    create+=(--metadata-from-file=startup-script="$boot_file")
  fi
  create+=(${loc[@]+"${loc[@]}"})
  must_be_free
  # Armed only now: whatever has this name from here on is ours.
  note "on Ctrl-C before ACTIVE, runs: $(show "${cleanup[@]}")"
  trap on_interrupt INT TERM HUP
  run "${create[@]}"
  wait_active
  trap - INT TERM HUP
}

cmd_setup() {
  local whl=$wheel version
  if [[ -z "$whl" ]]; then
    # The version's one home (pyproject reads it from there too).
    version=$(sed -n 's/^__version__ *= *"\([^"]*\)".*/\1/p' "$repo/lenet_dist/versions.py" | head -n 1)
    [[ -n "$version" ]] || die "no __version__ in $repo/lenet_dist/versions.py: build a wheel and pass --wheel"
    # The wheel is pure Python; the workers' Python 3.12 checks requires-python.
    run "${PYTHON:-python3}" -m pip wheel --no-deps --ignore-requires-python -w "$(in_repo dist)" "$repo"
    whl="$(in_repo dist)/lenet_dist-$version-py3-none-any.whl"
  fi
  [[ "$dry_run" == 1 || -f "$whl" ]] || die "no wheel at $whl"
  run gcloud compute tpus tpu-vm scp "$whl" "$name:" --worker=all \
    ${ssh_opts[@]+"${ssh_opts[@]}"} ${loc[@]+"${loc[@]}"}
  ssh_all "$(remote_setup "$(basename "$whl")")"
}

cmd_start() {
  note "free the TPU on every worker, then start all workers at once"
  ssh_all "$(remote_free_tpu)"
  if [[ "$resume_on_boot" == 1 ]]; then
    ssh_all "$(remote_start_boot)"
  else
    ssh_all "$(remote_start)"
  fi
}

cmd_status() {
  run gcloud compute tpus queued-resources describe "$name" --format='value(state.state)' \
    ${loc[@]+"${loc[@]}"}
  ssh_all "$(remote_status)"
}

cmd_logs() {
  local n=$workers dir=${log_dir:-runs/tpu-logs/$run_name} w=0 missing=()
  if [[ -z "$n" ]]; then
    printf '+ %s\n' "$(show gcloud compute tpus tpu-vm describe "$name" \
      --format='value(networkEndpoints.len())' ${loc[@]+"${loc[@]}"})"
    n=$(gcloud compute tpus tpu-vm describe "$name" --format='value(networkEndpoints.len())' \
      ${loc[@]+"${loc[@]}"})
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "could not count the workers of $name (got '$n'): pass --workers"
  fi
  # One ssh per worker: `tpu-vm ssh --output-directory` in gcloud 528 writes
  # ./None/<worker>.log whatever directory it is given.
  run mkdir -p "$dir"
  while [[ "$w" -lt "$n" ]]; do
    if ! run_to "$dir/$w.log" gcloud compute tpus tpu-vm ssh "$name" --worker="$w" \
      --command="cat $remote_log" ${ssh_opts[@]+"${ssh_opts[@]}"} ${loc[@]+"${loc[@]}"}; then
      missing+=("$w")
      rm -f "$dir/$w.log"
    fi
    w=$((w + 1))
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "tpu-vm.sh: no log from worker ${missing[*]} (not started there, or ssh failed: see above)${workdir:+; copies, if any: $workdir/logs/}" >&2
  fi
}

cmd_stop() {
  note "SIGTERM to the process group in ~/$remote_pid on every worker: all save a checkpoint at the same step and exit 143"
  ssh_all "$(remote_stop)"
}

cmd_delete() {
  run "${cleanup[@]}"
}

cmd_recreate() {
  note "recreate $name; the run resumes from $workdir"
  run "${cleanup[@]}" || echo "tpu-vm.sh: delete failed (already gone?); creating anyway" >&2
  cmd_create
  cmd_setup
  cmd_start
}

# The repository (for the wheel): "." when run from its root, so the printed
# commands are the same on every machine.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "$repo" == "$PWD" ]]; then repo=.; fi
in_repo() { if [[ "$repo" == . ]]; then printf '%s' "$1"; else printf '%s/%s' "$repo" "$1"; fi; }
if [[ "$dry_run" == 1 ]]; then note "dry run: nothing below is executed"; fi
for c in "${commands[@]}"; do
  case "$c" in
    up) cmd_create; cmd_setup; cmd_start ;;
    boot-script) boot_script ;;
    *) "cmd_$c" ;;
  esac
done
