"""Files in directories we do not control: no planted symlink is followed, no reader
sees a half-written file, no special file blocks us, and one writer per workdir.

Stdlib only (plus etils.epath, lenet_dist.gcs and .lease for gs:// workdirs), so every module
may use it.
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
import tempfile
import time
from typing import BinaryIO

# First: it makes etils.epath reach gs:// through fsspec + gcsfs (its docstring says why).
from lenet_dist import gcs  # isort: skip

from etils import epath  # noqa: E402

from lenet_dist import lease  # noqa: E402
from lenet_dist.errors import Busy, Failure, describe_holder  # noqa: E402, F401 - Busy: the lock's API

LOCK_FILE = "lock"
# The process's umask, read once at import (reading it means setting it): files made
# through mkstemp (0600) get the mode an ordinary open() would have given them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class UnsafePath(OSError):
    """A path that is a symlink, a FIFO, a device or a directory where a regular
    file is expected; the message says which."""


def is_local(path: epath.Path | str) -> bool:
    return "://" not in os.fspath(path)


# ------------------------------------------------------------------- reading


def open_regular(path: str | os.PathLike, follow: bool = True) -> BinaryIO:
    """Open a regular file for reading; never blocks on a FIFO or a device.

    O_NONBLOCK makes opening a FIFO return at once, and fstat on the open
    descriptor (not the name, which may change in between) rejects anything but
    a regular file. `follow=False` also refuses a symlink (files we wrote ourselves).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise UnsafePath(errno.ELOOP, "is a symlink; refusing to follow it",
                             os.fspath(path)) from None
        raise
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise UnsafePath(errno.EINVAL, f"is {describe_mode(kind)}, not a regular file",
                             os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int, follow: bool = True) -> bytes:
    """At most `limit` + 1 bytes of a regular file (the caller checks the size)."""
    with open_regular(path, follow=follow) as f:
        return f.read(limit + 1)


def read_file(path: epath.Path | str, limit: int, follow: bool = True) -> bytes:
    """`read_regular` for local paths; object stores (gs://) have no special files."""
    if is_local(path):
        return read_regular(path, limit, follow=follow)
    return epath.Path(path).read_bytes()[: limit + 1]


def describe_mode(kind: int) -> str:
    return {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR:
            "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket",
            stat.S_IFLNK: "a symlink"}.get(kind, "a special file")


# ------------------------------------------------------------------- writing


def refuse_symlink(path: epath.Path | str) -> None:
    """A name we write or create in a workdir must not be a link planted there."""
    if is_local(path) and os.path.islink(path):
        raise UnsafePath(errno.ELOOP, "is a symlink; lenet-dist does not write through "
                         "links in a workdir (remove it)", os.fspath(path))


def refuse_special(path: str) -> None:
    """Only a regular file (or nothing) may be replaced by a file we write."""
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
    except FileNotFoundError:
        return
    if kind not in (stat.S_IFREG, stat.S_IFLNK):  # links: refuse_symlink's message
        raise UnsafePath(errno.EEXIST, f"is {describe_mode(kind)}; lenet-dist writes a file "
                         "only where nothing or a regular file is (choose a file path)", path)


def keep_aside(path: epath.Path) -> epath.Path:
    """Rename `path` to <stem>-<time>[-N]<suffix> beside it, whole, whatever its size."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for n in range(100):
        kept = path.with_name(f"{path.stem}-{stamp}{f'-{n}' if n else ''}{path.suffix}")
        if is_local(kept):
            try:  # link + unlink: never over an existing name (rename would replace it)
                os.link(path, kept)
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EXDEV) and not kept.exists():
                    os.rename(path, kept)  # a filesystem without hard links
                    return kept
                raise Failure(f"cannot keep {path} aside as {kept}: {e.strerror}") from None
            os.unlink(path)
            return kept
        if not kept.exists():
            move(path, kept)
            return kept
    raise Failure(f"cannot keep {path} aside: 100 names {path.stem}-{stamp}-N are taken")


def move(path: epath.Path | str, target: epath.Path | str) -> None:
    """Rename a file or a directory; in an object store, copy its objects then delete
    them (gcs.move), since a bucket cannot rename a folder."""
    if is_local(path):
        os.rename(path, target)
    else:
        gcs.move(os.fspath(path), os.fspath(target))


def write_atomic(path: epath.Path | str, data: str | bytes) -> None:
    """Replace `path` with `data` in one rename: readers see the old or the new file.

    Locally the temporary file gets a unique name created with O_EXCL (so a link
    planted under any name is never written through), is fsynced, and renamed over
    `path`, which replaces a directory entry and never follows a link there;
    a symlink at `path` is refused all the same, since someone meant it, and so is
    anything but a regular file (a rename would replace /dev/full, a FIFO, a socket or
    an empty directory with our file; checked again just before the rename).
    On object stores (gs://) a write is already atomic.
    """
    raw = data.encode() if isinstance(data, str) else data
    if not is_local(path):
        epath.Path(path).write_bytes(raw)
        return
    path = os.fspath(path)
    refuse_symlink(path)
    refuse_special(path)
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        refuse_special(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_dir(path: epath.Path | str) -> None:
    """mkdir -p that refuses a symlink at the final name (a planted `checkpoints`
    link would send our writes, and Orbax's clean-ups, somewhere else)."""
    refuse_symlink(path)
    epath.Path(path).mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------- locking


class WorkdirLock:
    """An exclusive flock on <workdir>/lock, with who holds it written inside.

    The kernel drops a flock when its holder dies, however it dies, so a lock left
    by a killed run is simply free: taking it over needs no guessing from PIDs or
    ages (which would be wrong across hosts). `stale` says whose it was.
    Works on local disks and NFSv4; a gs:// workdir holds a lease instead (lease.Lease).
    """

    def __init__(self, workdir: epath.Path | str, command: str):
        self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
        self.command = command
        self.fd: int | None = None
        self.stale: dict = {}

    def acquire(self) -> "WorkdirLock":
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(errno.ELOOP, "is a symlink; remove it", self.path) from None
            raise
        try:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind != stat.S_IFREG:
                raise UnsafePath(errno.EINVAL, f"is {describe_mode(kind)}, not a lock file",
                                 self.path)
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
    if is_local(workdir):
        return WorkdirLock(workdir, command)
    return lease.Lease(os.fspath(workdir), command, log=log)


def read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        holder = json.loads(text) if text else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(workdir: epath.Path | str) -> dict | None:
    """Who holds the workdir's lock now (None if nobody), without taking it."""
    if not is_local(workdir):
        return lease.lease_holder(os.fspath(workdir))
    path = os.path.join(os.fspath(workdir), LOCK_FILE)
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
