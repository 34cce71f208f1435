"""Shared test setup: 8 simulated CPU devices, real data when present, one trained run."""

import os

from lenet_dist import runtime

# Before any JAX backend starts: 8 simulated CPU devices for the whole session.
runtime.configure(cpu_devices=8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lenet_dist import data as data_lib  # noqa: E402
from lenet_dist.config import Config  # noqa: E402

REAL_DIR = os.environ.get("LENET_DIST_TEST_DATA", data_lib.SYSTEM_DIRS["fashion_mnist"])


def real_data_available() -> bool:
    return data_lib._find_idx(data_lib.Path(REAL_DIR), "train-images-idx3-ubyte") is not None


def synthetic_dataset(n_train=2048, n_test=512, seed=0) -> data_lib.Dataset:
    """Learnable stand-in: each class is a bright bar at its own position, plus noise."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.int32)
        images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
        for c in range(10):
            images[labels == c, 2 + 2 * c: 4 + 2 * c, :, 0] = 255
        return data_lib.Split(images, labels)

    return data_lib.Dataset("fashion_mnist", "synthetic", split(n_train), split(n_test))


@pytest.fixture(scope="session")
def dataset() -> data_lib.Dataset:
    """The real Fashion-MNIST when installed (CI installs it), synthetic otherwise."""
    if real_data_available():
        return data_lib.load_idx_dir(REAL_DIR, "fashion_mnist")
    return synthetic_dataset()


@pytest.fixture(scope="session")
def trained(dataset, tmp_path_factory):
    """One short run on 8 devices, shared by every test that needs a trained model:
    2,000 real training images, 2 epochs, Adam lr 3e-3, batch 16 (the seed's SGD
    needs ~4 full epochs to leave its sigmoid loss plateau; measured here, Adam
    with larger batches or rates also stays on it for 2 short epochs)."""
    from lenet_dist.train import train

    config = Config(devices=8, epochs=2, train_limit=2000, batch_size=16, optimizer="adam",
                    learning_rate=0.003, workdir=str(tmp_path_factory.mktemp("trained")))
    return train(config, dataset=dataset, log=lambda _: None)


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() >= 8, "conftest must set up 8 simulated CPU devices"
    return jax.devices()
