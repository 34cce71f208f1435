#!/usr/bin/env python3
"""Classify images with a LeNet model served by TensorFlow Serving's REST API.

  python export/rest_client.py shirt.png boot.png
  python export/rest_client.py t10k-images-idx3-ubyte.gz --labels t10k-labels-idx1-ubyte.gz
  python export/rest_client.py shirt.png --write-request request.json   # for curl

Needs numpy, and Pillow to decode PNG/JPEG/GIF/BMP files (IDX files need
nothing more). Sends the columnar "inputs" format to
{url}/v1/models/{model}[/versions/{version}]:predict and reads "outputs".
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_io as io  # noqa: E402


def predict_url(url: str, model: str, version: int | None) -> str:
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    return url.rstrip("/") + path


def request_body(images: np.ndarray) -> dict:
    return {"signature_name": io.SIGNATURE, "inputs": {"images": images.tolist()}}


def parse_response(body: dict, n: int) -> dict[str, np.ndarray]:
    """TF Serving answers {"outputs": {name: values}} to a columnar request."""
    if "error" in body:
        raise RuntimeError(f"server error: {body['error']}")
    out = body.get("outputs")
    if not isinstance(out, dict) or not {"probabilities", "classes"} <= set(out):
        raise RuntimeError(f"unexpected response keys: {sorted(body)}")
    probs = np.asarray(out["probabilities"], np.float32).reshape(n, -1)
    classes = np.asarray(out["classes"], np.int64).reshape(n)
    return {"probabilities": probs, "classes": classes}


def post(url: str, body: dict, timeout: float) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise RuntimeError(f"HTTP {e.code} from {url}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise RuntimeError(f"cannot reach {url}: {getattr(e, 'reason', e)}; is TF Serving "
                           "running (export/serve.sh)?") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="PNG/JPEG/GIF/BMP or IDX image files")
    ap.add_argument("--url", default="http://localhost:8501")
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--version", type=int, default=None, help="[default: the latest]")
    ap.add_argument("--labels", help="IDX labels for the images: report accuracy")
    ap.add_argument("--class-names", help="labels.txt [default: Fashion-MNIST's]")
    ap.add_argument("--batch", type=int, default=256, help="images per request")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--write-request", type=Path,
                    help="write the first request's JSON here and exit")
    args = ap.parse_args(argv)

    try:
        names = (io.read_class_names(args.class_names) if args.class_names else
                 ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"])
        images, image_names = io.load_images(args.images)
        truth = io.read_labels(args.labels) if args.labels else None
        if truth is not None and len(truth) != len(images):
            raise io.InputError(f"{args.labels}: {len(truth)} labels for {len(images)} images")
    except io.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.write_request:
        args.write_request.write_text(json.dumps(request_body(images[:args.batch])))
        print(f"wrote {args.write_request}: POST it to "
              f"{predict_url(args.url, args.model, args.version)}")
        return 0

    url = predict_url(args.url, args.model, args.version)
    classes = []
    try:
        for i in range(0, len(images), args.batch):
            chunk = images[i:i + args.batch]
            out = parse_response(post(url, request_body(chunk), args.timeout), len(chunk))
            classes.append(out["classes"])
            if truth is None:
                for n, c, p in zip(image_names[i:], out["classes"], out["probabilities"]):
                    print(f"{n}: {names[c]} {p[c]:.3f}")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if truth is not None:
        hits = int(np.sum(np.concatenate(classes) == truth))
        print(f"accuracy {hits / len(images):.4f} on {len(images):,} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
