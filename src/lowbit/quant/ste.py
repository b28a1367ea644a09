"""Coarse gradients (straight-through estimators) for activation quantizers.

For a staircase activation ``q`` with ``b`` bits and clip level ``top = (2^b - 1) * a``, the
a.e.-zero derivative ``q'`` is replaced in the chain rule by a surrogate derivative ``mu'``
(Yin et al., ICLR 2019, arXiv 1903.05662):

- identity:      mu'(x) = 1
- relu:          mu'(x) = 1[x > 0]
- clipped_relu:  mu'(x) = 1[0 < x <= top]

The paper proves that the expected coarse gradient of the ReLU and clipped-ReLU estimators
correlates positively with the true population gradient on a two-linear-layer model, while
the identity estimator can be unstable near some minima.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CoarseGrad, straight_through

COARSE_GRADIENTS: tuple[CoarseGrad, ...] = ("identity", "relu", "clipped_relu")


def surrogate(x: Tensor, kind: CoarseGrad, top: Tensor | float) -> Tensor:
    """The function whose derivative is the coarse gradient ``mu'``."""
    if kind == "identity":
        return x
    if kind == "relu":
        return torch.relu(x)
    if kind == "clipped_relu":
        # The clip level only shapes the gradient of x here; a learned clip (PACT) gets its
        # own gradient from the quantizer, so it is detached.
        top = top.detach() if isinstance(top, Tensor) else top
        return torch.clamp(torch.relu(x), max=top)
    raise ValueError(f"unknown coarse gradient {kind!r}; allowed: {', '.join(COARSE_GRADIENTS)}")


def coarse_derivative(x: Tensor, kind: CoarseGrad, top: float) -> Tensor:
    """``mu'(x)`` as a tensor of 0/1 (BCGD's backward, the tests and the STE benchmarks use it)."""
    if kind == "identity":
        return torch.ones_like(x)
    if kind == "relu":
        return (x > 0).to(x.dtype)
    if kind == "clipped_relu":
        return ((x > 0) & (x <= top)).to(x.dtype)
    raise ValueError(f"unknown coarse gradient {kind!r}; allowed: {', '.join(COARSE_GRADIENTS)}")


def apply_coarse(q: Tensor, x: Tensor, kind: CoarseGrad, top: Tensor | float) -> Tensor:
    """Forward value ``q`` (exactly), backward ``grad * mu'(x)``."""
    return straight_through(q, surrogate(x, kind, top))
