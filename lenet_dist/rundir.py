"""The run directory (the workdir): every name inside it, its lock, its metrics.jsonl,
and the rule for finding runs.

What lives there: checkpoints/ (checkpoint.py's, through Orbax), metrics.jsonl (one
EpochRecord a line), ledger.json (each attempt's time by phase: ledger.py), config.json
(settings_io.py's), tb/ (TensorBoard events and profiles), the lock (a flock, or a
gs:// lease), the job's token and corrupt-checkpoints/. Below training, checkpoint,
report and bench; no JAX, no Orbax.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import time
from typing import Callable, Sequence

from etils import epath

from lenet_dist import gcs, lease, safefs
from lenet_dist.errors import Busy, Failure, Restartable, UserError, describe_holder
from lenet_dist.records import EpochRecord, from_lines, to_lines

# Every name inside a run directory is here (tests/test_rooms.py finds no other module
# spelling one).
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LEDGER_FILE = "ledger.json"  # the run's attempts and where their time went (ledger.py)
TB_DIR = "tb"
CONFIG_FILE = "config.json"  # the run's effective Config (settings_io.py writes it)
LOCK_FILE = "lock"  # a flock locally; on gs://, the lease object (lease.py)
JOB_TOKEN_FILE = ".lenet-dist-job"  # the job that holds the workdir (distributed.py)
QUARANTINE_DIR = "corrupt-checkpoints"  # bad steps set aside, never deleted (checkpoint.py)
PROBE_DIR = ".probe"  # in checkpoints/: the write probe before the first step
REPORT_DIR = "report"  # `report`'s output when --out is not given
RUN_NAMES = (CHECKPOINT_DIR, METRICS_FILE, LEDGER_FILE, TB_DIR, CONFIG_FILE, LOCK_FILE,
             JOB_TOKEN_FILE, QUARANTINE_DIR, PROBE_DIR)
RUNS_DIR = "runs"  # where `train` puts each recipe's run by default
DEFAULT_RUN = f"{RUNS_DIR}/lenet"  # `train`'s --workdir with no options (the d2l recipe)


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """A local path made absolute, or a URL such as gs://bucket/run kept as it is."""
    text = os.fspath(workdir)
    if "://" not in text:
        return epath.Path(os.path.abspath(text))
    gcs.check_url(text, "--workdir")
    gcs.check_reachable(text, "--workdir")
    return epath.Path(text)


def prepare_workdir(path: str, create: bool = True) -> epath.Path:
    """The workdir, created; the names we write there must not be planted links."""
    workdir = workdir_path(path)
    try:
        if workdir.exists() and not workdir.is_dir():
            raise UserError(f"--workdir {path} is a file, not a directory; choose another path")
        if create:
            workdir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, LEDGER_FILE, CHECKPOINT_DIR, LOCK_FILE):
            safefs.refuse_symlink(workdir / name)
        if (workdir / METRICS_FILE).exists() and not (workdir / METRICS_FILE).is_file():
            raise UserError(f"{workdir / METRICS_FILE} is not a regular file; move it away")
    except safefs.UnsafePath as e:
        raise UserError(f"{e.filename} {e.strerror}") from None
    except OSError as e:
        raise UserError(f"cannot write to --workdir {path}: {e.strerror or e}") from None
    return workdir


def lock_workdir(workdir: epath.Path, log: Callable[[str], None]) -> Lock:
    """Take the workdir's lock before anything touches its checkpoints (a second train
    would delete the first one's in-flight save), or say who holds it (on gs://, a
    lease object: workdir_lock)."""
    try:
        lock = workdir_lock(workdir, "lenet-dist train", log).acquire()
    except Busy as e:
        raise Failure(f"--workdir {workdir} is in use by {e}; wait for it to finish, stop "
                      "it, or use another --workdir") from None
    except OSError as e:  # a permission is the user's to fix (2); storage may recover (42)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot lock --workdir {workdir}: {e.strerror or e}") from None
        kind = Failure if safefs.is_local(workdir) else Restartable
        raise kind(f"cannot lock --workdir {workdir}: {e.strerror or e}") from None
    if lock.stale:
        log(f"note: took over the lock of a run that is no longer running "
            f"({describe_holder(lock.stale)})")
    return lock


def write_metrics(workdir: epath.Path, history: Sequence[EpochRecord]) -> None:
    """Rewrite metrics.jsonl from the history in one rename (object stores cannot
    append; a planted link is never written through)."""
    safefs.write_atomic(workdir / METRICS_FILE, to_lines(history))


def start_metrics(workdir: epath.Path, history: Sequence[EpochRecord],
                  log: Callable[[str], None], resumed_at: int | None = None) -> None:
    """metrics.jsonl for the run that starts now: the restored history. A file that is
    not this run's (a previous run's, after its checkpoints proved bad or with
    --no-checkpoint) is renamed to metrics-<time>.jsonl, never copied: a copy through
    a bounded reader lost everything past its limit. Resumed from the checkpoint at
    step `resumed_at`, the file is this run's when it holds the restored history and
    then only epochs past that step (written before a later checkpoint was lost): those
    are dropped, to be trained again."""
    path = workdir / METRICS_FILE
    mine = to_lines(history).encode()
    try:
        if not path.exists():
            return write_metrics(workdir, history)
        size = path.stat().length
        # Resumed, the whole file (bounded) is judged; else its head against the history.
        whole_file = resumed_at is not None and size <= MAX_METRICS_BYTES
        head = safefs.read_file(path, size if whole_file else max(len(mine), 4096),
                                follow=False)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    whole = size <= len(head)
    empty = whole and not head.strip()
    ours = head[: len(mine)] == mine and (
        _only_after(head[len(mine):], resumed_at) if resumed_at is not None and whole
        else bool(history))
    if not empty and not ours:
        kept = safefs.keep_aside(path)
        log(f"note: {path} held another run's metrics; kept as {kept}")
    write_metrics(workdir, history)


def read_ledger(workdir: epath.Path, log: Callable[[str], None]) -> list[dict]:
    """The attempts <workdir>/ledger.json holds; [] when there is none. A file that is
    not a ledger (or is too big) is noted and replaced, never trusted."""
    path = workdir / LEDGER_FILE
    try:
        if not path.exists():
            return []
        raw = safefs.read_file(path, MAX_LEDGER_BYTES, follow=False)
        attempts = json.loads(raw) if len(raw) <= MAX_LEDGER_BYTES else None
        if isinstance(attempts, list) and all(map(_is_attempt, attempts)):
            return attempts
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    log(f"note: {path} is not a ledger lenet-dist can read; this run's attempts "
        "replace it")
    return []


def _is_attempt(attempt) -> bool:
    """What ledger.with_lost reads is there: numbers of seconds, steps as int or null."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not (isinstance(attempt, dict) and isinstance(attempt.get("seconds"), dict)
            and isinstance(attempt.get("steps"), dict)):
        return False
    return (all(number(v) for v in attempt["seconds"].values())
            and all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                    for v in (attempt["steps"].get("from"), attempt["steps"].get("to"))))


def write_ledger(workdir: epath.Path, attempts: Sequence[dict]) -> None:
    """Rewrite ledger.json in one rename, as metrics.jsonl is (gs:// included)."""
    safefs.write_atomic(workdir / LEDGER_FILE, json.dumps(list(attempts), indent=1) + "\n")


MAX_LEDGER_BYTES = 16 * 2**20  # ~50k attempts
MAX_METRICS_BYTES = 64 * 2**20  # ~100k epochs; a longer file is judged by its head


def _only_after(rest: bytes, step: int) -> bool:
    """True if `rest` holds only epoch records past `step` (this run's own, from before
    the checkpoint it resumed from was lost)."""
    try:
        return all(record.step > step for record in from_lines(rest.decode()))
    except (UnicodeDecodeError, ValueError):
        return False


def read_metrics(path: str | os.PathLike) -> list[EpochRecord]:
    """The records of a metrics.jsonl file (a workdir's METRICS_FILE). OSError when it
    cannot be read, ValueError (naming the line) when a line is not a record."""
    return from_lines(epath.Path(path).read_text())


# ------------------------------------------------------------ the run readers read

def trained_runs(root: str = RUNS_DIR) -> list[str]:
    """The runs under `root` (its directories holding a config.json, which `train`
    writes when it starts), the one trained last at the end; [] when there are none."""
    found = []
    try:
        entries = list(os.scandir(root))
    except OSError:  # no ./runs/, or not readable: no runs to choose from
        return []
    for entry in entries:
        try:
            stamp = os.stat(os.path.join(entry.path, CONFIG_FILE)).st_mtime_ns
        except (OSError, ValueError):
            continue
        found.append((stamp, entry.name))
    return [os.path.join(root, name) for _, name in sorted(found)]


def run_to_read(workdir: str | None) -> str:
    """The run eval, export, checkpoints, report and predict read: `workdir`, else
    DEFAULT_RUN, where `train` with no options writes: one place, whatever ran last.
    "The run trained last" exported the Python API example's 0.59 run instead of
    `make train`'s 0.72 one after the README's commands in order. When DEFAULT_RUN
    holds no run and others exist, the refusal lists them."""
    if workdir is not None:
        return workdir
    if os.path.exists(os.path.join(DEFAULT_RUN, CONFIG_FILE)):
        return DEFAULT_RUN
    others = trained_runs()
    if others:
        listed = ", ".join(others[-5:][::-1]) + (f" and {len(others) - 5} more"
                                                 if len(others) > 5 else "")
        raise UserError(f"no run in {DEFAULT_RUN} (where `lenet-dist train` writes by "
                        f"default); give --workdir, one of: {listed}")
    return DEFAULT_RUN  # the command then says there is nothing there to read


# ------------------------------------------------------------------- the lock

def lock_path(workdir: epath.Path | str) -> str:
    """The lock's path: a file locally, the lease's object URL on gs://."""
    return os.fspath(workdir).rstrip("/") + "/" + LOCK_FILE


class WorkdirLock:
    """An exclusive flock on <workdir>/lock, with who holds it written inside.

    The kernel drops a flock when its holder dies, however it dies, so a lock left
    by a killed run is simply free: taking it over needs no guessing from PIDs or
    ages (which would be wrong across hosts). `stale` says whose it was.
    Works on local disks and NFSv4; a gs:// workdir holds a lease instead (lease.Lease).
    """

    def __init__(self, workdir: epath.Path | str, command: str):
        self.path = lock_path(workdir)
        self.command = command
        self.fd: int | None = None
        self.stale: dict = {}

    def acquire(self) -> "WorkdirLock":
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise safefs.UnsafePath(errno.ELOOP, "is a symlink; remove it", self.path) from None
            raise
        try:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind != stat.S_IFREG:
                raise safefs.UnsafePath(
                    errno.EINVAL, f"is {safefs.describe_mode(kind)}, not a lock file", self.path)
            for attempt in range(5):  # `lock_holder` peeks with a brief shared lock
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 4:
                        raise Busy(read_holder(fd)) from None
                    time.sleep(0.02)
            self.stale = read_holder(fd)  # a holder recorded but not locking: it died
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds"), "command": self.command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def check(self) -> None:
        """Held until released: the kernel drops a flock only with its holder (a
        gs:// lease can be lost while its holder runs: lease.Lease.check)."""

    def release(self) -> None:
        """Clear the holder record, then unlock (the file stays: unlinking a lock
        file races with the next process that opened it)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


Lock = WorkdirLock | lease.Lease


def workdir_lock(workdir: epath.Path | str, command: str, log=None) -> Lock:
    """The workdir's lock, not yet taken: a flock locally, a lease object on gs://
    (`log` hears that it watches a lease before taking it over)."""
    if safefs.is_local(workdir):
        return WorkdirLock(workdir, command)
    return lease.Lease(lock_path(workdir), command, log=log)


def read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        holder = json.loads(text) if text else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(workdir: epath.Path | str) -> dict | None:
    """Who holds the workdir's lock now (None if nobody), without taking it."""
    if not safefs.is_local(workdir):
        return lease.lease_holder(lock_path(workdir))
    path = lock_path(workdir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:  # a shared lock succeeds only when nobody holds the exclusive one
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(fd)
        return None
    finally:
        os.close(fd)
