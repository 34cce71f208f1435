"""Real multi-process jobs: 2 processes x 4 simulated CPU devices on loopback.

Every job runs under `LocalJob` (the `lenet-dist launch` launcher) with a hard
timeout and is killed by PID at the end of its test. The runs are the shared
`small` run (10 steps an epoch, saves every 3 steps), so every result can be
held against the in-process 8-device `reference`.
"""

import os
import shutil
import signal
import sys
import time

import pytest

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.launch import LocalJob, free_port
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.state import make_optimizer
from lenet_dist.step import build_steps
from lenet_dist.training import train
from tests.conftest import assert_same_params, small, write_dataset

pytestmark = pytest.mark.slow

HEARTBEAT = 5  # seconds: how long survivors wait for a dead process in these tests
JOB_TIMEOUT = 240


def train_args(workdir, data_dir, epochs=2, *extra):
    return ["train", "--devices", "8", "--epochs", str(epochs), "--train-limit", "640",
            "--batch-size", "64", "--lr", "0.5", "--save-every-steps", "3",
            "--keep-checkpoints", "20", "--no-progress", "--heartbeat-timeout",
            str(HEARTBEAT), "--data-dir", data_dir, "--workdir", str(workdir), *extra]


def child_env(**extra):
    return {"PYTHONPATH": os.pathsep.join(sys.path), **extra}


def run_job(args, processes=2, timeout=JOB_TIMEOUT, **kw):
    kw["env"] = child_env(**kw.get("env", {}))
    job = LocalJob(args, processes, **kw)
    try:
        job.start()
        codes = job.wait(timeout, grace=60)
    finally:
        job.kill_all()
    assert not job.timed_out, [job.output(i)[-2000:] for i in range(processes)]
    return job, codes


def params_at(workdir, step=None):
    """Parameters of a checkpoint (latest by default), restored on 8 devices here."""
    ckpts = Checkpoints(workdir, read_only=True)
    shardings = Shardings(make_mesh(8))
    abstract = build_steps(make_optimizer(small(workdir)), shardings).abstract()
    tree, _ = ckpts.restore(step if step is not None else ckpts.steps()[-1], abstract)
    return tree["state"].params


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def job_2x4(data_dir, tmp_path_factory):
    """The `small` run as 2 processes x 4 devices."""
    work = tmp_path_factory.mktemp("mp") / "run"
    job, codes = run_job(train_args(work, data_dir))
    return work, job, codes


def test_two_processes_train_like_one(job_2x4, reference):
    work, job, codes = job_2x4
    assert codes == [0, 0], job.output(0) + job.output(1)
    ref_work, ref = reference
    assert_same_params(params_at(work), ref.state.params, atol=1e-6)
    assert Checkpoints(work, read_only=True).steps() == [3, 6, 9, 10, 12, 15, 18, 20]
    lines = (work / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one writer: one line per epoch
    out0, out1 = job.output(0), job.output(1)
    assert out0.count("epoch 1/2  train loss") == 1 and "over 8 cpu device(s)" in out0
    assert "epoch" not in out1 and "error" not in out1  # process 1 says nothing
    assert "Traceback" not in out0 + out1


def test_2x4_checkpoint_resumes_on_2x4_and_on_1x8(job_2x4, data_dir, dataset, tmp_path):
    work, _, codes = job_2x4
    assert codes == [0, 0]
    on_2x4, on_1x8 = tmp_path / "2x4", tmp_path / "1x8"
    shutil.copytree(work, on_2x4)
    shutil.copytree(work, on_1x8)
    job, codes = run_job(train_args(on_2x4, data_dir, 3))
    assert codes == [0, 0], job.output(0)
    assert "resuming from checkpoint at step 20" in job.output(0)
    logs = []
    resumed = train(small(on_1x8, epochs=3, save_every_steps=3, keep_checkpoints=20),
                    dataset=dataset, log=logs.append)
    assert any("resuming from checkpoint at step 20" in ln for ln in logs)
    assert_same_params(params_at(on_2x4), resumed.state.params, atol=1e-6)
    assert len((on_2x4 / "metrics.jsonl").read_text().splitlines()) == 3


def test_eval_and_export_in_a_two_process_job(job_2x4, reference, data_dir, tmp_path):
    work, _, codes = job_2x4
    assert codes == [0, 0]
    job, codes = run_job(["eval", "--workdir", str(work), "--data-dir", data_dir,
                          "--devices", "8"])
    assert codes == [0, 0], job.output(0) + job.output(1)
    final = reference[1].final
    assert (f"step 20 (epoch 2) on 8 device(s): test loss {final['test_loss']:.4f}  "
            f"test accuracy {final['test_accuracy']:.4f}") in job.output(0)
    assert "step" not in job.output(1) and "error" not in job.output(1)  # one writer
    out = tmp_path / "model" / "1"
    job, codes = run_job(["export", "--workdir", str(work), "--out", str(out),
                          "--data-dir", data_dir])
    assert codes == [0, 0], job.output(0) + job.output(1)
    assert f"exported {work} step 20 (test accuracy {reference[1].final['test_accuracy']:.4f})" \
        in job.output(0)
    assert (out / "saved_model.pb").is_file()
    assert "exported" not in job.output(1) and "error" not in job.output(1)


def test_fake_slurm_with_distributed_auto_matches_explicit_flags(job_2x4, data_dir, tmp_path):
    work, _, _ = job_2x4
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
             "SLURM_STEP_NUM_NODES": "1", "JAX_COORDINATOR_PORT": str(free_port())}
    job, codes = run_job(train_args(tmp_path / "slurm", data_dir, 1, "--distributed", "auto"),
                         wire=False, env=slurm,
                         env_for=lambda i: {"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
    assert codes == [0, 0], job.output(0) + job.output(1)
    assert "epoch 1/1" in job.output(0) and "epoch" not in job.output(1)
    assert_same_params(params_at(tmp_path / "slurm", 10), params_at(work, 10))  # bitwise


@pytest.mark.parametrize("how", ["mid-epoch", "last step of an epoch"])
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(
        how, reference, data_dir, tmp_path):
    work = tmp_path / "run"
    args = train_args(work, data_dir)
    env = {"mid-epoch": {"LENET_DIST_SIGTERM_AT": "5:1"},
           "last step of an epoch": {"LENET_DIST_SIGTERM_AT": "10:0"}}[how]
    job = LocalJob(args, 2, env=child_env(**env)).start()
    try:
        codes = job.wait(JOB_TIMEOUT, grace=60)
    finally:
        job.kill_all()
    out = [job.output(0), job.output(1)]
    assert codes == [143, 143], out
    stopped = [[ln for ln in o.splitlines() if ln.startswith("stopped by SIGTERM at step")]
               for o in out]
    assert len(stopped[0]) == len(stopped[1]) == 1, out
    assert stopped[0][0].split(";")[0] == stopped[1][0].split(";")[0]  # the same step
    assert "checkpoint saved" in stopped[0][0] and "Traceback" not in "".join(out)
    step = int(stopped[0][0].split(";")[0].rsplit(" ", 1)[1])
    assert step in Checkpoints(work, read_only=True).steps()
    if how == "last step of an epoch":
        assert step >= 10

    job, codes = run_job(args)  # the same command resumes
    assert codes == [0, 0], job.output(0)
    assert f"resuming from checkpoint at step {step}" in job.output(0)
    assert_same_params(params_at(work), reference[1].state.params, atol=1e-6)


def test_sigterm_without_checkpoints_still_stops_both_at_one_step(data_dir, tmp_path):
    job, codes = run_job(train_args(tmp_path / "run", data_dir, 2, "--no-checkpoint"),
                         env={"LENET_DIST_SIGTERM_AT": "4:1"})
    assert codes == [143, 143], job.output(0) + job.output(1)
    lines = [[ln for ln in job.output(i).splitlines() if ln.startswith("stopped by")]
             for i in range(2)]
    assert lines[0] == lines[1] and len(lines[0]) == 1, lines
    assert "checkpointing was off, nothing saved" in lines[0][0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("victim", [1, 0])
def test_kill9_of_one_process_ends_the_other_with_one_line(victim, data_dir, tmp_path):
    work = tmp_path / "run"
    args = train_args(work, data_dir, 20)
    job = LocalJob(args, 2, env=child_env()).start()
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while "/20  train loss" not in job.output(0):  # an epoch done: mid-training
            assert time.monotonic() < deadline and all(p.poll() is None for p in job.procs)
            time.sleep(0.05)
        job.signal(victim, signal.SIGKILL)
        killed = time.monotonic()
        survivor = job.procs[1 - victim]
        survivor.wait(timeout=HEARTBEAT + 30)
        waited = time.monotonic() - killed
        codes = job.wait(30, grace=30)
    finally:
        job.kill_all()
    out = job.output(1 - victim)
    print(f"survivor of a kill -9 of process {victim} exited {codes[1 - victim]} after "
          f"{waited:.1f} s (heartbeat timeout {HEARTBEAT} s)")
    assert codes[victim] == 137 and codes[1 - victim] != 0
    assert waited <= HEARTBEAT + 15
    errors = error_lines(out)
    assert len(errors) == 1, out
    assert (f"lost process {victim} of the job" in errors[0] if victim else
            "lost the job's coordinator, process 0" in errors[0]), errors
    assert "Check failure" not in out and "@ 0x" not in out and "Traceback" not in out


@pytest.mark.parametrize("case", ["per-process workdirs", "devices not a multiple",
                                  "different data"])
def test_misconfigured_job_fails_on_every_process_in_seconds(case, data_dir, tmp_path):
    (tmp_path / "other").mkdir()
    other = write_dataset(tmp_path / "other", n_train=640, n_test=100)
    base = train_args(tmp_path / "run", data_dir)

    def args_for(i):
        if case == "per-process workdirs":
            return train_args(tmp_path / f"run-{i}", data_dir)
        if case == "devices not a multiple":
            return [*base, "--devices", "5"]
        return train_args(tmp_path / "run", str(other) if i else data_dir)

    expected = {"per-process workdirs": "do not see process 0's --workdir",
                "devices not a multiple": "--devices 5 does not split over 2 processes",
                "different data": "processes loaded different data"}[case]
    started = time.monotonic()
    job, codes = run_job(base, args_for=args_for, timeout=120)
    took = time.monotonic() - started
    assert codes == [2, 2], (job.output(0), job.output(1))
    for i in range(2):
        errors = error_lines(job.output(i))
        assert len(errors) == 1 and expected in errors[0], job.output(i)
        assert "Traceback" not in job.output(i)
    assert took < 60
    if case == "per-process workdirs":
        assert not (tmp_path / "run-1" / "checkpoints").exists()
        assert not (tmp_path / "run-0" / "checkpoints").exists()


def test_modern_recipe_as_2x4_trains_like_1x8(data_dir, dataset, tmp_path):
    """BatchNorm's statistics span the global batch across processes too; augmentation
    draws the same crops on 2 processes as in one."""
    from lenet_dist.config import PRESETS
    from lenet_dist.restore import restore_checkpoint

    work = tmp_path / "mp"
    job, codes = run_job(["train", "--recipe", "modern", "--devices", "8", "--epochs", "1",
                          "--train-limit", "640", "--batch-size", "64", "--no-progress",
                          "--heartbeat-timeout", str(HEARTBEAT), "--data-dir", data_dir,
                          "--workdir", str(work), "--validation", "256"])
    assert codes == [0, 0], job.output(0) + job.output(1)
    one = train(PRESETS["modern"].replace(devices=8, epochs=1, train_limit=640, batch_size=64,
                                          validation=256,
                                          workdir=str(tmp_path / "one"), checkpoint=False),
                dataset=dataset, log=lambda _: None)
    variables = restore_checkpoint(str(work), Shardings(make_mesh(8))).variables
    assert set(variables) == {"params", "batch_stats"}
    assert_same_params(variables, one.state.variables, atol=1e-5)
    assert (work / "tb").is_dir()  # process 0 wrote the events
