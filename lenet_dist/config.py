"""Run configuration: one frozen dataclass, named presets, CLI overrides on top."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lenet_dist.errors import UserError

DATASETS = ("fashion_mnist", "mnist")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
# The model and its training parts: the seed's 1998 LeNet-5, or its skeleton with
# ReLU, max pooling, BatchNorm and He init (model.py).
RECIPES = ("d2l", "modern")
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
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides what a training run computes.

    `devices=None` means every available device. The global batch is split
    evenly over the devices, so the same seed and batch give the same
    computation whatever the device count.
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    devices: int | None = None
    batch_size: int = 128
    epochs: int = 10
    learning_rate: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    seed: int = 0
    # The modern parts; the d2l defaults leave the seed's computation unchanged.
    recipe: str = "d2l"
    schedule: str = "constant"  # of the learning rate: warm-up + cosine, or one-cycle
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    label_smoothing: float = 0.0
    augment: bool = False  # random 28x28 crops of the 2-pixel-padded image, flips
    eval_batch_size: int = 1000
    train_limit: int | None = None
    workdir: str = "runs/lenet"
    # Checkpointing: always at epoch ends (unless off), and every K steps if K > 0.
    checkpoint: bool = True
    save_every_steps: int = 0
    keep_checkpoints: int = 3

    def replace(self, **overrides: Any) -> "Config":
        """Apply overrides, ignoring the ones left unset (None) by the CLI."""
        return dataclasses.replace(
            self, **{k: v for k, v in overrides.items() if v is not None}
        )

    def validate(self) -> "Config":
        if self.dataset not in DATASETS:
            raise UserError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        for name, choices in (("recipe", RECIPES), ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; choose one of "
                                f"{', '.join(choices)}")
        if self.weight_decay and self.optimizer != "adamw":
            raise UserError("--weight-decay needs --optimizer adamw (decoupled decay)")
        if self.warmup_epochs and self.schedule != "cosine":
            raise UserError("--warmup-epochs needs --schedule cosine")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise UserError(f"{option(name)} must be in {low}..{high}, got {value}")
        for name, (low, high, low_open, high_open) in FLOAT_RANGES.items():
            value = getattr(self, name)
            inside = ((low < value if low_open else low <= value)
                      and (value < high if high_open else value <= high))
            if not (math.isfinite(value) and inside):
                span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise UserError(f"{option(name)} must be a finite number in {span}, "
                                f"got {value}")
        if self.train_limit is not None and self.train_limit < self.batch_size:
            raise UserError(
                f"--train-limit {self.train_limit} is smaller than one batch "
                f"({self.batch_size}); raise it or lower --batch-size"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, Config] = {
    # The d2l chapter's recipe: SGD lr 0.1, batch 128, 10 epochs.
    "d2l": Config(),
    # The same skeleton as the seed's table of thirty years of changes has it, trained
    # as one would now: AdamW with warm-up + cosine decay, label smoothing, crops and
    # flips done on the devices.
    "modern": Config(recipe="modern", optimizer="adamw", learning_rate=0.003,
                     schedule="cosine", warmup_epochs=1.0, weight_decay=0.0005,
                     label_smoothing=0.1, augment=True, workdir="runs/modern"),
    # A run that shows learning in seconds on a CPU: a 2,000-image slice and
    # Adam, because the seed's sigmoids sit on a loss plateau for ~4 epochs.
    "smoke": Config(epochs=2, train_limit=2000, optimizer="adam",
                    learning_rate=0.003, batch_size=16, workdir="runs/smoke"),
}


def option(field: str) -> str:
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
