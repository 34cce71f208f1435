"""A run's history (its epoch records, as metrics.jsonl and checkpoint metadata hold them):
which epoch is the best, on which split it was chosen, and where early stopping ends it.

Each function takes `EpochRecord`s or their JSON objects (checkpoint metadata, a
hand-written history) alike, and `best_epoch` hands back the item it was given."""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

from lenet_dist.records import EpochRecord, field

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
