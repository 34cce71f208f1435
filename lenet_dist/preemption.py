"""The stop rule: when a preempted or interrupted run stops, the same way everywhere.

One process: SIGTERM/SIGINT set a local flag (Python handlers) and the loop
stops after the step in flight. Several processes: a local flag would stop one
process while the others wait in the next all-reduce, so the decision is
collective. `jax.distributed` installs a C-level SIGTERM notifier that feeds
JAX's preemption sync manager; `reached_preemption_sync_point(n)` then turns
True on every process at the same call (it costs ~0.3 us a call, measured, so
it is asked at every step, as it requires). A Python SIGTERM handler would
silently replace that notifier, so none is installed there; Ctrl-C is relayed to
it as SIGTERM.

The sync manager counts calls, not training steps: on a notice it takes the
largest `n` any process has passed so far (0 before the first call) and stops
at exactly `n + 1`. Passing the global step made a resumed run ignore a SIGTERM
that came before its first step: the sync point became 1, the run's steps
started past it and never equalled it, and the job trained to the end. So
`n` is this process's own call count, 1, 2, 3, ... from the start of the run.

Before any of that is installed (imports, joining, loading data, restoring,
the first compilation), SIGTERM exits at once with one line (`exit_on_sigterm`):
nothing newer than the last checkpoint exists yet. "At once" includes the middle of
a long call into C (a compilation, a restore): Python runs a handler only between
bytecodes, which took up to 3.8 s, so a thread reads the signal from Python's
wakeup fd and exits from there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from lenet_dist import faults

# Fault injection for tests and drills: "STEP" or "STEP:PROCESS" sends a real
# SIGTERM to this process right after that step is dispatched; step 0, when the data is
# loaded and the steps are built, before anything is restored.
SIGTERM_AT_ENV = "LENET_DIST_SIGTERM_AT"


_EXITING = threading.Lock()  # the handler and the wakeup thread print one line between them
_WAKEUPS = False  # the wakeup thread runs
# stderr as it was when the handler was installed: a command may capture fd 2 for a
# while (TensorFlow's import, `runtime.filtered_stderr`), and the line must not go there.
_STDERR: int | None = None


def exit_terminated(signum, frame) -> None:
    """SIGTERM before a command's work is saved: one line, exit 143, no unwinding."""
    if not _EXITING.acquire(blocking=False):
        threading.Event().wait()  # the other one is exiting the process
    os.write(2 if _STDERR is None else _STDERR, b"error: stopped by SIGTERM\n")
    os._exit(128 + signal.SIGTERM)


def _exit_from_wakeups(fd: int) -> None:
    """The wakeup thread: Python's C-level handler writes each signal's number to `fd`
    at once, while the main thread may sit in C for seconds."""
    while True:
        try:
            data = os.read(fd, 512)
        except InterruptedError:
            continue
        if not data:
            return
        if signal.SIGTERM in data and signal.getsignal(signal.SIGTERM) is exit_terminated:
            exit_terminated(signal.SIGTERM, None)


def _watch_wakeups() -> None:
    """Start the wakeup thread once (main thread only; an fd someone else set is kept)."""
    global _WAKEUPS
    if _WAKEUPS:
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    old = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if old != -1:  # not ours to replace: put it back
        signal.set_wakeup_fd(old)
        os.close(read)
        os.close(write)
        return
    _WAKEUPS = True
    threading.Thread(target=_exit_from_wakeups, args=(read,), name="sigterm-wakeup",
                     daemon=True).start()


def exit_on_sigterm(replace_jax: bool = False) -> None:
    """From the start of a command, SIGTERM is `exit_terminated` (not the silent
    default: an exit 143 with no word). In a job, JAX's notifier replaces it at the
    C level when the job is joined (Python still reports its own handler), and a
    command that does not train takes it back with `replace_jax`; in one process,
    `StopRule` replaces it when training starts."""
    if threading.current_thread() is not threading.main_thread():
        return
    global _STDERR
    if replace_jax or signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        if _STDERR is None:
            with contextlib.suppress(OSError):  # no stderr at all: fd 2 as before
                _STDERR = os.dup(2)
        signal.signal(signal.SIGTERM, exit_terminated)
        _watch_wakeups()


class StopRule:
    """Asked after every step (`at_step`) and at each epoch end (`should_stop`)."""

    def __init__(self, multi_process: bool = False, process_index: int = 0,
                 process_count: int = 1):
        self.multi_process = multi_process
        self.received: list[int] = []  # signals this process got
        self.decided_at: int | None = None  # the step at which the job stops
        self._calls = 0  # sync-point calls made by this process (see the module's doc)
        self._inject = faults.step_at(SIGTERM_AT_ENV, process_index, process_count)
        self._previous: dict = {}
        if multi_process:
            from jax.experimental import multihost_utils  # only a multi-process job needs it

            self._reached_sync_point = multihost_utils.reached_preemption_sync_point

    # -- signal handlers --------------------------------------------------------

    def __enter__(self) -> "StopRule":
        if threading.current_thread() is not threading.main_thread():
            return self
        ours = (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handler) for s in ours}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        """The handlers from before, but never `exit_terminated` again: training has
        started, so its "nothing to save" would be wrong."""
        for s, h in self._previous.items():
            signal.signal(s, signal.SIG_DFL if h is exit_terminated else h)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.received.append(signum)
        self._restore()  # a second signal acts as usual
        if self.multi_process:  # hand it to JAX's notifier: the job decides together
            os.kill(os.getpid(), signal.SIGTERM)

    # -- decisions ----------------------------------------------------------------

    def at_step(self, step: int) -> bool:
        """True if the job stops after `step` (the global step just dispatched)."""
        if self._inject is not None and step == self._inject:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.decided_at is None:
            if self.multi_process:
                self._calls += 1
                stop = self._reached_sync_point(self._calls)
            else:
                stop = bool(self.received)
            if stop:
                self.decided_at = step
        return self.decided_at is not None

    def before_training(self) -> bool:
        """In a job, at the phase ends before the first step (data loaded; restored): has
        the job been asked to stop? Every process asks at the same places, so the answer
        is the same everywhere, and a notice during loading or restoring does not wait
        for the first step's compilation. One process exits at once instead
        (`exit_terminated`)."""
        if self._inject == 0:
            self._inject = None  # once
            os.kill(os.getpid(), signal.SIGTERM)
        if not self.multi_process or self.decided_at is not None:
            return False
        self._calls += 1
        return bool(self._reached_sync_point(self._calls))

    def should_stop(self) -> bool:
        """At an epoch end: stop after its save? (one process: any signal so far;
        several: only a decision the job reached together at a step)."""
        return self.decided_at is not None or (not self.multi_process and bool(self.received))

    @property
    def signum(self) -> int:
        return self.received[0] if self.received else signal.SIGTERM

