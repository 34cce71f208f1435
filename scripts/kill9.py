#!/usr/bin/env python
"""Fault injection: kill -9 a training run at random moments, resume, and check that
every resumed run ends with the uninterrupted run's parameters.

Kills land after the first checkpoint appears, at a random delay, so they fall
during steps, evaluations and (with saves every 3 steps) asynchronous saves.

    python scripts/kill9.py --trials 10 [--kills 2] [--seed 0] [--kinds train,export,concurrent]

--kinds picks what is killed in each trial (default: train):
  train       the training run itself, then it is resumed (as above);
  export      `lenet-dist export --overwrite` of the trial's workdir (the reference run's
              when train is not among the kinds) to an --out that already holds an earlier
              export, at random moments or while it publishes: --out must hold a complete
              model after every kill, and one more export must leave no leftovers;
  concurrent  second `train`s on the workdir of a run in progress: each must be refused
              (exit 1, "in use") or be killed, and the first run must still end with
              the uninterrupted run's parameters;
  bench       `lenet-dist bench --json F` (a 2-process `--job 2x1` on odd trials) at a
              random moment: none of its processes may outlive it, its temporary
              directories must go (its own TMPDIR is checked), F must still hold the
              earlier benchmark's JSON, and one more bench must finish and rewrite F.

Exit status 0 when every trial of every kind passes (max |param diff| <= 1e-6), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from lenet_dist import runtime
from lenet_dist.step_files import step_of

TRAIN = ["train", "--devices", "8", "--epochs", "3", "--train-limit", "2560",
         "--batch-size", "64", "--lr", "0.5", "--save-every-steps", "3",
         "--keep-checkpoints", "3", "--no-progress"]
KINDS = ("train", "export", "concurrent", "bench")
BENCH = ["bench", "--devices", "2", "--epochs", "2", "--rounds", "1", "--batch-size", "128"]
REAPER_GRACE_S = 15.0  # the temp-dir reaper's 1 s, and children's exit, on a busy machine
SECOND_KILL_WINDOW_S = 5.0  # a second train's start-up until the lock refuses it: 2-6 s


def cli(workdir: Path, data_dir: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "lenet_dist", *TRAIN, "--workdir", str(workdir)]
    return cmd + (["--data-dir", data_dir] if data_dir else [])


def export_cli(workdir: Path, out: Path, data_dir: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "lenet_dist", "export", "--workdir", str(workdir),
           "--out", str(out), "--overwrite", "--platforms", "cpu"]
    return cmd + (["--data-dir", data_dir] if data_dir else [])


def has_checkpoint(workdir: Path) -> bool:
    d = workdir / "checkpoints"
    return d.is_dir() and any(step_of(p.name) is not None for p in d.iterdir())


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
    # Here, not at the top: JAX must be configured (main's runtime.configure) first.
    from lenet_dist.mesh import Shardings, make_mesh
    from lenet_dist.restore import restore_checkpoint

    restored = restore_checkpoint(str(workdir), Shardings(make_mesh(1)))
    return restored.step, restored.variables


def max_diff(params, ref) -> float:
    import jax  # here, not at the top: JAX must be configured (main) first

    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))


def train_trial(trial: int, work: Path, args, rng: random.Random, ref_step: int, ref) -> bool:
    """Kill the run `args.kills` times, resume it, and compare with the reference."""
    outcomes = [kill_once(cli(work, args.data_dir), work, rng) for _ in range(args.kills)]
    done = subprocess.run(cli(work, args.data_dir), capture_output=True, text=True)
    resumed = [ln for ln in done.stdout.splitlines() if "resuming from" in ln]
    warnings = [ln for ln in done.stdout.splitlines() if "unreadable" in ln]
    if done.returncode:
        print(f"trial {trial}: resume FAILED: {done.stderr.strip()[-300:]}")
        return False
    step, params = final_params(work)
    diff = max_diff(params, ref)
    ok = step == ref_step and diff <= 1e-6
    print(f"trial {trial}: {', '.join(outcomes)}; "
          f"{resumed[0].split(' in ')[0] if resumed else 'no resume line'}"
          f"{'; ' + str(len(warnings)) + ' unreadable checkpoint(s) skipped' if warnings else ''}"
          f"; final step {step}, max |param diff| {diff:.2e}: {'OK' if ok else 'MISMATCH'}")
    return ok


# ------------------------------------------------------------------- export kills


def model_problem(out: Path) -> str | None:
    """None when `out` holds a complete export (either the old or the new one)."""
    try:
        meta = json.loads((out / "assets.extra" / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable metadata.json at {out} ({type(e).__name__})"
    if not (out / "saved_model.pb").is_file():
        return f"no saved_model.pb at {out}"
    if not (out / "variables" / "variables.index").is_file() or "checkpoint" not in meta:
        return f"incomplete model at {out}"
    return None


def leftovers(out: Path) -> list[str]:
    """What exports to `out` leave beside it while running or when killed."""
    prefixes = (f".{out.name}.staging-", f".{out.name}.old-")
    if not out.parent.is_dir():  # the first export makes it
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefixes))


def verified(out: Path, before: set[str]) -> bool:
    """A staging directory this export made holds its verified model's metadata."""
    return any((out.parent / name / "model" / "assets.extra" / "metadata.json").exists()
               for name in leftovers(out) if name not in before)


def timed_export(cmd: list[str], out: Path) -> tuple[int, str, float, float]:
    """Run an export to its end: its exit status and stderr, its wall seconds, and the
    seconds from its model being verified (publishing begins) to its exit."""
    before = set(leftovers(out))
    with tempfile.TemporaryFile() as err:
        start, seen = time.time(), None
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            if seen is None and verified(out, before):
                seen = time.time()
            time.sleep(0.005)
        end = time.time()
        err.seek(0)
        return proc.returncode, err.read().decode(errors="replace"), end - start, \
            end - (seen or end)


PUBLISH_TRIES = 5  # exports started to land one kill in publishing


def kill_export(cmd: list[str], out: Path, duration: float, publishing: float,
                rng: random.Random) -> str:
    """Start an export and SIGKILL it: half the time at a random moment of its run, half
    the time in the first half of its publishing (`publishing`: the seconds from its
    model being verified to its exit, measured on an export that ran to its end)."""
    mid_run = rng.random() < 0.5
    # Publishing takes a fraction of a second: on a busy machine the poll may see the
    # model verified only after the export has ended. Such a try kills nothing, and the
    # next export (over the finished one, --overwrite) tries again.
    for _ in range(1 if mid_run else PUBLISH_TRIES):
        before = set(leftovers(out))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.time()
        if mid_run:
            time.sleep(rng.uniform(0.0, duration))
            where = f"mid-run (at {time.time() - start:.1f} s)"
        else:
            deadline = start + 3 * duration + 30
            while proc.poll() is None and time.time() < deadline and not verified(out, before):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, publishing / 2))
            where = "while publishing"
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"killed {where}"
        proc.wait()
    return "finished before the kill"


def export_trial(workdir: Path, out: Path, kills: int, rng: random.Random,
                 data_dir: str | None) -> tuple[bool, str, list[str]]:
    cmd = export_cli(workdir, out, data_dir)
    code, errors, duration, publishing = timed_export(cmd, out)
    if code:
        return False, f"the earlier export FAILED: {errors.strip()[-300:]}", []
    outcomes, problems = [], []
    for _ in range(kills):
        outcomes.append(kill_export(cmd, out, duration, publishing, rng))
        problem = model_problem(out)
        if problem:
            problems.append(f"after {outcomes[-1]}: {problem}")
    last = subprocess.run(cmd, capture_output=True, text=True)
    if last.returncode:
        problems.append(f"the export after the kills FAILED: {last.stderr.strip()[-300:]}")
    elif model_problem(out):
        problems.append(f"after the last export: {model_problem(out)}")
    if leftovers(out):
        problems.append(f"left beside --out: {', '.join(leftovers(out))}")
    recovered = [ln for ln in last.stdout.splitlines() if ln.startswith("warning:")]
    text = (f"{', '.join(outcomes)}; next export: "
            f"{recovered[0][len('warning: '):] if recovered else 'nothing to recover'}")
    return not problems, f"{text}: {'; '.join(problems) or 'OK'}", outcomes


# ------------------------------------------------------------------- concurrent trains


def lock_pid(workdir: Path) -> int | None:
    """The PID recorded in the workdir's lock file (read without locking it)."""
    try:
        return json.loads((workdir / "lock").read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None


def concurrent_trial(work: Path, kills: int, rng: random.Random, data_dir: str | None,
                     ref_step: int, ref) -> tuple[bool, str, list[str]]:
    """While one run trains, start `kills` + 1 second runs on its workdir at once; kill
    `kills` of them at random moments of their start-up, let the last be refused."""
    cmd = cli(work, data_dir)
    with tempfile.TemporaryFile("w+") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 180
        while (lock_pid(work) != first.pid and not has_checkpoint(work)
               and first.poll() is None and time.time() < deadline):
            time.sleep(0.02)
        seconds = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for _ in range(kills + 1)]
        start = time.time()
        kill_at = [rng.uniform(0.0, SECOND_KILL_WINDOW_S) for _ in range(kills)] + [None]
        while any(p.poll() is None for p in seconds) and time.time() < start + 180:
            for proc, at in zip(seconds, kill_at):
                if at is not None and proc.poll() is None and time.time() - start >= at:
                    proc.send_signal(signal.SIGKILL)
            time.sleep(0.01)
        first_running = first.poll() is None
        outcomes, problems = [], []
        for proc, at in zip(seconds, kill_at):
            _, err = proc.communicate()
            if proc.returncode == -signal.SIGKILL:
                outcomes.append(f"killed in start-up (at {at:.1f} s)")
            elif proc.returncode == 1 and "in use" in err:
                outcomes.append("refused")
            else:
                outcomes.append("NOT refused")
                problems.append(f"a second train exited {proc.returncode}: "
                                f"{(err.strip().splitlines() or [''])[-1][:200]}")
        first.wait()
        if first.returncode:
            log.seek(0)
            problems.append(f"the first run FAILED: {log.read().strip()[-300:]}")
    if not first_running and not problems:
        problems.append("the first run ended before the second runs did (inconclusive)")
    if not first.returncode:
        step, params = final_params(work)
        diff = max_diff(params, ref)
        if step != ref_step or diff > 1e-6:
            problems.append(f"the first run's final step {step}, max |param diff| {diff:.2e}")
    else:
        diff = float("nan")
    line = (f"second runs: {', '.join(outcomes)}; first run's max |param diff| {diff:.2e}: "
            f"{'; '.join(problems) or 'OK'}")
    return not problems, line, outcomes


# ------------------------------------------------------------------- bench kills


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc's children lists (all threads)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                kids = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][0] != "Z"
    except OSError:
        return False


def bench_trial(trial: int, work: Path, kills: int, rng: random.Random,
                data_dir: str | None) -> tuple[bool, str, list[str]]:
    """An earlier bench writes F; `kills` benches are SIGKILLed at random moments; then
    nothing of theirs may remain and F must hold whole JSON; a last bench ends it."""
    tmp, out = work / "tmp", work / "bench.json"
    tmp.mkdir(parents=True)
    job = ["--job", "2x1"] if trial % 2 else []
    cmd = [sys.executable, "-m", "lenet_dist", *BENCH, *job, "--json", str(out)]
    cmd += ["--data-dir", data_dir] if data_dir else []
    env = dict(os.environ, TMPDIR=str(tmp))
    start = time.time()
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if first.returncode:
        return False, f"the earlier bench FAILED: {first.stderr.strip()[-300:]}", []
    duration, before = time.time() - start, out.read_bytes()
    outcomes, problems = [], []
    for _ in range(kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        at, seen = rng.uniform(0.0, duration), set()
        kill_time = time.time() + at
        while proc.poll() is None and time.time() < kill_time:
            seen |= descendants(proc.pid)  # the tree as it grows
            time.sleep(0.02)
        seen |= descendants(proc.pid)
        if proc.poll() is not None:
            outcomes.append("finished before the kill")
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.append(f"killed (at {at:.1f} s, {len(seen)} descendant(s))")
        deadline = time.time() + REAPER_GRACE_S
        while (any(map(alive, seen)) or any(tmp.iterdir())) and time.time() < deadline:
            time.sleep(0.1)
        if any(map(alive, seen)):
            problems.append(f"processes {sorted(p for p in seen if alive(p))} outlived it")
        if any(tmp.iterdir()):
            problems.append(f"left in TMPDIR: {', '.join(p.name for p in tmp.iterdir())}")
        now = out.read_bytes()
        if now != before:  # a kill after the atomic rename: then it is the new, whole
            try:
                json.loads(now)
            except ValueError:
                problems.append(f"{out.name} is no longer JSON after a kill")
        for pid in seen:  # whatever outlived it, so the next trial starts clean
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    last = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if last.returncode:
        problems.append(f"the bench after the kills FAILED: {last.stderr.strip()[-300:]}")
    else:
        try:
            json.loads(out.read_text())
        except ValueError as e:
            problems.append(f"{out.name} after the last bench is not JSON: {e}")
    name = "bench --job 2x1" if job else "bench"
    return not problems, f"{name}: {', '.join(outcomes)}: {'; '.join(problems) or 'OK'}", \
        outcomes


# ------------------------------------------------------------------- main


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    if not kinds or any(k not in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(KINDS)}")
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="kills per trial (and kind)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--kinds", type=parse_kinds, default=("train",),
                        help=f"comma-separated, from {', '.join(KINDS)} [default: train]")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    runtime.configure(cpu_devices=1)

    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = Path(tmp) / "reference"
        subprocess.run(cli(ref_dir, args.data_dir), check=True, capture_output=True)
        ref_step, ref = final_params(ref_dir)
        failures = dict.fromkeys(args.kinds, 0)
        outcomes = {kind: Counter() for kind in args.kinds}
        for trial in range(args.trials):
            work = Path(tmp) / f"trial{trial}"
            if "train" in args.kinds:
                failures["train"] += not train_trial(trial, work, args, rng, ref_step, ref)
            if "export" in args.kinds:
                source = work if "train" in args.kinds else ref_dir
                out = Path(tmp) / f"served{trial}" / "1"
                ok, line, seen = export_trial(source, out, args.kills, rng, args.data_dir)
                failures["export"] += not ok
                outcomes["export"].update(o.split(" (")[0] for o in seen)
                print(f"trial {trial} export: {line}")
            if "concurrent" in args.kinds:
                ok, line, seen = concurrent_trial(Path(tmp) / f"trial{trial}-concurrent",
                                                  args.kills, rng, args.data_dir, ref_step, ref)
                failures["concurrent"] += not ok
                outcomes["concurrent"].update(o.split(" (")[0] for o in seen)
                print(f"trial {trial} concurrent: {line}")
            if "bench" in args.kinds:
                ok, line, seen = bench_trial(trial, Path(tmp) / f"bench{trial}", args.kills,
                                             rng, args.data_dir)
                failures["bench"] += not ok
                outcomes["bench"].update(o.split(" (")[0] for o in seen)
                print(f"trial {trial} {line}")
        if "train" in args.kinds:
            print(f"{args.trials - failures['train']}/{args.trials} trials reached the "
                  f"uninterrupted run's final parameters ({args.kills} kill -9 per trial)")
        if args.kinds != ("train",):
            parts = [f"{kind} {args.trials - failures[kind]}/{args.trials} OK"
                     + "".join(f", {n} {what}" for what, n in sorted(outcomes[kind].items()))
                     for kind in args.kinds]
            print(f"summary: {'; '.join(parts)}")
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
