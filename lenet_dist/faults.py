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
# Where a kill must leave export's --out holding a complete model, in the order they
# are reached ("set-aside" only on the two-rename path, between its renames).
PUBLISH_POINTS = ("publish:staged", "publish:verified", "publish:checked",
                  "publish:before-move", "publish:set-aside", "publish:moved",
                  "publish:old-deleted")
POINTS = PUBLISH_POINTS


def check() -> None:
    """Refuse a set but unknown LENET_DIST_KILL_AT (it would be silently ignored)."""
    value = os.environ.get(ENV)
    if value and value not in POINTS:
        raise UserError(f"{ENV}={quoted(value, 40)} is not a fault point (one of "
                        f"{', '.join(POINTS)}); fix or unset it")


def point(name: str) -> None:
    """SIGKILL this process here if LENET_DIST_KILL_AT names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
