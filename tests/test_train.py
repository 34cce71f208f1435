import json
from pathlib import Path

import numpy as np
import pytest

from lenet_dist.config import Config
from lenet_dist.errors import UserError
from lenet_dist.feed import train_feed
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.training import train


def test_short_training_clearly_beats_chance(trained):
    first, last = trained.history
    assert last["train_loss"] < min(first["train_loss"], 1.5)
    assert last["test_accuracy"] > 0.4  # chance is 0.1
    assert last["step"] == 2 * (2000 // 16)
    assert int(trained.state.step) == last["step"]


def test_eval_counts_all_test_images(trained, dataset):
    # accuracy * n must be a whole number of the full test set's images
    n = len(dataset.test)
    correct = trained.final["test_accuracy"] * n
    assert abs(correct - round(correct)) < 1e-6


def test_metrics_jsonl_has_one_line_per_epoch(trained):
    lines = (Path(trained.config.workdir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"train_loss", "train_accuracy", "test_loss", "test_accuracy",
                          "images_per_sec", "epoch_seconds", "devices"}
        assert r["devices"] == 8 and r["images_per_sec"] > 0
    assert rows == trained.history


def test_epoch_order_depends_on_seed_and_epoch_not_devices(dataset):
    split = dataset.train.take(512)
    batches = {}
    for n in (1, 8):
        feed = train_feed(split, 64, Shardings(make_mesh(n)))
        batches[n] = [np.asarray(feed.epoch(seed=0, epoch=e)[1]) for e in (0, 1)]
        assert sorted(batches[n][0].reshape(-1).tolist()) == sorted(split.labels.tolist())
    np.testing.assert_array_equal(batches[1][0], batches[8][0])
    assert not np.array_equal(batches[1][0], batches[1][1])  # reshuffled each epoch
    other_seed = np.asarray(train_feed(split, 64, Shardings(make_mesh(8))).epoch(1, 0)[1])
    assert not np.array_equal(other_seed, batches[8][0])


def test_workdir_that_is_a_file_is_refused(dataset, tmp_path):
    (tmp_path / "f").write_text("x")
    config = Config(devices=1, epochs=1, train_limit=128, workdir=str(tmp_path / "f"))
    with pytest.raises(UserError, match="is a file, not a directory"):
        train(config, dataset=dataset, log=lambda _: None)
    assert (tmp_path / "f").read_text() == "x"
