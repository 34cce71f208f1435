"""The progress watchdog: a job either makes progress or stops with one line naming why.

JAX's heartbeats come from a thread of their own, so a process whose main thread is
stuck (a read on a dead mount, a deadlocked lock) keeps heartbeating, and every other
process waits in the next collective forever. Here the main thread marks its progress
(`mark(phase, step)`: a counter only the main thread moves) and a thread per process
publishes it to JAX's key-value store and reads every peer's. When no process of the
job has moved for the stall timeout, as seen on this process's own monotonic clock (no
clocks are compared), the first to notice posts one verdict naming the processes
furthest behind, and every process prints it and exits 42 (restartable): a launcher
or scheduler restarts the job, which resumes from its last checkpoint.

One process alone runs the same watch without the store. The timeout is
`--stall-timeout`, or by default ten times the longest time between two marks seen so
far, at least `FLOOR_S`. `LENET_DIST_STALL_AT=STEP[:PROCESS]` blocks that process's
main thread forever after STEP is dispatched (a drill: its heartbeats go on).

The same marks feed the goodput ledger (ledger.py): one set of marks, one clock.

Standard library only at import (JAX's client is looked up when a job's watch starts),
so the modules that wait (distributed, checkpoint) can mark their waits.
"""

from __future__ import annotations

import json
import os
import threading
import time

from lenet_dist import faults, ledger
from lenet_dist.errors import Restartable, UserError, quoted

STALL_AT_ENV = "LENET_DIST_STALL_AT"
STALL_TIMEOUT_ENV = "LENET_DIST_STALL_TIMEOUT"
# A file each process appends "TIME PROCESS PHASE STEP" to at every mark: what the
# SIGTERM drill (scripts/sigterm-drill.py) reads to name the phase a signal hit.
PHASE_LOG_ENV = "LENET_DIST_PHASE_LOG"
# The shortest automatic timeout: start-up, a first compilation and a data download
# have no earlier mark to measure against. A run that measures slower phases waits
# ten times its slowest.
FLOOR_S = 300.0
MARGIN = 10.0
POLL_S = 1.0  # how often a process publishes its progress and reads its peers'
ACK_WAIT_S = 3.0  # after the verdict: how long a process waits for the others to read it
PREFIX = "lenet-dist/watch/"
# The order of a run's phases, for naming who is behind when steps are equal.
PHASES = ("starting", "joining", "loading data", "restoring", "compiling", "training", "evaluating",
          "saving", "finishing")


class Watch:
    """This process's progress, and the thread that compares it with the job's."""

    def __init__(self, timeout: float | None = None, poll: float = POLL_S):
        self.timeout = timeout  # None: automatic (see the module's doc); 0: off
        self.poll = poll
        self.phase, self.step, self.count = "starting", 0, 0
        self._last_mark = time.monotonic()
        self.slowest = 0.0  # the longest time between two marks so far
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self._index, self._processes = 0, 1
        self._log = None

    # -- the main thread ---------------------------------------------------------

    def mark(self, phase: str, step: int | None = None) -> None:
        """The main thread got here: cheap enough for every step (~1 us)."""
        now = time.monotonic()
        self.slowest = max(self.slowest, now - self._last_mark)
        self._last_mark = now
        self.phase = phase
        if step is not None:
            self.step = step
        self.count += 1
        if self._log is not None:
            self._log.write(f"{time.time():.3f} {self._index} {phase} {self.step}\n")

    def effective_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        return max(FLOOR_S, MARGIN * self.slowest)

    # -- the watching thread ------------------------------------------------------

    def start(self, client=None, index: int = 0, processes: int = 1) -> "Watch":
        self._client, self._index, self._processes = client, index, processes
        if os.environ.get(PHASE_LOG_ENV):
            self._log = open(os.environ[PHASE_LOG_ENV], "a", buffering=1)  # noqa: SIM115
        if self.timeout == 0 or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._watch, name="progress-watchdog",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _mine(self) -> str:
        return json.dumps([self.count, self.phase, self.step])

    def _read(self) -> tuple[dict[int, list], str | None]:
        """Every process's published progress, and the verdict if one was posted."""
        if self._client is None:
            return {0: json.loads(self._mine())}, None
        self._client.key_value_set(f"{PREFIX}progress/{self._index}", self._mine(),
                                   allow_overwrite=True)
        seen, verdict = {}, None
        for key, value in self._client.key_value_dir_get(PREFIX):
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name.startswith("progress/"):
                seen[int(name.rsplit("/", 1)[1])] = json.loads(value)
            elif name == "verdict":
                verdict = value
        return seen, verdict

    def _watch(self) -> None:
        last, moved = None, time.monotonic()
        while not self._done.wait(self.poll):
            try:
                seen, verdict = self._read()
            except Exception:  # noqa: BLE001 - the coordinator is gone: JAX's heartbeat says so
                continue
            if verdict is not None:
                self._stop_job(verdict)
            if seen != last:
                last, moved = seen, time.monotonic()
                continue
            waited = time.monotonic() - moved
            if waited >= self.effective_timeout():
                self._stop_job(describe_stall(seen, waited, self._processes), post=True)

    def _stop_job(self, line: str, post: bool = False) -> None:
        """Print the verdict and exit 42, after the others have read it (or a few
        seconds): the first to exit may take the coordinator with it."""
        if self._done.is_set():
            return
        client = self._client
        if client is not None:
            try:
                if post:
                    try:
                        client.key_value_set(f"{PREFIX}verdict", line)
                    except Exception:  # noqa: BLE001 - another process posted first
                        line = client.blocking_key_value_get(f"{PREFIX}verdict", 2000)
                client.key_value_set(f"{PREFIX}read/{self._index}", "1", allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the line is printed all the same
                pass
        # No sys.stdout.flush(): the stuck main thread may hold its lock.
        os.write(2, f"error: {line}\n".encode())
        deadline = time.monotonic() + ACK_WAIT_S
        while client is not None and time.monotonic() < deadline:
            try:
                if len(client.key_value_dir_get(f"{PREFIX}read/")) >= self._processes:
                    if self._index == 0:  # the coordinator's host leaves last
                        time.sleep(0.5)
                    break
            except Exception:  # noqa: BLE001
                break
            time.sleep(0.1)
        os._exit(Restartable.exit_code)


def describe_stall(seen: dict[int, list], waited: float, processes: int) -> str:
    """One line: the processes furthest behind (lowest step, then earliest phase)."""
    seen = {i: seen.get(i, [0, "starting", 0]) for i in range(processes)}  # not yet heard

    def rank(progress):
        _count, phase, step = progress
        return step, PHASES.index(phase) if phase in PHASES else len(PHASES)

    behind = min(rank(p) for p in seen.values())
    late = sorted(i for i, p in seen.items() if rank(p) == behind)
    where = {i: f"at step {seen[i][2]} ({seen[i][1]})" for i in seen}
    if processes == 1:
        stuck = f"this process is stuck {where[0]}"
    elif len(late) == len(seen):
        stuck = f"every process is stuck {where[late[0]]}"
    else:
        ahead = sorted(set(seen) - set(late))
        stuck = (f"process{'es' if len(late) > 1 else ''} {_some(late)} "
                 f"{'are' if len(late) > 1 else 'is'} behind, {where[late[0]]}; "
                 + "; ".join(f"process {i} waits {where[i]}" for i in ahead[:3])
                 + ("; ..." if len(ahead) > 3 else ""))
    return (f"no progress for {waited:.0f} s (--stall-timeout): {stuck}; exiting 42 so "
            "that a restart resumes from the last checkpoint")


def _some(indices: list[int], shown: int = 8) -> str:
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return ", ".join(map(str, indices[:shown])) + more


# ------------------------------------------------------------------ this process's watch

_WATCH = Watch(timeout=0)  # off until a run starts one


def mark(phase: str, step: int | None = None) -> None:
    """The main thread got here: the watch sees it, and the goodput ledger counts the
    time since the last mark to the phase that ends (`lenet_dist.ledger`)."""
    ledger.mark(phase, step)
    _WATCH.mark(phase, step)


def start(timeout: float | None = None, client=None, index: int = 0, processes: int = 1,
          poll: float = POLL_S) -> Watch:
    """Replace this process's watch by a running one (a run's start)."""
    global _WATCH
    _WATCH.stop()
    _WATCH = Watch(timeout, poll).start(client, index, processes)
    return _WATCH


def stop() -> None:
    _WATCH.stop()


def parse_timeout(value: str | None) -> float | None:
    """--stall-timeout / LENET_DIST_STALL_TIMEOUT: seconds, 0 for off, unset for auto."""
    if value is None or value == "" or value == "auto":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86_400:
        raise UserError(f"--stall-timeout {quoted(value, 40)}: expected seconds in "
                        "0..86400 (0 turns the watchdog off) or auto")
    return seconds


def stall_step(process_index: int, process_count: int) -> int | None:
    """The step after which LENET_DIST_STALL_AT blocks this process, or None."""
    return faults.step_at(STALL_AT_ENV, process_index, process_count)


def stall_here() -> None:
    """Block the main thread for good (LENET_DIST_STALL_AT), as a dead mount would.
    Once per process id of a job with LENET_DIST_FAULT_ONCE (a restart goes on)."""
    value = os.environ.get(STALL_AT_ENV, "")
    if faults.first_time(STALL_AT_ENV, value):
        threading.Event().wait()
