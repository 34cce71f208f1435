"""What every peer shares, numpy only (each peer runs in its own environment):
the real Fashion-MNIST from IDX files, the epoch order, and the timing protocol.

Protocol: one warm-up epoch (compiles, fills caches), then `--epochs` timed
epochs of training only (no evaluation), drop-last batches, a fresh permutation
per epoch, uint8 images converted to float in [0, 1] inside the step, as
lenet-dist does. Each peer prints one JSON line: its images/s per timed epoch.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np

DATA_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
BATCH = 256
LR = 0.1


def parse_args(extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up")
    p.add_argument("--data-dir", default=os.environ.get("LENET_DIST_DATA_DIR", DATA_DIR))
    if extra:
        extra(p)
    return p.parse_args()


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, 4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_train(data_dir: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [60000, 28, 28, 1] and int64 labels [60000] (split "t10k": the
    10,000 test images)."""
    d = Path(data_dir)
    find = lambda stem: next(p for p in (d / stem, d / f"{stem}.gz") if p.exists())  # noqa: E731
    images = _idx(find(f"{split}-images-idx3-ubyte"))[..., None]  # (a copy: writable)
    labels = _idx(find(f"{split}-labels-idx1-ubyte")).astype(np.int64)
    return np.array(images), labels


def batches(n: int, batch: int, epoch: int) -> np.ndarray:
    """Index array [steps, batch] of one epoch's shuffled, drop-last batches."""
    order = np.random.default_rng(epoch).permutation(n)
    steps = n // batch
    return order[: steps * batch].reshape(steps, batch)


def run(name: str, train_epoch, n: int, args: argparse.Namespace, parameters: int) -> dict:
    """train_epoch(epoch) trains one epoch and returns only when its work is done;
    `parameters` is the model's count, which the driver checks is the seed's."""
    train_epoch(0)  # warm-up: compilation, allocator, caches
    rates = []
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        train_epoch(epoch)
        rates.append((n // args.batch_size) * args.batch_size / (time.perf_counter() - t))
    result = {"name": name, "batch_size": args.batch_size, "parameters": int(parameters),
              "epoch_images_per_sec": rates,
              "images_per_sec": float(np.median(rates))}
    print(json.dumps(result), flush=True)
    return result
