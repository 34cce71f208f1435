"""data.py: IDX files, sources in order, empty splits, special files, no network."""

import os
import socket
import time

import numpy as np
import pytest

from lenet_dist import data as data_lib
from lenet_dist.errors import UserError
from tests.conftest import (REAL_DIR, make_special, real_data_available, returns_within,
                            write_dataset, write_idx)


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
    with pytest.raises(UserError,
                       match="is truncated: 2268 bytes, header \\(3, 28, 28\\) needs 2368"):
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

    monkeypatch.setattr(data_lib, "network_problem", lambda name: None)
    monkeypatch.setattr(data_lib, "load_tfds", offline)
    with pytest.raises(UserError) as err:
        data_lib.load("fashion_mnist")
    msg = str(err.value)
    assert "\n" not in msg and "download failed (Failed to resolve host)" in msg
    assert "--data-dir" in msg and "let TFDS download it (needs internet)" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_no_mnist_says_where_its_idx_files_go_not_a_fashion_package(no_sources, monkeypatch):
    """Was: "or install an MNIST IDX copy (apt-get install -y dataset-fashion-mnist)",
    a package that holds Fashion-MNIST, not MNIST."""
    monkeypatch.setitem(data_lib.SYSTEM_DIRS, "mnist", str(no_sources / "mnist"))
    monkeypatch.setattr(data_lib, "network_problem", lambda name: "cannot reach the host")
    with pytest.raises(UserError) as err:
        data_lib.load("mnist")
    msg = str(err.value)
    assert "\n" not in msg and "fashion" not in msg and "apt-get" not in msg
    assert "pass --data-dir DIR holding its four IDX files" in msg
    assert (f"or place its four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; each may be .gz) in "
            f"{no_sources / 'mnist'}") in msg


# ---------------------------------------------------------------- empty splits


@pytest.mark.parametrize("n_train, n_test, split", [(0, 10, "train"), (20, 0, "test")])
def test_an_empty_split_is_refused_at_load_time(tmp_path, n_train, n_test, split):
    """An empty test set would evaluate to accuracy 0/0 and exit 0; an empty train
    set would train nothing."""
    write_dataset(tmp_path, n_train=n_train, n_test=n_test)
    with pytest.raises(UserError, match=f"{split}: no images; both splits need at least one"):
        data_lib.load_idx_dir(tmp_path, "fashion_mnist")
    # The same check guards TFDS copies (load_tfds calls check_split on each split).
    with pytest.raises(UserError, match="TFDS mnist test: no images"):
        data_lib.check_split(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64),
                             "TFDS mnist test")


# ---------------------------------------------------------------- special files


def test_an_idx_dir_with_a_fifo_says_so_and_never_blocks(tmp_path):
    write_dataset(tmp_path)
    fifo = tmp_path / "t10k-images-idx3-ubyte"
    fifo.unlink()
    os.mkfifo(fifo)
    err = returns_within(10, data_lib.load_idx_dir, tmp_path, "fashion_mnist")
    assert isinstance(err, UserError) and str(err) == f"{fifo} is a FIFO, not a regular file"
    fifo.unlink()
    fifo.mkdir()  # a directory under the name: found, and refused by name
    err = returns_within(10, data_lib.load_idx_dir, tmp_path, "fashion_mnist")
    assert str(err) == f"{fifo} is a directory, not a regular file"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "socket", "missing"])
def test_read_idx_refuses_special_files_at_once(tmp_path, kind):
    path = make_special(tmp_path, kind)
    err = returns_within(10, data_lib.read_idx, path, data_lib.LABELS_MAGIC)
    assert isinstance(err, UserError), err
    assert str(path) in str(err) and "\n" not in str(err)
    expected = {"fifo": "is a FIFO", "dev-zero": "is a character device",
                "directory": "is a directory", "socket": "is a socket",
                "missing": "does not exist"}[kind]
    assert expected in str(err)


# ---------------------------------------------------------------- no network


@pytest.fixture
def offline(no_sources, monkeypatch):
    """No data anywhere, and the download host does not resolve."""
    def refuse(address, timeout=None):
        raise socket.gaierror(-2, "Name or service not known")

    for var in (data_lib.SKIP_NETWORK_CHECK, "https_proxy", "http_proxy", "all_proxy",
                "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data_lib.socket, "create_connection", refuse)
    return no_sources


def test_offline_download_is_one_line_at_once_and_leaves_nothing(offline, monkeypatch):
    def never(name, download):
        raise AssertionError("TFDS must not be asked to download offline")

    monkeypatch.setattr(data_lib, "load_tfds", never)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        data_lib.load("fashion_mnist")
    assert time.monotonic() - start < 1
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("no fashion_mnist data found and cannot reach "
                          "fashion-mnist.s3-website.eu-central-1.amazonaws.com:80 "
                          "(Name or service not known); get fashion_mnist one of three ways")
    assert msg.endswith("(or set LENET_DIST_SKIP_NETWORK_CHECK=1 to try the download anyway)")
    assert not (offline / "tfds").exists()


def test_the_probe_is_skipped_behind_a_proxy_or_when_asked(offline, monkeypatch):
    assert data_lib.network_problem("mnist") == ("cannot reach storage.googleapis.com:443 "
                                                 "(Name or service not known)")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert data_lib.network_problem("mnist") is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv(data_lib.SKIP_NETWORK_CHECK, "1")
    assert data_lib.network_problem("mnist") is None


def test_the_probe_answers_in_time_even_when_dns_hangs(offline, monkeypatch):
    def hang(address, timeout=None):
        time.sleep(5)  # getaddrinfo is not bounded by the socket timeout
        raise OSError("gave up")  # (the abandoned probe thread ends quietly)

    monkeypatch.setattr(data_lib.socket, "create_connection", hang)
    start = time.monotonic()
    problem = data_lib.network_problem("fashion_mnist", timeout=0.2)
    assert time.monotonic() - start < 1
    assert problem == ("no answer from fashion-mnist.s3-website.eu-central-1.amazonaws.com:80 "
                       "in 0.2 s")


def test_the_real_probe_answers_within_its_timeout(monkeypatch):
    """Online or not (CI may have a network), the probe itself never takes long."""
    monkeypatch.delenv(data_lib.SKIP_NETWORK_CHECK, raising=False)
    start = time.monotonic()
    data_lib.network_problem("fashion_mnist", timeout=2)
    assert time.monotonic() - start < 2.5


def fake_failed_download(root, extra=()):
    """What TFDS 4.9.10 leaves in the data dir when every file fails to download."""
    def load_tfds(name, download):
        for d in ("downloads/extracted", "downloads/fashion_mnist",
                  "fashion_mnist/3.0.1.incomplete.7f3a", *extra):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "downloads/fashion_mnist/fashion-mnist_train.gz.tmp.22b1").write_bytes(b"x")
        (root / "downloads/extracted/GZIP.fashion-mnist_train.gz.incomplete").mkdir()
        raise ConnectionError("Max retries exceeded")
    return load_tfds


def test_a_failed_download_removes_what_it_created(offline, monkeypatch):
    root = offline / "tfds"
    monkeypatch.setattr(data_lib, "network_problem", lambda name: None)
    monkeypatch.setattr(data_lib, "load_tfds", fake_failed_download(root))
    with pytest.raises(UserError, match=r"download failed \(Max retries exceeded\)"):
        data_lib.load("fashion_mnist")
    assert not root.exists()


def test_a_failed_download_keeps_what_was_there_before(offline, monkeypatch):
    root = offline / "tfds"
    (root / "mnist" / "3.0.1").mkdir(parents=True)
    (root / "downloads" / "extracted" / "ZIP.earlier").mkdir(parents=True)
    (root / "downloads" / "manual.zip").write_bytes(b"kept")
    monkeypatch.setattr(data_lib, "network_problem", lambda name: None)
    monkeypatch.setattr(data_lib, "load_tfds",
                        fake_failed_download(root, extra=["downloads/someone-elses"]))
    with pytest.raises(UserError):
        data_lib.load("fashion_mnist")
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == ["downloads", "downloads/extracted", "downloads/extracted/ZIP.earlier",
                    "downloads/manual.zip", "downloads/someone-elses", "mnist", "mnist/3.0.1"]
