"""PyTorch on one GPU: the seed's LeNet-5 (benchmarks/peers/torch_lenet.py's model:
Xavier-uniform weights, zero biases, SGD lr 0.1), eager or `torch.compile`, the whole
dataset on the device as uint8, converted to float inside the step as lenet-dist does.
Per (batch, dtype): a warm-up epoch (compiles, records CUDA graphs), then `--epochs`
timed epochs; prints one `RESULT {json}` line each. bf16 is autocast (bf16 compute,
fp32 weights and optimizer), the same split as lenet-dist's bf16 variant.

fp32 matmuls and convolutions may use TF32, as XLA's default precision does on this
GPU generation (`torch.set_float32_matmul_precision("high")`); cuDNN autotuning is on
(`cudnn.benchmark`), as a speed-minded user would set it. The epoch's shuffle is a
device gather, as in lenet-dist's feed. Runs in the torch environment that
benchmarks/gpu_check.sh makes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
from torch_lenet import lenet  # noqa: E402  (the same model the CPU peers train)
from worker_io import emit, images, timed_epochs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("eager", "compile"), default="eager")
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--batches", default="256,1024,4096,16384,65536")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--deadline", type=float, default=0.0)
    ap.add_argument("--compile-backend", default="inductor",
                    help="'eager' traces with dynamo but compiles nothing: a cheap wiring check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.benchmark = True
    name = ("PyTorch eager" if args.mode == "eager"
            else f"PyTorch torch.compile({args.compile_mode})")
    gpu = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, {gpu}", flush=True)
    label = "eager" if args.mode == "eager" else f"compile {args.compile_mode}"
    last_cost = 0.0
    for batch in map(int, args.batches.split(",")):
        for dtype in args.dtypes.split(","):
            if args.deadline and time.time() + max(10.0, 1.5 * last_cost) > args.deadline:
                emit({"kind": "skipped", "label": label, "batch": batch, "dtype": dtype,
                      "why": "time budget"})
                print(f"batch {batch:>6} {dtype}: skipped, the time budget is near", flush=True)
                continue
            t_config = time.perf_counter()
            x_np, y_np, source = images(max(args.images, 4 * batch))
            x_all = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(dev)
            y_all = torch.from_numpy(y_np).to(dev)
            spe = len(y_np) // batch
            torch.manual_seed(0)
            net = lenet().to(dev)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            bf16 = dtype == "bf16"

            def loss_of(x_u8, y):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    return F.cross_entropy(net(x_u8.float() / 255.0), y)

            if args.mode == "compile":
                torch._dynamo.reset()  # a fresh graph per batch size, static shapes
                if args.compile_backend == "inductor":
                    loss_of = torch.compile(loss_of, mode=args.compile_mode, dynamic=False)
                else:
                    loss_of = torch.compile(loss_of, backend=args.compile_backend,
                                            dynamic=False)
            mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)

            def step(x_u8, y):
                if mark and args.mode == "compile":
                    mark()
                loss = loss_of(x_u8, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            gen = torch.Generator(device=dev)
            firsts = {}

            def epoch(e):
                gen.manual_seed(e)
                take = torch.randperm(len(y_all), device=dev, generator=gen)[: spe * batch]
                xs = x_all[take].view(spe, batch, 1, 28, 28)
                ys = y_all[take].view(spe, batch)
                loss = None
                for i in range(spe):
                    t = time.perf_counter()
                    loss = step(xs[i], ys[i])
                    if e == 0 and i < 3:  # compile and CUDA-graph recording show here
                        float(loss.detach())
                        firsts[i] = time.perf_counter() - t
                return float(loss.detach())  # waits for the epoch's work

            first, rates, final_loss = timed_epochs(epoch, args.epochs, spe * batch)
            last_cost = time.perf_counter() - t_config
            rec = {"kind": "peer", "label": label, "name": name, "torch": torch.__version__,
                   "device": gpu, "batch": batch, "dtype": dtype, "data": source,
                   "steps_per_epoch": spe, "first_epoch_s": first,
                   "first_steps_s": [firsts[i] for i in sorted(firsts)],
                   "epoch_images_per_sec": rates, "images_per_sec": statistics.median(rates),
                   "final_loss": final_loss, "config_s": last_cost,
                   "parameters": sum(p.numel() for p in net.parameters())}
            emit(rec)
            print(f"batch {batch:>6} {dtype}: {rec['images_per_sec']:>12,.0f} img/s "
                  f"(warm-up epoch {first:.1f} s, first steps "
                  f"{', '.join(f'{s:.2f}' for s in rec['first_steps_s'])} s)", flush=True)
            x_all = y_all = net = opt = None  # free the device memory before the next
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
