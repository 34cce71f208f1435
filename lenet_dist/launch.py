"""Local launcher: N processes of one `lenet-dist` command on loopback, as one job.

The same multi-controller setup as a TPU pod or a SLURM allocation, on one
machine: process i gets the coordinator address, the process count and its id
through the environment the CLI reads (LENET_DIST_COORDINATOR_ADDRESS, ...).
Output is prefixed with the process id; a hard timeout bounds the whole job;
when one process fails the others get `grace` seconds to notice, then are
killed by PID. Standard library only: it never imports JAX.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence, TextIO

TIMED_OUT = 124  # what timeout(1) returns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_status(returncode: int) -> int:
    """A shell's view: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class LocalJob:
    """`processes` local copies of `python -m lenet_dist ARGS`, one job on loopback.

    `args_for(i)` may give process i its own arguments (tests use it to give one
    process other data); `env` is added to each child's environment, then
    `env_for(i)`. With `wire=False` the job variables are left out, for a job
    that finds its peers itself (`--distributed auto` in a fake SLURM job).
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
        for i in range(self.processes):
            job = {"LENET_DIST_COORDINATOR_ADDRESS": f"127.0.0.1:{self.port}",
                   "LENET_DIST_NUM_PROCESSES": str(self.processes),
                   "LENET_DIST_PROCESS_ID": str(i)} if self.wire else {}
            env = {**os.environ, **job, **self.env, **self.env_for(i), "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen([self.python, "-m", "lenet_dist", *self.args_for(i)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, text=True,
                                    errors="replace", start_new_session=True)
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
        """Send `signum` to process i (by PID), if it still runs."""
        if self.procs[i].poll() is None:
            os.kill(self.procs[i].pid, signum)

    def kill_all(self) -> None:
        for i in range(len(self.procs)):
            self.signal(i, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float, grace: float = 30.0) -> list[int]:
        """Exit statuses of all processes. After the first failure the others have
        `grace` seconds to exit; past `timeout` every process is killed."""
        deadline = time.monotonic() + timeout
        kill_at = None
        while any(p.poll() is None for p in self.procs):
            now = time.monotonic()
            if self.failed_first is None:
                for i, p in enumerate(self.procs):
                    if p.poll() not in (None, 0):
                        self.failed_first, kill_at = i, now + grace
                        break
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
        return [exit_status(p.wait()) for p in self.procs]

    def output(self, i: int) -> str:
        with self._lock:
            return "\n".join(self.lines[i])

    def __enter__(self) -> "LocalJob":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill_all()


def run(args: Sequence[str], processes: int, timeout: float, grace: float,
        port: int | None = None, out: TextIO = sys.stdout) -> int:
    """The `lenet-dist launch` command: run the job, relay output; the job's exit status.

    SIGINT/SIGTERM to the launcher are forwarded as SIGTERM to every process (they
    save a checkpoint together and exit 143); a second one kills them.
    """
    job = LocalJob(args, processes, port=port, out=out)
    forwarded = []

    def forward(signum, frame):
        if forwarded:
            job.kill_all()
            return
        forwarded.append(signum)
        for i in range(processes):
            job.signal(i, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        out.write(f"launching {processes} processes on 127.0.0.1:{job.port}: "
                  f"lenet-dist {' '.join(args)}\n")
        job.start()
        out.write("pids: " + ", ".join(f"{i}={p.pid}" for i, p in enumerate(job.procs)) + "\n")
        codes = job.wait(timeout, grace)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        job.kill_all()
    summary = ", ".join(f"{i}: {c}" for i, c in enumerate(codes))
    if job.timed_out:
        out.write(f"launch: timed out after {timeout:g} s; killed all processes ({summary})\n")
        return TIMED_OUT
    out.write(f"launch: exit statuses {summary}\n")
    if job.failed_first is not None:
        return codes[job.failed_first]
    return next((c for c in codes if c), 0)
