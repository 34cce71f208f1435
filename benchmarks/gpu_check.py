"""GPU training throughput of LeNet-5, the whole dataset on the device: lenet-dist's own
per-step loop (fp32), and one dispatch per epoch (`lax.scan` over the same train step)
in fp32 and in bf16 mixed precision (bf16 compute, fp32 master weights), for batch 256
to 65,536. Prints a table, writes JSON to $OUT (or the current directory).

    PYTHONPATH=. python benchmarks/gpu_check.py [--recipe d2l|modern] [--epochs 3]

No lenet-dist install is needed: it imports the package from the checkout (the device
image has jax, flax, optax). Images/s are the median over the timed epochs, after a
warm-up epoch that compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lenet_dist import data as data_lib
from lenet_dist import model as model_lib
from lenet_dist.config import PRESETS
from lenet_dist.feed import train_feed
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.state import create_state, make_optimizer
from lenet_dist.step import build_steps, preprocess, train_step

BATCHES = (256, 1024, 4096, 16384, 65536)


def dataset(n: int) -> tuple[data_lib.Split, str]:
    """Fashion-MNIST's training images when present (tiled to `n`), else random pixels:
    speed does not depend on the pixels."""
    try:
        split, source = data_lib.load("fashion_mnist").train, "fashion_mnist train"
    except Exception:  # no data on the device machine: nothing can be fetched there
        rng = np.random.default_rng(0)
        split = data_lib.Split(rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8),
                               rng.integers(0, 10, 60000).astype(np.int32))
        source = "random pixels"
    reps = -(-n // len(split))
    return data_lib.Split(np.tile(split.images, (reps, 1, 1, 1))[:n],
                          np.tile(split.labels, reps)[:n]), source


def bf16_step(state, images, labels, tx, config):
    """Mixed precision: the forward and backward in bf16, the update on fp32 weights."""
    model = model_lib.build(config.recipe)
    has_bn = hasattr(state, "batch_stats")
    x16 = preprocess(images).astype(jnp.bfloat16)

    def loss_fn(params):
        variables = {**state.variables,
                     "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)}
        if has_bn:
            logits, updated = model.apply(variables, x16, train=True, mutable=["batch_stats"])
        else:
            logits, updated = model.apply(variables, x16), {}
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels).mean()
        return loss, updated

    (loss, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    if has_bn:
        state = state.replace(batch_stats=jax.tree.map(
            lambda new, old: new.astype(old.dtype), updated["batch_stats"], state.batch_stats))
    return state, loss


def timed_epochs(run_epoch, epochs: int, images_per_epoch: int) -> tuple[float, float]:
    """(compile + first epoch seconds, median images/s of the later epochs)."""
    t = time.perf_counter()
    run_epoch(0)
    first = time.perf_counter() - t
    rates = []
    for e in range(1, epochs + 1):
        t = time.perf_counter()
        run_epoch(e)
        rates.append(images_per_epoch / (time.perf_counter() - t))
    return first, statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="d2l", choices=("d2l", "modern"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--images", type=int, default=60000,
                    help="training images per epoch (at least 4 batches); small for a smoke test")
    args = ap.parse_args()
    device = jax.devices()[0]
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"recipe {args.recipe}", flush=True)
    shardings = Shardings(make_mesh(1))
    rows = []
    for batch in map(int, args.batches.split(",")):
        split, source = dataset(max(args.images, 4 * batch))
        config = PRESETS[args.recipe].replace(batch_size=batch, augment=False)
        feed = train_feed(split, batch, shardings)
        spe = feed.steps_per_epoch
        tx = make_optimizer(config, spe)
        steps = build_steps(tx, shardings, config)
        row = {"batch": batch, "images_per_epoch": spe * batch, "data": source}

        # 1. lenet-dist's loop: one dispatch per step, waiting one step behind.
        box = {"state": create_state(0, tx, shardings, config.recipe)}

        def loop_epoch(e):
            xs, ys = feed.epoch(0, e)
            state, sums = box["state"], steps.zeros()
            for i in range(spe):
                previous = sums
                state, sums = steps.train(state, sums, xs, ys, i)
                jax.block_until_ready(previous)
            jax.block_until_ready(sums)
            box["state"] = state

        row["loop_fp32_first_s"], row["loop_fp32"] = timed_epochs(loop_epoch, args.epochs,
                                                                  spe * batch)

        # 2./3. one dispatch per epoch: lax.scan over the steps, fp32 and bf16.
        for name, step_fn in (("scan_fp32", lambda s, x, y: train_step(s, x, y, tx, config)),
                              ("scan_bf16", lambda s, x, y: bf16_step(s, x, y, tx, config))):
            def epoch_fn(state, xs, ys, step_fn=step_fn):
                def body(state, xy):
                    state, out = step_fn(state, *xy)
                    return state, (out["loss_sum"] if isinstance(out, dict) else out)
                return jax.lax.scan(body, state, (xs, ys))

            run = jax.jit(epoch_fn, donate_argnums=0)
            box[name] = create_state(0, tx, shardings, config.recipe)

            def scan_epoch(e, name=name, run=run):
                xs, ys = feed.epoch(0, e)
                box[name], losses = run(box[name], xs, ys)
                jax.block_until_ready(losses)
                row[f"{name}_final_loss"] = float(losses[-1])

            row[f"{name}_first_s"], row[name] = timed_epochs(scan_epoch, args.epochs,
                                                             spe * batch)
        rows.append(row)
        print(f"batch {batch:>6}: loop fp32 {row['loop_fp32']:>12,.0f} img/s   "
              f"scan fp32 {row['scan_fp32']:>12,.0f}   scan bf16 {row['scan_bf16']:>12,.0f}"
              f"   (first epoch incl. compile {row['loop_fp32_first_s']:.1f} / "
              f"{row['scan_fp32_first_s']:.1f} / {row['scan_bf16_first_s']:.1f} s)",
              flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"gpu_check_{args.recipe}.json"), "w") as f:
        json.dump({"device": device.device_kind, "jax": jax.__version__,
                   "recipe": args.recipe, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
