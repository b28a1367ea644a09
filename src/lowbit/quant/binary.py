"""Binary weights with a mean-magnitude scale (BinaryConnect / BWN / XNOR-Net weights).

    Q(w) = alpha * sign(w),     alpha = mean|w|   (per tensor, or per output channel as in
                                                   XNOR-Net, Rastegari et al., ECCV 2016)

``alpha = mean|w|`` is the least-squares optimal scale for a fixed sign pattern:
argmin_a ||w - a*sign(w)||^2 = <|w|, 1>/N. ``sign(0)`` is taken as +1 so every weight lands on
one of exactly two levels. The backward pass is the identity straight-through estimator,
optionally zeroed where ``|w| > clip`` (BinaryConnect's "hard tanh" cancellation).

BCGD (Yin et al., Res. Math. Sci. 2019) uses this quantizer for its W1 experiments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Encoded, WeightQuantizer, straight_through
from .registry import register

LEVELS = (-1.0, 1.0)


def binary_codes(w: Tensor) -> Tensor:
    """Code 1 for w >= 0, code 0 for w < 0."""
    return (w >= 0).to(torch.uint8)


def binarize(w: Tensor, scale: Tensor) -> Tensor:
    """``scale * sign(w)`` with sign(0) = +1."""
    return torch.where(w >= 0, scale, -scale)


@register
class BinaryWeight(WeightQuantizer):
    name = "binary"
    bits_allowed = (1,)

    def __init__(self, bits: int = 1, per_channel: bool = False, clip: float | None = None) -> None:
        super().__init__(bits, per_channel)
        if clip is not None and clip <= 0:
            raise ValueError(f"binary: clip must be > 0 or null, got {clip}")
        self.clip = clip

    def scale(self, w: Tensor) -> Tensor:
        return self.reduce_abs_mean(w.detach())

    def forward(self, w: Tensor) -> Tensor:
        q = binarize(w.detach(), self.scale(w))
        s = w if self.clip is None else torch.where(w.abs() <= self.clip, w, w.detach())
        return straight_through(q, s)

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        return Encoded(
            codes=binary_codes(w),
            levels=torch.tensor(LEVELS, dtype=w.dtype, device=w.device),
            scale=self.scale(w),
            bits=1,
        )
