"""Checkpoint -> verified SavedModel (and TFLite/ONNX) at `out`: the export command.

The orchestrator only: the run's checkpoint is restored with its model (its config's
network, its class names' count), converted and checked against JAX in a staging
directory (conversion.py; edge.py for --format tflite/onnx and --quantize int8), and
only then published (publishing.py: an atomic rename locally, an upload with
saved_model.pb last for gs://), so a failed export never leaves a half-written model or
touches an existing one.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from lenet_dist import data as data_lib
from lenet_dist import distributed, edge, faults, serialization, tempdirs, versions
from lenet_dist import serving_contract as contract
from lenet_dist.config import DEFAULT_EXPORT_PLATFORMS, EXPORT_PLATFORMS, dataset_kind
from lenet_dist.conversion import (VERIFY_TOLERANCE, jax_reference, save_savedmodel,
                                   savedmodel_bytes, verify)
from lenet_dist.errors import UserError
from lenet_dist.mesh import Shardings, make_mesh
# check_remote_destination and destination are also imported from here (tests/test_gcs.py)
from lenet_dist.publishing import (check_destination, check_remote_destination, destination,
                                   is_remote, make_staging, publish, publish_remote,
                                   recover_leftovers)
from lenet_dist.restore import restore_checkpoint
from lenet_dist.runtime import import_tensorflow
from lenet_dist.sources import load_dataset

REFERENCE_IMAGES = 256
FORMAT_VERSION = 1


def parse_platforms(text: str | Sequence[str], need_cpu: bool = False) -> tuple[str, ...]:
    """--platforms as a tuple without repeats; `need_cpu`: the export's own check runs
    the CPU lowering, so cpu must be among them."""
    items = text.split(",") if isinstance(text, str) else list(text)
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in items if p.strip()))
    bad = [p for p in chosen if p not in EXPORT_PLATFORMS]
    if bad or not chosen:
        given = ",".join(items) or "''"
        raise UserError(f"--platforms {given}: choose from {', '.join(EXPORT_PLATFORMS)}")
    if need_cpu and "cpu" not in chosen:
        raise UserError(f"--platforms {','.join(chosen)}: include cpu; the export is "
                        "checked by running its CPU lowering before it is published")
    return chosen


def local_dataset(config, data_dir: str | None) -> data_lib.Dataset | None:
    """The run's dataset when it is on this machine (never downloaded), else None."""
    config = config.replace(data_dir=data_dir)
    if dataset_kind(config.dataset)[0] == "builtin" and \
            data_lib.resolve_source(config.dataset, config.data_dir)[0] == "download":
        return None
    try:
        return load_dataset(config, log=lambda _: None)
    except UserError:
        return None


def reference_batch(dataset: data_lib.Dataset | None, n: int = REFERENCE_IMAGES):
    """The first `n` test images (and labels), or fixed random pixels when the
    dataset is not on this machine."""
    if dataset is not None:
        split = dataset.test.take(n)
        return (np.asarray(split.images), np.asarray(split.labels),
                f"{dataset.name} test set")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return images, np.full((n,), -1, np.int32), "random pixels"


def export_checkpoint(workdir: str, out: str, step: int | None = None, best: bool = False,
                      platforms: Sequence[str] = DEFAULT_EXPORT_PLATFORMS, overwrite: bool = False,
                      data_dir: str | None = None,
                      formats: str | Sequence[str] = ("savedmodel",),
                      quantize: str | None = None,
                      warn: Callable[[str], None] = print) -> dict | None:
    """Export one checkpoint of `workdir` as a SavedModel at `out`, with the TFLite and
    ONNX models of `formats` (and `quantize`) beside it; returns its metadata (None on
    the other processes of a multi-process job: process 0 writes). What earlier, killed
    exports to `out` left behind is recovered first and reported through `warn`."""
    formats = edge.parse_formats(formats)
    quantize = edge.parse_quantize(quantize, formats)
    out_path, work_path = destination(out), destination(workdir)
    platforms = parse_platforms(platforms, need_cpu=True)
    # Before TensorFlow: processes that would restore different steps fail together now.
    distributed.check_same_settings({"step": step, "best": best, "platforms": list(platforms),
                                     "overwrite": overwrite, "formats": list(formats),
                                     "quantize": quantize}, "export")
    tf, plan = distributed.on_primary(
        lambda: prepare_writer(out_path, work_path, overwrite, formats, warn),
        "preparing the export") or (None, None)
    # In a job every process takes part in the restore (onto all devices).
    mesh = make_mesh(None if jax.process_count() > 1 else 1)
    restored = restore_checkpoint(workdir, Shardings(mesh), step, best)
    # replicated: any one device's copy is the whole value
    variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), restored.variables)
    if not distributed.is_primary():
        return None
    if not all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables)):
        raise UserError(f"checkpoint step {restored.step} has NaN or infinite parameters "
                        "(a diverged run); export another with --step")
    dataset = local_dataset(restored.config, data_dir)
    images, labels, ref_source = reference_batch(dataset)
    expected = jax_reference(variables, images, restored.model)
    wanted, (calibration, check) = (edge.models(formats, quantize),
                                    quantize_inputs(quantize, dataset, restored, variables))
    staging = open_staging(out_path)
    try:
        model_dir = save_savedmodel(tf, variables, staging, platforms, restored.class_names,
                                    plan, restored.model)
        faults.point("publish:staged")
        max_diff = verify(tf, model_dir, images, expected)
        edge_models = edge.build(tf, model_dir, staging, wanted, images, expected,
                                 calibration, check)
        info = metadata(restored, work_path, platforms, plan, tf, wanted, model_dir,
                        {"file": "assets.extra/reference.npz", "images": len(images),
                         "source": ref_source, "max_abs_logit_diff": max_diff}, edge_models)
        write_extras(model_dir, info, images, labels, expected)
        faults.point("publish:verified")
        if is_remote(out_path):
            publish_remote(model_dir, out_path, overwrite, work_path)
        else:
            publish(model_dir, out_path, overwrite, work_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def write_extras(model_dir: Path, info: dict, images, labels, expected: dict) -> None:
    """assets.extra/: the metadata, and the reference images with JAX's answers (what
    the deployment kit checks a server against)."""
    extra = model_dir / "assets.extra"
    extra.mkdir()
    (extra / "metadata.json").write_text(json.dumps(info, indent=2) + "\n")
    np.savez_compressed(extra / "reference.npz", images=images, labels=labels, **expected)


def prepare_writer(out_path, work_path, overwrite: bool, formats, warn):
    """What only the writing process needs: --out checked (and what killed exports left
    there recovered), TensorFlow and the edge runtimes imported; (tf, serializer plan)."""
    edge.check_installed(formats)
    if is_remote(out_path):
        check_remote_destination(out_path, overwrite, work_path)
        return import_tensorflow(), serialization.installed_plan()
    if out_path.name:
        note = recover_leftovers(out_path)
        if note:
            warn(note)
    check_destination(out_path, overwrite, work_path)
    return import_tensorflow(), serialization.installed_plan()


def quantize_inputs(quantize, dataset, restored, variables):
    """--quantize's calibration images and the test set its model is checked on, as
    (calibration, check); (None, None) without --quantize."""
    if not quantize:
        return None, None
    if dataset is None:
        raise UserError(f"--quantize {quantize} calibrates on the training images of "
                        f"{restored.config.dataset}, which are not on this machine; give "
                        "--data-dir DIR (its IDX files)")
    test = dataset.test
    classes = jax_reference(variables, np.asarray(test.images), restored.model)["classes"]
    return (edge.calibration_images(dataset.train.images),
            edge.CheckSet(np.asarray(test.images), np.asarray(test.labels), classes,
                          f"{dataset.name} test set"))


def open_staging(out_path) -> Path:
    """The directory the model is built and checked in: beside a local --out (so that
    publishing is a rename), in the temporary folder for gs:// (then uploaded)."""
    remote = is_remote(out_path)
    try:
        if remote:
            return Path(tempdirs.mkdtemp("lenet-dist-export-"))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return make_staging(out_path)
    except OSError as e:
        where = tempfile.gettempdir() if remote else out_path.parent
        raise UserError(f"cannot write in {where}: {e.strerror}") from None


def metadata(restored, work_path, platforms, plan, tf, wanted, model_dir: Path,
             reference: dict, edge_models: dict) -> dict:
    """assets.extra/metadata.json: what the model is, where it came from, and how each
    of its files was checked before it was published (`reference`: the SavedModel's
    check against JAX; `edge_models`: edge.build's)."""
    config, chosen, meta = restored.config, restored.step, restored.meta
    savedmodel = {"file": "saved_model.pb", "dtype": "float32",
                  "bytes": savedmodel_bytes(model_dir),
                  "verified": {"images": reference["images"],
                               "max_abs_logit_diff": reference["max_abs_logit_diff"],
                               "tolerance": VERIFY_TOLERANCE}}
    evaluated = next((r for r in meta.get("history", []) if r.get("step") == chosen), {})
    return {
        "format": FORMAT_VERSION,
        "model": f"LeNet-5 ({config.network} network), Flax",
        "network": config.network,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"workdir": str(work_path), "step": chosen,
                       "epoch": meta.get("epoch"),
                       "test_accuracy": evaluated.get("test_accuracy"),
                       "test_loss": evaluated.get("test_loss")},
        "config": config.to_dict(),
        "signature": contract.signature_spec(len(restored.class_names)),
        "class_names": list(restored.class_names),
        "platforms": list(platforms),
        "serialization": plan.to_dict(),
        "versions": {**versions.installed(), "tensorflow": tf.__version__,
                     **(versions.installed(edge.PACKAGES) if wanted else {})},
        "reference": reference,
        # Each model the directory holds, its size and how it was checked before it
        # was published (edge.py): the SavedModel always, then --format's.
        "formats": {"savedmodel": savedmodel, **edge_models},
    }


def describe_export(info: dict, workdir: str, out: str) -> list[str]:
    """The `export` command's lines for its metadata: what was exported where, for which
    platforms and StableHLO version, and how each model was checked."""
    ck, ser, ref = info["checkpoint"], info["serialization"], info["reference"]
    acc = f"{ck['test_accuracy']:.4f}" if ck["test_accuracy"] is not None else "not evaluated"
    lines = [f"exported {workdir} step {ck['step']} (test accuracy {acc}) to {out}",
             f"  platforms {','.join(info['platforms'])}; StableHLO "
             f"{ser['stablehlo_version']} (jax writes {ser['jax_default_stablehlo']}, "
             f"TensorFlow {info['versions']['tensorflow']} reads <= "
             f"{ser['tensorflow_max_stablehlo']}); XlaCallModule "
             f"v{ser['calling_convention_version']}",
             f"  checked: SavedModel vs JAX on {ref['images']} {ref['source']} images, "
             f"max |logit diff| {ref['max_abs_logit_diff']:.1e}"]
    for name, model in info["formats"].items():
        if name == "savedmodel":
            continue
        checked = model["verified"]
        how = (f"max |logit diff| {checked['max_abs_logit_diff']:.1e}"
               if "max_abs_logit_diff" in checked else
               f"classes agree on {checked['class_agreement']:.1%} of {checked['images']:,}"
               + (f", accuracy {checked['accuracy']:.4f} (JAX {checked['jax_accuracy']:.4f})"
                  if "accuracy" in checked else ""))
        lines.append(f"  {model['file']} ({model['bytes']:,} bytes, {model['dtype']}): {how}")
    return lines
