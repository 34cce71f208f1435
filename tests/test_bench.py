"""bench: figures from a run's metrics.jsonl, the configurations and their validation,
the table and the JSON (run_config stubbed: no training), peak memory from os.wait4,
and one real end-to-end benchmark (slow)."""

import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lenet_dist import bench
from lenet_dist.bench import FIGURES, Run
from lenet_dist.cli import main
from lenet_dist.errors import Failure, UserError
from lenet_dist.records import EpochRecord


def records(n=3, launched=1000.0, eval_images=10_000):
    """metrics.jsonl records as train writes them: epoch 1 compiles (slow) and carries
    the first step; epochs 2.. are the steady state."""
    rows, t = [], launched + 5.0
    for e in range(1, n + 1):
        t += 20.0 if e == 1 else 10.0 + e
        first = dict(first_step_seconds=1.5, first_step_time=launched + 3.25) if e == 1 else {}
        rows.append(EpochRecord(
            epoch=e, step=10 * e, train_loss=1.0, train_accuracy=0.5, test_loss=1.0,
            test_accuracy=0.5, images_per_sec=1000.0 if e == 1 else 5000.0 + 100 * e,
            train_seconds=9.0, eval_seconds=2.0 if e == 1 else 0.5 * e, epoch_seconds=10.0,
            devices=8, processes=1, batch_size=128, time=t, eval_images=eval_images,
            **first))
    return rows


# ---------------------------------------------------------------- figures of one run

def test_steady_figures_skip_the_first_epoch_and_report_the_warm_up_apart(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records(4)))
    fig = bench.steady_figures(bench.read_metrics(path), 1000.0)
    assert list(fig) == list(FIGURES[:-1])  # peak memory comes from the kernel
    assert fig["train_images_per_sec"] == 5300.0  # median of 5200, 5300, 5400
    assert fig["eval_images_per_sec"] == 10_000 / 1.5  # median of 1.0, 1.5, 2.0 s
    assert fig["epoch_seconds"] == 13.0  # median of 12, 13, 14 s between epoch ends
    assert fig["first_step_seconds"] == 1.5
    assert fig["ready_seconds"] == 3.25


def test_two_epochs_are_enough_one_is_not():
    fig = bench.steady_figures(records(2), 1000.0)
    assert fig["train_images_per_sec"] == 5200.0 and fig["epoch_seconds"] == 12.0
    with pytest.raises(Failure, match="hold 1 epoch"):
        bench.steady_figures(records(1), 1000.0)
    rows = records(3)
    rows[0] = dataclasses.replace(rows[0], first_step_seconds=None)  # a resumed run
    with pytest.raises(Failure, match="no first step"):
        bench.steady_figures(rows, 1000.0)


def test_eval_images_come_from_the_records_not_the_log():
    """Each record says how many images its evaluation read (test + validation)."""
    assert bench.steady_figures(records(3, eval_images=512), 1000.0)[
        "eval_images_per_sec"] == (512 / 1.0 + 512 / 1.5) / 2  # epochs 2 and 3
    assert not hasattr(bench, "EVAL_IMAGES") and not hasattr(bench, "eval_images")
    older = [dataclasses.replace(r, eval_images=None) for r in records(3)]
    with pytest.raises(Failure, match="how many images each evaluation read"):
        bench.steady_figures(older, 1000.0)


def test_unreadable_metrics_are_one_failure(tmp_path):
    with pytest.raises(Failure, match="cannot read the benchmark run's"):
        bench.read_metrics(tmp_path / "absent.jsonl")
    (tmp_path / "m.jsonl").write_text("{not json\n")
    with pytest.raises(Failure, match="cannot read the benchmark run's"):
        bench.read_metrics(tmp_path / "m.jsonl")


def test_train_writes_what_bench_reads(trained, dataset):
    """Every epoch's evaluation time; the first step (compile included) on the first."""
    first, second = trained.history
    assert 0 < first["first_step_seconds"] < first["train_seconds"]
    assert first["first_step_time"] < second["time"]
    assert all(0 < r["eval_seconds"] < r["epoch_seconds"] for r in trained.history)
    assert "first_step_seconds" not in second and "first_step_time" not in second
    assert all(r.eval_images == len(dataset.test) for r in trained.records)  # the test set
    rows = bench.read_metrics(Path(trained.config.workdir) / "metrics.jsonl")
    assert rows == trained.records


def test_a_resumed_run_times_its_own_first_step(reference, dataset, tmp_path):
    from lenet_dist.training import train
    from tests.conftest import copy_run_until, small

    work = copy_run_until(reference[0], tmp_path / "run", 12)  # mid-epoch 2
    resumed = train(small(work, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
                    log=lambda _: None)
    first, second = resumed.history
    assert first == reference[1].history[0]  # restored as it was
    assert second["first_step_seconds"] > 0 and second["first_step_time"] <= second["time"]


# ---------------------------------------------------------------- configurations

@pytest.mark.parametrize("text, expected", [("2x4", (2, 4)), (" 4X2 ", (4, 2)), ("64x1", (64, 1)),
                                            ("2x512", (2, 512))])
def test_parse_job(text, expected):
    assert bench.parse_job(text) == expected


@pytest.mark.parametrize("text, message", [
    ("2x", "is not PROCESSESxDEVICES"), ("x4", "is not PROCESSESxDEVICES"),
    ("2x4x1", "is not PROCESSESxDEVICES"), ("-2x4", "is not PROCESSESxDEVICES"),
    ("", "is not PROCESSESxDEVICES"), ("2*4", "is not PROCESSESxDEVICES"),
    ("0x4", "processes must be in 2..64"), ("1x8", "for one process, use --devices"),
    ("65x1", "processes must be in 2..64"), ("2x0", "devices per process must be in 1..512"),
    ("2x513", "devices per process must be in 1..512"),
    ("99999999999999999999x4", "processes must be in 2..64"),
])
def test_parse_job_refuses(text, message):
    with pytest.raises(UserError, match=message):
        bench.parse_job(text)


def test_plan_is_recipe_x_batch_x_devices_then_jobs_without_repeats():
    runs = bench.plan((1, 8, 8), (128, 256), ("d2l", "modern"), [(2, 4)])
    assert [r.name for r in runs] == [
        "d2l b128 1x1", "d2l b128 1x8", "d2l b128 2x4",
        "d2l b256 1x1", "d2l b256 1x8", "d2l b256 2x4",
        "modern b128 1x1", "modern b128 1x8", "modern b128 2x4",
        "modern b256 1x1", "modern b256 1x8", "modern b256 2x4"]
    assert runs[2] == Run(8, 128, "d2l", processes=2)


@pytest.mark.parametrize("run, message", [
    (Run(8, 100, "d2l"), "--batch-size 100 does not divide over 8 devices; use a multiple "
                         "of 8 (e.g. 96, 104)"),
    (Run(8, 100, "d2l", 2), "--batch-size 100 does not divide over 8 devices"),
    (Run(6, 128, "d2l", 4), "--devices 6 does not split over 4 processes"),
    (Run(1, 128, "tiny"), "unknown recipe 'tiny'; choose one of d2l, modern, fast, smoke"),
    (Run(0, 128, "d2l"), "--devices must be >= 1"),
    (Run(1, 0, "d2l"), "--batch-size must be in 1..65536"),
    (Run(1026, 1026, "d2l", 2), "513 devices per process"),
    (Run(130, 130, "d2l", 65), "1..64 processes"),
])
def test_a_bad_run_is_refused_before_anything_runs(run, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run.validate()


def test_a_bad_batch_in_the_cross_product_is_refused_before_any_run(monkeypatch):
    monkeypatch.setattr(bench, "run_config", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(UserError, match="--batch-size 100 does not divide over 8"):
        bench.plan((1, 8), (128, 100), ("d2l",))


def test_train_args():
    args = Run(8, 256, "modern", 2).train_args(3, "/data", "/w")
    assert args == ["train", "--recipe", "modern", "--devices", "8", "--batch-size", "256",
                    "--epochs", "3", "--workdir", "/w", "--no-progress", "--no-checkpoint",
                    "--data-dir", "/data"]
    assert "--checkpoint" in Run(1, 128, "d2l").train_args(2, None, "/w", checkpoint=True)


# ---------------------------------------------------------------- the command, stubbed

def fake_run_config(calls):
    """run_config without training: figures that grow with the devices, one more
    image/s each round; every call recorded."""

    def run_config(run, epochs, data_dir, workdir, *, checkpoint=False, timeout=None):
        jitter = sum(c[0] == run for c in calls)  # 0 in round 1, 1 in round 2
        calls.append((run, epochs, data_dir, checkpoint))
        return {"train_images_per_sec": 1000.0 * run.devices + jitter,
                "eval_images_per_sec": 20_000.0 + run.batch_size,
                "first_step_seconds": 1.0 + (run.recipe == "modern"),
                "ready_seconds": 5.0 + run.processes,
                "epoch_seconds": 60.0 / run.devices,
                "peak_rss_mib": 400.0 * run.processes}

    return run_config


def test_bench_writes_the_table_and_the_json(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(bench, "run_config", fake_run_config(calls))
    out = tmp_path / "bench.json"
    out.write_text("an older result, replaced")
    assert main(["bench", "--devices", "1", "--devices", "2", "--job", "2x4",
                 "--batch-size", "128", "--batch-size", "256", "--recipe", "d2l",
                 "--recipe", "modern", "--epochs", "4", "--rounds", "2",
                 "--data-dir", "/data", "--json", str(out)]) == 0
    assert len(calls) == 2 * 2 * 2 * 3  # rounds x recipes x batches x (1, 2, 2x4)
    # interleaved: round 1 runs every configuration once before round 2 starts
    assert [c[0] for c in calls[:12]] == [c[0] for c in calls[12:]]
    assert {(c[1], c[2], c[3]) for c in calls} == {(4, "/data", False)}

    result = json.loads(out.read_text())
    assert set(result) == {"date", "machine", "versions", "settings", "configs"}
    assert result["machine"]["cores"] == os.cpu_count() and result["machine"]["platform"]
    assert set(result["machine"]["cpu_features"]) <= set(bench.CPU_FEATURES)
    assert set(result["versions"]) >= {"jax", "jaxlib"} and result["versions"]["jax"]
    assert result["settings"] == {"epochs": 4, "rounds": 2, "data_dir": "/data",
                                  "baseline": "group", "checkpoint_cost": False}
    configs = {c["name"]: c for c in result["configs"]}
    assert len(configs) == 12
    job = configs["modern b256 2x4"]
    assert (job["devices"], job["processes"], job["batch_size"]) == (8, 2, 256)
    assert len(job["rounds"]) == 2 and all(set(f) == set(FIGURES) for f in job["rounds"])
    assert job["median"]["train_images_per_sec"] == 8000.5  # median of 8000 and 8001
    assert job["median"]["peak_rss_mib"] == 800.0
    assert job["train_ratio"] == pytest.approx(8000.5 / 1000.5)  # vs modern b256 1x1
    assert configs["d2l b128 1x1"]["train_ratio"] == 1.0
    assert configs["d2l b128 1x1"]["rounds"][1]["train_images_per_sec"] == 1001.0

    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("round ") for line in printed) == 24
    header = next(line for line in printed if line.startswith("config"))
    for column in ("train img/s", "ratio", "eval img/s", "first step s", "ready s",
                   "peak RSS MiB"):
        assert column in header
    row = next(line for line in printed if line.startswith("modern b256 2x4"))
    assert row.split()[3:] == ["8,000", "8.00x", "20,256", "2.00", "7.00", "800", "7.50"]
    assert printed[-1] == f"wrote {out}"


def test_checkpoint_cost_compares_the_first_configuration_on_and_off(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "run_config", fake_run_config(calls))
    assert main(["bench", "--devices", "8", "--devices", "1", "--checkpoint-cost",
                 "--rounds", "1"]) == 0
    assert [(c[0], c[3]) for c in calls] == [(Run(8, 128, "d2l"), False),
                                            (Run(8, 128, "d2l"), True)]
    out = capsys.readouterr().out
    assert "d2l b128 1x8 checkpoint off" in out and "d2l b128 1x8 checkpoint on" in out


@pytest.mark.parametrize("args, message", [
    (["--job", "2x"], "Invalid value for '--job': '2x' is not PROCESSESxDEVICES"),
    (["--job", "0x4"], "Invalid value for '--job': '0x4': processes must be in 2..64"),
    (["--devices", "8", "--batch-size", "100"], "--batch-size 100 does not divide over 8"),
    (["--json", "{dir}"], "--json {dir} is a directory"),
    (["--json", "{dir}/absent/b.json"], "the directory {dir}/absent does not exist"),
    (["--serving", "--batch-size", "8", "--batch-size", "16"], "--serving measures one"),
])
def test_bad_bench_input_is_one_line_before_any_run(monkeypatch, capsys, tmp_path, args,
                                                    message):
    monkeypatch.setattr(bench, "run_config", lambda *a, **k: pytest.fail("a run started"))
    fill = [a.replace("{dir}", str(tmp_path)) for a in args]
    assert main(["bench", *fill]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert message.replace("{dir}", str(tmp_path)) in err[0]


def test_the_json_refuses_a_link(tmp_path):
    (tmp_path / "link.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UserError, match="is a symlink"):
        bench.check_json_path(str(tmp_path / "link.json"))


# ---------------------------------------------------------------- processes

def spawn(code):
    return subprocess.Popen([sys.executable, "-c", code])


def test_reap_reports_each_process_peak_memory_and_the_first_failure():
    # Linux carries the parent's peak (here pytest's, with JAX loaded) into each child at
    # exec: the child must allocate above that floor for its own peak to show.
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / bench.RSS_PER_MIB
    size = int(floor) + 200
    procs = [spawn(f"b = bytearray({size} * 2**20); b[::4096] = b'x' * len(b[::4096])"),
             spawn("pass")]
    peaks, failed = bench.reap(procs, time.monotonic() + 60, "test")
    assert failed is None and [p.returncode for p in procs] == [0, 0]
    assert peaks[0] > size > peaks[1] > 1  # MiB

    procs = [spawn("import time; time.sleep(60)"), spawn("raise SystemExit(3)")]
    try:
        peaks, failed = bench.reap(procs, time.monotonic() + 60, "test")
        assert failed == 1 and procs[1].returncode == 3 and procs[0].returncode is None
    finally:
        procs[0].kill()
        procs[0].wait()


def test_reap_gives_up_at_the_deadline():
    proc = spawn("import time; time.sleep(60)")
    try:
        with pytest.raises(Failure, match="benchmark run slow one did not finish in time"):
            bench.reap([proc], time.monotonic() + 0.2, "slow one")
    finally:
        proc.kill()
        proc.wait()


def test_a_failed_run_is_its_own_error_line():
    err = "note: something\nerror: --data-dir /x does not exist\n"
    e = bench.run_failure(Run(1, 128, "d2l"), 2, err)
    assert type(e) is UserError and str(e) == ("benchmark run d2l b128 1x1 failed: --data-dir "
                                               "/x does not exist")
    e = bench.run_failure(Run(8, 128, "d2l", 2), -9, "", " (process 1)")
    assert type(e) is Failure and str(e) == ("benchmark run d2l b128 2x4 (process 1) failed: "
                                             "killed by SIGKILL; exit status -9")


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_bench_end_to_end(data_dir, tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "lenet_dist", "bench", "--devices", "1",
                           "--devices", "2", "--batch-size", "128", "--epochs", "2",
                           "--rounds", "1", "--data-dir", data_dir, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    names = ["d2l b128 1x1", "d2l b128 1x2"]
    for name in names:
        (row,) = [line for line in lines if line.startswith(name + " ")]
        numbers = [float(v.replace(",", "").rstrip("x")) for v in row.split()[3:]]
        assert len(numbers) == 7 and all(math.isfinite(v) and v > 0 for v in numbers), row
    result = json.loads(out.read_text())
    assert [c["name"] for c in result["configs"]] == names
    for config in result["configs"]:
        for figures in (config["median"], *config["rounds"]):
            assert set(figures) == set(FIGURES)
            assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
            assert 100 < figures["peak_rss_mib"] < 20_000
            assert figures["ready_seconds"] > figures["first_step_seconds"]
    assert result["configs"][0]["train_ratio"] == 1.0
