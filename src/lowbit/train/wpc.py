"""Structured (PE-wise) group-lasso sparsity for ternary weights, with Weight Penalty Clipping.

He, Fan et al., AAAI 2020 (PE-wise structured pruning combined with ternarization; the abstract
gives the idea, the mechanics here are our reconstruction). Weights are cut into groups that
map onto hardware processing elements; a group-lasso penalty drives whole groups to zero so the
hardware can skip them, and the ternary quantizer keeps the survivors at ``{-alpha, 0, alpha}``::

    R = lambda * sum_layers sum_g sqrt(|g|) || clip(w_g, -t, t) ||_2

Groups (``group``): ``"filter"`` — one per output channel; ``"kernel"`` — one per (output,
input) channel pair; ``"pe"`` — one per output channel and block of ``pe_in`` input channels
(a PE reading ``pe_in`` input channels).

**Weight Penalty Clipping** (``wpc=True``): the penalty sees ``clip(w, -t, t)`` with the
statistics-based, self-adapting threshold ``t = wpc_scale * mean|w|`` of the layer (detached;
0.7 mean|w| is TWN's ternary threshold). Weights beyond ``t`` get no penalty gradient, so the
sparsity pressure never shrinks the large weights that set the ternary scale ``alpha`` (the
mean of the kept ``|w|``), while small weights, which ternarize to 0 anyway, are pushed to zero
group by group. Without clipping (``wpc=False``) the plain group lasso shrinks every weight and
drags ``alpha`` down with it. :mod:`lowbit.prune.structured` zeroes the groups that end below a
threshold and reports the structured sparsity.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.quantize import latent_weight, quantizable_layers, quantized_layers
from .callbacks import Callback

__all__ = ["GROUPS", "GroupLassoWPC", "group_view", "wpc_threshold"]

GROUPS = ("filter", "kernel", "pe")


def group_view(w: Tensor, group: str = "pe", pe_in: int = 4) -> Tensor:
    """The weight as ``(groups, group size)`` (zero-padded when ``pe_in`` does not divide the
    input channels; padding adds nothing to a norm). Every weight is in exactly one group."""
    if group not in GROUPS:
        raise ValueError(f"wpc: unknown group={group!r}; allowed: {', '.join(GROUPS)}")
    c_out = w.shape[0]
    if group == "filter" or w.dim() < 2:
        return w.reshape(c_out, -1)
    c_in = w.shape[1]
    per_kernel = w[0, 0].numel()
    if group == "kernel":
        return w.reshape(c_out * c_in, per_kernel)
    if isinstance(pe_in, bool) or not isinstance(pe_in, int) or pe_in < 1:
        raise ValueError(f"wpc: pe_in must be an integer >= 1, got {pe_in!r}")
    blocks = math.ceil(c_in / pe_in)
    flat = w.reshape(c_out, c_in, per_kernel)
    if blocks * pe_in != c_in:
        flat = torch.cat([flat, flat.new_zeros(c_out, blocks * pe_in - c_in, per_kernel)], dim=1)
    return flat.reshape(c_out, blocks, pe_in * per_kernel).reshape(c_out * blocks, pe_in * per_kernel)


def wpc_threshold(w: Tensor, scale: float = 0.7) -> Tensor:
    """``scale * mean|w|`` (detached): the clipping level of the penalty."""
    return scale * w.detach().abs().mean()



class GroupLassoWPC(Callback):
    """Trainer regularizer (``model -> scalar``) and callback logging the fraction of groups whose
    latent weights are all below the clipping level (``wpc/small_groups``)."""

    name = "wpc"

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1e-4,
        group: str = "pe",
        pe_in: int = 4,
        wpc: bool = True,
        wpc_scale: float = 0.7,
        layers: Sequence[str] | None = None,
    ) -> None:
        if isinstance(lam, bool) or not isinstance(lam, int | float) or lam <= 0:
            raise ValueError(f"wpc: lam must be a number > 0, got {lam!r}")
        if isinstance(wpc_scale, bool) or not isinstance(wpc_scale, int | float) or wpc_scale <= 0:
            raise ValueError(f"wpc: wpc_scale must be a number > 0, got {wpc_scale!r}")
        group_view(torch.zeros(2, 2, 1, 1), group, pe_in)  # validates group and pe_in
        found = {n: m for n, m in quantized_layers(model).items()} or quantizable_layers(model)
        if layers is not None:
            found = {n: m for n, m in found.items() if any(fnmatch.fnmatchcase(n, p) for p in layers)}
        if not found:
            raise ValueError(f"wpc: no layer with a weight matches layers={list(layers or [])}")
        self.layers = found
        self.lam, self.group, self.pe_in = float(lam), group, pe_in
        self.wpc, self.wpc_scale = bool(wpc), float(wpc_scale)

    def penalty(self, w: Tensor) -> Tensor:
        if self.wpc:
            t = wpc_threshold(w, self.wpc_scale)
            w = torch.clamp(w, -t, t)
        g = group_view(w, self.group, self.pe_in)
        norms = torch.sqrt(g.square().sum(1) + 1e-12)  # smooth at 0 (the gradient of ||0|| is 0)
        return math.sqrt(g.shape[1]) * norms.sum()

    def __call__(self, model: nn.Module) -> Tensor:
        total = None
        for layer in self.layers.values():
            r = self.penalty(latent_weight(layer))
            total = r if total is None else total + r
        return self.lam * total

    @torch.no_grad()
    def small_groups(self) -> float:
        """Fraction of groups whose latent weights are all within the clipping level."""
        small = count = 0
        for layer in self.layers.values():
            w = latent_weight(layer)
            g = group_view(w.abs(), self.group, self.pe_in)
            small += int((g.amax(1) <= wpc_threshold(w, self.wpc_scale)).sum())
            count += g.shape[0]
        return small / count

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        metrics["wpc/small_groups"] = self.small_groups()
