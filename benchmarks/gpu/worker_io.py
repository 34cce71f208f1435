"""What the GPU workers share: the images they train on, the epoch timing, and the
RESULT line run.py reads."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

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


def timed_epochs(epoch: Callable[[int], object], epochs: int, images_per_epoch: int
                 ) -> tuple[float, list[float], object]:
    """Epoch 0 (the warm-up: compilation, caches) timed alone, then epochs 1..`epochs`:
    the warm-up's seconds, each timed epoch's images/s, and what the last epoch returned.
    `epoch(e)` must wait for its own work before it returns."""
    t = time.perf_counter()
    epoch(0)
    first = time.perf_counter() - t
    rates, last = [], None
    for e in range(1, epochs + 1):
        t = time.perf_counter()
        last = epoch(e)
        rates.append(images_per_epoch / (time.perf_counter() - t))
    return first, rates, last
