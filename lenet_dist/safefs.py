"""Files in directories we do not control: no planted symlink is followed, no reader
sees a half-written file, and no special file blocks us. (One writer per workdir is
rundir's lock.)

Stdlib only (plus etils.epath and lenet_dist.gcs for gs:// workdirs), so every module
may use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import time
from typing import BinaryIO

# First: it makes etils.epath reach gs:// through fsspec + gcsfs (its docstring says why).
from lenet_dist import gcs  # isort: skip

from etils import epath  # noqa: E402

from lenet_dist.errors import Failure  # noqa: E402

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

