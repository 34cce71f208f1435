"""The driver of `benchmarks/gpu_check.sh`: lenet-dist and its peers on one GPU, in one run.

Standard library only: it runs each contender in its own environment's Python and reads
back the `RESULT {json}` lines the workers print. Contenders, all training the d2l
LeNet-5 (Xavier init, SGD lr 0.1) with the dataset on the device:

    lenet-dist      benchmarks/gpu_check.py: its own loop (fp32) and a `lax.scan` epoch
                    (fp32, bf16 mixed precision)
    torch-eager     benchmarks/gpu/torch_worker.py: PyTorch eager, fp32 and bf16 autocast
    torch-compile   the same under `torch.compile` (mode reduce-overhead: CUDA graphs)
    keras           benchmarks/gpu/keras_worker.py: Keras 3 on JAX, `model.fit`, fp32

Round r runs every contender once, the order rotated by one each round; each process
times `--epochs` epochs after a warm-up one. After the rounds come, once, the bf16
diagnosis (gpu_check.py --diagnose) and last the modern recipe (lenet-dist only, no peer
to compare with): the side-by-side table has the budget first. A wall-clock guard: no process
starts, and no configuration inside one starts, when the budget (counted from the
script's start, installs included) is near; a process still running at the budget's end
is stopped. What was skipped is listed in the output and the JSON.

    python3 benchmarks/gpu/run.py --dry-run       # the plan, nothing run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BATCHES = (256, 1024, 4096, 16384, 65536)
MODERN_BATCHES = (256, 4096, 65536)
DIAGNOSE_BATCHES = (16384, 65536)
RESERVE_S = 20  # kept at the end for writing results


LENET_DIST_VARIANTS = (("loop", "fp32"), ("scan", "fp32"), ("scan", "bf16"))


def job(name: str, env: str, recipe: str, cmd: list[str], batch_arg: str,
        configs: list[tuple[str, int, str]]) -> dict:
    """One process to run: its environment's Python runs `cmd` plus `batch_arg` and the
    batches; `configs` lists the (label, batch, dtype) it measures."""
    return {"name": name, "env": env, "recipe": recipe, "cmd": cmd,
            "batch_arg": batch_arg, "configs": configs}


def contenders(args) -> list[dict]:
    """The contenders of every round, all training the d2l recipe."""
    batches = [int(b) for b in args.batches.split(",")]
    common = ["--epochs", str(args.epochs), "--images", str(args.images)]
    torch_dtypes = args.torch_dtypes.split(",")
    keras_cmd = ["benchmarks/gpu/keras_worker.py", *common]
    if args.keras_dtypes != "fp32":
        keras_cmd += ["--dtypes", args.keras_dtypes]
    out = [
        job("lenet-dist", "jax", "d2l",
            ["benchmarks/gpu_check.py", "--recipe", "d2l", "--tag", "_r{round}", *common],
            "--batches", [(v, b, d) for b in batches for v, d in LENET_DIST_VARIANTS]),
        job("torch-eager", "torch", "d2l",
            ["benchmarks/gpu/torch_worker.py", "--mode", "eager", *common],
            "--batches", [("eager", b, d) for b in batches for d in torch_dtypes]),
        job("keras", "keras", "d2l", keras_cmd, "--batches",
            [("model.fit", b, d) for b in batches for d in args.keras_dtypes.split(",")]),
    ]
    if args.torch_compile:
        for mode in args.compile_modes.split(","):
            out.append(job(
                "torch-compile" + ("" if mode == "reduce-overhead" else f"-{mode}"),
                "torch", "d2l",
                ["benchmarks/gpu/torch_worker.py", "--mode", "compile", "--compile-mode",
                 mode, *common,
                 # on the CPU, dynamo's tracing only (inductor is heavy there)
                 *(["--compile-backend", "eager"] if args.cpu_smoke else [])],
                "--batches", [(f"compile {mode}", b, d) for b in batches for d in torch_dtypes]))
    return out


def extras(args) -> list[dict]:
    """Run once, after the rounds: the bf16 diagnosis, then lenet-dist's modern recipe
    (no peer to compare with)."""
    out = []
    if args.diagnose:
        batches = [int(b) for b in args.diagnose.split(",")]
        out.append(job("lenet-dist diagnose", "jax", "d2l",
                       ["benchmarks/gpu_check.py", "--recipe", "d2l",
                        "--diagnose-steps", str(args.diagnose_steps)],
                       "--diagnose", [("scan (compile s, single steps, HLO)", b, d)
                                      for b in batches for d in ("fp32", "bf16")]))
    if args.modern:
        batches = [int(b) for b in args.modern_batches.split(",")]
        out.append(job("lenet-dist", "jax", "modern",
                       ["benchmarks/gpu_check.py", "--recipe", "modern",
                        "--epochs", str(args.epochs), "--images", str(args.images)],
                       "--batches", [(v, b, d) for b in batches for v, d in LENET_DIST_VARIANTS]))
    return out


def plan(args) -> list[tuple[int, dict]]:
    """(round, job) in the order they run; round 0 marks the run-once extras."""
    cs = contenders(args)
    jobs = []
    for r in range(1, args.rounds + 1):
        k = (r - 1) % len(cs)
        jobs += [(r, c) for c in cs[k:] + cs[:k]]
    return jobs + [(0, e) for e in extras(args)]


def batches_of(job: dict) -> str:
    return ",".join(str(b) for b in dict.fromkeys(b for _, b, _ in job["configs"]))


def print_plan(jobs, args) -> None:
    print(f"plan: {args.rounds} round(s), budget {args.budget_s:.0f} s from the start, "
          f"{args.epochs} timed epoch(s) of {args.images} images (at least 4 batches) per "
          "configuration after a warm-up epoch")
    n = 0
    for r, job in jobs:
        where = f"round {r}" if r else "once"
        print(f"  [{where}] {job['name']} ({job['env']} env): "
              f"{' '.join(job['cmd'])} {job['batch_arg']} {batches_of(job)}".replace(
                  "{round}", str(r)))
        for label, batch, dtype in job["configs"]:
            n += 1
            print(f"    config: {job['name']} | recipe {job['recipe']} | {label} | "
                  f"batch {batch} | {dtype}")
    print(f"{n} configurations in all")


def run_job(r, job, args, deadline, pythons, log) -> list[dict]:
    py = pythons.get(job["env"])
    if not py:
        log.append({"round": r, "contender": job["name"], "skipped": "environment missing"})
        print(f"-- {job['name']}: skipped, no {job['env']} environment", flush=True)
        return []
    left = deadline - time.time()
    if left < 30:
        log.append({"round": r, "contender": job["name"], "recipe": job["recipe"],
                    "skipped": "time budget"})
        print(f"-- {job['name']} ({job['recipe']}, round {r}): skipped, "
              f"{left:.0f} s of the budget left", flush=True)
        return []
    cmd = [py, *[c.replace("{round}", str(r)) for c in job["cmd"]],
           job["batch_arg"], batches_of(job), "--deadline", f"{deadline:.0f}"]
    if args.device_flag and job["env"] in ("torch",):
        cmd += ["--device", args.device_flag]
    print(f"-- round {r or 'once'}: {job['name']} ({job['recipe']}): {' '.join(cmd[1:])}",
          flush=True)
    t = time.time()
    results, status = [], "ok"
    env = dict(os.environ)
    if job["name"] == "lenet-dist diagnose":  # its compile times must be real ones
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=env)
    killed = threading.Event()

    def stop():
        killed.set()
        proc.kill()

    watchdog = threading.Timer(max(1.0, deadline + 25 - time.time()), stop)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                rec = json.loads(line[7:])
                rec.update({"round": r, "contender": job["name"]})
                results.append(rec)
            else:
                print("   " + line.rstrip(), flush=True)
        proc.wait()
    finally:
        watchdog.cancel()
    if killed.is_set():
        status = "stopped at the time budget"
    elif proc.returncode:
        status = f"exit {proc.returncode}"
    log.append({"round": r, "contender": job["name"], "recipe": job["recipe"],
                "seconds": time.time() - t, "status": status})
    print(f"-- {job['name']} ({job['recipe']}): {status}, {time.time() - t:.0f} s", flush=True)
    return results


def summarize(results) -> list[dict]:
    """Median images/s over rounds per (contender, recipe, label, batch, dtype)."""
    series = {}
    for rec in results:
        if rec.get("kind") == "lenet-dist":
            for variant, dtype in LENET_DIST_VARIANTS:
                if f"{variant}_{dtype}" in rec:
                    key = (rec["contender"], rec["recipe"], variant, rec["batch"], dtype)
                    series.setdefault(key, []).append(rec[f"{variant}_{dtype}"])
        elif rec.get("kind") == "peer":
            key = (rec["contender"], "d2l", rec["label"], rec["batch"], rec["dtype"])
            series.setdefault(key, []).append(rec["images_per_sec"])
    return [{"contender": c, "recipe": rc, "variant": v, "batch": b, "dtype": d,
             "rounds": vals, "images_per_sec": statistics.median(vals)}
            for (c, rc, v, b, d), vals in sorted(series.items(), key=lambda kv: (
                kv[0][1], kv[0][3], kv[0][0], kv[0][2], kv[0][4]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="batch 8 on the CPU, 1 round, torch.compile traced only "
                         "(backend eager): checks the wiring, measures nothing")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock budget in seconds from --started (default 8 minutes)")
    ap.add_argument("--started", type=float, default=0.0,
                    help="Unix time the whole run started (gpu_check.sh's start; default now)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration")
    ap.add_argument("--images", type=int, default=60000, help="images per epoch")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--torch-dtypes", default="fp32,bf16")
    ap.add_argument("--keras-dtypes", default="fp32")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    ap.add_argument("--compile-modes", default="reduce-overhead",
                    help="comma list of torch.compile modes, e.g. "
                         "reduce-overhead,max-autotune-no-cudagraphs")
    ap.add_argument("--no-modern", dest="modern", action="store_false")
    ap.add_argument("--modern-batches", default=",".join(map(str, MODERN_BATCHES)))
    ap.add_argument("--diagnose", default=",".join(map(str, DIAGNOSE_BATCHES)),
                    help="batches for the bf16 diagnosis ('' to skip)")
    ap.add_argument("--diagnose-steps", type=int, default=8)
    ap.add_argument("--python-jax", default="", help="Python of the jax env (lenet-dist)")
    ap.add_argument("--python-torch", default="")
    ap.add_argument("--python-keras", default="")
    ap.add_argument("--device-flag", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_smoke:
        args.rounds, args.epochs, args.images = 1, 1, 32
        args.batches, args.modern, args.compile_modes = "8", False, "reduce-overhead"
        args.diagnose, args.diagnose_steps, args.device_flag = "8", 2, "cpu"
    started = args.started or time.time()
    deadline = started + args.budget_s - RESERVE_S
    jobs = plan(args)
    print_plan(jobs, args)
    if args.dry_run:
        return
    pythons = {"jax": args.python_jax, "torch": args.python_torch, "keras": args.python_keras}
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    if args.rounds > 1 and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        # Later rounds of the jax contenders load round 1's executables (compile and
        # autotuning skipped); a fresh directory per run keeps round 1's compile real.
        cache = ROOT / ".peers" / "gpu" / "jax-cache" / str(int(started))
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    results, log = [], []
    for r, job in jobs:
        results += run_job(r, job, args, deadline, pythons, log)
    summary = summarize(results)
    elapsed = time.time() - started
    print(f"\n{'contender':<15} {'recipe':<7} {'variant':<26} {'batch':>6} {'dtype':<5} "
          f"{'img/s (median)':>15}  rounds")
    for s in summary:
        print(f"{s['contender']:<15} {s['recipe']:<7} {s['variant']:<26} {s['batch']:>6} "
              f"{s['dtype']:<5} {s['images_per_sec']:>15,.0f}  "
              + ", ".join(f"{v:,.0f}" for v in s["rounds"]))
    skipped = [x for x in log if x.get("skipped")] + [
        x for x in results if x.get("kind") == "skipped"]
    for x in skipped:
        print(f"skipped: {json.dumps(x)}")
    print(f"elapsed {elapsed:.0f} s of a {args.budget_s:.0f} s budget "
          f"(from the start, installs included)")
    (out / "gpu_check_side_by_side.json").write_text(json.dumps(
        {"started": started, "elapsed_s": elapsed, "budget_s": args.budget_s,
         "args": vars(args), "jobs": log, "summary": summary, "results": results}, indent=2))
    print(f"wrote {out / 'gpu_check_side_by_side.json'}")


if __name__ == "__main__":
    sys.exit(main())
