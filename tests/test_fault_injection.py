import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REAL_DIR, real_data_available

SCRIPT = Path(__file__).parent.parent / "scripts" / "kill9.py"


@pytest.mark.slow
@pytest.mark.skipif(not real_data_available(), reason="real Fashion-MNIST not installed")
def test_kill9_then_resume_reaches_the_uninterrupted_parameters():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--trials", "1", "--kills", "2",
                           "--seed", "7", "--data-dir", REAL_DIR],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1/1 trials reached the uninterrupted run's final parameters" in proc.stdout
    assert "killed" in proc.stdout
