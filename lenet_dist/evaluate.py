"""Evaluate a saved checkpoint on the full test set, on any device count."""

from __future__ import annotations

from lenet_dist import data as data_lib
from lenet_dist import distributed
from lenet_dist.checkpoint import Checkpoints
from lenet_dist.config import Config
from lenet_dist.errors import UserError
from lenet_dist.feed import eval_feed
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.state import make_optimizer
from lenet_dist.step import build_steps
from lenet_dist.train import evaluate


def choose_step(ckpts: Checkpoints, step: int | None, best: bool) -> int:
    steps = ckpts.steps()
    if not steps:
        raise UserError(f"no checkpoints in {ckpts.directory}")
    if best:
        chosen = ckpts.best_step()
        if chosen is None:
            raise UserError(f"no checkpoint in {ckpts.directory} has test metrics yet "
                            "(only mid-epoch saves); use --step or train to an epoch end")
        return chosen
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UserError(f"no checkpoint at step {step}; available: "
                        f"{', '.join(map(str, steps))}")
    return step


def restore_params(workdir: str, step: int | None, best: bool, shardings: Shardings):
    """(params placed on `shardings`' mesh, config, step, checkpoint metadata)."""
    ckpts = Checkpoints(workdir, read_only=True)
    chosen = choose_step(ckpts, step, best)
    meta = ckpts.meta(chosen)
    fields = Config.__dataclass_fields__
    config = Config(**{k: v for k, v in meta["config"].items() if k in fields})
    steps = build_steps(make_optimizer(config), shardings)
    tree, meta = ckpts.restore(chosen, steps.abstract())
    return tree["state"].params, config, chosen, meta, steps


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


def list_checkpoints(workdir: str) -> list[dict]:
    ckpts = Checkpoints(workdir, read_only=True)
    best = ckpts.best_step()
    rows = []
    for s in ckpts.steps():
        m = ckpts.metrics(s) or {}
        rows.append({"step": s, "test_accuracy": m.get("test_accuracy"),
                     "test_loss": m.get("test_loss"), "best": s == best})
    return rows
