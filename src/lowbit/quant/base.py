"""Quantizer base classes, the encoded form that export packs, and straight-through helpers.

A quantizer is an ``nn.Module`` whose ``forward(x)`` returns the fake-quantized tensor (same
shape and dtype) and whose backward is a chosen straight-through / coarse gradient. It also
``encode``s a tensor into integer codes plus the few floats that decode it::

    decode(codes) = levels[codes] * scale          (scale broadcasts: per tensor or per channel)

``levels`` is a small 1-D codebook (at most ``2**bits`` entries) shared by all channels, so
binary ({-1, +1}), ternary ({-1, 0, +1}), uniform integers, power-of-two sets and learned
asymmetric ternary (TTQ: {-W_n, 0, W_p}) all fit one packed layout.

Straight-through estimator, written so that the forward value is *exactly* the quantized one:

    out = q.detach() + (s(x) - s(x).detach())

``s(x) - s(x).detach()`` is exactly zero in floating point, so ``out == q`` bit for bit, and
its derivative is ``s'(x)``: the surrogate whose derivative replaces the a.e.-zero derivative
of the staircase (identity, ReLU or clipped ReLU; Yin et al., "Understanding straight-through
estimator in training activation quantized neural nets", ICLR 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor, nn

Kind = Literal["weight", "activation"]


@dataclass
class Encoded:
    """Integer codes plus what decodes them: ``levels[codes] * scale``.

    ``branches`` holds further encodings whose decoded values are summed with this one
    (residual expansion); it is empty for ordinary quantizers.
    """

    codes: Tensor  # integer tensor, values in [0, len(levels))
    levels: Tensor  # 1-D float codebook
    scale: Tensor  # float, broadcastable to codes.shape (0-d or per output channel)
    bits: int
    branches: tuple[Encoded, ...] = ()

    def decode(self) -> Tensor:
        out = self.levels[self.codes.long()] * self.scale
        for b in self.branches:
            out = out + b.decode()
        return out

    @property
    def num_levels(self) -> int:
        return int(self.levels.numel())


def straight_through(q: Tensor, surrogate: Tensor) -> Tensor:
    """Return ``q`` in the forward pass with the gradient of ``surrogate`` in the backward pass."""
    return q.detach() + (surrogate - surrogate.detach())


def channel_reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions to reduce for per-output-channel statistics (all but dim 0)."""
    return tuple(range(1, x.dim()))


def per_channel_view(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a length-C vector so it broadcasts against ``like`` along dim 0."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class Quantizer(nn.Module):
    """Base of all quantizers. Subclasses set ``kind``, ``name`` and ``bits_allowed``.

    Constructor keyword arguments (beyond ``bits``) are what a recipe may set for the method;
    the recipe validator reads them from the signature.
    """

    kind: ClassVar[Kind]
    name: ClassVar[str]
    bits_allowed: ClassVar[tuple[int, ...]]

    def __init__(self, bits: int) -> None:
        super().__init__()
        if bits not in self.bits_allowed:
            raise ValueError(
                f"{self.kind} quantizer {self.name!r} does not support bits={bits}; "
                f"allowed: {list(self.bits_allowed)}"
            )
        self.bits = int(bits)

    def encode(self, x: Tensor) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class WeightQuantizer(Quantizer):
    """A quantizer used as a ``torch.nn.utils.parametrize`` parametrization of ``weight``."""

    kind: ClassVar[Kind] = "weight"

    def __init__(self, bits: int, per_channel: bool = False) -> None:
        super().__init__(bits)
        self.per_channel = bool(per_channel)

    def initialize(self, w: Tensor) -> None:
        """Set data-dependent state (learned scales, thresholds) from the float weight.

        Called once by ``quantize`` before the quantizer is attached; the default does nothing.
        """

    def reduce_abs_mean(self, w: Tensor) -> Tensor:
        """mean|w| per tensor (0-d) or per output channel (broadcastable)."""
        if self.per_channel and w.dim() > 1:
            return w.abs().mean(dim=channel_reduce_dims(w), keepdim=True)
        return w.abs().mean()

    def reduce_abs_max(self, w: Tensor) -> Tensor:
        if self.per_channel and w.dim() > 1:
            return w.abs().amax(dim=channel_reduce_dims(w), keepdim=True)
        return w.abs().max()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


CoarseGrad = Literal["identity", "relu", "clipped_relu"]


class ActivationQuantizer(Quantizer):
    """A quantizer applied to a layer's input. ``ste`` picks the coarse gradient."""

    kind: ClassVar[Kind] = "activation"
    default_ste: ClassVar[CoarseGrad] = "clipped_relu"

    def __init__(self, bits: int, ste: CoarseGrad | None = None) -> None:
        super().__init__(bits)
        ste = ste or self.default_ste
        if ste not in ("identity", "relu", "clipped_relu"):
            raise ValueError(
                f"unknown coarse gradient ste={ste!r}; allowed: identity, relu, clipped_relu"
            )
        self.ste: CoarseGrad = ste

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ste={self.ste}"

