"""Training state and optimizer; the state is born replicated on the mesh."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lenet_dist import model as model_lib
from lenet_dist.config import Config
from lenet_dist.mesh import Shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """The seed's plain SGD by default; momentum and Adam for quick experiments."""
    if config.optimizer == "sgd":
        return optax.sgd(config.learning_rate)
    if config.optimizer == "momentum":
        return optax.sgd(config.learning_rate, momentum=config.momentum)
    return optax.adam(config.learning_rate)


def init_state(key: jax.Array, tx: optax.GradientTransformation) -> TrainState:
    params = model_lib.init_params(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(tx: optax.GradientTransformation) -> TrainState:
    """The state's shapes and dtypes (ShapeDtypeStructs), traced, never computed."""
    return jax.eval_shape(lambda k: init_state(k, tx), jax.random.key(0))


def state_shardings(tx: optax.GradientTransformation, shardings: Shardings,
                    abstract: TrainState | None = None):
    """Every leaf replicated (data parallelism)."""
    abstract = abstract_state(tx) if abstract is None else abstract
    return jax.tree.map(lambda _: shardings.replicated, abstract)


def create_state(seed: int, tx: optax.GradientTransformation, shardings: Shardings) -> TrainState:
    """Initialise directly into the replicated placement: no host copy of the state."""
    init = jax.jit(lambda k: init_state(k, tx), out_shardings=state_shardings(tx, shardings))
    return init(jax.random.key(seed))
