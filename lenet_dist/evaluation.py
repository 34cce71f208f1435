"""Evaluation: the eval steps over an EvalFeed (the training loop's per-epoch test), and
a saved checkpoint on the full test set, on any device count."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from lenet_dist import distributed
from lenet_dist.checkpoint import Checkpoints
from lenet_dist.feed import EvalFeed, eval_feed
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.model import param_count
from lenet_dist.restore import restore_checkpoint
from lenet_dist.rundir import REPORT_DIR, read_ledger, workdir_path
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


def describe_evaluation(result: dict) -> str:
    """The `eval` command's line for `evaluate_checkpoint`'s result (after the run's path)."""
    return (f"step {result['step']} (epoch {result['epoch']:g}) on {result['devices']} "
            f"device(s): test loss {result['test_loss']:.4f}  test accuracy "
            f"{result['test_accuracy']:.4f}  ({result['examples']:,} images)")


def checkpoints_table(rows: list[dict]) -> list[str]:
    """The `checkpoints` command's lines for `list_checkpoints`' rows: a header, a row
    per step (the best marked), and how the best was chosen."""
    validation = any(row["validation_accuracy"] is not None for row in rows)
    lines = [f"{'step':>8}  " + (f"{'val acc':>8}  " if validation else "")
             + f"{'test acc':>8}  {'test loss':>9}"]
    for row in rows:
        def figure(name):
            return f"{row[name]:.4f}" if row[name] is not None else "-"

        mark = (f"  UNREADABLE: {row['unreadable']}" if row["unreadable"] else
                "  best" if row["best"] else "")
        note = f"  (note: {row['note']}; figures from its history)" if row["note"] else ""
        lines.append(f"{row['step']:>8}  "
                     + (f"{figure('validation_accuracy'):>8}  " if validation else "")
                     + f"{figure('test_accuracy'):>8}  {figure('test_loss'):>9}{mark}{note}")
    lines.append("best: by validation accuracy (the test set is only reported)"
                 if rows[0]["selected_on"] == "validation" else
                 "best: by test accuracy, selected on the test set (train with "
                 "--validation N to choose on held-out training images)")
    return lines


def write_report(runs: list[str], out: str | None, step: int | None, best: bool,
                 data_dir: str | None) -> str:
    """The `report` command: one run's report.md and PNGs (in `out`, default
    <run>/report), or two or more runs compared in compare.md (default
    ./report-compare); `out` is checked before anything is restored. The path written."""
    from lenet_dist import report  # matplotlib: only this command draws

    if len(runs) >= 2:
        out = out or "report-compare"
        report.check_out_dir(out, runs)
        table = {}
        for run in runs:
            tested = test_predictions(run, step, best, data_dir)
            table[os.path.basename(os.path.normpath(run))] = {
                "history": tested["history"], "config": tested["config"].to_dict(),
                "final": {"test_accuracy": float((tested["predictions"]
                                                  == tested["labels"]).mean()),
                          "parameters": tested["parameters"]}}
        return report.write_comparison(out, table)
    (workdir,) = runs
    out = out or os.path.join(workdir, REPORT_DIR)
    report.check_out_dir(out, [workdir])
    tested = test_predictions(workdir, step, best, data_dir)
    return report.write_report(
        out, os.path.basename(os.path.normpath(workdir)),
        tested["history"], tested["config"].to_dict(), tested["labels"],
        tested["predictions"], tested["images"], tested["class_names"],
        extra={"parameters": tested["parameters"], "checkpoint step": tested["step"]},
        image_names=tested.get("image_names"),  # a folder dataset's files, else None
        attempts=tested["attempts"])
