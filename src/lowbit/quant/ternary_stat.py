"""Statistical ternarization with residual expansion (He, Gong & Fan, "Optimize deep convolutional
neural network with ternarized weights and high accuracy", WACV 2019, arXiv 1807.07948).

One ternary branch with threshold factor ``f`` (``threshold``, 0.05 in the paper), recomputed
from the weight at every forward pass (nothing is learned):

    Delta = f * max|w|
    t_i   = sign(w_i) * 1[|w_i| >= Delta]
    alpha = mean_{|w_i| >= Delta} |w_i|          (statistics of w, not a learned scale)
    T_f(w) = alpha * t

``alpha`` is the least-squares optimal scale for the pattern ``t``. ``per_channel=True`` takes
``max|w|`` and ``alpha`` per output channel (XNOR-style; the paper uses one per layer).

Backward: identity straight-through estimator, zeroed where ``|w| >= clip_grad`` (1.0 in the
reference code, ``clip_grad=None`` disables the cancellation): ``dL/dw = g * 1[|w| < clip_grad]``.
``alpha`` and ``Delta`` carry no gradient (as in the reference).

Residual expansion layer (REL), ``expansion=[f_1, ..., f_m]`` (``[0.05, 0.1]`` is the paper's
"tex2"): the quantized weight is a SUM of ``m`` ternary branches of the same latent weight,

    r_1 = w,    B_i = T_{f_i}(r_i),    r_{i+1} = r_i - B_i,    Q(w) = B_1 + ... + B_m

i.e. branch ``i`` ternarizes, with the same rule, the residual the previous branches left
(``Delta_i = f_i * max|r_i|``). When ``expansion`` is given it lists every factor and
``threshold`` is not used.

Why residual and not the reference's parallel sum. The reference repository
(elliothe/Ternarized_Neural_Network, ``ResNet_REL_tex2.py``) ternarizes the *same* ``w`` at each
factor and sums ``T_{f_1}(w) + T_{f_2}(w)``. That sum is about ``m`` times larger than ``w``
(a BatchNorm after the layer absorbs the scale, a layer without one does not), its levels
``{0, ±a1, ±(a1+a2)}`` are fixed by the thresholds, and ``||w - Q(w)||`` typically grows with
each branch. In the residual form each ``alpha_i`` is the least-squares scale of its pattern on
``r_i``, so

    ||r_{i+1}||^2 = ||r_i||^2 - (sum_{S_i} |r_i|)^2 / |S_i|  <=  ||r_i||^2

for every factor: adding a branch never increases ``||w - Q(w)||`` (tested), the levels
``sum_i alpha_i t_i`` (up to ``3^m`` values) adapt to the weights, ``Q(w)`` stays an
approximation of ``w`` (which post-training quantization, error reports and layers without
BatchNorm rely on), and the storage is the same ``2 bits x m`` per weight. On Gaussian weights
(a 64x64x3x3 conv) the relative error ``||w - Q(w)|| / ||w||`` is 0.52 for one branch, 0.25 for
residual tex2 and 0.18 for residual [0.05, 0.1, 0.2, 0.3], against 0.92 for the parallel tex2
sum (0.44 even after the best global rescaling). Under the STE each
later branch sees ``r_i``, whose straight-through derivative w.r.t. ``w`` is ``1 - 1 = 0``, so
the whole sum has the identity STE (the parallel form would pass ``m * g``).

``encode`` returns the first branch with the others in ``Encoded.branches`` (each 2 bits,
levels ``{-1, 0, 1}``, its own scale), so packed sizes count ``2 * m`` bits per weight;
``effective_bits`` is ``2 * m``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Encoded, WeightQuantizer, channel_reduce_dims, straight_through
from .registry import register
from .twn import TERNARY_LEVELS, support_mean

DEFAULT_THRESHOLD = 0.05


def abs_max(w: Tensor, per_channel: bool, axis: int = 0) -> Tensor:
    """max|w| per tensor (0-d) or per output channel along ``axis`` (broadcastable against ``w``)."""
    if per_channel and w.dim() > 1:
        return w.abs().amax(dim=channel_reduce_dims(w, axis), keepdim=True)
    return w.abs().max()


def stat_ternary_codes(w: Tensor, delta: Tensor) -> Tensor:
    """Codes 0, 1, 2 for -1, 0, +1: ``+1`` where ``w >= Delta``, ``-1`` where ``w <= -Delta``.

    ``>=`` as in the reference (the support contains the weight(s) at ``max|w|`` for any factor
    ``f <= 1``, so it is never empty). With ``Delta == 0`` (an all-zero tensor) zero maps to +1,
    whose scale is then 0.
    """
    one = torch.ones((), dtype=torch.uint8, device=w.device)
    return torch.where(w >= delta, one * 2, torch.where(w <= -delta, one * 0, one))


def stat_ternary_branch(r: Tensor, factor: float, per_channel: bool, axis: int = 0) -> tuple[Tensor, Tensor]:
    """One branch ``T_f(r)``: (codes, alpha) with ``Delta = f max|r|``, ``alpha`` = support mean."""
    delta = factor * abs_max(r, per_channel, axis)
    mask = (r.abs() >= delta).to(r.dtype)
    return stat_ternary_codes(r, delta), support_mean(r, mask, per_channel, axis)


def decode_ternary(codes: Tensor, alpha: Tensor) -> Tensor:
    """``levels[codes] * alpha`` with levels ``{-1, 0, 1}``, exactly as ``Encoded.decode`` does."""
    levels = torch.tensor(TERNARY_LEVELS, dtype=alpha.dtype, device=codes.device)
    return levels[codes.long()] * alpha


def stat_ternary_expansion(
    w: Tensor, factors: Sequence[float], per_channel: bool, axis: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """Residual expansion: ``[(codes_i, alpha_i)]``, branch ``i`` ternarizing ``w - B_1 - ... - B_{i-1}``."""
    out: list[tuple[Tensor, Tensor]] = []
    r = w
    for i, f in enumerate(factors):
        codes, alpha = stat_ternary_branch(r, f, per_channel, axis)
        out.append((codes, alpha))
        if i + 1 < len(factors):
            r = r - decode_ternary(codes, alpha)
    return out


@register
class TernaryStatWeight(WeightQuantizer):
    name = "ternary_stat"
    bits_allowed = (2,)

    def __init__(
        self,
        bits: int = 2,
        per_channel: bool = False,
        threshold: float = DEFAULT_THRESHOLD,
        clip_grad: float | None = 1.0,
        expansion: list[float] | None = None,
    ) -> None:
        super().__init__(bits, per_channel)
        if not 0 < threshold <= 1:
            raise ValueError(f"ternary_stat: threshold factor must be in (0, 1], got {threshold}")
        if clip_grad is not None and not clip_grad > 0:
            raise ValueError(f"ternary_stat: clip_grad must be > 0 or null, got {clip_grad}")
        if expansion is not None:
            if isinstance(expansion, (str, bytes)) or not isinstance(expansion, Sequence) or not expansion:
                raise ValueError(
                    f"ternary_stat: expansion must be a non-empty list of threshold factors in (0, 1] "
                    f"(e.g. [0.05, 0.1]) or null, got {expansion!r}"
                )
            for f in expansion:
                if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                    raise ValueError(
                        f"ternary_stat: expansion factors must be numbers in (0, 1], got {expansion!r}"
                    )
        self.threshold = float(threshold)
        self.clip_grad = None if clip_grad is None else float(clip_grad)
        self.factors: tuple[float, ...] = (
            tuple(float(f) for f in expansion) if expansion is not None else (self.threshold,)
        )

    @property
    def n_branches(self) -> int:
        return len(self.factors)

    @property
    def effective_bits(self) -> int:
        """Stored bits per weight: 2 per ternary branch."""
        return 2 * self.n_branches

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        levels = torch.tensor(TERNARY_LEVELS, dtype=w.dtype, device=w.device)
        encs = [
            Encoded(codes=c, levels=levels, scale=a, bits=2)
            for c, a in stat_ternary_expansion(w, self.factors, self.per_channel, self.channel_axis)
        ]
        head = encs[0]
        head.branches = tuple(encs[1:])
        return head

    def forward(self, w: Tensor) -> Tensor:
        q = self.encode(w).decode()
        s = w if self.clip_grad is None else torch.where(w.detach().abs() < self.clip_grad, w, w.detach())
        return straight_through(q, s)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, per_channel={self.per_channel}, factors={list(self.factors)}, "
            f"clip_grad={self.clip_grad}"
        )
