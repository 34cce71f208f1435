"""LeNet-5 training speed, lenet-dist against its peers, in one alternating run.

Every contender trains the same model (the seed's LeNet-5, Xavier init, SGD lr 0.1)
on the real Fashion-MNIST, each run in a fresh process: one warm-up epoch, then
timed epochs of training only. Round r runs every contender once, in turn, so the
host's noise hits all alike; the figure is the median over rounds.

    benchmarks/peers/setup.sh                    # the peers' environments, once
    .venv/bin/python benchmarks/peers/run.py     # about 10 minutes on 2 cores

With `--to-accuracy 0.9`, instead: wall time from process start to the first test
accuracy >= 0.9, `lenet-dist train --recipe fast` against the same recipe in PyTorch
(torch_fast.py), eager and torch.compile, each run cold (empty compilation caches) and
warm (the cold run's), rounds alternating (about 5 minutes a round on 2 cores).

Run with lenet-dist's own Python (it imports lenet_dist.bench). A peer whose
environment is missing is skipped, with the line that sets it up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from lenet_dist.bench import (Run, check_json_path, die_with_parent,  # noqa: E402
                               environment, run_config, write_json)
from lenet_dist.errors import Failure, UserError  # noqa: E402
from lenet_dist.to_accuracy import Contender, run_once  # noqa: E402

SEED_PARAMETERS = 61_706  # the seed's LeNet-5; every peer reports its own count
PEER_TIMEOUT = 900  # seconds for one peer run: warm-up epoch, compile and timed epochs


def contenders(batch_sizes: list[int], device_counts: list[int]) -> list[dict]:
    envs = {"torch": ROOT / ".peers/torch/bin/python", "keras": ROOT / ".peers/keras/bin/python"}
    peers = [
        ("PyTorch eager", envs["torch"], ["torch_lenet.py"]),
        ("PyTorch torch.compile", envs["torch"], ["torch_lenet.py", "--compile"]),
        ("Keras 3 on JAX", envs["keras"], ["keras_lenet.py"]),
        ("Flax, jitted step per host batch", Path(sys.executable), ["flax_loop.py"]),
    ]
    out = [{"name": name, "kind": "peer", "python": py, "argv": argv, "batch_size": 256}
           for name, py, argv in peers]
    out += [{"name": f"lenet-dist, {d} device{'s' * (d > 1)}", "kind": "lenet-dist",
             "devices": d, "batch_size": b} for d in device_counts for b in batch_sizes]
    return out


def run_peer(c: dict, epochs: int, data_dir: str | None) -> float:
    cmd = [str(c["python"]), str(HERE / c["argv"][0]), *c["argv"][1:],
           "--batch-size", str(c["batch_size"]), "--epochs", str(epochs)]
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}"}
    if data_dir:
        cmd += ["--data-dir", data_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=die_with_parent)
    try:
        out, err = proc.communicate(timeout=PEER_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        raise RuntimeError(f"{c['name']} failed: {(err.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(out.strip().splitlines()[-1])
    if result["parameters"] != SEED_PARAMETERS:  # not the same model: not comparable
        raise RuntimeError(f"{c['name']} trains {result['parameters']:,} parameters, "
                           f"not the seed's {SEED_PARAMETERS:,}")
    return result["images_per_sec"]


def fast_contenders() -> list[dict]:
    """`--recipe fast` in lenet-dist and its PyTorch twin (torch_fast.py), eager and
    compiled: each run cold (empty compilation caches) then warm (the cold run's)."""
    torch = ROOT / ".peers/torch/bin/python"
    return [{"name": "lenet-dist --recipe fast, 1 device", "kind": "lenet-dist"},
            {"name": "PyTorch eager", "kind": "peer", "python": torch,
             "argv": ["torch_fast.py"]},
            {"name": "PyTorch torch.compile", "kind": "peer", "python": torch,
             "argv": ["torch_fast.py", "--compile"]}]


def peer_to_accuracy(c: dict, target: float, cache: Path, data_dir: str | None) -> dict:
    """A peer's run from its process start: seconds to the first epoch at or above
    `target`, to its exit, and its accuracy at the end (inductor's cache in `cache`)."""
    cmd = [str(c["python"]), str(HERE / c["argv"][0]), *c["argv"][1:]]
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}",
           "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    if data_dir:
        cmd += ["--data-dir", data_dir]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=PEER_TIMEOUT, preexec_fn=die_with_parent)
    wall = time.time() - started
    if proc.returncode:
        raise RuntimeError(f"{c['name']} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    epochs = [ln for ln in lines if "epoch" in ln]
    hit = next((e for e in epochs if e["test_accuracy"] >= target), None)
    return {"to_target_seconds": None if hit is None else hit["time"] - started,
            "wall_seconds": wall, "final_accuracy": epochs[-1]["test_accuracy"]}


def race(args) -> None:
    """Time to --to-accuracy, lenet-dist's fast recipe against its PyTorch twin."""
    todo = fast_contenders()
    for c in [c for c in todo if c["kind"] == "peer" and not c["python"].exists()]:
        print(f"skipping {c['name']}: no {c['python']} (run benchmarks/peers/setup.sh)")
        todo.remove(c)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, c in enumerate(todo):
                cache = Path(tmp) / f"cache-r{r}-{i}"
                for mode in ("cold", "warm"):
                    if c["kind"] == "peer":
                        got = peer_to_accuracy(c, args.to_accuracy, cache, args.data_dir)
                    else:
                        got = run_once(Contender("fast"), args.to_accuracy,
                                       Path(tmp) / f"r{r}-{i}-{mode}", cache, args.data_dir)
                    runs.setdefault(f"{c['name']}|{mode}", []).append(got)
                    to = got["to_target_seconds"]
                    print(f"round {r + 1}: {c['name']}, {mode}: "
                          f"{'never' if to is None else f'{to:.1f} s'} to {args.to_accuracy:g}, "
                          f"exit {got['wall_seconds']:.1f} s, accuracy {got['final_accuracy']:.4f}",
                          flush=True)
    env = environment()
    info = env["machine"]
    print(f"\n{info['cpu']} ({', '.join(info['cpu_features'])}), {info['cores']} cores; "
          f"{env['date']}; median of {args.rounds} rounds; time from process start to the "
          f"first evaluation at or above {args.to_accuracy:g} on the 10,000 test images\n")
    print("| contender | caches | time to target s (median) | runs | exit s | accuracy "
          "| torch.compile's time / this |")
    print("|---|---|---|---|---|---|---|")
    med = {k: statistics.median(r["to_target_seconds"] for r in v
                                if r["to_target_seconds"] is not None)
           if any(r["to_target_seconds"] is not None for r in v) else None
           for k, v in runs.items()}
    rows = []
    for k, v in runs.items():
        name, mode = k.split("|")
        base = med.get(f"PyTorch torch.compile|{mode}")
        ratio = f"{base / med[k]:.2f}x" if base and med[k] else "-"
        shown = ", ".join("never" if r["to_target_seconds"] is None
                          else f"{r['to_target_seconds']:.1f}" for r in v)
        print(f"| {name} | {mode} | {'never' if med[k] is None else f'{med[k]:.1f}'} | "
              f"{shown} | {statistics.median(r['wall_seconds'] for r in v):.1f} | "
              f"{statistics.median(r['final_accuracy'] for r in v):.4f} | {ratio} |")
        rows.append({"contender": name, "caches": mode, "to_target_seconds": med[k],
                     "runs": v})
    if args.json:
        write_json(args.json, {**env, "rounds": args.rounds, "target": args.to_accuracy,
                               "results": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up")
    p.add_argument("--batch-size", type=int, action="append", help="lenet-dist's [128, 256]")
    p.add_argument("--devices", type=int, action="append", help="lenet-dist's [1, 8]")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--to-accuracy", type=float, default=None, metavar="A",
                   help="instead: time to test accuracy A, --recipe fast against PyTorch")
    args = p.parse_args()
    if args.json:
        check_json_path(args.json)  # before the run, not after it
    if args.to_accuracy is not None:
        return race(args)
    todo = contenders(args.batch_size or [128, 256], args.devices or [1, 8])
    for c in [c for c in todo if c["kind"] == "peer" and not c["python"].exists()]:
        print(f"skipping {c['name']}: no {c['python']} (run benchmarks/peers/setup.sh)")
        todo.remove(c)
    rates: dict[str, list[float]] = {}
    key = lambda c: f"{c['name']}|{c['batch_size']}"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, c in enumerate(todo):
                if c["kind"] == "peer":
                    rate = run_peer(c, args.epochs, args.data_dir)
                else:
                    rate = run_config(Run(c["devices"], c["batch_size"], "d2l"), args.epochs + 1,
                                      args.data_dir, Path(tmp) / f"r{r}-{i}"
                                      )["train_images_per_sec"]
                rates.setdefault(key(c), []).append(rate)
                print(f"round {r + 1}: {c['name']}, batch {c['batch_size']}: {rate:,.0f} img/s",
                      flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    eager = med.get("PyTorch eager|256")
    comp = med.get("PyTorch torch.compile|256")
    env = environment()
    info = env["machine"]
    print(f"\n{info['cpu']} ({', '.join(info['cpu_features'])}), {info['cores']} cores; "
          f"{env['date']}; median of "
          f"{args.rounds} rounds x {args.epochs} epochs after a warm-up epoch\n")
    print("| contender | batch | img/s | runs | vs PyTorch eager | vs torch.compile |")
    print("|---|---|---|---|---|---|")
    rows = []
    for c in todo:
        k = key(c)
        ratio = lambda base: f"{med[k] / base:.2f}x" if base else "-"  # noqa: E731
        runs = ", ".join(f"{v:,.0f}" for v in rates[k])
        print(f"| {c['name']} | {c['batch_size']} | {med[k]:,.0f} | {runs} | {ratio(eager)} "
              f"| {ratio(comp)} |")
        rows.append({"contender": c["name"], "batch_size": c["batch_size"],
                     "images_per_sec": med[k], "runs": rates[k]})
    if args.json:
        write_json(args.json, {**env, "rounds": args.rounds, "epochs": args.epochs,
                               "results": rows})


if __name__ == "__main__":
    try:
        main()
    except (UserError, Failure, RuntimeError) as e:  # one line, as lenet-dist's own
        sys.exit(f"error: {e}")
