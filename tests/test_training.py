"""training.py stays a loop a newcomer can follow: the loop a table of contents of named
phases (no function over 60 lines anywhere: tests/test_rooms.py); the record's line is
the one train prints."""

import ast
from pathlib import Path

import lenet_dist.training as training
from lenet_dist.records import EpochRecord, format_epoch

PHASES = ("restore_or_init", "train_epoch", "evaluate", "record", "save", "should_stop")


def test_the_loop_names_each_phase():
    """Trainer.run calls every phase by name, and is itself short."""
    tree = ast.parse(Path(training.__file__).read_text())
    run = next(node for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef) and node.name == "run")
    called = {n.func.attr for n in ast.walk(run)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert set(PHASES) <= called, set(PHASES) - called
    assert run.end_lineno - run.lineno + 1 <= 30


def test_the_run_directory_names_stay_importable_from_training():
    """cli, api and the tests import these from training (rundir holds them now)."""
    from lenet_dist import rundir

    for name in ("METRICS_FILE", "TB_DIR", "prepare_workdir", "lock_workdir",
                 "start_metrics", "write_metrics"):
        assert getattr(training, name) is getattr(rundir, name)


def test_format_epoch_is_the_line_train_prints():
    record = EpochRecord(epoch=3, step=1407, train_loss=0.51234, train_accuracy=0.81,
                         test_loss=0.55, test_accuracy=0.7216, images_per_sec=12345.6,
                         train_seconds=4.0, epoch_seconds=5.04, devices=8, batch_size=128,
                         time=1.7e9)
    assert format_epoch(record, 10) == (
        "epoch  3/10  train loss 0.5123 acc 0.8100  test loss 0.5500 acc 0.7216  "
        "12,346 img/s  5.0 s")
    with_validation = EpochRecord(**{**record.to_json(), "validation_loss": 0.6,
                                     "validation_accuracy": 0.7})
    assert "  val loss 0.6000 acc 0.7000  test loss" in format_epoch(with_validation, 10)
