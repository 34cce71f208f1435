"""`lenet-dist predict`: a SavedModel and a checkpoint classify files alike."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lenet_dist.cli import main
from lenet_dist.restore import restore_checkpoint
from lenet_dist.mesh import Shardings, make_mesh
from tests.conftest import (one_line_error, png_bytes,
                            write_idx)


def test_predict_savedmodel_and_checkpoint_agree(exported, trained, dataset, capsys, tmp_path):
    import tensorflow as tf

    model, _ = exported
    files = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(png_bytes(tf, dataset.test.images[i]))
        files.append(str(p))
    idx = write_idx(tmp_path / "few-idx3-ubyte", dataset.test.images[:5, ..., 0])
    labels = write_idx(tmp_path / "few-labels-idx1-ubyte", dataset.test.labels[:5])
    msg = one_line_error(capsys, ["predict", "--model", str(model), *files, str(idx),
                                  "--labels", str(labels)])
    assert "has 5 labels for 8 images" in msg

    assert main(["predict", "--model", str(model), str(idx), "--labels", str(labels)]) == 0
    tf_out = capsys.readouterr().out.splitlines()
    assert main(["predict", "--workdir", trained.config.workdir, str(idx),
                 "--labels", str(labels)]) == 0
    jax_out = capsys.readouterr().out.splitlines()
    assert len(tf_out) == 6 and tf_out[-1].startswith("accuracy ")
    # Same class per image; probabilities agree to the printed 3 decimals; the
    # accuracy line names the model each read.
    assert tf_out[:-1] == jax_out[:-1]
    score = tf_out[-1].removesuffix(f" ({model})")
    assert score.endswith(" on 5 images") and jax_out[-1] == \
        f"{score} ({trained.config.workdir})", (tf_out, jax_out)

    assert main(["predict", "--model", str(model), *files, "--top", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == files
    assert all(len(r["predictions"]) == 3 for r in rows)
    # A PNG of a test image is the same pixels after the 28x28 "resize": same answer.
    names = (model / "assets" / "labels.txt").read_text().splitlines()
    restored = restore_checkpoint(trained.config.workdir, Shardings(make_mesh(1)))
    expected = np.asarray(restored.forward(restored.variables, dataset.test.images[:3])["classes"])
    assert [r["predictions"][0]["class"] for r in rows] == [names[c] for c in expected]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not an image at all"), "is not a PNG, JPEG, GIF, BMP or IDX"),
    (lambda p: p.write_bytes(b""), "is empty"),
    # A valid PNG signature and IHDR claiming 100,000 x 100,000 pixels: refused unread.
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
                             + (100_000).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00"),
     "is 100000x100000 pixels; the limit is 8192"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10), "cannot be decoded as PNG"),
    (lambda p: write_idx(p, np.zeros((2, 10, 10))), "expected images [n, 28, 28]"),
    (lambda p: write_idx(p, np.zeros((4,))), "is an IDX label file"),
    (lambda p: write_idx(p, np.zeros((2, 28, 28)), cut=100), "is truncated"),
    (lambda p: write_idx(p, np.zeros((0, 28, 28))), "holds no images"),
    (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 40), "cannot read"),
    # dims 65536^4 overflow int64 to 0: must be "truncated", not a crash
    (lambda p: p.write_bytes(b"\x00\x00\x08\x04" + (65536).to_bytes(4, "big") * 4),
     "is truncated"),
])
def test_predict_bad_inputs(exported, capsys, tmp_path, make, message):
    model, _ = exported
    bad = tmp_path / "input.bin"
    make(bad)
    assert message in one_line_error(capsys, ["predict", "--model", str(model), str(bad)])


def test_predict_needs_one_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: nothing to read by default
    msg = one_line_error(capsys, ["predict", str(tmp_path / "x.png")])
    assert "give --model (SavedModel) or --workdir: there is no run under runs/ to read" in msg
    msg = one_line_error(capsys, ["predict", "--model", str(tmp_path), "--workdir",
                                  str(tmp_path), str(tmp_path / "x.png")])
    assert "give exactly one of --model (SavedModel) or --workdir" in msg
    msg = one_line_error(capsys, ["predict", "--model", str(tmp_path), str(tmp_path / "x.png")])
    assert "is not a SavedModel directory" in msg


# predict --model in a fresh interpreter where JAX and its libraries cannot be imported.
WITHOUT_JAX = """
import json, sys
for name in ("jax", "jaxlib", "flax", "optax", "orbax"):
    sys.modules[name] = None  # any import of these now fails
from lenet_dist.prediction import predict
result = predict([sys.argv[2]], model=sys.argv[1], labels=sys.argv[3])
print(json.dumps({"accuracy": result["accuracy"]}))
"""


def test_predict_from_a_savedmodel_runs_without_jax(exported, test_idx, trained):
    from lenet_dist import model, serving_contract

    assert serving_contract.NUM_CLASSES == model.NUM_CLASSES
    images, labels = map(str, test_idx)
    proc = subprocess.run([sys.executable, "-c", WITHOUT_JAX, str(exported[0]), images, labels],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["accuracy"] == pytest.approx(trained.final["test_accuracy"], abs=1e-6)
