"""Set up JAX before it initialises: CPU device simulation and XLA:CPU flags.

Both must happen before the first JAX backend call, so every command calls
`configure()` first and nothing in this package touches devices at import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

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


def configure(cpu_devices: int | None = None, job=None) -> None:
    """Prepare JAX: join the multi-process `job` (a `distributed.JobSpec`) if any,
    then `cpu_devices` simulated CPU devices (the global count: each process of a
    job simulates its share), fast CPU kernels.

    Simulating devices only changes the CPU backend; on a GPU/TPU host the
    accelerators stay the default backend.
    """
    if os.environ.get("LENET_DIST_ONEDNN", "1") != "0":
        add_xla_flags()
    if job is not None:
        from lenet_dist import distributed

        cpu_devices = distributed.join(job, cpu_devices)
    import jax

    if cpu_devices is not None and cpu_devices > jax.config.jax_num_cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        except RuntimeError:  # the backend already started with fewer: never ignore it
            from lenet_dist.errors import UserError

            raise UserError(
                f"--devices {cpu_devices} asks for more CPU devices than the "
                f"{jax.config.jax_num_cpu_devices} present; JAX has already started, "
                "so no more can be simulated") from None


# INFO lines TensorFlow's C++ prints while it loads. Once jaxlib has set up
# absl logging, TF_CPP_MIN_LOG_LEVEL no longer silences them.
TF_IMPORT_NOISE = ("absl::InitializeLog", "oneDNN custom operations are on",
                   "This TensorFlow binary is optimized", "rebuild TensorFlow with")


@contextlib.contextmanager
def filtered_stderr(noise: tuple[str, ...] = ("",)):
    """Capture file descriptor 2 (where C/C++ libraries log); replay the lines that
    contain none of `noise` (by default none are replayed)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if not any(n in line for n in noise)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


TENSORFLOW_PIN = "tensorflow-cpu==2.21.0"  # the version pyproject.toml pins


def import_tensorflow():
    """TensorFlow, quiet, or a UserError that says how to install it.

    Imported only by the commands that need it (export, predict), so training
    never pays its import time.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with filtered_stderr(TF_IMPORT_NOISE):
            import tensorflow as tf
    except ImportError as e:
        from lenet_dist.errors import UserError

        raise UserError(f"TensorFlow is not installed ({e}); install it with "
                        f"`pip install {TENSORFLOW_PIN}` (or `tensorflow` on a GPU or "
                        "non-x86 host)") from None
    tf.get_logger().setLevel("ERROR")  # deprecation notices from TF1 APIs
    return tf
