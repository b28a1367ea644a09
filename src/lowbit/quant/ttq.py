"""Trained Ternary Quantization (Zhu, Han, Mao & Dally, ICLR 2017, arXiv 1612.01064).

    Delta = t * max|w|                    (t = ``threshold``, 0.05 in the paper; no gradient)
    I_p = {i : w_i > Delta},   I_n = {i : w_i < -Delta}
    Q(w)_i = W_p  on I_p,   0 elsewhere,   -W_n  on I_n

``W_p`` and ``W_n`` are learned per layer (the parameters ``w_p`` and ``w_n``; positive in
practice, not constrained). They start at ``init`` (1.0, as in the reference tensorpack
``ternarize``), or with ``init="mean"`` at the least-squares values for the initial pattern,
``W_p = mean_{I_p} |w|`` and ``W_n = mean_{I_n} |w|``, set by ``initialize(w)`` (or on the first
forward if ``initialize`` was not called).

Gradients (g = dL/dQ(w)):

    dL/dW_p = sum_{i in I_p} g_i
    dL/dW_n = -sum_{i in I_n} g_i
    dL/dw_i = W_p g_i on I_p,   g_i on the zero set,   W_n g_i on I_n

Sign convention: the paper writes ``dL/dW_n = sum_{I_n} g``, the gradient with respect to the
level ``-W_n`` that the weights take. Here ``W_n`` is the stored, positive magnitude and the
level is ``-W_n``, so the chain rule gives the minus sign above; this is what the reference
tensorpack code computes and what makes a gradient step on ``W_n`` move the level ``-W_n`` down
the loss. The scaled latent gradient uses the current values of ``W_p``/``W_n`` (no
second-order term).

``encode``: codes 0/1/2 on ``levels = [-W_n, 0, W_p]`` with scale 1, so the learned asymmetric
codebook travels with the packed weights. Per-output-channel ``W_p``/``W_n`` are not in the paper
(one pair per layer), so ``per_channel=True`` is refused. The paper additionally rescales the
float weights to [-1, 1] once before training; that is a property of the starting checkpoint,
not of the quantizer, and is not done here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Encoded, WeightQuantizer
from .registry import register


def ttq_codes(w: Tensor, delta: Tensor) -> Tensor:
    """Codes 0, 1, 2 for ``w < -Delta``, ``|w| <= Delta``, ``w > Delta`` (strict, as in the paper)."""
    return ((w > delta).to(torch.uint8) - (w < -delta).to(torch.uint8) + 1).to(torch.uint8)


def ttq_levels(w_p: Tensor, w_n: Tensor) -> Tensor:
    """The codebook ``[-W_n, 0, W_p]`` (differentiable in ``W_p`` and ``W_n``)."""
    return torch.stack([-w_n, torch.zeros_like(w_p), w_p])


def ttq_quantize(w: Tensor, w_p: Tensor, w_n: Tensor, delta: Tensor) -> Tensor:
    """Forward ``levels[codes]`` exactly; backward as in TTQ (see the module docstring)."""
    wd = w.detach()
    codes = ttq_codes(wd, delta).long()
    levels = ttq_levels(w_p, w_n).to(w.dtype)
    q = levels[codes]  # gathers: dQ/dW_p = 1[I_p], dQ/dW_n = -1[I_n]
    gain = torch.stack([w_n.detach(), torch.ones_like(w_p.detach()), w_p.detach()]).to(w.dtype)[codes]
    s = w * gain  # latent gradient g * (W_n | 1 | W_p); s - s.detach() == 0 exactly
    return q + (s - s.detach())


@register
class TTQWeight(WeightQuantizer):
    name = "ttq"
    bits_allowed = (2,)

    def __init__(
        self,
        bits: int = 2,
        per_channel: bool = False,
        threshold: float = 0.05,
        init: float | str = 1.0,
    ) -> None:
        super().__init__(bits, per_channel)
        if per_channel:
            raise ValueError(
                "ttq: per_channel=True is not supported: TTQ learns one (W_p, W_n) pair per layer "
                "(per-output-channel scales are not in the paper); use per_channel: false"
            )
        if not 0 < threshold < 1:
            raise ValueError(f"ttq: threshold factor must be in (0, 1), got {threshold}")
        if isinstance(init, str):
            if init != "mean":
                raise ValueError(f"ttq: init must be a positive number or 'mean', got {init!r}")
            start = 1.0
        elif isinstance(init, bool) or not isinstance(init, (int, float)) or not init > 0:
            raise ValueError(f"ttq: init must be a positive number or 'mean', got {init!r}")
        else:
            start = float(init)
        self.threshold = float(threshold)
        self.init = init
        self.w_p = nn.Parameter(torch.tensor(start))
        self.w_n = nn.Parameter(torch.tensor(start))
        # Whether the data-dependent init ("mean") has run; saved so a loaded model is not re-initialised.
        self.register_buffer("initialized", torch.tensor(init != "mean"))

    def delta(self, w: Tensor) -> Tensor:
        return self.threshold * w.detach().abs().max()

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        if self.init != "mean":
            return
        w = w.detach()
        delta = self.delta(w)
        pos, neg = w > delta, w < -delta
        a = w.abs()
        if bool(pos.any() | neg.any()):
            both = a[pos | neg].mean()
            self.w_p.copy_(a[pos].mean() if bool(pos.any()) else both)
            self.w_n.copy_(a[neg].mean() if bool(neg.any()) else both)
        self.mark_initialized()

    def forward(self, w: Tensor) -> Tensor:
        if not self.is_initialized():
            self.initialize(w)
        return ttq_quantize(w, self.w_p, self.w_n, self.delta(w))

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        return Encoded(
            codes=ttq_codes(w, self.delta(w)),
            levels=ttq_levels(self.w_p.detach(), self.w_n.detach()).to(w.dtype),
            scale=torch.ones((), dtype=w.dtype, device=w.device),
            bits=2,
        )

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, threshold={self.threshold}, "
            f"W_p={float(self.w_p.detach()):.4g}, W_n={float(self.w_n.detach()):.4g}"
        )
