"""Structured sparsity of quantized weights: count the weight groups a processing element can
skip, and prune small groups for good.

Groups are those of :func:`lowbit.train.wpc.group_view` (``filter``, ``kernel`` or ``pe`` with
``pe_in`` input channels). A group is *skippable* when every one of its quantized weights (what
the layer computes with, ``layer.weight``) is exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.quantize import latent_weight, quantized_layers
from ..train.wpc import group_view

__all__ = ["GroupSparsity", "prune_small_groups", "structured_sparsity"]


@dataclass
class GroupSparsity:
    layer: str
    groups: int
    zero_groups: int
    zero_weights: float  # fraction of exactly-zero quantized weights

    @property
    def fraction(self) -> float:
        return self.zero_groups / self.groups


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("structured sparsity: the model has no quantized layer (call lowbit.quantize first)")
    return layers


@torch.no_grad()
def structured_sparsity(model: nn.Module, group: str = "pe", pe_in: int = 4) -> list[GroupSparsity]:
    """Per quantized layer: groups, all-zero groups of the quantized weight, zero-weight fraction."""
    out = []
    for name, layer in _layers(model).items():
        w = layer.weight
        g = group_view(w, group, pe_in)
        out.append(GroupSparsity(name, g.shape[0], int((g.abs().amax(1) == 0).sum()),
                                 float((w == 0).double().mean())))
    return out



@torch.no_grad()
def prune_small_groups(model: nn.Module, rel_threshold: float, group: str = "pe", pe_in: int = 4) -> int:
    """Zero the latent weights of every group whose L2 norm is at most ``rel_threshold`` times the
    layer's largest group norm; returns how many groups were zeroed."""
    if not 0 <= rel_threshold < 1:
        raise ValueError(f"prune: rel_threshold must be in [0, 1), got {rel_threshold!r}")
    pruned = 0
    for layer in _layers(model).values():
        w = latent_weight(layer)
        g = group_view(w, group, pe_in)
        norms = g.norm(dim=1)
        small = norms <= rel_threshold * norms.max()
        if not bool(small.any()):
            continue
        mask = group_view(torch.ones_like(w), group, pe_in)  # same layout: map the groups back
        mask[small] = 0
        w.mul_(_ungroup(mask, w.shape, group, pe_in))
        pruned += int(small.sum())
    return pruned


def _ungroup(g: torch.Tensor, shape: torch.Size, group: str, pe_in: int) -> torch.Tensor:
    """Inverse of ``group_view`` (drops the padding)."""
    c_out = shape[0]
    if group == "filter" or len(shape) < 2:
        return g.reshape(shape)
    c_in = shape[1]
    per_kernel = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
    if group == "kernel":
        return g.reshape(shape)
    blocks = g.shape[0] // c_out
    flat = g.reshape(c_out, blocks * pe_in, per_kernel)[:, :c_in]
    return flat.reshape(shape)
