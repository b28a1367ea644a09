"""DataBundle: a dataset ready for training (two loaders plus what a model needs to know)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .loader import Augment, BatchLoader, Loader, default_val_size

__all__ = ["DataBundle", "channel_stats", "make_bundle"]


@dataclass
class DataBundle:
    """A dataset split into train, validation (optional) and test loaders.

    Attributes:
        name: dataset name (``"mnist"``, ``"cifar10"``, ...).
        train, test: the loaders (train shuffles and augments; test does neither).
        val: the validation split carved from the training set (see ``make_bundle``'s
            ``val_size``), or None. Model selection reads it; the test set is read once.
        num_classes: number of labels (labels are ``0 .. num_classes - 1``).
        in_shape: shape of one input as served: ``(C, H, W)``, or ``(features,)`` when
            flattened or for vector data.
        mean, std: per-channel statistics used for normalization.
        classes: label names, index = label.
        source: where the data came from (path and format), to say which data a number used.
    """

    name: str
    train: Loader
    test: Loader
    num_classes: int
    in_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)
    source: str = ""
    val: Loader | None = None

    def to(self, device: Any) -> DataBundle:
        """Hold every in-memory split on ``device`` (a GPU: batches are then cut, augmented
        and normalized there); streamed loaders stay on the CPU. Returns self."""
        for loader in (self.train, self.val, self.test):
            if isinstance(loader, BatchLoader):
                loader.to(device)
        return self

    def calibration(self, n: int = 512, seed: int = 0, batch_size: int | None = None) -> Loader:
        """``n`` random training samples, unshuffled and unaugmented (for PTQ/BN calibration)."""
        opts: dict[str, Any] = {"shuffle": False, "augment": None, "drop_last": False}
        if batch_size is not None:
            opts["batch_size"] = batch_size
        return self.train.subset(n, seed, **opts)

    def __repr__(self) -> str:
        val = f"val={self.val.num_samples}, " if self.val is not None else ""
        return (
            f"DataBundle(name={self.name!r}, train={self.train.num_samples}, {val}"
            f"test={self.test.num_samples}, num_classes={self.num_classes}, "
            f"in_shape={self.in_shape}, source={self.source!r})"
        )


def make_bundle(
    name: str,
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    classes: Sequence[str] = (),
    source: str = "",
    batch_size: int = 128,
    test_batch_size: int = 1000,
    augment: Augment | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    flatten: bool = False,
    val_size: int | str | None = None,
) -> DataBundle:
    """Build the :class:`BatchLoader` s of a dataset held in memory.

    ``val_size``: None or 0 (no validation split), an int, or ``"auto"``
    (:func:`~lowbit.data.loader.default_val_size`: 5,000 for MNIST/Fashion-MNIST/CIFAR-10).
    The split is carved from the training set before ``train_subset`` picks from the rest,
    and is the same whatever the seed (see :meth:`BatchLoader.holdout`)."""
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    train = BatchLoader(train_x, train_y, batch_size=batch_size, shuffle=True, seed=seed,
                        mean=mean_t, std=std_t, augment=augment, flatten=flatten)
    val = None
    if val_size == "auto":
        val_size = default_val_size(train.num_samples)
    elif isinstance(val_size, str):
        raise ValueError(f"val_size={val_size!r}: give a number of training images, 0 or 'auto'")
    if val_size:
        train, val = train.holdout(int(val_size), batch_size=test_batch_size)
    if train_subset is not None:
        train = train.subset(int(train_subset), seed)
    test = BatchLoader(test_x, test_y, batch_size=test_batch_size, shuffle=False, seed=seed,
                       mean=mean_t, std=std_t, augment=None, flatten=flatten)
    for split, ys in (("train", train.y), ("test", test.y)):
        if ys.numel() and (int(ys.min()) < 0 or int(ys.max()) >= num_classes):
            raise ValueError(
                f"{name} {split} labels span {int(ys.min())}..{int(ys.max())}, "
                f"outside 0..{num_classes - 1}"
            )
    return DataBundle(
        name=name,
        train=train,
        test=test,
        num_classes=int(num_classes),
        in_shape=train.sample_shape,
        mean=mean_t,
        std=std_t,
        classes=list(classes),
        source=source,
        val=val,
    )


def channel_stats(x: Any, scale: float = 255.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``(N, C, ...)`` data divided by ``scale``.

    uint8 data is summarized exactly through a 256-bin histogram per channel.
    """
    a = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    means, stds = [], []
    for c in range(a.shape[1]):
        ch = a[:, c]
        if ch.dtype == np.uint8:
            flat = torch.from_numpy(np.ascontiguousarray(ch)).reshape(-1)
            counts = torch.bincount(flat, minlength=256).double().numpy()  # fast, exact
            v = np.arange(256, dtype=np.float64) / scale
            n = counts.sum()
            m = float((counts * v).sum() / n)
            var = float((counts * (v - m) ** 2).sum() / n)
        else:
            f = ch.astype(np.float64) / scale
            m, var = float(f.mean()), float(f.var())
        means.append(m)
        stds.append(var**0.5 or 1.0)
    return tuple(means), tuple(stds)
