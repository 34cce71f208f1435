"""One meaning of "best": training's line, early stopping, the keep policy, the
`checkpoints` listing and `--best` all rank by `records.ranked`: on the split the newest
epoch was scored on, the highest accuracy, the first of equals."""

import numpy as np
import pytest

from lenet_dist.checkpoint import Checkpoints, best_first
from lenet_dist.records import best_epoch, describe_best, near_chance, ranked, stopped_early
from lenet_dist.restore import candidate_steps


def row(epoch, test, validation=None):
    return {"epoch": epoch, "step": 10 * epoch, "test_accuracy": test,
            **({"validation_accuracy": validation} if validation is not None else {})}


def test_the_first_of_equals_is_best():
    history = [row(1, 0.5, 0.70), row(2, 0.6, 0.80), row(3, 0.9, 0.80), row(4, 0.7, 0.75)]
    assert best_epoch(history)["epoch"] == 2
    assert [r["epoch"] for r in ranked(history)] == [2, 3, 4, 1]
    assert best_first({r["step"]: r for r in history}) == [20, 30, 40, 10]
    assert stopped_early(history, 2) == 4  # two epochs after epoch 2, not after epoch 3


@pytest.mark.parametrize("before, after, best", [
    # --validation 256, then resumed with --validation 0: chosen on the test set; this
    # compared None with a float ("'>' not supported") after the first new epoch.
    ((0.9, 0.5), (0.6, None), 1),
    # --validation 0, then 256: only the epochs scored on validation compete; this
    # called the test-chosen epoch 1 best though it has no validation accuracy.
    ((0.9, None), (0.6, 0.5), 2),
])
def test_a_resume_that_changed_validation_ranks_by_the_newest_split(before, after, best):
    history = [row(1, *before), row(2, *after)]
    assert best_epoch(history)["epoch"] == best
    assert describe_best(history).startswith(f"best: epoch {best}, ")
    assert best_first({r["step"]: r for r in history})[0] == 10 * best
    assert stopped_early(history, 1) in (None, 2)  # no TypeError either


def save(ckpts, step, **metrics):
    ckpts.save(step, {"w": np.arange(4.0)}, {"step": step}, metrics=metrics, wait=True)


def test_the_keep_policy_keeps_the_first_of_equals(tmp_path):
    """Orbax's BestN kept the last of equals: a run whose epochs 6 and 9 tied on
    validation lost epoch 6, which training and the report called best, and
    `checkpoints` and `eval --best` named epoch 9."""
    ckpts = Checkpoints(tmp_path / "run", keep=1)
    save(ckpts, 10, test_accuracy=0.5, validation_accuracy=0.80)
    save(ckpts, 20, test_accuracy=0.9, validation_accuracy=0.80)
    save(ckpts, 30, test_accuracy=0.7, validation_accuracy=0.75)
    ckpts.close()
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [10, 30]
    assert ckpts.best_step() == 10 and ckpts.chosen_on() == "validation"
    assert candidate_steps(ckpts, None, best=True) == [10, 30]


def test_the_keep_policy_ranks_a_changed_split_as_training_does(tmp_path):
    """Validation accuracy 0.5 (an epoch before --validation 0) was ranked against
    test accuracies: epoch 1's test 0.9 lost to step 30's 0.7."""
    ckpts = Checkpoints(tmp_path / "run", keep=1)
    save(ckpts, 10, test_accuracy=0.9, validation_accuracy=0.5)
    save(ckpts, 20, test_accuracy=0.6)
    save(ckpts, 30, test_accuracy=0.7)
    ckpts.close()
    assert ckpts.steps() == [10, 30]
    assert ckpts.best_step() == 10 and ckpts.chosen_on() == "test"


def test_near_chance():
    """The d2l recipe on a 3-class folder ended at 0.349 after 10 epochs, silently."""
    assert near_chance(0.349, 3) and not near_chance(0.40, 3)
    assert near_chance(0.1000, 10) and near_chance(0.189, 10) and not near_chance(0.7216, 10)
