"""Readers for the standard on-disk formats. Each returns plain uint8/int arrays.

None of them executes code from a file: idx and .mat are parsed as data, .npz is read with
``allow_pickle=False`` and the CIFAR-10 python batches (pickles by design) go through an
unpickler that only admits dicts, lists, strings, bytes and numpy arrays.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np

from qrobust.errors import DataError

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally .gz), as in MNIST/Fashion-MNIST: magic, dims, then data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot decompress ({err}); the file is truncated or corrupt") from None
    return parse_idx(raw, str(path))


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{name}: idx file has {len(raw)} bytes, expected {expected} for shape "
                        f"{shape}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytes"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) not in self._ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only arrays")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-py`` file -> images uint8 (N, 3, 32, 32), labels (N,)."""
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'")
    data, labels = obj.get(b"data", obj.get("data")), obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: missing 'data' or 'labels'")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path}: expected data (N, 3072) and N labels, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped-digits .mat (X: 32x32x3xN, y: Nx1 with 10 meaning digit 0)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a readable SVHN .mat file ({type(err).__name__}: {err})") from None
    if "X" not in mat or "y" not in mat or mat["X"].ndim != 4:
        raise DataError(f"{path}: expected variables X (32, 32, 3, N) and y (N, 1)")
    x = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)).astype(np.uint8)
    y = mat["y"].reshape(-1).astype(np.int64) % 10
    return x, y


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """An .npz with x_train, y_train, x_test, y_test; images NHWC or NCHW uint8 (or NHW grey)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in npz}
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a readable .npz arrays file ({type(err).__name__}: {err})") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)}; need x_train, y_train, x_test, y_test")
    return {k: (to_nchw(v, f"{path}:{k}") if k.startswith("x") else v.astype(np.int64))
            for k, v in arrays.items()}


def to_nchw(x: np.ndarray, name: str) -> np.ndarray:
    """Accept NHW, NHWC (C in 1, 3) or NCHW uint8 and return NCHW uint8."""
    if x.dtype != np.uint8:
        raise DataError(f"{name}: images must be uint8 0..255, got {x.dtype}")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.ndim == 4:
        return x
    raise DataError(f"{name}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W), got {x.shape}")
