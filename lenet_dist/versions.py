"""The installed stack's versions, from package metadata: what a checkpoint, an export
and a benchmark record beside their results. Never imports JAX or TensorFlow (the
benchmark's own process stays light; see bench.reap)."""

from __future__ import annotations

import importlib.metadata
import platform

# The version's one home: `lenet-dist --version`, the package metadata (pyproject
# reads this line) and launch/tpu-vm.sh's wheel name. lenet_dist.__version__ is this.
__version__ = "0.1.0"

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
