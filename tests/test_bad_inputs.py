"""Every bad input a user can give, one table: each row runs `python -m lenet_dist` in a
subprocess and must end with one line on stderr, `error: ...`, the right exit code
(2: usage, 1: runtime failure), no traceback, and the trained run's checkpoints and
metrics and an exported model byte-for-byte as they were.

docs/errors.md's bad-input section is `render_readme()` of this table; a test checks it.
`python tests/test_bad_inputs.py` prints that section for pasting; with `--write` it
replaces the section in docs/errors.md.

To add a case, append a `Case` to CASES (a `setup` may plant files in the case's own
directory, which holds private copies of the trained run and the export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from lenet_dist import rundir

ROOT = Path(__file__).resolve().parent.parent
ERRORS_DOC = ROOT / "docs" / "errors.md"  # the page that shows the table
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
TIMEOUT = 120  # seconds per case; the slowest start JAX or TensorFlow (~5 s alone)
WORKERS = 3    # concurrent cases: the CI machine has 2 cores, and most cases just wait


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input. In `argv`, {run} is a trained workdir, {model} an exported
    SavedModel (both private copies), {data} the IDX data directory, {dir} the case's
    own directory (also the working directory). A `bytes` argument is passed as is
    (e.g. a path that is not UTF-8)."""

    id: str
    argv: tuple[str | bytes, ...]
    code: int
    message: str  # a part of the one stderr line (after "error: ")
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    xfail: str | None = None  # the reason, for a known failure in a file owned elsewhere
    hold_lock: bool = False  # the test holds {run}'s lock meanwhile, as a running train does


def _image_folder(root: Path, counts: dict[str, int]) -> None:
    """Class folders holding counts[class] small PNGs."""
    from tests.folders import write_image

    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            write_image(root / name / str(i), np.full((28, 28), 30 * i, np.uint8), "png")


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(content)


def _garble_checkpoint(d: Path) -> None:
    """The run's only checkpoint (step 4) gets metadata that is not JSON."""
    (d / "run" / "checkpoints" / "4" / "meta" / "metadata").write_bytes(b"{garbled")


def _planted_metrics_link(d: Path) -> None:
    (d / "precious.txt").write_text("not yours")
    (d / "w").mkdir()
    (d / "w" / "metrics.jsonl").symlink_to(d / "precious.txt")


def _checkpoints_file(d: Path) -> None:
    (d / "w").mkdir()
    (d / "w" / "checkpoints").write_text("a file where the checkpoints go")


JOB = ("--coordinator-address", "127.0.0.1:1", "--num-processes", "2")
TINY = ("--devices", "1", "--data-dir", "{data}", "--train-limit", "256", "--epochs", "2")
FF = b"\xff"  # a byte that is never UTF-8

CASES: list[Case] = [
    # --- train: numbers --------------------------------------------------------------
    Case("train-config-missing", ("train", "--config", "run.yaml"), 2,
         "cannot read --config run.yaml: No such file or directory"),
    Case("train-config-unknown-key", ("train", "--config", "run.yaml"), 2,
         "--config run.yaml: unknown key 'lr' (did you mean learning_rate?); the keys are "
         "Config's fields",
         setup=_write("run.yaml", b"lr: 0.1\n")),
    Case("train-config-wrong-type", ("train", "--config", "run.yaml"), 2,
         "--config run.yaml: epochs must be an integer, got 'ten'",
         setup=_write("run.yaml", b"epochs: ten\n")),
    Case("train-config-bad-json", ("train", "--config", "run.json"), 2,
         "--config run.json is not valid JSON",
         setup=_write("run.json", b'{"epochs": 3,')),
    Case("train-devices-zero", ("train", "--devices", "0"), 2,
         "Invalid value for '--devices': 0 is not in the range 1<=x<=2147483647."),
    Case("train-devices-word", ("train", "--devices", "two"), 2,
         "Invalid value for '--devices': 'two' is not a valid integer range."),
    Case("train-devices-overflow", ("train", "--devices", "99999999999999999999"), 2,
         "'--devices': 99999999999999999999 is not in the range 1<=x<=2147483647."),
    Case("train-devices-simulated-cap", ("train", "--devices", "100000"), 2,
         "--devices asks for 100,000 simulated CPU devices; at most 512 can be simulated"),
    Case("train-lr-nan", ("train", "--lr", "nan"), 2,
         "Invalid value for '--learning-rate' / '--lr': nan is not a finite number"),
    Case("train-lr-inf", ("train", "--lr", "inf"), 2,
         "Invalid value for '--learning-rate' / '--lr': inf is not a finite number"),
    Case("train-lr-overflow", ("train", "--learning-rate", "1e400"), 2,
         "Invalid value for '--learning-rate' / '--lr': 1e400 is not a finite number"),
    Case("train-lr-negative", ("train", "--lr", "-1"), 2,
         "'--learning-rate' / '--lr': -1.0 is not in the range 0.0<x<=10.0."),
    Case("train-lr-typo", ("train", "--lr", "1e3"), 2,
         "'--learning-rate' / '--lr': 1000.0 is not in the range 0.0<x<=10.0."),
    Case("train-momentum-above-one", ("train", "--momentum", "1.5"), 2,
         "Invalid value for '--momentum': 1.5 is not in the range 0.0<=x<1.0."),
    Case("train-momentum-nan", ("train", "--momentum", "nan"), 2,
         "Invalid value for '--momentum': nan is not a finite number"),
    Case("train-seed-negative", ("train", "--seed", "-1"), 2,
         "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295."),
    Case("train-seed-overflow", ("train", "--seed", "99999999999999999999"), 2,
         "'--seed': 99999999999999999999 is not in the range 0<=x<=4294967295."),
    Case("train-eval-batch-huge", ("train", "--eval-batch-size", "1000000"), 2,
         "'--eval-batch-size': 1000000 is not in the range 1<=x<=16384."),
    Case("train-batch-zero", ("train", "--batch-size", "0"), 2,
         "Invalid value for '--batch-size': 0 is not in the range 1<=x<=65536."),
    Case("train-batch-huge", ("train", "--batch-size", "10000000"), 2,
         "'--batch-size': 10000000 is not in the range 1<=x<=65536."),
    Case("train-epochs-overflow", ("train", "--epochs", "99999999999999999999"), 2,
         "'--epochs': 99999999999999999999 is not in the range 1<=x<=10000."),
    Case("train-limit-below-batch", ("train", "--train-limit", "10"), 2,
         "--train-limit 10 is smaller than one batch (128); raise it or lower --batch-size"),
    Case("train-limit-overflow", ("train", "--train-limit", "99999999999999999999"), 2,
         "'--train-limit': 99999999999999999999 is not in the range 1<=x<=2147483647."),
    Case("train-save-every-negative", ("train", "--save-every-steps", "-1"), 2,
         "'--save-every-steps': -1 is not in the range 0<=x<=2147483647."),
    Case("train-keep-zero", ("train", "--keep-checkpoints", "0"), 2,
         "'--keep-checkpoints': 0 is not in the range 1<=x<=2147483647."),
    # --- train: choices, paths, job options -------------------------------------------
    Case("train-dataset-unknown", ("train", "--dataset", "cifar"), 2,
         "--dataset 'cifar' is not a dataset; give fashion_mnist or mnist, folder:PATH (class "
         "folders of images) or idx:DIR (four IDX files)"),
    Case("train-recipe-unknown", ("train", "--recipe", "huge"), 2,
         "Invalid value for '--recipe': 'huge' is not one of 'd2l', 'fast', 'modern', 'smoke'."),
    Case("train-weight-decay-without-adamw", ("train", "--weight-decay", "0.1"), 2,
         "--weight-decay needs --optimizer adamw (decoupled decay)"),
    Case("train-label-smoothing-one", ("train", "--label-smoothing", "1"), 2,
         "'--label-smoothing': 1.0 is not in the range 0.0<=x<1.0."),
    Case("train-profile-steps-backwards", ("train", "--profile-steps", "5:2", "--devices",
                                           "1", "--data-dir", "{data}"), 2,
         "--profile-steps '5:2'"),
    Case("train-data-dir-missing", ("train", "--devices", "1", "--data-dir", "{dir}/nodata"),
         2, "--data-dir {dir}/nodata does not exist"),
    Case("train-data-dir-not-utf8", ("train", "--data-dir", FF + b"data"), 2,
         "Invalid value for '--data-dir': '\\xffdata' is not valid text"),
    Case("train-workdir-not-utf8", ("train", "--workdir", b"runs/" + FF), 2,
         "Invalid value for '--workdir': 'runs/\\xff' is not valid text"),
    Case("train-workdir-empty", ("train", "--workdir", ""), 2,
         "Invalid value for '--workdir': the path is empty"),
    Case("train-workdir-is-a-file", ("train", "--devices", "1", "--data-dir", "{data}",
                                      "--workdir", "{dir}/file"), 2,
         "--workdir {dir}/file is a file, not a directory; choose another path",
         setup=_write("file", b"not a directory")),
    Case("train-data-dir-is-a-file", ("train", "--devices", "1", "--data-dir", "{dir}/file"), 2,
         "--data-dir {dir}/file does not exist or is not a directory",
         setup=_write("file", b"not a directory")),
    Case("train-heartbeat-huge", ("train", "--heartbeat-timeout", "1000000"), 2,
         "'--heartbeat-timeout' (env var: 'LENET_DIST_HEARTBEAT_TIMEOUT'): 1000000 is not in "
         "the range 1<=x<=86400."),
    Case("train-join-timeout-zero", ("train", "--join-timeout", "0"), 2,
         "'--join-timeout' (env var: 'LENET_DIST_JOIN_TIMEOUT'): 0 is not in the range "
         "1<=x<=86400."),
    Case("train-join-timeout-env-not-a-number", ("train",), 2,
         "'--join-timeout' (env var: 'LENET_DIST_JOIN_TIMEOUT'): 'soon' is not a valid "
         "integer range.", env={"LENET_DIST_JOIN_TIMEOUT": "soon"}),
    Case("train-job-incomplete", ("train", "--process-id", "0"), 2,
         "a job needs --coordinator-address, --num-processes and --process-id together"),
    Case("train-job-bad-address", ("train", "--coordinator-address", "nohost", "--num-processes",
                                   "2", "--process-id", "0"), 2,
         "--coordinator-address 'nohost': expected HOST:PORT, e.g. 10.0.0.2:8476"),
    Case("train-job-id-outside", ("train", *JOB, "--process-id", "2"), 2,
         "--process-id 2 must be in 0..1 for --num-processes 2"),
    Case("train-job-env-not-a-number", ("train",), 2,
         "'--num-processes' (env var: 'LENET_DIST_NUM_PROCESSES'): 'two' is not a valid "
         "integer range.", env={"LENET_DIST_NUM_PROCESSES": "two"}),
    Case("train-platform-absent", ("train", "--devices", "1", "--data-dir", "{data}"), 2,
         "JAX_PLATFORMS=tpu asks for a platform that is not available here",
         env={"JAX_PLATFORMS": "tpu"}),
    Case("train-jax-env-not-a-bool", ("train", "--devices", "1"), 2,
         "JAX rejects its environment: invalid truth value 'maybe' for environment "
         "'JAX_ENABLE_X64'; fix or unset that variable", env={"JAX_ENABLE_X64": "maybe"}),
    Case("train-sigterm-at-not-a-step", ("train", "--devices", "1", "--data-dir", "{data}",
                                         "--train-limit", "256", "--epochs", "1",
                                         "--workdir", "{dir}/w"), 2,
         "LENET_DIST_SIGTERM_AT='abc': expected STEP or STEP:PROCESS",
         env={"LENET_DIST_SIGTERM_AT": "abc"}),
    Case("train-sigterm-at-no-such-process", ("train", "--devices", "1", "--data-dir", "{data}",
                                              "--train-limit", "256", "--epochs", "1",
                                              "--workdir", "{dir}/w"), 2,
         "LENET_DIST_SIGTERM_AT='3:5': the job has no process 5 (it has 1: 0..0)",
         env={"LENET_DIST_SIGTERM_AT": "3:5"}),
    Case("kill-at-not-a-fault-point", ("export", "--workdir", "{run}", "--out", "{model}",
                                       "--overwrite"), 2,
         "LENET_DIST_KILL_AT='publish:mvoed' is not a fault point",
         env={"LENET_DIST_KILL_AT": "publish:mvoed"}),
    Case("train-job-num-processes-huge", ("train", "--coordinator-address", "127.0.0.1:1",
                                          "--num-processes", "2147483647", "--process-id", "0"),
         2, "--num-processes 2147483647 must be in 1..1,048,576 (the processes of one job)"),
    Case("train-job-num-processes-env-huge", ("train", "--coordinator-address", "127.0.0.1:1",
                                              "--process-id", "0"), 2,
         "--num-processes 2147483647 must be in 1..1,048,576",
         env={"LENET_DIST_NUM_PROCESSES": "2147483647"}),
    Case("train-job-port-out-of-range", ("train", "--coordinator-address", "127.0.0.1:99999",
                                         "--num-processes", "2", "--process-id", "0"), 2,
         "--coordinator-address 127.0.0.1:99999: port 99999 is not in 1..65535"),
    Case("train-job-port-zero", ("train", "--coordinator-address", "127.0.0.1:0",
                                 "--num-processes", "2", "--process-id", "0"), 2,
         "--coordinator-address 127.0.0.1:0: port 0 is not in 1..65535"),
    Case("train-job-process-id-huge", ("train", "--distributed", "auto", "--process-id",
                                       "1048576"), 2,
         "--process-id 1048576 must be in 0..1,048,575"),
    Case("train-config-yaml-alias", ("train", "--config", "run.yaml"), 2,
         "--config run.yaml is not valid YAML (line 2: alias *a0: a config file cannot use "
         "aliases; write the value out)",
         setup=_write("run.yaml", b'a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]\n'
                      + b"".join(b"a%d: &a%d [%s]\n" % (i, i, b",".join([b"*a%d" % (i - 1)] * 10))
                                 for i in range(1, 9)) + b"epochs: *a8\n")),
    Case("train-config-duplicate-key", ("train", "--config", "run.yaml"), 2,
         "--config run.yaml: key 'epochs' is given twice (lines 1 and 2); keep one",
         setup=_write("run.yaml", b"epochs: 3\nepochs: 5\n")),
    Case("train-config-yaml-base-60", ("train", "--config", "run.yaml"), 2,
         "--config run.yaml: epochs must be an integer, got '1:30'",
         setup=_write("run.yaml", b"epochs: 1:30\n")),
    Case("train-config-nul-path", ("train", "--config", "run.json"), 2,
         "--config run.json: workdir contains a NUL byte, which no file name can hold",
         setup=_write("run.json", b'{"workdir": "runs/a\\u0000b"}')),
    # --- train: the workdir holds something else ---------------------------------------------
    Case("train-other-run", ("train", *TINY, "--batch-size", "32", "--workdir", "{run}"), 2,
         "holds a different run (batch_size: saved 64, now 32); use another --workdir, or "
         "--allow-config-change"),
    Case("train-other-optimizer-even-allowed", ("train", *TINY, "--batch-size", "64",
                                                "--optimizer", "adam", "--allow-config-change",
                                                "--workdir", "{run}"), 2,
         "holds a run with another state layout (optimizer: saved 'sgd', now 'adam')"),
    Case("train-workdir-busy", ("train", *TINY, "--batch-size", "64", "--workdir", "{run}"), 1,
         "is in use by `lenet-dist train` (PID", hold_lock=True),
    Case("train-no-checkpoint-over-a-run", ("train", *TINY, "--batch-size", "64",
                                            "--no-checkpoint", "--workdir", "{run}"), 2,
         "holds checkpoints of a run; --no-checkpoint would start another one"),
    Case("train-metrics-symlink", ("train", *TINY, "--workdir", "{dir}/w"), 2,
         "{dir}/w/metrics.jsonl is a symlink; lenet-dist does not write through links",
         setup=_planted_metrics_link),
    Case("train-checkpoints-is-a-file", ("train", *TINY, "--workdir", "{dir}/w"), 2,
         "{dir}/w/checkpoints is not a directory; move it away", setup=_checkpoints_file),
    # --- eval, checkpoints --------------------------------------------------------------
    Case("eval-step-absent", ("eval", "--workdir", "{run}", "--step", "99"), 2,
         "no checkpoint at step 99; available:"),
    Case("eval-step-and-best", ("eval", "--workdir", "{run}", "--step", "4", "--best"), 2,
         "--step and --best are exclusive; give one"),
    Case("eval-step-negative", ("eval", "--step", "-1"), 2,
         "Invalid value for '--step': -1 is not in the range 0<=x<=2147483647."),
    Case("eval-no-checkpoints", ("eval", "--workdir", "{dir}"), 2, "no checkpoints in {dir}"),
    Case("eval-corrupt-step", ("eval", "--workdir", "{run}", "--step", "4"), 1,
         "checkpoint step 4 in {run}/checkpoints is unreadable (metadata is not JSON",
         setup=_garble_checkpoint),
    Case("eval-nothing-readable", ("eval", "--workdir", "{run}"), 1,
         "no readable checkpoint in {run}/checkpoints (1 unreadable: steps 4)",
         setup=_garble_checkpoint),
    Case("checkpoints-no-run", ("checkpoints", "--workdir", "{dir}/none"), 2,
         "no checkpoints in {dir}/none"),
    Case("checkpoints-not-utf8", ("checkpoints", "--workdir", FF), 2,
         "Invalid value for '--workdir': '\\xff' is not valid text"),
    Case("report-run-and-workdir", ("report", "--workdir", "{run}", "{run}"), 2,
         "give the run as RUN or with --workdir, not both"),
    Case("report-compare-one-run", ("report", "--compare", "{run}"), 2,
         "--compare takes two or more run directories as arguments"),
    Case("report-out-into-checkpoints", ("report", "--workdir", "{run}", "--out",
                                         "{run}/checkpoints"), 2,
         "checkpoints/, which only training writes; choose another directory"),
    # --- export -----------------------------------------------------------------------
    Case("export-no-out", ("export", "--workdir", "{run}"), 2, "Missing option '--out'."),
    Case("export-out-exists", ("export", "--workdir", "{run}", "--out", "{model}"), 2,
         "{model} already exists; pass --overwrite to replace it"),
    Case("export-out-is-the-run", ("export", "--workdir", "{run}", "--out", "{run}"), 2,
         "--out {run} would replace the training run ({run}); choose a new directory"),
    # A path quoted whole made a 100 KB line, exit 1: paths are bounded as values are.
    Case("export-out-path-too-long", ("export", "--workdir", "{run}", "--out", "x" * 5000),
         2, "Invalid value for '--out': the path is 5,000 characters long; the most a path "
            "can be is 4,096"),
    Case("checkpoints-name-too-long", ("checkpoints", "--workdir", "{dir}/" + "y" * 300), 2,
         "y" * 100 + "... ("),
    Case("export-out-name-too-long", ("export", "--workdir", "{run}",
                                      "--out", "{dir}/" + "y" * 300 + "/1"), 2,
         "File name too long ("),
    Case("export-platform-unknown", ("export", "--workdir", "{run}", "--out", "{dir}/m",
                                     "--platforms", "metal"), 2,
         "--platforms metal: choose from cpu, cuda, rocm, tpu"),
    Case("export-nothing-readable", ("export", "--workdir", "{run}", "--out", "{dir}/m"), 1,
         "no readable checkpoint in {run}/checkpoints", setup=_garble_checkpoint),
    Case("export-out-not-utf8", ("export", "--workdir", "{run}", "--out", b"model-" + FF), 2,
         "Invalid value for '--out': 'model-\\xff' is not valid text"),
    # --- predict ------------------------------------------------------------------------
    Case("predict-no-inputs", ("predict", "--model", "{model}"), 2,
         "Missing argument 'INPUTS...'."),
    Case("predict-model-and-workdir", ("predict", "--model", "{model}", "--workdir", "{run}",
                                       "x.png"), 2,
         "give exactly one of --model (SavedModel) or --workdir"),
    Case("predict-nothing-to-read", ("predict", "x.png"), 2,
         "give --model (SavedModel) or --workdir: there is no run under runs/ to read"),
    Case("predict-step-with-model", ("predict", "--model", "{model}", "--step", "4", "x.png"),
         2, "--step/--best choose a checkpoint; use them with --workdir"),
    Case("predict-top-zero", ("predict", "--model", "{model}", "--top", "0", "x.png"), 2,
         "Invalid value for '--top': 0 is not in the range 1<=x<=10."),
    Case("predict-workdir-nothing-readable", ("predict", "--workdir", "{run}", "x.png"), 1,
         "no readable checkpoint in {run}/checkpoints", setup=_garble_checkpoint),
    Case("predict-not-a-model", ("predict", "--model", "{dir}", "x.png"), 2,
         "{dir} is not a SavedModel directory (no saved_model.pb)"),
    Case("predict-input-not-utf8", ("predict", "--model", "{model}", FF + b".png"), 2,
         "Invalid value for 'INPUTS...': '\\xff.png' is not valid text"),
    Case("predict-empty-image", ("predict", "--model", "{model}", "empty.png"), 2,
         "empty.png is empty", setup=_write("empty.png", b"")),
    Case("predict-input-is-a-directory", ("predict", "--model", "{model}", "{dir}"), 2,
         "{dir} is a directory, not a regular file"),
    # --- summary, devices -----------------------------------------------------------------
    Case("summary-extra-argument", ("summary", "extra"), 2,
         "Got unexpected extra argument (extra)"),
    Case("summary-platform-absent", ("summary",), 2,
         "JAX_PLATFORMS=rocm asks for a platform that is not available here",
         env={"JAX_PLATFORMS": "rocm"}),
    Case("devices-platform-absent", ("devices",), 2,
         "JAX_PLATFORMS=cuda asks for a platform that is not available here: no NVIDIA GPU is "
         "visible", env={"JAX_PLATFORMS": "cuda"}),
    Case("devices-simulated-cap", ("devices", "--devices", "513"), 2,
         "--devices asks for 513 simulated CPU devices; at most 512 can be simulated"),
    Case("devices-simulated-cap-env", ("devices",), 2,
         "JAX_NUM_CPU_DEVICES=100000 asks for more simulated CPU devices than the 512 that "
         "can be; lower or unset it", env={"JAX_NUM_CPU_DEVICES": "100000"}),
    # --- bench ----------------------------------------------------------------------------
    Case("bench-one-epoch", ("bench", "--epochs", "1"), 2,
         "Invalid value for '--epochs': a benchmark needs 2 or more epochs (the first "
         "compiles and is not counted)"),
    Case("bench-rounds-huge", ("bench", "--rounds", "1000"), 2,
         "Invalid value for '--rounds': 1000 is not in the range 1<=x<=100."),
    Case("bench-devices-beyond-one-host", ("bench", "--devices", "1", "--devices", "1000"), 2,
         "1000 devices per process: at most 512 CPU devices can be simulated"),
    Case("bench-job-without-devices", ("bench", "--job", "2x"), 2,
         "Invalid value for '--job': '2x' is not PROCESSESxDEVICES, e.g. 2x4 (2 processes of "
         "4 devices each)"),
    Case("bench-job-zero-processes", ("bench", "--job", "0x4"), 2,
         "Invalid value for '--job': '0x4': processes must be in 2..64 (for one process, use "
         "--devices)"),
    Case("bench-batch-not-divisible", ("bench", "--devices", "1", "--devices", "8",
                                       "--batch-size", "100"), 2,
         "--batch-size 100 does not divide over 8 devices; use a multiple of 8 (e.g. 96, 104)"),
    Case("bench-json-device", ("bench", "--json", "/dev/full"), 2,
         "--json /dev/full is a character device; lenet-dist writes a file only where "
         "nothing or a regular file is (choose a file path)"),
    Case("bench-json-is-a-directory", ("bench", "--json", "{dir}"), 2,
         "--json {dir} is a directory; give a file name, e.g. {dir}/bench.json"),
    # --- train: which data, and what is held out of it -------------------------------------
    Case("train-dataset-kind-without-path", ("train", "--dataset", "folder:"), 2,
         "--dataset 'folder:' names no path; write folder:PATH"),
    Case("train-dataset-idx-missing", ("train", "--dataset", "idx:{dir}/nothing", "--devices",
                                       "1", "--workdir", "{dir}/w"), 2,
         "--dataset idx:{dir}/nothing does not exist or is not a directory"),
    Case("train-dataset-idx-one-class", ("train", "--dataset", "idx:{dir}/idx", "--devices",
                                         "1", "--workdir", "{dir}/w"), 2,
         "{dir}/idx/classes.txt names 1 classes; give 2 to 1000, one per line",
         setup=lambda d: ((d / "idx").mkdir(), (d / "idx" / "classes.txt").write_text("a\n"))),
    Case("train-folder-missing", ("train", "--dataset", "folder:{dir}/nope", "--devices", "1",
                                  "--workdir", "{dir}/w"), 2,
         "--dataset folder:{dir}/nope does not exist or is not a directory"),
    Case("train-folder-without-splits", ("train", "--dataset", "folder:{dir}/imgs",
                                         "--devices", "1", "--workdir", "{dir}/w"), 2,
         "{dir}/imgs has no train/ and test/ folders; give --test-fraction F",
         setup=lambda d: _image_folder(d / "imgs", {"a": 2, "b": 2})),
    Case("train-folder-one-class", ("train", "--dataset", "folder:{dir}/imgs",
                                    "--test-fraction", "0.5", "--devices", "1", "--workdir",
                                    "{dir}/w"), 2,
         "{dir}/imgs holds 1 class folders; a model needs 2 to 1,000",
         setup=lambda d: _image_folder(d / "imgs", {"a": 2})),
    Case("train-folder-empty-class", ("train", "--dataset", "folder:{dir}/imgs",
                                      "--test-fraction", "0.5", "--devices", "1",
                                      "--workdir", "{dir}/w"), 2,
         "{dir}/imgs/b holds no images (.png, .jpg, .jpeg, .gif, .bmp)",
         setup=lambda d: _image_folder(d / "imgs", {"a": 2, "b": 0})),
    Case("train-folder-bad-image", ("train", "--dataset", "folder:{dir}/imgs",
                                    "--test-fraction", "0.5", "--devices", "1", "--workdir",
                                    "{dir}/w"), 2,
         "{dir}/imgs/b/1.png is not a PNG, JPEG, GIF or BMP image",
         setup=lambda d: (_image_folder(d / "imgs", {"a": 2, "b": 1}),
                          (d / "imgs" / "b" / "1.png").write_bytes(b"text, not an image"))),
    Case("train-test-fraction-builtin", ("train", "--test-fraction", "0.2"), 2,
         "--test-fraction splits a folder: dataset"),
    Case("train-test-fraction-one", ("train", "--test-fraction", "1"), 2,
         "Invalid value for '--test-fraction': 1.0 is not in the range 0.0<x<1.0."),
    Case("train-validation-negative", ("train", "--validation", "-5"), 2,
         "Invalid value for '--validation': -5 is not in the range 0<=x<=2147483647."),
    Case("train-validation-whole-split", ("train", "--validation", "2000000", "--data-dir",
                                          "{data}", "--devices", "1", "--workdir", "{dir}/w"),
         2, "--validation 2000000 would hold out the whole training split ("),
    Case("train-early-stop-without-validation", ("train", "--early-stop", "3"), 2,
         "--early-stop watches the validation accuracy: give --validation N too"),
    Case("train-early-stop-huge", ("train", "--validation", "10", "--early-stop", "10001"), 2,
         "Invalid value for '--early-stop': 10001 is not in the range 0<=x<=10000."),
    Case("export-format-unknown", ("export", "--workdir", "{run}", "--out", "{dir}/m",
                                   "--format", "tflite,coreml"), 2,
         "--format tflite,coreml: choose from savedmodel, tflite, onnx"),
    Case("export-quantize-without-tflite", ("export", "--workdir", "{run}", "--out",
                                            "{dir}/m", "--quantize", "int8"), 2,
         "--quantize int8 quantizes the TFLite model; add it: --format tflite --quantize int8"),
    Case("export-quantize-unknown", ("export", "--workdir", "{run}", "--out", "{dir}/m",
                                     "--format", "tflite", "--quantize", "int4"), 2,
         "--quantize int4: choose int8 (full-integer TFLite)"),
    # --- launch ---------------------------------------------------------------------------
    Case("launch-no-command", ("launch",), 2, "Missing argument 'COMMAND...'."),
    Case("launch-max-restarts-huge", ("launch", "--max-restarts", "101", "--", "devices"), 2,
         "Invalid value for '--max-restarts': 101 is not in the range 0<=x<=100."),
    Case("launch-processes-zero", ("launch", "-n", "0", "--", "devices"), 2,
         "Invalid value for '--processes' / '-n': 0 is not in the range 1<=x<=64."),
    Case("launch-timeout-nan", ("launch", "--timeout", "nan", "--", "devices"), 2,
         "Invalid value for '--timeout': nan is not a finite number"),
    Case("launch-grace-negative", ("launch", "--grace", "-1", "--", "devices"), 2,
         "Invalid value for '--grace': -1.0 is not in the range 0<=x<=2592000."),
    Case("launch-port-outside", ("launch", "--port", "70000", "--", "devices"), 2,
         "Invalid value for '--port': 70000 is not in the range 1<=x<=65535."),
    # --- the command line itself ----------------------------------------------------------
    Case("unknown-command", ("frobnicate",), 2, "No such command 'frobnicate'."),
    Case("unknown-option", ("--bogus",), 2, "No such option '--bogus'."),
    Case("version-as-a-command", ("version",), 2, "No such command 'version'."),
    Case("help-with-a-value", ("--help=yes",), 2, "Option '--help' does not take a value."),
    Case("debug-without-a-command", ("--debug",), 2, "Missing command."),
    Case("option-without-its-value", ("train", "--seed"), 2,
         "Option '--seed' requires an argument."),
    Case("debug-env-not-a-flag", ("summary",), 2,
         "Invalid value for '--debug' (env var: 'LENET_DIST_DEBUG'): 'maybe' is not a valid "
         "boolean.", env={"LENET_DIST_DEBUG": "maybe"}),
]

# ------------------------------------------------------------ the docs/errors.md table

PLACEHOLDERS = {"{run}": "RUN", "{model}": "MODEL", "{data}": "DATA", "{dir}": "DIR"}


def runs_shown(text: str) -> str:
    """A run of 50 or more of one character as `<300 × y>`, for the table's eyes."""
    return re.sub(r"(.)\1{49,}", lambda run: f"<{len(run[0])} × {run[1]}>", text)


def shell_word(arg: str | bytes) -> str:
    if isinstance(arg, bytes):
        return "$'" + "".join(chr(b) if 32 <= b < 127 and b not in b"'\\" else f"\\x{b:02x}"
                              for b in arg) + "'"
    for key, name in PLACEHOLDERS.items():
        arg = arg.replace(key, name)
    arg = runs_shown(arg)
    if arg == "" or re.search(r"[^\w@%+=:,./-]", arg):
        return "'" + arg.replace("'", "'\\''") + "'"
    return arg


def render_readme() -> str:
    """The docs/errors.md section between the markers: every case, as a user types it."""
    intro = textwrap.fill(
        "Each row is a case of `tests/test_bad_inputs.py`, run as a subprocess: stderr is "
        "exactly one line, `error: ` then (a part of) the message shown, with no traceback, "
        "and a trained run's checkpoints and `metrics.jsonl` and an exported model stay "
        "byte-for-byte unchanged. RUN is a trained workdir, MODEL an export, DATA the IDX "
        "files, DIR the case's own scratch directory. `lenet-dist --debug ...` (or "
        "`LENET_DIST_DEBUG=1`) prints the traceback after the line; an unexpected "
        "exception is one line, `error: internal error: TYPE: ...; rerun with --debug`, "
        "exit 1. Ctrl-C while lenet-dist starts (imports, JAX or TensorFlow start-up) "
        "prints `error: interrupted` and exits 130. `lenet-dist` alone prints the help on "
        "stderr and exits 2, as click does. `python tests/test_bad_inputs.py` regenerates "
        "this section.", width=90, break_on_hyphens=False, break_long_words=False)
    lines = [
        "## Bad input: one line, exit 2 (usage) or 1 (runtime failure)",
        "",
        intro,
        "",
        "| input | message | exit |",
        "|---|---|---|",
    ]
    for case in CASES:
        if case.xfail:
            continue
        env = "".join(f"{k}={shell_word(v)} " for k, v in case.env.items())
        command = env + "lenet-dist " + " ".join(shell_word(a) for a in case.argv)
        message = case.message
        for key, name in PLACEHOLDERS.items():
            message = message.replace(key, name)
        message = runs_shown(message).replace("|", "\\|")
        lines.append(f"| `{command}` | {message} | {case.code} |")
    return "\n".join(lines)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_errors_doc_shows_the_table():
    text = ERRORS_DOC.read_text()
    assert BEGIN in text and END in text, f"docs/errors.md needs the markers {BEGIN} ... {END}"
    section = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert section == render_readme(), "run `python tests/test_bad_inputs.py --write`"


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES}
    for name in ("train", "eval", "checkpoints", "export", "predict", "summary", "devices",
                 "bench", "launch"):
        assert name in commands, name


# ---------------------------------------------------------------------------- running

def checksums(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots`, keyed by path relative to its root's parent."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in files:
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root.parent))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclasses.dataclass(frozen=True)
class Pristine:
    run: Path
    model: Path
    data: str

    def watched(self, run: Path, model: Path) -> dict[str, str]:
        return checksums(run / "checkpoints", run / "metrics.jsonl", model)


def cli(args, cwd, env=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m lenet_dist ARGS` in its own session, killed whole on timeout."""
    inherited = {k: v for k, v in os.environ.items()  # the case's own settings only
                 if not k.startswith("LENET_DIST_") and k != "JAX_PLATFORMS"}
    env = {**inherited, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "lenet_dist", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(timed out after {timeout} s)".encode()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


@pytest.fixture(scope="session")
def pristine(data_dir, tmp_path_factory) -> Pristine:
    """A trained run (1 epoch on 256 images, 4 checkpointed steps) and its export, made
    once by the CLI; cases get private copies."""
    root = tmp_path_factory.mktemp("pristine")
    run, model = root / "run", root / "model"
    proc = cli(["train", "--devices", "1", "--batch-size", "64", "--train-limit", "256",
                "--epochs", "1", "--data-dir", data_dir, "--workdir", str(run),
                "--no-progress"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    proc = cli(["export", "--workdir", str(run), "--out", str(model), "--data-dir", data_dir],
               cwd=root)
    assert proc.returncode == 0, proc.stderr
    return Pristine(run, model, data_dir)


@dataclasses.dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    before: dict[str, str]
    after: dict[str, str]
    paths: dict[str, str]


def run_case(case: Case, pristine: Pristine, root: Path) -> Outcome:
    here = root / case.id
    here.mkdir()
    run, model = here / "run", here / "model"
    shutil.copytree(pristine.run, run, symlinks=True)
    shutil.copytree(pristine.model, model, symlinks=True)
    if case.setup:
        case.setup(here)
    paths = {"{run}": str(run), "{model}": str(model), "{data}": pristine.data,
             "{dir}": str(here)}

    def fill(arg):
        if isinstance(arg, bytes):
            return arg
        for key, value in paths.items():
            arg = arg.replace(key, value)
        return arg

    before = pristine.watched(run, model)
    with rundir.WorkdirLock(run, "lenet-dist train") if case.hold_lock \
            else contextlib.nullcontext():
        proc = cli([fill(a) for a in case.argv], cwd=here, env=case.env)
    return Outcome(proc, before, pristine.watched(run, model), paths)


@pytest.fixture(scope="module")
def outcomes(pristine, tmp_path_factory, request) -> dict[str, Outcome]:
    """The selected cases (all, or those `-k` picks), WORKERS at a time; a case's test
    then only checks its outcome."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input"}
    root = tmp_path_factory.mktemp("cases")
    reference = pristine.watched(pristine.run, pristine.model)
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {c.id: pool.submit(run_case, c, pristine, root) for c in CASES
                   if c.id in selected}
        results = {k: f.result() for k, f in futures.items()}
    assert pristine.watched(pristine.run, pristine.model) == reference
    return results


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(
    reason=c.xfail, strict=True)] if c.xfail else []) for c in CASES])
def test_bad_input(case, outcomes):
    outcome = outcomes[case.id]
    proc = outcome.proc
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    shown = f"exit {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert len(lines[0]) < 1000, shown  # every value or path in it bounded
    message = case.message
    for key, value in outcome.paths.items():
        message = message.replace(key, value)
    assert message in lines[0], shown
    assert proc.returncode == case.code, shown
    assert outcome.after == outcome.before, "the trained run or the export changed"


def rendered_doc(text: str) -> str:
    """`text` (docs/errors.md) with the section between the markers rendered anew."""
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + "\n" + render_readme() + "\n" + END + rest.split(END, 1)[1]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        ERRORS_DOC.write_text(rendered_doc(ERRORS_DOC.read_text()))
        print(f"wrote the table into {ERRORS_DOC.relative_to(ROOT)}")
    else:
        print(BEGIN)
        print(render_readme())
        print(END)
