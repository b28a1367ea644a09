"""lowbit.data: datasets from local files and installed packages, and synthetic data.

Everything is held in memory and served by :class:`BatchLoader` (no per-sample
``DataLoader``): ``uint8`` images are normalized per batch as ``(x/255 - mean)/std``,
with vectorized random-crop/flip augmentation whose randomness depends only on
``(seed, epoch)``. Pickled files (MNIST's ``mnist.pkl.gz``, CIFAR-10 python batches) are
read with a restricted unpickler that resolves only numpy's array globals.

    >>> from lowbit.data import load_dataset
    >>> data = load_dataset("mnist", batch_size=128)
    >>> for epoch in range(2):
    ...     data.train.set_epoch(epoch)
    ...     for x, y in data.train: ...

This package imports nothing else of lowbit but ``lowbit._io`` (atomic files).
"""

from .bundle import DataBundle, channel_stats, make_bundle
from .datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    STATS,
    list_datasets,
    load_dataset,
    make_synthetic,
    read_cifar10_batches,
    read_mnist_pickle,
)
from .errors import DatasetFormatError, DatasetNotFoundError
from .idx import read_idx, write_idx
from .imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderArrays,
    ImageFolderStream,
    load_image_folder,
    load_lazy_image_folder,
    read_image_folder,
)
from .loader import (
    Augment,
    BatchLoader,
    Loader,
    default_val_size,
    epoch_seed,
    hflip,
    holdout_indices,
    normalize,
    parse_augment,
    random_crop,
)
from .safe_pickle import RestrictedUnpickler, safe_load, safe_loads

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STATS",
    "Augment",
    "BatchLoader",
    "DataBundle",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageFolderArrays",
    "ImageFolderStream",
    "Loader",
    "RestrictedUnpickler",
    "channel_stats",
    "default_val_size",
    "epoch_seed",
    "hflip",
    "holdout_indices",
    "list_datasets",
    "load_dataset",
    "load_image_folder",
    "load_lazy_image_folder",
    "make_bundle",
    "make_synthetic",
    "normalize",
    "parse_augment",
    "random_crop",
    "read_cifar10_batches",
    "read_idx",
    "read_image_folder",
    "read_mnist_pickle",
    "safe_load",
    "safe_loads",
    "write_idx",
]
