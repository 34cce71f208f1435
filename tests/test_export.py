"""SavedModel export: served by TensorFlow alone, it answers what JAX answers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lenet_dist import publishing, serialization
from lenet_dist.cli import main
from lenet_dist.errors import UserError
from lenet_dist.exporting import export_checkpoint
from lenet_dist.step import forward_for
from tests.conftest import ROOT, load_kit_module, one_line_error


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

    expected = np.asarray(forward_for("d2l")(jax_params, dataset.test.images[:256])["logits"])
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

    from lenet_dist.conversion import build_module
    from lenet_dist.model import build
    from lenet_dist.model import init_params

    (tmp_path / "labels.txt").write_text("x\n")
    module = build_module(tf, jax.device_get(init_params(jax.random.key(0))), ("cpu",),
                          tmp_path / "labels.txt", build("d2l"))
    tf.saved_model.save(module, str(tmp_path / "m"),
                        signatures={"serving_default": module.serve.get_concrete_function()})
    prod = serialization.producer()
    old_tf = serialization.negotiate(prod, serialization.Consumer("1.0.0", 10))
    with pytest.raises(UserError, match=f"export wrote StableHLO {prod.stablehlo_default}, "
                                        "newer than TensorFlow reads \\(1.0.0\\)"):
        serialization.check_saved_model(tmp_path / "m", old_tf)


# ---------------------------------------------------------------- CLI and bad input


def test_export_cli_refuses_an_existing_output_unless_overwrite(trained, exported, capsys,
                                                               tmp_path):
    out = tmp_path / "model"
    shutil.copytree(exported[0], out)  # an earlier export
    (out / "precious.txt").write_text("keep me")
    argv = ["export", "--workdir", trained.config.workdir, "--out", str(out),
            "--platforms", "cpu"]
    assert "already exists; pass --overwrite" in one_line_error(capsys, argv)
    assert (out / "precious.txt").read_text() == "keep me"
    assert "holds what no export writes (precious.txt)" in one_line_error(
        capsys, argv + ["--overwrite"])
    assert (out / "precious.txt").read_text() == "keep me"

    (out / "precious.txt").unlink()
    assert main(argv + ["--overwrite", "--best"]) == 0
    text = capsys.readouterr().out
    assert f" step {trained.state.step} (test accuracy" in text and "StableHLO" in text
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
    import dataclasses

    from lenet_dist import exporting as export_lib

    real = export_lib.restore_checkpoint

    def nan_params(*args, **kwargs):
        restored = real(*args, **kwargs)
        return dataclasses.replace(
            restored, variables=jax.tree.map(lambda p: p * np.nan, restored.variables))

    monkeypatch.setattr(export_lib, "restore_checkpoint", nan_params)
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


@pytest.mark.parametrize("plant", ["checkpoints/5/x", "notes.txt", "2/saved_model.pb",
                                   "variables/extra.bin", "assets/mine.txt"])
def test_overwrite_replaces_only_what_an_export_published(exported, capsys, tmp_path, plant,
                                                          trained):
    """--overwrite deleted whatever the directory held: a run's checkpoints stored in an
    old export, a notes file, a second model in D/2. Now anything an export does not
    write is named, and the directory is left as it was."""
    out = tmp_path / "1"
    shutil.copytree(exported[0], out)
    assert publishing.foreign_entries(out) == []
    (out / plant).parent.mkdir(parents=True, exist_ok=True)
    (out / plant).write_text("someone's")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    msg = one_line_error(capsys, ["export", "--workdir", trained.config.workdir, "--out",
                                  str(out), "--overwrite"])
    assert "holds what no export writes (" + plant.split("/")[0] in msg, msg
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / plant).read_text() == "someone's"
