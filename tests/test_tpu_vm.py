"""`launch/tpu-vm.sh --resume-on-boot` and `stop`: the startup script that `create`
passes as metadata (launch/tpu-boot.sh with the run's settings), its restart loop run
here against a fake `lenet-dist`, and `stop`, which kills only the process group in
the pid file. Nothing here reaches a cloud; every process started is killed by PID.
(The rest of tpu-vm.sh: test_launch.py.)"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu-vm.sh"
NAME, RUN = "lenet-v5e", "lenet-v5e"
WORKDIR = f"gs://my-bucket/{RUN}"
COMMON = ["-p", "my-proj", "-z", "us-central1-a", "-n", NAME, "-a", "v5litepod-16",
          "-b", "my-bucket", "--run", RUN, "--workers", "4"]
DATA_DIR = "/mnt/my data/fashion's"  # a space and a quote, through two shells
TRAIN = ["--", "--epochs", "20", "--data-dir", DATA_DIR]
TRAIN_ARGV = ["train", "--distributed", "auto", "--workdir", WORKDIR,
              "--epochs", "20", "--data-dir", DATA_DIR]
BOOT_FILE = f"runs/tpu-boot/{NAME}.sh"

FAKE_GCLOUD = """#!/bin/sh
# Records its arguments; a queued resource exists once created. create keeps a
# copy of the startup script it was given.
printf '%s\\n' "$*" >> "$FAKE_DIR/gcloud.calls"
case "$*" in
  *"queued-resources describe"*)
    [ -e "$FAKE_DIR/created" ] || { echo "ERROR: NOT_FOUND: was not found" >&2; exit 1; }
    echo ACTIVE ;;
  *"queued-resources create"*)
    touch "$FAKE_DIR/created"
    for a in "$@"; do
      case "$a" in --metadata-from-file=startup-script=*)
        cp "${a#--metadata-from-file=startup-script=}" "$FAKE_DIR/startup-script" ;;
      esac
    done ;;
esac
"""

# Stands in for lenet-dist: records who it is and what it got, then exits with the
# next code in $FAKE_DIR/codes ("wait": runs until SIGTERM, then exits 143).
FAKE_TRAINER = """#!/bin/bash
d=$FAKE_DIR
for _ in $(seq 100); do [ -s "$HOME/lenet-dist/train.pid" ] && break; sleep 0.02; done
echo "$$ $(cat "$HOME/lenet-dist/train.pid") ${LENET_DIST_JOB_ID:-none}" >> "$d/runs"
printf '%s\\0' "$@" > "$d/argv"
code=$(head -n 1 "$d/codes"); sed -i 1d "$d/codes"
echo "fake training, exit $code"
if [ "$code" = wait ]; then
  trap 'echo TERM >> "$d/signals"; exit 143' TERM
  touch "$d/waiting"
  while :; do sleep 0.05; done
fi
exit "$code"
"""


def tpu(*args, cwd=ROOT, check=True, env=None):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("TPU_", "LENET_", "DRY_RUN"))}
    proc = subprocess.run(["bash", str(TPU), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def printed(stdout):
    """The commands a run printed ("+ " lines), as argv lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def option(argv, flag):
    values = [w.split("=", 1)[1] for w in argv if w.startswith(flag + "=")]
    assert len(values) == 1, (flag, argv)
    return values[0]


def remote(cmds, marker):
    """The --command of the one printed ssh whose command holds marker."""
    found = [option(c, "--command") for c in cmds
             if "ssh" in c[:6] and marker in option(c, "--command")]
    assert len(found) == 1, (marker, found)
    return found[0]


@pytest.fixture(scope="module")
def boot_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("boot") / "startup-script.sh"
    path.write_text(tpu(*COMMON, "boot-script", *TRAIN).stdout)
    return path


# ---- the create path: the metadata flag, the script it carries ----------------

def test_dry_run_passes_the_startup_script_as_metadata():
    for extra, alpha in [([], []), (["--autocheckpoint"], ["alpha"])]:
        out = tpu("--dry-run", *COMMON, *extra, "--resume-on-boot", "up", *TRAIN).stdout
        assert ("# startup script: launch/tpu-boot.sh with this run's settings, in "
                f"{BOOT_FILE}") in out
        create = next(c for c in printed(out) if "create" in c[:6])
        assert create[:5 + len(alpha)] == ["gcloud", *alpha, "compute", "tpus",
                                           "queued-resources", "create"]
        assert option(create, "--metadata-from-file") == f"startup-script={BOOT_FILE}"
        assert create[-2:] == ["--zone=us-central1-a", "--project=my-proj"]
        # start runs the startup script's loop, as a boot does, not a bare train.
        start = remote(printed(out), "/usr/local/lib/lenet-dist/boot.sh")
        assert 'sudo bash "$boot"' in start and "rm -f lenet-dist/stopped" in start
        assert "setsid nohup" not in start
    # Without the option: no metadata, and start trains directly.
    out = tpu("--dry-run", *COMMON, "up", *TRAIN).stdout
    assert "--metadata-from-file" not in out and "startup script" not in out


def test_real_create_writes_the_script_gcloud_gets(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    args = [*COMMON, "--poll", "0", "--resume-on-boot", "create", *TRAIN]
    real = tpu(*args, cwd=tmp_path, env=env)
    assert printed(real.stdout) == printed(tpu("--dry-run", *args, cwd=tmp_path).stdout)
    sent = (tmp_path / "startup-script").read_text()
    assert sent == (tmp_path / BOOT_FILE).read_text() == tpu(*COMMON, "boot-script", *TRAIN).stdout
    assert sent.startswith("#!/usr/bin/env bash\n")


def test_resume_on_boot_refuses_what_it_cannot_do():
    for args, message in [
        (["--resume-on-boot", "-n", NAME, "create"], "create --resume-on-boot needs --bucket"),
        (["--resume-on-boot", "-b", "b", "start", "--", "--epochs", "3"],
         "training runs with the flags given to create"),
        (["-w", "/local", "boot-script"], "must be gs://"),
    ]:
        proc = tpu("--dry-run", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1


def test_the_startup_script_carries_the_run_and_is_clean_bash(boot_script):
    text = boot_script.read_text()
    assert f"\nworkdir={WORKDIR}\n" in text and f"\njob_id=tpu-{NAME}\n" in text
    assert "\ntrain_args=(--epochs 20 --data-dir '/mnt/my data/fashion'\"'\"'s')\n" in text
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(boot_script)], check=True, timeout=30)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (scripts/get-tools.sh installs it)")
    proc = subprocess.run(["shellcheck", "--shell=bash", str(boot_script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    # Every $variable in the script's own code is quoted (shellcheck SC2086 above),
    # and no process is found by name.
    assert not re.search(r"pkill|killall|pgrep", text)


# ---- the restart loop, against a fake lenet-dist ------------------------------

@pytest.fixture
def trainer(tmp_path):
    """A home without a venv and a fake lenet-dist on PATH; run(codes) runs the loop."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "lenet-dist").write_text(FAKE_TRAINER)
    (bin_dir / "lenet-dist").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "FAKE_DIR": str(tmp_path),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "LENET_RESTART_BACKOFF": "0"}
    env.pop("LENET_DIST_JOB_ID", None)

    class Trainer:
        dir = tmp_path
        pid_file = home / "lenet-dist" / "train.pid"
        log = home / "lenet-dist" / "logs" / f"{RUN}.log"

        def start(self, script, codes, **more):
            (tmp_path / "codes").write_text("".join(f"{c}\n" for c in codes))
            return subprocess.Popen(["bash", str(script), "run"], env={**env, **more},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)

        def run(self, script, codes, **more):
            proc = self.start(script, codes, **more)
            try:
                out, _ = proc.communicate(timeout=30)
            finally:
                kill_group(proc.pid)
            return proc.returncode, out

        def runs(self):
            path = tmp_path / "runs"
            return [line.split() for line in path.read_text().splitlines()] \
                if path.exists() else []
    Trainer.home = home
    return Trainer()


def kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("codes, rc", [
    ([42, 143, 0], 0),        # a retry can succeed; a SIGTERM; done
    ([137, 134, 1], 1),       # signals; then a failure: no retry
    ([127, 130, 255, 0], 0),  # 127-255: errors.py's restart rule
    ([2], 2),                 # a usage error: never retried
    ([0], 0),
    ([3], 3),                 # any other code stops too
])
def test_loop_restarts_on_42_and_signals_and_stops_on_the_rest(trainer, boot_script, codes, rc):
    got, out = trainer.run(boot_script, codes)
    assert got == rc, out
    runs = trainer.runs()
    assert len(runs) == len(codes), runs
    for pid, pid_in_file, job in runs:
        assert pid == pid_in_file, "the pid file holds lenet-dist's own PID"
        assert job == f"tpu-{NAME}", "one LENET_DIST_JOB_ID for every attempt"
    assert len({pid for pid, _, _ in runs}) == len(runs)
    assert (trainer.dir / "argv").read_text().split("\0")[:-1] == TRAIN_ARGV
    assert not trainer.pid_file.exists(), "the pid file is removed once lenet-dist exits"
    log = trainer.log.read_text()
    assert log.count("=== start ") == len(codes) and log.count("fake training, exit") == len(codes)
    assert [int(c) for c in re.findall(r"=== exit (\d+) ", log)] == codes


def test_loop_gives_up_after_its_restart_cap(trainer, boot_script):
    got, out = trainer.run(boot_script, [42] * 5, LENET_MAX_RESTARTS="2")
    assert got == 42, out
    assert len(trainer.runs()) == 3  # the first run and 2 restarts
    assert "2 restarts in a row, giving up" in trainer.log.read_text()


def test_loop_does_not_start_after_stop_or_beside_a_running_trainer(trainer, boot_script):
    (trainer.home / "lenet-dist").mkdir()
    (trainer.home / "lenet-dist" / "stopped").touch()
    assert trainer.run(boot_script, [0])[0] == 0 and trainer.runs() == []
    (trainer.home / "lenet-dist" / "stopped").unlink()
    # A pid file whose PID is lenet-dist training: that one runs, no second.
    busy = subprocess.Popen(["bash", "-c", 'exec -a "lenet-dist train" sleep 60'],
                            start_new_session=True)
    try:
        time.sleep(0.2)
        trainer.pid_file.write_text(f"{busy.pid}\n")
        got, out = trainer.run(boot_script, [0])
        assert got == 0 and f"lenet-dist runs already (PID {busy.pid})" in out
        assert trainer.runs() == []
    finally:
        kill_group(busy.pid)
        busy.wait(timeout=10)


def test_sigterm_to_the_loop_checkpoints_and_does_not_restart(trainer, boot_script):
    proc = trainer.start(boot_script, ["wait", 0])
    try:
        for _ in range(200):
            if (trainer.dir / "waiting").exists():
                break
            time.sleep(0.05)
        assert (trainer.dir / "waiting").exists()
        # A second loop (a `start`, a boot) leaves the running one alone.
        rc, second = trainer.run(boot_script, [])
        assert rc == 0 and len(trainer.runs()) == 1, second
        os.kill(proc.pid, signal.SIGTERM)  # the loop, not lenet-dist: as at shutdown
        out, _ = proc.communicate(timeout=30)
    finally:
        kill_group(proc.pid)
    assert proc.returncode == 143, out
    assert "a restart loop runs already" in second
    assert (trainer.dir / "signals").read_text() == "TERM\n"
    assert len(trainer.runs()) == 1 and not trainer.pid_file.exists()


# ---- stop: the pid file's process group, nothing else --------------------------

def stop_command(grace="5"):
    out = tpu("--dry-run", *COMMON, "--grace", grace, "stop").stdout
    assert "pkill" not in out
    return remote(printed(out), "still running after")


def test_stop_kills_only_the_process_group_in_the_pid_file(tmp_path):
    home = tmp_path / "home"
    (home / "lenet-dist" / "venv" / "bin").mkdir(parents=True)
    (home / "lenet-dist" / "logs").mkdir()
    (home / "lenet-dist" / "logs" / f"{RUN}.log").write_text("epoch 1\n")
    fake = home / "lenet-dist" / "venv" / "bin" / "lenet-dist"
    fake.write_text("#!/bin/bash\ntrap 'echo TERM >> \"$HOME/signals\"; exit 143' TERM\n"
                    "while :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    env = {**os.environ, "HOME": str(home)}
    shell = shutil.which("dash") or "sh"
    started = []
    try:
        # The decoys' command lines hold lenet-dist; pkill -f would have hit them.
        decoy = subprocess.Popen(["bash", "-c", 'exec -a "lenet-dist train decoy" sleep 120'],
                                 start_new_session=True)
        other = subprocess.Popen(["sleep", "120"], start_new_session=True)
        training = subprocess.Popen([str(fake), "train", "--workdir", WORKDIR], env=env,
                                    start_new_session=True)
        started += [decoy, other, training]
        time.sleep(0.3)
        pid_file = home / "lenet-dist" / "train.pid"

        def stop():
            proc = subprocess.run([shell, "-c", stop_command()], env=env, capture_output=True,
                                  text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        # A PID reused by another program: left alone.
        pid_file.write_text(f"{other.pid}\n")
        assert "not running (no lenet-dist train at the PID in ~/lenet-dist/train.pid)" in stop()
        pid_file.write_text("")
        assert "not running" in stop()
        pid_file.write_text(f"{training.pid}\n")
        assert "stopped" in stop()
        assert training.wait(timeout=10) == 143
        assert (home / "signals").read_text() == "TERM\n"
        assert (home / "lenet-dist" / "stopped").exists(), "no restart, even on boot"
        for p in (decoy, other):
            assert p.poll() is None, "stop killed a process it did not start"
    finally:
        for p in started:
            kill_group(p.pid)
            p.wait(timeout=10)


def test_stop_waits_and_says_so_when_lenet_dist_ignores_sigterm(tmp_path):
    home = tmp_path / "home"
    (home / "lenet-dist").mkdir(parents=True)
    stubborn = subprocess.Popen(["bash", "-c", "trap '' TERM; exec -a 'lenet-dist train' "
                                 "bash -c 'trap \"\" TERM; while :; do sleep 0.05; done'"],
                                start_new_session=True)
    try:
        time.sleep(0.3)
        (home / "lenet-dist" / "train.pid").write_text(f"{stubborn.pid}\n")
        started = time.monotonic()
        proc = subprocess.run([shutil.which("dash") or "sh", "-c", stop_command("1")],
                              env={**os.environ, "HOME": str(home)}, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 1 and "still running after 1 s" in proc.stderr, proc
        assert time.monotonic() - started < 10
        assert stubborn.poll() is None
    finally:
        kill_group(stubborn.pid)
        stubborn.wait(timeout=10)


def test_metadata_flag_is_in_gcloud_help():
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud not installed")
    env = {**os.environ, "TERM": "dumb", "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
           "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1"}
    for alpha in ([], ["alpha"]):
        proc = subprocess.run(["gcloud", *alpha, "compute", "tpus", "queued-resources",
                               "create", "--help"], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
        assert re.search(r"^\s+--metadata-from-file\b", text, re.M), alpha

