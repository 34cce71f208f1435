"""The progress watchdog (`lenet_dist.watchdog`) and the bounded waits of a job.

The unit tests run the watch in a bare subprocess (no JAX): it must end a process
whose main thread is blocked, with one line and exit 42. The job test stalls process
1 of a real 2-process job (`LENET_DIST_STALL_AT=5:1`, its heartbeats go on) under
`lenet-dist launch --max-restarts 1`: both processes name process 1 and step 5 within
the stall timeout plus 10 s, the launcher restarts the job once, and it ends with the
uninterrupted job's parameters.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from lenet_dist import faults, watchdog
from lenet_dist.errors import UserError
from tests.test_restarts import (Launcher, explicit_run, final_params, max_param_diff,
                                 saved_steps, small_data_dir, train_args)

STALL = 20  # seconds of --stall-timeout in the job test


def test_a_stalled_stall_names_the_processes_behind():
    line = watchdog.describe_stall({0: [9, "training", 6], 1: [5, "training", 5]}, 10.2, 2)
    assert line == ("no progress for 10 s (--stall-timeout): process 1 is behind, at step 5 "
                    "(training); process 0 waits at step 6 (training); exiting 42 so that "
                    "a restart resumes from the last checkpoint")
    # Equal steps: the earlier phase is behind; a process never heard from is behind all.
    line = watchdog.describe_stall({0: [3, "saving", 6], 1: [4, "training", 6]}, 30, 3)
    assert "process 2 is behind, at step 0 (starting)" in line, line
    line = watchdog.describe_stall({0: [3, "saving", 6], 1: [4, "training", 6]}, 30, 2)
    assert "process 1 is behind, at step 6 (training); process 0 waits at step 6 (saving)" \
        in line, line
    same = watchdog.describe_stall({0: [1, "evaluating", 8], 1: [2, "evaluating", 8]}, 5, 2)
    assert "every process is stuck at step 8 (evaluating)" in same, same
    assert "this process is stuck at step 3 (saving)" in watchdog.describe_stall(
        {0: [1, "saving", 3]}, 5, 1)


def test_the_automatic_timeout_is_ten_times_the_slowest_phase_with_a_floor():
    watch = watchdog.Watch(timeout=None)
    assert watch.effective_timeout() == watchdog.FLOOR_S
    watch.slowest = 45.0
    assert watch.effective_timeout() == 450.0
    assert watchdog.Watch(timeout=7).effective_timeout() == 7


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", None), ("0", 0.0),
                                             ("12.5", 12.5)])
def test_stall_timeout_values(value, expected):
    assert watchdog.parse_timeout(value) == expected


@pytest.mark.parametrize("value", ["-1", "ten", "1e9", "nan"])
def test_a_bad_stall_timeout_is_one_line(value):
    with pytest.raises(UserError, match=r"^--stall-timeout .*: expected seconds in 0\.\.86400"):
        watchdog.parse_timeout(value)


@pytest.mark.parametrize("value, message", [
    ("5:x", "LENET_DIST_STALL_AT='5:x': expected STEP or STEP:PROCESS"),
    ("5:2", "LENET_DIST_STALL_AT='5:2': the job has no process 2 (it has 2: 0..1)"),
])
def test_a_stall_drill_that_could_never_fire_is_refused(monkeypatch, value, message):
    monkeypatch.setenv(watchdog.STALL_AT_ENV, value)
    with pytest.raises(UserError, match=re.escape(message)):
        watchdog.stall_step(0, 2)


def test_a_stall_drill_is_for_its_process(monkeypatch):
    monkeypatch.setenv(watchdog.STALL_AT_ENV, "5:1")
    assert watchdog.stall_step(0, 2) is None and watchdog.stall_step(1, 2) == 5
    monkeypatch.setenv(watchdog.STALL_AT_ENV, "7")
    assert faults.step_at(watchdog.STALL_AT_ENV, 0, 1) == 7


BLOCKED = """
import threading, time
from lenet_dist import watchdog
watchdog.start({timeout}, poll=0.2)
watchdog.mark("loading data")
time.sleep(0.5)
watchdog.mark("training", 4)
{then}
print("unreachable", flush=True)
"""


def run_blocked(timeout: float, then: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", BLOCKED.format(timeout=timeout, then=then)],
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - started


def test_a_blocked_main_thread_exits_42_with_one_line():
    done, took = run_blocked(1.5, "threading.Event().wait()")
    assert done.returncode == 42, done
    assert done.stderr.splitlines() == [
        "error: no progress for 2 s (--stall-timeout): this process is stuck at step 4 "
        "(training); exiting 42 so that a restart resumes from the last checkpoint"], done
    assert done.stdout == "" and took < 15, (done, took)


def test_marks_keep_the_watch_quiet_and_zero_turns_it_off():
    steady = "for i in range(5, 25):\n    watchdog.mark('training', i); time.sleep(0.2)"
    done, _ = run_blocked(1.5, steady)
    assert (done.returncode, done.stderr) == (0, ""), done
    done, took = run_blocked(0, "time.sleep(3)")
    assert (done.returncode, done.stderr) == (0, "") and took >= 3, done


def test_start_replaces_the_running_watch():
    first = watchdog.start(0)
    second = watchdog.start(0)
    assert watchdog._WATCH is second is not first
    watchdog.stop()


@pytest.mark.slow
def test_a_stalled_process_stops_the_job_which_restarts_and_ends_like_an_uninterrupted_run(
        dataset, tmp_path_factory, tmp_path):
    reference = explicit_run(dataset, tmp_path_factory)
    work, once = tmp_path / "run", tmp_path / "once"
    once.mkdir()
    args = ["-n", "2", "--max-restarts", "1", "--", *train_args(
        work, small_data_dir(dataset, tmp_path_factory)), "--stall-timeout", str(STALL)]
    env = {watchdog.STALL_AT_ENV: "5:1", faults.ONCE_ENV: str(once)}
    with Launcher(args, env) as launcher:
        # Step 3's checkpoint is written just before the stall at step 5.
        launcher.until(lambda: 3 in saved_steps(work), "the checkpoint of step 3")
        stalled = time.monotonic()
        launcher.until(lambda: launcher.text().count("error: no progress") >= 2,
                       "both processes' stall lines")
        took = time.monotonic() - stalled
        code = launcher.wait()
    out = launcher.text()
    print(out)
    stops = [ln for ln in launcher.lines if "error:" in ln]
    assert len(stops) == 2 and {ln[:4] for ln in stops} == {"[0] ", "[1] "}, out
    for line in stops:
        assert f"no progress for {STALL} s (--stall-timeout): process 1 is behind, at step 5 " \
               "(training); process 0 waits at step " in line, line
    assert took <= STALL + 10, f"stopped {took:.1f} s after the stall"
    assert "launch: exit statuses 0: 42, 1: 42" in out, out
    assert re.search(r"^launch: process [01] exited with status 42; restarting the job "
                     r"\(1 of 1\)$", out, re.M), out
    assert code == 0 and "Traceback" not in out, out
    step, params = final_params(work)
    ref_step, ref_params = final_params(reference)
    diff = max_param_diff(params, ref_params)
    print(f"stalled and restarted vs uninterrupted: step {step}, max |diff| {diff:.1e}, "
          f"stopped {took:.1f} s after step 3's checkpoint")
    assert step == ref_step == 16 and diff <= 1e-6
