"""The goodput ledger (lenet_dist/ledger.py): an attempt's phases, counted on the
watchdog's marks, sum to its wall time; work a later attempt redid is "lost"; a real
run keeps <workdir>/ledger.json, one attempt per start."""

from __future__ import annotations

import json
import time

import pytest

from lenet_dist import ledger, rundir, watchdog
from tests.conftest import copy_run_until, small


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def attempt(first, last, training, **seconds) -> dict:
    return {"wall_seconds": training + sum(seconds.values()),
            "seconds": {"training": training, **seconds}, "steps": {"from": first, "to": last}}


def test_phases_sum_to_the_wall_time_start_up_first_unknown_phases_as_other():
    clock = FakeClock()
    book = ledger.Ledger(started=90.0, wall_started=1_000.0, clock=clock, wall=lambda: 0.0)
    for phase, step, seconds in [("loading data", None, 2.0), ("restoring", None, 1.0),
                                 ("compiling", 1, 3.0), ("training", 2, 0.5),
                                 ("training", 3, 0.5), ("a phase of its own", None, 0.25),
                                 ("evaluating", None, 4.0), ("saving", 3, 1.5),
                                 ("finishing", None, 0.0)]:
        book.mark(phase, step)
        clock.tick(seconds)
    book.trains_from(0)
    entry = book.attempt("done")
    s = entry["seconds"]
    assert s["start-up"] == 10.0  # process start (90) to the first mark (100)
    assert (s["loading data"], s["restoring"], s["compiling"], s["training"]) == (2, 1, 3, 1)
    assert (s["evaluating"], s["saving"], s["other"], s["lost"]) == (4.0, 1.5, 0.25, 0.0)
    assert entry["wall_seconds"] == 22.75 == pytest.approx(sum(s.values()))
    assert entry["steps"] == {"from": 0, "to": 3}  # a save's step is not a step trained
    assert (entry["started"], entry["outcome"]) == (1_000.0, "done")
    clock.tick(5.0)  # time after a snapshot goes to the phase still open
    later = book.attempt()
    assert later["seconds"]["finishing"] == 5.0 and later["wall_seconds"] == 27.75


def test_lost_work_is_the_share_of_training_a_later_attempt_redid():
    first = attempt(0, 20, 10.0, compiling=2.0)  # trained 0..20, preempted
    second = attempt(12, 30, 9.0)  # resumed from the checkpoint at 12
    out = ledger.with_lost([first, second])
    assert out[0]["seconds"]["lost"] == pytest.approx(10.0 * 8 / 20)  # steps 12..20
    assert out[0]["seconds"]["training"] == pytest.approx(6.0)
    assert out[0]["lost_steps"] == [12, 20]
    assert sum(out[0]["seconds"].values()) == pytest.approx(first["wall_seconds"])
    assert out[1]["seconds"]["lost"] == 0 and "lost_steps" not in out[1]
    assert ledger.with_lost(out) == out  # recomputed from training + lost: idempotent
    assert first["seconds"] == {"training": 10.0, "compiling": 2.0}  # inputs not changed


def test_a_restart_from_scratch_loses_all_earlier_training_a_clean_resume_none():
    crashed = attempt(0, 8, 4.0)  # no checkpoint before the crash
    again = ledger.with_lost([crashed, attempt(0, 20, 10.0)])
    assert again[0]["seconds"]["lost"] == 4.0 and again[0]["seconds"]["training"] == 0.0
    resumed = ledger.with_lost([attempt(0, 10, 5.0), attempt(10, 20, 5.0)])
    assert [a["seconds"]["lost"] for a in resumed] == [0.0, 0.0]
    # The lowest later start counts: the third attempt went back to step 4.
    three = ledger.with_lost([attempt(0, 10, 5.0), attempt(10, 16, 3.0), attempt(4, 20, 8.0)])
    assert [a["seconds"]["lost"] for a in three] == [3.0, 3.0, 0.0]
    failed_early = ledger.with_lost([attempt(None, None, 0.0, **{"start-up": 2.0}),
                                     attempt(0, 5, 1.0)])
    assert failed_early[0]["seconds"]["lost"] == 0.0


def test_the_watchdogs_marks_feed_this_processs_ledger(monkeypatch):
    monkeypatch.setattr(ledger, "_CURRENT", ledger.Ledger())  # not this process's own
    book = ledger.current()
    watchdog.mark("compiling", 7)
    assert book.phase == "compiling" and book.steps_to is not None and book.steps_to >= 7
    watchdog.Watch(timeout=0).mark("training", 8)  # a watch alone does not feed it
    assert book.phase == "compiling"


def test_summary_line_names_every_phase_and_the_wall():
    line = ledger.summary(attempt(0, 20, 60.34, **{"start-up": 4.0, "compiling": 2.1,
                                                   "evaluating": 8.0, "saving": 1.2,
                                                   "other": 0.3}) | {"wall_seconds": 75.94},
                          "by attempt in ledger.json")
    assert line == ("time: start-up 4.0 s, data 0.0 s, restore 0.0 s, compile 2.1 s, "
                    "train 60.3 s, eval 8.0 s, save 1.2 s, finish 0.0 s, other 0.3 s "
                    "(of 75.9 s since the process started; by attempt in ledger.json)")


def test_process_start_is_read_from_proc():
    age = ledger.process_age()
    assert age is not None and 0 <= age < time.monotonic()


def test_an_unreadable_ledger_is_noted_and_replaced(tmp_path):
    notes = []
    (tmp_path / rundir.LEDGER_FILE).write_text('[{"seconds": "many"}]')
    assert rundir.read_ledger(rundir.workdir_path(tmp_path), notes.append) == []
    assert "is not a ledger" in notes[0]
    rundir.write_ledger(rundir.workdir_path(tmp_path), [attempt(0, 1, 1.0)])
    assert rundir.read_ledger(rundir.workdir_path(tmp_path), notes.append) == [
        attempt(0, 1, 1.0)]


def read(work) -> list[dict]:
    return json.loads((work / rundir.LEDGER_FILE).read_text())


def check_sums(entry: dict) -> None:
    total = sum(entry["seconds"].values())
    assert total == pytest.approx(entry["wall_seconds"], rel=0.02), entry
    assert entry["seconds"]["other"] <= 0.02 * entry["wall_seconds"], entry


def test_a_run_keeps_one_attempt_a_resumed_copy_adds_one(reference, dataset, tmp_path):
    """The shared `reference` run (20 steps, saved every 3), then a copy of it cut at
    the checkpoint of step 12, resumed: the first attempt's steps 12..20 were lost.
    (Other tests rerun the shared run, each adding an attempt: its first is the one
    that trained it, and the copy keeps that one alone.)"""
    from lenet_dist.training import train

    ref_work, _ = reference
    first = read(ref_work)[0]
    check_sums(first)
    assert first["outcome"] == "done" and first["steps"] == {"from": 0, "to": 20}
    for phase in ("loading data", "restoring", "compiling", "training", "evaluating",
                  "saving"):
        assert first["seconds"][phase] > 0, phase
    assert first["seconds"]["lost"] == 0

    work = copy_run_until(ref_work, tmp_path / "run", 13)  # the last checkpoint: 12
    (work / rundir.LEDGER_FILE).write_text(json.dumps([first]))
    logs = []
    t0 = time.monotonic()
    train(small(work, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
          log=logs.append)
    took = time.monotonic() - t0
    before, after = read(work)
    check_sums(before)
    check_sums(after)
    assert after["outcome"] == "done" and after["steps"] == {"from": 12, "to": 20}
    # From the call (not the first here), to its last write, just before train() returns.
    assert after["wall_seconds"] == pytest.approx(took, abs=max(0.5, 0.05 * took))
    assert before["lost_steps"] == [12, 20]
    trained = first["seconds"]["training"]
    assert before["seconds"]["lost"] == pytest.approx(trained * 8 / 20, abs=0.002)
    assert before["seconds"]["training"] == pytest.approx(trained - before["seconds"]["lost"],
                                                          abs=0.002)
    time_line = [line for line in logs if line.startswith("time: ")]
    assert len(time_line) == 1 and logs.index(time_line[0]) == next(
        i for i, line in enumerate(logs) if line.startswith("done in ")) + 1
