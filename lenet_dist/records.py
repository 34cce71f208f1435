"""One epoch's figures as one typed record: what metrics.jsonl holds a line of, what a
checkpoint's metadata keeps in its history, what TensorBoard, the report and bench read.

Written and read through `EpochRecord` alone, so no reader re-spells the keys. The JSON
keys are the field names; an optional field that is None is left out of the JSON, as
the files have always done (validation figures only with a validation split, the first
step only on the first epoch a process trains). No JAX here: bench and report use it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

# The figures of an epoch that a checkpoint's metrics file holds (Orbax's "best" reads them).
EPOCH_METRICS = ("test_accuracy", "test_loss", "validation_accuracy", "validation_loss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpochRecord:
    """One epoch, in the order its JSON keys are written (a resumed run compares its
    restored history with metrics.jsonl byte for byte)."""

    epoch: int
    step: int  # the global step at the epoch's end
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    validation_loss: float | None = None  # with --validation N only
    validation_accuracy: float | None = None
    images_per_sec: float  # training images/s over the steps this process ran
    train_seconds: float
    eval_seconds: float | None = None  # None: written before it was measured
    epoch_seconds: float
    devices: int
    processes: int | None = None  # None: written before multi-process jobs
    batch_size: int
    time: float  # time.time() at the epoch's end
    eval_images: int | None = None  # images evaluated in eval_seconds (test + validation)
    first_step_seconds: float | None = None  # first epoch of a (re)started run only
    first_step_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of metrics.jsonl and of checkpoint metadata."""
        return {f.name: value for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) is not None or not _optional(f)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EpochRecord:
        """From a JSON object of any version: unknown keys are ignored, a missing
        optional field is None; a missing required one is a ValueError naming it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an epoch record is a JSON object, got {type(data).__name__}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if not _optional(f) and f.name not in data]
        if missing:
            raise ValueError(f"epoch record lacks {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def line(self) -> str:
        """One line of metrics.jsonl."""
        return json.dumps(self.to_json()) + "\n"

    def metrics(self) -> dict[str, float]:
        """The figures a checkpoint's metrics file holds (EPOCH_METRICS that are set)."""
        return {k: v for k in EPOCH_METRICS if (v := getattr(self, k)) is not None}

    @property
    def has_validation(self) -> bool:
        return self.validation_accuracy is not None


def _optional(f: dataclasses.Field) -> bool:
    return f.default is None


FIELDS = tuple(f.name for f in dataclasses.fields(EpochRecord))


def as_record(row: EpochRecord | Mapping[str, Any]) -> EpochRecord:
    return row if isinstance(row, EpochRecord) else EpochRecord.from_json(row)


def field(row: EpochRecord | Mapping[str, Any], name: str) -> Any:
    """One figure of a record or of a JSON object (None when absent): for readers of
    hand-written or partial histories, which need not be whole records."""
    if name not in FIELDS:
        raise KeyError(f"{name!r} is not an EpochRecord field")
    return getattr(row, name) if isinstance(row, EpochRecord) else row.get(name)


def to_lines(records: Sequence[EpochRecord]) -> str:
    """metrics.jsonl's text for `records`."""
    return "".join(r.line() for r in records)


def from_lines(text: str) -> list[EpochRecord]:
    """metrics.jsonl's records; a ValueError names the line that is not one."""
    rows = []
    for n, text_line in enumerate(text.splitlines(), 1):
        if text_line.strip():
            try:
                rows.append(EpochRecord.from_json(json.loads(text_line)))
            except ValueError as e:  # json's errors are ValueErrors too
                raise ValueError(f"line {n}: {e}") from None
    return rows


def format_epoch(record: EpochRecord, epochs: int) -> str:
    """The line train prints at each epoch's end (the README shows it)."""
    r = record
    validation = (f"val loss {r.validation_loss:.4f} acc {r.validation_accuracy:.4f}  "
                  if r.has_validation else "")
    return (f"epoch {r.epoch:>{len(str(epochs))}}/{epochs}  "
            f"train loss {r.train_loss:.4f} acc {r.train_accuracy:.4f}  "
            f"{validation}"
            f"test loss {r.test_loss:.4f} acc {r.test_accuracy:.4f}  "
            f"{r.images_per_sec:,.0f} img/s  {r.epoch_seconds:.1f} s")
