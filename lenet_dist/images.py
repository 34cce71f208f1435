"""User images for `predict`: PNG/JPEG/GIF/BMP files or IDX image files -> uint8 [n, 28, 28, 1].

Everything is checked before it is decoded: special files (a FIFO or a device
never blocks the read), empty files, files that are not images, headers that
claim images too large to decode safely, IDX files of the wrong shape.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from lenet_dist import data as data_lib
from lenet_dist.errors import UserError, first_line
from lenet_dist.runtime import filtered_stderr

MAX_FILE_BYTES = 64 * 2**20
MAX_SIDE = 8192  # pixels; a decoded 8192x8192 RGBA image is 256 MiB
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # all of a GIF's frames, which giflib holds at once
IMAGE_MAGICS = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif",
                b"GIF89a": "gif", b"BM": "bmp"}


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


def image_size(path: Path, raw: bytes, kind: str, tf) -> tuple[int, int, int]:
    """(height, width, pixels) the decoder will allocate, read from the header without
    decoding; a UserError if the header is too broken to tell (the decoder would refuse
    it too, but only after trusting whatever it could read)."""
    size = None
    if kind == "png" and len(raw) >= 24 and raw[12:16] == b"IHDR":
        width, height = struct.unpack(">II", raw[16:24])
        size = height, width, height * width
    elif kind == "gif":
        frames = gif_frames(raw)
        if frames:  # TensorFlow's output is as large as the largest frame, not the screen
            size = (max(h for h, _ in frames), max(w for _, w in frames),
                    sum(h * w for h, w in frames))  # giflib holds every frame
    elif kind == "bmp" and len(raw) >= 26:
        width, height = struct.unpack("<ii", raw[18:26])
        size = abs(height), abs(width), abs(height * width)
    elif kind == "jpeg":
        try:
            with filtered_stderr():  # libjpeg prints to stderr itself
                h, w, _ = tf.image.extract_jpeg_shape(raw).numpy()
            size = int(h), int(w), int(h) * int(w)
        except tf.errors.OpError as e:
            raise UserError(f"{path} cannot be decoded as JPEG: {first_line(e, 160)}") from None
    if size is None:
        raise UserError(f"{path} cannot be decoded as {kind.upper()}: "
                        "its header is truncated or corrupt")
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
    """The position after a chain of GIF data sub-blocks (length byte, data; 0 ends)."""
    while pos < len(raw):
        length = raw[pos]
        pos += 1 + length
        if length == 0:
            break
    return pos


def to_gray(pixels: np.ndarray, background: int) -> np.ndarray:
    """Decoded [h, w, 1|2|3|4] uint8 -> [h, w, 1] float32 luminance, transparent
    pixels filled with `background` (a transparent PNG would otherwise read as 0)."""
    x = pixels.astype(np.float32)
    channels = x.shape[-1]
    alpha = x[..., -1:] / 255.0 if channels in (2, 4) else 1.0
    color = x[..., :3] if channels >= 3 else x[..., :1]
    if color.shape[-1] == 3:  # ITU-R 601 luma, as tf.image.rgb_to_grayscale
        color = color @ np.array([[0.2989], [0.5870], [0.1140]], np.float32)
    return color * alpha + background * (1.0 - alpha)


def decode_image(path: Path, raw: bytes, kind: str, tf, invert: bool) -> np.ndarray:
    """Any supported image -> 28x28 grayscale uint8, area-resampled like the dataset.

    Transparency becomes the dataset's dark background, or a light one with
    `invert` (for dark drawings), before the inversion."""
    height, width, area = image_size(path, raw, kind, tf)
    if max(height, width) > MAX_SIDE:
        raise UserError(f"{path} is {width}x{height} pixels; the limit is "
                        f"{MAX_SIDE} per side (resize it first)")
    if area > MAX_PIXELS:
        raise UserError(f"{path} has frames of {area:,} pixels in all; the limit is "
                        f"{MAX_PIXELS:,} (keep the first frame only)")
    try:
        with filtered_stderr():  # libjpeg/libpng warnings: our error says it in one line
            pixels = tf.io.decode_image(raw, channels=0, expand_animations=False).numpy()
    except tf.errors.OpError as e:  # InvalidArgumentError and friends
        raise UserError(f"{path} cannot be decoded as {kind.upper()}: "
                        f"{first_line(e, 160)}") from None
    gray = to_gray(pixels, background=255 if invert else 0)
    small = tf.image.resize(gray, (28, 28), method="area", antialias=True).numpy()
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


def load_inputs(paths: Sequence[str], tf=None, invert: bool = False
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
        if tf is None:
            from lenet_dist.runtime import import_tensorflow

            tf = import_tensorflow()
        batches.append(decode_image(p, raw, kind, tf, invert)[None])
        names.append(str(p))
    if not batches:
        raise UserError("no input images given")
    return np.concatenate(batches), names
