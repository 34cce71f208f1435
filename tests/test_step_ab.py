"""benchmarks/step_ab.py, the in-process A/B of train-step variants: variants parse as
documented, and a run times every variant and reports the first as 1.000x. (Its timings
are benchmark output, never asserted.)"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_dist import runtime

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_ab.py"
spec = importlib.util.spec_from_file_location("step_ab", SCRIPT)
step_ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_ab)


def test_variants_parse_as_documented():
    tuned = runtime.train_compiler_options("d2l", "cpu")
    assert step_ab.parse_variant("defaults", "d2l") == {"name": "defaults", "options": None,
                                                        "batch": None}
    assert step_ab.parse_variant("tuned", "d2l")["options"] == tuned
    v = step_ab.parse_variant("big:batch=256,xla_cpu_enable_fast_math=false,"
                              "xla_cpu_prefer_vector_width=512", "d2l")
    assert v["batch"] == 256
    assert v["options"] == {**(tuned or {}), "xla_cpu_enable_fast_math": False,
                            "xla_cpu_prefer_vector_width": 512}
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        step_ab.parse_variant("bad:batch", "d2l")


def test_a_run_times_every_variant_against_the_first():
    out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2", "--rounds", "2",
                          "tuned", "defaults", "half:batch=64"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = re.findall(r"^(\S+) +[\d,]+ img/s  (\d\.\d{3})x", out, re.M)
    assert [name for name, _ in rows] == ["tuned", "defaults", "half"]
    assert rows[0][1] == "1.000"


def test_two_variants_with_one_name_are_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "a", "a:batch=64"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: give every variant its own name"
