"""Train-step variants timed against each other in one process: the A/B behind every
"What was tried" row of docs/benchmarks.md.

Each variant is lenet-dist's own jitted train step (step.build_steps: the run's shardings,
donated state), compiled with its own XLA compiler options and, if asked, its own batch
size; synthetic uint8 batches already on the devices. Round r times a chunk of steps of
every variant in turn (reversed on odd rounds), so the host's drift hits all alike. The
figure is the median over rounds of each variant's images/s divided by the first's in
the same round: on a shared host, separate processes differ by more than most changes.

    .venv/bin/python benchmarks/step_ab.py tuned defaults
    .venv/bin/python benchmarks/step_ab.py --recipe modern b128:batch=128 b256:batch=256
    .venv/bin/python benchmarks/step_ab.py --devices 8 tuned \\
        'ynn-off:xla_cpu_experimental_ynn_fusion_type='

A variant is NAME or NAME:KEY=VALUE,...; `tuned` is lenet-dist's options for the recipe
on this host (runtime.train_compiler_options), `defaults` is XLA's. KEY `batch` sets the
global batch; any other KEY is an XLA compiler option (true/false/integers are converted),
added to the tuned options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lenet_dist import runtime  # noqa: E402  (configure before JAX starts)


def parse_variant(text: str, recipe: str) -> dict:
    name, _, spec = text.partition(":")
    tuned = runtime.train_compiler_options(recipe, "cpu") or {}
    if name == "defaults" and not spec:
        return {"name": name, "options": None, "batch": None}
    options, batch = dict(tuned), None
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: variant {text!r}: {item!r} is not KEY=VALUE")
        if key == "batch":
            batch = int(value)
        else:
            options[key] = {"true": True, "false": False}.get(
                value.lower(), int(value) if value.lstrip("-").isdigit() else value)
    return {"name": name, "options": options or None, "batch": batch}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", help="NAME or NAME:KEY=VALUE,... (see above)")
    p.add_argument("--recipe", default="d2l", choices=("d2l", "modern"))
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="steps per chunk at --batch-size")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    variants = [parse_variant(v, args.recipe) for v in args.variants]
    if len({v["name"] for v in variants}) < len(variants):
        raise SystemExit("error: give every variant its own name")
    runtime.configure(cpu_devices=args.devices)
    chunks = {v["name"]: make_chunk(v, args) for v in variants}
    times = {name: [] for name in chunks}
    for r in range(args.rounds):
        for name in (list(chunks) if r % 2 == 0 else list(chunks)[::-1]):
            images, run = chunks[name]
            t = time.perf_counter()
            run()
            times[name].append(images / (time.perf_counter() - t))
    first = variants[0]["name"]
    print(f"{args.recipe}, {args.devices} device(s), batch {args.batch_size}, "
          f"{args.rounds} rounds; images/s median, and the median of per-round ratios "
          f"to {first}")
    for name, rates in times.items():
        ratios = [a / b for a, b in zip(rates, times[first])]
        print(f"{name:<24} {statistics.median(rates):>9,.0f} img/s  "
              f"{statistics.median(ratios):.3f}x  (rounds {min(ratios):.2f}-{max(ratios):.2f})")


def make_chunk(variant: dict, args) -> tuple[int, object]:
    """(images per chunk, a function that runs one chunk and waits for it): the run's own
    `step.build_steps`, its train step compiled with the variant's options."""
    from unittest import mock

    import jax
    import numpy as np

    from lenet_dist.config import PRESETS
    from lenet_dist.feed import put
    from lenet_dist.mesh import Shardings, check_batch, make_mesh
    from lenet_dist.state import create_state, make_optimizer
    from lenet_dist.step import build_steps

    config = PRESETS[args.recipe]
    batch = variant["batch"] or args.batch_size
    check_batch(batch, args.devices)
    steps = max(1, args.steps * args.batch_size // batch)
    sh = Shardings(make_mesh(args.devices))
    tx = make_optimizer(config, 469)
    # build_steps reads the options once, when it jits the step
    with mock.patch.object(runtime, "train_compiler_options", lambda *_: variant["options"]):
        jitted = build_steps(tx, sh, config)
    rng = np.random.default_rng(0)
    xs = put(rng.integers(0, 256, (steps, batch, 28, 28, 1), np.uint8), sh.stacked_batches)
    ys = put(rng.integers(0, 10, (steps, batch), np.int32), sh.stacked_batches)
    box = {"state": create_state(0, tx, sh, config.network)}

    def run():
        state, sums = box["state"], jitted.zeros()
        for i in range(steps):
            state, sums = jitted.train(state, sums, xs, ys, i)
        jax.block_until_ready(sums)
        box["state"] = state

    run()  # compile, warm the caches and the allocator
    return steps * batch, run


if __name__ == "__main__":
    main()
