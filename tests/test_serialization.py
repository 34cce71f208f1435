"""StableHLO version negotiation between what jax writes and what TensorFlow reads."""

import jax
import numpy as np
import pytest

from lenet_dist import serialization
from lenet_dist.errors import UserError


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
