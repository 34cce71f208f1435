#!/usr/bin/env python
"""SIGTERM at evenly spaced moments of a run: every one must end within the bound, with
143 (or 0 when the run had finished), and the same command must then resume to the
uninterrupted run's parameters.

    python scripts/sigterm-drill.py [--moments 12] [--job-moments 6] [--export-moments 3]

One process: a small run (3,072 real training images, 256 test images, 4 simulated
devices, 2 epochs of 24 steps, a save every 3 steps) is timed uninterrupted, then started
again `--moments` times with a SIGTERM at 0.2 s, ..., its uninterrupted wall time. A job:
the same run as 2 processes x 2 devices (`lenet-dist launch -n 2`), SIGTERM to both
processes (as a preemption notice reaches every host). Export: `lenet-dist export` of the
reference run, SIGTERM at moments of its run; --out is either absent or complete.

Each row names the phase the signal landed in (the run's own phase marks,
LENET_DIST_PHASE_LOG), the exit status, the seconds from the signal to the exit, and the
resumed run's largest parameter difference from the uninterrupted run. Exit status 0
when every row passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kill9 import final_params, max_diff  # scripts/kill9.py: the same comparison
from lenet_dist import runtime

TRAIN = ["train", "--devices", "4", "--epochs", "2", "--train-limit", "3072",
         "--batch-size", "128", "--save-every-steps", "3", "--keep-checkpoints", "20",
         "--no-progress", "--no-tensorboard"]
BOUND_S = 10.0  # the documented bound (docs/checkpoints.md), on a 2-core machine under load
DATA = Path("/usr/share/datasets/fashion-mnist")


def small_data(directory: Path, source: Path) -> Path:
    """The first 3,072 training and 256 test images as IDX files."""
    from lenet_dist.data import load_idx_dir

    dataset = load_idx_dir(str(source), "fashion_mnist")
    for prefix, split, n in (("train", dataset.train, 3072), ("t10k", dataset.test, 256)):
        for kind, array in (("images-idx3", split.images[:n, ..., 0]),
                            ("labels-idx1", split.labels[:n])):
            array = np.asarray(array, np.uint8)
            header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(
                d.to_bytes(4, "big") for d in array.shape)
            (directory / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return directory


def command(workdir: Path, data: Path, processes: int) -> list[str]:
    run = [*TRAIN, "--data-dir", str(data), "--workdir", str(workdir)]
    launch = ["launch", "-n", str(processes), "--"] if processes > 1 else []
    return [sys.executable, "-m", "lenet_dist", *launch, *run]


def env_with(log: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if log is not None:
        env["LENET_DIST_PHASE_LOG"] = str(log)
    return env


def phase_at(log: Path, when: float) -> str:
    """The phase each process was in at `when` (wall time), from the phase log."""
    last: dict[str, str] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            stamp, process, rest = line.split(" ", 2)
            phase, step = rest.rsplit(" ", 1)
            if float(stamp) <= when:
                last[process] = f"{phase} {step}" if phase in ("compiling", "training",
                                                               "saving") else phase
    if not last:
        return "start-up (imports, JAX, joining)"
    return "; ".join(sorted(set(last.values())))


def interrupted(cmd: list[str], at: float, log: Path,
                processes: int) -> tuple[int, float, str, str]:
    """Start `cmd`, SIGTERM every training process `at` seconds later: (status,
    seconds from the signal to the exit, the phase it hit, how process 0 said it
    stopped)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env_with(log), start_new_session=True)
    lines: list[str] = []
    started = time.monotonic()
    if processes > 1:  # the processes' PIDs, from the launcher's "pids:" line
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("pids: "):
                break
        pids = [int(p.split("=")[1]) for p in lines[-1][len("pids: "):].split(", ")]
    else:
        pids = [proc.pid]
    time.sleep(max(0.0, started + at - time.monotonic()))
    signalled, when = time.monotonic(), time.time()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took = time.monotonic() - signalled
    status = proc.returncode
    text = "".join(lines) + (out or "")
    if processes > 1:
        codes = re.search(r"^launch: exit statuses (.*)$", text, re.M)
        status = int(codes.group(1).split(": ")[-1]) if codes else status
    said = re.findall(r"^(?:\[0\] )?((?:error: )?stopped by SIGTERM[^;\n]*|done in)", text, re.M)
    return status, took, phase_at(log, when), said[-1] if said else "-"


def train_rows(kind: str, processes: int, moments: int, data: Path, root: Path,
               reference: tuple, bound: float) -> list[tuple]:
    """The uninterrupted run's wall time, then one interrupted-and-resumed run per moment."""
    t0 = time.monotonic()
    done = subprocess.run(command(root / f"{kind}-timed", data, processes),
                          capture_output=True, text=True, env=env_with())
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = []
    for k in range(moments):
        at = 0.2 + (wall - 0.2) * k / max(moments - 1, 1)
        work = root / f"{kind}-{k}"
        status, took, phase, said = interrupted(command(work, data, processes), at,
                                                root / f"{kind}-{k}.phases", processes)
        problem = None
        if status == -signal.SIGTERM and (phase.startswith("start-up") or phase == "finishing"):
            # Killed by the signal's default action: before Python reached lenet-dist, or
            # in the interpreter's shutdown after the run was done and saved. The
            # shell's 143; the resume below must still find the run's end.
            status = 143
        if status == 143:
            resumed = subprocess.run(command(work, data, processes), capture_output=True,
                                     text=True, env=env_with())
            if resumed.returncode:
                problem = f"resume exited {resumed.returncode}"
        elif status != 0:
            problem = f"exit {status}"
        diff = None
        if problem is None:
            step, params = final_params(work)
            diff = max_diff(params, reference[1])
            if step != reference[0] or diff > 1e-6:
                problem = f"ended at step {step}, max |diff| {diff:.1e}"
        if took > bound:
            problem = (problem + "; " if problem else "") + f"took {took:.1f} s > {bound:g} s"
        rows.append((kind, f"{at:.1f} of {wall:.1f}", phase, said, status, took, diff,
                     problem))
        print_row(rows[-1])
    return rows


def export_rows(moments: int, workdir: Path, root: Path, bound: float) -> list[tuple]:
    cmd = [sys.executable, "-m", "lenet_dist", "export", "--workdir", str(workdir),
           "--platforms", "cpu", "--out"]
    t0 = time.monotonic()
    done = subprocess.run([*cmd, str(root / "export-timed")], capture_output=True, text=True)
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    rows = []
    for k in range(moments):
        at = 0.2 + (wall - 0.2) * k / max(moments - 1, 1)
        out = root / f"export-{k}"
        proc = subprocess.Popen([*cmd, str(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(at)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - signalled
        problem = None
        if proc.returncode == 0 and not (out / "saved_model.pb").is_file():
            problem = "exit 0 without a model"
        elif proc.returncode == 143 and out.exists() and not (out / "saved_model.pb").is_file():
            problem = "a stopped export left an incomplete --out"
        elif proc.returncode == 143 and err.strip().splitlines()[-1:] != [
                "error: stopped by SIGTERM"]:
            problem = "143 without its one line"
        elif proc.returncode not in (0, 143):
            problem = f"exit {proc.returncode}: {err.strip()[-200:]}"
        # The next export to the same --out clears what a stopped one left beside it.
        again = subprocess.run([*cmd, str(out), "--overwrite"], capture_output=True, text=True)
        left = sorted(p.name for p in root.iterdir() if p.name.startswith(f".export-{k}"))
        if again.returncode or left:
            problem = (problem + "; " if problem else "") + (
                f"the next export exited {again.returncode}" if again.returncode
                else f"the next export left {', '.join(left)}")
        if took > bound:
            problem = (problem + "; " if problem else "") + f"took {took:.1f} s > {bound:g} s"
        said = err.strip().splitlines()[-1] if proc.returncode and err.strip() else "-"
        rows.append(("export", f"{at:.1f} of {wall:.1f}", "export", said, proc.returncode,
                     took, None, problem))
        print_row(rows[-1])
    return rows


def print_row(row: tuple) -> None:
    kind, at, phase, said, status, took, diff, problem = row
    print(f"| {kind} | {at} s | {phase} | {said} | {status} | {took:.2f} s | "
          f"{'-' if diff is None else f'{diff:.1e}'} | {problem or 'OK'} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moments", type=int, default=12)
    parser.add_argument("--job-moments", type=int, default=6)
    parser.add_argument("--export-moments", type=int, default=3)
    parser.add_argument("--bound", type=float, default=BOUND_S)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    args = parser.parse_args()
    runtime.configure(cpu_devices=1)
    with tempfile.TemporaryDirectory(prefix="sigterm-drill-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        data = small_data(root / "data", args.data_dir)
        reference_dir = root / "reference"
        done = subprocess.run(command(reference_dir, data, 1), capture_output=True, text=True,
                              env=env_with())
        assert done.returncode == 0, done.stderr[-2000:]
        reference = final_params(reference_dir)
        print("| run | SIGTERM at | phase | it said | exit | exited after | max param "
              "diff after resume | result |\n|---|---|---|---|---|---|---|---|", flush=True)
        rows = train_rows("1 process", 1, args.moments, data, root, reference, args.bound)
        rows += train_rows("2 processes", 2, args.job_moments, data, root, reference,
                           args.bound)
        rows += export_rows(args.export_moments, reference_dir, root, args.bound)
    failed = [r for r in rows if r[-1]]
    slowest = max(r[5] for r in rows)
    print(f"{len(rows) - len(failed)} of {len(rows)} rows passed; the slowest exit came "
          f"{slowest:.2f} s after its SIGTERM (bound {args.bound:g} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
