"""One epoch's figures as one typed record: what metrics.jsonl holds a line of, what a
checkpoint's metadata keeps in its history, what TensorBoard, the report and bench read.

Written and read through `EpochRecord` alone, so no reader re-spells the keys. The JSON
keys are the field names; an optional field that is None is left out of the JSON, as
the files have always done (validation figures only with a validation split, the first
step only on the first epoch a process trains). No JAX here: bench and report use it.

A run's history is its records (or their JSON objects: checkpoint metadata, a
hand-written history, alike): which epoch is the best, on which split it was chosen,
and where early stopping ends it are read from it here too; `best_epoch` hands back the
item it was given.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence, TypeVar

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


# ------------------------------------------------------------------ a run's history

Row = TypeVar("Row", EpochRecord, Mapping[str, Any])


def chosen_on(history: Sequence[EpochRecord | Mapping[str, Any]]) -> str:
    """"validation" when the newest epoch was evaluated on a held-out validation split,
    else "test". The newest decides: a resume may change --validation, and epochs
    scored on different splits are not compared."""
    return ("validation" if history and field(history[-1], "validation_accuracy") is not None
            else "test")


def ranked(history: Sequence[Row], position: str = "epoch") -> list[Row]:
    """The one meaning of "best", for records, metrics.jsonl rows and checkpoint metrics
    alike: the rows scored on the split `chosen_on` names, highest accuracy first, the
    first of equals (smallest `position`: epoch, or step) before the later ones."""
    key = f"{chosen_on(sorted(history, key=lambda r: field(r, position)))}_accuracy"
    scored = [r for r in history if field(r, key) is not None]
    return sorted(scored, key=lambda r: (-field(r, key), field(r, position)))


def best_epoch(history: Sequence[Row]) -> Row | None:
    """The epoch record "best" means (`ranked`'s first), None before any evaluation."""
    return next(iter(ranked(history)), None)


def describe_best(history: Sequence[EpochRecord | Mapping[str, Any]]) -> str:
    """One line on the best epoch and the split it was chosen on."""
    best = best_epoch(history)
    if best is None:
        return "no epoch evaluated yet"
    epoch, test = field(best, "epoch"), field(best, "test_accuracy")
    validation = field(best, "validation_accuracy")
    if validation is not None:
        return (f"best: epoch {epoch}, validation accuracy {validation:.4f} (test accuracy "
                f"there {test:.4f}, not used to choose)")
    return (f"best: epoch {epoch}, test accuracy {test:.4f}, "
            "selected on the test set (hold out --validation N to choose honestly)")


def stopped_early(history: Sequence[EpochRecord | Mapping[str, Any]],
                  patience: int) -> int | None:
    """The epoch at which `--early-stop patience` ends the run: `patience` epochs after the
    best validation accuracy without a better one; None while it goes on."""
    best = best_epoch(history)
    if not patience or best is None or field(best, "validation_accuracy") is None:
        return None
    last = field(history[-1], "epoch")
    return last if last - field(best, "epoch") >= patience else None


def near_chance(accuracy: float, classes: int) -> bool:
    """Whether `accuracy` is within a tenth of the way from guessing (1/classes) to
    perfect: a run that has not learned (the d2l recipe on a few thousand images stays
    there for all 10 epochs), which deserves a word rather than a silent number."""
    chance = 1 / max(classes, 1)
    return accuracy < chance + 0.1 * (1 - chance)
