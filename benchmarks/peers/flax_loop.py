"""Flax peer: the seed's style, one jitted train step per host batch. The model is
lenet-dist's own LeNet (same layers and init); the loop is what the seed and most
Flax tutorials write: numpy batches sliced on the host, fed to a jitted step.
Runs in lenet-dist's environment, with the same XLA:CPU flags lenet-dist sets."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import common
from lenet_dist import runtime
from lenet_dist.model import LeNet, param_count


def main() -> None:
    args = common.parse_args()
    runtime.add_xla_flags()  # what `lenet-dist train` runs with
    images, labels = common.load_train(args.data_dir)
    model = LeNet()
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=optax.sgd(common.LR))

    @jax.jit
    def step(state, x, y):
        def loss_fn(p):
            logits = state.apply_fn({"params": p}, x.astype(jnp.float32) / 255.0)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    def train_epoch(epoch: int) -> None:
        nonlocal state
        for idx in common.batches(len(labels), args.batch_size, epoch):
            state, loss = step(state, images[idx], labels[idx])
        jax.block_until_ready(state)

    common.run(f"Flax {flax.__version__}, jitted step per host batch", train_epoch,
               len(labels), args, param_count(params))


if __name__ == "__main__":
    main()
