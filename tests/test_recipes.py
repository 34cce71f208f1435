"""The modern recipe: its model, BatchNorm under data parallelism, augmentation as a
function of the key, its checkpoints read by every command; MNIST with both recipes.
That a resumed modern run equals the uninterrupted one is tests/test_checkpoint.py's
exact-resume test, run for each recipe."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_dist import model as model_lib
from lenet_dist.cli import main
from lenet_dist.evaluation import evaluate_checkpoint
from lenet_dist.restore import restore_checkpoint
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.state import BNTrainState
from lenet_dist.step import augment
from lenet_dist.training import train
from tests.conftest import assert_same_params, modern, small, write_dataset
from tests.folders import write_folder

QUIET = dict(log=lambda _: None)


def test_modern_model_shapes_and_budget(capsys):
    variables = model_lib.init_variables(jax.random.key(0), "modern")
    assert model_lib.param_count(variables["params"]) == 81_514 < 100_000
    assert [s for _, s in model_lib.layer_summary(network="modern")][-1] == (1, 10)
    assert main(["summary", "--recipe", "modern"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm" in out and "MaxPool" in out and "parameters: 81,514" in out
    assert main(["summary", "--recipe", "smoke"]) == 0  # every recipe train takes
    assert capsys.readouterr().out.endswith("parameters: 61,706\n")


def test_augmentation_is_a_function_of_the_key_and_varies(dataset, devices):
    images = jnp.asarray(dataset.train.images[:64])
    key = jax.random.key(3)
    a = augment(images, key)
    sharded = jax.device_put(images, Shardings(make_mesh(8)).batch)  # as training does
    b = jax.jit(augment)(sharded, key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # any sharding, same crops
    assert a.shape == images.shape and a.dtype == images.dtype
    assert not np.array_equal(np.asarray(augment(images, jax.random.key(4))), np.asarray(a))
    flipped_or_shifted = np.mean(np.asarray(a) != np.asarray(images), axis=(1, 2, 3)) > 0
    assert flipped_or_shifted.mean() > 0.5


def test_batchnorm_trains_identically_on_1_and_8_devices(dataset, tmp_path):
    """Statistics over the global batch: the device count does not change the model."""
    runs = {n: train(modern(tmp_path / str(n), devices=n, epochs=1, checkpoint=False),
                     dataset=dataset, **QUIET) for n in (1, 8)}
    assert isinstance(runs[8].state, BNTrainState)
    assert_same_params(runs[1].state.variables, runs[8].state.variables, atol=2e-5)
    assert runs[1].final["test_accuracy"] == pytest.approx(runs[8].final["test_accuracy"],
                                                           abs=1e-3)


def test_modern_checkpoint_evaluates_on_other_device_counts(modern_reference, dataset):
    work, ref = modern_reference
    for n in (1, 4):
        restored = restore_checkpoint(str(work), Shardings(make_mesh(n)))
        variables, config = restored.variables, restored.config
        assert config.network == "modern" and set(variables) == {"params", "batch_stats"}
        result = evaluate_checkpoint(str(work), devices=n)
        assert result["test_accuracy"] == pytest.approx(ref.final["test_accuracy"], abs=1e-6)


def test_other_recipe_on_a_workdir_is_refused(modern_reference, dataset):
    from lenet_dist.errors import UserError

    with pytest.raises(UserError, match=r"network: saved 'modern', now 'd2l'"):
        train(small(modern_reference[0], epochs=3), dataset=dataset, **QUIET)


def test_old_preset_name_still_works_with_a_note(capsys, tmp_path):
    assert main(["train", "--preset", "seed", "--devices", "1", "--epochs", "1",
                 "--train-limit", "128", "--data-dir", str(write_dataset(tmp_path, 128, 16)),
                 "--workdir", str(tmp_path / "w"), "--no-progress", "--no-tensorboard"]) == 0
    captured = capsys.readouterr()
    assert "the preset 'seed' is now called 'd2l'" in captured.err
    meta_config = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
    assert meta_config["epoch"] == 1


@pytest.mark.slow
def test_modern_defaults_train_on_a_folder_smaller_than_5000_images(dataset, tmp_path, capsys):
    """--recipe modern used to hold out 5,000 images, more than a user's folder of a few
    thousand holds; its twelfth holds out 167 of 2,000. Only --epochs is lowered."""
    folder = write_folder(tmp_path / "imgs", {
        "train": (dataset.train.images[:2000], dataset.train.labels[:2000]),
        "test": (dataset.test.images[:200], dataset.test.labels[:200])},
        dataset.class_names, formats=("png",))
    work = tmp_path / "run"
    assert main(["train", "--recipe", "modern", "--dataset", f"folder:{folder.root}",
                 "--epochs", "1", "--workdir", str(work), "--no-progress",
                 "--no-tensorboard"]) == 0
    assert "(1,833 train / 167 validation / 200 test images" in capsys.readouterr().out
    record = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["validation_accuracy"] is not None


@pytest.mark.parametrize("recipe", ["d2l", "modern"])
def test_mnist_with_both_recipes(recipe, tmp_path, capsys):
    """No MNIST on this machine: small IDX files written here, as --data-dir."""
    data = write_dataset(tmp_path, n_train=256, n_test=64)
    work = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--dataset", "mnist", "--data-dir", str(data),
                 "--devices", "8", "--epochs", "1", "--batch-size", "64", "--workdir",
                 str(work), "--no-progress", "--no-tensorboard", "--validation", "64"]) == 0
    assert "training LeNet-5 on mnist" in capsys.readouterr().out
    config = restore_checkpoint(str(work), Shardings(make_mesh(1))).config
    assert (config.dataset, config.network) == ("mnist", recipe)
    assert main(["predict", "--workdir", str(work), str(data / "t10k-images-idx3-ubyte"),
                 "--labels", str(data / "t10k-labels-idx1-ubyte"), "-q"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_tensorboard_events_of_a_run_read_back(dataset, tmp_path):
    """Per-epoch scalars, the every-K-steps train loss and the learning rate, the image
    grid, hparams and a profiler trace of steps 2..3, from the run's own event files."""
    from lenet_dist.tboard import read_board
    from lenet_dist.training import Outputs

    result = train(modern(tmp_path, epochs=2, checkpoint=False), dataset=dataset,
                   outputs=Outputs(tensorboard=True, log_every_steps=5, profile_steps="2:3"),
                   **QUIET)
    board = read_board(tmp_path / "tb")
    accuracy = board.scalars["test/accuracy"]
    assert [s for s, _ in accuracy] == [10, 20]
    assert accuracy[-1][1] == pytest.approx(result.final["test_accuracy"], abs=1e-6)
    assert [s for s, _ in board.scalars["train/step_loss"]] == [5, 10, 15, 20]
    lrs = dict(board.scalars["lr"])
    assert lrs[5] > 0 and lrs[20] < lrs[10]  # warm-up, then cosine decay
    assert [s for s, _ in board.images["test/predictions"]] == [10, 20]
    assert board.hparams["network"] == "modern" and "final/test_accuracy" in board.hparam_metrics
    assert list((tmp_path / "tb").glob("plugins/profile/*/*.xplane.pb"))


def test_report_and_comparison(modern_reference, trained, tmp_path, capsys):
    work = str(modern_reference[0])
    assert main(["report", "--workdir", work, "--out", str(tmp_path / "r")]) == 0
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert names == {"curves.png", "confusion.png", "misclassified.png", "report.md"}
    assert "81,514" in (tmp_path / "r" / "report.md").read_text()
    assert main(["report", "--compare", trained.config.workdir, work,
                 "--out", str(tmp_path / "c")]) == 0
    text = (tmp_path / "c" / "compare.md").read_text()
    assert "modern" in text and "61,706" in text and (tmp_path / "c" / "compare.png").is_file()
    assert main(["report", "--compare", work]) == 2
    assert "two or more run directories" in capsys.readouterr().err


def test_modern_export_serves_batchnorm_in_eval_mode(modern_reference, dataset, tmp_path,
                                                     capsys):
    """The SavedModel carries the running statistics: TensorFlow alone gets the same
    accuracy as JAX's evaluation of the checkpoint."""
    from tests.conftest import write_idx

    work, ref = modern_reference
    out = tmp_path / "m" / "1"
    assert main(["export", "--workdir", str(work), "--out", str(out)]) == 0
    meta = json.loads((out / "assets.extra" / "metadata.json").read_text())
    assert meta["network"] == "modern"
    images = write_idx(tmp_path / "images", dataset.test.images[..., 0])
    labels = write_idx(tmp_path / "labels", dataset.test.labels)
    capsys.readouterr()
    assert main(["predict", "--model", str(out), str(images), "--labels", str(labels),
                 "-q"]) == 0
    accuracy = float(capsys.readouterr().out.split()[1])
    assert accuracy == pytest.approx(ref.final["test_accuracy"], abs=1e-4)
