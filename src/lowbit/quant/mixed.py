"""Differentiable bit-width choice: each layer's weights are a softmax mixture of the same weights
quantized at several candidate bit-widths, and the mixture weights are learned.

DARTS-style relaxation of the bit-width (Liu, Simonyan, Yang, ICLR 2019; for bits: Wu et al.,
"Mixed precision quantization of ConvNets via differentiable neural architecture search", 2018;
the seed's gradient-based QDARTS relaxes (operation, bit) pairs the same way)::

    p = softmax(theta / T),     w_q = sum_k p_k Q_{b_k}(w)          (training)
    w_q = Q_{b*}(w),            b* = b_{argmax_k theta_k}            (evaluation, export)

``bits`` is the initial choice and always a candidate (``candidates`` default 2, 4, 8). ``Q_b`` is
the symmetric uniform quantizer with the max scale of each output channel (``2^b - 1``
levels), straight-through to ``w``; ``theta`` (one logit per candidate) is a parameter of the
quantizer and learns through the mixture. The expected bit-width ``sum_k p_k b_k`` is what a
size penalty charges (:func:`expected_bits`; recipe method ``bits_penalty``), so training trades
accuracy against bits; at the end every layer keeps its argmax (:func:`chosen_bits`). A lower
``temperature`` makes the same change of ``theta`` move the choice further (``theta`` trains at
the model's learning rate). In eval mode the forward pass is the hard choice, equal to
``encode().decode()`` bit for bit, so a trained model exports like any single-bit-width one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Encoded, WeightQuantizer, straight_through
from .registry import register
from .uniform import symmetric_codes

_EPS = 1e-12


@register
class MixedBitsWeight(WeightQuantizer):
    name = "mixed"
    bits_allowed = tuple(range(2, 9))

    def __init__(self, bits: int, candidates: tuple[int, ...] | list[int] | None = None,
                 temperature: float = 1.0) -> None:
        super().__init__(bits, per_channel=True)
        given = (2, 4, 8) if candidates is None else candidates
        if isinstance(given, str | int) or any(isinstance(b, bool) or not isinstance(b, int) for b in given):
            raise ValueError(f"mixed: candidates must be a list of bit-widths, got {candidates!r}")
        cands = sorted({*given, bits})  # the recipe's bits are always a candidate (the initial choice)
        if any(b < 2 or b > 8 for b in cands):
            raise ValueError(f"mixed: candidates must be bit-widths in [2, 8], got {list(given)!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
            raise ValueError(f"mixed: temperature must be a number > 0, got {temperature!r}")
        self.candidates, self.temperature = tuple(cands), float(temperature)
        init = torch.zeros(len(cands))
        init[cands.index(bits)] = self.temperature  # logits start at 1 for the recipe's bits, 0 elsewhere
        self.theta = nn.Parameter(init)

    def probs(self) -> Tensor:
        return torch.softmax(self.theta / self.temperature, dim=0)

    def choice(self) -> int:
        return self.candidates[int(torch.argmax(self.theta))]

    def _scale(self, w: Tensor, b: int) -> Tensor:
        return self.reduce_abs_max(w.detach()).clamp_min(_EPS) / (2 ** (b - 1) - 1)

    def _quantize(self, w: Tensor, b: int) -> Tensor:
        q = 2 ** (b - 1) - 1
        s = self._scale(w, b)
        return symmetric_codes(w.detach(), s, q) * s

    def forward(self, w: Tensor) -> Tensor:
        if not self.training:
            return straight_through(self._quantize(w, self.choice()), w)
        p = self.probs()
        mix = sum(p[k] * straight_through(self._quantize(w, b), w) for k, b in enumerate(self.candidates))
        return mix  # type: ignore[return-value]

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        b = self.choice()
        q = 2 ** (b - 1) - 1
        s = self._scale(w, b)
        return Encoded(codes=(symmetric_codes(w, s, q) + q).to(torch.uint8),
                       levels=torch.arange(-q, q + 1, dtype=w.dtype, device=w.device), scale=s, bits=b)

    def extra_repr(self) -> str:
        return f"candidates={self.candidates}, choice={self.choice()}"


def mixed_layers(model: nn.Module) -> dict[str, MixedBitsWeight]:
    """The ``mixed`` quantizers of a model by layer name (the module path of the layer)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MixedBitsWeight):
            layer = name.split(".parametrizations.")[0]
            out[layer] = m
    return out


def expected_bits(model: nn.Module) -> Tensor:
    """Weight-count-weighted mean of the expected bit-widths ``sum_k p_k b_k`` over the model's
    ``mixed`` layers (differentiable in every ``theta``)."""
    total = None
    count = 0
    for layer, q in mixed_layers(model).items():
        n = model.get_submodule(layer).parametrizations.weight.original.numel()
        e = (q.probs() * torch.tensor(q.candidates, dtype=q.theta.dtype, device=q.theta.device)).sum() * n
        total = e if total is None else total + e
        count += n
    if total is None:
        raise ValueError("expected_bits: the model has no layer quantized with method 'mixed'")
    return total / count


def chosen_bits(model: nn.Module) -> dict[str, int]:
    """Each ``mixed`` layer's current choice (argmax of its logits)."""
    return {layer: q.choice() for layer, q in mixed_layers(model).items()}
