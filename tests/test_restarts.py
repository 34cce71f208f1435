"""`lenet-dist launch --max-restarts`: a job whose process is killed starts again and
resumes to the uninterrupted run's parameters; a usage error is never restarted; the
processes die with the launcher (SIGTERM: forwarded, not restarted; SIGKILL: the
parent-death signal).

The launcher runs as a user runs it (`python -m lenet_dist launch`), in its own
process group; every test kills that group and every process group the launcher
reported (`pids:` lines) when it ends. `explicit_run` (the uninterrupted job) is
shared with tests/test_mpi.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_idx

TIMEOUT = 300  # seconds for a whole launch (two attempts) on a busy 2-core machine
# The tiny run every job here (and in test_mpi) trains: 2 processes x 2 devices, 8 steps
# an epoch, 2 epochs, a checkpoint every 3 steps (3, 6, 8, 9, 12, 15, 16).
TRAIN = ("train", "--devices", "4", "--train-limit", "1024", "--batch-size", "128",
         "--epochs", "2", "--save-every-steps", "3", "--keep-checkpoints", "20",
         "--no-progress", "--no-tensorboard", "--heartbeat-timeout", "10")
_SHARED: dict = {}  # session-wide results of the helpers below


def train_args(workdir, data_dir) -> list[str]:
    return [*TRAIN, "--data-dir", str(data_dir), "--workdir", str(workdir)]


def small_data_dir(dataset, tmp_path_factory) -> Path:
    """The first 1,024 training and 256 test images as IDX files: evaluation over the
    full 10,000 test images would be most of these runs' time."""
    if "data" not in _SHARED:
        directory = tmp_path_factory.mktemp("small-idx")
        for prefix, split, n in (("train", dataset.train, 1024), ("t10k", dataset.test, 256)):
            write_idx(directory / f"{prefix}-images-idx3-ubyte", split.images[:n, ..., 0])
            write_idx(directory / f"{prefix}-labels-idx1-ubyte", split.labels[:n])
        _SHARED["data"] = directory
    return _SHARED["data"]


def child_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1",
                **extra)


def explicit_run(dataset, tmp_path_factory) -> Path:
    """The uninterrupted job with explicit job flags (`lenet-dist launch -n 2`), once."""
    if "explicit" not in _SHARED:
        work = tmp_path_factory.mktemp("explicit") / "run"
        with Launcher(["-n", "2", "--", *train_args(work, small_data_dir(
                dataset, tmp_path_factory))]) as launcher:
            code = launcher.wait()
        assert code == 0, launcher.text()
        _SHARED["explicit"] = work
    return _SHARED["explicit"]


def final_params(workdir):
    """The latest checkpoint's variables, restored on 4 of this session's devices."""
    from lenet_dist.mesh import Shardings, make_mesh
    from lenet_dist.restore import restore_checkpoint

    restored = restore_checkpoint(str(workdir), Shardings(make_mesh(4)))
    return restored.step, restored.variables


def max_param_diff(a, b) -> float:
    import jax

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def alive(pid: int) -> bool:
    """Running (a zombie that nobody has reaped yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class Launcher:
    """`python -m lenet_dist launch ARGS` in its own process group; its output is read
    by a thread. On exit, the launcher's group and each process group it reported are
    SIGKILLed."""

    def __init__(self, args, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "lenet_dist", "launch", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True,
                                     env=child_env(**(env or {})),
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def pids(self) -> list[list[int]]:
        """Each attempt's process PIDs, from the launcher's `pids: 0=..., 1=...` lines."""
        return [[int(p.split("=")[1]) for p in ln[len("pids: "):].split(", ")]
                for ln in list(self.lines) if ln.startswith("pids: ")]

    def until(self, ready, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"launch ended before {what}: {self.text()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {self.text()}"
            time.sleep(0.02)

    def wait(self, timeout: float = TIMEOUT) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc) -> None:
        for pgid in [self.proc.pid, *(pid for attempt in self.pids() for pid in attempt)]:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(timeout=30)


def saved_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_a_killed_process_restarts_the_job_which_ends_like_an_uninterrupted_run(
        dataset, tmp_path_factory, tmp_path):
    reference = explicit_run(dataset, tmp_path_factory)
    work = tmp_path / "run"
    args = ["-n", "2", "--max-restarts", "2", "--timeout", str(TIMEOUT), "--",
            *train_args(work, small_data_dir(dataset, tmp_path_factory))]
    with Launcher(args) as launcher:
        launcher.until(lambda: launcher.pids() and saved_steps(work), "a first checkpoint")
        victim = launcher.pids()[0][1]
        # Killed mid-run, not after: the job has not saved its last step (16) and the
        # victim still runs (else the restart below would be missing, not untested).
        assert alive(victim) and 16 not in saved_steps(work), (saved_steps(work), launcher.text())
        os.kill(victim, signal.SIGKILL)  # mid-epoch 1: ~13 of 16 steps and 6 saves remain
        code = launcher.wait()
    out = launcher.text()
    print(out)
    assert code == 0, out
    restarts = [ln for ln in launcher.lines if "restarting the job" in ln]
    assert restarts == ["launch: process 1 was killed by SIGKILL; restarting the job "
                        "(1 of 2)"], out
    ports = re.findall(r"^launching 2 processes on 127\.0\.0\.1:(\d+)", out, re.M)
    assert len(ports) == 2 and ports[0] != ports[1], out  # a fresh coordinator port
    assert re.search(r"^\[0\] resuming from checkpoint at step \d+", out, re.M), out
    assert "Traceback" not in out
    assert not any(alive(pid) for attempt in launcher.pids() for pid in attempt)
    step, params = final_params(work)
    ref_step, ref_params = final_params(reference)
    diff = max_param_diff(params, ref_params)
    print(f"restarted job vs uninterrupted: step {step} vs {ref_step}, max |diff| {diff:.1e}")
    assert step == ref_step == 16 and diff <= 1e-6


def test_a_usage_error_is_not_restarted(tmp_path):
    with Launcher(["-n", "2", "--max-restarts", "2", "--", "train", "--epochs", "0",
                   "--workdir", str(tmp_path / "run")]) as launcher:
        code = launcher.wait(120)
    out = launcher.text()
    assert code == 2, out
    assert out.count("launching 2 processes") == 1, out
    assert re.search(r"^launch: process [01] exited with status 2; not restarting: a usage "
                     r"error \(exit 2\) fails the same way again$", out, re.M), out


def test_sigterm_to_the_launcher_stops_the_job_without_a_restart(tmp_path):
    """Forwarded to every process, which stop (here while still starting: at once,
    one line each, 143); a job the launcher was told to stop is not restarted."""
    with Launcher(["-n", "2", "--max-restarts", "2", "--", "train", "--devices", "2",
                   "--workdir", str(tmp_path / "run")]) as launcher:
        launcher.until(launcher.pids, "the processes' PIDs", timeout=60)
        launcher.proc.send_signal(signal.SIGTERM)
        code = launcher.wait(120)
    out = launcher.text()
    assert code == 143, out
    assert out.count("launching 2 processes") == 1, out
    assert "not restarting: the launcher was stopped by SIGTERM" in out, out
    assert not any(alive(pid) for pid in launcher.pids()[0])


def test_the_processes_die_with_a_killed_launcher(tmp_path):
    """kill -9 runs none of the launcher's code: the kernel's parent-death signal
    (PR_SET_PDEATHSIG, set in each child) ends them."""
    with Launcher(["-n", "2", "--", "train", "--devices", "2",
                   "--workdir", str(tmp_path / "run")]) as launcher:
        launcher.until(launcher.pids, "the processes' PIDs", timeout=60)
        pids = launcher.pids()[0]
        assert all(alive(pid) for pid in pids)
        launcher.proc.send_signal(signal.SIGKILL)
        launcher.wait(30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [pid for pid in pids if alive(pid)]
    assert not survivors, f"still running after their launcher's kill -9: {survivors}"
