"""The training loop: mesh, input, state, steps, then a flat loop over epochs.

The host dispatches step i and only then waits for step i-1, so the device
always has work queued and the progress bar stays honest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import time
from typing import Callable

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from lenet_dist import checkpoint as ckpt_lib
from lenet_dist import data as data_lib
from lenet_dist import distributed, safefs, versions
from lenet_dist.config import Config, write_config
from lenet_dist.errors import Failure, Preempted, UserError
from lenet_dist.evaluation import evaluate
from lenet_dist.feed import eval_feed, train_feed
from lenet_dist.mesh import Shardings, check_batch, make_mesh
from lenet_dist.history import describe_best, stopped_early
from lenet_dist.preemption import StopRule
from lenet_dist.restore import class_names_of, config_from
from lenet_dist.sources import load_dataset, shown_names
from lenet_dist.state import TrainState, create_state, learning_rate, make_optimizer
from lenet_dist.step import Steps, all_finite, build_steps, infer, summarize
from lenet_dist.tboard import Board, ProfileWindow, parse_profile_steps

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]
    config: Config

    @property
    def final(self) -> dict:
        return self.history[-1]


class Diverged(Exception):
    """The loss or the parameters stopped being finite at `step` (1-based)."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"diverged at step {step}")


def run_steps(steps: Steps, state: TrainState, sums: dict, xs, ys, first: int, last: int,
              offset: int, bar: tqdm, after_step: Callable[[int, TrainState, dict], None],
              on_loss: Callable[[int, float], None], profile: ProfileWindow,
              on_first_step: Callable[[float], None] | None = None):
    """Steps first..last-1 of an epoch whose first step is number `offset` + 1.

    The host dispatches step i and only then waits for step i-1, so the device always
    has work queued. That step's loss (its sum minus the one before) is read then, at
    no extra stall: checked, so a divergence stops the run at its step, and handed to
    `on_loss(step, loss)` for the progress bar and TensorBoard. With `on_first_step`,
    the host waits once for step `first` and hands it its wall seconds (dispatch,
    compile and run: what a benchmark reports apart from the steady state)."""
    before = float(sums["loss_sum"]) if first > 0 else 0.0
    for i in range(first, last):
        previous = sums
        profile.before_step(offset + i + 1)
        t_step = time.perf_counter()
        state, sums = steps.train(state, sums, xs, ys, i)
        if i == first and on_first_step is not None:
            jax.block_until_ready(sums)  # once a run: the first step's time, compile included
            on_first_step(time.perf_counter() - t_step)
        profile.after_step(offset + i + 1, sums)
        jax.block_until_ready(previous)  # wait one step behind: the device stays busy
        if i > first:
            total = float(previous["loss_sum"])
            if not math.isfinite(total):
                raise Diverged(offset + i)  # the step whose sums are `previous`
            on_loss(offset + i, (total - before) / xs.shape[1])
            before = total
        bar.update()
        after_step(i, state, sums)
    if last > first:  # the epoch's last step: the epoch's summary waits for it anyway
        total = float(sums["loss_sum"])
        if math.isfinite(total):  # (a divergence there is the epoch check's to name)
            on_loss(offset + last, (total - before) / xs.shape[1])
    return state, sums


def format_epoch(record: dict, epochs: int) -> str:
    validation = (f"val loss {record['validation_loss']:.4f} acc "
                  f"{record['validation_accuracy']:.4f}  " if "validation_accuracy" in record
                  else "")
    return (f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  "
            f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  "
            f"{validation}"
            f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}  "
            f"{record['images_per_sec']:,.0f} img/s  {record['epoch_seconds']:.1f} s")


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a run shows besides metrics.jsonl: TensorBoard events in <workdir>/tb (process
    0 only), the train loss there every K steps, a jax.profiler trace of steps A..B."""

    tensorboard: bool = False
    log_every_steps: int = 50
    profile_steps: str | None = None


def train(config: Config, dataset: data_lib.Dataset | None = None,
          log: Callable[[str], None] = print, progress: bool = False,
          allow_config_change: bool = False, outputs: Outputs = Outputs()) -> TrainResult:
    """Train `config` end to end, resuming from <workdir>/checkpoints if it holds a run.

    Holds the workdir's lock throughout (process 0 in a job). Raises `Preempted`
    after saving a checkpoint when SIGTERM/SIGINT arrives, and `Failure` when the
    run diverges (nothing non-finite is ever saved). In a multi-process job every
    process calls this; process 0 alone logs and writes, and all stop at the same step.
    """
    config = config.validate()
    if outputs.profile_steps:
        parse_profile_steps(outputs.profile_steps)  # a usage error before anything starts
    primary = distributed.is_primary()
    if not primary:
        log, progress = (lambda _: None), False
    elif progress:
        log = tqdm.write  # lines above the progress bar, not through it

    # Mesh and shardings; every process must see the same workdir, locked by process 0.
    mesh = make_mesh(config.devices)
    shardings = Shardings(mesh)
    check_batch(config.batch_size, shardings.size)
    workdir = prepare_workdir(config.workdir, create=primary)
    distributed.check_same_config(config.to_dict(), allow_config_change=allow_config_change)
    distributed.check_same_workdir(workdir)
    with contextlib.ExitStack() as cleanup:  # last in, first out: saves end, then unlock
        lock = distributed.on_primary(lambda: lock_workdir(workdir, log))
        if lock is not None:
            cleanup.callback(lock.release)
        if not config.checkpoint and (workdir / ckpt_lib.CHECKPOINT_DIR).exists():
            raise UserError(f"--workdir {config.workdir} holds checkpoints of a run; "
                            "--no-checkpoint would start another one over its "
                            "metrics.jsonl; use another --workdir")
        ckpt = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints, warn=log) \
            if config.checkpoint else None
        if ckpt:
            cleanup.callback(ckpt.close)  # let an in-flight async save finish
        return _run(config, dataset, mesh, shardings, workdir, ckpt, log, progress,
                    allow_config_change, outputs)


def _run(config: Config, dataset: data_lib.Dataset | None, mesh, shardings: Shardings,
         workdir: epath.Path, ckpt: ckpt_lib.Checkpoints | None, log: Callable[[str], None],
         progress: bool, allow_config_change: bool, outputs: Outputs) -> TrainResult:
    """The run itself, once the workdir is locked and its checkpoints are open."""
    t0 = time.perf_counter()
    primary = distributed.is_primary()
    stop = StopRule(multi_process=jax.process_count() > 1, process_index=jax.process_index(),
                    process_count=jax.process_count())

    # Input: host uint8 arrays -> device-resident feeds; every process the same data.
    # The validation images come out of the training split (the seed says which) before
    # --train-limit takes its first N.
    dataset = dataset or load_dataset(config, progress=progress, log=log)
    train_split, validation_split = data_lib.hold_out(dataset.train, config.validation,
                                                      config.seed)
    train_split = train_split.take(config.train_limit)
    names = np.frombuffer("\n".join(dataset.class_names).encode(), np.uint8)
    distributed.check_same_data((train_split.images, train_split.labels, dataset.test.images,
                                 dataset.test.labels, validation_split.labels, names),
                                dataset.source)
    train_data = train_feed(train_split, config.batch_size, shardings)
    test_data = eval_feed(dataset.test, config.eval_batch_size, shardings)
    validation_data = eval_feed(validation_split, config.eval_batch_size, shardings) \
        if config.validation else None
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs

    # Model, optimizer and state, born replicated; steps jitted once.
    tx = make_optimizer(config, steps_per_epoch)
    steps = build_steps(tx, shardings, config, dataset.num_classes)

    # The latest readable checkpoint of this run, else scratch. The saved config is
    # compared before anything is restored.
    def compatible(meta: dict) -> None:
        ckpt_lib.check_compatible(meta["config"], config.to_dict(), config.workdir,
                                  allow_change=allow_config_change, step=meta["step"])
        saved = class_names_of(meta, config_from(meta))
        if tuple(saved) != dataset.class_names:
            raise UserError(
                f"--workdir {config.workdir} holds a run on {len(saved)} classes "
                f"({shown_names(saved)}), the data has {dataset.num_classes} "
                f"({shown_names(dataset.class_names)}); use another --workdir")

    restored = ckpt.restore_latest(lambda meta: steps.abstract(), check=compatible) \
        if ckpt else None
    history: list[dict] = []
    if restored is None:
        state, sums = (create_state(config.seed, tx, shardings, config.recipe,
                                    dataset.num_classes), steps.zeros())
    else:
        tree, meta = restored
        state, sums, history = tree["state"], tree["acc"], meta["history"]
    if primary:  # epochs after the checkpoint dropped, another run's lines kept aside
        start_metrics(workdir, history, log)
        write_config(workdir, config)  # what this run computes, for `train --config`
    start = int(state.step)
    if restored is not None:
        early = stopped_early(history, config.early_stop)
        if early is not None:
            log(f"run in {workdir} is finished: it stopped early at epoch {early}, "
                f"{config.early_stop} epochs without a better validation accuracy; "
                f"{describe_best(history)}; to train on, raise --early-stop (or give 0) "
                "and --epochs")
            return TrainResult(state=state, history=history, config=config)
        if start >= total_steps:
            log(f"run in {workdir} is finished: {start} steps = {config.epochs} epochs"
                + (f", test accuracy {history[-1]['test_accuracy']:.4f}" if history else "")
                + "; use --epochs to train longer or a new --workdir")
            return TrainResult(state=state, history=history, config=config)
        log(f"resuming from checkpoint at step {start} (epoch {start // steps_per_epoch + 1}, "
            f"step {start % steps_per_epoch} of {steps_per_epoch}) in {ckpt.directory}")
    if ckpt:
        ckpt.check_writable({"state": state, "acc": sums})  # before an epoch is spent

    held = f" / {len(validation_split):,} validation" if config.validation else ""
    log(f"training LeNet-5 on {dataset.name} ({len(train_split):,} train{held} / "
        f"{test_data.size:,} test images, {dataset.num_classes} classes, from "
        f"{dataset.source}) over {shardings.size} "
        f"{mesh.devices.flat[0].platform} device(s), global batch {config.batch_size}, "
        f"{config.optimizer} lr {config.learning_rate}, {config.epochs} epochs")

    installed = versions.installed()
    lr = learning_rate(config, steps_per_epoch)
    lr_at = (lambda step: float(lr(step))) if callable(lr) else (lambda step: lr)
    cleanup = contextlib.ExitStack()
    board = cleanup.enter_context(Board(workdir / TB_DIR, enabled=outputs.tensorboard
                                        and primary, purge_step=start + 1))
    profile = cleanup.enter_context(ProfileWindow(
        outputs.profile_steps if primary else None, workdir / TB_DIR))
    bar = cleanup.enter_context(tqdm(
        total=total_steps, initial=start, unit="step", disable=not progress,
        dynamic_ncols=True, leave=False))  # one bar for the run: its ETA is the run's
    grid = dataset.test.take(32)
    forward = jax.jit(infer)

    def on_loss(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % outputs.log_every_steps == 0:
            board.scalars(step, {"train/step_loss": loss, "lr": lr_at(step)})

    def meta_for(step: int) -> dict:
        return {"config": config.to_dict(), "step": step, "epoch": step / steps_per_epoch,
                "steps_per_epoch": steps_per_epoch, "history": list(history),
                "mesh": dict(mesh.shape),
                "versions": installed, "dataset_source": dataset.source,
                "class_names": list(dataset.class_names)}

    def save(step: int, state, sums, wait: bool, metrics: dict | None = None) -> None:
        """Save, unless the state is not finite: then the run has diverged at `step`."""
        if not (math.isfinite(float(sums["loss_sum"])) and bool(all_finite(state.params))):
            raise Diverged(step)
        ckpt.save(step, {"state": state, "acc": sums}, meta_for(step), metrics=metrics,
                  wait=wait)

    def after_step(epoch: int, i: int, state, sums) -> None:
        """Mid-epoch saves and the stop rule, after step i of `epoch` is queued."""
        step = epoch * steps_per_epoch + i + 1
        stopping = stop.at_step(step)
        mid_epoch = i + 1 < steps_per_epoch
        if ckpt and mid_epoch and (stopping or (config.save_every_steps
                                                and step % config.save_every_steps == 0)):
            save(step, state, sums, wait=stopping)
        if stopping and mid_epoch:
            raise Preempted(stop.signum, step, saved=bool(ckpt))

    first_step: dict[str, float] = {}  # this (re)started run's first step, for benchmarks

    def on_first_step(seconds: float) -> None:
        first_step.update(first_step_seconds=seconds, first_step_time=time.time())

    try:
        with stop, cleanup:
            for epoch in range(start // steps_per_epoch, config.epochs):
                bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
                t_epoch = time.perf_counter()
                first_of_run = epoch == start // steps_per_epoch
                first = start - epoch * steps_per_epoch if first_of_run else 0
                if first == 0:
                    sums = steps.zeros()
                xs, ys = train_data.epoch(config.seed, epoch)
                state, sums = run_steps(steps, state, sums, xs, ys, first, steps_per_epoch,
                                        epoch * steps_per_epoch, bar,
                                        functools.partial(after_step, epoch), on_loss, profile,
                                        on_first_step if first_of_run else None)
                train_metrics = summarize(sums)
                train_secs = time.perf_counter() - t_epoch
                if not math.isfinite(train_metrics["loss"]):
                    raise Diverged(steps_per_epoch * (epoch + 1))
                t_eval = time.perf_counter()
                test_metrics = evaluate(steps, state.variables, test_data)
                held_out = {}
                if validation_data is not None:
                    scores = evaluate(steps, state.variables, validation_data)
                    held_out = {"validation_loss": scores["loss"],
                                "validation_accuracy": scores["accuracy"]}
                eval_secs = time.perf_counter() - t_eval
                record = {
                    "epoch": epoch + 1,
                    "step": steps_per_epoch * (epoch + 1),
                    "train_loss": train_metrics["loss"],
                    "train_accuracy": train_metrics["accuracy"],
                    "test_loss": test_metrics["loss"], "test_accuracy": test_metrics["accuracy"],
                    **held_out,
                    "images_per_sec":
                        (steps_per_epoch - first) * config.batch_size / train_secs,
                    "train_seconds": train_secs,
                    "eval_seconds": eval_secs,
                    "epoch_seconds": time.perf_counter() - t_epoch,
                    "devices": shardings.size,
                    "processes": jax.process_count(),
                    "batch_size": config.batch_size,
                    "time": time.time(),
                    **(first_step if first_of_run else {}),
                }
                if not math.isfinite(record["test_loss"]):
                    raise Diverged(record["step"])
                history.append(record)
                if primary:
                    write_metrics(workdir, history)
                log(format_epoch(record, config.epochs))
                if board.enabled:
                    board.scalars(record["step"], {
                        "train/loss": record["train_loss"],
                        "train/accuracy": record["train_accuracy"],
                        "test/loss": record["test_loss"],
                        "test/accuracy": record["test_accuracy"],
                        **{f"validation/{k.split('_')[1]}": v for k, v in held_out.items()},
                        "lr": lr_at(record["step"]),
                        "images_per_sec": record["images_per_sec"]})
                    predicted = np.asarray(forward(state.variables, grid.images)["classes"])
                    board.image_grid("test/predictions", record["step"], grid.images,
                                     grid.labels, predicted, dataset.class_names)
                    board.flush()
                if ckpt:
                    save(record["step"], state, sums, wait=stop.should_stop(),
                         metrics={k: record[k] for k in ckpt_lib.EPOCH_METRICS if k in record})
                if stopped_early(history, config.early_stop) is not None:
                    log(f"stopping early: {config.early_stop} epochs without a better "
                        "validation accuracy; the run is finished")
                    break
                if stop.should_stop() and epoch + 1 < config.epochs:
                    raise Preempted(stop.signum, record["step"], saved=bool(ckpt))
    except Diverged as e:
        saved = ckpt.steps() if ckpt else []
        last = (f"the last good checkpoint, step {saved[-1]}, stays the latest (a rerun "
                "resumes there)" if saved else "no checkpoint was saved")
        raise Failure(f"training diverged at step {e.step} (epoch "
                      f"{(e.step - 1) // steps_per_epoch + 1}): the loss or parameters are "
                      f"not finite; {last}; lower --learning-rate (with "
                      "--allow-config-change, or in a new --workdir)") from None

    if outputs.tensorboard and primary and history:
        with Board(workdir / TB_DIR) as final:
            final.hparams(config.to_dict(), {"final/test_accuracy": history[-1]["test_accuracy"],
                                             "final/test_loss": history[-1]["test_loss"]},
                          step=history[-1]["step"])
    total = time.perf_counter() - t0
    trained = [r for r in history if r["epoch"] > start // steps_per_epoch]
    rate = sum(r["images_per_sec"] * r["train_seconds"] for r in trained) / max(
        sum(r["train_seconds"] for r in trained), 1e-9)
    log(f"done in {total:.1f} s wall ({rate:,.0f} img/s while training); final test "
        f"accuracy {history[-1]['test_accuracy']:.4f}; {describe_best(history)}; "
        f"metrics in {workdir / METRICS_FILE}")
    return TrainResult(state=state, history=history, config=config)


def write_metrics(workdir: epath.Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the history in one rename (object stores cannot
    append; a planted link is never written through)."""
    safefs.write_atomic(workdir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))


def start_metrics(workdir: epath.Path, history: list[dict], log: Callable[[str], None]) -> None:
    """metrics.jsonl for the run that starts now: the restored history. A file that is
    not this run's (a previous run's, after its checkpoints proved bad or with
    --no-checkpoint) is renamed to metrics-<time>.jsonl, never copied: a copy through
    a bounded reader lost everything past its limit."""
    path = workdir / METRICS_FILE
    mine = "".join(json.dumps(r) + "\n" for r in history).encode()
    try:
        if not path.exists():
            return write_metrics(workdir, history)
        size = path.stat().length
        head = safefs.read_file(path, max(len(mine), 4096), follow=False)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    empty = size <= len(head) and not head.strip()
    if not empty and not (history and head[: len(mine)] == mine):
        kept = safefs.keep_aside(path)
        log(f"note: {path} held another run's metrics; kept as {kept}")
    write_metrics(workdir, history)


def lock_workdir(workdir: epath.Path, log: Callable[[str], None]) -> safefs.Lock:
    """Take the workdir's lock before anything touches its checkpoints (a second train
    would delete the first one's in-flight save), or say who holds it (on gs://, a
    lease object: safefs.workdir_lock)."""
    try:
        lock = safefs.workdir_lock(workdir, "lenet-dist train").acquire()
    except safefs.Busy as e:
        raise Failure(f"--workdir {workdir} is in use by {e}; wait for it to finish, stop "
                      "it, or use another --workdir") from None
    except OSError as e:  # a permission is the user's to fix (2); storage may recover (1)
        kind = UserError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else Failure
        raise kind(f"cannot lock --workdir {workdir}: {e.strerror or e}") from None
    if lock.stale:
        log(f"note: took over the lock of a run that is no longer running "
            f"({safefs.describe_holder(lock.stale)})")
    return lock


def prepare_workdir(path: str, create: bool = True) -> epath.Path:
    """The workdir, created; the names we write there must not be planted links."""
    workdir = ckpt_lib.workdir_path(path)
    try:
        if workdir.exists() and not workdir.is_dir():
            raise UserError(f"--workdir {path} is a file, not a directory; choose another path")
        if create:
            workdir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, ckpt_lib.CHECKPOINT_DIR, safefs.LOCK_FILE):
            safefs.refuse_symlink(workdir / name)
        if (workdir / METRICS_FILE).exists() and not (workdir / METRICS_FILE).is_file():
            raise UserError(f"{workdir / METRICS_FILE} is not a regular file; move it away")
    except safefs.UnsafePath as e:
        raise UserError(f"{e.filename} {e.strerror}") from None
    except OSError as e:
        raise UserError(f"cannot write to --workdir {path}: {e.strerror or e}") from None
    return workdir
