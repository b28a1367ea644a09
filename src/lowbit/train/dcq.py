"""DCQ: divide-and-conquer quantization (Elthakeb, Pilligundla, Mireshghallah, Elgindi, Deledalle,
Esmaeilzadeh; ICML 2020, arXiv 1906.06033).

The float teacher is cut into sections ``T = T_K o ... o T_1``; the quantized student has the same
cut, ``S = S_K o ... o S_1``, and starts from the teacher's weights. Each student section learns
on its own, fed the *teacher's* features::

    h_0 = x,   h_k = T_k(h_{k-1})                                  (no gradient)
    L_k = mean (S_k(h_{k-1}) - h_k)^2                              k < K
    L_K = KD(S_K(h_{K-1}), h_K, y)                                  the last section: soft labels
    L   = sum_k L_k

Because every ``L_k`` depends only on section ``k``'s parameters and on detached teacher features,
``grad L`` is exactly each section's own gradient: one pass trains all sections independently
(the paper trains them in parallel; this is the same computation). The sections are then already
stitched (they are the student model's own modules); ``dcq_epochs`` sets how many epochs use the
sectioned loss, and the remaining epochs fine-tune the whole student with KD (or cross-entropy
with ``alpha = 0``).

Cuts: an ``nn.Sequential`` (every zoo chain: MLP, LeNet, VGG...) is cut after the children named
in ``cut_after`` (default: after every pooling child, the paper's stage/pooling boundaries); any
other model may define ``dcq_sections()`` returning the modules whose composition is its forward
(the CIFAR ResNets return stem, stages and head).

During the sectioned epochs the logged ``train_acc`` is that of the last section on teacher
features; test accuracy is always the stitched student's.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .callbacks import Callback
from .distill import check_kd_options, frozen_teacher, kd_loss

__all__ = ["DCQ", "split_sections"]


def split_sections(model: nn.Module, cut_after: Sequence[str] | None = None) -> list[nn.Module]:
    """The model's sections, in order; their composition is ``model.forward``."""
    if callable(getattr(model, "dcq_sections", None)):
        if cut_after is not None:
            raise ValueError(f"dcq: {type(model).__name__} defines its own sections (dcq_sections()); "
                             "cut_after applies to nn.Sequential models only")
        return list(model.dcq_sections())
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"dcq: cannot cut a {type(model).__name__} into sections: give an nn.Sequential (cut after "
            "named children) or a model with a dcq_sections() method returning the modules whose "
            "composition is its forward"
        )
    names = [n for n, _ in model.named_children()]
    if cut_after is None:
        pools = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
        cut_after = [n for n, m in model.named_children() if isinstance(m, pools) and n != names[-1]]
        if not cut_after:
            raise ValueError(f"dcq: {type(model).__name__} has no pooling layer to cut after: give "
                             f"cut_after (names of children; children: {names})")
    unknown = [c for c in cut_after if c not in names]
    if unknown:
        raise ValueError(f"dcq: cut_after names {unknown} are not children of the model; children: {names}")
    cuts = sorted(names.index(c) + 1 for c in set(cut_after))
    if cuts[-1] == len(names):
        raise ValueError(f"dcq: cutting after the last child ({names[-1]!r}) leaves an empty section")
    children = list(model.children())
    bounds = [0, *cuts, len(children)]
    return [nn.Sequential(*children[a:b]) for a, b in pairwise(bounds)]


class DCQ(Callback):
    """Trainer ``loss_fn`` (sectioned for the first ``dcq_epochs`` epochs, then whole-model KD)
    and callback (it follows the epoch)."""

    name = "dcq"

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        cut_after: Sequence[str] | None = None,
        dcq_epochs: int | None = None,
        alpha: float = 0.9,
        temperature: float = 4.0,
    ) -> None:
        check_kd_options(alpha, temperature, "dcq")
        if dcq_epochs is not None and (isinstance(dcq_epochs, bool) or not isinstance(dcq_epochs, int)
                                       or dcq_epochs < 0):
            raise ValueError(f"dcq: dcq_epochs must be an integer >= 0 or null (every epoch), "
                             f"got {dcq_epochs!r}")
        self.teacher = frozen_teacher(teacher, "dcq")
        self.t_sections = split_sections(self.teacher, cut_after)
        self.s_sections = split_sections(model, cut_after)
        if len(self.t_sections) != len(self.s_sections) or len(self.s_sections) < 2:
            raise ValueError(f"dcq: teacher and student must cut into the same number (>= 2) of sections; "
                             f"got {len(self.t_sections)} and {len(self.s_sections)}")
        self.dcq_epochs, self.alpha, self.temperature = dcq_epochs, float(alpha), float(temperature)
        self.epoch = 0
        self.last_section_losses: list[float] = []

    @property
    def sectioned(self) -> bool:
        return self.dcq_epochs is None or self.epoch < self.dcq_epochs

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.epoch = epoch

    def section_losses(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """``[L_1, ..., L_K]`` and the last section's logits, on the teacher's features."""
        with torch.no_grad():
            self.teacher.eval()
            feats = [x]
            for t in self.t_sections:
                feats.append(t(feats[-1]))
        losses = []
        for k, s in enumerate(self.s_sections[:-1]):
            losses.append(F.mse_loss(s(feats[k]), feats[k + 1]))
        z = self.s_sections[-1](feats[-2])
        losses.append(kd_loss(z, feats[-1], y, self.alpha, self.temperature))
        return losses, z

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.sectioned:
            losses, z = self.section_losses(x, y)
            return torch.stack(losses).sum(), z
        with torch.no_grad():
            self.teacher.eval()
            z_t = self.teacher(x)
        z = model(x)
        return kd_loss(z, z_t, y, self.alpha, self.temperature), z
