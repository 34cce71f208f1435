import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REAL_DIR, real_data_available

SCRIPT = Path(__file__).parent.parent / "scripts" / "kill9.py"


def run_kill9(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, str(SCRIPT), "--trials", "1", "--data-dir", REAL_DIR,
                           *args], capture_output=True, text=True, env=env, timeout=400)


@pytest.mark.slow
@pytest.mark.skipif(not real_data_available(), reason="real Fashion-MNIST not installed")
def test_kill9_then_resume_reaches_the_uninterrupted_parameters():
    proc = run_kill9("--kills", "2", "--seed", "7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1/1 trials reached the uninterrupted run's final parameters" in proc.stdout
    assert "killed" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not real_data_available(), reason="real Fashion-MNIST not installed")
def test_kill9_during_export_leaves_a_complete_model_and_no_leftovers():
    proc = run_kill9("--kills", "2", "--seed", "0", "--kinds", "export")  # seed 0: one kill
    assert proc.returncode == 0, proc.stdout + proc.stderr  # while publishing, one mid-run
    assert "summary: export 1/1 OK" in proc.stdout
    assert "killed while publishing" in proc.stdout and "killed mid-run" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not real_data_available(), reason="real Fashion-MNIST not installed")
def test_kill9_of_a_concurrent_train_refuses_it_and_leaves_the_first_alone():
    proc = run_kill9("--kills", "2", "--seed", "0", "--kinds", "concurrent")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary: concurrent 1/1 OK" in proc.stdout and "refused" in proc.stdout
