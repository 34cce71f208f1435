"""A job whose processes disagree: started with different settings, two with one id, a
coordinator port already taken. Each must fail on every process within seconds, with
one line that names the cause, instead of training an inconsistent model, waiting out
--join-timeout, or crashing in a collective. Real jobs of real processes on loopback."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lenet_dist.joining import MAX_PROCESSES, JobSpec
from lenet_dist.rendezvous import JoinWatch, Rendezvous, disagreement
from lenet_dist.errors import UserError
from lenet_dist.launch import free_port

DATA = "/usr/share/datasets/fashion-mnist"
TRAIN = ("train", "--no-checkpoint", "--no-tensorboard", "--no-progress", "--train-limit",
         "256", "--epochs", "1", "--batch-size", "128", "--devices", "2", "--data-dir", DATA)
SOON = 10.0  # seconds from the later start to both exits, on a busy 2-core machine
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no {DATA}")


def start(args, i, port, count=2, workdir=None):
    """Process i of a job at 127.0.0.1:port, in its own process group, output to files."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1",
               LENET_DIST_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               LENET_DIST_NUM_PROCESSES=str(count), LENET_DIST_PROCESS_ID=str(i))
    extra = ["--workdir", str(workdir)] if workdir is not None else []
    return subprocess.Popen([sys.executable, "-m", "lenet_dist", *args, *extra], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run_job(per_process, timeout=60.0):
    """Start [(args, process_id, count), ...] at once; (exit codes, stderrs, seconds from
    the last start to the last exit). Every process group is killed at the end."""
    port = free_port()
    procs, outs = [], []
    try:
        for args, i, count in per_process:
            procs.append(start(args, i, port, count))
        started = time.monotonic()
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout)[1])
        took = time.monotonic() - started
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    return [p.returncode for p in procs], outs, took


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


# (setting named in the line, process 0's extra args, process 1's, (count 0, count 1))
MISMATCHES = [
    ("seed", ("--seed", "0"), ("--seed", "1"), (2, 2)),
    ("learning_rate", ("--lr", "0.1"), ("--lr", "0.05"), (2, 2)),
    ("epochs", (), ("--epochs", "2"), (2, 2)),
    ("batch_size", (), ("--batch-size", "64"), (2, 2)),
    ("network", ("--recipe", "d2l"), ("--recipe", "modern"), (2, 2)),
    ("devices", (), ("--devices", "4"), (2, 2)),
    ("num_processes", (), (), (3, 2)),  # --devices 2 does not split over 3: still named
    ("num_processes", (), (), (2, 3)),
]


@needs_data
def test_processes_started_with_different_settings_all_fail_at_once(tmp_path):
    """One job at a time: its two start-ups alone on the cores (two jobs at once took
    up to 10 s on a busy 2-core machine; one alone takes 2-4 s)."""
    def one(case):
        n, (name, a0, a1, (c0, c1)) = case
        work = tmp_path / str(n)
        work.mkdir()
        args = [[*TRAIN, *a, "--workdir", str(work / "run")] for a in (a0, a1)]
        return name, run_job([(args[0], 0, c0), (args[1], 1, c1)])

    results = [one(case) for case in enumerate(MISMATCHES)]
    for name, (codes, errs, took) in results:
        assert codes == [2, 2], (name, codes, errs)
        for err in errs:
            lines = errors(err)
            assert len(lines) == 1, (name, err)
            assert lines[0].startswith("error: the job's processes disagree on ")
            assert f"{name} (process 0: " in lines[0], (name, lines)
            assert lines[0].endswith("; start every process with the same settings")
        assert errs[0] == errs[1], name  # the same line on both
        assert took < SOON, (name, took)


@needs_data
@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_processes_that_would_restore_different_steps_fail_at_once(
        command, trained, tmp_path):
    """Before any restore (and before export imports TensorFlow)."""
    steps = sorted(int(p.name) for p in (Path(trained.config.workdir) / "checkpoints")
                   .iterdir() if p.name.isdigit())
    base = [command, "--workdir", trained.config.workdir, "--data-dir", DATA]
    if command == "export":
        base += ["--out", str(tmp_path / "model")]
    codes, errs, took = run_job([([*base, "--step", str(steps[0])], 0, 2),
                                 ([*base, "--step", str(steps[-1])], 1, 2)])
    assert codes == [2, 2], errs
    expected = (f"error: the job's processes disagree on step (process 0: {steps[0]}, "
                f"process 1: {steps[-1]}); start every process with the same settings")
    assert [errors(err) for err in errs] == [[expected], [expected]], errs
    assert took < SOON, took
    assert not (tmp_path / "model").exists()


def test_the_line_names_every_difference_with_its_values():
    line = disagreement({0: {"seed": 0, "learning_rate": 0.1, "devices": 2},
                         1: {"seed": 1, "learning_rate": 0.2, "devices": 2},
                         2: {"seed": 0, "learning_rate": 0.1, "devices": None}})
    assert line == ("the job's processes disagree on devices (process 0: 2, process 2: "
                    "unset), learning_rate (process 0: 0.1, process 1: 0.2), seed (process 0: "
                    "0, process 1: 1); start every process with the same settings")
    assert disagreement({0: {"a": 1}, 3: {"a": 1}}) is None


def test_job_options_are_bounded_before_joining():
    assert JobSpec("off", "[::1]:8476", 2, 1).validate().enabled
    assert JobSpec("off", "host-0.example_net:1", MAX_PROCESSES, 0).validate().enabled
    for bad, message in [
        (JobSpec("off", "127.0.0.1:99999", 2, 0),
         "--coordinator-address 127.0.0.1:99999: port 99999 is not in 1..65535"),
        (JobSpec("off", "127.0.0.1:0", 2, 0), "port 0 is not in 1..65535"),
        (JobSpec("off", "a b:1", 2, 0), "expected HOST:PORT"),
        (JobSpec("off", "h:1:2", 2, 0), "expected HOST:PORT"),
        (JobSpec("off", "h:-1", 2, 0), "expected HOST:PORT"),
        (JobSpec("off", "h:1", 2**31 - 1, 0),
         "--num-processes 2147483647 must be in 1..1,048,576 (the processes of one job)"),
        (JobSpec("off", "h:1", 0, 0), "--num-processes 0 must be in 1..1,048,576"),
        (JobSpec("auto", process_id=MAX_PROCESSES), "--process-id 1048576 must be in "
                                                    "0..1,048,575"),
        (JobSpec("off", "h:1", 2, -1), "--process-id -1 must be in 0..1"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace(".", r"\.")):
            bad.validate()


def rendezvous(port, index, count, settings, problem=None, grace=3.0):
    """One side of a rendezvous in a thread: returns a function giving its outcome."""
    box = {}

    def go():
        try:
            Rendezvous(f"127.0.0.1:{port}", count, index, settings).meet(problem, grace)
            box["out"] = "ok"
        except UserError as e:
            box["out"] = str(e)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return lambda: (thread.join(timeout=20), box.get("out"))[1]


def test_rendezvous_in_threads():
    """The protocol without JAX: agreement, a duplicate id, junk on the port."""
    port = free_port()
    host = rendezvous(port, 0, 3, {"devices": 2})
    assert _wait_port(port)
    junk = socket.create_connection(("127.0.0.1", port), timeout=5)
    junk.sendall(b"PRI * HTTP/2.0\r\n\r\n")  # what a JAX client sends: ignored
    ones = [rendezvous(port, i, 3, {"devices": 2}) for i in (1, 2)]
    assert [f() for f in (host, *ones)] == ["ok"] * 3
    junk.close()

    port = free_port()
    host = rendezvous(port, 0, 3, {"devices": 2})
    first = rendezvous(port, 1, 3, {"devices": 2})
    time.sleep(0.5)
    second = rendezvous(port, 1, 3, {"devices": 2})
    outs = [f() for f in (host, first, second)]
    assert outs[0] == outs[1] == outs[2], outs
    assert outs[0].startswith("two processes have --process-id 1 (on 127.0.0.1 and on "
                              "127.0.0.1); give each process of the job its own id in 0..2")


def test_a_process_with_its_own_error_still_names_the_difference():
    port = free_port()
    own = UserError("--devices 2 does not split over 3 processes")
    host = rendezvous(port, 0, 3, {"num_processes": 3}, problem=own)
    peer = rendezvous(port, 1, 2, {"num_processes": 2})
    assert host() == peer() == ("the job's processes disagree on num_processes (process 0: "
                                "3, process 1: 2); start every process with the same settings")
    started = time.monotonic()  # alone: its own error, after the grace
    assert rendezvous(free_port(), 0, 3, {}, problem=own, grace=0.5)() == str(own)
    assert rendezvous(free_port(), 1, 3, {}, problem=own, grace=0.5)() == str(own)
    assert time.monotonic() - started < 5


def _wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def test_a_coordinator_port_in_use_fails_process_0_at_once():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = start(["devices", "--devices", "2"], 0, port)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 2, (out, err)
    assert err.splitlines() == [
        f"error: port {port} of --coordinator-address 127.0.0.1:{port} is in use on this "
        "host (another job's coordinator, or a second process 0 of this one?); choose a "
        "free port, or stop what holds it"], err


def test_two_processes_with_one_id_all_fail_at_once():
    codes, errs, took = run_job([(["devices", "--devices", "3"], i, 3) for i in (0, 1, 1)])
    assert codes == [2, 2, 2], errs
    for err in errs:
        assert err.splitlines() == [
            "error: two processes have --process-id 1 (on 127.0.0.1 and on 127.0.0.1); give "
            "each process of the job its own id in 0..2"], errs
    assert took < SOON, took


def test_a_coordinator_that_never_answers_is_named():
    """Process 1 alone (or two processes 1 and no 0): nobody listens at the address."""
    port = free_port()
    proc = start(["devices", "--devices", "2", "--join-timeout", "2"], 1, port)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 1, (out, err)
    assert err.splitlines() == [
        f"error: gave up waiting for all 2 processes of the job to join at 127.0.0.1:{port} "
        f"after 2 s (--join-timeout): the coordinator at 127.0.0.1:{port} never answered: "
        "is process 0 running there? start the same command on every host, check that they "
        "reach that address, or raise --join-timeout"], err


def test_join_watch_names_who_never_came():
    watch = JoinWatch(10)
    watch.joining("h:1", 4, 0)
    watch.arrived.add(2)
    assert watch._cause() == "2 of the 4 processes never joined (processes 1, 3); "
    watch.arrived.update({1, 3})
    assert watch._cause() == "every process arrived, but JAX's join did not complete; "
    watch.joining("h:1", 4, 2)
    assert watch._cause().startswith("the coordinator at h:1 never answered")
    watch.answered = True
    assert watch._cause() == "process 0 answered, but not every process of the job joined; "
