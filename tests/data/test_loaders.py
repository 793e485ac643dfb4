import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from qrobust.data import load_dataset, loaders, sources, take, train_val_split
from qrobust.errors import DataError
from tests.conftest import shared_data
from tests.data.test_formats import idx_bytes, write_cifar_batch


@pytest.fixture
def only_tmp_roots(monkeypatch):
    """Search only the explicit directory, so real data elsewhere cannot leak into a test."""
    monkeypatch.setattr(sources, "search_roots", lambda d: [Path(d)] if d else [])


def write_mnist(folder, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
             "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
             "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
             "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test)}
    digests = {}
    for name, arr in parts.items():
        raw = idx_bytes(np.asarray(arr, dtype=np.uint8))
        (folder / name).write_bytes(gzip.compress(raw))
        digests[name] = hashlib.sha256(raw).hexdigest()
    return digests


def test_digits_is_embedded_and_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train.x.shape == (1437, 1, 8, 8) and a.test.x.shape == (360, 1, 8, 8)
    assert a.train.x.dtype == np.uint8 and a.train.x.max() == 255
    np.testing.assert_array_equal(a.test.y, b.test.y)
    x, y = a.test.tensors()
    assert x.dtype.is_floating_point and x.min() >= 0 and x.max() <= 1 and y.dtype.itemsize == 8


def test_mnist_layout_found_in_explicit_dir(tmp_path, only_tmp_roots):
    write_mnist(tmp_path / "mnist")
    ds = load_dataset("mnist", tmp_path, verify=False)
    assert ds.train.x.shape == (20, 1, 28, 28) and ds.test.x.shape == (10, 1, 28, 28)


def test_wrong_checksum_is_refused(tmp_path, only_tmp_roots):
    write_mnist(tmp_path / "mnist")  # random contents: cannot match the real MNIST digests
    with pytest.raises(DataError, match="expected .*corrupt or not the original"):
        load_dataset("mnist", tmp_path)


def test_checksum_accepts_matching_content(tmp_path, only_tmp_roots, monkeypatch):
    digests = write_mnist(tmp_path / "mnist")
    fake = loaders._idx_loader("mnist", ("mnist",), loaders.DIGITS10, "http://x/", digests)
    monkeypatch.setitem(loaders.LOADERS._items, "mnist", fake)
    assert len(load_dataset("mnist", tmp_path).train) == 20


def test_missing_dataset_says_how_to_get_it(tmp_path, only_tmp_roots):
    with pytest.raises(DataError, match="dataset 'svhn' not found; put train_32x32.mat"):
        load_dataset("svhn", tmp_path)


def test_unknown_dataset():
    with pytest.raises(Exception, match="unknown dataset 'imagenet'; valid: cifar10, digits"):
        load_dataset("imagenet")


def test_offline_download_is_a_clear_error(tmp_path, only_tmp_roots, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="seems offline"):
        load_dataset("mnist", tmp_path, download=True)
    assert not any((tmp_path / "mnist").glob("*")), "nothing half-written"


def test_cifar10_python_batches(tmp_path, only_tmp_roots):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name in loaders.CIFAR_BATCHES:
        write_cifar_batch(folder / name, rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8),
                          [1, 2, 3])
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train.x.shape == (15, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32)
    assert ds.classes[0] == "airplane"


def test_svhn_mat_files_and_their_checksums(tmp_path, only_tmp_roots):
    folder = tmp_path / "svhn"
    folder.mkdir()
    for name in ("train_32x32.mat", "test_32x32.mat"):
        savemat(folder / name, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.full((4, 1), 10)})
    assert load_dataset("svhn", tmp_path, verify=False).test.y.tolist() == [0, 0, 0, 0]
    with pytest.raises(DataError, match="md5"):
        load_dataset("svhn", tmp_path)


def test_arrays_file_by_path(tmp_path):
    x = np.random.default_rng(4).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x_train=x, y_train=np.arange(6) % 3, x_test=x[:2],
             y_test=np.array([0, 2]))
    ds = load_dataset(str(tmp_path / "mine.npz"))
    assert ds.input_shape == (3, 5, 5) and ds.num_classes == 3 and ds.name == "mine"


def test_splits_are_seeded_disjoint_and_complete(digits):
    tr, val = train_val_split(digits.train, 0.1, seed=7)
    tr2, val2 = train_val_split(digits.train, 0.1, seed=7)
    _, val3 = train_val_split(digits.train, 0.1, seed=8)
    np.testing.assert_array_equal(val.y, val2.y)
    np.testing.assert_array_equal(tr.x, tr2.x)
    assert len(tr) + len(val) == len(digits.train) and len(val) == 144
    assert not np.array_equal(val.x, val3.x)
    assert len(take(digits.test, 50)) == 50 and take(digits.test, None) is digits.test


@pytest.mark.data
def test_real_mnist_and_fashion_verify(monkeypatch):
    root = shared_data("mnist").parent
    for name in ("mnist", "fashion-mnist"):
        ds = load_dataset(name, root)
        assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
        assert sorted(np.unique(ds.test.y).tolist()) == list(range(10))


@pytest.mark.data
def test_real_cifar10_arrays():
    root = shared_data("cifar10").parent
    ds = load_dataset("cifar10", root)
    assert ds.train.x.shape == (50000, 3, 32, 32) and ds.test.x.shape == (1017, 3, 32, 32)
    mean, _ = ds.channel_stats()
    assert mean == pytest.approx([0.4914, 0.4822, 0.4465], abs=0.01)
