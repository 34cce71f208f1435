"""Labels that are not classes: IDX label files whose values do not fit the dataset's
classes, and `predict --labels` / export/check_model.py given labels the model has no
class for. Each is refused in one line naming the values, never scored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lenet_dist import data as data_lib
from lenet_dist import prediction, sources
from lenet_dist.errors import UserError
from tests.conftest import load_kit_module, one_line_error, write_dataset, write_idx


def one_line(caught) -> str:
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


def labels_with(directory, split: str, values) -> None:
    """Rewrite one split's labels file of a write_dataset directory: labels 0..9 in
    turn (every class present), the first ones replaced by `values`."""
    stem = {"train": "train", "test": "t10k"}[split]
    path = directory / f"{stem}-labels-idx1-ubyte"
    n = len(data_lib.read_idx(path))
    labels = np.arange(n) % 10
    labels[:len(values)] = values
    write_idx(path, labels)


@pytest.fixture
def idx_dir(tmp_path):
    """Four IDX files, 20 train / 10 test images, every class 0..9 in both splits."""
    write_dataset(tmp_path)
    labels_with(tmp_path, "train", [])
    labels_with(tmp_path, "test", [])
    return tmp_path


# ---------------------------------------------------------------- IDX label files


def test_a_dense_idx_dir_without_classes_txt_has_one_class_per_label(idx_dir):
    loaded = sources.load_idx(str(idx_dir))
    assert loaded.class_names == tuple(str(i) for i in range(10))


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_stray_idx_label_does_not_make_a_201_class_model(idx_dir, split):
    """Was: label 200 in either file gave 201 classes, 191 of them never seen."""
    labels_with(idx_dir, split, [200])
    with pytest.raises(UserError) as caught:
        sources.load_idx(str(idx_dir))
    message = one_line(caught)
    stem = "train" if split == "train" else "t10k"
    assert f"{idx_dir}/{stem}-labels-idx1-ubyte" in message and "label 200" in message
    assert "no image of labels 10.." in message and "classes.txt" in message


def test_an_idx_class_with_no_training_image_is_refused(idx_dir):
    """Labels 0..9 in the test file, but no 5 in the training file: class 5 untrained."""
    write_idx(idx_dir / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 6, 7, 8, 9] * 2
                                                            + [9, 9]))
    with pytest.raises(UserError) as caught:
        sources.load_idx(str(idx_dir))
    message = one_line(caught)
    assert f"{idx_dir}/train-labels-idx1-ubyte has no image of label 5" in message


def test_an_idx_dir_of_one_label_is_refused(idx_dir):
    for stem in ("train", "t10k"):
        path = idx_dir / f"{stem}-labels-idx1-ubyte"
        write_idx(path, np.zeros(len(data_lib.read_idx(path))))
    with pytest.raises(UserError) as caught:
        sources.load_idx(str(idx_dir))
    assert "only label 0" in one_line(caught)


def test_an_idx_label_outside_classes_txt_names_the_file(idx_dir):
    (idx_dir / "classes.txt").write_text("cat\ndog\nbird\n")
    labels_with(idx_dir, "train", [0, 1, 2] * 6 + [2, 2])
    labels_with(idx_dir, "test", [0, 1, 2, 7, 1, 1, 1, 1, 1, 1])
    with pytest.raises(UserError) as caught:
        sources.load_idx(str(idx_dir))
    message = one_line(caught)
    assert f"{idx_dir}/t10k-labels-idx1-ubyte: label 7 is out of range 0..2" in message


def test_a_builtin_dataset_label_out_of_range_names_the_file(idx_dir):
    labels_with(idx_dir, "train", [10])
    with pytest.raises(UserError) as caught:
        data_lib.load_idx_dir(idx_dir, "mnist")
    message = one_line(caught)
    assert f"{idx_dir}/train-labels-idx1-ubyte: label 10 is out of range 0..9" in message
    assert "mnist has 10 classes" in message


def test_an_idx_dir_under_a_tilde_is_found_in_home(tmp_path, monkeypatch):
    """idx:~/DIR expands like folder:~/PATH. Was: "--dataset idx:~/labelled does not
    exist or is not a directory", the ~ taken as a folder's name."""
    from lenet_dist.config import Config

    directory = tmp_path / "home" / "labelled"
    directory.mkdir(parents=True)
    write_dataset(directory)
    labels_with(directory, "train", [0, 1, 2] * 6 + [2, 2])
    labels_with(directory, "test", [0, 1, 2] * 3 + [1])
    (directory / "classes.txt").write_text("cat\ndog\nbird\n")  # read from ~ too
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for loaded in (sources.load_idx("~/labelled"),
                   sources.load_dataset(Config(dataset="idx:~/labelled"), log=print)):
        assert loaded.name == "idx:~/labelled" and loaded.source == str(directory)
        assert loaded.class_names == ("cat", "dog", "bird") and len(loaded.train) == 20
        assert loaded.train.names is None and loaded.test.names is None  # not a folder


def test_an_idx_dir_of_an_unknown_user_is_a_usage_error(tmp_path, capsys):
    """Was: "--dataset idx:~no-such-user-lenet/x does not exist or is not a directory"."""
    spec = "idx:~no-such-user-lenet/x"
    line = one_line_error(capsys, ["train", "--dataset", spec, "--devices", "1",
                                   "--workdir", str(tmp_path / "w")])
    assert line == (f"error: --dataset {spec}: cannot expand ~no-such-user-lenet (no such "
                    "user, or no home directory); give the path without ~")
    with pytest.raises(UserError) as caught:
        sources.load_idx("~no-such-user-lenet/x")
    assert one_line(caught).startswith("--dataset idx:~no-such-user-lenet/x: cannot expand")


# ---------------------------------------------------------------- predict --labels


def three_class_forward(images):
    """A stand-in 3-class model: class i % 3 for image i."""
    n = len(images)
    probs = np.zeros((n, 3), np.float32)
    probs[np.arange(n), np.arange(n) % 3] = 1.0
    return {"probabilities": probs, "classes": np.arange(n) % 3}


@pytest.fixture
def ten_labels(tmp_path):
    """10 IDX images and their labels 0..9: a 10-class test set."""
    images = write_idx(tmp_path / "images-idx3-ubyte", np.zeros((10, 28, 28)))
    labels = write_idx(tmp_path / "labels-idx1-ubyte", np.arange(10))
    return images, labels


def test_predict_refuses_labels_the_model_has_no_class_for(ten_labels, tmp_path, capsys,
                                                          monkeypatch):
    """Was: "accuracy 0.3000", exit 0, scoring labels 3..9 that no output can match."""
    monkeypatch.setattr(prediction, "checkpoint_predictor",
                        lambda *a: (three_class_forward, ["a", "b", "c"]))
    images, labels = ten_labels
    line = one_line_error(capsys, ["predict", "--workdir", str(tmp_path), "--labels",
                                   str(labels), str(images)])
    assert f"{labels} holds labels 3, 4, 5, 6, 7, ... (7 values)" in line
    assert "the model has 3 classes (0..2)" in line


def test_predict_scores_labels_within_the_models_classes(ten_labels, tmp_path):
    images, _ = ten_labels
    labels = write_idx(tmp_path / "three-idx1-ubyte", np.arange(10) % 3)
    result = prediction._predict(three_class_forward, None, [str(images)], False, 1,
                                 str(labels))
    assert result["accuracy"] == 1.0


# ---------------------------------------------------------------- export/check_model.py


@pytest.fixture
def kit():
    return load_kit_module("check_model")


def fake_model_dir(tmp_path, class_names=None):
    """A directory check_model takes for an ONNX export (the file is never run here)."""
    model = tmp_path / "model"
    (model / "assets.extra").mkdir(parents=True)
    (model / "model.onnx").write_bytes(b"not run")
    if class_names is not None:
        (model / "assets.extra" / "metadata.json").write_text(json.dumps(
            {"class_names": class_names, "formats": {"onnx": {"file": "model.onnx"}}}))
    return model


def test_check_model_refuses_ten_class_labels_for_a_three_class_model(kit, ten_labels,
                                                                    tmp_path, capsys,
                                                                    monkeypatch):
    """Known from metadata.json: refused before any runtime runs."""
    model = fake_model_dir(tmp_path, ["a", "b", "c"])
    monkeypatch.setattr(kit, "runner", lambda *a: pytest.fail("ran the model"))
    images, labels = ten_labels
    assert kit.main([str(model), "--images", str(images), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"{labels} holds labels 3, 4, 5, 6, 7, ... (7 values)" in err[0]
    assert "the model has 3 classes (0..2)" in err[0]


def test_check_model_refuses_them_from_the_outputs_without_metadata(kit, ten_labels,
                                                                   tmp_path, capsys,
                                                                   monkeypatch):
    """Without metadata.json, the model's own output width decides, still one line."""
    model = fake_model_dir(tmp_path)
    monkeypatch.setattr(kit, "runner", lambda *a: three_class_forward)
    images, labels = ten_labels
    assert kit.main([str(model), "--images", str(images), "--labels", str(labels),
                     "--runs", "1"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "the model has 3 classes (0..2)" in err[0], err
    assert "accuracy" not in captured.out


def test_the_kit_refuses_labels_in_the_words_predict_uses():
    """export/check_model.py stands alone (no lenet_dist import), so it spells
    `label_problem` again; the two must say the same."""
    from lenet_dist.prediction import label_problem

    kit = load_kit_module("check_model").label_problem
    for labels, classes in (([0, 1, 2], 3), ([0, 3], 3), (list(range(20)), 3), ([9], 10)):
        labels = np.asarray(labels)
        assert kit("L", labels, classes) == label_problem("L", labels, classes)
