"""What is on disk under <workdir>/checkpoints, read without trusting it: a step
directory's name, metadata, state index and metrics inspected before Orbax opens the
directory (Orbax reads every metrics file when it opens, and one bad file would stop
the whole workdir). A step whose metadata or state index is unreadable is *bad*; a
name the project did not write is never a step. checkpoint.py decides what to do
about it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import orbax.checkpoint as ocp
from etils import epath

from lenet_dist import safefs
from lenet_dist.config import REQUIRED_FIELDS, upgraded
from lenet_dist.errors import first_line
from lenet_dist.records import EPOCH_METRICS
from lenet_dist.rundir import CHECKPOINT_DIR, PROBE_DIR

# Every checkpoint's metrics hold the test accuracy; a run with a validation split holds
# its accuracy too, and then "best" means best on it: the test set is only reported.
BEST_METRIC = "test_accuracy"
VALIDATION_METRIC = "validation_accuracy"
META_FILE = ("meta", "metadata")  # Orbax's JsonSave item "meta"
METRICS_FILE = ("metrics", "metrics")
STATE_INDEX = ("state", "_METADATA")
MAX_JSON_BYTES = 16 * 2**20  # metadata holds the history: a few KB per epoch


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be what we wrote; the message says which and why."""


def parse_json(raw: bytes, what: str) -> dict:
    if len(raw) > MAX_JSON_BYTES:
        raise CorruptCheckpoint(f"{what} is over {MAX_JSON_BYTES >> 20} MiB")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpoint(f"{what} is not JSON ({first_line(e, 80)})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpoint(f"{what} is not a JSON object")
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_meta(raw: bytes, step: int | None = None) -> dict:
    """Checkpoint metadata, with every key the readers use present and typed."""
    meta = parse_json(raw, "metadata")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CorruptCheckpoint("metadata has no config")
    config = meta["config"] = upgraded(config)  # older versions' field names
    missing = [k for k in REQUIRED_FIELDS if k not in config]
    if missing:
        raise CorruptCheckpoint(f"metadata config lacks {', '.join(missing)}")
    if not _is_int(meta.get("step")) or (step is not None and meta["step"] != step):
        raise CorruptCheckpoint(f"metadata step {meta.get('step')!r} is not {step}")
    if not _is_int(meta.get("steps_per_epoch")) or meta["steps_per_epoch"] < 1:
        raise CorruptCheckpoint("metadata has no valid steps_per_epoch")
    history = meta.get("history")
    if not isinstance(history, list) or not all(
            isinstance(r, dict) and _is_int(r.get("epoch")) and _is_int(r.get("step"))
            for r in history):
        raise CorruptCheckpoint("metadata history is not a list of epoch records")
    if not isinstance(meta.get("epoch", 0), (int, float)):
        raise CorruptCheckpoint("metadata epoch is not a number")
    return meta


def parse_metrics(raw: bytes) -> dict:
    metrics = parse_json(raw, "metrics")
    for name in (BEST_METRIC, VALIDATION_METRIC):
        value = metrics.get(name)
        if (name == BEST_METRIC or value is not None) and (
                not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value)):
            raise CorruptCheckpoint(f"metrics have no finite {name}")
    return metrics


@dataclasses.dataclass
class StepInfo:
    """What inspecting one step directory found. `problem` None means it looks sound
    (a restore may still find torn array data); `metrics_problem` alone does not make
    a checkpoint bad: its state is fine and the history holds the same figures."""

    step: int
    problem: str | None = None
    meta: dict | None = None
    metrics: dict | None = None
    metrics_problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _read(path: epath.Path) -> bytes:
    return safefs.read_file(path, MAX_JSON_BYTES, follow=False)


def inspect_step(directory: epath.Path, step: int) -> StepInfo:
    info = StepInfo(step)
    root = directory / str(step)
    try:
        info.meta = parse_meta(_read(root.joinpath(*META_FILE)), step)
        parse_json(_read(root.joinpath(*STATE_INDEX)), "the state index")
    except FileNotFoundError as e:
        name = os.fspath(e.filename) if e.filename else ""
        # a gs:// error names "bucket/run/checkpoints/N/...": the part after the step
        name = (os.path.relpath(name, root) if safefs.is_local(root)
                else name.rpartition(f"/{CHECKPOINT_DIR}/{step}/")[2]) if name else ""
        info.problem = f"{name or 'a file'} is missing"
    except (CorruptCheckpoint, OSError) as e:
        info.problem = str(e) if isinstance(e, CorruptCheckpoint) else \
            f"cannot read it: {e.strerror or e}"
    metrics_path = root.joinpath(*METRICS_FILE)
    try:
        if metrics_path.exists():
            info.metrics = parse_metrics(_read(metrics_path))
    except (CorruptCheckpoint, OSError) as e:
        info.metrics_problem = str(e) if isinstance(e, CorruptCheckpoint) else \
            f"metrics unreadable: {e.strerror or e}"
        if info.meta is not None:  # the epoch record says the same
            record = next((r for r in info.meta["history"] if r["step"] == step), None)
            if record is not None and isinstance(record.get(BEST_METRIC), (int, float)):
                info.metrics = {k: record[k] for k in EPOCH_METRICS if k in record}
    return info


# A step directory is named as Orbax's standard name format writes it: ASCII digits,
# no leading zero but "0" itself. Orbax reads names with its own regex, whose `\d`
# takes any script's digits ("1٥" would be its step 15), and `str.isdigit` takes "①"
# and "²", which int() refuses: this one pattern decides what a step is, for our scan
# and for Orbax (`StepNames`); anything else is a file the project did not write.
STEP_NAME = re.compile(r"(?:0|[1-9][0-9]*)\Z")
ORBAX_TMP = ".orbax-checkpoint-tmp"  # in the names of Orbax's unfinished saves
OWN_NAMES = (PROBE_DIR, "metadata")  # the write probe; Orbax's root metadata


def step_of(name: str) -> int | None:
    """The step a directory name stands for, or None when it is not a step name."""
    return int(name) if STEP_NAME.match(name) else None


def shown(name: str) -> str:
    """A file name on one line: control characters escaped, other text as it is."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in name)


def foreign_entries(directory: epath.Path) -> list[str]:
    """Names in `directory` that are neither a step directory nor Orbax's or ours."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if not (step_of(p.name) is not None and p.is_dir())
                  and ORBAX_TMP not in p.name and p.name not in OWN_NAMES)


def scan(directory: epath.Path) -> dict[int, StepInfo]:
    """Inspect every finished step directory (Orbax's temporary ones are not steps,
    nor is any name `step_of` refuses)."""
    if not directory.is_dir():
        return {}
    steps = sorted(step for p in directory.iterdir()
                   if (step := step_of(p.name)) is not None and p.is_dir())
    return {s: inspect_step(directory, s) for s in steps}


@dataclasses.dataclass(frozen=True)
class StepNames:
    """Orbax's standard step name format, listing only the names `step_of` accepts: a
    directory the project did not write is never a step to Orbax, so it is never
    restored, counted as the latest, or deleted by the keep-K policy."""

    standard: object = dataclasses.field(default_factory=ocp.step.standard_name_format)
    single_host_load_and_broadcast: bool = False

    def build_name(self, step: int) -> str:
        return self.standard.build_name(step)

    def find_all(self, base_path):
        return (m for m in self.standard.find_all(base_path)
                if step_of(epath.Path(m.path).name) == m.step)

    def find_step(self, base_path, step: int):
        return self.standard.find_step(base_path, step)
