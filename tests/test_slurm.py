"""The SLURM launcher, launch/slurm.sbatch: its directives, its commands (dry run and
fake srun/scontrol), why it sets JAX_LOCAL_DEVICE_IDS, and real jobs on a local
cluster (scripts/slurm-local.sh): a 2-node job against 1 process, and a scancel
SIGTERM that saves, requeues and resumes."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.launch import free_port
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.state import make_optimizer
from lenet_dist.step import build_steps
from tests.conftest import assert_same_params, small
from tests.test_launch import RESTART_TABLE

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "launch" / "slurm.sbatch"
DATA_DIR = "/mnt/my data/fashion's"  # a space and a quote, through two shells
FAKE_RECORDER = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$FAKE_LOG.other"
printf '%s\\n' "${LENET_DIST_JOB_ID:-unset}" >> "$FAKE_LOG.job-id"
exit "${FAKE_RC:-0}"
"""


def test_sbatch_directives():
    lines = SLURM.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines)
                         if line.strip() and not line.startswith("#"))
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert sbatch and max(sbatch) < first_command, "sbatch ignores #SBATCH after a command"
    opts = dict(lines[i].split()[1].split("=", 1) if "=" in lines[i]
                else (lines[i].split()[1], True) for i in sbatch)
    assert opts["--ntasks-per-node"] == "1" and int(opts["--gpus-per-node"]) >= 1
    # TERM to the job steps (the srun tasks), not "B:" (the batch shell only).
    assert re.fullmatch(r"TERM@\d+", opts["--signal"])
    assert opts["--requeue"] is True and opts["--open-mode"] == "append"


def slurm(tmp_path, rc=0, restarts=0, dry=False, **extra_env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ["srun", "scontrol"]:
        (bin_dir / tool).write_text(FAKE_RECORDER.replace(
            "$*", "$* (JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-unset})"
            if tool == "srun" else "$*"))
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "FAKE_LOG": str(log), "FAKE_RC": str(rc), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "lenet-dist", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "32",
           "SLURM_RESTART_COUNT": str(restarts), "LENET_TRAIN_ARGS": "--epochs 3",
           "LENET_DRY_RUN": "1" if dry else "0", **extra_env}
    proc = subprocess.run(["bash", str(SLURM), "--data-dir", DATA_DIR], env=env,
                          capture_output=True, text=True, timeout=30)
    other = Path(f"{log}.other")
    return proc, other.read_text().splitlines() if other.exists() else []


def test_sbatch_dry_run_prints_srun_with_all_gpus(tmp_path):
    proc, calls = slurm(tmp_path, dry=True)
    assert proc.returncode == 0 and calls == [], proc.stderr
    srun = next(shlex.split(line[2:]) for line in proc.stdout.splitlines()
                if line.startswith("+ srun"))
    i = srun.index("lenet-dist")
    assert srun[:i] == ["srun", "--ntasks-per-node=1", "--cpus-per-task=32",
                        "--kill-on-bad-exit=0"]
    assert srun[i:] == ["lenet-dist", "train", "--distributed", "auto", "--workdir",
                        f"{tmp_path}/runs/lenet-dist", "--epochs", "3", "--data-dir", DATA_DIR]
    assert "+ export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in proc.stdout.splitlines()
    assert "+ export LENET_DIST_JOB_ID=slurm-4242" in proc.stdout.splitlines()
    assert not (tmp_path / "runs").exists()


def test_sbatch_gives_every_requeue_one_job_id(tmp_path):
    """LENET_DIST_JOB_ID=slurm-$SLURM_JOB_ID (the same across requeues), unless set: a
    requeued job takes over its earlier attempt's gs:// lease at once."""
    proc, calls = slurm(tmp_path, rc=143)
    assert proc.returncode == 143 and calls[1:] == ["scontrol requeue 4242"], proc.stderr
    assert (tmp_path / "calls.job-id").read_text().splitlines()[0] == "slurm-4242"
    (tmp_path / "mine").mkdir()
    proc, _ = slurm(tmp_path / "mine", dry=True, LENET_DIST_JOB_ID="my job's id")
    assert "+ export LENET_DIST_JOB_ID='my job'\"'\"'s id'" in proc.stdout.splitlines()


def test_sbatch_cpu_mode_asks_for_devices_over_all_tasks(tmp_path):
    """LENET_CPU_DEVICES_PER_TASK: N simulated devices a task, so --devices N x nodes;
    no GPU is looked for (nvidia-smi would fail here) and none is named."""
    proc, calls = slurm(tmp_path, LENET_CPU_DEVICES_PER_TASK="2", SLURM_JOB_NUM_NODES="3",
                        SLURM_GPUS_ON_NODE="")
    assert proc.returncode == 0, proc.stderr
    assert calls[0].endswith(" (JAX_LOCAL_DEVICE_IDS=unset)"), calls
    assert " lenet-dist train --distributed auto --workdir " in calls[0]
    assert calls[0].split(" (JAX")[0].endswith(" --devices 6 --epochs 3 --data-dir " + DATA_DIR)
    assert "x 2 CPU device(s)" in proc.stdout and "JAX_LOCAL_DEVICE_IDS" not in proc.stdout
    for i, bad in enumerate(["0", "two", "-1"]):
        (tmp_path / str(i)).mkdir()
        proc, calls = slurm(tmp_path / str(i), LENET_CPU_DEVICES_PER_TASK=bad)
        assert proc.returncode == 2 and calls == [] and proc.stdout == "", proc.stdout
        assert proc.stderr.strip() == ("slurm.sbatch: LENET_CPU_DEVICES_PER_TASK must be a "
                                       f"positive integer, not '{bad}'")


@pytest.mark.parametrize("rc,restarts,requeued", [
    (143, 0, True), (143, 20, False), (0, 0, False), (1, 0, False)])
def test_sbatch_requeues_after_a_time_limit_stop(tmp_path, rc, restarts, requeued):
    proc, calls = slurm(tmp_path, rc=rc, restarts=restarts)
    assert proc.returncode == rc, proc.stderr
    assert calls[0].startswith("srun --ntasks-per-node=1")
    assert calls[0].endswith(" (JAX_LOCAL_DEVICE_IDS=0,1,2,3)"), "all 4 GPUs to the task"
    assert calls[1:] == (["scontrol requeue 4242"] if requeued else [])


@pytest.mark.parametrize("rc", sorted(RESTART_TABLE))
def test_sbatch_requeues_what_the_jobset_and_launch_restart(tmp_path, rc):
    """The same table as launch/gke-jobset.yaml's failure policy and `lenet-dist launch
    --max-restarts` (RESTART_TABLE): 42 and signal deaths are requeued."""
    proc, calls = slurm(tmp_path, rc=rc, restarts=3)
    assert proc.returncode == rc, proc.stderr
    requeued = calls[1:] == ["scontrol requeue 4242"]
    assert calls[1:] in ([], ["scontrol requeue 4242"]), calls
    assert {"restart": True, "fail": False, "done": False}[RESTART_TABLE[rc]] == requeued, rc


def test_sbatch_says_when_every_requeue_is_used(tmp_path):
    proc, calls = slurm(tmp_path, rc=42, restarts=2, LENET_MAX_REQUEUES="2")
    assert proc.returncode == 42 and calls[1:] == [], calls
    assert proc.stderr.strip() == ("slurm.sbatch: exit 42, but every requeue "
                                   "(LENET_MAX_REQUEUES=2) is used")


def test_jax_slurm_detection_needs_local_device_ids(monkeypatch):
    """Why slurm.sbatch exports JAX_LOCAL_DEVICE_IDS: without it JAX's SLURM
    detection gives a one-process-per-node job one GPU per node."""
    import inspect

    from jax._src import clusters, distributed
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]",
                       "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                       "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    assert detect(None, None, None, None, None, None)[1:] == (2, 1, [0])
    assert detect(None, None, None, [0, 1, 2, 3], None, None)[3] == [0, 1, 2, 3]
    assert "JAX_LOCAL_DEVICE_IDS" in inspect.getsource(distributed.State.initialize)


# -- a real cluster: scripts/slurm-local.sh's slurmctld and two slurmd ----------------

SLURM_LOCAL = ROOT / "scripts" / "slurm-local.sh"
SLURM_TOOLS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo"]
JOB_TIMEOUT = 180  # seconds, per job (a requeued one included)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# The shared `small` run (conftest), as 2 tasks x 4 simulated CPU devices.
SMALL_ARGS = ["--epochs", "2", "--train-limit", "640", "--batch-size", "64", "--lr", "0.5",
              "--save-every-steps", "3", "--keep-checkpoints", "20", "--no-progress",
              "--heartbeat-timeout", "10"]


def two_free_ports() -> int:
    """A free port whose successor is free too (the two slurmd ports)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """slurmctld + slurmd on nodes 127.0.0.1 and 127.0.0.2 (1 CPU each), on free ports;
    stopped by PID (scripts/slurm-local.sh down) at the end of the module."""
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian's slurmctld, slurmd, slurm-client, "
                    "munge: scripts/get-tools.sh)")
    if os.geteuid() != 0:
        pytest.skip("needs root (munged runs as user munge, slurmd as root)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_CTLD_PORT": str(free_port()),
           "SLURM_LOCAL_NODE_PORT": str(two_free_ports())}
    began = time.monotonic()
    try:
        up = subprocess.run(["bash", str(SLURM_LOCAL), "up", str(state)], env=env,
                            capture_output=True, text=True, timeout=90)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"slurm-local up: {time.monotonic() - began:.2f} s")
        yield state / "slurm.conf"
    finally:
        down = subprocess.run(["bash", str(SLURM_LOCAL), "down", str(state)], env=env,
                              capture_output=True, text=True, timeout=90)
        assert down.returncode == 0, down.stdout + down.stderr


def job_info(conf, job_id) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id],
                         env={**os.environ, "SLURM_CONF": str(conf)},
                         capture_output=True, text=True, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


class Job:
    """launch/slurm.sbatch submitted with real sbatch, in CPU mode (4 devices a task)."""

    def __init__(self, conf, submit_dir, data_dir):
        self.conf, self.dir = conf, submit_dir
        self.work, self.out = submit_dir / "run", submit_dir / "lenet-dist.out"
        lenet = Path(sys.executable).with_name("lenet-dist")  # this venv's
        env = {**os.environ, "SLURM_CONF": str(conf), "LENET_WORKDIR": str(self.work),
               "LENET_CPU_DEVICES_PER_TASK": "4", "LENET_DIST": str(lenet),
               "PYTHONPATH": os.pathsep.join(sys.path)}
        submit = subprocess.run(
            ["sbatch", "--parsable", "--gpus-per-node=0", "--time=5", f"--output={self.out}",
             str(SLURM), *SMALL_ARGS, "--data-dir", data_dir],
            env=env, cwd=submit_dir, capture_output=True, text=True, timeout=30)
        assert submit.returncode == 0, submit.stderr
        self.id = submit.stdout.strip().split(";")[0]

    def info(self) -> dict:
        return job_info(self.conf, self.id)

    def wait(self, until, what, timeout=JOB_TIMEOUT):
        """Poll scontrol until `until(info)`; past the timeout, cancel and fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if until(info):
                return info
            time.sleep(0.25)
        self.cancel()
        pytest.fail(f"job {self.id}: no {what} in {timeout} s: {self.info()}\n{self.output()}")

    def finish(self, restarts=0):
        return self.wait(lambda i: i.get("JobState") in ENDED
                         and int(i.get("Restarts", 0)) >= restarts, "end")

    def cancel(self):
        subprocess.run(["scancel", "--full", "--signal=KILL", self.id],
                       env={**os.environ, "SLURM_CONF": str(self.conf)}, timeout=30)

    def output(self) -> str:
        return self.out.read_text() if self.out.exists() else "(no output file)"


def params_at(workdir):
    """The latest checkpoint's parameters, restored on this process's 8 devices."""
    ckpts = Checkpoints(workdir, read_only=True)
    abstract = build_steps(make_optimizer(small(workdir)), Shardings(make_mesh(8))).abstract()
    tree, _ = ckpts.restore(ckpts.steps()[-1], abstract)
    return tree["state"].params


def checkpoint_steps(workdir):
    return Checkpoints(workdir, read_only=True).steps()


@pytest.mark.slow
def test_real_sbatch_two_nodes_train_like_one_process(cluster, reference, data_dir, tmp_path):
    """2 tasks (one per node) x 4 CPU devices, through sbatch, srun and JAX's SLURM
    detection, end with the parameters of 1 process x 8 devices."""
    job = Job(cluster, tmp_path, data_dir)
    info = job.finish()
    out = job.output()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), out
    assert info["NodeList"] == "127.0.0.[1-2]" and info["NumNodes"] == "2"
    assert f"# job {job.id} on 2 node(s) x 4 CPU device(s), requeue 0" in out
    assert "--devices 8 --epochs 2" in out and "JAX_LOCAL_DEVICE_IDS" not in out
    assert "scontrol requeue" not in out and "Traceback" not in out, out
    assert_same_params(params_at(job.work), reference[1].state.params, atol=1e-6)
    assert checkpoint_steps(job.work) == [3, 6, 9, 10, 12, 15, 18, 20]
    # Two processes wrote the checkpoint: each its own ocdbt.process_N.
    written = {p.name for p in (job.work / "checkpoints" / "20").rglob("ocdbt.process_*")}
    assert written == {"ocdbt.process_0", "ocdbt.process_1"}, written


@pytest.mark.slow
def test_real_scancel_sigterm_saves_requeues_and_resumes(cluster, reference, data_dir,
                                                         tmp_path):
    """`scancel --signal=TERM` (the job's steps, not the batch shell, as --signal=TERM@N
    near the time limit) mid-run: every task saves the same step and exits 143, the
    script requeues the job, and the requeued job resumes to the uninterrupted result,
    appending to the same output file."""
    job = Job(cluster, tmp_path, data_dir)
    job.wait(lambda i: (job.work / "checkpoints" / "3").is_dir()
             or i.get("JobState") in ENDED, "first checkpoint")
    signalled = subprocess.run(["scancel", "--signal=TERM", job.id], capture_output=True,
                               env={**os.environ, "SLURM_CONF": str(cluster)}, text=True,
                               timeout=30)
    assert signalled.returncode == 0, signalled.stderr
    info = job.finish(restarts=1)
    out = job.output()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), out

    stopped = [ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], out  # both tasks, one step
    assert "checkpoint saved" in stopped[0] and "Traceback" not in out, out
    step = int(stopped[0].split(";")[0].rsplit(" ", 1)[1])
    assert 3 <= step < 20 and step in checkpoint_steps(job.work)
    for task in (0, 1):
        assert re.search(rf"srun: error: 127\.0\.0\.\d: task {task}: Exited with exit code 143",
                         out), out
    # Both attempts in the one output file, in order.
    marks = [f"# job {job.id} on 2 node(s) x 4 CPU device(s), requeue 0",
             f"+ scontrol requeue {job.id}",
             f"# job {job.id} on 2 node(s) x 4 CPU device(s), requeue 1",
             f"resuming from checkpoint at step {step}", "done in"]
    at = [out.find(mark) for mark in marks]
    assert -1 not in at and at == sorted(at), (marks, at, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet-dist.out", "run"]
    assert_same_params(params_at(job.work), reference[1].state.params, atol=1e-6)
