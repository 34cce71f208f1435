"""Write folder datasets (class folders of image files) from arrays, for the tests.

Not a test module: test_folder.py and test_bad_inputs.py import it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

# How image i is written, by i % len(FORMATS): mostly 28x28 grayscale PNG, and among them
# the other formats and sizes a user's folder holds. All but JPEG are lossless after the
# decoder's area resize (an integer upscale by repetition averages back exactly).
FORMATS = ("png", "png", "png", "png", "jpeg", "png-rgb", "png-56", "png", "png-84", "bmp",
           "png", "gif")
LOSSLESS = tuple(f for f in FORMATS if f != "jpeg")


def folder_name(class_name: str) -> str:
    """A class's folder: its name with '/' (which no file name can hold) as '_':
    "T-shirt/top" -> "T-shirt_top". The loader's class names are these folder names."""
    return class_name.replace("/", "_")


def write_image(path: Path, pixels: np.ndarray, kind: str) -> Path:
    """One uint8 [28, 28] image as `kind` (one of FORMATS); returns the file's path (the
    suffix added)."""
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


@dataclasses.dataclass(frozen=True)
class WrittenSplit:
    """One split's files in the order the folder loader reads them (class folder by class
    folder in code-point order, then by file name)."""

    index: np.ndarray   # int [n]: the source array's row each file holds
    labels: np.ndarray  # int32 [n]: the loader's label (the folder's place in sorted order)
    kinds: np.ndarray   # str [n]: its FORMATS entry
    paths: list[Path]

    @property
    def lossless(self) -> np.ndarray:
        return np.isin(self.kinds, LOSSLESS)


@dataclasses.dataclass(frozen=True)
class WrittenFolder:
    root: Path
    class_names: tuple[str, ...]  # the folders' names, sorted: the loader's class names
    splits: dict[str, WrittenSplit]

    def relabel(self, labels: np.ndarray, source_names: tuple[str, ...]) -> np.ndarray:
        """The source's labels as the loader's (the class folders sort differently)."""
        to_folder = np.array([self.class_names.index(folder_name(n)) for n in source_names])
        return to_folder[labels].astype(np.int32)


def write_folder(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                 class_names: tuple[str, ...], formats: tuple[str, ...] = FORMATS
                 ) -> WrittenFolder:
    """root/<split>/<folder_name(class)>/<index>.<ext> for each split's (images
    [n, 28, 28(, 1)], labels), image i written as formats[i % len(formats)]."""
    folders = tuple(sorted({folder_name(n) for n in class_names}))
    assert len(folders) == len(class_names), "two class names give one folder name"
    written = {}
    for split, (images, labels) in splits.items():
        images = images.reshape(len(images), 28, 28)
        for name in class_names:
            (root / split / folder_name(name)).mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (pixels, label) in enumerate(zip(images, labels)):
            kind = formats[i % len(formats)]
            folder = folder_name(class_names[label])
            path = write_image(root / split / folder / f"{i:06d}", pixels, kind)
            rows.append((folders.index(folder), i, kind, path))
        rows.sort(key=lambda r: r[:2])
        written[split] = WrittenSplit(np.array([r[1] for r in rows], int),
                                      np.array([r[0] for r in rows], np.int32),
                                      np.array([r[2] for r in rows]), [r[3] for r in rows])
    return WrittenFolder(root, folders, written)
