"""Write folder datasets (class folders of image files) from arrays, for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# How image i is written, by i % len(FORMATS): mostly 28x28 grayscale PNG, and among them
# the other formats and sizes a user's folder holds. All but JPEG are lossless after the
# decoder's area resize (an integer upscale by repetition averages back exactly).
FORMATS = ("png", "png", "png", "png", "jpeg", "png-rgb", "png-56", "png", "png-84", "bmp",
           "png", "gif")
LOSSLESS = tuple(f for f in FORMATS if f != "jpeg")


def folder_name(label: int, class_name: str) -> str:
    """Class `label`'s folder: its number first, so that the folders' sorted order is the
    labels' order, and no '/' ("T-shirt/top" -> "0-T-shirt_top")."""
    return f"{label}-{class_name.replace('/', '_')}"


def write_image(path: Path, pixels: np.ndarray, kind: str) -> Path:
    """One uint8 [28, 28] image as `kind`; returns the file's path (suffix added)."""
    image = Image.fromarray(pixels, "L")
    if kind == "png-rgb":
        image, suffix = image.convert("RGB"), ".png"
    elif kind in ("png-56", "png-84"):
        scale = int(kind[4:]) // 28
        image = Image.fromarray(pixels.repeat(scale, 0).repeat(scale, 1), "L")
        suffix = ".PNG"  # suffixes match case-insensitively
    else:
        suffix = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "gif": ".gif"}[kind]
    out = path.with_suffix(suffix)
    image.save(out, quality=95) if kind == "jpeg" else image.save(out)
    return out


def write_folder(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                 class_names: tuple[str, ...], formats: tuple[str, ...] = FORMATS
                 ) -> dict[str, list[tuple[int, str]]]:
    """root/<split>/<class>/<index>.<ext> for each split's (images [n, 28, 28(, 1)],
    labels); returns, per split, (source index, format) in the order the folder loader
    reads them (class by class, then by file name)."""
    order = {}
    for split, (images, labels) in splits.items():
        images = images.reshape(len(images), 28, 28)
        assert len(class_names) <= 10  # one digit each: the names sort as the labels
        for label, name in enumerate(class_names):
            (root / split / folder_name(label, name)).mkdir(parents=True, exist_ok=True)
        written = []
        for i, (pixels, label) in enumerate(zip(images, labels)):
            kind = formats[i % len(formats)]
            write_image(root / split / folder_name(label, class_names[label]) / f"{i:06d}",
                        pixels, kind)
            written.append((int(label), i, kind))
        order[split] = [(i, kind) for _, i, kind in sorted(written)]
    return order
