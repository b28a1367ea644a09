"""BinaryRelax (Yin, Zhang, Qi, Xin, "BinaryRelax: a relaxation approach for training deep
neural networks with quantized weights", SIAM J. Imaging Sci. 2018, arXiv 1801.06313; as run
by the BCGD reference code penhunt/full-quantization-DNN, ``train_alm1_eta_alpha``).

Phase 1 trains with a *relaxed* quantized weight, a weighted average of the float weight and its
projection::

    w_relaxed = (eta * Q(w) + w) / (1 + eta)

with ``eta`` growing geometrically (x1.02 every half epoch in the reference), so the weights are
pulled gradually onto the quantized set. From ``hard_epoch`` on (epoch 150 of 200 in the
reference) the forward uses the hard ``Q(w)``.

Pieces:

- :class:`RelaxedWeight` wraps a layer's weight quantizer (the least invasive change: the
  parametrization stays where it is, wrapped). Backward is autograd through the formula, so
  ``d w_relaxed / d w = (eta * Q'(w) + 1) / (1 + eta)`` with ``Q'`` the quantizer's straight-
  through derivative: the identity (what the reference applies) for identity-STE quantizers,
  and learned quantizer parameters (LSQ steps) keep their gradient, scaled by
  ``eta / (1 + eta)``. In eval mode (``eval_hard=True``, default) and after the switch the
  forward is exactly ``Q(w)``, so ``forward == encode().decode()`` there; ``encode`` always
  encodes the hard ``Q(w)``. (The reference evaluates the relaxed weights during phase 1.)
  ``eta`` and the switch are buffers, so they are in the model's ``state_dict``.
- :func:`apply_binary_relax` / :func:`remove_binary_relax` wrap / unwrap every layer.
- :class:`BinaryRelax` is the schedule, a Trainer callback (also usable from a plain loop:
  call ``on_epoch_start(None, epoch)`` before each epoch and ``on_step_end(None)`` after each
  optimizer step). With ``K`` growth events per epoch (``per_epoch``, 2 = every half epoch,
  with ``interval = ceil(steps_per_epoch / per_epoch)``; or a fixed ``every_steps`` counted in
  global steps), ``eta`` is multiplied by ``growth`` *before* the steps whose in-epoch index is
  a multiple of the interval (``step % interval == 0``, as in the reference, so the first step
  already uses ``eta0 * growth``). At ``on_epoch_start`` of ``hard_epoch`` the quantizers switch
  to hard ``Q``. ``state_dict()`` / ``load_state_dict()`` carry the schedule for resumption.

Combined with :class:`lowbit.train.bcgd.BCGD`, the blend ``(1 - rho) w + rho Q(w)`` uses the
relaxed weight during phase 1, as the reference does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import quantizable_layers
from ..quant.base import Encoded, WeightQuantizer


def relaxed(q: Tensor, w: Tensor, eta: float) -> Tensor:
    """``(eta * q + w) / (1 + eta)``."""
    return (eta * q + w) / (1 + eta)


class RelaxedWeight(WeightQuantizer):
    """``(eta * Q(w) + w) / (1 + eta)`` around an inner weight quantizer ``Q`` (not registered:
    applied by :func:`apply_binary_relax`)."""

    name = "binary_relax"
    bits_allowed = tuple(range(1, 33))

    def __init__(self, inner: WeightQuantizer, eta: float = 1.0, eval_hard: bool = True) -> None:
        if not isinstance(inner, WeightQuantizer):
            raise TypeError(f"RelaxedWeight wraps a WeightQuantizer, got {type(inner).__name__}")
        if isinstance(inner, RelaxedWeight):
            raise ValueError("RelaxedWeight: the quantizer is already relaxed")
        super().__init__(inner.bits, inner.per_channel)
        self.inner = inner
        self.eval_hard = bool(eval_hard)
        self.register_buffer("eta", torch.tensor(float(eta), dtype=torch.float64))
        self.register_buffer("hard", torch.zeros((), dtype=torch.bool))

    def stored(self) -> WeightQuantizer:
        """A file stores the hard ``Q(w)``: the inner quantizer (eta and the switch are training
        state)."""
        return self.inner

    def set_eta(self, eta: float) -> None:
        self.eta.fill_(float(eta))

    def set_hard(self, hard: bool = True) -> None:
        self.hard.fill_(bool(hard))

    def initialize(self, w: Tensor) -> None:
        self.inner.initialize(w)

    def forward(self, w: Tensor) -> Tensor:
        q = self.inner(w)
        if bool(self.hard) or (self.eval_hard and not self.training):
            return q
        return relaxed(q, w, float(self.eta))

    def encode(self, w: Tensor) -> Encoded:
        return self.inner.encode(w)

    def extra_repr(self) -> str:
        return f"eta={float(self.eta):.4g}, hard={bool(self.hard)}, eval_hard={self.eval_hard}"


def _quantizer_slots(model: nn.Module) -> list[tuple[Any, int, WeightQuantizer]]:
    out = []
    for layer in quantizable_layers(model).values():
        plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
        if plist is None:
            continue
        for i, p in enumerate(plist):
            if isinstance(p, WeightQuantizer):
                out.append((plist, i, p))
                break
    return out


def apply_binary_relax(model: nn.Module, eta0: float = 1.0, eval_hard: bool = True) -> list[RelaxedWeight]:
    """Wrap every layer's weight quantizer in a :class:`RelaxedWeight` (in place); quantizers
    that are wrapped already are kept as they are. Returns the wrappers."""
    wrappers = []
    for plist, i, q in _quantizer_slots(model):
        if not isinstance(q, RelaxedWeight):
            q = RelaxedWeight(q, eta0, eval_hard)
            plist[i] = q
        wrappers.append(q)
    return wrappers


def remove_binary_relax(model: nn.Module) -> int:
    """Put each layer's inner quantizer back in place of its wrapper; returns how many."""
    n = 0
    for plist, i, q in _quantizer_slots(model):
        if isinstance(q, RelaxedWeight):
            plist[i] = q.inner
            n += 1
    return n


class BinaryRelax:
    """The BinaryRelax schedule: wraps ``model``'s weight quantizers and drives ``eta``.

    Args:
        model: a model quantized by ``lowbit.quantize``.
        eta0: ``eta`` before the first growth (the reference starts at 1).
        growth: factor applied at each growth event (reference 1.02).
        per_epoch: growth events per epoch (reference 2: every half epoch); needs the number
            of steps per epoch, from ``steps_per_epoch`` or the trainer's ``steps_per_epoch``.
        every_steps: instead, grow every this many global optimizer steps.
        steps_per_epoch: the number of optimizer steps per epoch (``per_epoch`` mode).
        hard_epoch: the epoch (0-based) from which the forward is hard ``Q(w)``; None = never.
        eval_hard: evaluate with hard ``Q(w)`` during the relaxed phase.
    """

    def __init__(
        self,
        model: nn.Module,
        eta0: float = 1.0,
        growth: float = 1.02,
        per_epoch: int = 2,
        every_steps: int | None = None,
        steps_per_epoch: int | None = None,
        hard_epoch: int | None = 150,
        eval_hard: bool = True,
    ) -> None:
        if not eta0 >= 0:
            raise ValueError(f"BinaryRelax: eta0 must be >= 0, got {eta0!r}")
        if not growth > 0:
            raise ValueError(f"BinaryRelax: growth must be > 0, got {growth!r}")
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"BinaryRelax: every_steps must be >= 1 or None, got {every_steps!r}")
        if every_steps is None and per_epoch < 1:
            raise ValueError(f"BinaryRelax: per_epoch must be >= 1, got {per_epoch!r}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"BinaryRelax: steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
        self.modules = apply_binary_relax(model, eta0, eval_hard)
        if not self.modules:
            raise ValueError(
                "BinaryRelax: the model has no quantized weight; call lowbit.quantize(model, recipe) first"
            )
        self.eta0 = float(eta0)
        self.growth = float(growth)
        self.per_epoch = int(per_epoch)
        self.every_steps = every_steps
        self.steps_per_epoch = steps_per_epoch
        self.hard_epoch = hard_epoch
        self.eta = float(eta0)
        self.hard = False
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self._prepared: list[int] | None = None  # the step whose growth is applied already
        self._push()

    # ---- schedule ----------------------------------------------------------------------
    def interval(self, trainer: Any = None) -> int:
        """Steps between growth events within an epoch (``per_epoch`` mode)."""
        spe = self.steps_per_epoch or getattr(trainer, "steps_per_epoch", None)
        if spe is None:
            raise ValueError(
                "BinaryRelax: growing eta per_epoch times an epoch needs the number of steps per "
                "epoch: pass steps_per_epoch=len(train_loader) (or every_steps=N)"
            )
        self.steps_per_epoch = int(spe)
        return math.ceil(self.steps_per_epoch / self.per_epoch)

    def _before_step(self, trainer: Any) -> None:
        """Apply the growth due before the upcoming step (at most once per step)."""
        # the upcoming step, named by its global index or by (epoch, index in the epoch)
        key = [-1, self.global_step] if self.every_steps is not None else [self.epoch, self.step_in_epoch]
        if self.hard or self._prepared == key:
            return
        self._prepared = key
        if self.every_steps is not None:
            due = self.global_step % self.every_steps == 0
        else:
            k = self.step_in_epoch
            due = k % self.interval(trainer) == 0 and k < (self.steps_per_epoch or 0)
        if due:
            self.eta *= self.growth
            self._push()

    def _push(self) -> None:
        for m in self.modules:
            m.set_eta(self.eta)
            m.set_hard(self.hard)

    def switch_to_hard(self) -> None:
        self.hard = True
        self._push()

    # ---- callback hooks ------------------------------------------------------------------
    def on_epoch_start(self, trainer: Any = None, epoch: int | None = None) -> None:
        self.epoch = self.epoch if epoch is None else int(epoch)
        self.step_in_epoch = 0
        if self.hard_epoch is not None and self.epoch >= self.hard_epoch:
            if not self.hard:
                self.switch_to_hard()
            return
        self._before_step(trainer)

    def on_step_end(self, trainer: Any = None, step: int | None = None, metrics: Any = None) -> None:
        self.step_in_epoch += 1
        self.global_step = self.global_step + 1 if step is None else int(step)
        spe = self.steps_per_epoch
        if self.every_steps is None and spe is not None and self.step_in_epoch >= spe:
            return  # the epoch is over; the next growth comes with on_epoch_start
        self._before_step(trainer)

    # ---- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "eta": self.eta,
            "hard": self.hard,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "prepared": self._prepared,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eta = float(state["eta"])
        self.hard = bool(state["hard"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        if state.get("steps_per_epoch") is not None:
            self.steps_per_epoch = int(state["steps_per_epoch"])
        p = state.get("prepared")
        self._prepared = None if p is None else [int(v) for v in p]
        self._push()
