"""The training loop: mesh, input, state, steps, then a flat loop over epochs.

The host dispatches step i and only then waits for step i-1, so the device
always has work queued and the progress bar stays honest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Callable

import jax
from etils import epath
from tqdm.auto import tqdm

from lenet_dist import checkpoint as ckpt_lib
from lenet_dist import data as data_lib
from lenet_dist import distributed
from lenet_dist.config import Config
from lenet_dist.errors import Preempted, UserError
from lenet_dist.feed import EvalFeed, eval_feed, train_feed
from lenet_dist.mesh import Shardings, check_batch, make_mesh
from lenet_dist.preemption import StopRule
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
    sums = steps.zeros()
    for i in range(feed.num_batches):
        sums = steps.evaluate(params, sums, feed.images, feed.labels, feed.mask, i)
    metrics = summarize(sums)
    assert metrics["count"] == feed.size, (metrics["count"], feed.size)
    return metrics


def run_steps(steps: Steps, state: TrainState, sums: dict, xs, ys, first: int, last: int,
              progress: bool, desc: str, after_step: Callable[[int, TrainState, dict], bool]):
    """Steps first..last-1 of an epoch. `after_step(i, state, sums)` returns True to stop."""
    bar = tqdm(total=last, initial=first, desc=desc, unit="step", disable=not progress,
               leave=False, dynamic_ncols=True)
    for i in range(first, last):
        previous = sums
        state, sums = steps.train(state, sums, xs, ys, i)
        jax.block_until_ready(previous)  # wait one step behind: the device stays busy
        bar.update()
        if after_step(i, state, sums):
            break
    bar.close()
    return state, sums


def format_epoch(r: dict, epochs: int) -> str:
    return (f"epoch {r['epoch']:>{len(str(epochs))}}/{epochs}  "
            f"train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f}  "
            f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f}  "
            f"{r['images_per_sec']:,.0f} img/s  {r['epoch_seconds']:.1f} s")


def train(config: Config, dataset: data_lib.Dataset | None = None,
          log: Callable[[str], None] = print, progress: bool = False,
          allow_config_change: bool = False) -> TrainResult:
    """Train `config` end to end, resuming from <workdir>/checkpoints if it holds a run.

    Raises `Preempted` after saving a checkpoint when SIGTERM/SIGINT arrives. In a
    multi-process job every process calls this; process 0 alone logs and writes
    metrics, and all of them stop at the same step.
    """
    config = config.validate()
    t0 = time.perf_counter()
    primary = distributed.is_primary()
    if not primary:
        log, progress = (lambda _: None), False

    # Mesh and shardings; every process must see the same workdir.
    mesh = make_mesh(config.devices)
    shardings = Shardings(mesh)
    check_batch(config.batch_size, shardings.size)
    workdir = prepare_workdir(config.workdir, create=primary)
    distributed.check_same_workdir(workdir)

    # Input: host uint8 arrays -> device-resident feeds; every process the same data.
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    train_split = dataset.train.take(config.train_limit)
    distributed.check_same_data((train_split.images, train_split.labels, dataset.test.images,
                                 dataset.test.labels), dataset.source)
    train_data = train_feed(train_split, config.batch_size, shardings)
    test_data = eval_feed(dataset.test, config.eval_batch_size, shardings)
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs

    # Model, optimizer and state, born replicated; steps jitted once.
    tx = make_optimizer(config)
    steps = build_steps(tx, shardings)

    # Checkpoint restore: this run's latest readable checkpoint, else scratch.
    ckpt = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints) if config.checkpoint \
        else None
    restored = ckpt.restore_latest(steps.abstract(), warn=log) if ckpt else None
    history: list[dict] = []
    if restored is None:
        state, sums = create_state(config.seed, tx, shardings), steps.zeros()
    else:
        tree, meta = restored
        if not allow_config_change:
            ckpt_lib.check_compatible(meta["config"], config.to_dict(), config.workdir)
        state, sums, history = tree["state"], tree["acc"], meta["history"]
        if primary:
            write_metrics(workdir, history)  # drop epochs recorded after this checkpoint
    start = int(state.step)
    if restored is not None:
        if start >= total_steps:
            log(f"run in {workdir} is finished: {start} steps = {config.epochs} epochs"
                + (f", test accuracy {history[-1]['test_accuracy']:.4f}" if history else "")
                + "; use --epochs to train longer or a new --workdir")
            ckpt.close()
            return TrainResult(state=state, history=history, config=config)
        log(f"resuming from checkpoint at step {start} (epoch {start // steps_per_epoch + 1}, "
            f"step {start % steps_per_epoch} of {steps_per_epoch}) in {ckpt.directory}")

    log(f"training LeNet-5 on {dataset.name} ({len(train_split):,} train / "
        f"{test_data.size:,} test images from {dataset.source}) over {shardings.size} "
        f"{mesh.devices.flat[0].platform} device(s), global batch {config.batch_size}, "
        f"{config.optimizer} lr {config.learning_rate}, {config.epochs} epochs")

    versions = ckpt_lib.versions()

    def meta_for(step: int) -> dict:
        return {"config": config.to_dict(), "step": step, "epoch": step / steps_per_epoch,
                "steps_per_epoch": steps_per_epoch, "history": list(history),
                "mesh": dict(mesh.shape),
                "versions": versions, "dataset_source": dataset.source}

    stop = StopRule(multi_process=jax.process_count() > 1,
                    process_index=jax.process_index())

    def after_step(epoch: int, i: int, state, sums) -> bool:
        """Mid-epoch saves and the stop rule, after step i of `epoch` is queued."""
        step = epoch * steps_per_epoch + i + 1
        stopping = stop.at_step(step)
        mid_epoch = i + 1 < steps_per_epoch
        if ckpt and mid_epoch and (stopping or (config.save_every_steps
                                                and step % config.save_every_steps == 0)):
            ckpt.save(step, {"state": state, "acc": sums}, meta_for(step), wait=stopping)
        if stopping and mid_epoch:
            raise Preempted(stop.signum, step, saved=bool(ckpt))
        return False

    try:
        with stop:
            for epoch in range(start // steps_per_epoch, config.epochs):
                desc = f"epoch {epoch + 1}/{config.epochs}"
                t_epoch = time.perf_counter()
                first = start - epoch * steps_per_epoch if epoch == start // steps_per_epoch else 0
                if first == 0:
                    sums = steps.zeros()
                xs, ys = train_data.epoch(config.seed, epoch)
                state, sums = run_steps(steps, state, sums, xs, ys, first, steps_per_epoch,
                                        progress, desc, functools.partial(after_step, epoch))
                train_metrics = summarize(sums)
                train_secs = time.perf_counter() - t_epoch
                test_metrics = evaluate(steps, state.params, test_data)
                record = {
                    "epoch": epoch + 1,
                    "step": steps_per_epoch * (epoch + 1),
                    "train_loss": train_metrics["loss"],
                    "train_accuracy": train_metrics["accuracy"],
                    "test_loss": test_metrics["loss"], "test_accuracy": test_metrics["accuracy"],
                    "images_per_sec":
                        (steps_per_epoch - first) * config.batch_size / train_secs,
                    "train_seconds": train_secs,
                    "epoch_seconds": time.perf_counter() - t_epoch,
                    "devices": shardings.size,
                    "processes": jax.process_count(),
                    "batch_size": config.batch_size,
                    "time": time.time(),
                }
                history.append(record)
                if primary:
                    write_metrics(workdir, history)
                log(format_epoch(record, config.epochs))
                if not math.isfinite(record["train_loss"]):
                    raise UserError(f"training diverged at epoch {epoch + 1} (loss "
                                    f"{record['train_loss']}); lower --learning-rate")
                if ckpt:
                    ckpt.save(record["step"], {"state": state, "acc": sums},
                              meta_for(record["step"]),
                              metrics={"test_accuracy": record["test_accuracy"],
                                       "test_loss": record["test_loss"]},
                              wait=stop.should_stop())
                if stop.should_stop() and epoch + 1 < config.epochs:
                    raise Preempted(stop.signum, record["step"], saved=bool(ckpt))

    finally:
        if ckpt:
            ckpt.close()  # let an in-flight async save finish

    total = time.perf_counter() - t0
    trained = [r for r in history if r["epoch"] > start // steps_per_epoch]
    rate = sum(r["images_per_sec"] * r["train_seconds"] for r in trained) / max(
        sum(r["train_seconds"] for r in trained), 1e-9)
    log(f"done in {total:.1f} s wall ({rate:,.0f} img/s while training); final test "
        f"accuracy {history[-1]['test_accuracy']:.4f}; metrics in {workdir / METRICS_FILE}")
    return TrainResult(state=state, history=history, config=config)


def write_metrics(workdir: epath.Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the history (atomically; object stores cannot append)."""
    tmp = workdir / (METRICS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(workdir / METRICS_FILE)


def prepare_workdir(path: str, create: bool = True) -> epath.Path:
    workdir = ckpt_lib.workdir_path(path)
    try:
        if workdir.exists() and not workdir.is_dir():
            raise UserError(f"--workdir {path} is a file, not a directory; choose another path")
        if create:
            workdir.mkdir(parents=True, exist_ok=True)
            if not (workdir / METRICS_FILE).exists():
                (workdir / METRICS_FILE).write_text("")
    except OSError as e:
        raise UserError(f"cannot write to --workdir {path}: {e.strerror or e}") from None
    return workdir
