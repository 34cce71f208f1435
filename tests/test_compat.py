"""Files written by an earlier version still load: tests/fixtures/before-network/ holds a
run (`lenet-dist train --recipe modern --devices 1 --epochs 1 --train-limit 256`), its
`--print-config` YAML and its export, all written on 2026-12-08 by the version whose
Config called the network `recipe` (checkpoint metadata, config.json and the YAML say
`recipe: modern`). Today's code reads them with the network `modern`, resumes the run,
and the export classifies as it did."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lenet_dist import settings_io
from lenet_dist.config import PRESETS, effective_config, upgraded
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.restore import restore_checkpoint
from lenet_dist.rundir import CONFIG_FILE
from tests.conftest import write_idx

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "before-network"


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A private copy of the old run (a resume writes into it)."""
    return Path(shutil.copytree(FIXTURES / "run", tmp_path / "run"))


def reference():
    return np.load(FIXTURES / "model" / "assets.extra" / "reference.npz")


def test_the_fixtures_are_what_the_old_version_wrote():
    """The files name the network `recipe`, as that version did (else this tests nothing)."""
    meta = json.loads((FIXTURES / "run" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["config"]["recipe"] == "modern" and "network" not in meta["config"]
    assert json.loads((FIXTURES / "run" / CONFIG_FILE).read_text())["recipe"] == "modern"
    assert "recipe: modern" in (FIXTURES / "run.yaml").read_text().splitlines()
    export = json.loads((FIXTURES / "model" / "assets.extra" / "metadata.json").read_text())
    assert export["recipe"] == "modern" and export["config"]["recipe"] == "modern"


def test_an_old_checkpoint_restores_the_modern_network_with_the_same_answers(old_run):
    restored = restore_checkpoint(str(old_run), Shardings(make_mesh(1)))
    assert restored.config.network == "modern" and restored.step == 2
    assert set(restored.variables) == {"params", "batch_stats"}  # the modern network's
    ref = reference()  # JAX's logits for this checkpoint, saved by the old export
    logits = np.asarray(restored.forward(restored.variables, ref["images"])["logits"])
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)


def test_an_old_run_resumes_under_todays_code(old_run, dataset):
    """The saved config (with `recipe`) matches today's (with `network`): no refusal."""
    from lenet_dist.training import train

    before = restore_checkpoint(str(old_run), Shardings(make_mesh(1))).config
    config = before.replace(epochs=2, workdir=str(old_run), data_dir=None)
    result = train(config, dataset=dataset, log=lambda _: None)
    assert result.state.step > 2 and [r["epoch"] for r in result.history] == [1, 2]
    meta = json.loads((old_run / "checkpoints" / str(int(result.state.step)) / "meta"
                       / "metadata").read_text())
    assert meta["config"]["network"] == "modern" and "recipe" not in meta["config"]


def test_old_settings_files_give_the_same_config():
    """A --print-config YAML and a config.json of the old version: `recipe: modern` picks
    the modern recipe, whose network is modern; every other field as written."""
    from_yaml = effective_config(None, settings_io.read_settings(str(FIXTURES / "run.yaml")), {})
    from_json = effective_config(
        None, settings_io.read_settings(str(FIXTURES / "run" / CONFIG_FILE)), {})
    assert from_yaml.network == from_json.network == "modern"
    assert from_json.data_dir == "/usr/share/datasets/fashion-mnist" and from_yaml.data_dir is None
    same = {"workdir": "w", "data_dir": None}  # where the run was, and its data
    assert dataclasses.replace(from_yaml, **same) == dataclasses.replace(from_json, **same) == \
        dataclasses.replace(PRESETS["modern"], epochs=1, train_limit=256, devices=1, **same)
    from_yaml.validate()


def test_upgraded_renames_only_what_is_missing():
    assert upgraded({"recipe": "modern", "seed": 1}) == {"network": "modern", "seed": 1}
    assert upgraded({"recipe": "d2l", "network": "modern"}) == {"network": "modern"}
    assert upgraded({"seed": 1}) == {"seed": 1}


def test_an_old_export_classifies_as_it_did(tmp_path):
    """`predict --model` (TensorFlow alone) on the old SavedModel gives the classes its
    own reference holds."""
    pytest.importorskip("tensorflow")
    from lenet_dist.prediction import predict

    ref = reference()
    images = write_idx(tmp_path / "images", ref["images"][..., 0])
    result = predict([str(images)], model=str(FIXTURES / "model"))
    np.testing.assert_array_equal(np.asarray(result["classes"]), ref["classes"])
