"""Leaky integrate-and-fire (LIF) neurons with a learnable leak and threshold, and their
surrogate gradient.

One layer of neurons, time step ``t = 1..T``, input current ``I[t]`` (the synaptic layer's
output), membrane ``u`` (``u[0] = 0``), leak ``lam`` and threshold ``th`` (one scalar each per
layer, both trained)::

    u[t] = lam * u[t-1] + I[t]                  integrate, leak
    z[t] = u[t] / th - 1
    o[t] = H(z[t])                              spike when u[t] > th (H: Heaviside, H(0) = 0)
    u[t] = u[t] - th * o[t]                     soft reset: reset by subtraction
    s[t] = th * o[t]                            what the next layer receives

Spikes are binary; the amplitude ``th`` is one number per layer, so the next layer still
only accumulates (``W s = th * (W o)``: the scalar folds into that layer's weights or
threshold on hardware). With the amplitude, a rate-coded neuron stands for the ReLU it
replaces, ``th * rate ~ ReLU(I)`` for ``0 <= I <= th``, so a converted CNN keeps its weights.

Backward (the spike's derivative is zero almost everywhere): the piecewise-linear surrogate
of Bellec et al. (NeurIPS 2018, "Long short-term memory and learning-to-learn in networks of
spiking neurons") as used by DIET-SNN (Rathi & Roy, arXiv 2008.03658)::

    do/dz := gamma * max(0, 1 - |z|),   gamma = 0.3

Gradients of ``lam`` and ``th`` come from back-propagation through time by autograd: ``th``
through ``z`` (``dz/dth = -u / th^2``), the reset (``-o``, the spike held constant: no
surrogate through the reset, as DIET-SNN) and the amplitude ``s = th * o``; ``lam`` through
``u[t-1]``. The effective leak is ``clamp(lam, 0, 1)`` and the threshold ``max(th, 1e-4)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DEFAULT_GAMMA = 0.3
_MIN_THRESHOLD = 1e-4


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, gamma: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.gamma = gamma
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return grad * surrogate_grad(z, ctx.gamma), None


def surrogate_grad(z: Tensor, gamma: float = DEFAULT_GAMMA) -> Tensor:
    """``gamma * max(0, 1 - |z|)``: the derivative the spike function is given in backward."""
    return gamma * (1.0 - z.abs()).clamp_min(0.0)


def spike(z: Tensor, gamma: float = DEFAULT_GAMMA) -> Tensor:
    """``H(z) = 1[z > 0]`` forward; :func:`surrogate_grad` backward."""
    return _Spike.apply(z, gamma)


def lif_step(
    u: Tensor | None, current: Tensor, leak: Tensor | float, threshold: Tensor | float,
    gamma: float = DEFAULT_GAMMA,
) -> tuple[Tensor, Tensor]:
    """One step of the recursion above: returns ``(o[t], u[t] after reset)``.

    ``u=None`` is the resting state ``u[0] = 0``.
    """
    u = current if u is None else leak * u + current
    o = spike(u / threshold - 1.0, gamma)
    return o, u - threshold * o.detach()


class LIF(nn.Module):
    """A layer of LIF neurons (see the module docstring); replaces one ReLU of a CNN.

    ``forward(current, u)`` takes the step's input current and the membrane (``None`` at the
    first step) and returns ``(th * o, u)``. ``last_spikes`` holds the latest binary spikes
    while ``record`` is set (for spike counts; see :mod:`lowbit.snn.energy`).
    """

    def __init__(
        self,
        threshold: float = 1.0,
        leak: float = 1.0,
        gamma: float = DEFAULT_GAMMA,
        learn_threshold: bool = True,
        learn_leak: bool = True,
    ) -> None:
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"LIF threshold must be > 0, got {threshold!r}")
        if not 0 <= leak <= 1:
            raise ValueError(f"LIF leak must be in [0, 1] (1 = no leak: integrate-and-fire), got {leak!r}")
        if not gamma > 0:
            raise ValueError(f"LIF surrogate gamma must be > 0, got {gamma!r}")
        self.threshold = nn.Parameter(torch.tensor(float(threshold)), requires_grad=learn_threshold)
        self.leak = nn.Parameter(torch.tensor(float(leak)), requires_grad=learn_leak)
        self.gamma = float(gamma)
        self.record = False
        self.last_spikes: Tensor | None = None

    def effective(self) -> tuple[Tensor, Tensor]:
        """``(clamp(lam, 0, 1), max(th, 1e-4))``: the leak and threshold forward uses."""
        return self.leak.clamp(0.0, 1.0), self.threshold.clamp_min(_MIN_THRESHOLD)

    def forward(self, current: Tensor, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        leak, th = self.effective()
        o, u = lif_step(u, current, leak, th, self.gamma)
        if self.record:
            self.last_spikes = o.detach()
        return th * o, u

    def extra_repr(self) -> str:
        return (f"threshold={self.threshold.item():.4g}, leak={self.leak.item():.4g}, gamma={self.gamma}, "
                f"learn_threshold={self.threshold.requires_grad}, learn_leak={self.leak.requires_grad}")
