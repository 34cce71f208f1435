import jax
import numpy as np

from lenet_dist import model


def test_exact_parameter_count_and_shapes():
    params = model.init_params(jax.random.key(0))
    assert model.param_count(params) == 61_706
    shapes = {k: {n: v.shape for n, v in layer.items()} for k, layer in params.items()}
    assert shapes == {
        "layers_0": {"kernel": (5, 5, 1, 6), "bias": (6,)},
        "layers_3": {"kernel": (5, 5, 6, 16), "bias": (16,)},
        "layers_7": {"kernel": (400, 120), "bias": (120,)},
        "layers_9": {"kernel": (120, 84), "bias": (84,)},
        "layers_11": {"kernel": (84, 10), "bias": (10,)},
    }


def test_shape_trace_matches_seed():
    rows = model.layer_summary((1, 28, 28, 1))
    assert [name for name, _ in rows] == [
        "Conv", "Sigmoid", "AvgPool", "Conv", "Sigmoid", "AvgPool", "Flatten",
        "Dense", "Sigmoid", "Dense", "Sigmoid", "Dense"]
    assert [shape for _, shape in rows] == [
        (1, 28, 28, 6), (1, 28, 28, 6), (1, 14, 14, 6), (1, 10, 10, 16), (1, 10, 10, 16),
        (1, 5, 5, 16), (1, 400), (1, 120), (1, 120), (1, 84), (1, 84), (1, 10)]


def test_xavier_uniform_kernels_and_zero_biases():
    params = model.init_params(jax.random.key(1))
    for layer in params.values():
        k = np.asarray(layer["kernel"])
        receptive = int(np.prod(k.shape[:-2])) if k.ndim == 4 else 1
        fan_in, fan_out = k.shape[-2] * receptive, k.shape[-1] * receptive
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(k).max() <= bound
        assert np.abs(k).max() > 0.8 * bound  # uniform over the full range, not narrower
        assert not np.asarray(layer["bias"]).any()


def test_batch_polymorphic_logits():
    params = model.init_params(jax.random.key(0))
    x = np.zeros((7, 28, 28, 1), np.float32)
    assert model.LeNet().apply({"params": params}, x).shape == (7, 10)
