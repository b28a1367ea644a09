"""Uniform (linear) quantizers: symmetric for weights, unsigned or symmetric for activations.

Weights, ``b >= 2`` bits, ``Q = 2^(b-1) - 1``::

    w_q = s * clip(round(w / s), -Q, Q)          2Q + 1 = 2^b - 1 levels, symmetric about 0
    s   = max|w| / Q                             scale="max" (per tensor or per output channel)
    s   = c* / Q,  c* = argmin_{c in C} ||w - w_q(c)||^2
                   C = {max|w| * k / n : k = 1..n}   scale="mse", n = ``mse_grid``

The mse search runs at every forward (the weights move; it costs ``mse_grid`` passes over the
weights), per output channel when ``per_channel``; ties keep the larger clip, so "mse" is never
worse than "max" in squared error. Backward: the identity straight-through estimator (1
everywhere, also in the clipped tails).

Activations, ``b >= 1`` bits, ``L = 2^b - 1``, clip level ``c``::

    x_q = s * clip(round(x / s), 0, L),    s = c / L          levels 0, s, ..., L s

``c`` is the fixed ``clip`` option, or a running maximum of the inputs updated in training
mode only, BatchNorm style: ``c <- (1 - momentum) c + momentum * max(x)``; the first training
batch sets ``c = max(x)`` and flips the ``initialized`` buffer (both live in ``state_dict``).
A batch with a non-finite maximum (NaN or Inf inputs) leaves ``c`` unchanged; a huge finite
one moves it by ``momentum`` times its maximum (see ``update_``).
Before any training batch has been seen the current batch's maximum is used without being
stored, so evaluation of a never-trained quantizer is still sensible. Backward: the coarse
gradient chosen by ``ste`` with top ``c`` (default clipped ReLU, ``1[0 < x <= c]``; Yin et al.,
ICLR 2019).

Activations with ``signed=True``, ``b >= 2`` bits, ``Q = 2^(b-1) - 1``: the symmetric grid of the
weights, with ``c`` the (running) maximum of ``|x|``::

    x_q = s * clip(round(x / s), -Q, Q),   s = c / Q          levels -Q s, ..., Q s

and the coarse gradient ``identity`` or ``clipped_relu``, here ``1[-c <= x <= c]`` (``relu`` is
refused: it would stop the gradient of every negative input).

This is the plain "min-max" uniform fake quantizer of post-training and QAT toolkits
(e.g. Jacob et al., CVPR 2018, symmetric variant), used here as a baseline.

Speed: on contiguous float32 CPU tensors the activation quantizer runs as one fused loop forward
and one backward (``fused.py``): the same values and gradients. The torch formulas here define
the quantizer and serve every other case. The signed activation quantizer always takes the torch
formulas (no fused loop).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fused
from .base import (
    ActCodesSpec,
    ActivationQuantizer,
    CoarseGrad,
    Encoded,
    WeightQuantizer,
    channel_reduce_dims,
    clip_multiply_spec,
    straight_through,
    symmetric_multiply_spec,
)
from .registry import register
from .ste import apply_coarse

_EPS = 1e-12


# ---- pure functions ------------------------------------------------------------------------
def symmetric_codes(w: Tensor, scale: Tensor, q: int) -> Tensor:
    """Signed integer codes ``clip(round(w / scale), -q, q)`` (as floats)."""
    return torch.clamp(torch.round(w / scale), -q, q)


def symmetric_quantize(w: Tensor, scale: Tensor, q: int) -> Tensor:
    """``scale * clip(round(w / scale), -q, q)``."""
    return symmetric_codes(w, scale, q) * scale


def mse_clip(w: Tensor, q: int, grid: int = 100, per_channel: bool = False, axis: int = 0) -> Tensor:
    """The clip ``c`` in ``{max|w| k/grid : k = 1..grid}`` minimising ``||w - Q_c(w)||^2``.

    ``Q_c`` is :func:`symmetric_quantize` with scale ``c / q``. Per tensor (0-d result) or per
    output channel along ``axis`` (broadcastable). Ties keep the larger clip.
    """
    w = w.detach()
    if per_channel and w.dim() > 1:
        dims = channel_reduce_dims(w, axis)
        m = w.abs().amax(dim=dims, keepdim=True)
    else:
        dims = tuple(range(w.dim()))
        m = w.abs().max()
    m = m.clamp_min(_EPS)
    best_c = m.clone()
    best_err = torch.full_like(m, float("inf"))
    keep = per_channel and w.dim() > 1
    for k in range(grid, 0, -1):
        c = m * (k / grid)
        err = (w - symmetric_quantize(w, c / q, q)).square().sum(dim=dims, keepdim=keep)
        better = err < best_err
        best_c = torch.where(better, c, best_c)
        best_err = torch.where(better, err, best_err)
    return best_c


def unsigned_codes(x: Tensor, scale: Tensor, levels: int) -> Tensor:
    """Unsigned integer codes ``clip(round(x / scale), 0, levels)`` (as floats)."""
    return torch.clamp(torch.round(x / scale), 0, levels)


# ---- modules -------------------------------------------------------------------------------
@register
class UniformWeight(WeightQuantizer):
    name = "uniform"
    bits_allowed = tuple(range(2, 9))

    def __init__(self, bits: int, per_channel: bool = False, scale: str = "max", mse_grid: int = 100) -> None:
        super().__init__(bits, per_channel)
        if scale not in ("max", "mse"):
            raise ValueError(f"uniform: unknown scale={scale!r}; allowed: max, mse")
        if isinstance(mse_grid, bool) or not isinstance(mse_grid, int) or mse_grid < 1:
            raise ValueError(f"uniform: mse_grid must be an integer >= 1, got {mse_grid!r}")
        self.scale_mode = scale
        self.mse_grid = mse_grid
        self.q = 2 ** (bits - 1) - 1

    def scale(self, w: Tensor) -> Tensor:
        """The step ``s`` (0-d, or ``(C, 1, ...)`` per channel)."""
        w = w.detach()
        if self.scale_mode == "mse":
            clip = mse_clip(w, self.q, self.mse_grid, self.per_channel, self.channel_axis)
        else:
            clip = self.reduce_abs_max(w).clamp_min(_EPS)
        return clip / self.q

    def forward(self, w: Tensor) -> Tensor:
        return straight_through(symmetric_quantize(w.detach(), self.scale(w), self.q), w)

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        s = self.scale(w)
        codes = (symmetric_codes(w, s, self.q) + self.q).to(torch.uint8)
        levels = torch.arange(-self.q, self.q + 1, dtype=w.dtype, device=w.device)
        return Encoded(codes=codes, levels=levels, scale=s, bits=self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, scale={self.scale_mode}"


@register
class UniformActivation(ActivationQuantizer):
    name = "uniform"
    bits_allowed = tuple(range(1, 9))
    default_ste = "clipped_relu"

    def __init__(
        self,
        bits: int,
        ste: CoarseGrad | None = None,
        momentum: float = 0.1,
        clip: float | None = None,
        signed: bool = False,
    ) -> None:
        super().__init__(bits, ste, signed)
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 < momentum <= 1:
            raise ValueError(f"uniform: momentum must be in (0, 1], got {momentum!r}")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or clip <= 0):
            raise ValueError(f"uniform: clip must be a number > 0 or null, got {clip!r}")
        self.momentum = float(momentum)
        self.clip = None if clip is None else float(clip)
        self.levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1  # the top code
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update_(self, x: Tensor) -> None:
        """Fold the batch maximum of ``x`` (of ``|x|`` when signed) into the running maximum.

        A batch whose maximum is NaN or Inf (any NaN element, or an infinite one) is ignored: it
        would set the running maximum to NaN/Inf for good. A finite but huge batch is folded in
        like any other: one batch of 1e30 moves the maximum to about ``momentum * 1e30``, and
        each later batch only shrinks it by ``1 - momentum``, so the layer's codes stay 0 for a
        long time."""
        m = self._batch_max(x).to(self.running_max.dtype)
        if self.is_initialized():  # no host sync per step: a non-finite batch leaves the maximum as is
            ema = self.running_max * (1 - self.momentum) + m * self.momentum
            self.running_max.copy_(torch.where(torch.isfinite(m), ema, self.running_max))
        elif bool(torch.isfinite(m)):
            self.running_max.copy_(m)
            self.mark_initialized()

    def _batch_max(self, x: Tensor) -> Tensor:
        x = x.detach()
        return x.abs().max() if self.signed else x.max()

    def top(self, x: Tensor) -> Tensor:
        """The clip level ``c`` (a detached 0-d tensor)."""
        if self.clip is not None:
            return torch.tensor(self.clip, dtype=x.dtype, device=x.device)
        if not self.is_initialized():  # nothing learned yet: this batch, not stored
            return self._batch_max(x).clamp_min(_EPS)
        return self.running_max.detach().clamp_min(_EPS)

    def scale(self, x: Tensor) -> Tensor:
        return self.top(x) / self.levels

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.check_sign(x)
        if self.training and self.clip is None:
            self.update_(x)
        top = self.top(x)
        s = top / self.levels
        if self.signed:
            q = symmetric_codes(x.detach(), s, self.levels) * s
            sur = x if self.ste == "identity" else torch.clamp(x, -top, top)
            return straight_through(q, sur)
        if fused.supported(x):  # the same values and gradients in one pass each way
            return fused.uniform_activation(x, s, top, self.levels, self.ste)
        q = unsigned_codes(x.detach(), s, self.levels) * s
        return apply_coarse(q, x, self.ste, top)

    def encode(self, x: Tensor) -> Encoded:
        x = x.detach()
        s = self.scale(x)
        if self.signed:
            q = self.levels
            return Encoded(
                codes=(symmetric_codes(x, s, q) + q).to(torch.uint8),
                levels=torch.arange(-q, q + 1, dtype=x.dtype, device=x.device),
                scale=s,
                bits=self.bits,
            )
        return Encoded(
            codes=unsigned_codes(x, s, self.levels).to(torch.uint8),
            levels=torch.arange(self.levels + 1, dtype=x.dtype, device=x.device),
            scale=s,
            bits=self.bits,
        )

    def runtime_codes_spec(self) -> ActCodesSpec | None:
        """A fixed clip level (``clip``, or the running maximum once initialised): ``clip(round(x /
        s), 0, L)`` as ``rint(clip(x, 0, hi) * mult)`` with the multiplier found and checked by
        ``clip_multiply_spec`` (values ``code * s``); signed, its symmetric form ``rint(clip(x, -hi,
        hi) * mult) + L`` (``symmetric_multiply_spec``). A clip level still taken from each batch:
        None (``encode``)."""
        if self.clip is None and not self.is_initialized():
            return None
        s = self.scale(torch.zeros((), dtype=torch.float32))
        if s.dtype != torch.float32:  # a float64 running maximum: x / s is not a float32 formula
            return None
        find = symmetric_multiply_spec if self.signed else clip_multiply_spec
        return find(lambda x: self.encode(x.to(self.running_max.device)).codes.cpu(),
                    self.bits, self.levels, float(s), 1.0 / float(s))

    def extra_repr(self) -> str:
        src = f"clip={self.clip}" if self.clip is not None else f"momentum={self.momentum}"
        return f"bits={self.bits}, ste={self.ste}, {src}" + (", signed=True" if self.signed else "")
