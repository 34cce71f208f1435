"""One convention for the whole command line, checked on every option of every command
by click introspection: how defaults are shown, one type and range per shared option,
the same recipes everywhere, --debug on either side of the command, the run a reading
command picks without --workdir, `report RUN...`, the exit statuses in every --help,
shell completion, and `launch --timeout`."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest

from lenet_dist import cli as cli_lib
from lenet_dist import cli_options
from lenet_dist import launch as launch_lib
from lenet_dist import rundir
from lenet_dist.cli import main
from lenet_dist.config import PRESETS
from lenet_dist.errors import UserError

COMMANDS = sorted(cli_lib.cli.commands)


def options(command: click.Command):
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def every_option():
    """(command name, option) for every shown option, the group's included."""
    yield "", cli_lib.cli, [p for p in options(cli_lib.cli)]
    for name in COMMANDS:
        yield name, cli_lib.cli.commands[name], options(cli_lib.cli.commands[name])


def help_extra(command: click.Command, param: click.Option) -> tuple[dict, object]:
    """What --help shows after the option's help, and its default value."""
    with click.Context(command, info_name=command.name,
                       show_default=True) as ctx:  # as the group's context_settings
        return param.get_help_extra(ctx), param.get_default(ctx, call=False)


# ------------------------------------------------------------------ 1. defaults, one way


def test_every_option_shows_its_default_one_way():
    """A default is shown only in click's suffix `[default: X]`: never hand-written in
    the help; an on/off flag's is on or off; a recipe's is `d2l: A, modern: B, ...`,
    every recipe in order; a plain flag (off unless given) shows none; an option with a
    value as its default always shows it."""
    recipe_form = re.compile("^" + ", ".join(f"{name}: [^,]+" for name in PRESETS) + "$")
    for name, command, params in every_option():
        for param in params:
            where = f"{name or 'lenet-dist'} {param.opts[0]}"
            assert not re.search(r"[\[(]default|default:", param.help or "", re.I), \
                f"{where}: a default written in the help text; use show_default"
            assert not isinstance(param, click.Option) or param.show_default is not False, where
            extra, default = help_extra(command, param)
            shown = extra.get("default")
            if shown is not None:
                assert shown and "[" not in shown and not shown.startswith("("), (where, shown)
            if isinstance(param, cli_options.ConfigOption):
                if ": " in (shown or ""):
                    assert recipe_form.match(shown), (where, shown)
                continue
            assert isinstance(param, cli_options.CliOption) or param.name in ("help", "version"), \
                f"{where}: not declared with cli_options.option (CliOption)"
            if param.is_flag and param.secondary_opts:
                assert shown in ("on", "off") or isinstance(param.show_default, str), \
                    (where, shown)
            elif param.is_flag:
                assert shown is None, (where, shown)
            elif default not in (None, ()) and "UNSET" not in repr(default) \
                    and not param.required:  # click 8.3+: UNSET when none was given
                assert shown, f"{where} has a default ({default!r}) but does not show it"


def test_rendered_help_has_one_default_per_option():
    for name in COMMANDS:
        text = cli_lib.cli.commands[name].get_help(
            click.Context(cli_lib.cli.commands[name], info_name=name, show_default=True))
        for record in re.split(r"\n  (?=-)", text):
            assert record.count("[default") <= 1, (name, record)
            assert "(modern:" not in record and "(smoke:" not in record, (name, record)


# --------------------------------------------------------- 2. one type per shared option


def type_of(param: click.Parameter) -> tuple:
    kind = param.type
    return (type(kind).__name__, getattr(kind, "min", None), getattr(kind, "max", None),
            getattr(kind, "min_open", None), getattr(kind, "max_open", None),
            tuple(getattr(kind, "choices", ()) or ()), bool(getattr(param, "is_flag", False)))


# Options that share a name but not a meaning, on purpose (each entry says why).
DIFFERENT_ON_PURPOSE = {
    "--json": "predict --json is an output format (a flag); bench --json FILE a file",
}


def test_an_option_has_one_type_and_range_in_every_command():
    seen: dict[str, dict[str, tuple]] = {}
    for name, _, params in every_option():
        for param in params:
            for opt in param.opts:
                seen.setdefault(opt, {})[name or "lenet-dist"] = type_of(param)
    shared = {opt: kinds for opt, kinds in seen.items() if len(kinds) > 1}
    assert {"--devices", "--epochs", "--batch-size", "--recipe", "--workdir", "--step",
            "--best", "--data-dir", "--out"} <= set(shared)
    for opt, kinds in shared.items():
        if opt in DIFFERENT_ON_PURPOSE:
            continue
        assert len(set(kinds.values())) == 1, (opt, kinds)


def test_devices_and_epochs_have_the_train_ranges_in_bench():
    bench = {p.name: p for p in cli_lib.cli.commands["bench"].params}
    train = {p.name: p for p in cli_lib.cli.commands["train"].params}
    assert type_of(bench["device_counts"]) == type_of(train["devices"])
    assert type_of(bench["epochs"]) == type_of(train["epochs"])


def test_bench_refuses_one_epoch_in_one_line(capsys):
    assert main(["bench", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: Invalid value for '--epochs': a benchmark needs 2 or more epochs (the first "
        "compiles and is not counted)"]


# ------------------------------------------------------------- 3. the same recipes


def test_every_recipe_option_takes_every_recipe():
    recipes = [(name, p) for name, _, params in every_option() for p in params
               if "--recipe" in p.opts]
    assert {name for name, _ in recipes} >= {"train", "summary", "bench"}
    for name, param in recipes:
        assert set(param.type.choices) == set(PRESETS), name


def test_summary_takes_the_smoke_recipe(capsys):
    assert main(["summary", "--recipe", "smoke"]) == 0
    assert "parameters: 61,706" in capsys.readouterr().out  # smoke trains d2l's model


# -------------------------------------------------------- 4. --debug before or after


@pytest.mark.parametrize("args", [["--debug", "train", "--lr", "nan"],
                                  ["train", "--lr", "nan", "--debug"],
                                  ["train", "--debug", "--lr", "nan"]])
def test_debug_before_or_after_the_command(capsys, monkeypatch, args):
    monkeypatch.delenv("LENET_DIST_DEBUG", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: Invalid value for '--learning-rate' / '--lr': nan is not a " \
                     "finite number"
    assert err[1].startswith("Traceback"), err


def test_without_debug_no_traceback(capsys, monkeypatch):
    monkeypatch.delenv("LENET_DIST_DEBUG", raising=False)
    assert main(["train", "--lr", "nan"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


# ------------------------------------------------ 5. the run read without --workdir


def plant_run(root: Path, name: str, mtime: float) -> None:
    path = root / "runs" / name / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(PRESETS["d2l"].to_json())
    os.utime(path, (mtime, mtime))


def test_a_reader_without_workdir_reads_where_train_writes(tmp_path, monkeypatch):
    """Not "the run trained last": after `make train` and the API example, the
    README's `export --best` exported the example's run."""
    monkeypatch.chdir(tmp_path)
    assert rundir.run_to_read(None) == "runs/lenet"  # no runs/: the command says so
    (tmp_path / "runs" / "not-a-run").mkdir(parents=True)  # no config.json: not a run
    assert rundir.run_to_read(None) == "runs/lenet"
    plant_run(tmp_path, "smoke", 1_000_000_000)
    plant_run(tmp_path, "modern", 2_000_000_000)
    with pytest.raises(UserError, match=r"^no run in runs/lenet \(where `lenet-dist train` "
                       r"writes by default\); give --workdir, one of: runs/modern, "
                       r"runs/smoke$"):
        rundir.run_to_read(None)
    plant_run(tmp_path, "lenet", 1_500_000_000)  # older than modern: still the one read
    assert rundir.run_to_read(None) == "runs/lenet"
    assert rundir.run_to_read("elsewhere") == "elsewhere"


@pytest.fixture
def reads(monkeypatch):
    """The workdirs that eval and checkpoints read, without JAX or checkpoints."""
    from lenet_dist import evaluation, runtime

    seen: list[str] = []
    monkeypatch.setattr(runtime, "configure", lambda *a, **k: None)
    monkeypatch.setattr(evaluation, "list_checkpoints",
                        lambda workdir, warn=None: seen.append(workdir) or [])

    def evaluate(workdir, **kwargs):
        seen.append(workdir)
        return {"step": 4, "epoch": 1.0, "devices": 1, "test_loss": 1.0,
                "test_accuracy": 0.5, "examples": 10}

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", evaluate)
    return seen


def test_reading_commands_use_the_rule_and_name_the_run(tmp_path, monkeypatch, capsys,
                                                        reads):
    monkeypatch.chdir(tmp_path)
    plant_run(tmp_path, "modern", 2_000_000_000)
    assert main(["eval"]) == 2
    assert capsys.readouterr().err.startswith("error: no run in runs/lenet ")
    plant_run(tmp_path, "lenet", 1_000_000_000)
    assert main(["checkpoints"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: no checkpoints in runs/lenet"]
    assert main(["eval"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("runs/lenet step 4 ")
    assert main(["eval", "--workdir", "runs/modern"]) == 0
    assert capsys.readouterr().out.startswith("runs/modern step 4 ")
    assert reads == ["runs/lenet", "runs/lenet", "runs/modern"]


def test_without_runs_the_default_is_runs_lenet(tmp_path, monkeypatch, capsys, reads):
    monkeypatch.chdir(tmp_path)
    assert main(["checkpoints"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: no checkpoints in runs/lenet"]


def test_the_rule_is_in_the_workdir_help():
    for name in ("eval", "checkpoints", "export", "report", "predict"):
        (workdir,) = [p for p in cli_lib.cli.commands[name].params if p.name == "workdir"]
        assert workdir.default is None and workdir.show_default.startswith("runs/lenet, ")


# -------------------------------------------------------------- 6. report RUN...


@pytest.fixture
def reported(monkeypatch):
    """What `report` would write, without JAX, checkpoints or matplotlib."""
    from lenet_dist import evaluation, runtime

    report_lib = pytest.importorskip("lenet_dist.report")
    calls: list[tuple] = []
    monkeypatch.setattr(runtime, "configure", lambda *a, **k: None)

    def tested(run, step, best, data_dir):
        return {"history": [], "config": PRESETS["d2l"], "predictions": np.zeros(2),
                "labels": np.zeros(2),
                "parameters": 1, "images": None, "class_names": (), "step": 4,
                "attempts": []}

    monkeypatch.setattr(evaluation, "test_predictions", tested)
    monkeypatch.setattr(report_lib, "check_out_dir", lambda out, runs: None)
    monkeypatch.setattr(report_lib, "write_comparison",
                        lambda out, table: calls.append(("compare", out, sorted(table)))
                        or Path(out) / "compare.md")
    monkeypatch.setattr(report_lib, "write_report",
                        lambda out, name, *a, **k: calls.append(("report", out, name))
                        or Path(out) / "report.md")
    return calls


@pytest.mark.parametrize("args, call", [
    (["report", "w/a"], ("report", "w/a/report", "a")),
    (["report", "--workdir", "w/a"], ("report", "w/a/report", "a")),
    (["report", "w/a", "w/b"], ("compare", "report-compare", ["a", "b"])),
    (["report", "--compare", "w/a", "w/b"], ("compare", "report-compare", ["a", "b"])),
    (["report", "w/a", "w/b", "--out", "o"], ("compare", "o", ["a", "b"])),
])
def test_report_takes_runs_as_arguments(reported, capsys, args, call):
    assert main(args) == 0
    assert reported == [call]
    assert capsys.readouterr().out.startswith("wrote ")


@pytest.mark.parametrize("args, message", [
    (["report", "--compare", "w/a"], "--compare takes two or more run directories"),
    (["report", "--workdir", "w/a", "w/b"], "give the run as RUN or with --workdir, not both"),
])
def test_report_usage_errors(reported, capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0]
    assert reported == []


def test_report_without_a_run_reads_where_train_writes(reported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plant_run(tmp_path, "lenet", 1_000_000_000)
    plant_run(tmp_path, "modern", 2_000_000_000)  # trained last, and not the one read
    assert main(["report"]) == 0
    assert reported == [("report", "runs/lenet/report", "lenet")]


# ----------------------------------------------------------- 8. exit statuses in --help


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_every_help_shows_the_exit_statuses(capsys, name):
    assert main([name, "--help"] if name else ["--help"]) == 0
    text = capsys.readouterr().out
    for line in cli_options.EXIT_STATUSES.splitlines()[1:]:  # after click's \b marker
        assert line.strip() in text, (name, line)
    if not name:
        assert "_LENET_DIST_COMPLETE=bash_source lenet-dist" in text


def test_the_exit_statuses_are_the_real_ones():
    from lenet_dist import errors, runtime

    text = cli_options.EXIT_STATUSES
    codes = {int(c) for c in re.findall(r"^\s+(\d+)\s", text, re.M)}
    assert codes == {0, 1, 2, 42, 124, 130, 134, 143}
    assert errors.UserError.exit_code == 2 and errors.Failure.exit_code == 1
    assert errors.Restartable.exit_code == errors.RESTART_EXIT_CODE == 42
    assert launch_lib.TIMED_OUT == 124
    assert errors.Preempted(15, 0).exit_code == 143 and errors.Preempted(2, 0).exit_code == 130
    assert runtime.exit_interrupted.__doc__ and "130" in runtime.exit_interrupted.__doc__


# -------------------------------------------------------------- 9. shell completion


def entry_points() -> list[list[str]]:
    script = Path(sys.executable).parent / "lenet-dist"
    found = [[str(script)]] if script.exists() else []
    return found + [[sys.executable, "-m", "lenet_dist"]]


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"),
                                           ("zsh", "#compdef lenet-dist")])
def test_shell_completion_scripts(shell, marker):
    for argv in entry_points():
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
                   _LENET_DIST_COMPLETE=f"{shell}_source")
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert marker in proc.stdout and "_LENET_DIST_COMPLETE" in proc.stdout, proc.stdout


def test_bash_completion_completes_commands_and_options():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
               _LENET_DIST_COMPLETE="bash_complete")
    words = {"tr": ["train"], "train --rec": ["--recipe"], "summary --recipe ": PRESETS}
    for typed, expected in words.items():
        env.update(COMP_WORDS=f"lenet-dist {typed}", COMP_CWORD=str(len(typed.split(" "))))
        proc = subprocess.run([sys.executable, "-m", "lenet_dist"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        offered = [line.split(",", 1)[1] for line in proc.stdout.splitlines()]
        assert set(expected) <= set(offered), (typed, offered)


# ------------------------------------------------------------------- 10. launch


def test_launch_has_no_timeout_unless_given():
    (timeout,) = [p for p in cli_lib.cli.commands["launch"].params if p.name == "timeout"]
    assert timeout.default is None
    assert launch_lib.run.__defaults__[0] is None  # run(args, processes, timeout=None, ...)
    text = cli_lib.cli.commands["launch"].help
    assert "lenet-dist" in text.split(".")[0] and "no time limit unless --timeout" in text


@pytest.fixture
def fake_job(monkeypatch, tmp_path):
    """launch.run's processes become a shell script (no JAX): `script(body)`."""

    def script(body: str) -> None:
        path = tmp_path / "fake-python"
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

        class FakeJob(launch_lib.LocalJob):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, python=str(path), **kwargs)

        monkeypatch.setattr(launch_lib, "LocalJob", FakeJob)

    return script


def test_launch_without_timeout_waits_for_the_job(fake_job):
    fake_job("sleep 1.5; echo done")
    out = io.StringIO()
    assert launch_lib.run(["devices"], 2, out=out) == 0
    assert "[0] done" in out.getvalue() and "[1] done" in out.getvalue()
    assert "timed out" not in out.getvalue()


def test_launch_timeout_says_so_in_one_line(fake_job):
    fake_job("exec sleep 60")
    out = io.StringIO()
    assert launch_lib.run(["train"], 2, timeout=1, out=out) == 124
    (line,) = [ln for ln in out.getvalue().splitlines() if "timed out" in ln]
    assert line == ("launch: timed out after 1 s; killed all processes (0: 137, 1: 137); "
                    "exit 124 (--timeout)")
