"""bench --to-accuracy: the medians and the table from runs' figures, the refusals, and
one real race of the smoke recipe, cold then warm (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_dist import to_accuracy
from lenet_dist.cli import main
from lenet_dist.to_accuracy import Contender, format_table, summarize


def run(to, wall=30.0, final=0.91, gap=0.2):
    phases = {k: 0.0 for k in ("start-up", "joining", "loading data", "restoring",
                                "compiling", "training", "evaluating", "saving",
                                "finishing", "lost", "other")}
    phases.update({"start-up": 1.5, "training": wall - gap - 1.5})
    return {"to_target_seconds": to, "epoch_reached": None if to is None else 2,
            "accuracy_reached": None if to is None else final, "final_accuracy": final,
            "epochs": 2, "wall_seconds": wall, "ledger_wall_seconds": wall - gap,
            "phases": phases}


def test_summary_counts_only_the_runs_that_reached_the_target():
    s = summarize([run(20.0), run(None, final=0.89), run(24.0), run(22.0)])
    assert (s["reached"], s["runs"]) == (3, 4)
    assert s["to_target_seconds"] == 22.0
    assert (s["to_target_min"], s["to_target_max"]) == (20.0, 24.0)
    assert s["final_accuracy"] == pytest.approx((0.91 + 0.91) / 2)
    assert s["ledger_gap"] == pytest.approx(0.2 / 30.0)
    assert s["phases"]["start-up"] == 1.5


def test_the_table_says_how_many_reached_it_and_never():
    result = {"settings": {"target": 0.9, "rounds": 2}, "contenders": [
        {"name": "fast, 1 device", "summary": {"cold": summarize([run(25.0), run(None)]),
                                               "warm": summarize([run(24.0), run(26.0)])}},
        {"name": "d2l, 1 device", "summary": {"cold": summarize([run(None, final=0.72)])}}]}
    lines = format_table(result)
    cold, warm, never = (ln for ln in lines if ln.startswith(("fast", "d2l")))
    assert cold.split()[4:6] == ["25.0", "(1/2)"] and "25.0-25.0" in cold
    assert warm.split()[4:6] == ["25.0", "24.0-26.0"]
    assert "never" in never and "0.7200" in never
    assert "within 0.7%" in lines[-1]


@pytest.mark.parametrize("args, message", [
    (["--to-accuracy", "0"], "Invalid value for '--to-accuracy'"),
    (["--to-accuracy", "1.5"], "Invalid value for '--to-accuracy'"),
    (["--to-accuracy", "0.9", "--job", "2x4"], "--to-accuracy runs each recipe as it is"),
    (["--to-accuracy", "0.9", "--batch-size", "64"], "--to-accuracy runs each recipe"),
])
def test_bad_race_input_is_one_line_before_any_run(monkeypatch, capsys, args, message):
    monkeypatch.setattr(to_accuracy, "run_once", lambda *a, **k: pytest.fail("a run started"))
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_defaults_race_the_fast_recipe_on_one_device(monkeypatch, capsys):
    seen = []

    def fake(contender, target, workdir, cache, data_dir, timeout=None):
        seen.append((contender, target, workdir.name, cache.name))
        return run(25.0)

    monkeypatch.setattr(to_accuracy, "run_once", fake)
    assert main(["bench", "--to-accuracy", "0.9", "--rounds", "1"]) == 0
    assert [s[0] for s in seen] == [Contender("fast", 1)] * 2
    assert [s[2] for s in seen] == ["r0-c0-cold", "r0-c0-warm"]
    assert seen[0][3] == seen[1][3]  # warm reuses the cache the cold run filled
    assert "fast, 1 device  cold" in capsys.readouterr().out


def test_a_contender_runs_the_train_command_a_user_would():
    command = Contender("fast", 2, ("--epochs", "3")).command(
        workdir=Path("/w"), cache=Path("/c"), data_dir="/d")
    assert command == ["--compile-cache", "/c", "train", "--recipe",
                           "fast", "--devices", "2", "--workdir", "/w", "--no-progress",
                           "--epochs", "3", "--data-dir", "/d"]


@pytest.mark.slow
def test_race_end_to_end(data_dir, tmp_path):
    """The smoke recipe for 1 epoch, cold then warm, in fresh processes: the time to the
    target is that epoch's end, before the exit, and each run's ledger sums to its
    phases and (near) to the wall time seen from outside."""
    out = tmp_path / "race.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "lenet_dist", "bench", "--to-accuracy",
                           "0.3", "--recipe", "smoke", "--epochs", "1", "--rounds", "1",
                           "--data-dir", data_dir, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoke, 1 device  cold" in proc.stdout and "smoke, 1 device  warm" in proc.stdout
    (entry,) = json.loads(out.read_text())["contenders"]
    for mode in ("cold", "warm"):
        (r,) = entry["runs"][mode]
        assert r["epoch_reached"] == 1 and r["accuracy_reached"] >= 0.3, r
        assert 0 < r["to_target_seconds"] < r["wall_seconds"], r
        assert sum(r["phases"].values()) == pytest.approx(r["ledger_wall_seconds"], rel=0.01)
        assert abs(r["ledger_wall_seconds"] - r["wall_seconds"]) < 0.15 * r["wall_seconds"], r
