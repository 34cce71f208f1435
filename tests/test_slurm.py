"""The SLURM launcher, launch/slurm.sbatch: its directives, its commands (dry run and
fake srun/scontrol) and why it sets JAX_LOCAL_DEVICE_IDS."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "launch" / "slurm.sbatch"
DATA_DIR = "/mnt/my data/fashion's"  # a space and a quote, through two shells
FAKE_RECORDER = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$FAKE_LOG.other"
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


def slurm(tmp_path, rc=0, restarts=0, dry=False):
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
           "LENET_DRY_RUN": "1" if dry else "0"}
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
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("rc,restarts,requeued", [
    (143, 0, True), (143, 20, False), (0, 0, False), (1, 0, False)])
def test_sbatch_requeues_after_a_time_limit_stop(tmp_path, rc, restarts, requeued):
    proc, calls = slurm(tmp_path, rc=rc, restarts=restarts)
    assert proc.returncode == rc, proc.stderr
    assert calls[0].startswith("srun --ntasks-per-node=1")
    assert calls[0].endswith(" (JAX_LOCAL_DEVICE_IDS=0,1,2,3)"), "all 4 GPUs to the task"
    assert calls[1:] == (["scontrol requeue 4242"] if requeued else [])


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
