"""Evaluate a saved checkpoint on the full test set, on any device count."""

from __future__ import annotations

import sys
from typing import Callable

from lenet_dist import data as data_lib
from lenet_dist import distributed
from lenet_dist.checkpoint import BEST_METRIC, Checkpoints, CorruptCheckpoint
from lenet_dist.config import Config
from lenet_dist.errors import Failure, UserError
from lenet_dist.feed import eval_feed
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.state import make_optimizer
from lenet_dist.step import build_steps
from lenet_dist.train import evaluate


def warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def choose_steps(ckpts: Checkpoints, step: int | None, best: bool) -> list[int]:
    """The checkpoint asked for, then (when it was not named by --step) the ones to fall
    back to if it proves unreadable: older steps, or the next best by test accuracy."""
    steps = ckpts.steps()
    bad = ckpts.bad_steps()
    if step is not None:
        if step in bad:
            raise Failure(unreadable(ckpts, step, bad[step]))
        if step not in steps:
            raise UserError(f"no checkpoint at step {step}; available: "
                            f"{', '.join(map(str, steps)) or 'none'}")
        return [step]
    if not steps:
        raise Failure(f"no readable checkpoint in {ckpts.directory}"
                      + (f" ({len(bad)} unreadable: steps {', '.join(map(str, bad))})"
                         if bad else ""))
    if best:
        scored = sorted(((ckpts.metrics(s)[BEST_METRIC], s) for s in steps
                         if ckpts.metrics(s) is not None), reverse=True)
        if not scored:
            raise UserError(f"no checkpoint in {ckpts.directory} has test metrics yet "
                            "(only mid-epoch saves); use --step or train to an epoch end")
        return [s for _, s in scored]
    return steps[::-1]


def unreadable(ckpts: Checkpoints, step: int, problem: str) -> str:
    older = [s for s in ckpts.steps() if s < step and s not in ckpts.bad_steps()]
    hint = f"the previous good one is step {older[-1]} (--step {older[-1]})" if older \
        else "no older readable checkpoint remains"
    return f"checkpoint step {step} in {ckpts.directory} is unreadable ({problem}); {hint}"


def restore_params(workdir: str, step: int | None, best: bool, shardings: Shardings,
                   warn: Callable[[str], None] = warn_stderr):
    """(variables placed on `shardings`' mesh: {"params"} and, for BatchNorm recipes,
    {"batch_stats"}; config, step, checkpoint metadata, steps).

    Read-only: an unreadable checkpoint is named and skipped (the previous good one is
    used) unless --step asked for exactly that one."""
    ckpts = Checkpoints(workdir, read_only=True, warn=warn)
    candidates = choose_steps(ckpts, step, best)
    if step is None:  # say what was passed over (newer ones, or any for --best)
        for s, problem in ckpts.bad_steps().items():
            if best or s > candidates[0]:
                warn(f"warning: checkpoint step {s} is unreadable ({problem}); skipped")
    for chosen in candidates:
        config = config_from(ckpts.meta(chosen))
        steps = build_steps(make_optimizer(config), shardings, config)
        try:
            tree, meta = ckpts.restore(chosen, steps.abstract())
        except CorruptCheckpoint as e:
            ckpts.info[chosen].problem = str(e)
            if step is not None:
                raise Failure(unreadable(ckpts, chosen, str(e))) from None
            warn(f"warning: checkpoint step {chosen} is unreadable ({e}); trying "
                 "the next one")
            continue
        return tree["state"].variables, config, chosen, meta, steps
    raise Failure(f"no checkpoint in {ckpts.directory} restores (tried steps "
                  f"{', '.join(map(str, candidates))})")


def config_from(meta: dict) -> Config:
    fields = Config.__dataclass_fields__
    return Config(**{k: v for k, v in meta["config"].items() if k in fields})


def evaluate_checkpoint(workdir: str, step: int | None = None, best: bool = False,
                        devices: int | None = None, data_dir: str | None = None) -> dict:
    shardings = Shardings(make_mesh(devices))
    params, config, chosen, meta, steps = restore_params(workdir, step, best, shardings)
    dataset = data_lib.load(config.dataset, data_dir or config.data_dir)
    distributed.check_same_data((dataset.test.images, dataset.test.labels), dataset.source)
    feed = eval_feed(dataset.test, config.eval_batch_size, shardings)
    metrics = evaluate(steps, params, feed)
    return {"step": chosen, "epoch": meta["epoch"], "devices": shardings.size,
            "test_loss": metrics["loss"], "test_accuracy": metrics["accuracy"],
            "examples": metrics["count"]}


def test_predictions(workdir: str, step: int | None = None, best: bool = False,
                     data_dir: str | None = None, batch: int = 1000) -> dict:
    """Every test image's predicted class from a checkpoint, on one device, with what a
    report shows beside it: the run's config and history, and the parameter count."""
    import jax
    import numpy as np

    from lenet_dist.model import param_count
    from lenet_dist.step import infer

    variables, config, chosen, meta, _ = restore_params(workdir, step, best,
                                                        Shardings(make_mesh(1)))
    dataset = data_lib.load(config.dataset, data_dir or config.data_dir)
    forward = jax.jit(infer)
    images = dataset.test.images
    predictions = np.concatenate([np.asarray(forward(variables, images[i:i + batch])["classes"])
                                  for i in range(0, len(images), batch)])
    return {"config": config, "step": chosen, "history": meta["history"],
            "images": images, "labels": dataset.test.labels, "predictions": predictions,
            "class_names": data_lib.CLASS_NAMES[config.dataset],
            "parameters": param_count(variables["params"])}


def list_checkpoints(workdir: str) -> list[dict]:
    """Every step directory, readable or not: `unreadable` says why one cannot be used,
    `note` what is wrong with one that still can (a bad metrics file)."""
    ckpts = Checkpoints(workdir, read_only=True, warn=lambda _: None)
    best = ckpts.best_step()
    rows = []
    for s, info in sorted(ckpts.info.items()):
        m = info.metrics or {}
        rows.append({"step": s, "test_accuracy": m.get("test_accuracy"),
                     "test_loss": m.get("test_loss"), "best": s == best,
                     "unreadable": info.problem, "note": info.metrics_problem})
    return rows
