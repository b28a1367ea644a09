"""Sandwich-rule training of a switchable supernet with in-place distillation, and the Delayed
epsilon-Shrinking schedule.

Yu and Huang, "Universally slimmable networks and improved training techniques" (ICCV 2019).
Every step trains the largest and the smallest sub-net and ``n_random`` sub-nets drawn from the
others; the largest learns from the labels, the others from the largest's detached predictions
(in-place distillation, ``inplace_distill=True``) or from the labels::

    L = CE(z_max, y) + sum_{s in {s_min} + random} [ KL(softmax(z_max) || softmax(z_s)) or CE(z_s, y) ]

All sub-nets share the weights, so one backward accumulates every sub-net's gradient.

Delayed epsilon-Shrinking (DeS; seed 002's survey of weight-shared supernets: "strategically
scheduling the introduction of smaller SubNets during training"): the smaller sub-nets join
later. With training progress ``t = step / total_steps`` and the sub-nets sorted from the
largest down, only the largest trains while ``t < warmup``; after that the admitted set grows by
one size step every ``eps`` of progress::

    k(t) = 1                                        t < warmup
    k(t) = min(n, 2 + floor((t - warmup) / eps))    otherwise

and the sandwich rule runs over the ``k(t)`` largest sub-nets (its "smallest" is the smallest
admitted one). ``eps`` defaults to ``(1 - warmup) / (2 (n - 1))``: every sub-net is in by the
middle of the remaining training. The survey gives no formula; this reading (delay, then shrink
the admitted minimum size in equal epsilon steps) is ours.

Pass the loss also as a Trainer callback (``callbacks=[loss]``) to make a killed run resume
with the same schedule and draws (:meth:`SandwichLoss.on_epoch_start`).

A Trainer ``loss_fn`` for any model with ``choices`` (cheapest first) and ``set_choice(c)``:
:class:`lowbit.nn.slimmable.SlimmableChain` (widths) and :class:`lowbit.nn.supernet.Supernet`
(named sub-nets ordered by BOPs). It leaves the model at its largest sub-net (what the Trainer
evaluates) and returns the largest's logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DelayedShrinking", "SandwichLoss"]


class DelayedShrinking:
    """How many of the largest sub-nets are admitted at ``step`` of ``total_steps``."""

    def __init__(self, total_steps: int, warmup: float = 0.25, eps: float | None = None) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"delayed shrinking: total_steps must be an integer >= 1, got {total_steps!r}")
        if not 0 <= warmup < 1:
            raise ValueError(f"delayed shrinking: warmup must be a fraction in [0, 1), got {warmup!r}")
        if eps is not None and not eps > 0:
            raise ValueError(f"delayed shrinking: eps must be > 0, got {eps!r}")
        self.total_steps, self.warmup, self.eps = total_steps, float(warmup), eps

    def admitted(self, n: int, step: int) -> int:
        t = step / self.total_steps
        if n <= 1 or t < self.warmup:
            return 1
        eps = self.eps if self.eps is not None else (1 - self.warmup) / (2 * (n - 1))
        return min(n, 2 + math.floor((t - self.warmup) / eps))


class SandwichLoss:
    name = "sandwich"

    def __init__(self, n_random: int = 2, inplace_distill: bool = True, seed: int = 0,
                 schedule: DelayedShrinking | None = None) -> None:
        if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
            raise ValueError(f"sandwich: n_random must be an integer >= 0, got {n_random!r}")
        self.n_random, self.inplace_distill, self.seed = n_random, inplace_distill, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.schedule = schedule
        self.step = 0  # training calls so far (drives the schedule)

    def widths(self, model: Any) -> list[Any]:
        """This step's sub-nets: largest, smallest admitted, then ``n_random`` distinct others."""
        cs = list(model.choices)
        if self.schedule is not None:
            cs = cs[len(cs) - self.schedule.admitted(len(cs), self.step):]
        middle = cs[1:-1]
        k = min(self.n_random, len(middle))
        pick = torch.randperm(len(middle), generator=self.generator)[:k].tolist() if k else []
        return [cs[-1], cs[0]] + [middle[i] for i in sorted(pick)] if len(cs) > 1 else [cs[-1]]

    choices = widths

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """Trainer callback: take the step count from the trainer and reseed the random picks from
        it, so that a resumed run (``fit(resume=True)``) schedules and draws as an uninterrupted one."""
        self.step = int(trainer.global_step)
        self.generator.manual_seed(self.seed * 1_000_003 + self.step)

    def __call__(self, model: Any, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not hasattr(model, "choices") or not hasattr(model, "set_choice"):
            raise ValueError(f"sandwich: the model must be switchable (SlimmableChain or Supernet), "
                             f"got {type(model).__name__}")
        picked = self.widths(model)
        if model.training:
            self.step += 1
        model.set_choice(picked[0])
        z_max = model(x)
        loss = F.cross_entropy(z_max, y)
        soft = F.log_softmax(z_max.detach(), dim=1)
        for c in picked[1:]:
            model.set_choice(c)
            z = model(x)
            if self.inplace_distill:
                loss = loss + F.kl_div(F.log_softmax(z, dim=1), soft, reduction="batchmean", log_target=True)
            else:
                loss = loss + F.cross_entropy(z, y)
        model.set_choice(picked[0])
        return loss, z_max
