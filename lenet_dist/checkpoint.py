"""Orbax checkpoints in <workdir>/checkpoints: save, find the latest good one, restore.

Restore order: this run's latest readable checkpoint, else scratch. Each
checkpoint holds the train state and the partial-epoch metric sums (so a
mid-epoch resume reports the same epoch metrics) plus JSON metadata. The data
order needs no saving: it is a function of (seed, epoch) and the step.
Restores go into the abstract, sharded state of the *current* mesh, so the
device count may change between save and restore.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import warnings
from typing import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from lenet_dist import distributed
from lenet_dist.errors import UserError

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "test_accuracy"
# Fields that decide what a run computes: resuming with any of them changed
# would silently continue a different experiment.
COMPATIBLE_FIELDS = ("dataset", "batch_size", "optimizer", "learning_rate", "momentum",
                     "seed", "train_limit")

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax-checkpoint": ocp.__version__ if hasattr(ocp, "__version__") else "?",
            "python": platform.python_version()}


class Checkpoints:
    """One CheckpointManager: async saves, keep the latest K and the best by test accuracy."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, read_only: bool = False):
        self.read_only = read_only
        quiet_orbax()
        self.directory = workdir_path(workdir) / CHECKPOINT_DIR
        if read_only and not self.directory.is_dir():
            raise UserError(f"no checkpoints in {os.fspath(workdir)}; train there first "
                            f"(lenet-dist train --workdir {workdir})")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                               keep_checkpoints_without_metrics=False),
            ]),
            best_fn=lambda m: m[BEST_METRIC], best_mode="max",
            enable_async_checkpointing=True,
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise UserError(f"cannot use {self.directory}: {e.strerror or e}") from None

    # -- saving ---------------------------------------------------------------

    def save(self, step: int, tree: dict, meta: dict, metrics: dict | None = None,
             wait: bool = False) -> None:
        """Save asynchronously (the device-to-host copy happens before returning)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)
        if wait:
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- reading --------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        has_metrics = [s for s in self.steps() if self.metrics(s) is not None]
        return self.manager.best_step() if has_metrics else None

    def metrics(self, step: int) -> dict | None:
        try:
            return self.manager.metrics(step)
        except Exception:  # unreadable metrics file: treat as none
            return None

    def meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, step: int, abstract: dict) -> tuple[dict, dict]:
        if step not in self.steps():
            raise UserError(f"no checkpoint at step {step} in {self.directory}; "
                            f"available: {', '.join(map(str, self.steps())) or 'none'}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_latest(self, abstract: dict,
                       warn: Callable[[str], None] = print) -> tuple[dict, dict] | None:
        """Newest checkpoint that restores. An unreadable one is moved aside to
        <workdir>/corrupt-checkpoints (never deleted), so training can save that
        step again, and the previous one is tried. In a multi-process job the
        processes agree: a checkpoint that fails on any of them fails on all."""
        for step in reversed(self.steps()):
            error = None
            try:
                restored = self.restore(step, abstract)
            except Exception as e:  # torn or corrupted: fall back to the previous one
                error = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            if not distributed.gather([error is not None]).any():
                return restored
            first = error or "unreadable on another process"
            where = self._quarantine(step)
            warn(f"warning: checkpoint step {step} is unreadable ({first}); "
                 f"{'moved to ' + str(where) if where else 'left in place'}; "
                 "trying the previous one")
        return None

    def _quarantine(self, step: int) -> epath.Path | None:
        """Move a step aside once (process 0), then let every process see it gone."""
        if self.read_only:
            return None
        stamp = distributed.gather([int(time.time())])[0, 0]  # process 0's clock, for all
        target = self.directory.parent / "corrupt-checkpoints" / f"{step}-{stamp}"
        if distributed.is_primary():
            target.parent.mkdir(exist_ok=True)
            (self.directory / str(step)).rename(target)
        distributed.barrier(f"lenet-dist: quarantined {step}")
        self.manager.reload()
        return target


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """A local path made absolute, or a URL such as gs://bucket/run kept as it is."""
    text = os.fspath(workdir)
    return epath.Path(text) if "://" in text else epath.Path(os.path.abspath(text))


def check_compatible(saved: dict, current: dict, workdir: str) -> None:
    diffs = [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
             for k in COMPATIBLE_FIELDS if saved.get(k) != current.get(k)]
    if diffs:
        raise UserError(f"--workdir {workdir} holds a different run ({'; '.join(diffs)}); "
                        "use another --workdir, or --allow-config-change to continue anyway")


def quiet_orbax() -> None:
    """Orbax warns through absl about expected states (a mid-epoch save without
    metrics, a read-only manager); keep the CLI's output to what matters."""
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="orbax")

