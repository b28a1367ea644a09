"""LSQ: learned step size quantization (Esser, McKinstry, Bablani, Appuswamy, Modha; ICLR 2020,
arXiv 1902.08153).

With a learned step ``s > 0`` and integer bounds ``Q_N, Q_P``::

    v_hat = s * round(clip(v / s, -Q_N, Q_P))

- weights (signed):       Q_N = 2^(b-1),  Q_P = 2^(b-1) - 1     (b >= 2; levels -Q_N..Q_P)
- activations (unsigned): Q_N = 0,        Q_P = 2^b - 1         (levels 0..Q_P)
- activations, ``signed=True`` (symmetric): Q_N = Q_P = 2^(b-1) - 1   (b >= 2; for inputs of
  either sign, e.g. the inputs of a transformer's linear layers)

Gradients (straight-through through ``round``; LSQ eq. 3)::

    d v_hat / d v = 1[-Q_N < v/s < Q_P]
    d v_hat / d s = round(v/s) - v/s      if -Q_N < v/s < Q_P
                  = -Q_N                  if v/s <= -Q_N
                  =  Q_P                  if v/s >= Q_P

and the step's gradient is multiplied by ``g = 1/sqrt(N * Q_P)``, with ``N`` the number of
weights sharing the step (the layer's weights, or one output channel's with ``per_channel``)
or, for activations, the number of features of one sample (``x[0].numel()``). The scale is
applied with ``s_g = s*g - (s*g).detach() + s.detach()``: its value is exactly ``s`` (so the
forward stays exactly on the grid ``levels * s``) and its derivative is ``g``. ``grad_scale``
overrides ``g`` (``1.0`` switches the scaling off).

Initialisation: ``s = 2 mean|v| / sqrt(Q_P)``: for weights in ``initialize(w)`` (called by
``quantize``; per output channel with ``per_channel``), for activations from the first
training batch, after which the ``initialized`` buffer is set (it is in ``state_dict``, so a
reloaded quantizer does not re-initialise). Before that first training batch, an activation
quantizer uses the initial step of the batch at hand without storing it.

1-bit weights are not offered: with ``Q_P = 0`` the grid would be {-s, 0} and the
initialisation and gradient scale divide by zero. Use ``binary`` for 1-bit weights.

Speed: on contiguous float32 CPU tensors, LSQ with a per-tensor step (activations, and weights
without ``per_channel``) runs as one fused loop forward and one backward (``fused.py``): the
same values and input gradients, the step's gradient equal to float rounding. The torch formulas
here define the quantizer and serve every other case.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import fused
from .base import (
    ActCodesSpec,
    ActivationQuantizer,
    Encoded,
    WeightQuantizer,
    channel_reduce_dims,
    clip_multiply_spec,
    straight_through,
    symmetric_multiply_spec,
)
from .registry import register

_EPS = 1e-8


# ---- pure functions ------------------------------------------------------------------------
def lsq_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_init_step(v: Tensor, q_p: int, per_channel: bool = False, axis: int = 0) -> Tensor:
    """``2 mean|v| / sqrt(Q_P)`` (0-d, or per output channel along ``axis``, broadcastable)."""
    v = v.detach()
    if per_channel and v.dim() > 1:
        m = v.abs().mean(dim=channel_reduce_dims(v, axis), keepdim=True)
    else:
        m = v.abs().mean()
    return (2 * m / math.sqrt(q_p)).clamp_min(_EPS)


def lsq_grad_scale(n: int, q_p: int) -> float:
    """The paper's step-gradient scale ``1 / sqrt(N * Q_P)``."""
    return 1.0 / math.sqrt(max(n, 1) * q_p)


def scale_grad(s: Tensor, g: float) -> Tensor:
    """Value exactly ``s``, gradient ``g`` (``s*g - (s*g).detach()`` is exactly zero)."""
    sg = s * g
    return sg - sg.detach() + s.detach()


def lsq_codes(v: Tensor, s: Tensor, q_n: int, q_p: int) -> Tensor:
    """Integer codes ``round(clip(v / s, -Q_N, Q_P))`` (as floats, in [-Q_N, Q_P])."""
    return torch.round(torch.clamp(v / s, -q_n, q_p))


def lsq_step_derivative(v: Tensor, s: Tensor, q_n: int, q_p: int) -> Tensor:
    """Elementwise ``d v_hat / d s`` of LSQ (before the gradient scale)."""
    x = v / s
    inside = (x > -q_n) & (x < q_p)
    clipped = torch.where(x <= -q_n, torch.full_like(x, -q_n), torch.full_like(x, q_p))
    return torch.where(inside, torch.round(x) - x, clipped)


def positive_step(s: Tensor) -> Tensor:
    """``|s|`` floored at a tiny value: a learned step that an update pushed through zero still
    quantizes (the identity for the usual positive step, gradient included)."""
    return s.abs().clamp_min(_EPS)


def lsq_quantize(v: Tensor, s: Tensor, q_n: int, q_p: int, g: float) -> Tensor:
    """``v_hat`` exactly on the grid, with the LSQ gradients for ``v`` and ``s``."""
    s_d = s.detach()
    v_d = v.detach()
    q = lsq_codes(v_d, s_d, q_n, q_p) * s_d
    x = v_d / s_d
    inside = (x > -q_n) & (x < q_p)
    surrogate = torch.where(inside, v, torch.zeros_like(v)) + scale_grad(s, g) * lsq_step_derivative(
        v_d, s_d, q_n, q_p
    )
    return straight_through(q, surrogate)


def _lsq_encode(v: Tensor, s: Tensor, q_n: int, q_p: int, bits: int) -> Encoded:
    v = v.detach()
    s = s.detach()
    codes = (lsq_codes(v, s, q_n, q_p) + q_n).to(torch.uint8)
    levels = torch.arange(-q_n, q_p + 1, dtype=v.dtype, device=v.device)
    return Encoded(codes=codes, levels=levels, scale=s, bits=bits)


def _check_grad_scale(grad_scale: Any) -> float | None:
    if grad_scale is None:
        return None
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, int | float) or not grad_scale > 0:
        raise ValueError(f"lsq: grad_scale must be a number > 0 or null (paper's value), got {grad_scale!r}")
    return float(grad_scale)


# ---- modules -------------------------------------------------------------------------------
class _StepLoadMixin:
    """Let ``load_state_dict`` bring a step of another shape (per-channel into a fresh module)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[no-untyped-def]
                              unexpected_keys, error_msgs):
        key = prefix + "s"
        if key in state_dict and state_dict[key].shape != self.s.shape:  # type: ignore[attr-defined]
            old = self.s  # type: ignore[attr-defined]
            self.s = nn.Parameter(torch.empty(state_dict[key].shape, dtype=old.dtype, device=old.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)


@register
class LSQWeight(_StepLoadMixin, WeightQuantizer):
    name = "lsq"
    bits_allowed = tuple(range(2, 9))

    def __init__(self, bits: int, per_channel: bool = False, grad_scale: float | None = None) -> None:
        super().__init__(bits, per_channel)
        self.q_n, self.q_p = lsq_bounds(bits, signed=True)
        self.grad_scale = _check_grad_scale(grad_scale)
        self.s = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        s0 = lsq_init_step(w, self.q_p, self.per_channel, self.channel_axis).to(self.s.dtype)
        if s0.shape == self.s.shape:
            self.s.copy_(s0)
        else:  # per-channel: the step's shape is known only now
            self.s = nn.Parameter(s0.clone())
        self.mark_initialized()

    def g(self, w: Tensor) -> float:
        if self.grad_scale is not None:
            return self.grad_scale
        n = w.numel() // w.shape[self.channel_axis] if self.per_channel_stats(w) else w.numel()
        return lsq_grad_scale(n, self.q_p)

    def forward(self, w: Tensor) -> Tensor:
        if not self.is_initialized():
            self.initialize(w)
        s = positive_step(self.s)
        if fused.supported(w) and s.dim() == 0:  # the same values and gradients, in two passes
            return fused.lsq(w, s, self.q_n, self.q_p, self.g(w))
        return lsq_quantize(w, s, self.q_n, self.q_p, self.g(w))

    def encode(self, w: Tensor) -> Encoded:
        return _lsq_encode(w, positive_step(self.s), self.q_n, self.q_p, self.bits)


@register
class LSQActivation(_StepLoadMixin, ActivationQuantizer):
    name = "lsq"
    bits_allowed = tuple(range(1, 9))

    def __init__(self, bits: int, grad_scale: float | None = None, signed: bool = False) -> None:
        # The coarse gradient for x is LSQ's own: 1 inside (-Q_N s, Q_P s), 0 outside.
        super().__init__(bits, "clipped_relu", signed)
        if signed:
            self.q_n = self.q_p = 2 ** (bits - 1) - 1
        else:
            self.q_n, self.q_p = lsq_bounds(bits, signed=False)
        self.grad_scale = _check_grad_scale(grad_scale)
        self.s = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def g(self, x: Tensor) -> float:
        if self.grad_scale is not None:
            return self.grad_scale
        n = math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()  # (an empty batch has no x[0])
        return lsq_grad_scale(n, self.q_p)

    def step_for(self, x: Tensor) -> Tensor:
        """The step in use: learned, or (never trained yet) the initial step of ``x``."""
        if self.is_initialized():
            return positive_step(self.s)
        return lsq_init_step(x, self.q_p).to(self.s.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self.is_initialized():
            self.check_sign(x)
            with torch.no_grad():
                self.s.copy_(lsq_init_step(x, self.q_p))
                self.mark_initialized()
        s = self.step_for(x)
        if fused.supported(x) and s.dim() == 0:  # the same values and gradients, one pass each way
            return fused.lsq(x, s, self.q_n, self.q_p, self.g(x))
        return lsq_quantize(x, s, self.q_n, self.q_p, self.g(x))

    def encode(self, x: Tensor) -> Encoded:
        return _lsq_encode(x, self.step_for(x), self.q_n, self.q_p, self.bits)

    def runtime_codes_spec(self) -> ActCodesSpec | None:
        """Initialised: ``round(clip(x / s, 0, Q_P))`` as ``rint(clip(x, 0, hi) * mult)`` with the
        multiplier found and checked by ``clip_multiply_spec`` (values ``code * s``); signed, its
        symmetric form ``rint(clip(x, -hi, hi) * mult) + Q`` (``symmetric_multiply_spec``). A step
        not yet learned (it would come from the batch): None."""
        if not self.is_initialized() or self.s.dim() != 0 or self.s.dtype != torch.float32:
            return None
        s = float(positive_step(self.s.detach()))
        find = symmetric_multiply_spec if self.signed else clip_multiply_spec
        return find(lambda x: self.encode(x.to(self.s.device)).codes.cpu(), self.bits, self.q_p, s, 1.0 / s)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, s={float(self.s.detach()):.4g}" + (", signed=True" if self.signed else "")
