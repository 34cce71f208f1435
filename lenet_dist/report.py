"""Run reports: learning curves, a confusion matrix and misclassified test images as
PNGs, and a Markdown page that embeds them, for one run or several side by side.

numpy and matplotlib only, through matplotlib's object API (`Figure` on an Agg canvas,
no pyplot): no global figure state and no display, so a report renders on a headless
host and never imports JAX; the caller computes the predictions. Files are written
with `safefs.write_atomic`, like everything else in a workdir.
"""

from __future__ import annotations

import functools
import io
import math
import os
import posixpath
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib import colormaps, font_manager, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lenet_dist import gcs, ledger, safefs
from lenet_dist.errors import UserError
from lenet_dist.history import chosen_on
from lenet_dist.records import EpochRecord
from lenet_dist.rundir import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, TB_DIR
from lenet_dist.tboard import drawable_name, escaped

CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
MISCLASSIFIED_PNG = "misclassified.png"
REPORT_MD = "report.md"
COMPARE_PNG = "compare.png"
COMPARE_MD = "compare.md"

# What training keeps in a workdir (rundir's names): a report written into or over one
# of these would mix with (or replace) the run's own files.
RUN_ENTRIES = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, TB_DIR, safefs.LOCK_FILE)
# What makes a directory a run's workdir, for a run that --out names but the report
# was not asked about.
RUN_MARKERS = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE)
# A history is EpochRecords (train's, metrics.jsonl's) or their JSON objects (checkpoint
# metadata; hand-written or older ones may lack figures, or carry others).
History = Sequence[EpochRecord | Mapping[str, Any]]

DPI = 110
# Panels of the learning-curve figure: (metric suffix in metrics.jsonl, axis label).
PANELS = (("loss", "loss"), ("accuracy", "accuracy"))
# The split is told apart by line style, so colour is free to tell runs apart. Validation
# is drawn when a run has it (--validation N, which --early-stop selects on).
SPLIT_STYLES = {"train": "-", "validation": ":", "test": "--"}
# One run: d2l's colours for train (blue) and test (green); validation orange.
SINGLE_RUN_COLORS = {"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"}
RUN_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
              "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
# A loss this many times its median (a run blowing up before it turns NaN) would flatten
# every other epoch against the axis; a log scale keeps them readable.
LOG_SCALE_RATIO = 20.0
# Misclassified test images the report shows (a 6 x 6 grid).
MISCLASSIFIED_SHOWN = 36


# ------------------------------------------------------------------- figures


def plot_curves(runs: Mapping[str, History], path: str | epath.Path,
                title: str | None = None) -> epath.Path:
    """curves_figure as a PNG at `path`."""
    return _save(curves_figure(runs, title), path)


def curves_figure(runs: Mapping[str, History], title: str | None = None) -> Figure:
    """Loss and accuracy per epoch, train solid, validation dotted and test dashed, as in
    d2l's LeNet plot but on two panels, since a loss of 2.3 next to an accuracy of 0.9 on
    one axis hides the accuracy's changes. Several runs: one colour each, named in a
    shared legend. Missing values leave gaps; non-finite ones (a diverged epoch) leave
    gaps shaded red."""
    names = list(runs)
    if not names:
        raise ValueError("plot_curves needs at least one run")
    runs = {name: json_rows(history) for name, history in runs.items()}
    shown, font = drawn_texts(names)
    shown = dict(zip(names, shown))
    fig = _figure((11.0, 4.6 if len(names) <= 1 else 5.0))
    axes = fig.subplots(1, 2)
    epochs = {float(e) for name in names for e in _series(runs[name], "epoch")[0]}
    plotted, splits = set(), set()
    for (metric, label), ax in zip(PANELS, axes):
        values, broken = [], set()
        for i, name in enumerate(names):
            for split, style in SPLIT_STYLES.items():
                x, y = _series(runs[name], f"{split}_{metric}")
                broken.update(x[_not_finite(runs[name], f"{split}_{metric}")].tolist())
                if not np.isfinite(y).any():
                    continue
                plotted.add(name)
                splits.add(split)
                values.append(y[np.isfinite(y)])
                color = (SINGLE_RUN_COLORS[split] if len(names) == 1
                         else RUN_COLORS[i % len(RUN_COLORS)])
                ax.plot(x, y, style, color=color, marker="o" if len(x) <= 40 else None,
                        markersize=3.5, linewidth=1.8, label=f"{split} {label}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.grid(True, alpha=0.35)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        for k, epoch in enumerate(sorted(broken)):
            ax.axvspan(epoch - 0.5, epoch + 0.5, color="tab:red", alpha=0.12, linewidth=0,
                       label=None if k else "not finite")
        finite = np.concatenate(values) if values else np.zeros(0)
        if metric == "accuracy":
            # decimals as the ticks need: 82.5%, not a rounded 82%
            ax.yaxis.set_major_formatter(ticker.PercentFormatter(xmax=1.0))
            _min_span(ax, finite, 0.1, low=0.0, high=1.0)
        else:
            positive = finite[finite > 0]
            if positive.size and positive.max() > LOG_SCALE_RATIO * np.median(positive):
                ax.set_yscale("log")
                ax.set_ylabel(f"{label} (log scale)")
            elif finite.size:
                _min_span(ax, finite, 0.2 * float(np.abs(finite).max()), low=0.0)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no finite {label} recorded", transform=ax.transAxes,
                    ha="center", va="center", fontsize=12, color="0.3")
        if (len(names) == 1 and ax.lines) or broken:
            ax.legend(loc="best")
        _pad_single_epoch(ax, epochs)
    if len(names) > 1:
        handles = [Line2D([], [], color=RUN_COLORS[i % len(RUN_COLORS)], linewidth=2.5,
                          label=shown[name] if name in plotted else f"{shown[name]} (no data)")
                   for i, name in enumerate(names)]
        handles.append(Line2D([], [], linestyle="none", label=" "))  # a gap between groups
        handles += [Line2D([], [], color="0.3", linestyle=style, linewidth=1.8, label=split)
                    for split, style in SPLIT_STYLES.items()
                    if split in splits or split != "validation"]
        fig.legend(handles=handles, loc="outside lower center",
                   ncol=min(len(handles), 7), frameon=False,
                   prop={"family": font["fontfamily"]} if font else None)
    if title is None:
        title = (f"Learning curves: {names[0]}" if len(names) == 1
                 else f"Learning curves: {len(names)} runs")
    [title], title_font = drawn_texts([title])
    fig.suptitle(title, fontsize=13, **title_font)
    return fig


def plot_confusion(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str],
                   path: str | epath.Path) -> epath.Path:
    """Counts of (true, predicted) pairs with each class's accuracy in a side column.
    Colour follows the square root of the count, so that the few dozen confusions off
    the diagonal stay visible next to the diagonal's thousand."""
    labels, predictions = _check_predictions(labels, predictions, len(class_names))
    k = len(class_names)
    names, font = drawn_texts(class_names)
    counts = confusion_matrix(labels, predictions, k)
    support = counts.sum(axis=1)
    correct = int(np.trace(counts))
    total = int(counts.sum())

    side = max(6.0, 0.62 * k + 2.5)
    fig = _figure((side + 1.6, side))
    grid = fig.add_gridspec(1, 2, width_ratios=[k, 1.2])
    ax = fig.add_subplot(grid[0, 0])
    col = fig.add_subplot(grid[0, 1], sharey=ax)

    norm = PowerNorm(gamma=0.5, vmin=0, vmax=max(int(counts.max()), 1))
    cmap = colormaps["Blues"]
    ax.imshow(counts, cmap=cmap, norm=norm, aspect="equal")
    size = 9 if k <= 10 else 7
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, f"{count:,}", ha="center", va="center", fontsize=size,
                color=_text_color(cmap(norm(count))))
    ticks = np.arange(k)
    ax.set_xticks(ticks, names, rotation=40, ha="right", rotation_mode="anchor", **font)
    ax.set_yticks(ticks, names, **font)
    ax.set_xlabel("predicted", fontsize=11, fontweight="bold")
    ax.set_ylabel("true", fontsize=11, fontweight="bold")
    ax.tick_params(length=0)

    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(counts) / np.maximum(support, 1), np.nan)
    acc_cmap = colormaps["RdYlGn"]
    col.imshow(per_class[:, None], cmap=acc_cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, value in enumerate(per_class):
        text = "n/a" if math.isnan(value) else f"{value:.1%}"
        color = "black" if math.isnan(value) else _text_color(acc_cmap(value))
        col.text(0, i, text, ha="center", va="center", fontsize=size, color=color)
    col.set_xticks([0], ["per-class\naccuracy"])
    col.tick_params(axis="y", left=False, labelleft=False)
    col.tick_params(axis="x", length=0)
    for spine in (*ax.spines.values(), *col.spines.values()):
        spine.set_visible(False)

    if total:
        title = f"Confusion matrix: accuracy {correct / total:.2%} ({correct:,} of {total:,})"
    else:
        title = "Confusion matrix: no predictions"
    fig.suptitle(title, fontsize=13)
    return _save(fig, path)


def plot_misclassified(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                       class_names: Sequence[str], path: str | epath.Path,
                       n: int = MISCLASSIFIED_SHOWN,
                       names: Sequence[str] | None = None) -> epath.Path:
    """misclassified_figure as a PNG at `path`."""
    return _save(misclassified_figure(images, labels, predictions, class_names, n, names),
                 path)


def misclassified_figure(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                         class_names: Sequence[str], n: int = MISCLASSIFIED_SHOWN,
                         names: Sequence[str] | None = None) -> Figure:
    """The first `n` wrong test images in test-set order (the same ones every time),
    each captioned "true → predicted" under its name, so it can be looked up: `names[i]`
    (an image folder's file name), else its index "#i"."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    labels, predictions = _check_predictions(labels, predictions, len(class_names))
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"images must be [N, H, W] or [N, H, W, 1] with N = {len(labels)} "
                         f"labels, got shape {np.shape(images)}")
    if names is not None and len(names) != len(labels):
        raise ValueError(f"{len(names)} image names for {len(labels)} images")
    wrong = np.flatnonzero(labels != predictions)
    if not wrong.size:
        fig = _figure((7.0, 2.4))
        fig.text(0.5, 0.5, f"No misclassified images:\nall {len(labels):,} test images "
                 "are classified correctly.", ha="center", va="center", fontsize=14)
        return fig

    shown = wrong[:n]
    cols = min(len(shown), math.ceil(math.sqrt(n)))
    rows = math.ceil(len(shown) / cols)
    fig = _figure((max(1.75 * cols, 6.0), 1.95 * rows + 0.7))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    vmin, vmax = (0, 255) if images.dtype == np.uint8 else (None, None)
    classes, class_font = drawn_texts(class_names)
    titles, title_font = drawn_texts([_short(names[i]) if names is not None else f"#{i}"
                                      for i in shown])
    for ax, index, title in zip(axes, shown, titles):
        ax.imshow(images[index], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{classes[labels[index]]} → {classes[predictions[index]]}",
                      fontsize=8, **class_font)
        ax.set_title(title, fontsize=7, color="0.4", pad=2, **title_font)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.suptitle(f"Misclassified test images (true → predicted)\nthe first {len(shown)} "
                 f"of {wrong.size:,} wrong out of {len(labels):,}", fontsize=12)
    return fig


def drawn_texts(texts: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    r"""(`texts` as the figures write them, the text properties to draw them with).
    matplotlib draws a character its font lacks as a box, and warns: a font installed here
    that has it is added as a fallback family, and one that no font has is written as
    \uXXXX. Names are NFC and lose their invisible marks first (tboard.drawable_name)."""
    shown = [drawable_name(t) for t in texts]
    missing = {c for t in shown for c in t} - _glyphs(font_manager.findfont(
        font_manager.FontProperties()))
    if not missing:
        return shown, {}
    families = []
    for entry in font_manager.fontManager.ttflist:
        if entry.name.startswith("Last Resort"):
            continue  # a block's placeholder for every character: \uXXXX says which one
        found = missing & _glyphs(entry.fname)
        if found and entry.name not in families:
            families.append(entry.name)
            missing -= found
            if not missing:
                break
    shown = ["".join(escaped(c) if c in missing else c for c in t) for t in shown]
    if not families:
        return shown, {}
    primary = font_manager.FontProperties(
        fname=font_manager.findfont(font_manager.FontProperties())).get_name()
    return shown, {"fontfamily": [primary, *families]}


@functools.lru_cache(maxsize=None)
def _glyphs(path: str) -> frozenset[str]:
    """The characters the font file at `path` has glyphs for (none if it cannot be read)."""
    try:
        return frozenset(map(chr, font_manager.get_font(path).get_charmap()))
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def _short(name: str, width: int = 24) -> str:
    """A file name that fits above a picture: its end, where the name is."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, k: int) -> np.ndarray:
    """[k, k] int64 counts: row = true class, column = predicted class."""
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


# ------------------------------------------------------------------- pages


def write_report(out_dir: str | epath.Path, name: str, history: History,
                 config: Mapping[str, Any], labels: np.ndarray, predictions: np.ndarray,
                 images: np.ndarray, class_names: Sequence[str],
                 extra: Mapping[str, Any] | None = None,
                 image_names: Sequence[str] | None = None,
                 attempts: Sequence[Mapping[str, Any]] = ()) -> epath.Path:
    """curves.png, confusion.png, misclassified.png and report.md in `out_dir`; returns
    report.md's path. `extra` adds rows to the summary (`parameters` is formatted as a
    count); `image_names` names the test images (an image folder's files), else they are
    "#index"; `attempts` is the run's goodput ledger (ledger.json), a table of where
    each attempt's time went; the links are relative, so the directory can be moved or
    published whole."""
    check_out_dir(out_dir)
    gcs.check_url(str(out_dir), "--out")
    out = epath.Path(out_dir)
    safefs.make_dir(out)
    history = json_rows(history)
    plot_curves({name: history}, out / CURVES_PNG)
    plot_confusion(labels, predictions, class_names, out / CONFUSION_PNG)
    plot_misclassified(images, labels, predictions, class_names, out / MISCLASSIFIED_PNG,
                       names=image_names)

    labels, predictions = _check_predictions(labels, predictions, len(class_names))
    total = len(labels)
    correct = int((labels == predictions).sum())
    summary = _summary_rows(history, extra)
    if total:
        summary.append(("Accuracy of these predictions",
                        f"{correct / total:.2%} ({correct:,} of {total:,} test images)"))
    lines = [f"# LeNet-5 report: {name}", "", "## Summary", "",
             *_md_table(("figure", "value"), summary), "",
             "## Learning curves", "", f"![Learning curves]({CURVES_PNG})", "",
             "## Confusion matrix", "", f"![Confusion matrix]({CONFUSION_PNG})", "",
             "## Misclassified test images", "",
             f"{total - correct:,} of {total:,} test images are misclassified; the figure "
             "shows the first ones in test-set order.", "",
             f"![Misclassified test images]({MISCLASSIFIED_PNG})", "",
             *_misclassified_table(labels, predictions, class_names, image_names),
             "## Per-class accuracy", "",
             *_per_class_table(labels, predictions, class_names), "",
             "## Configuration", "",
             *_md_table(("setting", "value"),
                        [(k, _plain(v)) for k, v in _flatten(config).items()]), "",
             "## Per-epoch metrics", "", *_epoch_table(history), "",
             *_time_table(attempts)]
    path = out / REPORT_MD
    safefs.write_atomic(path, "\n".join(lines))
    return path


def write_comparison(out_dir: str | epath.Path,
                     runs: Mapping[str, Mapping[str, Any]]) -> epath.Path:
    """compare.png (every run's curves on the same axes) and compare.md (one row per
    run); returns compare.md's path. Each run is {"history", "config", "final"}; `final`
    may hold test_accuracy, parameters and wall_seconds, else they come from the
    history (the last epoch's accuracy, the sum of the epochs' wall seconds)."""
    if not runs:
        raise ValueError("write_comparison needs at least one run")
    check_out_dir(out_dir)
    gcs.check_url(str(out_dir), "--out")
    out = epath.Path(out_dir)
    safefs.make_dir(out)
    histories = {name: json_rows(run.get("history") or []) for name, run in runs.items()}
    plot_curves(histories, out / COMPARE_PNG, title=f"Comparison of {len(runs)} runs")

    rows = []
    for name, run in runs.items():
        final, history = run.get("final") or {}, histories[name]
        accuracy = _number(final.get("test_accuracy"))
        if accuracy is None and history:
            accuracy = _number(history[-1].get("test_accuracy"))
        wall = _number(final.get("wall_seconds"))
        if wall is None:
            wall = _total(history, "epoch_seconds")
        rows.append((name, recipe(run.get("config") or {}), accuracy,
                     final.get("parameters"), wall))
    best = max((r[2] for r in rows if r[2] is not None and math.isfinite(r[2])), default=None)
    with_params = any(r[3] is not None for r in rows)
    headers = ("run", "recipe", "final test accuracy",
               *(("parameters",) if with_params else ()), "wall time")
    cells = []
    for name, text, accuracy, params, wall in rows:
        acc = _percent(accuracy)
        if accuracy is not None and accuracy == best and len(rows) > 1:
            acc = f"**{acc}**"
        cells.append((name, text, acc, *((_count(params),) if with_params else ()),
                      _duration(wall)))
    lines = [f"# Comparison of {len(runs)} runs", "", *_md_table(headers, cells), "",
             f"![Learning curves of all runs]({COMPARE_PNG})", ""]
    path = out / COMPARE_MD
    safefs.write_atomic(path, "\n".join(lines))
    return path


def check_out_dir(out_dir: str | os.PathLike, workdirs: Sequence[str | os.PathLike] = (),
                  option: str = "--out") -> None:
    """Refuse an output directory that is, or is inside, one of a run's own entries
    (RUN_ENTRIES): checkpoints/ (Orbax lists and deletes what is in it), metrics.jsonl,
    config.json, tb/, the lock. The runs are `workdirs` (the ones reported on) and any
    local directory on the way to `out_dir` that holds a run (RUN_MARKERS). Links are
    resolved first, so a link to a run's checkpoints is refused too."""
    out = _resolved(out_dir)
    runs = {_resolved(w) for w in workdirs}
    path = out
    while True:
        parent = _parent(path)
        if parent == path:
            return
        name = _basename(path)
        if name in RUN_ENTRIES and (parent in runs or _holds_a_run(parent)):
            slash = "/" if name in ("checkpoints", "tb") else ""
            raise UserError(f"{option} {os.fspath(out_dir)} is {'' if path == out else 'inside '}"
                            f"the run {parent}'s {name}{slash}, which only training writes; "
                            f"choose another directory, e.g. {parent}/report")
        path = parent


def _resolved(path: str | os.PathLike) -> str:
    """An absolute local path with links resolved, or a URL (gs://) normalized."""
    path = os.fspath(path)
    if safefs.is_local(path):
        return os.path.realpath(path)
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def _parent(path: str) -> str:
    if safefs.is_local(path):
        return os.path.dirname(path)
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}" if "/" in rest else path


def _basename(path: str) -> str:
    return os.path.basename(path) if safefs.is_local(path) else posixpath.basename(path)


def _holds_a_run(directory: str) -> bool:
    """A local directory with a run's markers; a URL is only checked against the runs
    named (a listing per parent on an object store costs a request each)."""
    return safefs.is_local(directory) and any(
        os.path.lexists(os.path.join(directory, marker)) for marker in RUN_MARKERS)


def recipe(config: Mapping[str, Any]) -> str:
    """A config in one short phrase: what differs between the runs of a comparison."""
    parts = []
    name = config.get("recipe") or config.get("preset")  # "preset": older runs' config.json
    if name:
        parts.append(f"recipe {name}")
    if config.get("optimizer"):
        text = str(config["optimizer"])
        if config.get("learning_rate") is not None:
            text += f" lr {_plain(config['learning_rate'])}"
        if config["optimizer"] == "momentum" and config.get("momentum") is not None:
            text += f" momentum {_plain(config['momentum'])}"
        parts.append(text)
    for key, unit in (("batch_size", "batch"), ("epochs", "epochs"),
                      ("train_limit", "train images"), ("devices", "devices")):
        if config.get(key) is not None:
            parts.append(f"{unit} {_plain(config[key])}" if key == "batch_size"
                         else f"{_plain(config[key])} {unit}")
    return ", ".join(parts) or "n/a"


# ------------------------------------------------------------------- helpers


def json_rows(history: History) -> list[Mapping[str, Any]]:
    """Each epoch as its JSON object, the keys EpochRecord writes: the form every
    reader below takes, whole records or partial ones alike."""
    return [r.to_json() if isinstance(r, EpochRecord) else r for r in history]


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | epath.Path) -> epath.Path:
    """PNG bytes rendered in memory, then one atomic write: a reader never sees half
    an image, and a link planted at the name is refused, not written through."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    path = epath.Path(path)
    safefs.write_atomic(path, buffer.getvalue())
    return path


def _text_color(rgba) -> str:
    """Black on light cells, white on dark ones (relative luminance, ITU-R BT.601)."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _pad_single_epoch(ax, epochs: set[float]) -> None:
    """One epoch is one point; without room on both sides it sits on the axis edge."""
    if len(epochs) == 1:
        (epoch,) = epochs
        ax.set_xlim(epoch - 0.5, epoch + 0.5)
        ax.set_xticks([epoch])


def _min_span(ax, values: np.ndarray, span: float, low: float | None = None,
              high: float | None = None) -> None:
    """At least `span` on the y axis: one epoch, or a flat plateau, would otherwise be
    stretched over the whole axis with ticks like 9.880%, 9.900%, 9.920%."""
    if not values.size or values.max() - values.min() >= span:
        return
    middle = (values.max() + values.min()) / 2
    bottom, top = middle - span / 2, middle + span / 2
    if low is not None and bottom < low:
        bottom, top = low, low + span
    if high is not None and top > high:
        bottom, top = high - span, high
    ax.set_ylim(bottom, top)


def _check_predictions(labels, predictions, k: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for what, a in (("labels", labels), ("predictions", predictions)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{what} must be integer class ids, got {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= k):
            raise ValueError(f"{what} must be class ids in 0..{k - 1}, got "
                             f"{a.min()}..{a.max()}")
    return labels.astype(np.int64), predictions.astype(np.int64)


def _number(value) -> float | None:
    """A float, NaN kept; None for missing or non-numeric values (metrics.jsonl written
    by hand or by an older version)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    return float(value)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values, NaN where the value is missing or not finite."""
    x = [e if (e := _number(row.get("epoch"))) is not None and math.isfinite(e) else i + 1
         for i, row in enumerate(history)]
    y = [_number(row.get(key)) for row in history]
    y = np.array([np.nan if v is None else v for v in y], float)
    y[~np.isfinite(y)] = np.nan
    return np.array(x, float), y


def _not_finite(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """Rows whose value is a number but not a finite one (a diverged epoch), as a mask;
    missing values are only gaps."""
    return np.array([(v := _number(row.get(key))) is not None and not math.isfinite(v)
                     for row in history], bool)


def _total(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [_number(row.get(key)) for row in history]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) if values else None


def _summary_rows(history: Sequence[Mapping[str, Any]],
                  extra: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    extra = dict(extra or {})
    rows = []
    if history:
        last = history[-1]
        epoch = last.get("epoch", len(history))
        rows += [("Final test accuracy", f"{_percent(_number(last.get('test_accuracy')))} "
                  f"(epoch {epoch})"),
                 ("Final test loss", _decimal(_number(last.get("test_loss")))),
                 ("Final train loss", _decimal(_number(last.get("train_loss")))),
                 ("Final train accuracy", _percent(_number(last.get("train_accuracy"))))]
        split = chosen_on(history)
        accs = [(_number(r.get(f"{split}_accuracy")), r.get("epoch", i + 1), r)
                for i, r in enumerate(history)]
        accs = [(a, e, r) for a, e, r in accs if a is not None and math.isfinite(a)]
        if len(history) > 1 and accs:
            best, at, record = max(accs, key=lambda p: p[0])
            if split == "validation":
                rows.append(("Best validation accuracy", f"{_percent(best)} (epoch {at}; test "
                             f"accuracy there "
                             f"{_percent(_number(record.get('test_accuracy')))})"))
            else:
                rows.append(("Best test accuracy", f"{_percent(best)} (epoch {at}; selected "
                             "on the test set)"))
    else:
        rows.append(("Final test accuracy", "n/a (no epochs recorded)"))
    train = _total(history, "train_seconds")
    rates = [(_number(r.get("images_per_sec")), _number(r.get("train_seconds")))
             for r in history]
    rates = [(v, s) for v, s in rates if v is not None and s is not None
             and math.isfinite(v) and math.isfinite(s) and s > 0]
    if rates:  # weighted by time, as train's closing line: a short epoch counts less
        rate = sum(v * s for v, s in rates) / sum(s for _, s in rates)
        rows.append(("Throughput", f"{rate:,.0f} images/s (mean over training time)"))
    wall = _total(history, "epoch_seconds")
    rows.append(("Total train time", _duration(train) + (
        f" ({_duration(wall)} with evaluation)" if wall is not None else "")))
    if history:
        last = history[-1]
        if last.get("devices") is not None:
            rows.append(("Devices / processes",
                         f"{_plain(last.get('devices'))} / {_plain(last.get('processes', 1))}"))
    if "parameters" in extra:
        rows.append(("Parameters", _count(extra.pop("parameters"))))
    rows += [(str(k), _plain(v)) for k, v in extra.items()]
    return rows


EPOCH_COLUMNS = (("epoch", "epoch", "plain"), ("step", "step", "count"),
                 ("train_loss", "train loss", "decimal"),
                 ("train_accuracy", "train acc", "percent"),
                 ("validation_loss", "val loss", "decimal"),
                 ("validation_accuracy", "val acc", "percent"),
                 ("test_loss", "test loss", "decimal"), ("test_accuracy", "test acc", "percent"),
                 ("lr", "lr", "plain"), ("images_per_sec", "images/s", "count"),
                 ("train_seconds", "train s", "seconds"), ("epoch_seconds", "epoch s", "seconds"))


def _time_table(attempts: Sequence[Mapping[str, Any]]) -> list[str]:
    """## Where the time went: one row per attempt of the run (ledger.json), seconds by
    phase as `train`'s time line names them; nothing for a run without a ledger."""
    if not attempts:
        return []
    keys = [k for k in ledger.KEYS
            if k in ledger.ALWAYS_SHOWN or any(a["seconds"].get(k, 0) for a in attempts)]
    rows = []
    for i, attempt in enumerate(attempts, 1):
        steps = attempt.get("steps") or {}
        rows.append((str(i), str(attempt.get("outcome", "")),
                     f"{steps.get('from', '')}..{steps.get('to', '')}",
                     f"{attempt['wall_seconds']:.1f}",
                     *(f"{attempt['seconds'].get(k, 0.0):.1f}" for k in keys)))
    header = ("attempt", "outcome", "steps", "wall s", *(f"{ledger.SHOWN[k]} s" for k in keys))
    return ["## Where the time went", "",
            "Each start of the run is an attempt; its seconds by phase sum to its wall time "
            "(`ledger.json`; lost: training a later attempt had to redo).", "",
            *_md_table(header, rows), ""]


def _epoch_table(history: Sequence[Mapping[str, Any]]) -> list[str]:
    if not history:
        return ["No epochs recorded."]
    columns = [c for c in EPOCH_COLUMNS if any(c[0] in row for row in history)]
    fmt = {"plain": _plain, "count": _count, "seconds": _seconds,
           "decimal": lambda v: _decimal(_number(v)), "percent": lambda v: _percent(_number(v))}
    rows = [[fmt[kind](row.get(key)) for key, _, kind in columns] for row in history]
    return _md_table([label for _, label, _ in columns], rows)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(cell(h) for h in headers) + " |",
            "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]


def _per_class_table(labels: np.ndarray, predictions: np.ndarray,
                     class_names: Sequence[str]) -> list[str]:
    """Each class by its name, as text: the figures may have to escape what no font has."""
    counts = confusion_matrix(labels, predictions, len(class_names))
    rows = [(name, f"{int(counts[i].sum()):,}", f"{int(counts[i, i]):,}",
             _percent(counts[i, i] / counts[i].sum() if counts[i].sum() else None))
            for i, name in enumerate(class_names)]
    return _md_table(("class", "test images", "correct", "accuracy"), rows)


def _misclassified_table(labels: np.ndarray, predictions: np.ndarray,
                         class_names: Sequence[str], image_names: Sequence[str] | None,
                         n: int = MISCLASSIFIED_SHOWN) -> list[str]:
    """The figure's images as text, with their full names, when the images have names."""
    if image_names is None:
        return []
    wrong = np.flatnonzero(labels != predictions)[:n]
    if not wrong.size:
        return []
    rows = [(image_names[i], class_names[labels[i]], class_names[predictions[i]])
            for i in wrong]
    return [*_md_table(("image", "true", "predicted"), rows), ""]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}" if math.isfinite(value) else str(value)


def _decimal(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}" if math.isfinite(value) else str(value)


def _count(value) -> str:
    number = _number(value)
    if number is None:
        return _plain(value)
    return f"{number:,.0f}" if math.isfinite(number) else str(number)


def _seconds(value) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
