"""Inputs and the model contract for the deployment kit: numpy and TensorFlow only.

This directory is meant to be copied to a serving host that has neither JAX
nor lenet-dist, so it keeps its own small IDX and image readers.
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

SIGNATURE = "serving_default"
# The serving contract lenet-dist exports: name -> (dtype, shape), -1 = any batch.
INPUTS = {"images": ("uint8", (-1, 28, 28, 1))}
OUTPUTS = {"logits": ("float32", (-1, 10)), "probabilities": ("float32", (-1, 10)),
           "classes": ("int64", (-1,))}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
MAX_IDX_BYTES = 2**30
MAX_IMAGE_BYTES = 64 * 2**20
MAX_SIDE = 8192  # pixels per side, as lenet-dist predict; 8192x8192 RGBA is 256 MiB
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # all of a GIF's frames, which giflib holds at once
MAX_LABELS_BYTES = 2**20


class InputError(Exception):
    """A file that cannot be used as input; the message says why."""


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


IMAGE_MAGICS = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF",
                b"GIF89a": "GIF", b"BM": "BMP"}


def image_size(path: Path, raw: bytes, tf) -> tuple[int, int, int]:
    """(height, width, pixels) the decoder will allocate, from the header alone,
    so a header that claims a huge image is refused before anything is allocated."""
    kind = next((k for m, k in IMAGE_MAGICS.items() if raw.startswith(m)), None)
    size = None
    if kind == "PNG" and len(raw) >= 24 and raw[12:16] == b"IHDR":
        width, height = struct.unpack(">II", raw[16:24])
        size = height, width, height * width
    elif kind == "GIF":
        frames = gif_frames(raw)
        if frames:  # TensorFlow's output is as large as the largest frame, not the screen
            size = (max(h for h, _ in frames), max(w for _, w in frames),
                    sum(h * w for h, w in frames))  # giflib holds every frame
    elif kind == "BMP" and len(raw) >= 26:
        width, height = struct.unpack("<ii", raw[18:26])
        size = abs(height), abs(width), abs(height * width)
    elif kind == "JPEG":
        try:
            h, w, _ = (int(x) for x in tf.image.extract_jpeg_shape(raw).numpy())
            size = h, w, h * w
        except tf.errors.OpError:
            pass
    if kind is None:
        raise InputError(f"{path}: not a PNG, JPEG, GIF or BMP file")
    if size is None:
        raise InputError(f"{path}: not a decodable {kind} (header truncated or corrupt)")
    return size


def gif_frames(raw: bytes) -> list[tuple[int, int]]:
    """(height, width) of every frame a GIF declares, walking its blocks as giflib
    does up to the first it would refuse (it has allocated those frames by then)."""
    if len(raw) < 13:
        return []
    frames = []
    pos = 13 + (3 << ((raw[10] & 7) + 1) if raw[10] & 0x80 else 0)  # global colour table
    while pos < len(raw):
        if raw[pos] == 0x21:  # extension: label, then data sub-blocks
            pos = skip_sub_blocks(raw, pos + 2)
        elif raw[pos] == 0x2C and pos + 10 <= len(raw):  # image descriptor
            width, height = struct.unpack("<HH", raw[pos + 5:pos + 9])
            frames.append((height, width))
            flags = raw[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = skip_sub_blocks(raw, pos + 1)  # after the LZW minimum code size
        else:  # the trailer, or a block giflib refuses
            break
    return frames


def skip_sub_blocks(raw: bytes, pos: int) -> int:
    while pos < len(raw):
        length = raw[pos]
        pos += 1 + length
        if length == 0:
            break
    return pos


def read_image(path: Path, tf) -> np.ndarray:
    """PNG/JPEG/GIF/BMP -> [28, 28, 1] grayscale uint8 (area resize), as lenet-dist
    predict does: ITU-R 601 luma, transparent pixels black like the dataset's background."""
    with open_input(path) as f:
        try:
            raw = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw:
        raise InputError(f"{path}: empty file")
    if len(raw) > MAX_IMAGE_BYTES:
        raise InputError(f"{path}: over {MAX_IMAGE_BYTES >> 20} MiB")
    height, width, pixels = image_size(path, raw, tf)
    if max(height, width) > MAX_SIDE or pixels > MAX_PIXELS:
        raise InputError(f"{path}: {width}x{height} pixels ({pixels:,} in all frames); "
                         f"the limit is {MAX_SIDE} per side")
    try:
        x = tf.io.decode_image(raw, channels=0, expand_animations=False).numpy()
    except tf.errors.OpError as e:
        raise InputError(f"{path}: not a decodable image ({type(e).__name__})") from None
    x = x.astype(np.float32)
    alpha = x[..., -1:] / 255.0 if x.shape[-1] in (2, 4) else 1.0
    color = x[..., :3] if x.shape[-1] >= 3 else x[..., :1]
    if color.shape[-1] == 3:
        color = color @ np.array([[0.2989], [0.5870], [0.1140]], np.float32)
    img = tf.image.resize(color * alpha, (28, 28), method="area", antialias=True)
    return np.clip(np.rint(img.numpy()), 0, 255).astype(np.uint8)


def load_images(paths, tf=None) -> tuple[np.ndarray, list[str]]:
    """IDX image files and image files -> uint8 [n, 28, 28, 1], one name per image."""
    batches, names = [], []
    for p in map(Path, paths):
        if p.name.lower().endswith(IMAGE_SUFFIXES):
            tf = tf or import_tensorflow()
            batches.append(read_image(p, tf)[None])
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
