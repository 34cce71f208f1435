"""TFLite and ONNX exports (`export --format tflite,onnx --quantize int8`): each model is
checked against JAX before it is published with the SavedModel, and the kit's checker
runs every format without JAX."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lenet_dist import edge
from lenet_dist import publishing
from lenet_dist import serving_contract as contract
from lenet_dist.errors import UserError
from lenet_dist.exporting import export_checkpoint
from tests.conftest import ROOT, load_kit_module, one_line_error, write_dataset

MODELS = ("model.tflite", "model_int8.tflite", "model.onnx")


@pytest.fixture(scope="module")
def edge_exported(trained, tmp_path_factory):
    """The trained run exported in every format, int8 too (about 10 s)."""
    out = tmp_path_factory.mktemp("edge") / "lenet" / "1"
    info = export_checkpoint(trained.config.workdir, str(out), platforms=("cpu",),
                             formats="tflite,onnx", quantize="int8")
    return out, info


def test_every_format_is_published_verified_and_recorded(edge_exported, trained):
    out, info = edge_exported
    for name in ("saved_model.pb", *MODELS):
        assert (out / name).is_file(), name
    meta = json.loads((out / "assets.extra" / "metadata.json").read_text())
    assert meta == json.loads(json.dumps(info))
    formats = meta["formats"]
    assert list(formats) == ["savedmodel", "tflite", "tflite_int8", "onnx"]
    for key, entry in formats.items():
        assert entry["bytes"] > 0 and (out / entry["file"]).is_file(), key
    for key in ("tflite", "tflite_int8", "onnx"):
        assert formats[key]["bytes"] == (out / formats[key]["file"]).stat().st_size
    for key in ("tflite", "onnx"):
        checked = formats[key]["verified"]
        assert checked["max_abs_logit_diff"] <= 1e-4, key
        assert checked["max_abs_probability_diff"] <= 1e-4, key
        assert checked["batches"] == [1, 7, 256]
    int8 = formats["tflite_int8"]
    assert int8["calibration"] == {"split": "train", "images": 300, "seed": 0}
    assert int8["verified"]["class_agreement"] >= 0.95
    assert int8["verified"]["jax_accuracy"] == pytest.approx(
        trained.final["test_accuracy"], abs=1e-6)
    assert int8["verified"]["jax_accuracy"] - int8["verified"]["accuracy"] <= 0.005
    assert int8["bytes"] < formats["tflite"]["bytes"] / 2  # int8 weights
    names = (out / "assets" / "labels.txt").read_text().splitlines()
    assert meta["signature"]["outputs"]["logits"]["shape"] == [-1, len(names)]
    assert publishing.foreign_entries(out) == []


def test_each_runtime_answers_as_jax_on_the_reference_images(edge_exported):
    out, _ = edge_exported
    ref = np.load(out / "assets.extra" / "reference.npz")
    images = ref["images"]
    for name, runner in (("model.tflite", edge.tflite_runner),
                         ("model.onnx", edge.onnx_runner)):
        run = runner(out / name)
        for n in (1, 5, len(images)):
            got = run(images[:n])
            assert set(got) == set(contract.OUTPUTS), name
            np.testing.assert_allclose(got["logits"], ref["logits"][:n], rtol=0, atol=1e-4)
            np.testing.assert_allclose(got["probabilities"], ref["probabilities"][:n],
                                       rtol=0, atol=1e-4)
            np.testing.assert_array_equal(got["classes"], ref["classes"][:n])
            assert got["logits"].dtype == np.float32 and got["classes"].dtype == np.int64
    int8 = edge.tflite_runner(out / "model_int8.tflite")(images)
    assert int8["logits"].dtype == np.float32 and int8["classes"].dtype == np.int64
    assert np.mean(int8["classes"] == ref["classes"]) >= 0.95
    # dequantized logits, not clipped: they follow JAX's within a few quantization steps
    assert np.max(np.abs(int8["logits"] - ref["logits"])) < 1.0


def test_the_onnx_graph_speaks_the_contract(edge_exported):
    import onnx

    out, _ = edge_exported
    graph = onnx.load(out / "model.onnx").graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["logits", "probabilities", "classes"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_int8_is_refused_when_it_disagrees_with_jax(edge_exported, dataset):
    out, _ = edge_exported
    path = out / "model_int8.tflite"
    ref = np.load(out / "assets.extra" / "reference.npz")["images"]
    test = dataset.test
    int8 = edge.tflite_runner(path)
    mine = edge.run_batched(int8, np.asarray(test.images))["classes"]
    labels = np.asarray(test.labels)

    ok = edge.verify_int8(path, ref, edge.CheckSet(test.images, labels, mine, "same"))
    assert ok["class_agreement"] == 1.0 and ok["accuracy"] == ok["jax_accuracy"]

    shuffled = np.random.default_rng(0).permutation(mine)
    with pytest.raises(UserError, match=r"agrees with JAX on .*% of .* images \(< 95%\)"):
        edge.verify_int8(path, ref, edge.CheckSet(test.images, labels, shuffled, "x"))

    # JAX right on 3% more images than int8: agreement 97%, accuracy 3 points lower
    better = mine.copy()
    wrong = np.flatnonzero(mine != labels)[: int(0.03 * len(labels))]
    better[wrong] = labels[wrong]
    with pytest.raises(UserError, match=r"points below JAX's .* \(> 0.5\)"):
        edge.verify_int8(path, ref, edge.CheckSet(test.images, labels, better, "x"))


def test_a_float_model_off_by_1e_3_is_refused(edge_exported, tmp_path):
    out, _ = edge_exported
    ref = np.load(out / "assets.extra" / "reference.npz")
    expected = {k: ref[k] for k in ("logits", "probabilities", "classes")}
    bad = dict(expected, logits=expected["logits"] + 1e-3)
    with pytest.raises(UserError, match=r"ONNX model's logits differ from JAX by 1.0\de-03"):
        edge.verify_float("onnx", out / "model.onnx", ref["images"], bad)
    (tmp_path / "model.tflite").write_bytes((out / "model.tflite").read_bytes()[:5000])
    with pytest.raises(UserError, match="the exported TFLite model does not load"):
        edge.verify_float("tflite", tmp_path / "model.tflite", ref["images"], expected)


def test_a_tampered_tflite_is_refused_before_publishing(edge_exported, trained, jax_params,
                                                        monkeypatch, capsys, tmp_path):
    """The converter's output with the last layer's bias moved by 1e-3: export names
    the difference in one line and the model already at --out (an earlier export in
    every format: --overwrite accepts its files) is left as it was."""
    bias = np.asarray(jax_params["params"]["layers_11"]["bias"], np.float32)
    real = edge.convert_tflite

    def tampered(tf, saved_model, calibration=None):
        data = real(tf, saved_model, calibration)
        at = data.find(bias.tobytes())
        assert at > 0, "the bias is stored as is in the TFLite file"
        return data[:at] + (bias + 1e-3).astype(np.float32).tobytes() + data[at + bias.nbytes:]

    monkeypatch.setattr(edge, "convert_tflite", tampered)
    out = tmp_path / "1"
    shutil.copytree(edge_exported[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    msg = one_line_error(capsys, ["export", "--workdir", trained.config.workdir, "--out",
                                  str(out), "--platforms", "cpu", "--format", "tflite",
                                  "--overwrite"])
    assert "the exported TFLite model's logits differ from JAX by 1.0" in msg, msg
    assert "(> 0.0001)" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # no staging left


@pytest.mark.parametrize("extra, message", [
    (["--format", "tflite,coreml"],
     "--format tflite,coreml: choose from savedmodel, tflite, onnx"),
    (["--quantize", "int8"], "--quantize int8 quantizes the TFLite model; add it: "
                             "--format tflite --quantize int8"),
    (["--format", "onnx", "--quantize", "int8"], "--format onnx,tflite --quantize int8"),
    (["--format", "tflite", "--quantize", "int4"], "--quantize int4: choose int8"),
])
def test_bad_format_options_are_one_line(trained, capsys, tmp_path, extra, message):
    argv = ["export", "--workdir", trained.config.workdir, "--out", str(tmp_path / "m"), *extra]
    assert message in one_line_error(capsys, argv)
    assert not (tmp_path / "m").exists()


def test_format_parsing():
    assert edge.parse_formats("savedmodel") == ("savedmodel",)
    assert edge.parse_formats("ONNX, tflite,onnx") == ("savedmodel", "onnx", "tflite")
    assert edge.parse_formats(["tflite", "onnx,savedmodel"]) == ("savedmodel", "tflite", "onnx")
    assert edge.models(("savedmodel", "onnx"), None) == ["onnx"]
    assert edge.models(("savedmodel", "onnx", "tflite"), "int8") == \
        ["tflite", "tflite_int8", "onnx"]
    with pytest.raises(UserError, match="--format '': choose from"):
        edge.parse_formats("")


def test_a_missing_runtime_is_one_line_naming_the_extra(trained, capsys, tmp_path,
                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    msg = one_line_error(capsys, ["export", "--workdir", trained.config.workdir, "--out",
                                  str(tmp_path / "m"), "--format", "onnx"])
    assert "onnxruntime is not installed (needed for --format onnx)" in msg
    assert "pip install 'lenet-dist[edge]'" in msg


def test_overwrite_knows_the_new_files_and_nothing_more(edge_exported, tmp_path):
    out = tmp_path / "1"
    shutil.copytree(edge_exported[0], out)
    assert publishing.foreign_entries(out) == []
    (out / "model.tflite.orig").write_bytes(b"x")
    (out / "assets.extra" / "model.onnx").write_bytes(b"x")
    assert publishing.foreign_entries(out) == ["assets.extra/model.onnx", "model.tflite.orig"]



def test_a_three_class_model_exports_three_wide_in_every_format(tmp_path):
    """The width comes from the run's class names (idx:DIR with classes.txt), not 10."""
    from lenet_dist.config import Config
    from lenet_dist.training import train

    (tmp_path / "idx").mkdir()
    data = write_dataset(tmp_path / "idx", n_train=64, n_test=32, label_max=2)
    (data / "classes.txt").write_text("cat\ndog\nbird\n")
    config = Config(dataset=f"idx:{data}", devices=1, epochs=1, batch_size=32,
                    workdir=str(tmp_path / "run"))
    train(config, log=lambda _: None)
    out = tmp_path / "m"
    info = export_checkpoint(config.workdir, str(out), platforms=("cpu",),
                             formats="tflite,onnx")
    assert info["class_names"] == ["cat", "dog", "bird"]
    assert info["signature"]["outputs"]["logits"]["shape"] == [-1, 3]
    assert info["reference"]["source"].endswith("test set")
    images = np.load(out / "assets.extra" / "reference.npz")["images"][:5]
    for name, runner in (("model.tflite", edge.tflite_runner),
                         ("model.onnx", edge.onnx_runner)):
        got = runner(out / name)(images)
        assert got["logits"].shape == got["probabilities"].shape == (5, 3), name

# Runs in a fresh interpreter that cannot import JAX or lenet_dist at all.
KIT_ONLY = """
import sys
for name in ("jax", "jaxlib", "flax", "optax", "orbax", "lenet_dist"):
    sys.modules[name] = None
sys.path.insert(0, {export_dir!r})
import check_model
sys.exit(check_model.main(sys.argv[1:]))
"""


def test_the_kit_checks_every_format_without_jax(edge_exported, test_idx, trained):
    out, _ = edge_exported
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", KIT_ONLY.format(export_dir=str(ROOT / "export")), str(out),
         "--images", str(test_idx[0]), "--labels", str(test_idx[1]), "--runs", "5",
         "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = json.loads(proc.stdout)
    rows = {r["format"]: r for r in report["rows"]}
    assert list(rows) == ["savedmodel", "tflite", "tflite_int8", "onnx"] and report["ok"]
    jax_accuracy = trained.final["test_accuracy"]
    for fmt, row in rows.items():
        assert row["ok"] and row["bytes"] > 0 and row["latency"]["calls"] == 5, fmt
        acc = row["accuracy"]["accuracy"]
        if fmt == "tflite_int8":
            assert jax_accuracy - acc <= 0.005
        else:
            assert acc == pytest.approx(jax_accuracy, abs=1e-6), fmt
    assert "MISMATCH" not in proc.stdout


def test_the_kit_prints_a_markdown_row_per_format_and_fails_a_missing_runtime(
        edge_exported, capsys, monkeypatch):
    out, _ = edge_exported
    check_model = load_kit_module("check_model")
    ref = str(out / "assets.extra" / "reference.npz")  # not IDX: bad input, exit 2
    assert check_model.main([str(out), "--images", ref]) == 2
    assert check_model.main([str(out), "--formats", "tflite,tflite_int8,onnx", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| format", "| tflite", "| tflite_int8",
                                                  "| onnx"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert check_model.main([str(out), "--formats", "onnx"]) == 1
    assert "FAILED: not run: onnxruntime is not installed" in capsys.readouterr().out
