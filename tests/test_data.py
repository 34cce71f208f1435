
import numpy as np
import pytest

from lenet_dist import data as data_lib
from lenet_dist.errors import UserError
from tests.conftest import REAL_DIR, real_data_available, write_dataset, write_idx


@pytest.mark.skipif(not real_data_available(), reason="real Fashion-MNIST not installed")
def test_real_fashion_mnist_idx_files():
    ds = data_lib.load_idx_dir(REAL_DIR, "fashion_mnist")
    assert ds.train.images.shape == (60_000, 28, 28, 1) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (10_000, 28, 28, 1)
    assert ds.train.labels.dtype == np.int32
    # Fashion-MNIST is balanced: 6,000 / 1,000 images per class.
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.train.images.max() == 255 and ds.train.images.min() == 0
    assert ds.class_names[9] == "Ankle boot"


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = write_idx(tmp_path / ("x.gz" if gz else "x"), arr, gz=gz)
    np.testing.assert_array_equal(data_lib.read_idx(path, data_lib.IMAGES_MAGIC), arr)


def test_idx_bad_magic(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros(5), magic=1234)
    with pytest.raises(UserError, match="has IDX magic 1234, expected 2049 for labels"):
        data_lib.read_idx(path, data_lib.LABELS_MAGIC)


def test_idx_truncated(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((3, 28, 28)), cut=100)
    with pytest.raises(UserError, match="is truncated: 2268 bytes, header \\(3, 28, 28\\) needs 2368"):
        data_lib.read_idx(path)
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match="too short for a header"):
        data_lib.read_idx(tmp_path / "tiny")


def test_idx_corrupt_gzip(tmp_path):
    """Gzip is recognised by content: a corrupt stream is unreadable, a misnamed
    plain file is read as what it is, a gzipped file without .gz works."""
    (tmp_path / "x.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 40)
    with pytest.raises(UserError, match="cannot read"):
        data_lib.read_idx(tmp_path / "x.gz")
    (tmp_path / "y.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not an unsigned-byte IDX file"):
        data_lib.read_idx(tmp_path / "y.gz")
    write_idx(tmp_path / "z-idx3-ubyte", np.ones((2, 28, 28)), gz=True)
    assert data_lib.read_idx(tmp_path / "z-idx3-ubyte").shape == (2, 28, 28)


def test_idx_dir_count_mismatch(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9))
    with pytest.raises(UserError, match="10 images but 9 labels"):
        data_lib.load_idx_dir(tmp_path, "fashion_mnist")


def test_idx_dir_label_out_of_range(tmp_path):
    write_dataset(tmp_path, label_max=10)
    with pytest.raises(UserError, match="label 10 is out of range 0..9"):
        data_lib.load_idx_dir(tmp_path, "fashion_mnist")


def test_idx_dir_missing_file_and_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data_lib.load_idx_dir(tmp_path / "nope", "fashion_mnist")
    write_dataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="has no train-labels-idx1-ubyte"):
        data_lib.load_idx_dir(tmp_path, "fashion_mnist")


def test_idx_dir_gz_loads(tmp_path):
    ds = data_lib.load_idx_dir(write_dataset(tmp_path, gz=True), "mnist")
    assert len(ds.train) == 20 and len(ds.test) == 10
    assert ds.train.images.shape == (20, 28, 28, 1)


@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """No TFDS copy and no system copy: every source is under test control."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setitem(data_lib.SYSTEM_DIRS, "fashion_mnist", str(tmp_path / "system"))
    return tmp_path


def test_source_order(no_sources):
    tmp = no_sources
    assert data_lib.resolve_source("fashion_mnist", None) == ("download", None)
    (tmp / "system").mkdir()
    write_dataset(tmp / "system")
    assert data_lib.resolve_source("fashion_mnist", None) == ("idx", str(tmp / "system"))
    prepared = tmp / "tfds" / "fashion_mnist" / "3.0.1"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    assert data_lib.resolve_source("fashion_mnist", None) == ("tfds", None)
    assert data_lib.resolve_source("fashion_mnist", "/explicit") == ("idx", "/explicit")
    with pytest.raises(UserError, match="unknown dataset 'cifar'"):
        data_lib.resolve_source("cifar", None)


def test_system_copy_is_loaded(no_sources):
    (no_sources / "system").mkdir()
    write_dataset(no_sources / "system", gz=True)
    ds = data_lib.load("fashion_mnist")
    assert ds.source == str(no_sources / "system") and len(ds.train) == 20


def test_no_source_names_the_three_ways(no_sources, monkeypatch):
    def offline(name, download):
        raise ConnectionError("Failed to resolve host\nmore detail")

    monkeypatch.setattr(data_lib, "load_tfds", offline)
    with pytest.raises(UserError) as err:
        data_lib.load("fashion_mnist")
    msg = str(err.value)
    assert "\n" not in msg and "download failed (Failed to resolve host)" in msg
    assert "--data-dir" in msg and "TFDS download" in msg.replace("let TFDS download", "TFDS download")
    assert "apt-get install -y dataset-fashion-mnist" in msg
