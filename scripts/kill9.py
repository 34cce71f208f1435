#!/usr/bin/env python
"""Fault injection: kill -9 a training run at random moments, resume, and check that
every resumed run ends with the uninterrupted run's parameters.

Kills land after the first checkpoint appears, at a random delay, so they fall
during steps, evaluations and (with saves every 3 steps) asynchronous saves.

    python scripts/kill9.py --trials 10 [--kills 2] [--seed 0]

Exit status 0 when every trial matches (max |param diff| <= 1e-6), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["train", "--devices", "8", "--epochs", "3", "--train-limit", "2560",
         "--batch-size", "64", "--lr", "0.5", "--save-every-steps", "3",
         "--keep-checkpoints", "3", "--no-progress"]


def cli(workdir: Path, data_dir: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "lenet_dist", *TRAIN, "--workdir", str(workdir)]
    return cmd + (["--data-dir", data_dir] if data_dir else [])


def has_checkpoint(workdir: Path) -> bool:
    d = workdir / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def kill_once(cmd: list[str], workdir: Path, rng: random.Random) -> str:
    """Start a run, wait for a checkpoint, sleep a random 0-1.5 s, SIGKILL it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not has_checkpoint(workdir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "killed"
    return "finished before the kill"


def final_params(workdir: Path):
    from lenet_dist.evaluate import restore_params
    from lenet_dist.mesh import Shardings, make_mesh

    params, _, step, _, _ = restore_params(str(workdir), None, False, Shardings(make_mesh(1)))
    return step, params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="kills per trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    from lenet_dist import runtime

    runtime.configure(cpu_devices=1)
    import jax
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = Path(tmp) / "reference"
        subprocess.run(cli(ref_dir, args.data_dir), check=True, capture_output=True)
        ref_step, ref = final_params(ref_dir)
        failures = 0
        for trial in range(args.trials):
            work = Path(tmp) / f"trial{trial}"
            outcomes = [kill_once(cli(work, args.data_dir), work, rng)
                        for _ in range(args.kills)]
            done = subprocess.run(cli(work, args.data_dir), capture_output=True, text=True)
            resumed = [ln for ln in done.stdout.splitlines() if "resuming from" in ln]
            warnings = [ln for ln in done.stdout.splitlines() if "unreadable" in ln]
            if done.returncode:
                print(f"trial {trial}: resume FAILED: {done.stderr.strip()[-300:]}")
                failures += 1
                continue
            step, params = final_params(work)
            diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                       for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
            ok = step == ref_step and diff <= 1e-6
            failures += not ok
            print(f"trial {trial}: {', '.join(outcomes)}; "
                  f"{resumed[0].split(' in ')[0] if resumed else 'no resume line'}"
                  f"{'; ' + str(len(warnings)) + ' unreadable checkpoint(s) skipped' if warnings else ''}"
                  f"; final step {step}, max |param diff| {diff:.2e}: {'OK' if ok else 'MISMATCH'}")
        print(f"{args.trials - failures}/{args.trials} trials reached the uninterrupted "
              f"run's final parameters ({args.kills} kill -9 per trial)")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
