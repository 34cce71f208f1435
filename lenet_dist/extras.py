"""The optional parts of the install, and the one line that says how to add one.

The core install trains, evaluates and predicts from checkpoints; TensorFlow (1.3 GB),
TFDS and matplotlib come with extras (pyproject.toml). A command that reaches for a
missing one gets a UserError naming the `pip install` that fixes it, never an
ImportError traceback. Standard library only: `cli.main` imports it to word the error.
"""

from __future__ import annotations

from lenet_dist.errors import UserError

# Top-level module -> (its name for people, the extra that installs it, what needs it).
# The extras are declared in pyproject.toml's [project.optional-dependencies]; a test
# keeps the two in step.
EXTRAS: dict[str, tuple[str, str, str]] = {
    "tensorflow": ("TensorFlow", "export", "export, predict --model and bench --serving"),
    "tensorflow_datasets": ("TensorFlow Datasets", "tfds",
                            "reading or downloading the data with TFDS"),
    "matplotlib": ("matplotlib", "report", "report"),
    "gcsfs": ("gcsfs", "gcs", "gs:// workdirs and exports"),
    "ai_edge_litert": ("LiteRT (ai-edge-litert)", "edge", "export --format tflite/onnx"),
    "onnxruntime": ("onnxruntime", "edge", "export --format onnx"),
    "tf2onnx": ("tf2onnx", "edge", "export --format onnx"),
    "onnx": ("onnx", "edge", "export --format onnx"),
}


def install_line(extra: str) -> str:
    return f"pip install 'lenet-dist[{extra}]'"


def missing(module: str, detail: str = "") -> UserError | None:
    """The one-line error for an optional module that is not installed, or None when
    `module` is not one of the extras' (a missing core module is a broken install)."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        return None
    name, extra, needed_by = EXTRAS[top]
    return UserError(f"{name} is not installed{detail}; install it with "
                     f"`{install_line(extra)}` (the [{extra}] extra, for {needed_by})")
