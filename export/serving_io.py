"""Inputs and the model contract for the deployment kit: numpy and TensorFlow only.

This directory is meant to be copied to a serving host that has neither JAX
nor lenet-dist, so it keeps its own small IDX and image readers.
"""

from __future__ import annotations

import gzip
import math
import os
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


def read_idx(path: str | Path, limit: int = MAX_IDX_BYTES) -> np.ndarray:
    """An unsigned-byte IDX file (gzipped or not), header checked against its size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            raw = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if len(raw) > limit:
        raise InputError(f"{path}: more than {limit >> 20} MiB of data")
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else None
    if dims is None or len(raw) != header + math.prod(dims):
        raise InputError(f"{path}: truncated or longer than its IDX header says")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_image(path: Path, tf) -> np.ndarray:
    """PNG/JPEG/GIF/BMP -> [28, 28, 1] grayscale uint8 (area resize), as lenet-dist
    predict does: ITU-R 601 luma, transparent pixels black like the dataset's background."""
    raw = path.read_bytes()
    if not raw:
        raise InputError(f"{path}: empty file")
    if len(raw) > MAX_IMAGE_BYTES:
        raise InputError(f"{path}: over {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        x = tf.io.decode_image(raw, channels=0, expand_animations=False).numpy()
    except Exception as e:
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
        if not p.is_file():
            raise InputError(f"{p}: no such file")
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
    labels = Path(model_dir) / "assets" / "labels.txt"
    if labels.is_file():
        return labels.read_text().splitlines()
    return [str(i) for i in range(10)]
