"""Run reports: a Markdown page that embeds the run's figures (figures.py: learning
curves, a confusion matrix, misclassified test images) with its tables, for one run or
several side by side.

numpy and matplotlib only: a report renders on a headless host and never imports JAX;
the caller computes the predictions. Files are written with `safefs.write_atomic`, like
everything else in a workdir.
"""

from __future__ import annotations

import math
import os
import posixpath
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from lenet_dist import gcs, ledger, safefs
from lenet_dist.errors import UserError
from lenet_dist.figures import (
    MISCLASSIFIED_SHOWN,
    History,
    checked_predictions,
    confusion_matrix,
    finite_number,
    json_rows,
    plot_confusion,
    plot_curves,
    plot_misclassified,
)
from lenet_dist.records import chosen_on
from lenet_dist.rundir import CHECKPOINT_DIR, CONFIG_FILE, LOCK_FILE, METRICS_FILE, TB_DIR

CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
MISCLASSIFIED_PNG = "misclassified.png"
REPORT_MD = "report.md"
COMPARE_PNG = "compare.png"
COMPARE_MD = "compare.md"

# What training keeps in a workdir (rundir's names): a report written into or over one
# of these would mix with (or replace) the run's own files.
RUN_ENTRIES = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, TB_DIR, LOCK_FILE)
# What makes a directory a run's workdir, for a run that --out names but the report
# was not asked about.
RUN_MARKERS = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE)

























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

    labels, predictions = checked_predictions(labels, predictions, len(class_names))
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
        accuracy = finite_number(final.get("test_accuracy"))
        if accuracy is None and history:
            accuracy = finite_number(history[-1].get("test_accuracy"))
        wall = finite_number(final.get("wall_seconds"))
        if wall is None:
            wall = _total(history, "epoch_seconds")
        rows.append((name, describe_config(run.get("config") or {}), accuracy,
                     final.get("parameters"), wall))
    best = max((r[2] for r in rows if r[2] is not None and math.isfinite(r[2])), default=None)
    with_params = any(r[3] is not None for r in rows)
    headers = ("run", "settings", "final test accuracy",
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
            slash = "/" if name in (CHECKPOINT_DIR, TB_DIR) else ""
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


def describe_config(config: Mapping[str, Any]) -> str:
    """A config in one short phrase: what differs between the runs of a comparison."""
    parts = []
    # older runs' config.json: "recipe" (before 2026-12-08), "preset" (before that)
    name = config.get("network") or config.get("recipe") or config.get("preset")
    if name:
        parts.append(f"network {name}")
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






















def _total(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [finite_number(row.get(key)) for row in history]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) if values else None


def _summary_rows(history: Sequence[Mapping[str, Any]],
                  extra: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    extra = dict(extra or {})
    rows = []
    if history:
        last = history[-1]
        epoch = last.get("epoch", len(history))
        rows += [("Final test accuracy", f"{_percent(finite_number(last.get('test_accuracy')))} "
                  f"(epoch {epoch})"),
                 ("Final test loss", _decimal(finite_number(last.get("test_loss")))),
                 ("Final train loss", _decimal(finite_number(last.get("train_loss")))),
                 ("Final train accuracy", _percent(finite_number(last.get("train_accuracy"))))]
        split = chosen_on(history)
        accs = [(finite_number(r.get(f"{split}_accuracy")), r.get("epoch", i + 1), r)
                for i, r in enumerate(history)]
        accs = [(a, e, r) for a, e, r in accs if a is not None and math.isfinite(a)]
        if len(history) > 1 and accs:
            best, at, record = max(accs, key=lambda p: p[0])
            if split == "validation":
                rows.append(("Best validation accuracy", f"{_percent(best)} (epoch {at}; test "
                             f"accuracy there "
                             f"{_percent(finite_number(record.get('test_accuracy')))})"))
            else:
                rows.append(("Best test accuracy", f"{_percent(best)} (epoch {at}; selected "
                             "on the test set)"))
    else:
        rows.append(("Final test accuracy", "n/a (no epochs recorded)"))
    train = _total(history, "train_seconds")
    rates = [(finite_number(r.get("images_per_sec")), finite_number(r.get("train_seconds")))
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
           "decimal": lambda v: _decimal(finite_number(v)),
           "percent": lambda v: _percent(finite_number(v))}
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
    number = finite_number(value)
    if number is None:
        return _plain(value)
    return f"{number:,.0f}" if math.isfinite(number) else str(number)


def _seconds(value) -> str:
    number = finite_number(value)
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
