"""benchmarks/peers: the peers read the same images and labels lenet-dist trains on,
in the same kind of epochs; the driver refuses a peer that is not the seed's model.
(The peers' timings themselves are benchmark output, never asserted.)"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_dist.model import init_params, param_count

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"


def _load(name: str, file: str):
    """A peers module under a name of its own (theirs, `common` and `run`, are generic)."""
    spec = importlib.util.spec_from_file_location(name, PEERS / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("peers_common", "common.py")
peers_run = _load("peers_run", "run.py")


def test_peers_read_the_same_data_as_lenet_dist(dataset, data_dir):
    images, labels = common.load_train(data_dir)
    assert images.shape == dataset.train.images.shape and images.dtype == np.uint8
    np.testing.assert_array_equal(images, dataset.train.images)
    np.testing.assert_array_equal(labels, dataset.train.labels)
    assert images.flags.writeable  # torch.from_numpy warns on read-only buffers


def test_epochs_are_shuffled_drop_last_batches():
    idx = common.batches(1000, 128, epoch=3)
    assert idx.shape == (7, 128)
    assert len(np.unique(idx)) == 7 * 128  # no image twice in an epoch
    assert not np.array_equal(idx, common.batches(1000, 128, epoch=4))
    np.testing.assert_array_equal(idx, common.batches(1000, 128, epoch=3))


def test_driver_checks_every_peer_trains_the_seed_model(tmp_path, monkeypatch):
    import jax

    assert param_count(init_params(jax.random.key(0))) == peers_run.SEED_PARAMETERS
    fake = tmp_path / "peer.py"
    fake.write_text('import json; print(json.dumps({"parameters": 62006, '
                    '"images_per_sec": 1.0}))\n')
    monkeypatch.setattr(peers_run, "HERE", tmp_path)
    peer = {"name": "wrong LeNet", "python": Path(sys.executable), "argv": ["peer.py"],
            "batch_size": 256}
    with pytest.raises(RuntimeError, match="62,006 parameters, not the seed's 61,706"):
        peers_run.run_peer(peer, 1, None)
    fake.write_text(fake.read_text().replace("62006", "61706"))
    assert peers_run.run_peer(peer, 1, None) == 1.0
