"""One loader per dataset, registered by name. ``load_dataset`` is the entry point."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qrobust.data import formats
from qrobust.data.core import Dataset, Split
from qrobust.data.sources import CACHE_ROOT, RemoteFile, download, find_files, verify
from qrobust.errors import DataError
from qrobust.registry import Registry

DIGITS10 = tuple(str(i) for i in range(10))
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Loader:
    """How to find, check, fetch and read one dataset."""

    name: str
    folders: tuple[str, ...]
    how_to_get: str
    locate: Callable[[str | Path | None], Path | None]
    read: Callable[[Path, bool], Dataset]
    fetch: Callable[[Path], Path] | None = None


LOADERS: Registry[Loader] = Registry("dataset")


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = False,
                 verify: bool = True) -> Dataset:
    """Load ``name`` (see ``dataset_names()``) or an ``.npz`` arrays file given by path.

    Returns uint8 NCHW splits. Raises DataError with a how-to-fix message when missing/corrupt.
    """
    if str(name).endswith(".npz"):
        return read_arrays_dataset(Path(name), verify)
    loader = LOADERS.get(name)
    where = loader.locate(data_dir)
    if where is None and download and loader.fetch is not None:
        where = loader.fetch(Path(data_dir) if data_dir else CACHE_ROOT)
    if where is None:
        raise DataError(f"dataset '{name}' not found; {loader.how_to_get}")
    return loader.read(where, verify)


def dataset_names() -> list[str]:
    return LOADERS.names()


# --- digits: embedded in scikit-learn -------------------------------------------------------

def _read_digits(_: Path, __: bool) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # fixed 80/20 split, seed 0
    test, train = np.sort(order[:360]), np.sort(order[360:])
    return Dataset("digits", Split(x[train], y[train]), Split(x[test], y[test]), DIGITS10,
                   "scikit-learn (embedded)")


LOADERS.register("digits")(Loader("digits", (), "it ships with scikit-learn",
                                  lambda _: Path("."), _read_digits))


# --- MNIST and Fashion-MNIST: the original idx .gz files -----------------------------------

def _idx_loader(name: str, folders: tuple[str, ...], classes: tuple[str, ...], base_url: str,
                digests: dict[str, str]) -> Loader:
    files = tuple(RemoteFile(n, base_url + n, content_sha256=d) for n, d in digests.items())
    names = tuple(f.name for f in files)

    def read(folder: Path, check: bool) -> Dataset:
        if check:
            for f in files:
                verify(folder / f.name, f)
        xtr, ytr, xte, yte = (formats.read_idx(folder / n) for n in names)
        return Dataset(name, Split(xtr[:, None].copy(), ytr.astype(np.int64)),
                       Split(xte[:, None].copy(), yte.astype(np.int64)), classes, str(folder))

    def fetch(root: Path) -> Path:
        for f in files:
            download(f, root / folders[0])
        return root / folders[0]

    how = (f"put {', '.join(names)} in <dir>/{folders[0]}/ and pass --data-dir <dir> "
           "(or set QROBUST_DATA), or pass --download where a network exists")
    return Loader(name, folders, how, lambda d: find_files(d, folders, names), read, fetch)


_IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_SHA256 = dict(zip(_IDX_NAMES, (
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"), strict=True))
FASHION_SHA256 = dict(zip(_IDX_NAMES, (
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"), strict=True))

LOADERS.register("mnist")(_idx_loader(
    "mnist", ("mnist", "MNIST/raw"), DIGITS10, "https://ossci-datasets.s3.amazonaws.com/mnist/",
    MNIST_SHA256))
LOADERS.register("fashion-mnist")(_idx_loader(
    "fashion-mnist", ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"), FASHION,
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", FASHION_SHA256))


# --- CIFAR-10: python pickle batches, or the arrays .npz -----------------------------------

CIFAR_TAR = RemoteFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       md5="c58f30108f718f92721af3b95e74349a")
CIFAR_NPZ = RemoteFile("cifar10_train50k_test1k.npz",
                       sha256="9f73e65de3b7b4919261f6d50b0dc99653b51161fdb7f3521d8d0fe3629f9997")
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR_FOLDERS = ("cifar10", "cifar-10", "CIFAR10")


def _locate_cifar(data_dir) -> Path | None:
    folders = tuple(f"{f}/cifar-10-batches-py" for f in CIFAR_FOLDERS) + ("cifar-10-batches-py",)
    return (find_files(data_dir, folders, CIFAR_BATCHES)
            or find_files(data_dir, CIFAR_FOLDERS, (CIFAR_NPZ.name,)))


def _read_cifar(folder: Path, check: bool) -> Dataset:
    if (folder / CIFAR_NPZ.name).is_file() and not (folder / "test_batch").is_file():
        return read_arrays_dataset(folder / CIFAR_NPZ.name, check, name="cifar10", classes=CIFAR10)
    parts = [formats.read_cifar_batch(folder / n) for n in CIFAR_BATCHES]
    xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    return Dataset("cifar10", Split(xtr, ytr), Split(*parts[5]), CIFAR10, str(folder))


def _fetch_cifar(root: Path) -> Path:
    tar_path = download(CIFAR_TAR, root / "cifar10")
    with tarfile.open(tar_path) as tar:
        tar.extractall(root / "cifar10", filter="data")
    return root / "cifar10" / "cifar-10-batches-py"


LOADERS.register("cifar10")(Loader(
    "cifar10", CIFAR_FOLDERS,
    "put cifar-10-batches-py/ (the python version) or cifar10_train50k_test1k.npz in <dir>/cifar10/ "
    "and pass --data-dir <dir>, or pass --download where a network exists",
    _locate_cifar, _read_cifar, _fetch_cifar))


# --- SVHN: the cropped-digit .mat files ----------------------------------------------------

SVHN_FILES = (
    RemoteFile("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
               md5="e26dedcc434d2e4c54c9b2d4a06d8373"),
    RemoteFile("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
               md5="eb5a983be6a315427106f1b164d9cef3"),
)


def _read_svhn(folder: Path, check: bool) -> Dataset:
    if check:
        for f in SVHN_FILES:
            verify(folder / f.name, f)
    (xtr, ytr), (xte, yte) = (formats.read_svhn_mat(folder / f.name) for f in SVHN_FILES)
    return Dataset("svhn", Split(xtr, ytr), Split(xte, yte), DIGITS10, str(folder))


def _fetch_svhn(root: Path) -> Path:
    for f in SVHN_FILES:
        download(f, root / "svhn")
    return root / "svhn"


LOADERS.register("svhn")(Loader(
    "svhn", ("svhn", "SVHN"),
    "put train_32x32.mat and test_32x32.mat in <dir>/svhn/ and pass --data-dir <dir>, "
    "or pass --download where a network exists",
    lambda d: find_files(d, ("svhn", "SVHN"), tuple(f.name for f in SVHN_FILES)),
    _read_svhn, _fetch_svhn))


# --- users' own arrays ----------------------------------------------------------------------

def read_arrays_dataset(path: Path, check: bool, name: str | None = None,
                        classes: tuple[str, ...] | None = None) -> Dataset:
    if not path.is_file():
        raise DataError(f"arrays file {path} not found; expected an .npz with x_train, y_train, "
                        "x_test, y_test")
    if check and path.name == CIFAR_NPZ.name:
        verify(path, CIFAR_NPZ)
    a = formats.read_arrays(path)
    n_classes = int(max(a["y_train"].max(), a["y_test"].max())) + 1
    return Dataset(name or path.stem, Split(a["x_train"], a["y_train"]), Split(a["x_test"], a["y_test"]),
                   classes or tuple(str(i) for i in range(n_classes)), str(path))
