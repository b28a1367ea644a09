"""Multipoint quantization (Liu, Ye, Zhou, Liu; arXiv 2002.09049): each output channel's weight
vector is a sum of a few low-bit vectors with float scales.

For output channel ``c`` with weights ``w_c`` (flattened) and ``p_c`` points, ``b`` bits,
``Q = 2^(b-1) - 1``::

    w_c ~ sum_{i < p_c} a_{c,i} v_{c,i},    v_{c,i} in {-Q, ..., Q}^d,   a_{c,i} > 0

built greedily on the residual: ``r_0 = w_c``; point ``i`` is

    (a, v) = argmin ||r_i - a v||^2,   v = clip(round(r_i / a), -Q, Q)  for a given a,
    a searched on the grid a = max|r_i| k / (grid Q), k = 1..grid;   r_{i+1} = r_i - a v

so the residual can only shrink (``a v = 0`` is on the search path's limit and any grid point
that does worse is not taken). The paper's point is that extra points go only where they pay:
``counts`` (a buffer, one integer per output channel, default ``points`` everywhere) says how
many points each channel uses; :func:`lowbit.ptq.multipoint.allocate_points` sets it from the
output error on calibration data. On plain hardware a channel with ``p`` points is ``p``
duplicated output channels whose results are summed.

Encoding: point ``i`` of every channel is branch ``i`` (integer codes ``v + Q``, per-channel
scale ``a_{:,i}``, zero for channels with fewer points); the decoded weight is the sum of the
branches, so the packed file stores ``b`` bits per weight per branch. Backward: the identity
straight-through estimator. The decomposition is recomputed from the weights at every forward
(``points * grid`` passes over the weights), which suits post-training use.
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

_EPS = 1e-12


def fit_point(r: Tensor, q: int, grid: int = 64) -> tuple[Tensor, Tensor]:
    """Best ``(a, v)`` per row of ``r`` (rows x d) on the ``a`` grid: scales ``(rows, 1)`` and integer
    codes ``v`` in ``[-q, q]`` (as floats) minimising ``||r - a v||^2``."""
    m = r.abs().amax(dim=1, keepdim=True).clamp_min(_EPS)
    best_a = torch.zeros_like(m)
    best_v = torch.zeros_like(r)
    best_err = r.square().sum(dim=1, keepdim=True)  # a = 0: nothing gained
    for k in range(grid, 0, -1):
        a = m * (k / (grid * q))
        v = torch.clamp(torch.round(r / a), -q, q)
        err = (r - a * v).square().sum(dim=1, keepdim=True)
        better = err < best_err
        best_a = torch.where(better, a, best_a)
        best_v = torch.where(better, v, best_v)
        best_err = torch.where(better, err, best_err)
    return best_a, best_v


def multipoint_decompose(
    w: Tensor, bits: int, counts: Tensor, grid: int = 64, axis: int = 0
) -> tuple[Tensor, Tensor]:
    """Greedy points of every output channel (index along ``axis``) of ``w``: scales ``(P, C)`` and
    codes ``(P, C, d)``, ``P = max(counts)``; channel ``c`` keeps its first ``counts[c]`` points
    (the rest are zero)."""
    q = 2 ** (bits - 1) - 1
    r = channel_rows(w.detach(), axis)
    scales, codes = [], []
    for i in range(int(counts.max())):
        a, v = fit_point(r, q, grid)
        keep = (counts > i).to(r.dtype).unsqueeze(1)
        a, v = a * keep, v * keep
        r = r - a * v
        scales.append(a.squeeze(1))
        codes.append(v)
    return torch.stack(scales), torch.stack(codes)


@register
class MultipointWeight(WeightQuantizer):
    name = "multipoint"
    bits_allowed = tuple(range(2, 9))

    def __init__(self, bits: int, points: int = 1, grid: int = 64) -> None:
        super().__init__(bits, per_channel=True)
        if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= 8:
            raise ValueError(f"multipoint: points must be an integer in [1, 8], got {points!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"multipoint: grid must be an integer >= 1, got {grid!r}")
        self.points, self.grid = points, grid
        self.q = 2 ** (bits - 1) - 1
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64))  # sized at the first weight

    def _counts(self, w: Tensor) -> Tensor:
        c = w.shape[self.channel_axis]
        if self.counts.numel() != c:
            if self.counts.numel():
                raise ValueError(f"multipoint: counts has {self.counts.numel()} channels, the weight {c}")
            self.counts = torch.full((c,), self.points, dtype=torch.int64, device=w.device)
        return self.counts

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "counts"
        if key in state_dict:  # the saved channel count wins over the lazily sized buffer
            self.counts = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def decompose(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return multipoint_decompose(w, self.bits, self._counts(w), self.grid, self.channel_axis)

    def forward(self, w: Tensor) -> Tensor:
        scales, codes = self.decompose(w)
        q = codes[0] * scales[0].unsqueeze(1)
        for i in range(1, codes.shape[0]):  # summed in the order Encoded.decode sums the branches
            q = q + codes[i] * scales[i].unsqueeze(1)
        return straight_through(from_channel_rows(q, w, self.channel_axis).to(w.dtype), w)

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        scales, codes = self.decompose(w)
        ax = self.channel_axis
        levels = torch.arange(-self.q, self.q + 1, dtype=w.dtype, device=w.device)
        encs = [Encoded(codes=from_channel_rows(codes[i] + self.q, w, ax).to(torch.uint8), levels=levels,
                        scale=per_channel_view(scales[i], w, ax), bits=self.bits)
                for i in range(codes.shape[0])]
        first = encs[0]
        return Encoded(first.codes, first.levels, first.scale, first.bits, branches=tuple(encs[1:]))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, points={self.points}, grid={self.grid}"
