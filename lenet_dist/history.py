"""A run's history (its epoch records, as metrics.jsonl and checkpoint metadata hold them):
which epoch is the best, on which split it was chosen, and where early stopping ends it."""

from __future__ import annotations


def chosen_on(history: list[dict]) -> str:
    """"validation" when the run held out a validation split, else "test"."""
    return "validation" if history and "validation_accuracy" in history[0] else "test"


def best_epoch(history: list[dict]) -> dict | None:
    """The epoch record "best" means: the highest validation accuracy when the run has a
    validation split, else the highest test accuracy (the first of equals)."""
    key = f"{chosen_on(history)}_accuracy"
    return max(history, key=lambda r: r[key], default=None)


def describe_best(history: list[dict]) -> str:
    """One line on the best epoch and the split it was chosen on."""
    best = best_epoch(history)
    if best is None:
        return "no epoch evaluated yet"
    if "validation_accuracy" in best:
        return (f"best: epoch {best['epoch']}, validation accuracy "
                f"{best['validation_accuracy']:.4f} (test accuracy there "
                f"{best['test_accuracy']:.4f}, not used to choose)")
    return (f"best: epoch {best['epoch']}, test accuracy {best['test_accuracy']:.4f}, "
            "selected on the test set (hold out --validation N to choose honestly)")


def stopped_early(history: list[dict], patience: int) -> int | None:
    """The epoch at which `--early-stop patience` ends the run: `patience` epochs after the
    best validation accuracy without a better one; None while it goes on."""
    best = best_epoch(history)
    if not patience or best is None or "validation_accuracy" not in best:
        return None
    return history[-1]["epoch"] if history[-1]["epoch"] - best["epoch"] >= patience else None
