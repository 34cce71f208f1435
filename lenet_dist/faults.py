"""Fault injection for drills and tests: named points where a kill -9 must be survivable.

`point(name)` does nothing unless the environment variable LENET_DIST_KILL_AT equals
`name`; then the process SIGKILLs itself there, exactly as `kill -9` would (no
`finally`, no `atexit`, no buffered output flushed), so a test can kill at a chosen
step instead of at a random moment:

    LENET_DIST_KILL_AT=publish:moved lenet-dist export --workdir runs/a --out m --overwrite

The names are `POINTS`; any other value is refused at start-up (`check`): a typo must
not turn a drill into a run that is never killed. Stdlib only (and errors), so any
module may call it; an unset variable costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

from lenet_dist.errors import UserError, quoted

ENV = "LENET_DIST_KILL_AT"
# The same points, where the process SIGSTOPs itself instead: frozen, as a host that
# hangs or a VM paused by its hypervisor, for the harness to thaw (SIGCONT) or kill.
STOP_ENV = "LENET_DIST_STOP_AT"
ONCE_ENV = "LENET_DIST_FAULT_ONCE"  # a directory: see first_time
# Where a kill must leave export's --out holding a complete model, in the order they
# are reached ("set-aside" only on the two-rename path, between its renames).
PUBLISH_POINTS = ("publish:staged", "publish:verified", "publish:checked",
                  "publish:before-move", "publish:set-aside", "publish:moved",
                  "publish:old-deleted")
# A checkpoint save has started: the arrays are on the host and Orbax's background
# writes are in flight (train, every process of a job). Qualified by its step as
# "checkpoint:saving@STEP" to pick one save, or unqualified for the first one.
# "checkpoint:committing": a gs:// step's files are all written under their temporary
# name, and process 0's commit (checkpoint.FencedCommit) is about to check the lease.
SAVE_POINTS = ("checkpoint:saving", "checkpoint:committing")
POINTS = PUBLISH_POINTS + SAVE_POINTS


def check() -> None:
    """Refuse a set but unknown LENET_DIST_KILL_AT or LENET_DIST_STOP_AT (it would be
    silently ignored)."""
    for env in (ENV, STOP_ENV):
        value = os.environ.get(env)
        if not value:
            continue
        name, at, step = value.partition("@")
        if name not in POINTS or (at and not (name in SAVE_POINTS and step.isdigit())):
            raise UserError(f"{env}={quoted(value, 40)} is not a fault point (one of "
                            f"{', '.join(POINTS)}; a checkpoint point may add @STEP); "
                            "fix or unset it")


def point(name: str, step: int | None = None) -> None:
    """SIGKILL (LENET_DIST_KILL_AT) or SIGSTOP (LENET_DIST_STOP_AT) this process here
    if the variable names this point (and this step, when it names one)."""
    for env, signum in ((ENV, signal.SIGKILL), (STOP_ENV, signal.SIGSTOP)):
        value = os.environ.get(env)
        if value and value in (name, f"{name}@{step}") and first_time(env, value):
            os.environ.pop(env)  # once: a thawed process goes on
            os.kill(os.getpid(), signum)


def first_time(env: str, value: str) -> bool:
    """With LENET_DIST_FAULT_ONCE=DIR, a point fires once per process id of a job across
    its restarts (a restarted attempt inherits the variables, and would be killed at the
    same point again): the first to create DIR/<variable>-<point>-<process id> fires."""
    marks = os.environ.get(ONCE_ENV)
    if not marks:
        return True
    process = os.environ.get("LENET_DIST_PROCESS_ID", "0")
    mark = os.path.join(marks, f"{env}-{value.replace(':', '_')}-{process}")
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def step_at(env: str, process_index: int, process_count: int) -> int | None:
    """The step of a STEP or STEP:PROCESS drill variable (LENET_DIST_SIGTERM_AT,
    LENET_DIST_STALL_AT) if it is meant for this process, else None. A malformed value
    or a process the job does not have is refused: the drill would silently never fire."""
    value = os.environ.get(env)
    if not value:
        return None
    step, _, process = value.partition(":")
    if not (step.isascii() and step.isdigit()) \
            or not (process.isascii() and process.isdigit() or not process):
        raise UserError(f"{env}={quoted(value, 40)}: expected STEP or STEP:PROCESS "
                        "(non-negative integers); fix or unset it")
    if process and int(process) >= process_count:
        raise UserError(f"{env}={quoted(value, 40)}: the job has no process "
                        f"{int(process)} (it has {process_count}: 0..{process_count - 1}); "
                        "fix or unset it")
    if process and int(process) != process_index:
        return None
    return int(step)
