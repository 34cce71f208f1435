"""Image decoding, one file in two places: lenet-dist's `predict` (lenet_dist/images.py)
and the deployment kit (export/serving_io.py), which runs on serving hosts without
lenet-dist, each import `image_decode` beside them. export/image_decode.py is a
byte-identical copy of lenet_dist/image_decode.py (tests/test_images.py compares the
files): edit this one and copy it there.

Everything is checked before it is decoded: headers that claim images too large to
decode safely are refused before Pillow reads them. Pillow decodes, reading the channels
TensorFlow's decoders did (a 32-bit BMP's 4th byte as alpha too); the resize is
TensorFlow's area resize in numpy, bit for bit. numpy and Pillow only (Pillow imported
when an image is decoded).
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np

MAX_SIDE = 8192  # pixels; a decoded 8192x8192 RGBA image is 256 MiB
# All of a GIF's frames: only the first is decoded, but more is no drawing to classify.
MAX_PIXELS = MAX_SIDE * MAX_SIDE
IMAGE_MAGICS = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif",
                b"GIF89a": "gif", b"BM": "bmp"}


class ImageError(ValueError):
    """An image refused or undecodable; the message says why, in one line (each caller
    raises it as its own error: lenet-dist's UserError, the kit's InputError)."""


def image_size(path: Path, raw: bytes, kind: str) -> tuple[int, int, int]:
    """(height, width, pixels) the decoder will allocate, read from the header without
    decoding; a ImageError if the header is too broken to tell (the decoder would refuse
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
        raise ImageError(f"{path} cannot be decoded as {kind.upper()}: "
                        "its header is truncated or corrupt")
    return size


def check_size(path: Path, height: int, width: int, pixels: int) -> None:
    """Refuse an image too large to decode safely: the kit says it in the same words."""
    if max(height, width) > MAX_SIDE:
        raise ImageError(f"{path} is {width}x{height} pixels; the limit is "
                        f"{MAX_SIDE} per side (resize it first)")
    if pixels > MAX_PIXELS:
        raise ImageError(f"{path} has frames of {pixels:,} pixels in all; the limit is "
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
    from PIL import Image  # when an image is decoded: IDX files need only numpy

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


def decoded(path: Path, raw: bytes, kind: str, background: int) -> np.ndarray:
    """An image of `kind` (from its magic bytes) -> 28x28 grayscale float32 [28, 28, 1],
    area-resampled like the dataset; transparency becomes `background`. An ImageError
    for a header too large or too broken, or anything Pillow cannot decode."""
    check_size(path, *image_size(path, raw, kind))
    from PIL import Image

    # What Pillow raises on a broken file: OSError (truncated data, a decoder error),
    # SyntaxError (a broken PNG chunk), the rest from parsing headers it trusts, and
    # open_image's ValueError and DecompressionBombWarning (an error there).
    errors = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error,
              Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with open_image(path, raw, kind) as im:
            pixels = pixels_of(im, raw)
    except ImageError:
        raise
    except errors as e:
        text = str(e).strip()
        reason = text.splitlines()[0][:160] if text else type(e).__name__
        raise ImageError(f"{path} cannot be decoded as {kind.upper()}: {reason}") from None
    return resize_area(to_gray(pixels, background))
