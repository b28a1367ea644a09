"""LBW-Net: low bit-width weights, zero or powers of two (Yin, Zhang, Qi & Xin, "Quantization and
training of low bit-width convolutional neural networks for object detection", J. Comput. Math.
2019, arXiv 1612.06052).

The quantized weight minimises the Euclidean distance to the float weight:

    min_{alpha > 0, q}  ||w - alpha q||^2,     q_i in {0, +-2^{-(n-1)}, ..., +-2^{-1}, +-1}

**bits = 2 (ternary, q_i in {-1, 0, 1}): the exact solution in O(N log N).** For a support of
size ``k`` the best choice is the ``k`` largest ``|w_i|`` with ``q_i = sign(w_i)`` and
``alpha = S_k / k`` (``S_k`` = sum of the ``k`` largest ``|w_i|``), leaving the error
``||w||^2 - S_k^2 / k``. So: sort ``|w|`` descending, prefix sums ``S_k``,
``k* = argmax_k S_k^2 / k``, ``alpha = S_{k*} / k*``. Ties: among ``k`` with the same objective
the smallest (sparsest) is taken (``argmax`` returns the first maximum); among weights of equal
``|w|`` at the boundary of the support, the stable sort keeps the lower flat index (every such
choice has the same, optimal, objective). The objective is evaluated in float64.
``per_channel=True`` solves the problem independently per output channel (vectorised: one sort
along dim 1 of the ``(C, M)`` rows, one per index of the weight's ``channel_axis``).

**bits = b >= 3: power-of-two levels with one free parameter.** ``n = 2^{b-2}`` magnitudes
``2^{-j}, j = 0..n-1`` plus zero, so ``2n + 1 = 2^{b-1} + 1 <= 2^b`` levels are used (b = 3: 5
levels, b = 4: 9, ..., b = 8: 129; the paper's count, one bit being spent on the sign and the
magnitude set ``{0} + n`` powers of two). With the scale fixed at ``alpha = c * max|w|`` (per tensor
or per output channel), ``q`` is the nearest level to ``w / alpha`` (the exact minimiser of the
objective for that ``alpha``):

    |w|/alpha < 2^{-n}                          ->  0            (2^{-n}: midpoint of 0 and 2^{-(n-1)})
    2^{-n} <= |w|/alpha < 1.5 * 2^{-(n-1)}      ->  2^{-(n-1)}   (the smallest level)
    0.75 * 2^{-j} <= |w|/alpha < 1.5 * 2^{-j}   ->  2^{-j},  0 < j < n-1
    |w|/alpha >= 0.75                           ->  1            (saturates above 1)

(the cut between ``2^{-j}`` and ``2^{-j+1}`` is their midpoint ``0.75 * 2^{-j+1} = 1.5 * 2^{-j}``)

with the sign of ``w``; a value exactly on a cut goes to the larger magnitude.

``c`` is the method's single free parameter (the paper tunes it by retraining). Default: the
``c`` that minimises the mean relative error ``||w - Q(w)|| / ||w||`` on i.i.d. Gaussian weights,
averaged over 4 tensors each of 2,304 / 9,216 / 36,864 / 147,456 / 589,824 weights (3x3
convolutions of widths 16..256), scanned over c = 0.30 .. 1.00 in steps of 0.01:

    bits       3      4      5..8
    c          0.39   0.57   0.93
    rel. err.  0.296  0.202  0.195

From 5 bits on the curve is flat (0.1946 .. 0.1950 for c in 0.85 .. 1.00) and no longer depends
on the bit-width: the error of a power-of-two grid is set by its coarse top levels
``{1, 1/2, 1/4}`` (consecutive levels differ by a factor 2), the extra tiny levels only resolve
weights that are already near zero. So on Gaussian weights LBW gains little beyond 4 bits. At 3
and 4 bits the best ``c`` falls as the tensor grows (``max|w|`` of a Gaussian grows like
``sqrt(2 ln N)``): 0.43 -> 0.35 (3 bits) and 0.63 -> 0.49 (4 bits) from the smallest to the
largest size above; the defaults minimise the error averaged over sizes. ``c`` may be set per
recipe; it is not used for bits = 2.

Backward (all bit-widths): identity straight-through estimator, ``dL/dw = g``; ``alpha`` is a
statistic of ``w`` (no gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    Encoded,
    WeightQuantizer,
    channel_rows,
    from_channel_rows,
    per_channel_view,
    straight_through,
)
from .registry import register

#: Default free parameter c (alpha = c * max|w|) per bit-width, from the experiment above.
DEFAULT_C: dict[int, float] = {3: 0.39, 4: 0.57, 5: 0.93, 6: 0.93, 7: 0.93, 8: 0.93}

TERNARY_LEVELS = (-1.0, 0.0, 1.0)


def as_rows(w: Tensor, per_channel: bool, axis: int = 0) -> Tensor:
    """``(C, M)`` rows per output channel (along ``axis``), or ``(1, N)`` for one problem over the
    whole tensor."""
    if per_channel and w.dim() > 1:
        return channel_rows(w, axis)
    return w.reshape(1, -1)


def from_rows(rows: Tensor, w: Tensor, per_channel: bool, axis: int = 0) -> Tensor:
    """Inverse of :func:`as_rows`."""
    if per_channel and w.dim() > 1:
        return from_channel_rows(rows, w, axis)
    return rows.reshape(w.shape)


def row_scale(alpha: Tensor, w: Tensor, per_channel: bool, axis: int = 0) -> Tensor:
    """Per-row scales ``(C,)`` -> broadcastable against ``w`` (0-d for one problem)."""
    if per_channel and w.dim() > 1:
        return per_channel_view(alpha, w, axis)
    return alpha.reshape(())


def optimal_ternary_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Exact ``argmin_{alpha, q in {-1,0,1}^M} ||w_r - alpha q||^2`` for every row ``w_r`` of ``(C, M)``.

    Returns ``(codes, alpha)``: codes ``(C, M)`` uint8 (0, 1, 2 for -1, 0, +1) and ``alpha`` ``(C,)``.
    O(M log M) per row: sort, prefix sums, argmax of ``S_k^2 / k``.
    """
    M = w.shape[1]
    a = w.abs()
    vals, order = torch.sort(a, dim=1, descending=True, stable=True)
    S = vals.to(torch.float64).cumsum(dim=1)
    k = torch.arange(1, M + 1, dtype=torch.float64, device=w.device)
    kstar = (S * S / k).argmax(dim=1)  # index k* - 1; first maximum = smallest support
    alpha = (S.gather(1, kstar[:, None]).squeeze(1) / (kstar + 1).to(torch.float64)).to(w.dtype)
    in_support_sorted = torch.arange(M, device=w.device)[None, :] <= kstar[:, None]
    in_support = torch.zeros_like(in_support_sorted).scatter(1, order, in_support_sorted)
    sign = (w > 0).to(torch.uint8) - (w < 0).to(torch.uint8)  # sign(0) = 0: a zero weight stays 0
    codes = (sign * in_support.to(torch.uint8) + 1).to(torch.uint8)
    return codes, alpha


def ternary_objective(w: Tensor, alpha: Tensor, q: Tensor) -> Tensor:
    """``||w - alpha q||^2`` (for tests and diagnostics)."""
    return ((w - alpha * q) ** 2).sum()


def pow2_count(bits: int) -> int:
    """``n = 2^{b-2}`` non-zero magnitudes ``2^{-j}, j = 0..n-1``."""
    return 2 ** (bits - 2)


def pow2_levels(n: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """The ``2n + 1`` levels ``-1, -1/2, ..., -2^{-(n-1)}, 0, 2^{-(n-1)}, ..., 1/2, 1`` (ascending)."""
    mags = torch.tensor([2.0 ** -(n - 1 - i) for i in range(n)], dtype=dtype, device=device)
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=dtype, device=device), mags])


def pow2_cuts(n: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """Ascending midpoints between consecutive magnitudes ``0, 2^{-(n-1)}, ..., 1``.

    ``2^{-n}`` (between 0 and ``2^{-(n-1)}``), then ``1.5 * 2^{-j}`` (between ``2^{-j}`` and
    ``2^{-j+1}``) for ``j = n-1 .. 1``. All are exact in binary floating point.
    """
    cuts = [2.0**-n] + [1.5 * 2.0**-j for j in range(n - 1, 0, -1)]
    return torch.tensor(cuts, dtype=dtype, device=device)


def pow2_codes(w: Tensor, alpha: Tensor, n: int) -> Tensor:
    """Code of the nearest level (``pow2_levels`` index) to ``w / alpha``; ties go to the larger magnitude."""
    x = w.abs() / alpha.clamp_min(torch.finfo(w.dtype).tiny)
    k = torch.bucketize(x, pow2_cuts(n, w.dtype, w.device), right=True)  # 0 = zero, i = i-th magnitude
    sign = (w > 0).to(torch.int64) - (w < 0).to(torch.int64)
    return (n + sign * k).to(torch.uint8)


@register
class LBWWeight(WeightQuantizer):
    name = "lbw"
    bits_allowed = tuple(range(2, 9))

    def __init__(self, bits: int, per_channel: bool = False, c: float | None = None) -> None:
        super().__init__(bits, per_channel)
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0):
            raise ValueError(f"lbw: c (alpha = c * max|w|) must be a positive number or null, got {c!r}")
        self.c = float(c) if c is not None else DEFAULT_C.get(self.bits)

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        if self.bits == 2:
            ax = self.channel_axis
            codes, alpha = optimal_ternary_rows(as_rows(w, self.per_channel, ax))
            return Encoded(
                codes=from_rows(codes, w, self.per_channel, ax),
                levels=torch.tensor(TERNARY_LEVELS, dtype=w.dtype, device=w.device),
                scale=row_scale(alpha, w, self.per_channel, ax),
                bits=2,
            )
        assert self.c is not None
        n = pow2_count(self.bits)
        alpha = self.c * self.reduce_abs_max(w)
        return Encoded(
            codes=pow2_codes(w, alpha, n),
            levels=pow2_levels(n, w.dtype, w.device),
            scale=alpha,
            bits=self.bits,
        )

    def forward(self, w: Tensor) -> Tensor:
        return straight_through(self.encode(w).decode(), w)

    def extra_repr(self) -> str:
        c = "" if self.bits == 2 else f", c={self.c}"
        return f"bits={self.bits}, per_channel={self.per_channel}{c}"
