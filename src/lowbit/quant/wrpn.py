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

**The range option** (``scale``). The fixed range ``[-1, 1]`` (``scale="unit"``, the default
and the paper's formula) presumes weights of unit magnitude. Weights of a network trained in
float are far smaller (a LeNet-5's are below 0.4 in every layer), and at 2 bits the cuts sit
at +-0.5: every weight rounds to 0, no signal or gradient passes any quantized layer, and
training stays at chance (measured: 11.35% on MNIST when fine-tuning from a float
checkpoint). For that case ``scale`` puts the same ``2n + 1`` level grid on the weights' own
range, ``c`` per tensor (or per output channel with ``per_channel``)::

    w_q = c * round(n * clip(w / c, -1, 1)) / n,   d w_q / d w = 1[|w| <= c]
    c = max|w|                                       scale="max"
    c = argmin_c ||w - w_q||^2 over max|w| k / mse_grid, k = 1..mse_grid     scale="mse"

``c`` is recomputed from the detached weights at every forward (the clip functions are
:mod:`lowbit.quant.uniform`'s). When every quantized layer is followed by a BatchNorm, the
layer's output scale is free, so this only moves the grid to where the weights are; it is
the unit-range quantizer applied to ``w / c``. With a scale the quantizer is numerically the
``uniform`` weight quantizer with the WRPN clip gradient; what makes the setting WRPN is the
widened model.

1 bit is not offered: ``n = 0`` divides by zero (Distiller's formula breaks there too). For
1-bit WRPN-style weights use ``binary`` (``mean|w| * sign(w)``) on the widened model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Encoded, WeightQuantizer, straight_through
from .registry import register
from .uniform import mse_clip, symmetric_codes

_EPS = 1e-12
SCALES = ("unit", "max", "mse")


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

    def __init__(
        self, bits: int, scale: str = "unit", per_channel: bool = False, mse_grid: int = 100
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"wrpn: unknown scale={scale!r}; allowed: {', '.join(SCALES)}")
        if per_channel and scale == "unit":
            raise ValueError(
                "wrpn: per_channel=true needs scale 'max' or 'mse'; the unit range [-1, 1] is "
                "fixed, there is no scale to share per channel"
            )
        if isinstance(mse_grid, bool) or not isinstance(mse_grid, int) or mse_grid < 1:
            raise ValueError(f"wrpn: mse_grid must be an integer >= 1, got {mse_grid!r}")
        super().__init__(bits, per_channel=per_channel)
        self.scale_mode = scale
        self.mse_grid = mse_grid
        self.n = 2 ** (bits - 1) - 1

    def clip(self, w: Tensor) -> Tensor:
        """The range ``c`` (detached; 0-d, or ``(C, 1, ...)`` per channel)."""
        w = w.detach()
        if self.scale_mode == "unit":
            return torch.ones((), dtype=w.dtype, device=w.device)
        if self.scale_mode == "mse":
            return mse_clip(w, self.n, self.mse_grid, self.per_channel, self.channel_axis)
        return self.reduce_abs_max(w).clamp_min(_EPS)

    def forward(self, w: Tensor) -> Tensor:
        if self.scale_mode == "unit":
            return straight_through(wrpn_quantize(w.detach(), self.bits), torch.clamp(w, -1, 1))
        c = self.clip(w)
        q = symmetric_codes(w.detach(), c / self.n, self.n) * (c / self.n)
        return straight_through(q, torch.clamp(w, -c, c))

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        n = self.n
        if self.scale_mode == "unit":
            return Encoded(
                codes=(wrpn_codes(w, self.bits) + n).to(torch.uint8),
                levels=torch.arange(-n, n + 1, dtype=w.dtype, device=w.device) / n,
                scale=torch.ones((), dtype=w.dtype, device=w.device),
                bits=self.bits,
            )
        s = self.clip(w) / n
        return Encoded(
            codes=(symmetric_codes(w, s, n) + n).to(torch.uint8),
            levels=torch.arange(-n, n + 1, dtype=w.dtype, device=w.device),
            scale=s,
            bits=self.bits,
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale_mode}, per_channel={self.per_channel}"
