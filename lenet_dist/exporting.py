"""Checkpoint -> TensorFlow SavedModel through jax2tf, verified before it is published.

The SavedModel is built in a staging directory next to `out`, loaded back and
compared with JAX on reference images, and only then moved into place, so a
failed export never leaves a half-written model or touches an existing one.
With --format tflite/onnx (and --quantize int8) the TFLite and ONNX models are made
from that SavedModel, checked against JAX too, and published inside the same directory
(edge.py). A gs:// `out` is built and checked in a local temporary directory, then uploaded
with saved_model.pb last (`publish_remote`: object stores have no rename).
Publishing is one atomic rename where the system allows it (`publish` says which
guarantee holds where), and the next export to the same `out` cleans up, or puts
back, what an export killed mid-way left beside it (`recover_leftovers`).
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from etils import epath

from lenet_dist import data as data_lib
from lenet_dist import distributed, edge, faults, gcs, serialization, tempdirs, versions
from lenet_dist import serving_contract as contract
from lenet_dist.config import DEFAULT_EXPORT_PLATFORMS, EXPORT_PLATFORMS, dataset_kind
from lenet_dist.errors import Failure, UserError, first_line
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.restore import restore_checkpoint
from lenet_dist.runtime import import_tensorflow
from lenet_dist.sources import load_dataset
from lenet_dist.step import infer, infer_logits

REFERENCE_IMAGES = 256
# Export-time agreement bound between the SavedModel and JAX (measured: 5e-7 to 2e-6).
VERIFY_TOLERANCE = 1e-5
FORMAT_VERSION = 1


def parse_platforms(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in items if p.strip()))
    bad = [p for p in chosen if p not in EXPORT_PLATFORMS]
    if bad or not chosen:
        given = ",".join(items) or "''"
        raise UserError(f"--platforms {given}: choose from {', '.join(EXPORT_PLATFORMS)}")
    return chosen


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
            and (workdir / "checkpoints") in (out, *out.parents):
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
        gcs.check_installed(path)
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


def local_dataset(config, data_dir: str | None) -> data_lib.Dataset | None:
    """The run's dataset when it is on this machine (never downloaded), else None."""
    config = config.replace(data_dir=data_dir)
    if dataset_kind(config.dataset)[0] == "builtin" and \
            data_lib.resolve_source(config.dataset, config.data_dir)[0] == "download":
        return None
    try:
        return load_dataset(config, log=lambda _: None)
    except UserError:
        return None


def reference_batch(dataset: data_lib.Dataset | None, n: int = REFERENCE_IMAGES):
    """The first `n` test images (and labels), or fixed random pixels when the
    dataset is not on this machine."""
    if dataset is not None:
        split = dataset.test.take(n)
        return (np.asarray(split.images), np.asarray(split.labels),
                f"{dataset.name} test set")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return images, np.full((n,), -1, np.int32), "random pixels"


def build_module(tf, variables, platforms: Sequence[str], labels_file: Path):
    """A tf.Module whose `serve` is the jax2tf-converted `infer` (its logits; the softmax
    and argmax are TensorFlow ops, which TFLite converts too); the model's variables
    (parameters, and BatchNorm statistics for the modern recipe) are tf.Variables, kept
    under the attribute `params` that exported models have always had."""
    from jax.experimental import jax2tf  # imports TensorFlow: only once a model is built

    module = tf.Module()
    module.params = jax.tree_util.tree_map_with_path(
        lambda path, x: tf.Variable(np.asarray(x), trainable=False,
                                    name="/".join(str(getattr(k, "key", k)) for k in path)),
        variables)
    module.labels = tf.saved_model.Asset(str(labels_file))
    converted = jax2tf.convert(infer_logits, polymorphic_shapes=[None, "(b, 28, 28, 1)"],
                               with_gradient=False,
                               native_serialization_platforms=tuple(platforms))

    @tf.function(autograph=False, input_signature=contract.input_signature(tf))
    def serve(images):
        return contract.outputs_from_logits(tf, converted(module.params, images))

    module.serve = serve
    return module


def save_savedmodel(tf, variables, staging: Path, platforms: Sequence[str],
                    class_names: Sequence[str], plan: serialization.Plan) -> Path:
    """Write the SavedModel to staging/model with `plan`'s serialization versions."""
    labels_file = staging / contract.LABELS_ASSET.name  # the Asset copies it to assets/
    labels_file.write_text("\n".join(class_names) + "\n")
    module = build_module(tf, variables, platforms, labels_file)
    model_dir = staging / "model"
    # Saving traces `serve` again (for the restored object's own method), so the
    # save must happen under the plan too; then check what was actually written.
    with serialization.serialize_for(plan):
        concrete = module.serve.get_concrete_function()
        tf.saved_model.save(module, str(model_dir), signatures={contract.SIGNATURE: concrete})
    serialization.check_saved_model(model_dir, plan)
    return model_dir


def jax_reference(variables, images: np.ndarray) -> dict[str, np.ndarray]:
    """JAX's outputs computed on the CPU, where float32 convolutions are exact float32
    (GPU/TPU defaults may use reduced precision, which is not what is being checked)."""
    cpu = jax.devices("cpu")[0]
    out = jax.jit(infer)(jax.device_put(variables, cpu), jax.device_put(images, cpu))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def verify(tf, model_dir: Path, images: np.ndarray, expected: dict) -> float:
    """Load what was written and run its CPU lowering at batch 1, 7 and all;
    returns max |logits - JAX|."""
    loaded = tf.saved_model.load(str(model_dir))  # kept: the restored method runs too
    served = contract.serving_signature(loaded)
    worst = 0.0
    for n in sorted({1, min(7, len(images)), len(images)}):
        try:
            with tf.device("/CPU:0"):
                out = contract.call_signature(tf, served, images[:n])
                loaded.serve(tf.constant(images[:n]))  # the restored method, too
        except Exception as e:  # TF raises many types; all mean "cannot serve"
            raise UserError("the exported SavedModel fails when TensorFlow runs it: "
                            f"{first_line(e)}") from None
        diff = np.abs(out["logits"] - expected["logits"][:n])
        worst = max(worst, float(np.max(diff)) if np.all(np.isfinite(diff)) else np.inf)
        if not np.array_equal(out["classes"], expected["classes"][:n]):
            raise UserError(f"the exported SavedModel's classes differ from JAX at batch {n}")
    if not worst <= VERIFY_TOLERANCE:
        raise UserError(f"the exported SavedModel's logits differ from JAX by {worst:.2e} "
                        f"(> {VERIFY_TOLERANCE:g})")
    return worst


def savedmodel_bytes(model_dir: Path) -> int:
    """What TensorFlow loads: saved_model.pb and variables/ (as the kit's checker counts)."""
    files = [model_dir / "saved_model.pb", *(model_dir / "variables").glob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


# ------------------------------------------------------------------- publishing

PUBLISH_POINTS = faults.PUBLISH_POINTS  # where a kill must leave `out` a complete model
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


def export_checkpoint(workdir: str, out: str, step: int | None = None, best: bool = False,
                      platforms: Sequence[str] = DEFAULT_EXPORT_PLATFORMS, overwrite: bool = False,
                      data_dir: str | None = None,
                      formats: str | Sequence[str] = ("savedmodel",),
                      quantize: str | None = None,
                      warn: Callable[[str], None] = print) -> dict | None:
    """Export one checkpoint of `workdir` as a SavedModel at `out`, with the TFLite and
    ONNX models of `formats` (and `quantize`) beside it; returns its metadata (None on
    the other processes of a multi-process job: process 0 writes). What earlier, killed
    exports to `out` left behind is recovered first and reported through `warn`."""
    formats = edge.parse_formats(formats)
    quantize = edge.parse_quantize(quantize, formats)
    out_path, work_path = destination(out), destination(workdir)
    remote = is_remote(out_path)
    platforms = parse_platforms(platforms)
    if "cpu" not in platforms:
        raise UserError(f"--platforms {','.join(platforms)}: include cpu; the export is "
                        "checked by running its CPU lowering before it is published")
    # Before TensorFlow: processes that would restore different steps fail together now.
    distributed.check_same_settings({"step": step, "best": best, "platforms": list(platforms),
                                     "overwrite": overwrite, "formats": list(formats),
                                     "quantize": quantize}, "export")

    def prepare():  # only the writer needs --out, TensorFlow and the edge runtimes
        edge.check_installed(formats)
        if remote:
            check_remote_destination(out_path, overwrite, work_path)
            return import_tensorflow(), serialization.installed_plan()
        if out_path.name:
            note = recover_leftovers(out_path)
            if note:
                warn(note)
        check_destination(out_path, overwrite, work_path)
        return import_tensorflow(), serialization.installed_plan()

    tf, plan = distributed.on_primary(prepare) or (None, None)
    # In a job every process takes part in the restore (onto all devices).
    mesh = make_mesh(None if jax.process_count() > 1 else 1)
    restored = restore_checkpoint(workdir, Shardings(mesh), step, best)
    config, chosen, meta = restored.config, restored.step, restored.meta
    # replicated: any one device's copy is the whole value
    variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), restored.variables)
    if not distributed.is_primary():
        return None
    if not all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables)):
        raise UserError(f"checkpoint step {chosen} has NaN or infinite parameters "
                        "(a diverged run); export another with --step")
    class_names = restored.class_names  # one per output of the model

    dataset = local_dataset(config, data_dir)
    images, labels, ref_source = reference_batch(dataset)
    expected = jax_reference(variables, images)
    wanted = edge.models(formats, quantize)
    calibration = check = None
    if quantize:
        if dataset is None:
            raise UserError(f"--quantize {quantize} calibrates on the training images of "
                            f"{config.dataset}, which are not on this machine; give "
                            "--data-dir DIR (its IDX files)")
        calibration = edge.calibration_images(dataset.train.images)
        test = dataset.test
        check = edge.CheckSet(np.asarray(test.images), np.asarray(test.labels),
                              jax_reference(variables, np.asarray(test.images))["classes"],
                              f"{dataset.name} test set")

    try:
        if remote:  # built and checked here, then uploaded (publish_remote)
            staging = Path(tempdirs.mkdtemp("lenet-dist-export-"))
        else:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            staging = make_staging(out_path)
    except OSError as e:
        where = tempfile.gettempdir() if remote else out_path.parent
        raise UserError(f"cannot write in {where}: {e.strerror}") from None
    try:
        model_dir = save_savedmodel(tf, variables, staging, platforms, class_names, plan)
        faults.point("publish:staged")
        max_diff = verify(tf, model_dir, images, expected)
        edge_models = edge.build(tf, model_dir, staging, wanted, images, expected,
                                 calibration, check)
        evaluated = next((r for r in meta.get("history", []) if r.get("step") == chosen), {})
        info = {
            "format": FORMAT_VERSION,
            "model": f"LeNet-5 ({config.recipe} recipe), Flax",
            "recipe": config.recipe,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": {"workdir": str(work_path), "step": chosen,
                           "epoch": meta.get("epoch"),
                           "test_accuracy": evaluated.get("test_accuracy"),
                           "test_loss": evaluated.get("test_loss")},
            "config": config.to_dict(),
            "signature": contract.signature_spec(len(class_names)),
            "class_names": list(class_names),
            "platforms": list(platforms),
            "serialization": plan.to_dict(),
            "versions": {**versions.installed(), "tensorflow": tf.__version__,
                         **(versions.installed(edge.PACKAGES) if wanted else {})},
            "reference": {"file": "assets.extra/reference.npz", "images": len(images),
                          "source": ref_source, "max_abs_logit_diff": max_diff},
            # Each model the directory holds, its size and how it was checked before
            # it was published (edge.py): the SavedModel always, then --format's.
            "formats": {"savedmodel": {"file": "saved_model.pb", "dtype": "float32",
                                       "bytes": savedmodel_bytes(model_dir),
                                       "verified": {"images": len(images),
                                                    "max_abs_logit_diff": max_diff,
                                                    "tolerance": VERIFY_TOLERANCE}},
                        **edge_models},
        }
        extra = model_dir / "assets.extra"
        extra.mkdir()
        (extra / "metadata.json").write_text(json.dumps(info, indent=2) + "\n")
        np.savez_compressed(extra / "reference.npz", images=images, labels=labels,
                            **expected)
        faults.point("publish:verified")
        if remote:
            publish_remote(model_dir, out_path, overwrite, work_path)
        else:
            publish(model_dir, out_path, overwrite, work_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info
