"""A real SIGTERM, from outside, to both processes of a 2 x 4 job at every phase of a
run: start-up, before the first step, before the first step of a resumed run (each
several times), and in the last epoch. Every signal stops the job: at once with one
line before anything is saved, or at one step, the same on both processes, with a
checkpoint of that step; and the resumed job ends where an uninterrupted run ends.

The signal is sent when a process reaches the state that marks the phase: a line it
prints, or, at start-up where it prints nothing, a state read from /proc (its SIGTERM
handler installed, JAX's library loaded, the coordinator listening); in the last
epoch the processes signal themselves at a step (LENET_DIST_SIGTERM_AT). So the phase
is the same on a fast machine and a slow one (no sleeps, no skips).
"""

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.launch import LocalJob
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.preemption import SIGTERM_AT_ENV
from lenet_dist.state import make_optimizer
from lenet_dist.step import build_steps
from tests.conftest import assert_same_params, small

pytestmark = pytest.mark.slow

HEARTBEAT = 5
TIMEOUT = 180
STOPPED = re.compile(r"stopped by SIGTERM at step (\d+); checkpoint saved")
EARLY = "error: stopped by SIGTERM"


def train_args(workdir, data_dir):
    """The shared `small` run (conftest): 2 epochs of 10 steps, saves every 3 steps."""
    return ["train", "--devices", "8", "--epochs", "2", "--train-limit", "640",
            "--batch-size", "64", "--lr", "0.5", "--save-every-steps", "3",
            "--keep-checkpoints", "20", "--no-progress", "--heartbeat-timeout",
            str(HEARTBEAT), "--data-dir", data_dir, "--workdir", str(workdir)]


def proc_file(pid: int, name: str) -> str:
    """/proc/PID/NAME, or "" once the process is gone (`run_job` then says so)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return ""


def started(pid: int) -> bool:
    """The process runs `python -m lenet_dist`: until its exec, a forked child shows
    the test's own handlers and libraries (this process has JAX loaded)."""
    return proc_file(pid, "cmdline").split("\0")[1:3] == ["-m", "lenet_dist"]


def handles_sigterm(pid: int) -> bool:
    """The process catches SIGTERM: `exit_on_sigterm` has run (SigCgt, bit 15)."""
    if not started(pid):  # first: the exec resets the handlers
        return False
    caught = [ln.split()[1] for ln in proc_file(pid, "status").splitlines()
              if ln.startswith("SigCgt:")]
    return bool(caught) and bool(int(caught[0], 16) >> (signal.SIGTERM - 1) & 1)


def jax_loaded(pid: int) -> bool:
    """JAX's compiled library is mapped: the process is importing or has imported JAX."""
    return started(pid) and "/jaxlib/" in proc_file(pid, "maps")


def listening(port: int) -> bool:
    """A socket listens on `port` (the job's coordinator, which process 0 starts when
    it joins): /proc/net/tcp{,6}, state 0A."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


LOST_COORDINATOR = "error: lost the job's coordinator, process 0"

START_UP = {  # phase -> has the job reached it? (both processes, read from outside)
    "SIGTERM handler installed": lambda job: all(handles_sigterm(p.pid) for p in job.procs),
    "JAX loaded": lambda job: all(jax_loaded(p.pid) for p in job.procs),
    "coordinator listening": lambda job: listening(job.port) and all(
        jax_loaded(p.pid) for p in job.procs),
}


def run_job(args, *, when=None, env=None):
    """Run the 2-process job; SIGTERM both processes by PID once process 0 prints a
    line containing `when` (a string), or once `when(job)` is true. Exit codes, outputs."""
    job = LocalJob(args, 2, env={"PYTHONPATH": os.pathsep.join(sys.path), **(env or {})})
    job.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        if when is not None:
            reached = when if callable(when) else lambda job: when in job.output(0)
            while not reached(job):
                assert time.monotonic() < deadline, job.output(0)
                assert all(p.poll() is None for p in job.procs), \
                    f"the job ended before {when!r}: {job.output(0)[-2000:]}"
                time.sleep(0.01)
            assert all(p.poll() is None for p in job.procs), job.output(0)  # signalled alive
            for i in range(2):
                job.signal(i, signal.SIGTERM)
        codes = job.wait(max(1.0, deadline - time.monotonic()), grace=60)
    finally:
        job.kill_all()
    out = [job.output(0), job.output(1)]
    assert not job.timed_out, out
    assert "Traceback" not in "".join(out), out
    return codes, out


def stop_step(codes, out):
    """The step both processes stopped at (after the same step, with a checkpoint)."""
    assert codes == [143, 143], out
    steps = [[int(m.group(1)) for m in STOPPED.finditer(o)] for o in out]
    assert len(steps[0]) == 1 and steps[0] == steps[1], out
    return steps[0][0]


def params(workdir, step=None):
    ckpts = Checkpoints(workdir, read_only=True)
    abstract = build_steps(make_optimizer(small(workdir)), Shardings(make_mesh(8))).abstract()
    tree, _ = ckpts.restore(step if step is not None else ckpts.steps()[-1], abstract)
    return tree["state"].params


@pytest.mark.parametrize("phase", list(START_UP))
def test_sigterm_at_start_up_exits_143_with_one_line(phase, data_dir, tmp_path):
    """Before the job has anything to save: 143 at once, one line, nothing written
    that a resume would trip on; or, if the signal lands after the join, one step
    and its checkpoint."""
    codes, out = run_job(train_args(tmp_path / "run", data_dir), when=START_UP[phase])
    if codes == [143, 134] and LOST_COORDINATOR in out[1]:
        # The signals go to process 0 first: on a busy machine it may be gone (and its
        # coordination service with it) before process 1 handles its own SIGTERM. Process
        # 1 then stops on the lost coordinator instead, also with one line.
        assert out[1].count("error: ") == 1, out[1]
        out, codes = out[:1], codes[:1]
    assert set(codes) == {143}, out
    for o in out:
        lines = [ln for ln in o.splitlines() if ln.startswith(EARLY) or STOPPED.search(ln)]
        assert len(lines) == 1, o
    if any(STOPPED.search(o) for o in out):
        assert stop_step(codes, out) == 1


def test_sigterm_before_the_first_step_stops_at_step_1(data_dir, tmp_path):
    work = tmp_path / "run"
    codes, out = run_job(train_args(work, data_dir), when="training LeNet-5 on")
    assert stop_step(codes, out) == 1
    assert Checkpoints(work, read_only=True).steps()[-1] == 1


def test_sigterm_on_resumed_runs_and_in_the_last_epoch(reference, data_dir, tmp_path):
    """The case JAX's sync point used to miss: a resumed run signalled before its first
    step trained on to the end. Each resume is signalled as it starts and must stop
    after its first step; the first resumes land in epoch 1, the later ones in the
    last epoch. The job then finishes equal to the uninterrupted run."""
    work = tmp_path / "run"
    args = train_args(work, data_dir)
    codes, out = run_job(args, when="training LeNet-5 on")
    step = stop_step(codes, out)
    resumed = [step]
    while step < 13:  # resumes at 1, 2: epoch 1 (steps 1-10), then in epoch 2
        if step == 3:  # skip ahead into the last epoch: both signal themselves at 11
            codes, out = run_job(args, env={SIGTERM_AT_ENV: "11"})
            step = stop_step(codes, out)
            assert 10 < step < 20, out  # a stop in the last epoch
        else:  # after the checks before the first step: it trains that step, saves it
            codes, out = run_job(args, when="training LeNet-5 on")
            assert f"resuming from checkpoint at step {step}" in out[0]
            assert stop_step(codes, out) == step + 1, out
            step += 1
        assert Checkpoints(work, read_only=True).steps()[-1] == step
        resumed.append(step)
    codes, out = run_job(args)
    assert codes == [0, 0], out
    assert f"resuming from checkpoint at step {step}" in out[0]
    assert_same_params(params(work), reference[1].state.params, atol=1e-6)


def test_sigterm_before_a_resumed_job_trains_stops_it_with_nothing_to_save(
        reference, data_dir, tmp_path):
    """A notice while the job loads its data or restores (LENET_DIST_SIGTERM_AT=0:1:
    process 1 alone, once its data is loaded) is asked for after the data and after the
    restore, not only at the first step: the job stops before training, with one line
    on each process, 143, and the checkpoints as they were. JAX's notifier polls for
    the signal once a second, so a restore and probe save shorter than that may still
    see the notice only at the first step: then both stop there, with its checkpoint."""
    work = tmp_path / "run"
    args = train_args(work, data_dir)
    step = stop_step(*run_job(args, env={SIGTERM_AT_ENV: "4"}))
    before = Checkpoints(work, read_only=True).steps()
    codes, out = run_job(args, env={SIGTERM_AT_ENV: "0:1"})
    assert codes == [143, 143], out
    lines = [[ln for ln in o.splitlines() if ln.startswith(("error:", "stopped by"))]
             for o in out]
    assert len(lines[0]) == 1 and lines[0] == lines[1], out
    early = re.fullmatch(rf"stopped by SIGTERM before (training|step {step + 1}); "
                         "nothing newer than the last checkpoint to save; run the same "
                         "command to resume", lines[0][0])
    print(f"resumed at step {step}: {lines[0][0]}")
    if early:
        assert Checkpoints(work, read_only=True).steps() == before
    else:
        assert stop_step(codes, out) == step + 1
        assert Checkpoints(work, read_only=True).steps() == [*before, step + 1]


def test_sigterm_stops_a_job_command_that_does_not_train(reference, tmp_path):
    """Joining installs JAX's notifier, which only training asks; `export` in a job
    takes SIGTERM back. Before, the signal was swallowed and the export ran on to the
    end (then failed JAX's shutdown barrier). Signalled once process 0 has staged its
    export, the job stops: process 0 with one line and 143, nothing published; process
    1 when it loses its coordinator."""
    out = tmp_path / "export"
    job = LocalJob(["export", "--workdir", str(reference[0]), "--out", str(out)], 2,
                   env={"PYTHONPATH": os.pathsep.join(sys.path)})
    job.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list(tmp_path.glob(".export.staging-*")):
            assert time.monotonic() < deadline and job.procs[0].poll() is None, job.output(0)
            time.sleep(0.01)
        for i in range(2):
            job.signal(i, signal.SIGTERM)
        codes = job.wait(TIMEOUT, grace=60)
    finally:
        job.kill_all()
    assert codes[0] == 143 and codes[1] != 0, [job.output(0), job.output(1)]
    assert job.output(0).splitlines()[-1] == "error: stopped by SIGTERM", job.output(0)
    assert not out.exists()


def test_sigterm_in_one_process_before_training_exits_at_once(data_dir, tmp_path):
    """One process, signalled as it starts restoring or initialising (its phase log,
    LENET_DIST_PHASE_LOG): inside JAX's compilation of the state and the probe save,
    where Python runs no handler for seconds. The wakeup thread exits at once: one
    line, 143, no checkpoint."""
    import subprocess

    work, log = tmp_path / "run", tmp_path / "phases"
    args = [a for a in train_args(work, data_dir) if a not in ("--heartbeat-timeout",
                                                               str(HEARTBEAT))]
    proc = subprocess.Popen([sys.executable, "-m", "lenet_dist", *args, "--devices", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
                                 "LENET_DIST_PHASE_LOG": str(log)})
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (log.exists() and " restoring " in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.005)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"exited {took:.2f} s after the signal")
    assert proc.returncode == 143 and out.splitlines()[-1] == EARLY, out
    assert "Traceback" not in out and took < 1.0, (took, out)
    assert not (work / "checkpoints").exists() or not Checkpoints(
        work, read_only=True).steps()
