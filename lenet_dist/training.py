"""The training loop: mesh, input, state, steps, then a flat loop over epochs.

`Trainer.run` is the table of contents: restore or init, then per epoch train, evaluate,
record, save, and decide whether to stop. Each phase is one method below it. The host
dispatches step i and only then waits for step i-1, so the device always has work
queued and the progress bar stays honest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Callable

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from lenet_dist import checkpoint as ckpt_lib
from lenet_dist import data as data_lib
from lenet_dist import distributed, jax_compat, ledger, versions, watchdog
from lenet_dist.config import Config
from lenet_dist.settings_io import write_config
from lenet_dist.errors import Failure, Preempted, UserError
from lenet_dist.evaluation import evaluate
from lenet_dist.feed import Feeds, make_feeds
from lenet_dist.ledger import LedgerFile
from lenet_dist.records import describe_best, near_chance, stopped_early
from lenet_dist.mesh import Shardings, check_batch, make_mesh
from lenet_dist.preemption import StopRule
from lenet_dist.records import EpochRecord, format_epoch
from lenet_dist.restore import class_names_of, config_from
from lenet_dist.sources import load_dataset, shown_names
from lenet_dist.state import TrainState, create_state, learning_rate, make_optimizer
from lenet_dist.step import (Steps, all_finite, build_steps, checkpoint_tree,
                             from_checkpoint_tree, summarize)
from lenet_dist.rundir import (CHECKPOINT_DIR, LEDGER_FILE, METRICS_FILE, TB_DIR,
                               lock_workdir, prepare_workdir, start_metrics,
                               write_metrics)
from lenet_dist.tboard import Board, ProfileWindow, epoch_scalars, parse_profile_steps


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    records: list[EpochRecord]
    config: Config

    @property
    def history(self) -> list[dict]:
        """One JSON object per epoch, as metrics.jsonl holds them."""
        return [r.to_json() for r in self.records]

    @property
    def final(self) -> dict:
        return self.history[-1]


class Diverged(Exception):
    """The loss or the parameters stopped being finite at `step` (1-based)."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"diverged at step {step}")


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a run shows besides metrics.jsonl: TensorBoard events in <workdir>/tb (process
    0 only), the train loss there every K steps, a jax.profiler trace of steps A..B."""

    tensorboard: bool = False
    log_every_steps: int = 50
    profile_steps: str | None = None


def train(config: Config, dataset: data_lib.Dataset | None = None,
          log: Callable[[str], None] = print, progress: bool = False,
          allow_config_change: bool = False, outputs: Outputs = Outputs(),
          stall_timeout: float | None = None) -> TrainResult:
    """Train `config` end to end, resuming from <workdir>/checkpoints if it holds a run.

    Holds the workdir's lock throughout (process 0 in a job). Raises `Preempted`
    after saving a checkpoint when SIGTERM/SIGINT arrives, and `Failure` when the
    run diverges (nothing non-finite is ever saved). In a multi-process job every
    process calls this; process 0 alone logs and writes, and all stop at the same step.
    A run that makes no progress for `stall_timeout` seconds (None: automatic, 0: never)
    exits 42 from its watchdog (`lenet_dist.watchdog`). Where the time went, phase by
    phase, is kept per attempt in <workdir>/ledger.json (`lenet_dist.ledger`).
    """
    config = config.validate()
    ledger.begin()  # this attempt's: from the process's start, or the call's if not the first
    try:
        with _watched(stall_timeout):
            return _train(config, dataset, log, progress, allow_config_change, outputs)
    finally:
        ledger.end()


@contextlib.contextmanager
def _watched(stall_timeout: float | None):
    """This process's progress watchdog for the length of a run (see watchdog.py)."""
    processes = jax.process_count()
    client = jax_compat.distributed_state().client if processes > 1 else None
    watchdog.start(stall_timeout, client, jax.process_index(), processes)
    try:
        yield
    finally:
        watchdog.stop()


def _train(config: Config, dataset: data_lib.Dataset | None, log: Callable[[str], None],
           progress: bool, allow_config_change: bool, outputs: Outputs) -> TrainResult:
    if outputs.profile_steps:
        parse_profile_steps(outputs.profile_steps)  # a usage error before anything starts
    primary = distributed.is_primary()
    if not primary:
        log, progress = (lambda _: None), False
    elif progress:
        log = tqdm.write  # lines above the progress bar, not through it

    # Mesh and shardings; every process must see the same workdir, locked by process 0.
    shardings = Shardings(make_mesh(config.devices))
    check_batch(config.batch_size, shardings.size)
    workdir = prepare_workdir(config.workdir, create=primary)
    distributed.check_same_config(config.to_dict(), allow_config_change=allow_config_change)
    with contextlib.ExitStack() as cleanup:  # last in, first out: saves end, then unlock
        # The lock first: nothing (not even the job's token) is written into a workdir
        # another run holds.
        lock = distributed.on_primary(lambda: lock_workdir(workdir, log),
                                      "taking the workdir's lock")
        if lock is not None:
            cleanup.callback(lock.release)
        book = cleanup.enter_context(LedgerFile(workdir, distributed.is_primary(), log))
        attempt = distributed.check_same_workdir(workdir)
        ckpt = open_checkpoints(config, workdir, lock, attempt, log)
        if ckpt:
            cleanup.callback(ckpt.close)  # let an in-flight async save finish
        run = Trainer.create(config, dataset, shardings, workdir, ckpt, log, progress,
                             outputs)
        run.ledger_file = book
        return run.run(allow_config_change)


def open_checkpoints(config: Config, workdir: epath.Path, lock, attempt: str,
                     log: Callable[[str], None]) -> ckpt_lib.Checkpoints | None:
    """The run's checkpoints (None with --no-checkpoint, where none may be), fenced by
    the workdir's lock: every process asks process 0's lock before each save, and
    process 0's commits of a gs:// step check its lease (`lock` is process 0's only)."""
    if not config.checkpoint:
        if (workdir / CHECKPOINT_DIR).exists():
            raise UserError(f"--workdir {config.workdir} holds checkpoints of a run; "
                            "--no-checkpoint would start another one over its "
                            "metrics.jsonl; use another --workdir")
        return None
    return ckpt_lib.Checkpoints(
        workdir, keep=config.keep_checkpoints, warn=log,
        fence=lambda: distributed.on_primary(lambda: lock.check(),
                                             "checking the lease before a save"),
        attempt=attempt, commit_check=lock.check if lock is not None else lambda: None)


# ------------------------------------------------------------------ the run


@dataclasses.dataclass
class Trainer:
    """One run, once the workdir is locked and its checkpoints are open: what every
    phase reads (config, mesh, feeds, steps, checkpoints, outputs) and the state it
    carries from one phase to the next (state, metric sums, records)."""

    config: Config
    dataset: data_lib.Dataset
    shardings: Shardings
    workdir: epath.Path
    ckpt: ckpt_lib.Checkpoints | None
    log: Callable[[str], None]
    outputs: Outputs
    progress: bool
    feeds: Feeds
    tx: object  # the optax transformation
    steps: Steps
    stop: StopRule
    primary: bool
    started: float  # time.perf_counter() before the data loaded: the run's wall time
    installed: dict  # package versions, for checkpoint metadata
    resumed: bool = False  # restored from a checkpoint
    stall_at: int | None = None  # LENET_DIST_STALL_AT's step for this process
    state: TrainState | None = None
    sums: dict | None = None
    records: list[EpochRecord] = dataclasses.field(default_factory=list)
    first_step: dict = dataclasses.field(default_factory=dict)  # for benchmarks
    board: Board | None = None
    profile: ProfileWindow | None = None
    bar: tqdm | None = None
    ledger_file: LedgerFile | None = None  # ledger.json (process 0 writes it)

    @classmethod
    def create(cls, config: Config, dataset: data_lib.Dataset | None, shardings: Shardings,
               workdir: epath.Path, ckpt: ckpt_lib.Checkpoints | None,
               log: Callable[[str], None], progress: bool, outputs: Outputs) -> Trainer:
        """Input, optimizer and steps (jitted once); nothing trained or restored yet."""
        started = time.perf_counter()
        watchdog.mark("loading data")
        dataset = dataset or load_dataset(config, progress=progress, log=log)
        feeds = make_feeds(config, dataset, shardings)
        tx = make_optimizer(config, feeds.train.steps_per_epoch)
        steps = build_steps(tx, shardings, config, dataset.num_classes)
        stop = StopRule(multi_process=jax.process_count() > 1,
                        process_index=jax.process_index(), process_count=jax.process_count())
        stall_at = watchdog.stall_step(jax.process_index(), jax.process_count())
        return cls(config=config, dataset=dataset, shardings=shardings, workdir=workdir,
                   ckpt=ckpt, log=log, outputs=outputs, progress=progress, feeds=feeds,
                   tx=tx, steps=steps, stop=stop, primary=distributed.is_primary(),
                   started=started, installed=versions.installed(), stall_at=stall_at)

    @property
    def steps_per_epoch(self) -> int:
        return self.feeds.train.steps_per_epoch

    def run(self, allow_config_change: bool = False) -> TrainResult:
        """The loop: restore or init, then train, evaluate, record, save, stop."""
        self.stop_before_training(None)  # the data is loaded and the steps are built
        start = self.restore_or_init(allow_config_change)
        if self.finished(start):
            return self.result()
        self.stop_before_training(start)  # restored, or initialised and the probe saved
        self.log_header()
        outputs = self.open_outputs(start)
        try:
            with self.stop, outputs:
                for epoch in range(start // self.steps_per_epoch, self.config.epochs):
                    t_epoch = time.perf_counter()
                    trained = self.train_epoch(epoch, start)
                    evaluated = self.evaluate()
                    record = self.record(epoch, t_epoch, **trained, **evaluated)
                    self.save(record.step, wait=self.stop.should_stop(),
                              metrics=record.metrics())
                    if self.should_stop(record):
                        break
        except Diverged as e:
            raise self.diverged(e.step) from None
        self.log_done(start)
        return self.result()

    def result(self) -> TrainResult:
        return TrainResult(state=self.state, records=self.records, config=self.config)

    # -- restore or init ----------------------------------------------------

    def restore_or_init(self, allow_config_change: bool) -> int:
        """The latest readable checkpoint of this run, else scratch; returns the step
        to start from. The saved config is compared before anything is restored."""
        def compatible(meta: dict) -> None:
            self.check_compatible(meta, allow_config_change)

        watchdog.mark("restoring")
        restored = self.ckpt.restore_latest(lambda meta: self.steps.abstract(),
                                            check=compatible) if self.ckpt else None
        if restored is None:
            self.state = create_state(self.config.seed, self.tx, self.shardings,
                                      self.config.network, self.dataset.num_classes)
            self.sums = self.steps.zeros()
        else:
            tree, meta = restored
            self.state, self.sums = from_checkpoint_tree(tree)
            self.records = [EpochRecord.from_json(r) for r in meta["history"]]
        self.resumed = restored is not None
        ledger.current().trains_from(int(self.state.step))
        if self.primary:  # epochs after the checkpoint dropped, another run's lines kept aside
            start_metrics(self.workdir, self.records, self.log,
                          resumed_at=int(self.state.step) if self.resumed else None)
            write_config(self.workdir, self.config)  # what this run computes, for `--config`
        return int(self.state.step)

    def check_compatible(self, meta: dict, allow_config_change: bool) -> None:
        """A checkpoint of another run (config or classes) is refused, not continued."""
        config, dataset = self.config, self.dataset
        # --validation as the images held out: a run saved with 5000 and resumed with
        # the modern recipe's 1/12 holds out the same 5,000 of 60,000.
        images = len(dataset.train)
        held = {"validation": config_from(meta).validation_images(images)}
        ckpt_lib.check_compatible({**meta["config"], **held},
                                  {**config.to_dict(),
                                   "validation": config.validation_images(images)},
                                  config.workdir, allow_change=allow_config_change,
                                  step=meta["step"])
        saved = class_names_of(meta, config_from(meta))
        if tuple(saved) != dataset.class_names:
            raise UserError(
                f"--workdir {config.workdir} holds a run on {len(saved)} classes "
                f"({shown_names(saved)}), the data has {dataset.num_classes} "
                f"({shown_names(dataset.class_names)}); use another --workdir")

    def finished(self, start: int) -> bool:
        """A restored run that has nothing left to do says so; one that goes on says
        where it resumes, and its checkpoints are probed before an epoch is spent."""
        config, records, spe = self.config, self.records, self.steps_per_epoch
        if not self.resumed:
            self.check_writable()
            return False
        early = stopped_early(records, config.early_stop)
        if early is not None:
            self.log(f"run in {self.workdir} is finished: it stopped early at epoch {early}, "
                     f"{config.early_stop} epochs without a better validation accuracy; "
                     f"{describe_best(records)}; to train on, raise --early-stop (or give 0) "
                     "and --epochs")
            return True
        if start >= spe * config.epochs:
            trained = f"{start // spe} epochs" + (f" and {start % spe} steps" if start % spe
                                                   else "")
            self.log(f"run in {self.workdir} is finished: {start} steps = {trained}"
                     + (f" (more than --epochs {config.epochs})" if start > spe * config.epochs
                        else "")
                     + (f", test accuracy {records[-1].test_accuracy:.4f}" if records else "")
                     + "; use --epochs to train longer or a new --workdir")
            return True
        self.log(f"resuming from checkpoint at step {start} (epoch {start // spe + 1}, "
                 f"step {start % spe} of {spe}) in {self.ckpt.directory}")
        self.check_writable()
        return False

    def check_writable(self) -> None:
        """A probe save: a full disk fails here, not an epoch later."""
        if self.ckpt:
            self.ckpt.check_writable(checkpoint_tree(self.state, self.sums))

    def log_header(self) -> None:
        config, dataset, feeds = self.config, self.dataset, self.feeds
        held = f" / {feeds.validation_images:,} validation" if config.validation else ""
        self.log(f"training LeNet-5 on {dataset.name} ({feeds.train_images:,} train{held} / "
                 f"{feeds.test.size:,} test images, {dataset.num_classes} classes, from "
                 f"{dataset.source}) over {self.shardings.size} "
                 f"{self.shardings.mesh.devices.flat[0].platform} device(s), global batch "
                 f"{config.batch_size}, {config.optimizer} lr {config.learning_rate}, "
                 f"{config.epochs} epochs")

    def open_outputs(self, start: int) -> contextlib.ExitStack:
        """TensorBoard, the profiler window and the progress bar, closed together."""
        outputs = contextlib.ExitStack()
        logdir = self.workdir / TB_DIR
        self.board = outputs.enter_context(Board(
            logdir, enabled=self.outputs.tensorboard and self.primary, purge_step=start + 1))
        self.profile = outputs.enter_context(ProfileWindow(
            self.outputs.profile_steps if self.primary else None, logdir))
        self.bar = outputs.enter_context(tqdm(
            total=self.steps_per_epoch * self.config.epochs, initial=start, unit="step",
            disable=not self.progress, dynamic_ncols=True,
            leave=False))  # one bar for the run: its ETA is the run's
        return outputs

    # -- train an epoch -----------------------------------------------------

    def train_epoch(self, epoch: int, start: int) -> dict:
        """The epoch's steps (from `start` in the run's first epoch): its training
        figures, and the first step's time on the first epoch this process runs."""
        spe = self.steps_per_epoch
        self.bar.set_description(f"epoch {epoch + 1}/{self.config.epochs}")
        t_train = time.perf_counter()
        first_of_run = epoch == start // spe
        first = start - epoch * spe if first_of_run else 0
        watchdog.mark("training")  # the epoch's shuffle, before its first step's mark
        if first == 0:
            self.sums = self.steps.zeros()
        xs, ys = self.feeds.train.epoch(self.config.seed, epoch)
        self.train_steps(epoch, first, xs, ys, timed=first_of_run)
        metrics = summarize(self.sums)
        seconds = time.perf_counter() - t_train
        if not math.isfinite(metrics["loss"]):
            raise Diverged(spe * (epoch + 1))
        return {"train_loss": metrics["loss"], "train_accuracy": metrics["accuracy"],
                "images_per_sec": (spe - first) * self.config.batch_size / seconds,
                "train_seconds": seconds, **(self.first_step if first_of_run else {})}

    def train_steps(self, epoch: int, first: int, xs, ys, timed: bool) -> None:
        """Steps first.. of `epoch`, on `self.state` and `self.sums`.

        The host dispatches step i and only then waits for step i-1, so the device always
        has work queued. That step's loss (its sum minus the one before) is read then, at
        no extra stall: checked, so a divergence stops the run at its step, and shown on
        the progress bar and TensorBoard. `timed`: the host waits once for step `first`
        and keeps its wall seconds (dispatch, compile and run: what a benchmark reports
        apart from the steady state)."""
        offset, last, size = epoch * self.steps_per_epoch, self.steps_per_epoch, xs.shape[1]
        before = float(self.sums["loss_sum"]) if first > 0 else 0.0
        for i in range(first, last):
            previous = self.sums
            self.profile.before_step(offset + i + 1)
            t_step = time.perf_counter()
            watchdog.mark("compiling" if i == first and timed else "training", offset + i + 1)
            self.state, self.sums = self.steps.train(self.state, self.sums, xs, ys, i)
            if i == first and timed:
                # once a run: the first step's time, compile included
                jax.block_until_ready(self.sums)
                self.first_step = {"first_step_seconds": time.perf_counter() - t_step,
                                  "first_step_time": time.time()}
            self.profile.after_step(offset + i + 1, self.sums)
            jax.block_until_ready(previous)  # wait one step behind: the device stays busy
            if i > first:
                total = float(previous["loss_sum"])
                if not math.isfinite(total):
                    raise Diverged(offset + i)  # the step whose sums are `previous`
                self.show_loss(offset + i, (total - before) / size)
                before = total
            self.bar.update()
            self.after_step(epoch, i)
        if last > first:  # the epoch's last step: the epoch's summary waits for it anyway
            total = float(self.sums["loss_sum"])
            if math.isfinite(total):  # (a divergence there is the epoch check's to name)
                self.show_loss(offset + last, (total - before) / size)

    def show_loss(self, step: int, loss: float) -> None:
        """One step's loss: on the progress bar, and every K steps on TensorBoard."""
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % self.outputs.log_every_steps == 0:
            self.board.scalars(step, {"train/step_loss": loss, "lr": self.lr_at(step)})

    @functools.cached_property
    def schedule(self):
        """The learning rate: a number, or optax's schedule of the step."""
        return learning_rate(self.config, self.steps_per_epoch)

    def lr_at(self, step: int) -> float:
        return float(self.schedule(step)) if callable(self.schedule) else self.schedule

    def after_step(self, epoch: int, i: int) -> None:
        """Mid-epoch saves and the stop rule, after step i of `epoch` is queued."""
        step = epoch * self.steps_per_epoch + i + 1
        if step == self.stall_at:
            watchdog.stall_here()
        stopping = self.stop.at_step(step)
        mid_epoch = i + 1 < self.steps_per_epoch
        if mid_epoch and (stopping or (self.config.save_every_steps
                                       and step % self.config.save_every_steps == 0)):
            self.save(step, wait=stopping)
        if stopping and mid_epoch:
            raise Preempted(self.stop.signum, step, saved=bool(self.ckpt))

    # -- evaluate -----------------------------------------------------------

    def evaluate(self) -> dict:
        """Test (and validation) loss and accuracy of the current state, timed."""
        t_eval = time.perf_counter()
        watchdog.mark("evaluating")
        test = evaluate(self.steps, self.state.variables, self.feeds.test)
        figures = {"test_loss": test["loss"], "test_accuracy": test["accuracy"]}
        if self.feeds.validation is not None:
            held_out = evaluate(self.steps, self.state.variables, self.feeds.validation)
            figures.update(validation_loss=held_out["loss"],
                           validation_accuracy=held_out["accuracy"])
        return {**figures, "eval_seconds": time.perf_counter() - t_eval,
                "eval_images": self.feeds.eval_images}

    # -- record -------------------------------------------------------------

    def record(self, epoch: int, t_epoch: float, **figures) -> EpochRecord:
        """The epoch's record: checked, kept, written to metrics.jsonl, logged, shown."""
        record = EpochRecord(
            epoch=epoch + 1, step=self.steps_per_epoch * (epoch + 1), **figures,
            epoch_seconds=time.perf_counter() - t_epoch, devices=self.shardings.size,
            processes=jax.process_count(), batch_size=self.config.batch_size,
            time=time.time())
        if not math.isfinite(record.test_loss):
            raise Diverged(record.step)
        self.records.append(record)
        if self.primary:
            write_metrics(self.workdir, self.records)
        if self.ledger_file is not None:
            self.ledger_file.write()
        self.log(format_epoch(record, self.config.epochs))
        self.show_epoch(record)
        return record

    def show_epoch(self, record: EpochRecord) -> None:
        """TensorBoard: the epoch's scalars and the first test images' predictions."""
        if not self.board.enabled:
            return
        self.board.scalars(record.step, epoch_scalars(record, self.lr_at(record.step)))
        grid = self.dataset.test.take(32)
        predicted = np.asarray(self.steps.forward(self.state.variables, grid.images)["classes"])
        self.board.image_grid("test/predictions", record.step, grid.images, grid.labels,
                              predicted, self.dataset.class_names)
        self.board.flush()

    # -- save ---------------------------------------------------------------

    def save(self, step: int, wait: bool, metrics: dict | None = None) -> None:
        """Save, unless the state is not finite: then the run has diverged at `step`."""
        if self.ckpt is None:
            return
        if not (math.isfinite(float(self.sums["loss_sum"]))
                and bool(all_finite(self.state.params))):
            raise Diverged(step)
        watchdog.mark("saving", step)
        self.ckpt.save(step, checkpoint_tree(self.state, self.sums), self.meta_for(step),
                       metrics=metrics, wait=wait)

    def meta_for(self, step: int) -> dict:
        """A checkpoint's metadata: what resuming, eval, export and listing read."""
        return {"config": self.config.to_dict(), "step": step,
                "epoch": step / self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "history": [r.to_json() for r in self.records],
                "mesh": dict(self.shardings.mesh.shape),
                "versions": self.installed, "dataset_source": self.dataset.source,
                "class_names": list(self.dataset.class_names)}

    # -- stop ---------------------------------------------------------------

    def stop_before_training(self, step: int | None) -> None:
        """`Preempted` when a job was asked to stop before its first step (see
        `StopRule.before_training`)."""
        if self.stop.before_training():
            raise Preempted(self.stop.signum, step, saved=False, before=True)

    def should_stop(self, record: EpochRecord) -> bool:
        """True when early stopping ends the run here; `Preempted` (after the save)
        when a signal or LENET_DIST_SIGTERM_AT asked it to stop before its last epoch."""
        if stopped_early(self.records, self.config.early_stop) is not None:
            self.log(f"stopping early: {self.config.early_stop} epochs without a better "
                     "validation accuracy; the run is finished")
            return True
        if self.stop.should_stop() and record.epoch < self.config.epochs:
            raise Preempted(self.stop.signum, record.step, saved=bool(self.ckpt))
        return False

    def diverged(self, step: int) -> Failure:
        saved = self.ckpt.steps() if self.ckpt else []
        last = (f"the last good checkpoint, step {saved[-1]}, stays the latest (a rerun "
                "resumes there)" if saved else "no checkpoint was saved")
        return Failure(f"training diverged at step {step} (epoch "
                       f"{(step - 1) // self.steps_per_epoch + 1}): the loss or parameters "
                       f"are not finite; {last}; lower --learning-rate (with "
                       "--allow-config-change, or in a new --workdir)")

    def log_done(self, start: int) -> None:
        """The run's hparams on TensorBoard, and the closing line."""
        records = self.records
        watchdog.mark("finishing")
        if self.outputs.tensorboard and self.primary and records:
            with Board(self.workdir / TB_DIR) as final:
                final.hparams(self.config.to_dict(),
                              {"final/test_accuracy": records[-1].test_accuracy,
                               "final/test_loss": records[-1].test_loss},
                              step=records[-1].step)
        total = time.perf_counter() - self.started
        trained = [r for r in records if r.epoch > start // self.steps_per_epoch]
        rate = sum(r.images_per_sec * r.train_seconds for r in trained) / max(
            sum(r.train_seconds for r in trained), 1e-9)
        self.log(f"done in {total:.1f} s wall ({rate:,.0f} img/s while training); final "
                 f"test accuracy {records[-1].test_accuracy:.4f}; {describe_best(records)}; "
                 f"metrics in {self.workdir / METRICS_FILE}")
        self.log(ledger.summary(ledger.current().attempt(), f"by attempt in {LEDGER_FILE}"))
        classes, final = self.dataset.num_classes, records[-1].test_accuracy
        if near_chance(final, classes):
            self.log(f"note: test accuracy {final:.4f} is near chance ({1 / classes:.4f} for "
                     f"{classes} classes): " + (
                         "the d2l recipe (sigmoid, SGD) learns slowly on small data; "
                         "--recipe modern learns on it (docs/data.md)"
                         if self.config.network == "d2l" else
                         "check the labels and images (docs/data.md)"))

