"""Inputs and the model contract for the deployment kit: numpy, and Pillow for images.

This directory is meant to be copied to a serving host that has neither JAX
nor lenet-dist, so it keeps its own small IDX reader, and image_decode.py beside
it is a byte-identical copy of lenet_dist/image_decode.py, predict's decoder
(tests/test_images.py compares the files): edit that one and copy it here.
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
# MAX_SIDE and MAX_PIXELS: the kit's callers read the image limits here too.
from image_decode import IMAGE_MAGICS, MAX_PIXELS, MAX_SIDE, ImageError, decoded  # noqa: F401

SIGNATURE = "serving_default"
# The serving contract lenet-dist exports: name -> (dtype, shape), -1 = any batch.
INPUTS = {"images": ("uint8", (-1, 28, 28, 1))}
OUTPUTS = {"logits": ("float32", (-1, 10)), "probabilities": ("float32", (-1, 10)),
           "classes": ("int64", (-1,))}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
MAX_IDX_BYTES = 2**30
MAX_IMAGE_BYTES = 64 * 2**20
MAX_LABELS_BYTES = 2**20


class InputError(Exception):
    """A file that cannot be used as input; the message says why."""


def import_pillow():
    """PIL.Image, imported when an image file is read: IDX files need only numpy."""
    try:
        from PIL import Image
    except ImportError as e:
        raise InputError(f"Pillow is not installed ({e}); pip install Pillow "
                         "(it decodes PNG/JPEG/GIF/BMP files)") from None
    return Image


def import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise InputError(f"TensorFlow is not installed ({e}); "
                         "pip install tensorflow-cpu (or tensorflow)") from None
    return tf


def open_input(path: str | Path):
    """Open a file for reading, refusing anything but a regular file without blocking:
    O_NONBLOCK makes opening a FIFO return at once, and fstat on the descriptor (not
    the name, which may change in between) tells a FIFO, device or directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        what = "it is a socket" if e.errno == errno.ENXIO else e.strerror
        raise InputError(f"{path}: cannot read ({what})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a special file")
            raise InputError(f"{path}: is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_idx(path: str | Path, limit: int = MAX_IDX_BYTES) -> np.ndarray:
    """An unsigned-byte IDX file (gzipped or not), header checked against its size."""
    path = Path(path)
    with open_input(path) as f:
        try:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            with gzip.GzipFile(fileobj=f, mode="rb") if gz else f as g:
                raw = g.read(limit + 1)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"{path}: cannot read ({e})") from None
    if len(raw) > limit:
        raise InputError(f"{path}: more than {limit >> 20} MiB of data")
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    if ndim == 0:  # one number: neither images nor labels
        raise InputError(f"{path}: an IDX file of rank 0, with no dimensions")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else None
    if dims is None or len(raw) != header + math.prod(dims):
        raise InputError(f"{path}: truncated or longer than its IDX header says")
    # Even holding no data (a 0 among the dims), numpy cannot shape (0, 2**32-1, 2**32-1).
    if math.prod(max(d, 1) for d in dims) > limit:
        raise InputError(f"{path}: IDX shape {list(dims)} is too large for any real file")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_image(path: Path) -> np.ndarray:
    """PNG/JPEG/GIF/BMP -> [28, 28, 1] grayscale uint8, as lenet-dist predict reads it
    (the same code, copied): Pillow decodes, ITU-R 601 luma, transparent pixels black
    like the dataset's background, TensorFlow's area resize."""
    with open_input(path) as f:
        try:
            raw = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw:
        raise InputError(f"{path}: empty file")
    if len(raw) > MAX_IMAGE_BYTES:
        raise InputError(f"{path}: over {MAX_IMAGE_BYTES >> 20} MiB")
    kind = next((k for m, k in IMAGE_MAGICS.items() if raw.startswith(m)), None)
    if kind is None:
        raise InputError(f"{path}: not a PNG, JPEG, GIF or BMP file")
    import_pillow()  # its absence said in the kit's words
    try:
        small = decoded(path, raw, kind, background=0)
    except ImageError as e:
        raise InputError(str(e)) from None
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def load_images(paths) -> tuple[np.ndarray, list[str]]:
    """IDX image files and image files -> uint8 [n, 28, 28, 1], one name per image."""
    batches, names = [], []
    for p in map(Path, paths):
        if p.name.lower().endswith(IMAGE_SUFFIXES):
            batches.append(read_image(p)[None])
            names.append(str(p))
            continue
        arr = read_idx(p)
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 3 or arr.shape[1:] != (28, 28) or len(arr) == 0:
            raise InputError(f"{p}: IDX shape {list(arr.shape)}, expected images [n, 28, 28]")
        batches.append(arr[..., None])
        names.extend(f"{p}[{i}]" for i in range(len(arr)))
    if not batches:
        raise InputError("no images given")
    return np.concatenate(batches), names


def read_labels(path: str | Path) -> np.ndarray:
    arr = read_idx(path)
    if arr.ndim != 1:
        raise InputError(f"{path}: IDX shape {list(arr.shape)}, expected labels [n]")
    return arr.astype(np.int64)


def class_names(model_dir: str | Path) -> list[str]:
    """assets/labels.txt, one name per output class; 0..9 when there is none."""
    labels = Path(model_dir) / "assets" / "labels.txt"
    if not os.path.lexists(labels):
        return [str(i) for i in range(10)]
    return read_class_names(labels)


def read_class_names(labels: str | Path) -> list[str]:
    """A labels.txt: one UTF-8 name per output class, checked (never blocks on a FIFO)."""
    with open_input(labels) as f:
        raw = f.read(MAX_LABELS_BYTES + 1)
    try:
        names = raw.decode("utf-8").splitlines() if len(raw) <= MAX_LABELS_BYTES else None
    except UnicodeDecodeError:
        names = None
    width = OUTPUTS["probabilities"][1][1]
    if names is None or len(names) != width:
        raise InputError(f"{labels}: not {width} class names, one per line (UTF-8 text)")
    return names
