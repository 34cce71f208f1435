"""Evaluation: the eval steps over an EvalFeed (the training loop's per-epoch test), and
a saved checkpoint on the full test set, on any device count."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lenet_dist import distributed
from lenet_dist.checkpoint import Checkpoints
from lenet_dist.feed import EvalFeed, eval_feed
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.model import param_count
from lenet_dist.restore import restore_checkpoint
from lenet_dist.rundir import read_ledger, workdir_path
from lenet_dist.sources import load_dataset
from lenet_dist.step import Steps, summarize


def evaluate(steps: Steps, variables, feed: EvalFeed) -> dict[str, float]:
    """Loss and accuracy over every real example of `feed` (padding masked out);
    `variables` is the state's (`TrainState.variables`: BatchNorm in eval mode)."""
    sums = steps.zeros()
    for i in range(feed.num_batches):
        sums = steps.evaluate(variables, sums, feed.images, feed.labels, feed.mask, i)
    metrics = summarize(sums)
    assert metrics["count"] == feed.size, (metrics["count"], feed.size)
    return metrics


def evaluate_checkpoint(workdir: str, step: int | None = None, best: bool = False,
                        devices: int | None = None, data_dir: str | None = None) -> dict:
    distributed.check_same_settings({"step": step, "best": best}, "eval")
    shardings = Shardings(make_mesh(devices))
    restored = restore_checkpoint(workdir, shardings, step, best)
    config = restored.config
    dataset = load_dataset(config.replace(data_dir=data_dir), log=lambda _: None)
    distributed.check_same_data((dataset.test.images, dataset.test.labels), dataset.source)
    feed = eval_feed(dataset.test, config.eval_batch_size, shardings)
    metrics = evaluate(restored.step_fns, restored.variables, feed)
    return {"step": restored.step, "epoch": restored.meta["epoch"], "devices": shardings.size,
            "test_loss": metrics["loss"], "test_accuracy": metrics["accuracy"],
            "examples": metrics["count"]}


def test_predictions(workdir: str, step: int | None = None, best: bool = False,
                     data_dir: str | None = None, batch: int = 1000) -> dict:
    """Every test image's predicted class from a checkpoint, on one device, with what a
    report shows beside it: the run's config and history, the parameter count, the
    test images' file names (`image_names`: a folder dataset's, else None) and the run's
    goodput ledger (`attempts`: [] for a run without one)."""
    restored = restore_checkpoint(workdir, Shardings(make_mesh(1)), step, best)
    variables, config = restored.variables, restored.config
    dataset = load_dataset(config.replace(data_dir=data_dir), log=lambda _: None)
    forward = restored.forward
    images = dataset.test.images
    predictions = np.concatenate([np.asarray(forward(variables, images[i:i + batch])["classes"])
                                  for i in range(0, len(images), batch)])
    return {"config": config, "step": restored.step, "history": restored.meta["history"],
            "images": images, "labels": dataset.test.labels, "predictions": predictions,
            "class_names": dataset.class_names, "image_names": dataset.test.names,
            "attempts": read_ledger(workdir_path(workdir), lambda _: None),
            "parameters": param_count(variables["params"])}


def list_checkpoints(workdir: str, warn: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Every step directory, readable or not: `unreadable` says why one cannot be used,
    `note` what is wrong with one that still can (a bad metrics file). `warn` gets the
    notes on what is not a step (an entry the project did not write)."""
    ckpts = Checkpoints(workdir, read_only=True, warn=warn)
    best, split = ckpts.best_step(), ckpts.chosen_on()
    rows = []
    for step, info in sorted(ckpts.info.items()):
        metrics = info.metrics or {}
        rows.append({"step": step, "test_accuracy": metrics.get("test_accuracy"),
                     "test_loss": metrics.get("test_loss"),
                     "validation_accuracy": metrics.get("validation_accuracy"),
                     "best": step == best, "selected_on": split,
                     "unreadable": info.problem, "note": info.metrics_problem})
    return rows
