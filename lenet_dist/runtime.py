"""Set up JAX before it initialises: CPU device simulation and XLA:CPU flags.

Both must happen before the first JAX backend call, so every command calls
`configure()` first and nothing in this package touches devices at import.
"""

from __future__ import annotations

import os

# Measured on the 2-core dev machine (see README, "Throughput"): routing
# XLA:CPU convolutions and matmuls to oneDNN made the per-step loop about
# 1.5x faster. They only affect the CPU backend.
CPU_XLA_FLAGS = (
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_onednn=true",
)


def add_xla_flags(flags: tuple[str, ...] = CPU_XLA_FLAGS) -> None:
    """Append flags to XLA_FLAGS unless the user already set them."""
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    extra = [f for f in flags if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def configure(cpu_devices: int | None = None, onednn: bool = True) -> None:
    """Prepare JAX: `cpu_devices` simulated CPU devices, fast CPU kernels.

    Simulating devices only changes the CPU backend; on a GPU/TPU host the
    accelerators stay the default backend.
    """
    if onednn and os.environ.get("LENET_DIST_ONEDNN", "1") != "0":
        add_xla_flags()
    import jax

    if cpu_devices is not None and cpu_devices > jax.config.jax_num_cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        except RuntimeError:
            # JAX already initialised (e.g. inside a test session that set its
            # own count); the mesh builder reports any shortfall.
            pass
