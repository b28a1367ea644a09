"""DoReFa-Net weight and activation quantizers (Zhou et al., arXiv 1606.06160, 2016).

With ``quant_k(r) = round((2^k - 1) r) / (2^k - 1)`` on [0, 1] and an identity STE through
``round``:

- weights, k >= 2:   w_q = 2 * quant_k( tanh(w) / (2 max|tanh w|) + 1/2 ) - 1
  (the gradient flows through the tanh normalisation; levels are 2i/(2^k-1) - 1; the max is the
  layer's, as in the paper, so ``per_channel`` is refused: there is no scale to take per channel)
- weights, k = 1:    w_q = E * sign(w),  E = stop_grad(mean|w|)   (a different path, as in the
  reference tensorpack code; sign(0) = +1 here so there are exactly two levels)
- activations:       a_q = quant_k( clip(x, 0, 1) )  with a chosen coarse gradient
  (default clipped ReLU, i.e. the derivative of the clip, 1[0 < x <= 1]).

Speed: on contiguous float32 CPU tensors the activation quantizer runs as one fused loop forward
and one backward, and the k >= 2 weight quantizer as a few calls instead of some thirty small
ops (``fused.py``): the same values and gradients (for weights, the share that flows through
the max in the normalisation equal to float rounding). The torch formulas here define the
quantizers and serve every other case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fused
from .base import ActCodesSpec, ActivationQuantizer, CoarseGrad, Encoded, WeightQuantizer, straight_through
from .binary import BinaryWeight
from .registry import register
from .ste import apply_coarse


def uniform_levels(k: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """The 2^k points i/(2^k-1) of ``quant_k``, computed exactly as ``quant_k`` computes them."""
    n = 2**k - 1
    return torch.arange(n + 1, dtype=dtype, device=device) / n


def quant_k_codes(r: Tensor, k: int) -> Tensor:
    """Integer codes round((2^k-1) r) of ``quant_k`` for r in [0, 1]."""
    return torch.round(r * (2**k - 1))


def dorefa_weight_normalize(w: Tensor) -> Tensor:
    """tanh(w) / (2 max|tanh w|) + 1/2, in [0, 1]."""
    t = torch.tanh(w)
    return t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5


@register
class DoReFaWeight(WeightQuantizer):
    name = "dorefa"
    bits_allowed = tuple(range(1, 9))

    def __init__(self, bits: int, per_channel: bool = False) -> None:
        super().__init__(bits, per_channel)
        if per_channel and bits >= 2:
            # the k >= 2 formula has no scale to take per channel: its levels are fixed in [-1, 1]
            raise ValueError(
                f"dorefa: per_channel=True is not supported at {bits} bits: DoReFa normalises tanh(w) by "
                "the layer's max onto the fixed levels 2i/(2^k-1) - 1, with no per-channel scale; use "
                "per_channel: false (or bits: 1, the mean-magnitude binary case, or a per-channel method "
                "such as uniform or lsq)"
            )
        # The 1-bit case is a different estimator in DoReFa: mean-magnitude binary.
        self._binary = BinaryWeight(1, per_channel) if bits == 1 else None

    def forward(self, w: Tensor) -> Tensor:
        if self._binary is not None:
            self._binary.channel_axis = self.channel_axis
            return self._binary(w)
        if fused.supported(w):  # the same values and gradients in a few calls
            return fused.dorefa_weight(w, self.bits)
        r = dorefa_weight_normalize(w)
        n = 2**self.bits - 1
        q = 2 * (quant_k_codes(r.detach(), self.bits) / n) - 1
        return straight_through(q, 2 * r - 1)

    def encode(self, w: Tensor) -> Encoded:
        if self._binary is not None:
            self._binary.channel_axis = self.channel_axis
            return self._binary.encode(w)
        w = w.detach()
        codes = quant_k_codes(dorefa_weight_normalize(w), self.bits).to(torch.uint8)
        levels = 2 * uniform_levels(self.bits, w.dtype, w.device) - 1
        one = torch.ones((), dtype=w.dtype, device=w.device)
        return Encoded(codes=codes, levels=levels, scale=one, bits=self.bits)

    def preimage(self, enc: Encoded) -> Tensor | None:
        # k >= 2: Q(w) normalises tanh(w) by its max; with tanh(w) = w_hat / 2 the normalised
        # value is (w_hat + 1) / 2 = code / (2^k - 1) up to rounding, far from a rounding boundary.
        if self.bits < 2:
            return None
        return torch.atanh(0.5 * enc.decode())


@register
class DoReFaActivation(ActivationQuantizer):
    name = "dorefa"
    bits_allowed = tuple(range(1, 9))
    default_ste = "clipped_relu"

    def __init__(self, bits: int, ste: CoarseGrad | None = None) -> None:
        super().__init__(bits, ste)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.check_sign(x)
        if fused.supported(x):  # the same values and gradients in one pass each way
            return fused.dorefa_activation(x, self.bits, self.ste)
        n = 2**self.bits - 1
        q = quant_k_codes(x.detach().clamp(0, 1), self.bits) / n
        return apply_coarse(q, x, self.ste, 1.0)

    def encode(self, x: Tensor) -> Encoded:
        x = x.detach()
        codes = quant_k_codes(x.clamp(0, 1), self.bits).to(torch.uint8)
        return Encoded(
            codes=codes,
            levels=uniform_levels(self.bits, x.dtype, x.device),
            scale=torch.ones((), dtype=x.dtype, device=x.device),
            bits=self.bits,
        )

    def runtime_codes_spec(self) -> ActCodesSpec:
        """``rint(clip(x, 0, 1) * (2^k - 1))``, values ``code / (2^k - 1)``."""
        n = 2**self.bits - 1
        return ActCodesSpec(self.bits, hi=1.0, mult=float(n), step=1.0 / n)
