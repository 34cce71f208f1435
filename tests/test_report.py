import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from etils import epath
from PIL import Image

from lenet_dist import figures as figures_lib
from lenet_dist import report, safefs
from lenet_dist.errors import UserError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CONFIG = {"dataset": "fashion_mnist", "batch_size": 128, "epochs": 3, "learning_rate": 0.9,
          "optimizer": "sgd", "momentum": 0.9, "seed": 0, "train_limit": None}


def history(epochs: int, final_accuracy: float = 0.8) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        t = e / epochs
        rows.append({"epoch": e, "step": 469 * e, "train_loss": 2.3 - 1.8 * t,
                     "train_accuracy": 0.1 + (final_accuracy + 0.02 - 0.1) * t,
                     "test_loss": 2.35 - 1.8 * t,
                     "test_accuracy": 0.1 + (final_accuracy - 0.1) * t,
                     "images_per_sec": 20_000.0 + e, "train_seconds": 3.0,
                     "epoch_seconds": 3.5, "devices": 8, "processes": 1, "batch_size": 128,
                     "time": 1.7e9 + e})
    return rows


def predictions(n: int = 400, wrong: float = 0.15, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    preds = np.where(rng.random(n) < wrong, rng.integers(0, 10, n), labels).astype(np.int32)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    images[:, 8:20, 8:20] = 255  # a bright square: every tile has structure
    return labels, preds, images


def png(path, min_size=(300, 200)) -> np.ndarray:
    """The decoded image as float RGB, after checking it is a real, non-blank PNG."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
        rgb = np.asarray(im.convert("RGB"), float)
    assert rgb.std() > 10, "blank image"
    assert (rgb.mean(axis=2) < 250).mean() > 0.01, "almost all white"
    return rgb


def colored(rgb: np.ndarray) -> float:
    """Fraction of saturated pixels: plotted lines and heat-map cells, not axes or text."""
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


def test_write_report_writes_every_png_and_page(tmp_path):
    labels, preds, images = predictions()
    hist = history(5, final_accuracy=0.8123)
    path = report.write_report(tmp_path / "report", "seed", hist, CONFIG, labels, preds,
                               images, CLASSES, extra={"parameters": 61_706, "preset": "seed"})
    out = tmp_path / "report"
    assert os.fspath(path) == os.fspath(out / "report.md")
    assert colored(png(out / "curves.png")) > 0.002
    assert colored(png(out / "confusion.png", (500, 500))) > 0.05
    png(out / "misclassified.png", (500, 500))

    md = (out / "report.md").read_text()
    for name in ("curves.png", "confusion.png", "misclassified.png"):
        assert f"]({name})" in md  # relative links: the directory can move
    assert str(tmp_path) not in md
    assert "Final test accuracy | 81.23% (epoch 5)" in md
    correct = int((labels == preds).sum())
    assert f"{correct / len(labels):.2%} ({correct:,} of {len(labels):,}" in md
    assert "| Parameters | 61,706 |" in md and "| preset | seed |" in md
    assert "| learning_rate | 0.9 |" in md and "| train_limit | n/a |" in md
    assert "Throughput | 20,003 images/s" in md
    assert "Total train time | 15.0 s (17.5 s with evaluation)" in md
    epoch_rows = [line for line in md.splitlines() if line.startswith("| 4 | 1,876 |")]
    assert len(epoch_rows) == 1 and "| 66.98% |" in epoch_rows[0]
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporary files
    assert "Where the time went" not in md  # no ledger given


def test_the_report_shows_where_each_attempt_spent_its_time(tmp_path):
    """The goodput ledger's attempts, one row each; joining and lost only when some."""
    from lenet_dist import ledger

    def attempt(outcome, first, last, training, **more):
        seconds = {k: 0.0 for k in ledger.KEYS}
        seconds.update({"start-up": 2.0, "compiling": 1.5, "training": training,
                        "evaluating": 3.0, "saving": 0.5}, **more)
        return {"outcome": outcome, "steps": {"from": first, "to": last},
                "wall_seconds": sum(seconds.values()), "seconds": seconds}

    attempts = ledger.with_lost([attempt("preempted", 0, 20, 40.0),
                                 attempt("done", 12, 30, 30.0)])
    labels, preds, images = predictions()
    report.write_report(tmp_path, "run", history(3), CONFIG, labels, preds, images, CLASSES,
                        attempts=attempts)
    md = (tmp_path / "report.md").read_text()
    header = [line for line in md.splitlines() if line.startswith("| attempt |")]
    assert header == ["| attempt | outcome | steps | wall s | start-up s | data s | "
                      "restore s | compile s | train s | eval s | save s | finish s | "
                      "lost s | other s |"], md
    assert "| 1 | preempted | 0..20 | 47.0 | 2.0 | 0.0 | 0.0 | 1.5 | 24.0 | 3.0 | 0.5 | " \
           "0.0 | 16.0 | 0.0 |" in md  # steps 12..20 trained again: 8/20 of 40 s lost
    assert "| 2 | done | 12..30 | 37.0 |" in md and "join s" not in md


def test_write_comparison_two_runs(tmp_path):
    runs = {
        "seed": {"history": history(4, 0.78), "config": CONFIG,
                 "final": {"parameters": 61_706, "wall_seconds": 95.0}},
        "adam | fast": {"history": history(6, 0.89),
                        "config": {**CONFIG, "optimizer": "adam", "learning_rate": 0.003},
                        "final": {"test_accuracy": 0.8912}},
    }
    path = report.write_comparison(tmp_path, runs)
    assert os.fspath(path) == os.fspath(tmp_path / "compare.md")
    assert colored(png(tmp_path / "compare.png")) > 0.002
    md = path.read_text()
    assert "](compare.png)" in md
    assert "| seed | sgd lr 0.9, batch 128, 3 epochs | 78.00% | 61,706 | 1 min 35 s |" in md
    # The best run is marked; a '|' in a name does not break the table.
    assert "| adam \\| fast | adam lr 0.003, batch 128, 3 epochs | **89.12%** | n/a | 21.0 s |" \
        in md


def test_comparison_without_parameters_has_no_parameters_column(tmp_path):
    runs = {"a": {"history": history(2), "config": {}, "final": {}},
            "b": {"history": [], "config": {}, "final": {}}}
    md = report.write_comparison(tmp_path, runs).read_text()
    assert "| run | settings | final test accuracy | wall time |" in md
    assert "| b | n/a | n/a | n/a |" in md
    png(tmp_path / "compare.png")


def test_no_misclassified_images(tmp_path):
    labels, _, images = predictions(50)
    figures_lib.plot_misclassified(images, labels, labels, CLASSES, tmp_path / "m.png")
    png(tmp_path / "m.png", (300, 100))
    path = report.write_report(tmp_path / "r", "perfect", history(2), CONFIG, labels, labels,
                               images, CLASSES)
    md = path.read_text()
    assert "0 of 50 test images are misclassified" in md
    assert "100.00% (50 of 50 test images)" in md


def test_misclassified_grid_shows_at_most_n_and_accepts_squeezed_images(tmp_path):
    labels, preds, images = predictions(200, wrong=0.9)
    figures_lib.plot_misclassified(images[..., 0], labels, preds, CLASSES, tmp_path / "m.png", n=4)
    rgb = png(tmp_path / "m.png", (300, 200))
    assert rgb.shape[0] < 800  # 2x2 tiles, not 6x6
    with pytest.raises(ValueError, match="n must be"):
        figures_lib.plot_misclassified(images, labels, preds, CLASSES, tmp_path / "x.png", n=0)


def test_one_epoch_history(tmp_path):
    labels, preds, images = predictions(100)
    path = report.write_report(tmp_path, "short", history(1), CONFIG, labels, preds, images,
                               CLASSES)
    assert colored(png(tmp_path / "curves.png")) > 0.0005  # the epoch's markers
    md = path.read_text()
    assert "(epoch 1)" in md and "Best test accuracy" not in md


def test_non_finite_and_missing_values_do_not_crash(tmp_path):
    hist = history(6)
    hist[3].update(train_loss=math.nan, test_loss=math.inf, test_accuracy=math.nan)
    hist[4]["test_loss"] = 1e6  # blowing up: the loss axis turns logarithmic
    del hist[2]["train_accuracy"]
    hist[1]["images_per_sec"] = None
    hist[5]["lr"] = 0.01
    labels, preds, images = predictions(100)
    path = report.write_report(tmp_path, "diverged", hist, CONFIG, labels, preds, images,
                               CLASSES)
    assert colored(png(tmp_path / "curves.png")) > 0.002
    md = path.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 4 | 1,876 |"))
    assert "| nan |" in row and "| inf |" in row
    assert "| lr |" in md  # the column appears when any epoch has it


def test_all_nan_and_empty_histories(tmp_path):
    nan_row = {"epoch": 1, "train_loss": math.nan, "test_loss": math.nan,
               "train_accuracy": math.nan, "test_accuracy": math.nan}
    figures_lib.plot_curves({"nan": [nan_row]}, tmp_path / "nan.png")
    png(tmp_path / "nan.png")
    labels, preds, images = predictions(30)
    md = report.write_report(tmp_path, "empty", [], {}, labels, preds, images,
                             CLASSES).read_text()
    assert "no epochs recorded" in md and "No epochs recorded." in md


def test_confusion_matrix_counts():
    labels = np.array([0, 0, 1, 2, 2, 2])
    preds = np.array([0, 1, 1, 2, 0, 2])
    counts = figures_lib.confusion_matrix(labels, preds, 3)
    np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_bad_predictions_are_refused(tmp_path):
    labels, preds, images = predictions(20)
    with pytest.raises(ValueError, match="20 labels but 19 predictions"):
        figures_lib.plot_confusion(labels, preds[:19], CLASSES, tmp_path / "c.png")
    with pytest.raises(ValueError, match="class ids in 0..9"):
        figures_lib.plot_confusion(labels, preds + 10, CLASSES, tmp_path / "c.png")
    with pytest.raises(ValueError, match="integer class ids"):
        figures_lib.plot_confusion(labels, preds.astype(float), CLASSES, tmp_path / "c.png")
    with pytest.raises(ValueError, match="images must be"):
        figures_lib.plot_misclassified(images[:5], labels, preds, CLASSES, tmp_path / "m.png")


def test_a_link_planted_at_an_output_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "curves.png").symlink_to(target)
    with pytest.raises(safefs.UnsafePath):
        figures_lib.plot_curves({"a": history(2)}, tmp_path / "curves.png")
    assert target.read_text() == "keep"


def test_imports_no_jax_flax_or_tensorflow():
    code = ("import sys, lenet_dist.report; "
            "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def run_dir(tmp_path):
    """A workdir as training leaves it (only the names matter here)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "tb").mkdir()
    for name in ("metrics.jsonl", "config.json", "lock"):
        (run / name).write_text("{}\n")
    return run


@pytest.mark.parametrize("out, inside, entry", [
    ("checkpoints", False, "checkpoints/"),
    ("checkpoints/4", True, "checkpoints/"),
    ("checkpoints/new/report", True, "checkpoints/"),
    ("metrics.jsonl", False, "metrics.jsonl"),
    ("config.json", False, "config.json"),
    ("lock", False, "lock"),
    ("tb", False, "tb/"),
    ("tb/report", True, "tb/"),
])
def test_out_into_a_runs_own_entries_is_refused(run_dir, out, inside, entry):
    given = run_dir / out
    message = (f"--out {given} is {'inside ' if inside else ''}the run {run_dir}'s {entry}, "
               f"which only training writes; choose another directory, e.g. {run_dir}/report")
    with pytest.raises(UserError) as caught:
        report.check_out_dir(given, [run_dir])
    assert str(caught.value) == message
    # the same without being told the run: its checkpoints/ and config.json mark it
    with pytest.raises(UserError):
        report.check_out_dir(given)


def test_write_report_into_checkpoints_writes_nothing(run_dir):
    labels, preds, images = predictions(50)
    for write in (
        lambda out: report.write_report(out, "run", history(2), CONFIG, labels, preds,
                                         images, CLASSES),
        lambda out: report.write_comparison(out, {"a": {"history": history(2)},
                                                  "b": {"history": history(3)}}),
    ):
        with pytest.raises(UserError, match="checkpoints/, which only training writes"):
            write(run_dir / "checkpoints")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["4"]


def test_out_through_a_link_or_dotdot_is_refused(run_dir, tmp_path):
    (tmp_path / "link").symlink_to(run_dir / "checkpoints")
    for out in (tmp_path / "link", tmp_path / "link" / "r",
                tmp_path / "elsewhere" / ".." / "run" / "checkpoints"):
        with pytest.raises(UserError, match=f"the run {run_dir}'s checkpoints/"):
            report.check_out_dir(out, [tmp_path / "other"])


@pytest.mark.parametrize("out", ["run/report", "run", "run-report", "run/checkpoints-report"])
def test_out_beside_a_runs_files_is_fine(run_dir, tmp_path, out):
    report.check_out_dir(tmp_path / out, [run_dir])


def test_out_on_an_object_store_is_checked_against_the_runs_named():
    with pytest.raises(UserError, match="is inside the run gs://b/w's checkpoints/"):
        report.check_out_dir("gs://b/w/checkpoints/9", ["gs://b//w/"])
    report.check_out_dir("gs://b/w/report", ["gs://b/w"])
    report.check_out_dir("gs://b/w/checkpoints", ["gs://b/other"])  # no listing per level


def test_run_entries_are_the_names_training_uses():
    from lenet_dist import rundir

    assert set(report.RUN_ENTRIES) == {rundir.CHECKPOINT_DIR, rundir.METRICS_FILE,
                                      rundir.CONFIG_FILE, rundir.TB_DIR, rundir.LOCK_FILE}


def test_report_out_into_checkpoints_is_one_line_before_any_work(run_dir):
    """The CLI refuses before restoring a checkpoint (the fake run has none)."""
    out = subprocess.run([sys.executable, "-m", "lenet_dist", "report", "--workdir",
                          str(run_dir), "--out", str(run_dir / "checkpoints")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: --out {run_dir}/checkpoints is the run {run_dir}'s checkpoints/, which only "
        f"training writes; choose another directory, e.g. {run_dir}/report"]


def test_a_comparison_names_each_runs_network():
    """Config's field is `network`; runs written before it was renamed say `recipe`, and
    before that `preset`."""
    assert report.describe_config({"network": "modern", "optimizer": "adamw",
                                   "learning_rate": 0.003, "batch_size": 128}
                                  ).startswith("network modern, adamw lr 0.003")
    # config.json before 2026-12-08 named the network "recipe"; before that, "preset"
    assert report.describe_config({"recipe": "modern"}).startswith("network modern")
    assert report.describe_config({"preset": "d2l"}).startswith("network d2l")
    assert "network" not in report.describe_config({"optimizer": "sgd"})


def tiny_run(directory, config, accuracies):
    """A run directory as train leaves it, but the checkpoints: config.json, and
    metrics.jsonl written through EpochRecord."""
    from lenet_dist import rundir
    from lenet_dist.settings_io import write_config
    from lenet_dist.records import EpochRecord

    directory.mkdir()
    write_config(directory, config.replace(workdir=str(directory)))
    rundir.write_metrics(epath.Path(directory), [EpochRecord(
        epoch=e, step=10 * e, train_loss=1.0 / e, train_accuracy=a, test_loss=1.1 / e,
        test_accuracy=a, images_per_sec=1000.0, train_seconds=2.0, eval_seconds=0.5,
        epoch_seconds=2.5, devices=1, processes=1, batch_size=config.batch_size,
        time=1.7e9 + e) for e, a in enumerate(accuracies, 1)])
    return directory


def test_a_comparison_of_a_d2l_and_a_modern_run_names_both_recipes(tmp_path):
    """Each run read back as `report --compare` reads it: its config as Config writes
    it, its history as EpochRecords (metrics.jsonl)."""
    import json

    from lenet_dist import rundir
    from lenet_dist.config import PRESETS
    from lenet_dist.rundir import CONFIG_FILE

    runs = {}
    for name, accuracies in (("d2l", [0.5, 0.72]), ("modern", [0.8, 0.9])):
        work = tiny_run(tmp_path / name, PRESETS[name], accuracies)
        runs[name] = {"config": json.loads((work / CONFIG_FILE).read_text()),
                      "history": rundir.read_metrics(work / rundir.METRICS_FILE)}
    md = report.write_comparison(tmp_path / "compare", runs).read_text()
    assert "| d2l | network d2l, sgd lr 0.1, batch 128, 10 epochs | 72.00% |" in md
    assert "| modern | network modern, adamw lr 0.003, batch 128, 10 epochs | **90.00%** |" in md


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report saves, by file name, as well as its PNG."""
    saved = {}
    save = figures_lib._save

    def keep(fig, path):
        saved[epath.Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(figures_lib, "_save", keep)
    return saved


def lines_of(fig) -> dict[str, object]:
    return {line.get_label(): line for ax in fig.axes for line in ax.lines}


def test_curves_draw_the_validation_split_early_stopping_used(tmp_path, figures):
    hist = history(4)
    for row in hist:  # --validation N --early-stop K: each epoch has a validation figure
        row["validation_loss"] = row["test_loss"] + 0.05
        row["validation_accuracy"] = row["test_accuracy"] - 0.02
    labels, preds, images = predictions()
    report.write_report(tmp_path / "r", "early", hist, CONFIG, labels, preds, images, CLASSES)
    lines = lines_of(figures["curves.png"])
    for metric in ("loss", "accuracy"):  # was: train and test only
        drawn = lines[f"validation {metric}"]
        assert list(drawn.get_ydata()) == [row[f"validation_{metric}"] for row in hist]
        assert drawn.get_linestyle() != lines[f"test {metric}"].get_linestyle()
    report.write_comparison(tmp_path / "c", {"a": {"history": hist}, "b": {"history": history(4)}})
    labels = [h.get_label() for h in figures["compare.png"].legends[0].legend_handles]
    assert "validation" in labels


def test_a_run_without_validation_has_no_validation_curve():
    fig = figures_lib.curves_figure({"plain": history(3)})
    assert not any(label.startswith("validation") for label in lines_of(fig))


def test_misclassified_images_of_a_folder_are_named_by_file(tmp_path, figures):
    labels, preds, images = predictions(n=60)
    files = [f"{CLASSES[label].replace('/', '_')}/{i:04d}.png" for i, label in enumerate(labels)]
    report.write_report(tmp_path / "r", "folder", history(2), CONFIG, labels, preds, images,
                        CLASSES, image_names=files)
    wrong = np.flatnonzero(labels != preds)
    titles = [ax.get_title() for ax in figures["misclassified.png"].axes if ax.get_visible()]
    assert titles == [files[i] for i in wrong[:36]]  # was: "#21", an index
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    i = wrong[0]
    assert f"| {files[i]} | {CLASSES[labels[i]]} | {CLASSES[preds[i]]} |" in md
    # Without names (an IDX dataset), the index as before.
    fig = figures_lib.misclassified_figure(images, labels, preds, CLASSES)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()][0] == f"#{wrong[0]}"


UNICODE_CLASSES = ("кошка", "猫", "cafe\u0301\u200b\u200f", "שלום", "собака", "\U0010fffd")


def test_a_report_of_class_names_outside_latin_1(tmp_path, figures):
    labels, preds, images = predictions(n=120)
    labels, preds = labels % 6, preds % 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # matplotlib warns of each glyph its font lacks
        path = report.write_report(tmp_path / "r", "юникод", history(2), CONFIG, labels,
                                   preds, images, UNICODE_CLASSES)
    assert [str(w.message) for w in caught
            if "missing from font" in str(w.message)] == []  # was: "Glyph 29483 ... missing"
    md = path.read_text(encoding="utf-8")
    for name in UNICODE_CLASSES:  # each class by its own name, in text
        assert f"\n| {name} | " in md
    ticks = [t.get_text() for t in figures["confusion.png"].axes[0].get_yticklabels()]
    assert ticks[0] == "кошка" and ticks[2] == "café" and ticks[3] == "שלום"
    assert ticks[5] == "\\U0010fffd"  # no font has it: written, not a box
    assert ticks[1] in ("猫", "\\u732b")  # a CJK font where one is installed
    assert figures["curves.png"]._suptitle.get_text() == "Learning curves: юникод"


@pytest.mark.slow
def test_report_of_a_trained_folder_run_names_its_misclassified_files(tmp_path, monkeypatch,
                                                                       capsys):
    """`lenet-dist report` of a folder: run names each wrong test image by its file,
    relative to the test folder. Was: "#1", an index, in the figure, and no file names in
    report.md. Each test image is in both classes' folders with the same pixels, so one of
    each pair is wrong whatever the model learned."""
    from lenet_dist import folder
    from lenet_dist.cli import main
    from tests.folders import write_image

    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for label, name in enumerate(("dark", "light")):
        for split in ("train", "test"):
            (root / split / name).mkdir(parents=True)
        for i in range(8):
            write_image(root / "train" / name / f"t{i}",
                        rng.integers(0, 60, (28, 28), np.uint8) + np.uint8(150 * label), "png")
    twins = [rng.integers(0, 256, (28, 28), np.uint8) for _ in range(3)]
    for name in ("dark", "light"):
        for i, pixels in enumerate(twins):
            write_image(root / "test" / name / f"twin{i}", pixels, "png")
    work = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--devices", "1", "--epochs", "1",
                 "--batch-size", "8", "--workdir", str(work), "--no-progress",
                 "--no-tensorboard"]) == 0
    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "report-cache"))
    for decoded in (True, False):  # then from the cache, which rebuilds the names
        if not decoded:
            assert len(list((tmp_path / "report-cache").glob("*.npz"))) == 1
            monkeypatch.setattr(folder, "_decode_all", None)  # a decode would fail
        assert main(["report", str(work), "--out", str(tmp_path / "report")]) == 0
        capsys.readouterr()
        md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
        rows = [line for line in md.splitlines()
                if line.startswith("| dark/twin") or line.startswith("| light/twin")]
        # one of each twin is wrong: its row names the file, its true and predicted class
        assert len(rows) == 3, md
        for i, row in enumerate(sorted(rows, key=lambda r: r.split("/twin")[1])):
            true = row.split("/", 1)[0][2:]
            other = "light" if true == "dark" else "dark"
            assert row == f"| {true}/twin{i}.png | {true} | {other} |"
        assert "| image | true | predicted |" in md and "test/" not in md
        assert "| #" not in md
        assert "## Where the time went" in md and "| 1 | done | 0..2 |" in md  # ledger.json
