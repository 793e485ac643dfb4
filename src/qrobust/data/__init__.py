"""Datasets: digits (embedded), mnist, fashion-mnist, cifar10, svhn, and users' .npz arrays."""

from qrobust.data.core import Dataset, Split, batches, take, to_float, train_val_split
from qrobust.data.loaders import LOADERS, dataset_names, load_dataset
from qrobust.data.sources import search_roots
from qrobust.data.transforms import gaussian_noise, random_crop, random_flip

__all__ = [
    "LOADERS", "Dataset", "Split", "batches", "dataset_names", "gaussian_noise", "load_dataset",
    "random_crop", "random_flip", "search_roots", "take", "to_float", "train_val_split",
]
