"""PACT: parameterized clipping activation (Choi et al., arXiv 1805.06085, 2018).

    y   = clip(x, 0, alpha)                         alpha is learned per layer
    y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)

    dy_q/dx     = 1[0 <= x < alpha]                  (STE through round)
    dy_q/dalpha = 1[x >= alpha]

``signed=True`` (an extension for inputs of either sign, not in the paper): the symmetric clip
and grid, ``Q = 2^(k-1) - 1`` (k >= 2)::

    y   = clip(x, -alpha, alpha),      y_q = round(y * Q / alpha) * alpha / Q
    dy_q/dx = 1[-alpha < x < alpha],   dy_q/dalpha = 1[x >= alpha] - 1[x <= -alpha]

levels ``i * alpha / Q``, ``i = -Q..Q``; training takes the torch formulas (no fused loop), the
packed runtime the signed code formula of ``runtime_codes_spec``.

The paper adds an L2 penalty ``lambda_alpha * alpha^2`` (see ``l2_penalty``) and initialises
alpha at 10; ``alpha_init`` sets it. Levels are i * alpha/(2^k-1), i = 0..2^k-1. ``alpha_lr`` gives
alpha its own learning rate (``param_lr``: the Trainer's optimizer puts it in a group of its own,
without weight decay): alpha's gradient comes from the inputs above the clip and from the L2
penalty, and the paper trains it with the weights, by SGD at their rate, while a short Adam
fine-tune at the model's 1e-3 moves it by at most about 1e-3 per step, so a clip started at 10,
above every activation, stays near 10. At 2 bits that clip leaves the float ResNet-20's activations
(99.9th percentile about 6) one level above zero: 82% of the positive ones round to zero
(``benchmarks/results/probe_pact_init.md``).

Speed: on contiguous float32 CPU tensors the quantizer runs as one fused loop forward and one
backward (``fused.py``): the same values and input gradients, alpha's gradient equal to float
rounding. The torch formulas here define the quantizer and serve every other case.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import fused
from .base import ActCodesSpec, ActivationQuantizer, Encoded, straight_through
from .registry import register


def pact_clip(x: Tensor, alpha: Tensor) -> Tensor:
    """clip(x, 0, alpha) with d/dalpha = 1[x >= alpha]."""
    return torch.where(x >= alpha, alpha, torch.relu(x))


def pact_clip_signed(x: Tensor, alpha: Tensor) -> Tensor:
    """clip(x, -alpha, alpha) with d/dalpha = 1[x >= alpha] - 1[x <= -alpha]."""
    return torch.where(x >= alpha, alpha, torch.where(x <= -alpha, -alpha, x))


def pact_codes(y: Tensor, alpha: Tensor, bits: int, top: int | None = None) -> Tensor:
    """``round(y * top / alpha)``; ``top`` is the top code, ``2^bits - 1`` unless given."""
    return torch.round(y * ((2**bits - 1 if top is None else top) / alpha))


@register
class PACTActivation(ActivationQuantizer):
    name = "pact"
    bits_allowed = tuple(range(1, 9))

    def __init__(self, bits: int, alpha_init: float = 10.0, signed: bool = False,
                 alpha_lr: float | None = None) -> None:
        super().__init__(bits, "clipped_relu", signed)
        if not alpha_init > 0:
            raise ValueError(f"pact: alpha_init must be > 0, got {alpha_init}")
        if alpha_lr is not None and (isinstance(alpha_lr, bool) or not isinstance(alpha_lr, int | float)
                                     or not alpha_lr > 0):
            raise ValueError(f"pact: alpha_lr must be a number > 0 (or null: the model's learning rate), "
                             f"got {alpha_lr!r}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.param_lr = None if alpha_lr is None else float(alpha_lr)  # alpha's optimizer group lr
        self.top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1  # the top code

    def step(self) -> Tensor:
        return self.alpha / self.top

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.check_sign(x)
        alpha = self.alpha.abs().clamp_min(1e-4)
        if fused.supported(x) and not self.signed:  # the same values and gradients in one pass each way
            return fused.pact(x, alpha, self.bits)
        y = pact_clip_signed(x, alpha) if self.signed else pact_clip(x, alpha)
        step = (alpha / self.top).detach()
        q = pact_codes(y.detach(), alpha.detach(), self.bits, self.top) * step
        return straight_through(q, y)

    def encode(self, x: Tensor) -> Encoded:
        alpha = self.alpha.detach().abs().clamp_min(1e-4)
        clip = pact_clip_signed if self.signed else pact_clip
        lo = -self.top if self.signed else 0
        codes = (pact_codes(clip(x.detach(), alpha), alpha, self.bits, self.top) - lo).to(torch.uint8)
        levels = torch.arange(lo, self.top + 1, dtype=x.dtype, device=x.device)
        return Encoded(codes=codes, levels=levels, scale=alpha / self.top, bits=self.bits)

    def runtime_codes_spec(self) -> ActCodesSpec | None:
        """Unsigned: ``rint(clip(x, 0, alpha) * ((2^k - 1) / alpha))`` in float32, values
        ``code * alpha / (2^k - 1)``. Signed: ``rint(clip(x, -alpha, alpha) * (Q / alpha)) + Q``
        (``encode``'s codes ``0..2Q``), values ``(code - Q) * alpha / Q``: the float32 products
        of ``encode``, whose ``round`` (half to even) is an odd function like the clip."""
        alpha = self.alpha.detach().abs().clamp_min(1e-4).float().cpu()
        hi, mult, step = float(alpha), float(self.top / alpha), float(alpha / self.top)
        if self.signed:
            return ActCodesSpec(self.bits, hi=hi, mult=mult, step=step, zero=float(self.top), lo=-hi,
                                offset=self.top)
        return ActCodesSpec(self.bits, hi=hi, mult=mult, step=step)

    def l2_penalty(self) -> Tensor:
        return self.alpha**2

    def extra_repr(self) -> str:
        signed = ", signed=True" if self.signed else ""
        return f"bits={self.bits}, alpha={float(self.alpha.detach()):.4g}{signed}"
