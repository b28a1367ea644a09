"""Sandwich-rule training of a slimmable supernet with in-place distillation.

Yu and Huang, "Universally slimmable networks and improved training techniques" (ICCV 2019).
Every step trains the widest and the narrowest sub-net and ``n_random`` widths drawn from the
others; the widest learns from the labels, the others from the widest's detached predictions
(in-place distillation, ``inplace_distill=True``) or from the labels::

    L = CE(z_max, y) + sum_{r in {r_min} + random} [ KL(softmax(z_max) || softmax(z_r)) or CE(z_r, y) ]

All widths share the weights, so one backward accumulates every sub-net's gradient. A Trainer
``loss_fn`` for a :class:`lowbit.nn.slimmable.SlimmableChain`; it leaves the model at its
widest (what the Trainer evaluates) and returns the widest's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.slimmable import SlimmableChain

__all__ = ["SandwichLoss"]


class SandwichLoss:
    name = "sandwich"

    def __init__(self, n_random: int = 2, inplace_distill: bool = True, seed: int = 0) -> None:
        if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
            raise ValueError(f"sandwich: n_random must be an integer >= 0, got {n_random!r}")
        self.n_random, self.inplace_distill = n_random, inplace_distill
        self.generator = torch.Generator().manual_seed(seed)

    def widths(self, model: SlimmableChain) -> list[float]:
        """This step's widths: widest, narrowest, then ``n_random`` distinct middle ones."""
        ws = model.widths
        middle = ws[1:-1]
        k = min(self.n_random, len(middle))
        pick = torch.randperm(len(middle), generator=self.generator)[:k].tolist() if k else []
        return [ws[-1], ws[0]] + [middle[i] for i in sorted(pick)] if len(ws) > 1 else [ws[-1]]

    def __call__(self, model: SlimmableChain, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(model, SlimmableChain):
            raise ValueError(f"sandwich: the model must be a SlimmableChain, got {type(model).__name__}")
        widths = self.widths(model)
        model.set_width(widths[0])
        z_max = model(x)
        loss = F.cross_entropy(z_max, y)
        soft = F.log_softmax(z_max.detach(), dim=1)
        for r in widths[1:]:
            model.set_width(r)
            z = model(x)
            if self.inplace_distill:
                loss = loss + F.kl_div(F.log_softmax(z, dim=1), soft, reduction="batchmean", log_target=True)
            else:
                loss = loss + F.cross_entropy(z, y)
        model.set_width(widths[0])
        return loss, z_max
