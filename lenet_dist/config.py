"""Run configuration: one frozen dataclass, named presets, CLI overrides on top."""

from __future__ import annotations

import dataclasses
from typing import Any

from lenet_dist.errors import UserError

DATASETS = ("fashion_mnist", "mnist")
OPTIMIZERS = ("sgd", "momentum", "adam")
# Where an exported SavedModel can run (jax2tf lowers for each; XlaCallModule picks).
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_EXPORT_PLATFORMS = ("cpu", "cuda", "tpu")


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
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        for name in ("batch_size", "epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.devices is not None and self.devices < 1:
            raise UserError("--devices must be >= 1")
        if self.train_limit is not None and self.train_limit < self.batch_size:
            raise UserError(
                f"--train-limit {self.train_limit} is smaller than one batch "
                f"({self.batch_size}); raise it or lower --batch-size"
            )
        if self.save_every_steps < 0 or self.keep_checkpoints < 1:
            raise UserError("--save-every-steps must be >= 0 and --keep-checkpoints >= 1")
        if not self.learning_rate > 0:
            raise UserError("--learning-rate must be > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, Config] = {
    # The d2l chapter's recipe: SGD lr 0.1, batch 128, 10 epochs.
    "seed": Config(),
    # A run that shows learning in seconds on a CPU: a 2,000-image slice and
    # Adam, because the seed's sigmoids sit on a loss plateau for ~4 epochs.
    "smoke": Config(epochs=2, train_limit=2000, optimizer="adam",
                    learning_rate=0.003, batch_size=16, workdir="runs/smoke"),
}


def preset(name: str) -> Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None
