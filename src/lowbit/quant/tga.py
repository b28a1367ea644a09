"""Ternarization with a trainable threshold by truncated Gaussian approximation, TGA (He & Fan,
"Simultaneously optimizing weight and quantizer of ternary neural network using truncated
Gaussian approximation", CVPR 2019; reference: elliothe/tern_repo
``models/tern_threshold_trainable_5.py``).

Per layer (or per output channel with ``per_channel=True``, an extension: the paper uses one
threshold per layer), at every forward pass:

    mu, sigma = mean(w), std(w)                          (statistics of the current w; unbiased std)
    delta_c   = min(|delta|, k * sigma)                  (k = ``clip_sigma`` = 3: the +-3 sigma clip)
    d         = delta_c / sigma
    alpha     = mu + sigma * phi(d) / (1 - Phi(d))       (mean of N(mu, sigma^2) above mu + delta_c)
    t_i       = +1 if w_i > mu + delta_c,  -1 if w_i < mu - delta_c,  0 otherwise
    Q(w)      = alpha * t

``delta`` is the learned parameter; ``initialize(w)`` sets it to ``threshold * max|w|``
(``threshold`` = 0.05, as in the reference). ``phi``/``Phi`` are the standard normal pdf/cdf
computed with torch ops (``1 - Phi(d) = erfc(d / sqrt 2) / 2``), so ``delta`` is trained by
backpropagation through ``alpha``:

    dL/ddelta = (sum_i g_i t_i) * d alpha/d delta_c * d delta_c/d delta
    d alpha/d delta_c = lambda(d) (lambda(d) - d),   lambda(d) = phi(d) / (1 - Phi(d))

(``d delta_c / d delta = sign(delta)`` inside the clip, 0 outside). The pattern ``t`` itself is a
step function of ``delta`` and passes no gradient.

Decisions (the first two as in the reference, the third a deliberate deviation):

- The pattern is centred on ``mu`` (``w > mu + delta_c``), and both non-zero levels use the
  upper-tail mean ``alpha``: the forward is a 3-level ternary ``{-alpha, 0, alpha}`` (the lower
  tail's mean ``mu - sigma lambda(d)`` differs from ``-alpha`` by ``2 mu``, negligible for the
  near-zero-mean weights of a trained layer, and a single scale keeps the codebook symmetric).
- Weight path: the reference's ``_quanFunc`` returns ``t`` and its backward divides the incoming
  gradient by ``alpha``; the result is then multiplied by ``alpha``, so the net weight gradient is
  ``g``: an identity straight-through estimator, which is what is implemented
  (``dL/dw = g``). Dividing by ``alpha`` without the matching multiplication would rescale the
  weight gradient by ``1/alpha`` per layer, which is not what the reference computes.
- ``mu`` and ``sigma`` are treated as statistics (no gradient). In the reference they are
  computed from ``self.weight`` with autograd on, which adds to each weight's gradient a global
  term of order ``1/N`` through ``alpha``; dropping it keeps the weight path an exact identity
  STE and leaves ``delta`` as the only parameter trained through ``alpha``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Encoded, WeightQuantizer, channel_reduce_dims, per_channel_view
from .registry import register
from .twn import TERNARY_LEVELS

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_pdf(d: Tensor) -> Tensor:
    return torch.exp(-0.5 * d * d) * _INV_SQRT_2PI


def normal_sf(d: Tensor) -> Tensor:
    """``1 - Phi(d)``, accurate in the upper tail."""
    return 0.5 * torch.special.erfc(d / math.sqrt(2.0))


def truncated_normal_mean(mu: Tensor, sigma: Tensor, delta: Tensor) -> Tensor:
    """``E[x | x > mu + delta]`` for ``x ~ N(mu, sigma^2)``.

    ``= mu + sigma phi(d) / (1 - Phi(d))`` with ``d = delta / sigma`` (inverse Mills ratio).
    """
    d = delta / sigma
    return mu + sigma * normal_pdf(d) / normal_sf(d)


def weight_stats(w: Tensor, per_channel: bool, axis: int = 0) -> tuple[Tensor, Tensor]:
    """(mu, sigma) per tensor (0-d) or per output channel along ``axis`` (broadcastable); sigma > 0."""
    if per_channel and w.dim() > 1:
        dims = channel_reduce_dims(w, axis)
        mu, sigma = w.mean(dims, keepdim=True), w.std(dims, keepdim=True)
    else:
        mu, sigma = w.mean(), w.std()
    # std is nan for a single element and 0 for a constant tensor; keep the formulas finite.
    sigma = torch.nan_to_num(sigma, nan=0.0).clamp_min(torch.finfo(w.dtype).tiny ** 0.5)
    return mu, sigma


def tga_codes(w: Tensor, mu: Tensor, delta_c: Tensor) -> Tensor:
    """Codes 0, 1, 2 for ``w < mu - delta_c``, in between, ``w > mu + delta_c``."""
    return ((w > mu + delta_c).to(torch.uint8) - (w < mu - delta_c).to(torch.uint8) + 1).to(torch.uint8)


@register
class TGAWeight(WeightQuantizer):
    name = "tga"
    bits_allowed = (2,)

    def __init__(
        self,
        bits: int = 2,
        per_channel: bool = False,
        threshold: float = 0.05,
        clip_sigma: float = 3.0,
    ) -> None:
        super().__init__(bits, per_channel)
        if not 0 < threshold < 1:
            raise ValueError(f"tga: threshold (initial delta / max|w|) must be in (0, 1), got {threshold}")
        if not clip_sigma > 0:
            raise ValueError(f"tga: clip_sigma must be > 0, got {clip_sigma}")
        self.threshold = float(threshold)
        self.clip_sigma = float(clip_sigma)
        # Per layer: a 0-d parameter. Per channel: resized to (C,) by initialize() / load_state_dict.
        self.delta = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        w = w.detach()
        if self.per_channel and w.dim() > 1:
            init = w.abs().amax(dim=self.reduce_dims(w)) * self.threshold
        else:
            init = w.abs().max() * self.threshold
        if init.shape != self.delta.shape:
            self.delta = nn.Parameter(torch.empty_like(init, dtype=self.delta.dtype))
        self.delta.copy_(init)
        self.mark_initialized()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + "delta")
        if saved is not None and saved.shape != self.delta.shape:  # per-channel delta of a fresh module
            self.delta = nn.Parameter(
                torch.empty(saved.shape, dtype=self.delta.dtype, device=self.delta.device)
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def params(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mu, delta_c, alpha); ``alpha`` (and ``delta_c``) differentiable in ``delta``."""
        mu, sigma = weight_stats(w.detach(), self.per_channel, self.channel_axis)
        delta = self.delta.to(w.dtype)
        if delta.dim() > 0:
            delta = per_channel_view(delta, w, self.channel_axis)
        delta_c = torch.minimum(delta.abs(), self.clip_sigma * sigma)
        return mu, delta_c, truncated_normal_mean(mu, sigma, delta_c)

    def forward(self, w: Tensor) -> Tensor:
        if not self.is_initialized():
            self.initialize(w)
        mu, delta_c, alpha = self.params(w)
        codes = tga_codes(w.detach(), mu, delta_c.detach())
        levels = torch.tensor(TERNARY_LEVELS, dtype=w.dtype, device=w.device)
        q = levels[codes.long()] * alpha  # gradient to delta through alpha
        return q + (w - w.detach())  # identity STE on the weight path; adds exactly 0

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        with torch.no_grad():
            mu, delta_c, alpha = self.params(w)
        return Encoded(
            codes=tga_codes(w, mu, delta_c),
            levels=torch.tensor(TERNARY_LEVELS, dtype=w.dtype, device=w.device),
            scale=alpha,
            bits=2,
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, clip_sigma={self.clip_sigma}"
