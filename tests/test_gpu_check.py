"""benchmarks/gpu_check.sh: its dry run names every configuration it would measure on a
GPU (each contender x batch x dtype) and every install step, and installs nothing; the
script passes `bash -n` and shellcheck (where installed). The GPU timings themselves are
benchmark output, never asserted; nothing here needs a GPU."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BATCHES = (256, 1024, 4096, 16384, 65536)


@pytest.fixture(scope="module")
def dry_run() -> str:
    envs = ROOT / ".peers" / "gpu"
    existed = envs.exists()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if not existed:
        assert not envs.exists(), "a dry run must create no environment"
    return proc.stdout


def configs(out: str) -> set[tuple[str, str, str, int, str]]:
    found = set()
    for line in out.splitlines():
        m = re.match(r"\s+config: (.+?) \| recipe (\w+) \| (.+?) \| batch (\d+) \| (\w+)$",
                     line)
        if m:
            found.add((m[1], m[2], m[3], int(m[4]), m[5]))
    return found


def test_dry_run_lists_every_contender_batch_and_dtype(dry_run):
    found = configs(dry_run)
    for batch in BATCHES:
        for dtype in ("fp32", "bf16"):
            assert ("lenet-dist", "d2l", "scan", batch, dtype) in found
            assert ("torch-eager", "d2l", "eager", batch, dtype) in found
            assert ("torch-compile", "d2l", "compile reduce-overhead", batch, dtype) in found
        assert ("lenet-dist", "d2l", "loop", batch, "fp32") in found
        assert ("keras", "d2l", "model.fit", batch, "fp32") in found
    for batch in (256, 4096, 65536):  # the modern recipe, once
        assert ("lenet-dist", "modern", "scan", batch, "bf16") in found
    diagnosed = {(b, d) for c, _, _, b, d in found if c == "lenet-dist diagnose"}
    assert diagnosed == {(b, d) for b in (16384, 65536) for d in ("fp32", "bf16")}
    n = int(re.search(r"(\d+) configurations in all", dry_run)[1])
    assert n >= len(found) and "round 2" in dry_run  # alternating rounds


def test_dry_run_prints_the_install_steps(dry_run):
    steps = [line for line in dry_run.splitlines() if "would run:" in line]
    joined = "\n".join(steps)
    for wanted in ("-m venv", "jax[cuda12]==", "flax==", "optax==", "keras==3", "torch=="):
        assert wanted in joined, wanted
    assert not re.search(r"^\+ ", dry_run, re.M), "a dry run executes no step"


def test_rounds_alternate_the_order(dry_run):
    order = re.findall(r"\[round (\d)\] (\S+) \(", dry_run)
    first = [c for r, c in order if r == "1"]
    second = [c for r, c in order if r == "2"]
    assert sorted(first) == sorted(second) and first != second


def test_script_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)
    return module


def test_scan_epochs_report_the_mean_loss_in_both_dtypes(gpu_check):
    """The fp32 scan reports train_step's per-batch loss sum divided by the batch, so its
    final loss reads like the bf16 step's mean (an H200 run once recorded 590 vs 2.30)."""
    import jax
    import numpy as np

    from lenet_dist.config import PRESETS
    from lenet_dist.data import Split
    from lenet_dist.feed import train_feed
    from lenet_dist.mesh import Shardings, make_mesh
    from lenet_dist.state import create_state, make_optimizer

    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (96, 28, 28, 1), dtype=np.uint8),
                  rng.integers(0, 10, 96).astype(np.int32))
    shardings = Shardings(make_mesh(1))
    config = PRESETS["d2l"].replace(batch_size=32, augment=False)
    feed = train_feed(split, 32, shardings)
    tx = make_optimizer(config, feed.steps_per_epoch)
    xs, ys = feed.epoch(0, 0)
    losses = {}
    for name, step_fn in gpu_check.step_fns(tx, config).items():
        state = create_state(0, tx, shardings, config.network)
        _, out = jax.jit(gpu_check.scan_epoch_fn(step_fn))(state, xs, ys)
        losses[name] = np.asarray(out)
    assert losses["scan_fp32"].shape == (3,)
    # the seed's sigmoid LeNet starts near chance: ln(10) = 2.30 a sample, not 32x that
    assert np.all(np.abs(losses["scan_fp32"] - np.log(10)) < 0.2), losses
    np.testing.assert_allclose(losses["scan_bf16"], losses["scan_fp32"], atol=0.05)


def test_hlo_summary_counts_what_tells_the_bf16_hypotheses_apart(gpu_check):
    text = """
  %p = bf16[8,28,28,1]{3,2,1,0} parameter(0)
  %t = bf16[8,1,28,28]{3,2,1,0} transpose(%p), dimensions={0,3,1,2}
  %c = f32[8,1,28,28]{3,2,1,0} convert(%t)
  %cc = (bf16[8,6,28,28]{3,2,1,0}, u8[0]{0}) custom-call(%t, %w), \
custom_call_target="__cudnn$convForward", backend_config={"algorithm":{"algo_id":"1"}}
  ROOT %f = f32[] fusion(%c), kind=kLoop, calls=%fused
"""
    s = gpu_check.hlo_summary(text)
    assert s["ops"] == {"custom-call": 1, "transpose": 1, "convert": 1, "fusion": 1}
    assert s["custom_call_targets"] == {"__cudnn$convForward": 1}
    assert len(s["convolutions"]) == 1 and "algo_id" in s["convolutions"][0]


def test_top_kernels_names_the_slow_kernel_and_its_hlo_op(gpu_check, tmp_path):
    """The diagnosis's profile summary: device kernels only (host events ignored), summed
    over the steps, with the HLO instruction each ran for."""
    import gzip
    import json

    run = tmp_path / "plugins" / "profile" / "2026_12_04_12_13_30"
    run.mkdir(parents=True)
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        *[{"ph": "X", "pid": 1, "name": "sm90_xmma_wgrad", "dur": 108000.0,
           "args": {"hlo_op": "cudnn-conv-bw-filter.2", "kernel_details": "grid:32,1,1"}}
          for _ in range(2)],
        {"ph": "X", "pid": 1, "name": "loop_fusion", "dur": 4000.0,
         "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "pid": 2, "name": "PjitFunction", "dur": 900000.0, "args": {}},
    ]
    with gzip.open(run / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    top = gpu_check.top_kernels(str(tmp_path), steps=2)
    assert [k["kernel"] for k in top] == ["sm90_xmma_wgrad", "loop_fusion"]
    assert top[0]["ms_per_step"] == 108.0 and top[0]["hlo_op"] == "cudnn-conv-bw-filter.2"
    assert top[0]["kernel_details"] == "grid:32,1,1"
    assert abs(top[0]["share"] - 216 / 220) < 1e-9
    assert gpu_check.top_kernels(str(tmp_path / "none"), steps=2) == []


def test_wheels_for_an_offline_machine_install_with_no_index(tmp_path):
    (tmp_path / "keras-3.15.1-py3-none-any.whl").write_bytes(b"")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", f"--wheels={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "keras-3.15.1-py3-none-any.whl" in x)
    assert line.startswith("  would run:") and "--no-index" in line
    assert "--target .peers/gpu/site" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", f"--wheels={empty}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"no wheels in {empty}" in proc.stdout
