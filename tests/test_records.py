"""records: one typed epoch record, the same JSON keys on disk as ever, read back from
files of older versions; rundir's metrics.jsonl and the history functions through it."""

import dataclasses
import json

import pytest

from lenet_dist import rundir
from lenet_dist.records import best_epoch, chosen_on, describe_best, stopped_early
from lenet_dist.records import (EPOCH_METRICS, EpochRecord, as_record, field, from_lines,
                                to_lines)

# A line of metrics.jsonl as train has written it (validation split, first epoch).
LINE = {"epoch": 1, "step": 469, "train_loss": 2.3, "train_accuracy": 0.1,
        "test_loss": 2.2, "test_accuracy": 0.2, "validation_loss": 2.25,
        "validation_accuracy": 0.19, "images_per_sec": 9000.5, "train_seconds": 6.6,
        "eval_seconds": 0.7, "epoch_seconds": 7.4, "devices": 8, "processes": 1,
        "batch_size": 128, "time": 1.7e9, "first_step_seconds": 1.2,
        "first_step_time": 1.7e9 - 6}


def test_round_trip_keeps_the_keys_and_their_order():
    record = EpochRecord.from_json(LINE)
    assert record.to_json() == LINE and list(record.to_json()) == list(LINE)
    assert json.loads(record.line()) == LINE
    assert record.line() == json.dumps(LINE) + "\n"  # byte for byte: resume compares them


def test_optional_fields_are_left_out_when_unset():
    later = {k: v for k, v in LINE.items() if not k.startswith(("validation", "first_step"))}
    record = EpochRecord.from_json(later)
    assert record.validation_accuracy is None and record.first_step_seconds is None
    assert not record.has_validation and record.to_json() == later


def test_older_files_read_unknown_keys_ignored_missing_optional_none():
    """Written before eval_seconds and processes existed, with a key since dropped."""
    old = {k: v for k, v in LINE.items() if k not in ("eval_seconds", "processes")}
    record = EpochRecord.from_json({**old, "lr": 0.1})
    assert record.eval_seconds is None and record.processes is None
    assert record.to_json() == old


def test_a_missing_required_field_is_named():
    with pytest.raises(ValueError, match="lacks test_accuracy"):
        EpochRecord.from_json({k: v for k, v in LINE.items() if k != "test_accuracy"})
    with pytest.raises(ValueError, match="is a JSON object"):
        EpochRecord.from_json([1, 2])


def test_frozen_and_typed():
    record = EpochRecord.from_json(LINE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.epoch = 2
    with pytest.raises(TypeError):
        EpochRecord(1, 2)  # keywords only: the fields are many and alike


def test_metrics_are_what_a_checkpoint_holds():
    record = EpochRecord.from_json(LINE)
    assert record.metrics() == {k: LINE[k] for k in EPOCH_METRICS}
    no_validation = dataclasses.replace(record, validation_loss=None,
                                        validation_accuracy=None)
    assert no_validation.metrics() == {"test_accuracy": 0.2, "test_loss": 2.2}


def test_field_reads_records_and_partial_json_alike():
    assert field(EpochRecord.from_json(LINE), "test_accuracy") == 0.2
    assert field({"epoch": 1}, "test_accuracy") is None
    assert as_record(LINE) == EpochRecord.from_json(LINE)


def test_metrics_file_round_trip_through_rundir(tmp_path):
    from etils import epath

    records = [EpochRecord.from_json({**LINE, "epoch": e, "step": 469 * e})
               for e in (1, 2)]
    rundir.write_metrics(epath.Path(tmp_path), records)
    text = (tmp_path / rundir.METRICS_FILE).read_text()
    assert text == "".join(json.dumps(r.to_json()) + "\n" for r in records)
    assert rundir.read_metrics(tmp_path / rundir.METRICS_FILE) == records
    assert from_lines(to_lines(records) + "\n") == records
    with pytest.raises(ValueError, match="line 2"):
        from_lines(json.dumps(LINE) + "\n{not json\n")


def test_history_takes_records_and_json_objects_alike():
    rows = [{**LINE, "epoch": e, "step": e, "validation_accuracy": acc}
            for e, acc in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.65))]
    records = [EpochRecord.from_json(r) for r in rows]
    assert best_epoch(rows) is rows[1] and best_epoch(records) is records[1]
    assert chosen_on(rows) == chosen_on(records) == "validation"
    assert describe_best(rows) == describe_best(records)
    assert stopped_early(rows, 2) == stopped_early(records, 2) == 4
    assert stopped_early(records, 3) is None
