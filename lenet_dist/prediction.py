"""Classify images with an exported SavedModel or straight from a checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from etils import epath

from lenet_dist import data as data_lib
from lenet_dist import gcs
from lenet_dist import serving_contract as contract
from lenet_dist.errors import Failure, UserError, first_line
from lenet_dist.images import load_inputs
from lenet_dist.runtime import import_tensorflow

BATCH = 1024
MAX_LABELS_BYTES = 2**20
READS = ("probabilities", "classes")  # what predict reads of the serving signature


def is_savedmodel(path: Path) -> bool:
    return (path / "saved_model.pb").is_file()


def savedmodel_predictor(model_dir: Path):
    """(predict(images) -> outputs, class names) for a SavedModel, TensorFlow only.

    The outputs and assets/labels.txt are checked on every batch: a model exported
    by something else, or with a labels file that does not fit it, is a UserError."""
    tf = import_tensorflow()
    try:
        served = contract.load_signature(tf, model_dir)
    except Exception as e:
        raise UserError(f"{model_dir} cannot be loaded as a SavedModel: "
                        f"{first_line(e)}") from None
    labels = contract.labels_path(model_dir)
    names = read_class_names(labels) if os.path.lexists(labels) else None

    def predict(images):
        try:
            out = contract.call_signature(tf, served, images)
        except tf.errors.OpError as e:  # e.g. a StableHLO version this TF cannot read
            raise UserError(f"{model_dir} fails to run on TensorFlow {tf.__version__}: "
                            f"{first_line(e)}") from None
        except (TypeError, ValueError) as e:  # a signature without images: uint8
            raise UserError(f"{model_dir}'s {contract.SIGNATURE} signature does not take "
                            f"{contract.describe_input()}: {first_line(e)}") from None
        out = check_outputs(model_dir, out, len(images))
        width = out["probabilities"].shape[1]
        if names is not None and len(names) != width:
            raise UserError(f"{labels} has {len(names)} class names for the model's "
                            f"{width} classes; it needs one name per line, in class order")
        return out

    return predict, names


def read_class_names(path: Path) -> list[str]:
    """A labels.txt: one class name per line, UTF-8 text."""
    with data_lib.open_input(path) as f:
        try:
            raw = f.read(MAX_LABELS_BYTES + 1)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_LABELS_BYTES:
        raise UserError(f"{path} is over {MAX_LABELS_BYTES >> 20} MiB: not a list of "
                        "class names")
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "it should hold one class name per line") from None


def check_outputs(model_dir: Path, out: dict, n: int) -> dict:
    """The model's outputs for n images, as predict reads them, or a UserError."""
    missing = [k for k in READS if k not in out]
    if missing:
        raise UserError(f"{model_dir}'s {contract.SIGNATURE} signature has outputs "
                        f"{sorted(out)}, not {' and '.join(missing)}; "
                        "is it a lenet-dist export?")
    probs, classes = out["probabilities"], out["classes"]
    if probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] == 0 or classes.shape != (n,):
        raise UserError(f"{model_dir} gives probabilities of shape {list(probs.shape)} and "
                        f"classes of shape {list(classes.shape)} for {n} images; expected "
                        f"[{n}, classes] and [{n}]")
    return out


def checkpoint_predictor(workdir: str, step: int | None, best: bool):
    """(predict(images) -> outputs, class names) for a checkpoint, in JAX on one device."""
    # Here, not at the top: `predict --model` runs on TensorFlow alone, without JAX.
    import jax

    from lenet_dist.mesh import Shardings, make_mesh
    from lenet_dist.restore import restore_checkpoint

    restored = restore_checkpoint(workdir, Shardings(make_mesh(1)), step, best)
    forward = restored.forward  # the model of the checkpoint's config and class names

    def predict(images):
        out = forward(restored.variables, images)
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    return predict, list(restored.class_names)


def predict(inputs, model: str | None = None, workdir: str | None = None,
            step: int | None = None, best: bool = False, invert: bool = False,
            top: int = 1, labels: str | None = None) -> dict:
    """Classify `inputs`; returns rows of (name, [(class name, probability)] * top)
    and, when `labels` (an IDX labels file) is given, the accuracy."""
    with tempfile.TemporaryDirectory(prefix="lenet-dist-model-") as scratch:
        if model is not None:
            forward, names = savedmodel_predictor(local_model(model, scratch))
        else:
            forward, names = checkpoint_predictor(workdir, step, best)
        return _predict(forward, names, inputs, invert, top, labels)


def local_model(model: str, scratch: str) -> Path:
    """The SavedModel directory `model`, checked; a gs:// one is first copied into
    `scratch` (TensorFlow's own gs:// reader has a fixed endpoint, and pathlib would
    read gs://b/m as the local gs:/b/m)."""
    if model.startswith(gcs.SCHEME):
        gcs.check_url(model, "--model")
        gcs.check_reachable(model, "--model")
        if not epath.Path(model, "saved_model.pb").exists():
            raise UserError(f"{model} is not a SavedModel directory (no saved_model.pb)")
        try:
            gcs.download_tree(model, scratch)
        except OSError as e:
            raise Failure(f"cannot read --model {model}: {e}") from None
        return Path(scratch)
    path = Path(model)
    if not is_savedmodel(path):
        raise UserError(f"{model} is not a SavedModel directory (no saved_model.pb)")
    return path


def _predict(forward, names, inputs, invert: bool, top: int, labels: str | None) -> dict:
    images, image_names = load_inputs(inputs, invert=invert)
    truth = None
    if labels is not None:  # read first: a wrong file fails before the model runs
        truth = data_lib.read_idx(labels, data_lib.LABELS_MAGIC)
        if len(truth) != len(images):
            raise UserError(f"{labels} has {len(truth)} labels for {len(images)} images")

    probs, classes = [], []
    for i in range(0, len(images), BATCH):
        out = forward(images[i:i + BATCH])
        probs.append(out["probabilities"])
        classes.append(out["classes"])
    probs, classes = np.concatenate(probs), np.concatenate(classes)
    names = names or [str(i) for i in range(probs.shape[1])]
    top = max(1, min(top, probs.shape[1]))
    order = np.argsort(-probs, axis=1)[:, :top]
    rows = [(n, [(names[c], float(p[c])) for c in o])
            for n, p, o in zip(image_names, probs, order)]
    result = {"rows": rows, "classes": classes}
    if truth is not None:
        problem = label_problem(labels, truth, probs.shape[1])
        if problem:
            raise UserError(problem)
        result["accuracy"] = float(np.mean(classes == truth))
    return result


def label_problem(path, labels: np.ndarray, num_classes: int) -> str | None:
    """Why `labels` cannot score a model of `num_classes` outputs, or None: a label
    with no class (another dataset's labels file) could never be right, and the
    accuracy would quietly measure the mismatch instead of the model."""
    bad = np.unique(labels[labels >= num_classes])
    if not bad.size:
        return None
    shown = ", ".join(str(int(v)) for v in bad[:5])
    values = (f"label {shown}" if bad.size == 1 else
              f"labels {shown}" + (f", ... ({bad.size} values)" if bad.size > 5 else ""))
    return (f"{path} holds {values} outside the model's classes: the model has "
            f"{num_classes} classes (0..{num_classes - 1}); give the labels of its own "
            "dataset")


def format_rows(result: dict, as_json: bool) -> list[str]:
    if as_json:
        return [json.dumps({"input": n, "predictions": [{"class": c, "probability": p}
                                                        for c, p in preds]})
                for n, preds in result["rows"]]
    return [f"{n}: " + ", ".join(f"{c} {p:.3f}" for c, p in preds)
            for n, preds in result["rows"]]
