"""Every command the pages give to type parses as written, and what it reads is there.

From the fenced shell blocks of README.md, docs/*.md, launch/README.md and
export/README.md, every command line that runs `lenet-dist` (or `python -m lenet_dist`),
`make TARGET` or a deployment-kit script (`export/*.py`) is taken as a reader would copy
it (a backslash joins the next line; `&&`, `||`, `;` and `|` separate commands), and:

- a `lenet-dist` line goes through the real click commands' `make_context`, so an unknown
  command or option, a bad choice, a bad type or a missing argument fails, as it would
  for the reader; `launch -- COMMAND` parses its COMMAND too;
- a `make` line goes through `make -n` (the target exists, the variables are taken), and
  each `lenet-dist` line the recipe would run, `ARGS` included, through click as above;
- a kit script's line goes through that script's own argparse parser;
- every path such a line reads exists in the checkout, or is made by an earlier command
  of the same page (`make train` makes `runs/lenet`, `export --out DIR` makes DIR), or is
  `runs/lenet`, which the README's quick start makes for every page, or is one of the
  few files the reader brings (USER_FILES: their own images and settings).

Synopses (a line with `[--opt]`, `a|b`, `...` or a placeholder such as `N`, `DIR`) are
not commands as written: `tests/test_docs.py` checks their names. Run for real:
export/README.md's sequence on the session's trained run (`test_export_readme_runs`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest

from lenet_dist.cli import cli
from tests.conftest import ROOT, load_kit_module, real_data_available

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "launch" / "README.md", ROOT / "export" / "README.md"]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w-]*)")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
# What the README's quick start (`make train`) leaves for every other page to use.
QUICK_START_MAKES = {"runs/lenet"}
# Files a reader brings: their own images and settings, named as examples.
USER_FILES = {"shirt.png", "boot.jpg", "x.png", "run.yaml", "photo.jpg"}
DATA = "/usr/share/datasets/fashion-mnist"
# A word that stands for something the reader fills in, or synopsis notation.
PLACEHOLDER = re.compile(r"(?:^|[:=])[A-Z][A-Z0-9_]*(?:\.\.\.)?$|[\[\]|]|\.\.\.|^<.*>$")
KIT_SCRIPTS = {"check_model", "check_savedmodel", "rest_client"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass
class Line:
    page: Path
    number: int
    text: str

    def where(self) -> str:
        return f"{rel(self.page)}:{self.number}: {self.text.strip()}"


def shell_lines(page: Path) -> list[Line]:
    """The fenced shell blocks' command lines, backslash continuations joined."""
    out, block, pending = [], None, None
    for number, text in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(text)
        if fence:
            block = None if block is not None else fence.group(2)
            continue
        if block is None or block not in SHELL_BLOCKS or text.startswith("+ "):
            continue
        if pending is not None:
            pending.text = pending.text[:-1] + " " + text.strip()
        else:
            pending = Line(page, number, text)
        if not pending.text.rstrip().endswith("\\"):
            out.append(pending)
            pending = None
    return out


def words_of(text: str) -> list[list[str]] | None:
    """The commands of one line, each a list of words (comments dropped), or None when
    the line is not valid shell (an output line, say)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return None
    commands, current, skip = [], [], False
    for token in tokens:
        if skip:
            skip = False
        elif token in SEPARATORS:
            commands.append(current)
            current = []
        elif token in REDIRECTS:
            skip = True  # the file a redirect writes or reads
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


@dataclass
class Command:
    kind: str  # "lenet-dist", "make" or a kit script's name
    args: list[str]
    line: Line
    env: dict[str, str] = field(default_factory=dict)


def is_lenet_dist(word: str) -> bool:
    return word == "lenet-dist" or word.endswith("/lenet-dist")


def is_python(word: str) -> bool:
    return re.fullmatch(r"(?:\S*/)?python3?(?:\.\d+)?", word) is not None


def classify(words: list[str], line: Line) -> Command | None:
    env = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, _, value = words[0].partition("=")
        env[key] = value
        words = words[1:]
    if not words:
        return None
    if words[0] == "make":
        return Command("make", words[1:], line, env)
    for i, word in enumerate(words):  # also under srun, mpirun, /usr/bin/time ...
        if is_lenet_dist(word):
            return Command("lenet-dist", words[i + 1:], line, env)
        if is_python(word) and words[i + 1:i + 3] == ["-m", "lenet_dist"]:
            return Command("lenet-dist", words[i + 3:], line, env)
    script = words[1] if is_python(words[0]) and len(words) > 1 else words[0]
    match = re.fullmatch(r"(?:\./)?export/(\w+)\.py", script)
    if match:
        return Command(match.group(1), words[words.index(script) + 1:], line, env)
    return None


def is_synopsis(command: Command) -> bool:
    return any(PLACEHOLDER.search(word) for word in command.args
               if not word.startswith(("http://", "https://")))


def page_commands(page: Path) -> tuple[list[Command], int]:
    """The page's commands in order, and how many synopses were left to test_docs."""
    commands, synopses = [], 0
    for line in shell_lines(page):
        for words in words_of(line.text) or []:
            command = classify(words, line)
            if command is None:
                continue
            if is_synopsis(command):
                synopses += 1
            else:
                commands.append(command)
    return commands, synopses


# --------------------------------------------------------------------- parsing

def parse_lenet_dist(args: list[str]) -> list[tuple[click.Command, dict]]:
    """Parse `lenet-dist ARGS` with the real commands, as `lenet-dist` would before it
    runs anything: [(command, its parsed parameters)], the group first. Raises click's
    UsageError (or BadParameter) for what the reader would see refused."""
    parsed = []
    try:
        ctx = cli.make_context("lenet-dist", list(args), resilient_parsing=False)
    except click.exceptions.Exit:  # --help, --version
        return parsed
    parsed.append((cli, ctx.params))
    rest = [*ctx._protected_args, *ctx.args]
    if not rest:
        return parsed
    name, command, rest = cli.resolve_command(ctx, rest)
    try:
        sub = command.make_context(name, rest, parent=ctx, resilient_parsing=False)
    except click.exceptions.Exit:
        return parsed
    parsed.append((command, sub.params))
    if name == "launch":
        parsed += parse_lenet_dist(list(sub.params["command"]))[1:]
    return parsed


class Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse_kit(script: str, args: list[str]) -> argparse.Namespace:
    """The kit script's own parser on ARGS, stopped right after parsing."""
    module = load_kit_module(script)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        module.main(args)
    except Parsed as done:
        return done.namespace
    except SystemExit as e:  # argparse's refusal (exit 2), or --help (exit 0)
        if e.code:
            raise AssertionError(f"export/{script}.py refuses its arguments "
                                 f"(exit {e.code})") from None
        return argparse.Namespace()
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"export/{script}.py returned before parsing its arguments")


def make_dry_run(args: list[str], env: dict[str, str]) -> list[list[str]]:
    """`make -n ARGS`: the target exists and takes the variables; the `lenet-dist`
    commands its recipes would run, as words."""
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **env})
    assert proc.returncode == 0, f"make -n {' '.join(args)}: {proc.stderr.strip()}"
    runs = []
    for text in proc.stdout.splitlines():
        for words in words_of(text) or []:
            if words and is_lenet_dist(words[0]):
                runs.append(words[1:])
    return runs


# ------------------------------------------------------------ what a line reads

# Per command, the parameters that name what it writes; every other path it reads.
WRITES = {("train", "workdir"), ("export", "out"), ("report", "out"), ("bench", "json_path")}
NOT_FILES = {("train", "dataset")}  # `mnist`, `folder:DIR`: sources.py parses it
KIT_WRITES = {"write_request"}
KIT_NOT_FILES = {"url", "model", "formats"}
MAKE_WRITES = {"train": {"runs/lenet"}, "export": {"serving/lenet/1"}}


def paths_of(command: Command) -> tuple[list[str], list[str]]:
    """(paths it reads, paths it writes)."""
    reads, writes = [], []
    if "_LENET_DIST_COMPLETE" in command.env:  # prints a completion script
        return reads, writes
    if command.kind == "lenet-dist":
        for cmd, params in parse_lenet_dist(command.args)[1:]:
            for param in cmd.params:
                value = params.get(param.name)
                if value is None or not isinstance(param.type, click.Path):
                    continue
                values = list(value) if isinstance(value, (tuple, list)) else [value]
                if (cmd.name, param.name) in NOT_FILES:
                    continue
                (writes if (cmd.name, param.name) in WRITES else reads).extend(values)
            if cmd.name == "train" and params.get("workdir") is None:  # runs/<recipe>
                recipe = params.get("recipe") or "d2l"
                writes.append(f"runs/{'lenet' if recipe == 'd2l' else recipe}")
    elif command.kind == "make":
        for target in command.args:
            writes += MAKE_WRITES.get(target, set())
    else:
        namespace = parse_kit(command.kind, command.args)
        for name, value in vars(namespace).items():
            if name in KIT_NOT_FILES or value is None or isinstance(value, (bool, int, float)):
                continue
            values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            (writes if name in KIT_WRITES else reads).extend(values)
    return reads, writes


def under(path: str, made: set[str]) -> bool:
    """`path` is one of `made`, or inside one, or holds one (`serving/lenet`)."""
    norm = os.path.normpath(path)
    return any(norm == m or norm.startswith(m + "/") or m.startswith(norm + "/")
               for m in made)


def path_problems(page: Path) -> list[str]:
    """What the page's commands read that is not there when they run, and exports onto
    an earlier one's --out without --overwrite (refused: export never replaces one
    unasked)."""
    made, problems = set(QUICK_START_MAKES), []
    for command in page_commands(page)[0]:
        reads, writes = paths_of(command)
        if (command.kind == "lenet-dist" and command.args[:1] == ["export"]
                and "--overwrite" not in command.args
                and any(os.path.normpath(w) in made for w in writes)):
            problems.append(f"{command.line.where()}: its --out was made by an earlier "
                            "command of the page, and export refuses it without "
                            "--overwrite")
        for path in reads:
            if (path.startswith("gs://") or Path(path).name in USER_FILES
                    or under(path, made) or (ROOT / path).exists()):
                continue
            if path.startswith(DATA) and not real_data_available():
                continue  # CI installs it; elsewhere the pages name it all the same
            problems.append(f"{command.line.where()}: reads {path}, which is neither in "
                            "the checkout nor made by an earlier command of the page")
        made |= {os.path.normpath(w) for w in writes}
    return problems


# ----------------------------------------------------------------------- tests

def parse_problems(command: Command) -> list[str]:
    try:
        if "_LENET_DIST_COMPLETE" in command.env:  # click's completion, before parsing
            shell = command.env["_LENET_DIST_COMPLETE"]
            assert shell in ("bash_source", "zsh_source", "fish_source"), shell
        elif command.kind == "lenet-dist":
            parse_lenet_dist(command.args)
        elif command.kind == "make":
            for args in make_dry_run(command.args, command.env):
                parse_lenet_dist(args)
        else:
            parse_kit(command.kind, command.args)
    except (click.ClickException, AssertionError) as e:
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        return [f"{command.line.where()}: {message}"]
    return []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_command_parses_as_written(page):
    commands, _ = page_commands(page)
    problems = [p for command in commands for p in parse_problems(command)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_path_a_command_reads_exists_or_was_made_before(page):
    problems = path_problems(page)
    assert not problems, "\n".join(problems)


def test_the_pages_have_commands_to_check():
    """The extraction finds the commands: if a format change hid them, the tests above
    would pass on nothing."""
    found = {rel(p): page_commands(p)[0] for p in PAGES}
    kinds = {c.kind for commands in found.values() for c in commands}
    assert {"lenet-dist", "make", "check_savedmodel", "check_model"} <= kinds, kinds
    assert len(found["export/README.md"]) >= 8, found["export/README.md"]
    assert sum(len(c) for c in found.values()) >= 25


def test_the_checks_catch_what_they_should(tmp_path):
    """A misspelled option, a bad choice, a bad type, a bad make target, a kit script's
    unknown flag, and a file no earlier command made all fail."""
    for bad in (["train", "--bogus"], ["train", "--recipe", "nope"],
                ["train", "--epochs", "two"], ["launch", "-n", "2", "--", "train", "--bogus"],
                ["frobnicate"]):
        with pytest.raises(click.ClickException):
            parse_lenet_dist(bad)
    assert parse_lenet_dist(["export", "--out", "x/1", "--overwrite", "--best"])
    line = Line(ROOT / "README.md", 1, "")
    assert parse_problems(Command("make", ["no-such-target"], line))
    assert parse_problems(Command("make", ["train", "ARGS=--bogus"], line))
    assert parse_problems(Command("check_model", ["m", "--bogus"], line))
    assert words_of("make train && make export  # or: x") == [["make", "train"],
                                                                ["make", "export"]]
    page = tmp_path / "page.md"
    page.write_text("```bash\nlenet-dist export --out serving/x/1\n"
                    "python export/check_model.py serving/x/1\n"
                    "lenet-dist export --out serving/x/1 --format tflite\n"
                    "python export/check_model.py serving/y/1 --images t10k.gz\n```\n")
    problems = path_problems(page)
    assert len(problems) == 3, problems
    assert "--overwrite" in problems[0]
    assert "serving/y/1" in problems[1] and "t10k.gz" in problems[2]


# ------------------------------------------------ export/README.md's sequence, run

def readme_sequence() -> list[Command]:
    """export/README.md's runnable commands, in order: the export and the checks (not
    `make`, pip, Docker, curl or the REST client, which need a server)."""
    commands = page_commands(ROOT / "export" / "README.md")[0]
    return [c for c in commands if c.kind in ("lenet-dist", "check_savedmodel",
                                              "check_model")]


@pytest.mark.slow
def test_export_readme_runs(trained, tmp_path, monkeypatch, capsys):
    """export/README.md's commands, each as written, in a directory whose runs/lenet is
    the session's trained run: every one exits 0. They run in this process (the CLI's
    `main`, the kit scripts' `main`), which spares each its own TensorFlow and JAX start;
    what each prints is the export and kit tests' business, here the page's sequence."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("onnxruntime")
    if not real_data_available():
        pytest.skip(f"the page's commands read {DATA}")
    import numpy as np
    from PIL import Image

    from lenet_dist.cli import main

    (tmp_path / "runs").mkdir()
    os.symlink(trained.config.workdir, tmp_path / "runs" / "lenet")
    # The README's Python example trains runs/api-smoke after `make train`: "the run
    # trained last" then exported the example's run. The page's exports must read
    # runs/lenet, and say so.
    later = tmp_path / "runs" / "api-smoke" / "config.json"
    later.parent.mkdir()
    shutil.copy(Path(trained.config.workdir) / "config.json", later)
    os.utime(later, (time.time() + 60,) * 2)
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(tmp_path / "shirt.png")
    Image.fromarray(np.full((28, 28), 90, np.uint8)).save(tmp_path / "boot.jpg")
    monkeypatch.chdir(tmp_path)
    # README.md's export, as its command list writes it, first: it reads runs/lenet.
    (line,) = [ln for ln in (ROOT / "README.md").read_text().splitlines()
               if ln.startswith("lenet-dist export ")]
    assert main(shlex.split(line.split("#")[0])[1:]) == 0
    assert capsys.readouterr().out.startswith("exported runs/lenet step "), line
    ran = []
    for command in readme_sequence():
        if command.kind == "lenet-dist":
            code = main(list(command.args))
        else:
            code = load_kit_module(command.kind).main(list(command.args))
        out, err = capsys.readouterr()
        assert code == 0, f"{command.line.where()}\nexit {code}\n{out[-2000:]}{err[-2000:]}"
        ran.append(command.line.text.strip())
    assert len(ran) >= 7, ran
