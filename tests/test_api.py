"""The Python API (lenet_dist/api.py, re-exported by the package): README's example as
written, a cheap import, a documented surface, no signal handler left behind, the same
classes as `predict --workdir`, and one-line errors."""

import dataclasses
import importlib
import inspect
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lenet_dist
from lenet_dist import api
from lenet_dist import data as data_lib
from lenet_dist import prediction as predict_lib
from lenet_dist.config import FIELDS, field_type, option_name
from tests.conftest import ROOT, write_idx

README_TIMEOUT = 300  # measured 25-30 s on the 2-core dev machine while other tests ran


def readme_example() -> str:
    """README.md's first ```python block, as written."""
    found = re.search(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert found, "README.md has no ```python block"
    return found.group(1)


def system_data() -> bool:
    """The README example finds Fashion-MNIST where a user's install would: the system copy."""
    return data_lib._find_idx(Path(data_lib.SYSTEM_DIRS["fashion_mnist"]),
                              "train-images-idx3-ubyte") is not None


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """README's example run by the venv's Python in a fresh directory: (cwd, process)."""
    if not system_data():
        pytest.skip("the README example needs Fashion-MNIST installed (scripts/get-data.sh)")
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "example.py").write_text(readme_example())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "example.py"], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=README_TIMEOUT)
    return cwd, proc


@pytest.mark.slow
def test_readme_example_runs_as_written(readme_run):
    cwd, proc = readme_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    accuracy = re.search(r"^test accuracy (0\.\d+)$", proc.stdout, re.M)
    assert accuracy and float(accuracy.group(1)) > 0.3, proc.stdout  # 10 classes: chance 0.1
    names = set(data_lib.CLASS_NAMES["fashion_mnist"])
    for label in ("predicted:", "true:"):
        line = re.search(rf"^{label}\s+(.*)$", proc.stdout, re.M)
        assert line, proc.stdout
        shown = line.group(1).split(", ")
        assert len(shown) == 5 and set(shown) <= names, line.group(0)
    assert "Traceback" not in proc.stderr


def test_import_is_cheap_and_lazy():
    code = ("import sys, lenet_dist\n"
            "assert 'jax' not in sys.modules and 'lenet_dist.api' not in sys.modules\n"
            "names = sorted(dir(lenet_dist))\n"
            "lenet_dist.recipe, lenet_dist.Config, lenet_dist.UserError, lenet_dist.train\n"
            "from lenet_dist import api\n"
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
            "print(' '.join(names))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr
    assert set(lenet_dist.__all__) <= set(proc.stdout.split())


def test_the_surface_resolves_and_is_documented():
    assert set(lenet_dist.__all__) == set(api.__all__)
    for name in lenet_dist.__all__:
        value = getattr(lenet_dist, name)
        assert value is getattr(api, name), name
        assert inspect.getdoc(value) and len(inspect.getdoc(value)) > 40, name
    assert inspect.signature(lenet_dist.train) == inspect.signature(api.train)
    assert lenet_dist.recipe("smoke").replace(devices=1).devices == 1
    with pytest.raises(AttributeError):
        lenet_dist.no_such_name  # noqa: B018


def test_api_names_stay_functions_after_the_modules_load():
    """No module of the package is named like an API function: importing them all leaves
    lenet_dist.train and the others callable."""
    import pkgutil

    for info in pkgutil.iter_modules(lenet_dist.__path__):
        assert info.name not in lenet_dist.__all__, info.name
        importlib.import_module(f"lenet_dist.{info.name}")
    for name in ("train", "evaluate", "export", "predict", "load"):
        assert callable(getattr(lenet_dist, name)) and not isinstance(
            getattr(lenet_dist, name), types.ModuleType), name


def test_train_puts_signal_handlers_back(tmp_path, data_dir):
    def mine(signum, frame):  # a notebook's own handlers, say
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in before:
            signal.signal(s, mine)
        config = lenet_dist.Config(devices=2, epochs=1, train_limit=64, batch_size=32,
                                   optimizer="adam", learning_rate=0.003, data_dir=data_dir,
                                   workdir=str(tmp_path / "run"))
        result = lenet_dist.train(config, progress=False, tensorboard=False)
        assert all(signal.getsignal(s) is mine for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert result.config == config and result.final["epoch"] == 1
    assert 0 <= result.final["test_accuracy"] <= 1 and len(result.history) == 1
    assert int(result.state.step) == 2


@pytest.fixture(scope="module")
def workdir(request):
    """A trained run's workdir: README's (the real smoke recipe), else the session's."""
    try:
        cwd, proc = request.getfixturevalue("readme_run")
        if proc.returncode == 0:
            return str(cwd / "runs" / "api-smoke")
    except pytest.skip.Exception:
        pass
    return request.getfixturevalue("trained").config.workdir


def test_predict_gives_the_checkpoint_paths_classes(workdir, dataset, tmp_path):
    images = dataset.test.images[:40]
    idx = write_idx(tmp_path / "images-idx3-ubyte", images[..., 0])
    expected = predict_lib.predict([str(idx)], workdir=workdir)["classes"]
    assert len(set(expected)) > 1  # a model that tells classes apart

    model = lenet_dist.load(workdir)
    assert model.class_names == tuple(data_lib.CLASS_NAMES["fashion_mnist"])
    found = model.predict(images)
    np.testing.assert_array_equal(found.classes, expected)
    assert found.names == [model.class_names[c] for c in expected]
    assert found.probabilities.shape == (40, 10)
    np.testing.assert_allclose(found.probabilities.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(found.probabilities.argmax(axis=1), expected)
    for same in (images[..., 0], images[..., 0] / 255.0, images.astype(np.int64)):
        np.testing.assert_array_equal(model.predict(same).classes, expected)
    one = model.predict(images[3, :, :, 0])
    assert len(one) == 1 and one.classes[0] == expected[3]
    np.testing.assert_array_equal(lenet_dist.predict(workdir, images[:5]).classes, expected[:5])
    np.testing.assert_array_equal(lenet_dist.predict(model, list(images[:5])).classes,
                                  expected[:5])


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize("images, wanted", [
    (np.zeros((2, 32, 32), np.uint8), "shape [2, 32, 32]"),
    (np.zeros((28, 28, 3), np.uint8), "shape [28, 28, 3]"),
    (np.full((28, 28), 255.0), "must be in [0, 1]"),
    (np.full((1, 28, 28), np.nan), "NaN"),
    (np.full((28, 28), 256), "0..255"),
    (np.zeros((28, 28), bool), "dtype bool"),
    ([[1, 2], [3]], "not an array"),
])
def test_bad_images_are_one_line(images, wanted):
    with pytest.raises(lenet_dist.UserError) as excinfo:
        api.as_images(images)
    assert wanted in one_line(excinfo)


def test_bad_calls_are_one_line(tmp_path, monkeypatch, workdir):
    cases = [
        (lambda: lenet_dist.load(tmp_path), f"no checkpoints in {tmp_path}"),
        (lambda: lenet_dist.evaluate(tmp_path / "none"), "no checkpoints"),
        (lambda: lenet_dist.load(workdir, step=1, best=True), "give one"),
        (lambda: lenet_dist.load(workdir, step=7), "no checkpoint at step 7"),
        (lambda: lenet_dist.train("smoke"), "not str"),
        (lambda: lenet_dist.recipe("tiny"), "unknown preset"),
        (lambda: lenet_dist.train(lenet_dist.recipe("smoke").replace(epochs=0)),
         "epochs must be in 1..10000, got 0"),
        # JAX started (conftest: 8 devices): no more can be had, and the message says why.
        (lambda: lenet_dist.train(lenet_dist.recipe("smoke").replace(devices=9)),
         "restart the kernel"),
        (lambda: lenet_dist.evaluate(workdir, devices=16), "ask for devices <= 8"),
        (lambda: lenet_dist.export(workdir, tmp_path / "out", quantise=True),
         "no option quantise"),
    ]
    for call, wanted in cases:
        with pytest.raises(lenet_dist.UserError) as excinfo:
            call()
        assert wanted in one_line(excinfo)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # TensorFlow not installed
    with pytest.raises(lenet_dist.UserError) as excinfo:
        lenet_dist.export(workdir, tmp_path / "out")
    assert "pip install 'lenet-dist[export]'" in one_line(excinfo)
    assert not (tmp_path / "out").exists()


def jax_must_not_start(devices):
    raise AssertionError(f"JAX started (devices={devices!r}) for a Config that is wrong")


# The user's report: each was a raw TypeError or AttributeError, some after JAX had
# started; batch_size=True trained with batch 1 and exited 0.
@pytest.mark.parametrize("changes, wanted", [
    ({"epochs": "ten"}, "epochs must be an integer, got 'ten'"),
    ({"learning_rate": "0.1"}, "learning_rate must be a number, got '0.1'"),
    ({"devices": "2"}, "devices must be an integer, got '2'"),
    ({"dataset": 123}, "dataset must be text, got 123"),
    ({"epochs": 1.5}, "epochs must be an integer, got 1.5"),
    ({"workdir": 12345}, "workdir must be text, got 12345"),
    ({"workdir": None}, "workdir cannot be None"),
    ({"batch_size": True}, "batch_size must be an integer, got True"),
    ({"validation": 5000.0},
     "validation must be a count (an integer) or a fraction in (0, 1), got 5000.0"),
    ({"weight_decay": 0.1}, "weight_decay needs optimizer='adamw' (decoupled decay)"),
    ({"train_limit": 8}, "train_limit=8 is smaller than one batch (16); raise it or lower "
                         "batch_size"),
])
def test_a_wrong_setting_is_one_line_naming_the_field_before_jax(monkeypatch, changes,
                                                                 wanted):
    monkeypatch.setattr(api, "start_jax", jax_must_not_start)
    config = dataclasses.replace(lenet_dist.recipe("smoke"), **changes)
    with pytest.raises(lenet_dist.UserError) as excinfo:
        lenet_dist.train(config)
    assert one_line(excinfo) == wanted
    with pytest.raises(lenet_dist.UserError):
        lenet_dist.dataset(config)


def wrong_for(field: str, value) -> bool:
    """Whether `value` is of a type Config's `field` does not take (a bool is no number;
    an int goes where a float does)."""
    kind, optional = field_type(field)
    if value is None:
        return not optional
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)
    return not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                      st.binary(max_size=4), st.lists(st.integers(), max_size=2),
                      st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                      st.builds(object))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(field=st.sampled_from(list(FIELDS)), value=ANY_VALUE)
def test_any_wrong_typed_field_is_one_line_naming_it_before_jax(field, value):
    """Every field, any value of a type it does not take: train refuses it in one line
    that names the field as Python does (no --option), and JAX never starts; the CLI's
    wording names the option instead."""
    assume(wrong_for(field, value))
    config = dataclasses.replace(lenet_dist.recipe("smoke"), **{field: value})
    original, api.start_jax = api.start_jax, jax_must_not_start  # (hypothesis: no monkeypatch)
    try:
        with pytest.raises(lenet_dist.UserError) as excinfo:
            lenet_dist.train(config)
    finally:
        api.start_jax = original
    message = one_line(excinfo)
    assert message.startswith(f"{field} ") and "--" not in message, message
    with pytest.raises(lenet_dist.UserError, match=f"^{option_name(field)} "):
        config.validate(cli=True)


def test_right_values_are_normalised_and_a_typo_is_named(tmp_path):
    config = lenet_dist.recipe("smoke").replace(
        learning_rate=1, epochs=np.int64(3), workdir=tmp_path, validation=np.int32(10))
    checked = config.validate()
    assert (checked.learning_rate, checked.epochs, checked.workdir, checked.validation) == (
        1.0, 3, str(tmp_path), 10)
    assert [type(v) for v in (checked.learning_rate, checked.epochs, checked.validation)] == [
        float, int, int]
    with pytest.raises(lenet_dist.UserError) as excinfo:
        lenet_dist.recipe("smoke").replace(epoch=3)
    assert one_line(excinfo).startswith("Config has no field 'epoch' (did you mean epochs?)")
    with pytest.raises(lenet_dist.UserError) as excinfo:
        lenet_dist.evaluate(tmp_path, devices="2")
    assert one_line(excinfo) == "devices must be an integer, got '2'"
