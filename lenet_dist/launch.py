"""Local launcher: N processes of one `lenet-dist` command on loopback, as one job.

The same multi-controller setup as a TPU pod or a SLURM allocation, on one
machine: process i gets the coordinator address, the process count and its id
through the environment the CLI reads (LENET_DIST_COORDINATOR_ADDRESS, ...).
Output is prefixed with the process id; a timeout, when given, bounds the whole
job; when one process fails the others get `grace` seconds to notice, then are
killed by process group (each process leads its own, with its output filters).
Every process dies with the launcher, however the launcher dies (Linux's
parent-death signal). With restarts, a job whose process asked for one (exit
RESTART_EXIT_CODE, 42) or died by a signal is started again and resumes from its
workdir: the rule of launch/gke-jobset.yaml and launch/slurm.sbatch too. Every
process of every attempt gets the same LENET_DIST_JOB_ID. Standard library and
`lenet_dist.errors` only: it never imports JAX.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence, TextIO

from lenet_dist.errors import RESTART_EXIT_CODE, UserError

TIMED_OUT = 124  # what timeout(1) returns
USAGE_ERROR = 2  # errors.UserError's exit code: the same command would fail the same way
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
JOB_ID = "LENET_DIST_JOB_ID"  # one job's identity, the same in each of its restarts
GROUPS_GONE_SECONDS = 5.0  # how long `run` waits for a process's output filters to exit
RESTART_GRACE = 5.0  # seconds the others of a job get after one exited 42, before a restart


def _parent_death_signal() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive SIGKILL when the launcher dies (a
    SIGKILL to the launcher runs none of its code), or None off Linux. prctl is looked
    up here, in the parent: the child runs only the call between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    launcher = os.getpid()

    def set_in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != launcher:  # the launcher died before the call: follow it
            os._exit(128 + signal.SIGKILL)

    return set_in_child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """A --port another program holds is refused before any process starts (process 0
    would refuse it, and the others wait for it to join)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free to gRPC
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"--port {port} is not free on 127.0.0.1 ({e.strerror or e}); "
                            "choose another, or leave --port out for a free one") from None


def exit_status(returncode: int) -> int:
    """A shell's view: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def restartable(status: int) -> bool:
    """Whether an exit status (a shell's: 128 + N for signal N) is one a restart of the
    same command can get past: RESTART_EXIT_CODE ("restart me": a lost lease, storage
    unreachable) or a death by a signal, 127 to 255 (xpk's JobSet template counts 127,
    "command not found" to a shell, with them). Everything else (1, 2, 124, ...) fails
    the same way again. launch/gke-jobset.yaml and launch/slurm.sbatch restart on the
    same set (RESTART_TABLE in tests/test_launch.py holds all three to it)."""
    return status == RESTART_EXIT_CODE or 127 <= status <= 255


def new_job_id() -> str:
    """The LENET_DIST_JOB_ID of one `launch`: the environment's, else one made here,
    unique to this launcher (host, PID, start time) and kept across its restarts."""
    return (os.environ.get(JOB_ID)
            or f"launch-{socket.gethostname()}-{os.getpid()}-{int(time.time())}")


def describe_exit(i: int, returncode: int) -> str:
    """`process 1 was killed by SIGKILL`, `process 0 exited with status 1`."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"process {i} was killed by {name}"
    return f"process {i} exited with status {returncode}"


def first_failure(returncodes: Sequence[int | None]) -> int | None:
    """Which of the processes that failed by one look (Popen returncodes; None: still
    running) to name as the cause. A process killed by SIGABRT ranks last: that is how
    a peer's death shows (Gloo reading a half-sent message from a killed peer aborts
    the reader, within milliseconds, often within one 50 ms look); ties go by index."""
    failed = [(rc == -signal.SIGABRT, i) for i, rc in enumerate(returncodes) if rc]
    return min(failed)[1] if failed else None


class LocalJob:
    """`processes` local copies of `python -m lenet_dist ARGS`, one job on loopback.

    `args_for(i)` may give process i its own arguments (tests use it to give one
    process other data); `env` is added to each child's environment, then
    `env_for(i)`. With `wire=False` the job variables are left out, for a job
    that finds its peers itself (`--distributed auto` in a fake SLURM job).
    The processes die with the thread that started them (PR_SET_PDEATHSIG), so
    start a job from a thread that outlives it (the main thread).
    """

    def __init__(self, args: Sequence[str], processes: int, *, port: int | None = None,
                 env: dict | None = None, args_for: Callable[[int], Sequence[str]] | None = None,
                 env_for: Callable[[int], dict] | None = None, wire: bool = True,
                 out: TextIO | None = None, python: str = sys.executable):
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.processes = processes
        self.port = port or free_port()
        self.args_for = args_for or (lambda i: args)
        self.env = env or {}
        self.env_for = env_for or (lambda i: {})
        self.wire = wire
        self.out = out
        self.python = python
        self.procs: list[subprocess.Popen] = []
        self.lines: list[list[str]] = [[] for _ in range(processes)]
        self.failed_first: int | None = None  # id of the first process that failed
        self.timed_out = False
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------

    def start(self) -> "LocalJob":
        die_with_launcher = _parent_death_signal()
        for i in range(self.processes):
            job = {"LENET_DIST_COORDINATOR_ADDRESS": f"127.0.0.1:{self.port}",
                   "LENET_DIST_NUM_PROCESSES": str(self.processes),
                   "LENET_DIST_PROCESS_ID": str(i)} if self.wire else {}
            env = {**os.environ, **job, **self.env, **self.env_for(i), "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen([self.python, "-m", "lenet_dist", *self.args_for(i)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, text=True,
                                    errors="replace", start_new_session=True,
                                    preexec_fn=die_with_launcher)
            self.procs.append(proc)
            reader = threading.Thread(target=self._relay, args=(i, proc), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _relay(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            with self._lock:
                self.lines[i].append(line)
                if self.out is not None:
                    self.out.write(f"[{i}] {line}\n")
                    self.out.flush()

    def signal(self, i: int, signum: int) -> None:
        """Send `signum` to process i (by PID, not to its output filters, which may
        not yet ignore SIGTERM), if it still runs."""
        if self.procs[i].poll() is None:
            os.kill(self.procs[i].pid, signum)

    def kill_groups(self) -> None:
        """SIGKILL every process group, also where its leader has exited (a filter may
        linger). Reaps nothing, so a signal handler may call it (Popen.wait would
        wait for a lock the interrupted main thread may hold)."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """`kill_groups`, then reap the processes."""
        self.kill_groups()
        for p in self.procs:
            p.wait()

    def groups_gone(self, timeout: float) -> bool:
        """Wait until no process is left in any of the job's process groups, at most
        `timeout` seconds; whether they are all gone. A process's output filters
        (fatal_filter) outlive it by a moment, and are no child of ours to wait for."""
        deadline = time.monotonic() + timeout
        while True:
            left = 0
            for p in self.procs:
                try:
                    os.killpg(p.pid, 0)
                    left += 1
                except (ProcessLookupError, PermissionError):  # gone (or no longer ours)
                    pass
            if not left:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def say(self, line: str) -> None:
        """A line of the launcher's own, between the processes' lines."""
        if self.out is not None:
            with self._lock:
                self.out.write(line + "\n")
                self.out.flush()

    def wait(self, timeout: float | None,
             grace: float | Callable[[int], float] = 30.0) -> list[int]:
        """Exit statuses of all processes. After the first failure the others have
        `grace` seconds to exit (or `grace(returncode)`, of the failed process);
        past `timeout` (None: no limit) every process is killed."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        kill_at = None
        while any(p.poll() is None for p in self.procs):
            now = time.monotonic()
            if self.failed_first is None:
                self.failed_first = first_failure([p.poll() for p in self.procs])
                if self.failed_first is not None:
                    returncode = self.procs[self.failed_first].returncode
                    kill_at = now + (grace(returncode) if callable(grace) else grace)
            if now >= deadline:
                self.timed_out = True
                self.kill_all()
                break
            if kill_at is not None and now >= kill_at:
                self.kill_all()
                break
            time.sleep(0.05)
        for r in self._readers:
            r.join(timeout=10)
        codes = [exit_status(p.wait()) for p in self.procs]
        if self.failed_first is None:  # all ended within one look
            self.failed_first = first_failure([p.returncode for p in self.procs])
        return codes

    def output(self, i: int) -> str:
        with self._lock:
            return "\n".join(self.lines[i])

    def __enter__(self) -> "LocalJob":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill_all()


def run(args: Sequence[str], processes: int, timeout: float | None = None,
        grace: float = 30.0, port: int | None = None, out: TextIO = sys.stdout,
        max_restarts: int = 0) -> int:
    """The `lenet-dist launch` command: run the job, relay output; the job's exit status.

    SIGINT/SIGTERM to the launcher are forwarded as SIGTERM to every process (they
    save a checkpoint together and exit 143); a second one kills them. A job whose
    first failed process exited RESTART_EXIT_CODE (42) or died by a signal is started
    again, up to `max_restarts` times (see `restart_refusal`), on a fresh port unless
    `port` is given; the survivors of a failure that will be restarted are killed at
    once (after RESTART_GRACE seconds when it exited 42), since they cannot go on
    without the lost process. Every process of every
    attempt gets the same LENET_DIST_JOB_ID (`new_job_id`). `timeout` (None: no limit)
    bounds the whole launch, restarts included; when it runs out, every process is
    killed and the status is TIMED_OUT (124), said in one line. It returns once the
    processes' output filters have exited too (at most GROUPS_GONE_SECONDS later).
    """
    if port is not None:
        check_port(port)
    deadline = None if timeout is None else time.monotonic() + timeout
    job_id = new_job_id()
    stopping: list[int] = []  # the signals the launcher received
    jobs: list[LocalJob] = []

    def forward(signum, frame):
        if stopping:
            if jobs:
                jobs[-1].kill_groups()
            return
        stopping.append(signum)
        if jobs:
            for i in range(len(jobs[-1].procs)):
                jobs[-1].signal(i, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    restarts = 0
    try:
        while True:
            job = LocalJob(args, processes, port=port, env={JOB_ID: job_id}, out=out)
            jobs.append(job)
            start_attempt(job, job_id, args, stopping)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            codes = job.wait(left, functools.partial(
                grace_after, grace=grace, stopping=stopping,
                restarts_left=max_restarts - restarts))
            job.kill_all()
            status = attempt_status(job, codes, timeout, stopping, max_restarts, restarts)
            if status is not None:
                return status
            restarts += 1
            cause = describe_exit(job.failed_first, job.procs[job.failed_first].returncode)
            # The next LocalJob takes a fresh free port (a given `port` is reused).
            job.say(f"launch: {cause}; restarting the job ({restarts} of {max_restarts})")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if jobs:  # each earlier attempt was killed when it ended
            jobs[-1].kill_all()
            jobs[-1].groups_gone(GROUPS_GONE_SECONDS)


def attempt_status(job: LocalJob, codes: list[int], timeout: float | None,
                   stopping: Sequence[int], max_restarts: int, restarts: int) -> int | None:
    """The launch's exit status once an attempt has ended, said in a line; None when
    the job is to be restarted."""
    summary = ", ".join(f"{i}: {c}" for i, c in enumerate(codes))
    if job.timed_out:
        job.say(f"launch: timed out after {timeout:g} s; killed all processes "
                f"({summary}); exit {TIMED_OUT} (--timeout)")
        return TIMED_OUT
    job.say(f"launch: exit statuses {summary}")
    if job.failed_first is None:
        return next((c for c in codes if c), 0)
    returncode = job.procs[job.failed_first].returncode
    refusal = restart_refusal(returncode, stopping, max_restarts - restarts)
    if refusal is None:
        return None
    if max_restarts:
        job.say(f"launch: {describe_exit(job.failed_first, returncode)}; not restarting: "
                f"{refusal}")
    return codes[job.failed_first]


def start_attempt(job: LocalJob, job_id: str, args: Sequence[str],
                  stopping: Sequence[int]) -> None:
    """Start one attempt of the job and say so, passing on a SIGTERM or SIGINT that
    came while its processes were being started."""
    job.say(f"launching {job.processes} processes on 127.0.0.1:{job.port} "
            f"(job id {job_id}): lenet-dist {' '.join(args)}")
    job.start()
    job.say("pids: " + ", ".join(f"{i}={p.pid}" for i, p in enumerate(job.procs)))
    if stopping:
        for i in range(job.processes):
            job.signal(i, signal.SIGTERM)


def grace_after(returncode: int, grace: float, stopping: Sequence[int],
                restarts_left: int) -> float:
    """How long the other processes may run on after one ended with `returncode`."""
    if exit_status(returncode) == USAGE_ERROR and not stopping:
        # the same command is as wrong in the others (which may wait to join a process
        # 0 that refused it: 30 s for a busy --port)
        return min(grace, RESTART_GRACE)
    if restart_refusal(returncode, stopping, restarts_left) is not None:
        return grace
    # A restart follows: a process that died by a signal leaves the others nothing to
    # say; one that exited 42 may have told them why (the watchdog's verdict), so they
    # get a moment to say it and exit 42 themselves.
    return min(grace, RESTART_GRACE) if returncode == RESTART_EXIT_CODE else 0.0


def restart_refusal(returncode: int, stopping: Sequence[int], restarts_left: int) -> str | None:
    """Why a job whose first failed process ended with `returncode` (Popen's: negative
    for a signal) is not started again, or None to restart it. Only what a restart can
    get past is restarted (`restartable`: exit 42, "restart me", and deaths by signal),
    never a stop the launcher itself was asked for (its SIGTERM or Ctrl-C, which the
    processes obeyed, exiting 143 or 130); any other exit (1, 2, 124, ...) would fail
    the same way again."""
    if stopping:
        return f"the launcher was stopped by {signal.Signals(stopping[0]).name}"
    status = exit_status(returncode)
    if status == USAGE_ERROR:
        return "a usage error (exit 2) fails the same way again"
    if not restartable(status):
        return (f"exit {status} is not restartable: the same command fails the same way; "
                f"only exit {RESTART_EXIT_CODE} (restart me) and signal deaths are restarted")
    if restarts_left <= 0:
        return "every restart (--max-restarts) is used"
    return None
