"""Crash-safe publishing of a verified model directory: whenever the process stops,
`out` holds a complete model, the old one or the new one.

Refuses any `out` whose replacement could destroy what is not a model
(`check_destination`). Publishing is one atomic renameat2 where the system allows it,
else two renames (`publish` says which guarantee holds where); a gs:// `out` is an
upload with saved_model.pb last (`publish_remote`: object stores have no rename). The
next export to the same `out` cleans up, or puts back, what an export killed mid-way
left beside it (`recover_leftovers`). No TensorFlow or JAX here: plain files only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from etils import epath

from lenet_dist import edge, faults, gcs
from lenet_dist.rundir import CHECKPOINT_DIR
from lenet_dist.errors import Failure, UserError, first_line

PUBLISH_POINTS = faults.PUBLISH_POINTS  # where a kill must leave `out` a complete model


def check_destination(out: Path, overwrite: bool, workdir: Path | str) -> None:
    """Refuse any --out whose replacement could destroy something that is not a model.

    `out` and `workdir` are resolved paths (`workdir` may be a gs:// URL: then a local
    `out` cannot touch it)."""
    precious = [(Path.cwd(), "the current directory")]
    if isinstance(workdir, Path):
        precious.insert(0, (workdir, "the training run"))
    for place, what in precious:
        if out == place or out in place.parents:
            raise UserError(f"--out {out} would replace {what} ({place}); "
                            "choose a new directory, e.g. serving/lenet/1")
    if isinstance(workdir, Path) and workdir in out.parents \
            and (workdir / CHECKPOINT_DIR) in (out, *out.parents):
        raise UserError(f"--out {out} is inside the checkpoints of {workdir}; choose another")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise UserError(f"cannot read {out}: {e.strerror}") from None
    if empty:
        return
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if not (out / "saved_model.pb").is_file():
        raise UserError(f"{out} is not a SavedModel (no saved_model.pb); --overwrite only "
                        "replaces an exported model, so move it away yourself")
    refuse_foreign(out, foreign_entries(out))


# What an export publishes, and nothing else: --overwrite replaces a directory only when
# every entry in it is one of these (a run's checkpoints kept inside an old export, a
# notes file or a second model in D/2 were deleted with it). The TFLite and ONNX models
# are edge.FILES.
PUBLISHED = re.compile(r"saved_model\.pb|fingerprint\.pb|variables|assets|assets\.extra"
                       r"|variables/variables\.(index|data-\d{5}-of-\d{5})"
                       r"|assets/labels\.txt|assets\.extra/(metadata\.json|reference\.npz)"
                       r"|" + "|".join(re.escape(f) for f in edge.FILES.values()))
PUBLISHED_DIRS = {"variables", "assets", "assets.extra"}


def foreign_entries(out: Path | epath.Path) -> list[str]:
    """Entries under `out` (relative, sorted) that no export writes; links count as
    foreign locally (we never write one)."""
    foreign = []
    for top in sorted(out.iterdir(), key=lambda p: p.name):
        rel = top.name
        is_link = isinstance(top, Path) and top.is_symlink()
        if is_link or not PUBLISHED.fullmatch(rel):
            foreign.append(rel)
        elif rel in PUBLISHED_DIRS:
            if not top.is_dir():
                foreign.append(rel)
                continue
            for child in sorted(top.iterdir(), key=lambda p: p.name):
                sub = f"{rel}/{child.name}"
                if (isinstance(child, Path) and child.is_symlink()) \
                        or not PUBLISHED.fullmatch(sub) or child.is_dir():
                    foreign.append(sub)
        elif top.is_dir():
            foreign.append(rel)
    return foreign


def refuse_foreign(out, foreign: list[str]) -> None:
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                          if len(foreign) > 3 else "")
        raise UserError(f"{out} holds what no export writes ({shown}); --overwrite only "
                        "replaces an exported model, so move those away yourself")


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def destination(path: str) -> Path | str:
    """A local path resolved, or a URL (gs://) kept as text: pathlib would read
    gs://bucket/x as the local directory gs:/bucket/x."""
    if is_remote(path):
        gcs.check_url(path, "--out")
        return path.rstrip("/")
    return Path(path).resolve()


def check_remote_destination(out: str, overwrite: bool, workdir: Path | str) -> None:
    """`check_destination` for a gs:// --out: never the run, nor inside its
    checkpoints; an existing model only with --overwrite, anything else never."""
    work = os.fspath(workdir).rstrip("/")
    if is_remote(work) and (out == work or work.startswith(out + "/")):
        raise UserError(f"--out {out} would replace the training run ({work}); "
                        "choose a new directory, e.g. gs://bucket/serving/lenet/1")
    if is_remote(work) and (out + "/").startswith(f"{work}/checkpoints/"):
        raise UserError(f"--out {out} is inside the checkpoints of {work}; choose another")
    gcs.check_reachable(out, "--out")
    target = epath.Path(out)
    try:
        if target.is_file():
            raise UserError(f"{out} exists and is not a directory; choose another --out")
        if not target.is_dir() or not any(target.iterdir()):
            return
        has_model = (target / "saved_model.pb").is_file()
    except OSError as e:
        raise UserError(f"cannot read {out}: {e.strerror or e}") from None
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if not has_model:
        raise UserError(f"{out} is not a SavedModel (no saved_model.pb); --overwrite only "
                        "replaces an exported model, so move it away yourself")
    try:
        foreign = foreign_entries(target)
    except OSError as e:
        raise UserError(f"cannot read {out}: {e.strerror or e}") from None
    refuse_foreign(out, foreign)


def publish_remote(model_dir: Path, out: str, overwrite: bool, workdir: Path | str) -> None:
    """Upload the verified model to a gs:// `out`. Object stores cannot rename a
    directory, so the model appears when its saved_model.pb does, which is written
    last (loaders and TF Serving look for it first). --overwrite deletes the old model
    first, its saved_model.pb before the rest: readers see the old model, no model,
    or the new one, never a mix. A killed upload leaves files without
    saved_model.pb, which the next export refuses to replace (it is not a model)."""
    check_remote_destination(out, overwrite, workdir)  # again: minutes may have passed
    target = epath.Path(out)
    try:
        if (target / "saved_model.pb").exists():
            (target / "saved_model.pb").unlink()
            target.rmtree()
        faults.point("publish:before-move")
        gcs.upload_tree(model_dir, out, last="saved_model.pb")
    except OSError as e:
        raise Failure(f"cannot upload the exported model to {out}: "
                      f"{e.strerror or first_line(e)}") from None
    faults.point("publish:moved")


AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2
# renameat2 missing (not Linux, glibc < 2.28, kernel < 3.15) or its flags refused by
# the filesystem (EINVAL, e.g. NFS): publish with two renames instead.
NO_RENAMEAT2 = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)
SET_ASIDE = "old"  # the two-rename path parks the old model at <staging>/old
LEGACY_STAGING_AGE_S = 3600  # stagings without an owner in their name (older versions)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """Linux's renameat2(2) through ctypes; OSError(ENOSYS) where libc lacks it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) \
        if sys.platform.startswith("linux") else None
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here", os.fspath(src))
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def this_host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown-host"


def make_staging(out: Path) -> Path:
    """`.NAME.staging-HOST-PID-RANDOM` beside `out`: the name says whose it is, so the
    next export can tell a leftover from a staging directory still in use."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{this_host()}-{os.getpid()}-",
                                 dir=out.parent))


def fsync_tree(path: Path) -> None:
    """Flush the model's files and directories before the rename that publishes them:
    otherwise a crash of the machine (not of the process) could keep the rename and
    lose the data, leaving `out` with empty files."""
    for root, _, files in os.walk(path):
        for name in [*files, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def publish(staging_model: Path, out: Path, overwrite: bool, workdir: Path) -> None:
    """Put the verified model at `out` so that, whenever this process stops, `out`
    holds a complete model: the old one or the new one.

    With renameat2 (Linux >= 3.15, glibc >= 2.28, a local filesystem) publishing is one
    atomic step: RENAME_NOREPLACE when `out` is free, RENAME_EXCHANGE when it holds a
    model, after which the old model is at `staging_model` and is deleted. No moment
    exists without a model at `out`, whether the process is interrupted or killed.
    Elsewhere (NFS, other systems) it takes two renames: `out` -> <staging>/old, then
    the model -> `out`. An exception between them puts the old model back; a kill -9
    between them leaves `out` missing until the next export to it restores the old
    model from <staging>/old (`recover_leftovers`).
    """
    check_destination(out, overwrite, workdir)  # again: minutes may have passed
    fsync_tree(staging_model)
    faults.point("publish:checked")
    for _ in range(3):  # `out` may appear or vanish between our look and the rename
        exchange = os.path.lexists(out)
        faults.point("publish:before-move")
        try:
            renameat2(staging_model, out, RENAME_EXCHANGE if exchange else RENAME_NOREPLACE)
            break
        except OSError as e:
            if e.errno in NO_RENAMEAT2:
                return publish_by_two_renames(staging_model, out)
            if e.errno not in (errno.EEXIST, errno.ENOENT) or not staging_model.is_dir():
                raise Failure(f"cannot move the exported model to {out}: {e.strerror}") \
                    from None
            check_destination(out, overwrite, workdir)  # someone else is writing there
    else:
        raise Failure(f"{out} keeps appearing and vanishing; is another export writing it?")
    faults.point("publish:moved")
    fsync_dir(out.parent)
    if exchange:
        shutil.rmtree(staging_model, ignore_errors=True)  # the old model, swapped out
    faults.point("publish:old-deleted")


def publish_by_two_renames(staging_model: Path, out: Path) -> None:
    """`publish` where renameat2 is missing: the old model is parked inside our staging
    directory, where `recover_leftovers` finds it if we are killed before the second rename."""
    set_aside = staging_model.with_name(SET_ASIDE)
    had_old = os.path.lexists(out)
    try:
        if had_old:
            os.rename(out, set_aside)
    except OSError as e:
        raise Failure(f"cannot move the old model at {out} aside: {e.strerror}") from None
    try:
        if had_old:
            faults.point("publish:set-aside")
        os.rename(staging_model, out)
    except BaseException as e:  # including Ctrl-C between the two renames
        if had_old:
            os.rename(set_aside, out)
        if isinstance(e, OSError):
            raise Failure(f"cannot move the exported model to {out}: {e.strerror}") from None
        raise
    faults.point("publish:moved")
    fsync_dir(out.parent)
    if had_old:
        shutil.rmtree(set_aside, ignore_errors=True)
    faults.point("publish:old-deleted")


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def leftover_owner(out_name: str, entry: str) -> tuple[str, str | None, int | None] | None:
    """("staging", host, pid) or ("old", None, pid) for what an export to `out_name`
    leaves beside it; host and pid are None where the name (older versions) lacks them."""
    staging, old = f".{out_name}.staging-", f".{out_name}.old-"
    if entry.startswith(staging):
        parts = entry[len(staging):].rsplit("-", 2)  # HOST-PID-RANDOM; HOST may hold '-'
        if len(parts) == 3 and parts[1].isdigit():
            return "staging", parts[0], int(parts[1])
        return "staging", None, None
    if entry.startswith(old) and entry[len(old):].isdigit():  # versions before renameat2
        return "old", None, int(entry[len(old):])
    return None


def owner_gone(host: str | None, pid: int) -> bool:
    """True only when we can tell the owner is dead: on this host, a PID that no
    process has (or our own: this process runs one export at a time and calls this
    before making its staging directory). Another host's owner is never judged."""
    if host not in (None, this_host()) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def recover_leftovers(out: Path) -> str | None:
    """Clean up what exports to `out` that were killed left beside it; returns one
    line saying what was done (None when there was nothing).

    Only leftovers whose owner is gone are touched. If `out` is missing (a kill between
    the two renames of the fallback path, or of older versions), the model that was
    there before is put back: <staging>/old, or a legacy `.NAME.old-PID`. Stagings from
    another host, or (older versions) with no owner in the name and under an hour old,
    are left alone and named, since their export may still be running.
    """
    try:
        found = [(e, owner) for e in os.scandir(out.parent)
                 if (owner := leftover_owner(out.name, e.name)) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return None
    restored, removed, kept = [], [], []
    for entry, (kind, host, pid) in sorted(found, key=lambda f: age(f[0])):  # newest first
        if pid is None:
            if age(entry) < LEGACY_STAGING_AGE_S:
                kept.append(f"{entry.name} (no owner recorded, under an hour old)")
                continue
        elif not owner_gone(host, pid):
            if host not in (None, this_host()):
                kept.append(f"{entry.name} (from {host}; remove it if no export runs there)")
            continue  # a live export's: not ours to touch
        path = Path(entry.path)
        previous = path / SET_ASIDE if kind == "staging" else path
        if previous.is_dir() and not os.path.lexists(out):
            if not restore(previous, out):
                kept.append(f"{entry.name} (holds the model that was at {out}; "
                            "move it back yourself)")
                continue
            restored.append(entry.name)
            if previous == path:
                continue  # a legacy .NAME.old-PID: it is `out` again
        shutil.rmtree(path, ignore_errors=True)
        (kept if os.path.lexists(path) else removed).append(entry.name)
    parts = ([f"restored the model that was at {out} before an interrupted export "
              f"(from {restored[0]})"] if restored else [])
    parts += [f"removed {len(removed)} leftover(s) of killed exports: {', '.join(removed)}"
              ] if removed else []
    parts += [f"left {', '.join(kept)}"] if kept else []
    return "warning: " + "; ".join(parts) if parts else None


def age(entry: os.DirEntry) -> float:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return float("inf")


def restore(previous: Path, out: Path) -> bool:
    """Move a set-aside model back to the free name `out` (never over something there)."""
    try:
        renameat2(previous, out, RENAME_NOREPLACE)
    except OSError as e:
        if e.errno not in NO_RENAMEAT2:
            return False
        try:
            os.rename(previous, out)
        except OSError:
            return False
    fsync_dir(out.parent)
    return True
