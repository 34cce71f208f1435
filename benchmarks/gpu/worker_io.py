"""What the GPU workers share: the images they train on and the RESULT line run.py reads."""

from __future__ import annotations

import json
import os

import numpy as np

import common  # benchmarks/peers (on sys.path before this import): the CPU peers' data loading


def images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """n training images and labels (Fashion-MNIST, repeated; else random pixels), and
    where they came from."""
    try:
        x, y = common.load_train(os.environ.get("LENET_DIST_DATA_DIR", common.DATA_DIR))
        source = "fashion_mnist train"
    except Exception:  # no data on the device machine: speed does not depend on pixels
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
        y = rng.integers(0, 10, 60000).astype(np.int64)
        source = "random pixels"
    reps = -(-n // len(y))
    return np.tile(x, (reps, 1, 1, 1))[:n], np.tile(y, reps)[:n], source


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)
