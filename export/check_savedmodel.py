#!/usr/bin/env python3
"""Check an exported LeNet SavedModel with TensorFlow alone (no JAX, no lenet-dist).

  python export/check_savedmodel.py MODEL_DIR                    # contract + reference
  python export/check_savedmodel.py MODEL_DIR --images t10k-images-idx3-ubyte.gz \\
      --labels t10k-labels-idx1-ubyte.gz                         # + accuracy
  python export/check_savedmodel.py MODEL_DIR --images shirt.png --show 5

Checks, in order: the serving signature's names, dtypes and shapes (read from
saved_model.pb, as TF Serving reads it); the outputs on the reference images
stored at export time (assets.extra/reference.npz) against the JAX outputs
stored with them, at batch 1, 7 and all; then predictions (and accuracy) on
--images. `--session` runs the model the way TF Serving does, through the
SignatureDef's tensor names in a TF1 session, instead of tf.saved_model.load.
Exit status 0 when every check passes, 1 when one fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_io as io  # noqa: E402

BATCH = 1024


def read_signature(model_dir: Path, tf) -> dict:
    """{'inputs'|'outputs': {name: (dtype, shape)}} from saved_model.pb's SignatureDef."""
    # here, not at the top: main imports TensorFlow with a one-line error if it is missing
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((model_dir / "saved_model.pb").read_bytes())
    graphs = [g for g in sm.meta_graphs if "serve" in g.meta_info_def.tags]
    if not graphs or io.SIGNATURE not in graphs[0].signature_def:
        raise io.InputError(f"{model_dir}: no '{io.SIGNATURE}' signature under tag 'serve'")
    sig = graphs[0].signature_def[io.SIGNATURE]

    def describe(tensors):
        return {name: (tf.dtypes.as_dtype(t.dtype).name,
                       tuple(-1 if d.size < 0 else d.size for d in t.tensor_shape.dim))
                for name, t in tensors.items()}

    return {"inputs": describe(sig.inputs), "outputs": describe(sig.outputs)}


def contract_problems(signature: dict) -> list[str]:
    problems = []
    for side, expected in (("inputs", io.INPUTS), ("outputs", io.OUTPUTS)):
        got = signature[side]
        if set(got) != set(expected):
            problems.append(f"{side} are {sorted(got)}, expected {sorted(expected)}")
        for name in set(got) & set(expected):
            if tuple(got[name]) != expected[name]:
                problems.append(f"{side[:-1]} {name} is {got[name]}, expected {expected[name]}")
    return problems


def runner(model_dir: Path, tf, session: bool):
    """images uint8 [n, 28, 28, 1] -> {output name: numpy array}."""
    if not session:
        fn = tf.saved_model.load(str(model_dir)).signatures[io.SIGNATURE]
        return lambda x: {k: v.numpy() for k, v in fn(images=tf.constant(x)).items()}
    graph = tf.Graph()
    sess = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(model_dir))
    sig = meta.signature_def[io.SIGNATURE]
    feed = sig.inputs["images"].name
    fetch = {k: v.name for k, v in sig.outputs.items()}
    return lambda x: sess.run(fetch, {feed: x})


def run_batched(run, images: np.ndarray) -> dict:
    parts = [run(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def check_reference(run, model_dir: Path, tolerance: float) -> dict:
    path = model_dir / "assets.extra" / "reference.npz"
    if not path.is_file():
        return {"present": False}
    ref = np.load(path)
    images, worst, agree = ref["images"], 0.0, True
    for n in sorted({1, min(7, len(images)), len(images)}):
        out = run(images[:n])
        diff = np.abs(out["logits"] - ref["logits"][:n])
        worst = max(worst, float(np.max(diff)) if np.all(np.isfinite(diff)) else np.inf)
        agree &= bool(np.array_equal(out["classes"], ref["classes"][:n]))
    return {"present": True, "images": int(len(images)), "max_abs_logit_diff": worst,
            "classes_agree": agree, "ok": agree and worst <= tolerance}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="a local SavedModel directory")
    ap.add_argument("--images", nargs="+", default=[], help="IDX or PNG/JPEG/GIF/BMP files")
    ap.add_argument("--labels", help="IDX labels for --images: report accuracy")
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="max |logits - reference| (default 1e-5)")
    ap.add_argument("--session", action="store_true",
                    help="run through a TF1 session by SignatureDef names, as TF Serving does")
    ap.add_argument("--show", type=int, default=10, help="predictions to print (default 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON report instead")
    args = ap.parse_args(argv)
    if "://" in args.model_dir:  # pathlib would read gs://b/m as the local gs:/b/m
        print(f"error: {args.model_dir} is a URL; this check reads a local directory, so "
              f"copy the model first (gcloud storage cp -r {args.model_dir} .)",
              file=sys.stderr)
        return 2
    args.model_dir = Path(args.model_dir)

    try:
        tf = io.import_tensorflow()
        if not (args.model_dir / "saved_model.pb").is_file():
            raise io.InputError(f"{args.model_dir}: not a SavedModel (no saved_model.pb)")
        report: dict = {"model_dir": str(args.model_dir), "tensorflow": tf.__version__}
        signature = read_signature(args.model_dir, tf)
        report["signature"] = {side: {k: [d, list(s)] for k, (d, s) in v.items()}
                               for side, v in signature.items()}
        report["contract_problems"] = contract_problems(signature)
        run = runner(args.model_dir, tf, args.session)
        try:
            report["reference"] = check_reference(run, args.model_dir, args.tolerance)
        except tf.errors.OpError as e:  # e.g. StableHLO newer than this TF reads
            print(f"FAILED: TensorFlow {tf.__version__} cannot run the model: "
                  f"{str(e).strip().splitlines()[0][:300]}", file=sys.stderr)
            return 1
        names = io.class_names(args.model_dir)
        if args.images:
            images, image_names = io.load_images(args.images)
            out = run_batched(run, images)
            report["predictions"] = [
                {"input": n, "class": int(c), "name": names[int(c)],
                 "probability": float(p[int(c)])}
                for n, c, p in zip(image_names, out["classes"], out["probabilities"])]
            if args.labels:
                truth = io.read_labels(args.labels)
                if len(truth) != len(images):
                    raise io.InputError(f"{args.labels}: {len(truth)} labels for "
                                        f"{len(images)} images")
                correct = int(np.sum(out["classes"] == truth))
                report["accuracy"] = {"correct": correct, "count": int(len(truth)),
                                      "accuracy": correct / len(truth)}
    except io.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ref = report["reference"]
    report["ok"] = not report["contract_problems"] and ref.get("ok", True)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1

    print(f"SavedModel {args.model_dir} (TensorFlow {tf.__version__}"
          f"{', TF1 session like TF Serving' if args.session else ''})")
    for side in ("inputs", "outputs"):
        for k, (d, s) in signature[side].items():
            print(f"  {side[:-1]:<6} {k:<13} {d:<8} {list(s)}")
    for p in report["contract_problems"]:
        print(f"  CONTRACT: {p}")
    if ref["present"]:
        verdict = "ok" if ref["ok"] else "MISMATCH"
        print(f"reference: {ref['images']} images, max |logit diff| "
              f"{ref['max_abs_logit_diff']:.1e} (tolerance {args.tolerance:g}), classes "
              f"{'agree' if ref['classes_agree'] else 'DIFFER'}: {verdict}")
    else:
        print("reference: none stored (assets.extra/reference.npz missing)")
    for row in report.get("predictions", [])[:args.show]:
        print(f"  {row['input']}: {row['name']} {row['probability']:.3f}")
    if len(report.get("predictions", [])) > args.show:
        print(f"  ... {len(report['predictions']) - args.show} more (--show N)")
    if "accuracy" in report:
        a = report["accuracy"]
        print(f"accuracy {a['accuracy']:.4f} on {a['count']:,} images ({a['correct']:,} correct)")
    print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
