"""Model selection on a held-out validation split, never on the test set; early stopping."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml

from lenet_dist import data as data_lib
from lenet_dist.checkpoint import Checkpoints
from lenet_dist.cli import main
from lenet_dist.config import PRESETS, Config
from lenet_dist.errors import UserError
from lenet_dist.records import best_epoch, describe_best, stopped_early
from lenet_dist.training import train
from tests.conftest import assert_same_params, small

QUIET = dict(log=lambda _: None)


def test_hold_out_is_the_seeds_and_disjoint(dataset):
    rest, held = data_lib.hold_out(dataset.train, 300, seed=7)
    again_rest, again_held = data_lib.hold_out(dataset.train, 300, seed=7)
    assert len(held) == 300 and len(rest) == len(dataset.train) - 300
    np.testing.assert_array_equal(held.images, again_held.images)
    np.testing.assert_array_equal(rest.labels, again_rest.labels)
    other, _ = data_lib.hold_out(dataset.train, 300, seed=8)
    assert not np.array_equal(other.labels, rest.labels)  # another seed, other images
    # together they are the training split, each image once
    both = np.concatenate([rest.images, held.images]).reshape(len(dataset.train), -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, dataset.train.images.reshape(
        len(dataset.train), -1)))
    same, empty = data_lib.hold_out(dataset.train, 0, seed=7)
    assert same is dataset.train and len(empty) == 0
    with pytest.raises(UserError, match="would hold out the whole training split"):
        data_lib.hold_out(dataset.train, len(dataset.train), seed=7)


def test_recipes_hold_out_what_they_say(dataset):
    """modern holds out a twelfth: exactly the 5,000 images of Fashion-MNIST's 60,000 that
    its count of 5,000 held out (so docs/recipes.md's 0.91 stands), and a part of a
    smaller folder instead of more images than it has."""
    assert PRESETS["d2l"].validation == 0  # the seed's 60,000 training images
    modern = PRESETS["modern"]
    assert modern.validation == 1 / 12 and modern.validation_images(60_000) == 5000
    if dataset.source != "synthetic":
        assert len(dataset.train) == 60_000
    rest, held = data_lib.hold_out(dataset.train,
                                   modern.validation_images(len(dataset.train)), modern.seed)
    before_rest, before_held = data_lib.hold_out(dataset.train, 5000, modern.seed)
    np.testing.assert_array_equal(held.images, before_held.images)  # the same images
    np.testing.assert_array_equal(rest.labels, before_rest.labels)
    assert modern.validation_images(2358) == 196  # the user's folder: 2,162 left to train


@pytest.mark.parametrize("validation, images, held", [
    (0, 10, 0), (7, 10, 7), (0.5, 10, 5), (0.25, 10, 2), (0.01, 10, 1), (0.9, 10, 9),
    (0.5, 2, 1),
])
def test_validation_is_a_count_or_a_fraction_of_the_split(validation, images, held):
    assert Config(validation=validation).validate().validation_images(images) == held


def test_a_fraction_that_leaves_nothing_to_train_is_one_line():
    with pytest.raises(UserError, match=r"^validation 0\.9 of 1 training images holds out all"):
        Config(validation=0.9).validation_images(1)


def records(*pairs):
    return [{"epoch": i + 1, "validation_accuracy": v, "test_accuracy": t}
            for i, (v, t) in enumerate(pairs)]


def test_best_and_early_stop_read_validation_only():
    history = records((0.5, 0.9), (0.7, 0.1), (0.7, 0.95), (0.6, 0.99))
    assert best_epoch(history)["epoch"] == 2  # the first of equal validation accuracies
    assert stopped_early(history, 2) == 4 and stopped_early(history, 3) is None
    assert stopped_early(history, 0) is None
    assert "validation accuracy 0.7000" in describe_best(history)
    no_validation = [{"epoch": 1, "test_accuracy": 0.3}, {"epoch": 2, "test_accuracy": 0.4}]
    assert best_epoch(no_validation)["epoch"] == 2
    assert stopped_early(no_validation, 1) is None
    assert "selected on the test set" in describe_best(no_validation)


def shuffled_test_labels(dataset):
    labels = np.random.default_rng(1).permutation(dataset.test.labels)
    return dataclasses.replace(dataset, test=data_lib.Split(dataset.test.images, labels))


def test_the_best_checkpoint_never_consults_the_test_set(dataset, tmp_path, capsys):
    """Shuffling the test labels changes every test figure and nothing else: the same
    parameters, validation history, best step, and what --best restores."""
    config = small(tmp_path / "a", epochs=4, validation=256, optimizer="adam",
                   learning_rate=0.003,
                   keep_checkpoints=1)
    a = train(config, dataset=dataset, **QUIET)
    b = train(config.replace(workdir=str(tmp_path / "b")),
              dataset=shuffled_test_labels(dataset), **QUIET)
    assert_same_params(a.state.params, b.state.params)
    assert [r["validation_accuracy"] for r in a.history] == \
        [r["validation_accuracy"] for r in b.history]
    assert [r["test_accuracy"] for r in a.history] != [r["test_accuracy"] for r in b.history]
    steps = [Checkpoints(str(tmp_path / w), read_only=True).best_step() for w in "ab"]
    best = best_epoch(a.history)
    assert steps[0] == steps[1] == best["step"]
    # keep 1 + the best: the best survives the keep-K policy when it is not the latest
    kept = Checkpoints(str(tmp_path / "a"), read_only=True).steps()
    assert best["step"] in kept and a.history[-1]["step"] in kept
    assert main(["checkpoints", "--workdir", str(tmp_path / "a")]) == 0
    listing = capsys.readouterr().out
    assert "val acc" in listing and "best: by validation accuracy" in listing
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert all("validation_loss" in r for r in metrics)


def test_a_run_without_validation_says_its_best_was_chosen_on_the_test_set(
        trained, capsys):
    work = trained.config.workdir
    assert main(["checkpoints", "--workdir", work]) == 0
    assert "selected on the test set" in capsys.readouterr().out
    assert "selected on the test set" in describe_best(trained.history)


def test_early_stop_ends_a_finished_run_that_resumes_when_asked(dataset, tmp_path):
    """At a learning rate too small to change a prediction, the validation accuracy never
    improves after epoch 1: --early-stop 2 ends the run at epoch 3, as finished; a rerun
    says so and trains nothing; --early-stop 0 trains on from there."""
    lines = []
    config = small(tmp_path, epochs=6, validation=256, learning_rate=1e-9, early_stop=2)
    first = train(config, dataset=dataset, log=lines.append)
    assert [r["epoch"] for r in first.history] == [1, 2, 3]
    assert any("stopping early" in line for line in lines)
    lines.clear()
    again = train(config, dataset=dataset, log=lines.append)
    assert len(again.history) == 3
    assert any("stopped early at epoch 3" in line for line in lines), lines
    lines.clear()  # the same 256 images as a fraction: the same run, not "a different run"
    fraction = config.replace(validation=256 / len(dataset.train))
    assert fraction.validation_images(len(dataset.train)) == 256
    train(fraction, dataset=dataset, log=lines.append)
    assert any("stopped early at epoch 3" in line for line in lines), lines
    more = train(config.replace(early_stop=0), dataset=dataset, **QUIET)
    assert [r["epoch"] for r in more.history] == [1, 2, 3, 4, 5, 6]


def test_early_stop_needs_a_validation_split(capsys):
    assert main(["train", "--early-stop", "3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--early-stop watches the validation accuracy" in err


@pytest.mark.parametrize("given, held", [("5000", 5000), ("0.0833", 0.0833), ("0", 0)])
def test_the_validation_option_takes_a_count_or_a_fraction(capsys, given, held):
    """An integer is a count of images and a decimal a fraction, as in a settings file
    and in Python: the type says which (`Config.validation`)."""
    assert main(["train", "--recipe", "modern", "--validation", given, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["validation"]
    assert printed == held and type(printed) is type(held)


@pytest.mark.parametrize("given", ["1.5", "5000.0", "1e3", "0.0", "nan", "-1", "ten"])
def test_a_validation_neither_count_nor_fraction_is_one_line(capsys, given):
    assert main(["train", "--validation", given, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "'--validation'" in err and err.count("\n") == 1, err
