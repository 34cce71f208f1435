"""The seed's LeNet-5 in Flax, layer for layer (d2l "Convolutional Neural Networks")."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28, 1)


def _avg_pool(x):
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


def _flatten(x):
    return x.reshape((x.shape[0], -1))


class LeNet(nn.Module):
    """Conv 6@5x5 SAME, sigmoid, avgpool, Conv 16@5x5 VALID, sigmoid, avgpool,
    flatten 400, Dense 120/84/10 with sigmoids between; Xavier-uniform kernels.

    Input: float32 NHWC in [0, 1]. Output: logits [batch, 10].
    """

    num_classes: int = NUM_CLASSES

    def setup(self):
        init = nn.initializers.xavier_uniform()
        self.layers: Sequence = (
            nn.Conv(6, (5, 5), padding="SAME", kernel_init=init), nn.sigmoid, _avg_pool,
            nn.Conv(16, (5, 5), padding="VALID", kernel_init=init), nn.sigmoid, _avg_pool,
            _flatten,
            nn.Dense(120, kernel_init=init), nn.sigmoid,
            nn.Dense(84, kernel_init=init), nn.sigmoid,
            nn.Dense(self.num_classes, kernel_init=init),
        )

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def layer_name(layer) -> str:
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return {nn.sigmoid: "Sigmoid", _avg_pool: "AvgPool", _flatten: "Flatten"}.get(
        layer, getattr(layer, "__name__", "?"))


def init_params(key: jax.Array, model: LeNet | None = None):
    model = model or LeNet()
    return model.init(key, jnp.zeros(INPUT_SHAPE, jnp.float32))["params"]


def param_count(params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


def layer_summary(input_shape=INPUT_SHAPE, key=None) -> list[tuple[str, tuple[int, ...]]]:
    """(layer name, output shape) for every layer, as the seed's layer_summary prints."""
    model = LeNet()
    key = jax.random.key(0) if key is None else key
    params = init_params(key, model)
    bound = model.bind({"params": params})
    x = jnp.zeros(input_shape, jnp.float32)
    rows = []
    for layer in bound.layers:
        x = layer(x)
        rows.append((layer_name(layer), tuple(x.shape)))
    return rows
