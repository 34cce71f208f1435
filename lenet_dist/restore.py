"""A checkpoint of a finished or running run, restored into the current mesh: the one
way eval, export, predict, bench and the fault-injection script read a run back.

Which step: --step exactly, else --best (highest validation accuracy, or test accuracy
for a run without a validation split), else the latest; an
unreadable one is named and passed over for the next candidate unless --step asked for
it. Read-only: nothing in the workdir is moved or written.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.step_files import CorruptCheckpoint
from lenet_dist.config import FIELDS, Config
from lenet_dist.data import CLASS_NAMES
from lenet_dist.errors import Failure, UserError
from lenet_dist.mesh import Shardings
from lenet_dist.state import make_optimizer
from lenet_dist.step import Steps, build_steps, from_checkpoint_tree


@dataclasses.dataclass(frozen=True)
class Restored:
    """One restored checkpoint."""

    variables: dict  # {"params"}, plus {"batch_stats"} for BatchNorm recipes, on the mesh
    config: Config   # the run's, as its checkpoint recorded it
    step: int        # the step restored (after any unreadable ones were passed over)
    meta: dict       # the checkpoint's metadata: epoch, history, versions, ...
    step_fns: Steps  # the run's steps jitted for this mesh (evaluate runs its eval step)

    @property
    def model(self):
        """The run's model: its config's network, one output per class name."""
        return self.step_fns.model

    @property
    def forward(self):
        """The jitted forward of `model` (`step.forward_for`): predict's and export's."""
        return self.step_fns.forward

    @property
    def class_names(self) -> tuple[str, ...]:
        """Label i's name: what the run's dataset named it (folder datasets record theirs in
        the metadata; the built-in ones have fixed names)."""
        return class_names_of(self.meta, self.config)


def warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def candidate_steps(ckpts: Checkpoints, step: int | None, best: bool) -> list[int]:
    """The checkpoint asked for, then (when it was not named by --step) the ones to fall
    back to if it proves unreadable: older steps, or the next best."""
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
        ranked = ckpts.best_steps()
        if not ranked:
            raise UserError(f"no checkpoint in {ckpts.directory} has test metrics yet "
                            "(only mid-epoch saves); use --step or train to an epoch end")
        return ranked
    return steps[::-1]


def unreadable(ckpts: Checkpoints, step: int, problem: str) -> str:
    older = [s for s in ckpts.steps() if s < step and s not in ckpts.bad_steps()]
    hint = f"the previous good one is step {older[-1]} (--step {older[-1]})" if older \
        else "no older readable checkpoint remains"
    return f"checkpoint step {step} in {ckpts.directory} is unreadable ({problem}); {hint}"


def restore_checkpoint(workdir: str, shardings: Shardings, step: int | None = None,
                       best: bool = False, warn: Callable[[str], None] = warn_stderr
                       ) -> Restored:
    """The checkpoint `candidate_steps` picks, placed on `shardings`' mesh (any device
    count: the state is restored into this mesh's abstract state)."""
    ckpts = Checkpoints(workdir, read_only=True, warn=warn)
    candidates = candidate_steps(ckpts, step, best)
    if step is None:  # say what was passed over (newer ones, or any for --best)
        for s, problem in ckpts.bad_steps().items():
            if best or s > candidates[0]:
                warn(f"warning: checkpoint step {s} is unreadable ({problem}); skipped")
    for chosen in candidates:
        # The model from the metadata: the config's network, one output per class name.
        config = config_from(ckpts.meta(chosen))
        step_fns = build_steps(make_optimizer(config), shardings, config,
                               len(class_names_of(ckpts.meta(chosen), config)))
        try:
            tree, meta = ckpts.restore(chosen, step_fns.abstract())
        except CorruptCheckpoint as e:
            ckpts.info[chosen].problem = str(e)
            if step is not None:
                raise Failure(unreadable(ckpts, chosen, str(e))) from None
            warn(f"warning: checkpoint step {chosen} is unreadable ({e}); trying "
                 "the next one")
            continue
        state, _ = from_checkpoint_tree(tree)
        return Restored(variables=state.variables, config=config, step=chosen, meta=meta,
                        step_fns=step_fns)
    raise Failure(f"no checkpoint in {ckpts.directory} restores (tried steps "
                  f"{', '.join(map(str, candidates))})")


def class_names_of(meta: dict, config: Config) -> tuple[str, ...]:
    """The class names a checkpoint's run trained on (one model output each)."""
    names = meta.get("class_names")
    return tuple(names) if names else CLASS_NAMES[config.dataset]


def config_from(meta: dict) -> Config:
    """The run's Config from checkpoint metadata (read through step_files.parse_meta,
    which renamed older versions' fields); fields this version lacks are dropped."""
    return Config(**{k: v for k, v in meta["config"].items() if k in FIELDS})
