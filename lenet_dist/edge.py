"""TFLite and ONNX models made from the verified SavedModel, each checked against JAX
before export publishes it with the SavedModel, in the same staged directory.

- `model.tflite`: float32, `tf.lite.TFLiteConverter.from_saved_model` on the SavedModel.
- `model_int8.tflite` (`--quantize int8`): the same converter, full-integer
  (TFLITE_BUILTINS_INT8: int8 weights and activations), calibrated on
  CALIBRATION_IMAGES training images chosen by a fixed seed. Its input is the same uint8
  [n, 28, 28, 1] (quantized inside, exactly: scale 1, zero point -128); its logits and
  probabilities are dequantized to float32 and its classes are int64, so every format
  answers in the SavedModel's names, dtypes and shapes.
- `model.onnx`: tf2onnx from the float32 TFLite model. tf2onnx cannot read the
  SavedModel itself (its XlaCallModule op), and jax2onnx, which converts from JAX, pins
  orbax-checkpoint < 0.11.37 against our 0.12.8 (measured: docs/export-formats.md).

They run under ai-edge-litert (LiteRT, which replaces the deprecated tf.lite.Interpreter)
and onnxruntime, the runtimes an edge device has. TensorFlow is passed in, as in
serving_contract; the others are the [edge] extra, imported where they are used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lenet_dist import extras, runtime
from lenet_dist import serving_contract as contract
from lenet_dist.errors import UserError, first_line

FORMATS = ("savedmodel", "tflite", "onnx")  # savedmodel is always built: the others' source
QUANTIZATIONS = ("int8",)
# What each model is published as, beside saved_model.pb (export.PUBLISHED names them too).
FILES = {"tflite": "model.tflite", "tflite_int8": "model_int8.tflite", "onnx": "model.onnx"}
# fp32 TFLite and ONNX against JAX on the reference images (measured: 1e-6 to 3e-6).
FLOAT_TOLERANCE = 1e-4
# int8 against JAX over the whole test split (measured on the d2l model: 98.5% of classes
# agree and accuracy moves by -0.04 to -0.2 points, for 100 to 1,000 calibration images).
INT8_MIN_AGREEMENT = 0.95
INT8_MAX_ACCURACY_DROP = 0.005
CALIBRATION_IMAGES = 300
CALIBRATION_SEED = 0
ONNX_OPSET = 17  # onnxruntime >= 1.12 and most edge runtimes read it
PACKAGES = ("ai-edge-litert", "onnxruntime", "tf2onnx", "onnx")  # recorded in metadata.json
RUNTIME_MODULES = {"tflite": ("ai_edge_litert",),
                   "onnx": ("ai_edge_litert", "tf2onnx", "onnx", "onnxruntime")}


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """--format's comma list (as --platforms): savedmodel first, then the others asked."""
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in items if p.strip()))
    bad = [p for p in chosen if p not in FORMATS]
    if bad or not chosen:
        given = ",".join(items) or "''"
        raise UserError(f"--format {given}: choose from {', '.join(FORMATS)} "
                        "(comma-separated; savedmodel is always built)")
    return ("savedmodel", *(f for f in chosen if f != "savedmodel"))


def parse_quantize(quantize: str | None, formats: Sequence[str]) -> str | None:
    if quantize is None:
        return None
    q = quantize.strip().lower()
    if q not in QUANTIZATIONS:
        given = quantize or "''"
        raise UserError(f"--quantize {given}: choose {', '.join(QUANTIZATIONS)} "
                        "(full-integer TFLite)")
    if "tflite" not in formats:
        raise UserError(f"--quantize {q} quantizes the TFLite model; add it: "
                        f"--format {','.join([*formats[1:], 'tflite'])} --quantize {q}")
    return q


def models(formats: Sequence[str], quantize: str | None) -> list[str]:
    """The models to build beside the SavedModel, in build order (keys of FILES)."""
    return [m for m, wanted in (("tflite", "tflite" in formats),
                                ("tflite_int8", quantize == "int8"),
                                ("onnx", "onnx" in formats)) if wanted]


def check_installed(formats: Sequence[str]) -> None:
    """The one-line `pip install 'lenet-dist[edge]'` error now, before a checkpoint is
    restored, when a runtime that checks or converts a format is missing."""
    for fmt in formats:
        for module in RUNTIME_MODULES.get(fmt, ()):
            if not installed(module):
                raise extras.missing(module, f" (needed for --format {fmt})")


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (tf2onnx imports TF)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):  # a None or broken sys.modules entry
        return False


@dataclasses.dataclass(frozen=True)
class CheckSet:
    """What int8 is judged on: a test split with JAX's classes (labels -1: unknown)."""

    images: np.ndarray
    labels: np.ndarray
    jax_classes: np.ndarray
    source: str


def calibration_images(train_images: np.ndarray) -> np.ndarray:
    """CALIBRATION_IMAGES training images, the same ones every export (a fixed seed)."""
    n = min(CALIBRATION_IMAGES, len(train_images))
    pick = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(train_images), n,
                                                                  replace=False))
    return np.asarray(train_images[pick], np.uint8)


# ---------------------------------------------------------------- converting


def convert_tflite(tf, saved_model: Path, calibration: np.ndarray | None = None) -> bytes:
    """The SavedModel's serving signature as TFLite: float32, or full-integer int8
    calibrated on `calibration` (uint8 images [n, 28, 28, 1])."""
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model), signature_keys=[contract.SIGNATURE])
    # The batch is polymorphic, so every bias add and sigmoid arrives as a dynamically
    # shaped broadcast; fusing it (TF 2.21's flag) turns 1 / (1 + exp(-x)) back into
    # LOGISTIC: float32 runs 2.5-5x faster, and int8 runs at all (its DIV refuses a divisor
    # quantized to zero). Safe here because every broadcast is a bias over the batch,
    # and the result is checked against JAX before it is kept.
    if hasattr(converter, "_experimental_unsafe_fuse_dynamic_shaped_broadcast"):
        converter._experimental_unsafe_fuse_dynamic_shaped_broadcast = True
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: (
            {contract.INPUT: calibration[i:i + 1]} for i in range(len(calibration)))
    kind = "int8" if calibration is not None else "float32"
    try:
        with quiet():
            return converter.convert()
    except Exception as e:  # the converter raises ConverterError and others: all "cannot"
        raise UserError(f"the SavedModel does not convert to {kind} TFLite: "
                        f"{first_line(e, 300)}") from None


def convert_onnx(tflite_file: Path) -> bytes:
    """The float32 TFLite model as ONNX (tf2onnx), its input and outputs renamed to the
    serving contract's: images -> logits, probabilities, classes."""
    import logging

    from tf2onnx import convert as tf2onnx_convert  # the [edge] extra; imports TensorFlow

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        with quiet():
            model, _ = tf2onnx_convert.from_tflite(str(tflite_file), opset=ONNX_OPSET)
    except Exception as e:  # tf2onnx raises whatever its handlers do
        raise UserError(f"the TFLite model does not convert to ONNX: {first_line(e, 300)}") \
            from None
    rename_onnx_io(model, tflite_names(tflite_file))
    return model.SerializeToString()


def tflite_names(tflite_file: Path) -> dict[str, str]:
    """{tensor name in the TFLite file: contract name} from its serving signature."""
    from ai_edge_litert.interpreter import Interpreter  # the [edge] extra

    sig = Interpreter(model_path=str(tflite_file)).get_signature_runner(contract.SIGNATURE)
    return {d["name"]: name for details in (sig.get_input_details(), sig.get_output_details())
            for name, d in details.items()}


def rename_onnx_io(model, names: dict[str, str]) -> None:
    """Give the graph's input and outputs their contract names, outputs in contract order,
    and call the batch dimension `batch`."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in [*graph.input, *graph.output]:
        value.name = names.get(value.name, value.name)
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"
    order = list(contract.OUTPUTS)
    outputs = sorted(graph.output, key=lambda v: order.index(v.name) if v.name in order
                     else len(order))
    del graph.output[:]
    graph.output.extend(outputs)


@contextlib.contextmanager
def quiet():
    """The converters and runtimes log to fd 2 from C++ and Python (the int8 calibration
    runs the deprecated tf.lite.Interpreter, which warns each time): keep export's output
    to its own lines. Errors still surface, as exceptions."""
    with warnings.catch_warnings(), runtime.filtered_stderr():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- running


def tflite_runner(path: Path, threads: int | None = None) -> Callable[[np.ndarray], dict]:
    """uint8 images -> {output name: array}, through LiteRT's signature runner."""
    from ai_edge_litert.interpreter import Interpreter  # the [edge] extra

    with quiet():
        sig = Interpreter(model_path=str(path), num_threads=threads).get_signature_runner(
            contract.SIGNATURE)
    return lambda images: {k: np.array(v) for k, v in sig(**{contract.INPUT: images}).items()}


def onnx_runner(path: Path, threads: int | None = None) -> Callable[[np.ndarray], dict]:
    """uint8 images -> {output name: array}, through onnxruntime on the CPU."""
    import onnxruntime as ort  # the [edge] extra

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(None, {contract.INPUT: images})))


def run_batched(run, images: np.ndarray, batch: int = 1024) -> dict[str, np.ndarray]:
    parts = [run(images[i:i + batch]) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------- verifying

LABELS = {"tflite": "TFLite model", "tflite_int8": "int8 TFLite model", "onnx": "ONNX model"}


def load_runner(model: str, path: Path):
    try:
        with quiet():
            return (onnx_runner if model == "onnx" else tflite_runner)(path)
    except Exception as e:  # a file the runtime refuses: each raises its own type
        raise UserError(f"the exported {LABELS[model]} does not load: {first_line(e)}") \
            from None


def call(model: str, run, images: np.ndarray) -> dict[str, np.ndarray]:
    """`run(images)`, its outputs held to the contract's names and shapes."""
    try:
        with quiet():  # LiteRT logs its XNNPACK delegate at the first call
            out = run(images)
    except Exception as e:  # LiteRT and onnxruntime raise RuntimeError and their own
        raise UserError(f"the exported {LABELS[model]} fails when it runs: "
                        f"{first_line(e)}") from None
    if set(out) != set(contract.OUTPUTS):
        raise UserError(f"the exported {LABELS[model]} answers {sorted(out)}, "
                        f"not {sorted(contract.OUTPUTS)}")
    if out["classes"].shape != (len(images),) or out["logits"].shape[0] != len(images):
        raise UserError(f"the exported {LABELS[model]} answers logits "
                        f"{list(out['logits'].shape)} for {len(images)} images")
    return out


def verify_float(model: str, path: Path, images: np.ndarray, expected: dict) -> dict:
    """A float32 model against JAX on the reference images at batch 1, 7 and all: logits
    and probabilities within FLOAT_TOLERANCE, the same classes."""
    run = load_runner(model, path)
    worst = {"logits": 0.0, "probabilities": 0.0}
    batches = sorted({1, min(7, len(images)), len(images)})
    for n in batches:
        out = call(model, run, images[:n])
        for key in worst:
            got, want = out[key], expected[key][:n]
            diff = np.abs(got.astype(np.float64) - want) if got.shape == want.shape \
                else np.array(np.inf)
            worst[key] = max(worst[key], float(np.max(diff)) if np.all(np.isfinite(diff))
                             else np.inf)
        if not np.array_equal(out["classes"], expected["classes"][:n]):
            raise UserError(f"the exported {LABELS[model]}'s classes differ from JAX at "
                            f"batch {n}")
    for key, diff in worst.items():
        if not diff <= FLOAT_TOLERANCE:
            raise UserError(f"the exported {LABELS[model]}'s {key} differ from JAX by "
                            f"{diff:.2e} (> {FLOAT_TOLERANCE:g})")
    return {"images": int(len(images)), "batches": batches,
            "max_abs_logit_diff": worst["logits"],
            "max_abs_probability_diff": worst["probabilities"],
            "tolerance": FLOAT_TOLERANCE}


def verify_int8(path: Path, reference: np.ndarray, check: CheckSet) -> dict:
    """The int8 model against JAX: it runs at batch 1, 7 and all, and over `check` its
    classes agree with JAX's on INT8_MIN_AGREEMENT of the images and (with labels) its
    accuracy is at most INT8_MAX_ACCURACY_DROP below JAX's."""
    model = "tflite_int8"
    run = load_runner(model, path)
    for n in sorted({1, min(7, len(reference))}):
        call(model, run, reference[:n])
    classes = call(model, lambda x: run_batched(run, x), check.images)["classes"]
    agreement = float(np.mean(classes == check.jax_classes))
    result = {"images": int(len(check.images)), "source": check.source,
              "class_agreement": agreement, "min_class_agreement": INT8_MIN_AGREEMENT}
    if agreement < INT8_MIN_AGREEMENT:
        raise UserError(f"the exported int8 TFLite model agrees with JAX on {agreement:.1%} "
                        f"of {len(classes):,} images (< {INT8_MIN_AGREEMENT:.0%})")
    if np.all(check.labels >= 0):
        accuracy = float(np.mean(classes == check.labels))
        jax_accuracy = float(np.mean(check.jax_classes == check.labels))
        result.update(accuracy=accuracy, jax_accuracy=jax_accuracy,
                      max_accuracy_drop=INT8_MAX_ACCURACY_DROP)
        if jax_accuracy - accuracy > INT8_MAX_ACCURACY_DROP:
            raise UserError(f"the exported int8 TFLite model's accuracy {accuracy:.4f} is "
                            f"{(jax_accuracy - accuracy) * 100:.2f} points below JAX's "
                            f"{jax_accuracy:.4f} (> {INT8_MAX_ACCURACY_DROP * 100:g})")
    return result


# ---------------------------------------------------------------- building


def build(tf, model_dir: Path, staging: Path, wanted: Sequence[str], images: np.ndarray,
          expected: dict, calibration: np.ndarray | None, check: CheckSet | None) -> dict:
    """Convert and verify each of `wanted` (keys of FILES) from the SavedModel at
    `model_dir`, writing the kept ones into it; returns their metadata entries. The
    float32 TFLite model is built for ONNX too, outside `model_dir` unless asked for."""
    entries: dict[str, dict] = {}
    float_file = (model_dir if "tflite" in wanted else staging) / FILES["tflite"]
    if "tflite" in wanted or "onnx" in wanted:
        float_file.write_bytes(convert_tflite(tf, model_dir))
        verified = verify_float("tflite", float_file, images, expected)
        if "tflite" in wanted:
            entries["tflite"] = describe(float_file, "float32", verified, tflite_converter(tf))
    if "tflite_int8" in wanted:
        path = model_dir / FILES["tflite_int8"]
        path.write_bytes(convert_tflite(tf, model_dir, calibration))
        verified = verify_int8(path, images, check)
        entries["tflite_int8"] = describe(path, "int8", verified, tflite_converter(tf)) | {
            "calibration": {"split": "train", "images": int(len(calibration)),
                            "seed": CALIBRATION_SEED},
            "io": {"images": "uint8 [n, 28, 28, 1], raw pixels (quantized inside: scale 1, "
                             "zero point -128, exact)",
                   "logits": "float32 [n, classes], dequantized from int8",
                   "probabilities": "float32 [n, classes], dequantized from int8 softmax "
                                    "(steps of 1/256)",
                   "classes": "int64 [n], argmax of the int8 logits"}}
    if "onnx" in wanted:
        path = model_dir / FILES["onnx"]
        path.write_bytes(convert_onnx(float_file))
        verified = verify_float("onnx", path, images, expected)
        entries["onnx"] = describe(path, "float32", verified, onnx_converter()) | {
            "opset": ONNX_OPSET, "from": FILES["tflite"]}
    return entries


def describe(path: Path, dtype: str, verified: dict, converter: str) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "dtype": dtype,
            "converter": converter, "verified": verified}


def tflite_converter(tf) -> str:
    return f"tf.lite.TFLiteConverter.from_saved_model (TensorFlow {tf.__version__})"


def onnx_converter() -> str:
    import importlib.metadata  # only here: a version to record

    return f"tf2onnx {importlib.metadata.version('tf2onnx')}"
