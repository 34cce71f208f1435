"""The command line's option machinery: every option's class and help convention, the
option of each Config field (from its declaration), the options several commands share
(defined once, so a name means one thing), and the group that gives each command the
exit statuses and a trailing --debug. cli.py declares the commands with them."""

from __future__ import annotations

import functools
import math
import os

import click

from lenet_dist.cli_failures import NUL_PATH, Session
from lenet_dist.config import (
    COUNT_OR_FRACTION,
    DEPRECATED_PRESETS,
    FIELDS,
    FLOAT_RANGES,
    INT32_MAX,
    INT_RANGES,
    MAX_TEXT_CHARS,
    PRESETS,
    check_field,
    field_type,
    option_name,
    preset,
)
from lenet_dist.errors import UserError
from lenet_dist.joining import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_JOIN_TIMEOUT,
    MAX_TIMEOUT,
    MODES,
    JobSpec,
)
from lenet_dist.rundir import DEFAULT_RUN

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
    """One option per Config field."""
    for field in reversed(FIELDS):
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
