"""SavedModel export: served by TensorFlow alone, it answers what JAX answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lenet_dist import serialization
from lenet_dist.cli import main
from lenet_dist.errors import UserError
from lenet_dist.evaluate import restore_params
from lenet_dist.export import export_checkpoint
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.step import infer
from tests.conftest import write_idx

ROOT = Path(__file__).resolve().parents[1]
JAX_FREE = ("jax", "jaxlib", "flax", "optax", "orbax", "lenet_dist")

# Runs in a fresh interpreter that cannot import JAX or lenet_dist at all.
TF_ONLY = """
import json, sys
for name in {jax_free!r}:
    sys.modules[name] = None  # any import of these now fails
sys.path.insert(0, {export_dir!r})
import numpy as np
import check_savedmodel, serving_io
import tensorflow as tf
model, images_file, labels_file, out = sys.argv[1:5]
images = serving_io.read_idx(images_file)[..., None]
served = tf.saved_model.load(model).signatures["serving_default"]
logits = {{str(n): served(images=tf.constant(images[:n]))["logits"].numpy() for n in (1, 7, 256)}}
restored = tf.saved_model.load(model)  # keep a reference: it owns the variables
method = restored.serve(tf.constant(images[:7]))["logits"].numpy()
assert np.array_equal(method, logits["7"])  # the restored object's method runs as well
np.savez(out + ".npz", **logits)
rc = check_savedmodel.main([model, "--images", images_file, "--labels", labels_file, "--json"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {jax_free!r}
                and sys.modules[m] is not None)
print(json.dumps({{"rc": rc, "loaded": loaded}}))
"""


@pytest.fixture(scope="module")
def test_idx(dataset, tmp_path_factory):
    """The fixture dataset's test split as IDX files (what a serving host would have)."""
    d = tmp_path_factory.mktemp("test-idx")
    images = write_idx(d / "t10k-images-idx3-ubyte", dataset.test.images[..., 0])
    labels = write_idx(d / "t10k-labels-idx1-ubyte", dataset.test.labels)
    return images, labels


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "lenet" / "1"
    info = export_checkpoint(trained.config.workdir, str(out))
    return out, info


@pytest.fixture(scope="module")
def jax_params(trained):
    params, *_ = restore_params(trained.config.workdir, None, False, Shardings(make_mesh(1)))
    return jax.device_get(params)


def tf_only_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_tensorflow_alone_matches_jax_and_the_checkpoint(exported, jax_params, dataset,
                                                         test_idx, trained, tmp_path):
    model, _ = exported
    out = tmp_path / "tf"
    proc = subprocess.run(
        [sys.executable, "-c", TF_ONLY.format(jax_free=JAX_FREE, export_dir=str(ROOT / "export")),
         str(model), *map(str, test_idx), str(out)],
        capture_output=True, text=True, env=tf_only_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    report = json.loads("\n".join(lines[:-1]))
    assert summary == {"rc": 0, "loaded": []}

    expected = np.asarray(jax.jit(infer)(jax_params, dataset.test.images[:256])["logits"])
    tf_logits = np.load(str(out) + ".npz")
    for n in (1, 7, 256):
        assert np.max(np.abs(tf_logits[str(n)] - expected[:n])) <= 1e-5, n

    # Every test image, served by TensorFlow: the same accuracy the checkpoint recorded
    # (computed by the 8-device JAX eval during training).
    acc = report["accuracy"]
    assert acc["count"] == len(dataset.test)
    assert acc["correct"] == round(trained.history[-1]["test_accuracy"] * len(dataset.test))
    assert report["reference"]["ok"] and report["reference"]["classes_agree"]
    assert report["contract_problems"] == []


def test_signature_as_saved_model_cli_shows_it(exported):
    model, _ = exported
    cli = Path(sys.executable).with_name("saved_model_cli")
    proc = subprocess.run([str(cli), "show", "--all", "--dir", str(model)], capture_output=True,
                          text=True, env=tf_only_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sig = proc.stdout.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    assert ("inputs['images'] tensor_info:\n        dtype: DT_UINT8\n"
            "        shape: (-1, 28, 28, 1)") in sig
    for name, dtype, shape in (("logits", "DT_FLOAT", "(-1, 10)"),
                               ("probabilities", "DT_FLOAT", "(-1, 10)"),
                               ("classes", "DT_INT64", "(-1)")):
        assert (f"outputs['{name}'] tensor_info:\n        dtype: {dtype}\n"
                f"        shape: {shape}") in sig, name
    assert "Method name is: tensorflow/serving/predict" in sig


def test_metadata_labels_and_reference(exported, trained):
    model, info = exported
    meta = json.loads((model / "assets.extra" / "metadata.json").read_text())
    assert meta == json.loads(json.dumps(info))
    assert meta["checkpoint"]["step"] == trained.state.step
    assert meta["checkpoint"]["test_accuracy"] == trained.history[-1]["test_accuracy"]
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    ser = meta["serialization"]
    plan = serialization.installed_plan()
    assert ser["stablehlo_version"] == plan.stablehlo
    assert serialization.parse_version(ser["stablehlo_version"]) <= \
        serialization.parse_version(ser["tensorflow_max_stablehlo"])
    assert meta["versions"]["jax"] == jax.__version__ and meta["versions"]["tensorflow"]
    assert meta["reference"]["max_abs_logit_diff"] <= 1e-5
    # Every module in the file (the signature's and the restored method's) was
    # written for what this TensorFlow reads.
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((model / "saved_model.pb").read_bytes())
    modules = [m for g in saved.meta_graphs for m in serialization.xla_call_modules(g.graph_def)]
    assert len(modules) >= 2 and set(modules) == {(plan.calling_convention, plan.stablehlo)}
    import tensorflow as tf

    graph_sig = load_kit_module("check_savedmodel").read_signature(model, tf)
    promised = {side: {k: (v["dtype"], tuple(v["shape"]))
                       for k, v in meta["signature"][side].items()}
                for side in ("inputs", "outputs")}
    assert graph_sig == promised  # metadata.json describes the graph TF Serving will read
    labels = (model / "assets" / "labels.txt").read_text().splitlines()
    assert labels[0] == "T-shirt/top" and labels[9] == "Ankle boot" and len(labels) == 10
    ref = np.load(model / "assets.extra" / "reference.npz")
    assert ref["images"].shape == (256, 28, 28, 1) and ref["images"].dtype == np.uint8
    assert ref["logits"].shape == (256, 10)


# ---------------------------------------------------------------- version negotiation

PRODUCER = serialization.Producer(stablehlo_default="1.18.0", stablehlo_min="0.9.0",
                                  calling_convention_min=9, calling_convention_default=10)


@pytest.mark.parametrize("tf_max, cc_max, expected", [
    ("1.13.7", 10, ("1.13.7", 10)),   # TF 2.21: older StableHLO than jax writes
    ("1.22.0", 10, ("1.18.0", 10)),   # newer TF: jax's own default
    ("1.9.10", 9, ("1.9.10", 9)),     # patch versions compare numerically, not as text
])
def test_negotiate_picks_the_newest_both_accept(tf_max, cc_max, expected):
    plan = serialization.negotiate(PRODUCER, serialization.Consumer(tf_max, cc_max))
    assert (plan.stablehlo, plan.calling_convention) == expected


@pytest.mark.parametrize("consumer, message", [
    (serialization.Consumer("0.8.1", 10), "reads StableHLO <= 0.8.1, but jax"),
    (serialization.Consumer("1.13.7", 8), "runs XlaCallModule <= v8, but jax"),
])
def test_negotiate_refuses_what_cannot_be_reconciled(consumer, message):
    with pytest.raises(UserError, match=message):
        serialization.negotiate(PRODUCER, consumer)


def test_incompatible_tensorflow_is_caught_at_export_time(trained, exported, monkeypatch,
                                                         tmp_path):
    import shutil

    out = tmp_path / "m"
    shutil.copytree(exported[0], out)  # a model already served from here
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    monkeypatch.setattr(serialization, "consumer",
                        lambda: serialization.Consumer("0.5.0", 10))
    with pytest.raises(UserError, match="reads StableHLO <= 0.5.0"):
        export_checkpoint(trained.config.workdir, str(out), overwrite=True)
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_tensorflow_that_overstates_its_version_is_caught_by_the_verify_step(
        trained, monkeypatch, tmp_path):
    """The failure the negotiation exists for: jax's default StableHLO saves fine and
    only fails when TensorFlow runs it. Export runs it, so it fails there, not in serving."""
    real = serialization.consumer()
    monkeypatch.setattr(serialization, "consumer",
                        lambda: serialization.Consumer("1.99.0", real.calling_convention_max))
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="fails when TensorFlow runs it"):
        export_checkpoint(trained.config.workdir, str(tmp_path / "m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # no staging left


def test_check_saved_model_rejects_a_naive_save(tmp_path):
    """A SavedModel saved without serialize_for carries jax's own StableHLO; the check
    reads the file and refuses it for a TensorFlow that reads less."""
    import tensorflow as tf

    from lenet_dist.export import build_module
    from lenet_dist.model import init_params

    (tmp_path / "labels.txt").write_text("x\n")
    module = build_module(tf, jax.device_get(init_params(jax.random.key(0))), ("cpu",),
                          tmp_path / "labels.txt")
    tf.saved_model.save(module, str(tmp_path / "m"),
                        signatures={"serving_default": module.serve.get_concrete_function()})
    prod = serialization.producer()
    old_tf = serialization.negotiate(prod, serialization.Consumer("1.0.0", 10))
    with pytest.raises(UserError, match=f"export wrote StableHLO {prod.stablehlo_default}, "
                                        "newer than TensorFlow reads \\(1.0.0\\)"):
        serialization.check_saved_model(tmp_path / "m", old_tf)


def test_the_version_patch_is_scoped():
    """serialize_for writes the plan's version (an old one, whatever TF is installed),
    and only inside the block."""
    from jax._src.export import _export

    def export_double():
        exp = jax.export.export(jax.jit(lambda x: x * 2))(jax.ShapeDtypeStruct((3,), np.float32))
        return serialization.artifact_version(exp.mlir_module_serialized), \
            exp.calling_convention_version

    prod = serialization.producer()
    plan = serialization.negotiate(prod, serialization.Consumer("1.0.0", 9))
    before = _export._module_to_bytecode
    with serialization.serialize_for(plan):
        assert export_double() == ("1.0.0", 9)
    assert _export._module_to_bytecode is before
    assert export_double() == (prod.stablehlo_default, prod.calling_convention_default)


# ---------------------------------------------------------------- CLI and bad input


def one_line_error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_cli_refuses_an_existing_output_unless_overwrite(trained, exported, capsys,
                                                               tmp_path):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(exported[0], out)  # an earlier export
    (out / "precious.txt").write_text("keep me")
    argv = ["export", "--workdir", trained.config.workdir, "--out", str(out),
            "--platforms", "cpu"]
    assert "already exists; pass --overwrite" in one_line_error(capsys, argv)
    assert (out / "precious.txt").read_text() == "keep me"

    assert main(argv + ["--overwrite", "--best"]) == 0
    text = capsys.readouterr().out
    assert f"exported step {trained.state.step}" in text and "StableHLO" in text
    assert (out / "saved_model.pb").is_file() and not (out / "precious.txt").exists()
    meta = json.loads((out / "assets.extra" / "metadata.json").read_text())
    assert meta["platforms"] == ["cpu"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or backup left


@pytest.mark.parametrize("extra, message", [
    (["--step", "12345"], "no checkpoint at step 12345"),
    (["--platforms", "cpu,gpu"], "--platforms cpu,gpu: choose from cpu, cuda, rocm, tpu"),
    (["--platforms", "tpu"], "--platforms tpu: include cpu; the export is checked"),
    (["--step", "1", "--best"], "--step and --best are exclusive"),
])
def test_export_bad_options(trained, capsys, tmp_path, extra, message):
    argv = ["export", "--workdir", trained.config.workdir, "--out", str(tmp_path / "m"), *extra]
    assert message in one_line_error(capsys, argv)
    assert not (tmp_path / "m").exists()


def test_export_never_replaces_what_is_not_a_model(trained, capsys, tmp_path, monkeypatch):
    work = Path(trained.config.workdir)
    before = sorted(p.name for p in work.iterdir())
    for out, message in ((work, "would replace the training run"),
                         (work.parent, "would replace the training run"),
                         (work / "checkpoints" / "x", "is inside the checkpoints of")):
        msg = one_line_error(capsys, ["export", "--workdir", str(work), "--out", str(out),
                                      "--overwrite"])
        assert message in msg, msg
    assert sorted(p.name for p in work.iterdir()) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    msg = one_line_error(capsys, ["export", "--workdir", str(work), "--out", str(notes),
                                  "--overwrite"])
    assert "is not a SavedModel (no saved_model.pb); --overwrite only replaces" in msg
    assert (notes / "todo.txt").read_text() == "mine"

    (tmp_path / "file").write_text("x")
    msg = one_line_error(capsys, ["export", "--workdir", str(work), "--out",
                                  str(tmp_path / "file")])
    assert "exists and is not a directory" in msg

    monkeypatch.chdir(notes)
    msg = one_line_error(capsys, ["export", "--workdir", str(work), "--out", ".", "--overwrite"])
    assert "would replace the current directory" in msg
    assert (notes / "todo.txt").read_text() == "mine"


def test_a_diverged_checkpoint_is_not_exported(trained, monkeypatch, tmp_path):
    from lenet_dist import evaluate

    real = evaluate.restore_params

    def nan_params(*args, **kwargs):
        params, *rest = real(*args, **kwargs)
        return (jax.tree.map(lambda p: p * np.nan, params), *rest)

    monkeypatch.setattr(evaluate, "restore_params", nan_params)
    with pytest.raises(UserError, match="has NaN or infinite parameters"):
        export_checkpoint(trained.config.workdir, str(tmp_path / "m"))
    assert list(tmp_path.iterdir()) == []


def test_export_without_checkpoints(capsys, tmp_path):
    msg = one_line_error(capsys, ["export", "--workdir", str(tmp_path), "--out",
                                  str(tmp_path / "m")])
    assert "no checkpoints in" in msg


def test_export_without_tensorflow_says_how_to_install(trained, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    msg = one_line_error(capsys, ["export", "--workdir", trained.config.workdir, "--out",
                                  str(tmp_path / "m")])
    assert "TensorFlow is not installed" in msg and "pip install tensorflow-cpu==" in msg


def png_bytes(tf, array):
    return tf.io.encode_png(np.asarray(array, np.uint8)).numpy()


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
    # Same class per image; probabilities agree to the printed 3 decimals.
    assert tf_out == jax_out

    assert main(["predict", "--model", str(model), *files, "--top", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == files
    assert all(len(r["predictions"]) == 3 for r in rows)
    # A PNG of a test image is the same pixels after the 28x28 "resize": same answer.
    names = (model / "assets" / "labels.txt").read_text().splitlines()
    expected = np.asarray(jax.jit(infer)(restore_params(
        trained.config.workdir, None, False, Shardings(make_mesh(1)))[0],
        dataset.test.images[:3])["classes"])
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


def test_predict_needs_one_model(capsys, tmp_path):
    msg = one_line_error(capsys, ["predict", str(tmp_path / "x.png")])
    assert "give exactly one of --model (SavedModel) or --workdir" in msg
    msg = one_line_error(capsys, ["predict", "--model", str(tmp_path), str(tmp_path / "x.png")])
    assert "is not a SavedModel directory" in msg


# ---------------------------------------------------------------- REST client


def load_kit_module(name):
    import importlib.util

    sys.path.insert(0, str(ROOT / "export"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "export" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "export"))


@pytest.fixture
def fake_tf_serving(exported):
    """A stand-in for TF Serving's REST predict API (columnar format), backed by the
    SavedModel; records the requests it gets."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import tensorflow as tf

    model, _ = exported
    served = tf.saved_model.load(str(model)).signatures["serving_default"]
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if self.path != "/v1/models/lenet:predict":
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b'{"error": "Servable not found"}')
                return
            images = np.asarray(body["inputs"]["images"], np.uint8)
            out = {k: v.numpy().tolist() for k, v in served(images=tf.constant(images)).items()}
            payload = json.dumps({"outputs": out}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_rest_client_against_the_serving_api(fake_tf_serving, test_idx, dataset, exported,
                                             capsys, tmp_path):
    url, seen = fake_tf_serving
    client = load_kit_module("rest_client")
    images, labels = map(str, test_idx)
    assert client.main([images, "--labels", labels, "--url", url, "--batch", "4096"]) == 0
    line = capsys.readouterr().out.strip()
    _, info = exported
    n = len(dataset.test)
    assert line == f"accuracy {info['checkpoint']['test_accuracy']:.4f} on {n:,} images"
    assert len(seen) == -(-n // 4096) and seen[0][1]["signature_name"] == "serving_default"

    req = tmp_path / "request.json"
    assert client.main([images, "--write-request", str(req), "--batch", "2"]) == 0
    body = json.loads(req.read_text())
    assert np.asarray(body["inputs"]["images"]).shape == (2, 28, 28, 1)

    assert client.main([images, "--url", url, "--model", "other"]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert client.main([images, "--url", "http://127.0.0.1:9", "--timeout", "5"]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


# ---------------------------------------------------------------- image formats

# 1x1 GIF, one opaque white pixel (GIF cannot be written by TensorFlow).
WHITE_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
             b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


def bmp_bytes(gray):
    """24-bit BMP of a [h, w] uint8 image (bottom-up rows padded to 4 bytes)."""
    h, w = gray.shape
    row = (3 * w + 3) // 4 * 4
    pixels = b"".join(np.repeat(gray[y], 3).tobytes().ljust(row, b"\0")
                      for y in range(h - 1, -1, -1))
    header = b"BM" + (54 + len(pixels)).to_bytes(4, "little") + b"\0" * 4 + \
        (54).to_bytes(4, "little")
    info = (40).to_bytes(4, "little") + w.to_bytes(4, "little") + h.to_bytes(4, "little") + \
        (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + b"\0" * 24
    return header + info + pixels


def test_every_image_format_decodes_alike_in_predict_and_the_kit(dataset, tmp_path):
    """RGB, gray+alpha and RGBA PNG, BMP and GIF; transparency is the dataset's black
    background; lenet-dist and the TF-only kit read the same pixels."""
    import tensorflow as tf

    from lenet_dist.images import load_inputs

    kit = load_kit_module("serving_io")
    img = dataset.test.images[0]  # [28, 28, 1], light object on black
    alpha = np.where(img > 0, 255, 0).astype(np.uint8)
    files = {
        "rgb.png": png_bytes(tf, np.repeat(img, 3, axis=-1)),
        "gray-alpha.png": png_bytes(tf, np.concatenate([img, alpha], -1)),
        # transparent pixels are white in colour: they must still read as black
        "rgba.png": png_bytes(tf, np.concatenate(
            [np.repeat(np.where(alpha > 0, img, 255), 3, -1), alpha], -1)),
        "img.bmp": bmp_bytes(img[..., 0]),
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        paths = [str(tmp_path / name)]
        ours = load_inputs(paths)[0][0]
        np.testing.assert_array_equal(ours, img, err_msg=name)
        np.testing.assert_array_equal(kit.load_images(paths, tf)[0][0], ours, err_msg=name)

    (tmp_path / "white.gif").write_bytes(WHITE_GIF)
    gif = load_inputs([str(tmp_path / "white.gif")])[0][0]
    assert gif.shape == (28, 28, 1) and np.all(gif == 255)
    assert np.all(load_inputs([str(tmp_path / "white.gif")], invert=True)[0][0] == 0)

    (tmp_path / "img.jpg").write_bytes(tf.io.encode_jpeg(img, quality=95).numpy())
    jpg = load_inputs([str(tmp_path / "img.jpg")])[0][0]
    assert np.mean(np.abs(jpg.astype(int) - img)) < 4  # lossy, but the same picture


def test_a_corrupt_jpeg_is_one_line_even_at_the_file_descriptor(exported, capfd, tmp_path):
    """libjpeg writes to fd 2 itself; predict keeps stderr to its one line."""
    import tensorflow as tf

    model, _ = exported
    good = tf.io.encode_jpeg(np.full((40, 30, 1), 200, np.uint8)).numpy()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(good[:300])
    assert main(["predict", "--model", str(model), str(bad)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad} cannot be decoded as JPEG"), err
