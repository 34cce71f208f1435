"""A user's own labelled images, in class folders, as a data.Dataset: `--dataset folder:PATH`.

Layouts (as Keras's image_dataset_from_directory reads them):

    PATH/train/<class>/**/*.png|jpg|jpeg|gif|bmp   and   PATH/test/<class>/...
    PATH/<class>/...     with --test-fraction F: a fraction F of each class is the test split

Class names are the class folders' names sorted by Unicode code point (Python's `sorted`
of the names): label i is the i-th. Hidden files and folders (a leading dot) are skipped;
files of other suffixes are ignored and counted. Every image goes through predict's
decoder (images.decode_image), so training and serving never disagree on a pixel.

Decoding happens once. The arrays are cached under $LENET_DIST_CACHE_DIR, else
$XDG_CACHE_HOME/lenet-dist, else ~/.cache/lenet-dist, keyed by each file's relative
path, label, size and modification time (ns) plus the decoder's version. Why not a hash
of the contents: reading every byte is most of what decoding costs, while a stat is
cheap, and an edit, a copy or a replacement changes the size or the mtime. What it
misses: a file rewritten with the same size and an mtime reset by hand; delete the
cache file (its path is in the log line) to rebuild.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from lenet_dist import data as data_lib
from lenet_dist import images, safefs
from lenet_dist.errors import UserError
from lenet_dist.model import MAX_CLASSES, MIN_CLASSES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
IMAGE_KINDS = ("png", "jpeg", "gif", "bmp")
# Bump when images.decode_image changes its pixels: every cache is then rebuilt.
DECODER_VERSION = 1
CACHE_ENV = "LENET_DIST_CACHE_DIR"
PROGRESS_FROM = 500  # files; fewer decode in about a second
SPLITS = ("train", "test")


@dataclasses.dataclass
class FolderInfo:
    """What loading a folder found, for the one line `train` logs."""

    root: str
    class_names: tuple[str, ...]
    counts: dict[str, int]
    ignored: int = 0  # files of other suffixes
    skipped: list[str] = dataclasses.field(default_factory=list)  # bad files (--skip-bad-files)
    cache_hit: bool = False
    cache_path: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.counts['train']:,} train / {self.counts['test']:,} test images in "
                 f"{len(self.class_names)} classes from {self.root}"]
        if self.ignored:
            parts.append(f"{self.ignored:,} files of other types ignored")
        if self.skipped:
            shown = ", ".join(self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
            parts.append(f"{len(self.skipped):,} bad files skipped ({shown})")
        how = "read from the cache" if self.cache_hit else "decoded"
        where = f" ({self.cache_path})" if self.cache_path else ""
        parts.append(f"{how} in {self.seconds:.1f} s{where}")
        return "folder dataset: " + "; ".join(parts)


# ---------------------------------------------------------------- the tree


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_dirs(top: Path) -> list[str]:
    try:
        names = sorted(e.name for e in os.scandir(top) if not _is_hidden(e.name)
                       and e.is_dir())
    except OSError as e:
        raise UserError(f"cannot list {top}: {e.strerror or e}") from None
    return names


def _images_under(class_dir: Path, root: Path) -> tuple[list[str], int]:
    """(image paths relative to root, sorted; how many other files) under one class."""
    found, ignored = [], 0
    for here, dirs, files in os.walk(class_dir, onerror=_walk_error):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        for name in sorted(files):
            if _is_hidden(name):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(here, name), root))
            else:
                ignored += 1
    return found, ignored


def _walk_error(e: OSError) -> None:
    raise UserError(f"cannot list {e.filename}: {e.strerror or e}")


def _test_share(relpath: str) -> int:
    """A stable per-file number: a file's split never changes when others are added."""
    return int.from_bytes(hashlib.blake2b(relpath.encode("utf-8", "surrogateescape"),
                                          digest_size=8).digest(), "big")


def scan(root: Path, test_fraction: float | None
         ) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]], int]:
    """(class names, {split: [(relative path, label)]}, ignored files) of a folder."""
    if not root.is_dir():
        raise UserError(f"--dataset folder:{root} does not exist or is not a directory")
    has = {s: (root / s).is_dir() for s in SPLITS}
    ignored = 0
    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    if has["train"] or has["test"]:
        if not (has["train"] and has["test"]):
            missing = "test" if has["train"] else "train"
            raise UserError(f"{root} has {'train' if has['train'] else 'test'}/ but no "
                            f"{missing}/; give both, or class folders at the top with "
                            "--test-fraction")
        if test_fraction is not None:
            raise UserError(f"{root} has its own train/ and test/ splits; drop "
                            "--test-fraction")
        names = {s: _class_dirs(root / s) for s in SPLITS}
        if names["train"] != names["test"]:
            only = sorted(set(names["train"]) ^ set(names["test"]))
            raise UserError(f"{root}/train and {root}/test hold different classes "
                            f"(only in one: {', '.join(only[:5])}); give both the same "
                            "class folders")
        classes = tuple(names["train"])
        _check_class_count(root, classes)
        for split in SPLITS:
            for label, name in enumerate(classes):
                files, other = _images_under(root / split / name, root)
                if not files:
                    raise UserError(f"{root / split / name} holds no images "
                                    f"({', '.join(IMAGE_SUFFIXES)})")
                ignored += other
                splits[split] += [(f, label) for f in files]
        return classes, splits, ignored
    if test_fraction is None:
        raise UserError(f"{root} has no train/ and test/ folders; give --test-fraction F to "
                        "hold out a fraction of each class as the test split")
    classes = tuple(_class_dirs(root))
    _check_class_count(root, classes)
    for label, name in enumerate(classes):
        files, other = _images_under(root / name, root)
        if not files:
            raise UserError(f"{root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        ignored += other
        by_share = sorted(files, key=_test_share)
        n_test = round(test_fraction * len(files))
        test = set(by_share[:n_test])
        splits["test"] += [(f, label) for f in files if f in test]
        splits["train"] += [(f, label) for f in files if f not in test]
    for split in SPLITS:
        if not splits[split]:
            raise UserError(f"--test-fraction {test_fraction:g} leaves the {split} split of "
                            f"{root} empty; give a fraction that keeps images in both")
    return classes, splits, ignored


def _check_class_count(root: Path, classes: tuple[str, ...]) -> None:
    if not MIN_CLASSES <= len(classes) <= MAX_CLASSES:
        raise UserError(f"{root} holds {len(classes):,} class folders; a model needs "
                        f"{MIN_CLASSES} to {MAX_CLASSES:,}")


# ---------------------------------------------------------------- decoding


def decode_file(path: Path) -> np.ndarray:
    """One image file -> uint8 [28, 28, 1], exactly as `predict` decodes it; a UserError
    naming the file when it is not an image this project reads."""
    kind, raw = images.read_input(path)
    if not raw:
        raise UserError(f"{path} is empty")
    if kind not in IMAGE_KINDS:
        raise UserError(f"{path} is not a PNG, JPEG, GIF or BMP image")
    if len(raw) > images.MAX_FILE_BYTES:
        raise UserError(f"{path} is over {images.MAX_FILE_BYTES // 2**20} MiB; images that "
                        "large are refused")
    return images.decode_image(path, raw, kind, invert=False)


def _decode_all(root: Path, splits: dict[str, list[tuple[str, int]]], skip_bad: bool,
                progress: bool) -> tuple[dict[str, data_lib.Split], list[str]]:
    total = sum(len(v) for v in splits.values())
    skipped: list[str] = []
    out = {}
    with tqdm(total=total, unit="img", desc="decoding images", leave=False,
              disable=not progress or total < PROGRESS_FROM) as bar:
        for split, files in splits.items():
            pixels, labels = [], []
            for relpath, label in files:
                try:
                    pixels.append(decode_file(root / relpath))
                    labels.append(label)
                except UserError:
                    if not skip_bad:
                        raise
                    skipped.append(relpath)
                bar.update()
            if not labels:
                raise UserError(f"no image of the {split} split of {root} decodes "
                                f"({len(files):,} skipped as bad)")
            out[split] = data_lib.Split(np.stack(pixels).reshape(-1, *data_lib.IMAGE_SHAPE),
                                        np.asarray(labels, np.int32))
    return out, skipped


# ---------------------------------------------------------------- the cache


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "lenet-dist"


def cache_key(root: Path, splits: dict[str, list[tuple[str, int]]], skip_bad: bool) -> str:
    """A digest of every file's (split, relative path, label, size, mtime_ns) and the
    decoder's version; any change to the tree gives another key."""
    h = hashlib.sha256(f"lenet-dist folder v{DECODER_VERSION} skip={skip_bad}\n".encode())
    for split, files in splits.items():
        for relpath, label in files:
            try:
                st = os.stat(root / relpath)
            except OSError as e:
                raise UserError(f"cannot read {root / relpath}: {e.strerror or e}") from None
            h.update(f"{split}\0{relpath}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def _cache_path(root: Path, key: str) -> Path:
    root_id = hashlib.sha256(os.fsencode(root)).hexdigest()[:16]
    return cache_dir() / f"folder-{root_id}-{key}.npz"


def _read_cache(path: Path, counts: dict[str, int]) -> tuple[dict, list[str]] | None:
    """The cached splits, or None when there is none or it is unreadable or does not
    fit (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for split in SPLITS:
                imgs, labels = z[f"{split}_images"], z[f"{split}_labels"]
                if imgs.dtype != np.uint8 or imgs.shape[1:] != data_lib.IMAGE_SHAPE \
                        or len(imgs) != len(labels):
                    return None
                out[split] = data_lib.Split(imgs, labels.astype(np.int32))
            skipped = [str(s) for s in z["skipped"]]
    except Exception:  # missing, torn, or not ours: decode again  # noqa: BLE001
        return None
    if any(len(out[s]) > counts[s] for s in SPLITS):
        return None
    return out, skipped


def _write_cache(path: Path, splits: dict[str, data_lib.Split], skipped: list[str],
                 log: Callable[[str], None]) -> bool:
    buffer = io.BytesIO()
    np.savez(buffer, skipped=np.asarray(skipped, dtype=str),
             **{f"{s}_{k}": getattr(splits[s], k) for s in SPLITS for k in ("images", "labels")})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        safefs.write_atomic(path, buffer.getvalue())
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(prefix + "*.npz"):  # this folder's earlier versions
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        log(f"note: cannot write the decoded images' cache in {path.parent} "
            f"({e.strerror or e}); the next run decodes them again")
        return False
    return True


# ---------------------------------------------------------------- loading


def load_folder(path: str | os.PathLike, *, test_fraction: float | None = None,
                skip_bad_files: bool = False, progress: bool = True,
                log: Callable[[str], None] = print, use_cache: bool = True,
                seed: int = 0) -> tuple[data_lib.Dataset, FolderInfo]:
    """The folder's images as a Dataset (name `folder:PATH`), and what was found.
    `seed` is unused: which images are test images depends on their paths only, so that
    adding files never moves the others between splits."""
    del seed
    t0 = time.perf_counter()
    root = Path(path).expanduser()
    classes, files, ignored = scan(root, test_fraction)
    counts = {s: len(files[s]) for s in SPLITS}
    resolved = root.resolve()
    cache = _cache_path(resolved, cache_key(root, files, skip_bad_files)) if use_cache \
        else None
    cached = _read_cache(cache, counts) if cache else None
    if cached is not None:
        splits, skipped = cached
    else:
        splits, skipped = _decode_all(root, files, skip_bad_files, progress)
        if cache is not None and not _write_cache(cache, splits, skipped, log):
            cache = None
    for split in SPLITS:
        data_lib.check_split(splits[split].images[..., 0], splits[split].labels,
                             f"{root} {split}", len(classes))
    info = FolderInfo(str(resolved), classes, {s: len(splits[s]) for s in SPLITS}, ignored,
                      skipped, cached is not None, str(cache) if cache else None,
                      time.perf_counter() - t0)
    dataset = data_lib.Dataset(f"folder:{path}", str(resolved), splits["train"],
                               splits["test"], classes)
    return dataset, info
