import shutil

import jax
import pytest

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.cli import main
from lenet_dist.errors import UserError
from lenet_dist.evaluation import evaluate_checkpoint
from lenet_dist.restore import restore_checkpoint
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.preemption import SIGTERM_AT_ENV
from lenet_dist.training import train
from tests.conftest import RECIPE_RUNS, assert_same_params, copy_run_until, run_cli, small

QUIET = dict(log=lambda _: None)


def test_checkpoints_listed_with_best(reference):
    work, result = reference
    ckpts = Checkpoints(work, read_only=True)
    assert ckpts.steps() == [3, 6, 9, 10, 12, 15, 18, 20]
    assert ckpts.metrics(10)["test_accuracy"] == result.history[0]["test_accuracy"]
    assert ckpts.metrics(12) is None  # mid-epoch saves carry no test metrics
    best = max(r["test_accuracy"] for r in result.history)
    assert ckpts.best_step() in (10, 20)
    assert ckpts.metrics(ckpts.best_step())["test_accuracy"] == best


@pytest.mark.parametrize("recipe", list(RECIPE_RUNS))
@pytest.mark.parametrize("resume_from", [10, 12])  # an epoch end, and mid-epoch
def test_interrupted_run_continues_exactly(request, dataset, tmp_path, recipe, resume_from):
    """Resumed from a copy of the uninterrupted run cut at `resume_from`, each recipe
    ends exactly where that run ended: the data order and, for the modern recipe, the
    augmentation keyed by (seed, step), the schedule's position, AdamW's moments and
    the BatchNorm statistics all come back from the checkpoint."""
    ref_work, ref = request.getfixturevalue(
        {"d2l": "reference", "modern": "modern_reference"}[recipe])  # shared, not retrained
    config = RECIPE_RUNS[recipe]
    work = copy_run_until(ref_work, tmp_path / "run", resume_from)
    logs = []
    resumed = train(config(work, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
                    log=logs.append)
    assert resumed.config.network == ref.config.network == recipe
    assert any(f"resuming from checkpoint at step {resume_from}" in line for line in logs)
    assert_same_params(resumed.state.variables, ref.state.variables, atol=1e-6)
    assert len(resumed.history) == len(ref.history) == 2
    for a, b in zip(resumed.history, ref.history):
        for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    lines = (work / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the epoch recomputed after the checkpoint is not duplicated


@pytest.mark.parametrize("n", [1, 4])
def test_checkpoint_from_8_devices_restores_on_fewer(trained, dataset, n):
    restored = restore_checkpoint(trained.config.workdir, Shardings(make_mesh(n)))
    params, step, meta = restored.variables, restored.step, restored.meta
    assert meta["mesh"] == {"data": 8} and step == trained.final["step"]
    assert {len(p.sharding.device_set) for p in jax.tree.leaves(params)} == {n}
    assert_same_params(params, trained.state.params)
    result = evaluate_checkpoint(trained.config.workdir, devices=n)
    assert result["examples"] == len(dataset.test)
    assert result["test_accuracy"] == pytest.approx(trained.final["test_accuracy"], abs=1e-6)


def test_training_continues_on_4_devices(reference, dataset, tmp_path):
    ref_work, ref = reference
    runs = {}
    for n in (8, 4):
        work = tmp_path / f"d{n}"
        shutil.copytree(ref_work, work)
        runs[n] = train(small(work, devices=n, epochs=3), dataset=dataset, **QUIET)
        assert len(runs[n].history) == 3
    assert_same_params(runs[4].state.params, runs[8].state.params, atol=1e-5)


def test_finished_run_says_so(reference, dataset):
    work, ref = reference
    before = sorted(p.name for p in (work / "checkpoints").iterdir())
    logs = []
    result = train(small(work, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
                   log=logs.append)
    assert "is finished: 20 steps = 2 epochs, test accuracy" in logs[0] and len(logs) == 1
    assert_same_params(result.state.params, ref.state.params)
    logs.clear()  # fewer epochs than trained: it said "20 steps = 1 epochs"
    train(small(work, epochs=1, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
          log=logs.append)
    assert "is finished: 20 steps = 2 epochs (more than --epochs 1)" in logs[0], logs
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before


def test_other_runs_workdir_is_refused_and_untouched(reference, dataset):
    work, _ = reference
    before = sorted(p.name for p in (work / "checkpoints").iterdir())
    with pytest.raises(UserError, match=r"holds a different run \(dataset: saved "
                                        r"'fashion_mnist', now 'mnist'; batch_size"):
        train(small(work, dataset="mnist", batch_size=32), dataset=dataset, **QUIET)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before


def test_truncated_latest_checkpoint_falls_back(reference, dataset, tmp_path):
    ref_work, ref = reference
    work = tmp_path / "run"
    shutil.copytree(ref_work, work)
    files = [f for f in (work / "checkpoints" / "20").rglob("*") if f.is_file()
             and f.stat().st_size > 1000]
    for f in files:  # truncate the array data of the latest checkpoint
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    logs = []
    resumed = train(small(work, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
                    log=logs.append)
    assert any("warning: checkpoint step 20 is unreadable" in line and "moved to" in line
               for line in logs)
    assert len(list((work / "corrupt-checkpoints").iterdir())) == 1  # kept, not deleted
    assert any("resuming from checkpoint at step 18" in line for line in logs)
    assert_same_params(resumed.state.params, ref.state.params, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["eval", "--workdir", "{tmp}/none"], "no checkpoints in"),
    (["checkpoints", "--workdir", "{tmp}/none"], "no checkpoints in"),
    (["eval", "--workdir", "{ref}", "--step", "7"], "no checkpoint at step 7; available: 3, 6"),
    (["eval", "--workdir", "{ref}", "--step", "3", "--best"], "--step and --best are exclusive"),
    (["train", "--workdir", "{file}"], "is a file, not a directory"),
    (["train", "--workdir", "{file}/sub"], "cannot write to --workdir"),
])
def test_checkpoint_bad_input(capsys, devices, reference, tmp_path, args, message):
    (tmp_path / "f").write_text("x")
    fmt = dict(tmp=tmp_path, ref=reference[0], file=tmp_path / "f")
    assert main([a.format(**fmt) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_best_without_metrics_is_refused(capsys, devices, reference, tmp_path):
    work = tmp_path / "mid"
    shutil.copytree(reference[0], work)
    for d in (work / "checkpoints").iterdir():
        if d.name in ("10", "20"):
            shutil.rmtree(d)
    assert main(["eval", "--workdir", str(work), "--best"]) == 2
    assert "has test metrics yet" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches(reference, data_dir, tmp_path):
    """SIGTERM mid-run: exit 143 with a checkpoint; the rerun ends where the
    uninterrupted in-process reference run ended. The process signals itself right
    after step 5 (LENET_DIST_SIGTERM_AT, a real SIGTERM through the real handler), so
    the run is stopped mid-epoch, between two saves, on a fast machine as on a slow one."""
    _, ref = reference
    args = ["train", "--devices", "8", "--epochs", "2", "--train-limit", "640",
            "--batch-size", "64", "--lr", "0.5", "--save-every-steps", "3",
            "--keep-checkpoints", "20", "--data-dir", data_dir, "--workdir",
            str(tmp_path), "--no-progress", "--eval-batch-size", "1000"]
    stopped = run_cli(*args, env={SIGTERM_AT_ENV: "5"})
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped by SIGTERM at step 5;" in stopped.stderr, stopped.stderr
    assert "checkpoint saved" in stopped.stderr and "Traceback" not in stopped.stderr
    assert Checkpoints(tmp_path, read_only=True).steps() == [3, 5]  # 6 never came
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "resuming from checkpoint at step 5" in again.stdout
    params = restore_checkpoint(str(tmp_path), Shardings(make_mesh(8))).variables
    assert_same_params(params, ref.state.variables, atol=1e-6)


def test_orbax_leaves_jax_preemption_sync_point_to_the_stop_rule(monkeypatch, tmp_path):
    """JAX's sync manager takes each call's number as the process's position; the stop
    rule counts its own calls. Orbax's save and finalize asked it with the global step,
    which in a job moved the agreed stop step behind the stop rule: a job signalled
    during a save trained on to the end (exit 0). A save must not call it."""
    import numpy as np
    from orbax.checkpoint._src.multihost import multihost

    calls = []
    monkeypatch.setattr(multihost.multihost_utils, "reached_preemption_sync_point",
                        lambda step: calls.append(step) or False)
    ckpts = Checkpoints(tmp_path / "run", keep=2)
    tree = {"w": np.arange(4.0)}
    for step in (3, 6):
        ckpts.save(step, tree, {"step": step}, metrics={"test_accuracy": 0.5}, wait=True)
    ckpts.close()
    assert ckpts.steps() == [3, 6] and calls == []
