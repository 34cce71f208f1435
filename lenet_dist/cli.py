"""`lenet-dist`: a thin click CLI. Each command parses options and calls the library.

Modules that import JAX, TensorFlow or much else (bench) are imported inside the
commands that use them: JAX only after `runtime.configure` has set the device count
and XLA flags, and none of them for `--help`, which stays fast. Start-up
(configure and those imports) runs under `runtime.quick_interrupts`: Ctrl-C
there exits at once.
"""

from __future__ import annotations

import os
import sys

import click

from lenet_dist import distributed, runtime, versions
from lenet_dist import launch as launch_lib
from lenet_dist.caches import COMPILE_CACHE_ENV
from lenet_dist.cli_failures import (
    DEBUG_ENV,
    Session,
    run_command,
)
from lenet_dist.cli_options import (
    COMPLETION,
    DEVICES,
    EXIT_STATUSES,
    RECIPE_TYPE,
    Commands,
    FiniteFloatRange,
    JobShape,
    TextPath,
    checkpoint_choice,
    config_option,
    config_options,
    int_range,
    job_options,
    option,
    read_workdir,
)
from lenet_dist.config import (
    DEFAULT_EXPORT_PLATFORMS,
    DEPRECATED_PRESETS,
    PRESETS,
    effective_config,
)
from lenet_dist.errors import UserError, describe_holder
from lenet_dist.rundir import RUNS_DIR, lock_holder, run_to_read, trained_runs
from lenet_dist.settings_io import read_settings, to_yaml
from lenet_dist.watchdog import parse_timeout




def _compile_cache(ctx, param, value):
    """--compile-cache is read where JAX starts (runtime.use_compile_cache), from the
    environment, which a launched job's processes inherit."""
    if value is not None:
        value = TextPath().convert(value, param, ctx)
        os.environ[COMPILE_CACHE_ENV] = value
    return value


@click.group(cls=Commands, epilog=EXIT_STATUSES + "\n\n" + COMPLETION,
             context_settings={"help_option_names": ["-h", "--help"],
                               "show_default": True})
# The source's version (an editable install's metadata lags a bump until reinstalled).
@click.version_option(version=versions.__version__, prog_name="lenet-dist")
@option("--debug", is_flag=True, envvar=DEBUG_ENV, show_envvar=True,
        help="After an error's one line, also print its traceback (also after the "
             "command: `lenet-dist train --debug`).")
@option("--compile-cache", metavar="DIR|off", default=None, envvar=COMPILE_CACHE_ENV,
        show_envvar=True, callback=_compile_cache,
        show_default="<cache folder>/jax-compile: $LENET_DIST_CACHE_DIR, else "
                     "$XDG_CACHE_HOME/lenet-dist, else ~/.cache/lenet-dist",
        help="Where JAX keeps compiled programs, so a second run (or a restart after "
             "preemption) loads them instead of compiling; off to compile every time.")
@click.pass_context
def cli(ctx, debug, compile_cache):
    """Train LeNet-5 data-parallel with jax.sharding, from a laptop to a TPU pod."""
    ctx.ensure_object(Session).debug = debug



@cli.command()
@option("--recipe", type=RECIPE_TYPE, default=None, is_eager=True,
        show_default="d2l, or the --config file's recipe",
        help="d2l: the seed's 1998 LeNet-5 and SGD; modern: the same skeleton with "
             "ReLU, max pooling, BatchNorm, He init, AdamW + cosine, label smoothing "
             "and augmentation; fast: modern's model, 2 epochs of one-cycle AdamW, "
             "0.90 soonest; smoke: d2l's model in seconds. It sets the defaults "
             "below, each recipe's where they differ (`--recipe modern --help`: "
             "modern's alone); --config and the options override them.")
@option("--preset", type=click.Choice(sorted({*PRESETS, *DEPRECATED_PRESETS})),
        default=None, hidden=True, is_eager=True, help="The old name of --recipe.")
@option("--config", "config_file", type=TextPath(), default=None, metavar="FILE",
        help="A run.yaml or run.json of Config field names and values (or a run's "
             "config.json, to run it again): over the recipe, under the options.")
@config_options
@option("--allow-config-change", is_flag=True,
        help="Resume even if the workdir's saved run had other hyper-parameters.")
@option("--progress/--no-progress", default=None, help="Per-step progress bar.",
        show_default="on when stderr is a terminal")
@option("--tensorboard/--no-tensorboard", default=True,
        help="Event files in <workdir>/tb (process 0).")
@option("--log-every-steps", type=click.IntRange(1, 1_000_000), default=50,
        help="Train loss to TensorBoard every K steps.")
@option("--profile-steps", metavar="A:B", default=None,
        help="Trace steps A..B with jax.profiler into <workdir>/tb.")
@option("--stall-timeout", metavar="SECONDS", default=None, envvar="LENET_DIST_STALL_TIMEOUT",
        show_envvar=True, show_default="ten times the slowest step, evaluation or save "
        "measured, at least 300",
        help="A run (every process of a job) that makes no progress for this long stops "
             "with one line naming the process that is behind, and exits 42 to be "
             "restarted; 0 turns the watchdog off.")
@option("--print-config", is_flag=True,
        help="Print the effective config (recipe, then --config, then the options) "
             "as YAML, which --config reads back, and exit without training or "
             "touching the workdir.")
@job_options
def train(recipe, preset, config_file, progress, allow_config_change, tensorboard,
          log_every_steps, profile_steps, stall_timeout, print_config, job, **fields):
    """Train LeNet-5 (the d2l recipe by default), resuming from --workdir.

    SIGTERM/SIGINT finish the step in flight, save a checkpoint and exit with
    128 + the signal number (143, 130); the same command then resumes. In a
    multi-process job a SIGTERM to any process stops all of them at the same step.
    """
    if preset is not None:
        if preset in DEPRECATED_PRESETS:
            click.echo(DEPRECATED_PRESETS[preset][1], err=True)
        recipe = preset
    settings = read_settings(config_file) if config_file else {}
    config = effective_config(recipe, settings, fields).validate(cli=True)
    stall_timeout = parse_timeout(stall_timeout)
    if print_config:
        click.echo(to_yaml(config), nl=False)
        return
    if progress is None:
        progress = sys.stderr.isatty()
    with runtime.quick_interrupts():
        runtime.configure(cpu_devices=config.devices, job=job, sync_preemption=True)
        from lenet_dist.training import Outputs
        from lenet_dist.training import train as run

    run(config, progress=progress, allow_config_change=allow_config_change,
        outputs=Outputs(tensorboard, log_every_steps, profile_steps),
        stall_timeout=stall_timeout)


@cli.command("eval")
@read_workdir()
@checkpoint_choice
@DEVICES
@config_option("data_dir")
@job_options
def eval_cmd(workdir, step, best, devices, data_dir, job):
    """Evaluate a checkpoint on the full test set (all 10,000 images)."""
    workdir = run_to_read(workdir)
    with runtime.quick_interrupts():
        runtime.configure(cpu_devices=devices, job=job)
        from lenet_dist.evaluation import describe_evaluation, evaluate_checkpoint

    result = evaluate_checkpoint(workdir, step=step, best=best, devices=devices,
                                 data_dir=data_dir)
    if distributed.is_primary():
        click.echo(f"{workdir} {describe_evaluation(result)}")


@cli.command()
@read_workdir()
def checkpoints(workdir):
    """List saved checkpoints with their metrics; mark the best (by validation accuracy
    when the run held out a validation split, else by test accuracy)."""
    workdir = run_to_read(workdir)
    with runtime.quick_interrupts():
        runtime.configure()
        from lenet_dist.evaluation import checkpoints_table, list_checkpoints

    rows = list_checkpoints(workdir, warn=lambda line: click.echo(line, err=True))
    if not rows:
        raise UserError(f"no checkpoints in {workdir}")
    holder = lock_holder(workdir)
    if holder is not None:
        click.echo(f"(being written by {describe_holder(holder)})")
    for line in checkpoints_table(rows):
        click.echo(line)


@cli.command("report")
@click.argument("runs", nargs=-1, type=TextPath(), metavar="[RUN]...")
@read_workdir("The run to report on (or give it as RUN).")
@option("--compare", is_flag=True,
        help="Compare the RUNs (as two or more RUNs do without it).")
@option("--out", type=TextPath(), default=None, help="Where the PNGs and the .md go.",
        show_default="<run>/report, or ./report-compare for a comparison")
@checkpoint_choice
@config_option("data_dir")
def report_cmd(runs, workdir, compare, out, step, best, data_dir):
    """PNGs (learning curves, confusion matrix, misclassified test images) and a
    report.md of a run (`report RUN`); with two or more, `report RUN1 RUN2 ...`, the
    runs' curves overlaid and compared in compare.md."""
    if runs and workdir is not None:
        raise click.UsageError("give the run as RUN or with --workdir, not both")
    if compare and len(runs) < 2:
        raise click.UsageError("--compare takes two or more run directories as arguments")
    if len(runs) < 2:
        runs = [runs[0] if runs else run_to_read(workdir)]
    with runtime.quick_interrupts():
        runtime.configure(cpu_devices=1)
        from lenet_dist.evaluation import write_report

    click.echo(f"wrote {write_report(runs, out, step, best, data_dir)}")


@cli.command()
@option("--recipe", type=RECIPE_TYPE, default="d2l",
        help="Any recipe train takes (smoke trains d2l's model).")
def summary(recipe):
    """Layer-by-layer output shapes for one 28x28 image, and the parameter count."""
    with runtime.quick_interrupts():
        runtime.configure()
        from lenet_dist import model

    for line in model.summary_lines(PRESETS[recipe].network):  # d2l's or modern's layout
        click.echo(line)


@cli.command()
@DEVICES
@job_options
def devices(devices, job):
    """Platform, devices, and the mesh that `--devices N` would build."""
    with runtime.quick_interrupts():
        runtime.configure(cpu_devices=devices, job=job)
        from lenet_dist.mesh import describe, make_mesh

    click.echo(describe(make_mesh(devices)))


# Each round trains every configuration from scratch: 100 rounds is days on a CPU.
MAX_BENCH_ROUNDS = 100


@cli.command()
@option("--devices", "device_counts", multiple=True, default=(1, 8),
        type=int_range("devices"),  # one host: bench.plan caps the simulated count
        help="Device counts, one process each (repeat the option).")
@option("--job", "jobs", multiple=True, type=JobShape(), metavar="PxD",
        help="Also P local processes x D devices each as one jax.distributed job, "
             "e.g. 2x4 (repeat the option).")
@option("--batch-size", "batch_sizes", multiple=True, type=int_range("batch_size"),
        help="Global batch sizes (repeat the option).",
        show_default="128, or 256 with --serving")
@option("--recipe", "recipes", multiple=True, type=RECIPE_TYPE, default=("d2l",),
        help="Recipes to measure (repeat the option).")
@option("--epochs", type=int_range("epochs"), default=3,
        help="Epochs per run, 2 or more: the first (compilation) is not counted. With "
             "--to-accuracy: instead of each recipe's own.")
@option("--rounds", type=click.IntRange(1, MAX_BENCH_ROUNDS), default=2,
        help="Interleaved repetitions, to see the machine's noise.")
@config_option("data_dir")
@option("--json", "json_path", type=TextPath(), default=None, metavar="FILE",
        help="Also write the result (machine, versions, every round) as JSON.")
@option("--checkpoint-cost", is_flag=True,
        help="Compare checkpointing on vs off on the first configuration instead.")
@option("--serving", is_flag=True,
        help="Instead: inference, exported SavedModel vs jitted JAX, in one process.")
@option("--to-accuracy", type=click.FloatRange(0, 1, min_open=True), default=None,
        metavar="A", help="Instead: wall time from process start to the first test "
        "accuracy >= A, each --recipe (fast unless given) x --devices (1 unless given) run as a "
        "user runs it, cold and warm (compilation cache), with where the time went.")
@option("--workdir", type=TextPath(), default=None,
        help="With --serving: export this run's latest checkpoint.",
        show_default="a fresh init")
def bench(device_counts, jobs, batch_sizes, recipes, epochs, rounds, data_dir, json_path,
          checkpoint_cost, serving, to_accuracy, workdir):
    """Training images/s per recipe x batch size x devices (or job), each run in fresh
    processes: the steady state, evaluation, and warm-up (first step, compile included;
    time to it) apart, peak memory; a table, and JSON with --json. Or the time to an
    accuracy (--to-accuracy), or serving (--serving)."""
    from lenet_dist import bench as bench_lib

    if epochs < 2 and to_accuracy is None:
        raise click.BadParameter("a benchmark needs 2 or more epochs (the first compiles "
                                 "and is not counted)", param_hint="'--epochs'")
    if json_path:
        bench_lib.check_json_path(json_path)  # before an hour is spent
    if to_accuracy is not None:
        from lenet_dist import to_accuracy as race_lib  # inside: see bench_lib

        given = click.get_current_context().get_parameter_source
        if jobs or batch_sizes or serving or checkpoint_cost:
            raise click.UsageError("--to-accuracy runs each recipe as it is: it takes "
                                   "--recipe, --devices, --rounds, --data-dir and --json")
        if given("recipes") == click.core.ParameterSource.DEFAULT:
            recipes = ("fast",)
        if given("device_counts") == click.core.ParameterSource.DEFAULT:
            device_counts = (1,)
        more = () if given("epochs") == click.core.ParameterSource.DEFAULT \
            else ("--epochs", str(epochs))  # else each recipe's own
        result = race_lib.race([race_lib.Contender(r, d, more) for r in recipes
                                for d in device_counts], to_accuracy, rounds, data_dir,
                               echo=click.echo)
    elif serving:
        if len(batch_sizes) > 1:
            raise click.UsageError("--serving measures one --batch-size")
        with runtime.quick_interrupts():
            runtime.configure(cpu_devices=1)
        result = bench_lib.bench_serving(workdir, batch_size=(batch_sizes or (256,))[0],
                                         rounds=max(rounds, 3), echo=click.echo)
        result = {**bench_lib.environment(), "serving": result}
    else:
        runs = bench_lib.plan(device_counts, batch_sizes or (128,), recipes, jobs)
        result = bench_lib.bench_training(runs, epochs=epochs, rounds=rounds,
                                          data_dir=data_dir, echo=click.echo,
                                          checkpoint_cost=checkpoint_cost)
    if json_path:
        bench_lib.write_json(json_path, result)
        click.echo(f"wrote {json_path}")


@cli.command("export")
@read_workdir()
@checkpoint_choice
@option("--out", type=TextPath(), required=True,
        help="SavedModel directory to create; for TF Serving, end it with a "
             "version folder: models/lenet/1.")
@option("--platforms", default=",".join(DEFAULT_EXPORT_PLATFORMS),
        help="Comma-separated platforms to serialize for: cpu, cuda, rocm, tpu.")
@option("--format", "formats", default="savedmodel",
        help="Comma-separated formats: savedmodel (always built: the others are "
             "made from it), tflite, onnx; each lands in --out.")
@option("--quantize", default=None, metavar="int8",
        help="With tflite: also model_int8.tflite, full-integer int8, calibrated on "
             "300 training images.")
@option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@config_option("data_dir", help="Where the test images for the export-time check are.")
@job_options
def export_cmd(workdir, step, best, out, platforms, formats, quantize, overwrite, data_dir,
               job):
    """Export a checkpoint as a TensorFlow SavedModel (jax2tf) for TF Serving, and
    optionally as TFLite and ONNX models for the edge.

    Each model is loaded back and compared with JAX before they are moved to --out.
    In a multi-process job every process restores and process 0 exports.
    """
    workdir = run_to_read(workdir)
    with runtime.quick_interrupts():
        runtime.configure(cpu_devices=None if job.enabled else 1, job=job)
        from lenet_dist.exporting import describe_export, export_checkpoint

    info = export_checkpoint(workdir, out, step=step, best=best, platforms=platforms,
                             overwrite=overwrite, data_dir=data_dir, formats=formats,
                             quantize=quantize)
    if info is None:  # not process 0
        return
    for line in describe_export(info, workdir, out):
        click.echo(line)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=TextPath())
@option("--model", type=TextPath(), default=None,
        help="An exported SavedModel directory (TensorFlow only, no JAX).")
@read_workdir("Or a run: predict from its checkpoint in JAX (as predict does without "
              "--model).")
@checkpoint_choice  # with --workdir
@option("--top", type=click.IntRange(min=1, max=10), default=1,
        help="Classes to show per image.")
@option("--invert", is_flag=True,
        help="Invert pixels: for dark objects on a light background "
             "(Fashion-MNIST is light on dark).")
@option("--labels", type=TextPath(), default=None,
        help="IDX labels file for IDX inputs: also print the accuracy.")
@option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@option("--quiet", "-q", is_flag=True, help="Only the accuracy (with --labels).")
def predict(inputs, model, workdir, step, best, top, invert, labels, as_json, quiet):
    """Classify PNG/JPEG/GIF/BMP files or IDX image files.

    Images are converted to 28x28 grayscale; one line per image with the class
    name and its probability. The model is --model's export, or a run's checkpoint:
    --workdir's, or without either, runs/lenet's (where train writes by default).
    """
    if model is not None and workdir is not None:
        raise click.UsageError("give exactly one of --model (SavedModel) or --workdir")
    if model is not None and (step is not None or best):
        raise click.UsageError("--step/--best choose a checkpoint; use them with --workdir")
    if model is None and workdir is None and not trained_runs():
        raise click.UsageError("give --model (SavedModel) or --workdir: there is no run "
                               f"under {RUNS_DIR}/ to read")
    if model is None:
        workdir = run_to_read(workdir)
    with runtime.quick_interrupts():
        if workdir is not None:
            runtime.configure(cpu_devices=1)
        from lenet_dist.prediction import format_rows
        from lenet_dist.prediction import predict as run

    result = run(inputs, model=model, workdir=workdir, step=step, best=best, invert=invert,
                 top=top, labels=labels)
    if not quiet:
        for line in format_rows(result, as_json):
            click.echo(line)
    if "accuracy" in result:
        click.echo(f"accuracy {result['accuracy']:.4f} on {len(result['classes']):,} images "
                   f"({model if model is not None else workdir})")


# Each local process is a whole Python with JAX (0.2-0.5 GB measured); 64 fill a large
# workstation. A job longer than 30 days does not belong on one machine's launcher.
MAX_LOCAL_PROCESSES = 64
MAX_LAUNCH_SECONDS = 30 * 86_400
# A job that fails 100 times in a row is crash-looping, not unlucky.
MAX_RESTARTS = 100


@cli.command(context_settings={"ignore_unknown_options": True,
                               "allow_interspersed_args": False})
@option("--processes", "-n", type=click.IntRange(1, MAX_LOCAL_PROCESSES), default=2,
        help="Local processes, each one process of the job.")
@option("--timeout", type=FiniteFloatRange(1, MAX_LAUNCH_SECONDS), default=None,
        metavar="SECONDS", show_default="none: the job runs until it ends",
        help="Seconds for the whole launch, restarts included; then every process is "
             "killed, the launcher says so in one line, and exits 124.")
@option("--grace", type=FiniteFloatRange(0, MAX_LAUNCH_SECONDS), default=30,
        help="Seconds the others get to exit after one process fails, "
             "before they are killed.")
@option("--port", type=click.IntRange(1, 65535), default=None,
        help="Coordinator port on 127.0.0.1.",
        show_default="a free one, fresh for each restart")
@option("--max-restarts", type=click.IntRange(0, MAX_RESTARTS), default=0,
        help="Times a failed job is started again (all its processes; train "
             "resumes from its workdir). Restarted: exit 42 (restart me) and deaths "
             "by a signal (134, 137, 143); not a job the launcher's own SIGTERM or "
             "Ctrl-C stopped, nor any other exit (1, 2: the same command fails the "
             "same way).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def launch(processes, timeout, grace, port, max_restarts, command):
    """Run a lenet-dist COMMAND (train, eval, ...: lenet-dist's own commands, not any
    program) as a job of N local processes on loopback, CPU devices simulated.

    \b
    lenet-dist launch -n 2 -- train --devices 8 --workdir runs/mp
    runs `lenet-dist train --devices 8 --workdir runs/mp` as 2 processes x 4
    simulated CPU devices: the same program, sharding and checkpoints as 2 hosts
    of a TPU slice. Output lines carry the process id. The processes die with
    the launcher, even by kill -9. There is no time limit unless --timeout.
    """
    return launch_lib.run(list(command), processes, timeout=timeout, grace=grace, port=port,
                          max_restarts=max_restarts)


def main(argv=None) -> int:
    """Entry point: every failure is one line on stderr and a non-zero exit; with
    --debug (or LENET_DIST_DEBUG=1) the traceback follows the line."""
    return run_command(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
