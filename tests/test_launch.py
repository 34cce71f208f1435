"""The launchers in launch/: shellcheck, the TPU launcher's dry run (and real runs
against a fake gcloud), every gcloud flag it emits against the installed gcloud's
--help, and its remote shell commands run under dash. Nothing here reaches a cloud.
(The GKE manifest: test_jobset.py; SLURM: test_slurm.py.) Also `lenet-dist launch`'s
restart rule, against RESTART_TABLE: the one table of exit status -> restart that the
JobSet manifest and slurm.sbatch are held to as well; its LENET_DIST_JOB_ID, and that it
returns only once its processes' groups are empty."""

import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lenet_dist

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu-vm.sh"
SHELL_SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"),
                        *(ROOT / "scripts").glob("*.sh"), *(ROOT / "export").glob("*.sh"),
                        *(ROOT / "benchmarks").rglob("*.sh")])

NAME, RUN = "lenet-v5e", "lenet-v5e"
COMMON = ["-p", "my-proj", "-z", "us-central1-a", "-n", NAME, "-a", "v5litepod-16",
          "--spot", "--autocheckpoint", "-b", "my-bucket", "--run", RUN, "--workers", "4"]
DATA_DIR = "/mnt/my data/fashion's"  # a space and a quote, through two shells
TRAIN = ["--", "--epochs", "20", "--data-dir", DATA_DIR]
SEQUENCE = ["create", "setup", "start", "status", "logs", "stop", "delete", "recreate"]
TRAIN_ARGV = ["train", "--distributed", "auto", "--workdir", f"gs://my-bucket/{RUN}",
              "--epochs", "20", "--data-dir", DATA_DIR]
VERSION = lenet_dist.__version__
WHEEL = f"dist/lenet_dist-{VERSION}-py3-none-any.whl"
LOC = ["--zone=us-central1-a", "--project=my-proj"]

FAKE_GCLOUD = f"""#!{sys.executable}
# Records its arguments. A queued resource exists once created (or with
# FAKE_QR_EXISTS=1) until deleted; describe answers FAKE_QR_STATE for it, else
# NOT_FOUND, or fails with FAKE_DESCRIBE_ERROR. Sleeps in create or describe if
# asked; ssh fails on the workers in FAKE_SSH_FAIL; storage cp copies gs://B/P
# to and from FAKE_GCS/B/P.
import json, os, shutil, sys, time
args = sys.argv[1:]
log = os.environ["FAKE_LOG"]
exists = os.environ.get("FAKE_QR_EXISTS") == "1"
if os.path.exists(log):
    for line in open(log):
        call = [w for w in json.loads(line)[1:] if w != "alpha"]
        if call[2:3] == ["queued-resources"]:
            exists = {{"create": True, "delete": False}}.get(call[3], exists)
with open(log, "a") as f:
    f.write(json.dumps(["gcloud", *args]) + "\\n")
call = [w for w in args if w != "alpha"]
if call[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    time.sleep(float(os.environ.get("FAKE_DESCRIBE_SECONDS", "0")))
    if not exists:
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: "
                 "Resource 'queuedResources/" + call[4] + "' was not found")
    if os.environ.get("FAKE_DESCRIBE_ERROR"):
        sys.exit("ERROR: " + os.environ["FAKE_DESCRIBE_ERROR"])
    print(os.environ.get("FAKE_QR_STATE", "ACTIVE"))
elif call[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print(os.environ.get("FAKE_WORKERS", "2"))
elif call[:4] == ["compute", "tpus", "queued-resources", "create"]:
    time.sleep(float(os.environ.get("FAKE_CREATE_SECONDS", "0")))
elif call[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    worker = [w.split("=")[1] for w in call if w.startswith("--worker=")][0]
    if worker in os.environ.get("FAKE_SSH_FAIL", "").split(","):
        sys.exit("cat: lenet-dist/logs/x.log: No such file or directory")
elif call[:2] == ["storage", "cp"]:
    src, dst = (os.path.join(os.environ["FAKE_GCS"], p[5:]) if p.startswith("gs://") else p
                for p in call[2:4])
    if not os.path.exists(src):
        sys.exit("ERROR: (gcloud.storage.cp) The following URLs matched no objects or files")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.copyfile(src, dst)
"""
FAKE_RECORDER = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$FAKE_LOG.other"
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake(tmp_path):
    """PATH with a recording gcloud (and python3), and where they write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "python3").write_text(FAKE_RECORDER)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPU_", "LENET_", "DRY_RUN"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), PYTHON="python3")

    class Fake:
        def calls(self):
            return [json.loads(line) for line in log.read_text().splitlines()] \
                if log.exists() else []

        def others(self):
            other = Path(f"{log}.other")
            return other.read_text().splitlines() if other.exists() else []
    Fake.env = env
    return Fake()


def tpu(fake, *args, check=True, **env):
    proc = subprocess.run(["bash", str(TPU), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**fake.env, **env})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def printed(stdout):
    """The commands a run printed ("+ " lines), as argv lists without redirects."""
    cmds = []
    for line in stdout.splitlines():
        if line.startswith("+ "):
            words = shlex.split(line[2:])
            cmds.append(words[:words.index(">")] if ">" in words else words)
    return cmds


def option(argv, flag):
    values = [w.split("=", 1)[1] for w in argv if w.startswith(flag + "=")]
    assert len(values) == 1, (flag, argv)
    return values[0]


def command_path(argv):
    """gcloud's command words (alpha included) and the rest."""
    n = 5 if argv[1] == "alpha" else 4
    return argv[1:1 + n], argv[1 + n:]


def kind(argv):
    """A short name for each printed command, to check the order of a sequence."""
    if argv[0] != "gcloud":
        return " ".join(argv[:3])
    group, verb = command_path(argv)[0][-2:]
    if group == "queued-resources":
        return f"qr {verb}"
    if verb == "scp":
        return "scp"
    remote = option(argv, "--command")
    for name, marker in [("setup", "uv venv"), ("free", "libtpu_lockfile"),
                         ("start", "setsid nohup"), ("status", "pgrep -fc"),
                         ("stop", "still running after"), ("logs", "cat ")]:
        if marker in remote:
            return f"ssh {name}"
    raise AssertionError(f"unknown remote command: {remote}")


# ---- (a) shellcheck -----------------------------------------------------------

@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (scripts/get-tools.sh installs it)")
    proc = subprocess.run(["shellcheck", "--shell=bash", str(script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script, env, args, message", [
    ("gcs-emulator.sh", {}, ["{tmp}/g", "99999"], "gcs-emulator: PORT 99999 must be 1..65535"),
    ("gcs-emulator.sh", {}, ["{tmp}/g", "0x10"], "gcs-emulator: PORT 0x10 must be 1..65535"),
    ("slurm-local.sh", {"SLURM_LOCAL_CTLD_PORT": "99999"}, ["status", "{tmp}/s"],
     "slurm-local: SLURM_LOCAL_CTLD_PORT=99999 must be 1..65535"),
    ("slurm-local.sh", {"SLURM_LOCAL_NODE_PORT": "65535"}, ["status", "{tmp}/s"],
     "slurm-local: SLURM_LOCAL_NODE_PORT=65535 must be 1..65534"),  # its two nodes need two
])
def test_local_services_refuse_a_port_out_of_range(script, env, args, message, tmp_path):
    """A port past 65535 was taken modulo 65536 by the service."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script),
                           *(a.format(tmp=tmp_path) for a in args)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, message + "\n")
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_scripts_are_strict_and_executable():
    for script in SHELL_SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "set -euo pipefail" in text, script
    for script in [TPU, ROOT / "scripts/get-tools.sh"]:
        assert os.access(script, os.X_OK), script


# ---- (b) the TPU launcher: dry run -------------------------------------------

def test_usage_and_bad_arguments(fake):
    assert "Usage: launch/tpu-vm.sh" in tpu(fake, "-h").stdout
    for args, message in [((), "Usage"), (("bogus",), "unknown command"),
                          (("--dry-run", "start"), "needs --bucket or --workdir"),
                          (("--dry-run", "-w", "/local/dir", "start"), "must be gs://"),
                          (("--dry-run", "logs"), "needs --workers"),
                          (("--dry-run", "-n", "Bad_Name", "status"), "TPU name"),
                          (("--dry-run", "--log-copy", "1m", "status"), "--log-copy")]:
        proc = tpu(fake, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert fake.calls() == [] and fake.others() == []


@pytest.fixture
def dry(fake):
    """The whole sequence in one dry run: the transcript in launch/README.md."""
    proc = tpu(fake, "--dry-run", *COMMON, *SEQUENCE, *TRAIN)
    assert fake.calls() == [] and fake.others() == [], "a dry run ran something"
    return proc.stdout


def test_dry_run_sequence_order(dry):
    setup = ["python3 -m pip", "scp", "ssh setup"]
    create = ["qr describe", "qr create", "qr describe"]  # free?, create, wait
    start = ["ssh free", "ssh start"]
    assert [kind(c) for c in printed(dry)] == [
        *create, *setup, *start,
        "qr describe", "ssh status",                       # status
        "mkdir -p runs/tpu-logs/lenet-v5e", *["ssh logs"] * 4,
        "ssh stop",
        "qr delete",
        "qr delete", *create, *setup, *start]               # recreate


def test_dry_run_every_worker_command_reaches_all_workers(dry):
    workers = [c for c in printed(dry) if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    logs = [c for c in workers if kind(c) == "ssh logs"]
    assert [option(c, "--worker") for c in logs] == ["0", "1", "2", "3"]
    for c in logs:
        assert option(c, "--command") == f"cat lenet-dist/logs/{RUN}.log"
    for c in workers:
        assert (c[6] == f"{NAME}:" if c[4] == "scp" else c[5] == NAME), c
        assert c[-2:] == LOC, c
        if c not in logs:
            assert option(c, "--worker") == "all", c


def test_dry_run_create_waits_and_cleans_up(dry):
    cmds = printed(dry)
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", NAME,
                "--format=value(state.state)", *LOC]
    assert cmds[0] == describe  # the name must be free
    # Autocheckpoint is a preview: only `gcloud alpha` has the flag.
    assert cmds[1] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", NAME,
                       f"--node-id={NAME}", "--accelerator-type=v5litepod-16",
                       "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
                       "--autocheckpoint-enabled", *LOC]
    assert cmds[2] == describe
    delete = ["gcloud", "compute", "tpus", "queued-resources", "delete", NAME,
              "--force", "--quiet", *LOC]
    on_ctrl_c = [shlex.split(line.split("runs: ", 1)[1]) for line in dry.splitlines()
                 if line.startswith("# on Ctrl-C")]
    assert on_ctrl_c == [delete, delete]  # create, and create within recreate
    assert delete in cmds


def test_dry_run_setup_installs_the_wheel_with_python_312(dry):
    cmds = printed(dry)
    build = next(c for c in cmds if c[0] == "python3")
    assert build == ["python3", "-m", "pip", "wheel", "--no-deps", "--ignore-requires-python",
                     "-w", "dist", "."]
    scp = next(c for c in cmds if kind(c) == "scp")
    assert scp[5:7] == [WHEEL, f"{NAME}:"]
    remote = option(next(c for c in cmds if kind(c) == "ssh setup"), "--command")
    assert "uv venv --seed --python 3.12 lenet-dist/venv" in remote
    assert f'pip install -q "lenet-dist/{Path(WHEEL).name}[tpu]"' in remote


def test_dry_run_start_frees_the_tpu_first_then_starts_detached(dry):
    cmds = printed(dry)
    kinds = [kind(c) for c in cmds]
    free = option(cmds[kinds.index("ssh free")], "--command")
    for needle in ["pkill -TERM", "pkill -KILL", "lsof -t /dev/accel* /dev/vfio/*",
                   "kill -9 $pids", "rm -f /tmp/libtpu_lockfile"]:
        assert needle in free
    assert kinds.index("ssh free") + 1 == kinds.index("ssh start")
    start = option(cmds[kinds.index("ssh start")], "--command")
    assert "setsid nohup" in start and "</dev/null &" in start
    words = shlex.split(start)
    i = words.index("train")
    assert words[i - 1] == "$bin" and words[i:i + len(TRAIN_ARGV)] == TRAIN_ARGV
    assert f"copy=gs://my-bucket/{RUN}/logs/worker-$(curl" in start
    assert "agent-worker-number" in start and "do sleep 60;" in start


def test_readme_holds_this_exact_transcript(dry):
    readme = (LAUNCH / "README.md").read_text()
    assert dry in readme, "paste the dry run's output into launch/README.md again"


# ---- (b) the TPU launcher: real runs against a fake gcloud --------------------

def test_real_run_runs_exactly_what_the_dry_run_prints(fake, tmp_path):
    wheel = tmp_path / Path(WHEEL).name
    wheel.write_text("not a real wheel")
    args = [*COMMON, "--wheel", str(wheel), "--log-dir", str(tmp_path / "logs"),
            "--poll", "0", *SEQUENCE, *TRAIN]
    expected = [c for c in printed(tpu(fake, "--dry-run", *args).stdout)
                if c[0] == "gcloud"]
    real = tpu(fake, *args)
    assert printed(real.stdout) == printed(tpu(fake, "--dry-run", *args).stdout)
    assert fake.calls() == expected
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "0.log", "1.log", "2.log", "3.log"]


def test_logs_asks_gcloud_for_the_worker_count(fake, tmp_path):
    tpu(fake, "-n", NAME, "--log-dir", str(tmp_path / "logs"), "logs", FAKE_WORKERS="3")
    calls = fake.calls()
    assert calls[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", NAME,
                        "--format=value(networkEndpoints.len())"]
    assert [option(c, "--worker") for c in calls[1:]] == ["0", "1", "2"]


def verbs(calls):
    return [command_path(c)[0][-1] for c in calls]


def interrupt(fake, ready, **env):
    """Run `create`, press Ctrl-C once ready(gcloud calls so far) holds; (rc, stderr)."""
    proc = subprocess.Popen(["bash", str(TPU), "-n", NAME, "--poll", "0.1", "create"],
                            cwd=ROOT, env={**fake.env, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as in a terminal, even if this process ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 20
    while not ready(verbs(fake.calls())):
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"never ready: {fake.calls()} {proc.communicate()}")
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


DELETE = ["gcloud", "compute", "tpus", "queued-resources", "delete", NAME, "--force", "--quiet"]


@pytest.mark.parametrize("where", ["while queued", "during create"])
def test_ctrl_c_before_active_deletes_the_queued_resource_it_created(fake, where):
    if where == "while queued":  # a describe after the create
        rc, err = interrupt(fake, lambda v: "describe" in v[v.index("create"):] if "create" in v
                            else False, FAKE_QR_STATE="WAITING_FOR_RESOURCES")
    else:
        rc, err = interrupt(fake, lambda v: "create" in v, FAKE_CREATE_SECONDS="30")
    assert rc == 130, err
    assert "deleting the queued resource it created" in err
    assert fake.calls()[-1] == DELETE


def test_ctrl_c_never_deletes_a_queued_resource_that_was_there_before(fake):
    # Ctrl-C while create checks the name, which someone else's resource holds.
    rc, err = interrupt(fake, lambda v: "describe" in v, FAKE_QR_EXISTS="1",
                        FAKE_DESCRIBE_SECONDS="30")
    assert rc != 0, err
    assert verbs(fake.calls()) == ["describe"]  # no create, no delete
    # Without Ctrl-C: one line, exit 2, nothing created or deleted.
    proc = tpu(fake, "-n", NAME, "create", check=False, FAKE_QR_EXISTS="1",
               FAKE_QR_STATE="ACTIVE")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"queued resource {NAME} exists already (ACTIVE)" in proc.stderr
    assert verbs(fake.calls()) == ["describe", "describe"]


def test_create_stops_when_it_cannot_tell_whether_the_name_is_free(fake):
    proc = tpu(fake, "-n", NAME, "create", check=False, FAKE_QR_EXISTS="1",
               FAKE_DESCRIBE_ERROR="PERMISSION_DENIED: no tpu.queuedResources.get")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot tell whether" in proc.stderr and "PERMISSION_DENIED" in proc.stderr
    assert verbs(fake.calls()) == ["describe"]


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED", "DELETING"])
def test_a_queued_resource_that_ends_stops_the_sequence(fake, state):
    proc = tpu(fake, "-n", NAME, "-b", "b", "--poll", "0", "up", check=False,
               FAKE_QR_STATE=state)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"is {state}" in proc.stderr
    assert verbs(fake.calls()) == ["describe", "create", "describe"]  # then no setup


def test_create_gives_up_after_ten_failed_describes_in_a_row(fake):
    proc = tpu(fake, "-n", NAME, "--poll", "0", "create", check=False,
               FAKE_DESCRIBE_ERROR="UNAVAILABLE: try again")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "after 10 failed describes in a row" in proc.stderr and "UNAVAILABLE" in proc.stderr
    assert verbs(fake.calls()) == ["describe", "create", *["describe"] * 10]
    assert "describe failed (10 of 10): ERROR: UNAVAILABLE: try again" in proc.stdout


def test_logs_goes_on_past_a_worker_without_a_log(fake, tmp_path):
    logs = tmp_path / "logs"
    proc = tpu(fake, *COMMON, "--log-dir", str(logs), "logs", FAKE_SSH_FAIL="1,2")
    assert [option(c, "--worker") for c in fake.calls()] == ["0", "1", "2", "3"]
    assert sorted(p.name for p in logs.iterdir()) == ["0.log", "3.log"]
    assert proc.stderr.endswith(f"tpu-vm.sh: no log from worker 1 2 (not started there, or ssh "
                                f"failed: see above); copies, if any: gs://my-bucket/{RUN}/logs/\n")


# ---- (b) the remote commands, run under dash in a private PID namespace --------

FAKE_TRAINER = """#!/bin/bash
# Stands in for lenet-dist: records argv and session, exits 143 on SIGTERM.
if [ -n "${FAKE_IGNORE_TERM:-}" ]; then trap '' TERM; else
  printf '%s\\0' "$@" > "$HOME/argv"
  read -r _ _ _ _ _ sid _ < /proc/$$/stat
  echo "$$ $sid" > "$HOME/session"
  trap 'echo TERM >> "$HOME/signals"; exit 143' TERM
fi
echo "fake training started"
while :; do sleep 0.05; done
"""
FAKE_SUDO = """#!/bin/sh
# No root needed in the namespace; never remove this machine's /tmp/libtpu_lockfile.
echo "$*" >> "$HOME/sudo.log"
if [ "$1" = rm ]; then exit 0; fi
exec "$@"
"""


def _private_pids():
    return shutil.which("unshare") and shutil.which("dash") and subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True, timeout=10).returncode == 0


FAKE_CURL = """#!/bin/sh
# The TPU VM metadata server: this VM is worker 3.
case "$*" in *agent-worker-number*) echo 3 ;; *) exit 22 ;; esac
"""


def test_remote_commands_start_status_stop_and_free_the_tpu(fake, tmp_path):
    # pkill -f in these commands must see only the processes this test starts:
    # they run in a new PID namespace, never against this machine's processes.
    if not _private_pids():
        pytest.skip("needs unshare --pid (root) and dash")
    cmds = printed(tpu(fake, "--dry-run", *COMMON, "--grace", "1", "--log-copy", "1", "start",
                       "status", "stop", *TRAIN).stdout)
    remote = {kind(c)[4:]: option(c, "--command") for c in cmds if kind(c).startswith("ssh ")}
    home, bin_dir, gcs = tmp_path / "home", tmp_path / "sbin", tmp_path / "gcs"
    (home / "lenet-dist/venv/bin").mkdir(parents=True)
    bin_dir.mkdir()
    (home / "lenet-dist/venv/bin/lenet-dist").write_text(FAKE_TRAINER)
    (bin_dir / "sudo").write_text(FAKE_SUDO)
    (bin_dir / "curl").write_text(FAKE_CURL)
    for f in [home / "lenet-dist/venv/bin/lenet-dist", bin_dir / "sudo", bin_dir / "curl"]:
        f.chmod(0o755)
    copy = gcs / f"my-bucket/{RUN}/logs/worker-3.log"
    script = """
        run() { dash -c "$2" > "$HOME/$1.out" 2>&1; echo "rc=$?" >> "$HOME/$1.out"; }
        copied() {  # the copy matches the log (not yet empty), within 20 s
          for _ in $(seq 200); do
            [ -s "$LOG" ] && cmp -s "$LOG" "$COPY" && return; sleep 0.1; done; return 1; }
        run start "$START"; run again "$START"; run status "$STATUS"; run stop "$STOP"
        run status2 "$STATUS"
        copied && cp "$COPY" "$HOME/copy-after-stop"
        FAKE_IGNORE_TERM=1 setsid "$HOME/lenet-dist/venv/bin/lenet-dist" train &
        sleep 0.3; run free "$FREE"; run status3 "$STATUS"
        rm "$LOG"; run restart "$START"; run stop2 "$STOP"  # a new VM: the log goes on
        copied && cp "$COPY" "$HOME/copy-after-restart"
    """
    env = {**fake.env, "HOME": str(home), "PATH": f"{bin_dir}:{fake.env['PATH']}",
           "START": remote["start"], "STATUS": remote["status"], "STOP": remote["stop"],
           "FREE": remote["free"], "FAKE_GCS": str(gcs), "COPY": str(copy),
           "LOG": str(home / f"lenet-dist/logs/{RUN}.log")}
    subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
                   env=env, check=True, timeout=90)
    out = {p.stem: p.read_text() for p in home.glob("*.out")}
    assert f"training, log ~/lenet-dist/logs/lenet-v5e.log, copied to gs://my-bucket/{RUN}/" \
           "logs/worker-3.log\nrc=0" in out["start"], out
    assert (home / "argv").read_text().split("\0")[:-1] == TRAIN_ARGV
    pid, sid = (home / "session").read_text().split()
    assert pid == sid, "setsid: the trainer leads its own session, ssh's end is no HUP"
    assert "already running, not started twice\nrc=0" in out["again"], out
    assert ": 1 lenet-dist process(es); log: fake training started" in out["status"], out
    assert "stopped" in out["stop"] and out["stop"].endswith("rc=0\n"), out
    assert (home / "signals").read_text() == "TERM\nTERM\n"  # stop, stop2
    assert ": 0 lenet-dist process(es)" in out["status2"], out
    assert "stopping a stale lenet-dist" in out["free"] and "TPU free\nrc=0" in out["free"]
    assert ": 0 lenet-dist process(es)" in out["status3"], out  # SIGKILL after --grace
    sudo = (home / "sudo.log").read_text().splitlines()
    assert "rm -f /tmp/libtpu_lockfile" in sudo and "pkill -KILL -f [l]enet-dist train" in sudo
    # The log's copy in the workdir: the whole log once training ended; a new VM
    # fetched it and appended to it.
    first = (home / "copy-after-stop").read_text()
    assert first.startswith("=== start ") and first.count("fake training started") == 1
    log = (home / f"lenet-dist/logs/{RUN}.log").read_text()
    assert log.startswith(first) and log.count("=== start ") == 2, log
    assert (home / "copy-after-restart").read_text() == log


FAKE_UV = """#!/bin/sh
# uv venv --seed --python V DIR: a venv whose python records pip installs and
# whose lenet-dist, given `train`, runs until killed.
[ "$1" = venv ] || exit 1
eval "dir=\\${$#}"
mkdir -p "$dir/bin"
cat > "$dir/bin/python" <<'EOF'
#!/bin/sh
if [ "$1" = -V ]; then echo "Python 3.12.9"; else echo "$*" >> "$HOME/pip.log"; fi
EOF
cat > "$dir/bin/lenet-dist" <<'EOF'
#!/bin/sh
[ "$1" = train ] || exit 0
while :; do sleep 0.1; done
EOF
chmod +x "$dir/bin/python" "$dir/bin/lenet-dist"
"""
FAKE_APT = """#!/bin/sh
# apt-get: `update` finds the lists locked FAKE_APT_LOCKED times, then works;
# `install` fails with FAKE_APT_NO_PACKAGE set.
echo "$*" >> "$HOME/apt.calls"
case " $* " in
  *" update "*)
    n=$(cat "$HOME/apt.locked" 2>/dev/null || echo 0)
    if [ "$n" -lt "${FAKE_APT_LOCKED:-0}" ]; then
      echo $((n + 1)) > "$HOME/apt.locked"; echo "Reading package lists..."
      echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 42 (apt-get)" >&2
      echo "E: Unable to lock directory /var/lib/apt/lists/" >&2; exit 100
    fi
    echo "Hit:1 http://archive.ubuntu.com/ubuntu jammy InRelease" ;;
  *" install "*)
    if [ -n "${FAKE_APT_NO_PACKAGE:-}" ]; then
      echo "E: Unable to locate package dataset-fashion-mnist" >&2; exit 100
    fi
    echo "Setting up dataset-fashion-mnist" ;;
esac
"""
FAKE_SLEEP = """#!/bin/sh
echo "$*" >> "$HOME/sleeps"
"""


def test_remote_setup_waits_for_apt_and_refuses_while_training(fake, tmp_path):
    if not _private_pids():
        pytest.skip("needs unshare --pid (root) and dash")
    cmds = printed(tpu(fake, "--dry-run", *COMMON, "setup").stdout)
    setup = option(next(c for c in cmds if kind(c) == "ssh setup"), "--command")
    home, bin_dir, sleepy = tmp_path / "home", tmp_path / "sbin", tmp_path / "sleepy"
    for d in (home, bin_dir, sleepy):
        d.mkdir()
    for path, text in [(bin_dir / "sudo", FAKE_SUDO), (bin_dir / "uv", FAKE_UV),
                       (bin_dir / "apt-get", FAKE_APT), (sleepy / "sleep", FAKE_SLEEP)]:
        path.write_text(text)
        path.chmod(0o755)
    wheel = Path(WHEEL).name
    script = f"""
        run() {{ touch "$HOME/{wheel}"; PATH="$SLEEPY:$PATH" dash -c "$SETUP" > "$HOME/$1.out" 2>&1
                echo "rc=$?" >> "$HOME/$1.out"; }}
        FAKE_APT_LOCKED=2 run locked
        FAKE_APT_NO_PACKAGE=1 run nopackage
        setsid "$HOME/lenet-dist/venv/bin/lenet-dist" train & sleep 0.3
        touch "$HOME/lenet-dist/venv/kept"; run busy
    """
    env = {**fake.env, "HOME": str(home), "PATH": f"{bin_dir}:{fake.env['PATH']}",
           "SETUP": setup, "SLEEPY": str(sleepy)}
    subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
                   env=env, check=True, timeout=40)
    out = {p.stem: p.read_text() for p in home.glob("*.out")}
    # A locked apt: waited for (two 10 s sleeps, said once), then the package.
    assert out["locked"].count("apt is busy") == 1, out
    assert "Fashion-MNIST from the dataset-fashion-mnist package" in out["locked"], out
    assert out["locked"].endswith("lenet-dist ready, Python 3.12.9\nrc=0\n"), out
    apt = (home / "apt.calls").read_text().splitlines()
    assert apt[:4] == ["-q update"] * 3 + [
        "-q -o DPkg::Lock::Timeout=600 install -y dataset-fashion-mnist"], apt
    # No package: apt's own last line, and the [tfds] extra instead.
    assert "apt did not install dataset-fashion-mnist (E: Unable to locate package " \
           "dataset-fashion-mnist; all of it in ~/lenet-dist/logs/apt.log); adding the " \
           "[tfds] extra" in out["nopackage"], out
    assert (home / "sleeps").read_text() == "10\n10\n"  # only the lock waited
    pip = (home / "pip.log").read_text().splitlines()
    assert [p.split()[-1] for p in pip] == [f'lenet-dist/{wheel}[tpu]'] * 2 + [
        f'lenet-dist/{wheel}[tpu,tfds]'], pip
    # Training runs from the venv: setup leaves it alone, in one line.
    assert out["busy"].endswith("lenet-dist is training, perhaps from lenet-dist/venv: not "
                                "replacing it (stop first)\nrc=1\n"), out
    assert (home / "lenet-dist/venv/kept").exists()


# ---- (c) every gcloud flag exists in the installed gcloud ---------------------

_HELP = {}  # when pytest runs without its cache plugin


def _gcloud_help(cache, command):
    gcloud = shutil.which("gcloud")
    root = Path(os.path.realpath(gcloud)).parent.parent
    version = (root / "VERSION").read_text().strip() if (root / "VERSION").exists() \
        else str(Path(gcloud).stat().st_mtime)
    key = f"lenet-dist/gcloud-help/{version}/{'-'.join(command)}"
    text = cache.get(key, None) if cache else _HELP.get(key)
    if text is None:
        env = {**os.environ, "TERM": "dumb", "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
               "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1"}
        proc = subprocess.run([gcloud, *command, "--help"], capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
        if cache:
            cache.set(key, text)
        _HELP[key] = text
    return text


def test_every_gcloud_flag_is_in_gcloud_help(fake, tmp_path, request):
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud not installed")
    cmds = []
    for autocheckpoint in ([], ["--autocheckpoint"]):  # gcloud alpha, or not
        common = [a for a in COMMON if a != "--autocheckpoint"] + autocheckpoint
        dry = tpu(fake, "--dry-run", *common, "--internal-ip", "--valid-until", "6h",
                  *SEQUENCE, *TRAIN).stdout
        cmds += [c for c in printed(dry) if c[0] == "gcloud"]
        cmds += [shlex.split(line.split("runs: ", 1)[1]) for line in dry.splitlines()
                 if line.startswith("# on Ctrl-C")]
    # The workers run `gcloud storage cp` (no flags) to copy their logs.
    assert "gcloud storage cp" in option(next(c for c in cmds if kind(c) == "ssh start"),
                                         "--command")
    cmds.append(["gcloud", "storage", "cp"])
    tpu(fake, "-n", NAME, "--log-dir", str(tmp_path), "logs")  # asks for the worker count
    cmds += fake.calls()
    groups = sorted({tuple(command_path(c)[0]) for c in cmds})
    with ThreadPoolExecutor(4) as pool:
        cache = getattr(request.config, "cache", None)
        helps = dict(zip(groups, pool.map(lambda g: _gcloud_help(cache, g), groups)))
    checked = set()
    for c in cmds:
        path, rest = command_path(c)
        text = helps[tuple(path)]
        assert f"gcloud {' '.join(path)}" in text
        # A flag counts when the help defines it (a line starting with it) or
        # lists it among the flags every gcloud command takes, not when prose names it.
        own, _, wide = text.partition("GCLOUD WIDE FLAGS")
        wide = wide.split("Run $ gcloud help")[0]
        for flag in (w.split("=", 1)[0] for w in rest if w.startswith("--")):
            name = re.escape(flag) + r"(?![\w-])"
            assert re.search(rf"^\s+{name}", own, re.M) or re.search(rf"\s{name}", wide), \
                f"{flag} is not a flag of gcloud {' '.join(path)}"
            checked.add(flag)
    assert {"--spot", "--valid-until-duration", "--worker", "--command", "--internal-ip",
            "--autocheckpoint-enabled",
            "--force", "--format", "--node-id"} <= checked


# ---- `lenet-dist launch`: what it restarts, its job id, its processes' groups -------

# What a job whose (first) process ends with this exit status gets, from each launcher:
# the JobSet manifest, `lenet-dist launch --max-restarts` and launch/slurm.sbatch
# (tests/test_jobset.py and tests/test_slurm.py hold the other two to it). Only 42
# ("restart me") and deaths by signal (127..255) are worth a restart.
RESTART_TABLE = {
    0: "done",
    1: "fail",       # a runtime failure: the same command fails the same way
    2: "fail",       # a usage error
    42: "restart",   # errors.RESTART_EXIT_CODE: lease lost, storage unreachable
    124: "fail",     # launch's own timeout
    127: "restart",  # with the signals in xpk's template
    130: "restart",  # SIGINT from elsewhere (the launcher's own stop is never restarted)
    134: "restart",  # a lost peer: JAX's abort
    137: "restart",  # SIGKILL, out of memory
    143: "restart",  # SIGTERM, checkpoint saved
}

# A stand-in for `python -m lenet_dist ...` (LocalJob's `python`): records its
# LENET_DIST_JOB_ID, then ends as FAKE_EXIT says on the first attempt ("-9": killed by
# SIGKILL) and exits 0 on any later one.
FAKE_PYTHON = """#!/bin/sh
echo "${LENET_DIST_JOB_ID:-unset}" >> "$FAKE_DIR/ids"
if [ -n "${FAKE_LINGER:-}" ]; then  # an output filter that outlives its process
  (exec >/dev/null 2>&1 </dev/null; sleep "$FAKE_LINGER"; touch "$FAKE_DIR/lingered") &
fi
if [ "$(wc -l < "$FAKE_DIR/ids")" -gt 1 ]; then exit 0; fi
case "$FAKE_EXIT" in -*) kill "$FAKE_EXIT" $$; sleep 5 ;; esac
exit "$FAKE_EXIT"
"""


@pytest.fixture
def fake_launch(tmp_path, monkeypatch):
    """`launch.run` with every process a FAKE_PYTHON; returns a function that runs one
    launch and gives (status, attempts, job ids, output)."""
    from lenet_dist import launch as launch_lib

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)

    class FakeJob(launch_lib.LocalJob):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, python=str(fake))

    monkeypatch.setattr(launch_lib, "LocalJob", FakeJob)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.delenv("LENET_DIST_JOB_ID", raising=False)

    def launch(code, max_restarts=1, processes=1, **env):
        (tmp_path / "ids").unlink(missing_ok=True)
        monkeypatch.setenv("FAKE_EXIT", str(code))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        out = io.StringIO()
        status = launch_lib.run(["train"], processes, timeout=60, grace=5, out=out,
                                max_restarts=max_restarts)
        text = out.getvalue()
        ids = (tmp_path / "ids").read_text().splitlines()
        return status, text.count("launching "), ids, text

    return launch


@pytest.mark.parametrize("code", sorted(RESTART_TABLE))
def test_launch_restarts_what_the_jobset_and_slurm_restart(fake_launch, code):
    """The same table as launch/gke-jobset.yaml's failure policy and slurm.sbatch
    (RESTART_TABLE): only 42 ("restart me") and signal deaths are restarted."""
    from lenet_dist import launch as launch_lib

    status, attempts, _, out = fake_launch(code)
    want = RESTART_TABLE[code]
    assert (status, attempts) == {"done": (0, 1), "restart": (0, 2), "fail": (code, 1)}[want], out
    refusal = launch_lib.restart_refusal(code, [], 1)
    assert (refusal is None) == (want == "restart"), refusal
    if want == "fail" and code != 2:
        assert refusal == (f"exit {code} is not restartable: the same command fails the same "
                           "way; only exit 42 (restart me) and signal deaths are restarted")
        assert f"; not restarting: {refusal}" in out


def test_launch_restarts_a_process_killed_by_a_signal(fake_launch):
    from lenet_dist import launch as launch_lib

    status, attempts, _, out = fake_launch(-9)
    assert (status, attempts) == (0, 2), out
    assert "launch: process 0 was killed by SIGKILL; restarting the job (1 of 1)" in out
    assert launch_lib.restart_refusal(-15, [], 1) is None
    assert "stopped by SIGTERM" in launch_lib.restart_refusal(-15, [signal.SIGTERM], 1)
    assert "--max-restarts" in launch_lib.restart_refusal(42, [], 0)


def test_launch_restart_code_is_the_errors_one():
    from lenet_dist import errors, launch as launch_lib

    assert launch_lib.RESTART_EXIT_CODE == errors.Restartable.exit_code == 42
    assert launch_lib.restartable(42) and launch_lib.restartable(255)
    assert not any(launch_lib.restartable(c) for c in (0, 1, 2, 41, 43, 124, 126, 256))


def test_launch_gives_every_process_of_every_attempt_one_job_id(fake_launch):
    status, attempts, ids, out = fake_launch(42, processes=2)
    assert (status, attempts) == (0, 2), out
    assert len(ids) >= 3 and len(set(ids)) == 1, ids  # a process killed at once may not write
    assert re.fullmatch(rf"launch-{re.escape(socket.gethostname())}-{os.getpid()}-\d+", ids[0])
    assert f"(job id {ids[0]}): lenet-dist train" in out
    status, _, ids, _ = fake_launch(42, LENET_DIST_JOB_ID="mine")
    assert status == 0 and ids == ["mine", "mine"]
    from lenet_dist import launch as launch_lib, lease  # one variable, named in both

    assert launch_lib.JOB_ID == lease.JOB_ENV


def test_launch_returns_after_its_processes_output_filters(fake_launch, tmp_path):
    """A process's output filters outlive it by a moment: `run` returns once its process
    groups are empty (GROUPS_GONE_SECONDS at most), not before."""
    status, _, _, out = fake_launch(0, FAKE_LINGER="0.5")
    assert status == 0, out
    pgid = int(re.search(r"^pids: 0=(\d+)$", out, re.M).group(1))
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
