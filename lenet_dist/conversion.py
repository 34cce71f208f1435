"""A model's variables -> a TensorFlow SavedModel through jax2tf, and the check that
TensorFlow, loading what was written, answers what JAX answers.

The model is passed in (the run's config and class names choose it); StableHLO's
version is negotiated in serialization.py. TensorFlow is passed in too: only the
commands that build a model import it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from lenet_dist import model as model_lib
from lenet_dist import serialization
from lenet_dist import serving_contract as contract
from lenet_dist.errors import UserError, first_line
from lenet_dist.step import forward_for, logits_of

# Export-time agreement bound between the SavedModel and JAX (measured: 5e-7 to 2e-6).
VERIFY_TOLERANCE = 1e-5


def build_module(tf, variables, platforms: Sequence[str], labels_file: Path,
                 model: nn.Module):
    """A tf.Module whose `serve` is the jax2tf-converted forward of `model` (its logits;
    the softmax and argmax are TensorFlow ops, which TFLite converts too); the model's
    variables (parameters, and BatchNorm statistics for the modern recipe) are
    tf.Variables, kept under the attribute `params` that exported models have always had."""
    from jax.experimental import jax2tf  # imports TensorFlow: only once a model is built

    module = tf.Module()
    module.params = jax.tree_util.tree_map_with_path(
        lambda path, x: tf.Variable(np.asarray(x), trainable=False,
                                    name="/".join(str(getattr(k, "key", k)) for k in path)),
        variables)
    module.labels = tf.saved_model.Asset(str(labels_file))
    converted = jax2tf.convert(functools.partial(logits_of, model),
                               polymorphic_shapes=[None, "(b, 28, 28, 1)"], with_gradient=False,
                               native_serialization_platforms=tuple(platforms))

    @tf.function(autograph=False, input_signature=contract.input_signature(tf))
    def serve(images):
        return contract.outputs_from_logits(tf, converted(module.params, images))

    module.serve = serve
    return module


def save_savedmodel(tf, variables, staging: Path, platforms: Sequence[str],
                    class_names: Sequence[str], plan: serialization.Plan,
                    model: nn.Module) -> Path:
    """Write the SavedModel of `model` to staging/model with `plan`'s serialization
    versions."""
    labels_file = staging / contract.LABELS_ASSET.name  # the Asset copies it to assets/
    labels_file.write_text("\n".join(class_names) + "\n", encoding="utf-8")  # any locale
    module = build_module(tf, variables, platforms, labels_file, model)
    model_dir = staging / "model"
    # Saving traces `serve` again (for the restored object's own method), so the
    # save must happen under the plan too; then check what was actually written.
    with serialization.serialize_for(plan):
        concrete = module.serve.get_concrete_function()
        tf.saved_model.save(module, str(model_dir), signatures={contract.SIGNATURE: concrete})
    serialization.check_saved_model(model_dir, plan)
    return model_dir


def jax_reference(variables, images: np.ndarray, model: nn.Module
                  ) -> dict[str, np.ndarray]:
    """`model`'s outputs computed by JAX on the CPU, where float32 convolutions are exact
    float32 (GPU/TPU defaults may use reduced precision, which is not what is checked)."""
    cpu = jax.devices("cpu")[0]
    forward = forward_for(model_lib.network_of(model), model.num_classes)
    out = forward(jax.device_put(variables, cpu), jax.device_put(images, cpu))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def verify(tf, model_dir: Path, images: np.ndarray, expected: dict) -> float:
    """Load what was written and run its CPU lowering at batch 1, 7 and all;
    returns max |logits - JAX|."""
    loaded = tf.saved_model.load(str(model_dir))  # kept: the restored method runs too
    served = contract.serving_signature(loaded)
    worst = 0.0
    for n in sorted({1, min(7, len(images)), len(images)}):
        try:
            with tf.device("/CPU:0"):
                out = contract.call_signature(tf, served, images[:n])
                loaded.serve(tf.constant(images[:n]))  # the restored method, too
        except Exception as e:  # TF raises many types; all mean "cannot serve"
            raise UserError("the exported SavedModel fails when TensorFlow runs it: "
                            f"{first_line(e)}") from None
        diff = np.abs(out["logits"] - expected["logits"][:n])
        worst = max(worst, float(np.max(diff)) if np.all(np.isfinite(diff)) else np.inf)
        if not np.array_equal(out["classes"], expected["classes"][:n]):
            raise UserError(f"the exported SavedModel's classes differ from JAX at batch {n}")
    if not worst <= VERIFY_TOLERANCE:
        raise UserError(f"the exported SavedModel's logits differ from JAX by {worst:.2e} "
                        f"(> {VERIFY_TOLERANCE:g})")
    return worst


def savedmodel_bytes(model_dir: Path) -> int:
    """What TensorFlow loads: saved_model.pb and variables/ (as the kit's checker counts)."""
    files = [model_dir / "saved_model.pb", *(model_dir / "variables").glob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


