"""RVSM: relaxed variable splitting for sparse weights under (coarse-)gradient training.

Dinh and Xin, "Convergence of a relaxed variable splitting coarse gradient descent method for
learning sparse weight binarized activation neural networks" (Front. Appl. Math. Stat. 2020,
arXiv 1901.09731). The objective is split as

    L(w, u) = f(w) + lambda P(u) + (beta / 2) ||w - u||^2

and iterated as

    u_{t+1} = prox_{tau P}(w_t),        tau = lambda / beta
    w_{t+1} = w_t - lr (grad~ f(w_t) + beta (w_t - u_{t+1}))

``grad~`` is whatever (coarse) gradient the network gives, quantized or not. The second term is
the gradient of ``(beta/2) ||w - u||^2`` with ``u`` held fixed, so :class:`RVSM` is a Trainer
regularizer that computes ``u = prox(w)`` without gradient at every step and returns that
penalty; any optimizer then performs the ``w`` update. ``u`` is the sparse model: at the end of
training (``finalize=True``) every regularized weight is replaced by its ``u`` (so the final
evaluation, ``result.json`` and ``model.lowbit`` of a run are the sparse model; the checkpoints
keep the dense ``w`` that training resumes from), and each epoch logs the fraction of zeros in
``u``. For quantized layers ``w`` is the latent float weight; a zero survives quantization when
the quantizer has a zero level (ternary, uniform, ...), not with binary weights.

Proximal maps, ``prox_{tau P}(y) = argmin_x (1/2)(x - y)^2 + tau P(x)``, elementwise:

- L1, ``P = |x|``: soft threshold, ``sign(y) max(|y| - tau, 0)``;
- L0, ``P = 1[x != 0]``: hard threshold, ``y 1[|y| > sqrt(2 tau)]``;
- transformed L1, ``P = (a + 1)|x| / (a + |x|)`` (Zhang and Xin): 0 when ``|y| <= t``, with
  ``t = tau (a + 1) / a`` if ``tau <= a^2 / (2 (a + 1))`` else ``t = sqrt(2 tau (a + 1)) - a / 2``;
  otherwise ``sign(y) [(2/3)(a + |y|) cos(phi / 3) - 2a/3 + |y|/3]`` with
  ``phi = arccos(1 - 27 tau a (a + 1) / (2 (a + |y|)^3))``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.quantize import latent_weight, quantizable_layers
from .callbacks import Callback

__all__ = ["PENALTIES", "RVSM", "prox", "prox_l0", "prox_l1", "prox_tl1"]

PENALTIES = ("l1", "l0", "tl1")


def prox_l1(y: Tensor, tau: float) -> Tensor:
    """Soft threshold."""
    return torch.sign(y) * torch.clamp(y.abs() - tau, min=0)


def prox_l0(y: Tensor, tau: float) -> Tensor:
    """Hard threshold at ``sqrt(2 tau)``."""
    return torch.where(y.abs() > math.sqrt(2 * tau), y, torch.zeros_like(y))


def prox_tl1(y: Tensor, tau: float, a: float = 1.0) -> Tensor:
    """Transformed-L1 proximal map (closed form, see the module docstring)."""
    small = tau <= a * a / (2 * (a + 1))
    t = tau * (a + 1) / a if small else math.sqrt(2 * tau * (a + 1)) - a / 2  # the zero threshold
    ay = y.abs()
    arg = 1 - 27 * tau * a * (a + 1) / (2 * (a + ay).pow(3))
    phi = torch.arccos(arg.clamp(-1.0, 1.0))
    big = torch.sign(y) * ((2 / 3) * (a + ay) * torch.cos(phi / 3) - 2 * a / 3 + ay / 3)
    return torch.where(ay > t, big, torch.zeros_like(y))


def prox(y: Tensor, tau: float, penalty: str, a: float = 1.0) -> Tensor:
    if penalty == "l1":
        return prox_l1(y, tau)
    if penalty == "l0":
        return prox_l0(y, tau)
    if penalty == "tl1":
        return prox_tl1(y, tau, a)
    raise ValueError(f"rvsm: unknown penalty={penalty!r}; allowed: {', '.join(PENALTIES)}")



class RVSM(Callback):
    """Trainer regularizer ``(beta/2) sum_l ||w_l - prox(w_l)||^2`` and callback (sparsity
    logging, final ``w <- u``). ``layers``: glob patterns (default every layer with a weight)."""

    name = "rvsm"

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1e-4,
        beta: float = 1.0,
        penalty: str = "l1",
        a: float = 1.0,
        layers: Sequence[str] | None = None,
        finalize: bool = True,
    ) -> None:
        for k, v in (("lam", lam), ("beta", beta), ("a", a)):
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise ValueError(f"rvsm: {k} must be a number > 0, got {v!r}")
        if penalty not in PENALTIES:
            raise ValueError(f"rvsm: unknown penalty={penalty!r}; allowed: {', '.join(PENALTIES)}")
        found = quantizable_layers(model)
        if layers is not None:
            found = {n: m for n, m in found.items() if any(fnmatch.fnmatchcase(n, p) for p in layers)}
        if not found:
            raise ValueError(f"rvsm: no layer with a weight matches layers={list(layers or [])}")
        self.layers = found
        self.lam, self.beta, self.penalty, self.a = float(lam), float(beta), penalty, float(a)
        self.tau = self.lam / self.beta
        self.finalize = finalize

    def sparse(self, w: Tensor) -> Tensor:
        """``u = prox_{tau P}(w)`` (no gradient)."""
        with torch.no_grad():
            return prox(w.detach(), self.tau, self.penalty, self.a)

    def __call__(self, model: nn.Module) -> Tensor:
        total = None
        for layer in self.layers.values():
            w = latent_weight(layer)
            r = (w - self.sparse(w)).square().sum()
            total = r if total is None else total + r
        return 0.5 * self.beta * total

    def sparsity(self) -> float:
        """Fraction of zeros in ``u`` over the regularized weights."""
        zeros = total = 0
        for layer in self.layers.values():
            u = self.sparse(latent_weight(layer))
            zeros += int((u == 0).sum())
            total += u.numel()
        return zeros / total

    @torch.no_grad()
    def apply(self) -> None:
        """``w <- u`` for every regularized weight (the sparse model)."""
        for layer in self.layers.values():
            w = latent_weight(layer)
            w.copy_(self.sparse(w))

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        metrics["rvsm/sparsity"] = self.sparsity()

    def on_fit_end(self, trainer: Any) -> None:
        if self.finalize:
            self.apply()
