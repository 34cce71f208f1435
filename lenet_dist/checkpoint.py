"""Orbax checkpoints in <workdir>/checkpoints: inspect, save, restore the latest good one.

Each checkpoint holds the train state and the partial-epoch metric sums (so a
mid-epoch resume reports the same epoch metrics), JSON metadata (config,
history) and, at epoch ends, test metrics. The data order needs no saving: it
is a function of (seed, epoch) and the step. Restores go into the abstract,
sharded state of the *current* mesh, so the device count may change.

No file in a checkpoint is trusted. Every step is inspected before Orbax opens
the directory (Orbax reads every metrics file when it opens, and one bad file
would stop the whole workdir): a step whose metadata or state index is
unreadable is *bad*. A writer (train, holding the workdir lock) moves bad steps
to <workdir>/corrupt-checkpoints, never deleting them; readers skip them and say
so. A readable checkpoint of another run is *incompatible*, never corrupt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import secrets
import sys
import time
import warnings
from typing import Callable

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint._src.path import atomicity  # the TemporaryPath classes: not exported

from lenet_dist import distributed, faults, safefs
# Which fields a resume compares are declared with them, in Config's field metadata.
from lenet_dist.config import COMPATIBLE_FIELDS, STRUCTURAL_FIELDS, Config
from lenet_dist.errors import Failure, Restartable, UserError, first_line
from lenet_dist.records import chosen_on, ranked
from lenet_dist.rundir import CHECKPOINT_DIR, PROBE_DIR, QUARANTINE_DIR, workdir_path
from lenet_dist.step_files import (
    BEST_METRIC,
    METRICS_FILE,
    ORBAX_TMP,
    VALIDATION_METRIC,
    CorruptCheckpoint,
    StepInfo,
    StepNames,
    foreign_entries,
    scan,
    shown,
    step_of,
)


log = logging.getLogger(__name__)


def selection_metric(metrics: dict) -> float:
    """Orbax's `best_fn`, whose presence makes Orbax write each save's metrics. What
    is best and kept is `best_first`'s: Orbax's own ranking keeps the last of equals."""
    return metrics.get(VALIDATION_METRIC, metrics[BEST_METRIC])


def best_first(metrics: dict[int, dict | None]) -> list[int]:
    """Steps by `records.ranked` over their metrics (steps without metrics, mid-epoch
    saves, are not ranked): the best first, the earliest of equals first."""
    rows = [{**m, "step": step} for step, m in metrics.items() if m is not None]
    return [row["step"] for row in ranked(rows, position="step")]


@dataclasses.dataclass
class KeepBest(policies.PreservationPolicy):
    """Orbax's preservation of the one checkpoint `best_first` names. Orbax's BestN
    keeps the last of equals (a stable ascending sort, then the tail); a run whose
    epochs 6 and 9 tied lost epoch 6, which training, the report and early stopping
    call best."""

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        order = best_first({c.step: c.metrics for c in checkpoints})
        return [bool(order) and c.step == order[0] for c in checkpoints]


# ------------------------------------------------------------- remote commits

COMMIT_MARKER = "commit_success.txt"  # Orbax's: a gs:// step without it is unfinished


class FencedCommit(atomicity.AtomicRenameTemporaryPath):
    """How a gs:// step is written: into `<step>.orbax-checkpoint-tmp-<attempt>`, a name
    of this attempt's own, then, only while the lease is held, copied to `<step>` and
    committed by Orbax's marker, written last.

    Orbax writes a gs:// step in place (a bucket cannot rename) and marks it done. A
    trainer frozen mid-save (a VM paused, a process stopped) keeps its writes in flight;
    a taker rewrote the same step, and the thawed writes landed in the taker's committed
    checkpoint (seen: its metadata replaced 4 s after the taker finished). Here a thawed
    writer writes only under its own name, which the next writer's clean-up removes, and
    its commit is refused by the lease's check (`check`, local: no request). The check
    runs before the copy and again before the marker; a holder that passes it renewed
    its lease at least one refresh before anyone may take it over.

    Built per Checkpoints by `fenced_commit`: Orbax makes these from paths alone."""

    attempt: str = ""
    check: Callable[[], None] = staticmethod(lambda: None)

    @classmethod
    def from_final(cls, final_path, *, checkpoint_metadata_store=None, file_options=None,
                   snapshot_type=None):
        tmp = final_path.parent / f"{final_path.name}{ORBAX_TMP}-{cls.attempt}"
        return cls(tmp, final_path, checkpoint_metadata_store=checkpoint_metadata_store,
                   file_options=file_options)

    @classmethod
    def from_temporary(cls, temporary_path, *, file_options=None, snapshot_type=None):
        final = (temporary_path.parent / temporary_path.name.partition(ORBAX_TMP)[0]
                 if ORBAX_TMP in temporary_path.name else temporary_path)
        return cls(temporary_path, final, file_options=file_options)

    @classmethod
    async def validate(cls, temporary_path):
        """Unfinished: a temporary name, or a step without its marker (a copy cut
        short, or a step an older version wrote in place and did not finish)."""
        if ORBAX_TMP in temporary_path.name:
            await super().validate(temporary_path)
        else:
            await atomicity.CommitFileTemporaryPath.validate(temporary_path)

    @classmethod
    async def validate_final(cls, final_path):
        await super().validate_final(final_path)
        await atomicity.CommitFileTemporaryPath.validate_final(final_path)

    async def finalize(self):
        faults.point("checkpoint:committing", step_of(self._final_path.name))
        self.check()
        store = self._checkpoint_metadata_store
        if store:
            await asyncio.to_thread(store.wait_until_finished)
            await asyncio.to_thread(
                store.update, file_path=atomicity.checkpoint_metadata.step_metadata_file_path(
                    self._tmp_path),
                commit_timestamp_nsecs=time.time_ns())
            await asyncio.to_thread(store.wait_until_finished)
        await asyncio.to_thread(self._commit)

    def _commit(self) -> None:
        final = self._final_path
        if (final / COMMIT_MARKER).exists():
            raise FileExistsError(f"{final} is a committed checkpoint; not overwritten")
        if final.exists():  # an unfinished copy of an earlier attempt (unmarked)
            final.rmtree()
        safefs.move(self._tmp_path, final)
        self.check()
        (final / COMMIT_MARKER).write_text(f"Checkpoint commit was successful to {final}")


def fenced_commit(attempt: str, check: Callable[[], None]) -> type[FencedCommit]:
    """A FencedCommit class for one attempt (its temporary names) and one lease."""
    return type("FencedCommit", (FencedCommit,),
                {"attempt": attempt, "check": staticmethod(check)})


# ------------------------------------------------------------------ the manager


class _Manager(ocp.CheckpointManager):
    """Orbax's manager without its own calls of JAX's preemption sync point.

    Orbax's `save` and its asynchronous finalize ask `reached_preemption(step)` with the
    global step, for its logs only (every save here is forced). JAX's sync manager takes
    each call's number as this process's position, and the stop rule counts its own
    calls (preemption.py): Orbax's numbers moved that position, the job agreed on a stop
    step the stop rule had already passed, and a 2-process job signalled during a save
    trained on to the end and exited 0 (measured, scripts/sigterm-drill.py)."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpoints:
    """One CheckpointManager over the steps that passed inspection: async saves,
    keep the latest K and the best (by validation accuracy, else test accuracy).

    `read_only` (eval, export, predict, listing): nothing is created, moved or
    cleaned up. Otherwise the caller holds the workdir lock: bad steps are moved
    aside and Orbax may clean its temporary directories; `fence` is the lock's check,
    called (by every process of a job) before each save. In a gs:// workdir, steps are
    committed by `FencedCommit`: `attempt` names this attempt's temporary directories
    (the same in every process of a job) and `commit_check` is process 0's lease check.
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, read_only: bool = False,
                 warn: Callable[[str], None] = print,
                 fence: Callable[[], None] = lambda: None,
                 attempt: str | None = None,
                 commit_check: Callable[[], None] = lambda: None):
        self.read_only, self.warn, self.fence = read_only, warn, fence
        self.pending = -1  # the step of the newest save started (async: maybe in flight)
        quiet_orbax()
        self.directory = workdir_path(workdir) / CHECKPOINT_DIR
        self.quarantine_dir = self.directory.parent / QUARANTINE_DIR
        if read_only and not self.directory.is_dir():
            raise UserError(f"no checkpoints in {os.fspath(workdir)}; train there first "
                            f"(lenet-dist train --workdir {workdir})")
        try:
            if not read_only:
                safefs.refuse_symlink(self.directory)
                safefs.refuse_symlink(self.quarantine_dir)
                if self.directory.exists() and not self.directory.is_dir():
                    raise UserError(f"{self.directory} is not a directory; move it away")
            self.info = scan(self.directory)
            for name in foreign_entries(self.directory):
                warn(f"note: {CHECKPOINT_DIR}/{shown(name)} is not a step this project "
                     "wrote; left alone")
            if not read_only:
                self._set_aside_bad()
        except OSError as e:
            raise UserError(f"cannot use {self.directory}: "
                            f"{e.strerror or e}{' (' + str(e.filename) + ')' if e.filename else ''}"
                            ) from None
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                KeepBest(),
            ]),
            best_fn=selection_metric, best_mode="max",
            enable_async_checkpointing=True,
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            # Readers never let Orbax parse the metrics files: `info` holds checked ones.
            lightweight_initialize=read_only,
            step_name_format=StepNames(),
            temporary_path_class=None if read_only or safefs.is_local(self.directory)
            else fenced_commit(attempt or secrets.token_hex(6), commit_check),
        )
        try:
            self.manager = _Manager(self.directory, options=options)
        except OSError as e:
            raise UserError(f"cannot use {self.directory}: {e.strerror or e}") from None

    def _set_aside_bad(self) -> None:
        """Writer only: move bad steps to corrupt-checkpoints (process 0, once), and
        rewrite a bad metrics file from the step's own history, so that Orbax can open
        the directory and the best checkpoint stays known."""
        bad = [found for found in self.info.values() if not found.ok]
        repair = [found for found in self.info.values() if found.ok and found.metrics_problem]
        if not bad and not repair:
            return

        def move_and_repair():
            try:
                for found in bad:
                    where = self._move_aside(found.step)
                    self.warn(f"warning: checkpoint step {found.step} is unreadable "
                              f"({found.problem}); moved to {where}")
                for found in repair:
                    path = self.directory / str(found.step) / METRICS_FILE[0] / METRICS_FILE[1]
                    kept = self._move_aside(found.step, path, "-metrics")
                    if found.metrics is not None:
                        safefs.write_atomic(path, json.dumps(found.metrics))
                    self.warn(f"warning: checkpoint step {found.step}: {found.metrics_problem}; "
                              f"moved to {kept}" + ("; rewritten from its history"
                                                    if found.metrics
                                                    else "; the step keeps no test metrics"))
            except OSError as e:  # as a UserError, so the other processes fail too
                raise UserError(f"cannot move a bad checkpoint aside in {self.directory}: "
                                f"{e.strerror or e}") from None

        # The others wait for it, then look again.
        distributed.on_primary(move_and_repair, "moving bad checkpoints aside")
        self.info = scan(self.directory)

    def _move_aside(self, step: int, path: epath.Path | None = None, tag: str = "") -> epath.Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        safefs.make_dir(self.quarantine_dir)  # a no-op in a bucket, which has no folders
        target = self.quarantine_dir / f"{step}{tag}-{stamp}"
        n = 1
        while target.exists():
            target, n = self.quarantine_dir / f"{step}{tag}-{stamp}-{n}", n + 1
        safefs.move(path or self.directory / str(step), target)
        return target

    # -- saving ---------------------------------------------------------------

    def save(self, step: int, tree: dict, meta: dict, metrics: dict | None = None,
             wait: bool = False) -> None:
        """Save asynchronously (the device-to-host copy happens before returning).
        A failure, now or of the previous async save, is a one-line Failure naming
        the newest checkpoint that was written. `fence()` first: it raises when this
        run no longer holds the workdir (a gs:// lease lost), so nothing is written."""
        self.fence()
        try:  # the previous save's failure is that step's, not this one's
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failure(self.pending, e) from None
        self.pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                metrics=metrics, force=True)
            faults.point("checkpoint:saving", step)
            if wait:
                self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failure(step, e) from None
        self.info[step] = StepInfo(step, meta=meta, metrics=metrics)

    def _save_failure(self, step: int, e: Exception) -> Failure:
        """What failed, and what is on disk now: read again after the failure (the
        manager's own list is what it meant to keep, and a save can fail after its
        step was written, in removing an old one)."""
        reason = save_error(e)
        if isinstance(e, OSError) and e.filename:
            reason += f" ({os.fspath(e.filename)})"
        try:
            good = [s for s, found in scan(self.directory).items() if found.ok]
        except OSError as error:
            good = None
            listed = f"the checkpoints on disk cannot be listed ({error.strerror or error})"
        what = (f"checkpoint step {step} was saved in {self.directory}, but then: {reason}"
                if good and step in good else
                f"cannot save the checkpoint of step {step} in {self.directory}: {reason}")
        # Object storage that failed a write (an outage, a timeout) may take the next
        # attempt's: that is a restart's to find out. A full local disk is not.
        remote = not safefs.is_local(self.directory) and not isinstance(e, PermissionError)
        return (Restartable if remote else Failure)(
            f"{what}; {listed if good is None else on_disk(good, self.directory)}")


    def check_writable(self, tree: dict) -> None:
        """Save `tree` the way a checkpoint is saved, to a scratch name, and delete it:
        a path Orbax cannot use or a full disk fails here, before an epoch is spent."""
        probe = self.directory / PROBE_DIR  # one name for every process of a job
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(probe, tree, force=True)
                checkpointer.wait_until_finished()
        except Exception as e:
            raise Failure(f"cannot write checkpoints in {self.directory}: {save_error(e)}; "
                          "free space or fix the path, or pass --no-checkpoint") from None
        finally:
            if distributed.is_primary() and probe.exists():
                probe.rmtree(missing_ok=True)

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failure(self.pending, e) from None
        finally:
            self.manager.close()

    # -- reading --------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps that passed inspection and Orbax lists."""
        return sorted(s for s in self.manager.all_steps() if s in self.info and self.info[s].ok)

    def bad_steps(self) -> dict[int, str]:
        return {step: found.problem for step, found in self.info.items() if not found.ok}

    def best_steps(self) -> list[int]:
        """Readable steps, the best first (`best_first`)."""
        return best_first({s: self.info[s].metrics for s in self.steps()})

    def best_step(self) -> int | None:
        return next(iter(self.best_steps()), None)

    def chosen_on(self) -> str:
        """"validation" or "test": the split `best_steps` ranks by (the newest's)."""
        scored = [self.info[s].metrics for s in self.steps() if self.info[s].metrics]
        return chosen_on(scored[-1:])

    def metrics(self, step: int) -> dict | None:
        return self.info[step].metrics if step in self.info else None

    def meta(self, step: int) -> dict:
        info = self.info.get(step)
        if info is None or info.meta is None:
            raise CorruptCheckpoint(f"checkpoint step {step} has no readable metadata")
        return info.meta

    def restore(self, step: int, abstract: dict) -> tuple[dict, dict]:
        """(tree, metadata) of `step`; CorruptCheckpoint when its files do not restore."""
        if step not in self.info:
            raise UserError(f"no checkpoint at step {step} in {self.directory}; "
                            f"available: {', '.join(map(str, self.steps())) or 'none'}")
        if not self.info[step].ok:
            raise CorruptCheckpoint(self.info[step].problem)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except PermissionError as e:
            raise Failure(f"cannot read checkpoint step {step}: {e.strerror}") from None
        except Exception as e:  # torn or corrupted array data
            raise CorruptCheckpoint(first_line(e, 160)) from None
        return restored["state"], self.info[step].meta

    def restore_latest(self, abstract: Callable[[dict], dict],
                       check: Callable[[dict], None] = lambda meta: None
                       ) -> tuple[dict, dict] | None:
        """Newest checkpoint that restores, else None. `check(meta)` runs on its metadata
        *before* restoring (an incompatible run raises there; nothing is moved), and
        `abstract(meta)` gives the tree to restore into. A checkpoint whose state does
        not restore is moved aside (never deleted) and the previous one is tried. In a
        job the processes agree: a checkpoint that fails on any of them fails on all."""
        for step in reversed(self.steps()):
            meta = self.meta(step)
            check(meta)
            error = None
            try:
                restored = self.restore(step, abstract(meta))
            except CorruptCheckpoint as e:
                error = str(e)
            if not distributed.gather([error is not None], f"restoring step {step}").any():
                return restored
            self.info[step].problem = error or "unreadable on another process"
            where = self._quarantine(step)
            self.warn(f"warning: checkpoint step {step} is unreadable "
                      f"({self.info[step].problem}); "
                      f"{'moved to ' + str(where) if where else 'left in place'}; "
                      "trying the previous one")
        return None

    def _quarantine(self, step: int) -> epath.Path | None:
        """Move a step aside once (process 0), then let every process see it gone."""
        if self.read_only:
            return None
        where = distributed.on_primary(lambda: self._move_aside(step),
                                       f"moving step {step} aside")
        distributed.meet(f"moving step {step} aside")
        self.manager.reload()
        return where


def on_disk(good: list[int], directory: epath.Path | str = "") -> str:
    """The readable checkpoints in the directory, as a few words."""
    where = "on disk" if safefs.is_local(directory) else "in the bucket"
    if not good:
        return f"no readable checkpoint is {where}"
    return (f"{where}: step{'s' if len(good) > 1 else ''} "
            f"{', '.join(map(str, good))} (the latest is step {max(good)})")


def save_error(e: BaseException) -> str:
    """The reason a save failed, in a few words: TensorStore buries the OS error
    (`No space left on device [os_error_code='28']`) in a long message."""
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return first_line(e, 160)


def check_compatible(saved: dict, current: dict, workdir: str, allow_change: bool = False,
                     step: int | None = None) -> None:
    """Refuse to continue another run (read from the checkpoint's metadata, before any
    restore); `allow_change` permits differences except in the state's structure."""
    fields = STRUCTURAL_FIELDS if allow_change else COMPATIBLE_FIELDS
    saved = {k: saved.get(k, getattr(Config(), k)) for k in fields}  # older metadata
    if allow_change:  # a constant rate and a schedule differ in layout, two schedules not
        saved["schedule"] = saved["schedule"] == "constant"
        current = {**current, "schedule": current.get("schedule") == "constant"}
    diffs = [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
             for k in fields if saved.get(k) != current.get(k)]
    if not diffs:
        return
    where = f"--workdir {workdir}" + (f" (checkpoint step {step})" if step is not None else "")
    if allow_change:
        raise UserError(f"{where} holds a run with another state layout ({'; '.join(diffs)}); "
                        "it cannot be continued even with --allow-config-change; use another "
                        "--workdir")
    raise UserError(f"{where} holds a different run ({'; '.join(diffs)}); "
                    "use another --workdir, or --allow-config-change to continue anyway")


def quiet_orbax() -> None:
    """Orbax warns through absl about expected states (a mid-epoch save without
    metrics, a read-only manager); keep the CLI's output to what matters."""
    level = logging.ERROR if os.environ.get("LENET_DIST_DEBUG") else logging.CRITICAL
    # ERROR too: a failed save is reported once, as our own one line; Orbax's save
    # threads would log it again with tracebacks, and asyncio a third time.
    for name in ("absl", "orbax", "asyncio"):
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", module="orbax")
    if level == logging.CRITICAL and sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _drop_closed_loop_callbacks


def _drop_closed_loop_callbacks(unraisable) -> None:
    """After a failed save, TensorStore completes the other writes on the event loop
    Orbax has already closed: a traceback per array at exit, saying nothing new."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and "Event loop is closed" in str(e)):
        sys.__unraisablehook__(unraisable)

