"""The one module that reaches into JAX's private `jax._src`: each use is a small named
function here, so a JAX upgrade that moves one fails in one place, in one line naming
both versions, instead of as an AttributeError deep inside a join or an export.

Nothing is imported at module import time: distributed.py and api.py import JAX late
on purpose (the device count is fixed when JAX starts), and so does every function here.
tests/test_jax_compat.py checks that every symbol in PRIVATE exists in the installed JAX.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

from lenet_dist.errors import UserError

CHECKED_JAX = "0.12.0.1"  # the JAX release every symbol below was read in

# (module, dotted attribute) for every private symbol this module uses.
PRIVATE = (
    ("jax._src.xla_bridge", "backends_are_initialized"),
    ("jax._src.distributed", "global_state"),
    ("jax._src.clusters", "ClusterEnv._cluster_types"),
    ("jax._src.clusters", "ClusterEnv.auto_detect_unset_distributed_params"),
    ("jax._src.export._export", "_module_to_bytecode"),
)


class JaxMoved(UserError):
    """A private JAX symbol lenet-dist relies on is not where CHECKED_JAX had it."""


def private(module: str, attribute: str) -> Any:
    """`module.attribute` (dotted), or a one-line JaxMoved naming both JAX versions."""
    try:
        value: Any = importlib.import_module(module)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError):
        import jax

        raise JaxMoved(f"jax {jax.__version__} has no {module}.{attribute}, which "
                       f"lenet-dist uses (checked against jax {CHECKED_JAX}); install "
                       f"jax=={CHECKED_JAX} or update lenet_dist/jax_compat.py") from None
    return value


def backends_are_initialized() -> bool:
    """Whether JAX's backends are up (then the device count is fixed)."""
    return bool(private("jax._src.xla_bridge", "backends_are_initialized")())


def distributed_state() -> Any:
    """JAX's distributed global state: `.num_processes` and `.client` (the
    coordinator's key-value store and barriers; None outside a job)."""
    return private("jax._src.distributed", "global_state")


def cluster_types() -> list:
    """JAX's ClusterEnv classes, in the order `jax.distributed.initialize` tries them."""
    return list(private("jax._src.clusters", "ClusterEnv._cluster_types"))


def auto_detect_unset_distributed_params(address, count, index, timeout: float):
    """(address, count, index, local device ids) as `jax.distributed.initialize` would
    detect those left None, through JAX's own ClusterEnv code."""
    detect = private("jax._src.clusters", "ClusterEnv.auto_detect_unset_distributed_params")
    return detect(address, count, index, None, None, timeout)


@contextlib.contextmanager
def stablehlo_serializer_wrapped(wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """While active, jax.export serializes StableHLO with `wrap(its serializer)`: jax has
    no public knob for the StableHLO target version (serialization.py's one need)."""
    _export = importlib.import_module("jax._src.export._export")
    original = private("jax._src.export._export", "_module_to_bytecode")
    _export._module_to_bytecode = wrap(original)
    try:
        yield
    finally:
        _export._module_to_bytecode = original
