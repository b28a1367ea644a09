"""Bit-width against width at equal model size ("One weight bitwidth to rule them all", Chin,
Chuang, Chandra, Marculescu, 2020).

At a fixed weight-storage budget ``B`` (bits), a network quantized to ``b`` bits can be made
wider: with width multiplier ``m`` most layers hold about ``m^2`` times their weights, so
``m_b ~ sqrt(B / (b P_1))`` (``P_1``: the quantized weights at width 1). The paper's finding is
that one network-wide bit-width, with the width this buys, can beat mixed precision at the same
size, and that the best bit-width depends on the budget and the channel counts.

:func:`model_weight_bits` counts a model's weight storage exactly — ``bits`` per weight of the
quantized layers plus 32 per float parameter (first/last layers kept float, biases,
normalisation) — and :func:`width_for_budget` finds the largest width multiplier (on a grid
fine enough that rounding of channel counts decides) whose storage fits the budget.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..nn.quantize import quantizable_layers

__all__ = ["model_weight_bits", "width_for_budget"]


def model_weight_bits(
    model: nn.Module, bits: int, keep_float: tuple[str, ...] = ("@first", "@last")
) -> int:
    """Weight storage in bits: ``bits`` for every weight of the quantizable layers except those
    kept float (``@first``/``@last`` or layer names), 32 for every other parameter."""
    layers = quantizable_layers(model)
    names = list(layers)
    floats = {names[0] if k == "@first" else names[-1] if k == "@last" else k for k in keep_float}
    quantized = {id(m.weight) for n, m in layers.items() if n not in floats}
    total = 0
    for p in model.parameters():
        total += p.numel() * (bits if id(p) in quantized else 32)
    return total


def width_for_budget(
    build: Callable[[float], nn.Module],
    bits: int,
    budget_bits: int,
    keep_float: tuple[str, ...] = ("@first", "@last"),
    lo: float = 0.05,
    hi: float = 16.0,
    steps: int = 40,
) -> tuple[float, int]:
    """The largest width multiplier ``m`` in ``[lo, hi]`` with ``model_weight_bits(build(m), bits)
    <= budget_bits`` (bisection; storage grows with ``m``), and that storage."""
    def size(m: float) -> int:
        return model_weight_bits(build(m), bits, keep_float)

    if size(lo) > budget_bits:
        raise ValueError(f"width_for_budget: even width {lo} needs {size(lo):,} bits at {bits} bits per "
                         f"weight, more than the budget {budget_bits:,}")
    if size(hi) <= budget_bits:
        return hi, size(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if size(mid) <= budget_bits:
            lo = mid
        else:
            hi = mid
    return lo, size(lo)

