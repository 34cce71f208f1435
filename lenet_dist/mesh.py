"""The one mesh (axis "data") and every sharding the program uses.

Batches are split over "data"; parameters, optimizer state and the
device-resident dataset are replicated. Nothing else decides placement.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lenet_dist.joining import check_devices
from lenet_dist.errors import UserError
from lenet_dist.runtime import MAX_SIMULATED_CPU_DEVICES

DATA_AXIS = "data"


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh over `devices` devices of the default backend (all by default).

    In a multi-process job `devices` is the global count and every process gives
    the same number of its own devices (the first devices // processes of each),
    so every process holds an equal share of each batch.
    """
    available = jax.devices()
    processes = jax.process_count()
    n = len(available) if devices is None else devices
    if n < 1:
        raise UserError(f"--devices must be >= 1, got {n}")
    per_process = check_devices(n, processes)
    by_process = {}
    for d in available:
        by_process.setdefault(d.process_index, []).append(d)
    fewest = min(len(ds) for ds in by_process.values())
    if per_process > fewest:
        platform = available[0].platform
        hint = (
            "simulated CPU devices must be requested before JAX starts "
            "(lenet-dist does this for --devices)"
            if platform == "cpu"
            else f"use --devices {fewest * processes} or fewer"
        )
        what = (f"{per_process} {platform.upper()} devices per process ({processes} "
                f"processes), more" if processes > 1 else f"more {platform.upper()} devices")
        raise UserError(f"--devices {n} asks for {what} than the {fewest} present; {hint}")
    chosen = [d for p in sorted(by_process) for d in by_process[p][:per_process]]
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=chosen)


@dataclasses.dataclass(frozen=True)
class Shardings:
    """Placements for one mesh: batch arrays split on "data", the rest replicated."""

    mesh: Mesh

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        """[batch, ...] arrays: the leading axis split over devices."""
        return NamedSharding(self.mesh, P(DATA_AXIS))

    @property
    def stacked_batches(self) -> NamedSharding:
        """[steps, batch, ...] arrays: each step's batch split over devices."""
        return NamedSharding(self.mesh, P(None, DATA_AXIS))

    @property
    def size(self) -> int:
        return self.mesh.size


def check_batch(global_batch: int, n_devices: int) -> None:
    """A global batch must split evenly; name nearby sizes that do, and the device
    counts that split this batch (on a resume the batch is the checkpoint's, so
    --devices is what may change)."""
    if global_batch % n_devices:
        lower = global_batch - global_batch % n_devices
        upper = lower + n_devices
        options = ", ".join(str(b) for b in (lower, upper) if b > 0)
        counts = devices_for(global_batch, n_devices)  # none where no job share divides it
        raise UserError(
            f"--batch-size {global_batch} does not divide over {n_devices} devices; "
            f"use a multiple of {n_devices} (e.g. {options})"
            + (f" or --devices {_one_of(counts)}" if counts else "")
        )


def devices_for(global_batch: int, near: int, most: int = 12) -> list[int]:
    """Device counts that split `global_batch` evenly in this job: multiples of its
    process count, at most as many per process as CPU simulation allows (more than any
    accelerator host has); the `most` nearest to `near`, ascending. The job is asked
    without starting a backend (bench words this error before JAX starts)."""
    processes = jax.process_count() if jax.distributed.is_initialized() else 1
    most_devices = min(global_batch, MAX_SIMULATED_CPU_DEVICES * processes)
    fits = [d for d in range(processes, most_devices + 1, processes) if global_batch % d == 0]
    return sorted(sorted(fits, key=lambda d: abs(math.log(d / near)))[:most])


def _one_of(counts: list[int]) -> str:
    """`1, 2 or 4`."""
    words = [str(c) for c in counts]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def describe(mesh: Mesh) -> str:
    """Human-readable platform, devices and mesh."""
    devs = list(mesh.devices.flat)
    ids = np.array([d.id for d in devs])
    lines = [
        f"platform: {devs[0].platform} ({jax.default_backend()} backend)",
        f"processes: {jax.process_count()} (this is process {jax.process_index()})",
        f"devices available: {jax.device_count()}",
        f"mesh: {dict(mesh.shape)} over device ids {ids.tolist()}",
    ]
    lines += [f"  {d.id}: {d.device_kind} (process {d.process_index})" for d in devs]
    return "\n".join(lines)
