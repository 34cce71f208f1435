"""stderr filter for multi-process runs: JAX's fatal "a process died" report -> one line.

When a process of the job dies, JAX's coordination service aborts every survivor
from C++ (a `F... client.h] Terminating process ...` log, the status, a source
trace and a stack trace): out of Python's reach, so `joining.join` routes
stderr through this small process. Everything passes through unchanged except
that report, and the C++ error lines logged just before it, which become:

    error: lost process 1 of the job (no heartbeats: killed, crashed or unreachable); stopping

and gloo's "[Gloo] Rank 3 is connected to 7 peer ranks" lines (one per device
and collective at start-up), which are dropped.

Standard library only; it ignores SIGINT/SIGTERM and exits when stderr closes.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import time

FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
# absl WARNING/ERROR/FATAL lines from C++, and Orbax's Python error log and traceback
# (a save waiting at a barrier fails at the same moment): held, in case the report follows.
CPP_LOG = re.compile(rb"^([WEF]\d{4} \d\d:\d\d:\d\d|ERROR:absl:|Traceback \(most recent)")
# gloo's "[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected
# peer ranks is : 7", often interleaved mid-line by its threads: its pieces are cut
# out of any line, and a line left blank is dropped.
GLOO = re.compile(rb"\[Gloo\]\s*Rank\s*\d*|is\s+connected\s+to(\s+\d+)?|\d*\s*peer\s+ranks\."
                  rb"\s*Expected\s+number\s+of\s+connected\s+peer\s+ranks\s+is\s*:\s*\d+")
GLOO_TAIL = re.compile(rb"[\d\s]+|\s*is\s*:?\s*\d*\s*")  # "7", " is : 7" after gloo lines
HOLD_SECONDS = 2.0  # how long held lines wait for a fatal report


def describe_loss(text: str) -> str | None:
    """One line naming the lost process, if `text` (a fatal report, an exception chain)
    says that the job lost one; else None."""
    unhealthy = re.search(r"unhealthy \(stopped sending heartbeats\):\s*((?:\d+\s*)+)", text)
    ids = (unhealthy.group(1).split() if unhealthy
           else re.findall(r"Task (\d+) heartbeat timeout", text))
    if ids:
        return (f"error: lost process {', '.join(dict.fromkeys(ids))} of the job (no "
                "heartbeats: killed, crashed or unreachable); stopping")
    if "leader task" in text or "Failed to send RPC to coordination service" in text:
        return ("error: lost the job's coordinator, process 0 (its service stopped "
                "answering: killed, crashed or unreachable); stopping")
    return None


def summarize(report: bytes) -> str:
    """The one line for a fatal report and the lines held just before it."""
    text = report.decode(errors="replace")
    found = describe_loss(text)
    if found:
        return found
    status = text.split("absl::Status:", 1)[-1]
    first = next((ln.strip() for ln in status.splitlines() if ln.strip()), "unknown error")
    return f"error: the JAX distributed runtime stopped this process: {first[:200]}"


def degloo(line: bytes) -> bytes:
    """`line` without gloo's connection messages; b"" if nothing else was in it."""
    rest = GLOO.sub(b"", line)
    return b"" if not rest.strip() else rest


def main() -> int:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # the training process decides; we only relay
    fd_in, out = sys.stdin.fileno(), sys.stdout.buffer
    buffer, held, fatal, gloo_seen = b"", [], None, False
    deadline = None

    def emit(data: bytes) -> None:
        out.write(data)
        out.flush()

    while True:
        timeout = max(0.0, deadline - time.monotonic()) if held else None
        ready, _, _ = select.select([fd_in], [], [], timeout)
        if not ready:  # the held C++ lines were not followed by a fatal report
            emit(b"".join(held))
            held, deadline = [], None
            continue
        chunk = os.read(fd_in, 65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line += b"\n"
            if fatal is not None:
                fatal.append(line)
            elif FATAL in line:
                fatal, held = [*held, line], []
            elif b"[Gloo]" in line or b"peer ranks" in line:
                gloo_seen = True
                line = degloo(line)
                if line:
                    emit(line)
            elif gloo_seen and GLOO_TAIL.fullmatch(line):
                continue  # the tail of an interleaved gloo line ("7", " is : 7")
            elif held or CPP_LOG.match(line) or not line.strip():
                if not held:
                    deadline = time.monotonic() + HOLD_SECONDS
                held.append(line)
            else:
                emit(line)
        if b"\r" in buffer and fatal is None and not held:
            emit(buffer)  # a progress bar's \r update has no newline: pass it on now
            buffer = b""
    if fatal is not None:
        emit((summarize(b"".join(fatal) + buffer) + "\n").encode())
    else:
        emit(b"".join(held) + (b"" if b"[Gloo]" in buffer else buffer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
