"""A user's own labelled images, in class folders, as a data.Dataset: `--dataset folder:PATH`.

No JAX and no TensorFlow: numpy, Pillow (through images.py) and tqdm.

Layouts (as Keras's image_dataset_from_directory reads them):

    PATH/train/<class>/**/*.png|jpg|jpeg|gif|bmp   and   PATH/test/<class>/...
    PATH/<class>/...     with test_fraction F: a fraction F of each class is the test split

A PATH holding a train/ or a test/ folder is the first layout; both must then be there,
with the same class folders.

What is read:
- Classes are the class folders' names sorted by Unicode code point (Python's `sorted` of
  the names: "B" < "a" < "é"); label i is the i-th. 2 to 1,000 classes. A name that is
  not UTF-8 or holds a control character (a line break would split the export's labels
  file) is refused.
- Image files are chosen by suffix, case-insensitively (IMAGE_SUFFIXES), in a class folder
  or any folder below it. Hidden files and folders (a leading dot) are skipped and not
  counted; every other entry (other suffixes, loose files beside the class folders, links
  to folders inside a class) is ignored and counted in `FolderInfo.ignored`.
- Symlinks: a link to a file is read as the file it points to, and a link to a class
  folder as that folder; a link to a folder inside a class folder is not followed (a
  loop could make the walk endless) and counts as ignored. A FIFO, a device or a socket
  with an image suffix is refused by the decoder's safe open (data.open_input), like a
  file that does not decode. No class folder may be, or hold, another once links are
  resolved (a class linked to another class, to its split folder or to PATH): the same
  images would be read under two labels, or in both splits.
- `--skip-bad-files` skips files that do not decode, but a class left with no training
  image is refused: its output would be one that no image trains.
- Every image goes through predict's decoder (images.decode_image, invert=False), so
  training and serving never disagree on a pixel.

The test split of a flat folder (test_fraction): each class's files are ordered by a hash
(BLAKE2b) of their path relative to PATH, and the first round(F x n) of them (Python's
round: a half rounds to even) are test images. So the split is stratified and the same on
every run and machine, and adding or removing a file moves at most one other file of its
class between the splits (exactly round(F x n) is kept). `seed` does not enter: another
--seed trains another model on the same test images. A class whose images would all be
test images is refused.

Decoding happens once. The arrays are cached in one .npz per dataset root under
$LENET_DIST_CACHE_DIR, else $XDG_CACHE_HOME/lenet-dist, else ~/.cache/lenet-dist, named by
a hash of the resolved root and a key: every file's split, relative path, label, size and
modification time (ns), the class names, the skip flag, and the decoder's identity
(DECODER_VERSION, a digest of images.py, Pillow's and libjpeg's versions). Why a stat
and not a hash of the contents: a stat reads only metadata (12,000 files: the whole cached
start takes 0.3 s), while a content hash would read every byte of every file on every
start, the I/O the cache is there to avoid (on a cold or network disk, most of the first
start's time); every normal edit, copy or replacement changes the size or the mtime
(in ns). What it misses: a file
rewritten with the same size and its mtime set back by hand (`touch -d`, some sync
tools), or a filesystem with coarse timestamps rewriting a file twice within one tick.
To force a rebuild, delete the cache file (its path is in the summary line) or point
$LENET_DIST_CACHE_DIR elsewhere; `use_cache=False` skips the cache. An unreadable or
corrupt cache file is decoded again (a note, never a traceback), and a cache directory
that cannot be written is a note: loading goes on without it.

Decoding is one thread: on 2 cores a thread pool was no faster (measured 2026-12-04 on
5,000 real Fashion-MNIST files: 2.1-2.4 s serial, 2.3-2.5 s with 2 or 3 threads; the
per-image work is small numpy calls that hold the GIL). About 0.45 ms an image here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import time
import unicodedata
from pathlib import Path
from typing import Callable

import numpy as np
import PIL
from PIL import features
from tqdm.auto import tqdm

from lenet_dist import data as data_lib
from lenet_dist import images, safefs
from lenet_dist.caches import CACHE_ENV, cache_root, expand_user
from lenet_dist.errors import UserError, first_line, quoted

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
IMAGE_KINDS = ("png", "jpeg", "gif", "bmp")
# The model's limits (model.MIN_CLASSES, MAX_CLASSES; a test keeps them equal): repeated
# here because model.py imports JAX and this module must not.
MIN_CLASSES, MAX_CLASSES = 2, 1000
# Bump when what a file decodes to changes outside images.py (images.py's own bytes, and
# Pillow's and libjpeg's versions, are in the cache key already).
DECODER_VERSION = 1
CACHE_FORMAT = 2  # the .npz's layout
PROGRESS_FROM = 500  # files; fewer decode in a quarter of a second
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Listing:
    """What `scan` found: the classes, and each split's files as (path relative to the
    root, label), in the order they are loaded (class by class, then by path)."""

    class_names: tuple[str, ...]
    files: dict[str, list[tuple[str, int]]]
    ignored: int  # entries that are neither hidden nor image files


@dataclasses.dataclass(frozen=True)
class FolderInfo:
    """What loading a folder found, for the one line `train` logs (`summary`)."""

    root: str  # resolved
    class_names: tuple[str, ...]
    counts: dict[str, int]  # images per split, after skipping
    ignored: int = 0
    skipped: tuple[str, ...] = ()  # bad files skipped (skip_bad_files), relative paths
    cache_hit: bool = False
    cache_path: str | None = None  # None: no cache written or read
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.counts['train']:,} train / {self.counts['test']:,} test images in "
                 f"{len(self.class_names)} classes from {self.root}"]
        if self.ignored:
            parts.append(f"{self.ignored:,} other files ignored (only "
                         f"{', '.join(IMAGE_SUFFIXES)} are read)")
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


def _class_dirs(top: Path) -> tuple[list[str], int]:
    """(the class folders in `top`, sorted by code point; how many other entries)."""
    names, other = [], 0
    try:
        with os.scandir(top) as entries:
            for e in entries:
                if _is_hidden(e.name):
                    continue
                if e.is_dir():  # follows a link to a folder
                    names.append(e.name)
                else:
                    other += 1
    except OSError as e:
        raise UserError(f"cannot list {top}: {e.strerror or e}") from None
    for name in names:
        _check_class_name(top, name)
    return sorted(names), other


def _check_class_name(top: Path, name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
        raise UserError(f"class folder {quoted(os.path.join(top, name))} has a name that "
                        "is not UTF-8; rename it (the name is the class's label)") from None
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise UserError(f"class folder {quoted(os.path.join(top, name))} has a control "
                        "character (a tab or a line break) in its name; rename it")


def _images_under(class_dir: Path, root: Path) -> tuple[list[str], int]:
    """(image paths relative to root, sorted; how many other entries) under one class."""
    found, ignored = [], 0
    for here, dirs, files in os.walk(class_dir, onerror=_walk_error):
        # os.walk lists a link to a folder among `dirs` and does not descend into it.
        links = [d for d in dirs if not _is_hidden(d) and os.path.islink(os.path.join(here, d))]
        ignored += len(links)
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d) and d not in links)
        for name in files:
            if _is_hidden(name):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(here, name), root))
            else:
                ignored += 1
    return sorted(found), ignored


def _walk_error(e: OSError) -> None:
    raise UserError(f"cannot list {e.filename}: {e.strerror or e}")


def _test_order(relpath: str) -> tuple[bytes, str]:
    """A file's place in its class's test order: a hash of its own path only, so that a
    file's place never depends on which other files are there."""
    digest = hashlib.blake2b(relpath.encode("utf-8", "surrogateescape"), digest_size=8)
    return digest.digest(), relpath


def _no_images(directory: Path) -> UserError:
    return UserError(f"{directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")


def scan(root: str | os.PathLike, test_fraction: float | None = None) -> Listing:
    """The folder's classes and files (nothing decoded); one-line UserErrors for a layout
    that cannot be trained on."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--dataset folder:{root} does not exist or is not a directory")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction {test_fraction:g} is not between 0 and 1")
    has = {s: (root / s).is_dir() for s in SPLITS}
    if has["train"] or has["test"]:
        if not (has["train"] and has["test"]):
            there, missing = ("train", "test") if has["train"] else ("test", "train")
            raise UserError(f"{root} has {there}/ but no {missing}/; give both, or class "
                            "folders at the top with --test-fraction")
        if test_fraction is not None:
            raise UserError(f"{root} has its own train/ and test/ splits; drop "
                            "--test-fraction")
        return _scan_splits(root)
    if test_fraction is None:
        raise UserError(f"{root} has no train/ and test/ folders; give --test-fraction F to "
                        "hold out a fraction of each class as the test split")
    return _scan_and_hold_out(root, test_fraction)


def _scan_splits(root: Path) -> Listing:
    """A folder with train/ and test/, each holding the same class folders."""
    files: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    listed = {s: _class_dirs(root / s) for s in SPLITS}
    names = {s: listed[s][0] for s in SPLITS}
    # Entries beside train/ and test/ (a README, a val/ folder) are not read.
    ignored = sum(listed[s][1] for s in SPLITS) + sum(
        1 for n in os.listdir(root) if not _is_hidden(n) and n not in SPLITS)
    if names["train"] != names["test"]:
        only = sorted(set(names["train"]) ^ set(names["test"]))
        raise UserError(f"{root}/train and {root}/test hold different classes "
                        f"(only in one: {', '.join(map(quoted, only[:5]))}"
                        f"{', ...' if len(only) > 5 else ''}); give both the same "
                        "class folders")
    classes = tuple(names["train"])
    _check_class_count(root, classes)
    _check_apart([root / split / name for split in SPLITS for name in classes])
    for split in SPLITS:
        for label, name in enumerate(classes):
            found, other = _images_under(root / split / name, root)
            if not found:
                raise _no_images(root / split / name)
            ignored += other
            files[split] += [(f, label) for f in found]
    return Listing(classes, files, ignored)


def _scan_and_hold_out(root: Path, test_fraction: float) -> Listing:
    """A folder of class folders: `test_fraction` of each class becomes the test split."""
    files: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    names, ignored = _class_dirs(root)
    classes = tuple(names)
    _check_class_count(root, classes)
    _check_apart([root / name for name in classes])
    for label, name in enumerate(classes):
        found, other = _images_under(root / name, root)
        if not found:
            raise _no_images(root / name)
        ignored += other
        n_test = round(test_fraction * len(found))
        if n_test == len(found):
            raise UserError(f"--test-fraction {test_fraction:g} puts all {len(found)} images "
                            f"of class {quoted(name)} in the test split; give a smaller "
                            "fraction or more images")
        test = set(sorted(found, key=_test_order)[:n_test])
        files["test"] += [(f, label) for f in found if f in test]
        files["train"] += [(f, label) for f in found if f not in test]
    if not files["test"]:
        raise UserError(f"--test-fraction {test_fraction:g} leaves the test split of "
                        f"{root} empty; give a fraction that keeps images in both")
    return Listing(classes, files, ignored)


def _check_apart(class_dirs: list[Path]) -> None:
    """No class folder is, or holds, another once links are resolved: a class linked to
    another class, or to its split folder, would read the same images under two labels
    (or in both splits)."""
    real = sorted((Path(os.path.realpath(d)).parts, d) for d in class_dirs)
    # Sorted by path parts, a folder comes right before the first folder it holds.
    for (outer, a), (inner, b) in zip(real, real[1:]):
        if inner[:len(outer)] == outer:
            same = "are one folder" if inner == outer else f"are nested ({b} is inside {a})"
            raise UserError(f"class folders {a} and {b} {same} once links are resolved "
                            f"({os.path.join(*outer)}): the same images would be read twice, "
                            "under two labels or in both splits; remove the link")


def _check_class_count(root: Path, classes: tuple[str, ...]) -> None:
    if not MIN_CLASSES <= len(classes) <= MAX_CLASSES:
        raise UserError(f"{root} holds {len(classes):,} class folders; a model needs "
                        f"{MIN_CLASSES} to {MAX_CLASSES:,}")


# ---------------------------------------------------------------- decoding


def decode_file(path: str | os.PathLike) -> np.ndarray:
    """One image file -> uint8 [28, 28, 1], exactly as `predict` decodes it; a one-line
    UserError naming the file when it is not an image this project reads."""
    path = Path(path)
    kind, raw = images.read_input(path)  # a regular file, or a UserError
    if not raw:
        raise UserError(f"{path} is empty")
    if kind not in IMAGE_KINDS:
        raise UserError(f"{path} is not a PNG, JPEG, GIF or BMP image")
    if len(raw) > images.MAX_FILE_BYTES:
        raise UserError(f"{path} is over {images.MAX_FILE_BYTES // 2**20} MiB; images that "
                        "large are refused")
    return images.decode_image(path, raw, kind, invert=False)


def _decode_all(root: Path, listing: Listing, skip_bad: bool, progress: bool,
                log: Callable[[str], None]) -> tuple[dict[str, data_lib.Split], list[str]]:
    total = sum(len(v) for v in listing.files.values())
    skipped: list[str] = []
    reasons: list[str] = []
    out = {}
    with tqdm(total=total, unit="img", desc="decoding images", leave=False,
              disable=not progress or total < PROGRESS_FROM) as bar:
        for split, files in listing.files.items():
            pixels = np.empty((len(files), *data_lib.IMAGE_SHAPE), np.uint8)
            keep = np.ones(len(files), bool)
            for i, (relpath, _) in enumerate(files):
                try:
                    pixels[i] = decode_file(root / relpath)
                except UserError as e:
                    if not skip_bad:
                        raise
                    keep[i] = False
                    skipped.append(relpath)
                    reasons.append(str(e))
                bar.update()
            if not keep.any():
                raise UserError(f"no image of the {split} split of {root} decodes "
                                f"({len(files):,} skipped as bad)")
            labels = np.fromiter((label for _, label in files), np.int32, len(files))
            names = _split_names(split, [f for (f, _), kept in zip(files, keep) if kept])
            out[split] = data_lib.Split(pixels[keep], labels[keep], names)
    if skipped:
        log(f"note: skipped {len(skipped):,} bad image files; the first: "
            + "; ".join(reasons[:3]))
    return out, skipped


def _split_names(split: str, relpaths: list[str]) -> tuple[str, ...]:
    """The split's files as Split.names: relative to the split's folder, so
    "test/cat/1.png" is "cat/1.png". A flat folder's paths ("cat/1.png") are already:
    none of its classes can be called train or test (that would be the split layout)."""
    prefix = split + os.sep
    return tuple(f[len(prefix):] if f.startswith(prefix) else f for f in relpaths)


def _check_every_class_trains(listing: Listing, train: data_lib.Split) -> None:
    """Every class keeps a training image after --skip-bad-files: a class with none would
    be an output the model never learns, its test images all counted wrong."""
    counts = np.bincount(train.labels, minlength=len(listing.class_names))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        listed = sum(1 for _, label in listing.files["train"] if label == empty[0])
        more = f" (and {empty.size - 1} more classes)" if empty.size > 1 else ""
        raise UserError(f"class {quoted(listing.class_names[empty[0]])} has no training image "
                        f"left: all {listed:,} of its training files were skipped as bad "
                        f"(--skip-bad-files){more}; fix or remove them, or remove the class "
                        "folder")


# ---------------------------------------------------------------- the cache


def decoder_identity() -> str:
    """What decides the pixels besides the files: this module's version, images.py's
    bytes, Pillow's version and the JPEG library's (JPEG decoding differs between them)."""
    try:
        source = hashlib.sha256(Path(images.__file__).read_bytes()).hexdigest()[:16]
    except OSError:  # installed without sources (a zipapp): the version must do
        source = "?"
    return (f"v{DECODER_VERSION} images.py:{source} Pillow:{PIL.__version__} "
            f"jpeg:{features.version('jpg')}")


def cache_key(root: Path, listing: Listing, skip_bad: bool) -> str:
    """A digest of every file's (split, relative path, label, size, mtime_ns), the class
    names, the skip flag and the decoder's identity: any change gives another key."""
    h = hashlib.sha256(f"lenet-dist folder cache {CACHE_FORMAT}\n{decoder_identity()}\n"
                       f"skip={skip_bad}\n".encode())
    h.update("\0".join(listing.class_names).encode("utf-8") + b"\n")
    for split, files in listing.files.items():
        for relpath, label in files:
            try:
                st = os.stat(root / relpath)  # follows a link: its target's size and time
                stamp = f"{st.st_size}\0{st.st_mtime_ns}"
            except OSError:  # a dangling link: decoding says what is wrong (or skips it)
                stamp = "missing"
            h.update(f"{split}\0{relpath}\0{label}\0{stamp}\n"
                     .encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def _cache_path(directory: Path, resolved_root: Path, key: str) -> Path:
    root_id = hashlib.sha256(os.fsencode(resolved_root)).hexdigest()[:16]
    return directory / f"folder-{root_id}-{key}.npz"


def _read_cache(path: Path, key: str, listing: Listing, skip_bad: bool,
                log: Callable[[str], None]) -> tuple[dict, list[str]] | None:
    """The cached splits, or None when there is none, or it is unreadable or does not fit
    this listing (then the files are decoded again)."""
    try:
        f = safefs.open_regular(path, follow=False)  # a FIFO there must not block us
    except (FileNotFoundError, NotADirectoryError):  # none yet; a folder that cannot
        return None  # be one is said by the write
    except OSError as e:
        log(f"note: cannot read the cache {path} ({e.strerror or e}); decoding again")
        return None
    try:
        with f, np.load(f, allow_pickle=False) as z:
            if str(z["key"]) != key:
                raise ValueError("written for other files")
            skipped = [str(s) for s in z["skipped"]]
            gone = set(skipped)
            out = {}
            for split in SPLITS:
                imgs, labels = z[f"{split}_images"], z[f"{split}_labels"]
                if (imgs.dtype != np.uint8 or imgs.shape[1:] != data_lib.IMAGE_SHAPE
                        or labels.dtype != np.int32 or labels.shape != (len(imgs),)
                        or (len(labels) and not 0 <= labels.min() <= labels.max()
                            < len(listing.class_names))):
                    raise ValueError(f"its {split} arrays do not fit")
                # The names are not in the cache (its format is unchanged): the listing's
                # files less the skipped ones, in the order _decode_all kept them.
                kept = [f for f, _ in listing.files[split] if f not in gone]
                if len(kept) != len(imgs):
                    raise _Mismatch
                out[split] = data_lib.Split(imgs, labels, _split_names(split, kept))
    except _Mismatch:
        log(f"note: the cache {path} does not match the files; decoding again")
        return None
    except Exception as e:  # torn, truncated, not ours: decode again  # noqa: BLE001
        log(f"note: the cache {path} is unreadable ({first_line(e, 80)}); decoding again")
        return None
    listed = {s: len(listing.files[s]) for s in SPLITS}
    if (sum(map(len, out.values())) + len(skipped) != sum(listed.values())
            or any(len(out[s]) > listed[s] for s in SPLITS) or (skipped and not skip_bad)):
        log(f"note: the cache {path} does not match the files; decoding again")
        return None
    return out, skipped


class _Mismatch(Exception):
    """A cache whose arrays do not line up with this listing's files (less the skipped)."""


def _write_cache(path: Path, key: str, splits: dict[str, data_lib.Split],
                 skipped: list[str], log: Callable[[str], None]) -> bool:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.asarray(key), skipped=np.asarray(skipped, dtype=str),
             **{f"{s}_{k}": getattr(splits[s], k) for s in SPLITS for k in ("images", "labels")})
    try:
        os.makedirs(path.parent, mode=0o700, exist_ok=True)  # others' images: private
        safefs.write_atomic(path, buffer.getvalue())
    except OSError as e:
        log(f"note: cannot write the decoded images' cache {path} "
            f"({e.strerror or e}); the next run decodes them again "
            f"(set ${CACHE_ENV} to a writable folder)")
        return False
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(prefix + "*.npz"):  # this root's earlier versions
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
    return True


# ---------------------------------------------------------------- loading


def load_folder(path: str | os.PathLike, *, test_fraction: float | None = None,
                seed: int = 0, skip_bad_files: bool = False, progress: bool = True,
                log: Callable[[str], None] = print, use_cache: bool = True
                ) -> tuple[data_lib.Dataset, FolderInfo]:
    """The folder's images as a Dataset named `folder:PATH` (source: the resolved path),
    and what was found (`FolderInfo.summary()` is the line to log).

    `test_fraction` splits a folder without train/ and test/ (see the module's docstring;
    `seed` is accepted for the CLI's sake and does not enter). `skip_bad_files` skips files
    that do not decode instead of a UserError naming the first; `log` gets the notes
    (skipped files, a cache that cannot be read or written); `progress` shows a bar while
    more than PROGRESS_FROM files decode; `use_cache=False` neither reads nor writes it.
    """
    del seed  # the split depends on the files' paths alone (module docstring)
    t0 = time.perf_counter()
    root = expand_user(path, "--dataset folder:")
    listing = scan(root, test_fraction)
    resolved = root.resolve()
    directory = cache_root() if use_cache else None
    if use_cache and directory is None:
        log(f"note: no cache folder (no home directory); set ${CACHE_ENV} to keep the "
            "decoded images between runs")
    cache = key = None
    if directory is not None:
        key = cache_key(root, listing, skip_bad_files)
        cache = _cache_path(directory, resolved, key)
    cached = _read_cache(cache, key, listing, skip_bad_files, log) if cache else None
    if cached is not None:
        splits, skipped = cached
    else:
        splits, skipped = _decode_all(root, listing, skip_bad_files, progress, log)
        if cache is not None and not _write_cache(cache, key, splits, skipped, log):
            cache = None
    _check_every_class_trains(listing, splits["train"])
    for split in SPLITS:  # the same checks as every other source's arrays
        splits[split] = data_lib.check_split(splits[split].images[..., 0],
                                             splits[split].labels, f"{root} {split}",
                                             len(listing.class_names), splits[split].names)
    info = FolderInfo(str(resolved), listing.class_names,
                      {s: len(splits[s]) for s in SPLITS}, listing.ignored, tuple(skipped),
                      cached is not None, str(cache) if cache else None,
                      time.perf_counter() - t0)
    dataset = data_lib.Dataset(f"folder:{path}", str(resolved), splits["train"],
                               splits["test"], listing.class_names)
    return dataset, info
