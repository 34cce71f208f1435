"""Throughput benchmark: each device count trains in a fresh process (the CPU
device count is fixed when JAX starts), rounds interleaved so that the host's
noise hits every configuration alike. Reads the runs' own metrics.jsonl."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from lenet_dist.errors import Failure, UserError


def steady_figures(metrics_file: Path) -> tuple[float, float]:
    """Over the epochs after the first (which compiles): median training images/s,
    and median wall seconds from one epoch's end to the next (train + eval + save)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    rate = statistics.median(r["images_per_sec"] for r in rows[1:])
    wall = statistics.median(b["time"] - a["time"] for a, b in zip(rows, rows[1:]))
    return rate, wall


def run_once(devices: int, epochs: int, batch_size: int, data_dir: str | None,
             workdir: Path, extra: Sequence[str] = ()) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "lenet_dist", "train", "--devices", str(devices),
           "--epochs", str(epochs), "--batch-size", str(batch_size), "--no-progress",
           "--workdir", str(workdir), *extra]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=die_with_parent)
    try:
        _, err = proc.communicate()
    finally:  # Ctrl-C or an error here: the run must not outlive the benchmark
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        last = (err.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        error = UserError if proc.returncode == 2 else Failure
        raise error(f"benchmark run with --devices {devices} failed: {last}")
    return steady_figures(workdir / "metrics.jsonl")


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the benchmark dies, even by kill -9
    (Linux's PR_SET_PDEATHSIG; elsewhere the `finally` above is all there is)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def bench_training(device_counts: Sequence[int], epochs: int, rounds: int, batch_size: int,
                   data_dir: str | None, echo: Callable[[str], None] = print,
                   checkpoint_cost: bool = False) -> dict:
    """Compare device counts (checkpointing off); with `checkpoint_cost`, compare
    checkpointing on vs off on the first device count instead."""
    n0 = device_counts[0]
    if checkpoint_cost:
        variants = {"checkpoint off": (n0, ["--no-checkpoint"]),
                    "checkpoint on (every epoch)": (n0, [])}
    else:
        variants = {f"--devices {n}": (n, ["--no-checkpoint"]) for n in device_counts}
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, (name, (n, extra)) in enumerate(variants.items()):
                fig = run_once(n, epochs, batch_size, data_dir, Path(tmp) / f"r{r}-v{i}", extra)
                figures[name].append(fig)
                echo(f"round {r + 1}: {name}: {fig[0]:,.0f} img/s training, "
                     f"{fig[1]:.2f} s per epoch end to end")
    first = next(iter(figures))
    medians = {name: (statistics.median(f[0] for f in v), statistics.median(f[1] for f in v))
               for name, v in figures.items()}
    echo(f"steady state (batch {batch_size}, median of {rounds} rounds x {epochs - 1} epochs):")
    for name, (rate, wall) in medians.items():
        echo(f"  {name}: {rate:,.0f} img/s training ({rate / medians[first][0]:.2f}x); "
             f"{wall:.2f} s per epoch with eval and saves ({wall / medians[first][1]:.2f}x)")
    return medians


def _timed(fn, x, seconds: float) -> list[float]:
    """Per-call wall times of fn(x) for about `seconds` (at least 20 calls)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return times


def bench_serving(workdir: str | None, batch_size: int = 256, rounds: int = 3,
                  seconds: float = 2.0, echo: Callable[[str], None] = print) -> dict:
    """SavedModel (TensorFlow) vs the jitted JAX forward, in one process on one device:
    images/s at `batch_size` and batch-1 latency, rounds interleaved. Each call includes
    moving the input in and the outputs back to numpy, as a server would."""
    import jax
    import numpy as np

    from lenet_dist import export as export_lib
    from lenet_dist import serialization
    from lenet_dist.data import CLASS_NAMES
    from lenet_dist.model import init_params
    from lenet_dist.runtime import import_tensorflow
    from lenet_dist.step import infer

    tf = import_tensorflow()
    if workdir:
        from lenet_dist.evaluate import restore_params
        from lenet_dist.mesh import Shardings, make_mesh

        params = restore_params(workdir, None, False, Shardings(make_mesh(1)))[0]
    else:
        params = init_params(jax.random.key(0))  # speed does not depend on the weights
    params = jax.device_get(params)
    forward = jax.jit(infer)

    def run_jax(x):
        return jax.device_get(forward(params, x))

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_lib.save_savedmodel(
            tf, params, Path(tmp), ("cpu",), CLASS_NAMES["fashion_mnist"],
            serialization.installed_plan())
        served = tf.saved_model.load(str(model_dir)).signatures[export_lib.SIGNATURE]

        def run_tf(x):
            return {k: v.numpy() for k, v in served(images=tf.constant(x)).items()}

        # TF Serving's own path: the SignatureDef's tensors run in a TF1 session.
        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph)
        with graph.as_default():
            sig = tf.compat.v1.saved_model.loader.load(
                session, ["serve"], str(model_dir)).signature_def[export_lib.SIGNATURE]
        feed = sig.inputs[export_lib.INPUT_NAME].name
        fetch = {k: v.name for k, v in sig.outputs.items()}

        def run_session(x):
            return session.run(fetch, {feed: x})

        rng = np.random.default_rng(0)
        big = rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8)
        one = big[:1]
        runners = {"JAX jit": run_jax, "SavedModel": run_tf, "TF1 session": run_session}
        for fn in runners.values():  # compile both shapes outside the timing
            fn(big), fn(one)
        rates: dict[str, list[float]] = {k: [] for k in runners}
        lat: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(rounds):
            for name, fn in runners.items():
                rates[name].append(batch_size / statistics.median(_timed(fn, big, seconds)))
                lat[name].extend(_timed(fn, one, seconds / 2))
            echo(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} img/s"
                                                for k, v in rates.items()))
        session.close()
    result = {}
    for name in runners:
        ms = sorted(t * 1e3 for t in lat[name])
        result[name] = {"images_per_sec": statistics.median(rates[name]),
                        "latency_ms_p50": ms[len(ms) // 2],
                        "latency_ms_p90": ms[int(len(ms) * 0.9)]}
    base = result["JAX jit"]["images_per_sec"]
    echo(f"inference on {jax.devices()[0].platform} (batch {batch_size}, median of "
         f"{rounds} rounds; batch-1 latency over {len(lat['JAX jit']):,} calls):")
    for name, r in result.items():
        echo(f"  {name:<11}  {r['images_per_sec']:>9,.0f} img/s ({r['images_per_sec'] / base:.2f}x)"
             f"   batch-1 latency p50 {r['latency_ms_p50']:.3f} ms, "
             f"p90 {r['latency_ms_p90']:.3f} ms")
    return result
