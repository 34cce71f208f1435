import json
import os
import subprocess
import sys

import pytest

from lenet_dist.cli import main
from tests.conftest import REAL_DIR, real_data_available, write_dataset


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "lenet_dist", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


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
        "error: Invalid value for '--devices': 0 is not in the range x>=1."]


@pytest.mark.parametrize("args, message", [
    (["train", "--devices", "-2"], "'--devices': -2 is not in the range x>=1"),
    (["train", "--devices", "two"], "'two' is not a valid integer"),
    (["train", "--devices", "9"], "--devices 9 asks for more CPU devices than the 8 present"),
    (["train", "--devices", "3"], "--batch-size 128 does not divide over 3 devices; "
                                  "use a multiple of 3 (e.g. 126, 129)"),
    (["train", "--devices", "8", "--batch-size", "100"], "e.g. 96, 104"),
    (["train", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir does not exist"),
    (["train", "--dataset", "cifar"], "'cifar' is not one of 'fashion_mnist', 'mnist'"),
    (["train", "--learning-rate", "-1"], "--learning-rate must be > 0"),
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
