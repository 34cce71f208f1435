"""The report's figures: learning curves, a confusion matrix and misclassified test
images, drawn with matplotlib's object API (`Figure` on an Agg canvas, no pyplot): no
global figure state and no display, so they render on a headless host and never import
JAX. report.py writes the pages that embed them.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib import colormaps, font_manager, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lenet_dist import safefs
from lenet_dist.records import EpochRecord
from lenet_dist.tboard import drawable_name, escaped

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
    fig = _figure((11.0, 4.6 if len(names) <= 1 else 5.0))
    epochs = {float(e) for name in names for e in _series(runs[name], "epoch")[0]}
    plotted, splits = set(), set()
    for (metric, label), ax in zip(PANELS, fig.subplots(1, 2)):
        values, broken = _draw_panel(ax, runs, metric, label, plotted, splits)
        _dress_panel(ax, metric, label, values, broken, single=len(names) == 1)
        _pad_single_epoch(ax, epochs)
    if len(names) > 1:
        _runs_legend(fig, names, dict(zip(names, shown)), plotted, splits, font)
    if title is None:
        title = (f"Learning curves: {names[0]}" if len(names) == 1
                 else f"Learning curves: {len(names)} runs")
    [title], title_font = drawn_texts([title])
    fig.suptitle(title, fontsize=13, **title_font)
    return fig


def _draw_panel(ax, runs: dict, metric: str, label: str, plotted: set, splits: set):
    """Each run's splits of `metric` on `ax`; (the finite values drawn, the epochs with a
    non-finite value). Adds to `plotted` the runs and to `splits` the splits drawn."""
    values, broken = [], set()
    for i, (name, rows) in enumerate(runs.items()):
        for split, style in SPLIT_STYLES.items():
            x, y = _series(rows, f"{split}_{metric}")
            broken.update(x[_not_finite(rows, f"{split}_{metric}")].tolist())
            if not np.isfinite(y).any():
                continue
            plotted.add(name)
            splits.add(split)
            values.append(y[np.isfinite(y)])
            color = (SINGLE_RUN_COLORS[split] if len(runs) == 1
                     else RUN_COLORS[i % len(RUN_COLORS)])
            ax.plot(x, y, style, color=color, marker="o" if len(x) <= 40 else None,
                    markersize=3.5, linewidth=1.8, label=f"{split} {label}")
    return values, broken


def _dress_panel(ax, metric: str, label: str, values: list, broken: set, single: bool):
    """Axes, scale, shading of non-finite epochs and the legend of one panel."""
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
    if (single and ax.lines) or broken:
        ax.legend(loc="best")


def _runs_legend(fig, names: list, shown: dict, plotted: set, splits: set, font) -> None:
    """The legend shared by the panels when several runs are drawn: a colour per run,
    then a line style per split."""
    handles = [Line2D([], [], color=RUN_COLORS[i % len(RUN_COLORS)], linewidth=2.5,
                      label=shown[name] if name in plotted else f"{shown[name]} (no data)")
               for i, name in enumerate(names)]
    handles.append(Line2D([], [], linestyle="none", label=" "))  # a gap between groups
    handles += [Line2D([], [], color="0.3", linestyle=style, linewidth=1.8, label=split)
                for split, style in SPLIT_STYLES.items()
                if split in splits or split != "validation"]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7),
               frameon=False, prop={"family": font["fontfamily"]} if font else None)


def plot_confusion(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str],
                   path: str | epath.Path) -> epath.Path:
    """Counts of (true, predicted) pairs with each class's accuracy in a side column.
    Colour follows the square root of the count, so that the few dozen confusions off
    the diagonal stay visible next to the diagonal's thousand."""
    labels, predictions = checked_predictions(labels, predictions, len(class_names))
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
    labels, predictions = checked_predictions(labels, predictions, len(class_names))
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


def checked_predictions(labels, predictions, k: int) -> tuple[np.ndarray, np.ndarray]:
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


def finite_number(value) -> float | None:
    """A float, NaN kept; None for missing or non-numeric values (metrics.jsonl written
    by hand or by an older version)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    return float(value)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values, NaN where the value is missing or not finite."""
    x = [e if (e := finite_number(row.get("epoch"))) is not None and math.isfinite(e) else i + 1
         for i, row in enumerate(history)]
    y = [finite_number(row.get(key)) for row in history]
    y = np.array([np.nan if v is None else v for v in y], float)
    y[~np.isfinite(y)] = np.nan
    return np.array(x, float), y


def _not_finite(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """Rows whose value is a number but not a finite one (a diverged epoch), as a mask;
    missing values are only gaps."""
    return np.array([(v := finite_number(row.get(key))) is not None and not math.isfinite(v)
                     for row in history], bool)
