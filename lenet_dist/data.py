"""Fashion-MNIST / MNIST on the host as uint8 arrays, from the first source that works.

Sources, in order: an explicit `--data-dir` of IDX files, a TFDS copy already
prepared in the TFDS data dir, the system copy Debian's `dataset-fashion-mnist`
installs, then a TFDS download (only when its host answers; a failed one leaves
nothing behind). User-given files are read through safefs, so a FIFO or a device
is refused at once instead of blocking the read. Every process loads the whole
(small) dataset itself, so multi-host jobs need no coordination here; the devices
do the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import math
import os
import shutil
import socket
import stat
import threading
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lenet_dist import extras, safefs
from lenet_dist.errors import UserError, first_line

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
}
SYSTEM_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
SPLITS = ("train", "test")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [n, 28, 28, 1]
    labels: np.ndarray  # int32 [n]
    # Image i's file, relative to its split's folder ("<class>/<file>"), for a folder
    # dataset; None for the others (IDX, TFDS), whose images are known by index. Not in
    # the repr (thousands of names); None compares equal to None, so an IDX split's
    # equality is what it was.
    names: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.names is not None and len(self.names) != len(self.labels):
            raise ValueError(f"{len(self.names)} image names for {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int | None) -> "Split":
        if n is None:
            return self
        return Split(self.images[:n], self.labels[:n],
                     None if self.names is None else self.names[:n])

    def subset(self, indices: np.ndarray) -> "Split":
        """The images at `indices` (integers, or a boolean mask), their names with them."""
        names = None
        if self.names is not None:
            names = tuple(self.names[i] for i in np.arange(len(self))[indices])
        return Split(self.images[indices], self.labels[indices], names)


def hold_out(split: Split, n: int, seed: int) -> tuple[Split, Split]:
    """(the rest, n held-out images) of a training split: which ones from the seed alone,
    on the host, so every device count and every process holds out the same images.
    Both keep the split's order. n = 0: (split, an empty split)."""
    if n == 0:
        return split, split.take(0)
    if n >= len(split):
        raise UserError(f"--validation {n} would hold out the whole training split "
                        f"({len(split):,} images); give fewer (a tenth: --validation "
                        f"{max(1, len(split) // 10)}) or 0")
    chosen = np.zeros(len(split), bool)
    chosen[np.random.default_rng(seed).permutation(len(split))[:n]] = True
    return split.subset(np.flatnonzero(~chosen)), split.subset(np.flatnonzero(chosen))


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str    # the --dataset it was loaded for: fashion_mnist, mnist, folder:PATH, idx:DIR
    source: str  # where it came from, for logs and metadata
    train: Split
    test: Split
    class_names: tuple[str, ...]  # label i is class_names[i]; the model has one output each

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------- IDX files


# Far above the real files (the training images are 47 MB unpacked); it bounds
# what a corrupt header or a gzip bomb can make us allocate.
MAX_IDX_BYTES = 2**30


def open_input(path: str | os.PathLike) -> BinaryIO:
    """A user-given file opened for reading, or a one-line UserError naming it.

    Through safefs, so a FIFO, a device, a directory or a socket is refused at
    once instead of blocking the read (or reading /dev/zero forever).
    """
    try:
        return safefs.open_regular(path)
    except safefs.UnsafePath as e:
        raise UserError(f"{path} {e.strerror}") from None
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # what open(2) says for a socket
            with contextlib.suppress(OSError):
                kind = safefs.describe_mode(stat.S_IFMT(os.stat(path).st_mode))
                raise UserError(f"{path} is {kind}, not a regular file") from None
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _read_bytes(path: Path, limit: int = MAX_IDX_BYTES) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by content, not by name)."""
    with open_input(path) as f:
        try:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if gz:  # on the descriptor already checked, not a second open by name
                with gzip.GzipFile(fileobj=f, mode="rb") as z:
                    raw = z.read(limit + 1)
            else:
                raw = f.read(limit + 1)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise UserError(f"cannot read {path}: {first_line(e)}") from None
    if len(raw) > limit:
        raise UserError(f"{path} holds more than {limit / 2**20:,.0f} MiB of data; refused")
    return raw


def read_idx(path: str | os.PathLike, expect_magic: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into a uint8 array, checking its header."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise UserError(f"{path} is not an IDX file: {len(raw)} bytes, too short for a header")
    magic = int.from_bytes(raw[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        kind = "images" if expect_magic == IMAGES_MAGIC else "labels"
        raise UserError(
            f"{path} has IDX magic {magic}, expected {expect_magic} for {kind}; "
            "is it the right file, and not corrupted?")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise UserError(f"{path} has IDX magic {magic:#x}: not an unsigned-byte IDX file")
    ndim = magic & 0xFF
    if ndim == 0:  # one number: neither images nor labels
        raise UserError(f"{path} is an IDX file of rank 0, with no dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated inside its header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)  # Python ints: a crafted header cannot wrap
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise UserError(
            f"{path} is {what}: {len(raw)} bytes, header {dims} needs {expected}; "
            "re-download or reinstall the data")
    # Even holding no data (a 0 among the dims), numpy cannot shape (0, 2**32-1, 2**32-1).
    if math.prod(max(d, 1) for d in dims) > MAX_IDX_BYTES:
        raise UserError(f"{path} has IDX shape {dims}: too large for any real file")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    """The first regular file under one of the names; else the first name that
    exists at all (a FIFO, a dangling link), so that reading it says what is wrong."""
    names = [directory / n for n in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                                     stem.replace("-idx", ".idx") + ".gz")]
    return (next((p for p in names if p.is_file()), None)
            or next((p for p in names if os.path.lexists(p)), None))


def check_split(images: np.ndarray, labels: np.ndarray, where: str,
                num_classes: int = NUM_CLASSES,
                names: tuple[str, ...] | None = None) -> Split:
    """Validate shapes, counts and label range; return NHWC uint8 + int32 labels (and
    the images' `names`, when they have them: Split.names)."""
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2]:
        raise UserError(f"{where}: images have shape {images.shape}, expected [n, 28, 28]")
    if labels.ndim != 1:
        raise UserError(f"{where}: labels have shape {labels.shape}, expected [n]")
    if len(images) != len(labels):
        raise UserError(
            f"{where}: {len(images)} images but {len(labels)} labels; "
            "the image and label files do not belong together")
    if len(labels) == 0:  # training would do nothing, and accuracy would be 0/0
        raise UserError(f"{where}: no images; both splits need at least one")
    if len(labels) and int(labels.max()) >= num_classes:
        raise UserError(
            f"{where}: label {int(labels.max())} is out of range 0..{num_classes - 1}")
    return Split(images.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int32), names)


def load_idx_dir(directory: str | os.PathLike, name: str,
                 class_names: tuple[str, ...] | None = None,
                 option: str = "--data-dir ", infer_classes: bool = False) -> Dataset:
    """The four IDX files in `directory`; labels are checked against `class_names`
    (the built-in dataset's, by default), each bad one named with its file.

    `infer_classes`: no names are known (idx:DIR without classes.txt), so the labels
    are the classes, "0".."K-1": they must be dense (dense_class_names), or one stray
    label would add classes that no image trains."""
    directory = Path(directory)
    if not infer_classes:
        class_names = class_names or CLASS_NAMES[name]
    if not directory.is_dir():
        raise UserError(f"{option}{directory} does not exist or is not a directory")
    splits, label_files = {}, {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        img, lbl = _find_idx(directory, img_stem), _find_idx(directory, lbl_stem)
        if img is None or lbl is None:
            missing = img_stem if img is None else lbl_stem
            raise UserError(
                f"{directory} has no {missing}[.gz]; it needs the four IDX files "
                f"{', '.join(s for pair in IDX_FILES.values() for s in pair)}")
        images, labels = read_idx(img, IMAGES_MAGIC), read_idx(lbl, LABELS_MAGIC)
        if class_names is not None and labels.size and int(labels.max()) >= len(class_names):
            raise UserError(f"{lbl}: label {int(labels.max())} is out of range "
                            f"0..{len(class_names) - 1} ({name} has {len(class_names)} "
                            "classes)")
        splits[split] = check_split(images, labels, f"{directory} {split}",
                                    len(class_names) if class_names else 256)  # uint8
        label_files[split] = lbl
    if infer_classes:
        class_names = dense_class_names(splits, label_files, directory)
    return Dataset(name, str(directory), splits["train"], splits["test"], class_names)


def dense_class_names(splits: dict[str, Split], label_files: dict[str, Path],
                      directory: Path) -> tuple[str, ...]:
    """"0".."K-1", K = the largest label + 1, when every one of them labels a training
    image; else a UserError naming the file of the largest label and the missing ones
    (a stray 200 would otherwise make a 201-class model)."""
    top = {s: int(splits[s].labels.max()) for s in SPLITS}
    k = max(top.values()) + 1
    missing = np.setdiff1d(np.arange(k), splits["train"].labels)
    if missing.size:
        where = label_files["train" if top["train"] + 1 == k else "test"]
        plural = "s" if missing.size > 1 else ""
        raise UserError(f"{where}: label {k - 1} would make {k} classes, but "
                        f"{label_files['train']} has no image of label{plural} "
                        f"{number_ranges(missing)}; labels must be 0..K-1 with each in the "
                        f"training split (a stray label?), or name the classes in "
                        f"{directory}/classes.txt")
    return tuple(str(i) for i in range(k))


def number_ranges(values) -> str:
    """Sorted ints as runs: [1, 2, 3, 7, 10, 11] -> "1..3, 7, 10..11" (at most 5 runs)."""
    runs: list[list[int]] = []
    for v in map(int, values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = [f"{a}" if a == b else f"{a}..{b}" for a, b in runs[:5]]
    return ", ".join(text) + (", ..." if len(runs) > 5 else "")


# ---------------------------------------------------------------- TFDS


def tfds_data_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))


def tfds_prepared(name: str) -> bool:
    """Cheap check (no TensorFlow import) for a prepared TFDS copy on disk."""
    return any((tfds_data_dir() / name).glob("*/dataset_info.json"))


def load_tfds(name: str, download: bool) -> Dataset:
    try:
        import tensorflow_datasets as tfds  # heavy, and an extra: only for this source
    except ImportError as e:
        raise extras.missing("tensorflow_datasets", f" ({e})") from None

    splits = {}
    for split in ("train", "test"):
        ds = tfds.load(name, split=split, batch_size=-1, data_dir=str(tfds_data_dir()),
                       download=download)
        arrays = tfds.as_numpy(ds)
        splits[split] = check_split(arrays["image"][..., 0], arrays["label"],
                                    f"TFDS {name} {split}")
    return Dataset(name, f"tfds:{tfds_data_dir()}", splits["train"], splits["test"],
                   CLASS_NAMES[name])


# ---------------------------------------------------------------- resolution


def resolve_source(name: str, data_dir: str | None) -> tuple[str, str | None]:
    """Which source `load` will use: ("idx", dir), ("tfds", None) or ("download", None)."""
    if name not in SYSTEM_DIRS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(SYSTEM_DIRS)}")
    if data_dir is not None:
        return "idx", data_dir
    if tfds_prepared(name):
        return "tfds", None
    system = Path(SYSTEM_DIRS[name])
    if _find_idx(system, IDX_FILES["train"][0]) is not None:
        return "idx", str(system)
    return "download", None


def how_to_get(name: str) -> str:
    """The three ways to get `name`; the third is Debian's package for Fashion-MNIST,
    but no package holds MNIST: its files are placed where a package would put them."""
    if name == "fashion_mnist":
        system = ("install dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist) "
                  f"into {SYSTEM_DIRS[name]}")
    else:
        files = ", ".join(s for pair in IDX_FILES.values() for s in pair)
        system = f"place its four IDX files ({files}; each may be .gz) in {SYSTEM_DIRS[name]}"
    return (f"get {name} one of three ways: pass --data-dir DIR holding its four IDX files; "
            f"let TFDS download it (needs internet) into {tfds_data_dir()}, with the "
            f"[tfds] extra; or {system}")


# Where tensorflow_datasets 4.9.10 downloads each dataset from (its builders' URLs).
DOWNLOAD_HOSTS = {"fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
                  "mnist": ("storage.googleapis.com", 443)}
SKIP_NETWORK_CHECK = "LENET_DIST_SKIP_NETWORK_CHECK"
PROBE_SECONDS = 3.0


def network_problem(name: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why the download host is unreachable, or None; answers within `timeout`.

    Offline, TFDS retries every file for minutes and prints dozens of lines; one
    connection says it first. Through a proxy a direct connection proves nothing,
    so a proxy setting (or LENET_DIST_SKIP_NETWORK_CHECK=1) skips the probe.
    The probe runs in a thread because a socket timeout does not bound DNS.
    """
    proxies = ("https_proxy", "http_proxy", "all_proxy")
    if os.environ.get(SKIP_NETWORK_CHECK) or any(
            os.environ.get(v) or os.environ.get(v.upper()) for v in proxies):
        return None
    host, port = DOWNLOAD_HOSTS[name]
    answer: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(None)
        except OSError as e:
            answer.append(f"cannot reach {host}:{port} ({e.strerror or e})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else f"no answer from {host}:{port} in {timeout:g} s"


@contextlib.contextmanager
def removed_if_failed(name: str):
    """A failed download (or Ctrl-C) leaves nothing behind in the TFDS data dir:
    the directories it created go, and in the ones that were there before, the new
    entries that are this download's (its dataset's own, TFDS's .incomplete and
    .tmp files). A UserError means the data arrived and was refused: it stays."""
    root = tfds_data_dir()
    dirs = [root / name, root / "downloads" / name, root / "downloads" / "extracted",
            root / "downloads", root]  # deepest first
    before = {d: set(os.listdir(d)) if d.is_dir() else None for d in dirs}
    try:
        yield
    except UserError:
        raise
    except BaseException:
        for d in dirs:
            if before[d] is None:
                _remove(d)
            elif d.is_dir():
                ours = d.name == name  # <root>/<name>, downloads/<name>
                for entry in set(os.listdir(d)) - before[d]:
                    if ours or any(m in entry for m in (".incomplete", ".tmp.", name,
                                                        name.replace("_", "-"))):
                        _remove(d / entry)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def load(name: str = "fashion_mnist", data_dir: str | None = None) -> Dataset:
    kind, where = resolve_source(name, data_dir)
    if kind == "idx":
        return load_idx_dir(where, name)
    if kind == "tfds":
        return load_tfds(name, download=False)
    problem = network_problem(name)
    if problem is not None:
        raise UserError(f"no {name} data found and {problem}; {how_to_get(name)} "
                        f"(or set {SKIP_NETWORK_CHECK}=1 to try the download anyway)")
    try:
        with removed_if_failed(name):
            return load_tfds(name, download=True)
    except UserError:
        raise
    except Exception as e:  # network, TFDS or TensorFlow missing: all mean "no data"
        first = first_line(e, 160)
        raise UserError(f"no {name} data found and download failed ({first}); "
                        + how_to_get(name)) from None
