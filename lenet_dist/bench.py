"""Throughput benchmark: each device count trains in a fresh process (the CPU
device count is fixed when JAX starts), rounds interleaved so that the host's
noise hits every configuration alike. Reads the runs' own metrics.jsonl."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from lenet_dist.errors import UserError


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
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"benchmark run with --devices {devices} failed: {last}")
    return steady_figures(workdir / "metrics.jsonl")


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
