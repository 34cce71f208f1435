"""Pure train and eval steps, and the one place that jits them with shardings.

Steps take uint8 images and convert them on the device. Metrics are sums
(loss * n, correct, n) so they add up exactly across batches and devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lenet_dist import model as model_lib
from lenet_dist import runtime
from lenet_dist.config import Config
from lenet_dist.mesh import Shardings
from lenet_dist.state import BNTrainState, TrainState, abstract_state, state_shardings

PAD = 2  # augmentation: random 28x28 crops of the image padded by 2 pixels


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]; runs on the device."""
    return images.astype(jnp.float32) / 255.0


def augment(images: jax.Array, key: jax.Array) -> jax.Array:
    """Random crops (pad 2, crop 28x28) and horizontal flips, per image, on the devices.

    The key depends only on (seed, global step), and JAX's partitionable threefry
    draws the same numbers however the batch is sharded: a resumed run, or another
    device count, sees exactly the same augmented images."""
    n, h, w, _ = images.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    dy = jax.random.randint(k_y, (n,), 0, 2 * PAD + 1)
    dx = jax.random.randint(k_x, (n,), 0, 2 * PAD + 1)
    flip = jax.random.bernoulli(k_f, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    rows = dy[:, None] + jnp.arange(h)[None, :]  # [n, h]
    cols = dx[:, None] + jnp.arange(w)[None, :]  # [n, w]
    cols = jnp.where(flip[:, None], cols[:, ::-1], cols)
    return padded[jnp.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def zero_metrics() -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros((), jnp.float32),
            "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32)}


def _metrics(logits, labels, mask=None) -> dict[str, jax.Array]:
    """Plain cross-entropy and accuracy (also under label smoothing: comparable runs)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hits = jnp.argmax(logits, -1) == labels
    if mask is None:
        mask = jnp.ones_like(labels, jnp.bool_)
    return {"loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
            # Summed in float32 (exact below 2**24 per batch) so that its cross-device sum
            # joins the gradients' all-reduce: an int32 one was a rendezvous of its own in
            # mid-step, measured at 8-16% of a step on 8 simulated devices.
            "correct": jnp.sum(hits & mask, dtype=jnp.float32).astype(jnp.int32),
            "count": jnp.sum(mask, dtype=jnp.float32).astype(jnp.int32)}


def train_step(state: TrainState, images, labels, tx, config: Config = Config(),
               model: nn.Module | None = None) -> tuple[TrainState, dict]:
    """One optimizer step on the mean softmax cross-entropy of the global batch
    (label-smoothed if asked), after on-device augmentation if asked. BatchNorm
    recipes normalise with the global batch's statistics and update running ones.
    `model` defaults to the config's network with the default class count."""
    model = model or model_lib.build(config.network)
    model_lib.check_variables(model, state.variables)  # at trace time: shapes only
    if config.augment:
        key = jax.random.fold_in(jax.random.key(config.seed), state.step)
        images = augment(images, key)
    x = preprocess(images)
    has_bn = isinstance(state, BNTrainState)

    def loss_fn(params):
        variables = {**state.variables, "params": params}
        if has_bn:
            logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            logits, updated = model.apply(variables, x), {}
        if config.label_smoothing:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]),
                                          config.label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updated)

    (_, (logits, updated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if has_bn:
        new_state = new_state.replace(batch_stats=updated["batch_stats"])
    return new_state, _metrics(logits, labels)


def eval_step(model: nn.Module, variables, images, labels, mask) -> dict:
    model_lib.check_variables(model, variables)
    logits = model.apply(variables, preprocess(images))
    return _metrics(logits, labels, mask)


def logits_of(model: nn.Module, variables, images) -> jax.Array:
    """`forward`'s logits alone: what export serializes (TensorFlow adds the softmax and
    argmax, which the TFLite converter can read; a JAX argmax it cannot). `variables` is
    {"params": ...} (plus "batch_stats"), or a bare params tree."""
    if "params" not in variables:
        variables = {"params": variables}
    model_lib.check_variables(model, variables)  # at trace time: shapes only
    return model.apply(variables, preprocess(images))


def outputs_of(model: nn.Module, variables, images) -> dict[str, jax.Array]:
    """What a served model answers for uint8 images: logits, softmax, argmax."""
    logits = logits_of(model, variables, images)
    return {"logits": logits, "probabilities": jax.nn.softmax(logits),
            "classes": jnp.argmax(logits, axis=-1)}


@functools.cache
def forward_for(network: str, num_classes: int = model_lib.NUM_CLASSES) -> Callable:
    """`forward(variables, uint8 images) -> {"logits", "probabilities", "classes"}`,
    jitted once per (network, class count) for the whole process: evaluation, predict,
    the API, export's reference and training's image grid share one compiled forward.
    No shardings: it runs where its inputs are."""
    return jax.jit(functools.partial(outputs_of, model_lib.build(network, num_classes)))


def _add(sums, new):
    return jax.tree.map(jnp.add, sums, new)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted steps for one mesh.

    `train(state, sums, xs, ys, i)` runs step i of an epoch stored on the
    devices as [steps, batch, ...] and adds its metrics to the metric sums `sums`;
    state is donated. `evaluate(variables, sums, xs, ys, mask, i)` does the same for
    eval. Sums start from `zeros()`, so every call sees the same placements and each
    function compiles exactly once.
    """

    train: Callable
    evaluate: Callable
    zeros: Callable  # () -> metric sums, all zero, already placed on the mesh
    # () -> `checkpoint_tree` of ShapeDtypeStructs with this mesh's shardings
    abstract: Callable
    # (variables, uint8 images) -> {"logits", "probabilities", "classes"}: `forward_for`'s
    # jitted forward of this run's model, unsharded (predict, export, the image grid)
    forward: Callable
    model: nn.Module  # the run's model: the config's network, the dataset's class count


def build_steps(tx: optax.GradientTransformation, shardings: Shardings,
                config: Config = Config(), num_classes: int = model_lib.NUM_CLASSES) -> Steps:
    """Every sharding decision for the steps, in one place; `config` gives the network
    (model, augmentation, label smoothing, seed of the augmentation), `num_classes` the
    width of the model's head (the dataset's class count). The model is built from these
    two, never guessed from a checkpoint's variables."""
    model = model_lib.build(config.network, num_classes)
    state_shapes = abstract_state(tx, config.network, num_classes)
    state_sh = state_shardings(shardings, state_shapes)
    rep = shardings.replicated
    stacked = shardings.stacked_batches
    metrics_sh = jax.tree.map(lambda _: rep, zero_metrics())

    def train_at(state, sums, xs, ys, i):
        images = jax.lax.with_sharding_constraint(xs[i], shardings.batch)
        labels = jax.lax.with_sharding_constraint(ys[i], shardings.batch)
        state, metrics = train_step(state, images, labels, tx, config, model)
        return state, _add(sums, metrics)

    def eval_at(variables, sums, xs, ys, mask, i):
        return _add(sums, eval_step(model, variables, xs[i], ys[i], mask[i]))

    platform = shardings.mesh.devices.flat[0].platform
    train = jax.jit(
        train_at,
        in_shardings=(state_sh, metrics_sh, stacked, stacked, rep),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=(0,),
        # per-recipe XLA:CPU options, measured (runtime.CPU_TRAIN_OPTIONS)
        compiler_options=runtime.train_compiler_options(config.network, platform),
    )
    evaluate = jax.jit(
        eval_at,
        in_shardings=(state_sh.variables, metrics_sh, stacked, stacked, stacked, rep),
        out_shardings=metrics_sh,
    )
    zeros = jax.jit(zero_metrics, out_shardings=metrics_sh)

    def abstract():
        attach = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
        return checkpoint_tree(jax.tree.map(attach, state_shapes, state_sh),
                               jax.tree.map(attach, jax.eval_shape(zero_metrics), metrics_sh))

    return Steps(train=train, evaluate=evaluate, zeros=zeros, abstract=abstract,
                 forward=forward_for(config.network, num_classes), model=model)


# The metric sums' key in a checkpoint's tree, as every saved checkpoint spells it.
SUMS_KEY = "acc"


def checkpoint_tree(state, sums) -> dict:
    """What a checkpoint holds on the devices: the train state and the partial
    epoch's metric sums (`from_checkpoint_tree` takes it apart)."""
    return {"state": state, SUMS_KEY: sums}


def from_checkpoint_tree(tree: dict) -> tuple:
    """(state, sums) of a restored `checkpoint_tree`."""
    return tree["state"], tree[SUMS_KEY]


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no leaf holds a NaN or an infinity (checked before every save)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def summarize(sums: dict) -> dict[str, float]:
    """Device sums -> host floats (one transfer per epoch)."""
    sums = jax.device_get(sums)
    n = max(int(sums["count"]), 1)
    return {"loss": float(sums["loss_sum"]) / n, "accuracy": int(sums["correct"]) / n,
            "count": int(sums["count"])}

