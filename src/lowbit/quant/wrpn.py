"""WRPN: wide reduced-precision networks (Mishra, Nurvitadhi, Cook, Marr; ICLR 2018,
arXiv 1709.01134), weights as in Distiller's ``WRPNQuantizer``.

Weights, ``k >= 2`` bits, ``n = 2^(k-1) - 1``::

    w_q = round(n * clip(w, -1, 1)) / n          2n + 1 = 2^k - 1 levels in [-1, 1]

Backward: straight-through through ``round`` and the true derivative of the clip,
``d w_q / d w = 1[|w| <= 1]``.

Activations: ``quant_k(clip(x, 0, 1))`` with a clipped-ReLU straight-through gradient, which is
exactly DoReFa's activation quantizer, so no separate ``wrpn`` activation method is registered:
a WRPN recipe uses ``activation: {method: dorefa, bits: k}``.

**WRPN = this quantizer + a widened model.** The paper's point is to recover accuracy by
widening every layer (2-3x the filters) while lowering precision; the quantizer alone is a
plain fixed-range uniform quantizer (Distiller's implementation omits the widening). In
lowbit the widening is the zoo model's ``width_mult``::

    model = lowbit.models.build_model("resnet20", width_mult=2)
    lowbit.quantize(model, recipe_with_wrpn_weights_and_dorefa_activations)

and any size / compression / BOPs figure must count the *widened* model's parameters and
MACs (a 2x wider conv layer holds about 4x the weights), not the base model's.

1 bit is not offered: ``n = 0`` divides by zero (Distiller's formula breaks there too). For
1-bit WRPN-style weights use ``binary`` (``mean|w| * sign(w)``) on the widened model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Encoded, WeightQuantizer, straight_through
from .registry import register


def wrpn_codes(w: Tensor, bits: int) -> Tensor:
    """Signed integer codes ``round(n * clip(w, -1, 1))`` in [-n, n] (as floats)."""
    n = 2 ** (bits - 1) - 1
    return torch.round(n * torch.clamp(w, -1, 1))


def wrpn_quantize(w: Tensor, bits: int) -> Tensor:
    """``round(n * clip(w, -1, 1)) / n``."""
    return wrpn_codes(w, bits) / (2 ** (bits - 1) - 1)


@register
class WRPNWeight(WeightQuantizer):
    name = "wrpn"
    bits_allowed = tuple(range(2, 9))

    def __init__(self, bits: int) -> None:
        # No per_channel option: the range [-1, 1] is fixed, there is no scale to share.
        super().__init__(bits, per_channel=False)

    def forward(self, w: Tensor) -> Tensor:
        return straight_through(wrpn_quantize(w.detach(), self.bits), torch.clamp(w, -1, 1))

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        n = 2 ** (self.bits - 1) - 1
        return Encoded(
            codes=(wrpn_codes(w, self.bits) + n).to(torch.uint8),
            levels=torch.arange(-n, n + 1, dtype=w.dtype, device=w.device) / n,
            scale=torch.ones((), dtype=w.dtype, device=w.device),
            bits=self.bits,
        )
