"""The installed stack's versions, from package metadata: what a checkpoint, an export
and a benchmark record beside their results. Never imports JAX or TensorFlow (the
benchmark's own process stays light; see bench.reap)."""

from __future__ import annotations

import importlib.metadata
import platform

STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "lenet-dist")


def installed(packages: tuple[str, ...] = STACK) -> dict[str, str | None]:
    """{package: version or None when not installed, ..., "python": version}."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out
