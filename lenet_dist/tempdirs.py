"""Temporary directories that go when the process goes, however it goes.

A `with TemporaryDirectory()` is skipped by SIGKILL and by the one-line SIGTERM exit
(`os._exit`), which left `lenet-dist-bench-*` and export staging behind in /tmp. So each
process that makes one starts a reaper once: a small Python process in its own session
(group signals do not reach it) that reads the paths we make from a pipe and, when the
pipe closes (our exit, by any means: the kernel closes our end), waits a moment for our
children to die (they get a parent-death signal) and removes what is still there.
A directory removed in the normal way is simply gone by then. Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

# After our exit: time for our children (killed by their parent-death signal) to stop
# writing into the directories before they are removed.
GRACE_S = 1.0

_REAPER = r"""
import os, shutil, sys, time
fd, chunks = int(sys.argv[1]), []
while True:
    try:
        chunk = os.read(fd, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    chunks.append(chunk)
time.sleep(float(sys.argv[2]))
for path in b"".join(chunks).split(b"\0"):
    if path:
        shutil.rmtree(path, ignore_errors=True)
"""

_lock = threading.Lock()
_pipe: int | None = None  # our write end; the reaper holds the read end
_owner: int | None = None  # the pid that started the reaper (a fork must start its own)


def _register(path: str) -> None:
    global _pipe, _owner
    with _lock:
        if _pipe is None or _owner != os.getpid():
            read, write = os.pipe()  # not inheritable: our other children never hold it
            try:
                subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _REAPER, str(read), str(GRACE_S)],
                    pass_fds=(read,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True)
            finally:
                os.close(read)
            _pipe, _owner = write, os.getpid()
        os.write(_pipe, os.fsencode(path) + b"\0")


def mkdtemp(prefix: str) -> str:
    """tempfile.mkdtemp, removed by the reaper if this process ends without removing it."""
    path = tempfile.mkdtemp(prefix=prefix)
    _register(path)
    return path


@contextlib.contextmanager
def temporary_directory(prefix: str) -> Iterator[str]:
    """`tempfile.TemporaryDirectory` that is also removed after a SIGKILL or os._exit."""
    path = mkdtemp(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
