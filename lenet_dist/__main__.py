"""`python -m lenet_dist`, and the `lenet-dist` script's entry point.

`cli.main` turns a Ctrl-C into one line, but importing `cli` (click, numpy)
comes before it, and the exit (JAX and Orbax tear down in atexit hooks) after it:
Ctrl-C in either exits at once, one line, status 130. SIGTERM, until training
takes it over, exits at once too: one line, status 143.
"""

import atexit
import contextlib
import os
import sys
import threading

import _signal

from lenet_dist.runtime import exit_interrupted, quick_interrupts


def main() -> int:
    with quick_interrupts():  # preemption imports `signal` (50+ ms): a Ctrl-C window
        from lenet_dist.preemption import exit_on_sigterm

        exit_on_sigterm()
        from lenet_dist.cli import main as cli_main
    code = cli_main()
    with contextlib.suppress(OSError):  # a closed pipe: click has already said nothing
        sys.stdout.flush()
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, exit_interrupted)  # for the atexit hooks
    exit_without_teardown(code)
    return code  # where the interpreter lacks what that needs


def exit_without_teardown(code: int) -> None:
    """Exit as `sys.exit` does (the job's non-daemon threads joined, then every atexit
    hook: JAX's, Orbax's, logging's; the output flushed), but skip the interpreter's
    teardown of every object, which frees nothing the kernel does not: it took 0.52-0.55 s
    of each command with JAX loaded, and 0.07-0.10 s is left (measured 2026-12-08 on a
    2-core AMD EPYC, from `main`'s return to the process's end). Returns only where
    CPython's `threading._shutdown`, what its own exit calls first, is missing."""
    join_threads = getattr(threading, "_shutdown", None)
    if join_threads is None:
        return
    join_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a closed pipe
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
