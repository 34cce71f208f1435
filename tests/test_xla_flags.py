"""XLA_FLAGS: lenet-dist's own CPU flags are added to it, and a file of flags (a value
that does not start with -, as XLA reads it) keeps working.

Commands run as real processes, each in its own session, killed whole at a hard timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lenet_dist import runtime
from tests.conftest import ROOT

TIMEOUT = 120  # seconds; a case takes about 1.5 s alone


def cli(args: list[str], xla_flags: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m lenet_dist ARGS` with XLA_FLAGS set, in its own session."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LENET_DIST_", "XLA_", "JAX_"))}
    env.update(PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags)
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


def test_a_flags_file_still_runs(tmp_path):
    flags_file = tmp_path / "flags.txt"
    flags_file.write_text("--xla_force_host_platform_device_count=3\n")
    proc = cli(["devices"], str(flags_file))
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert "devices available: 3\n" in proc.stdout, proc.stdout


def test_add_xla_flags_keeps_the_users_and_leaves_a_flags_file_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_cpu_use_onednn=false")
    runtime.add_xla_flags()
    assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x --xla_cpu_use_onednn=false "
                                       "--xla_cpu_experimental_onednn_custom_call=true")
    monkeypatch.setenv("XLA_FLAGS", "/etc/xla-flags.txt")
    runtime.add_xla_flags()
    assert os.environ["XLA_FLAGS"] == "/etc/xla-flags.txt"
