"""Time to accuracy: wall seconds from a process's start to its first evaluation at or
above a target on the full test set, the figure MLPerf Training judges a trainer by.

Each contender (a recipe, maybe with more `train` arguments) trains in fresh
processes, exactly as a user starts it: checkpoints on, output into a fresh workdir.
Every round runs each contender cold (an empty compilation cache) and then warm (the
cache that cold run filled), contenders interleaved so that the host's noise hits
them alike. The figures come from the run's metrics.jsonl (each epoch's end, after
its evaluation) and its ledger.json (where the time went); nothing is parsed out of
log lines. The target is met at the end of an evaluation, so a recipe's epochs are
its resolution.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from lenet_dist import ledger, rundir, tempdirs
from lenet_dist.bench import environment, median_of, read_metrics, train_alone
from lenet_dist.config import PRESETS
from lenet_dist.errors import Failure, UserError

MODES = ("cold", "warm")
# The phases shown per contender (ledger.KEYS' names), in the ledger's order.
PHASES = ("start-up", "loading data", "compiling", "training", "evaluating", "saving")
RUN_TIMEOUT = 1800.0  # one run; the d2l recipe's 10 epochs take ~2 min on 2 cores


@dataclasses.dataclass(frozen=True)
class Contender:
    """`lenet-dist train --recipe R --devices D` and `args`, named for the tables."""

    recipe: str
    devices: int = 1
    args: tuple[str, ...] = ()
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or f"{self.recipe}, {self.devices} device" + "s" * (self.devices > 1)

    def validate(self) -> Contender:
        if self.recipe not in PRESETS:
            raise UserError(f"unknown recipe {self.recipe!r}; choose one of "
                            f"{', '.join(PRESETS)}")
        return self

    def command(self, workdir: Path, cache: Path, data_dir: str | None) -> list[str]:
        """`lenet-dist` arguments (bench.train_alone starts them)."""
        return ["--compile-cache", os.fspath(cache),
                "train", "--recipe", self.recipe, "--devices", str(self.devices),
                "--workdir", os.fspath(workdir), "--no-progress", *self.args,
                *(["--data-dir", data_dir] if data_dir else [])]


def run_once(contender: Contender, target: float, workdir: Path, cache: Path,
             data_dir: str | None, timeout: float = RUN_TIMEOUT) -> dict:
    """One run in a fresh process: seconds from its start to the first epoch whose
    test accuracy is >= target (None if none was), its wall seconds to exit, the
    accuracy then and at the end, and its ledger's seconds by phase."""
    started = time.time()
    train_alone(contender, contender.command(workdir, cache, data_dir), timeout)
    wall = time.time() - started
    rows = read_metrics(workdir / rundir.METRICS_FILE)
    hit = next((r for r in rows if r.test_accuracy >= target), None)
    attempts = rundir.read_ledger(workdir, log=lambda _: None)
    if not rows or not attempts:
        raise Failure(f"benchmark run {contender.name} wrote no "
                      f"{'metrics' if not rows else 'ledger'}")
    book = attempts[-1]
    return {"to_target_seconds": None if hit is None else round(hit.time - started, 3),
            "epoch_reached": None if hit is None else hit.epoch,
            "accuracy_reached": None if hit is None else hit.test_accuracy,
            "final_accuracy": rows[-1].test_accuracy, "epochs": rows[-1].epoch,
            "wall_seconds": round(wall, 3), "ledger_wall_seconds": book["wall_seconds"],
            "phases": {k: book["seconds"].get(k, 0.0) for k in ledger.KEYS}}


def describe(r: dict, target: float) -> str:
    reached = (f"{target:g} after {r['to_target_seconds']:.1f} s (epoch {r['epoch_reached']}, "
               f"{r['accuracy_reached']:.4f})" if r["to_target_seconds"] is not None
               else f"never {target:g} (best epoch end {r['final_accuracy']:.4f})")
    phases = ", ".join(f"{ledger.SHOWN[k]} {r['phases'][k]:.1f}" for k in PHASES)
    return (f"{reached}; exit after {r['wall_seconds']:.1f} s; ledger {phases} "
            f"(sums to {r['ledger_wall_seconds']:.1f} s)")


def race(contenders: Sequence[Contender], target: float, rounds: int,
         data_dir: str | None, echo: Callable[[str], None] = print,
         modes: Sequence[str] = MODES) -> dict:
    """Every round, each contender cold then warm (or only cold: `modes`); each run's
    line as it comes, then the table of medians and spreads. The result is JSON-able."""
    if not 0 < target <= 1:
        raise UserError(f"--to-accuracy must be in (0, 1], got {target:g}")
    contenders = [c.validate() for c in dict.fromkeys(contenders)]
    if not contenders:
        raise UserError("nothing to race: give a --recipe")
    if tuple(modes) not in (MODES, MODES[:1]):  # warm needs the cold run's cache
        raise ValueError(f"modes are {MODES} or {MODES[:1]}, got {modes}")
    entries = [{"name": c.name, **dataclasses.asdict(c), "runs": {m: [] for m in modes}}
               for c in contenders]
    with tempdirs.temporary_directory("lenet-dist-race-") as tmp:
        for r in range(rounds):
            for i, (entry, contender) in enumerate(zip(entries, contenders)):
                cache = Path(tmp) / f"cache-r{r}-c{i}"  # empty: the cold run fills it
                for mode in modes:
                    result = run_once(contender, target, Path(tmp) / f"r{r}-c{i}-{mode}",
                                      cache, data_dir)
                    entry["runs"][mode].append(result)
                    echo(f"round {r + 1}/{rounds}: {entry['name']}, {mode}: "
                         f"{describe(result, target)}")
    for entry in entries:
        entry["summary"] = {mode: summarize(entry["runs"][mode]) for mode in modes}
    result = {**environment(), "settings": {"target": target, "rounds": rounds,
                                            "data_dir": data_dir},
              "contenders": entries}
    for line in format_table(result):
        echo(line)
    return result


def summarize(runs: Sequence[dict]) -> dict:
    """Medians (and the spread of the time to target) over a contender's runs of one
    mode; the time to target only over runs that reached it, with how many did."""
    times = [r["to_target_seconds"] for r in runs if r["to_target_seconds"] is not None]
    gaps = [abs(r["ledger_wall_seconds"] - r["wall_seconds"]) / r["wall_seconds"]
            for r in runs if r["wall_seconds"] > 0]
    return {"reached": len(times), "runs": len(runs),
            "to_target_seconds": median_of(times),
            "to_target_min": min(times, default=None), "to_target_max": max(times, default=None),
            "wall_seconds": median_of(r["wall_seconds"] for r in runs),
            "final_accuracy": median_of(r["final_accuracy"] for r in runs),
            "ledger_gap": max(gaps, default=None),
            "phases": {k: statistics.median(r["phases"][k] for r in runs) for k in PHASES}}


def format_table(result: dict) -> list[str]:
    """One row per contender and mode: median time to target (min-max), the median
    wall to exit, the final accuracy, and the median seconds of each phase."""
    target = result["settings"]["target"]
    header = ["contender", "mode", f"to {target:g} s", "min-max", "exit s", "accuracy",
              *(ledger.SHOWN[k] for k in PHASES)]
    rows = []
    for e in result["contenders"]:
        for mode, s in e["summary"].items():
            spread = ("-" if s["to_target_min"] is None
                      else f"{s['to_target_min']:.1f}-{s['to_target_max']:.1f}")
            to = ("never" if s["to_target_seconds"] is None else
                  f"{s['to_target_seconds']:.1f}"
                  + ("" if s["reached"] == s["runs"] else f" ({s['reached']}/{s['runs']})"))
            rows.append([e["name"], mode, to, spread, f"{s['wall_seconds']:.1f}",
                         f"{s['final_accuracy']:.4f}",
                         *(f"{s['phases'][k]:.1f}" for k in PHASES)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1])]
                         + [v.rjust(w) for v, w in zip(row[2:], widths[2:])]).rstrip()

    gap = max((s["ledger_gap"] or 0.0 for e in result["contenders"]
               for s in e["summary"].values()), default=0.0)
    return [f"time to {target:g} test accuracy: median of {result['settings']['rounds']} "
            "round(s), from the process's start to the end of the first evaluation at or "
            "above it; cold = an empty compilation cache, warm = the one cold filled",
            line(header), line(["-" * w for w in widths]), *(line(row) for row in rows),
            "phases: the run's own ledger (median seconds); it sums to the wall time seen "
            f"from here within {100 * gap:.1f}% (the largest gap of any run)"]
