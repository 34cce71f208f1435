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

    @property
    def variables(self) -> dict:
        """What the model applies: params, and BatchNorm statistics when it has them."""
        return {"params": self.params}


@flax.struct.dataclass
class BNTrainState(TrainState):
    """A BatchNorm recipe's state: running statistics beside the parameters. A class
    of its own keeps the d2l state's checkpoint layout exactly as it was."""

    batch_stats: Any = None

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate(config: Config, steps_per_epoch: int = 1) -> float | optax.Schedule:
    """A float for a constant rate (the optimizer state keeps the seed's layout), else
    an optax schedule over the whole run."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "cosine":
        warmup = min(int(config.warmup_epochs * steps_per_epoch), total // 2)  # short runs
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total)
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total, config.learning_rate)
    return config.learning_rate


def make_optimizer(config: Config, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """The seed's plain SGD by default; momentum, Adam and AdamW, any with a schedule."""
    lr = learning_rate(config, steps_per_epoch)
    if config.optimizer == "sgd":
        return optax.sgd(lr)
    if config.optimizer == "momentum":
        return optax.sgd(lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.adam(lr)


def init_state(key: jax.Array, tx: optax.GradientTransformation,
               network: str = "d2l", num_classes: int = model_lib.NUM_CLASSES) -> TrainState:
    variables = model_lib.init_variables(key, network, num_classes)
    params, step = variables["params"], jnp.zeros((), jnp.int32)
    if "batch_stats" in variables:
        return BNTrainState(step=step, params=params, opt_state=tx.init(params),
                            batch_stats=variables["batch_stats"])
    return TrainState(step=step, params=params, opt_state=tx.init(params))


def abstract_state(tx: optax.GradientTransformation, network: str = "d2l",
                   num_classes: int = model_lib.NUM_CLASSES) -> TrainState:
    """The state's shapes and dtypes (ShapeDtypeStructs), traced, never computed."""
    return jax.eval_shape(lambda k: init_state(k, tx, network, num_classes), jax.random.key(0))


def state_shardings(shardings: Shardings, abstract: TrainState):
    """Every leaf replicated (data parallelism)."""
    return jax.tree.map(lambda _: shardings.replicated, abstract)


def create_state(seed: int, tx: optax.GradientTransformation, shardings: Shardings,
                 network: str = "d2l", num_classes: int = model_lib.NUM_CLASSES) -> TrainState:
    """Initialise directly into the replicated placement: no host copy of the state."""
    placement = state_shardings(shardings, abstract_state(tx, network, num_classes))
    init = jax.jit(lambda k: init_state(k, tx, network, num_classes), out_shardings=placement)
    return init(jax.random.key(seed))
