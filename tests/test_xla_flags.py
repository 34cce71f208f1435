"""XLA_FLAGS that XLA would reject is one line, exit 2, before JAX starts: XLA itself
would end the process from C++ (its own line, or a 90-line flag list, exit 1). A valid
flag, a file of flags and lenet-dist's own CPU flags keep working.

The commands run as real processes, all at once (one fixture), each in its own session
and killed whole (the probe with it) at a hard timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lenet_dist import runtime
from lenet_dist.errors import UserError
from tests.conftest import ROOT

TIMEOUT = 120  # seconds; a case takes about 1.5 s alone
BAD = "--xla_no_such_flag=1"


def cli(args: list[str], xla_flags: str, extra: dict | None = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m lenet_dist ARGS` with XLA_FLAGS (and `extra`) set, in its own session."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LENET_DIST_", "XLA_", "JAX_"))}
    env.update(PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags, **(extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "lenet_dist", *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(timed out after {timeout} s)"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every case's process, run side by side."""
    tmp = tmp_path_factory.mktemp("xla_flags")
    flags_file = tmp / "flags.txt"
    flags_file.write_text("--xla_force_host_platform_device_count=3\n")
    cases = {
        "devices": (["devices"], BAD),
        "train": (["train", "--devices", "1", "--epochs", "1", "--train-limit", "256",
                   "--workdir", str(tmp / "never")], BAD),
        "garbage": (["devices"], "garbage"),
        "bad value": (["devices"], "--xla_force_host_platform_device_count=abc",
                      {"TF_CPP_MIN_LOG_LEVEL": "3"}),  # must not hide XLA's naming line
        "valid": (["devices"], "--xla_force_host_platform_device_count=2"),
        "file": (["devices"], str(flags_file)),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(cli, *case) for name, case in cases.items()}
    return {"tmp": tmp, **{name: f.result() for name, f in futures.items()}}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's only stderr line, checked to be an `error:` line, exit 2, no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "Flags:" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["devices", "train"])
def test_an_unknown_flag_is_one_line_naming_it(runs, case):
    line = one_error_line(runs[case])
    assert line.startswith("error: XLA_FLAGS: unknown flag --xla_no_such_flag:"), line
    assert "unset XLA_FLAGS" in line
    assert not (runs["tmp"] / "never").exists()  # train stopped before making its workdir


def test_a_value_xla_cannot_read_is_one_line_not_its_flag_list(runs):
    line = one_error_line(runs["bad value"])
    assert "--xla_force_host_platform_device_count" in line and "'abc'" in line, line
    assert "int32" in line  # the flag's type, from XLA's own list


def test_a_word_without_dashes_is_a_missing_flags_file(runs):
    line = one_error_line(runs["garbage"])
    assert line.startswith("error: XLA_FLAGS='garbage' does not start with --"), line
    assert "file of flags" in line


def test_a_valid_flag_and_a_flags_file_still_run(runs):
    for case, count in (("valid", 2), ("file", 3)):
        proc = runs[case]
        assert proc.returncode == 0 and not proc.stderr, (case, proc.stderr)
        assert f"devices available: {count}\n" in proc.stdout, (case, proc.stdout)


# ------------------------------------------------------------------- in this process


def test_split_reads_xla_flags_as_xla_does():
    assert runtime.split_xla_flags("") == ([], "")
    assert runtime.split_xla_flags(" \t--a=1\n--b ") == (["--a=1", "--b"], "")
    assert runtime.split_xla_flags('--d="x y" --e=\'p "q\'') == (['--d=x y', '--e=p "q'], "")
    assert runtime.split_xla_flags("--a=1 stray --b=2") == (["--a=1"], "stray --b=2")
    assert runtime.split_xla_flags("flags.txt") == ([], "flags.txt")


def test_a_word_after_the_flags_is_refused_before_jax_starts(monkeypatch):
    """XLA reads up to the word and drops the rest (lenet-dist's own flags too)."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 oops --x=1")
    with pytest.raises(UserError, match=r"^XLA_FLAGS: 'oops' is not a flag .*every flag "
                                        r"after it"), runtime.checked_xla_flags():
        pytest.fail("the check should fail before the block runs")


def test_lenet_dists_own_flags_alone_start_no_probe(monkeypatch):
    """The normal start (no XLA_FLAGS of the user's) pays nothing for the check."""
    def no_probe(*_, **__):
        raise AssertionError("a probe was started")

    monkeypatch.setattr(subprocess, "Popen", no_probe)
    for value in ("", " ".join(runtime.CPU_XLA_FLAGS)):
        monkeypatch.setenv("XLA_FLAGS", value)
        with runtime.checked_xla_flags():
            pass


def test_add_xla_flags_keeps_the_users_and_leaves_a_flags_file_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", '--xla_dump_to="/tmp/a b" --xla_cpu_use_onednn=false')
    runtime.add_xla_flags()
    assert os.environ["XLA_FLAGS"] == ('--xla_dump_to="/tmp/a b" --xla_cpu_use_onednn=false '
                                       '--xla_cpu_experimental_onednn_custom_call=true')
    monkeypatch.setenv("XLA_FLAGS", "/etc/xla-flags.txt")
    runtime.add_xla_flags()
    assert os.environ["XLA_FLAGS"] == "/etc/xla-flags.txt"


REPORTS = {  # what XLA's parser prints before it ends the process -> our line
    "F1207 16:33:58.817220    4575 parse_flags_from_env.cc:234] Unknown flags in XLA_FLAGS: "
    "--xla_a=1 --xla_b --xla_a=2\nPerhaps you meant to specify these on the TF_XLA_FLAGS "
    "envvar?": "XLA_FLAGS: unknown flags --xla_a, --xla_b: not among this jaxlib's XLA flags "
               "(one that takes a value is written --name=VALUE); correct or remove them",
    "E1207 16:34:47.875248    5185 debug_options_flags.cc:195] Illegal value for "
    "--xla_cpu_experimental_ynn_fusion_type 'X'\nF1207 16:34:47.875308    5185 "
    "parse_flags_from_env.cc:220] Check failed: tsl::Flags::Parse(...) Flag parsing failed."
    "\nusage: --xla_cpu_experimental_ynn_fusion_type=x\nFlags:\n":
        "XLA_FLAGS: XLA rejects it: Illegal value for --xla_cpu_experimental_ynn_fusion_type "
        "'X'; correct or remove it",
    "F1207 16:33:30.680303    4401 parse_flags_from_env.cc:220] Check failed: "
    "tsl::Flags::Parse(...) Flag parsing failed.\nusage: --help\nFlags:\n":
        "XLA_FLAGS: --help is not a flag here",
    "ModuleNotFoundError: No module named 'jaxlib'": None,  # not about XLA_FLAGS
}


@pytest.mark.parametrize("report", REPORTS)
def test_xlas_reports_become_one_line(report):
    problem = runtime.xla_flags_problem(report, ["--help"] if "--help" in report else [])
    expected = REPORTS[report]
    assert (problem is None) if expected is None else problem.startswith(expected), problem
    assert problem is None or "\n" not in problem


def test_only_lenet_dists_own_unknown_flag_says_how_to_drop_it():
    report = f"Unknown flag in XLA_FLAGS: {runtime.CPU_XLA_FLAGS[0]}"
    assert "LENET_DIST_ONEDNN=0" in runtime.xla_flags_problem(report, [])
