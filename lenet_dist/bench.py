"""Benchmarks. Training: each configuration (recipe, batch size, processes x devices)
trains in fresh processes, since the CPU device count is fixed when JAX starts, and
its figures come from the run's own metrics.jsonl; rounds are interleaved so that the
host's noise hits every configuration alike. Serving: SavedModel vs JAX, one process.

A run's figures are read as `EpochRecord`s, the class train writes them with; nothing
is parsed out of train's log lines."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from lenet_dist import rundir, safefs, tempdirs, versions
from lenet_dist import serving_contract as contract
from lenet_dist.config import INT_RANGES, PRESETS
from lenet_dist.data import CLASS_NAMES
from lenet_dist.joining import check_devices
from lenet_dist.errors import Failure, UserError
from lenet_dist.launch import LocalJob
from lenet_dist.records import EpochRecord
from lenet_dist.runtime import MAX_SIMULATED_CPU_DEVICES, import_tensorflow

# What run_config returns for one run, in this order (the table's and the JSON's).
FIGURES = ("train_images_per_sec", "eval_images_per_sec", "first_step_seconds",
           "ready_seconds", "epoch_seconds", "peak_rss_mib")
# Each local process is a whole Python with JAX (0.2-0.5 GB measured), as for `launch -n`.
MAX_JOB_PROCESSES = 64
# ru_maxrss is in KiB on Linux, in bytes on macOS.
RSS_PER_MIB = 1024**2 if sys.platform == "darwin" else 1024


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration to measure. `devices` is the global count: with `processes`
    > 1 the run is a local job (launch.LocalJob) in which each process gives
    devices / processes of them, as the hosts of a pod slice do."""

    devices: int
    batch_size: int
    recipe: str
    processes: int = 1

    @property
    def name(self) -> str:
        """Recipe, batch, processes x devices each: 'd2l b128 2x4'."""
        return f"{self.recipe} b{self.batch_size} {self.processes}x" \
               f"{self.devices // max(self.processes, 1)}"

    def validate(self) -> "Run":
        """One clear line before anything runs, rather than a failed run later."""
        if self.recipe not in PRESETS:
            raise UserError(f"unknown recipe {self.recipe!r}; choose one of "
                            f"{', '.join(PRESETS)}")
        if not 1 <= self.processes <= MAX_JOB_PROCESSES:
            raise UserError(f"a benchmark job has 1..{MAX_JOB_PROCESSES} processes, "
                            f"got {self.processes}")
        if self.devices < 1:
            raise UserError(f"--devices must be >= 1, got {self.devices}")
        per_process = check_devices(self.devices, self.processes)
        if per_process > MAX_SIMULATED_CPU_DEVICES:
            raise UserError(f"{per_process} devices per process: at most "
                            f"{MAX_SIMULATED_CPU_DEVICES} CPU devices can be simulated")
        low, high = INT_RANGES["batch_size"]
        if not low <= self.batch_size <= high:
            raise UserError(f"--batch-size must be in {low}..{high}, got {self.batch_size}")
        if self.batch_size % self.devices:
            from lenet_dist.mesh import check_batch  # imports JAX: only to word the error

            check_batch(self.batch_size, self.devices)
        return self

    def train_args(self, epochs: int, data_dir: str | None, workdir: str | os.PathLike,
                   checkpoint: bool = False) -> list[str]:
        """`lenet-dist train` arguments for this run (every process of a job alike)."""
        args = ["train", "--recipe", self.recipe, "--devices", str(self.devices),
                "--batch-size", str(self.batch_size), "--epochs", str(epochs),
                "--workdir", os.fspath(workdir), "--no-progress",
                "--checkpoint" if checkpoint else "--no-checkpoint"]
        return args + (["--data-dir", data_dir] if data_dir else [])


def parse_job(text: str) -> tuple[int, int]:
    """'PxD' (--job 2x4): P processes of D devices each -> (P, D)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise UserError(f"'{text}' is not PROCESSESxDEVICES, e.g. 2x4 (2 processes of 4 "
                        "devices each)")
    processes, devices = int(match[1]), int(match[2])
    if not 2 <= processes <= MAX_JOB_PROCESSES:
        raise UserError(f"'{text}': processes must be in 2..{MAX_JOB_PROCESSES} (for one "
                        "process, use --devices)")
    if not 1 <= devices <= MAX_SIMULATED_CPU_DEVICES:
        raise UserError(f"'{text}': devices per process must be in "
                        f"1..{MAX_SIMULATED_CPU_DEVICES}")
    return processes, devices


def plan(device_counts: Sequence[int], batch_sizes: Sequence[int], recipes: Sequence[str],
         jobs: Sequence[tuple[int, int]] = ()) -> list[Run]:
    """Every recipe x batch size x (each device count, then each job), validated and
    without repeats; grouped by recipe and batch, so each group's ratios read down."""
    runs = []
    for recipe in recipes:
        for batch in batch_sizes:
            runs += [Run(n, batch, recipe) for n in device_counts]
            runs += [Run(p * d, batch, recipe, p) for p, d in jobs]
    return [run.validate() for run in dict.fromkeys(runs)]


# ------------------------------------------------------------------ one run


def run_config(run: Run, epochs: int, data_dir: str | None, workdir: str | os.PathLike, *,
               checkpoint: bool = False, timeout: float | None = None) -> dict:
    """Train `run` for `epochs` in fresh process(es) into `workdir` and return its
    FIGURES: the steady state and the warm-up from the run's metrics.jsonl, the peak
    resident memory from the kernel (the largest of a job's processes)."""
    run = run.validate()
    if epochs < 2:
        raise UserError(f"a benchmark needs 2 or more epochs (the first compiles), "
                        f"got {epochs}")
    timeout = timeout or default_timeout(epochs)
    args = run.train_args(epochs, data_dir, workdir, checkpoint)
    launched = time.time()
    if run.processes == 1:
        peak = train_alone(run, args, timeout)
    else:
        peak = _train_as_job(run, args, timeout)
    figures = steady_figures(read_metrics(Path(workdir) / rundir.METRICS_FILE), launched)
    return {**figures, "peak_rss_mib": peak}


def default_timeout(epochs: int) -> float:
    """Generous: 5 minutes a run plus 5 an epoch, over 10x the slowest epoch measured
    on the 2-core dev machine (modern recipe, 1 device: ~22 s). It catches hangs."""
    return 300.0 * (epochs + 1)


def train_alone(run: Run, args: list[str], timeout: float) -> float:
    """One process, its output into files rather than pipes: os.wait4 (the only way to
    a child's peak memory) then waits with no reader thread to keep a pipe drained."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "lenet_dist", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                preexec_fn=die_with_parent)
        try:
            peaks, failed = reap([proc], time.monotonic() + timeout, run.name)
        finally:  # Ctrl-C, a timeout: the run must not outlive the benchmark
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        errors = err.read().decode(errors="replace")
    if failed is not None:
        raise run_failure(run, proc.returncode, errors)
    return peaks[0]


def _train_as_job(run: Run, args: list[str], timeout: float) -> float:
    """A local job on loopback (launch.LocalJob, whose threads read the output); the
    first process to fail or the timeout ends it, every process killed by PID."""
    job = LocalJob(args, run.processes)
    try:
        job.start()
        peaks, failed = reap(job.procs, time.monotonic() + timeout, run.name)
    finally:
        job.kill_all()  # by PID; the processes reaped above are left alone
        job.wait(timeout=10, grace=0)  # now only joins the output readers
    if failed is not None:
        raise run_failure(run, job.procs[failed].returncode, job.output(failed),
                       f" (process {failed})")
    return max(peaks)


def reap(procs: Sequence[subprocess.Popen], deadline: float,
         name: str) -> tuple[list[float], int | None]:
    """Wait for every process with os.wait4, which reports each one's peak resident
    memory (MiB here), until one fails: then its index comes back with the peaks.
    Linux carries the parent's peak into a child at exec, so no figure reads below this
    process's own peak (41 MiB for the bench command, which never imports JAX).
    Past `deadline` (time.monotonic), a Failure; the caller kills what runs."""
    peaks = [0.0] * len(procs)
    while any(p.returncode is None for p in procs):
        for i, p in enumerate(procs):
            if p.returncode is None:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    p.returncode = os.waitstatus_to_exitcode(status)  # Popen's bookkeeping
                    peaks[i] = usage.ru_maxrss / RSS_PER_MIB
                    if p.returncode:
                        return peaks, i
        if time.monotonic() > deadline:
            raise Failure(f"benchmark run {name} did not finish in time; killed it "
                          "(a hang, or a machine far slower than expected)")
        time.sleep(0.05)
    return peaks, None


def run_failure(run: Run, code: int, output: str, where: str = "") -> UserError:
    """The run's own error line (train prints exactly one), as ours."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = (errors or lines or [f"exit status {code}"])[-1].removeprefix("error: ")
    if code < 0:
        last = f"killed by {signal.Signals(-code).name}; {last}"
    error = UserError if code == 2 else Failure
    return error(f"benchmark run {run.name}{where} failed: {last}")


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the benchmark dies, even by kill -9
    (Linux's PR_SET_PDEATHSIG; elsewhere the `finally` above is all there is)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def read_metrics(path: Path) -> list[EpochRecord]:
    """The run's metrics.jsonl, one record an epoch; a Failure when it cannot be read."""
    try:
        return rundir.read_metrics(path)
    except (OSError, ValueError) as e:
        raise Failure(f"cannot read the benchmark run's {path}: {e}") from None


def steady_figures(rows: Sequence[EpochRecord], launched: float) -> dict:
    """A run's figures from its metrics.jsonl records (but the peak memory). The steady
    state is the median over the epochs after the first, which compiles; the first
    step and the time from `launched` (time.time()) to its end are the warm-up. The
    evaluation rate is the images each record says it evaluated over its seconds."""
    if len(rows) < 2 or rows[0].first_step_seconds is None:
        raise Failure(f"the benchmark run's metrics hold {len(rows)} epoch(s)"
                      + ("" if len(rows) < 2 else " and no first step") +
                      "; a benchmark needs 2 or more from one fresh run")
    later = rows[1:]
    if any(r.eval_images is None or r.eval_seconds is None for r in later):
        raise Failure("the benchmark run's metrics do not say how many images each "
                      "evaluation read (written by an older lenet-dist?)")
    return {
        "train_images_per_sec": statistics.median(r.images_per_sec for r in later),
        "eval_images_per_sec": statistics.median(r.eval_images / r.eval_seconds
                                                 for r in later),
        "first_step_seconds": rows[0].first_step_seconds,
        "ready_seconds": rows[0].first_step_time - launched,
        "epoch_seconds": statistics.median(b.time - a.time for a, b in zip(rows, later)),
    }


# ------------------------------------------------------------------ the benchmark

BASELINES = ("group", "first")


def bench_training(runs: Sequence[Run], epochs: int, rounds: int, data_dir: str | None,
                   echo: Callable[[str], None] = print, baseline: str = "group",
                   checkpoint_cost: bool = False) -> dict:
    """Measure every run once a round, `rounds` times, each in fresh processes; print
    each result as it comes, then the table of medians; return it all, JSON-able.

    Ratios are of training images/s, against the first run of the same recipe and
    batch size (`baseline="group"`, a scaling table) or the very first ("first").
    With `checkpoint_cost`, the first run with checkpointing off, then on, instead."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}")
    runs = [run.validate() for run in dict.fromkeys(runs)]
    if not runs:
        raise UserError("nothing to benchmark: give --devices or --job")
    if checkpoint_cost:
        variants = [(runs[0], False, "checkpoint off"), (runs[0], True, "checkpoint on")]
    else:
        variants = [(run, False, "") for run in runs]
    entries = [{"name": f"{run.name} {note}".strip(), **dataclasses.asdict(run),
                "checkpoint": checkpoint, "rounds": []} for run, checkpoint, note in variants]
    with tempdirs.temporary_directory("lenet-dist-bench-") as tmp:
        for r in range(rounds):
            for i, (entry, (run, checkpoint, _)) in enumerate(zip(entries, variants)):
                figures = run_config(run, epochs, data_dir, Path(tmp) / f"r{r}-c{i}",
                                     checkpoint=checkpoint)
                entry["rounds"].append(figures)
                echo(f"round {r + 1}/{rounds}: {entry['name']}: {describe(figures)}")
    for entry in entries:
        entry["median"] = {k: median_of(f[k] for f in entry["rounds"]) for k in FIGURES}
    for entry in entries:
        base = next(e for e in entries if baseline == "first"
                    or (e["recipe"], e["batch_size"]) == (entry["recipe"], entry["batch_size"]))
        entry["train_ratio"] = entry["median"]["train_images_per_sec"] \
            / base["median"]["train_images_per_sec"]
    result = {**environment(),
              "settings": {"epochs": epochs, "rounds": rounds, "data_dir": data_dir,
                           "baseline": baseline, "checkpoint_cost": checkpoint_cost},
              "configs": entries}
    for line in format_table(result):
        echo(line)
    return result


def describe(f: dict) -> str:
    """One run's figures as the line printed while the benchmark goes."""
    rss = "?" if f["peak_rss_mib"] is None else f"{f['peak_rss_mib']:,.0f}"
    return (f"{f['train_images_per_sec']:,.0f} img/s training, "
            f"{f['eval_images_per_sec']:,.0f} img/s eval, {f['epoch_seconds']:.2f} s per "
            f"epoch; first step {f['first_step_seconds']:.2f} s, ready after "
            f"{f['ready_seconds']:.2f} s; peak RSS {rss} MiB")


def median_of(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


COLUMNS = (  # header, figure, format
    ("train img/s", "train_images_per_sec", "{:,.0f}"),
    ("ratio", "train_ratio", "{:.2f}x"),
    ("eval img/s", "eval_images_per_sec", "{:,.0f}"),
    ("first step s", "first_step_seconds", "{:.2f}"),
    ("ready s", "ready_seconds", "{:.2f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:,.0f}"),
    ("epoch s", "epoch_seconds", "{:.2f}"),
)


def format_table(result: dict) -> list[str]:
    """The medians as a text table, with what each column means below it."""
    s = result["settings"]
    header = ["config", *(c[0] for c in COLUMNS)]
    rows = []
    for e in result["configs"]:
        values = {**e["median"], "train_ratio": e["train_ratio"]}
        rows.append([e["name"], *("-" if values[k] is None else fmt.format(values[k])
                                  for _, k, fmt in COLUMNS)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])]
                         + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]).rstrip()

    against = ("the first config" if s["baseline"] == "first"
               else "the first config of the same recipe and batch")
    return [
        f"steady state: median of {s['rounds']} round(s) x {s['epochs'] - 1} epoch(s) "
        "after the first; config = recipe, global batch, processes x devices each",
        line(header), line(["-" * w for w in widths]), *(line(row) for row in rows),
        f"ratio: training img/s against {against}. Warm-up, apart from the steady state: "
        "first step = its dispatch, compile and run; ready = from launch to the end of "
        "the first step. epoch s: end to end (train, eval, logs"
        + (", saves)." if s["checkpoint_cost"] else ").")]


def environment() -> dict:
    """When, on what, with which versions: what makes two results comparable."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions.installed()}


def machine() -> dict:
    """What the figures were measured on."""
    info = cpuinfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    flags = info.get("flags", "").split()
    return {"cpu": info.get("model name") or platform.processor() or None,
            "cpu_features": [name for name in CPU_FEATURES if name in flags],
            "cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
            "python": platform.python_version()}


# The vector and matrix units that set XLA:CPU's and oneDNN's speed: two machines
# with the same model name ran the same training 2x apart, AMX or not.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (Linux; empty elsewhere)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    return fields


def check_json_path(path: str) -> None:
    """Before a benchmark runs: --json must be a file we can create or replace."""
    if os.path.isdir(path):
        raise UserError(f"--json {path} is a directory; give a file name, e.g. "
                        f"{os.path.join(path, 'bench.json')}")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise UserError(f"--json {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--json {path}: cannot write to the directory {parent}")
    try:
        safefs.refuse_symlink(path)
        safefs.refuse_special(path)  # a rename would replace /dev/full with our file
    except safefs.UnsafePath as e:
        raise UserError(f"--json {path} {e.strerror}") from None


def write_json(path: str, result: dict) -> None:
    """In one rename: a reader (or a crash) never sees half a file."""
    check_json_path(path)
    safefs.write_atomic(path, json.dumps(result, indent=2) + "\n")


# ------------------------------------------------------------------ serving


def _timed(fn, x, seconds: float) -> list[float]:
    """Per-call wall times of fn(x) for about `seconds` (at least 20 calls)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return times


def bench_serving(workdir: str | None, batch_size: int = 256, rounds: int = 3,
                  seconds: float = 2.0, echo: Callable[[str], None] = print) -> dict:
    """SavedModel (TensorFlow) vs the jitted JAX forward, in one process on one device:
    images/s at `batch_size` and batch-1 latency, rounds interleaved. Each call includes
    moving the input in and the outputs back to numpy, as a server would."""
    # Here, not at the top: the training benchmark's parent process never imports JAX
    # (each run's device count is fixed when JAX starts in its own child process).
    import jax

    from lenet_dist import exporting as export_lib
    from lenet_dist import serialization

    tf = import_tensorflow()
    variables, forward, model, class_names = serving_model(workdir)

    def run_jax(x):
        return jax.device_get(forward(variables, x))

    with tempdirs.temporary_directory("lenet-dist-bench-serving-") as tmp:
        model_dir = export_lib.save_savedmodel(
            tf, variables, Path(tmp), ("cpu",), class_names, serialization.installed_plan(),
            model)
        served = contract.load_signature(tf, model_dir)

        def run_tf(x):
            return contract.call_signature(tf, served, x)

        with tf1_session(tf, model_dir) as run_session:
            runners = {"JAX jit": run_jax, "SavedModel": run_tf, "TF1 session": run_session}
            rates, lat = race_runners(runners, batch_size, rounds, seconds, echo)
    result = {}
    for name in runners:
        ms = sorted(t * 1e3 for t in lat[name])
        result[name] = {"images_per_sec": statistics.median(rates[name]),
                        "latency_ms_p50": ms[len(ms) // 2],
                        "latency_ms_p90": ms[int(len(ms) * 0.9)]}
    base = result["JAX jit"]["images_per_sec"]
    echo(f"inference on {jax.devices()[0].platform} (batch {batch_size}, median of "
         f"{rounds} rounds; batch-1 latency over {len(lat['JAX jit']):,} calls):")
    for name, r in result.items():
        echo(f"  {name:<11}  {r['images_per_sec']:>9,.0f} img/s ({r['images_per_sec'] / base:.2f}x)"
             f"   batch-1 latency p50 {r['latency_ms_p50']:.3f} ms, "
             f"p90 {r['latency_ms_p90']:.3f} ms")
    return result


def serving_model(workdir: str | None):
    """(variables on the host, forward, model, class names): the run's latest checkpoint,
    or the d2l model at its initial weights (speed does not depend on the weights)."""
    import jax

    from lenet_dist.mesh import Shardings, make_mesh
    from lenet_dist.model import build, init_params
    from lenet_dist.restore import restore_checkpoint
    from lenet_dist.step import forward_for

    if workdir:
        restored = restore_checkpoint(workdir, Shardings(make_mesh(1)))
        return (jax.device_get(restored.variables), restored.forward, restored.model,
                restored.class_names)
    return (jax.device_get(init_params(jax.random.key(0))), forward_for("d2l"),
            build("d2l"), CLASS_NAMES["fashion_mnist"])


@contextlib.contextmanager
def tf1_session(tf, model_dir):
    """TF Serving's own path: the SignatureDef's tensors run in a TF1 session; yields
    the function that runs a batch through it."""
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        sig = tf.compat.v1.saved_model.loader.load(
            session, ["serve"], str(model_dir)).signature_def[contract.SIGNATURE]
    feed = sig.inputs[contract.INPUT].name
    fetch = {k: v.name for k, v in sig.outputs.items()}
    try:
        yield lambda x: session.run(fetch, {feed: x})
    finally:
        session.close()


def race_runners(runners: dict, batch_size: int, rounds: int, seconds: float, echo):
    """Each runner's images/s at `batch_size` and its batch-1 call times, rounds
    interleaved: ({name: [rate per round]}, {name: [seconds per call]})."""
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8)
    one = big[:1]
    for fn in runners.values():  # compile both shapes outside the timing
        fn(big), fn(one)
    rates: dict[str, list[float]] = {k: [] for k in runners}
    lat: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(rounds):
        for name, fn in runners.items():
            rates[name].append(batch_size / statistics.median(_timed(fn, big, seconds)))
            lat[name].extend(_timed(fn, one, seconds / 2))
        echo(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} img/s"
                                            for k, v in rates.items()))
    return rates, lat
