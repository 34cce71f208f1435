"""`--dataset folder:PATH` (folder.py): a user's labelled images in class folders, decoded
by predict's decoder, cached, and trained on exactly as the same images from IDX files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_dist import data as data_lib
from lenet_dist import caches, folder, images
from lenet_dist.cli import main
from lenet_dist.config import Config
from lenet_dist.errors import UserError
from lenet_dist.sources import load_dataset
from tests.conftest import make_special, one_line_error, real_data_available, returns_within
from tests.folders import FORMATS, folder_name, write_folder, write_image

FASHION_NAMES = data_lib.CLASS_NAMES["fashion_mnist"]
QUIET = dict(progress=False, log=lambda _: None)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test's own cache directory: nothing lands in ~/.cache, nothing is shared."""
    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def fashion(dataset):
    if not real_data_available():
        pytest.skip("the real Fashion-MNIST is not installed")
    return dataset


@pytest.fixture(scope="module")
def written(fashion, tmp_path_factory):
    """2,500 real Fashion-MNIST images as files (the first 2,000 training and 500 test
    images) in the 10 classes' folders; PNG (gray, RGB, 56x56, 84x84), JPEG, BMP, GIF."""
    return write_folder(tmp_path_factory.mktemp("fashion-folder"),
                        {"train": (fashion.train.images[:2000], fashion.train.labels[:2000]),
                         "test": (fashion.test.images[:500], fashion.test.labels[:500])},
                        FASHION_NAMES)


def write_classes(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """root/<class>/<i>.png: counts[class] random 28x28 gray PNGs."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / name / f"{i:03d}", rng.integers(0, 256, (28, 28), np.uint8),
                        "png")
    return root


def one_line(caught) -> str:
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------- pixels and labels


def test_the_folder_gives_the_idx_pixels_and_predicts_decoding(fashion, written, capsys):
    loaded, info = folder.load_folder(written.root, log=print)  # progress on: 2,500 files
    assert "decoding images" in capsys.readouterr().err  # tqdm's bar
    # Folders named by class ("T-shirt/top" -> "T-shirt_top"), in code-point order.
    assert loaded.class_names == written.class_names == (
        "Ankle boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker",
        "T-shirt_top", "Trouser")
    assert loaded.name == f"folder:{written.root}"
    assert loaded.source == info.root == str(written.root.resolve())
    assert info.counts == {"train": 2000, "test": 500} and info.ignored == 0
    assert not info.cache_hit and not info.skipped
    for split, source in (("train", fashion.train), ("test", fashion.test)):
        files, got = written.splits[split], getattr(loaded, split)
        assert set(files.kinds) == set(FORMATS)
        np.testing.assert_array_equal(got.labels, files.labels)
        np.testing.assert_array_equal(
            got.labels, written.relabel(source.labels[files.index], FASHION_NAMES))
        # Every lossless file (PNG gray/RGB/56x56/84x84, BMP, GIF): exactly the IDX pixels.
        lossless = files.lossless
        assert lossless.sum() > 0.8 * len(got) and (~lossless).sum() > 0
        np.testing.assert_array_equal(got.images[lossless],
                                      source.images[files.index[lossless]])
        # JPEG (quality 95): close, not equal.
        jpeg = got.images[~lossless].astype(int) - source.images[files.index[~lossless]]
        assert np.abs(jpeg).mean() < 2
        # Every file, JPEGs too: exactly what `predict` decodes.
        decoded, _ = images.load_inputs([str(p) for p in files.paths])
        np.testing.assert_array_equal(got.images, decoded)


def test_the_second_load_reads_the_cache(written, private_cache):
    notes = []
    first, info1 = folder.load_folder(written.root, progress=False, log=notes.append)
    second, info2 = folder.load_folder(written.root, progress=False, log=notes.append)
    print(f"\nfolder dataset, {sum(info1.counts.values()):,} files: decoded in "
          f"{info1.seconds:.2f} s, read from the cache in {info2.seconds:.2f} s")
    assert not info1.cache_hit and info2.cache_hit and not notes
    assert info2.cache_path == info1.cache_path
    assert Path(info1.cache_path).parent == private_cache
    assert info2.seconds < info1.seconds
    assert "read from the cache in" in info2.summary()
    assert second.class_names == first.class_names
    for split in folder.SPLITS:
        np.testing.assert_array_equal(getattr(second, split).images,
                                      getattr(first, split).images)
        np.testing.assert_array_equal(getattr(second, split).labels,
                                      getattr(first, split).labels)
    # What `train` loads for --dataset folder:PATH is these arrays (from the same cache).
    lines = []
    trained_on = load_dataset(Config(dataset=f"folder:{written.root}"), log=lines.append)
    assert len(lines) == 1 and "read from the cache" in lines[0]
    np.testing.assert_array_equal(trained_on.train.images, first.train.images)
    assert trained_on.class_names == first.class_names


@pytest.mark.parametrize("layout", ["splits", "flat"])
def test_each_image_is_named_by_its_file_after_skipping_and_from_the_cache(tmp_path, layout):
    """Split.names: each image's file relative to its split's folder, in step with the
    images when --skip-bad-files drops some, and the same when the cache (which does not
    hold them) is read: the report names misclassified images by them."""
    root = tmp_path / layout
    if layout == "splits":
        write_classes(root / "train", {"a": 3, "b": 4}, seed=1)
        write_classes(root / "test", {"a": 3, "b": 2}, seed=2)
    else:
        write_classes(root, {"a": 6, "b": 7})
    fraction = None if layout == "splits" else 0.4
    listing = folder.scan(root, fraction)
    bad = {listing.files["train"][1][0], listing.files["test"][0][0]}
    for relpath in bad:
        (root / relpath).write_bytes(b"not an image")
    for cached in (False, True):
        loaded, info = folder.load_folder(root, test_fraction=fraction, skip_bad_files=True,
                                          **QUIET)
        assert info.cache_hit == cached and set(info.skipped) == bad
        for split in folder.SPLITS:
            got, top = getattr(loaded, split), root / split if layout == "splits" else root
            kept = [f for f, _ in listing.files[split] if f not in bad]
            assert got.names == tuple(os.path.relpath(root / f, top) for f in kept)
            assert all(n.count("/") == 1 for n in got.names)  # "<class>/<file>"
            for name, pixels, label in zip(got.names, got.images, got.labels):
                np.testing.assert_array_equal(pixels, folder.decode_file(top / name))
                assert loaded.class_names[label] == name.split("/")[0]


def test_names_stay_with_their_images_through_hold_out_take_and_subset(tmp_path):
    root = write_classes(tmp_path / "flat", {"a": 10, "b": 10})
    train = folder.load_folder(root, test_fraction=0.2, **QUIET)[0].train
    by_name = dict(zip(train.names, train.images))
    rest, held = data_lib.hold_out(train, 5, seed=3)
    assert sorted(rest.names + held.names) == sorted(train.names)
    parts = (rest, held, rest.take(4), train.take(None), held.take(0),
             held.subset(np.array([2, 0])), rest.subset(rest.labels == 1))
    for part in parts:
        assert len(part.names) == len(part)
        for name, pixels in zip(part.names, part.images):
            np.testing.assert_array_equal(pixels, by_name[name])
    with pytest.raises(ValueError, match="1 image names for 16 labels"):
        data_lib.Split(train.images, train.labels, ("a/000.png",))
    assert "names" not in repr(train)  # thousands of them, in a folder of real size
    # IDX data has none, and keeps none through the same steps.
    plain = data_lib.Split(train.images, train.labels)
    assert plain.names is None
    assert all(p.names is None for p in (plain.take(3), plain.subset(np.array([1])),
                                         *data_lib.hold_out(plain, 5, seed=3)))


def test_a_touched_or_replaced_file_is_decoded_again(tmp_path, private_cache):
    root = write_classes(tmp_path / "tiny", {"a": 3, "b": 3})
    notes = []

    def load():
        return folder.load_folder(root, test_fraction=0.34, progress=False, log=notes.append)

    _, first = load()
    assert load()[1].cache_hit
    target = root / "a" / "000.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: same bytes
    _, touched = load()
    assert not touched.cache_hit and touched.cache_path != first.cache_path
    assert [p.name for p in private_cache.iterdir()] == [Path(touched.cache_path).name]
    new = np.full((28, 28), 77, np.uint8)
    write_image(target.with_suffix(""), new, "png")  # replaced
    replaced, info = load()
    assert not info.cache_hit
    both = np.concatenate([replaced.train.images, replaced.test.images])[..., 0]
    assert any(np.array_equal(x, new) for x in both)
    assert load()[1].cache_hit and not notes


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-key", "fifo"])
def test_a_damaged_cache_is_rebuilt_with_a_note(tmp_path, damage):
    root = write_classes(tmp_path / "tiny", {"a": 3, "b": 3})
    notes = []

    def load():
        return folder.load_folder(root, test_fraction=0.34, progress=False, log=notes.append)

    good, info = load()
    cache = Path(info.cache_path)
    if damage == "garbage":
        cache.write_bytes(b"not an npz")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:300])
    elif damage == "other-key":  # a valid file from other files, under this name
        other = write_classes(tmp_path / "other", {"x": 2, "y": 2}, seed=1)
        other_cache = Path(folder.load_folder(other, test_fraction=0.5, **QUIET)[1]
                           .cache_path)
        cache.unlink()
        other_cache.rename(cache)
    else:
        cache.unlink()
        os.mkfifo(cache)
    outcome = returns_within(30, load)  # a FIFO must not block the read
    assert outcome is None
    again, info = load()
    np.testing.assert_array_equal(again.train.images, good.train.images)
    assert notes and all("\n" not in n and str(cache) in n for n in notes)
    if damage == "fifo":  # not read, and not replaced: that is the user's to remove
        assert "cannot read the cache" in notes[0] and "cannot write" in notes[1]
        assert not info.cache_hit and info.cache_path is None
    else:
        assert "decoding again" in notes[0] and info.cache_hit


def test_a_cache_folder_that_cannot_be_written_is_a_note(tmp_path, monkeypatch):
    root = write_classes(tmp_path / "tiny", {"a": 2, "b": 2})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(folder.CACHE_ENV, str(blocker / "cache"))
    notes = []
    loaded, info = folder.load_folder(root, test_fraction=0.5, progress=False,
                                      log=notes.append)
    assert len(loaded.train) == len(loaded.test) == 2
    assert not info.cache_hit and info.cache_path is None
    assert len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith(f"note: cannot write the decoded images' cache {blocker}/")
    assert "(Not a directory)" in notes[0]
    assert "decoded in" in info.summary() and "(" not in info.summary().split("decoded")[1]


def test_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert caches.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(folder.CACHE_ENV)
    assert caches.cache_root() == tmp_path / "xdg" / "lenet-dist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert caches.cache_root() == tmp_path / "home" / ".cache" / "lenet-dist"
    root = write_classes(tmp_path / "tiny", {"a": 2, "b": 2})
    _, uncached = folder.load_folder(root, test_fraction=0.5, use_cache=False, **QUIET)
    assert uncached.cache_path is None and not (tmp_path / "home").exists()


# ---------------------------------------------------------------- the test fraction


def test_the_test_fraction_is_stratified_stable_and_seed_free(tmp_path):
    root = write_classes(tmp_path / "flat", {"cat": 20, "dog": 20, "emu": 7})
    a, _ = folder.load_folder(root, test_fraction=0.25, use_cache=False, **QUIET)
    b, _ = folder.load_folder(root, test_fraction=0.25, seed=7, use_cache=False, **QUIET)
    # round(0.25 x n) of each class: 5, 5 and round(1.75) = 2
    assert np.bincount(a.test.labels).tolist() == [5, 5, 2]
    assert np.bincount(a.train.labels).tolist() == [15, 15, 5]
    np.testing.assert_array_equal(a.test.images, b.test.images)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    # Adding files one by one: each addition moves at most one file that was there, and
    # the count stays round(0.25 x n).
    rng = np.random.default_rng(1)
    before = set(f for f, _ in folder.scan(root, 0.25).files["test"])
    moved = 0
    for i in range(12):
        write_image(root / "cat" / f"new{i:02d}", rng.integers(0, 256, (28, 28), np.uint8),
                    "png")
        after = set(f for f, _ in folder.scan(root, 0.25).files["test"])
        cats = [f for f in after if f.startswith("cat")]
        assert len(cats) == round(0.25 * (21 + i))
        changed = (before - after) | {f for f in after - before if "new" not in f}
        assert len(changed) <= 1
        moved += len(changed)
        before = after
    assert moved < 12  # most additions move nothing
    assert {f for f in before if not f.startswith("cat")} == {
        f for f, _ in folder.scan(root, 0.25).files["test"] if not f.startswith("cat")}


# ---------------------------------------------------------------- what is read


def test_what_is_read_hidden_links_suffixes_subfolders(tmp_path):
    root, outside = tmp_path / "flat", tmp_path / "outside"
    write_classes(root, {"a": 2, "b": 2})
    write_classes(outside, {"class-c": 2, "lone": 1}, seed=3)
    a = root / "a"
    write_image(a / "002", np.full((28, 28), 9, np.uint8), "png-56").rename(a / "002.PnG")
    (a / "sub").mkdir()
    write_image(a / "sub" / "003", np.full((28, 28), 10, np.uint8), "png")
    write_image(a / ".hidden", np.zeros((28, 28), np.uint8), "png")  # skipped
    (a / ".git").mkdir()
    write_image(a / ".git" / "x", np.zeros((28, 28), np.uint8), "png")  # skipped
    (a / "notes.txt").write_text("ignored, counted")
    (a / "link-to-b").symlink_to(root / "b", target_is_directory=True)  # not followed
    (a / "link.png").symlink_to(outside / "lone" / "000.png")  # read as its target
    (root / "c").symlink_to(outside / "class-c", target_is_directory=True)  # a class
    (root / "README.md").write_text("ignored, counted")
    (root / ".DS_Store").write_bytes(b"skipped")

    listing = folder.scan(root, 0.4)
    assert listing.class_names == ("a", "b", "c") and listing.ignored == 3
    files = {f for split in listing.files.values() for f, _ in split}
    assert {f for f in files if f.startswith("a/")} == {
        "a/000.png", "a/001.png", "a/002.PnG", "a/link.png", "a/sub/003.png"}
    assert {f for f in files if f.startswith("c/")} == {"c/000.png", "c/001.png"}
    loaded, info = folder.load_folder(root, test_fraction=0.4, **QUIET)
    assert info.ignored == 3 and "3 other files ignored" in info.summary()
    by_path = dict(zip([f for f, _ in listing.files["train"] + listing.files["test"]],
                       np.concatenate([loaded.train.images, loaded.test.images])))
    target, _ = images.load_inputs([str(outside / "lone" / "000.png")])
    np.testing.assert_array_equal(by_path["a/link.png"], target[0])
    assert (by_path["a/002.PnG"] == 9).all()


def test_class_limits_and_names_and_no_jax():
    from lenet_dist import model  # imports JAX: the test process has it anyway

    assert (folder.MIN_CLASSES, folder.MAX_CLASSES) == (model.MIN_CLASSES, model.MAX_CLASSES)
    code = ("import sys, lenet_dist.folder\n"
            "loaded = [m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules]\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_thousand_classes_are_enough(tmp_path):
    png = (write_image(tmp_path / "one", np.zeros((28, 28), np.uint8), "png")).read_bytes()
    root = tmp_path / "many"
    for i in range(folder.MAX_CLASSES):
        (root / f"c{i:04d}").mkdir(parents=True)
        for j in range(2):
            (root / f"c{i:04d}" / f"{j}.png").write_bytes(png)
    listing = folder.scan(root, 0.5)
    assert len(listing.class_names) == 1000 and len(listing.files["test"]) == 1000
    (root / "c1000").mkdir()
    (root / "c1000" / "0.png").write_bytes(png)
    with pytest.raises(UserError) as caught:
        folder.scan(root, 0.5)
    assert "holds 1,001 class folders; a model needs 2 to 1,000" in one_line(caught)


# ---------------------------------------------------------------- bad folders and files


@pytest.mark.parametrize("layout, fraction, message", [
    ("one-class", 0.5, "holds 1 class folders; a model needs 2 to 1,000"),
    ("no-class", 0.5, "holds 0 class folders; a model needs 2 to 1,000"),
    ("empty-class", 0.5, "/b holds no images (.png, .jpg, .jpeg, .gif, .bmp)"),
    ("no-split", None, "has no train/ and test/ folders; give --test-fraction F"),
    ("only-train", None, "has train/ but no test/; give both"),
    ("only-test", None, "has test/ but no train/; give both"),
    ("split-and-fraction", 0.2, "has its own train/ and test/ splits; drop --test-fraction"),
    ("mismatch", None, "hold different classes (only in one: 'zebra')"),
    ("empty-test-class", None, "test/b holds no images"),
    ("all-test", 0.6, "puts all 1 images of class 'b' in the test split"),
    ("no-test", 0.1, "leaves the test split of"),
    ("bad-fraction", 1.5, "--test-fraction 1.5 is not between 0 and 1"),
    ("newline-name", 0.5, "has a control character (a tab or a line break) in its name"),
    ("not-utf8-name", 0.5, "has a name that is not UTF-8; rename it"),
    ("missing", None, "does not exist or is not a directory"),
])
def test_bad_folders_are_one_line(tmp_path, layout, fraction, message):
    root = tmp_path / layout
    counts = {"one-class": {"only": 2}, "empty-class": {"a": 2, "b": 0},
              "all-test": {"a": 4, "b": 1}, "no-test": {"a": 2, "b": 2},
              "newline-name": {"a": 2, "b\nc": 2}}
    if layout in counts:
        write_classes(root, counts[layout])
    elif layout == "no-class":
        (root / "loose").parent.mkdir(parents=True)
        write_image(root / "loose", np.zeros((28, 28), np.uint8), "png")
    elif layout == "not-utf8-name":
        write_classes(root, {"a": 2})
        write_classes(Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9")), {"": 2})
    elif layout in ("no-split", "bad-fraction"):
        write_classes(root, {"a": 2, "b": 2})
    elif layout.startswith("only-"):
        write_classes(root / layout[5:], {"a": 2, "b": 2})
    elif layout != "missing":
        write_classes(root / "train", {"a": 2, "b": 2, "zebra": 2}
                      if layout == "mismatch" else {"a": 2, "b": 2})
        write_classes(root / "test", {"a": 2, "b": 0 if layout == "empty-test-class" else 2})
    with pytest.raises(UserError) as caught:
        folder.load_folder(root, test_fraction=fraction, **QUIET)
    assert message in one_line(caught)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def _huge_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[16:20] = (100_000).to_bytes(4, "big")  # IHDR width
    path.write_bytes(bytes(raw))


def _oversized(path: Path) -> None:
    with open(path, "r+b") as f:  # sparse: fast to write, 64 MiB + 1 to read
        f.truncate(images.MAX_FILE_BYTES + 1)


@pytest.mark.parametrize("damage, message", [
    (_truncated, "cannot be decoded as PNG"),
    (lambda p: p.write_bytes(b"hello, not an image"), "is not a PNG, JPEG, GIF or BMP image"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (_huge_header, "is 100000x28 pixels; the limit is 8192 per side"),
    (_oversized, "is over 64 MiB; images that large are refused"),
    (lambda p: (p.unlink(), os.mkfifo(p)), "is a FIFO, not a regular file"),
    (lambda p: (p.unlink(), p.symlink_to(p.parent / "gone.png")), "does not exist"),
    (lambda p: (p.unlink(), make_special(p.parent, "socket", ".png").rename(p)),
     "is a socket, not a regular file"),
], ids=["truncated", "text", "empty", "huge-header", "oversized", "fifo", "dangling-link",
        "socket"])
def test_a_bad_file_is_named_or_skipped(tmp_path, damage, message):
    root = write_classes(tmp_path / "bad", {"a": 3, "b": 3})
    bad = root / "b" / "001.png"
    damage(bad)
    error = returns_within(30, lambda: folder.load_folder(root, test_fraction=0.34, **QUIET))
    assert isinstance(error, UserError), error  # a FIFO must not block the read
    assert "\n" not in str(error) and str(error).startswith(f"{bad} ")
    assert message in str(error)
    notes = []
    loaded, info = folder.load_folder(root, test_fraction=0.34, skip_bad_files=True,
                                      progress=False, log=notes.append)
    assert info.skipped == ("b/001.png",) and len(loaded.train) + len(loaded.test) == 5
    assert "1 bad files skipped (b/001.png)" in info.summary()
    assert len(notes) == 1 and message in notes[0] and "\n" not in notes[0]
    # the skip is cached with the arrays; without the flag it is refused again
    assert folder.load_folder(root, test_fraction=0.34, skip_bad_files=True,
                              **QUIET)[1].skipped == ("b/001.png",)
    with pytest.raises(UserError):
        folder.load_folder(root, test_fraction=0.34, **QUIET)


def test_a_split_whose_every_file_is_bad_is_refused(tmp_path):
    root = tmp_path / "splits"
    write_classes(root / "train", {"a": 2, "b": 2})
    write_classes(root / "test", {"a": 1, "b": 1})
    for p in (root / "test").rglob("*.png"):
        p.write_bytes(b"not an image")
    with pytest.raises(UserError) as caught:
        folder.load_folder(root, skip_bad_files=True, **QUIET)
    assert "no image of the test split" in one_line(caught)


def test_skip_bad_files_refuses_a_class_left_with_no_training_image(tmp_path):
    """Was: trained on, with 'b' an output no image taught, and exit 0."""
    root = tmp_path / "splits"
    write_classes(root / "train", {"a": 2, "b": 2})
    write_classes(root / "test", {"a": 1, "b": 1})
    for p in (root / "train" / "b").iterdir():
        p.write_bytes(b"not an image")
    for _ in range(2):  # decoded, then again from the cache the first load wrote
        with pytest.raises(UserError) as caught:
            folder.load_folder(root, skip_bad_files=True, **QUIET)
        assert one_line(caught).startswith(
            "class 'b' has no training image left: all 2 of its training files were skipped")


@pytest.mark.parametrize("layout, link, target, other", [
    ("splits", "train/c", "train", "train/a"),  # the split folder: it holds a and b
    ("splits", "train/c", "train/a", "train/a"),  # another class
    ("splits", "train/c", "test/c", "test/c"),  # the same images in both splits
    ("flat", "c", ".", "a"),  # the dataset's own root
    ("flat", "c", "b", "b"),
])
def test_a_class_folder_linked_to_another_or_to_its_split_is_refused(
        tmp_path, layout, link, target, other):
    """Was: a class linked to its split folder read every other class's images under
    its own label too; one linked to another class read that class's under two."""
    root = tmp_path / layout
    for top in (["train", "test"] if layout == "splits" else ["."]):
        write_classes(root / top, {"a": 2, "b": 2, "c": 2})
    shutil.rmtree(root / link)
    (root / link).symlink_to((root / target).resolve(), target_is_directory=True)
    fraction = 0.5 if layout == "flat" else None
    with pytest.raises(UserError) as caught:
        folder.scan(root, fraction)
    message = one_line(caught)
    assert str(root / link) in message and str(root / other) in message
    assert "remove the link" in message


def test_a_folder_path_of_an_unknown_user_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """Was: "internal error: RuntimeError: Could not determine home directory", exit 1."""
    spec = "folder:~no-such-user-lenet/x"
    line = one_line_error(capsys, ["train", "--dataset", spec, "--devices", "1",
                                   "--workdir", str(tmp_path / "w")])
    assert line == (f"error: --dataset {spec}: cannot expand ~no-such-user-lenet (no such "
                    "user, or no home directory); give the path without ~")
    root = write_classes(tmp_path / "ok", {"a": 2, "b": 2})
    monkeypatch.setenv(folder.CACHE_ENV, "~no-such-user-lenet/cache")
    with pytest.raises(UserError) as caught:
        folder.load_folder(root, test_fraction=0.5, **QUIET)
    assert one_line(caught).startswith(f"${folder.CACHE_ENV}=~no-such-user-lenet/cache: "
                                       "cannot expand")


# ---------------------------------------------------------------- the CLI, end to end


@pytest.mark.slow
def test_three_classes_train_and_predict_with_their_names(tmp_path, capsys):
    root = write_classes(tmp_path / "shapes", {"circle": 24, "square": 24, "triangle": 24})
    work = tmp_path / "run"
    args = ["--dataset", f"folder:{root}", "--test-fraction", "0.25", "--devices", "1",
            "--batch-size", "16", "--workdir", str(work), "--no-progress", "--no-tensorboard"]
    assert main(["train", *args, "--epochs", "1"]) == 0
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
    assert main(["train", *args, "--epochs", "2"]) == 0
    assert "read from the cache" in capsys.readouterr().out
    # a class more: the run in the workdir is another model, refused in one line
    write_classes(root, {"star": 8})
    assert main(["train", *args, "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds a run on 3 classes (circle, square, triangle), the data has 4" in err


def test_config_names_the_folder(tmp_path):
    config = Config(dataset=f"folder:{tmp_path}", test_fraction=0.2)
    assert config.validate() is config
    with pytest.raises(UserError, match="skip_bad_files is for folder: datasets"):
        Config(skip_bad_files=True).validate()


def test_folder_names_replace_the_slash():
    assert folder_name("T-shirt/top") == "T-shirt_top" and folder_name("Bag") == "Bag"


@pytest.mark.slow
def test_training_on_the_folder_equals_training_on_the_idx_subset(fashion, tmp_path):
    """The same images as lossless files or as IDX arrays (in the folder's order, with
    its labels): the same parameters after an epoch on 8 devices."""
    from lenet_dist.training import train
    from tests.conftest import assert_same_params, small
    from tests.folders import LOSSLESS

    src = {"train": (fashion.train.images[:640], fashion.train.labels[:640]),
           "test": (fashion.test.images[:100], fashion.test.labels[:100])}
    written = write_folder(tmp_path / "lossless", src, FASHION_NAMES, formats=LOSSLESS)
    config = small(tmp_path / "a", dataset=f"folder:{written.root}", epochs=1,
                   checkpoint=False)
    subset = {split: data_lib.Split(images[written.splits[split].index],
                                    written.splits[split].labels)
              for split, (images, _) in src.items()}
    from_idx = data_lib.Dataset("fashion_mnist", "idx subset", subset["train"],
                                subset["test"], written.class_names)
    quiet = dict(log=lambda _: None)
    a = train(config, **quiet)  # loads the folder itself, as `lenet-dist train` does
    b = train(config.replace(dataset="fashion_mnist", workdir=str(tmp_path / "b")),
              dataset=from_idx, **quiet)
    assert_same_params(a.state.params, b.state.params)
    assert a.history[-1]["test_accuracy"] == b.history[-1]["test_accuracy"]
