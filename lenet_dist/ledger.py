"""The goodput ledger: where each attempt at a run spent its wall time.

One accumulator per process, fed by the watchdog's phase marks (`watchdog.mark`), on
a monotonic clock: every second from the process's start belongs to the phase marked
last, so an attempt's phases sum to its wall time by construction. Before the first
mark the process is starting up (imports, the CLI, JAX, the workdir's lock); a phase
this module does not know is counted as "other".

An attempt is one process start (or, in a process that trains twice, one `train` call
after the first). Process 0 keeps the run's attempts in <workdir>/ledger.json
(`rundir.write_ledger`), so a restart adds one. Work a later attempt had to redo is
"lost": an attempt that trained steps F..T, followed by one that resumed from step
S < T, lost the share (T - max(F, S)) / (T - F) of its training seconds, moved from
"training" to "lost" (its sum is unchanged).

Standard library only: the watchdog imports it.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from etils import epath

from lenet_dist.errors import Failure, Preempted, UserError
from lenet_dist.rundir import LEDGER_FILE, read_ledger, write_ledger

# The watchdog's phases -> the ledger's names for them.
PHASES = {"starting": "start-up", "joining": "joining", "loading data": "loading data",
          "restoring": "restoring", "compiling": "compiling", "training": "training",
          "evaluating": "evaluating", "saving": "saving", "finishing": "finishing"}
OTHER, LOST = "other", "lost"
KEYS = (*PHASES.values(), LOST, OTHER)  # an attempt's "seconds", in this order
STEP_PHASES = ("compiling", "training")  # a mark's step there is a step trained
# The summary line's short names; "joining" and "lost" only when there were any.
SHOWN = {"start-up": "start-up", "joining": "join", "loading data": "data",
         "restoring": "restore", "compiling": "compile", "training": "train",
         "evaluating": "eval", "saving": "save", "finishing": "finish", LOST: "lost",
         OTHER: "other"}
ALWAYS_SHOWN = ("start-up", "loading data", "restoring", "compiling", "training",
                "evaluating", "saving", "finishing", OTHER)


def process_age() -> float | None:
    """Seconds since this process started (/proc/self/stat's start time, on the boot
    clock it is counted on), or None where that cannot be read."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().decode()
        # comm (field 2) may hold spaces and parentheses: split after its last ")".
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        ticks = os.sysconf("SC_CLK_TCK")
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    age = now - start_ticks / ticks
    return age if 0 <= age < 10 * 365 * 86400 else None


class Ledger:
    """One attempt's phases: `mark` closes the current phase and opens the next."""

    def __init__(self, started: float | None = None, wall_started: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.clock, self.wall = clock, wall
        self.started = clock() if started is None else started
        self.wall_started = wall() - (clock() - self.started) if wall_started is None \
            else wall_started
        self.phase, self.since = PHASES["starting"], self.started
        self.seconds = dict.fromkeys(KEYS, 0.0)
        self.steps_from: int | None = None  # where training started (restored or 0)
        self.steps_to: int | None = None  # the last step marked in training

    def mark(self, phase: str, step: int | None = None) -> None:
        self._close()
        self.phase = PHASES.get(phase, OTHER)
        if step is not None and phase in STEP_PHASES:
            self.steps_to = step if self.steps_to is None else max(self.steps_to, step)

    def trains_from(self, step: int) -> None:
        """The step this attempt starts from (the restored checkpoint's, or 0)."""
        self.steps_from = step
        if self.steps_to is None or self.steps_to < step:
            self.steps_to = step

    def _close(self) -> float:
        now = self.clock()
        self.seconds[self.phase] += now - self.since
        self.since = now
        return now

    def attempt(self, outcome: str = "running") -> dict:
        """This attempt so far, as ledger.json keeps it (the open phase counted up to
        now, so its seconds sum to its wall seconds)."""
        now = self._close()
        return {"started": round(self.wall_started, 3), "pid": os.getpid(),
                "outcome": outcome, "wall_seconds": round(now - self.started, 3),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "steps": {"from": self.steps_from, "to": self.steps_to}}


def with_lost(attempts: Sequence[dict]) -> list[dict]:
    """The attempts with each one's lost work (its training of steps a later attempt
    started before, and so trained again) moved from "training" to "lost". Recomputed
    from "training" + "lost", so applying it again changes nothing."""
    out = [dict(a, seconds=dict(a.get("seconds", {}))) for a in attempts]
    resumed_at = None  # the lowest step any later attempt started from
    for attempt in reversed(out):
        steps = attempt.get("steps") or {}
        first, last = steps.get("from"), steps.get("to")
        seconds = attempt["seconds"]
        trained = seconds.get("training", 0.0) + seconds.get(LOST, 0.0)
        share = 0.0
        if resumed_at is not None and first is not None and last is not None and last > first:
            share = min(max((last - max(first, resumed_at)) / (last - first), 0.0), 1.0)
        seconds[LOST] = round(trained * share, 3)
        seconds["training"] = round(trained - seconds[LOST], 3)
        if share:
            attempt["lost_steps"] = [max(first, resumed_at), last]
        else:
            attempt.pop("lost_steps", None)
        if first is not None:
            resumed_at = first if resumed_at is None else min(resumed_at, first)
    return out


def summary(attempt: dict, where: str = "") -> str:
    """One line: `time: start-up 4.0 s, data 0.5 s, ... other 0.0 s (of 76.2 s ...)`."""
    seconds = attempt["seconds"]
    parts = [f"{SHOWN[k]} {seconds.get(k, 0.0):.1f} s" for k in KEYS
             if k in ALWAYS_SHOWN or seconds.get(k, 0.0) > 0]
    return (f"time: {', '.join(parts)} (of {attempt['wall_seconds']:.1f} s since the "
            f"process started{'; ' + where if where else ''})")


# ------------------------------------------------------------------ this process's ledger

_age = process_age()
_CURRENT = Ledger(time.monotonic() - (_age or 0.0))  # from the process's start, else import


def mark(phase: str, step: int | None = None) -> None:
    _CURRENT.mark(phase, step)


def current() -> Ledger:
    return _CURRENT


def begin() -> Ledger:
    """The ledger of the attempt a `train` call makes: from the process's start for the
    first, from now for a later one in the same process (not charged with the time
    between them)."""
    global _CURRENT
    if _ENDED:
        _CURRENT = Ledger()
    return _CURRENT


def end() -> None:
    """This process's attempt is over: the next `begin` starts a fresh ledger."""
    global _ENDED
    _ENDED = True


_ENDED = False


class LedgerFile:
    """This attempt's ledger.json entry (ledger.py's accumulator) after the run's
    earlier attempts: written by process 0 at each epoch's end and when the attempt
    ends (before the workdir's lock is released), unless it was refused. A ledger
    that cannot be written is noted; it never stops a run."""

    def __init__(self, workdir: epath.Path, primary: bool, log: Callable[[str], None]):
        self.workdir, self.primary, self.log = workdir, primary, log
        self.earlier = read_ledger(workdir, log) if primary else []
        self.failed = False

    def write(self, outcome: str = "running") -> dict:
        """This attempt so far (its open phase counted up to now), written."""
        attempt = current().attempt(outcome)
        if self.primary and not self.failed:
            try:
                write_ledger(self.workdir, with_lost([*self.earlier, attempt]))
            except OSError as e:
                self.failed = True
                self.log(f"note: cannot write {self.workdir / LEDGER_FILE}: "
                         f"{e.strerror or e}; the run goes on without it")
        return attempt

    def __enter__(self) -> "LedgerFile":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and issubclass(kind, UserError) and not issubclass(kind, Failure):
            return  # refused (exit 2: another run's workdir, a bad option): no attempt
        self.write("done" if kind is None else "preempted" if issubclass(kind, Preempted)
                   else f"failed ({kind.__name__})")
