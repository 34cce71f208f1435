"""What an exported lenet-dist SavedModel promises its callers (TF Serving, predict,
bench): the signature's name, inputs and outputs, and where the class names are.

Export writes to it, predict and bench read through it. JAX-free on purpose:
`predict --model` runs on TensorFlow alone. TensorFlow is passed in, never imported
here (callers import it through runtime.import_tensorflow, with its install hint).
The deployment kit (export/) spells the same contract without importing lenet_dist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIGNATURE = "serving_default"
INPUT = "images"
# Classes of the built-in datasets' models (model.NUM_CLASSES, tested equal: not
# imported, since that module stands on JAX). A model's own width is its number of
# class names (`signature_spec`); these constants describe the default.
NUM_CLASSES = 10
INPUT_SPEC = {"dtype": "uint8", "shape": [-1, 28, 28, 1], "range": "raw pixels 0-255"}


def outputs_spec(num_classes: int) -> dict:
    """The signature's outputs for a model of `num_classes` classes."""
    return {"logits": {"dtype": "float32", "shape": [-1, num_classes]},
            "probabilities": {"dtype": "float32", "shape": [-1, num_classes]},
            "classes": {"dtype": "int64", "shape": [-1]}}


def signature_spec(num_classes: int) -> dict:
    """What metadata.json promises; tests hold the graph to it."""
    return {"name": SIGNATURE, "inputs": {INPUT: INPUT_SPEC},
            "outputs": outputs_spec(num_classes)}


OUTPUTS = outputs_spec(NUM_CLASSES)
SIGNATURE_SPEC = signature_spec(NUM_CLASSES)
# One class name per line, in class order; the export's tf.saved_model.Asset lands here.
LABELS_ASSET = Path("assets") / "labels.txt"


def describe_input() -> str:
    """The input as error messages name it: 'images uint8 [n, 28, 28, 1]'."""
    dims = ", ".join("n" if d == -1 else str(d) for d in INPUT_SPEC["shape"])
    return f"{INPUT} {INPUT_SPEC['dtype']} [{dims}]"


def input_signature(tf) -> list:
    """The serving function's input_signature: [TensorSpec] of INPUT_SPEC."""
    shape = [None if d == -1 else d for d in INPUT_SPEC["shape"]]
    return [tf.TensorSpec(shape, tf.as_dtype(INPUT_SPEC["dtype"]), name=INPUT)]


def named_outputs(tf, outputs: dict) -> dict:
    """`outputs` as the signature returns them: each an op of its own name, cast to its
    contract dtype (classes int32 -> int64), the float ones through an identity."""
    named = {}
    for name, spec in OUTPUTS.items():
        x, dtype = outputs[name], tf.as_dtype(spec["dtype"])
        named[name] = tf.identity(x, name=name) if x.dtype == dtype \
            else tf.cast(x, dtype, name=name)
    return named


def outputs_from_logits(tf, logits) -> dict:
    """The signature's outputs from the model's logits: the softmax and argmax are
    TensorFlow ops (first index on ties, as jnp.argmax), which the TFLite converter maps
    to SOFTMAX and ARG_MAX; JAX's argmax, serialized, is a reduce it cannot convert."""
    return named_outputs(tf, {"logits": logits, "probabilities": tf.nn.softmax(logits),
                              "classes": tf.math.argmax(logits, axis=-1,
                                                        output_type=tf.int64)})


def labels_path(model_dir: Path) -> Path:
    return Path(model_dir) / LABELS_ASSET


def serving_signature(loaded):
    """The signature TF Serving calls, of a loaded SavedModel."""
    return loaded.signatures[SIGNATURE]


def load_signature(tf, model_dir: Path):
    """The serving signature of the SavedModel in `model_dir` (TensorFlow's exceptions
    pass through: each caller words its own error)."""
    return serving_signature(tf.saved_model.load(str(model_dir)))


def call_signature(tf, signature, images: np.ndarray) -> dict[str, np.ndarray]:
    """The signature's outputs for uint8 `images`, as numpy arrays."""
    return {k: v.numpy() for k, v in signature(**{INPUT: tf.constant(images)}).items()}
