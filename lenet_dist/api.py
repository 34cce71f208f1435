"""The Python API: train, evaluate, export and classify from a script or a notebook.

    import lenet_dist

    result = lenet_dist.train(lenet_dist.recipe("smoke").replace(workdir="runs/smoke"))
    model = lenet_dist.load("runs/smoke", best=True)
    model.predict(images).names

The package re-exports these names (lenet_dist/__init__.py, imported on first use).
They call the library functions the CLI's commands call, set up the way the CLI sets
them up, without what only suits a command line: no exit, no Ctrl-C handler that ends
the process while JAX loads, no signal handler left behind. Bad input is a `UserError`
(a `Failure` for a runtime problem) whose one-line message says what to do.

JAX is imported inside the functions, after the device count is set: importing this
module is as cheap as `import lenet_dist`. The first call that starts JAX fixes the
number of (simulated CPU) devices for the whole process; see `train`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from lenet_dist.config import Config, check_field, preset
from lenet_dist.errors import Failure, Preempted, UserError

if TYPE_CHECKING:
    from lenet_dist.data import Dataset
    from lenet_dist.restore import Restored
    from lenet_dist.training import TrainResult

__all__ = ["Config", "Failure", "Model", "Predictions", "Preempted", "UserError", "dataset",
           "evaluate", "export", "load", "predict", "recipe", "train"]

PathLike = str | os.PathLike
IMAGE_SIDE = 28
PREDICT_BATCH = 1024  # images per forward pass: lenet_dist.predict's batch


def recipe(name: str) -> Config:
    """The named preset Config: "d2l" (the default), "modern", "fast" (0.90 in 2
    epochs) or "smoke" (seconds on a CPU). Change fields with
    `Config.replace(workdir=..., epochs=...)`; `train` checks them all
    (`Config.validate`) before JAX starts, so a wrong one costs nothing."""
    if not isinstance(name, str):
        raise UserError(f"recipe name must be text (e.g. 'smoke'), not {type(name).__name__}")
    return preset(name)


def dataset(config: Config | str = "fashion_mnist") -> Dataset:
    """The data a Config trains on (its `dataset` and `data_dir`), or a dataset by name
    ("fashion_mnist", "mnist", "folder:PATH", "idx:DIR"), found as `train` finds it.
    `.train` and `.test` hold `.images` (uint8 [n, 28, 28, 1], what `Model.predict`
    takes) and `.labels` (int32 [n]); `.class_names[i]` names label i."""
    if isinstance(config, str):
        config = Config(dataset=config)
    if not isinstance(config, Config):
        raise UserError(f"dataset() takes a lenet_dist.Config or a dataset name, not "
                        f"{type(config).__name__}")
    config = config.validate()
    from lenet_dist.sources import load_dataset  # imports JAX (the class-count limits)

    return load_dataset(config)


def train(config: Config, *, progress: bool | None = None, tensorboard: bool = True,
          allow_config_change: bool = False) -> TrainResult:
    """Train `config` end to end in `config.workdir`, resuming the run found there; returns
    a TrainResult: `.state` (the final TrainState), `.history` (one dict per epoch, as in
    metrics.jsonl), `.config`, and `.final` (the last epoch's dict: `test_accuracy`, ...).

    progress: a per-step bar (tqdm.auto: a widget in Jupyter); None shows it when stderr
    is a terminal or this is a Jupyter kernel. tensorboard: event files in <workdir>/tb,
    as the CLI writes by default. allow_config_change: resume a run saved with other
    hyper-parameters. Epoch lines are printed.

    The first call that starts JAX in a process sets its device count: `config.devices`
    simulated CPU devices on a CPU host (None: every device). Once JAX has started, no
    more can be added, and asking for more is a UserError (restart the kernel, or ask for
    fewer). Ctrl-C (or SIGTERM) stops at the next step, saves a checkpoint and raises
    `lenet_dist.Preempted`; the same call then resumes. A diverged run raises
    Failure. Signal handlers are put back as they were when this returns."""
    if not isinstance(config, Config):
        raise UserError(f"train() takes a lenet_dist.Config (e.g. lenet_dist.recipe('smoke')"
                        f"), not {type(config).__name__}")
    config = config.validate()  # before JAX: a bad setting costs nothing
    start_jax(config.devices)
    from lenet_dist.training import Outputs  # JAX: after start_jax (see the module's doc)
    from lenet_dist.training import train as run

    return run(config, progress=show_progress(progress), allow_config_change=allow_config_change,
               outputs=Outputs(tensorboard=tensorboard))


def evaluate(workdir: PathLike, *, step: int | None = None, best: bool = False,
             devices: int | None = None) -> dict:
    """Evaluate a checkpoint of `workdir` on the full test set; returns {"step", "epoch",
    "devices", "test_loss", "test_accuracy", "examples"}. The latest checkpoint, or
    `step`, or with `best=True` the one with the best validation (else test) accuracy.
    devices: as in `train` (None: every device)."""
    check_choice(step, best)
    start_jax(devices)
    from lenet_dist.evaluation import evaluate_checkpoint  # JAX: after start_jax

    return evaluate_checkpoint(os.fspath(workdir), step=step, best=best, devices=devices)


def export(workdir: PathLike, out: PathLike, *, step: int | None = None, best: bool = False,
           **options: Any) -> dict:
    """Export a checkpoint of `workdir` (chosen as in `evaluate`) as a TensorFlow
    SavedModel at `out`, checked against JAX before it is published; returns its metadata
    (as in <out>/assets.extra/metadata.json: checkpoint, platforms, serialization, ...).

    options: lenet_dist.exporting.export_checkpoint's other keyword arguments, e.g.
    `platforms=("cpu",)`, `overwrite=True`, `data_dir=...`; an unknown one is a UserError
    listing them. Needs TensorFlow (`pip install 'lenet-dist[export]'`): without it, a
    UserError that says so."""
    check_choice(step, best)
    start_jax(1)
    from lenet_dist.exporting import export_checkpoint  # JAX: after start_jax

    taken = [name for name in inspect.signature(export_checkpoint).parameters
             if name not in ("workdir", "out", "step", "best")]
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise UserError(f"export() has no option {', '.join(unknown)}; its options are "
                        f"{', '.join(taken)}")
    return export_checkpoint(os.fspath(workdir), os.fspath(out), step=step, best=best,
                             **options)


def load(workdir: PathLike, *, step: int | None = None, best: bool = False) -> Model:
    """A checkpoint of `workdir` (chosen as in `evaluate`), restored on one device as a
    Model to classify images with. An unreadable checkpoint is passed over (with a
    warning on stderr) unless `step` named it."""
    check_choice(step, best)
    start_jax(1)
    from lenet_dist.mesh import Shardings, make_mesh  # JAX: after start_jax
    from lenet_dist.restore import restore_checkpoint

    workdir = os.fspath(workdir)
    return Model(restore_checkpoint(workdir, Shardings(make_mesh(1)), step, best), workdir)


def predict(workdir_or_model: PathLike | Model, images: Any, *, step: int | None = None,
            best: bool = False) -> Predictions:
    """Classify `images` (see `Model.predict`) with a Model, or with a checkpoint of a
    workdir (`load(workdir, step=step, best=best)`; load once to classify many times)."""
    if isinstance(workdir_or_model, Model):
        if step is not None or best:
            raise UserError("step and best choose a checkpoint; give them with a workdir, "
                            "not with a loaded Model")
        return workdir_or_model.predict(images)
    return load(workdir_or_model, step=step, best=best).predict(images)


@dataclasses.dataclass(frozen=True, eq=False)
class Predictions:
    """What `Model.predict` found for n images: `classes` (int [n], class indices),
    `names` (n class names) and `probabilities` (float32 [n, classes], each row a
    softmax that sums to 1)."""

    classes: np.ndarray
    names: list[str]
    probabilities: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)


class Model:
    """A restored checkpoint that classifies images on one device (JAX, jitted).
    Made by `load`. `class_names`: label i's name; `step`: the checkpoint's step;
    `config`: the run's Config; `workdir`: where it was loaded from."""

    def __init__(self, restored: Restored, workdir: str):
        self.class_names: tuple[str, ...] = tuple(restored.class_names)
        self.step: int = restored.step
        self.config: Config = restored.config
        self.workdir = workdir
        self._variables = restored.variables
        self._forward = restored.forward  # what `lenet-dist predict --workdir` runs

    def __repr__(self) -> str:
        return (f"Model(workdir={self.workdir!r}, step={self.step}, "
                f"network={self.config.network!r}, classes={len(self.class_names)})")

    def predict(self, images: Any) -> Predictions:
        """Classify 28x28 grayscale images, light objects on dark as in Fashion-MNIST:
        uint8 [n, 28, 28, 1], [n, 28, 28], or one image [28, 28] (or [28, 28, 1]).
        Other integer arrays must hold 0..255. Float arrays must hold [0, 1] (a
        ToTensor-style image); they are scaled by 255 and rounded to uint8, the
        pixels the model and its SavedModel take, so a float image gets the same answer
        as its uint8 original. Anything else is a UserError saying what is accepted."""
        batch = as_images(images)
        width = len(self.class_names)
        if not len(batch):
            return Predictions(np.zeros(0, np.int32), [], np.zeros((0, width), np.float32))
        probabilities, classes = [], []
        for i in range(0, len(batch), PREDICT_BATCH):
            out = self._forward(self._variables, batch[i:i + PREDICT_BATCH])
            probabilities.append(np.asarray(out["probabilities"]))
            classes.append(np.asarray(out["classes"]))
        found = np.concatenate(classes)
        return Predictions(classes=found, names=[self.class_names[c] for c in found],
                           probabilities=np.concatenate(probabilities))


def as_images(images: Any) -> np.ndarray:
    """`images` as the uint8 [n, 28, 28, 1] batch the model takes (see Model.predict),
    or a UserError that says what is accepted."""
    accepted = ("give uint8 [n, 28, 28, 1], [n, 28, 28] or one [28, 28] image (or floats "
                "in [0, 1])")
    try:
        array = np.asarray(images)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise UserError(f"images are not an array ({e}); {accepted}") from None
    side = (IMAGE_SIDE, IMAGE_SIDE)
    if array.shape in (side, (*side, 1)):
        array = array.reshape(1, *side, 1)
    elif array.ndim == 3 and array.shape[1:] == side:
        array = array[..., None]
    elif not (array.ndim == 4 and array.shape[1:] == (*side, 1)):
        raise UserError(f"images of shape {list(array.shape)}: {accepted}; lenet-dist "
                        "predict converts image files")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise UserError("images hold NaN or infinite values")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise UserError(f"float images must be in [0, 1], these span [{array.min():g}, "
                            f"{array.max():g}]; pass pixels 0..255 as uint8 "
                            "(images.astype(np.uint8))")
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
            raise UserError(f"integer images must hold 0..255, these span [{array.min()}, "
                            f"{array.max()}]")
        return np.ascontiguousarray(array, np.uint8)
    raise UserError(f"images of dtype {array.dtype}: {accepted}")


def check_choice(step: int | None, best: bool) -> None:
    if step is not None and best:
        raise UserError("step and best both choose a checkpoint; give one")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise UserError(f"step must be a checkpoint's step number (an int >= 0), not {step!r}")


def show_progress(progress: bool | None) -> bool:
    """progress=None: a bar when stderr is a terminal or in a Jupyter kernel."""
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def start_jax(devices: int | None) -> None:
    """runtime.configure(cpu_devices=devices), as the CLI's commands start, less two
    things that suit only a command line: the Ctrl-C handler that ends the process
    while JAX loads (os._exit: it would kill a notebook's kernel), and a traceback-free
    exit. If JAX has already started in this process (a notebook cell before this one)
    with fewer devices than asked, no more can be had: a UserError says so."""
    _, problem = check_field("devices", devices)  # Config.devices' rule and words
    if problem:
        raise UserError(f"devices {problem}")
    if "jax" in sys.modules and jax_started():
        import jax

        have = jax.device_count()
        if devices is not None and devices > have:
            platform = jax.default_backend()
            why = ("simulated CPU devices can only be set before JAX starts" if
                   platform == "cpu" else f"this host has {have}")
            raise UserError(f"devices={devices}, but JAX has already started in this process "
                            f"with {have} {platform} device(s) and {why}; ask for devices <= "
                            f"{have}, or restart the kernel (Python) and call this first")
        return
    from lenet_dist import runtime

    runtime.configure(devices, quick_exit=False)  # a Ctrl-C is the caller's to catch


def jax_started() -> bool:
    """Whether JAX's backends are up (then the device count is fixed)."""
    from lenet_dist import jax_compat

    try:
        return jax_compat.backends_are_initialized()
    except jax_compat.JaxMoved:  # a JAX without this private function: assume not yet
        return False
