"""The one mesh (axis "data") and every sharding the program uses.

Batches are split over "data"; parameters, optimizer state and the
device-resident dataset are replicated. Nothing else decides placement.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lenet_dist.errors import UserError

DATA_AXIS = "data"


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `devices` devices of the default backend."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if n < 1:
        raise UserError(f"--devices must be >= 1, got {n}")
    if n > len(available):
        platform = available[0].platform
        hint = (
            "simulated CPU devices must be requested before JAX starts "
            "(lenet-dist does this for --devices)"
            if platform == "cpu"
            else f"use --devices {len(available)} or fewer"
        )
        raise UserError(
            f"--devices {n} asks for more {platform.upper()} devices than the "
            f"{len(available)} present; {hint}"
        )
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=available[:n])


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


def check_batch(global_batch: int, n_devices: int, flag: str = "--batch-size") -> None:
    """A global batch must split evenly; name nearby sizes that do."""
    if global_batch % n_devices:
        lower = global_batch - global_batch % n_devices
        upper = lower + n_devices
        options = ", ".join(str(b) for b in (lower, upper) if b > 0)
        raise UserError(
            f"{flag} {global_batch} does not divide over {n_devices} devices; "
            f"use a multiple of {n_devices} (e.g. {options})"
        )


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
