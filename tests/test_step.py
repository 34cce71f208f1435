import jax
import numpy as np
import pytest

from lenet_dist.config import Config
from lenet_dist.feed import put
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.model import build
from lenet_dist.state import create_state, make_optimizer
from lenet_dist.step import build_steps, checkpoint_tree, summarize
from lenet_dist.training import train

# One SGD step (seed 0 init, lr 0.1) on a fixed random batch; recorded 2026-11-27
# with jax 0.12.0.1 on XLA:CPU, identical on 1 and 8 devices.
REF_LOSS = 2.494922161102295
REF_ACCURACY = 10 / 128
REF_ABS_PARAM_SUM = 3695.587646484375
REF_LAST_BIAS_0 = 0.0025166061241179705


def one_step(n_devices):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 128, 28, 28, 1)).astype(np.uint8)
    y = rng.integers(0, 10, (1, 128)).astype(np.int32)
    sh = Shardings(make_mesh(n_devices))
    tx = make_optimizer(Config())
    steps = build_steps(tx, sh)
    state = create_state(0, tx, sh)
    state, sums = steps.train(state, steps.zeros(), put(x, sh.stacked_batches),
                              put(y, sh.stacked_batches), 0)
    return state, summarize(sums)


@pytest.mark.parametrize("n", [1, 8])
def test_one_train_step_matches_reference(n):
    state, metrics = one_step(n)
    params = jax.device_get(state.params)
    assert int(state.step) == 1
    assert metrics["count"] == 128
    assert metrics["loss"] == pytest.approx(REF_LOSS, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(REF_ACCURACY)
    abs_sum = float(sum(np.abs(leaf).sum() for leaf in jax.tree.leaves(params)))
    assert abs_sum == pytest.approx(REF_ABS_PARAM_SUM, rel=1e-5)
    assert float(params["layers_11"]["bias"][0]) == pytest.approx(REF_LAST_BIAS_0, rel=1e-4)


def test_train_step_donates_state_and_does_not_retrace():
    sh = Shardings(make_mesh(8))
    tx = make_optimizer(Config())
    steps = build_steps(tx, sh)
    state = create_state(0, tx, sh)
    x = put(np.zeros((3, 64, 28, 28, 1), np.uint8), sh.stacked_batches)
    y = put(np.zeros((3, 64), np.int32), sh.stacked_batches)
    sums = steps.zeros()
    for i in range(3):
        old = state
        state, sums = steps.train(state, sums, x, y, i)
        assert old.params["layers_0"]["kernel"].is_deleted()
    assert steps.train._cache_size() == 1
    assert summarize(sums)["count"] == 192


def test_same_losses_on_1_2_and_8_devices(dataset, tmp_path):
    """The global batch's content must not depend on the device count."""
    histories = {}
    for n in (1, 2, 8):
        config = Config(devices=n, epochs=2, train_limit=1024, batch_size=64,
                        learning_rate=0.5, workdir=str(tmp_path / f"d{n}"))
        result = train(config, dataset=dataset, log=lambda _: None)
        histories[n] = result
    keys = ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]
    for n in (2, 8):
        for a, b in zip(histories[1].history, histories[n].history):
            for k in keys:
                assert a[k] == pytest.approx(b[k], abs=1e-5), (n, k)
        for pa, pb in zip(jax.tree.leaves(histories[1].state.params),
                          jax.tree.leaves(histories[n].state.params)):
            np.testing.assert_allclose(np.asarray(pa), np.asarray(pb), atol=1e-5)


def test_metric_sums_exact_and_one_all_reduce_per_step():
    """The counts are summed as float32 so that one all-reduce carries the gradients and
    the metrics; they must still equal the plain integer counts, train and eval alike."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 64, 28, 28, 1)).astype(np.uint8)
    y = rng.integers(0, 10, (2, 64)).astype(np.int32)
    mask = rng.random((2, 64)) < 0.7
    sh = Shardings(make_mesh(8))
    tx = make_optimizer(Config())
    steps = build_steps(tx, sh)
    state = create_state(0, tx, sh)
    xs, ys, ms = (put(a, sh.stacked_batches) for a in (x, y, mask))
    lowered = steps.train.lower(state, steps.zeros(), xs, ys, 0).compile().as_text()
    assert lowered.count(" all-reduce(") == 1
    variables = jax.device_get(state.variables)
    logits = np.asarray(build("d2l").apply(variables, x[1].astype(np.float32) / 255.0))
    hits = logits.argmax(-1) == y[1]
    sums = steps.evaluate(state.variables, steps.zeros(), xs, ys, ms, 1)
    got = jax.device_get(sums)
    assert int(got["count"]) == int(mask[1].sum())
    assert int(got["correct"]) == int((hits & mask[1]).sum())
    state, sums = steps.train(state, steps.zeros(), xs, ys, 1)
    assert int(jax.device_get(sums)["correct"]) == int(hits.sum())
    assert int(jax.device_get(sums)["count"]) == 64


# ------------------------------------------------------- the model, from config and metadata


def test_steps_forward_is_the_one_jitted_forward_and_answers_as_infer_did():
    from lenet_dist.step import forward_for

    steps = build_steps(make_optimizer(Config()), Shardings(make_mesh(1)))
    assert steps.forward is forward_for("d2l", 10)  # shared by every caller, compiled once
    variables = jax.device_get(create_state(0, make_optimizer(Config()),
                                            Shardings(make_mesh(1))).variables)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1)).astype(np.uint8)
    got = steps.forward(variables, images)

    @jax.jit
    def infer(variables, images):  # the forward it replaces, as it was
        logits = build("d2l").apply(variables, images.astype(np.float32) / 255.0)
        return {"logits": logits, "probabilities": jax.nn.softmax(logits),
                "classes": logits.argmax(-1)}

    want = infer(variables, images)
    for key in ("logits", "probabilities", "classes"):
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_a_checkpoint_whose_config_says_modern_restores_the_modern_model(tmp_path):
    from lenet_dist.checkpoint import Checkpoints
    from lenet_dist.model import ModernLeNet
    from lenet_dist.restore import restore_checkpoint

    config = Config(network="modern", optimizer="adamw", workdir=str(tmp_path))
    names = ["a", "b", "c", "d", "e"]
    sh = Shardings(make_mesh(1))
    tx = make_optimizer(config)
    steps = build_steps(tx, sh, config, len(names))
    state = create_state(0, tx, sh, "modern", len(names))
    ckpts = Checkpoints(tmp_path)
    ckpts.save(0, checkpoint_tree(state, steps.zeros()),
               {"config": config.to_dict(), "class_names": names, "step": 0, "epoch": 0,
                "steps_per_epoch": 1, "history": []},
               wait=True)
    ckpts.close()
    restored = restore_checkpoint(str(tmp_path), sh)
    assert isinstance(restored.model, ModernLeNet) and restored.model.num_classes == 5
    images = np.zeros((3, 28, 28, 1), np.uint8)
    assert restored.forward(restored.variables, images)["probabilities"].shape == (3, 5)


@pytest.mark.parametrize("recipe, classes, says", [
    ("d2l", 10, "do not fit the d2l network with 10 classes (missing params/layers_0/"),
    ("modern", 7, "params/layers_12/kernel is [84, 10], not [84, 7]"),
])
def test_variables_of_another_model_are_a_one_line_error(recipe, classes, says):
    from lenet_dist.errors import UserError
    from lenet_dist.model import init_variables
    from lenet_dist.step import forward_for

    modern = init_variables(jax.random.key(0), "modern", 10)
    with pytest.raises(UserError) as caught:
        forward_for(recipe, classes)(modern, np.zeros((2, 28, 28, 1), np.uint8))
    assert says in str(caught.value) and "\n" not in str(caught.value)
