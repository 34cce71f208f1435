"""Pooling as a reduction over window axes (model.py) computes what Flax's
reduce_window pooling computes, forward and backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_dist import model


@pytest.mark.parametrize("shape", [(3, 28, 28, 6), (2, 10, 10, 16), (1, 5, 7, 2)])
@pytest.mark.parametrize("ours,flax_pool", [(model._avg_pool, nn.avg_pool),
                                            (model._max_pool, nn.max_pool)])
def test_pooling_matches_flax_forward_and_backward(shape, ours, flax_pool):
    x = jax.random.normal(jax.random.key(sum(shape)), shape)  # continuous: no ties

    def reference(x):
        return flax_pool(x, window_shape=(2, 2), strides=(2, 2))

    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6, atol=1e-7)
    w = jax.random.normal(jax.random.key(1), reference(x).shape)
    grad = jax.grad(lambda x: jnp.sum(ours(x) * w))(x)
    grad_ref = jax.grad(lambda x: jnp.sum(reference(x) * w))(x)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-7)


def test_layer_summary_shapes_unchanged():
    assert model.layer_summary()[2] == ("AvgPool", (1, 14, 14, 6))
    assert model.layer_summary(network="modern")[3] == ("MaxPool", (1, 14, 14, 16))
