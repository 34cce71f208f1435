"""`lenet-dist`: a thin click CLI. Each command parses options and calls the library.

Modules that import JAX, TensorFlow or much else (bench) are imported inside the
commands that use them: JAX only after `runtime.configure` has set the device count
and XLA flags, and none of them for `--help`, which stays fast. Start-up
(configure and those imports) runs under `runtime.quick_interrupts`: Ctrl-C
there exits at once.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import math
import os
import sys
import time
import traceback

import click

from lenet_dist import distributed, extras, faults, runtime, safefs, versions
from lenet_dist import launch as launch_lib
from lenet_dist.caches import COMPILE_CACHE_ENV
from lenet_dist.config import (
    COUNT_OR_FRACTION,
    DEFAULT_EXPORT_PLATFORMS,
    DEPRECATED_PRESETS,
    FLOAT_RANGES,
    INT32_MAX,
    INT_RANGES,
    MAX_TEXT_CHARS,
    PRESETS,
    FIELDS,
    check_field,
    effective_config,
    field_type,
    option_name,
    preset,
    read_settings,
)
from lenet_dist.distributed import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_JOIN_TIMEOUT,
    MAX_TIMEOUT,
    MODES,
    JobSpec,
)
from lenet_dist.errors import RESTART_EXIT_CODE, Failure, Preempted, UserError, first_line
from lenet_dist.fatal_filter import describe_loss
from lenet_dist.rundir import DEFAULT_RUN, RUNS_DIR, run_to_read, trained_runs
from lenet_dist.watchdog import parse_timeout

DEBUG_ENV = "LENET_DIST_DEBUG"


NUL_PATH = "the path contains a NUL byte, which no file name can hold"


class TextPath(click.Path):
    """A path that is not empty and is valid text. Bytes that are not UTF-8 reach
    Python as surrogate escapes, which a later print, JSON write or C++ call fails on."""

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            if not value:
                self.fail("the path is empty", param, ctx)
            if len(value) > MAX_TEXT_CHARS:
                self.fail(f"the path is {len(value):,} characters long; the most a path "
                          f"can be is {MAX_TEXT_CHARS:,}", param, ctx)
            if "\0" in value:
                self.fail(NUL_PATH, param, ctx)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(value).decode("ascii", "backslashreplace")
                self.fail(f"'{shown}' is not valid text (bytes that are not UTF-8); "
                          "rename it or choose another path", param, ctx)
        return super().convert(value, param, ctx)


class FiniteFloatRange(click.FloatRange):
    """FloatRange that also refuses nan and inf (nan passes every comparison)."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def int_range(field: str) -> click.IntRange:
    return CountOrFraction(*INT_RANGES[field]) if field in COUNT_OR_FRACTION else \
        click.IntRange(*INT_RANGES[field])


class CountOrFraction(click.IntRange):
    """An integer is a count (in the IntRange); anything else a fraction in (0, 1):
    `--validation 5000` or `--validation 0.0833`, the field's rule (check_field)."""

    name = "n|f"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or value.strip().lstrip("+-").isdigit():
            return super().convert(value, param, ctx)
        number, problem = check_field(param.name, click.FLOAT.convert(value, param, ctx))
        if problem:
            self.fail(problem, param, ctx)
        return number


def float_range(field: str) -> FiniteFloatRange:
    low, high, low_open, high_open = FLOAT_RANGES[field]
    return FiniteFloatRange(low, high, min_open=low_open, max_open=high_open)


class CliOption(click.Option):
    """Every option of lenet-dist. The help convention (tests/test_cli_convention.py
    checks it on every option of every command): a default is shown only in click's
    suffix, `[default: X]`, never written in the help text; an on/off flag's default
    reads `on` or `off`; a plain flag (off unless given) and an option whose absence
    needs no words show none; a default that is not a value (`latest`, `the run
    trained last`) is that suffix's text (show_default="...")."""

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str):  # as a value is shown (click adds brackets)
            extra["default"] = self.show_default
        elif self.is_bool_flag and self.secondary_opts and extra.get("default") \
                and isinstance(self.default, bool):
            extra["default"] = "on" if self.default else "off"
        return extra


option = functools.partial(click.option, cls=CliOption)


class ConfigOption(CliOption):
    """An option that sets a Config field. Its default comes from the recipe: one value
    when every recipe has the same, else each recipe's, `d2l: 10, modern: 10, smoke:
    2`; only the recipe given before --help when there is one (`train --recipe modern
    --help`: `modern: adamw`)."""

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        extra.pop("default", None)
        chosen = ctx.params.get("preset") or ctx.params.get("recipe")  # eager: parsed
        names = [DEPRECATED_PRESETS.get(chosen, (chosen,))[0]] if chosen else list(PRESETS)
        values = {name: show_value(self.name, getattr(preset(name), self.name))
                  for name in names}
        if len(set(values.values())) == 1 and (not chosen or self.same_in_every_recipe()):
            if values[names[0]]:
                extra["default"] = values[names[0]]
        else:
            extra["default"] = ", ".join(f"{name}: {value or 'none'}"
                                         for name, value in values.items())
        return extra

    def same_in_every_recipe(self) -> bool:
        return len({getattr(config, self.name) for config in PRESETS.values()}) == 1


def show_value(field: str, value) -> str:
    if value is None:
        return FIELDS[field].metadata["unset"]
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def config_option(field: str, **changes):
    """The option of a Config field, from its declaration (config.setting): name and
    aliases, type and range, help. None when not given, so a preset's or a --config
    file's value stays. `changes` are click.option arguments for one command."""
    meta = FIELDS[field].metadata
    kind, _ = field_type(field)
    decls = [option_name(field), *meta["aliases"], field]
    if kind is bool:
        decls[0] += "/" + option_name(field).replace("--", "--no-", 1)
        param_type = None
    elif meta["choices"]:
        param_type = click.Choice(meta["choices"])
    elif meta["path"] or field == "dataset":  # a name, or kind:PATH
        param_type = TextPath()
    elif field in INT_RANGES:
        param_type = int_range(field)
    elif field in FLOAT_RANGES:
        param_type = float_range(field)
    else:
        raise TypeError(f"no option type for the Config field {field}")
    settings = dict(cls=ConfigOption, type=param_type, default=None, help=meta["doc"] or None)
    if field == "dataset":
        settings["metavar"] = "NAME|folder:PATH|idx:DIR"
    return option(*decls, **{**settings, **changes})


def config_options(command):
    """One option per Config field; `recipe` is set by the --recipe preset instead."""
    for field in reversed(FIELDS):
        if field != "recipe":
            command = config_option(field)(command)
    return command


# Options that more than one command takes: each is defined once, here (or by
# `config_option`), so a name means the same type and range in every command
# (tests/test_cli_convention.py checks it).
DEVICES = config_option("devices")
RECIPE_TYPE = click.Choice(sorted(PRESETS))  # every recipe train takes, everywhere
def read_workdir(help_text: str = "The run to read."):
    """--workdir of a command that reads a run; None when not given (`run_to_read`)."""
    return option("--workdir", type=TextPath(), default=None, help=help_text,
                  show_default=f"{DEFAULT_RUN}, where train writes with no options")


def job_options(command):
    """Options to run as one process of a multi-process job; the command gets `job`."""

    @functools.wraps(command)
    def with_job(*args, distributed, coordinator_address, num_processes, process_id,
                 heartbeat_timeout, join_timeout, **kwargs):
        job = JobSpec(distributed, coordinator_address, num_processes, process_id,
                      heartbeat_timeout, join_timeout)
        return command(*args, job=job.validate(), **kwargs)

    for job_option in reversed([
        option("--distributed", type=click.Choice(MODES), default="off",
               envvar="LENET_DIST_DISTRIBUTED", show_envvar=True,
               help="auto: join the multi-process job JAX detects (Cloud TPU VM, "
                    "SLURM, Open MPI, Kubernetes) and run the same command on every "
                    "host; where none is detected, one process (with a note)."),
        option("--coordinator-address", metavar="HOST:PORT", default=None,
               envvar=["LENET_DIST_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"],
               show_envvar=True, help="Or join explicitly: process 0's address..."),
        option("--num-processes", type=click.IntRange(1, INT32_MAX), default=None,
               envvar="LENET_DIST_NUM_PROCESSES", show_envvar=True,
               help="...the number of processes..."),
        option("--process-id", type=click.IntRange(0, INT32_MAX - 1), default=None,
               envvar="LENET_DIST_PROCESS_ID", show_envvar=True,
               help="...and this process's id (0 writes logs, metrics, exports)."),
        option("--join-timeout", type=click.IntRange(1, MAX_TIMEOUT),
               default=DEFAULT_JOIN_TIMEOUT, envvar="LENET_DIST_JOIN_TIMEOUT",
               show_envvar=True,
               help="Seconds to wait for every process of the job to join (on GKE, "
                    "this includes waiting for the coordinator's DNS name); a wait "
                    "past 5 s says so once, a wait past this fails with one line."),
        option("--heartbeat-timeout", type=click.IntRange(1, MAX_TIMEOUT),
               default=DEFAULT_HEARTBEAT_TIMEOUT, envvar="LENET_DIST_HEARTBEAT_TIMEOUT",
               show_envvar=True,
               help="Seconds after which the others stop, with one line, when a "
                    "process of the job dies."),
    ]):
        with_job = job_option(with_job)
    return with_job


@dataclasses.dataclass
class Session:
    """What `main` needs to know about the parsed command line after it fails."""

    debug: bool = False


def _debug_after_command(ctx, _param, value):
    if value:
        ctx.ensure_object(Session).debug = True


# The exit statuses of every command, shown at the end of each --help. Each is what
# `main` (and __main__, runtime, preemption, fatal_filter, launch) returns.
EXIT_STATUSES = """\b
Exit status:
  0    done
  1    a runtime failure: a busy workdir, a full disk, an unreadable
       checkpoint, an internal error
  2    bad input or usage (the one error line says what)
  42   restart me: a lost process of a job, the gs:// lease lost, storage
       unreachable; the same command (or a launcher's restart) resumes
  124  launch: its --timeout ran out; every process was killed
  130  interrupted (Ctrl-C); train saves a checkpoint first
  134  in a multi-process job: a process of the job was lost (JAX's abort)
  143  stopped by SIGTERM; train saves a checkpoint first, and the same
       command resumes
launch exits with its job's status."""

# The group's own epilog: the statuses, then how to turn on shell completion.
COMPLETION = """\b
Shell completion (bash 4.4+, zsh, fish), e.g. in ~/.bashrc:
  eval "$(_LENET_DIST_COMPLETE=bash_source lenet-dist)"
(zsh: zsh_source in ~/.zshrc; fish: fish_source)"""


class Commands(click.Group):
    """Every command gets the exit statuses as its epilog, and takes `--debug` after
    its name (`lenet-dist train --debug`) as well as before (`lenet-dist --debug
    train`), hidden from its help (the group's help shows it)."""

    def add_command(self, cmd, name=None):
        cmd.params.append(click.Option(["--debug"], is_flag=True, hidden=True, is_eager=True,
                                       expose_value=False, callback=_debug_after_command))
        cmd.epilog = EXIT_STATUSES
        super().add_command(cmd, name)


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
        click.echo(config.to_yaml(), nl=False)
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


def checkpoint_choice(command):
    """--step S | --best, declared and checked in one place for every command."""

    @functools.wraps(command)
    def checked(*args, **kwargs):
        if kwargs["step"] is not None and kwargs["best"]:
            raise click.UsageError("--step and --best are exclusive; give one")
        return command(*args, **kwargs)

    checked = option("--best", is_flag=True,
                     help="The checkpoint with the best validation accuracy (test "
                          "accuracy for a run without --validation).")(checked)
    return option("--step", type=click.IntRange(0, INT32_MAX), default=None,
                  help="The checkpoint of this step.", show_default="latest")(checked)


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
        from lenet_dist.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(workdir, step=step, best=best, devices=devices,
                                 data_dir=data_dir)
    if distributed.is_primary():
        click.echo(f"{workdir} step {result['step']} (epoch {result['epoch']:g}) on "
                   f"{result['devices']} device(s): test loss {result['test_loss']:.4f}  "
                   f"test accuracy {result['test_accuracy']:.4f}  "
                   f"({result['examples']:,} images)")


@cli.command()
@read_workdir()
def checkpoints(workdir):
    """List saved checkpoints with their metrics; mark the best (by validation accuracy
    when the run held out a validation split, else by test accuracy)."""
    workdir = run_to_read(workdir)
    with runtime.quick_interrupts():
        runtime.configure()
        from lenet_dist.evaluation import list_checkpoints

    rows = list_checkpoints(workdir, warn=lambda line: click.echo(line, err=True))
    if not rows:
        raise UserError(f"no checkpoints in {workdir}")
    holder = safefs.lock_holder(workdir)
    if holder is not None:
        click.echo(f"(being written by {safefs.describe_holder(holder)})")
    validation = any(row["validation_accuracy"] is not None for row in rows)
    click.echo(f"{'step':>8}  " + (f"{'val acc':>8}  " if validation else "")
               + f"{'test acc':>8}  {'test loss':>9}")
    for row in rows:
        def figure(name):
            return f"{row[name]:.4f}" if row[name] is not None else "-"

        mark = (f"  UNREADABLE: {row['unreadable']}" if row["unreadable"] else
                "  best" if row["best"] else "")
        note = f"  (note: {row['note']}; figures from its history)" if row["note"] else ""
        click.echo(f"{row['step']:>8}  "
                   + (f"{figure('validation_accuracy'):>8}  " if validation else "")
                   + f"{figure('test_accuracy'):>8}  {figure('test_loss'):>9}{mark}{note}")
    click.echo("best: by validation accuracy (the test set is only reported)"
               if rows[0]["selected_on"] == "validation" else
               "best: by test accuracy, selected on the test set (train with "
               "--validation N to choose on held-out training images)")


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
    with runtime.quick_interrupts():
        runtime.configure(cpu_devices=1)
        from lenet_dist import report as report_lib
        from lenet_dist.evaluation import test_predictions

    if len(runs) >= 2:
        out = out or "report-compare"
        report_lib.check_out_dir(out, runs)  # before restoring and predicting
        table = {}
        for run in runs:
            tested = test_predictions(run, step, best, data_dir)
            name = os.path.basename(os.path.normpath(run))
            table[name] = {"history": tested["history"], "config": tested["config"].to_dict(),
                           "final": {"test_accuracy": float((tested["predictions"]
                                                             == tested["labels"]).mean()),
                                     "parameters": tested["parameters"]}}
        path = report_lib.write_comparison(out, table)
    else:
        workdir = runs[0] if runs else run_to_read(workdir)
        out = out or os.path.join(workdir, "report")
        report_lib.check_out_dir(out, [workdir])  # before restoring and predicting
        tested = test_predictions(workdir, step, best, data_dir)
        path = report_lib.write_report(
            out, os.path.basename(os.path.normpath(workdir)),
            tested["history"], tested["config"].to_dict(), tested["labels"],
            tested["predictions"], tested["images"], tested["class_names"],
            extra={"parameters": tested["parameters"], "checkpoint step": tested["step"]},
            image_names=tested.get("image_names"),  # a folder dataset's files, else None
            attempts=tested["attempts"])
    click.echo(f"wrote {path}")


@cli.command()
@option("--recipe", type=RECIPE_TYPE, default="d2l",
        help="Any recipe train takes (smoke trains d2l's model).")
def summary(recipe):
    """Layer-by-layer output shapes for one 28x28 image, and the parameter count."""
    with runtime.quick_interrupts():
        runtime.configure()
        from lenet_dist import model

    recipe = PRESETS[recipe].recipe  # the model's layout: d2l or modern
    rows = model.layer_summary(recipe=recipe)
    click.echo(f"{'layer':<10}output shape")
    for name, shape in rows:
        click.echo(f"{name:<10}{shape}")
    import jax

    variables = model.init_variables(jax.random.key(0), recipe)
    click.echo(f"parameters: {model.param_count(variables['params']):,}"
               + (f" (+ {model.param_count(variables['batch_stats']):,} BatchNorm running "
                  "statistics)" if "batch_stats" in variables else ""))


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


class JobShape(click.ParamType):
    """PxD: P local processes of D devices each (parsed by bench.parse_job)."""

    name = "PxD"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from lenet_dist.bench import parse_job  # inside: bench is heavy (see the top)

        try:
            return parse_job(value)
        except UserError as e:
            self.fail(str(e), param, ctx)


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
        from lenet_dist.exporting import export_checkpoint

    info = export_checkpoint(workdir, out, step=step, best=best, platforms=platforms,
                             overwrite=overwrite, data_dir=data_dir, formats=formats,
                             quantize=quantize)
    if info is None:  # not process 0
        return
    ck, ser, ref = info["checkpoint"], info["serialization"], info["reference"]
    acc = f"{ck['test_accuracy']:.4f}" if ck["test_accuracy"] is not None else "not evaluated"
    click.echo(f"exported {workdir} step {ck['step']} (test accuracy {acc}) to {out}")
    click.echo(f"  platforms {','.join(info['platforms'])}; StableHLO "
               f"{ser['stablehlo_version']} (jax writes {ser['jax_default_stablehlo']}, "
               f"TensorFlow {info['versions']['tensorflow']} reads <= "
               f"{ser['tensorflow_max_stablehlo']}); XlaCallModule "
               f"v{ser['calling_convention_version']}")
    click.echo(f"  checked: SavedModel vs JAX on {ref['images']} {ref['source']} images, "
               f"max |logit diff| {ref['max_abs_logit_diff']:.1e}")
    for name, model in info["formats"].items():
        if name == "savedmodel":
            continue
        checked = model["verified"]
        how = (f"max |logit diff| {checked['max_abs_logit_diff']:.1e}"
               if "max_abs_logit_diff" in checked else
               f"classes agree on {checked['class_agreement']:.1%} of {checked['images']:,}"
               + (f", accuracy {checked['accuracy']:.4f} (JAX {checked['jax_accuracy']:.4f})"
                  if "accuracy" in checked else ""))
        click.echo(f"  {model['file']} ({model['bytes']:,} bytes, {model['dtype']}): {how}")


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
    session = Session()
    safe_streams()
    try:
        faults.check()
        code = cli.main(args=argv, prog_name="lenet-dist", standalone_mode=False, obj=session)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.NoArgsIsHelpError as e:  # `lenet-dist` alone: the help, as click
        e.show()
        return e.exit_code
    except click.ClickException as e:
        return report(f"error: {e.format_message()}", e, e.exit_code, session)
    except UserError as e:
        if isinstance(e, Failure):  # e.g. a save whose barrier met a dead process
            lost_process_exit(e)
        return report(f"error: {e}", e, e.exit_code, session)
    except Preempted as e:
        return report(f"{e}", e, e.exit_code, session)
    except OSError as e:  # permissions, full disk, ...: the last line of defence
        lost_process_exit(e)
        where = f" ({e.filename})" if e.filename else ""
        # a name too long is the name given (bad input), not the system failing
        code = 2 if e.errno == errno.ENAMETOOLONG else 1
        return report(f"error: {e.strerror or e}{where}", e, code, session)
    except (KeyboardInterrupt, click.exceptions.Abort) as e:
        return report("error: interrupted", e, 130, session)
    except ModuleNotFoundError as e:
        hint = extras.missing(e.name or "")
        if hint is None:  # a core module: a broken install, reported as internal below
            return internal_error(e, session)
        return report(f"error: {hint}", e, hint.exit_code, session)
    except MemoryError as e:
        lost_process_exit(e)
        return report("error: out of memory (MemoryError); free memory, or use a smaller "
                      "--batch-size or fewer --devices", e, 1, session)
    except Exception as e:
        known = known_failure(e)
        if known is not None:
            return report(f"error: {known[0]}", e, known[1], session)
        return internal_error(e, session)


def known_failure(e: Exception) -> tuple[str, int] | None:
    """Library errors that are not OSErrors but say the same kind of thing: (the line,
    the exit code), or None for a bug. Recognised by class name, so that naming them
    imports neither TensorFlow nor JAX."""
    names = {cls.__name__ for cls in type(e).__mro__}
    text = first_line(e)
    if "ResourceExhaustedError" in names:  # TensorFlow: a full disk, or memory
        return f"out of resources: {text}", 1
    if "PermissionDeniedError" in names:  # TensorFlow
        return f"permission denied: {text}", 1
    if "XlaRuntimeError" in names and text.startswith("RESOURCE_EXHAUSTED"):
        return f"out of device memory: {text}", 1
    if isinstance(e, ValueError) and "null byte" in str(e):  # os.* on a path with "\0"
        return NUL_PATH, 2
    if isinstance(e, UnicodeError):  # text this system cannot encode or decode
        return f"text that cannot be encoded here: {text}", 2
    return None


def safe_streams() -> None:
    """Printing never fails on a character the terminal's encoding lacks
    (PYTHONIOENCODING=ascii, LC_ALL=C and a non-ASCII path): it is escaped."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or detached stream
                pass


def internal_error(e: Exception, session: Session) -> int:
    """A bug or a broken install: one line, the traceback only with --debug."""
    lost_process_exit(e)
    what = type(e).__name__ + (f": {first_line(e)}" if str(e).strip() else "")
    return report(f"error: internal error: {what}; rerun with --debug (or {DEBUG_ENV}=1) "
                  "for the traceback", e, 1, session)


def debug_from_env() -> bool:
    """LENET_DIST_DEBUG as click reads a flag, for failures before the group parsed it."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return value in ("1", "true", "t", "yes", "y", "on")


# A word of an error line longer than this (a path quoted whole: up to 4,096 characters,
# or a component over the 255 a file name may have) is cut, saying its length.
LONGEST_WORD = 200


def one_line(text: str) -> str:
    """`text` on one line, each word at most LONGEST_WORD characters (and its length;
    the punctuation that ends it kept)."""
    def cut(word: str) -> str:
        if len(word) <= LONGEST_WORD:
            return word
        core = word.rstrip(";,:.)]'\"")
        return f"{core[:LONGEST_WORD]}... ({len(core):,} characters){word[len(core):]}"

    return " ".join(cut(word) for word in text.split())


def report(line: str, e: BaseException, code: int, session: Session) -> int:
    """Print the one line; in debug mode, then the traceback, with the library error
    that a `raise ... from None` hid (the part worth seeing)."""
    click.echo(one_line(line), err=True)
    if session.debug or debug_from_env():
        seen, chain = e, set()
        while seen is not None and id(seen) not in chain:
            chain.add(id(seen))
            seen.__suppress_context__ = False
            seen = seen.__cause__ or seen.__context__
        sys.stderr.write("".join(traceback.format_exception(e)))
    return code


def lost_process_exit(e: BaseException) -> None:
    """In a job, an error from a barrier or collective usually means a process died:
    say which in one line and exit at once (the shutdown barrier would wait for the
    dead process, then abort with a second report). When the error does not name it
    (gloo only sees a closed socket), wait for JAX's heartbeat check, which names
    it through the output filter."""
    if distributed.JOINED is None:
        return
    chain, seen = [], e
    while seen is not None:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(chain)
    message = describe_loss(text)
    if message is None and not any(k in text for k in ("Gloo", "barrier", "Barrier")):
        return
    if message is None:
        time.sleep(distributed.JOINED.heartbeat_timeout + 10)  # JAX aborts us before that
        message = f"error: a collective across the job's processes failed: {text[:200]}"
    click.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(RESTART_EXIT_CODE)  # a lost peer: the whole job's restart can go on


if __name__ == "__main__":
    sys.exit(main())
