"""`python -m lenet_dist`, and the `lenet-dist` script's entry point.

`cli.main` turns a Ctrl-C into one line, but importing `cli` (click, numpy)
comes before it, and the interpreter's shutdown (JAX and Orbax tear down in
atexit hooks) after it: Ctrl-C in either exits at once, one line, status 130.
SIGTERM, until training takes it over, exits at once too: one line, status 143.
"""

import contextlib
import sys

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
    return code


if __name__ == "__main__":
    sys.exit(main())
