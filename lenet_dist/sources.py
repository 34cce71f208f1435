"""Which data a run's `--dataset` names, loaded: the built-in datasets (data.py), a
directory of IDX files (`idx:DIR`), or a user's labelled images in class folders
(`folder:PATH`, folder.py). The one place that reads `Config.dataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lenet_dist import data as data_lib
from lenet_dist.caches import expand_user
from lenet_dist.config import Config, dataset_kind
from lenet_dist.errors import UserError
from lenet_dist.model import MAX_CLASSES, MIN_CLASSES

# idx:DIR may name its classes, one per line, in label order; else they are "0".."K-1".
CLASSES_FILE = "classes.txt"
MAX_CLASSES_FILE_BYTES = 2**20


def load_dataset(config: Config, progress: bool = False,
                 log: Callable[[str], None] = print) -> data_lib.Dataset:
    """The dataset `config` trains on. Folder datasets decode once and then come from a
    cache; `progress` shows a bar while they decode."""
    kind, where = dataset_kind(config.dataset)
    if kind == "folder":
        from lenet_dist import folder  # Pillow decoding: only for folder datasets

        dataset, info = folder.load_folder(
            where, test_fraction=config.test_fraction, seed=config.seed,
            skip_bad_files=config.skip_bad_files, progress=progress, log=log)
        log(info.summary())
        return dataset
    if kind == "idx":
        return load_idx(where)
    return data_lib.load(config.dataset, config.data_dir)


def load_idx(directory: str) -> data_lib.Dataset:
    """idx:DIR: its four IDX files, with the class names of DIR/classes.txt if there is
    one, else "0".."K-1" for K = the largest label + 1, every label 0..K-1 then having
    a training image (data.dense_class_names: a stray label must not add classes).
    A leading ~ or ~user in DIR is expanded, as folder:PATH's is."""
    spec = f"idx:{directory}"  # the dataset's name: as the user gave it, like folder:
    directory = str(expand_user(directory, "--dataset idx:"))
    names_file = Path(directory) / CLASSES_FILE
    names = None
    if names_file.exists():
        with data_lib.open_input(names_file) as f:
            raw = f.read(MAX_CLASSES_FILE_BYTES + 1)
        try:
            names = tuple(line.strip() for line in raw.decode("utf-8").splitlines()
                          if line.strip())
        except UnicodeDecodeError:
            raise UserError(f"{names_file} is not UTF-8 text") from None
        if not MIN_CLASSES <= len(names) <= MAX_CLASSES or len(raw) > MAX_CLASSES_FILE_BYTES:
            raise UserError(f"{names_file} names {len(names)} classes; give "
                            f"{MIN_CLASSES} to {MAX_CLASSES}, one per line")
        if len(set(names)) != len(names):
            raise UserError(f"{names_file} names a class twice")
    dataset = data_lib.load_idx_dir(directory, spec, names, option="--dataset idx:",
                                    infer_classes=names is None)
    if dataset.num_classes < MIN_CLASSES:  # uint8 labels: never over MAX_CLASSES
        raise UserError(f"{spec} holds only label 0: one class, and a model needs "
                        f"{MIN_CLASSES} to {MAX_CLASSES}")
    return dataset


def shown_names(names, most: int = 5) -> str:
    """A few class names for a message: 'a, b, c, ... (12)'."""
    names = list(names)
    return ", ".join(names[:most]) + (f", ... ({len(names)})" if len(names) > most else "")
