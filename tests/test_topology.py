"""Resume across topologies: a checkpoint saved by one job layout resumes on another.

A job of 2 processes x 4 devices is stopped mid-epoch once (SIGTERM to process 1, so the
job saves the step it stops at and exits 143); copies of its workdir resume as 1 process
x 2 devices, 1 x 8 and 4 processes x 1 device, and each ends with the parameters and the
epochs of the uninterrupted 8-device `reference` run. A `kill -9` of one process in the
middle of a save resumes on 1 x 8 the same way. A device count that the checkpoint's
global batch does not divide over is refused in one line naming the counts that do,
and nothing in the workdir changes.

Jobs run under `LocalJob` (the `lenet-dist launch` launcher) with the helpers of
tests/test_multiprocess.py: a hard timeout each, every process killed by PID at the end.
"""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.errors import UserError
from lenet_dist.launch import LocalJob
from lenet_dist.mesh import check_batch
from lenet_dist.training import train
from tests.conftest import one_line_error, small
from tests.test_multiprocess import (JOB_TIMEOUT, child_env, error_lines, params_at, run_job,
                                     train_args)

# SIGTERM to process 1 after this step, the first of epoch 2 (10 steps an epoch). The job
# stops at the step where its processes agree, measured 1 to 5 steps later: mid-epoch 2.
STOP_AT = 11
KILL_AT = 15  # kill -9 of process 1 in this step's save: checkpoint 12 is complete
ATOL = 1e-6
# Per-epoch figures a resume must reproduce (the rest are timings or the layout).
FIGURES = ("epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
RESUMES = {"1x2": (1, 2), "1x8": (1, 8), "4x1": (4, 4)}  # name: (processes, --devices)


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def epochs(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def listing(root) -> dict:
    """Every path under `root` with its size and modification time (directories too:
    a file made and removed again changes its directory's)."""
    found = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(here, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


def run_until_stopped(args, processes=2, **kw) -> tuple[LocalJob, list[int]]:
    """A job expected to end unasked (stopped, killed, failed), killed by PID after."""
    job = LocalJob(args, processes, env=child_env(**kw.pop("env", {})), **kw).start()
    try:
        codes = job.wait(JOB_TIMEOUT, grace=60)
    finally:
        job.kill_all()
    assert not job.timed_out, [job.output(i)[-2000:] for i in range(processes)]
    return job, codes


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory):
    """The `small` run as 2 x 4, stopped by SIGTERM mid-epoch 2: (workdir, stop step)."""
    work = tmp_path_factory.mktemp("topology") / "stopped"
    job, codes = run_until_stopped(train_args(work, data_dir),
                                   env={"LENET_DIST_SIGTERM_AT": f"{STOP_AT}:1"})
    out = job.output(0)
    assert codes == [143, 143], out + job.output(1)
    lines = [ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM at step")]
    assert len(lines) == 1 and "checkpoint saved" in lines[0], out
    step = int(lines[0].split(";")[0].rsplit(" ", 1)[1])
    assert STOP_AT <= step < 20, out  # mid-epoch 2
    assert Checkpoints(work, read_only=True).steps()[-1] == step
    assert [e["epoch"] for e in epochs(work)] == [1]
    return work, step


def assert_like_reference(work, reference, params) -> float:
    """Same parameters (within ATOL) and the same epochs as the uninterrupted run; the
    largest parameter difference."""
    ref_work, ref = reference
    diff = max_diff(params, ref.state.params)
    assert diff <= ATOL, diff
    got, want = epochs(work), epochs(ref_work)
    assert [e["epoch"] for e in got] == [e["epoch"] for e in want] == [1, 2]
    for g, w in zip(got, want):
        for key in FIGURES:
            assert math.isclose(g[key], w[key], rel_tol=1e-5, abs_tol=1e-6), (key, g, w)
    return diff


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(RESUMES))
def test_a_2x4_job_stopped_mid_epoch_resumes_on_another_layout_like_the_uninterrupted_run(
        layout, stopped, reference, data_dir, dataset, tmp_path):
    work, step = stopped
    processes, devices = RESUMES[layout]
    resumed = shutil.copytree(work, tmp_path / layout)
    stopped_epoch_1 = (work / "metrics.jsonl").read_text()
    resuming = f"resuming from checkpoint at step {step} "
    if processes == 1:  # in this process: its 8 simulated devices, the first `devices`
        logs: list[str] = []
        result = train(small(resumed, devices=devices, save_every_steps=3,
                             keep_checkpoints=20), dataset=dataset, log=logs.append)
        assert any(ln.startswith(resuming) for ln in logs), logs
        params = result.state.params
    else:
        job, codes = run_job(train_args(resumed, data_dir, 2, "--devices", str(devices)),
                             processes=processes)
        out = job.output(0)
        assert codes == [0] * processes, out
        assert resuming in out and f"over {devices} cpu device(s)" in out, out
        assert not any(error_lines(job.output(i)) for i in range(processes))
        params = params_at(resumed)
    diff = assert_like_reference(resumed, reference, params)
    records = epochs(resumed)
    assert (resumed / "metrics.jsonl").read_text().startswith(stopped_epoch_1)  # kept as is
    assert (records[-1]["devices"], records[-1].get("processes", 1)) == (devices, processes)
    print(f"2x4 stopped at step {step}, resumed on {layout}: max |param diff| vs the "
          f"uninterrupted run {diff:.2e}")


@pytest.mark.slow
def test_kill9_of_one_process_mid_save_resumes_on_1x8_like_the_uninterrupted_run(
        reference, data_dir, dataset, tmp_path):
    work = tmp_path / "run"
    job, codes = run_until_stopped(
        train_args(work, data_dir),
        env_for=lambda i: {"LENET_DIST_KILL_AT": f"checkpoint:saving@{KILL_AT}"} if i else {})
    assert codes[1] == 137 and codes[0] != 0, job.output(0) + job.output(1)
    logs: list[str] = []
    result = train(small(work, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
                   log=logs.append)
    resumed = [ln for ln in logs if ln.startswith("resuming from checkpoint at step ")]
    assert len(resumed) == 1, logs
    step = int(resumed[0].split()[5])
    # The save in flight when process 1 died may or may not be complete; either way the
    # job resumes mid-epoch 2, from a save made by both processes.
    assert step in (12, KILL_AT), resumed
    diff = assert_like_reference(work, reference, result.state.params)
    print(f"2x4 killed (-9) in step {KILL_AT}'s save (exits {codes}; process 0: "
          f"{error_lines(job.output(0))}), resumed from step {step} on 1x8: max |param "
          f"diff| vs the uninterrupted run {diff:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("devices", [3, 6])
def test_a_device_count_the_batch_does_not_divide_over_is_refused_on_resume(
        devices, stopped, data_dir, capsys, tmp_path):
    work = shutil.copytree(stopped[0], tmp_path / "run")
    before = listing(work)
    line = one_line_error(capsys, train_args(work, data_dir, 2, "--devices", str(devices)))
    assert line == (f"error: --batch-size 64 does not divide over {devices} devices; use a "
                    f"multiple of {devices} (e.g. {64 - 64 % devices}, "
                    f"{64 - 64 % devices + devices}) or --devices 1, 2, 4, 8, 16, 32 or 64")
    assert listing(work) == before


@pytest.mark.slow
def test_a_job_refuses_6_devices_naming_the_counts_its_2_processes_can_share(
        stopped, data_dir, tmp_path):
    work = shutil.copytree(stopped[0], tmp_path / "run")
    before = listing(work)
    job, codes = run_until_stopped(train_args(work, data_dir, 2, "--devices", "6"))
    assert codes == [2, 2], job.output(0) + job.output(1)
    for i in range(2):
        errors = error_lines(job.output(i))
        assert errors == ["error: --batch-size 64 does not divide over 6 devices; use a "
                          "multiple of 6 (e.g. 60, 66) or --devices 2, 4, 8, 16, 32 or 64"], \
            job.output(i)
        assert "Traceback" not in job.output(i)
    assert listing(work) == before


@pytest.mark.parametrize("batch, devices, counts", [
    (64, 3, "or --devices 1, 2, 4, 8, 16, 32 or 64"),
    (100, 8, "or --devices 1, 2, 4, 5, 10, 20, 25, 50 or 100"),
    (3, 8, "(e.g. 8) or --devices 1 or 3"),
    # At most 12, the nearest to the count asked for, and never above 512 a process.
    (65536, 3, "or --devices 1, 2, 4, 8, 16, 32, 64, 128, 256 or 512"),
])
def test_the_refusal_names_the_device_counts_the_batch_divides_over(batch, devices, counts):
    with pytest.raises(UserError) as refused:
        check_batch(batch, devices)
    assert str(refused.value).endswith(counts)
