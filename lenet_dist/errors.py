"""Exceptions the CLI turns into one line and an exit code (no traceback)."""

import re
import reprlib
import signal
from typing import Any


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""

    exit_code = 2  # a usage error: the command line or its inputs


class Failure(UserError):
    """A runtime failure the user can act on (a busy workdir, a full disk, a
    diverged run): one line like a UserError, but exit code 1."""

    exit_code = 1


# "Restart me": the one exit code that says a restart of the same command can succeed
# where this attempt could not (the workdir's lease lost or not renewable in time, object
# storage unreachable). 42 is the code xpk's JobSet template restarts on (with the signal
# deaths, 127-255); lenet-dist's own JobSet manifest, SLURM script and `launch
# --max-restarts` restart on it too, and on nothing else but signals (143, 134, 137).
RESTART_EXIT_CODE = 42


class Restartable(Failure):
    """A failure that another attempt of the same job can get past (storage came back,
    a stale lease expired): one line, exit RESTART_EXIT_CODE."""

    exit_code = RESTART_EXIT_CODE


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int | None, saved: bool = True, before: bool = False):
        self.signum, self.step = signum, step
        if before:  # a job asked to stop before its first step: nothing newer exists
            where = "before training" if step is None else f"before step {step + 1}"
            what = "nothing newer than the last checkpoint to save; run the same command to resume"
        else:
            where = f"at step {step}"
            what = ("checkpoint saved; run the same command to resume" if saved
                    else "checkpointing was off, nothing saved")
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; {what}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


def first_line(e: BaseException, limit: int = 200) -> str:
    """A library exception as one short line, for a UserError that wraps it."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(e)).strip()  # TF's op prefix
    return text.splitlines()[0][:limit] if text else type(e).__name__


class Busy(Exception):
    """A workdir's lock (a flock, or a lease on gs://) is held; `holder` says by whom
    (may be empty)."""

    def __init__(self, holder: dict):
        self.holder = holder
        super().__init__(describe_holder(holder))


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (no details recorded)"
    since, job = holder.get("since"), holder.get("job")
    text = (f"`{holder.get('command', 'lenet-dist')}` (PID {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {since or '?'}{f', job {job}' if job else ''})")
    if "renewed_seconds" in holder:  # a gs:// lease seen renewed (lease.Lease._watch)
        text += (f", its lease renewed {holder['renewed_seconds']:g} s ago as seen from "
                 f"here; it expires {holder['expires_seconds']:g} s after its last renewal")
    elif "renewed_at" in holder:  # a gs:// lease as read (lease.lease_holder)
        text += f", its lease last renewed at {holder['renewed_at']} (the server's clock)"
    return text


# Values quoted in messages (config files, environment variables): bounded, whatever
# the value holds.
QUOTE_CHARS = 80
_QUOTE = reprlib.Repr()
# reprlib shows a few items per level and a few levels, so quoting a deeply nested or
# self-sharing value costs the same as quoting a short one. Its cuts of one scalar are
# in the middle and past the limit, so that `quoted` cuts at the end, where a reader looks.
_QUOTE.maxlevel = 3
_QUOTE.maxstring = _QUOTE.maxlong = _QUOTE.maxother = 2 * QUOTE_CHARS


def quoted(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value) for a message, at most `limit` characters (cut with "...")."""
    try:
        text = _QUOTE.repr(value)
    except ValueError:  # an int past Python's 4,300-digit str limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
