"""restore: which checkpoint eval, export, predict and bench read, and how it comes back."""

import jax
import pytest

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.errors import UserError
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.restore import Restored, candidate_steps, restore_checkpoint
from tests.conftest import assert_same_params


def quiet_checkpoints(workdir) -> Checkpoints:
    return Checkpoints(workdir, read_only=True, warn=lambda _: None)


def test_latest_by_default_on_this_mesh(trained):
    restored = restore_checkpoint(trained.config.workdir, Shardings(make_mesh(1)))
    assert isinstance(restored, Restored)
    assert restored.step == trained.final["step"] == int(trained.state.step)
    assert restored.meta["step"] == restored.step and restored.meta["history"]
    assert restored.config.to_dict() == trained.config.to_dict()
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(restored.variables)} == {1}
    assert_same_params(restored.variables, trained.state.variables)


def test_step_names_one_checkpoint(trained):
    ckpts = quiet_checkpoints(trained.config.workdir)
    first = ckpts.steps()[0]
    assert candidate_steps(ckpts, first, best=False) == [first]
    restored = restore_checkpoint(trained.config.workdir, Shardings(make_mesh(1)), step=first)
    assert restored.step == first and restored.meta["step"] == first


def test_best_is_the_highest_test_accuracy_then_the_next(trained):
    ckpts = quiet_checkpoints(trained.config.workdir)
    by_accuracy = sorted(((r["test_accuracy"], r["step"]) for r in trained.history),
                         reverse=True)
    assert candidate_steps(ckpts, None, best=True) == [s for _, s in by_accuracy]
    assert candidate_steps(ckpts, None, best=False) == ckpts.steps()[::-1]
    restored = restore_checkpoint(trained.config.workdir, Shardings(make_mesh(1)), best=True)
    assert restored.step == by_accuracy[0][1]


def test_a_missing_step_is_one_line_naming_the_available_ones(trained):
    steps = quiet_checkpoints(trained.config.workdir).steps()
    with pytest.raises(UserError) as err:
        restore_checkpoint(trained.config.workdir, Shardings(make_mesh(1)), step=7)
    assert str(err.value) == (f"no checkpoint at step 7; available: "
                              f"{', '.join(map(str, steps))}")
