"""GPU training throughput of LeNet-5, the whole dataset on the device: lenet-dist's own
per-step loop (fp32), and one dispatch per epoch (`lax.scan` over the same train step)
in fp32 and in bf16 mixed precision (bf16 compute, fp32 master weights), for batch 256
to 65,536. Prints a table, writes JSON to $OUT (or the current directory).

    PYTHONPATH=. python benchmarks/gpu_check.py [--recipe d2l|modern] [--epochs 3]
    PYTHONPATH=. python benchmarks/gpu_check.py --diagnose 16384,65536   # bf16 vs fp32

No lenet-dist install is needed: it imports the package from the checkout. Images/s are
the median over the timed epochs, after a warm-up epoch; the scan variants are compiled
ahead of time, so their compile time is recorded apart from the first epoch's run time.
Every timed epoch's rate is kept in the JSON, not only the median. `--deadline` (a Unix
time) skips the configurations that would not finish before it; `benchmarks/gpu_check.sh`
sets it from its time budget.

`--diagnose B1,B2` records, for the scan step in fp32 and bf16 at those batches: compile
seconds, the time of each of 8 single steps (one dispatch each), XLA's cost and memory
analyses, a count of the compiled HLO's instructions by kind (convolutions, transposes,
copies, converts, reduce-windows, custom calls; on GPU the cuDNN convolutions with their
algorithm), the compiled HLO text itself under $OUT/hlo/, and a profiler trace of 2 steps
at the largest batch under $OUT/profile/. That is
what tells the hypotheses for the bf16 slowdown at batch 65,536 apart (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
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
VARIANTS = ("loop_fp32", "scan_fp32", "scan_bf16")


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
    model = model_lib.build(config.network)
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


def timed_epochs(run_epoch, epochs: int, images_per_epoch: int) -> tuple[float, list[float]]:
    """(first epoch seconds, images/s of each later epoch)."""
    t = time.perf_counter()
    run_epoch(0)
    first = time.perf_counter() - t
    rates = []
    for e in range(1, epochs + 1):
        t = time.perf_counter()
        run_epoch(e)
        rates.append(images_per_epoch / (time.perf_counter() - t))
    return first, rates


def step_fns(tx, config):
    return {"scan_fp32": lambda s, x, y: train_step(s, x, y, tx, config),
            "scan_bf16": lambda s, x, y: bf16_step(s, x, y, tx, config)}


def scan_epoch_fn(step_fn):
    def epoch_fn(state, xs, ys):
        def body(state, xy):
            state, out = step_fn(state, *xy)
            # train_step sums the batch's losses (for exact sharded means); report the mean
            # as bf16_step does, so the two final losses compare
            return state, (out["loss_sum"] / xy[1].shape[0] if isinstance(out, dict) else out)
        return jax.lax.scan(body, state, (xs, ys))
    return epoch_fn


def hlo_summary(text: str) -> dict:
    """Instruction counts by opcode, custom-call targets, and the convolutions' lines
    (shapes, layouts and, on GPU, the cuDNN algorithm in backend_config), of compiled
    HLO text. Works on any backend's text: on CPU there are no cuDNN calls."""
    ops = collections.Counter()
    targets = collections.Counter()
    convs = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][\w\-]*)\(", line)
        if not m:
            continue
        ops[m.group(2)] += 1
        t = re.search(r'custom_call_target="([^"]+)"', line)
        if t:
            targets[t.group(1)] += 1
        if m.group(2) == "convolution" or (t and "conv" in t.group(1).lower()):
            convs.append(line.strip()[:2000])
    keep = ("convolution", "custom-call", "transpose", "copy", "convert", "fusion",
            "reduce", "reduce-window", "select-and-scatter", "while", "all-reduce")
    return {"instructions": sum(ops.values()),
            "ops": {k: ops[k] for k in keep if ops[k]},
            "custom_call_targets": dict(targets), "convolutions": convs}


def top_kernels(profile_dir: str, steps: int, n: int = 5) -> list[dict]:
    """The `n` device kernels with the most time in a jax.profiler trace, per step, with
    the HLO instruction each ran for: the line that names a slow cuDNN algorithm. Only
    events of processes named /device:* count (none on the CPU)."""
    paths = glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    if not paths:
        return []
    with gzip.open(max(paths)) as f:
        events = json.load(f)["traceEvents"]
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") ==
               "process_name" and e["args"]["name"].startswith("/device:")}
    total = collections.Counter()
    where = {}
    for e in events:
        if e.get("ph") == "X" and e["pid"] in devices:
            total[e["name"]] += e["dur"]
            where.setdefault(e["name"], {}).update(
                {k: e["args"][k] for k in ("hlo_op", "kernel_details") if k in e.get("args", {})})
    device_us = sum(total.values())
    return [{"kernel": k[:200], "ms_per_step": us / 1e3 / steps,
             "share": us / device_us, **where[k]} for k, us in total.most_common(n)]


def analyses(compiled) -> dict:
    out = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out["cost"] = {k: float(v) for k, v in (cost or {}).items()
                       if k in ("flops", "bytes accessed", "transcendentals")}
    except Exception as e:  # not every backend has it
        out["cost"] = f"unavailable: {e}"
    try:
        mem = compiled.memory_analysis()
        out["memory_bytes"] = {k: int(getattr(mem, k)) for k in (
            "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
            if hasattr(mem, k)}
    except Exception as e:
        out["memory_bytes"] = f"unavailable: {e}"
    return out


def emit(kind: str, record: dict) -> None:
    """One machine-readable line per result, for gpu_check.sh's driver."""
    print("RESULT " + json.dumps({"kind": kind, **record}), flush=True)


def diagnose(args, shardings, out_dir: str) -> list[dict]:
    """fp32 vs bf16 scan step at each batch: compile time, per-step times, HLO summary."""
    records = []
    os.makedirs(os.path.join(out_dir, "hlo"), exist_ok=True)
    for batch in map(int, args.diagnose.split(",")):
        if args.deadline and time.time() + 30 + batch / 2000 > args.deadline:
            emit("skipped", {"what": f"diagnose batch {batch}", "why": "time budget"})
            continue
        split, _ = dataset(4 * batch)
        config = PRESETS[args.recipe].replace(batch_size=batch, augment=False)
        feed = train_feed(split, batch, shardings)
        tx = make_optimizer(config, feed.steps_per_epoch)
        xs, ys = feed.epoch(0, 0)
        for name, step_fn in step_fns(tx, config).items():
            state = create_state(0, tx, shardings, config.network)
            t = time.perf_counter()
            lowered = jax.jit(scan_epoch_fn(step_fn), donate_argnums=0).lower(state, xs, ys)
            t_lower = time.perf_counter() - t
            t = time.perf_counter()
            compiled = lowered.compile()
            t_compile = time.perf_counter() - t
            text = compiled.as_text() or ""
            path = os.path.join(out_dir, "hlo", f"{args.recipe}_{name}_b{batch}_scan.txt")
            with open(path, "w") as f:
                f.write(text)
            # single steps, one dispatch each: the distribution a scan epoch hides
            one = jax.jit(step_fn, donate_argnums=0)
            state = create_state(0, tx, shardings, config.network)
            t = time.perf_counter()
            one_c = one.lower(state, xs[0], ys[0]).compile()
            t_compile_step = time.perf_counter() - t
            with open(path.replace("_scan.txt", "_step.txt"), "w") as f:
                f.write(one_c.as_text() or "")
            steps = []
            for i in range(args.diagnose_steps):
                x, y = xs[i % feed.steps_per_epoch], ys[i % feed.steps_per_epoch]
                jax.block_until_ready((x, y))
                t = time.perf_counter()
                state, out = one_c(state, x, y)
                jax.block_until_ready(out)
                steps.append(time.perf_counter() - t)
            profile = ""
            if args.profile and batch == max(map(int, args.diagnose.split(","))):
                # a trace of 2 steps: per-kernel times (open with xprof / TensorBoard)
                profile = os.path.join(out_dir, "profile", f"{args.recipe}_{name}_b{batch}")
                try:
                    with jax.profiler.trace(profile):
                        for i in range(2):
                            state, out = one_c(state, xs[i], ys[i])
                        jax.block_until_ready(out)
                except Exception as e:  # no profiler support here: keep the rest
                    profile = f"failed: {e}"
            kernels = []
            if profile and not profile.startswith("failed"):
                kernels = top_kernels(profile, steps=2)
                profile = os.path.relpath(profile, out_dir)
            rec = {"recipe": args.recipe, "batch": batch, "variant": name, "profile": profile,
                   "top_kernels": kernels,
                   "lower_s": t_lower, "compile_scan_s": t_compile,
                   "compile_step_s": t_compile_step, "step_s": steps,
                   "step_images_per_sec_median": batch / statistics.median(steps),
                   "hlo_scan": hlo_summary(text), "hlo_step": hlo_summary(one_c.as_text() or ""),
                   "hlo_file": os.path.relpath(path, out_dir), **analyses(compiled)}
            records.append(rec)
            emit("diagnose", rec)
            ops = rec["hlo_scan"]["ops"]
            print(f"diagnose b{batch} {name}: compile {t_compile:.1f} s, steps "
                  f"{', '.join(f'{s * 1e3:.1f}' for s in steps)} ms; HLO {ops}", flush=True)
            for k in kernels:
                print(f"  {k['ms_per_step']:8.2f} ms/step {k['share']:4.0%} "
                      f"{k.get('hlo_op', '?')}: {k['kernel'][:90]}", flush=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="d2l", choices=("d2l", "modern"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"any of {','.join(VARIANTS)}")
    ap.add_argument("--images", type=int, default=60000,
                    help="training images per epoch (at least 4 batches); small for a smoke test")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="Unix time: skip configurations that would end after it (0: none)")
    ap.add_argument("--diagnose", default="",
                    help="batches for the fp32-vs-bf16 diagnosis (compile, steps, HLO); "
                         "with it, only the diagnosis runs")
    ap.add_argument("--diagnose-steps", type=int, default=8)
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="no profiler trace of 2 steps at the largest --diagnose batch")
    ap.add_argument("--tag", default="", help="suffix of the JSON file's name")
    args = ap.parse_args()
    device = jax.devices()[0]
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"recipe {args.recipe}", flush=True)
    out = os.environ.get("OUT", ".")
    meta = {"device": device.device_kind, "platform": device.platform,
            "jax": jax.__version__, "recipe": args.recipe}
    shardings = Shardings(make_mesh(1))
    if args.diagnose:
        records = diagnose(args, shardings, out)
        with open(os.path.join(out, f"gpu_diagnose_{args.recipe}{args.tag}.json"), "w") as f:
            json.dump({**meta, "diagnose": records}, f, indent=2)
        return
    variants = args.variants.split(",")
    rows = []
    last_cost = 0.0
    for batch in map(int, args.batches.split(",")):
        # a configuration costs at least what the previous, smaller one did
        if args.deadline and time.time() + max(10.0, 1.5 * last_cost) > args.deadline:
            emit("skipped", {"recipe": args.recipe, "batch": batch, "why": "time budget"})
            print(f"batch {batch:>6}: skipped, the time budget is near", flush=True)
            continue
        t_config = time.perf_counter()
        split, source = dataset(max(args.images, 4 * batch))
        config = PRESETS[args.recipe].replace(batch_size=batch, augment=False)
        feed = train_feed(split, batch, shardings)
        spe = feed.steps_per_epoch
        tx = make_optimizer(config, spe)
        row = {"batch": batch, "images_per_epoch": spe * batch, "steps_per_epoch": spe,
               "data": source}

        if "loop_fp32" in variants:
            # 1. lenet-dist's loop: one dispatch per step, waiting one step behind.
            steps = build_steps(tx, shardings, config)
            box = {"state": create_state(0, tx, shardings, config.network)}

            def loop_epoch(e):
                xs, ys = feed.epoch(0, e)
                state, sums = box["state"], steps.zeros()
                for i in range(spe):
                    previous = sums
                    state, sums = steps.train(state, sums, xs, ys, i)
                    jax.block_until_ready(previous)
                jax.block_until_ready(sums)
                box["state"] = state

            first, rates = timed_epochs(loop_epoch, args.epochs, spe * batch)
            row.update({"loop_fp32_first_s": first, "loop_fp32_epochs": rates,
                        "loop_fp32": statistics.median(rates)})

        # 2./3. one dispatch per epoch: lax.scan over the steps, fp32 and bf16, compiled
        # ahead of time so that the compile time is known apart from the first epoch.
        for name, step_fn in step_fns(tx, config).items():
            if name not in variants:
                continue
            state = create_state(0, tx, shardings, config.network)
            xs0, ys0 = feed.epoch(0, 0)
            t = time.perf_counter()
            run = jax.jit(scan_epoch_fn(step_fn), donate_argnums=0).lower(
                state, xs0, ys0).compile()
            row[f"{name}_compile_s"] = time.perf_counter() - t
            box = {"state": state}

            def scan_epoch(e, name=name, run=run, box=box):
                xs, ys = feed.epoch(0, e)
                box["state"], losses = run(box["state"], xs, ys)
                jax.block_until_ready(losses)
                row[f"{name}_final_loss"] = float(losses[-1])

            first, rates = timed_epochs(scan_epoch, args.epochs, spe * batch)
            row.update({f"{name}_first_s": first, f"{name}_epochs": rates,
                        name: statistics.median(rates)})
        last_cost = time.perf_counter() - t_config
        row["config_s"] = last_cost
        rows.append(row)
        emit("lenet-dist", {**meta, **row})
        print(f"batch {batch:>6}: " + "   ".join(
            f"{v.replace('_', ' ')} {row[v]:>12,.0f} img/s" for v in VARIANTS if v in row)
            + "   (first epoch / compile s: " + ", ".join(
                f"{row.get(v + '_first_s', 0):.1f}"
                + (f"/{row[v + '_compile_s']:.1f}" if v + "_compile_s" in row else "")
                for v in VARIANTS if v in row) + ")", flush=True)
    with open(os.path.join(out, f"gpu_check_{args.recipe}{args.tag}.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
