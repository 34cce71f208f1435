"""Nothing saved is lost and no workdir file is trusted: locks, links, corrupt and
incompatible checkpoints, divergence, save failures, runs that must not mix."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from etils import epath
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lenet_dist import checkpoint as ckpt_lib
from lenet_dist import rundir, safefs, step_files
from lenet_dist import training as train_mod
from lenet_dist.cli import main
from lenet_dist.errors import Failure, UserError
from lenet_dist.records import EpochRecord
from lenet_dist.evaluation import evaluate_checkpoint, list_checkpoints
from lenet_dist.restore import restore_checkpoint
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.training import train
from tests.conftest import assert_same_params, small

QUIET = dict(log=lambda _: None)


def checksums(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def run_copy(reference, tmp_path):
    """A private copy of the reference run (checkpoints 3, 6, ..., 20)."""
    work = tmp_path / "run"
    shutil.copytree(reference[0], work)
    return work


# ------------------------------------------------------------------ the lock


def test_second_train_on_a_locked_workdir_is_refused_untouched(run_copy, dataset):
    before = checksums(run_copy)
    with rundir.WorkdirLock(run_copy, "lenet-dist train"):
        with pytest.raises(Failure, match=r"is in use by `lenet-dist train` \(PID "
                                          rf"{os.getpid()} on .*, since 20"):
            train(small(run_copy, epochs=3), dataset=dataset, **QUIET)
    after = checksums(run_copy)
    assert {k: v for k, v in after.items() if k != "lock"} == \
        {k: v for k, v in before.items() if k != "lock"}


def test_a_dead_holders_lock_is_taken_over(run_copy, dataset):
    (run_copy / "lock").write_text(json.dumps({"pid": 999999, "host": "gone",
                                               "since": "2026-01-01T00:00:00+00:00",
                                               "command": "lenet-dist train"}))
    logs = []
    train(small(run_copy, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
          log=logs.append)
    assert any("took over the lock of a run that is no longer running" in line
               and "PID 999999 on gone" in line for line in logs), logs
    assert (run_copy / "lock").read_text() == ""  # released: no holder recorded
    assert rundir.lock_holder(run_copy) is None


def test_read_only_commands_work_while_a_train_holds_the_lock(run_copy, tmp_path, capsys):
    """eval, checkpoints and export take no lock and clean nothing up, not even the
    temporary directory of the (pretended) running train's in-flight save."""
    in_flight = run_copy / "checkpoints" / "21.orbax-checkpoint-tmp-1234"
    in_flight.mkdir()
    before = checksums(run_copy / "checkpoints")
    with rundir.WorkdirLock(run_copy, "lenet-dist train"):
        assert main(["eval", "--workdir", str(run_copy), "--devices", "8"]) == 0
        assert main(["checkpoints", "--workdir", str(run_copy)]) == 0
        assert main(["export", "--workdir", str(run_copy), "--out",
                     str(tmp_path / "model" / "1")]) == 0
    assert checksums(run_copy / "checkpoints") == before and in_flight.is_dir()
    assert "step 20" in capsys.readouterr().out
    assert (tmp_path / "model" / "1" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_two_trains_at_once_one_refused_the_other_finishes(data_dir, tmp_path):
    """Real processes: the second train exits 1 in about a second with the holder's
    PID; the first finishes and lists each epoch once."""
    args = [sys.executable, "-m", "lenet_dist", "train", "--devices", "2", "--epochs", "3",
            "--train-limit", "1280", "--batch-size", "64", "--save-every-steps", "2",
            "--data-dir", data_dir, "--workdir", str(tmp_path), "--no-progress"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while rundir.lock_holder(tmp_path) is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 1, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"(PID {first.pid} on" in lines[0] and "in use by" in lines[0]
    assert first.returncode == 0, err
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").open()]
    assert epochs == [1, 2, 3]


# ------------------------------------------------------------------ planted links


def test_symlinked_metrics_file_is_refused_and_its_target_untouched(dataset, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").symlink_to(target)
    with pytest.raises(UserError, match="metrics.jsonl is a symlink"):
        train(small(work, epochs=1), dataset=dataset, **QUIET)
    assert target.read_text() == "keep me"


def test_planted_temporary_links_are_never_written_through(dataset, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    work = tmp_path / "run"
    work.mkdir()
    for name in ("metrics.jsonl.tmp", ".metrics.jsonl.tmp", "metrics.jsonl.tmp.0"):
        (work / name).symlink_to(target)
    train(small(work, epochs=1), dataset=dataset, **QUIET)
    assert target.read_text() == "keep me"
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("name", ["checkpoints", "lock"])
def test_symlinked_checkpoints_or_lock_is_refused(dataset, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    work = tmp_path / "run"
    work.mkdir()
    (work / name).symlink_to(elsewhere)
    with pytest.raises(UserError, match=f"{name} is a symlink"):
        train(small(work, epochs=1), dataset=dataset, **QUIET)
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------------------ incompatible != corrupt


@pytest.mark.parametrize("allow", [False, True])
def test_other_optimizer_is_incompatible_not_corrupt(run_copy, dataset, allow):
    before = checksums(run_copy)
    match = "another state layout" if allow else r"holds a different run \(optimizer"
    with pytest.raises(UserError, match=match):
        train(small(run_copy, optimizer="adam", learning_rate=0.003), dataset=dataset,
              allow_config_change=allow, **QUIET)
    assert not (run_copy / "corrupt-checkpoints").exists()
    after = checksums(run_copy)
    assert {k: v for k, v in after.items() if k != "lock"} == \
        {k: v for k, v in before.items() if k != "lock"}


# ------------------------------------------------------------------ one bad file


@pytest.mark.parametrize("content", [b"", b"{garbled", b"[]", b'{"test_accuracy": "x"}'])
def test_bad_metrics_file_in_an_older_checkpoint(run_copy, dataset, reference, content):
    (run_copy / "checkpoints" / "10" / "metrics" / "metrics").write_bytes(content)
    rows = {r["step"]: r for r in list_checkpoints(str(run_copy))}
    assert rows[10]["note"] and rows[10]["test_accuracy"] is not None  # from history
    assert evaluate_checkpoint(str(run_copy), devices=8)["step"] == 20
    assert evaluate_checkpoint(str(run_copy), step=10, devices=8)["step"] == 10
    logs = []
    result = train(small(run_copy, epochs=3, keep_checkpoints=20), dataset=dataset,
                   log=logs.append)
    assert any("checkpoint step 10: metrics" in line and "rewritten from its history" in line
               for line in logs), logs
    assert len(result.history) == 3
    repaired = json.loads((run_copy / "checkpoints" / "10" / "metrics" / "metrics").read_text())
    assert repaired["test_accuracy"] == reference[1].history[0]["test_accuracy"]


@pytest.mark.parametrize("content", [b"", b"{garbled", b"{}", b'{"config": {}}'])
def test_bad_metadata_in_the_latest_checkpoint(run_copy, dataset, reference, content, capsys):
    (run_copy / "checkpoints" / "20" / "meta" / "metadata").write_bytes(content)
    rows = {r["step"]: r for r in list_checkpoints(str(run_copy))}
    assert rows[20]["unreadable"] and not rows[20]["best"]
    # Read-only commands name it and use the previous good one; nothing is moved.
    assert restore_checkpoint(str(run_copy), Shardings(make_mesh(8))).step == 18
    assert "checkpoint step 20 is unreadable" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(run_copy), "--step", "20"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "previous good one is step 18 (--step 18)" in err[0], err
    assert (run_copy / "checkpoints" / "20").is_dir()
    # train (the writer) moves it aside, never deletes it, and resumes from 18.
    logs = []
    resumed = train(small(run_copy, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
                    log=logs.append)
    assert any("resuming from checkpoint at step 18" in line for line in logs)
    assert [p.name.split("-")[0] for p in (run_copy / "corrupt-checkpoints").iterdir()] == ["20"]
    assert_same_params(resumed.state.params, reference[1].state.params, atol=1e-6)


def test_listing_marks_bad_checkpoints(run_copy, capsys):
    (run_copy / "checkpoints" / "20" / "state" / "_METADATA").unlink()
    assert main(["checkpoints", "--workdir", str(run_copy)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["20"])
    assert "UNREADABLE" in line and "best" not in line


def test_every_checkpoint_bad_read_only_says_so(run_copy, capsys):
    for d in (run_copy / "checkpoints").iterdir():
        if d.name.isdigit():
            (d / "meta" / "metadata").write_bytes(b"\0")
    assert main(["eval", "--workdir", str(run_copy)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "no readable checkpoint" in err[-1] and "Traceback" not in "".join(err)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda cut, junk: VALID_META[:cut] + junk,
                           st.integers(0, 400), st.binary(max_size=8))))
def test_metadata_reader_only_raises_its_own_error(raw):
    try:
        step_files.parse_meta(raw, 20)
    except step_files.CorruptCheckpoint:
        pass


VALID_META = json.dumps({"config": {k: 1 for k in ckpt_lib.COMPATIBLE_FIELDS}, "step": 20,
                         "epoch": 2.0, "steps_per_epoch": 10,
                         "history": [{"epoch": 1, "step": 10, "test_accuracy": 0.5}]}).encode()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(VALID_META) - 1), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_mutated_metadata_is_parsed_or_refused(flips):
    raw = bytearray(VALID_META)
    for at, value in flips:
        raw[at] = value
    try:
        meta = step_files.parse_meta(bytes(raw), 20)
    except step_files.CorruptCheckpoint:
        return
    assert meta["step"] == 20 and isinstance(meta["history"], list)


# ------------------------------------------------------------------ saving


def test_checkpoints_path_that_is_a_file_fails_before_training(dataset, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "checkpoints").write_text("not a directory")
    with pytest.raises(UserError, match="is not a directory"):
        train(small(work, epochs=1), dataset=dataset, **QUIET)
    assert (work / "checkpoints").read_text() == "not a directory"
    assert not (work / "metrics.jsonl").exists()


def test_unwritable_checkpoints_fail_before_the_first_step(dataset, tmp_path, monkeypatch):
    """Any failure of the probe save (here: the disk is full) stops the run before an
    epoch is spent; the existing checkpoints and metrics stay as they were."""
    calls = []
    real = train_mod.Trainer.train_steps
    monkeypatch.setattr(train_mod.Trainer, "train_steps",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import orbax.checkpoint as ocp
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(Failure, match="cannot write checkpoints in .*No space left on device"):
        train(small(tmp_path, epochs=1), dataset=dataset, **QUIET)
    assert calls == []


@pytest.mark.slow
def test_full_disk_fails_before_training_in_one_line(data_dir, tmp_path):
    """A real full file system (a 64 KiB tmpfs; needs root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = subprocess.run([sys.executable, "-m", "lenet_dist", "train", "--devices", "2",
                               "--epochs", "1", "--train-limit", "256", "--data-dir", data_dir,
                               "--workdir", str(mnt / "run"), "--no-progress"],
                              capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot write checkpoints" in err[0], proc.stderr
    assert "epoch 1/1" not in proc.stdout


# ------------------------------------------------------------------ divergence


def test_divergence_stops_at_its_step_and_never_saves_nan(dataset, tmp_path, monkeypatch):
    """NaN parameters going into step 7: the run stops naming step 7; step 6 (saved
    every 3 steps) stays the latest checkpoint."""
    real = train_mod.build_steps

    def poisoned_steps(*args):
        steps = real(*args)

        def step(state, sums, xs, ys, i):
            if int(state.step) == 6:
                state = dataclasses.replace(
                    state, params=jax.tree.map(lambda x: x * jnp.nan, state.params))
            return steps.train(state, sums, xs, ys, i)

        return dataclasses.replace(steps, train=step)

    monkeypatch.setattr(train_mod, "build_steps", poisoned_steps)
    with pytest.raises(Failure, match=r"diverged at step 7 \(epoch 1\).*last good checkpoint, "
                                      r"step 6, stays the latest"):
        train(small(tmp_path, save_every_steps=3), dataset=dataset, **QUIET)
    ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=True)
    assert ckpts.steps() == [3, 6]


# ------------------------------------------------------------------ metrics.jsonl


def test_fresh_start_keeps_a_previous_runs_metrics_aside(dataset, tmp_path):
    old = '{"epoch": 1, "note": "an older run"}\n'
    (tmp_path / "metrics.jsonl").write_text(old)
    logs = []
    train(small(tmp_path, epochs=1), dataset=dataset, log=logs.append)
    kept = list(tmp_path.glob("metrics-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == old
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "older run" not in lines[0]
    assert any("held another run's metrics" in line for line in logs)


def record(epoch: int, step: int) -> EpochRecord:
    return EpochRecord(epoch=epoch, step=step, train_loss=2.0, train_accuracy=0.1,
                       test_loss=2.0, test_accuracy=0.1, images_per_sec=1.0,
                       train_seconds=1.0, epoch_seconds=1.0, devices=1, batch_size=128,
                       time=0.0)


@pytest.mark.parametrize("resumed_at, history, on_file, aside", [
    (2, [], [(1, 4)], False),  # mid-epoch 1; epoch 1's checkpoint was lost
    (6, [(1, 4)], [(1, 4), (2, 8)], False),  # mid-epoch 2; epoch 2's lost
    (6, [(1, 4)], [(1, 4)], False),
    (2, [], [(1, 4), (1, 4)], False),
    (6, [(1, 4)], [(1, 4), (2, 5)], True),  # a record at or before the step: not ours
    (6, [(1, 4)], [(1, 3)], True),  # another history
    (None, [], [(1, 4)], True),  # a fresh start: whatever is there is another run's
])
def test_a_resumed_runs_own_later_epochs_are_dropped_not_kept_aside(
        tmp_path, resumed_at, history, on_file, aside):
    """Resumed from a checkpoint at `resumed_at`, metrics.jsonl holding the restored
    history and then only epochs past that step is this run's (written before a later
    checkpoint was lost): rewritten to the history, nothing kept aside."""
    from lenet_dist.records import to_lines
    from lenet_dist.rundir import start_metrics

    (tmp_path / "metrics.jsonl").write_text(to_lines([record(*r) for r in on_file]))
    logs = []
    start_metrics(epath.Path(tmp_path), [record(*r) for r in history], logs.append,
                  resumed_at=resumed_at)
    assert bool(list(tmp_path.glob("metrics-*.jsonl"))) == aside, logs
    assert (tmp_path / "metrics.jsonl").read_text() == to_lines([record(*r) for r in history])


def test_a_previous_metrics_file_past_the_readers_limit_is_kept_whole(dataset, tmp_path):
    """Kept aside by a rename, not copied through the 1 GiB reader (which cut 184 MB
    of a 1.2 GB file): the same inode, the same size. Sparse: no disk is used."""
    path = tmp_path / "metrics.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"epoch": 1, "note": "a long run"}\n')
        f.truncate(2**30 + 200 * 2**20)
    before = os.stat(path)
    train(small(tmp_path, epochs=1), dataset=dataset, **QUIET)
    (kept,) = tmp_path.glob("metrics-*.jsonl")
    after = os.stat(kept)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert len(path.read_text().splitlines()) == 1


def test_keeping_aside_never_replaces_an_earlier_kept_file(tmp_path, monkeypatch):
    monkeypatch.setattr(safefs.time, "strftime", lambda *_: "20261203T000000")
    kept = []
    for text in ("first", "second", "third"):
        (tmp_path / "metrics.jsonl").write_text(text)
        kept.append(safefs.keep_aside(epath.Path(tmp_path / "metrics.jsonl")))
    assert [Path(k).name for k in kept] == [
        "metrics-20261203T000000.jsonl", "metrics-20261203T000000-1.jsonl",
        "metrics-20261203T000000-2.jsonl"]
    assert [Path(k).read_text() for k in kept] == ["first", "second", "third"]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_no_checkpoint_on_a_workdir_holding_a_run_is_refused(run_copy, dataset):
    before = checksums(run_copy)
    with pytest.raises(UserError, match="holds checkpoints of a run; --no-checkpoint"):
        train(small(run_copy, checkpoint=False), dataset=dataset, **QUIET)
    after = checksums(run_copy)
    assert {k: v for k, v in after.items() if k != "lock"} == \
        {k: v for k, v in before.items() if k != "lock"}


def test_same_seed_same_metrics_apart_from_timings(reference, dataset, tmp_path):
    train(small(tmp_path, save_every_steps=3, keep_checkpoints=20), dataset=dataset, **QUIET)
    timing = {"images_per_sec", "train_seconds", "eval_seconds", "epoch_seconds", "time",
              "first_step_seconds", "first_step_time"}

    def records(work):
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (work / "metrics.jsonl").read_text().splitlines()]

    assert records(tmp_path) == records(reference[0]) and len(records(tmp_path)) == 2
