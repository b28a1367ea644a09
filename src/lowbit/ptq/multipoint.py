"""Post-training multipoint quantization: quantize a trained float model without training, and
spend extra low-bit points on the output channels whose *outputs* suffer most.

Liu, Ye, Zhou, Liu, "Post-training quantization with multiple points" (arXiv 2002.09049). The
per-channel decomposition is :mod:`lowbit.quant.multipoint` (``multipoint`` weight quantizer).
The allocation, for each quantized layer with calibration inputs ``X`` (rows: the layer's input
vectors; im2col patches for convolutions) and Gram matrix ``G = X^T X``::

    E_c(p) = r_c(p)^T G r_c(p) = ||X r_c(p)||^2      r_c(p): channel c's residual after p points

every channel starts with one point; an extra point goes, one at a time, to the channel with the
largest current output error ``E_c(p_c)`` (while ``p_c < max_points``) until the layer's channels
hold ``budget`` points on average. Points are built greedily on the residual, so a channel's
``k``-th point does not depend on the other channels' counts and the errors are computed once.
Grouped convolutions use the weight error (``G = I``) instead.

:func:`multipoint_ptq` takes ``X`` from the *float* model (the usual layer-wise objective of
post-training quantization: each layer's output error on the inputs the float model gives it);
:func:`allocate_points` on an already quantized model uses the inputs of its current state unless
given ``grams``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.quantize import quantizable_layers, quantize, quantized_layers, weight_quantizer
from ..quant.multipoint import MultipointWeight, multipoint_decompose

__all__ = ["LayerAllocation", "allocate_points", "calibration_batches", "input_grams", "multipoint_ptq",
           "output_errors"]


@dataclass
class LayerAllocation:
    name: str
    channels: int
    points: int  # total points of the layer
    mean_points: float
    rel_output_error_1: float  # sum_c E_c(1) / ||X W^T||^2, one point per channel
    rel_output_error: float  # after the allocation

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def calibration_batches(loader: Iterable[Any], n: int) -> list[Tensor]:
    """The inputs of the first batches of ``loader`` until they hold at least ``n >= 1`` samples."""
    if n < 1:
        raise ValueError(f"the number of calibration samples must be >= 1, got {n}")
    out, count = [], 0
    for b in loader:
        x = b[0] if isinstance(b, tuple | list) else b
        out.append(x)
        count += len(x)
        if count >= n:
            break
    return out


def _rows(layer: nn.Module, x: Tensor) -> Tensor | None:
    """The layer's input vectors (rows x d), or None when the Gram matrix does not apply."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and isinstance(layer.padding, tuple):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # (N, d, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return None


@torch.no_grad()
def input_grams(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Any]
) -> dict[str, Tensor]:
    """``X^T X`` (float64) of each layer's inputs over ``batches`` (tensors or ``(x, y)`` pairs);
    layers whose inputs do not form rows (grouped convolutions) are left out. A batch holding
    NaN/Inf is a ValueError naming it."""
    grams: dict[str, Tensor] = {}
    handles = []
    for name, layer in layers.items():
        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            rows = _rows(mod, args[0])
            if rows is not None:
                g = rows.double().T @ rows.double()
                grams[name] = g if name not in grams else grams[name] + g
        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    try:
        for i, b in enumerate(batches):
            x = b[0] if isinstance(b, tuple | list) else b
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                n = int((~torch.isfinite(x)).sum())
                raise ValueError(f"calibration batch {i} holds {n} NaN/Inf value(s) of {x.numel()}: the "
                                 "Gram matrices, and so the point allocation, would be NaN; drop or clean it")
            model(x.to(param.device) if param is not None else x)  # batches may live on the CPU
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, g in grams.items():
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"layer {name!r}: the Gram matrix of its inputs is not finite although the "
                             "calibration batches are: a layer before it holds NaN/Inf weights or its "
                             "activations overflow")
    return grams


def output_errors(w: Tensor, scales: Tensor, codes: Tensor, gram: Tensor | None) -> Tensor:
    """``E[c, p]`` for p = 1..P: channel c's output error (or squared weight error without a Gram
    matrix) with its first p points. Shape ``(C, P)``."""
    r = w.detach().reshape(w.shape[0], -1).double()
    out = []
    for i in range(codes.shape[0]):
        r = r - scales[i].double().unsqueeze(1) * codes[i].double()
        out.append(((r @ gram) * r).sum(1) if gram is not None else r.square().sum(1))
    return torch.stack(out, dim=1)


def allocate_points(
    model: nn.Module, batches: Iterable[Any], budget: float = 1.0, grams: Mapping[str, Tensor] | None = None
) -> list[LayerAllocation]:
    """Set every ``multipoint`` layer's per-channel point counts from calibration data (see module
    docstring); returns a row per layer. ``budget``: mean points per channel, in [1, points];
    ``grams``: the layers' input Gram matrices (default: from ``batches`` through ``model`` now)."""
    layers = {n: m for n, m in quantized_layers(model).items()
              if isinstance(weight_quantizer(m), MultipointWeight)}
    if not layers:
        raise ValueError("allocate_points: the model has no layer quantized with method 'multipoint'")
    if grams is None:
        grams = input_grams(model, layers, list(batches))
    rows = []
    for name, layer in layers.items():
        q: MultipointWeight = weight_quantizer(layer)  # type: ignore[assignment]
        if not 1 <= budget <= q.points:
            raise ValueError(f"allocate_points: budget must be in [1, points] = [1, {q.points}] for layer "
                             f"{name!r}, got {budget!r}")
        w = layer.parametrizations.weight.original.detach()
        full = torch.full((w.shape[0],), q.points, dtype=torch.int64, device=w.device)
        scales, codes = multipoint_decompose(w, q.bits, full, q.grid)
        gram = grams.get(name)
        errs = output_errors(w, scales, codes, gram)  # (C, P)
        counts = torch.ones(w.shape[0], dtype=torch.int64, device=w.device)
        extra = round((budget - 1.0) * w.shape[0])
        for _ in range(extra):
            current = errs.gather(1, (counts - 1).unsqueeze(1)).squeeze(1)
            current = torch.where(counts < q.points, current, torch.full_like(current, -math.inf))
            c = int(torch.argmax(current))
            if current[c] == -math.inf:
                break
            counts[c] += 1
        q.counts = counts.to(q.counts.device if q.counts.numel() else w.device)
        wd = w.reshape(w.shape[0], -1).double()
        total = float(((wd @ gram) * wd).sum()) if gram is not None else float(wd.square().sum())
        total = max(total, 1e-30)
        after = float(errs.gather(1, (counts - 1).unsqueeze(1)).sum())
        rows.append(LayerAllocation(name, w.shape[0], int(counts.sum()), float(counts.double().mean()),
                                    float(errs[:, 0].sum()) / total, after / total))
    return rows


def multipoint_ptq(
    model: nn.Module,
    batches: Iterable[Any],
    bits: int = 4,
    budget: float = 1.0,
    max_points: int = 2,
    keep_float: Iterable[str] = ("@first", "@last"),
    grid: int = 64,
) -> list[LayerAllocation]:
    """Quantize a trained float ``model`` in place with multipoint weights (no training) and
    allocate its points on ``batches``. ``keep_float``: recipe match patterns left in float."""
    recipe = {
        "default": {"weight": {"method": "multipoint", "bits": bits, "points": max_points, "grid": grid}},
        "rules": [{"match": m, "weight": None} for m in keep_float],
    }
    batches = list(batches)
    grams = input_grams(model, quantizable_layers(model), batches)  # the float model's inputs
    quantize(model, recipe)
    return allocate_points(model, batches, budget, grams)
