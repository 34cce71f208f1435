"""No command leaves a child process or a temporary directory behind, whether it is
stopped by SIGTERM or killed by SIGKILL: each way of starting children (a benchmark's
single-process run, a benchmark's job through LocalJob, `launch`) is started for real,
its process tree and its temporary directories are listed while it runs, and after
the signal none of them may remain."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lenet_dist import tempdirs
from tests.conftest import REAL_DIR, real_data_available

# The process-tree readers of scripts/kill9.py's bench kind, which does this at random.
_spec = importlib.util.spec_from_file_location(
    "kill9", Path(__file__).resolve().parents[1] / "scripts" / "kill9.py")
kill9 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill9)
descendants, alive = kill9.descendants, kill9.alive

TINY = ("--epochs", "2", "--rounds", "1", "--batch-size", "128")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def trainers(pid: int) -> list[int]:
    return [p for p in descendants(pid) if " train " in cmdline(p)]


@pytest.mark.slow
@pytest.mark.skipif(not real_data_available(), reason="needs the real data")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
@pytest.mark.parametrize("argv, trainers_expected", [
    (("bench", "--devices", "1", *TINY), 1),
    (("bench", "--devices", "2", "--job", "2x1", *TINY), 2),
    (("launch", "-n", "2", "--", "train", "--devices", "2", "--epochs", "50",
      "--train-limit", "512", "--no-checkpoint", "--no-tensorboard", "--no-progress"), 2),
], ids=["bench-single", "bench-job", "launch"])
def test_a_stopped_command_leaves_no_process_and_no_temporary_directory(
        argv, trainers_expected, signum, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join(sys.path),
               LENET_DIST_DATA_DIR=REAL_DIR)
    args = [*argv]
    if argv[0] == "bench" or "--workdir" not in argv:
        args += ["--data-dir", REAL_DIR]
    if argv[0] == "launch":
        args += ["--workdir", str(tmp_path / "run")]
    proc = subprocess.Popen([sys.executable, "-m", "lenet_dist", *args], env=env,
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(trainers(proc.pid)) < trainers_expected:  # the job's processes, up
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the children never started"
            time.sleep(0.2)
        seen = descendants(proc.pid)
        made = sorted(p.name for p in tmp.iterdir())
        if argv[0] == "bench":
            assert any(name.startswith("lenet-dist-bench-") for name in made), made
        # Signalled while it runs (a command that had ended would pass the rest
        # without having been stopped): its exit status must be the signal's.
        assert proc.poll() is None, "the command ended before the signal"
        proc.send_signal(signum)
        proc.wait(timeout=60)
        assert proc.returncode == (143 if signum == signal.SIGTERM else -signal.SIGKILL), \
            proc.returncode
        deadline = time.monotonic() + 15  # the reaper's grace, on a busy machine
        while (any(alive(p) for p in seen) or any(tmp.iterdir())) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {p: cmdline(p)[:100] for p in seen if alive(p)}
        assert left == {}, left
        assert sorted(p.name for p in tmp.iterdir()) == []
        if signum == signal.SIGTERM:
            # one line at the end: the command's own, or launch's summary of its job
            out = proc.stdout.read().decode().strip().splitlines()
            assert "SIGTERM" in out[-1] or out[-1].endswith("1: 143"), out[-3:]
    finally:
        for p in [proc.pid, *seen]:
            try:
                os.killpg(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)


def test_the_reaper_removes_a_directory_its_process_left(tmp_path):
    """os._exit skips every clean-up of the process itself."""
    code = ("import os, sys; sys.path[:0] = sys.argv[1:2]; from lenet_dist import tempdirs; "
            "p = tempdirs.mkdtemp('x-'); open(os.path.join(p, 'f'), 'w').write('1'); "
            "print(p, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(Path(tempdirs.__file__).parents[1])],
                         env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    assert Path(out).parent == tmp_path
    deadline = time.monotonic() + 10
    while Path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(out).exists()


def test_a_directory_removed_normally_is_left_to_its_owner(tmp_path, monkeypatch):
    monkeypatch.setattr(tempdirs.tempfile, "tempdir", str(tmp_path))
    with tempdirs.temporary_directory("y-") as path:
        assert Path(path).is_dir()
    assert not Path(path).exists()
