"""The pieces of a multi-process job that can be checked without one (job options, the
stop rule, the stderr filter, the launcher's bookkeeping, cluster detection), and
joining: a peer that comes late, one that never comes."""
# ruff: noqa: E501  (LOST_PEER below is JAX's log text verbatim: its lines stay whole)

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lenet_dist import faults, preemption
from lenet_dist.cli import main
from lenet_dist.joining import JobSpec, check_devices, detect_cluster
from lenet_dist.errors import UserError
from lenet_dist.launch import (describe_exit, exit_status, first_failure, free_port,
                               restart_refusal)
from tests.conftest import LateJoin

# What a survivor of a kill -9 printed on stderr (jax 0.12, trimmed stack trace).
LOST_PEER = b"""\
W1127 16:05:04.310258    2969 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Stream removed
=== Source Location Trace: ===
external/xla+/xla/tsl/distributed_runtime/rpc/grpc_util.h:89
E1127 16:06:07.568654    3405 coordination_service_agent.cc:288] Polled an error from coordination service (this can be an error from this or another task).
F1127 16:03:29.223026    2302 client.h:86] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
=== Source Location Trace: ===
external/xla+/xla/pjrt/distributed/coordination/coordination_service_error_util.cc:64

*** Check failure stack trace: ***
    @     0x7f1530af81b4  absl::lts_20260526::log_internal::LogMessage::SendToLog()
    @     0x7f15388a71f5  (unknown)
"""
LOST_COORDINATOR = LOST_PEER.replace(
    b"The following tasks are unhealthy (stopped sending heartbeats):\n1\n",
    b"Failed to send RPC to coordination service. Either the leader task was "
    b"preempted/died/restarted unexpectedly or this task is experiencing network issues.\n")


def run_filter(data: bytes) -> str:
    proc = subprocess.run([sys.executable, "-m", "lenet_dist.fatal_filter"], input=data,
                          capture_output=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0
    return proc.stdout.decode()


@pytest.mark.parametrize("report, line", [
    (LOST_PEER, "error: lost process 1 of the job (no heartbeats: killed, crashed or "
                "unreachable); stopping"),
    (LOST_COORDINATOR, "error: lost the job's coordinator, process 0 (its service stopped "
                       "answering: killed, crashed or unreachable); stopping"),
])
def test_filter_turns_jax_fatal_report_into_one_line(report, line):
    out = run_filter(b"epoch 1/2  train loss 2.3\n" + report)
    assert out.splitlines() == ["epoch 1/2  train loss 2.3", line]


def test_filter_passes_everything_else_and_drops_gloo_chatter():
    gloo = (b"[Gloo] Rank 7[Gloo] Rank 6 is connected to  is connected to 7 peer ranks. "
            b"Expected number of connected peer ranks is : 7\n")
    warning = b"W1127 16:05:04.310258    2969 x.cc:1] a warning\nits second line\n"
    out = run_filter(b"one\n" + gloo + warning + b"two\rthree\n" + b"tail")
    assert out == "one\n" + warning.decode() + "two\rthree\ntail"


def test_job_spec_validation():
    assert not JobSpec().validate().enabled
    assert JobSpec("auto").validate().enabled
    assert JobSpec("off", "10.0.0.2:8476", 4, 3).validate().enabled
    for bad, message in [
        (JobSpec("off", "nope", 2, 0), "expected HOST:PORT"),
        (JobSpec("off", None, 2, 0), "together"),
        (JobSpec("off", "h:1", 2, None), "together"),
        (JobSpec("off", "h:1", 2, 2), "must be in 0..1"),
        (JobSpec("off", heartbeat_timeout=0), "--heartbeat-timeout"),
        (JobSpec("auto", join_timeout=0), "--join-timeout must be in 1..86400"),
        (JobSpec("auto", join_timeout=86_401), "--join-timeout must be in 1..86400"),
    ]:
        with pytest.raises(UserError, match=message):
            bad.validate()


def test_devices_is_the_global_count():
    assert check_devices(8, 2) == 4 and check_devices(None, 4) is None
    with pytest.raises(UserError, match="--devices 6 does not split over 4 processes"):
        check_devices(6, 4)


@pytest.mark.parametrize("args, message", [
    (["train", "--coordinator-address", "nope", "--num-processes", "2", "--process-id", "0"],
     "expected HOST:PORT"),
    (["train", "--num-processes", "2"], "needs --coordinator-address, --num-processes and"),
    (["eval", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
      "--process-id", "5"], "--process-id 5 must be in 0..1"),
    (["train", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
      "--process-id", "0", "--devices", "3"], "--devices 3 does not split over 2 processes"),
])
def test_bad_job_options_are_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_stop_rule_one_process_signal_and_injection(monkeypatch):
    monkeypatch.setenv(preemption.SIGTERM_AT_ENV, "3")
    with preemption.StopRule() as rule:
        assert not rule.at_step(1) and not rule.at_step(2) and not rule.should_stop()
        assert rule.at_step(3)  # a real SIGTERM, caught by the rule's handler
        assert rule.decided_at == 3 and rule.signum == signal.SIGTERM and rule.should_stop()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_stop_rule_injection_targets_one_process(monkeypatch):
    monkeypatch.setenv(preemption.SIGTERM_AT_ENV, "3:1")
    rule = preemption.StopRule(process_index=0, process_count=2)
    assert not rule.at_step(3)


@pytest.mark.parametrize("value, message", [
    ("3:1", "LENET_DIST_SIGTERM_AT='3:1': the job has no process 1 (it has 1: 0..0)"),
    ("3:٣", "LENET_DIST_SIGTERM_AT='3:٣': expected STEP or STEP:PROCESS"),
    ("", None), ("3:0", None)])
def test_stop_rule_injection_is_refused_where_it_could_never_fire(monkeypatch, value, message):
    monkeypatch.setenv(preemption.SIGTERM_AT_ENV, value)
    if message is None:
        preemption.StopRule(process_index=0, process_count=1)
        return
    with pytest.raises(UserError, match=re.escape(message)):
        preemption.StopRule(process_index=0, process_count=1)


def test_a_kill_point_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setenv(faults.ENV, "publish:mvoed")
    with pytest.raises(UserError, match=r"'publish:mvoed' is not a fault point \(one of "
                                        r"publish:staged, "):
        faults.check()
    for value in ("", *faults.POINTS, "checkpoint:saving@8"):
        monkeypatch.setenv(faults.ENV, value)
        faults.check()
    for value in ("publish:moved@3", "checkpoint:saving@x"):  # only a save takes @STEP
        monkeypatch.setenv(faults.STOP_ENV, value)
        with pytest.raises(UserError, match="is not a fault point"):
            faults.check()


def test_a_fault_point_fires_once_per_process_with_fault_once(monkeypatch, tmp_path):
    """LENET_DIST_FAULT_ONCE: a restarted attempt (the same variables) is not killed at
    the same point again; another process id of the job still is."""
    fired = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, signum: fired.append(signum))
    monkeypatch.setenv(faults.ONCE_ENV, str(tmp_path))
    for process in ("0", "0", "1"):
        monkeypatch.setenv("LENET_DIST_PROCESS_ID", process)
        monkeypatch.setenv(faults.STOP_ENV, "checkpoint:saving@6")
        faults.point("checkpoint:saving", 4)  # another step: never
        faults.point("checkpoint:saving", 6)
    assert fired == [signal.SIGSTOP, signal.SIGSTOP]


def test_stop_rule_multi_process_leaves_sigterm_to_jax():
    rule = preemption.StopRule(multi_process=True)
    with rule:
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # JAX's notifier stays
        assert signal.getsignal(signal.SIGINT) == rule._handler


def test_the_cause_named_is_not_a_peer_that_aborted_on_it():
    """Seen: process 1 killed by SIGKILL, process 0 aborted by Gloo within the same
    look; the launcher named process 0's SIGABRT as the cause."""
    assert first_failure([None, None]) is None and first_failure([0, 0]) is None
    assert first_failure([-signal.SIGABRT, -signal.SIGKILL]) == 1
    assert first_failure([-signal.SIGABRT, None, 42]) == 2
    assert first_failure([-signal.SIGABRT, -signal.SIGABRT]) == 0
    assert first_failure([1, -signal.SIGKILL]) == 0
    assert first_failure([0, None, -signal.SIGABRT]) == 2


def test_exit_status():
    assert exit_status(0) == 0 and exit_status(2) == 2 and exit_status(-9) == 137
    assert describe_exit(1, -9) == "process 1 was killed by SIGKILL"
    assert describe_exit(0, 1) == "process 0 exited with status 1"


def test_restart_rule():
    """xpk's rule: exit 42 (restart me) and deaths by a signal; not what a restart
    cannot fix or was not wanted (tests/test_launch.py holds the whole table)."""
    assert restart_refusal(-9, [], 1) is None
    assert restart_refusal(42, [], 1) is None
    assert "exit 1 is not restartable" in restart_refusal(1, [], 1)
    assert restart_refusal(143, [], 1) is None  # a process stopped from outside the launcher
    assert "usage error" in restart_refusal(2, [], 5)
    assert "stopped by SIGTERM" in restart_refusal(143, [signal.SIGTERM], 5)
    assert "stopped by SIGINT" in restart_refusal(-9, [signal.SIGINT], 5)
    assert "--max-restarts" in restart_refusal(-9, [], 0)


# What each cluster JAX detects needs in the environment, and what must be absent for
# "no cluster" (a laptop, a single-host TPU slice without TPU_WORKER_* variables).
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "TPU_", "MEGASCALE_", "KUBERNETES_",
                    "JAX_COORDINATOR", "LENET_DIST_")
SLURM_TASK = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
OMPI_TASK = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911",
             "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0",
             "OMPI_COMM_WORLD_LOCAL_RANK": "0"}


def no_cluster_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}


@pytest.mark.parametrize("variables, cluster", [({}, None), (SLURM_TASK, "slurm"),
                                                (OMPI_TASK, "ompi")])
def test_cluster_detection_is_jaxs(monkeypatch, variables, cluster):
    for name in list(os.environ):
        if name.startswith(CLUSTER_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert detect_cluster() == cluster


def test_distributed_auto_without_a_cluster_is_one_process():
    env = dict(no_cluster_env(), PYTHONPATH=os.pathsep.join(sys.path))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lenet_dist", "devices", "--distributed",
                           "auto", "--devices", "2"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "note: --distributed auto found no cluster (Cloud TPU, SLURM, Open MPI, Kubernetes); "
        "running as one process"]
    assert "processes: 1 (this is process 0)" in proc.stdout
    assert "mesh: {'data': 2}" in proc.stdout
    assert time.monotonic() - started < 60  # no join was attempted, nothing waited


def test_distributed_auto_in_a_slurm_task_is_a_job_before_it_connects():
    """SLURM's variables make `auto` a job of SLURM_NTASKS processes: --devices is
    checked against that count at once, before any connection is tried."""
    env = dict(no_cluster_env(), PYTHONPATH=os.pathsep.join(sys.path), **SLURM_TASK)
    proc = subprocess.run([sys.executable, "-m", "lenet_dist", "devices", "--distributed",
                           "auto", "--devices", "3"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: --devices 3 does not split over 2 processes; use a multiple of 2 (every "
        "process gives the mesh the same number of its devices)"]


def job_process(args, i, port, env=None, **kw):
    """Process i of a 2-process job on 127.0.0.1:port, in its own process group."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1",
               LENET_DIST_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               LENET_DIST_NUM_PROCESSES="2", LENET_DIST_PROCESS_ID=str(i), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "lenet_dist", *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def end(*procs):
    """SIGKILL each process's group (the process and its output filters), reap it."""
    for proc in procs:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


def test_a_peer_that_never_joins_fails_the_join_timeout_with_one_line():
    port = free_port()
    proc = job_process(["devices", "--devices", "2", "--join-timeout", "7"], 0, port)
    try:
        started = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - started
    finally:
        end(proc)
    address = f"127.0.0.1:{port}"
    assert proc.returncode == 1, (out, err)
    assert err.splitlines() == [
        f"waiting for all 2 processes of the job to join at {address} (up to 7 s: "
        "--join-timeout)",
        f"error: gave up waiting for all 2 processes of the job to join at {address} after "
        "7 s (--join-timeout): 1 of the 2 processes never joined (process 1); start the same "
        "command on every host, check that they reach that address, or raise "
        "--join-timeout"], err
    assert took < 7 + 20, took  # the wait, plus starting Python and JAX on a busy machine


@pytest.mark.parametrize("process_id,signum,line", [
    (0, signal.SIGTERM, "error: stopped by SIGTERM while joining the job"),
    (1, signal.SIGTERM, "error: stopped by SIGTERM while joining the job"),
    (1, signal.SIGINT, "error: interrupted while joining the job")])
def test_a_signal_while_waiting_to_join_stops_at_once(process_id, signum, line):
    """The main thread sits in JAX's C++ connect(), where Python runs no handler; the
    previous code let a scheduler's SIGTERM wait out the whole --join-timeout."""
    port = free_port()
    # SIGINT as a terminal gives it: a background shell (CI) starts children ignoring it.
    proc = job_process(["devices", "--devices", "2", "--join-timeout", "120"], process_id,
                       port, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        notice = proc.stderr.readline()  # at 5 s: the process is inside the join
        assert notice.startswith("waiting for all 2 processes"), notice
        sent = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        end(proc)
    assert proc.returncode == 128 + signum, (out, err)
    assert err.splitlines() == [line], err
    assert took < 5, took


@pytest.mark.slow
def test_a_peer_70_seconds_late_still_joins_and_trains(data_dir, tmp_path):
    """JAX's 300 s join (--join-timeout's default), not the heartbeat's 60 s, bounds
    the wait; the waiting process says so once. The job runs beside the session's
    other tests (conftest's LateJoin) when the real data is there, else here."""
    job = LateJoin.running or LateJoin(data_dir, tmp_path).start()
    codes, outs = job.result(timeout=300)
    assert job.first_alive_when_late, outs  # process 0 was still waiting at 70 s
    assert codes == [0, 0], outs
    waiting = [ln for ln in outs[0][1].splitlines() if ln.startswith("waiting for")]
    assert waiting == [f"waiting for all 2 processes of the job to join at 127.0.0.1:"
                       f"{job.port} (up to 300 s: --join-timeout)"], outs[0][1]
    assert "epoch 1/1  train loss" in outs[0][0]
    assert "error" not in outs[0][1] + outs[1][1]


@pytest.mark.slow
def test_launch_cli_runs_a_job_and_prefixes_output():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "lenet_dist", "launch", "-n", "2",
                           "--timeout", "120", "--", "devices", "--devices", "4"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] processes: 2 (this is process 0)" in proc.stdout
    assert "[1] processes: 2 (this is process 1)" in proc.stdout
    assert "[1] mesh: {'data': 4}" in proc.stdout and "exit statuses 0: 0, 1: 0" in proc.stdout


@pytest.mark.slow
def test_launch_timeout_kills_every_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lenet_dist", "launch", "-n", "2",
                           "--timeout", "2", "--", "train", "--devices", "8", "--workdir",
                           str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 124, proc.stdout
    assert "timed out after 2 s; killed all processes" in proc.stdout
    assert time.monotonic() - started < 30
    pids = [int(p.split("=")[1]) for p in
            proc.stdout.split("pids: ")[1].splitlines()[0].split(", ")]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_launch_refuses_a_busy_port_before_starting_anything(capsys):
    """Process 0 refused it at once, while the others waited 30 s for it to join."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started = time.monotonic()
        assert main(["launch", "--port", str(port), "--", "train", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --port {port} is not free on 127.0.0.1 (Address already in use); "
                   "choose another, or leave --port out for a free one\n")
    assert time.monotonic() - started < 2
