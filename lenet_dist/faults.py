"""Fault injection for drills and tests: named points where a kill -9 must be survivable.

`point(name)` does nothing unless the environment variable LENET_DIST_KILL_AT equals
`name`; then the process SIGKILLs itself there, exactly as `kill -9` would (no
`finally`, no `atexit`, no buffered output flushed), so a test can kill at a chosen
step instead of at a random moment:

    LENET_DIST_KILL_AT=publish:moved lenet-dist export --workdir runs/a --out m --overwrite

The names in use are `export.PUBLISH_POINTS`. Stdlib only, so any module may call it;
an unset variable costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "LENET_DIST_KILL_AT"


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
