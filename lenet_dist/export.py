"""Checkpoint -> TensorFlow SavedModel through jax2tf, verified before it is published.

The SavedModel is built in a staging directory next to `out`, loaded back and
compared with JAX on reference images, and only then moved into place, so a
failed export never leaves a half-written model or touches an existing one.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from lenet_dist import data as data_lib
from lenet_dist import distributed, serialization
from lenet_dist.config import DEFAULT_EXPORT_PLATFORMS, EXPORT_PLATFORMS
from lenet_dist.errors import UserError, first_line
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.model import NUM_CLASSES
from lenet_dist.runtime import import_tensorflow
from lenet_dist.step import infer

SIGNATURE = "serving_default"
INPUT_NAME = "images"
REFERENCE_IMAGES = 256
# Export-time agreement bound between the SavedModel and JAX (measured: 5e-7 to 2e-6).
VERIFY_TOLERANCE = 1e-5
FORMAT_VERSION = 1
SIGNATURE_SPEC = {  # what metadata.json promises; tests hold the graph to it
    "name": SIGNATURE,
    "inputs": {INPUT_NAME: {"dtype": "uint8", "shape": [-1, 28, 28, 1],
                            "range": "raw pixels 0-255"}},
    "outputs": {"logits": {"dtype": "float32", "shape": [-1, 10]},
                "probabilities": {"dtype": "float32", "shape": [-1, 10]},
                "classes": {"dtype": "int64", "shape": [-1]}},
}


def parse_platforms(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in items if p.strip()))
    bad = [p for p in chosen if p not in EXPORT_PLATFORMS]
    if bad or not chosen:
        raise UserError(f"--platforms {','.join(items)}: choose from {', '.join(EXPORT_PLATFORMS)}")
    return chosen


def check_destination(out: Path, overwrite: bool, workdir: Path) -> None:
    """Refuse any --out whose replacement could destroy something that is not a model.

    `out` and `workdir` are resolved paths."""
    for precious, what in ((workdir, "the training run"), (Path.cwd(), "the current directory")):
        if out == precious or out in precious.parents:
            raise UserError(f"--out {out} would replace {what} ({precious}); "
                            "choose a new directory, e.g. serving/lenet/1")
    if workdir in out.parents and (workdir / "checkpoints") in (out, *out.parents):
        raise UserError(f"--out {out} is inside the checkpoints of {workdir}; choose another")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise UserError(f"cannot read {out}: {e.strerror}") from None
    if empty:
        return
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if not (out / "saved_model.pb").is_file():
        raise UserError(f"{out} is not a SavedModel (no saved_model.pb); --overwrite only "
                        "replaces an exported model, so move it away yourself")


def reference_batch(dataset: str, data_dir: str | None, n: int = REFERENCE_IMAGES):
    """The first `n` test images (and labels), or fixed random pixels when the
    dataset is not on this machine."""
    if data_lib.resolve_source(dataset, data_dir)[0] != "download":
        try:
            split = data_lib.load(dataset, data_dir).test.take(n)
            return np.asarray(split.images), np.asarray(split.labels), f"{dataset} test set"
        except UserError:
            pass
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return images, np.full((n,), -1, np.int32), "random pixels"


def build_module(tf, params, platforms: Sequence[str], labels_file: Path):
    """A tf.Module whose `serve` is the jax2tf-converted `infer`; params are tf.Variables."""
    from jax.experimental import jax2tf

    module = tf.Module()
    module.params = jax.tree_util.tree_map_with_path(
        lambda path, x: tf.Variable(np.asarray(x), trainable=False,
                                    name="/".join(str(getattr(k, "key", k)) for k in path)),
        params)
    module.labels = tf.saved_model.Asset(str(labels_file))
    converted = jax2tf.convert(infer, polymorphic_shapes=[None, "(b, 28, 28, 1)"],
                               with_gradient=False,
                               native_serialization_platforms=tuple(platforms))

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, 28, 28, 1], tf.uint8, name=INPUT_NAME)])
    def serve(images):
        out = converted(module.params, images)
        return {"logits": tf.identity(out["logits"], name="logits"),
                "probabilities": tf.identity(out["probabilities"], name="probabilities"),
                "classes": tf.cast(out["classes"], tf.int64, name="classes")}

    module.serve = serve
    return module


def save_savedmodel(tf, params, staging: Path, platforms: Sequence[str],
                    class_names: Sequence[str], plan: serialization.Plan) -> Path:
    """Write the SavedModel to staging/model with `plan`'s serialization versions."""
    labels_file = staging / "labels.txt"
    labels_file.write_text("\n".join(class_names) + "\n")
    module = build_module(tf, params, platforms, labels_file)
    model_dir = staging / "model"
    # Saving traces `serve` again (for the restored object's own method), so the
    # save must happen under the plan too; then check what was actually written.
    with serialization.serialize_for(plan):
        concrete = module.serve.get_concrete_function()
        tf.saved_model.save(module, str(model_dir), signatures={SIGNATURE: concrete})
    serialization.check_saved_model(model_dir, plan)
    return model_dir


def jax_reference(params, images: np.ndarray) -> dict[str, np.ndarray]:
    """JAX's outputs computed on the CPU, where float32 convolutions are exact float32
    (GPU/TPU defaults may use reduced precision, which is not what is being checked)."""
    cpu = jax.devices("cpu")[0]
    out = jax.jit(infer)(jax.device_put(params, cpu), jax.device_put(images, cpu))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def verify(tf, model_dir: Path, images: np.ndarray, expected: dict) -> float:
    """Load what was written and run its CPU lowering at batch 1, 7 and all;
    returns max |logits - JAX|."""
    loaded = tf.saved_model.load(str(model_dir))
    served = loaded.signatures[SIGNATURE]
    worst = 0.0
    for n in sorted({1, min(7, len(images)), len(images)}):
        try:
            with tf.device("/CPU:0"):
                out = served(**{INPUT_NAME: tf.constant(images[:n])})
                loaded.serve(tf.constant(images[:n]))  # the restored method, too
        except Exception as e:  # TF raises many types; all mean "cannot serve"
            raise UserError("the exported SavedModel fails when TensorFlow runs it: "
                            f"{first_line(e)}") from None
        diff = np.abs(out["logits"].numpy() - expected["logits"][:n])
        worst = max(worst, float(np.max(diff)) if np.all(np.isfinite(diff)) else np.inf)
        if not np.array_equal(out["classes"].numpy(), expected["classes"][:n]):
            raise UserError(f"the exported SavedModel's classes differ from JAX at batch {n}")
    if not worst <= VERIFY_TOLERANCE:
        raise UserError(f"the exported SavedModel's logits differ from JAX by {worst:.2e} "
                        f"(> {VERIFY_TOLERANCE:g})")
    return worst


def library_versions(tf) -> dict:
    from importlib import metadata

    out = {"tensorflow": tf.__version__}
    for pkg in ("jax", "jaxlib", "flax", "orbax-checkpoint", "lenet-dist"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def publish(staging_model: Path, out: Path, overwrite: bool, workdir: Path) -> None:
    """Move the verified model to `out`. An old model there is set aside first and
    deleted only once the new one is in place; on any failure, it is put back."""
    check_destination(out, overwrite, workdir)  # again: minutes may have passed
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        staging_model.rename(out)
    except BaseException:  # including Ctrl-C between the two renames
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(workdir: str, out: str, step: int | None = None, best: bool = False,
                      platforms: Sequence[str] = DEFAULT_EXPORT_PLATFORMS, overwrite: bool = False,
                      data_dir: str | None = None) -> dict | None:
    """Export one checkpoint of `workdir` as a SavedModel at `out`; returns its metadata
    (None on the other processes of a multi-process job: process 0 writes)."""
    from lenet_dist.evaluate import restore_params

    out_path, work_path = Path(out).resolve(), Path(workdir).resolve()
    platforms = parse_platforms(platforms)
    if "cpu" not in platforms:
        raise UserError(f"--platforms {','.join(platforms)}: include cpu; the export is "
                        "checked by running its CPU lowering before it is published")

    def prepare():  # only the writer needs --out and TensorFlow
        check_destination(out_path, overwrite, work_path)
        return import_tensorflow(), serialization.installed_plan()

    tf, plan = distributed.on_primary(prepare) or (None, None)
    # In a job every process takes part in the restore (onto all devices).
    mesh = make_mesh(None if jax.process_count() > 1 else 1)
    params, config, chosen, meta, _ = restore_params(workdir, step, best, Shardings(mesh))
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)  # replicated
    if not distributed.is_primary():
        return None
    if not all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params)):
        raise UserError(f"checkpoint step {chosen} has NaN or infinite parameters "
                        "(a diverged run); export another with --step")
    class_names = data_lib.CLASS_NAMES[config.dataset]
    assert len(class_names) == NUM_CLASSES

    images, labels, ref_source = reference_batch(config.dataset, data_dir or config.data_dir)
    expected = jax_reference(params, images)

    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.staging-",
                                        dir=out_path.parent))
    except OSError as e:
        raise UserError(f"cannot write in {out_path.parent}: {e.strerror}") from None
    try:
        model_dir = save_savedmodel(tf, params, staging, platforms, class_names, plan)
        max_diff = verify(tf, model_dir, images, expected)
        evaluated = next((r for r in meta.get("history", []) if r.get("step") == chosen), {})
        info = {
            "format": FORMAT_VERSION,
            "model": "LeNet-5 (d2l), Flax",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": {"workdir": str(work_path), "step": chosen,
                           "epoch": meta.get("epoch"),
                           "test_accuracy": evaluated.get("test_accuracy"),
                           "test_loss": evaluated.get("test_loss")},
            "config": config.to_dict(),
            "signature": SIGNATURE_SPEC,
            "class_names": list(class_names),
            "platforms": list(platforms),
            "serialization": plan.to_dict(),
            "versions": library_versions(tf),
            "reference": {"file": "assets.extra/reference.npz", "images": len(images),
                          "source": ref_source, "max_abs_logit_diff": max_diff},
        }
        extra = model_dir / "assets.extra"
        extra.mkdir()
        (extra / "metadata.json").write_text(json.dumps(info, indent=2) + "\n")
        np.savez_compressed(extra / "reference.npz", images=images, labels=labels,
                            **expected)
        publish(model_dir, out_path, overwrite, work_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info
