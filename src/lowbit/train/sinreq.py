"""SinReQ and WaveQ: sinusoidal regularizers that pull weights onto a quantization grid.

SinReQ (Elthakeb, Pilligundla, Esmaeilzadeh; arXiv 1905.01416) adds, for every regularized
layer ``l`` with ``b_l`` bits and grid step ``Delta_l``::

    R_l = lambda * mean_i sin^2(pi * w_i / Delta_l) / 2^{b_l}

which is zero exactly on the grid ``{m * Delta_l}`` and pushes each weight towards its nearest
level (the sine's local convexity around the levels) while the data loss trains the model.
The paper's form, ``sin^2(pi w (2^b - 1))``, is the grid ``Delta = 1/(2^b - 1)``; the grid must be
the one the quantizer rounds to, so ``grid`` chooses it:

- ``"quantizer"`` (default): the grid of the layer's weight quantizer, read from its encoding
  of the current weights (``Delta = scale * level step``, per output channel when the quantizer
  has per-channel scales). Needs a quantizer that rounds the weights themselves to a uniform
  grid: ``uniform``, ``wrpn``, ``lsq``.
- ``"max"``: ``Delta = max|w_l| / (2^{b-1} - 1)``, the symmetric ``uniform`` grid; works on float
  layers (regularize during float training, quantize afterwards).
- ``"wrpn"``: ``Delta = 1 / (2^{b-1} - 1)``, WRPN's fixed unit-range grid.
- ``"paper"``: ``Delta = 1 / (2^b - 1)``, the formula as printed.
- ``"dorefa"``: DoReFa's k-bit grid (k >= 2). DoReFa rounds the normalised weight
  ``x = tanh(w) / (2 max|tanh w|) + 1/2`` to multiples of ``1/(2^k - 1)`` (its levels ``2x - 1``
  are the odd multiples of ``1/(2^k - 1)``: the paper's grid shifted by half a period), so the
  penalty is ``sin^2(pi x (2^k - 1))`` on ``x``, zero exactly on DoReFa's levels.

``Delta`` is detached: the regularizer moves weights, never the quantizer's scale. ``mean``
over a layer's weights (rather than the paper's sum) makes ``lambda`` independent of layer
size; ``reduction="sum"`` gives the printed form.

WaveQ / SINAREQ (Elthakeb et al., arXiv 2003.00146) also *learns* each layer's bit-width: a
continuous ``beta_l`` replaces ``b_l``::

    R = lambda_w * sum_l mean_i sin^2(pi * w_i * k(beta_l) / c_l) / 2^{beta_l}
        + lambda_beta * sum_l beta_l
    k(beta) = 2^{beta-1} - 1   (symmetric grids: quantizer, max, wrpn)   or   2^beta - 1 (paper)

``c_l`` is the grid's range (``Delta_l = c_l / k(b_l)`` above: the quantizer's clip, ``max|w_l|``
or 1). ``1/2^beta`` lowers the penalty of a finer grid and ``lambda_beta * beta`` charges for the
bits, so ``beta`` settles where a coarser grid would cost more than it saves. ``beta`` lives in
``[min_bits, max_bits]`` (clamped after every step). The balance point is
``2^beta = lambda_w ln2 S_l / lambda_beta`` (``S_l`` the layer's mean ``sin^2``, at most 1/2 for
weights off the grid), so ``lambda_beta`` sets where the bits settle and ``S_l`` how they differ
between layers. ``beta_lr`` gives ``beta`` its own learning rate: under Adam a parameter moves
about ``lr`` per step whatever its gradient, so with the model's small rate every ``beta`` drifts by
about the same amount in a short fine-tune, far from its balance point. The sine term, whose period
moves with ``beta``, also has local minima that can hold ``beta`` before it gets there. The papers
also learn the range; here the range is the quantizer's (or ``max|w|``): a free range lets
``R -> 0`` by ``c -> infinity`` (every weight within the first half-period of the sine), so it is
not learned. ``ramp`` (a fraction of the run's optimizer steps) raises ``lambda_w`` linearly from 0
to its value over that part of training: with the full weight from the first step the weights
reach the grid of the starting bits within an epoch and the grid then holds every ``beta`` where
it started (benchmarks/results/probe_waveq.md); under the ramp the bit charge moves the bits
first, while the weights are still off the grid, and each layer's bits stop where its weights
can follow the grid without costing the data loss more. At the end the bits are
``round(beta_l)`` (:meth:`WaveQ.learned_bits`); :meth:`WaveQ.recipe` writes them into a recipe
for the quantized fine-tune, and a run's directory gets ``waveq_bits.json``.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_write_text
from ..nn.quantize import latent_weight, quantizable_layers, quantized_layers, weight_quantizer
from ..quant.dorefa import dorefa_weight_normalize
from ..recipe import Recipe
from .callbacks import Callback

__all__ = ["GRIDS", "ROUNDING_QUANTIZERS", "SinReQ", "WaveQ", "grid_input", "layer_grid", "sin_penalty"]

GRIDS = ("quantizer", "max", "wrpn", "paper", "dorefa")
# weight quantizers whose output is the weight rounded to a uniform grid of the weight itself
ROUNDING_QUANTIZERS = ("uniform", "wrpn", "lsq")
_EPS = 1e-12


# ---- pure functions ------------------------------------------------------------------------
def sin_penalty(w: Tensor, step: Tensor | float, bits: Tensor | float, reduction: str = "mean") -> Tensor:
    """``reduce_i sin^2(pi w_i / step) / 2^bits``: zero exactly where ``w`` is a multiple of ``step``."""
    bits = torch.as_tensor(bits, dtype=w.dtype)
    r = torch.sin(math.pi * w / step).square()
    r = r.mean() if reduction == "mean" else r.sum()
    return r / torch.pow(2.0, bits)


def grid_factor(bits: Tensor | float, grid: str) -> Tensor | float:
    """Levels per unit range: ``2^b - 1`` for the paper's and DoReFa's grids, ``2^(b-1) - 1`` for
    symmetric ones."""
    if grid in ("paper", "dorefa"):
        return 2.0**bits - 1
    return 2.0 ** (bits - 1) - 1


def layer_grid(layer: nn.Module, weight: Tensor, grid: str) -> Tensor:
    """The range ``c`` of a layer's grid (detached; 0-d or per output channel ``(C, 1, ...)``).

    The step for ``b`` bits is ``c / grid_factor(b, grid)``.
    """
    w = weight.detach()
    if grid in ("paper", "wrpn", "dorefa"):
        return torch.ones((), dtype=w.dtype, device=w.device)
    if grid == "max":
        return w.abs().max().clamp_min(_EPS)
    q = weight_quantizer(layer)
    if q is None:
        raise ValueError(
            "sinreq: grid 'quantizer' needs a quantized layer; this layer keeps float weights. "
            "Use grid 'max' (the symmetric uniform grid of the weights) and give bits"
        )
    if q.name not in ROUNDING_QUANTIZERS:
        raise ValueError(
            f"sinreq: grid 'quantizer' needs a weight quantizer that rounds the weights to a uniform "
            f"grid ({', '.join(ROUNDING_QUANTIZERS)}); {q.name!r} does not (its levels are not "
            "the nearest grid points of the weights). Use grid 'max', 'wrpn', 'paper' or, for DoReFa, "
            "'dorefa'"
        )
    enc = q.encode(w)
    levels = enc.levels.to(w.dtype)
    top = levels[-1]  # symmetric grids: levels -n..n (times scale), the range is n * scale
    return (top * enc.scale.to(w.dtype)).detach()


def grid_input(w: Tensor, grid: str) -> Tensor:
    """What the grid is laid on: DoReFa's normalised weight for ``"dorefa"``, else ``w``."""
    return dorefa_weight_normalize(w) if grid == "dorefa" else w


def _select(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    """Quantized layers (all quantizable ones in a float model), filtered by glob patterns."""
    found = {n: m for n, m in quantized_layers(model).items() if weight_quantizer(m) is not None}
    if not found:
        found = quantizable_layers(model)
    if layers is not None:
        found = {n: m for n, m in found.items() if any(fnmatch.fnmatchcase(n, p) for p in layers)}
    if not found:
        raise ValueError(f"sinreq: no layer to regularize (layers={list(layers) if layers else None}); "
                         "the model has no layer with a 2-D or larger weight matching them")
    return found


def _check_common(weight: float, grid: str, reduction: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise ValueError(f"sinreq: weight must be a number >= 0, got {weight!r}")
    if grid not in GRIDS:
        raise ValueError(f"sinreq: unknown grid={grid!r}; allowed: {', '.join(GRIDS)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"sinreq: unknown reduction={reduction!r}; allowed: mean, sum")


def _check_bits(bits: Any, grid: str, what: str = "bits") -> int:
    low = 1 if grid == "paper" else 2
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 8:
        raise ValueError(f"sinreq: {what} must be an integer in [{low}, 8] for grid {grid!r}, got {bits!r}")
    return bits


# ---- SinReQ --------------------------------------------------------------------------------
class SinReQ:
    """Regularizer ``model -> scalar``: ``weight * sum_l R_l`` with fixed bits per layer.

    ``bits=None`` takes each layer's bit-width from its weight quantizer.
    """

    name = "sinreq"

    def __init__(
        self,
        model: nn.Module,
        weight: float = 1.0,
        bits: int | None = None,
        grid: str = "quantizer",
        layers: Sequence[str] | None = None,
        reduction: str = "mean",
    ) -> None:
        _check_common(weight, grid, reduction)
        self.weight, self.grid, self.reduction = float(weight), grid, reduction
        self.layers = _select(model, layers)
        if grid == "quantizer":  # fail now, not at the first step
            for layer in self.layers.values():
                layer_grid(layer, latent_weight(layer), grid)
        self.bits: dict[str, int] = {}
        for name, layer in self.layers.items():
            q = weight_quantizer(layer)
            b = bits if bits is not None else (q.bits if q is not None else None)
            if b is None:
                raise ValueError(f"sinreq: layer {name!r} has float weights: give bits (an integer 2..8)")
            self.bits[name] = _check_bits(b, grid)

    def __call__(self, model: nn.Module) -> Tensor:
        total = None
        for name, layer in self.layers.items():
            w = latent_weight(layer)
            b = self.bits[name]
            step = layer_grid(layer, w, self.grid) / grid_factor(b, self.grid)
            r = sin_penalty(grid_input(w, self.grid), step, b, self.reduction)
            total = r if total is None else total + r
        return self.weight * total



# ---- WaveQ ---------------------------------------------------------------------------------
class WaveQ(nn.Module, Callback):
    """SinReQ with a learned bit-width ``beta_l`` per layer (WaveQ / SINAREQ).

    An ``nn.Module`` holding the ``beta`` parameters: the Trainer optimizes them beside the model
    (no weight decay) and checkpoints them; as a callback it clamps ``beta`` after each step,
    logs the mean of ``beta`` and the rounded bits per epoch, and writes ``waveq_bits.json``.
    """

    def __init__(
        self,
        model: nn.Module,
        weight: float = 1.0,
        beta_weight: float = 1e-3,
        init_bits: float | None = None,
        min_bits: int = 2,
        max_bits: int = 8,
        grid: str = "max",
        layers: Sequence[str] | None = None,
        reduction: str = "mean",
        beta_lr: float | None = None,
        ramp: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)
        _check_common(weight, grid, reduction)
        if isinstance(beta_weight, bool) or not isinstance(beta_weight, int | float) or beta_weight < 0:
            raise ValueError(f"waveq: beta_weight must be a number >= 0, got {beta_weight!r}")
        _check_bits(min_bits, grid, "min_bits")
        _check_bits(max_bits, grid, "max_bits")
        if min_bits > max_bits:
            raise ValueError(f"waveq: min_bits ({min_bits}) > max_bits ({max_bits})")
        if beta_lr is not None and (isinstance(beta_lr, bool) or not isinstance(beta_lr, int | float)
                                    or not beta_lr > 0):
            raise ValueError(f"waveq: beta_lr must be a number > 0 (or null: the model's rate), "
                             f"got {beta_lr!r}")
        if isinstance(ramp, bool) or not isinstance(ramp, int | float) or not 0 <= ramp <= 1:
            raise ValueError(f"waveq: ramp must be a fraction of the run's steps in [0, 1], got {ramp!r}")
        self.weight, self.beta_weight = float(weight), float(beta_weight)
        self.ramp = float(ramp)
        self.progress = 0.0  # the fraction of the run's optimizer steps done (set by the Trainer's hooks)
        self.param_lr = None if beta_lr is None else float(beta_lr)  # the Trainer's group lr for beta
        self.grid, self.reduction = grid, reduction
        self.min_bits, self.max_bits = min_bits, max_bits
        self.layers = _select(model, layers)
        self.names = list(self.layers)
        every = list(quantizable_layers(model))
        self._first_last = (every[0], every[-1])  # what @first / @last mean in a recipe
        init = []
        for name, layer in self.layers.items():
            q = weight_quantizer(layer)
            b = init_bits if init_bits is not None else (q.bits if q is not None else max_bits)
            if isinstance(b, bool) or not isinstance(b, int | float) or not min_bits <= b <= max_bits:
                raise ValueError(f"waveq: init_bits for {name!r} must be in [min_bits, max_bits] = "
                                 f"[{min_bits}, {max_bits}], got {b!r}")
            init.append(float(b))
        self.beta = nn.Parameter(torch.tensor(init))
        if grid == "quantizer":
            for layer in self.layers.values():
                layer_grid(layer, latent_weight(layer), grid)

    # the regularizer ------------------------------------------------------------------------
    def forward(self, model: nn.Module | None = None) -> Tensor:
        total = None
        for i, layer in enumerate(self.layers.values()):
            w = latent_weight(layer)
            beta = self.beta[i].to(w.dtype)
            c = layer_grid(layer, w, self.grid)
            step = c / grid_factor(beta, self.grid)
            r = sin_penalty(grid_input(w, self.grid), step, beta, self.reduction)
            total = r if total is None else total + r
        return self.weight * self.sine_scale() * total + self.beta_weight * self.beta.sum()

    def sine_scale(self) -> float:
        """The sine term's share of ``weight`` now: ``min(1, progress / ramp)`` (1 without a ramp)."""
        return 1.0 if self.ramp == 0 else min(1.0, self.progress / self.ramp)

    def _follow(self, trainer: Any) -> None:
        if self.ramp and trainer is not None:  # (None: the hooks called outside a Trainer)
            self.progress = min(1.0, trainer.global_step / (trainer.steps_per_epoch * trainer.config.epochs))

    @property
    def name(self) -> str:  # the Trainer logs the regularizer as reg/waveq
        return "waveq"

    # the outcome ----------------------------------------------------------------------------
    def learned_bits(self) -> dict[str, int]:
        """``round(beta_l)`` per layer, within ``[min_bits, max_bits]``."""
        b = self.beta.detach().clamp(self.min_bits, self.max_bits)
        return {n: int(torch.round(v)) for n, v in zip(self.names, b, strict=True)}

    def recipe(self, base: Recipe | Mapping[str, Any]) -> Recipe:
        """``base`` with a rule per regularized layer setting its weight bits to the learned ones.

        Layers whose rule in ``base`` keeps float weights are left float.
        """
        base = base if isinstance(base, Recipe) else Recipe.from_dict(dict(base))
        d = base.to_dict()
        rules = list(d.get("rules") or [])
        for name, bits in self.learned_bits().items():
            plan = base.plan(name, *self._first_last)
            if plan.weight is None:
                continue
            rules.append({"match": name, "weight": {**plan.weight.to_dict(), "bits": bits}})
        d["rules"] = rules
        d["name"] = f"{d.get('name') or 'recipe'}-waveq"
        return Recipe.from_dict(d)

    # the callback ---------------------------------------------------------------------------
    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._follow(trainer)  # (a resumed run starts where it stopped)

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        with torch.no_grad():
            self.beta.clamp_(self.min_bits, self.max_bits)
        self._follow(trainer)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        bits = self.learned_bits()
        metrics["waveq/beta_mean"] = float(self.beta.detach().mean())
        metrics["waveq/sine_scale"] = self.sine_scale()
        metrics["waveq/bits"] = bits
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is not None:
            payload = {"bits": bits, "beta": dict(zip(self.names, self.beta.detach().tolist(), strict=True))}
            atomic_write_text(Path(run_dir) / "waveq_bits.json", json.dumps(payload, indent=1) + "\n")

