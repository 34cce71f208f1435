"""Pure train and eval steps, and the one place that jits them with shardings.

Steps take uint8 images and convert them on the device. Metrics are sums
(loss * n, correct, n) so they add up exactly across batches and devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lenet_dist.mesh import Shardings
from lenet_dist.model import LeNet
from lenet_dist.state import TrainState, abstract_state, state_shardings

MODEL = LeNet()


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]; runs on the device."""
    return images.astype(jnp.float32) / 255.0


def zero_metrics() -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros((), jnp.float32),
            "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32)}


def _metrics(logits, labels, mask=None) -> dict[str, jax.Array]:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hits = jnp.argmax(logits, -1) == labels
    if mask is None:
        mask = jnp.ones_like(labels, jnp.bool_)
    return {"loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
            "correct": jnp.sum(hits & mask, dtype=jnp.int32),
            "count": jnp.sum(mask, dtype=jnp.int32)}


def train_step(state: TrainState, images, labels, tx) -> tuple[TrainState, dict]:
    """One SGD step on the mean softmax cross-entropy of the global batch."""

    def loss_fn(params):
        logits = MODEL.apply({"params": params}, preprocess(images))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, logits

    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, _metrics(logits, labels)


def eval_step(params, images, labels, mask) -> dict:
    logits = MODEL.apply({"params": params}, preprocess(images))
    return _metrics(logits, labels, mask)


def infer(params, images) -> dict[str, jax.Array]:
    """What a served model answers for uint8 images: the export's and predict's forward."""
    logits = MODEL.apply({"params": params}, preprocess(images))
    return {"logits": logits, "probabilities": jax.nn.softmax(logits),
            "classes": jnp.argmax(logits, axis=-1)}


def _add(acc, new):
    return jax.tree.map(jnp.add, acc, new)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted steps for one mesh.

    `train(state, acc, xs, ys, i)` runs step i of an epoch stored on the
    devices as [steps, batch, ...] and adds its metrics to `acc`; state is
    donated. `evaluate(params, acc, xs, ys, mask, i)` does the same for eval.
    Accumulators start from `zeros()`, so every call sees the same placements
    and each function compiles exactly once.
    """

    train: Callable
    evaluate: Callable
    zeros: Callable  # () -> metric accumulators, already placed on the mesh
    abstract: Callable  # () -> {"state", "acc"} ShapeDtypeStructs with this mesh's shardings


def build_steps(tx: optax.GradientTransformation, shardings: Shardings) -> Steps:
    """Every sharding decision for the steps, in one place."""
    state_shapes = abstract_state(tx)
    state_sh = state_shardings(tx, shardings, state_shapes)
    rep = shardings.replicated
    stacked = shardings.stacked_batches
    metrics_sh = jax.tree.map(lambda _: rep, zero_metrics())

    def train_at(state, acc, xs, ys, i):
        images = jax.lax.with_sharding_constraint(xs[i], shardings.batch)
        labels = jax.lax.with_sharding_constraint(ys[i], shardings.batch)
        state, metrics = train_step(state, images, labels, tx)
        return state, _add(acc, metrics)

    def eval_at(params, acc, xs, ys, mask, i):
        return _add(acc, eval_step(params, xs[i], ys[i], mask[i]))

    train = jax.jit(
        train_at,
        in_shardings=(state_sh, metrics_sh, stacked, stacked, rep),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(
        eval_at,
        in_shardings=(state_sh.params, metrics_sh, stacked, stacked, stacked, rep),
        out_shardings=metrics_sh,
    )
    zeros = jax.jit(zero_metrics, out_shardings=metrics_sh)

    def abstract():
        attach = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
        return {"state": jax.tree.map(attach, state_shapes, state_sh),
                "acc": jax.tree.map(attach, jax.eval_shape(zero_metrics), metrics_sh)}

    return Steps(train=train, evaluate=evaluate, zeros=zeros, abstract=abstract)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no leaf holds a NaN or an infinity (checked before every save)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def summarize(acc: dict) -> dict[str, float]:
    """Device sums -> host floats (one transfer per epoch)."""
    acc = jax.device_get(acc)
    n = max(int(acc["count"]), 1)
    return {"loss": float(acc["loss_sum"]) / n, "accuracy": int(acc["correct"]) / n,
            "count": int(acc["count"])}

