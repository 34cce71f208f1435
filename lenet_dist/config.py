"""Run configuration: one frozen dataclass, named presets, CLI overrides on top."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import typing
from typing import Any, Mapping

from lenet_dist.errors import QUOTE_CHARS, UserError, quoted
from lenet_dist.rundir import DEFAULT_RUN, RUNS_DIR

DATASETS = ("fashion_mnist", "mnist")
# Besides the built-in names, --dataset takes a user's data: labelled images in class
# folders, or a directory of the four IDX files (data.py, folder.py).
DATASET_KINDS = ("folder", "idx")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
# The network (Config.network): the seed's 1998 LeNet-5, or its skeleton with ReLU, max
# pooling, BatchNorm and He init (model.py). A recipe (PRESETS, --recipe) is a whole
# Config: a network and the way it is trained.
NETWORKS = ("d2l", "modern")
SCHEDULES = ("constant", "cosine", "onecycle")
# Where an exported SavedModel can run (jax2tf lowers for each; XlaCallModule picks).
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_EXPORT_PLATFORMS = ("cpu", "cuda", "tpu")

# Counts that reach the devices become int32 (step counters, indices, JAX's device
# and process counts); larger values overflow in the libraries instead of failing here.
INT32_MAX = 2**31 - 1
# Inclusive ranges of the integer fields, checked by the CLI's option types and again
# by `Config.validate`, so no number reaches JAX or XLA that they cannot take.
INT_RANGES: dict[str, tuple[int, int]] = {
    # Fashion-MNIST and MNIST hold 60,000 training images: a larger batch never fits.
    "batch_size": (1, 65_536),
    # Step counters are int32: 10,000 epochs of 60,000 batch-1 steps stay inside.
    "epochs": (1, 10_000),
    # The test sets hold 10,000 images; past that a batch is only padding. Measured on
    # the 2-core dev machine: 10,000 took 0.7 GB, 65,536 took 2.1 GB and 3x the time.
    "eval_batch_size": (1, 16_384),
    # jax.random.key keeps the low 32 bits (JAX without x64): 2**32 would be seed 0 again.
    "seed": (0, 2**32 - 1),
    "train_limit": (1, INT32_MAX),
    "devices": (1, INT32_MAX),
    "save_every_steps": (0, INT32_MAX),
    "keep_checkpoints": (1, INT32_MAX),
    # Held out of the training split; the data decides the real ceiling (data.hold_out).
    "validation": (0, INT32_MAX),
    "early_stop": (0, 10_000),
}
# Float fields: (low, high, low is open, high is open). The learning rate's ceiling
# is 11x the largest rate the d2l recipes use (0.9) and catches exponent typos (1e3
# for 1e-3). Momentum 1 would never forget a gradient.
FLOAT_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "learning_rate": (0.0, 10.0, True, False),
    "momentum": (0.0, 1.0, False, True),
    "weight_decay": (0.0, 1.0, False, False),
    "label_smoothing": (0.0, 1.0, False, True),
    "warmup_epochs": (0.0, 10_000.0, False, False),
    "test_fraction": (0.0, 1.0, True, True),
}
# Fields that take a count (an int, in INT_RANGES) or a fraction of the data (a float in
# (0, 1)), as scikit-learn's test_size does: the type says which, in Python, in a
# settings file and on the command line (`--validation 5000`, `--validation 0.0833`).
COUNT_OR_FRACTION = ("validation",)
FRACTION_RANGE = (0.0, 1.0, True, True)


def setting(default: Any, doc: str = "", *, choices: tuple[str, ...] = (),
            aliases: tuple[str, ...] = (), path: bool = False, unset: str = "",
            resume: str = "", first_release: bool = False) -> Any:
    """A Config field with what the CLI and a resume need to know about it, so that a
    new setting is declared once.

    doc: its help line; choices: the values it takes; aliases: more option names
    (`--lr`); path: a file or directory name; unset: what None means, for the help;
    resume: "same" if a checkpoint of another value is another run, "layout" if the
    saved state's structure depends on it too; first_release: every checkpoint's
    metadata holds it (the later fields are read with their defaults).
    """
    assert resume in ("", "same", "layout"), resume
    return dataclasses.field(default=default, metadata={
        "doc": doc, "choices": choices, "aliases": aliases, "path": path, "unset": unset,
        "resume": resume, "first_release": first_release})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides what a training run computes.

    `devices=None` means every available device. The global batch is split
    evenly over the devices, so the same seed and batch give the same
    computation whatever the device count. The defaults are the d2l preset's.
    """

    dataset: str = setting(
        "fashion_mnist", "fashion_mnist or mnist; folder:PATH, your labelled images in "
        "PATH/{train,test}/<class>/ (or PATH/<class>/ with --test-fraction); idx:DIR, the "
        "four IDX files in DIR.", resume="same", first_release=True)
    data_dir: str | None = setting(
        None, "Directory of IDX files (gz or not) for fashion_mnist or mnist; skips the "
              "TFDS/system lookup.", path=True)
    test_fraction: float | None = setting(
        None, "folder: datasets without train/ and test/: this fraction of each class's "
              "images is the test split (chosen by a hash of each file's path).",
        unset="none", resume="same")
    skip_bad_files: bool = setting(
        False, "folder: datasets: skip files that do not decode (counted) instead of "
               "stopping at the first.", resume="same")
    validation: int | float = setting(
        0, "Hold out N training images, or a fraction F (0 < F < 1, rounded) of them, "
           "chosen by --seed, to pick the best checkpoint and stop early on; 0: none, and "
           "\"best\" is then chosen on the test set.", resume="same")
    early_stop: int = setting(
        0, "Stop, as a finished run, after N epochs without a better validation accuracy "
           "(needs --validation); 0: never.")
    devices: int | None = setting(
        None, "Devices in the data-parallel mesh, over all processes of a job. On CPU, "
              "this many devices are simulated when the host has fewer.", unset="all")
    batch_size: int = setting(128, "Global batch, split over devices.", resume="same",
                              first_release=True)
    epochs: int = setting(10)
    learning_rate: float = setting(0.1, aliases=("--lr",), resume="same", first_release=True)
    optimizer: str = setting("sgd", choices=OPTIMIZERS, resume="layout", first_release=True)
    momentum: float = setting(0.9, "For --optimizer momentum.", resume="same",
                              first_release=True)
    seed: int = setting(0, "Init and data-order seed.", resume="same", first_release=True)
    # The modern parts; the d2l defaults leave the seed's computation unchanged. The
    # CLI's --recipe picks a preset, which sets this field. Files written before
    # 2026-12-08 call it `recipe` (`upgraded`).
    network: str = setting("d2l", "The model: d2l's LeNet-5 (sigmoid, average pooling) or "
                           "modern (ReLU, max pooling, BatchNorm); --recipe sets it.",
                           choices=NETWORKS, resume="layout")
    # A constant rate and a schedule differ in the optimizer state's layout.
    schedule: str = setting("constant", "Learning-rate schedule over the run: warm-up + "
                            "cosine, or one-cycle.", choices=SCHEDULES, resume="layout")
    warmup_epochs: float = setting(0.0, "Linear warm-up before the cosine decay.",
                                   resume="same")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay.", resume="same")
    label_smoothing: float = setting(0.0, resume="same")
    augment: bool = setting(False, "Random 28x28 crops of the 2-pixel-padded image and "
                            "flips, on the devices, from (seed, step) only.", resume="same")
    eval_batch_size: int = setting(1000, "Rounded up to a multiple of the devices.")
    train_limit: int | None = setting(None, "Train on the first N training images only.",
                                      unset="all", resume="same", first_release=True)
    workdir: str = setting(DEFAULT_RUN, "Run directory (checkpoints, metrics.jsonl); a run "
                           "there is resumed.", path=True)
    # Checkpointing: always at epoch ends (unless off), and every K steps if K > 0.
    checkpoint: bool = setting(True, "Save checkpoints and resume from them.")
    save_every_steps: int = setting(
        0, "Also checkpoint every K steps mid-epoch (0: only at epoch ends).")
    keep_checkpoints: int = setting(3, "Keep the latest K checkpoints (and always the best).")

    def replace(self, **overrides: Any) -> "Config":
        """Apply overrides, ignoring the ones left unset (None) by the CLI. A name that is
        no field is a UserError (a typo would otherwise be a TypeError); values are
        checked by `validate`."""
        for key in overrides:
            if key not in FIELDS:
                raise UserError(f"Config has no field {quoted(key)}{close_field(key)}; its "
                                f"fields are {', '.join(FIELDS)}")
        return dataclasses.replace(
            self, **{k: v for k, v in overrides.items() if v is not None}
        )

    def validate(self, *, cli: bool = False) -> "Config":
        """This Config with every field checked (`check_field`: the rules a settings
        file and the CLI's option types apply) and then their combinations, or a
        one-line UserError. Returns it normalised (an int given for a float field is that
        float, a path-like is a str). Messages name fields as Python does
        (`optimizer='adamw'`), or with `cli` as the options (`--optimizer adamw`)."""
        def say(field: str, value: Any = None) -> str:
            if cli:
                return option_name(field) + ("" if value is None else f" {value}")
            return field + ("" if value is None else f"={quoted(value)}")

        changes = {}
        for field in FIELDS:
            given = getattr(self, field)
            value, problem = check_field(field, given)
            if problem:
                raise UserError(f"{say(field)} {problem}")
            if type(value) is not type(given):
                changes[field] = value
        config = dataclasses.replace(self, **changes) if changes else self
        if config.weight_decay and config.optimizer != "adamw":
            raise UserError(f"{say('weight_decay')} needs {say('optimizer', 'adamw')} "
                            "(decoupled decay)")
        if config.warmup_epochs and config.schedule != "cosine":
            raise UserError(f"{say('warmup_epochs')} needs {say('schedule', 'cosine')}")
        kind, _ = dataset_kind(config.dataset)
        if config.test_fraction is not None and kind != "folder":
            raise UserError(f"{say('test_fraction')} splits a folder: dataset; the built-in "
                            "datasets and idx: ones have their own test split")
        if config.skip_bad_files and kind != "folder":
            raise UserError(f"{say('skip_bad_files')} is for folder: datasets (image files)")
        if config.early_stop and not config.validation:
            raise UserError(f"{say('early_stop')} watches the validation accuracy: give "
                            f"{say('validation')} N too (stopping on the test set would "
                            "select on it)")
        if config.train_limit is not None and config.train_limit < config.batch_size:
            raise UserError(
                f"{say('train_limit', config.train_limit)} is smaller than one batch "
                f"({config.batch_size}); raise it or lower {say('batch_size')}"
            )
        return config

    def validation_images(self, train_images: int) -> int:
        """How many of a split's `train_images` `validation` holds out: a count as given
        (data.hold_out refuses one too large), a fraction rounded and at least one, so
        the modern recipe's 1/12 of Fashion-MNIST's 60,000 is exactly 5,000."""
        if not isinstance(self.validation, float):
            return self.validation
        held = max(1, round(self.validation * train_images))
        if held >= train_images:
            raise UserError(f"validation {self.validation:g} of {train_images:,} training "
                            f"images holds out all of them; give a smaller fraction or 0")
        return held

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The fields as a JSON object, in declaration order; `--config` reads it back."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


# Fields renamed since the first release: old name -> new. A checkpoint's metadata (and
# an export's, which holds the same config) written before keeps the old name.
RENAMED_FIELDS = {"recipe": "network"}


def upgraded(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's fields under today's names (see RENAMED_FIELDS); a field saved
    under both names keeps today's."""
    out = dict(fields)
    for old, new in RENAMED_FIELDS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def dataset_kind(spec: str) -> tuple[str, str | None]:
    """("builtin", None), ("folder", PATH) or ("idx", DIR) for a --dataset value."""
    kind, sep, where = spec.partition(":")
    if sep and kind in DATASET_KINDS:
        return kind, where
    return "builtin", None


def dataset_problem(spec: str) -> str | None:
    """What is wrong with a --dataset value, or None."""
    kind, where = dataset_kind(spec)
    if kind == "builtin" and spec not in DATASETS:
        return (f"{quoted(spec)} is not a dataset; give {' or '.join(DATASETS)}, "
                "folder:PATH (class folders of images) or idx:DIR (four IDX files)")
    if kind != "builtin" and not where:
        return f"{quoted(spec)} names no path; write {kind}:PATH"
    if "\0" in spec:
        return "contains a NUL byte, which no file name can hold"
    return None


def range_problem(name: str, value: Any) -> str | None:
    """What is wrong with a number for an INT_RANGES or FLOAT_RANGES field (or for a
    COUNT_OR_FRACTION one: an int a count, a float a fraction), or None."""
    fraction = name in COUNT_OR_FRACTION and isinstance(value, float)
    if name in INT_RANGES and not fraction:
        low, high = INT_RANGES[name]
        if value is not None and not low <= value <= high:
            return f"must be in {low}..{high}, got {quoted(value)}"
        return None
    if value is None:  # an optional one left unset
        return None
    low, high, low_open, high_open = FRACTION_RANGE if fraction else FLOAT_RANGES[name]
    inside = ((low < value if low_open else low <= value)
              and (value < high if high_open else value <= high))
    if math.isfinite(value) and inside:
        return None
    if fraction:
        return f"must be {KIND_NAMES[int, float]}, got {quoted(value)}"
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return f"must be a finite number in {span}, got {quoted(value)}"


# The most of a value a message quotes. A settings file may hold a megabyte in one
# value (or, in YAML, far more through aliases), and the line is for a person.
# Config's fields by name, each with its declaration (`setting`'s metadata).
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def _fields_where(wanted) -> tuple[str, ...]:
    return tuple(name for name, f in FIELDS.items() if wanted(f.metadata))


# Fields that change the saved state's structure: even --allow-config-change
# cannot continue across them (the restore itself would fail).
STRUCTURAL_FIELDS = _fields_where(lambda m: m["resume"] == "layout")
# Fields that decide what a run computes: resuming with any of them changed
# would silently continue a different experiment. The structural ones first, so a
# refusal names first what no flag gets past.
COMPATIBLE_FIELDS = STRUCTURAL_FIELDS + _fields_where(lambda m: m["resume"] == "same")
# Fields every checkpoint's metadata has (those of the first release); the later
# ones are read with Config's defaults, so old d2l checkpoints stay readable.
REQUIRED_FIELDS = _fields_where(lambda m: m["first_release"])

PRESETS: dict[str, Config] = {
    # The d2l chapter's recipe: SGD lr 0.1, batch 128, 10 epochs.
    "d2l": Config(),
    # The same skeleton as the seed's table of thirty years of changes has it, trained
    # as one would now: AdamW with warm-up + cosine decay, label smoothing, crops and
    # flips done on the devices. It holds out a twelfth of the training split: 5,000 of
    # Fashion-MNIST's 60,000 (the images a count of 5,000 held out), and a fraction fits
    # a folder of a few thousand images too.
    "modern": Config(network="modern", optimizer="adamw", learning_rate=0.003,
                     schedule="cosine", warmup_epochs=1.0, weight_decay=0.0005,
                     label_smoothing=0.1, augment=True, validation=1 / 12,
                     workdir=f"{RUNS_DIR}/modern"),
    # The shortest time to 0.90 test accuracy on Fashion-MNIST measured here (docs/
    # recipes.md has the ablation): the modern network, 2 epochs of one-cycle AdamW
    # (peak 0.01), no augmentation (it slows a 2-epoch run down), every training image.
    "fast": Config(network="modern", optimizer="adamw", learning_rate=0.01,
                   schedule="onecycle", epochs=2, weight_decay=0.0005,
                   label_smoothing=0.1, workdir=f"{RUNS_DIR}/fast"),
    # A run that shows learning in seconds on a CPU: a 2,000-image slice and
    # Adam, because the seed's sigmoids sit on a loss plateau for ~4 epochs.
    "smoke": Config(epochs=2, train_limit=2000, optimizer="adam",
                    learning_rate=0.003, batch_size=16, workdir=f"{RUNS_DIR}/smoke"),
}


def option_name(field: str) -> str:
    """The CLI option that sets a Config field, for messages."""
    return "--" + field.replace("_", "-")


# Old preset names, kept for one release: name -> (new name, the note printed).
DEPRECATED_PRESETS = {"seed": ("d2l", "note: the preset 'seed' is now called 'd2l' "
                                      "(--recipe d2l); 'seed' goes in the next release")}


def preset(name: str) -> Config:
    name = DEPRECATED_PRESETS.get(name, (name,))[0]
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


# The longest text a settings file may give a field: Linux's PATH_MAX (the longest
# path a system call takes). Every text field is a path or a short name.
MAX_TEXT_CHARS = 4096


def checked_setting(where: str, key: Any, value: Any) -> Any:
    """`value` for field `key` as Config holds it, or a UserError naming `where` and key.
    A message quotes at most QUOTE_CHARS of a value or key (`quoted`)."""
    if key == "recipe":  # a file's recipe picks a preset (effective_config), smoke too
        if not (isinstance(value, str) and value in PRESETS):
            raise UserError(f"{where}: recipe must be one of {', '.join(PRESETS)}, "
                            f"got {quoted(value)}")
        return value
    if not isinstance(key, str) or key not in FIELDS:
        hint = close_field(key) if isinstance(key, str) and len(key) <= QUOTE_CHARS else ""
        raise UserError(f"{where}: unknown key {quoted(key)}{hint}; the keys are Config's "
                        f"fields: {', '.join(FIELDS)}")
    kind, optional = field_type(key)
    if value is None and not optional:
        raise UserError(f"{where}: {key} cannot be null")
    if kind is float and isinstance(value, str) and len(value) <= QUOTE_CHARS:
        try:  # YAML 1.1 reads 1e-3 (no dot) as text
            value = float(value)
        except ValueError:
            pass
    value, problem = check_field(key, value)
    if problem:
        raise UserError(f"{where}: {key} {problem}")
    return value


def close_field(name: Any) -> str:
    """" (did you mean epochs?)" for a name close to a field's (or an alias, `--lr`)."""
    if not isinstance(name, str):
        return ""
    name = name.lstrip("-").replace("-", "_")
    aliased = [f.name for f in FIELDS.values()
               if "--" + name.replace("_", "-") in f.metadata.get("aliases", ())]
    close = aliased or difflib.get_close_matches(name, FIELDS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_field(name: str, value: Any) -> tuple[Any, str | None]:
    """(value as Config holds it, what is wrong with it or None) for field `name`: its
    type (a bool is no number; an int goes where a float does; a path may be path-like),
    choices, range, and what no path or name can hold. The one set of per-field rules:
    `Config.validate` and the settings files apply it, and the CLI's option types are
    built from the same tables. The problem is worded to follow the field's name."""
    kind, optional = field_type(name)
    if value is None:
        return None, None if optional else "cannot be None"
    value = _as_kind(name, kind, value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        return value, f"must be {KIND_NAMES[kind]}, got {quoted(value)}"
    if name == "dataset" and dataset_problem(value):
        return value, dataset_problem(value)
    choices = FIELDS[name].metadata["choices"]
    if choices and value not in choices:
        return value, f"must be one of {', '.join(choices)}, got {quoted(value)}"
    if name in INT_RANGES or name in FLOAT_RANGES:
        problem = range_problem(name, value)
        if problem:
            return value, problem
    if isinstance(value, str):
        if FIELDS[name].metadata["path"] and not value:
            return value, "is an empty path"
        if len(value) > MAX_TEXT_CHARS:
            return value, (f"is {len(value):,} characters long; the most a path can be is "
                           f"{MAX_TEXT_CHARS:,}")
        if "\0" in value:
            return value, "contains a NUL byte, which no file name can hold"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value, "is not valid text"
    return value, None


def _as_kind(name: str, kind: type | tuple[type, ...], value: Any) -> Any:
    """An integral number (numpy's too) as an int, a real one as a float where a float
    goes (an int past 1.8e308 as inf, which the range check refuses), a path-like as
    its path; anything else as it is, for the type check to judge."""
    if isinstance(value, bool):
        return value
    counts = kind is int or (isinstance(kind, tuple) and int in kind)
    if counts and isinstance(value, numbers.Integral):
        return int(value)
    if (kind is float or isinstance(kind, tuple)) and isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    if FIELDS[name].metadata["path"] and isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text",
              (int, float): "a count (an integer) or a fraction in (0, 1)"}


def field_type(name: str) -> tuple[type | tuple[type, ...], bool]:
    """(bool, int, float, str, or (int, float) for a COUNT_OR_FRACTION field; whether
    None is allowed) of a Config field."""
    hint = _type_hints()[name]
    args = typing.get_args(hint)
    if args:  # X | None, or int | float
        kinds = tuple(a for a in args if a is not type(None))
        return (kinds[0] if len(kinds) == 1 else kinds), type(None) in args
    return hint, False


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(Config)  # evaluates every annotation: once, not per field


def effective_config(recipe: str | None, settings: dict[str, Any],
                     overrides: dict[str, Any]) -> Config:
    """The preset, then a --config file's settings, then the command line's options
    (None: not given). The preset is --recipe's, else the file's `recipe`, else d2l's.
    Not validated yet."""
    settings = dict(settings)
    from_file = settings.pop("recipe", None)
    return dataclasses.replace(preset(recipe or from_file or "d2l"), **settings).replace(
        **overrides)
