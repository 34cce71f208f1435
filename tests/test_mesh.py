import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lenet_dist.config import Config
from lenet_dist.errors import UserError
from lenet_dist.feed import eval_feed, train_feed
from lenet_dist.mesh import Shardings, check_batch, make_mesh
from lenet_dist.state import create_state, make_optimizer


@pytest.mark.parametrize("n", [1, 2, 8])
def test_mesh_uses_first_n_devices_on_data_axis(devices, n):
    mesh = make_mesh(n)
    assert dict(mesh.shape) == {"data": n}
    assert sorted(d.id for d in mesh.devices.flat) == [d.id for d in devices[:n]]


def test_too_many_devices_is_a_clear_error(devices):
    with pytest.raises(UserError, match=r"--devices 9 asks for more CPU devices than the 8"):
        make_mesh(9)


def test_batch_must_divide_over_devices():
    check_batch(128, 8)
    with pytest.raises(UserError, match=r"--batch-size 100 does not divide over 8 devices; "
                                        r"use a multiple of 8 \(e.g. 96, 104\)"):
        check_batch(100, 8)
    with pytest.raises(UserError, match=r"e.g. 8\)"):
        check_batch(3, 8)


def test_state_is_replicated_and_batches_are_split(dataset):
    sh = Shardings(make_mesh(8))
    tx = make_optimizer(Config())
    state = create_state(0, tx, sh)
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.spec == P()
        assert len(leaf.sharding.device_set) == 8
    feed = train_feed(dataset.train.take(1024), 128, sh)
    xs, ys = feed.epoch(seed=0, epoch=0)
    assert xs.shape == (8, 128, 28, 28, 1) and xs.dtype == np.uint8
    assert xs.sharding.spec == P(None, "data") and ys.sharding.spec == P(None, "data")
    # each device holds 16 images of every step's batch
    assert {s.data.shape for s in xs.addressable_shards} == {(8, 16, 28, 28, 1)}
    assert feed.images.sharding.spec == P()


def test_eval_feed_pads_and_masks_every_example_once(dataset):
    sh = Shardings(make_mesh(8))
    test = dataset.test.take(1001)
    feed = eval_feed(test, 250, sh)  # 250 rounds up to 256 over 8 devices
    assert feed.images.shape[1] == 256 and feed.num_batches == 4
    mask = np.asarray(feed.mask).reshape(-1)
    assert mask.sum() == 1001 and mask[:1001].all() and not mask[1001:].any()
    np.testing.assert_array_equal(np.asarray(feed.labels).reshape(-1)[:1001], test.labels)
