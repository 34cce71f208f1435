import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lenet_dist.cli import main
from lenet_dist.config import Config
from lenet_dist.errors import UserError
from tests.conftest import REAL_DIR, real_data_available, run_cli, write_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if real_data_available():
        return REAL_DIR
    return str(write_dataset(tmp_path_factory.mktemp("idx"), n_train=1024, n_test=100))


@pytest.mark.slow
def test_train_end_to_end_in_a_subprocess(tmp_path, data_dir):
    work = tmp_path / "run"
    proc = run_cli("train", "--devices", "8", "--epochs", "1", "--train-limit", "1024",
                   "--batch-size", "64", "--data-dir", data_dir, "--workdir", str(work),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "over 8 cpu device(s), global batch 64" in out
    assert "epoch 1/1  train loss" in out and "img/s" in out and "done in" in out
    (row,) = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert row["devices"] == 8 and row["step"] == 1024 // 64
    assert "Traceback" not in proc.stderr


def test_summary_and_devices_in_a_subprocess():
    proc = run_cli("summary")
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 61,706" in proc.stdout
    assert "Flatten   (1, 400)" in proc.stdout
    proc = run_cli("devices", "--devices", "8")
    assert proc.returncode == 0, proc.stderr
    assert "mesh: {'data': 8}" in proc.stdout and "platform: cpu" in proc.stdout


def test_bad_input_in_a_subprocess_is_one_line():
    proc = run_cli("train", "--devices", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: Invalid value for '--devices': 0 is not in the range 1<=x<=2147483647."]


@pytest.mark.parametrize("args, message", [
    (["train", "--devices", "-2"], "'--devices': -2 is not in the range 1<=x<=2147483647"),
    (["train", "--devices", "two"], "'two' is not a valid integer"),
    (["train", "--devices", "9"], "--devices 9 asks for more CPU devices than the 8 present"),
    (["train", "--devices", "3"], "--batch-size 128 does not divide over 3 devices; "
                                  "use a multiple of 3 (e.g. 126, 129)"),
    (["train", "--devices", "8", "--batch-size", "100"], "e.g. 96, 104"),
    (["train", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir does not exist"),
    (["train", "--dataset", "cifar"], "--dataset 'cifar' is not a dataset"),
    (["train", "--learning-rate", "-1"], "-1.0 is not in the range 0.0<x<=10.0"),
    (["train", "--train-limit", "10"], "--train-limit 10 is smaller than one batch"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, devices, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_broken_idx_dir_is_one_line(capsys, devices, tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 6)
    assert main(["train", "--devices", "1", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is truncated inside its header" in err[0]


def test_debug_prints_the_line_then_the_traceback():
    plain = run_cli("train", "--lr", "nan", env={"LENET_DIST_DEBUG": "0"})
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    for args, env in ((["--debug", "train", "--lr", "nan"], {}),
                      (["train", "--lr", "nan", "--debug"], {"LENET_DIST_DEBUG": "0"}),
                      (["train", "--lr", "nan"], {"LENET_DIST_DEBUG": "1"})):
        proc = run_cli(*args, env=env)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2, proc.stderr
        assert lines[0] == plain.stderr.strip(), proc.stderr
        assert lines[1].startswith("Traceback") and "BadParameter" in proc.stderr


def test_an_unexpected_exception_is_one_line_and_exit_1(capsys, monkeypatch):
    from lenet_dist import runtime

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(runtime, "configure", broken)
    monkeypatch.delenv("LENET_DIST_DEBUG", raising=False)
    assert main(["summary"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: internal error: ZeroDivisionError: boom; rerun with --debug "
        "(or LENET_DIST_DEBUG=1) for the traceback"]
    assert main(["--debug", "summary"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: internal error: ZeroDivisionError: boom;")
    assert "Traceback" in err and "in broken" in err


@pytest.mark.parametrize("field, value", [
    ("learning_rate", float("nan")), ("learning_rate", float("inf")), ("learning_rate", 0.0),
    ("learning_rate", 11.0), ("momentum", 1.0), ("momentum", -0.1), ("momentum", float("nan")),
    ("seed", -1), ("seed", 2**32), ("eval_batch_size", 16_385), ("batch_size", 0),
    ("epochs", 10_001), ("devices", 0), ("save_every_steps", -1), ("keep_checkpoints", 0),
])
def test_config_validate_refuses_numbers_out_of_range(field, value):
    with pytest.raises(UserError, match=f"^{field} "):  # the API names the field
        Config(**{field: value}).validate()
    with pytest.raises(UserError, match="^--" + field.replace("_", "-")):  # the CLI, options
        Config(**{field: value}).validate(cli=True)


def test_config_validate_accepts_the_edges():
    Config(learning_rate=10.0, momentum=0.0, seed=2**32 - 1, eval_batch_size=16_384,
           batch_size=65_536, epochs=10_000, train_limit=65_536).validate()


def test_a_path_that_is_not_text_is_a_usage_error(capsys):
    assert main(["checkpoints", "--workdir", "runs/\udcff"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: Invalid value for '--workdir': 'runs/\\xff' is not valid text (bytes that "
        "are not UTF-8); rename it or choose another path"]


# Run the CLI with Ctrl-C acting as in a terminal: a shell started in the background (as
# CI runners may) hands its children SIGINT ignored, and Python then never raises
# KeyboardInterrupt.
SIGINT_AS_IN_A_TERMINAL = ("import runpy, signal, sys; "
                           "signal.signal(signal.SIGINT, signal.default_int_handler); ")


def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path):
    """SIGINT at delays spread over start-up (imports, JAX start): never a traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("LENET_DIST_DEBUG", None)
    launch = SIGINT_AS_IN_A_TERMINAL + ("sys.argv[0] = 'lenet-dist'; "
                                        "runpy.run_module('lenet_dist', run_name='__main__')")
    args = [sys.executable, "-c", launch, "eval", "--workdir", str(tmp_path)]

    def timed(cmd):
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        return time.monotonic() - start, proc

    # Until lenet_dist's first module has run, a Ctrl-C is the interpreter's own.
    ready = max(timed([sys.executable, "-c", SIGINT_AS_IN_A_TERMINAL +
                       "import lenet_dist.runtime"])[0] for _ in range(3))
    total, proc = timed(args)
    assert proc.returncode == 2 and "no checkpoints in" in proc.stderr, proc.stderr
    first, last = 2 * ready + 0.05, 0.6 * total
    interrupted = 0
    for k in range(6):
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        time.sleep(first + k * (last - first) / 5)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
        if child.returncode in (2, -signal.SIGINT) and err.startswith("error: no checkpoints"):
            continue  # start-up was over (-2: the signal landed in the interpreter's last
            # teardown, after Python restored the default handler: silent, output complete)
        assert (child.returncode, err) == (130, "error: interrupted\n"), (k, err)
        interrupted += 1
    # The property is "never a traceback"; how many signals land inside start-up depends
    # on the machine's load (4 to 6 of 6 on an idle machine, 3 seen in a loaded CI run).
    assert interrupted >= 1


def test_no_arguments_prints_the_help_as_click_does(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: lenet-dist [OPTIONS] COMMAND [ARGS]...")
    assert "\n  train " in err and "error:" not in err


# ------------------------------------------------------------------ errors as one line


def tf_resource_exhausted():
    tf = pytest.importorskip("tensorflow")
    return tf.errors.ResourceExhaustedError(
        None, None, "{{function_node __wrapped__SaveV2}} out/variables/variables_temp/"
        "part-00000-of-00001.data-00000-of-00001.tempstate1; No space left on device")


@pytest.mark.parametrize("error, code, line", [
    (MemoryError, 1, "error: out of memory (MemoryError); free memory, or use a smaller "
                     "--batch-size or fewer --devices"),
    (lambda: ValueError("embedded null byte"), 2,
     "error: the path contains a NUL byte, which no file name can hold"),
    (tf_resource_exhausted, 1,
     "error: out of resources: out/variables/variables_temp/part-00000-of-00001.data-"
     "00000-of-00001.tempstate1; No space left on device"),
    (lambda: UnicodeEncodeError("ascii", "w\xf6rk", 1, 2, "ordinal not in range(128)"), 2,
     "error: text that cannot be encoded here: 'ascii' codec can't encode character "
     "'\\xf6' in position 1: ordinal not in range(128)"),
], ids=["memory", "nul", "tf-resource-exhausted", "unicode"])
def test_failures_that_are_not_os_errors_are_one_line_not_internal(
        capsys, monkeypatch, error, code, line):
    from lenet_dist import runtime

    exception = error()

    def failing(*args, **kwargs):
        raise exception

    monkeypatch.setattr(runtime, "configure", failing)
    monkeypatch.delenv("LENET_DIST_DEBUG", raising=False)
    assert main(["summary"]) == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_nul_byte_in_a_path_option_names_the_option(capsys):
    assert main(["checkpoints", "--workdir", "runs/a\0b"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: Invalid value for '--workdir': the path contains a NUL byte, which no file "
        "name can hold"]


@pytest.mark.parametrize("name, content", [
    ("run.yaml", b'workdir: "runs/a\\0b"\nepochs: 1\n'),
    ("run.json", b'{"data_dir": "data\\u0000x"}'),
])
def test_a_nul_byte_in_a_config_file_path_is_one_line_naming_the_key(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    proc = run_cli("train", "--config", name, cwd=tmp_path)
    key = "workdir" if name.endswith("yaml") else "data_dir"
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        f"error: --config {name}: {key} contains a NUL byte, which no file name can "
        "hold"]), proc.stderr
    assert os.listdir(tmp_path) == [name]


def test_an_ascii_only_stdout_prints_a_non_ascii_workdir_escaped(tmp_path, data_dir):
    """PYTHONIOENCODING=ascii: train's last line names the workdir; printing it was a
    UnicodeEncodeError (an "internal error" after the run had finished)."""
    work = tmp_path / "w\xf6rk"
    proc = run_cli("train", "--recipe", "smoke", "--devices", "1", "--epochs", "1",
                   "--train-limit", "256", "--data-dir", data_dir, "--workdir", str(work),
                   "--no-progress", env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    assert "metrics in " + str(tmp_path) + "/w\\xf6rk/metrics.jsonl" in proc.stdout
    assert "error" not in proc.stderr
