"""Ternary Weight Networks (Li, Zhang & Liu, arXiv 1605.04711, 2016).

    Delta = 0.7 * mean|w|
    Q(w)  = alpha * t,   t_i = sign(w_i) * 1[|w_i| > Delta]
    alpha = mean_{|w_i| > Delta} |w_i|          (mean over the support, not over all N)

``0.7 * mean|w|`` approximates the threshold that minimises ||w - alpha t||^2 for Gaussian or
uniform weights; given t, the scale above is the exact least-squares optimum. Options:
per output channel statistics, and ``threshold`` to change the 0.7 factor. Backward: identity
straight-through estimator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Encoded, WeightQuantizer, channel_reduce_dims, straight_through
from .registry import register

TERNARY_LEVELS = (-1.0, 0.0, 1.0)


def ternary_codes(w: Tensor, delta: Tensor) -> Tensor:
    """Codes 0, 1, 2 for -1, 0, +1 (|w| > delta keeps the sign)."""
    t = (w > delta).to(torch.uint8) - (w < -delta).to(torch.uint8) + 1
    return t.to(torch.uint8)


def support_mean(w: Tensor, mask: Tensor, per_channel: bool, axis: int = 0) -> Tensor:
    """mean|w| over ``mask`` (per tensor or per output channel along ``axis``); 0 where the support
    is empty."""
    a = w.abs() * mask
    if per_channel and w.dim() > 1:
        dims = channel_reduce_dims(w, axis)
        return a.sum(dims, keepdim=True) / mask.sum(dims, keepdim=True).clamp_min(1)
    return a.sum() / mask.sum().clamp_min(1)


def ternarize(w: Tensor, delta: Tensor, alpha: Tensor) -> Tensor:
    codes = ternary_codes(w, delta)
    return (codes.to(w.dtype) - 1) * alpha


@register
class TWNWeight(WeightQuantizer):
    name = "twn"
    bits_allowed = (2,)

    def __init__(self, bits: int = 2, per_channel: bool = False, threshold: float = 0.7) -> None:
        super().__init__(bits, per_channel)
        if not 0 < threshold < 10:
            raise ValueError(f"twn: threshold factor must be in (0, 10), got {threshold}")
        self.threshold = threshold

    def params(self, w: Tensor) -> tuple[Tensor, Tensor]:
        w = w.detach()
        delta = self.threshold * self.reduce_abs_mean(w)
        alpha = support_mean(w, (w.abs() > delta).to(w.dtype), self.per_channel, self.channel_axis)
        return delta, alpha

    def forward(self, w: Tensor) -> Tensor:
        delta, alpha = self.params(w)
        return straight_through(ternarize(w.detach(), delta, alpha), w)

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        delta, alpha = self.params(w)
        return Encoded(
            codes=ternary_codes(w, delta),
            levels=torch.tensor(TERNARY_LEVELS, dtype=w.dtype, device=w.device),
            scale=alpha,
            bits=2,
        )
