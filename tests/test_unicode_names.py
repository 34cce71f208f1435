"""Class names outside Latin-1 (a folder's names are any UTF-8): trained with TensorBoard
on, predicted, reported. Was: the TensorBoard image grid drew captions with Pillow's
Latin-1 bitmap font, so epoch 1 ended in "'latin-1' codec can't encode" (exit 2, no
checkpoint of that epoch; a raw UnicodeEncodeError from the Python API)."""

import json

import numpy as np
import pytest

from lenet_dist import api, folder
from lenet_dist.cli import main
from lenet_dist.config import Config
from lenet_dist.tboard import read_board
from tests.folders import write_folder

CYRILLIC = ("кошка", "собака", "птица")
# CJK, a decomposed "café" with a zero-width space and a right-to-left mark, Hebrew.
HARDER = ("猫", "cafe\u0301\u200b\u200f", "שלום")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "cache"))


def write_classes(root, names, n_train=8, n_test=4, seed=0):
    """A train/ and test/ folder of `names`, `n_*` PNGs each, told apart by brightness."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n * len(names)) % len(names)
        images = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
        images += (labels * 90).astype(np.uint8)[:, None, None]
        return images, labels

    return write_folder(root, {"train": split(n_train), "test": split(n_test)}, names,
                        formats=("png",))


def checkpoint_steps(work) -> list[int]:
    return sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_cyrillic_classes_train_with_tensorboard_predict_and_report(tmp_path, capsys):
    written = write_classes(tmp_path / "животные", CYRILLIC)
    work = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{written.root}", "--devices", "1",
                 "--batch-size", "8", "--epochs", "1", "--workdir", str(work),
                 "--no-progress"]) == 0  # was: exit 2 after epoch 1
    capsys.readouterr()
    assert checkpoint_steps(work) == [3]  # 24 images, batch 8: epoch 1's checkpoint
    meta = json.loads((work / "checkpoints" / "3" / "meta" / "metadata").read_text("utf-8"))
    assert meta["class_names"] == sorted(CYRILLIC)
    [(step, png)] = read_board(work / "tb").images["test/predictions"]
    assert step == 3 and png.startswith(b"\x89PNG")

    image = written.splits["test"].paths[0]
    assert main(["predict", "--workdir", str(work), "--top", "3", str(image)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CYRILLIC), out

    assert main(["report", str(work), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert all(f"\n| {name} | " in md for name in CYRILLIC)  # the per-class table


@pytest.mark.slow
def test_the_python_api_trains_any_name_a_folder_holds(tmp_path):
    written = write_classes(tmp_path / "names", HARDER)
    config = Config(dataset=f"folder:{written.root}", devices=1, batch_size=8, epochs=1,
                    workdir=str(tmp_path / "run"))
    result = api.train(config, progress=False)  # was: a raw UnicodeEncodeError
    assert len(result.history) == 1
    assert checkpoint_steps(tmp_path / "run") == [3]
    model = api.load(tmp_path / "run")
    assert model.class_names == tuple(sorted(HARDER))
    assert read_board(tmp_path / "run" / "tb").images["test/predictions"]
