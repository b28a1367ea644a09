"""PACT: parameterized clipping activation (Choi et al., arXiv 1805.06085, 2018).

    y   = clip(x, 0, alpha)                         alpha is learned per layer
    y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)

    dy_q/dx     = 1[0 <= x < alpha]                  (STE through round)
    dy_q/dalpha = 1[x >= alpha]

The paper adds an L2 penalty ``lambda_alpha * alpha^2`` (see ``l2_penalty``) and initialises
alpha at 10; ``alpha_init`` sets it. Levels are i * alpha/(2^k-1), i = 0..2^k-1.

Speed: on contiguous float32 CPU tensors the quantizer runs as one fused loop forward and one
backward (``fused.py``): the same values and input gradients, alpha's gradient equal to float
rounding. The torch formulas here define the quantizer and serve every other case.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import fused
from .base import ActivationQuantizer, Encoded, straight_through
from .registry import register


def pact_clip(x: Tensor, alpha: Tensor) -> Tensor:
    """clip(x, 0, alpha) with d/dalpha = 1[x >= alpha]."""
    return torch.where(x >= alpha, alpha, torch.relu(x))


def pact_codes(y: Tensor, alpha: Tensor, bits: int) -> Tensor:
    return torch.round(y * ((2**bits - 1) / alpha))


@register
class PACTActivation(ActivationQuantizer):
    name = "pact"
    bits_allowed = tuple(range(1, 9))

    def __init__(self, bits: int, alpha_init: float = 10.0) -> None:
        super().__init__(bits, "clipped_relu")
        if not alpha_init > 0:
            raise ValueError(f"pact: alpha_init must be > 0, got {alpha_init}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def step(self) -> Tensor:
        return self.alpha / (2**self.bits - 1)

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha.abs().clamp_min(1e-4)
        if fused.supported(x):  # the same values and gradients in one pass each way
            return fused.pact(x, alpha, self.bits)
        y = pact_clip(x, alpha)
        step = (alpha / (2**self.bits - 1)).detach()
        q = pact_codes(y.detach(), alpha.detach(), self.bits) * step
        return straight_through(q, y)

    def encode(self, x: Tensor) -> Encoded:
        alpha = self.alpha.detach().abs().clamp_min(1e-4)
        codes = pact_codes(pact_clip(x.detach(), alpha), alpha, self.bits).to(torch.uint8)
        levels = torch.arange(2**self.bits, dtype=x.dtype, device=x.device)
        return Encoded(codes=codes, levels=levels, scale=alpha / (2**self.bits - 1), bits=self.bits)

    def l2_penalty(self) -> Tensor:
        return self.alpha**2

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha.detach()):.4g}"
