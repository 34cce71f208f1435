"""Open MPI as a launcher: `mpirun -np 2 lenet-dist train --distributed auto` forms the
job through JAX's own Open MPI detection (OmpiCluster: the ranks' OMPI_* variables and
mpirun's address) and trains to the parameters of the same job joined with explicit
flags (`lenet-dist launch -n 2`, shared with tests/test_restarts.py).

Real `mpirun` (Debian's openmpi-bin; scripts/get-tools.sh installs it), kept on
loopback: `--mca oob_tcp_if_include lo` for its own out-of-band channel, `--mca btl
self,vader` (no network transport; lenet-dist's collectives go through gloo anyway).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_dist.launch import free_port
from tests.test_restarts import (
    child_env,
    explicit_run,
    final_params,
    max_param_diff,
    small_data_dir,
    train_args,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("mpirun") is None,
                                 reason="mpirun is not installed (Open MPI: Debian's "
                                        "openmpi-bin, scripts/get-tools.sh)")]

TIMEOUT = 240
MPIRUN = ("mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "oob_tcp_if_include",
          "lo", "--mca", "btl", "self,vader", "-np", "2")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (mpirun's ranks may lead their own process groups)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_mpirun_forms_the_job_and_trains_like_explicit_flags(dataset, tmp_path_factory,
                                                             tmp_path):
    reference = explicit_run(dataset, tmp_path_factory)
    work = tmp_path / "run"
    # JAX derives the coordinator port from mpirun's job id unless JAX_COORDINATOR_PORT
    # is set: a free one here, so a port left in use by another test cannot collide.
    env = child_env(JAX_COORDINATOR_PORT=str(free_port()))
    command = [*MPIRUN, sys.executable, "-m", "lenet_dist", *train_args(
        work, small_data_dir(dataset, tmp_path_factory)), "--distributed", "auto"]
    proc = subprocess.Popen(command,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    print(out)
    assert proc.returncode == 0, out
    assert "found no cluster" not in out  # both ranks joined one job...
    assert out.count("epoch 1/2  train loss") == 1, out  # ...in which process 0 writes
    assert "over 4 cpu device(s)" in out and "Traceback" not in out
    step, params = final_params(work)
    ref_step, ref_params = final_params(reference)
    diff = max_param_diff(params, ref_params)
    print(f"mpirun vs explicit flags: step {step} vs {ref_step}, max |param diff| {diff:.1e}")
    assert step == ref_step == 16 and diff <= 1e-6
