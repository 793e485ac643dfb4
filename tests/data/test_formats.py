import gzip
import pickle

import numpy as np
import pytest
from scipy.io import savemat

from qrobust.data import formats
from qrobust.errors import DataError


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_idx_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(formats.read_idx(path), arr)


def test_truncated_idx_is_reported(tmp_path):
    arr = np.zeros((5, 28, 28), np.uint8)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(arr)[:-10]))
    with pytest.raises(DataError, match="truncated or corrupt"):
        formats.read_idx(path)
    path.write_bytes(gzip.compress(idx_bytes(arr))[:-20])  # the gzip stream itself cut short
    with pytest.raises(DataError, match="truncated or corrupt"):
        formats.read_idx(path)


def test_bad_magic(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="magic"):
        formats.read_idx(path)


def write_cifar_batch(path, x_nchw: np.ndarray, labels: list[int]) -> None:
    # protocol 2 with a bytes-keyed dict, as the original python batches
    obj = {b"data": x_nchw.reshape(len(x_nchw), -1), b"labels": labels, b"batch_label": b"x"}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def test_cifar_batch_reader(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(tmp_path / "data_batch_1", x, [0, 1, 2, 3])
    got_x, got_y = formats.read_cifar_batch(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(got_x, x)
    assert got_y.tolist() == [0, 1, 2, 3]


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_cifar_reader_never_executes_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload()}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        formats.read_cifar_batch(tmp_path / "data_batch_1")
    assert not (tmp_path / "PWNED").exists()


def test_svhn_mat_reader(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [9], [10]], dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    got_x, got_y = formats.read_svhn_mat(tmp_path / "test_32x32.mat")
    assert got_x.shape == (6, 3, 32, 32) and got_x.dtype == np.uint8
    np.testing.assert_array_equal(got_x[4], x[..., 4].transpose(2, 0, 1))
    assert got_y.tolist() == [0, 1, 2, 3, 9, 0]


@pytest.mark.parametrize("shape", [(7, 8, 8), (7, 8, 8, 3), (7, 3, 8, 8)])
def test_arrays_accepts_common_layouts(tmp_path, shape):
    x = np.zeros(shape, np.uint8)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=np.zeros(7), x_test=x, y_test=np.zeros(7))
    arrays = formats.read_arrays(tmp_path / "a.npz")
    assert arrays["x_train"].ndim == 4 and arrays["x_train"].shape[0] == 7
    assert arrays["x_train"].shape[1] in (1, 3)


def test_arrays_rejects_pickled_objects_and_float_images(tmp_path):
    np.savez(tmp_path / "obj.npz", x_train=np.array([object()]), y_train=[0], x_test=[0], y_test=[0])
    with pytest.raises(DataError):
        formats.read_arrays(tmp_path / "obj.npz")
    f = np.zeros((2, 8, 8), np.float32)
    np.savez(tmp_path / "f.npz", x_train=f, y_train=[0, 1], x_test=f, y_test=[0, 1])
    with pytest.raises(DataError, match="uint8"):
        formats.read_arrays(tmp_path / "f.npz")
