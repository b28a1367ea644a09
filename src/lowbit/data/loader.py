"""Fast in-memory batch iteration with deterministic, vectorized augmentation.

A :class:`BatchLoader` holds a whole split as two tensors (images as ``uint8``
``(N, C, H, W)`` or features as ``float32``; labels ``int64``) and slices batches out of
them: no per-sample ``Dataset.__getitem__``, no worker processes. On 2 CPU cores this is
what keeps the data side out of the training profile.

Determinism: everything random about epoch ``e`` (the order and every augmentation
draw) is computed up front from one ``torch.Generator`` seeded with
``seed * 1000003 + e`` (see :func:`epoch_seed`), drawn in a fixed order: the
permutation, then the crop offsets, then the flips, one per sample *position* in the
epoch. Batch ``b`` of epoch ``e`` is therefore a pure function of ``(seed, e, b)``, and a
resumed run (``set_epoch(e)``, optionally ``iter_from(b)``) sees exactly the batches the
uninterrupted run saw. The epoch does not advance by itself: call ``set_epoch`` once per
epoch (as with ``torch.utils.data.DistributedSampler``).

Devices: :meth:`BatchLoader.to` moves the stored split to a device (a GPU); the epoch's plan
is still drawn on the CPU generator (so it is the same on every device), moved once per
epoch, and crop/flip/normalisation run on the device, per batch, as tensor ops.

Several processes (DistributedDataParallel): :meth:`Loader.shard` gives rank ``r`` of
``world`` its contiguous part of every *global* batch (``batch_size`` is the global batch):
the union over ranks of batch ``b`` is batch ``b`` of the unsharded loader, so W processes
with batch B/W see exactly what one process with batch B sees.

Augmentation follows torchvision's ``RandomCrop(size, padding=p)`` +
``RandomHorizontalFlip()`` + ``ToTensor()`` + ``Normalize(mean, std)``: the zero padding is
applied to the raw pixels (black), before normalization.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Augment",
    "BatchLoader",
    "Loader",
    "default_pad",
    "default_val_size",
    "epoch_seed",
    "hflip",
    "holdout_indices",
    "normalize",
    "parse_augment",
    "random_crop",
]

_SEED_MUL = 1000003


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of epoch ``epoch``: ``seed * 1000003 + epoch`` (mod 2**64)."""
    return (int(seed) * _SEED_MUL + int(epoch)) % (1 << 64)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation: random crop with ``pad`` pixels of zero padding on
    every side (0: no crop) and a random horizontal flip with probability 1/2."""

    pad: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f"Augment.pad must be >= 0, got {self.pad}")

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip

    def describe(self) -> str:
        parts = ([f"crop(pad={self.pad})"] if self.pad else []) + (["hflip"] if self.flip else [])
        return "+".join(parts) or "none"


def default_pad(height: int) -> int:
    """Padding of the standard random crop for an image of this height: 4 for 32x32 (and
    28x28), 1 for 8x8; ``round(height / 8)`` in general."""
    return max(1, (int(height) + 4) // 8)


_AUGMENT_WORDS = {"none", "off", "false", "no", "", "crop", "flip", "hflip", "crop+flip",
                  "flip+crop", "crop+hflip", "standard", "default", "true", "on", "yes"}


def parse_augment(
    spec: Any, default: Augment | None = None, height: int | None = None
) -> Augment | None:
    """Turn a user's augmentation choice into an :class:`Augment` (or ``None``).

    ``None`` -> ``default``; ``False``/``"none"`` -> no augmentation; ``True``/
    ``"standard"`` -> ``default`` if it is active, else crop+flip; ``"crop"``, ``"flip"``,
    ``"crop+flip"``; an :class:`Augment`; or a dict ``{"pad": 4, "flip": True}``. The crop
    padding for the words is :func:`default_pad` of ``height`` (4 when unknown).
    """
    pad = default_pad(height) if height else 4
    if spec is None:
        aug = default
    elif isinstance(spec, Augment):
        aug = spec
    elif isinstance(spec, dict):
        aug = Augment(**spec)
    elif isinstance(spec, bool):
        aug = (default if default is not None and default.active else Augment(pad, True)) \
            if spec else None
    elif isinstance(spec, str):
        word = spec.strip().lower().replace(" ", "")
        if word not in _AUGMENT_WORDS:
            raise ValueError(
                f"unknown augment {spec!r}; use none, crop, flip, crop+flip or standard"
            )
        if word in ("none", "off", "false", "no", ""):
            aug = None
        elif word in ("standard", "default", "true", "on", "yes"):
            aug = default if default is not None and default.active else Augment(pad, True)
        else:
            aug = Augment(pad if "crop" in word else 0, "flip" in word)
    else:
        raise TypeError(f"augment must be None, bool, str, dict or Augment, got {type(spec)}")
    return aug if aug is not None and aug.active else None


def random_crop(x: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """Crop ``(B, C, H, W)`` images from their zero-padded versions.

    ``offsets`` is ``(B, 2)`` integers in ``[0, 2 * pad]``: the top and left corner of
    each crop in the padded image (``pad, pad`` is the identity). Works on any dtype; zero
    is the fill value.
    """
    if pad == 0:
        return x
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(H, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(W, device=x.device)  # (B, W)
    xp = xp.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pad))
    return xp.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of ``(B, C, H, W)`` ``x`` left-right where ``mask`` (B,) is true."""
    if not bool(mask.any()):
        return x
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def _affine(
    mean: Sequence[float], std: Sequence[float], scale: float, dim: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(a, b)`` with ``x * a + b == (x / scale - mean) / std``, shaped to broadcast over
    dim 1 of a ``dim``-D batch; ``None`` for the identity."""
    m = torch.as_tensor(tuple(mean), dtype=torch.float64)
    s = torch.as_tensor(tuple(std), dtype=torch.float64)
    if scale == 1.0 and bool((m == 0).all()) and bool((s == 1).all()):
        return None
    k = max(m.numel(), s.numel())
    m, s = m.expand(k), s.expand(k)
    shape = (1, -1) + (1,) * (dim - 2) if k > 1 else (1,) * dim
    a = (1.0 / (scale * s)).to(torch.float32).reshape(shape)
    b = (-m / s).to(torch.float32).reshape(shape)
    return a, b


def normalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, scale: float = 1.0
) -> torch.Tensor:
    """``(x / scale - mean) / std`` in float32, per channel (dim 1), as a new tensor.

    Images stored as uint8 use ``scale=255`` (``(x/255 - mean)/std``, like ``ToTensor`` +
    ``Normalize``). ``mean``/``std`` of length 1 apply to all channels. Computed as one
    fused ``x * a + b`` (a = 1/(scale*std), b = -mean/std), equal to the formula within
    float32 rounding.
    """
    ab = _affine(mean, std, scale, max(x.dim(), 2))
    if ab is None:
        return x.to(torch.float32, copy=True)
    return torch.addcmul(ab[1], x, ab[0]).to(torch.float32)


class Loader:
    """What every lowbit loader offers: batches of ``(x float32, y int64)``,
    ``len()`` batches per epoch, ``set_epoch``, ``iter_from``, ``subset`` and ``replace``.

    Subclasses implement :meth:`_draw` (per-position randomness of one epoch) and
    :meth:`_batch` (make one batch from sample indices and their draws).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        augment: Augment | None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._n = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.augment = augment if augment is not None and augment.active else None
        self.epoch = 0
        self.rank, self.world = 0, 1

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._n

    def __len__(self) -> int:
        if self.drop_last:
            return self._n // self.batch_size
        return math.ceil(self._n / self.batch_size)

    def shard(self, rank: int, world: int) -> Loader:
        """This loader, serving only rank ``rank``'s part of each global batch (in place;
        returns self). Parts differ by at most one sample; ``world=1`` undoes sharding."""
        if not 0 <= rank < world:
            raise ValueError(f"shard: need 0 <= rank < world, got rank={rank}, world={world}")
        if self.batch_size < world:
            raise ValueError(f"shard: the global batch ({self.batch_size}) is smaller than the "
                             f"number of processes ({world}); raise the batch size")
        self.rank, self.world = int(rank), int(world)
        return self

    # -- epochs --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``: its order and augmentation depend only on (seed, epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def generator(self, epoch: int | None = None) -> torch.Generator:
        """The generator behind ``epoch`` (default: the current one), freshly seeded."""
        e = self.epoch if epoch is None else epoch
        return torch.Generator().manual_seed(epoch_seed(self.seed, e))

    def epoch_order(self, epoch: int | None = None) -> torch.Tensor:
        """The sample indices of ``epoch`` in the order they are served."""
        return self._plan(epoch)[0]

    def _plan(self, epoch: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.generator(epoch)
        order = torch.randperm(self._n, generator=g) if self.shuffle else torch.arange(self._n)
        return order, self._draw(g)

    def _draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def _batch(
        self, idx: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch starting at batch ``start_batch`` (for resuming)."""
        order, draws = self._plan()
        order, draws = self._to_device(order, draws)
        bs, r, w = self.batch_size, self.rank, self.world
        for b in range(int(start_batch), len(self)):
            lo, hi = b * bs, min((b + 1) * bs, self._n)
            if w > 1:  # this rank's contiguous part of the global batch
                lo, hi = lo + (hi - lo) * r // w, lo + (hi - lo) * (r + 1) // w
            yield self._batch(order[lo:hi], {k: v[lo:hi] for k, v in draws.items()})

    def global_batch(self, b: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``b`` of the current epoch as the unsharded loader serves it (every rank
        gets the same tensors: used to initialise data-dependent quantizers identically)."""
        order, draws = self._to_device(*self._plan())
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self._n)
        return self._batch(order[lo:hi], {k: v[lo:hi] for k, v in draws.items()})

    def _to_device(self, order: torch.Tensor, draws: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return order, draws

    # -- derived loaders -------------------------------------------------------------------
    def _subset_indices(self, n: int, seed: int) -> torch.Tensor:
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        g = torch.Generator().manual_seed(int(seed))
        return torch.randperm(self._n, generator=g)[: min(int(n), self._n)]

    def subset(self, n: int, seed: int = 0, **overrides: Any) -> Loader:
        """A loader over ``n`` samples picked at random (a fixed function of ``seed``),
        in random order; ``overrides`` change batch_size, shuffle, augment, ..."""
        raise NotImplementedError

    def replace(self, **overrides: Any) -> Loader:
        """A loader over the same samples with some options changed (storage is shared)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        aug = self.augment.describe() if self.augment else "none"
        return (
            f"{type(self).__name__}(num_samples={self._n}, batch_size={self.batch_size}, "
            f"batches={len(self)}, shuffle={self.shuffle}, drop_last={self.drop_last}, "
            f"augment={aug}, seed={self.seed}, epoch={self.epoch})"
        )


def default_val_size(num_train: int) -> int:
    """Validation images carved from a training set of ``num_train``: 5,000 for the 50k-60k
    sets (MNIST, Fashion-MNIST, CIFAR-10), a tenth of smaller sets (at least 1)."""
    return 5000 if num_train >= 50000 else max(1, num_train // 10)


def holdout_indices(y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the validation split of labels ``y`` (see :meth:`BatchLoader.holdout`):
    the last ``n`` positions, or per-class tails when ``y`` is sorted by class."""
    total = int(y.numel())
    if not 1 <= n < total:
        raise ValueError(f"validation size must be in [1, {total - 1}] for {total} training samples, got {n}")
    if total < 2 or not bool((y[1:] >= y[:-1]).all()) or int(y[0]) == int(y[-1]):
        return torch.arange(total - n, total)
    # labels grouped by class: the last images of every class, largest remainders first
    _, counts = torch.unique_consecutive(y, return_counts=True)
    share = counts.double() * n / total
    take = share.floor().long()
    extra = n - int(take.sum())
    take[torch.argsort(share - take, descending=True, stable=True)[:extra]] += 1
    ends = counts.cumsum(0)
    return torch.cat([torch.arange(int(e) - int(k), int(e)) for e, k in zip(ends, take, strict=True)])


def _as_tensor(a: Any, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    arr = np.asarray(a)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).copy()
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(arr)
    except TypeError as e:
        raise TypeError(f"{what}: unsupported dtype {arr.dtype}") from e


class BatchLoader(Loader):
    """In-memory batches of a whole split.

    Args:
        x: ``uint8`` images ``(N, C, H, W)`` (normalized as ``(x/255 - mean)/std``), or
            float data of any shape ``(N, ...)`` (normalized as ``(x - mean)/std``).
        y: ``(N,)`` integer labels (stored as int64).
        batch_size, shuffle, drop_last, seed: as usual; see the module docstring for
            how ``seed`` and the epoch fix every random choice.
        mean, std: per-channel statistics (length C, or 1 for all). Defaults: no change.
        augment: :class:`Augment` (applied to 4-D data only) or ``None``.
        flatten: yield ``x`` as ``(B, prod(...))`` (after augmentation).
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        *,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        augment: Augment | None = None,
        flatten: bool = False,
    ) -> None:
        xt = _as_tensor(x, "x")
        yt = _as_tensor(y, "y")
        if yt.dim() != 1:
            yt = yt.reshape(-1)
        if xt.shape[0] != yt.shape[0]:
            raise ValueError(f"x has {xt.shape[0]} samples but y has {yt.shape[0]}")
        if xt.dtype == torch.uint8:
            if xt.dim() != 4:
                raise ValueError(f"uint8 images must be (N, C, H, W), got {tuple(xt.shape)}")
        elif xt.is_floating_point():
            xt = xt.to(torch.float32)
        else:
            raise TypeError(f"x must be uint8 images or floating point, got {xt.dtype}")
        if yt.is_floating_point() or yt.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got {yt.dtype}")
        yt = yt.to(torch.int64)
        if augment is not None and augment.active and xt.dim() != 4:
            raise ValueError(
                f"crop/flip augmentation needs (N, C, H, W) data, got {tuple(xt.shape)}"
            )
        channels = xt.shape[1] if xt.dim() >= 2 else 1
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        for nm, v in (("mean", mean_t), ("std", std_t)):
            if len(v) not in (1, channels):
                raise ValueError(f"{nm} has {len(v)} values; data has {channels} channels")
        if any(s <= 0 for s in std_t):
            raise ValueError(f"std must be positive, got {std_t}")
        super().__init__(
            xt.shape[0],
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            augment=augment,
        )
        self._x = xt
        self._y = yt
        self.mean = mean_t
        self.std = std_t
        self.flatten = bool(flatten)
        self._ab = _affine(mean_t, std_t, 255.0 if xt.dtype == torch.uint8 else 1.0,
                           max(xt.dim(), 2))
        if self._ab is not None and xt.device.type != "cpu":
            self._ab = (self._ab[0].to(xt.device), self._ab[1].to(xt.device))

    # -- device ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._x.device

    def to(self, device: str | torch.device) -> BatchLoader:
        """Hold the split on ``device`` (in place; returns self): batches are then cut,
        augmented and normalized there. The random plan stays a function of (seed, epoch)."""
        device = torch.device(device)
        self._x, self._y = self._x.to(device), self._y.to(device)
        if self._ab is not None:
            self._ab = (self._ab[0].to(device), self._ab[1].to(device))
        return self

    def _to_device(self, order: torch.Tensor, draws: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dev = self._x.device
        if dev.type == "cpu":
            return order, draws
        return order.to(dev), {k: v.to(dev) for k, v in draws.items()}

    # -- data ------------------------------------------------------------------------------
    @property
    def x(self) -> torch.Tensor:
        """The stored samples (uint8 images or float32 data), not normalized."""
        return self._x

    @property
    def y(self) -> torch.Tensor:
        """The stored labels (int64)."""
        return self._y

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one yielded sample (after ``flatten``)."""
        s = tuple(self._x.shape[1:])
        return (math.prod(s),) if self.flatten else s

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize (and flatten) stored samples the way batches are served (no
        augmentation); returns a new float32 tensor."""
        if self._ab is None:
            out = x.to(torch.float32, copy=True)
        else:
            out = torch.addcmul(self._ab[1], x, self._ab[0]).to(torch.float32)
        return out.reshape(out.shape[0], -1) if self.flatten else out

    def _draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        d: dict[str, torch.Tensor] = {}
        if self.augment is not None:
            if self.augment.pad:
                d["offsets"] = torch.randint(0, 2 * self.augment.pad + 1, (self._n, 2),
                                             generator=g)
            if self.augment.flip:
                d["flips"] = torch.rand(self._n, generator=g) < 0.5
        return d

    def _batch(
        self, idx: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xb = self._x[idx]
        if self.augment is not None:
            # crop and flip as two gathers (rows, then columns, reversed where flipped):
            # same result as random_crop + hflip with fewer passes over the batch
            B, C, H, W = xb.shape
            dev = xb.device
            cols = torch.arange(W, device=dev).expand(B, W)
            if "offsets" in draws:
                p, offs = self.augment.pad, draws["offsets"]
                xb = F.pad(xb, (p, p, p, p))
                rows = offs[:, 0:1] + torch.arange(H, device=dev)
                xb = xb.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * p))
                cols = offs[:, 1:2] + torch.arange(W, device=dev)
            if "flips" in draws:
                cols = torch.where(draws["flips"][:, None], cols.flip(1), cols)
            xb = xb.gather(3, cols[:, None, None, :].expand(B, C, H, W))
        return self.transform(xb), self._y[idx]

    # -- derived loaders ---------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return dict(batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
                    seed=self.seed, mean=self.mean, std=self.std, augment=self.augment,
                    flatten=self.flatten)

    def replace(self, **overrides: Any) -> BatchLoader:
        opts = self._options()
        unknown = set(overrides) - set(opts)
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(opts)}")
        opts.update(overrides)
        new = BatchLoader(self._x, self._y, **opts)
        new.epoch = self.epoch
        return new

    def holdout(self, n: int, **overrides: Any) -> tuple[BatchLoader, BatchLoader]:
        """``(rest, held)``: a validation split carved deterministically (no randomness, no
        seed) from these samples: the last ``n`` in stored order or, when the labels are
        stored grouped by class (image folders), the last samples of every class, in
        proportion to the class sizes. ``held`` is unshuffled and unaugmented; ``overrides``
        apply to it."""
        idx = holdout_indices(self._y.cpu(), n)
        keep = torch.ones(self._n, dtype=torch.bool)
        keep[idx] = False
        rest_idx = keep.nonzero().squeeze(1).to(self._x.device)
        idx = idx.to(self._x.device)
        opts = self._options()
        rest = BatchLoader(self._x[rest_idx], self._y[rest_idx], **opts)
        opts.update({"shuffle": False, "augment": None, "drop_last": False, **overrides})
        return rest, BatchLoader(self._x[idx], self._y[idx], **opts)

    def subset(self, n: int, seed: int = 0, **overrides: Any) -> BatchLoader:
        idx = self._subset_indices(n, seed)
        opts = self._options()
        opts.update(overrides)
        return BatchLoader(self._x[idx], self._y[idx], **opts)

    def split(self, n: int, seed: int = 0, **overrides: Any) -> tuple[BatchLoader, BatchLoader]:
        """Two loaders over disjoint random parts of the samples: ``n`` of them and the rest
        (e.g. a validation set held out of the training set); ``overrides`` apply to both."""
        if not 1 <= n < self._n:
            raise ValueError(f"split size must be in [1, {self._n - 1}] for {self._n} samples, got {n}")
        idx = torch.randperm(self._n, generator=torch.Generator().manual_seed(int(seed)))
        opts = self._options()
        opts.update(overrides)
        return (BatchLoader(self._x[idx[:n]], self._y[idx[:n]], **opts),
                BatchLoader(self._x[idx[n:]], self._y[idx[n:]], **opts))

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Number of samples per label."""
        return torch.bincount(self._y, minlength=num_classes or 0)
