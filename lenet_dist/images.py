"""User images for `predict`: PNG/JPEG/GIF/BMP files or IDX image files -> uint8 [n, 28, 28, 1].

Everything is checked before it is decoded: special files (a FIFO or a device
never blocks the read), empty files, files that are not images, headers that
claim images too large to decode safely, IDX files of the wrong shape.

Pillow decodes (TensorFlow took seconds to import for it), reading the channels
TensorFlow's decoders did (a 32-bit BMP's 4th byte as alpha too); the resize is
TensorFlow's area resize in numpy, bit for bit. JPEG pixels may differ from
TensorFlow's by a grey level or two (libjpeg's fast DCT, which Pillow does not use), and
a gray PNG's transparent colour now reads as transparent (TensorFlow ignored it).
The decoding itself is image_decode.py, which the deployment kit holds a copy of.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lenet_dist import data as data_lib
from lenet_dist.errors import UserError
from lenet_dist.image_decode import IMAGE_MAGICS, ImageError, decoded

MAX_FILE_BYTES = 64 * 2**20
def sniff(head: bytes) -> str | None:
    """'png', 'jpeg', 'gif', 'bmp', 'idx' or None, from a file's first bytes."""
    for magic, kind in IMAGE_MAGICS.items():
        if head.startswith(magic):
            return kind
    if len(head) >= 4 and head[:3] == b"\x00\x00\x08" and head[3] in (1, 2, 3, 4):
        return "idx"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"  # gzipped IDX; read_idx checks it
    return None


def decode_image(path: Path, raw: bytes, kind: str, invert: bool) -> np.ndarray:
    """Any supported image -> 28x28 grayscale uint8, area-resampled like the dataset.

    Transparency becomes the dataset's dark background, or a light one with
    `invert` (for dark drawings), before the inversion."""
    try:
        small = decoded(path, raw, kind, background=255 if invert else 0)
    except ImageError as e:
        raise UserError(str(e)) from None
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return 255 - small if invert else small


def read_idx_images(path: Path, invert: bool) -> np.ndarray:
    arr = data_lib.read_idx(path)
    if arr.ndim == 1:
        raise UserError(f"{path} is an IDX label file; give the images file")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3 or arr.shape[1:] != (28, 28):
        raise UserError(f"{path} holds IDX data of shape {list(arr.shape)}; "
                        "expected images [n, 28, 28]")
    if len(arr) == 0:
        raise UserError(f"{path} holds no images")
    arr = arr[..., None]
    return 255 - arr if invert else arr


def read_input(path: Path) -> tuple[str | None, bytes]:
    """(kind, bytes) of one input, read once from a descriptor checked to be a regular
    file: all of an image (at most MAX_FILE_BYTES + 1), the head of anything else."""
    with data_lib.open_input(path) as f:
        try:
            head = f.read(16)
            kind = sniff(head)
            if kind in IMAGE_MAGICS.values():
                return kind, head + f.read(MAX_FILE_BYTES + 1 - len(head))
            return kind, head
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def load_inputs(paths: Sequence[str], *, invert: bool = False
                ) -> tuple[np.ndarray, list[str]]:
    """All inputs as one uint8 batch [n, 28, 28, 1], and a name per image."""
    batches, names = [], []
    for p in map(Path, paths):
        kind, raw = read_input(p)
        if not raw:
            raise UserError(f"{p} is empty")
        if kind in ("idx", "gzip"):
            arr = read_idx_images(p, invert)
            batches.append(arr)
            names.extend(f"{p}[{i}]" for i in range(len(arr)))
            continue
        if kind is None:
            raise UserError(f"{p} is not a PNG, JPEG, GIF, BMP or IDX images file")
        if len(raw) > MAX_FILE_BYTES:
            raise UserError(f"{p} is over {MAX_FILE_BYTES // 2**20} MiB; images that large "
                            "are refused")
        batches.append(decode_image(p, raw, kind, invert)[None])
        names.append(str(p))
    if not batches:
        raise UserError("no input images given")
    return np.concatenate(batches), names
