"""`--dataset folder:PATH`: a user's labelled images in class folders, decoded by predict's
decoder, cached, and trained on exactly as the same images from IDX files."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from lenet_dist import data as data_lib
from lenet_dist import folder, images
from lenet_dist.cli import main
from lenet_dist.config import Config
from lenet_dist.errors import UserError
from lenet_dist.sources import load_dataset
from lenet_dist.training import train
from tests.conftest import assert_same_params, real_data_available, small
from tests.folders import LOSSLESS, write_folder, write_image

FASHION = "/usr/share/datasets/fashion-mnist"
QUIET = dict(log=lambda _: None)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test's own cache directory: nothing lands in ~/.cache."""
    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def fashion():
    if not real_data_available():
        pytest.skip("the real Fashion-MNIST is not installed")
    return (data_lib.read_idx(f"{FASHION}/train-images-idx3-ubyte.gz"),
            data_lib.read_idx(f"{FASHION}/train-labels-idx1-ubyte.gz"))


@pytest.fixture(scope="module")
def fashion_folder(fashion, tmp_path_factory):
    """2,500 real Fashion-MNIST images as files: 2,000 train, 500 test, in 10 class
    folders; PNG (gray, RGB, 56x56, 84x84), JPEG, BMP and GIF."""
    images_, labels = fashion
    root = tmp_path_factory.mktemp("fashion-folder")
    order = write_folder(root, {"train": (images_[:2000], labels[:2000]),
                                "test": (images_[2000:2500], labels[2000:2500])},
                         data_lib.CLASS_NAMES["fashion_mnist"])
    return root, order


def test_the_folder_gives_the_idx_pixels_and_predicts_decoding(fashion, fashion_folder):
    images_, labels = fashion
    root, order = fashion_folder
    dataset, info = folder.load_folder(root, progress=False)
    assert len(dataset.train) + len(dataset.test) >= 2500 and not info.cache_hit
    assert dataset.class_names[0] == "0-T-shirt_top" and dataset.num_classes == 10
    for split, offset in (("train", 0), ("test", 2000)):
        got = getattr(dataset, split)
        index = np.array([i for i, _ in order[split]])
        kinds = np.array([k for _, k in order[split]])
        np.testing.assert_array_equal(got.labels, labels[offset + index])
        lossless = np.isin(kinds, LOSSLESS)
        assert lossless.sum() > 0.8 * len(kinds) and (~lossless).sum() > 0
        np.testing.assert_array_equal(got.images[lossless, ..., 0],
                                      images_[offset + index[lossless]])
        jpeg = got.images[~lossless, ..., 0].astype(int)
        assert np.abs(jpeg - images_[offset + index[~lossless]]).mean() < 2
    # every file, JPEG too, exactly as `predict` decodes it
    files = sorted((root / "test").rglob("*.*"))
    decoded, _ = images.load_inputs([str(f) for f in files])
    by_name = dict(zip(files, decoded))
    for (i, _), pixels in zip(order["test"], dataset.test.images):
        match = [f for f in by_name if f.stem == f"{i:06d}"]
        np.testing.assert_array_equal(pixels, by_name[match[0]])


def test_the_second_start_reads_the_cache(fashion_folder, tmp_path):
    root, _ = fashion_folder
    first, info1 = folder.load_folder(root, progress=False)
    second, info2 = folder.load_folder(root, progress=False)
    print(f"\nfolder start-up, {len(first.train) + len(first.test):,} images: decoded "
          f"{info1.seconds:.2f} s, cached {info2.seconds:.2f} s")
    assert not info1.cache_hit and info2.cache_hit and info2.seconds < info1.seconds
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    # a corrupt cache is decoded again, not a traceback
    open(info2.cache_path, "wb").write(b"not an npz")
    third, info3 = folder.load_folder(root, progress=False)
    assert not info3.cache_hit
    np.testing.assert_array_equal(third.train.images, first.train.images)


def test_a_changed_file_is_decoded_again(tmp_path):
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (6, 28, 28), dtype=np.uint8)
    for i in range(6):
        (root / "a" / str(i % 2)).parent.mkdir(parents=True, exist_ok=True)
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        write_image(d / f"{i}", pixels[i], "png")
    first, _ = folder.load_folder(root, test_fraction=0.34, progress=False)
    target = sorted((root / "a").iterdir())[0]
    write_image(target.with_suffix(""), 255 - pixels[1], "png")
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    second, info = folder.load_folder(root, test_fraction=0.34, progress=False)
    assert not info.cache_hit
    both = np.concatenate([second.train.images, second.test.images])
    assert any(np.array_equal(x[..., 0], 255 - pixels[1]) for x in both)


def write_classes(root, counts, seed=0):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / name / f"{i:03d}", rng.integers(0, 255, (28, 28), np.uint8),
                        "png")
    return root


def test_test_fraction_is_stable_per_file(tmp_path):
    root = write_classes(tmp_path / "flat", {"cat": 20, "dog": 20})
    a, _ = folder.load_folder(root, test_fraction=0.25, progress=False, use_cache=False)
    b, _ = folder.load_folder(root, test_fraction=0.25, progress=False, use_cache=False)
    assert len(a.test) == 10 and len(a.train) == 30  # stratified: 5 of each class
    assert np.bincount(a.test.labels).tolist() == [5, 5]
    np.testing.assert_array_equal(a.test.images, b.test.images)
    _, files_before, _ = folder.scan(root, 0.25)
    write_image(root / "cat" / "new", np.zeros((28, 28), np.uint8), "png")
    _, files_after, _ = folder.scan(root, 0.25)
    moved = {f for f, _ in files_before["test"]} - {f for f, _ in files_after["test"]}
    assert len(moved) <= 1  # a new file may take one slot: the others stay put


@pytest.mark.parametrize("layout, message", [
    ("one-class", "holds 1 class folders; a model needs 2 to 1,000"),
    ("many-classes", "holds 1,001 class folders; a model needs 2 to 1,000"),
    ("empty-class", "holds no images"),
    ("no-split", "has no train/ and test/ folders; give --test-fraction F"),
    ("only-train", "has train/ but no test/"),
    ("mismatch", "hold different classes (only in one: zebra)"),
    ("bad-file", "cannot be decoded as PNG"),
    ("not-an-image", "is not a PNG, JPEG, GIF or BMP image"),
])
def test_bad_folders_are_one_line(tmp_path, layout, message):
    root = tmp_path / layout
    fraction = None
    if layout == "one-class":
        write_classes(root, {"only": 2})
        fraction = 0.5
    elif layout == "many-classes":
        for i in range(1001):
            (root / f"c{i:04d}").mkdir(parents=True)
        fraction = 0.5
    elif layout == "empty-class":
        write_classes(root, {"a": 2})
        (root / "b").mkdir()
        fraction = 0.5
    elif layout == "no-split":
        write_classes(root, {"a": 2, "b": 2})
    elif layout == "only-train":
        write_classes(root / "train", {"a": 2, "b": 2})
    elif layout == "mismatch":
        write_classes(root / "train", {"a": 2, "zebra": 2})
        write_classes(root / "test", {"a": 2})
    else:
        write_classes(root, {"a": 3, "b": 3})
        bad = root / "b" / "001.png"
        if layout == "bad-file":
            bad.write_bytes(bad.read_bytes()[:60])  # truncated
        else:
            bad.write_bytes(b"hello, not an image")
        fraction = 0.34
    with pytest.raises(UserError) as caught:
        folder.load_folder(root, test_fraction=fraction, progress=False)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    if layout in ("bad-file", "not-an-image"):
        assert "001.png" in str(caught.value)
        dataset, info = folder.load_folder(root, test_fraction=fraction, progress=False,
                                           skip_bad_files=True)
        assert len(info.skipped) == 1 and len(dataset.train) + len(dataset.test) == 5
        assert "1 bad files skipped" in info.summary()


def test_training_on_the_folder_equals_training_on_the_idx_subset(fashion, tmp_path):
    """The same images as lossless files or as IDX arrays (in the folder's order): the
    same parameters after an epoch on 8 devices."""
    images_, labels = fashion
    root = tmp_path / "lossless"
    order = write_folder(root, {"train": (images_[:640], labels[:640]),
                                "test": (images_[640:740], labels[640:740])},
                         data_lib.CLASS_NAMES["fashion_mnist"], formats=LOSSLESS)
    config = small(tmp_path / "a", dataset=f"folder:{root}", epochs=1, checkpoint=False)
    from_folder = load_dataset(config, **QUIET)
    train_index = np.array([i for i, _ in order["train"]])
    test_index = 640 + np.array([i for i, _ in order["test"]])
    from_idx = data_lib.Dataset(
        "fashion_mnist", "idx subset",
        data_lib.Split(images_[train_index][..., None], labels[train_index].astype(np.int32)),
        data_lib.Split(images_[test_index][..., None], labels[test_index].astype(np.int32)),
        from_folder.class_names)
    a = train(config, **QUIET)  # loads the folder itself, as `train` does
    b = train(config.replace(dataset="fashion_mnist", workdir=str(tmp_path / "b")),
              dataset=from_idx, **QUIET)
    assert_same_params(a.state.params, b.state.params)
    assert a.history[-1]["test_accuracy"] == b.history[-1]["test_accuracy"]


def test_three_classes_train_and_predict_with_their_names(tmp_path, capsys, monkeypatch):
    root = write_classes(tmp_path / "shapes", {"circle": 24, "square": 24, "triangle": 24})
    work = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--test-fraction", "0.25",
                 "--devices", "1", "--epochs", "1", "--batch-size", "16", "--workdir",
                 str(work), "--no-progress", "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "decoded in" in out
    meta_dirs = sorted((work / "checkpoints").iterdir(), key=lambda p: int(p.name))
    meta = json.loads((meta_dirs[-1] / "meta" / "metadata").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle"]
    assert main(["predict", "--workdir", str(work), "--json", "--top", "3",
                 str(root / "square" / "000.png")]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert sorted(p["class"] for p in row["predictions"]) == ["circle", "square", "triangle"]
    assert sum(p["probability"] for p in row["predictions"]) == pytest.approx(1, abs=1e-3)
    # the second start reads the cache; it says so
    assert main(["train", "--dataset", f"folder:{root}", "--test-fraction", "0.25",
                 "--devices", "1", "--epochs", "2", "--batch-size", "16", "--workdir",
                 str(work), "--no-progress", "--no-tensorboard"]) == 0
    assert "read from the cache" in capsys.readouterr().out
    # a class more: the run in the workdir is another model, refused in one line
    write_classes(root, {"star": 8})
    assert main(["train", "--dataset", f"folder:{root}", "--test-fraction", "0.25",
                 "--devices", "1", "--epochs", "3", "--batch-size", "16", "--workdir",
                 str(work), "--no-progress", "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "holds a run on 3 classes (circle, square, triangle), the data has 4" in err


def test_config_names_the_folder(tmp_path):
    config = Config(dataset=f"folder:{tmp_path}", test_fraction=0.2)
    assert config.validate() is config
    with pytest.raises(UserError, match="--skip-bad-files is for folder: datasets"):
        Config(skip_bad_files=True).validate()
