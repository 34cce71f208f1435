#!/usr/bin/env python3
"""Check every model an export holds, each through its own runtime (no JAX, no lenet-dist).

  python export/check_model.py MODEL_DIR --images t10k-images-idx3-ubyte.gz \\
      --labels t10k-labels-idx1-ubyte.gz [--markdown | --json] [--threads N]

The formats, when present in MODEL_DIR: the SavedModel (TensorFlow), model.tflite and
model_int8.tflite (ai-edge-litert, LiteRT) and model.onnx (onnxruntime). For each one,
a row of:
- reference: its outputs on the images stored at export time
  (assets.extra/reference.npz) against the JAX outputs stored with them. Float models:
  max |logits - JAX| within 1e-5 (SavedModel) or 1e-4 (TFLite, ONNX); int8: the same
  class as JAX on at least 95% of them.
- accuracy on --images with --labels, run at --batch images a call;
- size: the model's file (SavedModel: saved_model.pb and variables/);
- latency: at batch 1, the median and 90th percentile wall time (time.perf_counter
  around one call of the runtime, numpy in and out) of --runs calls on single images,
  after 10 warm-up calls; at batch --batch, the accuracy pass's wall time divided by its
  images (after one warm-up call of each batch shape).
Every runtime gets --threads threads (default 1). Exit status 0 when every format present
ran and matched its reference, 1 when one did not (or its runtime is missing), 2 on bad
input (--labels holding a label the model has no class for among it: never scored).
check_savedmodel.py checks the SavedModel further (its signature, TF1 sessions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_io as io  # noqa: E402

# format -> (file, runtime, pip package of that runtime)
FORMATS = {
    "savedmodel": ("saved_model.pb", "TensorFlow", "tensorflow-cpu"),
    "tflite": ("model.tflite", "LiteRT", "ai-edge-litert"),
    "tflite_int8": ("model_int8.tflite", "LiteRT", "ai-edge-litert"),
    "onnx": ("model.onnx", "onnxruntime", "onnxruntime"),
}
TOLERANCE = {"savedmodel": 1e-5, "tflite": 1e-4, "onnx": 1e-4}  # max |logits - JAX|
INT8_MIN_AGREEMENT = 0.95
WARMUP_CALLS = 10


class MissingRuntime(Exception):
    """The runtime a format needs is not installed; the message says which."""


class BadLabels(io.InputError):
    """--labels holds values the model has no class for: bad input for every format."""


def label_problem(path, labels: np.ndarray, num_classes: int) -> str | None:
    """Why `labels` cannot score a model of `num_classes` classes, or None: a label
    with no class could never be right, so an accuracy would measure the wrong file."""
    bad = np.unique(labels[labels >= num_classes])
    if not bad.size:
        return None
    shown = ", ".join(str(int(v)) for v in bad[:5])
    values = (f"label {shown}" if bad.size == 1 else
              f"labels {shown}" + (f", ... ({bad.size} values)" if bad.size > 5 else ""))
    return (f"{path} holds {values} outside the model's classes: the model has "
            f"{num_classes} classes (0..{num_classes - 1}); give the labels of its own "
            "dataset")


def model_classes(model_dir: Path) -> int | None:
    """The class count the export records (metadata.json's class_names, else the
    reference logits' width), so bad labels are refused before any runtime starts;
    None when it records neither (then each format's outputs decide)."""
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        names = json.loads((model_dir / "assets.extra" / "metadata.json").read_text())
        if isinstance(names.get("class_names"), list) and names["class_names"]:
            return len(names["class_names"])
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        with np.load(model_dir / "assets.extra" / "reference.npz") as ref:
            return int(ref["logits"].shape[1])
    return None


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null meanwhile: LiteRT logs an INFO line from C++."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def present_formats(model_dir: Path) -> list[str]:
    """The formats whose file is in `model_dir`, and any metadata.json lists (a listed
    file that is missing then fails its row)."""
    listed = set()
    meta = model_dir / "assets.extra" / "metadata.json"
    if meta.is_file():
        try:
            listed = set(json.loads(meta.read_text()).get("formats", {}))
        except (ValueError, AttributeError):
            pass
    return [f for f, (name, _, _) in FORMATS.items()
            if f in listed or (model_dir / name).is_file()]


def model_bytes(model_dir: Path, fmt: str) -> int:
    if fmt != "savedmodel":
        return (model_dir / FORMATS[fmt][0]).stat().st_size
    files = [model_dir / "saved_model.pb", *(model_dir / "variables").glob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def runner(model_dir: Path, fmt: str, threads: int):
    """images uint8 [n, 28, 28, 1] -> {output name: numpy array}, through the format's
    runtime, imported here so that each format needs only its own."""
    path = model_dir / FORMATS[fmt][0]
    if fmt == "savedmodel":
        try:
            tf = io.import_tensorflow()
        except io.InputError as e:  # here it means: check the other formats
            raise MissingRuntime(str(e)) from None
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already ran something: keep its threads
            pass
        import check_savedmodel  # here: it is this kit's, and needs TensorFlow

        return check_savedmodel.runner(model_dir, tf, session=False)
    if fmt.startswith("tflite"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise MissingRuntime(f"ai-edge-litert is not installed ({e}); "
                                 "pip install ai-edge-litert") from None
        with warnings.catch_warnings(), quiet_stderr():
            warnings.simplefilter("ignore")
            sig = Interpreter(model_path=str(path), num_threads=threads) \
                .get_signature_runner(io.SIGNATURE)
            sig(images=np.zeros((1, 28, 28, 1), np.uint8))  # it logs its delegate here
        return lambda x: {k: np.array(v) for k, v in sig(images=x).items()}
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingRuntime(f"onnxruntime is not installed ({e}); "
                             "pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda x: dict(zip(names, session.run(None, {"images": x})))


def check_reference(run, model_dir: Path, fmt: str) -> dict:
    path = model_dir / "assets.extra" / "reference.npz"
    if not path.is_file():
        return {"present": False, "ok": True, "text": "none stored"}
    ref = np.load(path)
    images = ref["images"]
    if fmt == "tflite_int8":
        classes = run_batched(run, images, len(images))["classes"]
        agree = float(np.mean(classes == ref["classes"]))
        ok = agree >= INT8_MIN_AGREEMENT
        return {"present": True, "images": int(len(images)), "class_agreement": agree,
                "ok": ok, "text": f"classes {agree:.1%} = JAX" + ("" if ok else " MISMATCH")}
    worst, agree = 0.0, True
    for n in sorted({1, min(7, len(images)), len(images)}):
        out = run(images[:n])
        diff = np.abs(out["logits"] - ref["logits"][:n]) \
            if out["logits"].shape == ref["logits"][:n].shape else np.array(np.inf)
        worst = max(worst, float(np.max(diff)) if np.all(np.isfinite(diff)) else np.inf)
        agree &= bool(np.array_equal(out["classes"], ref["classes"][:n]))
    ok = agree and worst <= TOLERANCE[fmt]
    return {"present": True, "images": int(len(images)), "max_abs_logit_diff": worst,
            "classes_agree": agree, "tolerance": TOLERANCE[fmt], "ok": ok,
            "text": f"logits ±{worst:.1e}" + ("" if ok else " MISMATCH")}


def run_batched(run, images: np.ndarray, batch: int) -> dict:
    parts = [run(images[i:i + batch]) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def accuracy_and_throughput(run, images, labels, batch: int, labels_path=None) -> dict:
    """Classes for all `images` at `batch` a call, timed after one warm-up call of each
    batch shape (TensorFlow compiles the XLA module once per shape); BadLabels when
    `labels` hold a value the model's outputs have no class for."""
    for n in {min(batch, len(images)), len(images) % batch or batch}:
        run(images[:n])
    start = time.perf_counter()
    out = run_batched(run, images, batch)
    seconds = time.perf_counter() - start
    result = {"images": int(len(images)), "batch": batch,
              "ms_per_image": 1e3 * seconds / len(images)}
    if labels is not None:
        problem = label_problem(labels_path, labels, out["probabilities"].shape[1])
        if problem:
            raise BadLabels(problem)
        correct = int(np.sum(out["classes"] == labels))
        result.update(correct=correct, accuracy=correct / len(labels))
    return result


def latency(run, images: np.ndarray, runs: int) -> dict:
    """Batch 1: median and p90 of `runs` calls on single images, after warm-up."""
    singles = [images[i % len(images)][None] for i in range(runs)]
    for x in singles[:WARMUP_CALLS]:
        run(x)
    times = []
    for x in singles:
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    ms = 1e3 * np.asarray(times)
    return {"calls": runs, "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90))}


def check_format(model_dir: Path, fmt: str, images, labels, args) -> dict:
    file, runtime, _ = FORMATS[fmt]
    row = {"format": fmt, "file": file, "runtime": runtime, "ok": False}
    if not (model_dir / file).is_file():
        row["problem"] = f"{file} is listed in metadata.json but missing"
        return row
    row["bytes"] = model_bytes(model_dir, fmt)
    try:
        run = runner(model_dir, fmt, args.threads)
        row["runtime_version"] = runtime_version(fmt)
        row["reference"] = check_reference(run, model_dir, fmt)
        if images is not None:
            row["accuracy"] = accuracy_and_throughput(run, images, labels, args.batch,
                                                      args.labels)
            row["latency"] = latency(run, images, args.runs)
    except MissingRuntime as e:
        row["problem"] = f"not run: {e}"
        return row
    except BadLabels:  # the input's fault, not this format's: main refuses it
        raise
    except Exception as e:  # each runtime raises its own types; all mean "cannot run it"
        row["problem"] = f"{runtime} cannot run it: {str(e).strip().splitlines()[0][:300]}"
        return row
    row["ok"] = row["reference"]["ok"]
    return row


def runtime_version(fmt: str) -> str | None:
    import importlib.metadata as md

    for package in {"savedmodel": ("tensorflow-cpu", "tensorflow"),
                    "onnx": ("onnxruntime",)}.get(fmt, ("ai-edge-litert",)):
        try:
            return f"{package} {md.version(package)}"
        except md.PackageNotFoundError:
            continue
    return None


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and its core count."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def table(rows: list[dict], markdown: bool, batch: int, runs: int) -> list[str]:
    head = ["format", "file", "size", "runtime", "reference", "accuracy",
            f"batch 1 ms/image (median, p90 of {runs})", f"batch {batch} ms/image"]
    body = []
    for r in rows:
        if "problem" in r:
            body.append([r["format"], r["file"], size_text(r.get("bytes")), r["runtime"],
                         "FAILED: " + r["problem"], "", "", ""])
            continue
        acc, lat = r.get("accuracy", {}), r.get("latency")
        body.append([
            r["format"], r["file"], size_text(r["bytes"]), r["runtime_version"] or r["runtime"],
            r["reference"]["text"],
            f"{acc['accuracy']:.4f}" if "accuracy" in acc else "",
            f"{lat['median_ms']:.3f}, {lat['p90_ms']:.3f}" if lat else "",
            f"{acc['ms_per_image']:.4f}" if acc else ""])
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
            ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in [head, *body]]


def size_text(n: int | None) -> str:
    return "" if n is None else f"{n / 1024:,.0f} KiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="an exported model directory (local)")
    ap.add_argument("--images", nargs="+", default=[], help="IDX (or image) files")
    ap.add_argument("--labels", help="IDX labels for --images: report accuracy")
    ap.add_argument("--formats", help="comma-separated subset to check: "
                                      + ", ".join(FORMATS) + " (default: all present)")
    ap.add_argument("--threads", type=int, default=1, help="threads per runtime (default 1)")
    ap.add_argument("--batch", type=int, default=256,
                    help="images per call for the accuracy pass (default 256)")
    ap.add_argument("--runs", type=int, default=200,
                    help="single-image calls timed for the batch-1 latency (default 200)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--markdown", action="store_true", help="print the table as markdown")
    out.add_argument("--json", action="store_true", help="print one JSON report instead")
    args = ap.parse_args(argv)
    for name in ("threads", "batch", "runs"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be at least 1", file=sys.stderr)
            return 2
    if "://" in args.model_dir:
        print(f"error: {args.model_dir} is a URL; copy the model to a local directory first",
              file=sys.stderr)
        return 2
    model_dir = Path(args.model_dir)
    try:
        if not model_dir.is_dir():
            raise io.InputError(f"{model_dir}: not a directory")
        formats = present_formats(model_dir)
        if args.formats:
            asked = [f.strip() for f in args.formats.split(",") if f.strip()]
            bad = [f for f in asked if f not in FORMATS]
            if bad or not asked:
                raise io.InputError(f"--formats {args.formats}: choose from "
                                    f"{', '.join(FORMATS)}")
            missing = [f for f in asked if f not in formats]
            if missing:
                raise io.InputError(f"{model_dir} holds no {', '.join(missing)} model")
            formats = [f for f in formats if f in asked]
        if not formats:
            raise io.InputError(f"{model_dir}: no model in it (saved_model.pb, "
                                "model.tflite, model_int8.tflite or model.onnx)")
        images = labels = None
        if args.images:
            images, _ = io.load_images(args.images)
            if args.labels:
                labels = io.read_labels(args.labels)
                if len(labels) != len(images):
                    raise io.InputError(f"{args.labels}: {len(labels)} labels for "
                                        f"{len(images)} images")
                classes = model_classes(model_dir)
                problem = classes and label_problem(args.labels, labels, classes)
                if problem:
                    raise BadLabels(problem)
        rows = [check_format(model_dir, f, images, labels, args) for f in formats]
    except io.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ok = all(r["ok"] for r in rows)
    report = {"model_dir": str(model_dir), "machine": machine(), "threads": args.threads,
              "images": 0 if images is None else int(len(images)), "rows": rows, "ok": ok}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if ok else 1
    print(f"{model_dir}: {len(rows)} format(s) on {report['machine']}, "
          f"{args.threads} thread(s) per runtime"
          + (f", {len(images):,} images" if images is not None else ""))
    print()
    for line in table(rows, args.markdown, args.batch, args.runs):
        print(line)
    print()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
