"""The dataset on the devices: placed once, shuffled per epoch on device.

Each epoch's order is `permutation(fold_in(key(seed), epoch))`, independent of
the device count, so every global batch holds the same images on 1 or 8
devices. Arrays are built with `make_array_from_callback`, which only asks
this process for its own devices' pieces: the same code serves multi-host.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import numpy as np

from lenet_dist import data as data_lib
from lenet_dist import distributed
from lenet_dist.config import Config
from lenet_dist.data import Split
from lenet_dist.errors import UserError
from lenet_dist.mesh import Shardings, check_batch


def put(array: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


@dataclasses.dataclass(frozen=True)
class TrainFeed:
    images: jax.Array  # uint8 [n, 28, 28, 1], replicated
    labels: jax.Array  # int32 [n], replicated
    batch_size: int
    steps_per_epoch: int
    shuffle: Callable  # jitted (images, labels, key, epoch) -> [steps, batch, ...] arrays

    def epoch(self, seed: int, epoch: int) -> tuple[jax.Array, jax.Array]:
        """[steps, batch, ...] arrays for `epoch`, each step's batch split over "data"."""
        return self.shuffle(self.images, self.labels, jax.random.key(seed), epoch)


def _shuffle(images, labels, key, epoch, *, steps, batch):
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), labels.shape[0])
    take = perm[: steps * batch]
    xs = images[take].reshape(steps, batch, *images.shape[1:])
    ys = labels[take].reshape(steps, batch)
    return xs, ys


def train_feed(split: Split, batch_size: int, shardings: Shardings) -> TrainFeed:
    """Put the training split on the devices. The last partial batch is dropped."""
    check_batch(batch_size, shardings.size)
    steps = len(split) // batch_size
    if steps == 0:
        raise UserError(f"{len(split)} training images is less than one batch of {batch_size}")
    shuffle = jax.jit(partial(_shuffle, steps=steps, batch=batch_size),
                      in_shardings=(shardings.replicated,) * 4,
                      out_shardings=(shardings.stacked_batches,) * 2)
    return TrainFeed(put(split.images, shardings.replicated),
                     put(split.labels, shardings.replicated), batch_size, steps, shuffle)


@dataclasses.dataclass(frozen=True)
class EvalFeed:
    images: jax.Array  # uint8 [batches, batch, 28, 28, 1]
    labels: jax.Array  # int32 [batches, batch]
    mask: jax.Array    # bool  [batches, batch]: False on padding
    size: int          # real examples

    @property
    def num_batches(self) -> int:
        return self.images.shape[0]


def eval_feed(split: Split, batch_size: int, shardings: Shardings) -> EvalFeed:
    """The whole split, padded to full batches and masked, so every image counts once."""
    devices = shardings.size
    batch = -(-batch_size // devices) * devices  # round up to a multiple of the devices
    batches = max(1, -(-len(split) // batch))
    pad = batches * batch - len(split)
    images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
    labels = np.concatenate([split.labels, np.zeros(pad, np.int32)])
    mask = np.arange(batches * batch) < len(split)
    shape = (batches, batch)
    stacked = shardings.stacked_batches
    return EvalFeed(put(images.reshape(*shape, *images.shape[1:]), stacked),
                    put(labels.reshape(shape), stacked), put(mask.reshape(shape), stacked),
                    len(split))


@dataclasses.dataclass(frozen=True)
class Feeds:
    """The run's data on the devices: every process holds the same."""

    train: TrainFeed
    test: EvalFeed
    validation: EvalFeed | None
    train_images: int
    validation_images: int

    @property
    def eval_images(self) -> int:
        """What one evaluation reads: the test set and the validation split."""
        return self.test.size + (self.validation.size if self.validation else 0)


def make_feeds(config: Config, dataset: data_lib.Dataset, shardings: Shardings) -> Feeds:
    """Host uint8 arrays -> device-resident feeds. The validation images come out of the
    training split (the seed says which) before --train-limit takes its first N."""
    train_split, validation_split = data_lib.hold_out(
        dataset.train, config.validation_images(len(dataset.train)), config.seed)
    train_split = train_split.take(config.train_limit)
    names = np.frombuffer("\n".join(dataset.class_names).encode(), np.uint8)
    distributed.check_same_data((train_split.images, train_split.labels, dataset.test.images,
                                 dataset.test.labels, validation_split.labels, names),
                                dataset.source)
    validation = eval_feed(validation_split, config.eval_batch_size, shardings) \
        if config.validation else None
    return Feeds(train=train_feed(train_split, config.batch_size, shardings),
                 test=eval_feed(dataset.test, config.eval_batch_size, shardings),
                 validation=validation, train_images=len(train_split),
                 validation_images=len(validation_split))
