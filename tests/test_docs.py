"""The documentation: every relative link (and #anchor) resolves; every `lenet-dist`
command and option, `make` target and scripts/, launch/, export/, benchmarks/ path the
pages name exists; the README fits a screen; and the README's sample of what `make train`
prints has the shape of what a real (short) training run prints, ending at 0.7216."""

import re
from pathlib import Path

import click
import pytest

from lenet_dist.cli import cli
from tests.conftest import REAL_DIR, ROOT, real_data_available, run_cli

README = ROOT / "README.md"
PAGES = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "launch" / "README.md", ROOT / "export" / "README.md"]
README_MAX_LINES = 200
FINAL_ACCURACY = "0.7216"  # the d2l recipe, 10 epochs, 8 devices: the same on every run
# The generated bad-input table (docs/errors.md) names wrong commands and options on
# purpose: `lenet-dist frobnicate`, `lenet-dist --bogus`. Its own test runs every row.
BAD_BEGIN, BAD_END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
FENCE = re.compile(r"^\s*(```|~~~)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def lines_of(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, inside a fenced code block) for every line but the fences."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        out.append((number, line, fenced))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for _, line, fenced in lines_of(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not fenced:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(path: Path) -> list[tuple[int, str]]:
    """Markdown link targets outside code (inline code removed first: `[--step S]`)."""
    out = []
    for number, line, fenced in lines_of(path):
        if not fenced:
            out += [(number, m.group(1)) for m in LINK.finditer(INLINE_CODE.sub("", line))]
    return out


def code_texts(path: Path) -> list[tuple[int, str]]:
    """What a reader would type: each code block's lines (a line ending in a backslash
    joined with the next; an indented line after a `lenet-dist` line continues that
    synopsis) and each inline code span. Left out, explicitly: the generated bad-input
    table, and shell-trace lines (`+ gcloud ...`: remote scripts quoted in a dry run,
    whose `echo "lenet-dist is training"` is a message, not a command)."""
    out, in_table, pending = [], False, None
    for number, line, fenced in lines_of(path):
        if line.strip() == BAD_BEGIN:
            in_table = True
        if line.strip() == BAD_END:
            in_table = False
            continue
        if in_table:
            continue
        if not fenced:
            if pending:
                out.append(pending)
                pending = None
            out += [(number, m.group(1)) for m in INLINE_CODE.finditer(line)]
            continue
        if line.startswith("+ "):
            continue
        text = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment
        if pending and (pending[1].endswith("\\") or
                        (line[:1].isspace() and "lenet-dist" in pending[1]
                         and "lenet-dist" not in text)):
            pending = (pending[0], pending[1].rstrip("\\") + " " + text.strip())
            continue
        if pending:
            out.append(pending)
        pending = (number, text)
    if pending:
        out.append(pending)
    return out


# `lenet-dist` as a program name: at a word start or after a path (`.venv/bin/`), followed
# by a space or the end (not `lenet-dist[export]`, `lenet-dist/venv`, `lenet-dist.fish`).
INVOCATION = re.compile(r"(?:^|(?<=[\s/(\"'$`]))lenet-dist(?=\s|$)")
SEGMENT_END = re.compile(r"\s(?:&&|\|\||;|>|2>)|;")
GLOBAL_OPTIONS = {o for p in cli.params for o in p.opts + p.secondary_opts} | {"--help", "-h"}


def options_of(command: click.Command) -> set[str]:
    names = {o for p in command.params if isinstance(p, click.Option)
             for o in p.opts + p.secondary_opts}
    return names | {"--help", "-h", "--debug"}  # --debug: before or after the command


def token_name(token: str) -> str:
    """`[--step` -> `--step`, `--help=yes` -> `--help`, `--json]` -> `--json`."""
    token = token.lstrip("[(\"'`").rstrip("])\"'`,.;:")
    return token.split("=", 1)[0]


def check_invocation(words: list[str]) -> list[str]:
    """Problems in one `lenet-dist ...` command line (its words after `lenet-dist`)."""
    problems, i = [], 0
    while i < len(words) and words[i].lstrip("[(").startswith("-"):
        name = token_name(words[i])
        if name not in GLOBAL_OPTIONS:
            problems.append(f"{name} is not an option of lenet-dist itself")
        i += 1
    if i == len(words):
        return problems
    name = token_name(words[i])
    if not re.fullmatch(r"[a-z][a-z-]*", name):  # COMMAND, COMMAND..., a placeholder
        return problems
    command = cli.commands.get(name)
    if command is None:
        return problems + [f"`lenet-dist {name}` is not a command "
                           f"(the commands: {', '.join(sorted(cli.commands))})"]
    allowed = options_of(command)
    for j in range(i + 1, len(words)):
        word = words[j]
        if word == "--":
            if name == "launch":  # the rest is the lenet-dist command each process runs
                problems += check_invocation(words[j + 1:])
            break
        option = token_name(word)
        if re.fullmatch(r"--?[a-zA-Z][\w-]*", option) and option not in allowed:
            problems.append(f"`lenet-dist {name}` has no option {option}")
    return problems


def invocations(text: str) -> list[list[str]]:
    out = []
    for match in INVOCATION.finditer(text):
        rest = text[match.end():]
        end = SEGMENT_END.search(rest)
        out.append((rest[:end.start()] if end else rest).split())
    return out


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))


MAKE = re.compile(r"(?:^|(?<=[\s(`]))make\s+([a-z][\w-]*)")
REPO_PATH = re.compile(r"(?:^|(?<=[\s(`\"'\[]))((?:scripts|launch|export|benchmarks)"
                       r"/[\w./*-]*[\w*])")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_and_anchors_resolve(page):
    bad = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            bad.append(f"{rel(page)}:{number}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{rel(page)}:{number}: {target}: no heading #{anchor} in "
                       f"{dest.name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_commands_options_targets_and_paths_exist(page):
    bad, targets = [], makefile_targets()
    for number, text in code_texts(page):
        for words in invocations(text):
            bad += [f"{rel(page)}:{number}: {p}" for p in check_invocation(words)]
        for target in MAKE.findall(text):
            if target not in targets:
                bad.append(f"{rel(page)}:{number}: `make {target}` is not a Makefile target")
    for number, line, _ in lines_of(page):
        for path in REPO_PATH.findall(line):
            if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                bad.append(f"{rel(page)}:{number}: {path} does not exist")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_what_it_should():
    """The checks above can fail: a wrong command, option, option after `launch --`."""
    assert check_invocation("train --devices 8 --no-progress".split()) == []
    assert check_invocation("--debug eval [--step S | --best]".split()) == []
    assert check_invocation("frobnicate".split())
    assert check_invocation("train --bogus".split())
    assert check_invocation("launch -n 2 -- train --bogus".split())
    assert check_invocation("--bogus train".split())
    assert invocations("x `.venv/bin/lenet-dist eval --best` y") == [["eval", "--best`", "y"]]
    assert not invocations("pip install 'lenet-dist[export]'")
    assert slug("Workdirs on Cloud Storage (`gs://`)") == "workdirs-on-cloud-storage-gs"
    assert "slurm-gpu-nodes-slurmsbatch" in anchors(ROOT / "launch" / "README.md")


def test_readme_fits_a_screen():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; keep it to {README_MAX_LINES} and move the rest "
        "to a page under docs/")


def test_bad_input_table_lives_in_errors_md_once():
    pages_with = [rel(p) for p in PAGES if BAD_BEGIN in p.read_text()]
    assert pages_with == ["docs/errors.md"], pages_with
    text = (ROOT / "docs" / "errors.md").read_text()
    assert text.count(BAD_BEGIN) == text.count(BAD_END) == 1


# ------------------------------------------------------ the README's training sample

def line_kind(line: str) -> str | None:
    if line.startswith("training LeNet-5 on "):
        return "header"
    if re.match(r"^epoch\s+\d+/\d+\s", line):
        return "epoch"
    if line.startswith("done in "):
        return "done"
    if line.startswith("time: "):
        return "time"
    return None


def shape(line: str) -> str:
    """A line with what legitimately differs between runs replaced: the data source
    (`from /usr/share/...` or a test's directory), the workdir, then every number."""
    line = re.sub(r"\bfrom [^)]*\)", "from SOURCE)", line)
    line = re.sub(r"metrics in \S+$", "metrics in PATH", line)
    line = re.sub(r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", "N", line)
    return " ".join(line.split())


def readme_sample() -> list[str]:
    """The README's block of `make train` output: the code block after the heading
    that names it."""
    text = README.read_text()
    heading = re.search(r"^##+ .*`make train`.*prints.*$", text, re.M)
    assert heading, "README.md needs its section on what `make train` prints"
    block = re.search(r"^```[^\n]*\n(.*?)^```", text[heading.end():], re.S | re.M)
    assert block, "the `make train` section has no code block"
    return block.group(1).splitlines()


@pytest.fixture(scope="module")
def short_run_lines(tmp_path_factory, request) -> list[str]:
    """stdout of a real `lenet-dist train` as `make train` runs it, but short."""
    data = (REAL_DIR if real_data_available()
            else request.getfixturevalue("data_dir"))  # the synthetic stand-in, as IDX
    work = tmp_path_factory.mktemp("docs-run")
    proc = run_cli("train", "--devices", "8", "--epochs", "2", "--train-limit", "512",
                   "--eval-batch-size", "1000", "--no-progress",
                   "--data-dir", str(data), "--workdir", str(work / "run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def test_readme_sample_is_a_whole_d2l_run():
    sample = readme_sample()
    kinds = [line_kind(line) for line in sample]
    strays = [line for line, kind in zip(sample, kinds) if kind is None and line != "..."]
    assert not strays, f"lines training does not print: {strays}"
    assert kinds[0] == "header" and kinds[-2:] == ["done", "time"], sample
    header, done = sample[0], sample[-2]
    assert header.endswith("over 8 cpu device(s), global batch 128, sgd lr 0.1, 10 epochs"), (
        f"`make train` is the d2l recipe on 8 devices: {header}")
    epochs = [int(re.match(r"^epoch\s+(\d+)/10\s", line).group(1))
              for line, kind in zip(sample, kinds) if kind == "epoch"]
    assert epochs == sorted(set(epochs)) and epochs[0] == 1 and epochs[-1] == 10, epochs
    shown = [int(m.group(1)) if (m := re.match(r"^epoch\s+(\d+)/", line)) else line
             for line in sample[1:-1]]
    for before, after in zip(shown, shown[1:]):  # left-out epochs are marked with "..."
        if isinstance(before, int) and isinstance(after, int):
            assert after == before + 1, f"epochs {before} to {after} with no '...' between"
    last_epoch = [line for line, kind in zip(sample, kinds) if kind == "epoch"][-1]
    assert re.search(r"test loss \S+ acc (\S+)", last_epoch).group(1) == FINAL_ACCURACY
    assert re.search(r"final test accuracy (\S+);", done).group(1) == FINAL_ACCURACY


@pytest.mark.slow
def test_readme_sample_has_the_shape_of_real_training_output(short_run_lines):
    sample = [line for line in readme_sample() if line != "..."]
    real = {}
    for line in short_run_lines:
        if line.startswith("note: test accuracy "):  # this short run ends near chance;
            continue  # make train's 0.7216 does not, so its sample has no such note
        kind = line_kind(line)
        assert kind is not None, (
            f"training printed a line the README's sample has no kind for: {line!r}")
        real.setdefault(kind, set()).add(shape(line))
    shown = {}
    for line in sample:
        shown.setdefault(line_kind(line), set()).add(shape(line))
    assert set(shown) == set(real), (set(shown), set(real))
    for kind in real:
        assert shown[kind] == real[kind], (
            f"the README's {kind} line no longer looks like training's:\n"
            f"  README:   {sorted(shown[kind])}\n  training: {sorted(real[kind])}")
