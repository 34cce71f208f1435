"""The training loop: mesh, input, state, steps, then a flat loop over epochs.

The host dispatches step i and only then waits for step i-1, so the device
always has work queued and the progress bar stays honest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
from tqdm.auto import tqdm

from lenet_dist import data as data_lib
from lenet_dist.config import Config
from lenet_dist.errors import UserError
from lenet_dist.feed import EvalFeed, TrainFeed, eval_feed, train_feed
from lenet_dist.mesh import Shardings, check_batch, make_mesh
from lenet_dist.state import TrainState, create_state, make_optimizer
from lenet_dist.step import Steps, build_steps, summarize

METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]
    config: Config

    @property
    def final(self) -> dict:
        return self.history[-1]


def evaluate(steps: Steps, params, feed: EvalFeed) -> dict[str, float]:
    """Loss and accuracy over every real example of `feed` (padding masked out)."""
    acc = steps.zeros()
    for i in range(feed.num_batches):
        acc = steps.evaluate(params, acc, feed.images, feed.labels, feed.mask, i)
    metrics = summarize(acc)
    assert metrics["count"] == feed.size, (metrics["count"], feed.size)
    return metrics


def run_epoch(steps: Steps, state: TrainState, feed: TrainFeed, seed: int, epoch: int,
              progress: bool, desc: str) -> tuple[TrainState, dict[str, float], float]:
    """One pass over the shuffled training set; returns state, metrics, seconds."""
    start = time.perf_counter()
    xs, ys = feed.epoch(seed, epoch)
    acc = steps.zeros()
    bar = tqdm(total=feed.steps_per_epoch, desc=desc, unit="step", disable=not progress,
               leave=False, dynamic_ncols=True)
    for i in range(feed.steps_per_epoch):
        previous = acc
        state, acc = steps.train(state, acc, xs, ys, i)
        jax.block_until_ready(previous)  # wait one step behind: the device stays busy
        bar.update()
    metrics = summarize(acc)
    bar.close()
    return state, metrics, time.perf_counter() - start


def format_epoch(r: dict, epochs: int) -> str:
    return (f"epoch {r['epoch']:>{len(str(epochs))}}/{epochs}  "
            f"train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f}  "
            f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f}  "
            f"{r['images_per_sec']:,.0f} img/s  {r['epoch_seconds']:.1f} s")


def train(config: Config, dataset: data_lib.Dataset | None = None,
          log: Callable[[str], None] = print, progress: bool = False) -> TrainResult:
    """Train `config` end to end; append each epoch to <workdir>/metrics.jsonl."""
    config = config.validate()
    t0 = time.perf_counter()

    # Mesh and shardings.
    mesh = make_mesh(config.devices)
    shardings = Shardings(mesh)
    check_batch(config.batch_size, shardings.size)

    # Input: host uint8 arrays -> device-resident feeds.
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    train_split = dataset.train.take(config.train_limit)
    tfeed = train_feed(train_split, config.batch_size, shardings)
    efeed = eval_feed(dataset.test, config.eval_batch_size, shardings)

    # Model, optimizer and state, born replicated; steps jitted once.
    tx = make_optimizer(config)
    state = create_state(config.seed, tx, shardings)
    steps = build_steps(tx, shardings)

    workdir = _prepare_workdir(config.workdir)
    log(f"training LeNet-5 on {dataset.name} ({len(train_split):,} train / "
        f"{efeed.size:,} test images from {dataset.source}) over {shardings.size} "
        f"{mesh.devices.flat[0].platform} device(s), global batch {config.batch_size}, "
        f"{config.optimizer} lr {config.learning_rate}, {config.epochs} epochs")

    history = []
    for epoch in range(config.epochs):
        desc = f"epoch {epoch + 1}/{config.epochs}"
        start = time.perf_counter()
        state, train_m, train_secs = run_epoch(steps, state, tfeed, config.seed, epoch,
                                               progress, desc)
        test_m = evaluate(steps, state.params, efeed)
        record = {
            "epoch": epoch + 1,
            "step": tfeed.steps_per_epoch * (epoch + 1),
            "train_loss": train_m["loss"], "train_accuracy": train_m["accuracy"],
            "test_loss": test_m["loss"], "test_accuracy": test_m["accuracy"],
            "images_per_sec": train_m["count"] / train_secs,
            "train_seconds": train_secs,
            "epoch_seconds": time.perf_counter() - start,
            "devices": shardings.size,
            "batch_size": config.batch_size,
            "time": time.time(),
        }
        history.append(record)
        with open(workdir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        log(format_epoch(record, config.epochs))
        if not math.isfinite(record["train_loss"]):
            raise UserError(f"training diverged at epoch {epoch + 1} (loss "
                            f"{record['train_loss']}); lower --learning-rate")

    total = time.perf_counter() - t0
    images = sum(r["images_per_sec"] * r["train_seconds"] for r in history)
    log(f"done in {total:.1f} s wall ({images / sum(r['train_seconds'] for r in history):,.0f} "
        f"img/s while training); final test accuracy {history[-1]['test_accuracy']:.4f}; "
        f"metrics in {workdir / METRICS_FILE}")
    return TrainResult(state=state, history=history, config=config)


def _prepare_workdir(path: str) -> Path:
    workdir = Path(path)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a directory; choose another path")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / METRICS_FILE).touch()
    except OSError as e:
        raise UserError(f"cannot write to --workdir {workdir}: {e.strerror}") from None
    return workdir
