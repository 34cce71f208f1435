"""Keras 3 on JAX on one GPU: the seed's LeNet-5 (benchmarks/peers/keras_lenet.py's
Sequential model: glorot-uniform weights, zero biases, SGD lr 0.1), trained with
`model.fit` as a Keras user would, one `fit` call per epoch on arrays already on the
device (uint8 images, rescaled inside the model). Per batch: a warm-up epoch (compiles),
then `--epochs` timed epochs; prints one `RESULT {json}` line each. `--dtypes bf16`
uses Keras's "mixed_bfloat16" policy (not run by default). Runs in the jax environment
that benchmarks/gpu_check.sh makes (Keras installed next to jax).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
from keras_lenet import lenet  # noqa: E402  (the same model the CPU peers train)
from worker_io import emit, images, timed_epochs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="256,1024,4096,16384,65536")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--deadline", type=float, default=0.0)
    args = ap.parse_args()
    device = jax.devices()[0]
    name = f"Keras {keras.__version__} on JAX, model.fit"
    print(f"{name}, jax {jax.__version__}, {device.device_kind} ({device.platform})",
          flush=True)
    last_cost = 0.0
    for batch in map(int, args.batches.split(",")):
        for dtype in args.dtypes.split(","):
            if args.deadline and time.time() + max(10.0, 1.5 * last_cost) > args.deadline:
                emit({"kind": "skipped", "label": "model.fit", "batch": batch, "dtype": dtype,
                      "why": "time budget"})
                print(f"batch {batch:>6} {dtype}: skipped, the time budget is near", flush=True)
                continue
            t_config = time.perf_counter()
            keras.mixed_precision.set_global_policy(
                "mixed_bfloat16" if dtype == "bf16" else "float32")
            keras.utils.set_random_seed(0)
            x_np, y_np, source = images(max(args.images, 4 * batch))
            x_all, y_all = jax.device_put(x_np), jax.device_put(y_np.astype(np.int32))
            spe = len(y_np) // batch
            model = lenet()
            model.compile(optimizer=keras.optimizers.SGD(0.1),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            shuffle = jax.jit(lambda x, y, key: (
                lambda take: (x[take], y[take]))(
                    jax.random.permutation(key, y.shape[0])[: spe * batch]))

            def epoch(e):
                xe, ye = shuffle(x_all, y_all, jax.random.key(e))
                hist = model.fit(xe, ye, batch_size=batch, epochs=1, shuffle=False, verbose=0)
                return float(hist.history["loss"][-1])  # waits for the epoch

            first, rates, final_loss = timed_epochs(epoch, args.epochs, spe * batch)
            last_cost = time.perf_counter() - t_config
            rec = {"kind": "peer", "label": "model.fit", "name": name,
                   "keras": keras.__version__, "jax": jax.__version__,
                   "device": device.device_kind, "batch": batch, "dtype": dtype,
                   "data": source, "steps_per_epoch": spe, "first_epoch_s": first,
                   "epoch_images_per_sec": rates, "images_per_sec": statistics.median(rates),
                   "final_loss": final_loss, "config_s": last_cost,
                   "parameters": int(model.count_params())}
            emit(rec)
            print(f"batch {batch:>6} {dtype}: {rec['images_per_sec']:>12,.0f} img/s "
                  f"(warm-up epoch {first:.1f} s)", flush=True)
            model = x_all = y_all = None  # free the device memory before the next


if __name__ == "__main__":
    main()
