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


def steady_rate(metrics_file: Path) -> float:
    """Median images/s over the epochs after the first (which compiles)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return statistics.median(r["images_per_sec"] for r in rows[1:])


def run_once(devices: int, epochs: int, batch_size: int, data_dir: str | None,
             workdir: Path) -> float:
    cmd = [sys.executable, "-m", "lenet_dist", "train", "--devices", str(devices),
           "--epochs", str(epochs), "--batch-size", str(batch_size), "--no-progress",
           "--workdir", str(workdir)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"benchmark run with --devices {devices} failed: {last}")
    return steady_rate(workdir / "metrics.jsonl")


def bench_training(device_counts: Sequence[int], epochs: int, rounds: int, batch_size: int,
                   data_dir: str | None, echo: Callable[[str], None] = print) -> dict:
    rates: dict[int, list[float]] = {n: [] for n in device_counts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for n in device_counts:
                rate = run_once(n, epochs, batch_size, data_dir, Path(tmp) / f"r{r}-d{n}")
                rates[n].append(rate)
                echo(f"round {r + 1}: --devices {n}: {rate:,.0f} img/s")
    base = statistics.median(rates[device_counts[0]])
    echo(f"steady-state training images/s (batch {batch_size}, median of {rounds} rounds "
         f"x {epochs - 1} epochs):")
    for n, values in rates.items():
        med = statistics.median(values)
        echo(f"  --devices {n}: {med:,.0f} img/s  ({med / base:.2f}x --devices "
             f"{device_counts[0]}; runs {', '.join(f'{v:,.0f}' for v in values)})")
    return {n: statistics.median(v) for n, v in rates.items()}
