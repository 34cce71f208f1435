"""Inputs and the model contract for the deployment kit: numpy, and Pillow for images.

This directory is meant to be copied to a serving host that has neither JAX
nor lenet-dist, so it keeps its own small IDX and image readers. The image
reader is a copy of lenet_dist/images.py's decoding (tests/test_images.py checks
that both give the same pixels): change both or neither.
"""

from __future__ import annotations

import errno
import gzip
import io
import math
import os
import stat
import struct
import warnings
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
# All of a GIF's frames: only the first is decoded, but more is no drawing to classify.
MAX_PIXELS = MAX_SIDE * MAX_SIDE
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


IMAGE_MAGICS = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif",
                b"GIF89a": "gif", b"BM": "bmp"}


def image_size(path: Path, raw: bytes, kind: str) -> tuple[int, int, int]:
    """(height, width, pixels) the decoder will allocate, read from the header without
    decoding; an InputError if the header is too broken to tell (the decoder would refuse
    it too, but only after trusting whatever it could read)."""
    size = None
    if kind == "png" and len(raw) >= 24 and raw[12:16] == b"IHDR":
        width, height = struct.unpack(">II", raw[16:24])
        size = height, width, height * width
    elif kind == "gif" and len(raw) >= 10:
        frames = gif_frames(raw)
        if frames:  # Pillow's canvas: the screen, grown to hold a frame beyond it
            screen_w, screen_h = struct.unpack("<HH", raw[6:10])
            size = (max(screen_h, *(b for b, _, _ in frames)),
                    max(screen_w, *(r for _, r, _ in frames)),
                    sum(area for _, _, area in frames))
    elif kind == "bmp" and len(raw) >= 26:
        if raw[14:18] == b"\x0c\0\0\0":  # OS/2 1.x header: 16-bit sizes
            width, height = struct.unpack("<HH", raw[18:22])
        else:
            width, height = struct.unpack("<ii", raw[18:26])
        size = abs(height), abs(width), abs(height * width)
    elif kind == "jpeg":
        frames = jpeg_frames(raw)
        if frames:
            height, width = max(h for h, _ in frames), max(w for _, w in frames)
            size = height, width, height * width
    if size is None:
        raise InputError(f"{path}: not a decodable {kind.upper()} (header truncated or "
                         "corrupt)")
    return size


def check_size(path: Path, height: int, width: int, pixels: int) -> None:
    """Refuse an image too large to decode safely, in lenet-dist predict's words."""
    if max(height, width) > MAX_SIDE:
        raise InputError(f"{path} is {width}x{height} pixels; the limit is "
                         f"{MAX_SIDE} per side (resize it first)")
    if pixels > MAX_PIXELS:
        raise InputError(f"{path} has frames of {pixels:,} pixels in all; the limit is "
                         f"{MAX_SIDE} per side and {MAX_PIXELS:,} in all (keep the first "
                         "frame only)")


def gif_frames(raw: bytes) -> list[tuple[int, int, int]]:
    """(bottom, right, pixels) of every frame a GIF declares, walking its blocks up to
    the first that is neither an extension nor an image (the trailer, or a broken one)."""
    if len(raw) < 13:
        return []
    frames = []
    pos = 13 + (3 << ((raw[10] & 7) + 1) if raw[10] & 0x80 else 0)  # global colour table
    while pos < len(raw):
        if raw[pos] == 0x21:  # extension: label, then data sub-blocks
            pos = skip_sub_blocks(raw, pos + 2)
        elif raw[pos] == 0x2C and pos + 10 <= len(raw):  # image descriptor
            left, top, width, height = struct.unpack("<HHHH", raw[pos + 1:pos + 9])
            frames.append((top + height, left + width, height * width))
            flags = raw[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = skip_sub_blocks(raw, pos + 1)  # after the LZW minimum code size
        else:
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


JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                      0xCE, 0xCF}  # SOF0-15 less DHT, JPG and DAC


def jpeg_frames(raw: bytes) -> list[tuple[int, int]]:
    """(height, width) of every frame header (SOFn) before the first scan, walking the
    marker segments as Pillow does (bytes between markers skipped)."""
    frames, pos = [], 2
    while pos + 1 < len(raw):
        marker = raw[pos + 1]
        if raw[pos] != 0xFF or marker == 0xFF:  # junk or fill byte
            pos += 1
        elif marker in (0xDA, 0xD9):  # start of scan, end of image
            break
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
        else:
            if pos + 4 > len(raw):
                break
            length = int.from_bytes(raw[pos + 2:pos + 4], "big")
            if marker in JPEG_FRAME_MARKERS and pos + 9 <= len(raw):
                frames.append(struct.unpack(">HH", raw[pos + 5:pos + 9]))
            pos += 2 + max(length, 2)
    return frames


def open_image(path: Path, raw: bytes, kind: str):
    """A Pillow image of `raw` as `kind`: its header read, nothing decoded yet, and the
    size Pillow read checked again (it may differ from the sniffed one). Pillow itself
    only warns below twice its own pixel limit; that warning is an error here."""
    Image = import_pillow()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's advice about odd files: not ours to print
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(raw), formats=[kind.upper()])
        except Image.UnidentifiedImageError:  # whose message names a BytesIO object
            raise ValueError("its header is corrupt") from None
    width, height = im.size
    check_size(path, height, width, height * width)
    return im


def bmp_alpha(raw: bytes, height: int, width: int) -> np.ndarray | None:
    """The 4th byte of a 32-bit BMP's pixels, as alpha: TensorFlow read it so, and Pillow
    drops it. None when the file has no such byte, or when it is 0 everywhere: then it is
    padding, not alpha (TensorFlow turned such an image black)."""
    if len(raw) < 54 or struct.unpack_from("<I", raw, 14)[0] < 40:
        return None  # an OS/2 header: no 32-bit pixels
    offset, = struct.unpack_from("<I", raw, 10)
    file_width, file_height = struct.unpack_from("<ii", raw, 18)
    bits, compression = struct.unpack_from("<HI", raw, 28)
    if bits != 32 or (file_width, abs(file_height)) != (width, height):
        return None
    # Plain, or bit fields with the usual masks: the 4th byte is the one left over.
    if compression == 3 and (len(raw) < 66 or struct.unpack_from("<III", raw, 54)
                             != (0xFF0000, 0xFF00, 0xFF)):
        return None
    if compression not in (0, 3) or len(raw) < offset + 4 * width * height:
        return None
    alpha = np.frombuffer(raw, np.uint8, 4 * width * height, offset)[3::4]
    if not alpha.any():
        return None
    alpha = alpha.reshape(height, width)
    return alpha[::-1] if file_height > 0 else alpha  # rows are bottom-up unless < 0


def pixels_of(im, raw: bytes) -> np.ndarray:
    """A Pillow image -> [h, w, 1|2|3|4] uint8, the channels the file holds (gray,
    gray+alpha, RGB, RGBA): palettes expanded, a transparent colour or palette entry
    as alpha, 16-bit samples cut to their high byte (TensorFlow's decoders did this)."""
    transparent = "transparency" in im.info
    if im.mode.startswith("I"):  # 16-bit gray PNG ("I;16", or "I" in older Pillow)
        x = np.asarray(im).astype(np.int64)
        gray = np.clip(x >> 8, 0, 255).astype(np.uint8)[..., None]
        if not transparent:
            return gray
        alpha = np.where(x == im.info["transparency"], 0, 255).astype(np.uint8)
        return np.concatenate([gray, alpha[..., None]], -1)
    mode = "RGB" if im.format == "GIF" else PILLOW_MODES.get(im.mode)  # as TensorFlow
    if mode is None:
        raise ValueError(f"unsupported pixel format {im.mode}")
    if transparent and mode in ("L", "RGB"):
        mode += "A"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = np.asarray(im.convert(mode))
    if mode == "RGBA" and raw.startswith(b"\x89PNG") and len(raw) > 25 and raw[25] == 4:
        x = x[..., [0, 3]]  # 16-bit gray+alpha PNG, which Pillow reads as RGBA
    if mode == "RGB" and im.format == "BMP":
        alpha = bmp_alpha(raw, *x.shape[:2])
        if alpha is not None:
            x = np.concatenate([x, alpha[..., None]], -1)
    return x.reshape(*x.shape[:2], -1)


# Pillow mode -> the mode whose channels are the file's (palettes become colours).
PILLOW_MODES = {"1": "L", "L": "L", "LA": "LA", "P": "RGB", "PA": "RGBA", "RGB": "RGB",
                "RGBA": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}


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


def area_taps(size: int, out: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(index, weight), both [out, taps]: which input cells along one axis make each
    output cell and how much of each, in float32 exactly as TensorFlow's ResizeArea
    kernel computes them, so that predictions match the models' earlier inputs."""
    scale = np.float32(size) / np.float32(out)
    lo = np.arange(out, dtype=np.float32)[:, None] * scale  # each output cell's edges
    hi = np.arange(1, out + 1, dtype=np.float32)[:, None] * scale
    start = np.floor(lo).astype(np.int64)
    end = np.ceil(hi).astype(np.int64)
    i = start + np.arange(int(np.max(end - start)))
    f = i.astype(np.float32)
    weight = np.where(f < lo, np.where(f + 1 > hi, scale, f + 1 - lo),
                      np.where(f + 1 > hi, hi - f, np.float32(1)))
    weight = np.where(i < end, weight, np.float32(0)).astype(np.float32)
    return np.clip(i, 0, size - 1), weight


def resize_area(gray: np.ndarray, out: int = 28) -> np.ndarray:
    """[h, w, 1] float32 -> [out, out, 1], bit for bit tf.image.resize(method="area"):
    the same weights, summed in the same order (a row's cells, then the rows)."""
    rows_at, rows_w = area_taps(gray.shape[0], out)
    cols_at, cols_w = area_taps(gray.shape[1], out)
    x = gray[..., 0]
    rows = x[:, cols_at[:, 0]] * cols_w[:, 0]
    for t in range(1, cols_at.shape[1]):
        rows = rows + x[:, cols_at[:, t]] * cols_w[:, t]
    small = rows[rows_at[:, 0]] * rows_w[:, :1]
    for t in range(1, rows_at.shape[1]):
        small = small + rows[rows_at[:, t]] * rows_w[:, t:t + 1]
    scale = np.float32(1.0 / np.float64(np.float32(gray.shape[0]) / np.float32(out)
                                        * (np.float32(gray.shape[1]) / np.float32(out))))
    return (small * scale)[..., None]


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
    check_size(path, *image_size(path, raw, kind))
    Image = import_pillow()
    # What Pillow raises on a broken file, as lenet_dist/images.py lists it.
    errors = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error,
              Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with open_image(path, raw, kind) as im:
            pixels = pixels_of(im, raw)
    except errors as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputError(f"{path}: not a decodable {kind.upper()} ({reason})") from None
    small = resize_area(to_gray(pixels, background=0))
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
